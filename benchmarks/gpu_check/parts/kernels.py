"""The ``kernels`` part (issue 20): every variant of a sparse layer's three products at
every layer shape of the step table and of HIGGS, against dense baselines named by
precision, the 4096 x 4096 layer against issue 20's targets, and the 784-4096-4096-10
step with the default kernels and with ``"auto"``.

The kernels and their variants (float32), each called as a layer calls it:

* ``spmm`` (``W @ x`` with the bias and ReLU) and ``spmm_t`` (``W.T @ dy``, through
  the layer's transposed pattern): :data:`SPMM_VARIANTS`, the methods of
  ``kernels.set_spmm``;
* ``sddmm`` (``dy x^T`` at the nonzeros): :data:`SDDMM_VARIANTS`, ``method:group``
  as ``$CUPYNN_SDDMM`` writes them.

A variant whose method is not in ``kernels.SPMM_METHODS`` / ``SDDMM_METHODS`` of the
checked commit is reported ``"absent"``; one that raises, ``"error: ..."`` (and the part
fails). ``"auto"`` runs ``cupynn.kernels.choice.choose``'s pick; :func:`choice_label`
names that pick without running it.

Per (kernel, variant, shape, density):

``us``
    :func:`.dense.median_time`: the median of ``reps`` calls, each between two CUDA
    events, after 2 warm-up calls (a wall clock on the CPU: not a GPU figure). The
    operands stay where the previous call left them (L2 holds 50 MB on an H100/H200),
    as in a training step. At the small shapes a call is launch-bound: the figure is
    then the host's time to launch it.
``gb_s_min``, ``gb_s_l2``
    bytes over time, in the two models of :func:`byte_models`: the bytes the product
    must move at least (each array once: the DRAM view), and the bytes a kernel that
    reads a whole dense row per nonzero moves (the L2 view, the traffic issue 20 names).
``gflop_s``, ``peak_fraction``
    ``2 * nnz * batch`` over time, and its fraction of the device's FP32 peak
    (:func:`device_peak`: SMs x clock x FP32 lanes per SM x 2).
``bits_equal_default``, ``max_rel_diff``
    the output against the default method's (``kernels.spmm_setting()``,
    ``kernels.sddmm_setting()``) on the same operands: equal bit for bit, and the
    largest difference relative to the largest value (over :data:`RTOL` fails).

Per (kernel, shape, density), :func:`finish_group`: the fastest explicit variant
(``"auto"`` is not a candidate: it runs one of them), the default's, ``choose()``'s
pick's and ``"auto"``'s times over the fastest's, and the dense baselines
(:mod:`.dense`). :func:`kernel_targets` sums the fastest variants of the 4096 x 4096
layer at batch 512; :func:`time_steps` and :func:`step_rows` give the step's sparse ÷
dense FP32 and peak device memory under both kernel settings.
"""

from __future__ import annotations

import importlib
import statistics
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy

import cupynn
from cupynn import kernels
from cupynn.backend import to_numpy

from ..context import FAILED, Context, result, target
from .dense import Shape, cupy_events, dense_baselines, median_time, shape_label

# (n_in, n_out, batch): the sparse layers of the step table (784-256-256-10 and
# 784-4096-4096-10, batch 512; every layer sparse) and of HIGGS (21-256-256-256-1,
# batch 128; its output layer is dense).
KERNEL_SHAPES: list[Shape] = [
    (784, 256, 512), (256, 256, 512), (256, 10, 512),
    (784, 4096, 512), (4096, 4096, 512), (4096, 10, 512),
    (21, 256, 128), (256, 256, 128)]
TARGET_SHAPE: Shape = (4096, 4096, 512)
QUICK_SHAPES_CPU: list[Shape] = [(64, 32, 64), (32, 10, 64)]
QUICK_SHAPES_GPU: list[Shape] = [(784, 256, 512), TARGET_SHAPE]
DENSITIES = (0.1, 0.03)
KERNELS = ("spmm", "spmm_t", "sddmm")
SPMM_VARIANTS = [("rows", None), ("tiles", None), ("vec", None), ("cusparse", None),
                 ("auto", None)]
SDDMM_VARIANTS = [("thread", None), *(("warp", g) for g in (4, 8, 16, 32)),
                  ("tiles", 8), ("tiles", 16), ("vec", 8), ("vec", 16), ("auto", None)]
ABSENT = "absent"
MEASURED = "measured"
RTOL = 1e-4  # a variant further than this from the default's output is wrong
# Issue 20's targets (H100 or H200, batch 512): the 4096 x 4096 layer's three kernels
# (ms), and the 784-4096-4096-10 step sparse / dense FP32; peak memory not above the
# default's.
KERNEL_TARGETS_MS = {0.1: 0.45, 0.03: 0.15}
STEP_SIZES = (784, 4096, 4096, 10)
STEP_TARGETS = {0.1: 0.5, 0.03: 0.25}
MEMORY_TARGET = 1.0
STEP_SECONDS = 12  # what the step and its peak memory need of the part's limit, with room
# FP32 lanes per SM where they are not 128 (Pascal GP100, Volta, Turing, A100).
FP32_LANES = {(6, 0): 64, (7, 0): 64, (7, 2): 64, (7, 5): 64, (8, 0): 64}
CUDA_CLOCK_RATE_ATTR = 13  # cudaDevAttrClockRate (kHz), where the properties lack clockRate


def variant_label(method: str, group: int | None) -> str:
    """``"rows"``, ``"warp:16"``: the ``$CUPYNN_SPMM`` / ``$CUPYNN_SDDMM`` spelling."""
    return method if group is None else f"{method}:{group}"


def choice_label(kernel: str, method: str, group: int | None, batch: int,
                 labels: list[str]) -> str:
    """The variant label of a (method, group) pick: the group named, else for the
    grouped SDDMM kernels the group the kernel takes by default
    (``kernels.sddmm_group(batch)``), else the method alone."""
    if group is not None:
        return variant_label(method, group)
    if kernel == "sddmm" and method not in labels:
        grouped = variant_label(method, kernels.sddmm_group(batch))
        if grouped in labels:
            return grouped
    return method


# ----------------------------------------------------------------- models of the figures
def byte_models(kernel: str, n_in: int, n_out: int, batch: int, nnz: int,
                itemsize: int = 4) -> tuple[int, int]:
    """``(minimum, per_row)`` bytes of one product.

    Both count the CSR pattern once (``indptr`` and ``indices``, int32) and the values
    once (read by the products, written by SDDMM). ``minimum`` then adds every dense
    array once: what the product must move at least, the DRAM view. ``per_row`` adds,
    per nonzero, the whole row(s) of ``batch`` values it multiplies — ``x[col]`` for
    ``spmm``, ``dy[row]`` for ``spmm_t``, both for SDDMM — and the dense output once:
    the traffic through L2 of a kernel that reads a row per nonzero (issue 20's "3.4 GB
    per product" at the 4096 layer). A kernel that re-reads rows from shared memory or
    L1 moves between the two."""
    pattern = 4 * (n_out + 1 + nnz) + itemsize * nnz
    rows = itemsize * nnz * batch
    x, dy = itemsize * n_in * batch, itemsize * n_out * batch
    if kernel == "spmm":  # reads x and the bias, writes out (n_out, batch)
        return pattern + x + itemsize * n_out + dy, pattern + rows + itemsize * n_out + dy
    if kernel == "spmm_t":  # reads dy, writes out (n_in, batch)
        return pattern + dy + x, pattern + rows + x
    if kernel == "sddmm":  # reads dy and x, writes the values
        return pattern + dy + x, pattern + 2 * rows
    raise ValueError(f"kernel must be one of {list(KERNELS)}. Got {kernel!r} instead.")


def fp32_peak_flops(sm_count: int, clock_khz: float, major: int, minor: int) -> float:
    """The FP32 peak: SMs x clock x FP32 lanes per SM (128 since Ampere's GA10x and on
    Hopper; 64 on A100, Volta, Turing) x 2 (a fused multiply-add is two flops)."""
    return sm_count * clock_khz * 1e3 * FP32_LANES.get((major, minor), 128) * 2


def device_peak(ctx: Context) -> dict[str, Any]:
    """The device's FP32 peak from ``cupy.cuda.runtime.getDeviceProperties`` (the SM
    count, the clock rate in kHz: the boost clock). None on the CPU."""
    if not ctx.gpu:
        return {"fp32_flops": None, "formula": "needs a GPU"}
    runtime = ctx.backend.xp.cuda.runtime
    device = ctx.backend.xp.cuda.Device().id
    props = runtime.getDeviceProperties(device)
    try:  # CUDA 13 dropped clockRate from the properties; the attribute stays
        clock = props.get("clockRate") or runtime.deviceGetAttribute(CUDA_CLOCK_RATE_ATTR,
                                                                     device)
    except Exception as exc:  # the part goes on without the peak's fractions
        return {"fp32_flops": None, "formula": f"no clock rate ({type(exc).__name__}: {exc})"}
    major, minor, sms = props["major"], props["minor"], props["multiProcessorCount"]
    lanes = FP32_LANES.get((major, minor), 128)
    return {"fp32_flops": fp32_peak_flops(sms, clock, major, minor), "sm_count": sms,
            "clock_mhz": clock / 1e3, "fp32_lanes_per_sm": lanes,
            "formula": f"{sms} SMs x {clock / 1e6:.3f} GHz x {lanes} FP32 lanes x 2"}


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def finish_group(group: dict[str, Any]) -> dict[str, Any]:
    """Add to one (kernel, shape, density) group what its variants' times say: the
    fastest explicit variant (``"auto"`` runs one of them, so it is no candidate), and
    the default's, ``choose()``'s and ``"auto"``'s time over the fastest's."""
    times = {k: v["us"] for k, v in group["variants"].items() if v.get("us") is not None}
    explicit = {k: t for k, t in times.items() if k != "auto"}
    fastest = min(explicit, key=explicit.get) if explicit else None
    best = explicit.get(fastest)
    dense = (group.get("dense_us") or {}).get("cublas_fp32")
    group.update(
        fastest=fastest, fastest_us=best,
        default_us=times.get(group["default"]),
        default_vs_fastest=ratio(times.get(group["default"]), best),
        choice_us=times.get(group.get("choice")),
        choice_vs_fastest=ratio(times.get(group.get("choice")), best),
        choice_is_fastest=None if group.get("choice") is None or fastest is None
        else group["choice"] == fastest,
        auto_us=times.get("auto"), auto_vs_fastest=ratio(times.get("auto"), best),
        fastest_vs_dense_fp32=ratio(best, dense))
    return group


def layer_ms(groups: list[dict[str, Any]], shape: str, density: float,
             key: str = "fastest_us") -> float | None:
    """The layer's three kernels summed (ms) by ``key`` of their groups; None when a
    kernel is missing or has no such time."""
    found = {g["kernel"]: g.get(key) for g in groups
             if g["shape"] == shape and g["density"] == density}
    if set(found) != set(KERNELS) or any(v is None for v in found.values()):
        return None
    return sum(found.values()) / 1e3


def kernel_targets(groups: list[dict[str, Any]], gpu: bool) -> list[dict[str, Any]]:
    """Issue 20's targets for the 4096 x 4096 layer at batch 512: the fastest variants'
    three kernels summed, per density; "not measured" off a GPU or without the shape."""
    shape = shape_label(TARGET_SHAPE)
    return [target(f"{shape} d={d:g}: spmm + spmm_t + SDDMM, fastest variants (ms)",
                   layer_ms(groups, shape, d) if gpu else None, limit, "ms")
            for d, limit in KERNEL_TARGETS_MS.items()]


# ----------------------------------------------------------------- the variants table
def kernel_calls(layer: Any, x: Any, dy: Any, out: Any) -> dict[str, Callable[..., Any]]:
    """Each kernel as a layer calls it, given a method and a group: ``spmm_t`` through
    the layer's transposed pattern, and ``"vec"`` / ``"auto"`` given the row orders
    (``kernels.row_swizzle``) a layer keeps for them, on the GPU, where the commit has
    them."""
    transposed = layer.transposed_pattern()
    swizzle = getattr(kernels, "row_swizzle", None)
    orders = (None, None) if swizzle is None or transposed is None else (
        swizzle(layer.indptr), swizzle(transposed[0]))

    def order(method: str, which: int) -> dict[str, Any]:
        wanted = method in ("vec", "auto") and orders[which] is not None
        return {"swizzle": orders[which]} if wanted else {}

    return {
        "spmm": lambda m, g: kernels.spmm(layer.indptr, layer.indices, layer.data, x,
                                          check=False, bias=layer.bias, relu=True, method=m,
                                          **order(m, 0)),
        "spmm_t": lambda m, g: kernels.spmm_t(layer.indptr, layer.indices, layer.data, dy,
                                              layer.in_features, check=False, method=m,
                                              transpose=transposed, sorted_rows=True,
                                              **order(m, 1)),
        "sddmm": lambda m, g: kernels.sddmm(layer.indptr, layer.indices, dy, x, out,
                                            check=False, method=m, group=g)}


def methods_of(kernel: str) -> tuple[str, ...]:
    return tuple(kernels.SDDMM_METHODS if kernel == "sddmm" else kernels.SPMM_METHODS)


def default_of(kernel: str, batch: int) -> tuple[str, int | None, str]:
    """The method and group a call gets when it names none, and its label."""
    if kernel == "sddmm":
        method, group = kernels.sddmm_setting()
        labels = [variant_label(m, g) for m, g in SDDMM_VARIANTS]
        return method, group, choice_label(kernel, method, group, batch, labels)
    method = kernels.spmm_setting()
    return method, None, method


def load_choose() -> tuple[Callable[..., Any] | None, str]:
    """``cupynn.kernels.choice.choose`` or None and why not."""
    try:
        return importlib.import_module("cupynn.kernels.choice").choose, ""
    except (ImportError, AttributeError) as exc:
        return None, f"cupynn.kernels.choice.choose is absent ({exc})"


def measure_group(ctx: Context, kernel: str, call: Callable[..., Any], shape: Shape,
                  density: float, nnz: int, reps: int, peak: float | None,
                  choose: Callable[..., Any] | None) -> dict[str, Any]:
    """Every variant of one kernel at one (shape, density)."""
    n_in, n_out, batch = shape
    events = cupy_events(ctx.backend.xp) if ctx.gpu else None
    variants = SDDMM_VARIANTS if kernel == "sddmm" else SPMM_VARIANTS
    labels = [variant_label(m, g) for m, g in variants]
    methods = methods_of(kernel)
    d_method, d_group, d_label = default_of(kernel, batch)
    reference = to_numpy(call(d_method, d_group)).copy()
    scale = float(numpy.abs(reference).max()) or 1.0
    minimum, per_row = byte_models(kernel, n_in, n_out, batch, nnz)
    flops = 2 * nnz * batch
    group: dict[str, Any] = {"kernel": kernel, "shape": shape_label(shape), "n_in": n_in,
                             "n_out": n_out, "batch": batch, "density": density, "nnz": nnz,
                             "default": d_label, "bytes_min": minimum, "bytes_l2": per_row,
                             "flop": flops, "variants": {}}
    if choose is None:
        group["choice"] = None
    else:
        try:
            method, g = choose(kernel, n_out, n_in, nnz, batch, numpy.dtype(numpy.float32))
            group["choice"] = choice_label(kernel, method, g, batch, labels)
        except Exception as exc:
            group["choice"] = None
            group["choice_error"] = f"{type(exc).__name__}: {exc}"[:300]
    for (method, g), label in zip(variants, labels):
        if method not in methods:
            group["variants"][label] = {"status": ABSENT, "us": None}
            continue
        try:
            seconds = median_time(lambda: call(method, g), reps, events)
            got = to_numpy(call(method, g))
        except Exception as exc:  # reported; the part fails, the other variants go on
            group["variants"][label] = {"status": f"error: {type(exc).__name__}: {exc}"[:300],
                                        "us": None}
            continue
        group["variants"][label] = {
            "status": MEASURED, "us": 1e6 * seconds, "gb_s_min": minimum / seconds / 1e9,
            "gb_s_l2": per_row / seconds / 1e9, "gflop_s": flops / seconds / 1e9,
            "peak_fraction": None if not peak else flops / seconds / peak,
            "bits_equal_default": bool(numpy.array_equal(got, reference)),
            "max_rel_diff": float(numpy.abs(got - reference).max()) / scale if got.size else 0.0}
    return group


def kernel_groups(ctx: Context, shapes: list[Shape], reps: int, peak: float | None
                  ) -> tuple[list[dict[str, Any]], str]:
    choose, why = load_choose()
    rng = numpy.random.default_rng(0)
    xp = ctx.backend.xp
    groups = []
    for shape in shapes:
        n_in, n_out, batch = shape
        for density in DENSITIES:
            layer = cupynn.SparseLinear(n_in, n_out, density, seed=1, device=ctx.backend)
            x = xp.asarray(rng.standard_normal((n_in, batch), dtype=numpy.float32))
            dy = xp.asarray(rng.standard_normal((n_out, batch), dtype=numpy.float32))
            out = xp.empty(layer.nnz, dtype=numpy.float32)
            for kernel, call in kernel_calls(layer, x, dy, out).items():
                g = measure_group(ctx, kernel, call, shape, density, layer.nnz, reps, peak,
                                  choose)
                groups.append(g)
                # As it goes: a part stopped at its limit still leaves these in its notes.
                print(f"[kernels] {kernel} {g['shape']} d={density:g}: " + ", ".join(
                    f"{k} {fmt(v['us'], '.1f')}" for k, v in g["variants"].items()), flush=True)
            del layer, x, dy, out
    return groups, why


# ----------------------------------------------------------------- the step
@contextmanager
def kernel_setting(spmm: str, sddmm: tuple[str, int | None]) -> Iterator[None]:
    """The sparse kernels a layer uses when it names none, set and restored."""
    before = kernels.spmm_setting(), kernels.sddmm_setting()
    kernels.set_spmm(spmm)
    kernels.set_sddmm(*sddmm)
    try:
        yield
    finally:
        kernels.set_spmm(before[0])
        kernels.set_sddmm(*before[1])


def step_settings() -> dict[str, tuple[str, tuple[str, int | None]] | None]:
    """``"default"``: the kernels a step uses now; ``"auto"``: ``choose()``'s, or None
    where the checked commit lacks the method."""
    auto = "auto" in kernels.SPMM_METHODS and "auto" in kernels.SDDMM_METHODS
    return {"default": (kernels.spmm_setting(), kernels.sddmm_setting()),
            "auto": ("auto", ("auto", None)) if auto else None}


def time_steps(steps: dict[Any, Callable[[], dict[str, float]]], n: int, per_round: int,
               warmup: int) -> dict[Any, float]:
    """Median seconds per step of each entry, timed in rounds whose order rotates (as
    ``bench_training.time_models`` does), each turn after one untimed step."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    keys = list(steps)
    samples: dict[Any, list[float]] = {k: [] for k in keys}
    for r in range(-(-n // per_round)):
        for i in range(len(keys)):
            key = keys[(r + i) % len(keys)]
            steps[key]()
            for _ in range(min(per_round, n - len(samples[key]))):
                samples[key].append(steps[key]()["step"])
    return {k: statistics.median(v) for k, v in samples.items()}


def step_rows(ctx: Context) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """The step of :data:`STEP_SIZES` (784-64-64-10 in the dry run), batch 512: ms per
    step dense, and sparse with each kernel setting per density, with peak device memory
    (building the model and one step; ``tracemalloc`` on the CPU)."""
    from benchmarks import bench_training as bt

    sizes = (784, 64, 64, 10) if ctx.quick and not ctx.gpu else STEP_SIZES
    batch = 64 if ctx.quick and not ctx.gpu else 512
    args = bt.parse_args(["--device", ctx.device, "--sizes", "-".join(map(str, sizes)),
                          "--batch", str(batch), "--no-peer", "--pause", "0"])
    n, per_round, warmup = (2, 1, 1) if ctx.quick else (20, 5, 3)
    host_batch = bt.make_host_batch(sizes, args)
    settings = {k: v for k, v in step_settings().items() if v is not None}

    def under(setting: Any, step: Callable[[], dict[str, float]]) -> Callable[[], Any]:
        def run() -> dict[str, float]:
            with kernel_setting(*setting):
                return step()
        return run

    steps: dict[Any, Callable[[], dict[str, float]]] = {
        "dense": bt.make_runner(bt.Config("dense", 1.0), sizes, args, ctx.backend, None,
                                host_batch).step}
    for d in DENSITIES:
        runner = bt.make_runner(bt.Config("sparse", d), sizes, args, ctx.backend, None,
                                host_batch)
        for name, setting in settings.items():
            steps[(d, name)] = under(setting, runner.step)
    medians = time_steps(steps, n, per_round, warmup)
    del steps
    label = "-".join(map(str, sizes))
    memory = [{"sizes": label, "model": "dense", "density": 1.0, "kernels": None,
               "peak_bytes": bt.peak_memory(None, sizes, args, ctx.backend)}]
    rows = [{"sizes": label, "batch": batch, "model": "dense", "density": 1.0, "kernels": None,
             "step_ms": 1e3 * medians["dense"], "vs_dense_fp32": 1.0}]
    for d in DENSITIES:
        for name in ("default", "auto"):
            if name not in settings:
                rows.append({"sizes": label, "batch": batch, "model": "sparse", "density": d,
                             "kernels": name, "status": ABSENT, "step_ms": None,
                             "vs_dense_fp32": None})
                continue
            rows.append({"sizes": label, "batch": batch, "model": "sparse", "density": d,
                         "kernels": name, "setting": settings[name],
                         "step_ms": 1e3 * medians[(d, name)],
                         "vs_dense_fp32": medians[(d, name)] / medians["dense"]})
            with kernel_setting(*settings[name]):
                peak = bt.peak_memory(d, sizes, args, ctx.backend)
            memory.append({"sizes": label, "model": "sparse", "density": d, "kernels": name,
                           "peak_bytes": peak})
    for m in memory:
        default = next((r["peak_bytes"] for r in memory if r["density"] == m["density"]
                        and r["kernels"] == "default"), None)
        m["vs_default"] = ratio(m["peak_bytes"], default) if m["model"] == "sparse" else None
    how = ("CuPy pool high-water mark" if ctx.gpu
           else "tracemalloc on the CPU, not device memory")
    return rows, memory, how


def step_targets(rows: list[dict[str, Any]], memory: list[dict[str, Any]], gpu: bool
                 ) -> list[dict[str, Any]]:
    """Issue 20's step targets, for each kernel setting, and peak memory of "auto" not
    above the default's; "not measured" off a GPU or where a setting is absent."""
    out = []
    for name in ("default", "auto"):
        for d, limit in STEP_TARGETS.items():
            row = next((r for r in rows if r["density"] == d and r["kernels"] == name), None)
            value = row["vs_dense_fp32"] if gpu and row and row["sizes"] == "784-4096-4096-10" \
                else None
            out.append(target(f"784-4096-4096-10 step d={d:g}, {name} kernels: sparse / dense "
                              f"FP32", value, limit))
    for d in DENSITIES:
        m = next((r for r in memory if r["density"] == d and r["kernels"] == "auto"), None)
        out.append(target(f"step peak memory d={d:g}: auto / default",
                          m["vs_default"] if gpu and m else None, MEMORY_TARGET))
    return out


# ----------------------------------------------------------------- the part
def part_kernels(ctx: Context) -> dict[str, Any]:
    shapes = ((QUICK_SHAPES_GPU if ctx.gpu else QUICK_SHAPES_CPU) if ctx.quick
              else KERNEL_SHAPES)
    reps = 3 if ctx.quick else 20
    peak = device_peak(ctx)
    notes = [] if ctx.gpu else [
        "on the CPU every method is the one Numba kernel and every time a wall clock of the "
        "CPU, not a GPU figure; the targets need a GPU (not measured)"]
    groups, why = kernel_groups(ctx, shapes, reps, peak["fp32_flops"])
    if why:
        notes.append(why)
    print(f"[kernels] {len(groups)} groups timed", flush=True)
    dense, precisions, dense_notes = dense_baselines(
        ctx.backend.xp, ctx.gpu, ctx.device, shapes, reps, timeout=max(5.0, ctx.remaining() - 20))
    notes += dense_notes
    if "FP32" not in precisions["cublas_fp32"]:
        notes.append(f"the dense step's matmul is not FP32 here: {precisions['cublas_fp32']}")
    for g in groups:
        g["dense_us"] = dense[g["shape"]][g["kernel"]]
        finish_group(g)
    print("[kernels] dense baselines: " + ", ".join(f"{k}: {v}" for k, v in precisions.items()),
          flush=True)
    if ctx.remaining() > STEP_SECONDS:
        steps, memory, memory_how = step_rows(ctx)
    else:  # the variants ran long: keep what they measured rather than be killed
        steps, memory, memory_how = [], [], "not run"
        notes.append(f"the step was not timed: {ctx.remaining():.0f} s of the part's limit "
                     f"left, under {STEP_SECONDS} s")
    print("[kernels] steps: " + "; ".join(f"d={r['density']:g} {r['kernels']}: "
                                          f"{r['vs_dense_fp32']}" for r in steps[1:]), flush=True)
    targets = kernel_targets(groups, ctx.gpu) + step_targets(steps, memory, ctx.gpu)
    layer = {f"{shape_label(TARGET_SHAPE)} d={d:g}": {
        key: layer_ms(groups, shape_label(TARGET_SHAPE), d, f"{key}_us")
        for key in ("fastest", "default", "choice", "auto")} for d in DENSITIES}
    absent = sorted({f"{g['kernel']} {k}" for g in groups for k, v in g["variants"].items()
                     if v["status"] == ABSENT})
    errors = sorted({f"{g['kernel']} {k}: {v['status']}" for g in groups
                     for k, v in g["variants"].items() if v["status"].startswith("error")})
    worst = max((v["max_rel_diff"] for g in groups for v in g["variants"].values()
                 if v["status"] == MEASURED), default=0.0)
    picked = [g for g in groups if g.get("choice_is_fastest") is not None]
    summary = "; ".join([
        *(f"{k}: {fmt(v['fastest'], '.3f')} ms best, {fmt(v['default'], '.3f')} ms default"
          for k, v in layer.items()),
        (f"choose() picks the fastest at {sum(g['choice_is_fastest'] for g in picked)}/"
         f"{len(picked)}" if picked else "choose() absent"),
        *(f"step d={r['density']:g} {r['kernels']}: {fmt(r['vs_dense_fp32'], '.2f')}x dense"
          for r in steps if r["model"] == "sparse"),
        f"variants agree to {worst:.1e}",
        f"absent: {', '.join(absent)}" if absent else "none absent",
        *([f"{len(errors)} variants raised"] if errors else [])])
    status = FAILED if errors or worst > RTOL else ctx.measured()
    notes += errors
    return result(status, summary,
                  {"reps": reps, "peak": peak, "shapes": [shape_label(s) for s in shapes],
                   "densities": list(DENSITIES), "groups": groups,
                   "dense_precisions": precisions, "layer_ms": layer, "steps": steps,
                   "memory": memory, "memory_how": memory_how, "absent": absent,
                   "targets": targets},
                  notes, targets if ctx.gpu else [])  # the verdict's targets: GPU figures only

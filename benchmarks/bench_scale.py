"""How large a truly sparse MLP cupynn trains, and what size costs: step time and memory.

A family of wide sparse MLPs ``784-W-W-W-10`` with a fixed number of inputs per
neuron (``--inputs``, default 20): per-layer densities ``[k/784, k/W, k/W, 1.0]``,
the output layer dense (``dense_layers=(-1,)``), as issue 21 builds them. For
each width ``W`` (``--widths``) the script

* **builds** the model and its Adam on the backend (seconds, and the peak
  memory after the build),
* **trains** ``--steps`` steps after ``--warmup`` untimed ones at ``--batch``
  rows of random data, each step through the trainer's own
  :meth:`cupynn.step.TrainStep.timed` (a device sync after each phase): the
  median step and the median of each phase,
* gives the **epoch** for ``--rows`` rows, *computed*: ``ceil(rows / batch)``
  × the median step; with ``--redistribute`` plus one *measured*
  redistribution (``--redistribution``, default gradient-global, moving
  ``--fraction`` of the weights, one batch as the growth batch, as the trainer
  calls it after an epoch). Growth by gradient forms the sparse layers' dense
  gradients block by block, at most ``2 × out × in × batch`` flops per layer
  (it skips the rows whose gradient cannot beat its running top-k, a share that
  depends on the data), which at large W is more work than an epoch of steps;
  a redistribution whose bound passes ``--redistribution-max-gflop`` is not
  run, and its time is *extrapolated* from the largest one run (seconds per
  GFLOP of the bound), and said so,
* reads the **memory**: on the CPU the process's peak resident set
  (``VmHWM``, its high-water mark reset before each model; ``ru_maxrss`` where
  /proc is missing) and the resident set before the build (the baseline: the
  interpreter, NumPy, Numba's kernels); on the GPU the peak bytes in use from
  CuPy's memory pool (:class:`cupynn.memory.MemoryTracker`, started before
  the build),
* counts what the model holds, from the arrays (:func:`cupynn.memory.footprint`
  after the timed steps, so with the gradients): every component, and the
  **bytes per nonzero**, the per-weight components ÷ the weights; and what
  the dense network of the same sizes would hold with Adam
  (:func:`cupynn.memory.dense_twin_bytes`).

``--memory 16GB`` then finds the largest ``W`` whose **projected** peak fits
the budget and trains it for ``--steps`` steps, reporting the measured peak
against the budget and the projection. The projection is linear: the bytes
per weight and per neuron (:func:`cupynn.memory.footprint`) of the largest
model measured in this run (or of a ``W = 1000`` model built for the
purpose), times the weights and the neurons (``784 + 3W + 10``) of width
``W``, plus the activations of one step at the batch
(:func:`cupynn.memory.step_activation_bytes`), plus the baseline now (the
process's resident set on the CPU; 0 on the GPU, whose budget is device
memory). It leaves out the build's and the step's temporaries: the measured
peak ÷ the projection says how much they add (each row of the table also
shows its projection from the row before it; about 1 % on the CPU here), and
the search keeps ``--headroom`` (default 3 %) of the budget for them: the
chosen W projects within ``budget × (1 - headroom)``. A redistribution's
buffers are not projected (with ``--redistribute`` the measured peak at W =
100 000 was 19 % above the projection). ``GB`` is 10^9 bytes,
``GiB`` 2^30.

Output: the table on stdout and, under ``--out`` (default ``docs/scale/``),
``<name>.json`` (the machine, the settings, every row, every step's phases)
and ``<name>.md`` (the table). See ``docs/scale.md``.
"""

from __future__ import annotations

if __name__ == "__main__":  # the best dense BLAS for the dense layer: before NumPy loads
    import os as _os
    import sys as _sys

    _sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))
    import blas_pin

    blas_pin.release()

import argparse
import gc
import json
import os
import re
import statistics
import sys
import time
from typing import Any

import numpy

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Benchmark the checkout this script lives in, installed or not.
sys.path.insert(0, ROOT)
sys.path.insert(1, HERE)

import cupynn  # noqa: E402
from cupynn import memory  # noqa: E402
from cupynn.init import inputs_per_neuron  # noqa: E402
from cupynn.step import TrainStep  # noqa: E402
from machine import (finish_info, fmt, header_lines, load_and_env_lines, load_average,  # noqa: E402
                     machine_info)

INPUTS, OUTPUTS, HIDDEN_LAYERS = 784, 10, 3
DEFAULT_WIDTHS = "1000,10000,100000,333333"
QUICK_WIDTHS = "64,256"
CALIBRATION_WIDTH = 1000  # the model the projection is measured on when no width ran
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


# ----------------------------------------------------------------- arguments
def parse_bytes(text: str) -> int:
    """'16GB' -> 16e9, '1.5GiB' -> 1.5 * 2^30, '500000' -> 500000."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match or match.group(2) not in UNITS:
        raise argparse.ArgumentTypeError(f"a memory budget looks like 16GB, 1.5GiB or 500MB; "
                                         f"got {text!r}")
    value = int(float(match.group(1)) * UNITS[match.group(2)])
    if value < 1:
        raise argparse.ArgumentTypeError(f"a memory budget must be positive; got {text!r}")
    return value


def parse_widths(text: str) -> list[int]:
    try:
        widths = sorted({int(w) for w in text.split(",") if w.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"widths look like 1000,10000; got {text!r}")
    if any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"widths must be >= 1; got {text!r}")
    return widths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    p.add_argument("--widths", type=parse_widths, default=None,
                   help=f"hidden widths W of 784-W-W-W-10, comma-separated (default "
                        f"{DEFAULT_WIDTHS}; --quick {QUICK_WIDTHS}); run in ascending order")
    p.add_argument("--inputs", type=int, default=20,
                   help="inputs per neuron k of the sparse layers: densities k/784, k/W, k/W")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed training steps per model")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--rows", type=int, default=60_000,
                   help="rows per epoch: the epoch is ceil(rows / batch) x the median step")
    p.add_argument("--redistribute", action="store_true",
                   help="also time one real redistribution per model and add it to the epoch")
    p.add_argument("--redistribution", default="gradient-global",
                   help="the redistribution --redistribute times (a name of "
                        "cupynn.redistribution)")
    p.add_argument("--fraction", type=float, default=0.5,
                   help="the fraction of the weights the timed redistribution moves")
    p.add_argument("--redistribution-max-gflop", type=float, default=None,
                   help="run a redistribution only when its growth's dense gradient, at most "
                        "2 x out x in x batch flops per sparse layer, is at most this many "
                        "GFLOP; beyond, extrapolate its time from the largest one run "
                        "(default 2000; --quick 1)")
    p.add_argument("--memory", type=parse_bytes, default=None, metavar="BUDGET",
                   help="find the largest W whose projected peak fits BUDGET (16GB, 12GiB) and "
                        "train it for --steps steps")
    p.add_argument("--headroom", type=float, default=0.03,
                   help="--memory: the share of the budget kept for what the projection leaves "
                        "out (the build's and the step's temporaries)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "scale"),
                   help="directory of the JSON and markdown reports ('' writes none)")
    p.add_argument("--name", default=None,
                   help="file name of the reports, without extension (default scale-<device>, "
                        "with -memory-<budget> and -quick when those apply)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: widths {QUICK_WIDTHS}, batch 16, 1 timed step after 1 "
                        f"warm-up step, 1000 rows (overrides those options)")
    args = p.parse_args(argv)
    if args.quick:
        args.widths = args.widths or parse_widths(QUICK_WIDTHS)
        args.batch, args.steps, args.warmup, args.rows = 16, 1, 1, 1000
    if args.widths is None:
        args.widths = parse_widths(DEFAULT_WIDTHS)
    if args.redistribution_max_gflop is None:
        args.redistribution_max_gflop = 1.0 if args.quick else 2000.0
    for name in ("inputs", "batch", "steps", "rows"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if not 0 < args.fraction <= 1:
        p.error("--fraction must be in (0, 1]")
    if not 0 <= args.headroom < 1:
        p.error("--headroom must be in [0, 1)")
    if args.redistribute:
        from cupynn.redistribution import create

        try:
            create(args.redistribution)
        except (ValueError, TypeError) as exc:
            p.error(f"--redistribution: {exc}")
    return args


def report_name(args: argparse.Namespace, device: str) -> str:
    if args.name:
        return args.name
    name = f"scale-{device}"
    if args.memory:
        name += f"-memory-{args.memory / 1e9:g}GB"
    return name + ("-quick" if args.quick else "")


def log(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------- the family
def sizes_of(width: int) -> tuple[int, ...]:
    return (INPUTS, *[width] * HIDDEN_LAYERS, OUTPUTS)


def densities_of(width: int, k: int) -> list[float]:
    """Per layer: k inputs per neuron (all of them where a layer has fewer), output dense."""
    return [min(1.0, k / INPUTS), *[min(1.0, k / width)] * (HIDDEN_LAYERS - 1), 1.0]


def layer_weights(width: int, k: int) -> list[int]:
    """Each layer's stored weights, as the model will have them (init's rounding)."""
    sizes, densities = sizes_of(width), densities_of(width, k)
    out = [fan_out * inputs_per_neuron(d, fan_in)
           for fan_in, fan_out, d in zip(sizes[:-2], sizes[1:-1], densities)]
    return out + [sizes[-2] * sizes[-1]]  # the dense output layer


def n_neurons(width: int) -> int:
    return int(sum(sizes_of(width)))


def build(width: int, args: argparse.Namespace, backend: Any) -> tuple[Any, Any]:
    model = cupynn.MLP(sizes_of(width), density=densities_of(width, args.inputs),
                       dense_layers=(-1,), seed=args.seed, dtype=args.dtype, device=backend)
    return model, cupynn.Adam(model, lr=args.lr)


def host_batch(args: argparse.Namespace) -> tuple[numpy.ndarray, numpy.ndarray]:
    rng = numpy.random.default_rng(args.seed)
    x = rng.standard_normal((args.batch, INPUTS)).astype(args.dtype)
    return x, rng.integers(0, OUTPUTS, args.batch)


def growth_gflop(width: int, args: argparse.Namespace) -> float:
    """The dense gradients that growth by gradient forms at most (every row): 2 x out x
    in x batch per sparse layer, in GFLOP."""
    sizes = sizes_of(width)
    return sum(2.0 * a * b * args.batch for a, b in zip(sizes[:-2], sizes[1:-1])) / 1e9


# ----------------------------------------------------------------- memory probes
class Peak:
    """The peak memory of one model: the process's resident set on the CPU, CuPy's pool
    on the GPU; :meth:`start` before the build."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.tracker: Any = None
        self.method = ""

    def start(self) -> int:
        """Reset the peak; the bytes in use now (the baseline)."""
        gc.collect()
        if self.backend.is_gpu:
            pool = self.backend.xp.get_default_memory_pool()
            pool.free_all_blocks()
            self.tracker = memory.MemoryTracker(self.backend).start()
            self.method = ("CuPy memory pool: peak bytes in use since before the build "
                           "(MemoryTracker), plus the bytes in use then")
            self.base = int(pool.used_bytes())
            return self.base
        reset = memory.reset_peak_rss()
        self.method = ("resident set: VmHWM, the high-water mark reset before the build" if reset
                       else "resident set: ru_maxrss since the process started (an upper bound)")
        return int(memory.rss_bytes() or 0)

    def peak(self) -> int:
        """The peak since :meth:`start`, the baseline included."""
        if self.backend.is_gpu:
            return int(self.tracker.peak()) + self.base  # the hook counts blocks taken after start
        return memory.peak_rss_bytes()

    def stop(self) -> None:
        if self.tracker is not None:
            self.tracker.stop()
            self.tracker = None


# ----------------------------------------------------------------- one model
WARMUP_WIDTH = 16


def warm_up(args: argparse.Namespace, backend: Any) -> None:
    """Two steps (and a redistribution) of a 16-wide model first: Numba's JIT or cache
    and CUDA's compilation then sit in every model's baseline, not in the first one's peak."""
    model, optimizer = build(WARMUP_WIDTH, args, backend)
    step = TrainStep(model, optimizer)
    x, y = host_batch(args)
    step(x, y)
    step(x, y)
    if args.redistribute:
        from cupynn.redistribution import create

        create(args.redistribution, seed=args.seed).redistribute(
            model, optimizer, args.fraction, x, y, "cross_entropy")
    backend.synchronize()


def median_phases(steps: list[dict[str, float]]) -> dict[str, float]:
    return {name: statistics.median(s[name] for s in steps) for name in steps[0]}


def measure(width: int, args: argparse.Namespace, backend: Any,
            redistribution_rate: list[float]) -> dict[str, Any]:
    """Build, train and measure the model of width ``width``; one row of the report.

    ``redistribution_rate`` holds the seconds per GFLOP of the largest redistribution
    run so far (updated here), for extrapolating the ones not run."""
    label = f"W={width:,}"
    peak = Peak(backend)
    baseline = peak.start()
    log(args, f"{label}: building 784-{width}x3-10 ({sum(layer_weights(width, args.inputs)):,} "
              f"weights)")
    start = time.perf_counter()
    model, optimizer = build(width, args, backend)
    backend.synchronize()
    build_s = time.perf_counter() - start
    peak_build = peak.peak()
    log(args, f"{label}: built in {build_s:.1f} s, peak {peak_build / 2**20:,.0f} MiB")
    built = memory.footprint(model, optimizer)
    x, y = host_batch(args)
    step = TrainStep(model, optimizer)
    for i in range(args.warmup):
        t = step.timed(x, y)
        log(args, f"{label}: warm-up step {i + 1}/{args.warmup}: {t['step']:.2f} s")
    steps = []
    for i in range(args.steps):
        steps.append(step.timed(x, y))
        log(args, f"{label}: step {i + 1}/{args.steps}: {steps[-1]['step']:.2f} s")
    phases = median_phases(steps)
    peak_train = peak.peak()
    fp = memory.footprint(model, optimizer, batch=args.batch)
    if fp["n_weights"] != sum(layer_weights(width, args.inputs)):  # the projection's count
        raise RuntimeError(f"{label}: the model has {fp['n_weights']:,} weights, "
                           f"layer_weights() counts {sum(layer_weights(width, args.inputs)):,}")
    epoch_steps = -(-args.rows // args.batch)
    row: dict[str, Any] = {
        "width": width, "sizes": "-".join(map(str, sizes_of(width))),
        "densities": densities_of(width, args.inputs), "n_neurons": n_neurons(width),
        "n_hidden_neurons": HIDDEN_LAYERS * width, "n_weights": fp["n_weights"],
        "layer_weights": [layer["nnz"] for layer in fp["layers"]],
        "build_s": build_s, "step_s": phases["step"],
        "phases_s": {k: v for k, v in phases.items() if k != "step"},
        "min_step_s": min(s["step"] for s in steps), "steps": steps,
        "epoch_steps": epoch_steps, "train_epoch_s": epoch_steps * phases["step"],
        "baseline_bytes": baseline, "peak_build_bytes": peak_build,
        "peak_bytes": max(peak_build, peak_train), "peak_method": peak.method,
        "footprint": fp, "footprint_after_build": built["components"],
        "bytes_per_nonzero": fp["bytes_per_nonzero"], "bytes_per_neuron": fp["bytes_per_neuron"],
        "dense_twin": memory.dense_twin_bytes(sizes_of(width), args.dtype),
        "redistribution": None,
    }
    row["dense_twin_vs_sparse"] = row["dense_twin"]["total_bytes"] / fp["total_bytes"]
    if args.redistribute:
        row["redistribution"] = redistribute(model, optimizer, width, args, backend,
                                              redistribution_rate, label)
        row["peak_bytes"] = max(row["peak_bytes"], peak.peak())
        seconds = row["redistribution"]["seconds"]
        row["epoch_s"] = None if seconds is None else row["train_epoch_s"] + seconds
    else:
        row["epoch_s"] = row["train_epoch_s"]
    peak.stop()
    del model, optimizer, step
    gc.collect()
    return row


def redistribute(model: Any, optimizer: Any, width: int, args: argparse.Namespace,
                 backend: Any, rate: list[float], label: str) -> dict[str, Any]:
    """One redistribution as the trainer runs it after an epoch (start_epoch, a step with
    observe, redistribute on one growth batch), timed; or its time extrapolated. The
    trainer also takes the probe batch's loss before and after (two forward passes) and
    the network's health: not counted here."""
    from cupynn.redistribution import create

    gflop = growth_gflop(width, args)
    out: dict[str, Any] = {"name": args.redistribution, "fraction": args.fraction,
                           "growth_gflop": gflop}
    if gflop > args.redistribution_max_gflop:
        out["measured"] = False
        out["seconds"] = gflop * rate[0] if rate else None
        out["note"] = (f"not run: {gflop:,.0f} GFLOP of dense gradient > "
                       f"--redistribution-max-gflop; extrapolated at the largest run's "
                       f"s/GFLOP" if rate else "not run, and none ran to extrapolate from")
        log(args, f"{label}: redistribution {out['note']}")
        return out
    redistributor = create(args.redistribution, seed=args.seed)
    x, y = host_batch(args)
    backend.synchronize()
    start = time.perf_counter()
    redistributor.start_epoch(model, -(-args.rows // args.batch), True)
    backend.synchronize()
    out["start_epoch_s"] = time.perf_counter() - start
    # The epoch's last step, with the redistributor's observe (gradient growth's is a no-op).
    TrainStep(model, optimizer, redistributor=redistributor)(x, y)
    log(args, f"{label}: redistributing ({args.redistribution}, fraction {args.fraction}, "
              f"{gflop:,.1f} GFLOP of dense gradient)")
    backend.synchronize()
    start = time.perf_counter()
    counts = redistributor.redistribute(model, optimizer, args.fraction, x, y, "cross_entropy")
    backend.synchronize()
    seconds = time.perf_counter() - start
    out.update(measured=True, seconds=out["start_epoch_s"] + seconds, redistribute_s=seconds,
               moved=int(sum(c["removed"] for c in counts)))
    if gflop > (rate[1] if len(rate) > 1 else 0):
        rate[:] = [seconds / gflop, gflop]
    log(args, f"{label}: redistribution {seconds:.2f} s")
    return out


# ----------------------------------------------------------------- the budget
def calibration(row: dict[str, Any], baseline_now: int, batch: int, dtype: str,
                inputs: int) -> dict[str, Any]:
    """What the projection reads from one measured model (see the module's docstring)."""
    fp = row["footprint"]
    return {"width": row["width"], "bytes_per_weight": fp["per_weight_bytes"] / fp["n_weights"],
            "bytes_per_neuron": fp["per_neuron_bytes"] / fp["n_neurons"],
            "baseline_bytes": int(baseline_now), "batch": batch, "dtype": dtype,
            "inputs": inputs}


def projected_peak(width: int, cal: dict[str, Any]) -> dict[str, int]:
    """The projected peak memory of width ``width`` and its terms."""
    act = memory.step_activation_bytes(sizes_of(width), cal["dtype"], cal["batch"])
    terms = {"baseline": int(cal["baseline_bytes"]),
             "weights": int(cal["bytes_per_weight"] * sum(layer_weights(width, cal["inputs"]))),
             "neurons": int(cal["bytes_per_neuron"] * n_neurons(width)),
             "activations": act["activations_bytes"] + act["backward_transient_bytes"]}
    terms["total"] = sum(terms.values())
    return terms


def largest_width(budget: int, cal: dict[str, Any]) -> int | None:
    """The largest W whose projected peak is at most ``budget`` (None if not even W=1)."""
    fits = lambda w: projected_peak(w, cal)["total"] <= budget  # noqa: E731
    if not fits(1):
        return None
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:  # fits(low), not fits(high)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def within_budget(rows: list[dict[str, Any]], args: argparse.Namespace, backend: Any,
                  rate: list[float]) -> dict[str, Any]:
    """Project, choose the largest W for ``args.memory``, train it; the report's part."""
    if not rows:
        log(args, f"calibrating the projection on W={CALIBRATION_WIDTH}")
        rows = [measure(CALIBRATION_WIDTH, args, backend, rate)]
        rows[0]["calibration_only"] = True
    gc.collect()
    if backend.is_gpu:
        baseline_now = 0  # the budget is the device's memory: the pool starts empty
    else:
        baseline_now = int(memory.rss_bytes() or rows[-1]["baseline_bytes"])
    cal = calibration(rows[-1], baseline_now, args.batch, args.dtype, args.inputs)
    search = int(args.memory * (1 - args.headroom))
    width = largest_width(search, cal)
    out: dict[str, Any] = {"budget_bytes": args.memory, "headroom": args.headroom,
                           "search_bytes": search, "calibration": cal, "width": width,
                           "projection": None, "next_projection": None, "row": None,
                           "calibration_row": rows[-1] if rows[-1].get("calibration_only")
                           else None}
    if width is None:
        log(args, "no width fits the budget")
        return out
    out["projection"] = projected_peak(width, cal)
    out["next_projection"] = projected_peak(width + 1, cal)
    log(args, f"largest width within {args.memory / 1e9:g} GB: {width:,} (projected "
              f"{out['projection']['total'] / 2**30:.2f} GiB)")
    row = measure(width, args, backend, rate)
    row["projected_peak_bytes"] = out["projection"]["total"]
    out["row"] = row
    out["fits"] = bool(row["peak_bytes"] <= args.memory)
    out["measured_vs_projected"] = row["peak_bytes"] / out["projection"]["total"]
    return out


# ----------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> dict[str, Any]:
    backend = cupynn.get_backend(args.device)
    info = machine_info(backend)
    load_before = load_average()
    start = time.perf_counter()
    rate: list[float] = []  # seconds per GFLOP of the largest redistribution run
    log(args, f"warming up on W={WARMUP_WIDTH}")
    warm_up(args, backend)
    rows = []
    for width in args.widths:
        rows.append(measure(width, args, backend, rate))
    # Each row's projection from the row before it (the first: from itself), to show
    # how the linear projection compares with what was measured.
    for before, row in zip([rows[0], *rows[:-1]], rows) if rows else ():
        cal = calibration(before, row["baseline_bytes"], args.batch, args.dtype, args.inputs)
        row["projected_peak_bytes"] = projected_peak(row["width"], cal)["total"]
    budget = within_budget(rows, args, backend, rate) if args.memory else None
    finish_info(info, load_before)
    settings = {k: getattr(args, k) for k in ("widths", "inputs", "batch", "steps", "warmup",
                                               "rows", "redistribute", "redistribution",
                                               "fraction", "redistribution_max_gflop", "memory",
                                               "headroom", "dtype", "lr", "seed", "quick")}
    settings["wall_seconds"] = round(time.perf_counter() - start, 1)
    return {"machine": info, "settings": settings, "rows": rows, "budget": budget}


# ----------------------------------------------------------------- the report
def mib(n: float | None) -> str:
    return fmt(None if n is None else n / 2**20, ",.0f")


def table(rows: list[dict[str, Any]]) -> list[str]:
    head = ("| W | neurons | weights | build s | s/step | fwd s | bwd s | adam s | epoch s "
            "| redist s | build MiB | peak MiB | projected MiB | model MiB | B/nonzero "
            "| dense twin MiB |")
    lines = [head, "|" + "---:|" * (head.count("|") - 1)]
    for r in rows:
        ph = r["phases_s"]
        red = r["redistribution"]
        red_s = "-" if red is None else (fmt(red["seconds"], ".2f")
                                         + ("" if red["measured"] else " (extrap.)"))
        lines.append(
            f"| {r['width']:,} | {r['n_neurons']:,} | {r['n_weights']:,} | {r['build_s']:.2f} "
            f"| {r['step_s']:.3f} | {ph.get('forward', 0):.3f} | {ph.get('backward', 0):.3f} "
            f"| {ph.get('adam', 0):.3f} | {fmt(r['epoch_s'], ',.0f')} | {red_s} "
            f"| {mib(r['peak_build_bytes'])} | {mib(r['peak_bytes'])} "
            f"| {mib(r.get('projected_peak_bytes'))} "
            f"| {mib(r['footprint']['total_bytes'])} | {r['bytes_per_nonzero']:.2f} "
            f"| {mib(r['dense_twin']['total_bytes'])} |")
    return lines


def components_table(rows: list[dict[str, Any]]) -> list[str]:
    """Bytes per weight of each per-weight component, and the per-neuron total."""
    names = [k for k in memory.PER_WEIGHT if any(r["footprint"]["components"][k] for r in rows)]
    head = "| W | " + " | ".join(names) + " | per weight | per neuron |"
    lines = [head, "|" + "---:|" * (head.count("|") - 1)]
    for r in rows:
        fp = r["footprint"]
        cells = " | ".join(f"{fp['components'][k] / fp['n_weights']:.2f}" for k in names)
        lines.append(f"| {r['width']:,} | {cells} | {fp['bytes_per_nonzero']:.2f} "
                     f"| {fp['bytes_per_neuron']:.2f} |")
    return lines


def format_report(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    rows = report["rows"]
    lines = ["```", *header_lines(m), *load_and_env_lines(m, s["wall_seconds"]), "```", "",
             f"784-W-W-W-10, {s['inputs']} inputs per neuron (densities {s['inputs']}/784, "
             f"{s['inputs']}/W, {s['inputs']}/W, output layer dense), {s['dtype']}, batch "
             f"{s['batch']}, Adam; median of {s['steps']} timed steps (TrainStep.timed) after "
             f"{s['warmup']} warm-up; epoch = ceil({s['rows']:,} / {s['batch']}) x the median "
             f"step (computed)"
             + (f" + one {s['redistribution']} redistribution moving {s['fraction']} of the "
                f"weights (measured, or extrapolated where marked)" if s["redistribute"] else "")
             + ".", ""]
    if rows:
        lines += table(rows)
        lines += ["", f"build MiB, peak MiB: after the build, and over build, steps (and "
                      f"redistribution); {rows[0]['peak_method']}; baseline before the first "
                      f"build {mib(rows[0]['baseline_bytes'])} MiB. projected: the peak "
                      f"projected from the row above (the first from itself). model: "
                      f"footprint() after the steps. dense twin: the dense 784-W-W-W-10's "
                      f"weights, biases, gradients and Adam moments.", "",
                  "Bytes per weight of each component (footprint()):", ""]
        lines += components_table(rows)
    b = report["budget"]
    if b:
        lines += ["", f"Largest model within {b['budget_bytes'] / 1e9:g} GB "
                      f"({b['budget_bytes'] / 2**30:.2f} GiB; projected within "
                      f"{mib(b['search_bytes'])} MiB, {b['headroom']:.0%} kept for "
                      f"temporaries):", ""]
        cal = b["calibration"]
        lines.append(f"projection from W={cal['width']:,}: {cal['bytes_per_weight']:.2f} B per "
                     f"weight, {cal['bytes_per_neuron']:.2f} B per neuron, the activations at "
                     f"batch {cal['batch']}, baseline {mib(cal['baseline_bytes'])} MiB")
        if b["width"] is None:
            lines.append("no width fits.")
        else:
            r = b["row"]
            lines += ["",
                      f"W = {b['width']:,}: {r['n_neurons']:,} neurons, {r['n_weights']:,} "
                      f"weights; projected {mib(b['projection']['total'])} MiB (W+1: "
                      f"{mib(b['next_projection']['total'])} MiB); measured peak "
                      f"{mib(r['peak_bytes'])} MiB = {b['measured_vs_projected']:.3f} x the "
                      f"projection, {'within' if b['fits'] else 'OVER'} the budget; "
                      f"{r['step_s']:.2f} s per step, epoch {fmt(r['epoch_s'], ',.0f')} s", ""]
            lines += table([r])
    return "\n".join(lines)


def write(report: dict[str, Any], text: str, args: argparse.Namespace) -> list[str]:
    if not args.out:
        return []
    os.makedirs(args.out, exist_ok=True)
    name = report_name(args, report["machine"]["backend"])
    paths = [os.path.join(args.out, name + ".json"), os.path.join(args.out, name + ".md")]
    with open(paths[0], "w") as f:
        json.dump(report, f, indent=2, default=_jsonable)
        f.write("\n")
    with open(paths[1], "w") as f:
        f.write(f"# bench_scale: {name}\n\n{text}\n")
    return paths


def _jsonable(value: Any) -> Any:
    if isinstance(value, (numpy.integer, numpy.floating)):
        return value.item()
    raise TypeError(f"not JSON-able: {type(value).__name__}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    text = format_report(report)
    print(text)
    for path in write(report, text, args):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

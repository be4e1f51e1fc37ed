"""Verify and measure cupynn on a GPU in one command; on the CPU, a dry run of the same.

``scripts/gpu_check.py`` is the entry point (``--help`` lists the options). A
lent GPU comes rarely and for minutes, with nothing to install: this runs,
in one call of at most about six minutes on one H100, everything that can
only be checked there, and writes one JSON and one Markdown report into the
folder it is given. The parts run in this order, each in a process of its own
under a time limit, and each records its status and seconds even when an
earlier one failed or hung:

correctness
    ``tests``: the test suite's GPU tests (``pytest -m gpu``: every kernel
    against its NumPy twin, float64 gradient checks, redistribution invariants
    and brute-force references, checkpoint and resume, on the GPU backend);
    ``parity``: the same seed trained for two epochs with a redistribution
    after each, on the CPU and on the GPU, in float64, for every algorithm:
    topologies equal after every redistribution, losses and weights within
    :data:`PARITY_RTOL`.
speed and memory
    ``steps``: training step of sparse, dense and masked-dense (PyTorch) models
    at 784-256-256-10 and 784-4096-4096-10, batch 512, densities 0.1 and 0.03,
    and the peak device memory of each; ``sddmm``: the thread and warp SDDMM
    kernels timed at the layers' shapes; ``launches``: kernel launches and
    host waits per training step; ``higgs``: one HIGGS-sized epoch (500 000
    rows, batch 128, gradient-global at density 0.1), against the peer and the
    paper; ``redistribution``: seconds per redistribution of every algorithm at
    the paper's sizes.
environment
    ``env``: GPU, driver, CUDA runtime, library versions, the commit.

With ``--device cpu --quick`` it is a dry run of seconds that CI runs, so that
the script cannot rot while no GPU is lent: every part's code runs on the CPU
at small sizes and says "dry run"; what needs a GPU says "skipped: no GPU".
A dry run never says "passed".
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(HERE))

import cupynn  # noqa: E402
from cupynn import kernels  # noqa: E402
from cupynn.backend import to_numpy  # noqa: E402
from cupynn.cli import DEBUG_FLAG, DEBUG_HELP, UserError, run_main  # noqa: E402

PASSED, FAILED, DRY_RUN = "passed", "failed", "dry run"
NO_GPU = "skipped: no GPU"
PARITY_RTOL = 1e-8  # float64, two epochs: rounding differences only
PARITY_EPOCHS = 2
HIGGS_TARGET_S = 0.6  # one HIGGS epoch on an H100
HIGGS_PEER_TARGET = 1.0  # x the masked-dense peer's epoch on the same GPU
BUDGET_S = 350  # the whole check on a GPU: under six minutes
REPORT_JSON, REPORT_MD, TESTS_LOG = "gpu-check.json", "gpu-check.md", "gpu-tests.log"
FAILURES_LOG = "gpu-failures.log"  # each failed GPU test's traceback, written as it fails


@dataclass(frozen=True)
class Part:
    name: str
    title: str
    seconds: int  # time limit on a GPU
    quick_seconds: int  # time limit of the CPU dry run


PARTS = (
    Part("tests", "GPU tests (pytest -m gpu)", 150, 60),
    Part("parity", "CPU <-> GPU parity, 2 epochs, float64", 40, 60),
    Part("steps", "training step and peak memory", 40, 60),
    Part("sddmm", "SDDMM kernels: thread vs warp; products: spmm.cu vs cuSPARSE", 25, 30),
    Part("launches", "kernel launches and host waits per step", 25, 20),
    Part("higgs", "one HIGGS-sized epoch", 50, 40),
    Part("redistribution", "seconds per redistribution", 40, 60),
    Part("mpi", "2 MPI ranks sharing the GPU against 1 process", 25, 40),
    Part("env", "environment", 15, 15),
)
PART_NAMES = tuple(p.name for p in PARTS)


# ----------------------------------------------------------------- context
class Context:
    """What every part knows: the device, the sizes and where the data is."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.backend = cupynn.get_backend(args.device)
        self.gpu = self.backend.is_gpu
        self.device = "gpu" if self.gpu else "cpu"
        self.data_dir = Path(args.data_dir) if args.data_dir else None
        self.out = Path(args.out)
        self.deadline = time.monotonic() + args.part_seconds

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def measured(self) -> str:
        """The status of a measurement that ran: passed on a GPU, a dry run on the CPU."""
        return PASSED if self.gpu else DRY_RUN


def result(status: str, summary: str, data: dict[str, Any] | None = None,
           notes: list[str] | None = None, targets: list[dict[str, Any]] | None = None
           ) -> dict[str, Any]:
    return {"status": status, "summary": summary, "data": data or {}, "notes": notes or [],
            "targets": targets or []}


def target(name: str, value: float | None, limit: float, unit: str = "") -> dict[str, Any]:
    """A speed target: met when ``value <= limit``."""
    met = None if value is None else bool(value <= limit)
    return {"name": name, "value": value, "limit": limit, "unit": unit,
            "verdict": "not measured" if met is None else ("met" if met else "missed")}


# ----------------------------------------------------------------- part: tests
SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def pytest_counts(text: str) -> dict[str, int]:
    """Counts from pytest's last summary line (``3 passed, 1 failed in 2.1s``)."""
    counts: dict[str, int] = {}
    lines = [line for line in text.splitlines() if SUMMARY.search(line)]
    for number, kind in SUMMARY.findall(lines[-1] if lines else ""):
        counts["errors" if kind.startswith("error") else kind] = int(number)
    return counts


def part_tests(ctx: Context) -> dict[str, Any]:
    log = ctx.out / TESTS_LOG
    # -v: one line per test as it ends, so that a run cut short still shows how far it got.
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "tests"), "-m", "gpu", "-rfE",
           "-p", "no:cacheprovider", "-p", "gpu_check_failures"]
    if not ctx.gpu:
        cmd += ["-q", "--collect-only"]
    else:
        cmd.append("-v")
        if importlib.util.find_spec("pytest_timeout") is not None:
            cmd.append("--timeout=60")  # one hung test must not take the whole part
    env = dict(os.environ)
    if ctx.data_dir is not None:
        env["CUPYNN_TEST_DATA"] = str(ctx.data_dir.resolve())
    # The plugin that writes each failure's traceback as it happens (beside this file).
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    failures_log = ctx.out / FAILURES_LOG
    failures_log.unlink(missing_ok=True)
    env["CUPYNN_FAILURES_LOG"] = str(failures_log)
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        try:
            returncode = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                        cwd=ROOT, timeout=max(5.0, ctx.remaining() - 5)).returncode
        except subprocess.TimeoutExpired:
            returncode = None  # stopped at the part's limit: count what the -v lines say
    text = log.read_text()
    if not ctx.gpu:
        collected = len(re.findall(r"::", text))
        return result(NO_GPU, f"{collected} GPU tests collected, none run",
                      {"collected": collected, "returncode": returncode})
    if returncode is None:
        counts = {k.lower(): n for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")
                  if (n := len(re.findall(rf"::\S+ {k}\b", text)))}
        failures = [f"FAILED {m}" for m in re.findall(r"^(\S+::\S+) (?:FAILED|ERROR)\b", text,
                                                      re.MULTILINE)]
    else:
        counts = pytest_counts(text)
        failures = [line for line in text.splitlines() if line.startswith(("FAILED", "ERROR"))]
    ok = returncode == 0 and counts.get("passed", 0) > 0
    summary = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no summary line"
    if returncode is None:
        summary = f"stopped at the part's limit after {summary}"
    data = {"counts": counts, "returncode": returncode, "failures": failures[:50],
            "log": TESTS_LOG}
    if failures_log.exists():
        data["failures_log"] = FAILURES_LOG
    return result(PASSED if ok else FAILED, summary, data)


# ----------------------------------------------------------------- part: parity
def small_split(ctx: Context) -> tuple[str, tuple[numpy.ndarray, ...]]:
    """A small real split: KMNIST (stratified from the official test images), or
    scikit-learn's digits where no KMNIST is at hand."""
    from cupynn.data import load_digits, load_kmnist

    rows, test_rows = (400, 100) if ctx.quick else (1600, 400)
    try:
        data = load_kmnist(None if ctx.data_dir is None else ctx.data_dir / "kmnist",
                           train_from_test=0.8, download=False, progress=False)
        name = "KMNIST (official test images, stratified 80/20)"
    except (FileNotFoundError, ValueError) as exc:
        data = load_digits()
        name = f"scikit-learn digits (no KMNIST: {str(exc).splitlines()[0]})"
    return name, (data.x_train[:rows], data.y_train[:rows], data.x_test[:test_rows],
                  data.y_test[:test_rows])


def parity_run(device: str, algorithm: str, data: tuple[numpy.ndarray, ...],
               hidden: int) -> dict[str, Any]:
    """Two epochs of a 4-epoch schedule (a redistribution after each), float64.

    Returns the history and, after each epoch (so after its redistribution),
    every sparse layer's pattern; and the final parameters."""
    x, y, xt, yt = data
    model = cupynn.MLP([x.shape[1], hidden, hidden, 10], density=0.1, seed=3, dtype="float64",
                       device=device)
    patterns: list[list[tuple[numpy.ndarray, numpy.ndarray]]] = []

    def after_epoch(metrics: dict[str, Any]) -> bool:
        patterns.append([(to_numpy(layer.indptr).copy(), to_numpy(layer.indices).copy())
                         for layer in model.sparse_layers])
        return len(patterns) < PARITY_EPOCHS

    history = cupynn.fit(model, cupynn.Adam(model, lr=2e-3), (x, y), (xt, yt),
                         epochs=2 * PARITY_EPOCHS, batch_size=128, seed=5, progress=False,
                         redistribution=algorithm, on_epoch_end=after_epoch)
    params = [to_numpy(value).copy() for layer in model.layers
              for _, value, _ in layer.parameters()]
    return {"history": history, "patterns": patterns, "params": params}


def compare_parity(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    topology = [all(numpy.array_equal(a[0], b[0]) and numpy.array_equal(a[1], b[1])
                    for a, b in zip(ra, rb))
                for ra, rb in zip(ref["patterns"], got["patterns"])]
    loss_diff = 0.0
    for h_ref, h_got in zip(ref["history"], got["history"]):
        for key in ("train_loss", "test_loss", "induced_loss_before", "induced_loss_after"):
            if key in h_ref:
                scale = max(abs(h_ref[key]), 1e-300)
                loss_diff = max(loss_diff, abs(h_ref[key] - h_got[key]) / scale)
    weight_diff = 0.0
    if all(topology):
        scale = max(float(numpy.abs(p).max()) for p in ref["params"])
        weight_diff = max(float(numpy.abs(a - b).max()) for a, b in zip(ref["params"],
                                                                        got["params"])) / scale
    moved = [h.get("redistribution") for h in ref["history"]]
    return {"topology_equal": topology, "loss_rel_diff": loss_diff,
            "weight_rel_diff": weight_diff if all(topology) else None,
            "moved": [sum(r["added"] for r in m) if m else 0 for m in moved],
            "ok": all(topology) and len(topology) == PARITY_EPOCHS
            and loss_diff <= PARITY_RTOL and weight_diff <= PARITY_RTOL}


def part_parity(ctx: Context) -> dict[str, Any]:
    from cupynn.redistribution import NAMES

    name, data = small_split(ctx)
    hidden = 64 if ctx.quick else 256
    rows = []
    for algorithm in NAMES:
        ref = parity_run("cpu", algorithm, data, hidden)
        got = parity_run(ctx.device, algorithm, data, hidden)
        rows.append({"algorithm": algorithm, **compare_parity(ref, got)})
    ok = all(r["ok"] for r in rows)
    bad = [r["algorithm"] for r in rows if not r["ok"]]
    summary = (f"{sum(r['ok'] for r in rows)}/{len(rows)} algorithms equal "
               f"(cpu vs {ctx.device})" + (f"; differ: {', '.join(bad)}" if bad else ""))
    status = (PASSED if ok else FAILED) if ctx.gpu else (DRY_RUN if ok else FAILED)
    return result(status, summary,
                  {"data": name, "rows": len(data[0]), "sizes": [data[0].shape[1], hidden,
                                                                  hidden, 10],
                   "density": 0.1, "dtype": "float64", "rtol": PARITY_RTOL, "results": rows},
                  notes=[] if ctx.gpu else ["cpu against cpu: the code path only, not a GPU "
                                            "result"])


# ----------------------------------------------------------------- part: steps
def torch_cuda() -> tuple[Any, str]:
    """PyTorch with CUDA, or None and why not."""
    try:
        import torch
    except ImportError as exc:
        return None, f"torch cannot be imported ({exc})"
    if not torch.cuda.is_available():
        return None, f"torch {torch.__version__} sees no CUDA device"
    return torch, ""


def peer_peak_bytes(bt: Any, peer: Any, sizes: tuple[int, ...], density: float,
                    args: argparse.Namespace, backend: Any) -> int:
    """torch.cuda.max_memory_allocated over building the peer and one step (batch not counted)."""
    import torch

    state = bt.build(sizes, density, args, backend)[0].state_dict()
    gc.collect()
    x, y = bt.make_host_batch(sizes, args)
    xb = torch.from_numpy(x).to(peer.device, getattr(torch, args.dtype))
    yb = torch.from_numpy(y).to(peer.device).long()  # the step table's loss: cross-entropy
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = bt.build_peer(peer, state, sizes, args)
    model.step(xb, yb)
    peak = torch.cuda.max_memory_allocated() - base
    del model
    torch.cuda.empty_cache()
    return int(peak)


def part_steps(ctx: Context) -> dict[str, Any]:
    import bench_training as bt

    sizes = "784-64-64-10" if ctx.quick else "784-256-256-10,784-4096-4096-10"
    argv = ["--device", ctx.device, "--sizes", sizes, "--densities", "0.1,0.03",
            "--batch", "64" if ctx.quick else "512", "--steps", "2" if ctx.quick else "20",
            "--per-round", "2" if ctx.quick else "5", "--warmup", "1" if ctx.quick else "3",
            "--pause", "0", "--no-memory"]
    args = bt.parse_args(argv)
    report = bt.run(args)
    notes = [f"peer: {report['machine']['peer'] or report['machine']['peer_note']}"]
    memory: list[dict[str, Any]] = []
    if ctx.gpu:
        peer, _ = bt.load_peer(args, ctx.backend)
        for size in args.sizes:
            label = "-".join(map(str, size))
            dense = bt.peak_memory(None, size, args, ctx.backend)
            memory.append({"sizes": label, "model": "dense", "density": 1.0, "peak_bytes": dense})
            for d in args.densities:
                sparse = bt.peak_memory(d, size, args, ctx.backend)
                row = {"sizes": label, "model": "sparse", "density": d, "peak_bytes": sparse,
                       "vs_dense": sparse / dense}
                if peer is not None:
                    theirs = peer_peak_bytes(bt, peer, size, d, args, ctx.backend)
                    row.update(peer_peak_bytes=theirs, vs_peer=sparse / theirs)
                memory.append(row)
    else:
        notes.append("peak device memory: " + NO_GPU)
    rows = [{k: r[k] for k in ("sizes", "model", "density", "step_ms", "forward_ms",
                               "backward_ms", "adam_ms", "step_vs_dense")}
            for r in report["results"]]
    vs_peer = {(c["sizes"], c["density"]): c["epoch_ratio"] for c in report["peer_comparison"]}
    for r in rows:
        r["step_vs_peer"] = vs_peer.get((r["sizes"], r["density"])) if r["model"] == "sparse" \
            else None
    summary = "; ".join(f"{r['sizes']} d{r['density']:g}: {r['step_vs_dense']:.2f}x dense"
                        + (f", {r['step_vs_peer']:.2f}x peer" if r["step_vs_peer"] else "")
                        for r in rows if r["model"] == "sparse")
    return result(ctx.measured(), summary,
                  {"settings": report["settings"], "steps": rows, "memory": memory,
                   "peer": report["machine"]["peer"]}, notes)


# ----------------------------------------------------------------- part: sddmm
SDDMM_SHAPES = [  # (in, out, batch): the layers of the step table and of HIGGS
    (784, 256, 512), (256, 256, 512), (784, 4096, 512), (4096, 4096, 512),
    (21, 256, 128), (256, 256, 128)]
SDDMM_VARIANTS = [("thread", None), ("warp", 4), ("warp", 8), ("warp", 16), ("warp", 32)]


def timer(ctx: Context, fn: Callable[[], Any], reps: int) -> float:
    """Seconds per call: CUDA events around ``reps`` calls on the GPU, a wall clock on the CPU."""
    for _ in range(2):
        fn()
    if ctx.gpu:
        cupy = ctx.backend.xp
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return cupy.cuda.get_elapsed_time(start, end) / 1e3 / reps
    begin = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - begin) / reps


def part_sddmm(ctx: Context) -> dict[str, Any]:
    xp = ctx.backend.xp
    shapes = [(64, 32, 64)] if ctx.quick else SDDMM_SHAPES
    densities = (0.1,) if ctx.quick else (0.1, 0.03)
    reps = 2 if ctx.quick else 20
    rows, products = [], []
    rng = numpy.random.default_rng(0)
    for fan_in, fan_out, batch in shapes:
        for density in densities:
            layer = cupynn.SparseLinear(fan_in, fan_out, density, seed=1, device=ctx.backend)
            dy = xp.asarray(rng.standard_normal((fan_out, batch), dtype=numpy.float32))
            x = xp.asarray(rng.standard_normal((fan_in, batch), dtype=numpy.float32))
            out = xp.empty(layer.nnz, dtype=numpy.float32)
            times, results = {}, {}
            for method, group in SDDMM_VARIANTS:
                label = method if group is None else f"{method}{group}"

                def call(method=method, group=group):
                    return kernels.sddmm(layer.indptr, layer.indices, dy, x, out, check=False,
                                         method=method, group=group)

                times[label] = timer(ctx, call, reps)
                results[label] = to_numpy(call()).copy()
            products.append(time_products(ctx, layer, x, dy, reps, f"{fan_in}->{fan_out} b{batch}",
                                          density))
            ref = results["thread"]
            spread = max(float(numpy.abs(r - ref).max()) for r in results.values())
            scale = float(numpy.abs(ref).max()) or 1.0
            fastest = min(times, key=times.get)
            default = f"warp{kernels.sddmm_group(batch)}"
            rows.append({"shape": f"{fan_in}->{fan_out} b{batch}", "density": density,
                         "nnz": layer.nnz, "us": {k: 1e6 * v for k, v in times.items()},
                         "fastest": fastest, "default": default,
                         "default_vs_fastest": times[default] / times[fastest],
                         "warp_best_vs_thread": min(v for k, v in times.items()
                                                    if k != "thread") / times["thread"],
                         "max_rel_diff": spread / scale})
    agree = sum(r["fastest"] == r["default"] for r in rows)
    worst = max(r["max_rel_diff"] for r in rows)
    best = min(r["warp_best_vs_thread"] for r in rows)
    recommended = recommend(rows)
    rows_vs_cusparse = statistics.geometric_mean(
        r["rows_us"] / r["cusparse_us"] for r in products)
    product_diff = max(r["max_rel_diff"] for r in products)
    summary = (f"default (warp, group by batch) fastest at {agree}/{len(rows)} shapes; best warp "
               f"{1 / best:.2f}x faster than thread at best; fastest overall {recommended} "
               f"({sddmm_env(recommended)}); variants agree to {worst:.1e}; products: spmm.cu "
               f"{rows_vs_cusparse:.2f}x cuSPARSE's time (geometric mean), agree to "
               f"{product_diff:.1e}")
    status = ctx.measured() if max(worst, product_diff) <= 1e-4 else FAILED
    return result(status, summary, {"rows": rows, "reps": reps, "recommended": recommended,
                                    "recommended_env": sddmm_env(recommended),
                                    "products": products,
                                    "products_rows_vs_cusparse": rows_vs_cusparse},
                  notes=[] if ctx.gpu else ["on the CPU every variant is the one Numba kernel"])


def time_products(ctx: Context, layer: Any, x: Any, dy: Any, reps: int, shape: str,
                  density: float) -> dict[str, Any]:
    """``W @ x`` and ``W.T @ dy`` of one layer by spmm.cu ("rows", the default) and by
    cuSPARSE: microseconds per call and how far the two results are apart."""
    times, results = {}, {}
    for method in kernels.SPMM_METHODS:
        def forward(method=method):
            return kernels.spmm(layer.indptr, layer.indices, layer.data, x, check=False,
                                bias=layer.bias, relu=True, method=method)

        def backward(method=method):
            return kernels.spmm_t(layer.indptr, layer.indices, layer.data, dy,
                                  layer.in_features, check=False, method=method,
                                  transpose=layer._pattern_t() if method == "rows" else None)

        times[method] = (timer(ctx, forward, reps), timer(ctx, backward, reps))
        results[method] = (to_numpy(forward()), to_numpy(backward()))
    diff = max(float(numpy.abs(a - b).max()) / (float(numpy.abs(b).max()) or 1.0)
               for a, b in zip(results["rows"], results["cusparse"]))
    return {"shape": shape, "density": density, "nnz": layer.nnz,
            "spmm_us": {m: 1e6 * t[0] for m, t in times.items()},
            "spmm_t_us": {m: 1e6 * t[1] for m, t in times.items()},
            "rows_us": 1e6 * sum(times["rows"]), "cusparse_us": 1e6 * sum(times["cusparse"]),
            "max_rel_diff": diff}


def recommend(rows: list[dict[str, Any]]) -> str:
    """The variant with the smallest geometric mean, over the shapes, of its time over the
    fastest variant's time there."""
    labels = list(rows[0]["us"])
    score = {label: statistics.geometric_mean(r["us"][label] / min(r["us"].values())
                                              for r in rows) for label in labels}
    return min(labels, key=score.get)


def sddmm_env(label: str) -> str:
    """The $CUPYNN_SDDMM setting of a variant label ("thread", "warp16")."""
    return f"{kernels.SDDMM_ENV}=" + ("thread" if label == "thread" else f"warp:{label[4:]}")


# ----------------------------------------------------------------- part: launches
SYNC_CALLS = re.compile(r"Synchronize|^cudaMemcpy$|^cudaMemcpy2D$|^cuMemcpy(DtoH|HtoD|DtoD)?"
                        r"(_v2)?$|^cuMemcpy$")


def trace_counts(trace: dict[str, Any]) -> dict[str, Any]:
    """Counts from a PyTorch profiler (Kineto) Chrome trace: device kernels, copies,
    memsets, CUDA runtime/driver calls and the calls among them that make the host
    wait for the device (synchronize calls and blocking copies)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    kernels_ = [e["name"] for e in events if e.get("cat") == "kernel"]
    api = [e["name"] for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    waits = [name for name in api if SYNC_CALLS.search(name)]
    top: dict[str, int] = {}
    for name in kernels_:
        top[name] = top.get(name, 0) + 1
    return {"kernels": len(kernels_),
            "memcpy": sum(e.get("cat") == "gpu_memcpy" for e in events),
            "memset": sum(e.get("cat") == "gpu_memset" for e in events),
            "api_calls": len(api), "waits": len(waits), "wait_calls": sorted(set(waits)),
            "by_kernel": dict(sorted(top.items(), key=lambda kv: -kv[1])[:15])}


def profile_counts(torch: Any, fn: Callable[[], Any], repeat: int, sync: Callable[[], None]
                   ) -> dict[str, Any]:
    """Run ``fn`` ``repeat`` times under the PyTorch profiler (CUPTI sees every
    kernel of the process, CuPy's included); counts per call."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeat):
            fn()
        sync()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            counts = trace_counts(json.load(f))
    per_call = {k: v / repeat for k, v in counts.items() if isinstance(v, int)}
    per_call["wait_calls"] = counts["wait_calls"]
    per_call["by_kernel"] = {k: v / repeat for k, v in counts["by_kernel"].items()}
    return per_call


def host_waits(ctx: Context, phases: list[tuple[str, Callable[[], Any]]],
               busy_s: float = 0.3) -> list[dict[str, Any]]:
    """Which phases make the host wait for the device.

    Before each phase, about ``busy_s`` seconds of matrix products are queued on
    the device; the phase runs on the host; if the products are still running
    when it returns (``Event.done`` is False) the phase did not wait. A phase
    that waited took at least as long as the queue that was left."""
    cupy = ctx.backend.xp
    a = cupy.ones((2048, 2048), dtype=numpy.float32)
    b = cupy.empty_like(a)
    cupy.matmul(a, a, out=b)
    ctx.backend.synchronize()
    begin = time.perf_counter()
    for _ in range(5):
        cupy.matmul(a, a, out=b)
    ctx.backend.synchronize()
    per = (time.perf_counter() - begin) / 5
    reps = max(1, min(5000, int(busy_s / max(per, 1e-6))))
    out = []
    for name, fn in phases:
        ctx.backend.synchronize()
        for _ in range(reps):
            cupy.matmul(a, a, out=b)
        queued = cupy.cuda.get_current_stream().record()
        begin = time.perf_counter()
        fn()
        host = time.perf_counter() - begin
        done = bool(queued.done)
        ctx.backend.synchronize()
        out.append({"phase": name, "host_ms": 1e3 * host, "queued_ms": 1e3 * reps * per,
                    "waited": done})
    return out


def launch_models(ctx: Context) -> list[dict[str, Any]]:
    hidden = 32 if ctx.quick else 256
    return [
        dict(name="kmnist", sizes=(784, hidden, hidden, 10), dense=(), batch=512,
             loss="cross_entropy", redistribution=None),
        dict(name="kmnist+woodfisher", sizes=(784, hidden, hidden, 10), dense=(), batch=512,
             loss="cross_entropy", redistribution="woodfisher"),
        dict(name="higgs", sizes=(21, hidden, hidden, hidden, 1), dense=(-1,), batch=128,
             loss="binary_cross_entropy", redistribution=None)]


def step_trainer(ctx: Context, spec: dict[str, Any]) -> tuple[Any, numpy.ndarray, numpy.ndarray]:
    """A Trainer on random data of the spec's shape, its redistributor's epoch started."""
    rng = numpy.random.default_rng(0)
    n = 4 * spec["batch"]
    x = rng.random((n, spec["sizes"][0]), dtype=numpy.float32)
    classes = spec["sizes"][-1]
    y = (rng.integers(0, 2, n).astype(numpy.float32) if spec["loss"] == "binary_cross_entropy"
         else rng.integers(0, classes, n))
    model = cupynn.MLP(spec["sizes"], density=0.1, dense_layers=spec["dense"], seed=0,
                       device=ctx.backend)
    trainer = cupynn.Trainer(model, cupynn.Adam(model), (x, y), epochs=1,
                             batch_size=spec["batch"], loss=spec["loss"], progress=False,
                             redistribution=spec["redistribution"])
    if trainer.redistributor is not None:
        trainer.redistributor.start_epoch(model, 4, True)
    return trainer, x[:spec["batch"]], y[:spec["batch"]]


def step_phases(trainer: Any, x: numpy.ndarray, y: numpy.ndarray
                ) -> list[tuple[str, Callable[[], Any]]]:
    """The pieces of Trainer.train_batch, in order, for finding the one that waits."""
    from cupynn.losses import LOSSES

    model, backend, state = trainer.model, trainer.model.backend, {}

    def to_device():
        state["x"] = backend.asarray(x, dtype=model.dtype)
        state["y"] = backend.asarray(y)

    def forward():  # the batch was checked on the host, as train_batch checks it
        state["logits"] = model.forward(state["x"], check=False)

    def loss():
        state["value"], state["grad"] = LOSSES[trainer.loss](state["logits"], state["y"],
                                                             check=False)

    phases = [("batch to device", to_device), ("forward", forward), ("loss", loss),
              ("backward", lambda: model.backward(state["grad"], need_input_grad=False))]
    if trainer.redistributor is not None:
        phases.append(("observe", lambda: trainer.redistributor.observe(model)))
    phases.append(("adam", trainer.optimizer.step))
    return phases + kernel_phases(trainer, len(x))


def kernel_phases(trainer: Any, batch: int) -> list[tuple[str, Callable[[], Any]]]:
    """The sparse kernels of a step one by one, on the last sparse layer, so that a
    phase that waits can be traced to the call that waits."""
    model = trainer.model
    xp = model.backend.xp
    layer = model.sparse_layers[-1]
    x = xp.ones((layer.in_features, batch), dtype=model.dtype)
    dy = xp.ones((layer.out_features, batch), dtype=model.dtype)
    return [
        ("kernel spmm", lambda: kernels.spmm(layer.indptr, layer.indices, layer.data, x,
                                             check=False, bias=layer.bias, relu=True)),
        ("kernel relu_grad_rowsum", lambda: kernels.relu_grad_rowsum(dy, dy)),
        ("kernel sddmm", lambda: kernels.sddmm(layer.indptr, layer.indices, dy, x, check=False)),
        ("kernel spmm_t", lambda: kernels.spmm_t(layer.indptr, layer.indices, layer.data, dy,
                                                 layer.in_features, check=False,
                                                 transpose=layer._pattern_t())),
    ]


def part_launches(ctx: Context) -> dict[str, Any]:
    if not ctx.gpu:
        # Build the steps anyway, so that the code that sets them up cannot rot.
        for spec in launch_models(ctx):
            trainer, x, y = step_trainer(ctx, spec)
            for _, phase in step_phases(trainer, x, y):
                phase()
            trainer.train_batch(x, y)
        return result(NO_GPU, "launch counts and host waits need CUDA")
    torch, why = torch_cuda()
    rows, notes = [], []
    sync = ctx.backend.synchronize
    calibration = None
    if torch is None:
        notes.append(f"launch counts not measured: {why}")
    else:
        torch.cuda.init()
        p, g, m, v = (ctx.backend.xp.zeros(64, dtype=numpy.float32) for _ in range(4))

        def seven_adams():
            for _ in range(7):
                kernels.adam(p, g, m, v, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, bc1=0.1, bc2=0.1)

        profile_counts(torch, seven_adams, 1, sync)  # the profiler's own first-use costs
        calibration = profile_counts(torch, seven_adams, 1, sync)
        seen = calibration["by_kernel"].get("adam_f32", 0)
        if seen != 7:
            notes.append(f"calibration: the profiler saw {seen} of 7 adam_f32 launches; the "
                         f"launch counts below are not trusted")
    waits_total = 0
    for spec in launch_models(ctx):
        trainer, x, y = step_trainer(ctx, spec)
        for _ in range(3):
            trainer.train_batch(x, y)
        whole = host_waits(ctx, [("whole step", lambda: trainer.train_batch(x, y))])[0]
        phases = host_waits(ctx, step_phases(trainer, x, y))
        row = {"model": spec["name"], "sizes": "-".join(map(str, spec["sizes"])),
               "batch": spec["batch"], "step_waited": whole["waited"],
               "step_host_ms": whole["host_ms"], "queued_ms": whole["queued_ms"],
               "phases_that_waited": [p["phase"] for p in phases if p["waited"]],
               "phases": phases}
        if torch is not None:
            row["per_step"] = profile_counts(torch, lambda: trainer.train_batch(x, y), 10, sync)
        waits_total += whole["waited"]
        rows.append(row)
        del trainer
        gc.collect()
    launches = [f"{r['model']} {r['per_step']['kernels']:.0f}" for r in rows if "per_step" in r]
    summary = (f"kernels per step: {', '.join(launches) or 'not measured'}; "
               f"steps that made the host wait: {waits_total}/{len(rows)}")
    return result(PASSED if waits_total == 0 else FAILED, summary,
                  {"models": rows, "calibration": calibration}, notes)


# ----------------------------------------------------------------- part: higgs
def part_higgs(ctx: Context) -> dict[str, Any]:
    import bench_training as bt

    samples = "4096" if ctx.quick else "500000"
    args = bt.parse_args(["--higgs-epoch", "--device", ctx.device, "--samples", samples,
                          "--repeats", "1", "--pause", "0", "--no-progress"])
    report = bt.higgs_epochs(args)
    row = report["higgs"][0]
    # The same epoch with the thread SDDMM, for the kernel choice (warmed up like the others).
    method, group = kernels.sddmm_setting()
    kernels.set_sddmm("thread")
    try:
        data = bt.epoch_data(args.samples, args.sizes[0][0], args)
        epoch = partial(bt.cupynn_epoch, args.sizes[0], args.densities[0], args=args,
                        backend=ctx.backend)
        epoch(tuple(a[:4 * args.batch] for a in data))
        thread = epoch(data)
    finally:
        kernels.set_sddmm(method, group)
    ours = row["cupynn"]
    peer = row.get("peer")
    targets = []
    if ctx.gpu and not ctx.quick:
        targets = [target("HIGGS epoch (s)", ours["epoch_s"], HIGGS_TARGET_S, "s"),
                   target("HIGGS epoch / peer epoch", row.get("cupynn_vs_peer"),
                          HIGGS_PEER_TARGET)]
    summary = (f"epoch {ours['epoch_s']:.2f} s (train {ours['train_s']:.2f} + redistribution "
               f"{ours['redistribution_s']:.3f}), {ours['steps']} steps"
               + (f"; peer {peer['epoch_s']:.2f} s" if peer else "")
               + f"; thread SDDMM {thread['epoch_s']:.2f} s; paper 22.2 s")
    notes = [] if peer else [f"peer: {report['machine']['peer_note']}"]
    return result(ctx.measured(), summary,
                  {"higgs": row, "thread_sddmm": thread, "settings": report["settings"]},
                  notes, targets)


# ----------------------------------------------------------------- part: redistribution
def part_redistribution(ctx: Context) -> dict[str, Any]:
    import bench_redistribution as br

    argv = ["--device", ctx.device, "--no-memory", "--pause", "0"]
    argv += (["--quick", "--settings", "higgs"] if ctx.quick else
             ["--settings", "kmnist,higgs", "--repeats", "3", "--steps", "6", "--per-round", "3",
              "--train-steps", "2", "--warmup", "1"])
    report = br.run(br.parse_args(argv))
    rows = [{k: r[k] for k in ("setting", "sizes", "algorithm", "redistribute_ms",
                               "start_epoch_ms", "observe_ms", "static_step_ms",
                               "overhead_share")} for r in report["results"]]
    slowest = max(rows, key=lambda r: r["redistribute_ms"])
    summary = (f"{len(rows)} rows; slowest {slowest['algorithm']} at {slowest['setting']}: "
               f"{slowest['redistribute_ms']:.1f} ms")
    return result(ctx.measured(), summary, {"rows": rows, "settings": report["settings"]})


# ----------------------------------------------------------------- part: mpi
MPI_CONFIGS = ("gradient-global", "woodfisher", "dense")


def part_mpi(ctx: Context) -> dict[str, Any]:
    """tests/mpi_worker.py under mpiexec -n 2 on the device (device arrays through MPI),
    against one process on the same device."""
    from cupynn.distributed import find_mpiexec, launcher_env

    sys.path.insert(0, str(ROOT / "tests"))
    import mpi_worker

    launcher = find_mpiexec()
    if launcher is None:
        return result("skipped: no mpiexec or mpi4py", "MPI is not installed here")
    env = launcher_env(dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([launcher, "-n", "2", sys.executable,
                               str(ROOT / "tests" / "mpi_worker.py"), "train", tmp, ctx.device,
                               *MPI_CONFIGS], capture_output=True, text=True, env=env,
                              timeout=max(5.0, ctx.remaining() - 10))
        if done.returncode:
            return result(FAILED, f"mpiexec -n 2 ended with status {done.returncode}",
                          notes=[done.stderr[-3000:]])
        rows = [{"config": name, **mpi_worker.compare(Path(tmp), name, ctx.device)}
                for name in MPI_CONFIGS]
    for row in rows:
        row["ok"] = bool(row["histories_equal"] and row["topology_equal"] and row["same_moves"]
                         and row["weight_rel_diff"] <= 1e-9 and row["history_rel_diff"] <= 1e-9)
    ok = all(r["ok"] for r in rows)
    summary = (f"{sum(r['ok'] for r in rows)}/{len(rows)} configurations equal to one process "
               f"(worst weight diff {max(r['weight_rel_diff'] for r in rows):.1e})")
    return result((ctx.measured() if ok else FAILED), summary, {"rows": rows})


# ----------------------------------------------------------------- part: env
def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def environment(ctx: Context) -> dict[str, Any]:
    info: dict[str, Any] = {
        "commit": ctx.args.commit or git_commit() or "unknown",
        "cupynn": cupynn.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "numpy": numpy.__version__,
        "device": ctx.backend.device_name(), "backend": ctx.backend.name,
        "sddmm_default": list(kernels.sddmm_setting()),
    }
    import scipy

    info["scipy"] = scipy.__version__
    try:
        import numba

        info["numba"] = numba.__version__
    except ImportError:
        info["numba"] = None
    torch, why = torch_cuda()
    if torch is not None:
        info["torch"] = f"{torch.__version__} (CUDA {torch.version.cuda})"
    else:
        info["torch"] = why
    if ctx.gpu:
        cupy = ctx.backend.xp
        runtime = cupy.cuda.runtime
        props = runtime.getDeviceProperties(cupy.cuda.Device().id)
        info.update(cupy=cupy.__version__, driver=runtime.driverGetVersion(),
                    cuda_runtime=runtime.runtimeGetVersion(),
                    compute_capability=f"{props['major']}.{props['minor']}",
                    multiprocessors=props["multiProcessorCount"],
                    memory_gib=round(props["totalGlobalMem"] / 2**30, 1))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                                  "clocks.sm,clocks.max.sm,power.limit", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"not run: {exc}"
    return info


def part_env(ctx: Context) -> dict[str, Any]:
    info = environment(ctx)
    summary = f"{info['device']}, commit {info['commit'][:12]}"
    if ctx.gpu:
        summary += f", driver {info['driver']}, CUDA runtime {info['cuda_runtime']}, " \
                   f"CuPy {info['cupy']}"
    return result(ctx.measured(), summary, info)


PART_FUNCTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "tests": part_tests, "parity": part_parity, "steps": part_steps, "sddmm": part_sddmm,
    "launches": part_launches, "higgs": part_higgs, "redistribution": part_redistribution,
    "mpi": part_mpi, "env": part_env}


# ----------------------------------------------------------------- driver
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Verify and measure cupynn on a GPU in one command (a dry run on the CPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True,
                   help=f"folder for the reports ({REPORT_JSON}, {REPORT_MD}, {TESTS_LOG}); "
                        f"created if missing")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"),
                   help="the backend to check; auto: the GPU when one answers")
    p.add_argument("--quick", action="store_true",
                   help="small sizes and few repeats: a dry run of seconds (with --device cpu)")
    p.add_argument("--data-dir", default=None,
                   help="a folder laid out like ../shared/data (kmnist/, higgs/) for the real-data "
                        "tests and the parity split; default: the loaders' own search "
                        "($CUPYNN_DATA, datasets/, ../shared/data)")
    p.add_argument("--parts", default=",".join(PART_NAMES),
                   help=f"comma-separated subset of {','.join(PART_NAMES)}, run in that order")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for the whole check (default {BUDGET_S} on a GPU); a part "
                        f"gets its own limit or what is left, whichever is less")
    p.add_argument("--commit", default=None,
                   help="the commit checked, for the report (default: git rev-parse HEAD)")
    p.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
    # Internal: run one part in this process and write its result as JSON.
    p.add_argument("--part", choices=PART_NAMES, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--part-seconds", type=float, default=600.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    parts = [name.strip() for name in args.parts.split(",") if name.strip()]
    unknown = [name for name in parts if name not in PART_NAMES]
    if unknown or not parts:
        p.error(f"--parts must name some of {', '.join(PART_NAMES)}; got {args.parts!r}")
    args.parts = [name for name in PART_NAMES if name in parts]
    if args.budget is not None and args.budget <= 0:
        p.error("--budget must be positive")
    return args


def run_part_here(args: argparse.Namespace) -> int:
    """The child side: one part, its result written as JSON to --result."""
    begin = time.perf_counter()
    try:
        ctx = Context(args)
        out = PART_FUNCTIONS[args.part](ctx)
    except Exception as exc:  # the report says what went wrong; the other parts go on
        out = result(FAILED, f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                     notes=[traceback.format_exc()[-4000:]])
    out["seconds"] = round(time.perf_counter() - begin, 2)
    Path(args.result).write_text(json.dumps(out, indent=1, default=_jsonable))
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, (numpy.integer,)):
        return int(value)
    if isinstance(value, (numpy.floating,)):
        return float(value)
    if isinstance(value, numpy.ndarray):
        return value.tolist()
    return str(value)


def _child_argv(args: argparse.Namespace, part: str, result_path: Path, seconds: float
                ) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--out", str(args.out), "--device",
            args.device, "--part", part, "--result", str(result_path), "--part-seconds",
            f"{seconds:.1f}"]
    if args.quick:
        argv.append("--quick")
    if args.data_dir:
        argv += ["--data-dir", str(args.data_dir)]
    if args.commit:
        argv += ["--commit", args.commit]
    return argv


def run_part(args: argparse.Namespace, part: Part, seconds: float) -> dict[str, Any]:
    """One part in a process of its own (its own process group), killed at ``seconds``."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        begin = time.perf_counter()
        process = subprocess.Popen(_child_argv(args, part.name, result_path, seconds),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   cwd=ROOT, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=seconds)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            timed_out = True
        elapsed = round(time.perf_counter() - begin, 2)
        if result_path.exists() and not timed_out:
            out = json.loads(result_path.read_text())
        else:
            why = (f"timed out after {seconds:.0f} s" if timed_out
                   else f"the part's process ended with status {process.returncode} and no result")
            out = result(FAILED, why, notes=[(output or "")[-4000:]])
    out["wall_seconds"] = elapsed
    out["limit_seconds"] = round(seconds, 1)
    out["name"], out["title"] = part.name, part.title
    return out


def _finish(process: subprocess.Popen, deadline: float) -> None:
    """Wait for a background process until ``deadline``, then end it."""
    try:
        process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def verdict(parts: list[dict[str, Any]], gpu: bool) -> str:
    statuses = [p["status"] for p in parts]
    if any(s == FAILED for s in statuses):
        return FAILED
    if not gpu:
        return DRY_RUN
    return PASSED if all(s == PASSED for s in statuses) else "incomplete"


def write_reports(out: Path, report: dict[str, Any]) -> None:
    (out / REPORT_JSON).write_text(json.dumps(report, indent=1, default=_jsonable) + "\n")
    (out / REPORT_MD).write_text(format_markdown(report))


WARM_NUMBA = ("import numpy, cupynn; from cupynn import kernels; "
              "[kernels.warm_up(cupynn.get_backend('cpu'), d) for d in (numpy.float32, "
              "numpy.float64)]")


def start_numba_warm_up() -> subprocess.Popen:
    """Compile the CPU (Numba) kernels into their disk cache in the background.

    A fresh GPU machine has no cache, and compiling them takes 10-20 s in the
    first process that needs them (the parity part's CPU runs): done here, beside
    the GPU tests, which do not use them, it costs the budget nothing."""
    return subprocess.Popen([sys.executable, "-c", WARM_NUMBA], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def run_all(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backend = cupynn.get_backend(args.device)
    gpu = backend.is_gpu
    budget = args.budget or (BUDGET_S if gpu else sum(p.quick_seconds for p in PARTS))
    deadline = time.monotonic() + budget
    report: dict[str, Any] = {
        "device": backend.device_name(), "backend": backend.name, "quick": args.quick,
        "commit": args.commit or git_commit() or "unknown", "budget_seconds": budget,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "parts": [], "verdict": "running"}
    begin = time.perf_counter()
    warm = start_numba_warm_up() if gpu else None
    for part in PARTS:
        if part.name not in args.parts:
            continue
        if warm is not None and part.name != "tests":  # the others may run CPU kernels
            _finish(warm, min(deadline, time.monotonic() + 60))
            warm = None
        left = deadline - time.monotonic()
        limit = min(part.seconds if gpu else part.quick_seconds, left)
        if limit < 5:
            entry = result("skipped: out of time", f"{left:.0f} s of the budget left")
            entry.update(name=part.name, title=part.title, wall_seconds=0.0, limit_seconds=0.0)
        else:
            print(f"[gpu_check] {part.name}: running (limit {limit:.0f} s)", flush=True)
            entry = run_part(args, part, limit)
        report["parts"].append(entry)
        print(f"[gpu_check] {part.name}: {entry['status']} in {entry['wall_seconds']} s: "
              f"{entry['summary']}", flush=True)
        report["wall_seconds"] = round(time.perf_counter() - begin, 1)
        write_reports(out, report)  # after every part: a killed run still leaves a report
    if warm is not None:
        _finish(warm, time.monotonic())
    report["verdict"] = verdict(report["parts"], gpu)
    report["wall_seconds"] = round(time.perf_counter() - begin, 1)
    write_reports(out, report)
    print()
    print(format_table(report))
    return 0 if report["verdict"] in (PASSED, DRY_RUN) else 1


# ----------------------------------------------------------------- reports
def format_table(report: dict[str, Any]) -> str:
    """The short verdict table printed last."""
    lines = [f"cupynn GPU check: {report['verdict'].upper()} on {report['device']} "
             f"(commit {report['commit'][:12]}, {report.get('wall_seconds', 0)} s)"]
    width = max([len(p["name"]) for p in report["parts"]] + [4])
    for p in report["parts"]:
        lines.append(f"  {p['name']:<{width}}  {p['status']:<18} {p['wall_seconds']:>6.1f} s  "
                     f"{p['summary'][:110]}")
        for t in p.get("targets", []):
            value = "-" if t["value"] is None else f"{t['value']:.3g}"
            lines.append(f"  {'':<{width}}  target {t['name']} <= {t['limit']:g}: {value} "
                         f"{t['verdict']}")
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def format_markdown(report: dict[str, Any]) -> str:
    lines = [f"# cupynn GPU check: {report['verdict']}", "",
             f"- device: {report['device']} (backend {report['backend']}"
             f"{', quick' if report['quick'] else ''})",
             f"- commit: {report['commit']}", f"- started: {report['started']}, "
             f"{report.get('wall_seconds', 0)} s of a {report['budget_seconds']:.0f} s budget",
             "", "## Verdict", ""]
    lines += _md_table(["part", "status", "seconds", "summary"],
                       [[p["name"], p["status"], p["wall_seconds"], p["summary"]]
                        for p in report["parts"]])
    targets = [(p["name"], t) for p in report["parts"] for t in p.get("targets", [])]
    if targets:
        lines += ["", "## Targets", ""]
        lines += _md_table(["part", "target", "value", "limit", "verdict"],
                           [[n, t["name"], t["value"], t["limit"], t["verdict"]]
                            for n, t in targets])
    for p in report["parts"]:
        lines += ["", f"## {p['name']}: {p['title']}", "", f"{p['status']}: {p['summary']}"]
        lines += _details(p)
        for note in p.get("notes", []):
            lines += ["", "```", note.rstrip(), "```"] if "\n" in note else ["", f"- {note}"]
    return "\n".join(lines) + "\n"


def _details(p: dict[str, Any]) -> list[str]:
    """Markdown tables of one part's data."""
    d = p.get("data") or {}
    out: list[str] = []
    if p["name"] == "parity" and d.get("results"):
        out += ["", f"{d['data']}, {d['rows']} training rows, {d['sizes']}, density "
                    f"{d['density']}, {d['dtype']}, rtol {d['rtol']:g}", ""]
        out += _md_table(["algorithm", "topology equal per redistribution", "moved",
                          "loss rel diff", "weight rel diff", "ok"],
                         [[r["algorithm"], r["topology_equal"], r["moved"], r["loss_rel_diff"],
                           r["weight_rel_diff"], r["ok"]] for r in d["results"]])
    elif p["name"] == "steps" and d.get("steps"):
        out += [""] + _md_table(
            ["sizes", "model", "density", "step ms", "fwd ms", "bwd ms", "adam ms", "/ dense",
             "/ peer"],
            [[r["sizes"], r["model"], r["density"], r["step_ms"], r["forward_ms"],
              r["backward_ms"], r["adam_ms"], r["step_vs_dense"], r["step_vs_peer"]]
             for r in d["steps"]])
        if d.get("memory"):
            out += ["", "Peak device memory (CuPy pool high-water mark; torch "
                        "max_memory_allocated for the peer), building the model and one step:",
                    ""]
            out += _md_table(["sizes", "model", "density", "MiB", "/ dense", "peer MiB",
                              "/ peer"],
                             [[r["sizes"], r["model"], r["density"], r["peak_bytes"] / 2**20,
                               r.get("vs_dense"), (r.get("peer_peak_bytes") or 0) / 2**20 or None,
                               r.get("vs_peer")] for r in d["memory"]])
    elif p["name"] == "sddmm" and d.get("rows"):
        labels = [m if g is None else f"{m}{g}" for m, g in SDDMM_VARIANTS]
        out += ["", f"microseconds per call: the mean of {d['reps']} calls between two CUDA "
                    f"events (a wall clock on the CPU)", ""]
        out += _md_table(["shape", "density", "nnz", *labels, "fastest", "default"],
                         [[r["shape"], r["density"], r["nnz"], *[r["us"][k] for k in labels],
                           r["fastest"], r["default"]] for r in d["rows"]])
        if d.get("products"):
            out += ["", "The layer's products, microseconds per call: `spmm` (with bias and "
                        "ReLU) and `spmm_t`, by spmm.cu (`rows`, the default) and by cuSPARSE "
                        "(`$CUPYNN_SPMM=cusparse`):", ""]
            out += _md_table(["shape", "density", "nnz", "spmm rows", "spmm cuSPARSE",
                              "spmm_t rows", "spmm_t cuSPARSE", "rows / cuSPARSE",
                              "max rel diff"],
                             [[r["shape"], r["density"], r["nnz"], r["spmm_us"]["rows"],
                               r["spmm_us"]["cusparse"], r["spmm_t_us"]["rows"],
                               r["spmm_t_us"]["cusparse"], r["rows_us"] / r["cusparse_us"],
                               r["max_rel_diff"]] for r in d["products"]])
    elif p["name"] == "launches" and d.get("models"):
        out += [""] + _md_table(
            ["model", "batch", "kernels/step", "copies/step", "memsets/step", "waits/step (CUPTI)",
             "step made host wait", "phases that waited"],
            [[r["model"], r["batch"], (r.get("per_step") or {}).get("kernels"),
              (r.get("per_step") or {}).get("memcpy"), (r.get("per_step") or {}).get("memset"),
              (r.get("per_step") or {}).get("waits"), r["step_waited"],
              ", ".join(r["phases_that_waited"]) or "none"] for r in d["models"]])
    elif p["name"] == "higgs" and d.get("higgs"):
        h = d["higgs"]
        rows = [["cupynn", h["cupynn"]["train_s"], h["cupynn"]["redistribution_s"],
                 h["cupynn"]["epoch_s"]],
                ["cupynn, thread SDDMM", d["thread_sddmm"]["train_s"],
                 d["thread_sddmm"]["redistribution_s"], d["thread_sddmm"]["epoch_s"]]]
        if "peer" in h:
            rows.append(["torch masked-dense", h["peer"]["train_s"], h["peer"]["redistribution_s"],
                         h["peer"]["epoch_s"]])
        out += ["", f"{h['sizes']}, density {h['density']}, {h['samples']:,} rows, "
                    f"gradient-global", ""]
        out += _md_table(["library", "train s", "redistribution s", "epoch s"], rows)
    elif p["name"] == "redistribution" and d.get("rows"):
        out += [""] + _md_table(
            ["setting", "algorithm", "redistribute ms", "start_epoch ms", "observe ms",
             "static step ms", "overhead / epoch"],
            [[r["setting"], r["algorithm"], r["redistribute_ms"], r["start_epoch_ms"],
              r["observe_ms"], r["static_step_ms"], r["overhead_share"]] for r in d["rows"]])
    elif p["name"] == "mpi" and d.get("rows"):
        out += [""] + _md_table(
            ["config", "topology equal", "weight rel diff", "history rel diff", "ranks agree",
             "ok"],
            [[r["config"], r["topology_equal"], r["weight_rel_diff"], r["history_rel_diff"],
              r["histories_equal"], r["ok"]] for r in d["rows"]])
    elif p["name"] == "env" and d:
        out += [""] + [f"- {k}: {v}" for k, v in d.items()]
    elif p["name"] == "tests" and d.get("failures"):
        out += ["", "```"] + d["failures"] + ["```"]
    return out


def main(argv: list[str] | None = None) -> int:
    """The exit status: 0 when the verdict is passed or a dry run, 1 when not, 2 for a
    mistake in the input (said in one paragraph)."""
    return run_main(_main, argv, "gpu_check.py")


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.part:
        return run_part_here(args)
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise UserError(f"--data-dir {args.data_dir} is not a folder. Give a copy of "
                        f"../shared/data (kmnist/, higgs/), or leave it out.")
    try:
        cupynn.get_backend(args.device)
    except RuntimeError as exc:
        raise UserError(f"--device {args.device}: {exc}") from None
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())

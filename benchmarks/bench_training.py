"""Training-step time and peak memory of sparse vs dense MLPs, side by side.

One training step is what :func:`cupynn.fit` does per mini-batch: forward,
softmax cross-entropy, backward and ``Adam.step()``, all through the public
API. For every list of layer sizes the script builds

* one **dense** model: ``density=1.0`` with every layer in ``dense_layers``,
  so every layer is a :class:`cupynn.Linear` (plain GEMMs), and
* one **sparse** model per density: every layer a :class:`cupynn.SparseLinear`,

and times them in the same run, so that a busy machine slows all of them
alike. The timing runs in rounds; in each round every model, in an order that
rotates from round to round, sleeps ``--pause`` seconds (so that the previous
model's BLAS threads stop spinning), runs one untimed step (which brings its
arrays back into cache), then ``--per-round`` timed steps. Warm-up steps
before the first round absorb the Numba JIT and CUDA compilation. Each
reported time is the median over ``--steps`` timed steps; a phase (forward +
loss, backward, Adam) ends with a device synchronisation.

Peak memory is measured in a separate pass, because tracing allocations slows
them down: :class:`cupynn.memory.MemoryTracker` gives the peak bytes in use
while building the model and its optimizer and running one full training
step. On the CPU that is the ``tracemalloc`` peak (NumPy reports its array
buffers to ``tracemalloc``, and the Numba kernels write into NumPy-allocated
arrays; BLAS workspaces are not counted); on the GPU, the peak of bytes in use
from CuPy's memory pool, followed by a CuPy memory hook. The input batch is
created before the window and is not counted.

Run ``python benchmarks/bench_training.py --help`` for the options, and see
``benchmarks/README.md`` and ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import numpy

# Benchmark the checkout this script lives in, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cupynn  # noqa: E402
from cupynn.losses import cross_entropy  # noqa: E402
from cupynn.memory import MemoryTracker  # noqa: E402

PHASES = ("forward", "backward", "adam")  # "forward" includes the loss
DEFAULT_SIZES = "784-256-256-10,784-4096-4096-10"
DEFAULT_DENSITIES = "0.1,0.06,0.03"
# Settings of the thread pools (Numba's OpenMP, OpenBLAS) that change the timings.
THREAD_ENV = ("NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER", "OMP_NUM_THREADS", "OMP_WAIT_POLICY",
              "OPENBLAS_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT", "MKL_NUM_THREADS")


# ----------------------------------------------------------------- arguments
def parse_sizes(text: str) -> list[tuple[int, ...]]:
    """'784-256-256-10,784-4096-4096-10' -> [(784, 256, 256, 10), (784, 4096, 4096, 10)]."""
    try:
        out = [tuple(int(n) for n in spec.split("-")) for spec in text.split(",") if spec.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes must look like 784-256-256-10[,...]; got {text!r}")
    if not out or any(len(s) < 2 or min(s) < 1 for s in out):
        raise argparse.ArgumentTypeError(f"each size list needs >= 2 positive ints; got {text!r}")
    return out


def parse_densities(text: str) -> list[float]:
    try:
        out = [float(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"densities must be floats like 0.1,0.03; got {text!r}")
    if not out or any(not 0 < d <= 1 for d in out):
        raise argparse.ArgumentTypeError(f"densities must be in (0, 1]; got {text!r}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"),
                   help="cupynn backend to benchmark")
    p.add_argument("--sizes", type=parse_sizes, default=DEFAULT_SIZES,
                   help="comma-separated layer-size lists, input first")
    p.add_argument("--densities", type=parse_densities, default=DEFAULT_DENSITIES,
                   help="comma-separated densities of the sparse models")
    p.add_argument("--batch", type=int, default=512, help="mini-batch size")
    p.add_argument("--steps", type=int, default=20, help="timed steps per model (median reported)")
    p.add_argument("--per-round", type=int, default=2,
                   help="timed steps per model per round (each round adds one untimed step)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model before timing")
    p.add_argument("--pause", type=float, default=0.2,
                   help="seconds to sleep before each model's turn in a round, so that the "
                        "previous model's BLAS threads stop spinning (OpenBLAS busy-waits "
                        "about 0.1 s after each call) and do not steal its cores")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the models and the batch")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: sizes 784-256-256-10, densities 0.1,0.03, batch 64, "
                        "2 timed steps after 1 warm-up step (overrides those options)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = [(784, 256, 256, 10)]
        args.densities = [0.1, 0.03]
        args.batch, args.steps, args.per_round, args.warmup = 64, 2, 1, 1
    for name in ("batch", "steps", "per_round"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.pause < 0:
        p.error("--warmup and --pause must be >= 0")
    return args


# ----------------------------------------------------------------- the machine
def cpu_model() -> str:
    """The CPU's name where the OS tells it (Linux), else platform's guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (a sign of other work on a shared machine)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(backend: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "cupynn": cupynn.__version__,
        "backend": backend.name,
        "device_name": backend.device_name(),
    }
    try:
        blas = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["blas"] = f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # older NumPy: no mode="dicts"
        info["blas"] = "unknown"
    try:
        import threadpoolctl

        info["blas_threads"] = {d["internal_api"]: d["num_threads"]
                                for d in threadpoolctl.threadpool_info()}
    except ImportError:
        pass
    try:
        import numba

        info["numba"] = numba.__version__
        info["numba_threads"] = int(numba.get_num_threads())
    except ImportError:
        info["numba"] = info["numba_threads"] = None
    if backend.is_gpu:
        info["cupy"] = backend.xp.__version__
    info["thread_env"] = {k: os.environ[k] for k in THREAD_ENV if k in os.environ}
    return info


# ----------------------------------------------------------------- models
def build(sizes: tuple[int, ...], density: float | None, args: argparse.Namespace,
          backend: Any) -> tuple[Any, Any]:
    """A model and its Adam. ``density=None`` means the dense baseline."""
    n_layers = len(sizes) - 1
    if density is None:
        model = cupynn.MLP(sizes, density=1.0, dense_layers=tuple(range(n_layers)),
                           seed=args.seed, dtype=args.dtype, device=backend)
        expected = cupynn.Linear
    else:
        model = cupynn.MLP(sizes, density=density, dense_layers=(), seed=args.seed,
                           dtype=args.dtype, device=backend)
        expected = cupynn.SparseLinear
    kinds = {type(layer).__name__ for layer in model.layers}
    if kinds != {expected.__name__}:
        raise AssertionError(f"expected only {expected.__name__} layers, got {sorted(kinds)}")
    return model, cupynn.Adam(model, lr=args.lr)


def make_batch(sizes: tuple[int, ...], args: argparse.Namespace, backend: Any) -> tuple[Any, Any]:
    """One fixed batch on the device: inputs in [0, 1) like MNIST pixels, random labels."""
    rng = numpy.random.default_rng(args.seed + 1)
    x = rng.random((args.batch, sizes[0])).astype(args.dtype)
    y = rng.integers(0, sizes[-1], size=args.batch)
    return backend.asarray(x), backend.asarray(y)


def train_step(model: Any, optimizer: Any, x: Any, y: Any) -> dict[str, float]:
    """One training step; seconds per phase, each phase ended by a device sync."""
    sync = model.backend.synchronize
    sync()
    t0 = time.perf_counter()
    logits = model.forward(x)
    _, grad = cross_entropy(logits, y, check=False)
    sync()
    t1 = time.perf_counter()
    model.backward(grad)
    sync()
    t2 = time.perf_counter()
    optimizer.step()
    sync()
    t3 = time.perf_counter()
    return {"forward": t1 - t0, "backward": t2 - t1, "adam": t3 - t2, "step": t3 - t0}


# ----------------------------------------------------------------- measurements
def time_models(configs: list[float | None], sizes: tuple[int, ...], args: argparse.Namespace,
                backend: Any) -> list[dict[str, Any]]:
    """Per config: median seconds per phase, all step times, and the weight count."""
    x, y = make_batch(sizes, args, backend)
    built = [build(sizes, d, args, backend) for d in configs]
    for model, opt in built:
        for _ in range(args.warmup):
            train_step(model, opt, x, y)
    samples: list[list[dict[str, float]]] = [[] for _ in configs]
    n = len(configs)
    rounds = -(-args.steps // args.per_round)
    for r in range(rounds):
        for i in [(r + k) % n for k in range(n)]:  # rotate who goes first
            time.sleep(args.pause)
            train_step(*built[i], x, y)  # untimed: re-warm after the other models
            for _ in range(min(args.per_round, args.steps - len(samples[i]))):
                samples[i].append(train_step(*built[i], x, y))
    results = [{"median": {k: statistics.median(s[k] for s in runs) for k in (*PHASES, "step")},
                "min_step": min(s["step"] for s in runs),
                "steps": [s["step"] for s in runs],
                "n_weights": model.n_weights}
               for runs, (model, _) in zip(samples, built)]
    del built
    gc.collect()
    return results


def peak_memory(density: float | None, sizes: tuple[int, ...], args: argparse.Namespace,
                backend: Any) -> int:
    """Peak bytes in use over: building the model and its Adam, then one training step."""
    x, y = make_batch(sizes, args, backend)
    gc.collect()
    with MemoryTracker(backend) as tracker:
        model, opt = build(sizes, density, args, backend)
        train_step(model, opt, x, y)
        peak = tracker.peak()
        del model, opt
    gc.collect()
    return peak


# ----------------------------------------------------------------- report
def run(args: argparse.Namespace) -> dict[str, Any]:
    backend = cupynn.get_backend(args.device)
    info = machine_info(backend)
    load_before = load_average()
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for sizes in args.sizes:
        configs: list[float | None] = [None, *args.densities]
        timed = time_models(configs, sizes, args, backend)
        peaks = ([None] * len(configs) if args.no_memory
                 else [peak_memory(d, sizes, args, backend) for d in configs])
        dense_step, dense_peak = timed[0]["median"]["step"], peaks[0]
        for d, t, peak in zip(configs, timed, peaks):
            rows.append({
                "sizes": "-".join(map(str, sizes)),
                "model": "dense" if d is None else "sparse",
                "density": 1.0 if d is None else d,
                "n_weights": t["n_weights"],
                "step_ms": 1e3 * t["median"]["step"],
                **{f"{k}_ms": 1e3 * t["median"][k] for k in PHASES},
                "min_step_ms": 1e3 * t["min_step"],
                "step_vs_dense": t["median"]["step"] / dense_step,
                "peak_mib": None if peak is None else peak / 2**20,
                "peak_vs_dense": None if peak is None else peak / dense_peak,
                "step_ms_samples": [1e3 * s for s in t["steps"]],
            })
    info["load_average_before"] = load_before
    info["load_average_after"] = load_average()
    try:  # known once a parallel Numba kernel has run
        import numba

        info["numba_threading_layer"] = numba.threading_layer()
    except Exception:
        info["numba_threading_layer"] = None
    return {
        "machine": info,
        "settings": {"batch": args.batch, "steps": args.steps, "per_round": args.per_round,
                     "warmup": args.warmup, "pause": args.pause, "dtype": args.dtype,
                     "lr": args.lr, "seed": args.seed,
                     "wall_seconds": round(time.perf_counter() - start, 1),
                     "command": " ".join(["python", *sys.argv])},
        "results": rows,
    }


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_report(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    blas_threads = f", threads {m['blas_threads']}" if m.get("blas_threads") else ""
    thread_env = " ".join(f"{k}={v}" for k, v in m["thread_env"].items())
    lines = [
        f"machine : {m['cpu']}, {m['cpu_count']} cores; {m['platform']}",
        f"device  : {m['backend']}: {m['device_name']}",
        f"software: python {m['python']}, numpy {m['numpy']} ({m['blas']}{blas_threads}), "
        f"numba {m['numba']} ({m['numba_threads']} threads, "
        f"{m.get('numba_threading_layer') or 'no'} layer)"
        + (f", cupy {m['cupy']}" if "cupy" in m else "") + f", cupynn {m['cupynn']}",
        f"settings: batch {s['batch']}, {s['dtype']}; median of {s['steps']} timed steps "
        f"after {s['warmup']} warm-up steps; models interleaved in rounds of 1 untimed + "
        f"{s['per_round']} timed steps each, {s['pause']} s pause between models",
        f"load avg: {m['load_average_before']} before, {m['load_average_after']} after "
        f"({s['wall_seconds']} s)",
        f"env     : {thread_env or '(no thread settings)'}",
        "",
    ]
    header = (f"{'sizes':<17} {'model':<6} {'density':>7} {'weights':>10} {'step ms':>8} "
              f"{'fwd ms':>7} {'bwd ms':>7} {'adam ms':>7} {'step/dense':>10} "
              f"{'peak MiB':>8} {'mem/dense':>9}")
    lines += [header, "-" * len(header)]
    for r in report["results"]:
        lines.append(
            f"{r['sizes']:<17} {r['model']:<6} {r['density']:>7.2f} {r['n_weights']:>10,} "
            f"{r['step_ms']:>8.1f} {r['forward_ms']:>7.1f} {r['backward_ms']:>7.1f} "
            f"{r['adam_ms']:>7.1f} {r['step_vs_dense']:>10.3f} "
            f"{_fmt(r['peak_mib'], '.1f'):>8} {_fmt(r['peak_vs_dense'], '.3f'):>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(format_report(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

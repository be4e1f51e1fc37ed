"""Training-step time and peak memory of sparse vs dense MLPs, and of the masked-dense peer.

One training step is what :func:`cupynn.fit` does per mini-batch: forward,
softmax cross-entropy, backward and ``Adam.step()``, all through the public
API. For every list of layer sizes the script builds

* one **dense** model: ``density=1.0`` with every layer in ``dense_layers``,
  so every layer is a :class:`cupynn.Linear` (plain GEMMs),
* one **sparse** model per density: every layer a :class:`cupynn.SparseLinear`,
* when PyTorch can be imported (``--peer torch``, the default then; ``--no-peer``
  turns it off), one **peer** per density: the same sparse model trained the
  way most dynamic-sparse-training code does it, as dense weights times a 0/1
  mask in PyTorch (``benchmarks/torch_peer.py``), starting from the sparse
  model's topology and values, with ``torch.optim.Adam`` of the same settings,
  on the same device and with as many threads as Numba,

and times them in the same run, so that a busy machine slows all of them
alike. The timing runs in rounds; in each round every model, in an order that
rotates from round to round, sleeps ``--pause`` seconds (so that the previous
model's BLAS threads stop spinning), runs one untimed step (which brings its
arrays back into cache), then ``--per-round`` timed steps. Warm-up steps
before the first round absorb the Numba JIT and CUDA compilation. Each
reported time is the median over ``--steps`` timed steps; a phase (forward +
loss, backward, Adam) ends with a device synchronisation. An **epoch** time
is that median times the steps of one epoch (``ceil(--epoch-samples /
batch)``: 118 for KMNIST's 60 000 images at batch 512): extrapolated, not
measured.

Peak memory is measured twice, in separate passes, because tracing
allocations slows them down:

* ``peak MiB`` (cupynn only): :class:`cupynn.memory.MemoryTracker` gives the
  peak bytes in use while building the model and its optimizer and running
  one full training step. On the CPU that is the ``tracemalloc`` peak (NumPy
  reports its array buffers to ``tracemalloc``, and the Numba kernels write
  into NumPy-allocated arrays; BLAS workspaces are not counted); on the GPU,
  the peak of bytes in use from CuPy's memory pool, followed by a CuPy memory
  hook.
* ``proc MiB`` (every model, the same way for cupynn and the peer, since
  ``tracemalloc`` does not see PyTorch's allocations): each model in a fresh
  Python process, which imports everything, builds the input batch (and, for
  the peer, the host copy of the topology and initial values it starts from),
  warms up with two steps of a model of the same kind with 16-wide hidden
  layers, then takes its current resident set size (``VmRSS``) as the
  baseline, resets the kernel's high-water mark (``/proc/self/clear_refs``),
  builds the model and its optimizer and runs one step; the result is the
  high-water mark (``VmHWM``) minus the baseline. glibc's mmap threshold is
  fixed at its default (``MALLOC_MMAP_THRESHOLD_=131072``) so that freed large
  blocks go back to the OS and the mark follows live memory. On the GPU it is
  the peak of bytes in use from each library's own allocator (CuPy's pool
  through the hook above; ``torch.cuda.max_memory_allocated``).

The input batch is created before every window and is not counted.

``--epoch kmnist`` and ``--epoch higgs`` (or ``--higgs-epoch``) measure
instead one epoch of the paper's set-up, end to end through :func:`cupynn.fit`
with its progress bar, against the peer's epoch (see :func:`epochs`).

Run ``python benchmarks/bench_training.py --help`` for the options, and see
``benchmarks/README.md`` and ``docs/benchmarks.md``.
"""

from __future__ import annotations

if __name__ == "__main__":  # the best dense BLAS for the baselines: before NumPy loads
    import os as _os
    import sys as _sys

    _sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))
    import blas_pin

    blas_pin.release()

import argparse
import gc
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import numpy

HERE = os.path.dirname(os.path.abspath(__file__))
# Benchmark the checkout this script lives in, installed or not; the peer module sits beside it.
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(1, HERE)

import cupynn  # noqa: E402
from cupynn.backend import to_numpy  # noqa: E402
from cupynn.memory import MemoryTracker, peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402
from cupynn.redistribution.schedule import fraction_at  # noqa: E402
from cupynn.step import TrainStep  # noqa: E402
from machine import (finish_info, fmt, header_lines, load_and_env_lines, load_average,  # noqa: E402
                     numba_threads, publish)
from machine import machine_info as base_machine_info  # noqa: E402

PHASES = ("forward", "backward", "adam")  # "forward" includes the loss
DEFAULT_SIZES = "784-256-256-10,784-4096-4096-10"
DEFAULT_DENSITIES = "0.1,0.06,0.03"
DEFAULT_BATCH = 512
# The paper's HIGGS set-up (SPEC §6) and its time per epoch on a GPU at density 0.1 with
# gradient-global redistribution (SPEC §7), the number --higgs-epoch compares with.
HIGGS_SIZES = "21-256-256-256-1"
HIGGS_DENSITIES = "0.1"
HIGGS_BATCH = 128
HIGGS_SAMPLES = 500_000
HIGGS_SCHEDULE_EPOCHS = 80  # the schedule's length: epoch 1 moves fraction_at(1, 80)
PAPER_HIGGS_EPOCH_S = 22.2
KMNIST_SAMPLES = 60_000


@dataclass(frozen=True)
class EpochSetting:
    """One of the paper's set-ups (SPEC §6) for the end-to-end epoch mode."""

    name: str
    sizes: str
    dense_layers: tuple[int, ...]
    batch: int
    samples: int
    loss: str
    paper_epoch_s: float | None  # the paper's GPU time per epoch at density 0.1, if it gives one


EPOCH_SETTINGS = {
    "higgs": EpochSetting("higgs", HIGGS_SIZES, (-1,), HIGGS_BATCH, HIGGS_SAMPLES,
                          "binary_cross_entropy", PAPER_HIGGS_EPOCH_S),
    "kmnist": EpochSetting("kmnist", "784-256-256-10", (), DEFAULT_BATCH, KMNIST_SAMPLES,
                           "cross_entropy", None),
}
# --graph on/off: cupynn.fit's ``graph``; auto passes nothing, so fit's default holds.
GRAPH_MODES = {"on": True, "off": False}
WARMUP_WIDTH = 16  # hidden width of the model that warms up a memory-measuring process


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
                   help="cupynn backend to benchmark (the peer runs on the same device)")
    p.add_argument("--sizes", type=parse_sizes, default=None,
                   help=f"comma-separated layer-size lists, input first (default {DEFAULT_SIZES}; "
                        f"with --higgs-epoch {HIGGS_SIZES}, output layer dense)")
    p.add_argument("--densities", type=parse_densities, default=None,
                   help=f"comma-separated densities of the sparse models (default "
                        f"{DEFAULT_DENSITIES}; with --higgs-epoch {HIGGS_DENSITIES})")
    p.add_argument("--batch", type=int, default=None,
                   help=f"mini-batch size (default {DEFAULT_BATCH}; with --higgs-epoch "
                        f"{HIGGS_BATCH})")
    p.add_argument("--steps", type=int, default=20, help="timed steps per model (median reported)")
    p.add_argument("--per-round", type=int, default=2,
                   help="timed steps per model per round (each round adds one untimed step)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model before timing")
    p.add_argument("--pause", type=float, default=0.2,
                   help="seconds to sleep before each model's turn in a round, so that the "
                        "previous model's BLAS threads stop spinning (OpenBLAS busy-waits "
                        "about 0.1 s after each call) and do not steal its cores")
    p.add_argument("--epoch-samples", type=int, default=60_000,
                   help="training samples per epoch: the epoch time is the median step times "
                        "ceil(this / batch) steps (KMNIST: 60000)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (both libraries)")
    p.add_argument("--seed", type=int, default=0, help="seed of the models and the batch")
    p.add_argument("--no-memory", action="store_true", help="skip both peak-memory passes")
    peer = p.add_mutually_exclusive_group()
    peer.add_argument("--peer", choices=("torch",), default=None,
                      help="also run the masked-dense peer in this library (default: torch "
                           "when `import torch` works; naming it makes a missing torch an error)")
    peer.add_argument("--no-peer", action="store_true", help="do not run the masked-dense peer")
    p.add_argument("--peer-adam", default="default", choices=("default", "foreach", "fused"),
                   help="the peer's torch.optim.Adam implementation: PyTorch's default for the "
                        "device (on the CPU the per-tensor loop, as most code runs it), or "
                        "foreach=True / fused=True")
    p.add_argument("--epoch", choices=sorted(EPOCH_SETTINGS), default=None,
                   help="instead of the step table, time one epoch of the paper's set-up end "
                        "to end, cupynn.fit (progress bar on) against the peer: kmnist "
                        f"({EPOCH_SETTINGS['kmnist'].sizes}, batch {DEFAULT_BATCH}, "
                        f"{KMNIST_SAMPLES:,} rows, cross-entropy) or higgs ({HIGGS_SIZES} with "
                        f"a dense output layer, batch {HIGGS_BATCH}, {HIGGS_SAMPLES:,} rows, "
                        "binary cross-entropy), each followed by one gradient-global "
                        "redistribution")
    p.add_argument("--higgs-epoch", action="store_true",
                   help="the same as --epoch higgs (also compared with the paper's "
                        f"{PAPER_HIGGS_EPOCH_S} s, a GPU number)")
    p.add_argument("--samples", type=int, default=None,
                   help="--epoch: training rows per epoch (synthetic, seeded; default the "
                        "set-up's); fewer for a smoke test")
    p.add_argument("--repeats", type=int, default=1,
                   help="--epoch: timed epochs per library, alternating which goes first")
    p.add_argument("--no-progress", action="store_true",
                   help="--epoch: run cupynn.fit without its progress bar (shown by default, "
                        "as a user sees it; the peer's loop has none)")
    p.add_argument("--graph", default="auto", choices=("auto", "on", "off"),
                   help="--epoch: cupynn.fit's graph setting (on: each step one replay of a "
                        "CUDA graph, the GPU only; off: eager launches; auto: fit's default)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: sizes 784-256-256-10, densities 0.1,0.03, batch 64, "
                        "2 timed steps after 1 warm-up step (overrides those options)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    # Internal: measure one model's process peak in this (fresh) process; print JSON.
    p.add_argument("--process-peak-child", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.higgs_epoch:
        if args.epoch not in (None, "higgs"):
            p.error(f"--higgs-epoch and --epoch {args.epoch} name different set-ups")
        args.epoch = "higgs"
    setting = EPOCH_SETTINGS.get(args.epoch)
    args.setting = setting
    if args.sizes is None:
        args.sizes = parse_sizes(setting.sizes if setting else DEFAULT_SIZES)
    if args.densities is None:
        args.densities = parse_densities(HIGGS_DENSITIES if setting else DEFAULT_DENSITIES)
    if args.batch is None:
        args.batch = setting.batch if setting else DEFAULT_BATCH
    if args.samples is None:
        args.samples = setting.samples if setting else HIGGS_SAMPLES
    if args.quick and not setting:
        args.sizes = [(784, 256, 256, 10)]
        args.densities = [0.1, 0.03]
        args.batch, args.steps, args.per_round, args.warmup = 64, 2, 1, 1
    for name in ("batch", "steps", "per_round", "epoch_samples", "samples", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.pause < 0:
        p.error("--warmup and --pause must be >= 0")
    if setting and setting.dense_layers and any(len(s) < 3 for s in args.sizes):
        p.error(f"--epoch {setting.name} needs at least one hidden layer (the output layer is "
                f"dense)")
    return args


# ----------------------------------------------------------------- the peer
@dataclass
class Peer:
    """The masked-dense peer's module (``torch_peer``) and its device."""

    module: Any
    device: Any

    def describe(self) -> str:
        return self.module.describe(self.device)


def load_peer(args: argparse.Namespace, backend: Any) -> tuple[Peer | None, str]:
    """The peer, or None and why not. Only here is PyTorch imported."""
    if args.no_peer:
        return None, "turned off (--no-peer)"
    try:
        import torch_peer
    except ImportError as exc:
        if args.peer:
            raise SystemExit(f"error: --peer {args.peer}: cannot import it ({exc}); on a CPU "
                             f"machine: pip install torch==2.13.0")
        return None, f"not run: `import torch` failed ({exc})"
    device, why = torch_peer.device_for(backend.is_gpu)
    if device is None:
        if args.peer:
            raise SystemExit(f"error: --peer {args.peer}: {why}")
        return None, f"not run: {why}"
    torch_peer.set_threads(numba_threads() or os.cpu_count() or 1)
    return Peer(torch_peer, device), ""


# ----------------------------------------------------------------- the machine
def machine_info(backend: Any, peer: Peer | None, peer_note: str,
                 args: argparse.Namespace) -> dict[str, Any]:
    info = base_machine_info(backend)
    info["peer"] = peer.describe() if peer else None
    info["peer_adam"] = args.peer_adam if peer else None
    info["peer_note"] = peer_note
    return info


# ----------------------------------------------------------------- models
@dataclass
class Config:
    """One model of the table: ``kind`` is "dense", "sparse" or "peer"."""

    kind: str
    density: float  # 1.0 for the dense model

    @property
    def cupynn_density(self) -> float | None:
        return None if self.kind == "dense" else self.density


@dataclass
class Runner:
    """A built model with its optimizer and batch; ``step()`` returns seconds per phase."""

    config: Config
    step: Callable[[], dict[str, float]]
    n_weights: int
    model: Any = field(repr=False)


def build(sizes: tuple[int, ...], density: float | None, args: argparse.Namespace,
          backend: Any, dense_layers: tuple[int, ...] | None = None) -> tuple[Any, Any]:
    """A cupynn model and its Adam. ``density=None`` means the dense baseline;
    ``dense_layers`` (default: none) keeps those layers of a sparse model dense."""
    n_layers = len(sizes) - 1
    if density is None:
        model = cupynn.MLP(sizes, density=1.0, dense_layers=tuple(range(n_layers)),
                           seed=args.seed, dtype=args.dtype, device=backend)
        expected = {cupynn.Linear.__name__}
    else:
        model = cupynn.MLP(sizes, density=density, dense_layers=dense_layers or (), seed=args.seed,
                           dtype=args.dtype, device=backend)
        expected = {cupynn.SparseLinear.__name__}
        if dense_layers:
            expected.add(cupynn.Linear.__name__)
    kinds = {type(layer).__name__ for layer in model.layers}
    if not kinds <= expected:
        raise AssertionError(f"expected only {sorted(expected)} layers, got {sorted(kinds)}")
    return model, cupynn.Adam(model, lr=args.lr)


def build_peer(peer: Peer, state: dict[str, numpy.ndarray], sizes: tuple[int, ...],
               args: argparse.Namespace, loss: str = "cross_entropy") -> Any:
    """The masked-dense copy of the cupynn model whose ``state_dict()`` is ``state``,
    with torch.optim.Adam of cupynn.Adam's settings."""
    adam = inspect.signature(cupynn.Adam).parameters  # betas and eps: cupynn's defaults
    return peer.module.MaskedDensePeer(state, sizes, peer.device, args.dtype, loss, lr=args.lr,
                                       betas=tuple(adam["betas"].default), eps=adam["eps"].default,
                                       adam=args.peer_adam)


def make_host_batch(sizes: tuple[int, ...], args: argparse.Namespace) -> tuple[Any, Any]:
    """One fixed batch on the host: inputs in [0, 1) like MNIST pixels, random labels."""
    rng = numpy.random.default_rng(args.seed + 1)
    x = rng.random((args.batch, sizes[0])).astype(args.dtype)
    y = rng.integers(0, sizes[-1], size=args.batch)
    return x, y


def train_step(step: TrainStep, x: Any, y: Any) -> dict[str, float]:
    """One training step, the trainer's own (``TrainStep``); seconds per phase, each
    phase ended by a device sync: ``forward`` (the batch to the device, forward, loss),
    ``backward``, ``adam`` and the whole ``step``."""
    phases = step.timed(x, y, check=False)
    return {"forward": phases["batch to device"] + phases["forward"] + phases["loss"],
            "backward": phases["backward"], "adam": phases["adam"], "step": phases["step"]}


def make_runner(config: Config, sizes: tuple[int, ...], args: argparse.Namespace, backend: Any,
                peer: Peer | None, host_batch: tuple[Any, Any],
                state: dict[str, numpy.ndarray] | None = None) -> Runner:
    """Build one model of the table. A peer copies ``state`` (a sparse cupynn model's
    ``state_dict()``), or that of a fresh one with the same seed."""
    if config.kind == "peer":
        if state is None:
            state = build(sizes, config.density, args, backend)[0].state_dict()
        model = build_peer(peer, state, sizes, args)
        step = partial(model.step, *model.batch(*host_batch))
        return Runner(config, step, model.n_weights, model)
    model, opt = build(sizes, config.cupynn_density, args, backend)
    x, y = (backend.asarray(a) for a in host_batch)
    return Runner(config, partial(train_step, TrainStep(model, opt), x, y), model.n_weights,
                  model)


# ----------------------------------------------------------------- measurements
def time_models(configs: list[Config], sizes: tuple[int, ...], args: argparse.Namespace,
                backend: Any, peer: Peer | None) -> list[dict[str, Any]]:
    """Per config: median seconds per phase, all step times, the weight count, and
    for a peer how far its weights are from the sparse model's after the warm-up."""
    host_batch = make_host_batch(sizes, args)
    runners: list[Runner] = []
    for config in configs:
        twin = next((r for r in runners if r.config == Config("sparse", config.density)), None)
        state = twin.model.state_dict() if config.kind == "peer" and twin else None
        runners.append(make_runner(config, sizes, args, backend, peer, host_batch, state))
    for runner in runners:
        for _ in range(args.warmup):
            runner.step()
    checks = [peer_check(r, runners, args.warmup) for r in runners]
    samples: list[list[dict[str, float]]] = [[] for _ in configs]
    n = len(configs)
    rounds = -(-args.steps // args.per_round)
    for r in range(rounds):
        for i in [(r + k) % n for k in range(n)]:  # rotate who goes first
            time.sleep(args.pause)
            runners[i].step()  # untimed: re-warm after the other models
            for _ in range(min(args.per_round, args.steps - len(samples[i]))):
                samples[i].append(runners[i].step())
    results = [{"median": {k: statistics.median(s[k] for s in runs) for k in (*PHASES, "step")},
                "min_step": min(s["step"] for s in runs),
                "steps": [s["step"] for s in runs],
                "n_weights": runner.n_weights,
                "check": check}
               for runs, runner, check in zip(samples, runners, checks)]
    del runners
    gc.collect()
    return results


def peer_check(runner: Runner, runners: list[Runner], steps: int) -> dict[str, Any] | None:
    """For a peer: the largest |w_peer - w_cupynn| over the active weights after both took
    the same ``steps`` on the same batch from the same start (they compute the same thing)."""
    twin = next((r for r in runners if r.config == Config("sparse", runner.config.density)), None)
    if runner.config.kind != "peer" or twin is None:
        return None
    diff = scale = 0.0
    for i, layer in enumerate(twin.model.layers):
        ours = to_numpy(layer.data)
        theirs = runner.model.sparse_values(i, to_numpy(layer.indptr), to_numpy(layer.indices))
        diff = max(diff, float(numpy.abs(ours - theirs).max()))
        scale = max(scale, float(numpy.abs(ours).max()))
    return {"steps": steps, "max_abs_diff": diff, "max_abs_weight": scale}


def peak_memory(density: float | None, sizes: tuple[int, ...], args: argparse.Namespace,
                backend: Any) -> int:
    """Peak bytes in use (tracemalloc / CuPy pool) over: building the model and its
    Adam, then one training step."""
    x, y = (backend.asarray(a) for a in make_host_batch(sizes, args))
    gc.collect()
    with MemoryTracker(backend) as tracker:
        model, opt = build(sizes, density, args, backend)
        train_step(TrainStep(model, opt), x, y)
        peak = tracker.peak()
        del model, opt
    gc.collect()
    return peak


class ProcessPeak:
    """Peak growth of this process's memory over a window, the same way for any library.

    CPU: resident set size. :meth:`start` takes the current ``VmRSS`` as the
    baseline and resets the kernel's high-water mark to it (writing 5 to
    ``/proc/self/clear_refs``); :meth:`peak` is ``VmHWM`` minus the baseline.
    Without that interface (not Linux) the high-water mark is ``ru_maxrss``
    since the process started, so the result is an upper bound.
    GPU: bytes in use from the library's allocator: CuPy's pool (through
    :class:`cupynn.memory.MemoryTracker`) or PyTorch's caching allocator.
    """

    def __init__(self, backend: Any, torch_device: Any = None) -> None:
        self.backend, self.torch_device = backend, torch_device
        self.method = ""

    def start(self) -> None:
        gc.collect()
        if self.torch_device is not None and self.torch_device.type == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated growth"
        elif self.backend.is_gpu:
            self.tracker = MemoryTracker(self.backend).start()
            self.base = self.tracker.current()
            self.method = "CuPy pool bytes in use (MemoryTracker)"
        else:
            self.base = rss_bytes()
            if reset_peak_rss():
                self.method = "VmHWM - VmRSS at start (high-water mark reset)"
            else:
                self.base = self.base or 0
                self.method = "ru_maxrss - VmRSS at start (no reset: an upper bound)"

    def peak(self) -> int:
        if self.torch_device is not None and self.torch_device.type == "cuda":
            import torch

            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated()) - self.base
        if self.backend.is_gpu:
            peak = self.tracker.peak()
            self.tracker.stop()
            return peak - self.base
        return peak_rss_bytes() - self.base


def process_peak_child(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: warm up, then the peak growth of building one model and its
    optimizer and running one step (see :class:`ProcessPeak`)."""
    backend = cupynn.get_backend(args.device)
    config, sizes = Config(spec["kind"], spec["density"]), tuple(spec["sizes"])
    tiny = (sizes[0], *[min(WARMUP_WIDTH, s) for s in sizes[1:-1]], sizes[-1])
    host_batch = make_host_batch(sizes, args)
    peer = None
    if config.kind == "peer":
        args.peer, args.no_peer = "torch", False
        peer = load_peer(args, backend)[0]
        # The topology and initial values the peer starts from: host arrays, made before
        # the window like the batch (nnz-sized; the peer's dense tensors are built in it).
        state = build(sizes, config.density, args, backend)[0].state_dict()
    warm = make_runner(config, tiny, args, backend, peer, host_batch)
    for _ in range(2):
        warm.step()
    del warm
    meter = ProcessPeak(backend, peer.device if peer else None)
    meter.start()
    runner = make_runner(config, sizes, args, backend, peer, host_batch,
                         state if config.kind == "peer" else None)
    runner.step()
    peak = meter.peak()
    return {"peak_bytes": peak, "method": meter.method, "n_weights": runner.n_weights}


def process_peak(config: Config, sizes: tuple[int, ...],
                 args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`process_peak_child` in a fresh Python process."""
    spec = json.dumps({"kind": config.kind, "density": config.density, "sizes": list(sizes)})
    cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device,
           "--batch", str(args.batch), "--dtype", args.dtype, "--lr", repr(args.lr),
           "--seed", str(args.seed), "--peer-adam", args.peer_adam,
           "--process-peak-child", spec]
    # glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after
    # which freed blocks stay in the heap: what the warm-up freed would then be part of the
    # baseline and hide part of the peak. Fixing the threshold at its default (128 KiB) sends
    # every large block back to the OS on free, so the high-water mark follows live memory.
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"measuring {config} in a fresh process failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------- the step table
def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is unknown or b is 0 (a peak too small to see)."""
    return None if a is None or not b else a / b


def run(args: argparse.Namespace) -> dict[str, Any]:
    backend = cupynn.get_backend(args.device)
    peer, peer_note = load_peer(args, backend)
    info = machine_info(backend, peer, peer_note, args)
    load_before = load_average()
    start = time.perf_counter()
    epoch_steps = -(-args.epoch_samples // args.batch)
    rows: list[dict[str, Any]] = []
    comparisons: list[dict[str, Any]] = []
    for sizes in args.sizes:
        configs = [Config("dense", 1.0), *(Config("sparse", d) for d in args.densities)]
        if peer:
            configs += [Config("peer", d) for d in args.densities]
        timed = time_models(configs, sizes, args, backend, peer)
        if args.no_memory:
            traced = [None] * len(configs)
            proc: list[dict[str, Any] | None] = [None] * len(configs)
        else:
            traced = [None if c.kind == "peer"
                      else peak_memory(c.cupynn_density, sizes, args, backend) for c in configs]
            proc = [process_peak(c, sizes, args) for c in configs]
        dense_step, dense_peak = timed[0]["median"]["step"], traced[0]
        dense_proc = proc[0] and proc[0]["peak_bytes"]
        size_rows = []
        for c, t, peak, pp in zip(configs, timed, traced, proc):
            size_rows.append({
                "sizes": "-".join(map(str, sizes)),
                "model": c.kind,
                "density": c.density,
                "n_weights": t["n_weights"],
                "step_ms": 1e3 * t["median"]["step"],
                **{f"{k}_ms": 1e3 * t["median"][k] for k in PHASES},
                "min_step_ms": 1e3 * t["min_step"],
                "epoch_s": epoch_steps * t["median"]["step"],
                "step_vs_dense": t["median"]["step"] / dense_step,
                "peak_mib": None if peak is None else peak / 2**20,
                "peak_vs_dense": _ratio(peak, dense_peak),
                "proc_mib": None if pp is None else pp["peak_bytes"] / 2**20,
                "proc_vs_dense": _ratio(pp and pp["peak_bytes"], dense_proc),
                "proc_method": None if pp is None else pp["method"],
                "peer_check": t["check"],
                "step_ms_samples": [1e3 * s for s in t["steps"]],
            })
        rows += size_rows
        for d in (args.densities if peer else ()):
            ours = next(r for r in size_rows if r["model"] == "sparse" and r["density"] == d)
            theirs = next(r for r in size_rows if r["model"] == "peer" and r["density"] == d)
            comparisons.append({
                "sizes": ours["sizes"], "density": d,
                "cupynn_epoch_s": ours["epoch_s"], "peer_epoch_s": theirs["epoch_s"],
                "epoch_ratio": ours["epoch_s"] / theirs["epoch_s"],
                "cupynn_proc_mib": ours["proc_mib"], "peer_proc_mib": theirs["proc_mib"],
                "proc_ratio": _ratio(ours["proc_mib"], theirs["proc_mib"]),
                "cupynn_traced_mib": ours["peak_mib"],
                "peer_check": theirs["peer_check"],
            })
    finish_info(info, load_before)
    return {
        "machine": info,
        "settings": {"batch": args.batch, "steps": args.steps, "per_round": args.per_round,
                     "warmup": args.warmup, "pause": args.pause, "dtype": args.dtype,
                     "lr": args.lr, "seed": args.seed, "epoch_samples": args.epoch_samples,
                     "epoch_steps": epoch_steps,
                     "wall_seconds": round(time.perf_counter() - start, 1),
                     "command": " ".join(["python", *sys.argv])},
        "results": rows,
        "peer_comparison": comparisons,
    }


# ----------------------------------------------------------------- the epoch mode
def epoch_data(n: int, features: int,
               args: argparse.Namespace) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Synthetic rows of the set-up's shape (seeded); the values do not change the work a
    step does. HIGGS: standard-normal features, 0/1 labels with HIGGS's 53 % signal;
    KMNIST: pixels uniform in [0, 1), labels uniform over the output classes."""
    rng = numpy.random.default_rng(args.seed + 2)
    if args.setting.loss == "binary_cross_entropy":
        x = rng.standard_normal((n, features), dtype=numpy.float32)
        y = (rng.random(n) < 0.53).astype(args.dtype)
    else:
        x = rng.random((n, features), dtype=numpy.float32)
        y = rng.integers(0, args.sizes[0][-1], size=n)
    return x.astype(args.dtype, copy=False), y


def cupynn_epoch(sizes: tuple[int, ...], density: float, data: tuple[Any, Any],
                 args: argparse.Namespace, backend: Any) -> dict[str, float]:
    """Epoch 1 of an 80-epoch gradient-global run through cupynn.fit (no evaluation), with
    fit's progress bar unless --no-progress."""
    setting = args.setting
    model, opt = build(sizes, density, args, backend, dense_layers=setting.dense_layers)
    graph = {"graph": GRAPH_MODES[args.graph]} if args.graph in GRAPH_MODES else {}
    history = cupynn.fit(model, opt, train=data, epochs=HIGGS_SCHEDULE_EPOCHS,
                         batch_size=args.batch, loss=setting.loss, seed=args.seed,
                         progress=not args.no_progress, redistribution="gradient-global",
                         on_epoch_end=lambda metrics: False, **graph)
    h = history[0]
    return {"train_s": h["train_seconds"], "redistribution_s": h["redistribution_seconds"],
            "epoch_s": h["train_seconds"] + h["redistribution_seconds"],
            "fraction": h.get("fraction", 0.0), "steps": h["n_batches"]}


def peer_epoch(peer: Peer, sizes: tuple[int, ...], density: float, data: tuple[Any, Any],
               args: argparse.Namespace, backend: Any) -> dict[str, float]:
    """The same epoch for the masked-dense peer: same start, same batches in the same
    order, then RigL's global redistribution on the masks (the epoch's last batch)."""
    setting = args.setting
    state = build(sizes, density, args, backend, dense_layers=setting.dense_layers)[0].state_dict()
    model = build_peer(peer, state, sizes, args, loss=setting.loss)
    x, y = data
    train_s, order = model.train_epoch(x, y, args.batch, numpy.random.default_rng(args.seed))
    fraction = fraction_at(1, HIGGS_SCHEDULE_EPOCHS)
    last = order[(len(order) - 1) // args.batch * args.batch:]
    model.synchronize()
    start = time.perf_counter()
    model.redistribute_gradient_global(fraction, *model.batch(x[last], y[last]))
    model.synchronize()
    redistribution_s = time.perf_counter() - start
    return {"train_s": train_s, "redistribution_s": redistribution_s,
            "epoch_s": train_s + redistribution_s, "fraction": fraction,
            "steps": -(-len(order) // args.batch)}


def epochs(args: argparse.Namespace) -> dict[str, Any]:
    """One epoch of the set-up per library, ``--repeats`` times, alternating who goes first.

    Each timed epoch starts from a freshly built model, so that it moves the
    epoch-1 fraction of the schedule; a small untimed epoch first absorbs the
    JIT. The epoch time is training plus the redistribution after it. The
    report's rows are under the set-up's name ("higgs" or "kmnist").
    """
    setting = args.setting
    backend = cupynn.get_backend(args.device)
    peer, peer_note = load_peer(args, backend)
    info = machine_info(backend, peer, peer_note, args)
    load_before = load_average()
    start = time.perf_counter()
    sides: dict[str, Callable[..., dict[str, float]]] = {
        "cupynn": partial(cupynn_epoch, backend=backend)}
    if peer:
        sides["peer"] = partial(peer_epoch, peer, backend=backend)
    results = []
    for sizes in args.sizes:
        data = epoch_data(args.samples, sizes[0], args)
        warm = tuple(a[:4 * args.batch] for a in data)
        for density in args.densities:
            for epoch in sides.values():
                epoch(sizes, density, warm, args)
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
            for r in range(args.repeats):
                for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                    time.sleep(args.pause)
                    runs[name].append(sides[name](sizes, density, data, args))
            row: dict[str, Any] = {"sizes": "-".join(map(str, sizes)), "density": density,
                                   "samples": args.samples}
            for name, timed in runs.items():
                row[name] = {k: statistics.median(e[k] for e in timed) for k in timed[0]}
                row[name]["steps"] = int(row[name]["steps"])
                row[name]["epoch_s_runs"] = [e["epoch_s"] for e in timed]
            if setting.paper_epoch_s:
                row["cupynn_vs_paper"] = row["cupynn"]["epoch_s"] / setting.paper_epoch_s
            if "peer" in row:
                row["cupynn_vs_peer"] = row["cupynn"]["epoch_s"] / row["peer"]["epoch_s"]
            results.append(row)
    finish_info(info, load_before)
    return {
        "machine": info,
        "settings": {"setting": setting.name, "sizes_default": setting.sizes,
                     "loss": setting.loss, "dense_layers": list(setting.dense_layers),
                     "batch": args.batch, "samples": args.samples, "repeats": args.repeats,
                     "progress_bar": not args.no_progress, "graph": args.graph,
                     "dtype": args.dtype, "lr": args.lr, "seed": args.seed,
                     "redistribution": "gradient-global", "schedule_epochs": HIGGS_SCHEDULE_EPOCHS,
                     "paper_epoch_s": setting.paper_epoch_s,
                     "wall_seconds": round(time.perf_counter() - start, 1),
                     "command": " ".join(["python", *sys.argv])},
        setting.name: results,
    }


def higgs_epochs(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`epochs` of the HIGGS set-up (``args`` parsed with ``--higgs-epoch``)."""
    if args.setting is None or args.setting.name != "higgs":
        raise ValueError("higgs_epochs needs arguments parsed with --higgs-epoch")
    return epochs(args)


# ----------------------------------------------------------------- report
def format_header(report: dict[str, Any]) -> list[str]:
    m, s = report["machine"], report["settings"]
    adam = "" if m.get("peer_adam") in (None, "default") else f" ({m['peer_adam']})"
    peer = (f"{m['peer']}: dense weights x 0/1 mask, torch.optim.Adam{adam}, mask re-applied "
            f"after each step" if m["peer"] else m["peer_note"])
    return [*header_lines(m), f"peer    : {peer}", *load_and_env_lines(m, s["wall_seconds"])]


def format_report(report: dict[str, Any]) -> str:
    if "setting" in report["settings"]:
        return format_epochs(report)
    s = report["settings"]
    lines = format_header(report)
    lines.insert(4, f"settings: batch {s['batch']}, {s['dtype']}; median of {s['steps']} timed "
                    f"steps after {s['warmup']} warm-up steps; models interleaved in rounds of "
                    f"1 untimed + {s['per_round']} timed steps each, {s['pause']} s pause "
                    f"between models")
    lines.append("")
    header = (f"{'sizes':<17} {'model':<6} {'density':>7} {'weights':>10} {'step ms':>8} "
              f"{'fwd ms':>7} {'bwd ms':>7} {'adam ms':>7} {'step/dense':>10} "
              f"{'peak MiB':>8} {'mem/dense':>9} {'proc MiB':>8} {'proc/dense':>10}")
    lines += [header, "-" * len(header)]
    for r in report["results"]:
        lines.append(
            f"{r['sizes']:<17} {r['model']:<6} {r['density']:>7.2f} {r['n_weights']:>10,} "
            f"{r['step_ms']:>8.1f} {r['forward_ms']:>7.1f} {r['backward_ms']:>7.1f} "
            f"{r['adam_ms']:>7.1f} {r['step_vs_dense']:>10.3f} "
            f"{fmt(r['peak_mib'], '.1f'):>8} {fmt(r['peak_vs_dense'], '.3f'):>9} "
            f"{fmt(r['proc_mib'], '.1f'):>8} {fmt(r['proc_vs_dense'], '.3f'):>10}")
    methods = sorted({r["proc_method"] for r in report["results"] if r["proc_method"]})
    if methods:
        lines.append(f"proc MiB: peak growth in a fresh process over build + one step: "
                     f"{'; '.join(methods)}")
    if report["peer_comparison"]:
        lines += ["",
                  f"cupynn / masked-dense peer: epoch = {s['epoch_steps']} steps "
                  f"(ceil({s['epoch_samples']} / {s['batch']})) x the median step, extrapolated; "
                  f"memory = proc MiB",
                  ""]
        header = (f"{'sizes':<17} {'density':>7} {'cupynn epoch s':>14} {'peer epoch s':>12} "
                  f"{'epoch ratio':>11} {'cupynn MiB':>10} {'peer MiB':>9} {'mem ratio':>9} "
                  f"{'peer check |dw|':>15}")
        lines += [header, "-" * len(header)]
        for c in report["peer_comparison"]:
            check = c["peer_check"]
            lines.append(
                f"{c['sizes']:<17} {c['density']:>7.2f} {c['cupynn_epoch_s']:>14.2f} "
                f"{c['peer_epoch_s']:>12.2f} {c['epoch_ratio']:>11.3f} "
                f"{fmt(c['cupynn_proc_mib'], '.1f'):>10} {fmt(c['peer_proc_mib'], '.1f'):>9} "
                f"{fmt(c['proc_ratio'], '.3f'):>9} "
                f"{fmt(check and check['max_abs_diff'], '.1e'):>15}")
        lines.append("peer check: largest |w_peer - w_cupynn| over the active weights after both "
                     f"took the {s['warmup']} warm-up steps from the same start")
    return "\n".join(lines)


def format_epochs(report: dict[str, Any]) -> str:
    s = report["settings"]
    name, paper = s["setting"], s["paper_epoch_s"]
    lines = format_header(report)
    dense = ", output layer dense" if s["dense_layers"] else ""
    bar = "progress bar on" if s["progress_bar"] else "no progress bar"
    lines.insert(4, f"settings: {name.upper()} epoch{dense}, {s['loss']}, batch {s['batch']}, "
                    f"{s['samples']:,} synthetic rows, then one gradient-global redistribution "
                    f"(epoch 1 of {s['schedule_epochs']}); cupynn.fit with its {bar}; "
                    f"{s['dtype']}, lr {s['lr']}; median of {s['repeats']} epoch(s) per library")
    lines.append("")
    paper_column = f"{'/ paper ' + format(paper, 'g') + ' s':>15} " if paper else ""
    header = (f"{'sizes':<17} {'density':>7} {'library':<7} {'steps':>6} {'train s':>8} "
              f"{'redist s':>8} {'epoch s':>8} {'moved':>6} {paper_column}{'/ peer':>7}")
    lines += [header, "-" * len(header)]
    for row in report[name]:
        for library in ("cupynn", "peer"):
            if library not in row:
                continue
            e = row[library]
            ours = library == "cupynn"
            versus_paper = (f"{fmt(row['cupynn_vs_paper'] if ours else None, '.3f'):>15} "
                            if paper else "")
            lines.append(
                f"{row['sizes']:<17} {row['density']:>7.2f} {library:<7} {e['steps']:>6,} "
                f"{e['train_s']:>8.2f} {e['redistribution_s']:>8.3f} {e['epoch_s']:>8.2f} "
                f"{e['fraction']:>6.3f} {versus_paper}"
                f"{fmt(row.get('cupynn_vs_peer') if ours else None, '.3f'):>7}")
    if paper:
        lines.append(f"the paper's {paper} s is a GPU time at density 0.1 with "
                     f"{EPOCH_SETTINGS[name].samples:,} rows; compare like with like")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.process_peak_child:
        print(json.dumps(process_peak_child(json.loads(args.process_peak_child), args)))
        return 0
    report = epochs(args) if args.setting else run(args)
    return publish(report, format_report(report), args.json)


if __name__ == "__main__":
    sys.exit(main())

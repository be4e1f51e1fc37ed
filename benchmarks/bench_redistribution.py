"""What redistribution costs: seconds per redistribution, per-batch bookkeeping, peak memory.

For every algorithm of :data:`cupynn.redistribution.NAMES` and every setting
(by default the paper's two networks and the 4096-wide memory experiment, all
at density 0.1), the script measures, through the public API:

* **redistribution seconds**: one ``redistributor.redistribute(model,
  optimizer, fraction, x, y, loss)`` moving ``--fraction`` (0.5; the
  schedule's first value is 0.47-0.5) of the active weights, with one
  mini-batch as the growth batch, as :class:`cupynn.Trainer` calls it after an
  epoch. Before each one the redistributor is told an epoch starts
  (``start_epoch(model, n_batches, True)``, timed too: it allocates the
  WoodFisher blocks) and ``--train-steps`` training steps run with
  ``observe(model)`` after each backward pass, as the trainer does. The
  algorithms take turns in rounds (the order rotates from round to round);
  the median over ``--repeats`` rounds is reported.
* **per-batch bookkeeping**: ``observe(model)`` after each backward pass (the
  Sherman-Morrison steps of woodfisher/woodtaylor; a no-op for the others).
  One model per algorithm that observes, plus the static model that does not,
  are trained side by side in rotating rounds, like ``bench_training.py``
  does; each step's phases are timed separately (each ends with a device
  synchronisation), so the report gives the median ``observe`` time and the
  median whole step (forward + loss + backward + observe + Adam) against the
  static model's.
* **overhead per epoch**: ``start_epoch + redistribute + n_batches x
  observe``, as a share of one training epoch of the static sparse model.
  The epoch is not run: it is ``n_batches`` (60000/512 for KMNIST,
  500000/128 for HIGGS) times the static model's median step, which leaves
  out batch loading and augmentation.
* **whole epochs** (``--epochs R``, the paper's two networks only): epoch 2
  of an 80-epoch :func:`cupynn.fit` run, wall clock from the end of epoch 1
  to the end of epoch 2 (the batches with their loading and ``observe``, the
  redistribution and its induced loss), on seeded synthetic data of the real
  shapes (60 000 x 784 KMNIST-like, 500 000 x 21 HIGGS-like; ``--augment``
  adds the KMNIST script's augmentation), for every algorithm and for the
  static model trained without a redistributor: R pairs per algorithm, its
  epoch and one without redistributor back to back (which goes first
  alternates). The overhead is the median of the pairs' ratios: the shared
  machine has slow spells (the same KMNIST epoch took 0.3 or 0.5 s) that
  outlast a pair far more often than they fall inside one.
* **peak memory**: :class:`cupynn.memory.MemoryTracker` started before the
  model is built, over building the model and its Adam, ``start_epoch``,
  ``--train-steps`` training steps with ``observe`` and one redistribution;
  against the static model's peak over the same steps (its redistribution
  moves nothing). On the CPU that is the ``tracemalloc`` peak (every NumPy
  buffer; BLAS workspaces and Numba's internal scratch are not counted), on
  the GPU the peak of bytes in use from CuPy's pool. The batches are created
  before the window. Measured in a separate pass, since tracing slows
  allocation.

Kernels are warmed up first (``cupynn.kernels.warm_up``), and each algorithm
redistributes ``--warmup`` times before the timed rounds.

Run ``python benchmarks/bench_redistribution.py --help`` for the options, and
see ``benchmarks/README.md`` and ``docs/redistribution-benchmark.md``.
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
import os
import statistics
import sys
import time
from typing import Any, Callable

import numpy

# Benchmark the checkout this script lives in, installed or not.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(1, HERE)

import cupynn  # noqa: E402
from cupynn import kernels  # noqa: E402
from cupynn.step import TrainStep  # noqa: E402
from cupynn.memory import MemoryTracker  # noqa: E402
from cupynn.redistribution import NAMES, create  # noqa: E402
from machine import (finish_info, fmt, header_lines, load_and_env_lines,  # noqa: E402
                     load_average, machine_info, publish)

# The paper's settings (SPEC §6) and the 4096-wide memory experiment.
SETTINGS = {
    "kmnist": dict(sizes=(784, 256, 256, 10), dense_layers=(), batch=512,
                   loss="cross_entropy", train_rows=60_000),
    "higgs": dict(sizes=(21, 256, 256, 256, 1), dense_layers=(-1,), batch=128,
                  loss="binary_cross_entropy", train_rows=500_000),
    "kmnist-4096": dict(sizes=(784, 4096, 4096, 10), dense_layers=(), batch=512,
                        loss="cross_entropy", train_rows=60_000),
}
PAPER_SETTINGS = ("kmnist", "higgs")
SCHEDULE_EPOCHS = 80  # SPEC §6: the scripts' epoch count, whose schedule --epochs follows
TIME_TARGET = 0.05  # overhead <= 5 % of a static epoch, at the paper's sizes
MEMORY_TARGETS = {"woodfisher": 3.0, "woodtaylor": 3.0}  # x static, at width 4096
MEMORY_TARGET_OTHERS = 1.3
MEMORY_TARGET_SETTING = "kmnist-4096"


# ----------------------------------------------------------------- arguments
def _names(text: str, valid: tuple[str, ...], what: str) -> list[str]:
    out = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in out if t not in valid]
    if not out or bad:
        raise argparse.ArgumentTypeError(f"{what} must be a comma-separated subset of "
                                         f"{','.join(valid)}; got {text!r}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"),
                   help="cupynn backend to benchmark")
    p.add_argument("--settings", default=",".join(SETTINGS),
                   type=lambda t: _names(t, tuple(SETTINGS), "--settings"),
                   help="networks to measure: " + "; ".join(
                       f"{k} = {'-'.join(map(str, v['sizes']))} batch {v['batch']}"
                       for k, v in SETTINGS.items()))
    p.add_argument("--algorithms", default=",".join(NAMES),
                   type=lambda t: _names(t, NAMES, "--algorithms"), help="redistributions")
    p.add_argument("--density", type=float, default=0.1, help="density of the sparse layers")
    p.add_argument("--fraction", type=float, default=0.5,
                   help="fraction of the active weights one redistribution moves")
    p.add_argument("--steps", type=int, default=20,
                   help="timed training steps per model (median reported)")
    p.add_argument("--per-round", type=int, default=2,
                   help="timed training steps per model per round (each round adds one "
                        "untimed step)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed redistributions per algorithm (median reported)")
    p.add_argument("--train-steps", type=int, default=3,
                   help="training steps with observe before each redistribution")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed training steps per model, and untimed redistributions per "
                        "algorithm, before timing")
    p.add_argument("--pause", type=float, default=0.2,
                   help="seconds to sleep before each model's turn in a round (lets the "
                        "previous model's thread pools stop spinning)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the models and the batches")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--epochs", type=int, default=0, metavar="R",
                   help="also time whole epochs end to end through cupynn.fit at the paper's "
                        "sizes: R runs per algorithm and of the static model without "
                        "redistribution, each timing epoch 2 of an 80-epoch schedule on "
                        "synthetic data of the real shapes (0: skip)")
    p.add_argument("--augment", action="store_true",
                   help="--epochs: augment KMNIST batches as train_kmnist.py does (RandomAffine "
                        "with its defaults)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: settings kmnist,higgs, 2 timed steps and 1 timed "
                        "redistribution per algorithm after 1 warm-up, 1 training step "
                        "before it (overrides those options)")
    p.add_argument("--fisher-batches", default="64,16", metavar="M,...",
                   help="woodfisher/woodtaylor overhead also when the Fisher takes only the last "
                        "M mini-batches of an epoch (fisher_batches=M): start_epoch + "
                        "redistribute + min(M, n_batches) x observe, from the same measurements "
                        "('' for none)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args(argv)
    try:
        args.fisher_batches = [int(m) for m in args.fisher_batches.split(",") if m.strip()]
    except ValueError:
        p.error(f"--fisher-batches must be comma-separated ints; got {args.fisher_batches!r}")
    if any(m < 1 for m in args.fisher_batches):
        p.error("--fisher-batches must be >= 1")
    if args.quick:
        args.settings = [s for s in args.settings if s in PAPER_SETTINGS] or ["kmnist"]
        args.steps, args.per_round, args.repeats, args.train_steps, args.warmup = 2, 1, 1, 1, 1
    if args.epochs < 0:
        p.error("--epochs must be >= 0")
    for name in ("steps", "per_round", "repeats", "train_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.pause < 0:
        p.error("--warmup and --pause must be >= 0")
    if not 0 < args.density <= 1 or not 0 <= args.fraction <= 1:
        p.error("--density must be in (0, 1] and --fraction in [0, 1]")
    return args


# ----------------------------------------------------------------- pieces
class Setting:
    """One network, its batch and loss, and the batches the benchmark feeds it."""

    def __init__(self, name: str, args: argparse.Namespace, backend: Any) -> None:
        spec = SETTINGS[name]
        self.name, self.args, self.backend = name, args, backend
        self.sizes, self.dense_layers = spec["sizes"], spec["dense_layers"]
        self.batch, self.loss = spec["batch"], spec["loss"]
        self.n_batches = -(-spec["train_rows"] // self.batch)
        self.n_weights = cupynn.MLP(self.sizes, density=args.density, dense_layers=self.dense_layers,
                                    seed=args.seed, dtype=args.dtype, device=backend).n_weights
        rng = numpy.random.default_rng(args.seed + 1)
        # Two fixed batches on the device: one to train on, one for growth.
        self.batches = [self._batch(rng) for _ in range(2)]

    def _batch(self, rng: numpy.random.Generator) -> tuple[Any, Any]:
        x = rng.random((self.batch, self.sizes[0])).astype(self.args.dtype)
        if self.loss == "cross_entropy":
            y = rng.integers(0, self.sizes[-1], size=self.batch)
        else:
            y = rng.integers(0, 2, size=self.batch).astype(self.args.dtype)
        return self.backend.asarray(x), self.backend.asarray(y)

    def build(self, algorithm: str) -> tuple[Any, Any, Any]:
        model = cupynn.MLP(self.sizes, density=self.args.density, dense_layers=self.dense_layers,
                           seed=self.args.seed, dtype=self.args.dtype, device=self.backend)
        return model, cupynn.Adam(model, lr=self.args.lr), create(algorithm, seed=self.args.seed)


def train_step(model: Any, optimizer: Any, redistributor: Any, x: Any, y: Any,
               loss: str) -> dict[str, float]:
    """The trainer's step (``TrainStep``); seconds of its phases but observe, of observe,
    and of the whole step."""
    phases = TrainStep(model, optimizer, loss, redistributor=redistributor).timed(
        x, y, check=False)
    observe = phases.get("observe", 0.0)
    return {"train": phases["step"] - observe, "observe": observe, "step": phases["step"]}


def redistribution_round(setting: Setting, model: Any, optimizer: Any, redistributor: Any,
                         ) -> dict[str, float]:
    """start_epoch, training steps with observe, one redistribution; seconds of the two calls."""
    sync = model.backend.synchronize
    x, y = setting.batches[0]
    sync()
    t0 = time.perf_counter()
    redistributor.start_epoch(model, setting.n_batches, True)
    sync()
    t1 = time.perf_counter()
    for _ in range(setting.args.train_steps):
        train_step(model, optimizer, redistributor, x, y, setting.loss)
    gx, gy = setting.batches[1]
    sync()
    t2 = time.perf_counter()
    redistributor.redistribute(model, optimizer, setting.args.fraction, gx, gy, setting.loss)
    sync()
    t3 = time.perf_counter()
    if model.n_weights != setting.n_weights:
        raise AssertionError(f"{redistributor.name} changed the weight count")
    return {"start_epoch": t1 - t0, "redistribute": t3 - t2}


# ----------------------------------------------------------------- measurements
def time_steps(setting: Setting, algorithms: list[str]) -> dict[str, Any]:
    """Training steps of the static model (no observe) and of one model per algorithm
    (observe after each backward pass), side by side in rotating rounds."""
    args = setting.args
    x, y = setting.batches[0]
    entries: list[tuple[str, Any, Any, Any]] = []
    for name in [None, *algorithms]:
        model, optimizer, redistributor = setting.build(name or "static")
        if name is None:
            redistributor = None
        else:
            redistributor.start_epoch(model, setting.n_batches, True)
        entries.append((name or "(no observe)", model, optimizer, redistributor))
    for _, *entry in entries:
        for _ in range(args.warmup):
            train_step(*entry, x, y, setting.loss)
    samples: list[list[dict[str, float]]] = [[] for _ in entries]
    n = len(entries)
    for r in range(-(-args.steps // args.per_round)):
        for i in [(r + k) % n for k in range(n)]:
            time.sleep(args.pause)
            train_step(*entries[i][1:], x, y, setting.loss)  # untimed: re-warm
            for _ in range(min(args.per_round, args.steps - len(samples[i]))):
                samples[i].append(train_step(*entries[i][1:], x, y, setting.loss))
    out = {name: {k: statistics.median(s[k] for s in runs) for k in ("train", "observe", "step")}
           for (name, *_), runs in zip(entries, samples)}
    for (name, *_), runs in zip(entries, samples):
        out[name]["step_samples"] = [s["step"] for s in runs]
        out[name]["observe_samples"] = [s["observe"] for s in runs]
    del entries
    gc.collect()
    return out


def time_redistributions(setting: Setting, algorithms: list[str]) -> dict[str, Any]:
    """Per algorithm: medians of start_epoch and redistribute seconds over the rounds."""
    args = setting.args
    built = [setting.build(name) for name in algorithms]
    for entry in built:
        for _ in range(args.warmup):
            redistribution_round(setting, *entry)
    samples: list[list[dict[str, float]]] = [[] for _ in built]
    n = len(built)
    for r in range(args.repeats):
        for i in [(r + k) % n for k in range(n)]:
            time.sleep(args.pause)
            samples[i].append(redistribution_round(setting, *built[i]))
    out = {name: {"start_epoch": statistics.median(s["start_epoch"] for s in runs),
                  "redistribute": statistics.median(s["redistribute"] for s in runs),
                  "redistribute_samples": [s["redistribute"] for s in runs]}
           for name, runs in zip(algorithms, samples)}
    del built
    gc.collect()
    return out


def peak_memory(setting: Setting, algorithm: str) -> dict[str, int]:
    """Peak bytes over: build model + Adam, start_epoch, training steps with observe
    (``train``), then one redistribution (``redistribute``, peak of the whole window)."""
    args = setting.args
    x, y = setting.batches[0]
    gx, gy = setting.batches[1]
    gc.collect()
    with MemoryTracker(setting.backend) as tracker:
        model, optimizer, redistributor = setting.build(algorithm)
        redistributor.start_epoch(model, setting.n_batches, True)
        for _ in range(args.train_steps):
            train_step(model, optimizer, redistributor, x, y, setting.loss)
        train_peak = tracker.peak()
        redistributor.redistribute(model, optimizer, args.fraction, gx, gy, setting.loss)
        peak = tracker.peak()
        del model, optimizer, redistributor
    gc.collect()
    return {"train": train_peak, "total": peak}


def synthetic_data(setting: Setting) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Seeded rows of the setting's real shape: KMNIST-like pixels in [0, 1) and 10 classes,
    HIGGS-like standard-normal features and 0/1 labels (53 % signal). The values do not
    change the work a step does."""
    args, spec = setting.args, SETTINGS[setting.name]
    rng = numpy.random.default_rng(args.seed + 3)
    n, features = spec["train_rows"], setting.sizes[0]
    if setting.loss == "cross_entropy":
        x = rng.random((n, features), dtype=numpy.float32)
        y = rng.integers(0, setting.sizes[-1], size=n)
    else:
        x = rng.standard_normal((n, features), dtype=numpy.float32)
        y = (rng.random(n) < 0.53).astype(args.dtype)
    return x.astype(args.dtype, copy=False), y


def whole_epoch(setting: Setting, algorithm: str | None, data: tuple[Any, Any],
                augment: Any) -> dict[str, float]:
    """Epoch 2 of an 80-epoch cupynn.fit run, wall clock from the end of epoch 1 to the end
    of epoch 2: the permutation, every batch (with observe), the redistribution and its
    induced loss. ``algorithm`` None trains the static model without a redistributor."""
    model, optimizer, _ = setting.build("static")
    marks: list[tuple[float, dict[str, Any]]] = []

    def mark(metrics: dict[str, Any]) -> bool:
        setting.backend.synchronize()
        marks.append((time.perf_counter(), metrics))
        return len(marks) < 2

    args = setting.args
    cupynn.fit(model, optimizer, train=data, epochs=SCHEDULE_EPOCHS, batch_size=setting.batch,
               loss=setting.loss, seed=args.seed, progress=False, augment=augment,
               redistribution=None if algorithm is None else create(algorithm, seed=args.seed),
               on_epoch_end=mark)
    (t1, _), (t2, metrics) = marks
    return {"epoch": t2 - t1, "train": metrics["train_seconds"],
            "redistribution": metrics["redistribution_seconds"],
            "fraction": metrics.get("fraction", 0.0)}


def time_epochs(setting: Setting, algorithms: list[str]) -> dict[str, Any]:
    """``--epochs`` pairs per algorithm: an epoch of the static model without a
    redistributor and one of the algorithm's, back to back (which goes first
    alternates), the algorithms in rotating order; per algorithm the median epoch and
    the median of its pairs' ratios."""
    args = setting.args
    data = synthetic_data(setting)
    augment = None
    if args.augment and setting.loss == "cross_entropy":
        from cupynn.data import RandomAffine

        augment = RandomAffine(image_shape=(28, 28))
    small = tuple(a[:2 * setting.batch] for a in data)
    for name in [None, *algorithms]:  # JIT, caches, first-touch pages
        whole_epoch(setting, name, small, augment)
    base: list[dict[str, float]] = []
    runs: dict[str, list[dict[str, float]]] = {a: [] for a in algorithms}
    ratios: dict[str, list[float]] = {a: [] for a in algorithms}
    n = len(algorithms)
    for r in range(args.epochs):
        for i in [(r + k) % n for k in range(n)]:
            a = algorithms[i]
            pair = {}
            for name in ([None, a] if (r + i) % 2 == 0 else [a, None]):
                time.sleep(args.pause)
                pair[name] = whole_epoch(setting, name, data, augment)
            base.append(pair[None])
            runs[a].append(pair[a])
            ratios[a].append(pair[a]["epoch"] / pair[None]["epoch"] - 1)
    out = {}
    for name, samples, shares in [("(none)", base, [0.0]), *((a, runs[a], ratios[a])
                                                            for a in algorithms)]:
        out[name] = {**{k: statistics.median(s[k] for s in samples)
                        for k in ("epoch", "train", "redistribution")},
                     "fraction": samples[0]["fraction"], "overhead": statistics.median(shares),
                     "epoch_samples": [s["epoch"] for s in samples],
                     "overhead_samples": shares}
    del data
    gc.collect()
    return out


# ----------------------------------------------------------------- report
def run(args: argparse.Namespace) -> dict[str, Any]:
    backend = cupynn.get_backend(args.device)
    kernels.warm_up(backend, args.dtype)
    info = machine_info(backend)
    load_before = load_average()
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    static_steps: dict[str, list[float]] = {}  # the static model's step samples, ms
    epoch_rows: list[dict[str, Any]] = []
    fisher_rows: list[dict[str, Any]] = []
    for name in args.settings:
        setting = Setting(name, args, backend)
        steps = time_steps(setting, args.algorithms)
        redist = time_redistributions(setting, args.algorithms)
        names = ["static", *[a for a in args.algorithms if a != "static"]]
        peaks = ({} if args.no_memory else {a: peak_memory(setting, a) for a in names})
        static_step = steps["(no observe)"]["step"]
        epoch = setting.n_batches * static_step
        for a in args.algorithms:
            overhead = (redist[a]["start_epoch"] + redist[a]["redistribute"]
                        + setting.n_batches * steps[a]["observe"])
            peak = peaks.get(a)
            rows.append({
                "setting": name,
                "sizes": "-".join(map(str, setting.sizes)),
                "batch": setting.batch,
                "density": args.density,
                "n_weights": setting.n_weights,
                "algorithm": a,
                "n_batches": setting.n_batches,
                "static_step_ms": 1e3 * static_step,
                "epoch_s": epoch,
                "step_ms": 1e3 * steps[a]["step"],
                "step_vs_static": steps[a]["step"] / static_step,
                "observe_ms": 1e3 * steps[a]["observe"],
                "start_epoch_ms": 1e3 * redist[a]["start_epoch"],
                "redistribute_ms": 1e3 * redist[a]["redistribute"],
                "overhead_s": overhead,
                "overhead_share": overhead / epoch,
                "peak_train_mib": None if peak is None else peak["train"] / 2**20,
                "peak_mib": None if peak is None else peak["total"] / 2**20,
                "peak_vs_static": (None if peak is None
                                   else peak["total"] / peaks["static"]["total"]),
                "step_ms_samples": [1e3 * s for s in steps[a]["step_samples"]],
                "observe_ms_samples": [1e3 * s for s in steps[a]["observe_samples"]],
                "redistribute_ms_samples": [1e3 * s for s in redist[a]["redistribute_samples"]],
            })
        for a in (a for a in args.algorithms if a in ("woodfisher", "woodtaylor")):
            for m in args.fisher_batches:
                # The blocks, the redistribution and one update cost the same with fewer
                # batches; only the number of updates per epoch changes.
                used = min(m, setting.n_batches)
                overhead = (redist[a]["start_epoch"] + redist[a]["redistribute"]
                            + used * steps[a]["observe"])
                fisher_rows.append({"setting": name, "sizes": "-".join(map(str, setting.sizes)),
                                    "algorithm": a, "fisher_batches": m, "updates": used,
                                    "n_batches": setting.n_batches, "overhead_s": overhead,
                                    "overhead_share": overhead / epoch})
        static_steps[name] = [1e3 * s for s in steps["(no observe)"]["step_samples"]]
        if args.epochs and name in PAPER_SETTINGS:
            epochs = time_epochs(setting, args.algorithms)
            for a, e in epochs.items():
                epoch_rows.append({
                    "setting": name, "sizes": "-".join(map(str, setting.sizes)),
                    "batch": setting.batch, "n_batches": setting.n_batches,
                    "augment": bool(args.augment and setting.loss == "cross_entropy"),
                    "algorithm": a, "epoch_s": e["epoch"], "train_s": e["train"],
                    "redistribution_s": e["redistribution"], "fraction": e["fraction"],
                    "overhead_share": e["overhead"],
                    "epoch_s_samples": e["epoch_samples"],
                    "overhead_samples": e["overhead_samples"]})
        del setting
        gc.collect()
    finish_info(info, load_before)
    return {
        "machine": info,
        "settings": {"density": args.density, "fraction": args.fraction, "steps": args.steps,
                     "per_round": args.per_round, "repeats": args.repeats,
                     "train_steps": args.train_steps, "warmup": args.warmup,
                     "pause": args.pause, "dtype": args.dtype, "lr": args.lr, "seed": args.seed,
                     "epochs": args.epochs, "augment": args.augment,
                     "fisher_batches": args.fisher_batches,
                     "wall_seconds": round(time.perf_counter() - start, 1),
                     "command": " ".join(["python", *sys.argv])},
        "results": rows,
        "static_step_ms_samples": static_steps,
        "epochs": epoch_rows,
        "targets": targets(rows, epoch_rows),
        "fisher_batches": fisher_rows,
    }


def targets(rows: list[dict[str, Any]],
            epoch_rows: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """The issue's targets, checked on the rows measured (those present)."""
    out = []
    for r in rows:
        if r["setting"] in PAPER_SETTINGS and r["algorithm"] != "static":
            out.append({"setting": r["setting"], "algorithm": r["algorithm"],
                        "target": f"overhead <= {TIME_TARGET:.0%} of a static epoch",
                        "measured": r["overhead_share"],
                        "met": r["overhead_share"] <= TIME_TARGET})
        if (r["setting"] == MEMORY_TARGET_SETTING and r["algorithm"] != "static"
                and r["peak_vs_static"] is not None):
            limit = MEMORY_TARGETS.get(r["algorithm"], MEMORY_TARGET_OTHERS)
            out.append({"setting": r["setting"], "algorithm": r["algorithm"],
                        "target": f"peak <= {limit:g} x static", "measured": r["peak_vs_static"],
                        "met": r["peak_vs_static"] <= limit})
    for r in epoch_rows:
        if r["algorithm"] not in ("(none)", "static"):
            out.append({"setting": r["setting"], "algorithm": r["algorithm"],
                        "target": f"whole epoch <= {1 + TIME_TARGET:g} x static epoch",
                        "measured": r["overhead_share"],
                        "met": r["overhead_share"] <= TIME_TARGET})
    return out


def _grouped(rows: list[dict[str, Any]], header: str, group: Callable[[dict[str, Any]], str],
             line: Callable[[dict[str, Any]], str]) -> list[str]:
    """A table: the header, a rule, then each setting's first line and its rows' lines."""
    out, last = [header, "-" * len(header)], None
    for r in rows:
        if r["setting"] != last:
            last = r["setting"]
            out.append(group(r))
        out.append(line(r))
    return out


def _epoch_share(row: dict[str, Any]) -> str:
    return "-" if row["algorithm"] == "(none)" else f"{100 * row['overhead_share']:+.2f}"


def format_report(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        *header_lines(m),
        f"settings: density {s['density']}, fraction {s['fraction']}, {s['dtype']}; steps: median "
        f"of {s['steps']} (rounds of 1 untimed + {s['per_round']} per model); redistributions: "
        f"median of {s['repeats']}, each after start_epoch + {s['train_steps']} observed steps; "
        f"{s['warmup']} warm-up; {s['pause']} s pause between models",
        *load_and_env_lines(m, s["wall_seconds"]),
        "",
        "epoch = n_batches x the static model's median step (extrapolated, not run); "
        "overhead = start_epoch + redistribute + n_batches x observe",
        "",
    ]
    header = (f"{'network':<22} {'algorithm':<15} {'step ms':>8} {'step/st':>7} "
              f"{'observe ms':>10} {'redist ms':>9} {'start ms':>8} {'overhead s':>10} "
              f"{'% epoch':>7} {'peak MiB':>8} {'mem/st':>6}")
    lines += _grouped(
        report["results"], header,
        lambda r: (f"{r['setting']}: {r['sizes']}, batch {r['batch']}, {r['n_weights']:,} "
                   f"weights, {r['n_batches']} batches/epoch, static step "
                   f"{r['static_step_ms']:.2f} ms, epoch {r['epoch_s']:.2f} s"),
        lambda r: (f"{'':<22} {r['algorithm']:<15} {r['step_ms']:>8.2f} "
                   f"{r['step_vs_static']:>7.3f} {r['observe_ms']:>10.3f} "
                   f"{r['redistribute_ms']:>9.1f} {r['start_epoch_ms']:>8.2f} "
                   f"{r['overhead_s']:>10.3f} {100 * r['overhead_share']:>7.2f} "
                   f"{fmt(r['peak_mib'], '.1f'):>8} {fmt(r['peak_vs_static'], '.2f'):>6}"))
    if report.get("epochs"):
        lines += ["", f"whole epochs through cupynn.fit: epoch 2 of {SCHEDULE_EPOCHS}, wall clock "
                      f"(batches with observe, redistribution, induced loss); synthetic data of the "
                      f"real shapes; {s['epochs']} pairs per algorithm: its epoch and one of the "
                      f"static model without a redistributor, back to back; + % = median of the "
                      f"pairs' ratios - 1", ""]
        header = (f"{'network':<22} {'algorithm':<15} {'epoch s':>8} {'train s':>8} "
                  f"{'redist s':>8} {'fraction':>8} {'+ %':>7}")
        lines += _grouped(
            report["epochs"], header,
            lambda r: (f"{r['setting']}: {r['sizes']}, batch {r['batch']}, {r['n_batches']} "
                       f"batches, augmentation {'on' if r['augment'] else 'off'}"),
            lambda r: (f"{'':<22} {r['algorithm']:<15} {r['epoch_s']:>8.3f} {r['train_s']:>8.3f} "
                       f"{r['redistribution_s']:>8.4f} {r['fraction']:>8.3f} "
                       f"{_epoch_share(r):>7}"))
    if report.get("fisher_batches"):
        lines += ["", "woodfisher/woodtaylor with the Fisher from the epoch's last M batches "
                      "(fisher_batches=M): overhead = start_epoch + redistribute + min(M, "
                      "n_batches) x observe, from the measurements above", ""]
        header = f"{'network':<22} {'algorithm':<15} {'M':>6} {'updates':>8} {'overhead s':>10} " \
                 f"{'% epoch':>7}"
        lines += _grouped(
            report["fisher_batches"], header,
            lambda r: f"{r['setting']}: {r['sizes']}, {r['n_batches']} batches/epoch",
            lambda r: (f"{'':<22} {r['algorithm']:<15} {r['fisher_batches']:>6} "
                       f"{r['updates']:>8} {r['overhead_s']:>10.3f} "
                       f"{100 * r['overhead_share']:>7.2f}"))
    if report["targets"]:
        lines += ["", "targets:"]
        for t in report["targets"]:
            value = (f"{100 * t['measured']:.2f} %" if "epoch" in t["target"]
                     else f"{t['measured']:.2f} x")
            if t["target"].startswith("whole epoch"):
                value = f"{100 * t['measured']:+.2f} %"
            lines.append(f"  {t['setting']:<12} {t['algorithm']:<15} {t['target']:<34} "
                         f"{value:>9}  {'met' if t['met'] else 'MISSED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    return publish(report, format_report(report), args.json)


if __name__ == "__main__":
    sys.exit(main())

"""A program that tests/test_distributed.py runs under ``mpiexec -n R`` (not a test module).

``python tests/mpi_worker.py train OUT [DEVICE [NAME ...]]`` trains every configuration of
:func:`configs` with the MPI communicator and, on rank 0, writes each final
model and history to ``OUT/<name>.npz`` / ``.json``; the test compares them
with one-process runs. Every rank checks that all ranks ended with the same
history. ``fault`` and ``mismatch`` modes make one rank fail or disagree.
``script kmnist|higgs ARGS...`` runs a training script's code with ARGS;
``script-interrupt`` does the same with a Ctrl-C on the first rank during
epoch 3 (``script-interrupt-last``: on the last rank), ``script-kill`` with a SIGKILL of the last rank during epoch 3,
``script-slow`` with epochs of at least 0.3 s (time for a Ctrl-C from outside),
``script-differ`` with ``--density 0.2`` added on the last rank, ``script-slow-load``
with a small made-up data set in place of the experiment's files, whose loading takes
every rank but the first 5 s (run it with a collective timeout shorter than that).

Faults (tests/test_mpi_faults.py), each run by every rank: ``raise-before-fit``,
``bad-width`` (the last rank's inputs one column short; the error that ``fit``
raises is caught by the user's code), ``raise-between-epochs``
(the last rank raises in its own loop around ``fit``), ``never-fit SECONDS`` (the
last rank leaves without calling fit; the others' timeout is SECONDS), ``different-calls``
(the last rank calls allgather where the others call barrier). ``sample-weight`` (every
rank asks ``fit`` for sample weights, which data-parallel training refuses; each catches
the error and says so) is no fault: the job must end normally.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy

import cupynn
from cupynn import distributed
from cupynn.redistribution import NAMES

EPOCHS = 5  # the schedule's length: epochs 1-3 redistribute (E_end = 3.75); 3 are run
RUN_EPOCHS = 3
BATCH = 48


def data(binary: bool = False, rows: int = 241, features: int = 16):
    """Seeded data; 241 rows at batch 48 end in a batch of one row (empty shards)."""
    rng = numpy.random.default_rng(7)
    x = rng.standard_normal((rows, features))
    w = rng.standard_normal((features, 4))
    y = (x @ w).argmax(axis=1)
    if binary:
        y = (y % 2).astype(numpy.float64)
    test = rng.standard_normal((57, features))
    yt = (test @ w).argmax(axis=1)
    return (x, y), (test, (yt % 2).astype(numpy.float64) if binary else yt)


class Sampler:
    """An epoch sampler that can draw rows and copy chosen ones, as HiggsData does."""

    def __init__(self, x, y, per_epoch: int, fail_rank: int | None = None) -> None:
        self.x_train, self.y_train, self.train_samples = x, y, per_epoch
        self.fail_rank, self.calls = fail_rank, 0

    def epoch_rows(self, rng):
        return rng.choice(len(self.y_train), self.train_samples, replace=False)

    def take(self, rows):
        self.calls += 1
        if self.fail_rank is not None and self.calls == 3 \
                and distributed.init().rank == self.fail_rank:
            raise FileNotFoundError("rank-specific failure: this rank lost its copy of the data")
        return self.x_train[rows], self.y_train[rows]

    def sample_epoch(self, rng):
        return self.take(self.epoch_rows(rng))


def configs():
    """name -> keyword arguments of :func:`run`."""
    out = {name: dict(algorithm=name) for name in NAMES}
    out["dense"] = dict(algorithm=None, dense=True)
    out["binary-gradient-global"] = dict(algorithm="gradient-global", binary=True)
    out["sampler-woodtaylor"] = dict(algorithm="woodtaylor", sampler=True)
    out["augment-random"] = dict(algorithm="random", augment=True)
    out["mest+momentum"] = dict(algorithm="mest+momentum")
    out["set+random-global-steps"] = dict(algorithm="set+random/global", unit="step")
    return out


def run(comm, algorithm=None, dense=False, binary=False, sampler=False, augment=False,
        lr=2e-2, fail_rank=None, device="cpu", unit="epoch"):
    """One training run; returns (model, history)."""
    train, test = data(binary)
    sizes = [16, 24, 24, 1 if binary else 4]
    model = cupynn.MLP(sizes, density=1.0 if dense else 0.3,
                       dense_layers=(0, 1, 2) if dense else ((-1,) if binary else ()),
                       seed=3, dtype="float64", device=device)
    if sampler:
        train = Sampler(*train, per_epoch=200, fail_rank=fail_rank)
    transform = None
    if augment:
        from cupynn.data import RandomAffine

        transform = RandomAffine(rotation=20, translation=1, image_shape=(4, 4))
    history = cupynn.fit(model, cupynn.Adam(model, lr=lr), train, test, epochs=EPOCHS,
                         batch_size=BATCH, seed=11, progress=False, redistribution=algorithm,
                         growth_batches=2, augment=transform, redistribute_unit=unit,
                         redistribute_every=3 if unit == "step" else 1,
                         loss="binary_cross_entropy" if binary else "cross_entropy",
                         on_epoch_end=lambda m: m["epoch"] < RUN_EPOCHS, comm=comm)
    return model, history


def comparable(history):
    """The history without wall-clock fields (these are the slowest rank's, not a one-process
    run's)."""
    return [{k: v for k, v in h.items() if not k.endswith("seconds")} for h in history]


HISTORY_KEYS = ("train_loss", "test_loss", "test_accuracy", "test_auc", "induced_loss_before",
                "induced_loss_after")


def compare(out: Path, name: str, device: str = "cpu") -> dict:
    """How the model and history that ``train`` wrote for ``name`` differ from a one-process
    run's: topology equal, largest weight difference over the largest weight, largest
    relative difference of the history's losses and accuracies, and what else must match."""
    model, history = run(distributed.SingleProcess(), device=device, **configs()[name])
    reference = model.state_dict()
    got = dict(numpy.load(out / f"{name}.npz"))
    meta = json.loads((out / f"{name}.json").read_text())
    pattern = [k for k in reference if k.endswith(("indptr", "indices"))]
    topology = sorted(got) == sorted(reference) and all(
        numpy.array_equal(got[k], reference[k]) for k in pattern)
    values = [k for k in reference if k not in pattern]
    scale = max(float(numpy.abs(reference[k]).max()) for k in values)
    weights = (max(float(numpy.abs(got[k] - reference[k]).max()) for k in values) / scale
               if topology else float("inf"))
    mine = comparable(history)
    losses = max((abs(b[key] - a[key]) / max(abs(a[key]), 1e-12)
                  for a, b in zip(mine, meta["history"]) for key in HISTORY_KEYS if key in a),
                 default=0.0)
    def moves(h):  # every redistribution of an epoch: after it, or every t steps within it
        counts = [h["redistribution"]] if "redistribution" in h else []
        return counts + [m["redistribution"] for m in h.get("redistributions", [])]

    same_moves = all(moves(a) == moves(b) and a["nnz"] == b["nnz"]
                     for a, b in zip(mine, meta["history"]))
    moved = [sum(r["added"] for counts in moves(h) for r in counts) for h in mine if moves(h)]
    return {"ranks": meta["ranks"], "histories_equal": meta["histories_equal"],
            "epochs": (len(mine), len(meta["history"])), "topology_equal": topology,
            "weight_rel_diff": weights, "history_rel_diff": losses, "same_moves": same_moves,
            "moved": moved}


def fault() -> None:
    """Say when the fault happens (the test measures how long the job takes to end)."""
    import time

    print(f"fault at {time.time():.3f}", file=sys.stderr, flush=True)


def faulty_script(mode: str, args: list[str]) -> list[str]:
    """Patch the trainer for a ``script-*`` mode; returns the arguments of this rank."""
    import os
    import signal
    import time

    from cupynn.training import Trainer

    comm = distributed.init()
    last = comm.rank == comm.size - 1
    epoch_of, step_of = Trainer.train_epoch, Trainer.train_batch
    if mode in ("script-interrupt", "script-interrupt-last"):
        def interrupted(self, epoch):
            if epoch == 3 and (last if mode.endswith("last") else self.comm.is_root):
                raise KeyboardInterrupt
            return epoch_of(self, epoch)

        Trainer.train_epoch = interrupted
    elif mode == "script-kill":
        def killed(self, *args, **kwargs):
            self._steps = getattr(self, "_steps", 0) + (self.epoch == 2)
            if last and self._steps == 3:  # the third step of epoch 3
                fault()
                os.kill(os.getpid(), signal.SIGKILL)
            return step_of(self, *args, **kwargs)

        Trainer.train_batch = killed
    elif mode == "script-slow":
        def slow(self, epoch):
            time.sleep(0.3)
            return epoch_of(self, epoch)

        Trainer.train_epoch = slow
    elif mode == "script-differ" and last:
        args = args + ["--density", "0.2"]
    return args


SLOW_LOAD = 5.0  # seconds that every rank but the first takes to load (script-slow-load)


def slow_load(args):
    """An experiment's ``load``: made-up HIGGS-shaped rows; slow on every rank but the first
    (as with --no-cache, where each rank parses the files itself after the first). Every
    rank first does the script's one-time work (compiling the kernels), so that the first
    rank reaches its next collective at once, however long compiling takes."""
    import time

    from sklearn.metrics import roc_auc_score

    from cupynn.backend import get_backend
    from cupynn.kernels import warm_up

    warm_up(get_backend(args.device), args.dtype)
    roc_auc_score([0, 1], [0.2, 0.8])
    if not distributed.init().is_root:
        time.sleep(SLOW_LOAD)
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((256, 21))
    y = (x[:, 0] > 0).astype(numpy.float64)
    return (x, y), (x[:64], y[:64]), "made-up rows", []


def faults(mode: str, argv: list[str]) -> int:
    """A user's program in which the last rank fails (see the module doc)."""
    comm = (distributed.init(timeout=float(argv[3])) if mode == "never-fit"
            else distributed.init())
    last = comm.rank == comm.size - 1
    (x, y), test = data()
    if mode == "raise-before-fit" and last:
        fault()
        raise OSError("user code: this rank could not read its data")
    if mode == "bad-width" and last:
        fault()
        x = x[:, :-1]
    if mode == "never-fit" and last:
        fault()
        return 0
    if mode == "different-calls":  # the last rank takes another code path
        fault()
        return comm.allgather(1) if last else comm.barrier()
    model = cupynn.MLP([16, 24, 4], density=0.3, seed=3, dtype="float64", device="cpu")
    optimizer = cupynn.Adam(model)
    if mode == "sample-weight":  # refused alike on every rank: each one catches it
        try:
            cupynn.fit(model, optimizer, (x, y), test, epochs=1, batch_size=BATCH,
                       progress=False, comm=comm, sample_weight=numpy.ones(len(y)))
        except ValueError as exc:
            print(f"rank {comm.rank} caught {type(exc).__name__}: {exc}", flush=True)
        comm.barrier()  # the ranks go on together, as a program that handles it would
        return 0
    try:
        for epoch in range(3):
            cupynn.fit(model, optimizer, (x, y), test, epochs=1, batch_size=BATCH, seed=epoch,
                       progress=False, comm=comm)
            if mode == "raise-between-epochs" and last and epoch == 1:
                fault()
                raise RuntimeError("user code: failed between epochs")
    except ValueError as exc:  # bad-width: the user's code carries on alone, as if all was well
        print(f"user code: caught {exc}", flush=True)
    return 0


def main(argv):
    mode = argv[1]
    if mode.startswith("script"):
        from cupynn.paper.experiments import HIGGS, KMNIST, run as run_script

        import dataclasses

        experiment = {"kmnist": KMNIST, "higgs": HIGGS}[argv[2]]
        if mode == "script-slow-load":
            experiment = dataclasses.replace(experiment, load=slow_load)
        return run_script(experiment, faulty_script(mode, argv[3:]))
    if mode in ("raise-before-fit", "bad-width", "raise-between-epochs", "never-fit",
                "different-calls", "sample-weight"):
        return faults(mode, argv)
    out = Path(argv[2])
    comm = distributed.init()
    assert comm.size > 1, "run me under mpiexec -n 2 or more"
    if mode == "train":  # train OUT [DEVICE [NAME ...]]
        device = argv[3] if len(argv) > 3 else "cpu"
        names = argv[4:] or list(configs())
        for name in names:
            model, history = run(comm, device=device, **configs()[name])
            histories = comm.allgather(json.dumps(history, sort_keys=True, default=str))
            if comm.is_root:
                numpy.savez(out / f"{name}.npz", **model.state_dict())
                (out / f"{name}.json").write_text(json.dumps({
                    "history": comparable(history), "ranks": comm.size,
                    "histories_equal": len(set(histories)) == 1}, default=str))
    elif mode == "fault":
        run(comm, algorithm="random", sampler=True, fail_rank=comm.size - 1)
    elif mode == "mismatch":
        run(comm, algorithm="random", lr=2e-2 if comm.rank == 0 else 3e-2)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""The paper's experiments as library code; ``scripts/`` only parse arguments.

A run trains one model (a sparse MLP with one redistribution algorithm, or a
dense baseline) and writes to its output directory:

- ``config.json`` — every setting, library versions, backend and device, the
  dataset actually used and any notice about it;
- ``metrics.jsonl`` — one JSON object per epoch (train/test loss, accuracy,
  AUC for HIGGS, seconds of training and redistribution, peak memory, nnz
  per layer, and for epochs that redistributed the fraction moved and the
  induced loss before/after);
- ``checkpoint.npz`` — every ``checkpoint_every`` epochs (see
  :mod:`cupynn.checkpoint`), from which ``--resume`` continues exactly;
- ``summary.json`` — the final state: completed, interrupted or failed;
- ``model.npz`` — the trained model (:func:`cupynn.save`), when completed.

A run never writes into a directory that holds another run's files unless
told to (``overwrite``).

Under an MPI launcher (``mpiexec -n 4 python scripts/train_higgs.py ...``) the
run is data-parallel (:mod:`cupynn.distributed`): the first rank loads the
data first (so that it alone parses and caches it) and the others after it;
only the first rank checks and writes the output directory, shows progress
and writes the files above (``config.json`` records the number of ranks), and
reads a checkpoint to resume, which it sends to the others; since every rank
holds the same state, a run checkpointed on R ranks resumes on any number. An
error on any rank ends every rank with its message.

The scripts' command line (the parser and its checks) is in :mod:`cupynn.paper.arguments`,
the output directory's files in :mod:`cupynn.paper.run_dir`; this module runs an
experiment and defines the two (KMNIST, HIGGS).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..backend import get_backend
from ..cli import DEBUG_FLAG, UserError, run_main
from ..distributed import RanksDisagree
from ..checkpoint import restore_checkpoint, save_checkpoint
from ..memory import MemoryTracker
from ..model import MLP
from ..optim import Adam
from ..training import Trainer
from ..redistribution import create
from .arguments import _parameters_of, _resumed_settings, build_parser, check_arguments
from .run_dir import (MODEL_FILE, _json_default, _kept, _prepare_output, _read_run,
                      _write_json, versions)
# Importable from here as before the split (cupynn.paper.experiments held them).
from .arguments import BASELINES, HelpFormatter  # noqa: F401
from .run_dir import RESULT_FILES  # noqa: F401


@dataclass
class Experiment:
    """What a script contributes: its data, architecture and loss.

    ``load(args)`` returns the training source ((x, y) or a sampler), the
    test pair, the dataset's name and notices; ``sizes(args)`` the layer sizes;
    ``checks(args)`` the (ok, message) range checks of the script's own
    arguments, made with the others before any data loads.
    """

    name: str
    loss: str
    dense_layers: tuple[int, ...]
    defaults: dict[str, Any]
    load: Callable[[argparse.Namespace], tuple[Any, Any, str, list[str]]]
    sizes: Callable[[argparse.Namespace], list[int]]
    augment: Callable[[argparse.Namespace], Any] = lambda args: None
    extra_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    checks: Callable[[argparse.Namespace], list[tuple[bool, str]]] = lambda args: []
    describe: str = ""
    extra_config: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ baselines
def sparse_weight_count(sizes: list[int], density: float, dense_layers: tuple[int, ...]) -> int:
    """Weights of the sparse model (without biases), computed as cupynn builds it."""
    from ..init import inputs_per_neuron

    n_layers = len(sizes) - 1
    dense = {i % n_layers for i in dense_layers}
    return sum(fan_in * fan_out if i in dense else fan_out * inputs_per_neuron(density, fan_in)
               for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])))


def parameter_equivalent_width(sizes: list[int], density: float,
                               dense_layers: tuple[int, ...]) -> int:
    """The smallest equal hidden width whose dense weight count is at least the
    sparse model's (SPEC §5): 33 for 784-256-256-10 and 79 for
    21-256-256-256-1 (dense output) at density 0.1."""
    target = sparse_weight_count(sizes, density, dense_layers)
    n_hidden = len(sizes) - 2

    def dense_count(h: int) -> int:
        return sizes[0] * h + (n_hidden - 1) * h * h + h * sizes[-1]

    width = 1
    while dense_count(width) < target:
        width += 1
    return width


# ------------------------------------------------------------------ run
def run(experiment: Experiment, argv: list[str] | None = None) -> int:
    """Parse ``argv``, train, write the results; return the exit status.

    A mistake in the input (:class:`cupynn.cli.UserError`) is one paragraph on
    stderr and status 2 (``--debug``: its traceback). Under an MPI launcher
    every rank runs this (see the module doc); an error on any rank aborts
    them all."""
    from ..distributed import init

    prog = f"train_{experiment.name}.py"

    def main(args: list[str]) -> int:
        comm = init()
        with comm.guard():
            try:
                return _run(experiment, args, comm)
            except RanksDisagree as exc:  # raised on every rank alike: the first one says it
                if DEBUG_FLAG in args:
                    raise
                if comm.is_root:
                    print(f"{prog}: error: {exc}", file=sys.stderr)
                return 2
            except UserError as exc:
                if comm.size == 1 or DEBUG_FLAG in args:
                    raise
                raise SystemExit(f"{prog}: error: {exc}") from None  # every rank ends, status 2

    return run_main(main, argv, prog)


# Arguments that may differ between the ranks of one run (a node-local copy of the data:
# the data's fingerprint is compared before training).
_RANK_OWN = ("data_dir", "quiet", "debug")


def _first_then_others(comm: Any, work: Callable[[], Any]) -> Any:
    """``work()`` on the first rank, then on the others (a shared cache is written once).

    Neither wait has a limit: the others wait for the first rank's ``work()`` (HIGGS:
    minutes), then the first rank waits for the others' (from the cache; with
    ``--no-cache`` each parses the files itself, as long again), so that no rank meets
    its next collective's timeout while another still loads."""
    if comm.is_root:
        result = work()
    comm.barrier(timeout=math.inf)  # as long as the first rank loads
    if not comm.is_root:
        result = work()
    comm.barrier(timeout=math.inf)  # as long as the slowest of the others loads
    return result


def _run(experiment: Experiment, argv: list[str] | None, comm: Any) -> int:
    parser = build_parser(experiment)
    args = parser.parse_args(argv)
    root = comm.is_root
    comm.check_same("command-line arguments", {
        f"--{k.replace('_', '-')}": v for k, v in vars(args).items() if k not in _RANK_OWN})
    try:  # the arguments agree: every rank fails alike, and the first one says why
        with contextlib.redirect_stderr(io.StringIO()) if not root else contextlib.nullcontext():
            check_arguments(parser, args, experiment)
    except SystemExit as exc:
        if comm.size == 1:
            raise
        return exc.code
    out = comm.bcast(_prepare_output(args, experiment) if root else None)
    checkpoint = None
    if args.resume is not None:
        saved, checkpoint = comm.bcast(_read_run(out) if root else None)
        _resumed_settings(parser, args, out, saved)
    if not root:
        args.quiet = True  # one progress display: the first rank's

    try:
        backend = get_backend(args.device)
    except RuntimeError as exc:
        raise UserError(f"--device {args.device}: {exc}") from None

    def load() -> Any:
        try:
            return experiment.load(args)
        except (FileNotFoundError, ValueError) as exc:
            where = (f" (--data-dir {args.data_dir})" if args.data_dir is not None else
                     " (pass --data-dir with the folder that holds the files)")
            raise UserError(f"the {experiment.name} data could not be loaded{where}: "
                            f"{exc}") from None

    train, test, dataset, notes = _first_then_others(comm, load)
    for note in (notes if root else []):
        print(f"note: {note}", file=sys.stderr)
    sizes = experiment.sizes(args)
    dense_layers = experiment.dense_layers
    if args.baseline is not None:
        if args.baseline == "parameter":
            width = parameter_equivalent_width(sizes, args.density, dense_layers)
            sizes = [sizes[0]] + [width] * (len(sizes) - 2) + [sizes[-1]]
        dense_layers = tuple(range(len(sizes) - 1))
    # One-time work (kernel loading, lazy imports) before memory is tracked.
    from sklearn.metrics import roc_auc_score
    from tqdm.auto import tqdm  # noqa: F401

    from ..kernels import warm_up

    warm_up(backend, args.dtype)
    roc_auc_score([0, 1], [0.2, 0.8])  # sklearn imports more on its first call
    memory = MemoryTracker(backend).start()
    model = MLP(sizes, density=1.0 if args.baseline else args.density, dense_layers=dense_layers,
                seed=args.seed, dtype=args.dtype, device=backend, allocation=args.allocation)
    optimizer = Adam(model, lr=args.lr)
    redistribution = None
    if args.baseline is None:
        values = {"block_size": args.block_size, "damp": args.damp, "joint": args.joint,
                  "fisher_batches": args.fisher_batches, "mest_lambda": args.mest_lambda}
        params = {k: v for k, v in values.items()
                  if k in _parameters_of(args.algorithm) and v is not None}
        redistribution = create(args.algorithm, seed=args.seed, **params)

    metrics_path = out / "metrics.jsonl"

    def on_epoch_end(metrics: dict[str, Any]) -> None:
        if not root:
            return
        with open(metrics_path, "a") as f:
            f.write(json.dumps(metrics, default=_json_default) + "\n")
        if args.checkpoint_every and (metrics["epoch"] % args.checkpoint_every == 0
                                      or metrics["epoch"] == args.epochs):
            save_checkpoint(out, trainer)  # written to a temporary file, then renamed

    trainer = Trainer(model, optimizer, train, test, epochs=args.epochs,
                      batch_size=args.batch_size, loss=experiment.loss, seed=args.seed,
                      progress=not args.quiet, redistribution=redistribution, alpha=args.alpha,
                      redistribute_every=args.redistribute_every, end_fraction=args.end_fraction,
                      augment=experiment.augment(args), track_memory=memory,
                      on_epoch_end=on_epoch_end, comm=comm, schedule=args.schedule,
                      redistribute_unit=args.redistribute_unit)
    if checkpoint is not None:
        try:
            restore_checkpoint(checkpoint, trainer)
        except (KeyError, ValueError) as exc:
            raise UserError(f"--resume {out}: its checkpoint does not fit this run's model "
                            f"({exc}). Start a new run with --out.") from None
        if root:
            # Drop lines written after the checkpoint (a crash between the two).
            lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
            metrics_path.write_text("".join(line + "\n" for line in lines[:trainer.epoch]))
            print(f"resuming {out} after epoch {trainer.epoch}", file=sys.stderr)
    elif root:
        config = {
            "experiment": experiment.name,
            "arguments": vars(args),
            "sizes": sizes,
            "dense_layers": list(dense_layers),
            "model": model.config(),
            "n_weights": model.n_weights,
            "n_parameters": model.n_parameters,
            "loss": experiment.loss,
            "dataset": dataset,
            "dataset_notes": notes,
            "backend": backend.name,
            "device": backend.device_name(),
            "ranks": comm.size,
            "versions": versions(backend),
            "command": " ".join(sys.argv),
            **experiment.extra_config,
        }
        _write_json(out / "config.json", config)
        metrics_path.write_text("")

    status, message, code = "completed", "", 0
    comm.barrier()  # the output is ready before any rank trains
    start = time.perf_counter()
    try:
        trainer.run()
    except KeyboardInterrupt:
        status, code = "interrupted", 130
        message = f"interrupted during epoch {trainer.epoch + 1}; {_kept(out)}"
    except FloatingPointError as exc:
        status, code = "failed", 1
        message = f"{exc} {_kept(out)[0].upper()}{_kept(out)[1:]}"
    finally:
        memory.stop()
    if not root:  # after an interrupt the first rank ends the job once it wrote the summary
        return comm.end_interrupted(code) if status == "interrupted" else code
    history = trainer.history
    summary = {"status": status, "message": message, "epochs_completed": trainer.epoch,
               "epochs": args.epochs, "dataset": dataset, "seconds": time.perf_counter() - start,
               "n_weights": model.n_weights}
    if history:
        last = history[-1]
        summary["final"] = {k: last[k] for k in ("train_loss", "test_loss", "test_accuracy",
                                                   "test_auc") if k in last}
        accuracies = [h["test_accuracy"] for h in history if "test_accuracy" in h]
        summary["best_test_accuracy"] = max(accuracies) if accuracies else None
        summary["train_seconds"] = sum(h["train_seconds"] for h in history)
        summary["redistribution_seconds"] = sum(h["redistribution_seconds"] for h in history)
        summary["peak_memory_bytes"] = max(h.get("peak_memory_bytes", 0) for h in history)
    if status == "completed":
        from ..serialization import save

        save(model, out / MODEL_FILE)
        summary["model_file"] = MODEL_FILE
    _write_json(out / "summary.json", summary)
    if message:
        print(f"{status}: {message}", file=sys.stderr)
    final = ", ".join(f"{k} {v:.4f}" for k, v in summary.get("final", {}).items())
    print(f"{status}: {trainer.epoch}/{args.epochs} epochs{', ' + final if final else ''}; "
          f"results in {out}")
    # Interrupted ranks may stand at different collectives: with several, this ends the job.
    return comm.end_interrupted(code) if status == "interrupted" else code


# ------------------------------------------------------------------ KMNIST
def _kmnist_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--train-from-test", type=float, default=None, metavar="FRACTION",
        help="train on this stratified fraction of the official test images, test on the rest "
             "(when the training images are not available)")
    add("--no-download", action="store_true", help="never fetch missing files")
    add("--rotation", type=float, default=10.0, help="augmentation: max rotation in degrees")
    add("--translation", type=float, default=2.0, help="augmentation: max shift in pixels")
    add("--scale", type=float, nargs=2, default=(0.9, 1.1), metavar=("MIN", "MAX"),
        help="augmentation: scale range")
    add("--no-augment", action="store_true", help="train on the images as they are")


def _kmnist_checks(args: argparse.Namespace) -> list[tuple[bool, str]]:
    """What RandomAffine and load_kmnist would refuse, said in the flags' words."""
    low, high = args.scale
    return [
        (args.train_from_test is None or 0 < args.train_from_test < 1,
         "--train-from-test must be in (0, 1), the share of the official test images to train "
         "on"),
        (0 <= args.rotation <= 180, f"--rotation must be in [0, 180] degrees (angles are drawn "
                                    f"from [-ROTATION, ROTATION]). Got {args.rotation:g}"),
        (0 <= args.translation < math.inf, f"--translation must be a finite number of pixels "
                                           f">= 0 (shifts are drawn from [-T, T]). Got "
                                           f"{args.translation:g}"),
        (0 < low <= high < math.inf, f"--scale MIN MAX must have 0 < MIN <= MAX (scales are "
                                     f"drawn from [MIN, MAX]). Got {low:g} {high:g}"),
    ]


def _kmnist_load(args: argparse.Namespace) -> tuple[Any, Any, str, list[str]]:
    from ..data import load_kmnist

    data = load_kmnist(args.data_dir, train_from_test=args.train_from_test, seed=args.seed,
                       download=not args.no_download, progress=not args.quiet,
                       allow_fallback=args.data_dir is None)
    args.n_features, args.image_shape = data.x_train.shape[1], data.image_shape
    return data.train, data.test, data.summary(), list(data.notes)


def _kmnist_augment(args: argparse.Namespace) -> Any:
    if args.no_augment:
        return None
    from ..data import RandomAffine

    return RandomAffine(rotation=args.rotation, translation=args.translation,
                        scale=tuple(args.scale), image_shape=tuple(args.image_shape))


KMNIST = Experiment(
    name="kmnist",
    loss="cross_entropy",
    dense_layers=(),
    defaults={"epochs": 80, "batch_size": 512, "lr": 5e-4, "hidden": 256},
    load=_kmnist_load,
    sizes=lambda args: [args.n_features, args.hidden, args.hidden, 10],
    augment=_kmnist_augment,
    extra_arguments=_kmnist_arguments,
    checks=_kmnist_checks,
    describe="Train a sparse 784-256-256-10 MLP on KMNIST with dynamic redistribution (or a "
             "dense baseline), as in the paper's first experiment.",
)


# ------------------------------------------------------------------ HIGGS
def _higgs_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--train-samples", type=int, default=500_000, help="training rows drawn per epoch")
    add("--val-samples", type=int, default=100_000, help="fixed validation rows")
    add("--no-cache", action="store_true", help="do not read or write the parsed-data cache")


def _higgs_checks(args: argparse.Namespace) -> list[tuple[bool, str]]:
    return [(args.train_samples >= 1, "--train-samples must be >= 1"),
            (args.val_samples >= 1, "--val-samples must be >= 1")]


def _higgs_load(args: argparse.Namespace) -> tuple[Any, Any, str, list[str]]:
    from ..data import load_higgs

    data = load_higgs(args.data_dir, seed=args.seed, train_samples=args.train_samples,
                      val_samples=args.val_samples, cache=not args.no_cache,
                      progress=not args.quiet)
    return data, data.val, data.summary(), list(data.notes)


HIGGS = Experiment(
    name="higgs",
    loss="binary_cross_entropy",
    dense_layers=(-1,),
    defaults={"epochs": 80, "batch_size": 128, "lr": 1e-3, "hidden": 256},
    load=_higgs_load,
    sizes=lambda args: [21, args.hidden, args.hidden, args.hidden, 1],
    extra_arguments=_higgs_arguments,
    checks=_higgs_checks,
    describe="Train a sparse 21-256-256-256-1 MLP (dense output layer) on HIGGS with dynamic "
             "redistribution (or a dense baseline), as in the paper's second experiment.",
)

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
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy

from ..backend import get_backend
from ..cli import DEBUG_FLAG, DEBUG_HELP, UserError, run_main
from ..distributed import RanksDisagree
from ..checkpoint import (FILENAME as CHECKPOINT, read_checkpoint, restore_checkpoint,
                         save_checkpoint)
from ..memory import MemoryTracker
from ..model import MLP
from ..optim import Adam
from ..init import ALLOCATIONS
from ..redistribution import NAMES, compositions, create, naming_rule
from ..redistribution.compose import DROP_PARAMS, DROPS, GROW_PARAMS, GROWS, parse_name
from ..redistribution.schedule import SCHEDULES
from ..training import Trainer

BASELINES = ("neuron", "parameter")
MODEL_FILE = "model.npz"
RESULT_FILES = ("config.json", "metrics.jsonl", "summary.json", CHECKPOINT, MODEL_FILE)


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


# ------------------------------------------------------------------ arguments
class HelpFormatter(argparse.HelpFormatter):
    """``--help`` with each option's default said once.

    "(default: X)" is added after the help of an option whose default is a
    value; not after a flag's (off unless given), nor where the default is None
    or the help already says "default" (its help says in words what happens).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or action.nargs == 0 or default is None
                or default is argparse.SUPPRESS or "default" in text):
            return text
        if isinstance(default, (tuple, list)):
            default = " ".join(map(str, default))
        return f"{text} (default: {str(default).replace('%', '%%')})"


def build_parser(experiment: Experiment) -> argparse.ArgumentParser:
    d = experiment.defaults
    parser = argparse.ArgumentParser(description=experiment.describe,
                                     formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--algorithm", type=_algorithm, default="gradient-global", metavar="NAME",
        help=f"redistribution: one of the paper's ({', '.join(NAMES)}; static = fixed "
             f"topology) or a composition '<drop>+<grow>[/<scope>]' such as set+momentum")
    add("--drop", choices=DROPS, default=None,
        help="compose the redistribution: the removal (with --grow; instead of --algorithm)")
    add("--grow", choices=GROWS, default=None, help="compose the redistribution: the growth")
    add("--scope", choices=("layer", "global"), default=None,
        help="compose the redistribution: per-layer counts or network-wide (default: the "
             "growth's own)")
    add("--allocation", choices=ALLOCATIONS, default="uniform",
        help="how --density is shared among the sparse layers (erdos-renyi: SET's / RigL's ERK)")
    add("--schedule", choices=SCHEDULES, default="cosine",
        help="how the fraction moved falls from --alpha")
    add("--redistribute-unit", choices=("epoch", "step"), default="epoch",
        help="--redistribute-every counts epochs or training steps (RigL: every 100 steps)")
    add("--baseline", choices=BASELINES, default=None,
        help="train a dense baseline instead: same sizes (neuron) or the parameter-equivalent "
             "width (parameter)")
    add("--density", type=float, default=0.1,
        help="share of each sparse layer's weights that are active, in (0, 1]")
    add("--epochs", type=int, default=d["epochs"], help="passes over the training data")
    add("--batch-size", type=int, default=d["batch_size"], help="rows per training step")
    add("--lr", type=float, default=d["lr"], help="Adam's learning rate")
    add("--hidden", type=int, default=d["hidden"], help="hidden width")
    add("--block-size", type=int, default=34, help="woodfisher/woodtaylor block size")
    add("--damp", type=float, default=None,
        help="woodfisher/woodtaylor dampening λ (default: 1e-4 woodfisher, 1 woodtaylor)")
    add("--joint", action="store_true", help="exact joint OBS update inside each block")
    add("--fisher-batches", type=int, default=None, metavar="N",
        help="woodfisher/woodtaylor: the Fisher from the last N mini-batches of the epoch "
             "(default: all)")
    add("--mest-lambda", type=float, default=None, metavar="LAMBDA",
        help="mest removal: the weight of |g| in |w| + lambda |g| (default: 0.01)")
    add("--redistribute-every", type=int, default=1, metavar="N",
        help="redistribute after every N-th epoch (or step: --redistribute-unit)")
    add("--alpha", type=float, default=0.5, help="initial fraction moved")
    add("--end-fraction", type=float, default=0.75, help="stop redistributing after this share of epochs")
    add("--seed", type=int, default=0,
        help="seed of everything random: topology, weights, batches, augmentation, "
             "redistribution (same seed, same backend: same bits)")
    add("--device", choices=("auto", "cpu", "gpu"), default=None,
        help="where to train (default: $CUPYNN_DEVICE, else auto: the GPU if one answers)")
    add("--dtype", choices=("float32", "float64"), default="float32",
        help="floating-point type of weights and activations")
    add("--data-dir", type=Path, default=None, metavar="DIR",
        help="folder with the dataset files, an error if they are missing there (default: "
             "search $CUPYNN_DATA/<dataset>, datasets/<dataset>, ../shared/data/<dataset>)")
    add("--out", type=Path, default=None, metavar="DIR",
        help="output directory (default: runs/<name>-<time>)")
    add("--overwrite", action="store_true", help="allow writing into a directory with results")
    add("--checkpoint-every", type=int, default=1, metavar="N",
        help="epochs between checkpoints (0: never)")
    add("--resume", type=Path, default=None, metavar="DIR",
        help="continue the run in this directory, with its own settings")
    add("--quiet", action="store_true", help="no progress bars")
    add(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
    experiment.extra_arguments(parser)
    return parser


def _algorithm(text: str) -> str:
    """argparse type of --algorithm: a preset's name or a valid composition's."""
    if text in NAMES or text in compositions():
        return text
    if "+" in text:
        try:
            return create(text).name
        except (ValueError, TypeError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    raise argparse.ArgumentTypeError(f"{text!r} is none of {', '.join(NAMES)}, and not a "
                                     f"composition. {naming_rule(presets=False)}")


def _parameters_of(algorithm: str) -> set[str]:
    """The script parameters (block_size, damp, ...) that ``algorithm`` takes."""
    if algorithm in ("woodfisher", "woodtaylor"):
        return {"block_size", "damp", "joint", "fisher_batches"}
    if "+" in algorithm:
        drop, grow, _ = parse_name(algorithm)
        return set(DROP_PARAMS.get(drop, {})) | set(GROW_PARAMS.get(grow, {}))
    return set()


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace,
                    experiment: Experiment | None = None) -> None:
    """Range checks that argparse's types cannot express, the script's own
    (``experiment.checks``) included; errors exit with usage, status 2."""
    checks = [
        (0 < args.density <= 1, "--density must be in (0, 1]"),
        (args.epochs >= 1, "--epochs must be >= 1"),
        (args.batch_size >= 1, "--batch-size must be >= 1"),
        (args.lr > 0 and math.isfinite(args.lr), "--lr must be > 0"),
        (args.hidden >= 1, "--hidden must be >= 1"),
        (args.block_size >= 1, "--block-size must be >= 1"),
        (args.damp is None or args.damp > 0, "--damp must be > 0"),
        (args.redistribute_every >= 1, "--redistribute-every must be >= 1"),
        (0 <= args.alpha <= 1, "--alpha must be in [0, 1]"),
        (0 <= args.end_fraction <= 1, "--end-fraction must be in [0, 1]"),
        (args.seed >= 0, "--seed must be >= 0"),
        (args.checkpoint_every >= 0, "--checkpoint-every must be >= 0"),
        (args.fisher_batches is None or args.fisher_batches >= 1, "--fisher-batches must be >= 1"),
        (args.mest_lambda is None or args.mest_lambda >= 0, "--mest-lambda must be >= 0"),
        *(experiment.checks(args) if experiment is not None else []),
    ]
    if (args.drop is None) != (args.grow is None):
        checks.append((False, "--drop and --grow compose a redistribution together: give both"))
    elif args.drop is not None:
        if args.algorithm != parser.get_default("algorithm"):
            checks.append((False, "--algorithm and --drop/--grow both name the redistribution: "
                                  "give one or the other"))
        else:
            try:
                args.algorithm = create(drop=args.drop, grow=args.grow, scope=args.scope).name
            except ValueError as exc:
                checks.append((False, str(exc)))
    elif args.scope is not None:
        checks.append((False, "--scope goes with --drop and --grow"))
    if args.baseline is None:
        taken = _parameters_of(args.algorithm)
        given = {"block_size": args.block_size != 34, "damp": args.damp is not None,
                 "joint": args.joint, "fisher_batches": args.fisher_batches is not None,
                 "mest_lambda": args.mest_lambda is not None}
        extra = [f"--{k.replace('_', '-')}" for k, on in given.items() if on and k not in taken]
        if extra:
            checks.append((False, f"{', '.join(extra)} do(es) not apply to --algorithm "
                                  f"{args.algorithm}"))
    if args.resume is not None and (args.out is not None or args.overwrite):
        checks.append((False, "--resume continues the run in its own directory: drop --out and "
                              "--overwrite (or drop --resume to start a new run)"))
    for ok, message in checks:
        if not ok:
            parser.error(message)


# ------------------------------------------------------------------ run
def versions(backend: Any) -> dict[str, str]:
    import numba
    import scipy
    import sklearn

    from .._version import __version__

    found = {"cupynn": __version__, "python": platform.python_version(),
             "numpy": numpy.__version__, "scipy": scipy.__version__, "numba": numba.__version__,
             "scikit-learn": sklearn.__version__}
    if backend.is_gpu:
        found["cupy"] = backend.xp.__version__
    return found


def _prepare_output(args: argparse.Namespace, experiment: Experiment) -> Path:
    if args.resume is not None:
        if not (args.resume / "config.json").exists() or not (args.resume / CHECKPOINT).exists():
            raise UserError(f"--resume {args.resume}: no config.json and {CHECKPOINT} there (a run "
                            f"writes its first checkpoint after --checkpoint-every epochs). Give "
                            f"the directory of a run that wrote a checkpoint, or start a new run "
                            f"with --out.")
        return args.resume
    out = args.out or Path("runs") / f"{experiment.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory: a run writes several files "
                        f"into its output directory. Give the path of a directory (new or "
                        f"empty), or move the file away.")
    taken = [name for name in RESULT_FILES if (out / name).exists()]
    if taken and not args.overwrite:
        raise UserError(f"{out} already holds a run ({', '.join(taken)}). Choose another --out, "
                        f"continue that run with --resume {out}, or pass --overwrite to replace "
                        f"it.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent that is a file, no permission, a read-only disk
        raise UserError(f"--out {out}: the output directory cannot be made "
                        f"({exc.strerror or exc}: {exc.filename or out}). Choose another "
                        f"--out.") from None
    for name in taken:
        (out / name).unlink()
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, numpy.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    tmp.replace(path)


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


def _resumed_settings(parser: argparse.ArgumentParser, args: argparse.Namespace,
                      out: Path, saved: dict[str, Any]) -> None:
    """Take the run's own settings; a different value given on the command line is an error."""
    def plain(value: Any) -> Any:
        return json.loads(json.dumps(value, default=str))

    conflicts = []
    for key, value in saved.items():
        if key in _RESUME_OWN:
            continue
        given = getattr(args, key, None)
        if given != parser.get_default(key) and plain(given) != plain(value):
            conflicts.append(f"--{key.replace('_', '-')} {given} (the run has {value})")
        setattr(args, key, Path(value) if key == "data_dir" and value else value)
    if conflicts:
        raise UserError(f"--resume {out} continues that run with its own settings, but the "
                        f"command line asks for others: {'; '.join(conflicts)}. Drop them, or "
                        f"start a new run with --out.")


# Arguments that --resume takes from the command line, not from the run.
_RESUME_OWN = ("resume", "quiet", "device", "out", "overwrite", "debug")
# Arguments that may differ between the ranks of one run (a node-local copy of the data:
# the data's fingerprint is compared before training).
_RANK_OWN = ("data_dir", "quiet", "debug")


def _read_run(out: Path) -> tuple[dict[str, Any], Any]:
    """The saved arguments and the checkpoint of a run to resume."""
    try:
        saved = json.loads((out / "config.json").read_text())["arguments"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--resume {out}: its config.json is not a run's configuration "
                        f"({type(exc).__name__}: {exc}). Start a new run with --out.") from None
    try:
        checkpoint = read_checkpoint(out)
    except (OSError, ValueError) as exc:
        raise UserError(f"--resume {out}: {exc} It cannot be resumed; start a new run with "
                        f"--out (or --overwrite it).") from None
    return saved, checkpoint


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


def _kept(out: Path) -> str:
    if (out / CHECKPOINT).exists():
        epoch = read_checkpoint(out)[0]["trainer"]["epoch"]
        return f"the last good checkpoint (after epoch {epoch}) is kept"
    return "no checkpoint had been written yet"


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

"""The training scripts' command line: the parser, its ``--help`` and the checks
argparse cannot express (see :mod:`cupynn.paper.experiments`, which runs what it parses).

:func:`build_parser` makes an experiment's parser (the options every script shares and
the experiment's own); :func:`check_arguments` checks their ranges and combinations, with
usage and status 2 for a mistake; :func:`_resumed_settings` takes a resumed run's own
settings back.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..cli import DEBUG_FLAG, DEBUG_HELP, UserError
from ..init import ALLOCATIONS
from ..redistribution import NAMES, compositions, create, naming_rule
from ..redistribution.compose import DROP_PARAMS, DROPS, GROW_PARAMS, GROWS, parse_name
from ..redistribution.schedule import SCHEDULES

if TYPE_CHECKING:
    from .experiments import Experiment

BASELINES = ("neuron", "parameter")


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

"""The paper's experiment grid: every algorithm × density × seed, plus the dense baselines.

Each grid point is one run of the experiment script (``scripts/train_<dataset>.py``)
in its own process, writing into its own directory::

    <grid-dir>/<dataset>/<algorithm>/d<density>/s<seed>/
    <grid-dir>/<dataset>/baseline-<neuron|parameter>/s<seed>/

beside the run's files (``config.json``, ``metrics.jsonl``, ``checkpoint.npz``,
``summary.json``, see :mod:`cupynn.paper.experiments`) its output goes to ``log.txt``.
A run whose ``summary.json`` says completed is skipped; one with a checkpoint
is resumed (``--resume``), any other is started again (``--overwrite``). A
directory that holds a run with *other* settings (say, another number of
epochs) is never touched: the grid reports it as a failure instead, so that
a short trial grid cannot pass for the real one.

``python scripts/run_grid.py --help`` lists the options; :func:`main` is it.
The grid's runs and their states are planned in :mod:`cupynn.paper.grid_plan` and run
by :mod:`cupynn.paper.grid_launch`; this module is the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from ..cli import DEBUG_FLAG, DEBUG_HELP, UserError, run_main
from .experiments import BASELINES, HelpFormatter
from .grid_launch import execute, summarise
from .grid_plan import (DEFAULT_LAUNCHER, DENSITIES, EXPERIMENTS, SEEDS, GridError, plan,
                        shell_commands)
from ..redistribution import NAMES
# Importable from here as before the split (cupynn.paper.grid held them).
from .grid_launch import Outcome  # noqa: F401
from .grid_plan import (GRID_FILE, LOG, ROOT, Run, expected_arguments, run_folder,  # noqa: F401
                        run_state)


# ------------------------------------------------------------------ command line
def build_grid_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_grid.py",
        description="Run the paper's grid for one dataset: every redistribution algorithm × "
                    "density × seed, plus the dense baselines, each a run of "
                    "scripts/train_<dataset>.py in its own directory "
                    "<grid-dir>/<dataset>/<algorithm>/d<density>/s<seed> (baselines: "
                    "baseline-<kind>/s<seed>). Completed runs are skipped, unfinished ones "
                    "resumed. Arguments after '--' go to every run.",
        formatter_class=HelpFormatter)
    add = parser.add_argument
    add("dataset", choices=tuple(EXPERIMENTS))
    add("--grid-dir", type=Path, default=Path("runs/grid"), help="the grid's directory")
    add("--algorithms", nargs="+", default=list(NAMES), metavar="NAME",
        help=f"redistribution algorithms: the paper's ({', '.join(NAMES)}) or compositions "
             f"'<drop>+<grow>[/<scope>]' such as set+momentum or mest+gradient/global")
    add("--densities", nargs="+", type=float, default=list(DENSITIES), metavar="D",
        help="densities of the sparse runs")
    add("--seeds", nargs="+", type=int, default=list(SEEDS), metavar="S",
        help="seeds: each setting runs once per seed")
    add("--baselines", nargs="*", choices=BASELINES, default=list(BASELINES), metavar="KIND",
        help="dense baselines (neuron, parameter); none with an empty list")
    add("--jobs", "-j", type=int, default=1, help="runs at a time on this machine")
    add("--print-commands", action="store_true",
        help="print one shell command per unfinished run (for a cluster scheduler) instead of "
             "running them")
    add("--no-progress", action="store_true", help="no progress bar")
    add(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
    add("--ranks", type=int, default=1,
        help="MPI ranks per run: each run is data-parallel over this many processes, started "
             "by --launcher")
    add("--launcher", default=DEFAULT_LAUNCHER,
        help="how a run of several ranks is started; {ranks} is replaced (e.g. "
             "'srun -n {ranks}' on a Slurm cluster)")
    group = parser.add_argument_group("run settings (default: the script's)")
    group.add_argument("--epochs", type=int, help="passes over the training data")
    group.add_argument("--batch-size", type=int, help="rows per training step")
    group.add_argument("--lr", type=float, help="Adam's learning rate")
    group.add_argument("--train-from-test", type=float, metavar="FRACTION", help="KMNIST only")
    group.add_argument("--train-samples", type=int, help="HIGGS only")
    group.add_argument("--val-samples", type=int, help="HIGGS only")
    group.add_argument("--data-dir", type=Path, metavar="DIR",
                       help="folder with the dataset files")
    return parser


OPTION_KEYS = ("epochs", "batch_size", "lr", "train_from_test", "train_samples", "val_samples",
               "data_dir")


def main(argv: Sequence[str] | None = None, out: Any = None) -> int:
    """``run_grid.py``: parse, then run the grid or print its commands; the exit status
    (2 for a mistake in the input, said in one paragraph)."""
    return run_main(lambda args: _main(args, out), argv, "run_grid.py")


def _main(argv: list[str], out: Any) -> int:
    out = out or sys.stdout
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = build_grid_parser()
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    options = {key: getattr(args, key) for key in OPTION_KEYS}
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise UserError(f"--data-dir {args.data_dir} is not a folder. Give the folder that holds "
                        f"the {args.dataset} files (every run reads it).")
    try:
        runs = plan(args.dataset, args.grid_dir, algorithms=args.algorithms,
                    densities=args.densities, seeds=args.seeds, baselines=args.baselines,
                    options=options, extra=extra, ranks=args.ranks, launcher=args.launcher)
    except GridError as exc:
        parser.error(str(exc))
    if args.print_commands:
        lines, notes = shell_commands(runs)
        for note in notes:
            print(f"# {note}", file=sys.stderr)
        for line in lines:
            print(line, file=out)
        return 0
    try:
        outcomes = execute(runs, args.jobs, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("interrupted: the runs kept their last checkpoints; run the same command again "
              "to resume them.", file=sys.stderr)
        return 130
    code = summarise(outcomes)
    print(f"results in {runs[0].dataset_dir}; "
          f"report: python scripts/report.py {args.grid_dir}", file=out)
    return code

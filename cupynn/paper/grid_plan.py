"""The grid's definitions: its runs (:class:`Run`, :func:`plan`), what each run's
directory holds (:func:`run_state`) and the shell commands that start or resume them
(:func:`shell_commands`). See :mod:`cupynn.paper.grid` for the grid's layout; running
it is :mod:`cupynn.paper.grid_launch`.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..checkpoint import FILENAME as CHECKPOINT
from .experiments import BASELINES, HIGGS, KMNIST, Experiment, build_parser, check_arguments
from ..redistribution import NAMES, compositions

EXPERIMENTS: dict[str, Experiment] = {"kmnist": KMNIST, "higgs": HIGGS}
DENSITIES = (0.1, 0.06, 0.03)
SEEDS = (0, 1, 2)
LOG = "log.txt"
GRID_FILE = "grid.json"
DEFAULT_LAUNCHER = "mpiexec -n {ranks}"
ROOT = Path(__file__).resolve().parents[2]  # the checkout (or site-packages) holding cupynn
# Arguments the script itself takes from the command line even when resuming;
# they do not make two runs different.
_NOT_SETTINGS = {"out", "overwrite", "resume", "quiet", "device", "checkpoint_every", "debug"}


class GridError(ValueError):
    """A grid that cannot be planned (bad options for the dataset's script)."""


@dataclass(frozen=True)
class Run:
    """One grid point.

    ``args`` are the training script's arguments without the output ones
    (``--out``/``--overwrite``/``--resume``), which :meth:`command` adds for
    the run's current :func:`state`.
    """

    dataset: str
    algorithm: str | None
    baseline: str | None
    density: float | None
    seed: int
    out: Path
    args: tuple[str, ...]
    launcher: tuple[str, ...] = ()  # e.g. ("mpiexec", "-n", "4"): a data-parallel run

    @property
    def name(self) -> str:
        """The run's directory relative to ``<grid-dir>/<dataset>``, e.g. ``random/d0.1/s0``."""
        if self.baseline is not None:
            return f"baseline-{self.baseline}/s{self.seed}"
        return f"{run_folder(self.algorithm)}/d{self.density:g}/s{self.seed}"

    @property
    def dataset_dir(self) -> Path:
        """``<grid-dir>/<dataset>``."""
        return self.out.parents[len(Path(self.name).parts) - 1]

    @property
    def log(self) -> Path:
        return self.out / LOG

    def command(self, state: str | None = None) -> list[str]:
        """The command line that (re)starts the run from ``state`` (default: its state now)."""
        state = state or run_state(self)[0]
        if state == "resume":
            where = ["--resume", str(self.out)]
        else:
            where = ["--out", str(self.out)] + (["--overwrite"] if state == "restart" else [])
        return [*self.launcher, *_program(self.dataset), *self.args, *where]


def _program(dataset: str) -> list[str]:
    script = ROOT / "scripts" / f"train_{dataset}.py"
    if script.exists():
        return [sys.executable, str(script)]
    # An installed cupynn without the checkout's scripts/: the same call inline.
    name = dataset.upper()
    return [sys.executable, "-c",
            f"import sys; from cupynn.paper.experiments import {name}, run; sys.exit(run({name}))"]


# ------------------------------------------------------------------ planning
def plan(dataset: str, grid_dir: str | os.PathLike, *, algorithms: Sequence[str] = NAMES,
         densities: Sequence[float] = DENSITIES, seeds: Sequence[int] = SEEDS,
         baselines: Sequence[str] = BASELINES, options: dict[str, Any] | None = None,
         extra: Sequence[str] = (), ranks: int = 1,
         launcher: str = DEFAULT_LAUNCHER) -> list[Run]:
    """Every run of the grid, sparse runs first (algorithm, density, seed), then baselines.

    Parameters
    ----------
    dataset : ``"kmnist"`` or ``"higgs"``
    grid_dir : the grid's directory; runs go under ``grid_dir/dataset``.
    algorithms, densities, seeds, baselines : the grid's axes. Baselines take
        no density: the parameter-equivalent width is defined at the script's
        default density 0.1 (SPEC §5).
    options : script options by destination name (``epochs``, ``batch_size``,
        ``lr``, ``train_from_test``, ``train_samples``, ``val_samples``,
        ``data_dir``); ``None`` values are left to the script's defaults.
    extra : further script arguments, given to every run as they are.
    ranks : int
        MPI ranks per run (data-parallel, :mod:`cupynn.distributed`); with more
        than one, each command starts with ``launcher``.
    launcher : str
        The MPI launch prefix, ``{ranks}`` replaced: ``"mpiexec -n {ranks}"``
        (default) or ``"srun -n {ranks}"``, say.

    Raises
    ------
    GridError
        For an unknown dataset, algorithm or baseline, an empty axis, or
        arguments the dataset's script rejects (checked here, once, rather
        than by every run).
    """
    if dataset not in EXPERIMENTS:
        raise GridError(f"Unknown dataset {dataset!r}. Valid names: {', '.join(EXPERIMENTS)}.")
    algorithms = [_canonical(name) for name in algorithms]
    for given, valid, what in ((algorithms, (*NAMES, *compositions()), "algorithm"),
                               (baselines, BASELINES, "baseline")):
        unknown = [name for name in given if name not in valid]
        if unknown:
            named = valid if what == "baseline" else NAMES
            raise GridError(f"Unknown {what} {unknown[0]!r}. Valid names: {', '.join(named)}"
                            + ("" if what == "baseline" else
                               ", or a composition '<drop>+<grow>[/<scope>]' (see "
                               "cupynn.redistribution.compositions())") + ".")
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise GridError(f"--ranks must be an int >= 1. Got {ranks!r} instead.")
    if ranks > 1 and "{ranks}" not in launcher:
        raise GridError(f"--launcher must contain {{ranks}} (the number of ranks). Got "
                        f"{launcher!r} instead.")
    prefix = tuple(shlex.split(launcher.replace("{ranks}", str(ranks)))) if ranks > 1 else ()
    if not seeds or not (baselines or (algorithms and densities)):
        raise GridError("The grid is empty: give at least one seed and one algorithm with one "
                        "density, or a baseline.")
    common = []
    for key, value in (options or {}).items():
        if value is None:
            continue
        if key == "data_dir":  # the runs may start elsewhere (a cluster job's directory)
            value = Path(value).resolve()
        common += [f"--{key.replace('_', '-')}", str(value)]
    common += ["--quiet", *extra]
    base = Path(grid_dir).resolve() / dataset
    runs = []
    for algorithm in algorithms:
        for density in densities:
            for seed in seeds:
                args = ("--algorithm", algorithm, "--density", f"{density:g}", "--seed", str(seed),
                        *common)
                name = f"{run_folder(algorithm)}/d{density:g}/s{seed}"
                runs.append(Run(dataset, algorithm, None, float(density), int(seed), base / name,
                                args, prefix))
    for baseline in baselines:
        for seed in seeds:
            args = ("--baseline", baseline, "--seed", str(seed), *common)
            runs.append(Run(dataset, None, baseline, None, int(seed),
                            base / f"baseline-{baseline}/s{seed}", args, prefix))
    for run in runs:
        expected_arguments(run)
    return runs


def run_folder(algorithm: str) -> str:
    """An algorithm's folder name: a composition's scope after '@', not '/' (no subfolder)."""
    return algorithm.replace("/", "@")


def _canonical(name: str) -> str:
    """A composition's canonical name (``set+momentum/global`` -> ``set+momentum``)."""
    if "+" not in str(name):
        return name
    from ..redistribution import create

    try:
        return create(name).name
    except (ValueError, TypeError):
        return name  # reported as unknown below


def expected_arguments(run: Run) -> dict[str, Any]:
    """The settings the script will record for ``run`` (its parsed arguments)."""
    parser = build_parser(EXPERIMENTS[run.dataset])

    def reject(message: str) -> None:  # instead of argparse's usage and exit
        raise GridError(f"train_{run.dataset}.py rejects the arguments {shlex.join(run.args)}: "
                        f"{message}")

    parser.error = reject  # type: ignore[method-assign]
    args = parser.parse_args([*run.args, "--out", str(run.out)])
    check_arguments(parser, args, EXPERIMENTS[run.dataset])
    return vars(args)


def _plain(value: Any) -> Any:
    """The value as it reads back from config.json (tuples as lists, paths as text)."""
    return json.loads(json.dumps(value, default=str))


def run_state(run: Run) -> tuple[str, str]:
    """What the run's directory holds: ``(state, why)``.

    ``state`` is ``"completed"`` (skip), ``"resume"`` (config and checkpoint
    of an unfinished run with the planned settings), ``"restart"`` (files but
    nothing to resume from: start again with ``--overwrite``), ``"new"``
    (nothing there) or ``"conflict"`` (a run with other settings: left alone).
    """
    config_path, summary_path = run.out / "config.json", run.out / "summary.json"
    if not config_path.exists():
        taken = [p.name for p in run.out.glob("*") if p.name != LOG] if run.out.exists() else []
        if taken:
            return "restart", f"files without config.json: {', '.join(taken)}"
        return "new", ""
    try:
        saved = json.loads(config_path.read_text())["arguments"]
    except (ValueError, KeyError, TypeError):
        return "restart", "config.json is unreadable"
    expected = expected_arguments(run)
    differ = [f"{key} {_plain(saved[key])!r} (planned {_plain(value)!r})"
              for key, value in expected.items()
              if key not in _NOT_SETTINGS and key in saved and _plain(saved[key]) != _plain(value)]
    if differ:
        return "conflict", (f"{run.out} holds a run with other settings: {'; '.join(differ)}. "
                            f"Remove it or choose another grid directory.")
    status = None
    if summary_path.exists():
        try:
            status = json.loads(summary_path.read_text()).get("status")
        except ValueError:
            pass
    if status == "completed":
        return "completed", ""
    if (run.out / CHECKPOINT).exists():
        return "resume", f"summary status {status}" if status else "no summary"
    return "restart", "no checkpoint yet"


# ------------------------------------------------------------------ commands
def _needs_pythonpath() -> bool:
    """Whether a fresh interpreter needs to be told where cupynn is (not pip-installed)."""
    try:
        importlib.metadata.distribution("cupynn")
        return False
    except importlib.metadata.PackageNotFoundError:
        return True


def shell_commands(runs: Sequence[Run]) -> tuple[list[str], list[str]]:
    """One shell line per run still to do (its start or resume command), and notes.

    Completed runs are left out; a conflicting directory gives a note instead
    of a command.
    """
    prefix = f"PYTHONPATH={shlex.quote(str(ROOT))} " if _needs_pythonpath() else ""
    lines, notes = [], []
    done = 0
    for run in runs:
        state, why = run_state(run)
        if state == "completed":
            done += 1
        elif state == "conflict":
            notes.append(f"skipped {run.name}: {why}")
        else:
            lines.append(prefix + shlex.join(run.command(state)))
    if done:
        notes.insert(0, f"{done} of {len(runs)} runs are already completed and not listed")
    return lines, notes

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
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..checkpoint import FILENAME as CHECKPOINT
from ..cli import DEBUG_FLAG, DEBUG_HELP, UserError, run_main
from .experiments import (BASELINES, HIGGS, KMNIST, Experiment, HelpFormatter, build_parser,
                          check_arguments)
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


# ------------------------------------------------------------------ running
@dataclass
class Outcome:
    run: Run
    state: str          # completed, skipped (was completed), failed, interrupted, conflict
    message: str = ""
    seconds: float = 0.0


def _threads_per_run(jobs: int) -> int:
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    return max(1, cores // jobs)


def _child_env(jobs: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # N runs side by side share the cores instead of each starting one thread per core.
    threads = str(_threads_per_run(jobs))
    for name in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(name, threads)
    return env


def _summary_status(run: Run) -> tuple[str | None, str]:
    try:
        summary = json.loads((run.out / "summary.json").read_text())
    except (OSError, ValueError):
        return None, ""
    return summary.get("status"), summary.get("message", "")


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


class _Launcher:
    """Starts runs in their own sessions so that Ctrl-C reaches each exactly once (from here)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.lock = threading.Lock()
        self.live: set[subprocess.Popen] = set()
        self.stopping = False

    def __call__(self, run: Run) -> Outcome:
        try:
            return self._run(run)
        except Exception as exc:  # one run's trouble (a full disk, say) must not stop the grid
            return Outcome(run, "failed", f"{type(exc).__name__}: {exc}")

    def _run(self, run: Run) -> Outcome:
        state, why = run_state(run)
        if state == "completed":
            return Outcome(run, "skipped")
        if state == "conflict":
            return Outcome(run, "conflict", why)
        command = run.command(state)
        run.out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(run.log, "a") as log:
            stamp = datetime.datetime.now().isoformat(timespec="seconds")
            log.write(f"=== {stamp} {state}{f' ({why})' if why else ''}: {shlex.join(command)}\n")
            log.flush()
            with self.lock:
                if self.stopping:
                    return Outcome(run, "interrupted", "not started")
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=self.env,
                                           start_new_session=True)
                self.live.add(process)
            code = process.wait()
            with self.lock:
                self.live.discard(process)
        seconds = time.perf_counter() - start
        status, message = _summary_status(run)
        if code == 0 and status == "completed":
            return Outcome(run, "completed", seconds=seconds)
        if code == 130 or status == "interrupted":
            return Outcome(run, "interrupted", message, seconds)
        reason = message or _last_line(run.log) or "no output"
        return Outcome(run, "failed", f"exit status {code}: {reason}", seconds)

    def interrupt(self) -> None:
        with self.lock:
            self.stopping = True
            for process in self.live:
                if process.poll() is None:
                    process.send_signal(signal.SIGINT)


def execute(runs: Sequence[Run], jobs: int = 1, *, progress: bool = True,
            out: Any = None) -> list[Outcome]:
    """Run the grid in ``jobs`` parallel processes; one :class:`Outcome` per run.

    Completed runs are skipped, unfinished ones resumed (see :func:`run_state`).
    Ctrl-C stops every running run cleanly (each keeps its last checkpoint):
    the same call later resumes them.
    """
    from tqdm.auto import tqdm

    out = out or sys.stderr
    if jobs < 1:
        raise GridError(f"jobs must be >= 1. Got {jobs} instead.")
    states = [run_state(run)[0] for run in runs]
    done = sum(state == "completed" for state in states)
    if done:
        print(f"{done} of {len(runs)} runs are already completed; skipping them", file=out)
    _write_grid_file(runs, jobs)
    launcher = _Launcher(_child_env(jobs))
    todo = [run for run, state in zip(runs, states) if state != "completed"]
    outcomes = [Outcome(run, "skipped") for run, state in zip(runs, states) if state == "completed"]
    bar = tqdm(total=len(runs), initial=done, unit="run", disable=not progress, file=out,
               dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = [pool.submit(launcher, run) for run in todo]
        for future in as_completed(futures):
            outcome = future.result()
            outcomes.append(outcome)
            bar.update()
            if outcome.state not in ("completed", "skipped"):
                log = f" (log: {outcome.run.log})" if outcome.run.log.exists() else ""
                bar.write(f"{outcome.state}: {outcome.run.name} — {outcome.message}{log}",
                          file=out)
    except KeyboardInterrupt:
        launcher.interrupt()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        raise
    finally:
        pool.shutdown(wait=True)
        bar.close()
    order = {run: i for i, run in enumerate(runs)}
    return sorted(outcomes, key=lambda o: order[o.run])


def _write_grid_file(runs: Sequence[Run], jobs: int) -> None:
    """Record how the grid ran (the report says when timings shared the machine)."""
    if not runs:
        return
    info = {"dataset": runs[0].dataset, "runs": len(runs), "jobs": jobs,
            "threads_per_run": _threads_per_run(jobs), "command": shlex.join(sys.argv),
            "started": datetime.datetime.now().isoformat(timespec="seconds")}
    base = runs[0].dataset_dir
    base.mkdir(parents=True, exist_ok=True)
    (base / GRID_FILE).write_text(json.dumps(info, indent=2) + "\n")


def summarise(outcomes: Sequence[Outcome], out: Any = None) -> int:
    """Print the failures with their logs; return the exit status (0: all completed)."""
    out = out or sys.stderr
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.state] = counts.get(outcome.state, 0) + 1
    print("grid: " + ", ".join(f"{n} {state}" for state, n in counts.items()), file=out)
    bad = [o for o in outcomes if o.state not in ("completed", "skipped")]
    if bad:
        print(f"{len(bad)} run(s) did not complete:", file=out)
        for outcome in bad:
            where = f"\n    log: {outcome.run.log}" if outcome.run.log.exists() else ""
            print(f"  {outcome.run.name}: {outcome.state}: {outcome.message}{where}", file=out)
    if counts.get("interrupted"):
        print("Run the same command again to resume the unfinished runs.", file=out)
    return 1 if bad else 0


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

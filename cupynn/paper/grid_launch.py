"""Running a planned grid (:mod:`cupynn.paper.grid_plan`): each run in its own
process, ``jobs`` at a time, resumed where it stopped; Ctrl-C stops them all cleanly.
"""

from __future__ import annotations

import datetime
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

from .grid_plan import GRID_FILE, ROOT, GridError, Run, run_state


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

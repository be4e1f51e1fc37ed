"""The runner: the parts in order, each in a process of its own under a time limit and
within the budget of the whole check, and the verdict."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cupynn
from cupynn.cli import DEBUG_FLAG, DEBUG_HELP, UserError, run_main

from .context import DRY_RUN, FAILED, PASSED, ROOT, Context, result
from .parts import PART_FUNCTIONS
from .parts.env import git_commit
from .parts.tests import TESTS_LOG
from .report import REPORT_JSON, REPORT_MD, _jsonable, format_table, write_reports

# The whole check on a GPU: under eight minutes (350 + the graph part's 45 + the scale
# part's 60), which leaves a retry of a part within a 15-minute device loan.
BUDGET_S = 455
# What runs each part in its process: the entry point, so that the command a part's report
# records (sys.argv) runs that part again.
SCRIPT = ROOT / "scripts" / "gpu_check.py"


@dataclass(frozen=True)
class Part:
    name: str
    title: str
    seconds: int  # time limit on a GPU
    quick_seconds: int  # time limit of the CPU dry run


PARTS = (
    Part("tests", "GPU tests (pytest -m gpu)", 150, 60),
    Part("parity", "CPU <-> GPU parity, 2 epochs, float64", 40, 60),
    Part("steps", "training step and peak memory", 40, 60),
    Part("kernels", "sparse kernels: every variant at every layer shape, dense baselines, "
                    "issue 20's targets", 40, 60),
    Part("launches", "kernel launches and host waits per step", 25, 20),
    Part("graph", "the step as a CUDA graph: equality, step time, launches, HIGGS epoch", 45, 30),
    Part("higgs", "one HIGGS-sized epoch", 50, 40),
    Part("redistribution", "seconds per redistribution", 40, 60),
    Part("mpi", "2 MPI ranks sharing the GPU against 1 process", 25, 40),
    Part("scale", "the largest sparse MLP the device holds, a few steps (issue 21)", 60, 40),
    Part("env", "environment", 15, 15),
)
PART_NAMES = tuple(p.name for p in PARTS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Verify and measure cupynn on a GPU in one command (a dry run on the CPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True,
                   help=f"folder for the reports ({REPORT_JSON}, {REPORT_MD}, {TESTS_LOG}); "
                        f"created if missing")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"),
                   help="the backend to check; auto: the GPU when one answers")
    p.add_argument("--quick", action="store_true",
                   help="small sizes and few repeats: a dry run of seconds (with --device cpu)")
    p.add_argument("--data-dir", default=None,
                   help="a folder laid out like ../shared/data (kmnist/, higgs/) for the real-data "
                        "tests and the parity split; default: the loaders' own search "
                        "($CUPYNN_DATA, datasets/, ../shared/data)")
    p.add_argument("--parts", default=",".join(PART_NAMES),
                   help=f"comma-separated subset of {','.join(PART_NAMES)}, run in that order")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for the whole check (default {BUDGET_S} on a GPU); a part "
                        f"gets its own limit or what is left, whichever is less")
    p.add_argument("--commit", default=None,
                   help="the commit checked, for the report (default: git rev-parse HEAD)")
    p.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
    # Internal: run one part in this process and write its result as JSON.
    p.add_argument("--part", choices=PART_NAMES, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--part-seconds", type=float, default=600.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    parts = [name.strip() for name in args.parts.split(",") if name.strip()]
    unknown = [name for name in parts if name not in PART_NAMES]
    if unknown or not parts:
        p.error(f"--parts must name some of {', '.join(PART_NAMES)}; got {args.parts!r}")
    args.parts = [name for name in PART_NAMES if name in parts]
    if args.budget is not None and args.budget <= 0:
        p.error("--budget must be positive")
    return args


def run_part_here(args: argparse.Namespace) -> int:
    """The child side: one part, its result written as JSON to --result."""
    begin = time.perf_counter()
    try:
        ctx = Context(args)
        out = PART_FUNCTIONS[args.part](ctx)
    except Exception as exc:  # the report says what went wrong; the other parts go on
        out = result(FAILED, f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                     notes=[traceback.format_exc()[-4000:]])
    out["seconds"] = round(time.perf_counter() - begin, 2)
    Path(args.result).write_text(json.dumps(out, indent=1, default=_jsonable))
    return 0


def _child_argv(args: argparse.Namespace, part: str, result_path: Path, seconds: float
                ) -> list[str]:
    argv = [sys.executable, str(SCRIPT), "--out", str(args.out), "--device", args.device,
            "--part", part, "--result", str(result_path), "--part-seconds", f"{seconds:.1f}"]
    if args.quick:
        argv.append("--quick")
    if args.data_dir:
        argv += ["--data-dir", str(args.data_dir)]
    if args.commit:
        argv += ["--commit", args.commit]
    return argv


def run_part(args: argparse.Namespace, part: Part, seconds: float) -> dict[str, Any]:
    """One part in a process of its own (its own process group), killed at ``seconds``."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        begin = time.perf_counter()
        process = subprocess.Popen(_child_argv(args, part.name, result_path, seconds),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   cwd=ROOT, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=seconds)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            timed_out = True
        elapsed = round(time.perf_counter() - begin, 2)
        if result_path.exists() and not timed_out:
            out = json.loads(result_path.read_text())
        else:
            why = (f"timed out after {seconds:.0f} s" if timed_out
                   else f"the part's process ended with status {process.returncode} and no result")
            out = result(FAILED, why, notes=[(output or "")[-4000:]])
    out["wall_seconds"] = elapsed
    out["limit_seconds"] = round(seconds, 1)
    out["name"], out["title"] = part.name, part.title
    return out


def _finish(process: subprocess.Popen, deadline: float) -> None:
    """Wait for a background process until ``deadline``, then end it."""
    try:
        process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def verdict(parts: list[dict[str, Any]], gpu: bool) -> str:
    statuses = [p["status"] for p in parts]
    if any(s == FAILED for s in statuses):
        return FAILED
    if not gpu:
        return DRY_RUN
    return PASSED if all(s == PASSED for s in statuses) else "incomplete"


WARM_NUMBA = ("import numpy, cupynn; from cupynn import kernels; "
              "[kernels.warm_up(cupynn.get_backend('cpu'), d) for d in (numpy.float32, "
              "numpy.float64)]")


def start_numba_warm_up() -> subprocess.Popen:
    """Compile the CPU (Numba) kernels into their disk cache in the background.

    A fresh GPU machine has no cache, and compiling them takes 10-20 s in the
    first process that needs them (the parity part's CPU runs): done here, beside
    the GPU tests, which do not use them, it costs the budget nothing."""
    return subprocess.Popen([sys.executable, "-c", WARM_NUMBA], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def run_all(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backend = cupynn.get_backend(args.device)
    gpu = backend.is_gpu
    budget = args.budget or (BUDGET_S if gpu else sum(p.quick_seconds for p in PARTS))
    deadline = time.monotonic() + budget
    report: dict[str, Any] = {
        "device": backend.device_name(), "backend": backend.name, "quick": args.quick,
        "commit": args.commit or git_commit() or "unknown", "budget_seconds": budget,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "parts": [], "verdict": "running"}
    begin = time.perf_counter()
    warm = start_numba_warm_up() if gpu else None
    for part in PARTS:
        if part.name not in args.parts:
            continue
        if warm is not None and part.name != "tests":  # the others may run CPU kernels
            _finish(warm, min(deadline, time.monotonic() + 60))
            warm = None
        left = deadline - time.monotonic()
        limit = min(part.seconds if gpu else part.quick_seconds, left)
        if limit < 5:
            entry = result("skipped: out of time", f"{left:.0f} s of the budget left")
            entry.update(name=part.name, title=part.title, wall_seconds=0.0, limit_seconds=0.0)
        else:
            print(f"[gpu_check] {part.name}: running (limit {limit:.0f} s)", flush=True)
            entry = run_part(args, part, limit)
        report["parts"].append(entry)
        print(f"[gpu_check] {part.name}: {entry['status']} in {entry['wall_seconds']} s: "
              f"{entry['summary']}", flush=True)
        report["wall_seconds"] = round(time.perf_counter() - begin, 1)
        write_reports(out, report)  # after every part: a killed run still leaves a report
    if warm is not None:
        _finish(warm, time.monotonic())
    report["verdict"] = verdict(report["parts"], gpu)
    report["wall_seconds"] = round(time.perf_counter() - begin, 1)
    write_reports(out, report)
    print()
    print(format_table(report))
    return 0 if report["verdict"] in (PASSED, DRY_RUN) else 1


def main(argv: list[str] | None = None) -> int:
    """The exit status: 0 when the verdict is passed or a dry run, 1 when not, 2 for a
    mistake in the input (said in one paragraph)."""
    return run_main(_main, argv, "gpu_check.py")


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.part:
        return run_part_here(args)
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise UserError(f"--data-dir {args.data_dir} is not a folder. Give a copy of "
                        f"../shared/data (kmnist/, higgs/), or leave it out.")
    try:
        cupynn.get_backend(args.device)
    except RuntimeError as exc:
        raise UserError(f"--device {args.device}: {exc}") from None
    return run_all(args)

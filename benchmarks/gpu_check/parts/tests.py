"""The ``tests`` part: the test suite's GPU tests (``pytest -m gpu``)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from typing import Any

from ..context import FAILED, NO_GPU, PASSED, ROOT, Context, result

TESTS_LOG = "gpu-tests.log"
FAILURES_LOG = "gpu-failures.log"  # each failed GPU test's traceback, written as it fails
SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def pytest_counts(text: str) -> dict[str, int]:
    """Counts from pytest's last summary line (``3 passed, 1 failed in 2.1s``)."""
    counts: dict[str, int] = {}
    lines = [line for line in text.splitlines() if SUMMARY.search(line)]
    for number, kind in SUMMARY.findall(lines[-1] if lines else ""):
        counts["errors" if kind.startswith("error") else kind] = int(number)
    return counts


def part_tests(ctx: Context) -> dict[str, Any]:
    log = ctx.out / TESTS_LOG
    # -v: one line per test as it ends, so that a run cut short still shows how far it got.
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "tests"), "-m", "gpu", "-rfE",
           "-p", "no:cacheprovider", "-p", "benchmarks.gpu_check.failures"]
    if not ctx.gpu:
        cmd += ["-q", "--collect-only"]
    else:
        cmd.append("-v")
        if importlib.util.find_spec("pytest_timeout") is not None:
            cmd.append("--timeout=60")  # one hung test must not take the whole part
    env = dict(os.environ)
    if ctx.data_dir is not None:
        env["CUPYNN_TEST_DATA"] = str(ctx.data_dir.resolve())
    # The plugin that writes each failure's traceback as it happens (a module of this package).
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    failures_log = ctx.out / FAILURES_LOG
    failures_log.unlink(missing_ok=True)
    env["CUPYNN_FAILURES_LOG"] = str(failures_log)
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        try:
            returncode = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                        cwd=ROOT, timeout=max(5.0, ctx.remaining() - 5)).returncode
        except subprocess.TimeoutExpired:
            returncode = None  # stopped at the part's limit: count what the -v lines say
    text = log.read_text()
    if not ctx.gpu:
        collected = len(re.findall(r"::", text))
        return result(NO_GPU, f"{collected} GPU tests collected, none run",
                      {"collected": collected, "returncode": returncode})
    if returncode is None:
        counts = {k.lower(): n for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")
                  if (n := len(re.findall(rf"::\S+ {k}\b", text)))}
        failures = [f"FAILED {m}" for m in re.findall(r"^(\S+::\S+) (?:FAILED|ERROR)\b", text,
                                                      re.MULTILINE)]
    else:
        counts = pytest_counts(text)
        failures = [line for line in text.splitlines() if line.startswith(("FAILED", "ERROR"))]
    ok = returncode == 0 and counts.get("passed", 0) > 0
    summary = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no summary line"
    if returncode is None:
        summary = f"stopped at the part's limit after {summary}"
    data = {"counts": counts, "returncode": returncode, "failures": failures[:50],
            "log": TESTS_LOG}
    if failures_log.exists():
        data["failures_log"] = FAILURES_LOG
    return result(PASSED if ok else FAILED, summary, data)

"""A pytest plugin for the GPU check's tests part: each failure's traceback is
appended to ``$CUPYNN_FAILURES_LOG`` the moment the test ends, so that a run
stopped at its time limit (before pytest's own summary) still says why each
test that had failed by then failed."""

from __future__ import annotations

import os

FAILURES_ENV = "CUPYNN_FAILURES_LOG"
MAX_CHARS = 4000  # of each traceback, its end


def pytest_runtest_logreport(report) -> None:  # noqa: ANN001 - pytest's TestReport
    path = os.environ.get(FAILURES_ENV)
    if not path or not report.failed:
        return
    text = report.longreprtext
    if len(text) > MAX_CHARS:
        text = "...\n" + text[-MAX_CHARS:]
    with open(path, "a") as f:
        f.write(f"===== {report.nodeid} ({report.when})\n{text}\n\n")

"""A fault on any rank ends the whole MPI job promptly, with a non-zero status (issue 17).

Each test runs tests/mpi_worker.py under ``mpiexec`` (a subprocess under a
timeout; a job past it is ended, every rank included) and measures the time
from the fault, which the worker prints, to the end of the job: an exception
before ``fit``, in ``fit``'s checks and between epochs in the user's own code;
a rank killed mid-epoch (whose run then resumes on three ranks as if never
stopped); a rank that never calls ``fit`` (the collective timeout names it);
Ctrl-C (status 130 and the summary, as one process); ranks given different
flags (one paragraph, status 2); ranks at different collectives. And what is no
fault: every rank's data loading outlasting a short collective timeout; ``--lr nan``
on every rank (the range message, not a disagreement); an error that every rank raises
alike (one ValueError each, no abort). And, in one process, ``init``'s timeout checks.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from cupynn import distributed

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from test_distributed import (assert_same_run, end_job, finish, higgs_args, launch,  # noqa: E402
                              start)

PROMPT = 10.0  # seconds from a fault to the job's end, on a shared two-core machine
FAULT_TIMEOUT = 120  # for the whole job, start-up included


def seconds_after_fault(done, ended: float) -> float:
    found = re.findall(r"fault at (\d+\.\d+)", done.stderr)
    assert found, done.stderr[-3000:]
    return ended - float(found[0])


def run_fault(ranks: int, *args: str):
    job = start(ranks, *args)
    done = finish(job, FAULT_TIMEOUT)
    after = seconds_after_fault(done, time.time())
    print(f"{' '.join(args[:1])}: the job ended {after:.3f} s after the fault")
    return done, after


@pytest.mark.parametrize("mode, message", [
    ("raise-before-fit", "OSError: user code: this rank could not read its data"),
    ("bad-width", "ValueError: The 'train' inputs of fit must have shape (n, 16). "
                  "Got (241, 15) instead."),
    ("raise-between-epochs", "RuntimeError: user code: failed between epochs"),
], ids=["before-fit", "in-fits-checks", "between-epochs"])
def test_an_exception_on_one_rank_ends_the_job(mode, message):
    """Before the fix the other rank waited in fit's first collective forever. The error
    of fit's checks is caught by the user's code (bad-width): the guard around the
    trainer's construction ends the job all the same; the others are uncaught and end it
    through init's excepthook."""
    done, after = run_fault(2, mode, "-")
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"[rank 1 of 2] {message}" in done.stderr
    assert after < PROMPT


def test_a_rank_that_never_calls_fit_is_named_by_the_timeout():
    done, after = run_fault(3, "never-fit", "-", "3")
    assert done.returncode == 1, done.stderr[-3000:]
    assert re.search(r"rank\(s\) 2 of 3 did not arrive at allgather \(collective #1\) within "
                     r"the timeout of 3 s; rank\(s\) 0, 1 waited there\.", done.stderr)
    assert "Rank(s) 2 did not answer" in done.stderr
    assert "init(timeout=...) or $CUPYNN_MPI_TIMEOUT" in done.stderr
    assert 3 <= after < 3 + PROMPT


def test_ranks_at_different_collectives_are_told_so():
    """Rather than hang or mix their buffers (the arrival check compares the calls)."""
    done, after = run_fault(2, "different-calls", "-")
    assert done.returncode == 1, done.stderr[-3000:]
    assert re.search(r"RuntimeError: The ranks called different collectives: this rank "
                     r"\(rank \d\) is at its collective #1, (barrier|allgather) of 0 element\(s\); "
                     r"among the ranks the calls range over \['allgather', 'barrier'\]",
                     done.stderr)
    assert after < PROMPT


def test_a_killed_rank_ends_the_job_and_the_run_resumes_on_three(tmp_path):
    """SIGKILL of rank 1 in epoch 3 of train_higgs.py on 2 ranks: the job ends at once;
    the checkpoint of epoch 2, resumed on 3 ranks, ends where one uninterrupted process
    ends."""
    from conftest import shared_data
    from cupynn.paper.experiments import HIGGS, run

    data = shared_data("higgs")
    part, whole = tmp_path / "part", tmp_path / "whole"
    done, after = run_fault(2, "script-kill", "higgs", *higgs_args(data, part))
    assert done.returncode != 0 and after < PROMPT, done.stderr[-3000:]
    assert json.loads((part / "config.json").read_text())["ranks"] == 2
    assert len((part / "metrics.jsonl").read_text().splitlines()) == 2
    resumed = launch(3, "script", "higgs", "--resume", str(part), "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr and "after epoch 2" in resumed.stderr
    assert run(HIGGS, higgs_args(data, whole)) == 0
    assert_same_run(part, whole)


def test_ctrl_c_under_mpiexec_ends_as_one_process_does(tmp_path):
    """Ctrl-C (SIGINT to mpiexec's process group, as a terminal sends it) during epoch 3 or
    later: status 130, summary.json says interrupted, no traceback; the run resumes."""
    from conftest import shared_data
    from cupynn.paper.experiments import HIGGS, run

    data = shared_data("higgs")
    part, whole = tmp_path / "part", tmp_path / "whole"
    args = [a if a != "4" else "12" for a in higgs_args(data, part)]  # --epochs 12
    job = start(2, "script-slow", "higgs", *args)
    metrics = part / "metrics.jsonl"
    deadline = time.monotonic() + FAULT_TIMEOUT
    while time.monotonic() < deadline and job.poll() is None and not (
            metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    try:
        assert job.poll() is None, "the run ended before it could be interrupted"
        os.killpg(job.pid, signal.SIGINT)
        sent = time.time()
        done = finish(job, 60)
    finally:
        if job.poll() is None:
            end_job(job)
    assert time.time() - sent < PROMPT
    assert done.returncode == 130, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    summary = json.loads((part / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 2 <= summary["epochs_completed"] < 12
    assert re.search(r"interrupted: interrupted during epoch \d+; the last good checkpoint "
                     r"\(after epoch \d+\) is kept", done.stderr)
    assert done.stdout.count("results in") == 1
    assert run(HIGGS, ["--resume", str(part), "--quiet"]) == 0
    assert run(HIGGS, [a if a != "4" else "12" for a in higgs_args(data, whole)]) == 0
    assert_same_run(part, whole)


def test_an_interrupt_on_the_last_rank_alone_stops_every_rank(tmp_path):
    """The interrupted rank tells the others; the first rank writes the summary and ends
    the job with status 130 (the first rank's own interrupt: test_distributed.py)."""
    from conftest import shared_data

    out = tmp_path / "run"
    done = launch(2, "script-interrupt-last", "higgs", *higgs_args(shared_data("higgs"), out),
                  timeout=FAULT_TIMEOUT)
    assert done.returncode == 130, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["epochs_completed"] == 2
    assert "interrupted during epoch 3; the last good checkpoint (after epoch 2)" in done.stderr


def test_ranks_given_different_flags_get_one_paragraph_and_status_2(tmp_path):
    done = launch(2, "script-differ", "kmnist", "--data-dir", str(tmp_path / "none"),
                  "--density", "0.1", "--out", str(tmp_path / "out"), timeout=FAULT_TIMEOUT)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["train_kmnist.py: error: The 2 ranks disagree on the command-line "
                      "arguments: --density: rank 0 0.1, rank 1 0.2. Every rank must run the "
                      "same configuration on the same data."], done.stderr


def test_every_ranks_data_loading_is_exempt_from_the_timeout(tmp_path):
    """The first rank loads while the others wait, then the others load (5 s) while the
    first waits: neither wait counts against the 2 s timeout. Before the fix the first
    rank went on to its next collective and, after 2 s, ended the job naming rank 1."""
    import mpi_worker

    assert mpi_worker.SLOW_LOAD > 2 + distributed._ANSWER_SECONDS  # else it would pass anyway
    out = tmp_path / "run"
    done = launch(2, "script-slow-load", "higgs", "--epochs", "1", "--hidden", "8",
                  "--batch-size", "64", "--dtype", "float64", "--device", "cpu", "--quiet",
                  "--out", str(out), env={distributed.TIMEOUT_ENV: "2"}, timeout=FAULT_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "did not arrive" not in done.stderr
    assert json.loads((out / "summary.json").read_text())["epochs_completed"] == 1


def test_nan_on_every_rank_gets_the_range_message_not_a_disagreement(tmp_path):
    """NaN != NaN: check_same called ``--lr nan`` on both ranks a disagreement."""
    done = launch(2, "script", "kmnist", "--data-dir", str(tmp_path / "none"), "--lr", "nan",
                  "--out", str(tmp_path / "out"), timeout=FAULT_TIMEOUT)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].endswith(": error: --lr must be > 0"), done.stderr


def test_an_error_every_rank_raises_alike_propagates_on_every_rank():
    """fit refuses sample_weight with several ranks: every rank raises the same ValueError
    from the same check, before any collective; it reaches each rank's own code (which
    catches it here) instead of a traceback per rank and MPI_Abort."""
    done = launch(2, "sample-weight", "-", timeout=FAULT_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "[rank" not in done.stderr, done.stderr
    caught = sorted(re.findall(r"rank (\d) caught (\w+): (sample_weight .*? yet)", done.stdout))
    assert caught == [(str(rank), "UnsupportedAcrossRanks", "sample_weight is not supported by "
                       "data-parallel training (2 ranks) yet") for rank in (0, 1)], done.stdout


# ----------------------------------------------------------------- in one process
def test_init_checks_its_timeout(monkeypatch):
    for name in distributed.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    monkeypatch.setattr(distributed, "_WORLD", [])
    for bad in (0, -1.0, float("nan"), "soon", True):
        with pytest.raises(ValueError, match=r"The 'timeout' parameter of init must be a number "
                                             r"of seconds > 0 \(math.inf: no limit\)\. Got"):
            distributed.init(timeout=bad)
    assert distributed.init().timeout == distributed.DEFAULT_TIMEOUT == 600
    assert distributed.init(timeout=5).timeout == 5.0  # given again: replaces it
    monkeypatch.setattr(distributed, "_WORLD", [])
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "2.5")
    assert distributed.init().timeout == 2.5
    monkeypatch.setattr(distributed, "_WORLD", [])
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "never")
    with pytest.raises(ValueError, match=r"\$CUPYNN_MPI_TIMEOUT must be a number of seconds"):
        distributed.init()

"""The scripts never show a traceback for a user's mistake: one paragraph, status 2.

Every script (train_kmnist.py, train_higgs.py, run_grid.py, report.py,
gpu_check.py) is run as a subprocess, once per class of mistake; the test
asserts the status, the message and that no traceback is printed. --debug
brings the traceback back, and a bug (not a UserError) always shows it.
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

import cupynn
from conftest import shared_data
from cupynn.cli import UserError, run_main

ROOT = Path(__file__).resolve().parents[1]


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def assert_user_error(done: subprocess.CompletedProcess, *messages: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr
    for message in messages:
        assert message in done.stderr, (message, done.stderr)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A completed one-epoch KMNIST run (config.json, checkpoint.npz, ...)."""
    out = tmp_path_factory.mktemp("runs") / "done"
    done = script("train_kmnist.py", "--data-dir", shared_data("kmnist"), "--train-from-test",
                  "0.2", "--epochs", "1", "--hidden", "16", "--out", out, "--quiet",
                  "--device", "cpu")
    assert done.returncode == 0, done.stderr
    return out


def copy_run(run: Path, to: Path) -> Path:
    to.mkdir()
    for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoint.npz"):
        (to / name).write_bytes((run / name).read_bytes())
    return to


def test_missing_data_dir(tmp_path):
    assert_user_error(script("train_kmnist.py", "--data-dir", tmp_path / "nowhere", "--epochs",
                             "1", "--no-download", "--out", tmp_path / "o"),
                      "train_kmnist.py: error: the kmnist data could not be loaded",
                      "kmnist-test-imgs.npz", "no such folder")


def test_data_file_failing_its_checksum(tmp_path):
    for name in ("kmnist-test-imgs.npz", "kmnist-test-labels.npz"):
        numpy.savez(tmp_path / name, arr_0=numpy.zeros((3, 28, 28), dtype=numpy.uint8))
    assert_user_error(script("train_kmnist.py", "--data-dir", tmp_path, "--train-from-test",
                             "0.8", "--epochs", "1", "--no-download", "--out", tmp_path / "o"),
                      "the kmnist data could not be loaded", "kmnist-test-imgs.npz")


def test_malformed_higgs_file_names_the_line(tmp_path):
    lines = ["1," + ",".join(["0.5"] * 28)] * 5 + ["0,abc" + ",0.1" * 27]
    with gzip.open(tmp_path / "HIGGS-sample.csv.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    assert_user_error(script("train_higgs.py", "--data-dir", tmp_path, "--epochs", "1",
                             "--no-cache", "--out", tmp_path / "o"),
                      "train_higgs.py: error: the higgs data could not be loaded", "Line 6 of",
                      "must hold numbers only")


def test_output_directory_holding_another_run(finished_run):
    assert_user_error(script("train_kmnist.py", "--data-dir", shared_data("kmnist"),
                             "--train-from-test", "0.2", "--epochs", "1", "--out", finished_run),
                      "already holds a run", "--resume", "--overwrite")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def _npy_bytes(array: numpy.ndarray) -> bytes:
    buffer = io.BytesIO()
    numpy.save(buffer, array)
    return buffer.getvalue()


def _replace_by_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize("damage, message", [
    (lambda d, done: (d / "checkpoint.npz").write_bytes(b"\0" * 100),
     "not a readable cupynn checkpoint"),
    (lambda d, done: numpy.savez(d / "checkpoint.npz", weights=numpy.ones(2)),
     "not a readable cupynn checkpoint: it has no checkpoint record"),
    (lambda d, done: _truncate(d / "checkpoint.npz"),
     "not a readable cupynn checkpoint: it is a damaged .npz archive: corrupt or truncated"),
    (lambda d, done: (d / "checkpoint.npz").write_bytes(b""),
     "not a readable cupynn checkpoint: the file is empty"),
    (lambda d, done: (d / "checkpoint.npz").write_bytes(bytes(range(256)) * 8),
     "not a readable cupynn checkpoint: it is not a .npz (zip) archive"),
    (lambda d, done: (d / "checkpoint.npz").write_bytes((done / "model.npz").read_bytes()),
     "not a readable cupynn checkpoint: it is a model file (cupynn.save)"),
    (lambda d, done: (d / "checkpoint.npz").write_bytes(_npy_bytes(numpy.ones(3))),
     "it is a single NumPy array (.npy"),
    (lambda d, done: (d / "checkpoint.npz").write_bytes(pickle.dumps({"meta": 1})),
     "it is a pickle"),
    (lambda d, done: _replace_by_directory(d / "checkpoint.npz"), "it is a directory"),
    (lambda d, done: (d / "config.json").write_text("{"), "its config.json is not a run's"),
    (lambda d, done: (d / "checkpoint.npz").unlink(), "no config.json and checkpoint.npz there"),
], ids=["zeros", "foreign npz", "truncated", "empty", "garbage", "model file", "npy", "pickle",
        "directory", "bad config", "no checkpoint"])
def test_resume_from_a_bad_checkpoint(finished_run, tmp_path, damage, message):
    run = copy_run(finished_run, tmp_path / "run")
    damage(run, finished_run)
    assert_user_error(script("train_kmnist.py", "--resume", run), message,
                      "It cannot be resumed" if "config" not in message else "")


def test_resume_with_settings_of_its_own(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    assert_user_error(script("train_kmnist.py", "--resume", run, "--epochs", "5", "--lr", "0.1"),
                      "continues that run with its own settings", "--epochs 5 (the run has 1)",
                      "--lr 0.1 (the run has")


def test_conflicting_flags(finished_run, tmp_path):
    done = script("train_kmnist.py", "--resume", finished_run, "--out", tmp_path / "x")
    assert_user_error(done, "--resume continues the run in its own directory: drop --out")


@pytest.mark.skipif(cupynn.gpu_available(), reason="a GPU answers here")
def test_gpu_asked_for_where_none_answers(tmp_path):
    assert_user_error(script("train_higgs.py", "--device", "gpu", "--data-dir",
                             shared_data("higgs"), "--epochs", "1", "--out", tmp_path / "o"),
                      "--device gpu: device='gpu' was asked for", "Install CuPy")
    assert_user_error(script("gpu_check.py", "--out", tmp_path / "g", "--device", "gpu"),
                      "gpu_check.py: error: --device gpu")


def test_debug_shows_the_traceback(tmp_path):
    done = script("train_kmnist.py", "--data-dir", tmp_path / "nowhere", "--epochs", "1",
                  "--no-download", "--out", tmp_path / "o", "--debug")
    assert done.returncode == 1 and "Traceback" in done.stderr and "UserError" in done.stderr


def test_grid_and_report_and_gpu_check_mistakes(tmp_path):
    assert_user_error(script("run_grid.py", "kmnist", "--data-dir", tmp_path / "none",
                             "--print-commands"), "run_grid.py: error: --data-dir")
    assert_user_error(script("run_grid.py", "kmnist", "--jobs", "0"), "--jobs must be >= 1")
    assert_user_error(script("report.py", tmp_path / "none"), "report.py: error:",
                      "is not a folder")
    (tmp_path / "empty").mkdir()
    assert_user_error(script("report.py", tmp_path / "empty"), "No runs")
    assert_user_error(script("gpu_check.py", "--out", tmp_path / "g", "--device", "cpu",
                             "--data-dir", tmp_path / "none"), "--data-dir")


def test_a_bug_keeps_its_traceback(capsys):
    def buggy(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_main(buggy, [], "x.py")

    def mistaken(argv):
        raise UserError("say what to do")

    assert run_main(mistaken, [], "x.py") == 2
    assert capsys.readouterr().err == "x.py: error: say what to do\n"
    with pytest.raises(UserError):
        run_main(mistaken, ["--debug"], "x.py")


def test_out_naming_a_file(tmp_path):
    """--out an existing file (or a path under one) is a user's mistake, found before any
    data loads (the data folder here does not exist)."""
    (tmp_path / "afile").write_text("mine")
    for out, message in ((tmp_path / "afile", "is a file, not a directory"),
                         (tmp_path / "afile" / "sub", "the output directory cannot be made")):
        assert_user_error(script("train_kmnist.py", "--out", out, "--data-dir",
                                 tmp_path / "nowhere", "--no-download", "--epochs", "1"),
                          f"train_kmnist.py: error: --out {out}", message)
    assert (tmp_path / "afile").read_text() == "mine"
    done = script("train_kmnist.py", "--out", tmp_path / "afile", "--debug")
    assert done.returncode == 1 and "UserError" in done.stderr


@pytest.mark.parametrize("name, args, message", [
    ("train_kmnist.py", ["--scale", "1.1", "0.9"], "--scale MIN MAX must have 0 < MIN <= MAX"),
    ("train_kmnist.py", ["--scale", "0", "1"], "--scale MIN MAX must have 0 < MIN <= MAX"),
    ("train_kmnist.py", ["--rotation", "-5"], "--rotation must be in [0, 180] degrees"),
    ("train_kmnist.py", ["--rotation", "nan"], "--rotation must be in [0, 180] degrees"),
    ("train_kmnist.py", ["--translation", "-1"], "--translation must be a finite number"),
    ("train_kmnist.py", ["--train-from-test", "1.5"], "--train-from-test must be in (0, 1)"),
    ("train_higgs.py", ["--train-samples", "0"], "--train-samples must be >= 1"),
    ("train_higgs.py", ["--val-samples", "-3"], "--val-samples must be >= 1"),
])
def test_script_arguments_are_checked_before_any_data_loads(tmp_path, name, args, message):
    """With the other arguments: status 2 and usage, no output directory made, no data read
    (the data folder does not exist, so loading would fail with another message)."""
    done = script(name, *args, "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "o",
                  "--epochs", "1")
    assert_user_error(done, f"{name}: error: {message}", "usage:")
    assert not (tmp_path / "o").exists()


def test_missing_higgs_names_the_data_dir_given(tmp_path):
    (tmp_path / "empty").mkdir()
    for data_dir in (tmp_path / "empty", tmp_path / "nowhere"):
        done = script("train_higgs.py", "--data-dir", data_dir, "--epochs", "1", "--no-cache",
                      "--out", tmp_path / "o")
        assert_user_error(done, f"(--data-dir {data_dir})", f"in {data_dir}",
                          f"HIGGS.csv.gz into {data_dir},")


def test_unknown_redistribution_says_the_rule_not_every_name():
    """The script's, create()'s and the estimators' messages give the seven presets and how
    a composition is named (parts and scopes), not the dozens of valid compositions."""
    from cupynn.estimators import SparseMLPClassifier
    from cupynn.redistribution import create

    done = script("train_kmnist.py", "--algorithm", "rigl")
    with pytest.raises(ValueError) as created:
        create("rigl")
    with pytest.raises(ValueError) as estimated:
        SparseMLPClassifier(redistribution="rigl", max_iter=1).fit(numpy.eye(4), [0, 1, 0, 1])
    for message in (done.stderr.splitlines()[-1], str(created.value), str(estimated.value)):
        assert "'rigl'" in message
        for part in ("static, random, gradient, gradient-global, loss, woodfisher, woodtaylor",
                     "'<drop>+<grow>[/<scope>]'",
                     "a removal (magnitude, set, mest, random, woodfisher, woodtaylor)",
                     "a growth (random, gradient, momentum, loss, proportional-random)",
                     "layer or global", "loss layer only",
                     "momentum, proportional-random global only", "e.g. set+momentum"):
            assert part in " ".join(message.split()), (part, message)
        assert "set+random/global" not in message and "mest+loss" not in message
        assert len(message) < 800  # the names of every composition alone take 850
    assert_user_error(done, "train_kmnist.py: error: argument --algorithm: 'rigl' is none of")

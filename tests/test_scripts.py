"""The experiment scripts end to end on ../shared/data (short runs, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy

import cupynn
import pytest

from conftest import shared_data
from cupynn.paper.experiments import HIGGS, KMNIST, parameter_equivalent_width, run
from cupynn.redistribution import NAMES

ROOT = Path(__file__).resolve().parents[1]
EPOCH_KEYS = {"epoch", "train_loss", "test_loss", "test_accuracy", "train_seconds",
              "redistribution_seconds", "peak_memory_bytes", "nnz"}


def _kmnist_args(out, *extra):
    return ["--data-dir", str(shared_data("kmnist")), "--train-from-test", "0.8", "--epochs", "2",
            "--batch-size", "256", "--lr", "2e-3", "--out", str(out), "--quiet", "--device", "cpu",
            *extra]


def _higgs_args(out, *extra):
    return ["--data-dir", str(shared_data("higgs")), "--train-samples", "3000", "--val-samples",
            "1500", "--epochs", "2", "--out", str(out), "--quiet", "--device", "cpu",
            "--no-cache", *extra]


def _results(out):
    config = json.loads((out / "config.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return config, metrics, summary


def test_parameter_equivalent_widths_match_the_paper():
    assert parameter_equivalent_width([784, 256, 256, 10], 0.1, ()) == 33
    assert parameter_equivalent_width([21, 256, 256, 256, 1], 0.1, (-1,)) == 79


@pytest.mark.parametrize("algorithm", NAMES)
def test_kmnist_every_algorithm(tmp_path, algorithm):
    out = tmp_path / algorithm
    assert run(KMNIST, _kmnist_args(out, "--algorithm", algorithm)) == 0
    config, metrics, summary = _results(out)
    assert config["arguments"]["algorithm"] == algorithm
    assert config["dataset"].startswith("kmnist: 8,000 train / 2,000 test rows")
    assert config["backend"] == "cpu" and "numpy" in config["versions"]
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert EPOCH_KEYS <= set(m) and m["peak_memory_bytes"] > 0
        assert 0 <= m["test_accuracy"] <= 1 and numpy.isfinite(m["train_loss"])
    # 2 epochs: E_end = 1.5, so only epoch 1 redistributes.
    assert "induced_loss_before" in metrics[0] and "fraction" in metrics[0]
    assert "induced_loss_before" not in metrics[1]
    assert sum(metrics[0]["nnz"]) == config["n_weights"]
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2
    assert summary["final"]["test_accuracy"] == metrics[-1]["test_accuracy"]
    assert (out / "checkpoint.npz").exists()
    # The final model file holds the checkpoint's model.
    assert summary["model_file"] == "model.npz"
    saved = cupynn.load(out / "model.npz", device="cpu").state_dict()
    with numpy.load(out / "checkpoint.npz") as checkpoint:
        for key, value in saved.items():
            numpy.testing.assert_array_equal(value, checkpoint[f"model/{key}"])


@pytest.mark.parametrize("baseline, width", [("neuron", 256), ("parameter", 33)])
def test_kmnist_dense_baselines(tmp_path, baseline, width):
    out = tmp_path / baseline
    assert run(KMNIST, _kmnist_args(out, "--baseline", baseline, "--epochs", "1")) == 0
    config, metrics, _ = _results(out)
    assert config["sizes"] == [784, width, width, 10]
    assert config["dense_layers"] == [0, 1, 2]
    assert metrics[0]["nnz"] == [784 * width, width * width, width * 10]


@pytest.mark.parametrize("extra", [("--algorithm", name) for name in NAMES]
                         + [("--baseline", "neuron"), ("--baseline", "parameter")])
def test_higgs_runs_and_reports_auc(tmp_path, extra):
    out = tmp_path / "higgs"
    assert run(HIGGS, _higgs_args(out, *extra)) == 0
    config, metrics, summary = _results(out)
    assert config["dataset"].startswith("higgs-subset")
    assert any("not the official" in note for note in config["dataset_notes"])
    for m in metrics:
        assert EPOCH_KEYS | {"test_auc"} <= set(m) and 0 <= m["test_auc"] <= 1
        assert m["n_batches"] == -(-3000 // 128)
    if extra == ("--baseline", "parameter"):
        assert config["sizes"] == [21, 79, 79, 79, 1]
    elif extra == ("--baseline", "neuron"):
        assert config["sizes"] == [21, 256, 256, 256, 1] and config["dense_layers"] == [0, 1, 2, 3]
    else:
        assert config["dense_layers"] == [-1] and metrics[0]["nnz"][-1] == 256
        assert "induced_loss_before" in metrics[0]
        assert sum(metrics[-1]["nnz"]) == config["n_weights"]


def test_ctrl_c_then_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    from cupynn.training import Trainer

    full, part = tmp_path / "full", tmp_path / "part"
    common = ("--algorithm", "woodfisher", "--epochs", "5")  # redistributes after epochs 1-3
    assert run(HIGGS, _higgs_args(full, *common)) == 0
    # The same run, interrupted (Ctrl-C) during epoch 3.
    real_epoch = Trainer.train_epoch

    def interrupted(self, epoch):
        if epoch == 3:
            raise KeyboardInterrupt
        return real_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", interrupted)
    assert run(HIGGS, _higgs_args(part, *common)) == 130
    _, metrics, summary = _results(part)
    assert summary["status"] == "interrupted" and len(metrics) == 2
    assert "the last good checkpoint (after epoch 2) is kept" in summary["message"]
    monkeypatch.setattr(Trainer, "train_epoch", real_epoch)
    assert run(HIGGS, ["--resume", str(part), "--quiet"]) == 0
    _, full_metrics, _ = _results(full)
    _, part_metrics, summary = _results(part)
    timing = {"train_seconds", "eval_seconds", "redistribution_seconds", "peak_memory_bytes"}

    def strip(ms):
        return [{k: v for k, v in m.items() if k not in timing} for m in ms]

    assert summary["status"] == "completed" and summary["epochs_completed"] == 5
    assert strip(part_metrics) == strip(full_metrics)
    assert any("induced_loss_before" in m for m in part_metrics[2:])


def test_nan_stops_with_epoch_and_batch(tmp_path, capsys):
    out = tmp_path / "nan"
    assert run(KMNIST, _kmnist_args(out, "--lr", "1e30", "--algorithm", "random")) == 1
    _, metrics, summary = _results(out)
    assert summary["status"] == "failed" and metrics == []
    assert "The training loss became nan at epoch 1, batch" in summary["message"]
    assert "No checkpoint had been written yet" in summary["message"]


def test_refuses_to_overwrite_another_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(KMNIST, _kmnist_args(out, "--epochs", "1", "--algorithm", "static")) == 0
    capsys.readouterr()
    assert run(KMNIST, _kmnist_args(out, "--epochs", "1")) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert run(KMNIST, _kmnist_args(out, "--epochs", "1", "--overwrite")) == 0


def test_missing_data_dir_is_an_error_not_a_fallback(tmp_path, capsys):
    assert run(KMNIST, ["--data-dir", str(tmp_path), "--no-download", "--out",
                        str(tmp_path / "o"), "--quiet", "--epochs", "1"]) == 2
    assert "kmnist-test-imgs" in capsys.readouterr().err


def test_bad_arguments_exit_with_usage(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(KMNIST, ["--density", "1.5", "--out", str(tmp_path / "o")])
    assert "--density must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["train_kmnist.py", "train_higgs.py"])
def test_script_files_run(tmp_path, script):
    args = (_kmnist_args(tmp_path / "o", "--epochs", "1", "--no-augment") if "kmnist" in script
            else _higgs_args(tmp_path / "o", "--epochs", "1"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # also without an installed cupynn
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "completed: 1/1 epochs" in done.stdout


@pytest.mark.parametrize("experiment", [KMNIST, HIGGS, None], ids=["kmnist", "higgs", "grid"])
def test_every_option_has_help_and_says_its_default_once(experiment):
    """--help: no option without a line of help (--density, --epochs, --lr and --seed had
    none), and a default said once, never as "(default: None)" beside the help's own words."""
    import argparse

    from cupynn.paper.experiments import build_parser
    from cupynn.paper.grid import build_grid_parser

    parser = build_parser(experiment) if experiment is not None else build_grid_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        name = action.option_strings[-1]
        shown = formatter._get_help_string(action) % {"default": action.default}
        assert action.help and len(action.help) > 8, name
        assert shown.count("default") <= 1 and "(default: None)" not in shown, (name, shown)
        assert "(default: False)" not in shown and "(default: True)" not in shown, (name, shown)
        if action.default not in (None, False) and action.option_strings != ["-h", "--help"]:
            assert "default" in shown, (name, shown)
    if experiment is None:
        return
    text = " ".join(parser.format_help().split())
    for line in ("--density DENSITY share of each sparse layer's weights that are active, in "
                 "(0, 1] (default: 0.1)", "--lr LR Adam's learning rate (default:",
                 "--epochs EPOCHS passes over the training data (default: 80)",
                 "--seed SEED seed of everything random", "--out DIR output directory "
                 "(default: runs/<name>-<time>) --overwrite"):
        assert line in text, line


def test_help_of_the_scripts_runs():
    for name, line in (("train_kmnist.py", "--scale MIN MAX augmentation: scale range (default: "
                                           "0.9 1.1)"),
                       ("train_higgs.py", "--train-samples TRAIN_SAMPLES training rows drawn per "
                                          "epoch (default: 500000)")):
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / name), "--help"],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        text = " ".join(done.stdout.split())
        assert done.returncode == 0, done.stderr
        assert line in text and "(default: None)" not in text, text

"""benchmarks/bench_estimators.py, at smoke size on the real KMNIST files (skipped without)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import DATA_DIR

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_estimators  # noqa: E402


def test_every_configuration_side_by_side_with_mlpclassifier(tmp_path, capsys):
    kmnist = DATA_DIR / "kmnist"
    if not (kmnist / "kmnist-test-imgs.npz").exists():
        pytest.skip(f"needs the KMNIST test files in {kmnist}")
    out = tmp_path / "init.json"
    assert bench_estimators.main(["--data-dir", str(kmnist), "--max-iter", "1", "--hidden", "8",
                                  "--seeds", "0", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["data"] == {"name": "kmnist", "train_rows": 8000, "test_rows": 2000,
                              "split": "train_from_test=0.8 (stratified, seed 0)"}
    assert list(report["summary"]) == list(bench_estimators.configurations(0.1))
    assert all(0 <= row["mean_accuracy"] <= 1 and row["mean_seconds"] > 0
               for row in report["summary"].values())
    assert "sklearn MLPClassifier" in capsys.readouterr().out

"""benchmarks/bench_redistribution.py runs end to end (timings are never asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    name = "bench_redistribution"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_quick_run_reports_every_algorithm_and_the_targets(tmp_path, capsys):
    bench = _script()
    out = tmp_path / "report.json"
    assert bench.main(["--quick", "--settings", "higgs", "--algorithms",
                       "static,random,gradient-global,woodtaylor", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "targets:" in printed and "% epoch" in printed
    report = json.loads(out.read_text())
    rows = report["results"]
    assert [r["algorithm"] for r in rows] == ["static", "random", "gradient-global", "woodtaylor"]
    for r in rows:
        assert r["setting"] == "higgs" and r["n_batches"] == 3907 and r["n_weights"] == 14_080
        assert r["redistribute_ms"] >= 0 and r["observe_ms"] >= 0 and r["peak_mib"] > 0
    assert rows[0]["peak_vs_static"] == 1.0
    # Only woodtaylor keeps a Fisher: its blocks show in its peak.
    assert rows[3]["peak_mib"] > rows[1]["peak_mib"]
    assert {t["algorithm"] for t in report["targets"]} == {"random", "gradient-global", "woodtaylor"}
    assert set(report["static_step_ms_samples"]) == {"higgs"}


def test_bad_arguments_are_rejected(capsys):
    bench = _script()
    for argv in (["--algorithms", "rigl"], ["--settings", "mnist"], ["--density", "0"]):
        try:
            bench.parse_args(argv)
        except SystemExit as exc:
            assert exc.code == 2
        else:
            raise AssertionError(f"{argv} was accepted")
    capsys.readouterr()


def test_whole_epochs_through_fit(tmp_path, capsys, monkeypatch):
    bench = _script()
    monkeypatch.setitem(bench.SETTINGS["kmnist"], "train_rows", 2048)  # 4 batches of 512
    out = tmp_path / "report.json"
    assert bench.main(["--quick", "--settings", "kmnist", "--algorithms", "static,woodfisher",
                       "--no-memory", "--epochs", "2", "--augment", "--pause", "0",
                       "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "whole epochs through cupynn.fit" in printed and "augmentation on" in printed
    report = json.loads(out.read_text())
    rows = report["epochs"]
    assert [r["algorithm"] for r in rows] == ["(none)", "static", "woodfisher"]
    from cupynn.redistribution.schedule import fraction_at

    # two pairs per algorithm, each with its own run without a redistributor
    assert [len(r["epoch_s_samples"]) for r in rows] == [4, 2, 2]
    assert [len(r["overhead_samples"]) for r in rows] == [1, 2, 2]
    for r in rows:
        assert r["setting"] == "kmnist" and r["n_batches"] == 4 and r["augment"] is True
        assert r["epoch_s"] >= r["train_s"] > 0
        # epoch 2 of the 80-epoch schedule redistributes (nothing without a redistributor)
        expected = 0.0 if r["algorithm"] == "(none)" else fraction_at(2, 80)
        assert r["fraction"] == expected
    assert rows[0]["overhead_share"] == 0.0
    assert rows[2]["redistribution_s"] > 0
    whole = [t for t in report["targets"] if t["target"].startswith("whole epoch")]
    assert [t["algorithm"] for t in whole] == ["woodfisher"]
    assert whole[0]["measured"] == rows[2]["overhead_share"]


def test_negative_epochs_are_rejected(capsys):
    bench = _script()
    try:
        bench.parse_args(["--epochs", "-1"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("--epochs -1 was accepted")
    capsys.readouterr()

"""benchmarks/bench_scale.py --quick and the GPU check's scale part in its dry run: the
report's numbers agree with each other (not how fast anything is)."""

from __future__ import annotations

import argparse
import json
import math
import statistics

import pytest

import cupynn
from benchmarks import bench_scale as bs
from cupynn import memory


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    # Warm up first so that the budget below starts from a resident set that already holds
    # Numba's kernels: then a model of a few tens of MB is what fits.
    args = bs.parse_args(["--quick", "--device", "cpu", "--out", str(out), "--quiet"])
    bs.warm_up(args, cupynn.get_backend("cpu"))
    rss = memory.rss_bytes()
    if rss is None:
        pytest.skip("no /proc/self/status: the budget below needs the resident set")
    budget = rss + 40 * 2**20
    assert bs.main(["--quick", "--device", "cpu", "--out", str(out), "--quiet",
                    "--redistribute", "--memory", str(budget), "--name", "quick"]) == 0
    with open(out / "quick.json") as f:
        report = json.load(f)
    return report, (out / "quick.md").read_text(), budget


def test_rows_add_up(quick_report):
    report, _, _ = quick_report
    s = report["settings"]
    rows = report["rows"] + [report["budget"]["row"]]
    assert [r["width"] for r in report["rows"]] == [64, 256]
    for r in rows:
        fp = r["footprint"]
        c = fp["components"]
        assert fp["per_weight_bytes"] == sum(c[k] for k in memory.PER_WEIGHT)
        assert fp["per_neuron_bytes"] == sum(c[k] for k in memory.PER_NEURON)
        assert r["bytes_per_nonzero"] == pytest.approx(fp["per_weight_bytes"] / r["n_weights"])
        # float32 on the CPU: 20 B per sparse weight (4 value, 4 index, 4 gradient, 8 Adam),
        # 16 per dense one; no transposed pattern.
        sparse = sum(r["layer_weights"][:-1])
        assert fp["per_weight_bytes"] == 20 * sparse + 16 * r["layer_weights"][-1]
        assert c["transposed_pattern"] == 0 and c["grad_values"] == 4 * sparse
        assert r["n_weights"] == sum(bs.layer_weights(r["width"], s["inputs"]))
        assert r["n_neurons"] == 784 + 3 * r["width"] + 10
        assert r["step_s"] == pytest.approx(statistics.median(t["step"] for t in r["steps"]))
        assert r["epoch_steps"] == math.ceil(s["rows"] / s["batch"])
        assert r["train_epoch_s"] == pytest.approx(r["epoch_steps"] * r["step_s"])
        red = r["redistribution"]
        assert r["epoch_s"] == pytest.approx(r["train_epoch_s"] + red["seconds"])
        assert r["peak_bytes"] >= r["baseline_bytes"] > 0
        twin = memory.dense_twin_bytes(bs.sizes_of(r["width"]), "float32")
        assert r["dense_twin"] == twin and twin["total_bytes"] > fp["total_bytes"]
    # The tiny widths' growth is under --quick's 1 GFLOP: those redistributions ran.
    for r in report["rows"]:
        assert r["redistribution"]["measured"] and r["redistribution"]["moved"] > 0


def test_projection_and_the_chosen_width(quick_report):
    report, _, budget = quick_report
    b = report["budget"]
    cal = b["calibration"]
    assert cal["width"] == report["rows"][-1]["width"]
    totals = [bs.projected_peak(w, cal)["total"] for w in (1, 10, 100, 1000, 10**4, 10**5)]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)
    w = b["width"]
    assert w is not None and w > report["rows"][-1]["width"]
    assert b["budget_bytes"] == budget
    search = b["search_bytes"]
    assert search == int(budget * (1 - report["settings"]["headroom"])) < budget
    assert b["projection"] == bs.projected_peak(w, cal)
    assert b["projection"]["total"] <= search < bs.projected_peak(w + 1, cal)["total"]
    assert b["next_projection"]["total"] > search
    assert bs.largest_width(search, cal) == w
    row = b["row"]
    assert row["width"] == w and row["projected_peak_bytes"] == b["projection"]["total"]
    ratio = row["peak_bytes"] / row["projected_peak_bytes"]
    assert b["measured_vs_projected"] == pytest.approx(ratio)
    assert b["fits"] == (row["peak_bytes"] <= budget)
    # Its growth is over 1 GFLOP: extrapolated from the largest run, and said so.
    assert not row["redistribution"]["measured"] and row["redistribution"]["seconds"] > 0


def test_markdown_names_every_width(quick_report):
    report, text, _ = quick_report
    assert "machine :" in text and "B/nonzero" in text
    for r in report["rows"] + [report["budget"]["row"]]:
        assert f"| {r['width']:,} |" in text


def test_largest_width_edges():
    cal = {"width": 1, "bytes_per_weight": 20.0, "bytes_per_neuron": 20.0,
           "baseline_bytes": 10**6, "batch": 8, "dtype": "float32", "inputs": 20}
    assert bs.largest_width(10**5, cal) is None  # below the baseline
    w = bs.largest_width(10**8, cal)
    assert bs.projected_peak(w, cal)["total"] <= 10**8 < bs.projected_peak(w + 1, cal)["total"]


@pytest.mark.parametrize("text, value", [("16GB", 16 * 10**9), ("1.5GiB", int(1.5 * 2**30)),
                                         ("500MB", 500 * 10**6), ("4096", 4096)])
def test_parse_bytes(text, value):
    assert bs.parse_bytes(text) == value


@pytest.mark.parametrize("text", ["16 apples", "-1GB", "GB", "0"])
def test_parse_bytes_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        bs.parse_bytes(text)


def test_densities_follow_the_issue():
    assert bs.densities_of(333333, 20) == [20 / 784, 20 / 333333, 20 / 333333, 1.0]
    assert bs.layer_weights(333333, 20) == [333333 * 20] * 3 + [3333330]
    assert bs.densities_of(10, 20) == [20 / 784, 1.0, 1.0, 1.0]  # fewer inputs than k


def test_scale_part_dry_run(tmp_path):
    from benchmarks.gpu_check import context
    from benchmarks.gpu_check.parts.scale import part_scale

    ns = argparse.Namespace(quick=True, device="cpu", data_dir=None, out=str(tmp_path),
                            part_seconds=120.0)
    out = part_scale(context.Context(ns))
    assert out["status"] == context.DRY_RUN
    d = out["data"]
    assert d["width"] == min(d["limits"].values()) >= 1
    assert d["limited_by"] in d["limits"]
    assert d["n_weights"] == sum(bs.layer_weights(d["width"], d["inputs"]))
    assert d["n_hidden_neurons"] == 3 * d["width"]
    assert d["projected_peak_bytes"] <= d["budget_bytes"]
    assert d["bytes_per_nonzero"] == pytest.approx(
        sum(d["components"][k] for k in memory.PER_WEIGHT) / d["n_weights"])
    assert out["targets"] == [] and out["summary"].startswith("784-")
    json.dumps(out)  # the runner writes it as JSON

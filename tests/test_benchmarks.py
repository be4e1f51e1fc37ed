"""The training benchmark and its masked-dense PyTorch peer (benchmarks/).

Timings are never asserted. What is: cupynn never imports PyTorch; the peer,
built from a cupynn model, computes the same training step (so the benchmark
compares like with like); its redistribution keeps the invariants of
cupynn's; the script's modes run end to end on tiny sizes. The peer tests
skip where PyTorch is not installed (it is an optional extra, ``peer``).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

import cupynn
from cupynn.losses import binary_cross_entropy, cross_entropy

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    """benchmarks/bench_training.py as a module (it puts benchmarks/ on sys.path)."""
    if "bench_training" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_training",
                                                      ROOT / "benchmarks" / "bench_training.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_training"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["bench_training"]


def _peer_module():
    _bench()  # puts benchmarks/ on sys.path
    return importlib.import_module("torch_peer")


def test_cupynn_never_imports_torch():
    code = ("import importlib, pkgutil, sys, cupynn\n"
            "for m in pkgutil.walk_packages(cupynn.__path__, 'cupynn.'):\n"
            "    importlib.import_module(m.name)\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def _step_cupynn(model, opt, x, y, loss):
    value, grad = (cross_entropy if loss == "cross_entropy" else binary_cross_entropy)(
        model.forward(x), y)
    model.backward(grad)
    opt.step()
    return float(value)


@pytest.mark.parametrize("sizes, dense_layers, loss", [
    ((20, 12, 9, 4), (), "cross_entropy"),
    ((7, 10, 10, 1), (-1,), "binary_cross_entropy"),  # HIGGS-like: dense output layer
])
def test_peer_trains_exactly_like_cupynn(sizes, dense_layers, loss):
    torch = pytest.importorskip("torch")
    torch_peer = _peer_module()
    model = cupynn.MLP(sizes, density=0.3, dense_layers=dense_layers, seed=3, dtype="float64",
                       device="cpu")
    opt = cupynn.Adam(model, lr=1e-2)
    peer = torch_peer.MaskedDensePeer(model.state_dict(), sizes, torch.device("cpu"),
                                            "float64", loss, lr=1e-2)
    assert peer.n_weights == model.n_weights
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((16, sizes[0]))
    y = (rng.integers(0, sizes[-1], 16) if loss == "cross_entropy"
         else rng.integers(0, 2, 16).astype(numpy.float64))
    xt, yt = peer.batch(x, y)
    for _ in range(3):
        ours = _step_cupynn(model, opt, x, y, loss)
        peer.step(xt, yt)
        assert float(peer.last_loss) == pytest.approx(ours, rel=1e-12)
    for i, layer in enumerate(model.layers):
        if isinstance(layer, cupynn.SparseLinear):
            theirs = peer.sparse_values(i, layer.indptr, layer.indices)
            numpy.testing.assert_allclose(theirs, layer.data, rtol=1e-10, atol=1e-12)
            # Outside the mask the dense weight stays exactly zero.
            assert float(peer.weights[i].detach().abs().sum()) == pytest.approx(
                float(numpy.abs(theirs).sum()))
        else:
            numpy.testing.assert_allclose(peer.weights[i].detach().numpy(), layer.weight,
                                          rtol=1e-10, atol=1e-12)


def test_peer_redistribution_keeps_the_invariants():
    torch = pytest.importorskip("torch")
    torch_peer = _peer_module()
    sizes = (12, 16, 16, 1)
    model = cupynn.MLP(sizes, density=0.25, dense_layers=(-1,), seed=0, device="cpu")
    peer = torch_peer.MaskedDensePeer(model.state_dict(), sizes, torch.device("cpu"),
                                            loss="binary_cross_entropy")
    rng = numpy.random.default_rng(1)
    xt, yt = peer.batch(rng.standard_normal((32, 12)).astype("float32"),
                        rng.integers(0, 2, 32).astype("float32"))
    for _ in range(2):
        peer.step(xt, yt)
    before = [None if m is None else m.clone() for m in peer.masks]
    dense_before = peer.weights[-1].detach().clone()
    assert peer.redistribute_gradient_global(0.0, xt, yt) == 0
    moved = peer.redistribute_gradient_global(0.5, xt, yt)
    assert moved == sum(round(0.5 * int(m.sum())) for m in before if m is not None)
    assert sum(int(m.sum()) for m in peer.masks[:-1]) == sum(int(m.sum()) for m in before[:-1])
    assert peer.masks[-1] is None and torch.equal(peer.weights[-1].detach(), dense_before)
    for i, (old, new) in enumerate(zip(before[:-1], peer.masks[:-1])):
        changed = old != new
        w = peer.weights[i].detach()
        state = peer.optimizer.state[peer.weights[i]]
        grown = (new == 1) & (old == 0)
        assert torch.all(w[grown] == 0) and torch.all(w[new == 0] == 0)
        assert torch.all(state["exp_avg"][changed] == 0)
        assert torch.all(state["exp_avg_sq"][changed] == 0)
    peer.step(xt, yt)  # the optimizer still works on the new masks
    assert all(torch.all(w.detach()[m == 0] == 0) for w, m in zip(peer.weights, peer.masks)
               if m is not None)


def test_process_peak_sees_an_allocation():
    """In a fresh process, as the benchmark measures: in this one, memory that earlier tests
    freed may still be resident (glibc raises its mmap threshold after large frees) and
    serve the block without the resident set growing."""
    code = ("import sys, numpy, cupynn; sys.path.insert(0, sys.argv[1]); "
            "import bench_training as bench; "
            "meter = bench.ProcessPeak(cupynn.get_backend('cpu')); meter.start(); "
            "block = numpy.ones(8 * 2**20 // 8); print(meter.peak())")  # 8 MiB, touched
    done = subprocess.run([sys.executable, "-c", code, str(ROOT / "benchmarks")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    peak = int(done.stdout.split()[-1])
    assert 6 * 2**20 < peak < 64 * 2**20


def test_bench_table_runs(capsys):
    bench = _bench()
    assert bench.main(["--sizes", "20-8-3", "--densities", "0.5", "--batch", "4", "--steps", "1",
                       "--warmup", "1", "--pause", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "sparse" in out and "proc MiB" in out
    try:
        import torch  # noqa: F401
        has_torch = True
    except ImportError:
        has_torch = False
    assert ("cupynn / masked-dense peer" in out) == has_torch
    assert bench.main(["--sizes", "20-8-3", "--densities", "0.5", "--batch", "4", "--steps", "1",
                       "--pause", "0", "--device", "cpu", "--no-peer", "--no-memory"]) == 0
    assert "peer    : turned off" in capsys.readouterr().out


def test_bench_higgs_epoch_runs(tmp_path):
    bench = _bench()
    out = tmp_path / "h.json"
    assert bench.main(["--higgs-epoch", "--samples", "300", "--sizes", "21-8-8-1", "--batch", "32",
                       "--pause", "0", "--device", "cpu", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["higgs"][0]
    assert row["cupynn"]["steps"] == 10 and row["cupynn"]["fraction"] > 0
    if "peer" in row:
        assert row["peer"]["steps"] == 10 and row["peer"]["fraction"] == row["cupynn"]["fraction"]


def test_bench_kmnist_epoch_runs(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "k.json"
    assert bench.main(["--epoch", "kmnist", "--samples", "300", "--sizes", "784-8-8-10",
                       "--batch", "64", "--pause", "0", "--device", "cpu", "--json",
                       str(out)]) == 0
    report = json.loads(out.read_text())
    row = report["kmnist"][0]
    assert report["settings"]["progress_bar"] and report["settings"]["loss"] == "cross_entropy"
    assert row["cupynn"]["steps"] == 5 and row["cupynn"]["fraction"] > 0
    assert "cupynn_vs_paper" not in row  # the paper gives no KMNIST epoch time
    if "peer" in row:
        assert row["peer"]["steps"] == 5 and row["peer"]["fraction"] == row["cupynn"]["fraction"]
        assert row["cupynn_vs_peer"] == row["cupynn"]["epoch_s"] / row["peer"]["epoch_s"]
    assert "KMNIST epoch, cross_entropy, batch 64" in capsys.readouterr().out


def test_bench_epoch_options_are_checked():
    bench = _bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--higgs-epoch", "--epoch", "kmnist"])
    args = bench.parse_args(["--epoch", "higgs"])
    assert args.sizes == [(21, 256, 256, 256, 1)] and args.batch == 128
    assert args.samples == 500_000
    args = bench.parse_args(["--epoch", "kmnist"])
    assert args.sizes == [(784, 256, 256, 10)] and args.batch == 512 and args.samples == 60_000


def _bench_kernels():
    _bench()  # puts benchmarks/ on sys.path
    return importlib.import_module("bench_kernels")


def test_bench_kernels_quick_runs_and_reports_the_roofline(tmp_path, capsys):
    bench = _bench_kernels()
    out = tmp_path / "kernels.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["probe"]) == {"L2", "L3", "memory"}
    assert all(p["gb_s"] > 0 and p["bytes_per_thread"] > 0 for p in report["probe"].values())
    assert {r["kernel"] for r in report["kernels"]} == {"spmm", "sddmm", "spmm_t"}
    for r in report["kernels"]:
        assert r["level"] in report["probe"] and r["ms"] > 0 and r["bytes_per_nnz"] > 0
        assert r["roof_gb_s"] == report["probe"][r["level"]]["gb_s"]
        assert r["fraction_of_roof"] == pytest.approx(r["achieved_gb_s"] / r["roof_gb_s"])
    assert report["compile"] is None  # --quick skips the fresh-process compile timing
    text = capsys.readouterr().out
    assert "probe   : read bandwidth" in text and "of roof" in text
    report["compile"] = {"runs": 1, "empty_cache_s": 30.0, "from_cache_s": 1.5, "commit": "abc",
                         "baseline_empty_cache_s": 35.0, "baseline_from_cache_s": 1.4,
                         "baseline_commit": "def"}
    text = bench.format_report(report)
    assert "30.0 s from an empty Numba cache" in text
    assert "the baseline (commit def), alternating with it: 35.0 s" in text


def test_bench_kernels_options_are_checked():
    bench = _bench_kernels()
    with pytest.raises(SystemExit):
        bench.parse_args(["--repeats", "0"])
    args = bench.parse_args(["--quick"])
    assert (args.repeats, args.compile_runs) == (3, 0)

"""The GPU check (scripts/gpu_check.py): its CPU dry run, and the pieces only a GPU exercises.

CI has no GPU, so the dry run (``--device cpu --quick``) runs here end to end:
every part's code at small sizes, never reporting "passed" for what needs a
GPU. The GPU-only pieces that can be checked without one are checked on
fabricated input: the profiler-trace counting, pytest's summary line, the
reports built from GPU-shaped results, and a part that overruns its limit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package benchmarks.gpu_check, as scripts/gpu_check.py finds it

from benchmarks.gpu_check import context, runner  # noqa: E402
from benchmarks.gpu_check import report as reports  # noqa: E402
from benchmarks.gpu_check.parts import dense, kernels, launches, mpi  # noqa: E402
from benchmarks.gpu_check.parts import tests as tests_part  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device",
                           "cpu", "--quick", "--out", str(out), "--commit", "abc123"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    return done, out


def test_dry_run_runs_every_part_and_never_passes(dry_run):
    done, out = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / reports.REPORT_JSON).read_text())
    assert report["verdict"] == "dry run" and report["backend"] == "cpu"
    assert report["commit"] == "abc123"
    statuses = {p["name"]: p["status"] for p in report["parts"]}
    assert list(statuses) == list(runner.PART_NAMES)
    assert "passed" not in statuses.values(), statuses
    assert statuses["tests"] == statuses["launches"] == statuses["graph"] == "skipped: no GPU"
    for name in ("parity", "steps", "kernels", "higgs", "redistribution", "mpi", "env"):
        assert statuses[name] == "dry run", (name, report["parts"])
    for part in report["parts"]:
        assert part["wall_seconds"] > 0 and part["limit_seconds"] > 0
    # What each dry-run part measured is in the report.
    parts = {p["name"]: p for p in report["parts"]}
    assert parts["tests"]["data"]["collected"] > 100
    parity = parts["parity"]["data"]["results"]
    assert [r["algorithm"] for r in parity] == ["static", "random", "gradient", "gradient-global",
                                                "loss", "woodfisher", "woodtaylor"]
    assert all(r["ok"] and len(r["topology_equal"]) == 2 for r in parity)
    assert all(r["moved"][0] > 0 for r in parity if r["algorithm"] != "static")
    assert {r["model"] for r in parts["steps"]["data"]["steps"]} >= {"dense", "sparse"}
    assert parts["higgs"]["data"]["higgs"]["cupynn"]["steps"] == 32
    assert len(parts["redistribution"]["data"]["rows"]) == 7
    assert [r["config"] for r in parts["mpi"]["data"]["rows"]] == list(mpi.MPI_CONFIGS)
    assert all(r["ok"] for r in parts["mpi"]["data"]["rows"])


def test_dry_run_graph_part(dry_run):
    """On the CPU both GraphSteps launch eagerly: the same bits, the eager TrainStep
    within rounding, and nothing a GPU must show is claimed."""
    done, out = dry_run
    report = json.loads((out / reports.REPORT_JSON).read_text())
    part = next(p for p in report["parts"] if p["name"] == "graph")
    assert part["status"] == "skipped: no GPU", part
    assert not part["targets"]
    data = part["data"]
    assert [r["shape"] for r in data["equality"]] == ["kmnist", "higgs"]
    for row in data["equality"]:
        assert row["equal"] is True and row["max_abs_diff"] == 0.0, row
        assert row["steps"] == 12 and not row["captured"] and row["captures"] == 0
        assert row["eager_topology_equal"] and row["eager_ok"] and row["finite"], row
    assert [r["shape"] for r in data["steps"]] == ["kmnist", "higgs"]
    assert all(r["eager_ms"] > 0 and r["graph_ms"] > 0 and r["finite"] for r in data["steps"])
    epochs = data["epochs"]
    assert epochs["graph_off"]["steps"] == 32 and epochs["graph_on"] is None
    assert any("fit(graph=True) on the CPU refused" in note for note in part["notes"])
    markdown = (out / reports.REPORT_MD).read_text()
    assert "| kmnist | 784-32-32-10 | 64 | 12 | none (CPU) | True | 0 | True |" in markdown


def test_dry_run_prints_the_verdict_table_last_and_writes_markdown(dry_run):
    done, out = dry_run
    tail = done.stdout.strip().splitlines()
    table_start = next(i for i, line in enumerate(tail) if line.startswith("cupynn GPU check:"))
    assert "DRY RUN" in tail[table_start]
    assert [line.split()[0] for line in tail[table_start + 1:]] == list(runner.PART_NAMES)
    markdown = (out / reports.REPORT_MD).read_text()
    assert markdown.startswith("# cupynn GPU check: dry run")
    for name in runner.PART_NAMES:
        assert f"## {name}:" in markdown
    assert (out / tests_part.TESTS_LOG).exists()


def test_trace_counts_reads_kineto_traces():
    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "adam_f32"},
        {"ph": "X", "cat": "kernel", "name": "adam_f32"},
        {"ph": "X", "cat": "kernel", "name": "cupy_maximum"},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)"},
        {"ph": "X", "cat": "gpu_memset", "name": "Memset (Device)"},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel"},
        {"ph": "X", "cat": "cuda_driver", "name": "cuLaunchKernel"},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize"},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaMemcpy"},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaMemcpyAsync"},
        {"ph": "X", "cat": "cuda_driver", "name": "cuMemcpyDtoH_v2"},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaEventQuery"},
        {"ph": "i", "cat": "kernel", "name": "an instant, not a kernel"},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm"},
    ]}
    counts = launches.trace_counts(trace)
    assert counts["kernels"] == 3 and counts["memcpy"] == 1 and counts["memset"] == 1
    assert counts["api_calls"] == 7
    assert counts["waits"] == 3
    assert counts["wait_calls"] == ["cuMemcpyDtoH_v2", "cudaMemcpy", "cudaStreamSynchronize"]
    assert counts["by_kernel"] == {"adam_f32": 2, "cupy_maximum": 1}


@pytest.mark.parametrize("text, counts", [
    ("....\n4 passed in 1.2s", {"passed": 4}),
    ("x\n=== 3 passed, 2 skipped, 1 failed, 5 deselected in 9.0s ===",
     {"passed": 3, "skipped": 2, "failed": 1, "deselected": 5}),
    ("1 error in 0.1s", {"errors": 1}),
    ("no summary", {}),
])
def test_pytest_counts(text, counts):
    assert tests_part.pytest_counts(text) == counts


def test_a_part_over_its_limit_is_killed_and_reported(tmp_path):
    args = runner.parse_args(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    entry = runner.run_part(args, runner.Part("steps", "t", 1, 1), seconds=0.5)
    assert entry["status"] == "failed" and entry["summary"] == "timed out after 0 s"
    assert entry["wall_seconds"] < 30


def synthetic_group(kernel: str, times: dict, shape: str = "4096->4096 b512",
                    density: float = 0.1, default: str = "rows", choice: str | None = "vec",
                    dense_fp32: float | None = 400.0) -> dict:
    """One (kernel, shape, density) group with made-up times (None: absent)."""
    variants = {k: ({"status": kernels.ABSENT, "us": None} if t is None else
                    {"status": kernels.MEASURED, "us": t, "gb_s_min": 10.0, "gb_s_l2": 900.0,
                     "gflop_s": 1000.0, "peak_fraction": 0.015,
                     "bits_equal_default": k in (default, "tiles"), "max_rel_diff": 1e-7})
                for k, t in times.items()}
    return {"kernel": kernel, "shape": shape, "density": density, "nnz": 1679360,
            "default": default, "choice": choice, "variants": variants,
            "dense_us": {"cublas_fp32": dense_fp32, "cublas_tf32": 150.0,
                         "torch_masked_fp32": 450.0, "torch_masked_tf32": None}}


def gpu_shaped_kernels() -> dict:
    """The kernels part's data as a GPU run fills it (values made up)."""
    groups = [kernels.finish_group(synthetic_group(
        "spmm", {"rows": 529.0, "tiles": 300.0, "vec": 100.0, "cusparse": 1900.0,
                 "auto": 101.0})),
              kernels.finish_group(synthetic_group(
                  "spmm_t", {"rows": 799.0, "tiles": 400.0, "vec": 150.0, "cusparse": 8040.0,
                             "auto": 151.0})),
              kernels.finish_group(synthetic_group(
                  "sddmm", {"thread": 3509.0, "warp:4": 1003.0, "warp:8": 687.0,
                            "warp:16": 647.0, "warp:32": 886.0, "tiles:8": 500.0,
                            "tiles:16": 450.0, "vec:8": None, "vec:16": None, "auto": 640.0},
                  default="warp:16", choice="warp:16"))]
    steps = [{"sizes": "784-4096-4096-10", "batch": 512, "model": "dense", "density": 1.0,
              "kernels": None, "step_ms": 3.14, "vs_dense_fp32": 1.0},
             {"sizes": "784-4096-4096-10", "batch": 512, "model": "sparse", "density": 0.1,
              "kernels": "default", "step_ms": 3.91, "vs_dense_fp32": 3.91 / 3.14},
             {"sizes": "784-4096-4096-10", "batch": 512, "model": "sparse", "density": 0.1,
              "kernels": "auto", "step_ms": 1.2, "vs_dense_fp32": 1.2 / 3.14}]
    memory = [{"sizes": "784-4096-4096-10", "model": "sparse", "density": 0.1,
               "kernels": "default", "peak_bytes": 154 * 2**20, "vs_default": 1.0},
              {"sizes": "784-4096-4096-10", "model": "sparse", "density": 0.1,
               "kernels": "auto", "peak_bytes": 150 * 2**20, "vs_default": 150 / 154}]
    layer = {"4096->4096 b512 d=0.1": {
        key: kernels.layer_ms(groups, "4096->4096 b512", 0.1, f"{key}_us")
        for key in ("fastest", "default", "choice", "auto")}}
    return {"reps": 20, "peak": {"fp32_flops": 66.9e12, "formula": "132 SMs x 1.980 GHz x 128 "
                                                                   "FP32 lanes x 2"},
            "groups": groups, "dense_precisions": {"cublas_fp32": "cuBLAS FP32"},
            "layer_ms": layer, "steps": steps, "memory": memory,
            "memory_how": "CuPy pool high-water mark"}


def gpu_shaped_report() -> dict:
    """A report as a GPU run fills it (values made up), for the formatters."""
    part = context.result
    memory = [{"sizes": "784-256-256-10", "model": "dense", "density": 1.0, "peak_bytes": 2**24},
              {"sizes": "784-256-256-10", "model": "sparse", "density": 0.1, "peak_bytes": 2**22,
               "vs_dense": 0.25, "peer_peak_bytes": 2**25, "vs_peer": 0.125}]
    phases = [{"phase": "forward", "host_ms": 0.1, "queued_ms": 300.0, "waited": False}]
    parts = [
        part("passed", "300 passed", {"counts": {"passed": 300}, "failures": []}),
        part("failed", "6/7 algorithms equal", {"data": "KMNIST", "rows": 1600,
                                                 "sizes": [784, 256, 256, 10], "density": 0.1,
                                                 "dtype": "float64", "rtol": 1e-8, "results": [
            {"algorithm": "random", "topology_equal": [True, False], "moved": [9, 3],
             "loss_rel_diff": 1e-3, "weight_rel_diff": None, "ok": False}]}),
        part("passed", "s", {"steps": [{"sizes": "784-256-256-10", "model": "sparse",
                                        "density": 0.1, "step_ms": 0.5, "forward_ms": 0.1,
                                        "backward_ms": 0.3, "adam_ms": 0.1,
                                        "step_vs_dense": 0.9, "step_vs_peer": 0.5}],
                             "memory": memory}),
        part("passed", "s", gpu_shaped_kernels(),
             targets=kernels.kernel_targets(gpu_shaped_kernels()["groups"], gpu=True)),
        part("passed", "s", {"models": [{"model": "kmnist", "batch": 512, "step_waited": False,
                                         "phases_that_waited": [], "phases": phases,
                                         "per_step": {"kernels": 70.0, "memcpy": 2.0,
                                                      "memset": 1.0, "waits": 0.0}}]}),
        part("passed", "s", {"equality": [
            {"shape": "kmnist", "sizes": "784-256-256-10", "batch": 512, "steps": 12,
             "captures": 3, "captured": True, "equal": True, "max_abs_diff": 0.0,
             "eager_topology_equal": True, "eager_max_rel_diff": 2e-6,
             "eager_loss_rel_diff": 1e-7, "eager_ok": True, "finite": True}],
            "steps": [{"shape": "kmnist", "batch": 512, "steps_timed": 200, "eager_ms": 1.5,
                       "eager_fused_ms": 0.9, "graph_ms": 0.08, "graph_vs_eager": 0.08 / 1.5,
                       "captures": 1, "eager_counts": {"kernels": 45.0, "api_calls": 60.0},
                       "eager_fused_counts": {"kernels": 17.0, "api_calls": 30.0},
                       "graph_counts": {"kernels": 19.0, "api_calls": 2.0},
                       "eager_waited": False, "graph_waited": False, "finite": True}],
            "epochs": {"sizes": "21-256-256-256-1", "density": 0.1, "samples": 500000,
                       "batch": 128,
                       "graph_off": {"train_s": 6.0, "redistribution_s": 0.01, "epoch_s": 6.01,
                                     "steps": 3907},
                       "graph_on": {"train_s": 0.5, "redistribution_s": 0.01, "epoch_s": 0.51,
                                    "steps": 3907},
                       "peer_graph": {"train_s": 1.5, "redistribution_s": 0.02,
                                      "epoch_s": 1.52, "steps": 3907}},
            "eager_rtol": 1e-3},
             targets=[context.target("HIGGS epoch with graphs (s)", 0.51, 0.6, "s")]),
        part("passed", "s", {"higgs": {"sizes": "21-256-256-256-1", "density": 0.1,
                                       "samples": 500000,
                                       "cupynn": {"train_s": 1.0, "redistribution_s": 0.01,
                                                  "epoch_s": 1.01},
                                       "peer": {"train_s": 0.8, "redistribution_s": 0.02,
                                                "epoch_s": 0.82}},
                             "thread_sddmm": {"train_s": 1.2, "redistribution_s": 0.01,
                                              "epoch_s": 1.21}},
             targets=[context.target("HIGGS epoch (s)", 1.01, 0.6, "s"),
                      context.target("HIGGS epoch / peer epoch", None, 1.0)]),
        part("passed", "s", {"rows": [{"setting": "kmnist", "algorithm": "random",
                                       "redistribute_ms": 3.0, "start_epoch_ms": 0.1,
                                       "observe_ms": 0.0, "static_step_ms": 0.4,
                                       "overhead_share": 0.01}]}),
        part("passed", "s", {"rows": [{"config": "woodfisher", "topology_equal": True,
                                       "weight_rel_diff": 1e-15, "history_rel_diff": 0.0,
                                       "histories_equal": True, "ok": True}]}),
        part("passed", "H100", {"device": "NVIDIA H100", "driver": 13000}),
    ]
    for entry, spec in zip(parts, runner.PARTS):
        entry.update(name=spec.name, title=spec.title, wall_seconds=1.0, limit_seconds=9.0)
    return {"device": "NVIDIA H100 80GB HBM3", "backend": "gpu", "quick": False,
            "commit": "0123456789abcdef", "budget_seconds": 345, "started": "now",
            "wall_seconds": 8.0, "parts": parts, "verdict": runner.verdict(parts, True)}


def test_reports_of_a_gpu_run():
    report = gpu_shaped_report()
    assert report["verdict"] == "failed"  # parity failed
    markdown = reports.format_markdown(report)
    assert "| random | [True, False] | [9, 3] | 0.001 | - | False |" in markdown
    assert "| kmnist | 512 | 70 | 2 | 1 | 0 | False | none |" in markdown
    assert "| 784-256-256-10 | sparse | 0.1 | 4 | 0.25 | 32 | 0.125 |" in markdown
    assert "| higgs | HIGGS epoch (s) | 1.01 | 0.6 | missed |" in markdown
    assert "| higgs | HIGGS epoch / peer epoch | - | 1 | not measured |" in markdown
    assert "| woodfisher | True | 1e-15 | 0 | True | True |" in markdown
    # The kernels part: each kernel's table, absent variants, the layer's sums, the step.
    assert ("| 4096->4096 b512 | 0.1 | 1679360 | 529 | 300 | 100 | 1.9e+03 | 101 | vec | 10 "
            "| 900 | 1e+03 | 0.015 | vec, cusparse, auto | rows | 5.29 | vec | 1 | 1.01 | 400 "
            "| 150 | 450 | - | 0.25 |") in markdown
    assert "| 3.51e+03 | 1e+03 | 687 | 647 | 886 | 500 | 450 | absent | absent | 640 | tiles:16 |" \
        in markdown
    assert "| 4096->4096 b512 d=0.1 | 0.7 | 1.98 | 0.897 | 0.892 |" in markdown
    assert "| 784-4096-4096-10 | 512 | sparse | 0.1 | auto | 1.2 | 0.382 | 150 | 0.974 |" \
        in markdown
    assert ("| kernels | 4096->4096 b512 d=0.1: spmm + spmm_t + SDDMM, fastest variants (ms) "
            "| 0.7 | 0.45 | missed |") in markdown
    assert "| kmnist | 784-256-256-10 | 512 | 12 | 3 | True | 0 | True | 2e-06 | 1e-07 | True |" \
        in markdown
    assert ("| kmnist | 512 | 200 | 1.5 | 0.9 | 0.08 | 0.0533 | 45 | 17 | 19 | 60 | 2 | False "
            "| False |") in markdown
    assert "| cupynn, fit(graph=True) | 0.5 | 0.01 | 0.51 | 3907 |" in markdown
    assert "| torch masked-dense, CUDA graph | 1.5 | 0.02 | 1.52 | 3907 |" in markdown
    assert "| graph | HIGGS epoch with graphs (s) | 0.51 | 0.6 | met |" in markdown
    table = reports.format_table(report)
    assert table.splitlines()[0].startswith("cupynn GPU check: FAILED on NVIDIA H100")
    assert "target HIGGS epoch (s) <= 0.6: 1.01 missed" in table


def test_verdicts():
    def parts(*statuses):
        return [{"status": s} for s in statuses]

    assert runner.verdict(parts("passed", "passed"), True) == "passed"
    assert runner.verdict(parts("passed", "skipped: out of time"), True) == "incomplete"
    assert runner.verdict(parts("passed", "failed"), True) == "failed"
    assert runner.verdict(parts("dry run", "skipped: no GPU"), False) == "dry run"
    assert runner.verdict(parts("dry run", "failed"), False) == "failed"


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        runner.parse_args(["--out", "x", "--parts", "tests,speed"])
    with pytest.raises(SystemExit):
        runner.parse_args(["--out", "x", "--budget", "0"])
    assert runner.parse_args(["--out", "x", "--parts", "env,tests"]).parts == ["tests", "env"]


def test_numba_warm_up_runs():
    """What the GPU run starts in the background beside the GPU tests."""
    import time

    process = runner.start_numba_warm_up()
    runner._finish(process, time.monotonic() + 240)
    assert process.returncode == 0


# ----------------------------------------------------------------- the kernels part
def test_dry_run_kernels_part(dry_run):
    """Every kernel, variant, shape and density, with every column; CPU times marked as
    not GPU figures and the targets not measured."""
    done, out = dry_run
    report = json.loads((out / reports.REPORT_JSON).read_text())
    part = next(p for p in report["parts"] if p["name"] == "kernels")
    assert part["status"] == "dry run", part
    data = part["data"]
    shapes = [dense.shape_label(s) for s in kernels.QUICK_SHAPES_CPU]
    assert data["shapes"] == shapes
    assert [(g["kernel"], g["shape"], g["density"]) for g in data["groups"]] == [
        (k, s, d) for s in shapes for d in kernels.DENSITIES for k in kernels.KERNELS]
    columns = {"us", "gb_s_min", "gb_s_l2", "gflop_s", "peak_fraction", "bits_equal_default",
               "max_rel_diff"}
    for g in data["groups"]:
        variants = kernels.SDDMM_VARIANTS if g["kernel"] == "sddmm" else kernels.SPMM_VARIANTS
        assert list(g["variants"]) == [kernels.variant_label(m, n) for m, n in variants]
        methods = kernels.methods_of(g["kernel"])
        for label, v in g["variants"].items():
            if label.split(":")[0] in methods:  # on the CPU one Numba kernel: equal bits
                assert v["status"] == kernels.MEASURED and set(v) >= columns, (label, v)
                assert v["us"] > 0 and v["bits_equal_default"] and v["peak_fraction"] is None
            else:
                assert v["status"] == kernels.ABSENT and v["us"] is None
        assert g["fastest"] in g["variants"] and g["fastest"] != "auto"
        assert g["fastest_us"] == min(v["us"] for k, v in g["variants"].items()
                                      if k != "auto" and v["us"] is not None)
        assert set(g["dense_us"]) == set(dense.DENSE_KEYS)
        assert g["dense_us"]["cublas_fp32"] > 0 and g["dense_us"]["cublas_tf32"] is None
    assert any("not a GPU figure" in note for note in part["notes"])
    assert not part["targets"]  # the verdict's: GPU figures only
    assert [t["verdict"] for t in data["targets"]] == ["not measured"] * 8
    assert [r["model"] for r in data["steps"]][:2] == ["dense", "sparse"]
    assert all(r["step_ms"] > 0 for r in data["steps"] if r.get("status") != kernels.ABSENT)
    assert "tracemalloc" in data["memory_how"]
    markdown = (out / reports.REPORT_MD).read_text()
    for kernel in kernels.KERNELS:
        assert f"`{kernel}`:" in markdown
    assert "| shape | density | nnz | thread | warp:4 | warp:8 | warp:16 | warp:32 |" in markdown
    assert "a wall clock on the CPU: not GPU figures" in markdown
    assert ("| 4096->4096 b512 d=0.1: spmm + spmm_t + SDDMM, fastest variants (ms) | - | 0.45 "
            "| not measured |") in markdown


def small_layer():
    import numpy

    import cupynn

    layer = cupynn.SparseLinear(24, 16, 0.2, seed=1, device="cpu")
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((24, 8), dtype=numpy.float32)
    dy = rng.standard_normal((16, 8), dtype=numpy.float32)
    return layer, x, dy, numpy.empty(layer.nnz, dtype=numpy.float32)


def test_a_method_missing_from_the_commit_is_absent_not_a_crash(monkeypatch, tmp_path):
    from cupynn import kernels as ck

    monkeypatch.setattr(ck, "SPMM_METHODS", ("rows", "cusparse", "tiles"))
    monkeypatch.setattr(ck, "SDDMM_METHODS", ("thread", "warp", "tiles"))
    ctx = context.Context(runner.parse_args(["--device", "cpu", "--quick", "--out",
                                             str(tmp_path)]))
    layer, x, dy, out = small_layer()
    calls = kernels.kernel_calls(layer, x, dy, out)
    spmm = kernels.measure_group(ctx, "spmm", calls["spmm"], (24, 16, 8), 0.2, layer.nnz, 2,
                                 None, None)
    assert [k for k, v in spmm["variants"].items() if v["status"] == kernels.ABSENT] == [
        "vec", "auto"]
    assert spmm["choice"] is None
    sddmm = kernels.measure_group(ctx, "sddmm", calls["sddmm"], (24, 16, 8), 0.2, layer.nnz,
                                  2, None, lambda *a: ("warp", None))
    assert [k for k, v in sddmm["variants"].items() if v["status"] == kernels.ABSENT] == [
        "vec:8", "vec:16", "auto"]
    assert sddmm["default"] == sddmm["choice"] == "warp:8"  # sddmm_group(8)
    kernels.finish_group(sddmm)
    assert sddmm["auto_us"] is None and sddmm["auto_vs_fastest"] is None
    assert kernels.step_settings()["auto"] is None


def test_a_variant_that_raises_is_reported_and_fails_the_group(tmp_path):
    ctx = context.Context(runner.parse_args(["--device", "cpu", "--quick", "--out",
                                             str(tmp_path)]))
    layer, x, dy, out = small_layer()
    good = kernels.kernel_calls(layer, x, dy, out)["spmm"]

    def call(method, group):
        if method == "tiles":
            raise RuntimeError("illegal address")
        return good(method, group)

    g = kernels.measure_group(ctx, "spmm", call, (24, 16, 8), 0.2, layer.nnz, 2, None, None)
    assert g["variants"]["tiles"]["status"] == "error: RuntimeError: illegal address"
    assert g["variants"]["rows"]["status"] == kernels.MEASURED


def test_fastest_default_choice_and_auto_against_the_fastest():
    g = kernels.finish_group(synthetic_group(
        "spmm", {"rows": 500.0, "tiles": 250.0, "vec": None, "cusparse": 1000.0, "auto": 200.0},
        choice="rows", dense_fp32=1000.0))
    # "auto" is faster here but runs one of the others: the fastest is an explicit variant.
    assert g["fastest"] == "tiles" and g["fastest_us"] == 250.0
    assert g["default_vs_fastest"] == 2.0 and g["choice_vs_fastest"] == 2.0
    assert g["choice_is_fastest"] is False and g["auto_vs_fastest"] == 0.8
    assert g["fastest_vs_dense_fp32"] == 0.25
    none = kernels.finish_group(synthetic_group("spmm", {"rows": None, "auto": None},
                                                choice=None, dense_fp32=None))
    assert none["fastest"] is None and none["default_vs_fastest"] is None
    assert none["choice_is_fastest"] is None and none["fastest_vs_dense_fp32"] is None


def test_the_layer_sum_and_its_targets():
    shape = "4096->4096 b512"
    groups = [kernels.finish_group(synthetic_group(k, {"rows": us}, default="rows",
                                                   choice="rows", density=d))
              for d, times in ((0.1, (100.0, 150.0, 190.0)), (0.03, (50.0, 60.0, 41.0)))
              for k, us in zip(kernels.KERNELS, times)]
    assert kernels.layer_ms(groups, shape, 0.1) == pytest.approx(0.44)
    assert kernels.layer_ms(groups, shape, 0.03) == pytest.approx(0.151)
    met, missed = kernels.kernel_targets(groups, gpu=True)
    assert (met["limit"], met["verdict"]) == (0.45, "met")
    assert (missed["limit"], missed["verdict"]) == (0.15, "missed")
    assert [t["verdict"] for t in kernels.kernel_targets(groups, gpu=False)] == [
        "not measured"] * 2
    # A kernel missing, or a shape not run: no sum, not measured.
    assert kernels.layer_ms(groups[1:], shape, 0.1) is None
    assert kernels.layer_ms(groups, "784->256 b512", 0.1) is None
    assert kernels.kernel_targets(groups[3:], gpu=True)[0]["verdict"] == "not measured"


def test_step_targets_read_the_4096_step_on_a_gpu_only():
    rows = [{"sizes": "784-4096-4096-10", "density": 0.1, "kernels": "default",
             "vs_dense_fp32": 1.2},
            {"sizes": "784-4096-4096-10", "density": 0.1, "kernels": "auto",
             "vs_dense_fp32": 0.4},
            {"sizes": "784-4096-4096-10", "density": 0.03, "kernels": "auto",
             "vs_dense_fp32": None}]
    memory = [{"density": 0.1, "kernels": "auto", "vs_default": 1.1}]
    t = {x["name"]: x for x in kernels.step_targets(rows, memory, gpu=True)}
    assert t["784-4096-4096-10 step d=0.1, default kernels: sparse / dense FP32"]["verdict"] \
        == "missed"
    assert t["784-4096-4096-10 step d=0.1, auto kernels: sparse / dense FP32"]["verdict"] == "met"
    assert t["784-4096-4096-10 step d=0.03, auto kernels: sparse / dense FP32"]["verdict"] == \
        "not measured"
    assert t["step peak memory d=0.1: auto / default"]["verdict"] == "missed"
    assert t["step peak memory d=0.03: auto / default"]["verdict"] == "not measured"
    assert {x["verdict"] for x in kernels.step_targets(rows, memory, gpu=False)} == {
        "not measured"}


def test_byte_models_and_the_fp32_peak():
    # 4 rows x 3 columns, 5 nonzeros, batch 2, float32: pattern 4 * (5 + 5) + 4 * 5 = 60.
    assert kernels.byte_models("spmm", 3, 4, 2, 5) == (60 + 24 + 16 + 32, 60 + 40 + 16 + 32)
    assert kernels.byte_models("spmm_t", 3, 4, 2, 5) == (60 + 32 + 24, 60 + 40 + 24)
    assert kernels.byte_models("sddmm", 3, 4, 2, 5) == (60 + 32 + 24, 60 + 80)
    with pytest.raises(ValueError, match="kernel must be one of"):
        kernels.byte_models("spmv", 3, 4, 2, 5)
    # Issue 20: the 4096 layer at d = 0.1 pulls ~3.4 GB of batch rows per product.
    assert kernels.byte_models("spmm", 4096, 4096, 512, 1679360)[1] == pytest.approx(3.47e9,
                                                                                     rel=0.01)
    # H200: 132 SMs at 1.98 GHz, 128 FP32 lanes: 66.9 TFLOP/s; A100: 64 lanes, 19.5.
    assert kernels.fp32_peak_flops(132, 1_980_000, 9, 0) == pytest.approx(66.9e12, rel=1e-3)
    assert kernels.fp32_peak_flops(108, 1_410_000, 8, 0) == pytest.approx(19.5e12, rel=1e-3)


def test_choice_labels():
    labels = [kernels.variant_label(m, g) for m, g in kernels.SDDMM_VARIANTS]
    assert kernels.choice_label("sddmm", "vec", None, 512, labels) == "vec:16"
    assert kernels.choice_label("sddmm", "warp", None, 64, labels) == "warp:8"
    assert kernels.choice_label("sddmm", "warp", 4, 64, labels) == "warp:4"
    assert kernels.choice_label("sddmm", "thread", None, 512, labels) == "thread"
    assert kernels.choice_label("spmm", "vec", None, 512, ["rows", "vec"]) == "vec"


def test_median_time_takes_the_median_of_the_event_pairs():
    class Event:
        clock = iter(range(100))

        def record(self):
            self.t = next(Event.clock)

        def synchronize(self):
            pass

    calls = []
    # Pairs recorded at (0, 1), (2, 3), (4, 5): made-up elapsed times by the pair's start.
    elapsed = {0: 5.0, 2: 1.0, 4: 3.0}
    seconds = dense.median_time(lambda: calls.append(1), 3,
                                (Event, lambda s, e: elapsed[s.t]), warmup=2)
    assert seconds == 3.0 and len(calls) == 5


def test_time_steps_rotates_and_takes_medians():
    order = []

    def step(name, seconds):
        def run():
            order.append(name)
            return {"step": next(seconds)}
        return run

    # Each: a warm-up step, then per round one untimed step (9.0 s) before the timed ones.
    steps = {"a": step("a", iter([9.0, 9.0, 1.0, 2.0, 9.0, 3.0])),
             "b": step("b", iter([9.0, 9.0, 5.0, 6.0, 9.0, 7.0]))}
    medians = kernels.time_steps(steps, n=3, per_round=2, warmup=1)
    # Warm-ups; round 1: a (untimed, 2 timed), then b; round 2 starts with b (untimed, 1).
    assert order == ["a", "b", "a", "a", "a", "b", "b", "b", "b", "b", "a", "a"]
    assert medians == {"a": 2.0, "b": 6.0}


def test_the_tf32_child_runs_and_says_its_precision():
    """The plumbing of the CUPY_TF32=1 child, on the CPU (NumPy: no TF32 there)."""
    out, why = dense.tf32_us("cpu", [(8, 4, 4)], 1, timeout=120)
    assert why == "" and out["precision"] == "FP32 (NumPy on the CPU)"
    assert set(out["us"]["8->4 b4"]) == {"spmm", "spmm_t", "sddmm"}


def test_every_variant_runs_through_the_gpu_path_on_the_fake_gpu():
    """The GPU side of the calls (the transposed pattern, the row orders of "vec" and
    "auto", the SDDMM groups) on tests/fake_gpu.py's device, whose kernels are the C++
    emulation; its clock is the CPU's (the fake has no event timer), its cuSPARSE none."""
    import types

    import numpy

    import cupynn
    from fake_gpu import FakeGpu

    with FakeGpu() as fake:
        layer = cupynn.SparseLinear(12, 8, 0.3, seed=1, device=fake.backend)
        rng = numpy.random.default_rng(0)
        xp = fake.backend.xp
        x = xp.asarray(rng.standard_normal((12, 8), dtype=numpy.float32))
        dy = xp.asarray(rng.standard_normal((8, 8), dtype=numpy.float32))
        out = xp.empty(layer.nnz, dtype=numpy.float32)
        ctx = types.SimpleNamespace(gpu=False, backend=fake.backend)
        choose, _ = kernels.load_choose()
        groups = {k: kernels.measure_group(ctx, k, call, (12, 8, 8), 0.3, layer.nnz, 1, None,
                                           choose)
                  for k, call in kernels.kernel_calls(layer, x, dy, out).items()}
    for kernel, g in groups.items():
        methods = kernels.methods_of(kernel)
        for label, v in g["variants"].items():
            if label == "cusparse":
                assert v["status"].startswith("error: NotFaked"), v
            elif label.split(":")[0] in methods:
                assert v["status"] == kernels.MEASURED and v["max_rel_diff"] < 1e-5, (label, v)
            else:
                assert v["status"] == kernels.ABSENT
    # "rows", "tiles" and "vec" sum in one order; the tiled SDDMM is the warp kernel's.
    for kernel in ("spmm", "spmm_t"):
        assert all(groups[kernel]["variants"][k]["bits_equal_default"]
                   for k in ("rows", "tiles", "vec") if k.split(":")[0] in
                   kernels.methods_of(kernel))
    assert groups["sddmm"]["variants"]["tiles:8"]["bits_equal_default"]  # default warp:8


def test_device_peak_reads_the_properties_or_the_clock_attribute():
    import types

    def ctx(props, attribute):
        runtime = types.SimpleNamespace(getDeviceProperties=lambda device: props,
                                        deviceGetAttribute=attribute)
        cuda = types.SimpleNamespace(runtime=runtime, Device=lambda: types.SimpleNamespace(id=0))
        return types.SimpleNamespace(gpu=True, backend=types.SimpleNamespace(
            xp=types.SimpleNamespace(cuda=cuda)))

    h200 = {"multiProcessorCount": 132, "major": 9, "minor": 0}

    def clock(attr, device):
        assert attr == kernels.CUDA_CLOCK_RATE_ATTR
        return 1_980_000

    def missing(attr, device):
        raise RuntimeError("cudaErrorInvalidValue")

    for peak in (kernels.device_peak(ctx({**h200, "clockRate": 1_980_000}, missing)),
                 kernels.device_peak(ctx(h200, clock))):
        assert peak["fp32_flops"] == pytest.approx(66.9e12, rel=1e-3)
        assert peak["formula"] == "132 SMs x 1.980 GHz x 128 FP32 lanes x 2"
    lost = kernels.device_peak(ctx(h200, missing))
    assert lost["fp32_flops"] is None and "no clock rate" in lost["formula"]

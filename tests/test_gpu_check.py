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
from benchmarks.gpu_check.parts import launches, mpi, sddmm  # noqa: E402
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
    for name in ("parity", "steps", "sddmm", "higgs", "redistribution", "mpi", "env"):
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
        part("passed", "s", {"reps": 20, "rows": [
            {"shape": "784->256 b512", "density": 0.1, "nnz": 20000,
             "us": {"thread": 30.0, "warp4": 20.0, "warp8": 12.0, "warp16": 11.0, "warp32": 10.0},
             "fastest": "warp32", "default": "warp32"}]}),
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


def test_recommended_sddmm_is_the_best_over_all_shapes():
    rows = [{"us": {"thread": 30.0, "warp8": 10.0, "warp32": 11.0}},
            {"us": {"thread": 20.0, "warp8": 12.0, "warp32": 9.0}},
            {"us": {"thread": 20.0, "warp8": 10.0, "warp32": 10.5}}]
    # warp8: 1 * 12/9 * 1 = 1.33; warp32: 1.1 * 1 * 1.05 = 1.155 -> warp32
    assert sddmm.recommend(rows) == "warp32"
    assert sddmm.sddmm_env("warp32") == "CUPYNN_SDDMM=warp:32"
    assert sddmm.sddmm_env("thread") == "CUPYNN_SDDMM=thread"


def test_numba_warm_up_runs():
    """What the GPU run starts in the background beside the GPU tests."""
    import time

    process = runner.start_numba_warm_up()
    runner._finish(process, time.monotonic() + 240)
    assert process.returncode == 0

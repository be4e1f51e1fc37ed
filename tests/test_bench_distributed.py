"""benchmarks/bench_distributed.py: its figures come from real reductions and real runs.

Timings are never asserted. What is: the bytes a step all-reduces are those of
the model's gradients (about the density times DDP's), the projection follows
its stated formula, and the scaling mode runs mpiexec jobs end to end on a tiny
model (skipped without MPI, failed under CI).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_distributed as bd  # noqa: E402
from test_distributed import mpiexec  # noqa: E402


def test_step_bytes_are_the_gradients_and_the_loss():
    row = bd.step_bytes((20, 16, 4), (), 0.25)
    # nnz: 16 x 5 + 4 x 4 = 96 weights, 20 biases, 1 loss, float32
    assert row["cupynn_bytes"] == 4 * (96 + 20 + 1) and row["calls"] == 1
    assert row["ddp_bytes"] == 4 * (20 * 16 + 16 + 16 * 4 + 4)
    wide = bd.step_bytes((784, 4096, 4096, 10), (), 0.1)
    assert 0.09 < wide["ratio"] < 0.11


def test_projection_follows_its_formula():
    assert bd.allreduce_seconds(1e9, 1, 100, 10) == 0
    assert bd.allreduce_seconds(1e9, 8, 100, 10) == pytest.approx(2 * 7 / 8 * 0.01 + 6 * 10e-6)
    args = bd.parse_args(["--gpu-step-ms", "1", "--link-gbs", "100", "50", "--latency-us", "0"])
    rows = bd.projection({"cupynn_bytes": 1e6, "ddp_bytes": 1e7}, args)
    steps = math.ceil(bd.HIGGS_ROWS / bd.HIGGS_BATCH)
    eight = next(r for r in rows if r["gpus"] == 8 and r["mode"] == "batch 128 per GPU")
    assert eight["steps"] == math.ceil(steps / 8)
    assert eight["cupynn_epoch_s"] == pytest.approx(eight["steps"] * (1e-3 + 2 * 7 / 8 * 1e6 / 1e11))
    assert eight["ddp_epoch_s"] > eight["cupynn_epoch_s"]


def test_the_script_runs_end_to_end(tmp_path):
    mpiexec()  # skips (or fails under CI) without MPI
    out = tmp_path / "report.json"
    env = dict(os.environ, CUPYNN_BLAS_PIN="keep")  # tests keep the image's BLAS as it is
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_distributed.py"),
                           "--densities", "0.1", "--ranks", "1,2", "--scaling-sizes", "30-24-4",
                           "--batch", "16", "--steps", "3", "--pause", "0", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["ranks"] for r in report["scaling"]] == [1, 2]
    assert all(r["steps"] == 3 and r["step_ms"] > 0 for r in report["scaling"])
    assert report["scaling"][0]["allreduce_share"] == 0  # one rank: nothing to reduce
    assert "bytes all-reduced per training step" in done.stdout

"""The ``launches`` part: kernel launches and host waits per training step, and the
phases of a step it times one by one (:func:`step_phases`, :func:`kernel_phases`)."""

from __future__ import annotations

import gc
import json
import os
import re
import tempfile
import time
from typing import Any, Callable

import numpy

import cupynn
from cupynn import kernels

from ..context import FAILED, NO_GPU, PASSED, Context, result
from .env import torch_cuda


SYNC_CALLS = re.compile(r"Synchronize|^cudaMemcpy$|^cudaMemcpy2D$|^cuMemcpy(DtoH|HtoD|DtoD)?"
                        r"(_v2)?$|^cuMemcpy$")


def trace_counts(trace: dict[str, Any]) -> dict[str, Any]:
    """Counts from a PyTorch profiler (Kineto) Chrome trace: device kernels, copies,
    memsets, CUDA runtime/driver calls and the calls among them that make the host
    wait for the device (synchronize calls and blocking copies)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    kernels_ = [e["name"] for e in events if e.get("cat") == "kernel"]
    api = [e["name"] for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    waits = [name for name in api if SYNC_CALLS.search(name)]
    top: dict[str, int] = {}
    for name in kernels_:
        top[name] = top.get(name, 0) + 1
    return {"kernels": len(kernels_),
            "memcpy": sum(e.get("cat") == "gpu_memcpy" for e in events),
            "memset": sum(e.get("cat") == "gpu_memset" for e in events),
            "api_calls": len(api), "waits": len(waits), "wait_calls": sorted(set(waits)),
            "by_kernel": dict(sorted(top.items(), key=lambda kv: -kv[1])[:15])}


def profile_counts(torch: Any, fn: Callable[[], Any], repeat: int, sync: Callable[[], None]
                   ) -> dict[str, Any]:
    """Run ``fn`` ``repeat`` times under the PyTorch profiler (CUPTI sees every
    kernel of the process, CuPy's included); counts per call."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeat):
            fn()
        sync()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            counts = trace_counts(json.load(f))
    per_call = {k: v / repeat for k, v in counts.items() if isinstance(v, int)}
    per_call["wait_calls"] = counts["wait_calls"]
    per_call["by_kernel"] = {k: v / repeat for k, v in counts["by_kernel"].items()}
    return per_call


def host_waits(ctx: Context, phases: list[tuple[str, Callable[[], Any]]],
               busy_s: float = 0.3) -> list[dict[str, Any]]:
    """Which phases make the host wait for the device.

    Before each phase, about ``busy_s`` seconds of matrix products are queued on
    the device; the phase runs on the host; if the products are still running
    when it returns (``Event.done`` is False) the phase did not wait. A phase
    that waited took at least as long as the queue that was left."""
    cupy = ctx.backend.xp
    a = cupy.ones((2048, 2048), dtype=numpy.float32)
    b = cupy.empty_like(a)
    cupy.matmul(a, a, out=b)
    ctx.backend.synchronize()
    begin = time.perf_counter()
    for _ in range(5):
        cupy.matmul(a, a, out=b)
    ctx.backend.synchronize()
    per = (time.perf_counter() - begin) / 5
    reps = max(1, min(5000, int(busy_s / max(per, 1e-6))))
    out = []
    for name, fn in phases:
        ctx.backend.synchronize()
        for _ in range(reps):
            cupy.matmul(a, a, out=b)
        queued = cupy.cuda.get_current_stream().record()
        begin = time.perf_counter()
        fn()
        host = time.perf_counter() - begin
        done = bool(queued.done)
        ctx.backend.synchronize()
        out.append({"phase": name, "host_ms": 1e3 * host, "queued_ms": 1e3 * reps * per,
                    "waited": done})
    return out


def launch_models(ctx: Context) -> list[dict[str, Any]]:
    hidden = 32 if ctx.quick else 256
    return [
        dict(name="kmnist", sizes=(784, hidden, hidden, 10), dense=(), batch=512,
             loss="cross_entropy", redistribution=None),
        dict(name="kmnist+woodfisher", sizes=(784, hidden, hidden, 10), dense=(), batch=512,
             loss="cross_entropy", redistribution="woodfisher"),
        dict(name="higgs", sizes=(21, hidden, hidden, hidden, 1), dense=(-1,), batch=128,
             loss="binary_cross_entropy", redistribution=None)]


def step_trainer(ctx: Context, spec: dict[str, Any]) -> tuple[Any, numpy.ndarray, numpy.ndarray]:
    """A Trainer on random data of the spec's shape, its redistributor's epoch started."""
    rng = numpy.random.default_rng(0)
    n = 4 * spec["batch"]
    x = rng.random((n, spec["sizes"][0]), dtype=numpy.float32)
    classes = spec["sizes"][-1]
    y = (rng.integers(0, 2, n).astype(numpy.float32) if spec["loss"] == "binary_cross_entropy"
         else rng.integers(0, classes, n))
    model = cupynn.MLP(spec["sizes"], density=0.1, dense_layers=spec["dense"], seed=0,
                       device=ctx.backend)
    trainer = cupynn.Trainer(model, cupynn.Adam(model), (x, y), epochs=1,
                             batch_size=spec["batch"], loss=spec["loss"], progress=False,
                             redistribution=spec["redistribution"])
    if trainer.redistributor is not None:
        trainer.redistributor.start_epoch(model, 4, True)
    return trainer, x[:spec["batch"]], y[:spec["batch"]]


def step_phases(trainer: Any, x: numpy.ndarray, y: numpy.ndarray
                ) -> list[tuple[str, Callable[[], Any]]]:
    """The phases of the trainer's step (its ``TrainStep``), in order, then its kernels one
    by one, for finding the one that waits. The batch was checked on the host, as the
    epochs' batches are."""
    return trainer.step.phases(x, y, check=False) + kernel_phases(trainer, len(x))


def kernel_phases(trainer: Any, batch: int) -> list[tuple[str, Callable[[], Any]]]:
    """The sparse kernels of a step one by one, on the last sparse layer, so that a
    phase that waits can be traced to the call that waits."""
    model = trainer.model
    xp = model.backend.xp
    layer = model.sparse_layers[-1]
    x = xp.ones((layer.in_features, batch), dtype=model.dtype)
    dy = xp.ones((layer.out_features, batch), dtype=model.dtype)
    return [
        ("kernel spmm", lambda: kernels.spmm(layer.indptr, layer.indices, layer.data, x,
                                             check=False, bias=layer.bias, relu=True)),
        ("kernel relu_grad_rowsum", lambda: kernels.relu_grad_rowsum(dy, dy)),
        ("kernel sddmm", lambda: kernels.sddmm(layer.indptr, layer.indices, dy, x, check=False)),
        ("kernel spmm_t", lambda: kernels.spmm_t(layer.indptr, layer.indices, layer.data, dy,
                                                 layer.in_features, check=False,
                                                 transpose=layer.transposed_pattern())),
    ]


def part_launches(ctx: Context) -> dict[str, Any]:
    if not ctx.gpu:
        # Build the steps anyway, so that the code that sets them up cannot rot.
        for spec in launch_models(ctx):
            trainer, x, y = step_trainer(ctx, spec)
            for _, phase in step_phases(trainer, x, y):
                phase()
            trainer.train_batch(x, y)
        return result(NO_GPU, "launch counts and host waits need CUDA")
    torch, why = torch_cuda()
    rows, notes = [], []
    sync = ctx.backend.synchronize
    calibration = None
    if torch is None:
        notes.append(f"launch counts not measured: {why}")
    else:
        torch.cuda.init()
        p, g, m, v = (ctx.backend.xp.zeros(64, dtype=numpy.float32) for _ in range(4))

        def seven_adams():
            for _ in range(7):
                kernels.adam(p, g, m, v, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, bc1=0.1, bc2=0.1)

        profile_counts(torch, seven_adams, 1, sync)  # the profiler's own first-use costs
        calibration = profile_counts(torch, seven_adams, 1, sync)
        seen = calibration["by_kernel"].get("adam_f32", 0)
        if seen != 7:
            notes.append(f"calibration: the profiler saw {seen} of 7 adam_f32 launches; the "
                         f"launch counts below are not trusted")
    waits_total = 0
    for spec in launch_models(ctx):
        trainer, x, y = step_trainer(ctx, spec)
        for _ in range(3):
            trainer.train_batch(x, y)
        whole = host_waits(ctx, [("whole step", lambda: trainer.train_batch(x, y))])[0]
        phases = host_waits(ctx, step_phases(trainer, x, y))
        row = {"model": spec["name"], "sizes": "-".join(map(str, spec["sizes"])),
               "batch": spec["batch"], "step_waited": whole["waited"],
               "step_host_ms": whole["host_ms"], "queued_ms": whole["queued_ms"],
               "phases_that_waited": [p["phase"] for p in phases if p["waited"]],
               "phases": phases}
        if torch is not None:
            row["per_step"] = profile_counts(torch, lambda: trainer.train_batch(x, y), 10, sync)
        waits_total += whole["waited"]
        rows.append(row)
        del trainer
        gc.collect()
    launches = [f"{r['model']} {r['per_step']['kernels']:.0f}" for r in rows if "per_step" in r]
    summary = (f"kernels per step: {', '.join(launches) or 'not measured'}; "
               f"steps that made the host wait: {waits_total}/{len(rows)}")
    return result(PASSED if waits_total == 0 else FAILED, summary,
                  {"models": rows, "calibration": calibration}, notes)

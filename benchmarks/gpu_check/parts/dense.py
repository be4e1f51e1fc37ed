"""Dense baselines of a layer's three products for the ``kernels`` part, each named by
its precision, and the timer the part uses.

Per layer shape (``n_in``, ``n_out``, ``batch``), the dense product each sparse kernel
stands for (operands laid out as cupynn keeps them, feature-major):

======  ==========================  =================================================
kernel  cuBLAS (CuPy ``matmul``)    torch masked-dense (the peer's way, batch-major)
======  ==========================  =================================================
spmm    ``W @ x``                   ``F.linear(x, W * mask)``
spmm_t  ``W.T @ dy``                ``dy @ (W * mask)``
sddmm   ``dy @ x.T``                ``(dy.T @ x) * mask``
======  ==========================  =================================================

Precisions: ``cublas_fp32`` is CuPy's matmul in this process, whose compute type is
read back from CuPy (FP32 unless ``$CUPY_TF32`` was set when the part started);
``cublas_tf32`` runs in a child process started with ``CUPY_TF32=1`` (CuPy reads the
variable once per dtype, at the first matmul of the process: ``get_compute_type`` in
``cupy/_core/_routines_linalg.pyx``, so it cannot be switched in a running one); torch's
two run here with ``torch.backends.cuda.matmul.allow_tf32`` False, then True (restored
after). The times do not depend on the density (dense products), so each is taken once
per shape; the mask is drawn at density 0.1.
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import numpy

from ..context import ROOT

Shape = tuple[int, int, int]  # (n_in, n_out, batch)
Events = tuple[Callable[[], Any], Callable[[Any, Any], float]]  # make an event; seconds between
DENSE_KEYS = ("cublas_fp32", "cublas_tf32", "torch_masked_fp32", "torch_masked_tf32")
MASK_DENSITY = 0.1


def shape_label(shape: Shape) -> str:
    n_in, n_out, batch = shape
    return f"{n_in}->{n_out} b{batch}"


# ----------------------------------------------------------------- the timer
def cupy_events(cupy: Any) -> Events:
    return cupy.cuda.Event, lambda s, e: cupy.cuda.get_elapsed_time(s, e) / 1e3


def torch_events(torch: Any) -> Events:
    return (lambda: torch.cuda.Event(enable_timing=True)), lambda s, e: s.elapsed_time(e) / 1e3


def median_time(fn: Callable[[], Any], reps: int, events: Events | None = None,
                warmup: int = 2) -> float:
    """Seconds per call: the median over ``reps`` calls, each between two CUDA events
    (``events``), or a wall clock (``None``: the CPU), after ``warmup`` calls. The
    events of all calls are read after one synchronisation at the end, so the host
    queues the calls as a training step does."""
    for _ in range(warmup):
        fn()
    if events is None:
        samples = []
        for _ in range(reps):
            begin = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - begin)
        return statistics.median(samples)
    make, elapsed = events
    marks = [(make(), make()) for _ in range(reps)]
    for start, end in marks:
        start.record()
        fn()
        end.record()
    marks[-1][1].synchronize()
    return statistics.median(elapsed(s, e) for s, e in marks)


# ----------------------------------------------------------------- cuBLAS through CuPy
def cupy_precision(xp: Any) -> str:
    """The precision CuPy's float32 matmul computes in, as CuPy reports it."""
    if xp is numpy:
        return "FP32 (NumPy on the CPU)"
    try:
        linalg = importlib.import_module(f"{xp.__name__}._core._routines_linalg")
        name = str(linalg.compute_type_to_str(linalg.get_compute_type(numpy.float32)))
    except Exception as exc:  # a private module: say what is known instead
        return (f"unknown ({type(exc).__name__}); CUPY_TF32="
                f"{os.environ.get('CUPY_TF32', 'unset')}")
    if "TF32" in name.upper():
        return "TF32"
    return "FP32" if name.upper().endswith(("DEFAULT", "FP32", "PEDANTIC")) else name


def matmul_us(xp: Any, shapes: list[Shape], reps: int, events: Events | None
              ) -> dict[str, dict[str, float]]:
    """Microseconds of ``W @ x``, ``W.T @ dy`` and ``dy @ x.T`` per shape (float32)."""
    rng = numpy.random.default_rng(0)
    out: dict[str, dict[str, float]] = {}
    for shape in shapes:
        n_in, n_out, batch = shape
        w, x, dy = (xp.asarray(rng.standard_normal(s, dtype=numpy.float32))
                    for s in ((n_out, n_in), (n_in, batch), (n_out, batch)))
        ops = {"spmm": lambda: xp.matmul(w, x), "spmm_t": lambda: xp.matmul(w.T, dy),
               "sddmm": lambda: xp.matmul(dy, x.T)}
        out[shape_label(shape)] = {k: 1e6 * median_time(f, reps, events) for k, f in ops.items()}
    return out


def dense_child() -> None:
    """The child process of :func:`tf32_us`: ``sys.argv[1]`` is ``{"device", "shapes",
    "reps"}``; prints ``{"precision", "us"}`` as its last line of output."""
    import cupynn

    spec = json.loads(sys.argv[1])
    backend = cupynn.get_backend(spec["device"])
    xp = backend.xp
    events = cupy_events(xp) if backend.is_gpu else None
    us = matmul_us(xp, [tuple(s) for s in spec["shapes"]], spec["reps"], events)
    print(json.dumps({"precision": cupy_precision(xp), "us": us}))


CHILD = ("import sys; sys.path.insert(0, {root!r}); "
         "from benchmarks.gpu_check.parts.dense import dense_child; dense_child()")


def tf32_us(device: str, shapes: list[Shape], reps: int, timeout: float
            ) -> tuple[dict[str, Any] | None, str]:
    """CuPy's matmul under ``CUPY_TF32=1``, in a child process: ``({"precision", "us"},
    "")`` or ``(None, why not)``."""
    spec = json.dumps({"device": device, "shapes": [list(s) for s in shapes], "reps": reps})
    try:
        done = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), spec],
                              cwd=ROOT, env=dict(os.environ, CUPY_TF32="1"),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"the CUPY_TF32=1 child ran past {timeout:.0f} s"
    if done.returncode:
        return None, f"the CUPY_TF32=1 child failed: {(done.stderr or done.stdout)[-500:]}"
    return json.loads(done.stdout.strip().splitlines()[-1]), ""


# ----------------------------------------------------------------- torch masked-dense
def torch_masked_us(gpu: bool, shapes: list[Shape], reps: int
                    ) -> tuple[dict[str, dict[str, dict[str, float]] | None], str]:
    """torch masked-dense products with TF32 off and on: ``({"fp32": {shape: {kernel:
    us}}, "tf32": ... or None}, note)``; TF32 is a GPU setting, None on the CPU."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as exc:
        return {"fp32": None, "tf32": None}, f"torch not run: cannot import it ({exc})"
    if gpu and not torch.cuda.is_available():
        return {"fp32": None, "tf32": None}, f"torch {torch.__version__} sees no CUDA device"
    device = torch.device("cuda" if gpu else "cpu")
    events = torch_events(torch) if gpu else None
    gen = torch.Generator(device=device).manual_seed(0)
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    out: dict[str, Any] = {"fp32": None, "tf32": None}
    try:
        for key, allow in (("fp32", False), ("tf32", True)):
            if allow and not gpu:
                continue
            matmul.allow_tf32 = allow
            table: dict[str, dict[str, float]] = {}
            for shape in shapes:
                n_in, n_out, batch = shape
                w = torch.randn(n_out, n_in, device=device, generator=gen)
                mask = (torch.rand(n_out, n_in, device=device, generator=gen)
                        < MASK_DENSITY).to(w.dtype)
                x = torch.randn(batch, n_in, device=device, generator=gen)
                dy = torch.randn(batch, n_out, device=device, generator=gen)
                ops = {"spmm": lambda: F.linear(x, w * mask), "spmm_t": lambda: dy @ (w * mask),
                       "sddmm": lambda: (dy.t() @ x) * mask}
                table[shape_label(shape)] = {k: 1e6 * median_time(f, reps, events)
                                             for k, f in ops.items()}
            out[key] = table
    finally:
        matmul.allow_tf32 = before
    return out, f"torch {torch.__version__} on {device.type}"


def dense_baselines(xp: Any, gpu: bool, device: str, shapes: list[Shape], reps: int,
                    timeout: float) -> tuple[dict[str, dict[str, dict[str, float | None]]],
                                             dict[str, str], list[str]]:
    """Every baseline per shape and kernel: ``({shape: {kernel: {key: us}}}, {key:
    precision label}, notes)``; a baseline not run is None, and a note says why."""
    events = cupy_events(xp) if gpu else None
    fp32 = matmul_us(xp, shapes, reps, events)
    labels = {"cublas_fp32": ("cuBLAS " if gpu else "NumPy, CPU: ") + cupy_precision(xp)}
    notes: list[str] = []
    tf32, why = tf32_us(device, shapes, reps, timeout) if gpu else (None, "TF32 needs a GPU")
    labels["cublas_tf32"] = f"cuBLAS CUPY_TF32=1: {tf32['precision']}" if tf32 else "not run"
    if why:
        notes.append(f"cuBLAS TF32: {why}")
    try:
        torch_us, torch_note = torch_masked_us(gpu, shapes, reps)
    except Exception as exc:  # the other baselines stand without torch's
        torch_us, torch_note = {"fp32": None, "tf32": None}, \
            f"torch masked-dense failed: {type(exc).__name__}: {exc}"[:300]
    labels["torch_masked_fp32"] = (f"{torch_note}: allow_tf32=False (FP32)" if torch_us["fp32"]
                                   else "not run")
    labels["torch_masked_tf32"] = (f"{torch_note}: allow_tf32=True (TF32)" if torch_us["tf32"]
                                   else "not run")
    if torch_us["fp32"] is None:
        notes.append(torch_note)
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    for shape in shapes:
        label = shape_label(shape)
        sources = {"cublas_fp32": fp32, "cublas_tf32": tf32 and tf32["us"],
                   "torch_masked_fp32": torch_us["fp32"], "torch_masked_tf32": torch_us["tf32"]}
        table[label] = {kernel: {key: (src or {}).get(label, {}).get(kernel)
                                 for key, src in sources.items()}
                        for kernel in ("spmm", "spmm_t", "sddmm")}
    return table, labels, notes

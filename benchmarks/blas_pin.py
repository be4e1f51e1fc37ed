"""Benchmarks compare with the best dense BLAS this CPU can run.

Some images set ``OPENBLAS_CORETYPE`` (and ``OPENBLAS_L2_SIZE``), which pin
OpenBLAS to older kernels — on this project's machines AVX2 (``Haswell``) on a
CPU with AVX-512, making dense GEMM about 2.5 times slower. A user's machine
carries no such pin, so a benchmark's dense baseline must not either. OpenBLAS
reads these variables once, when NumPy loads it, so a benchmark script calls
:func:`release` before importing NumPy: it starts the script again without them.

Only benchmark scripts do this, when run as programs. Tests and CI leave the
environment as it is, and ``CUPYNN_BLAS_PIN=keep`` keeps the pin in a benchmark
too (the tests that run benchmark scripts set it). The report header names the
BLAS kernel architecture actually loaded (``threadpoolctl``), so a reader sees
which kernels the dense numbers come from.
"""

from __future__ import annotations

import os
import sys

PIN_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
KEEP_ENV = "CUPYNN_BLAS_PIN"
RELEASED_ENV = "CUPYNN_BLAS_PIN_RELEASED"  # what the restarted process had cleared


def release() -> None:
    """Restart this program without the OpenBLAS pin (unless ``CUPYNN_BLAS_PIN=keep``).

    Must run before NumPy is imported. Returns when there is nothing to clear.
    """
    if os.environ.get(KEEP_ENV, "").strip().lower() == "keep":
        return
    pinned = {name: os.environ[name] for name in PIN_VARIABLES if name in os.environ}
    if not pinned:
        return
    if "numpy" in sys.modules:
        raise RuntimeError("blas_pin.release() must run before NumPy is imported.")
    env = {k: v for k, v in os.environ.items() if k not in PIN_VARIABLES}
    env[RELEASED_ENV] = " ".join(f"{k}={v}" for k, v in pinned.items())
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def blas_state() -> dict[str, object]:
    """The BLAS this process runs: kernel architecture, library, threads, and any pin."""
    info: dict[str, object] = {
        "pin": {name: os.environ[name] for name in PIN_VARIABLES if name in os.environ},
        "pin_cleared": os.environ.get(RELEASED_ENV) or None,
    }
    try:
        import threadpoolctl

        blas = [d for d in threadpoolctl.threadpool_info() if d.get("user_api") == "blas"]
    except ImportError:  # pragma: no cover - scikit-learn brings it
        blas = []
    if blas:
        info["architecture"] = blas[0].get("architecture")
        info["library"] = f"{blas[0].get('internal_api')} {blas[0].get('version')}"
    return info


def describe(state: dict[str, object]) -> str:
    """One line for a report header."""
    pin = state.get("pin") or {}
    text = f"BLAS kernels {state.get('architecture') or 'unknown'}"
    if pin:
        text += " (pinned by " + ", ".join(f"{k}={v}" for k, v in pin.items()) + ")"
    elif state.get("pin_cleared"):
        text += f" (the image's pin {state['pin_cleared']} cleared for this benchmark)"
    return text

"""What the benchmarks say about the machine they ran on (shared by the scripts)."""

from __future__ import annotations

import os
import platform
from typing import Any

import numpy

import cupynn

THREAD_ENV = ("NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER", "OMP_NUM_THREADS", "OMP_WAIT_POLICY",
              "OPENBLAS_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT", "MKL_NUM_THREADS")


def cpu_model() -> str:
    """The CPU's name where the OS tells it (Linux), else platform's guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (a sign of other work on a shared machine)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def numba_threads() -> int | None:
    try:
        import numba

        return int(numba.get_num_threads())
    except ImportError:
        return None


def machine_info(backend: Any) -> dict[str, Any]:
    """Platform, CPU, library versions, thread counts and settings, device."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "cupynn": cupynn.__version__,
        "backend": backend.name,
        "device_name": backend.device_name(),
    }
    try:
        blas = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["blas"] = f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # older NumPy: no mode="dicts"
        info["blas"] = "unknown"
    try:
        import threadpoolctl

        info["blas_threads"] = {d["internal_api"]: d["num_threads"]
                                for d in threadpoolctl.threadpool_info()}
    except ImportError:
        pass
    try:
        import numba

        info["numba"] = numba.__version__
    except ImportError:
        info["numba"] = None
    info["numba_threads"] = numba_threads()
    if backend.is_gpu:
        info["cupy"] = backend.xp.__version__
    info["thread_env"] = {k: os.environ[k] for k in THREAD_ENV if k in os.environ}
    return info

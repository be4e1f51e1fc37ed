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
    from blas_pin import blas_state

    info["blas_kernels"] = blas_state()
    return info


def finish_info(info: dict[str, Any], load_before: list[float] | None) -> None:
    """What is known only after the run: the load average, Numba's threading layer."""
    info["load_average_before"] = load_before
    info["load_average_after"] = load_average()
    try:  # known once a parallel Numba kernel has run
        import numba

        info["numba_threading_layer"] = numba.threading_layer()
    except Exception:
        info["numba_threading_layer"] = None


def header_lines(m: dict[str, Any]) -> list[str]:
    """The machine, device and software lines of a report."""
    blas_threads = f", threads {m['blas_threads']}" if m.get("blas_threads") else ""
    from blas_pin import describe

    kernels = f"; {describe(m['blas_kernels'])}" if m.get("blas_kernels") else ""
    return [
        f"machine : {m['cpu']}, {m['cpu_count']} cores; {m['platform']}",
        f"device  : {m['backend']}: {m['device_name']}",
        f"software: python {m['python']}, numpy {m['numpy']} ({m['blas']}{blas_threads}"
        f"{kernels}), "
        f"numba {m['numba']} ({m['numba_threads']} threads, "
        f"{m.get('numba_threading_layer') or 'no'} layer)"
        + (f", cupy {m['cupy']}" if "cupy" in m else "") + f", cupynn {m['cupynn']}",
    ]


def load_and_env_lines(m: dict[str, Any], wall_seconds: float) -> list[str]:
    """The load-average and thread-settings lines of a report."""
    thread_env = " ".join(f"{k}={v}" for k, v in m["thread_env"].items())
    return [f"load avg: {m['load_average_before']} before, {m['load_average_after']} after "
            f"({wall_seconds} s)",
            f"env     : {thread_env or '(no thread settings)'}"]


def fmt(value: Any, spec: str) -> str:
    """``format`` that prints None as '-'."""
    return "-" if value is None else format(value, spec)


def publish(report: dict[str, Any], text: str, json_path: str | None) -> int:
    """Print a benchmark's report and, with ``--json``, write it: a script's exit status."""
    print(text)
    if json_path:
        write_json(json_path, report)
    return 0


def write_json(path: str, report: dict[str, Any]) -> None:
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"\nwrote {path}")

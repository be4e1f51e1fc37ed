"""The ``env`` part: device, driver, CUDA runtime, library versions and the commit."""

from __future__ import annotations

import platform
import subprocess
from typing import Any

import numpy

import cupynn
from cupynn import kernels

from ..context import ROOT, Context, result


def torch_cuda() -> tuple[Any, str]:
    """PyTorch with CUDA, or None and why not."""
    try:
        import torch
    except ImportError as exc:
        return None, f"torch cannot be imported ({exc})"
    if not torch.cuda.is_available():
        return None, f"torch {torch.__version__} sees no CUDA device"
    return torch, ""


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def environment(ctx: Context) -> dict[str, Any]:
    info: dict[str, Any] = {
        "commit": ctx.args.commit or git_commit() or "unknown",
        "cupynn": cupynn.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "numpy": numpy.__version__,
        "device": ctx.backend.device_name(), "backend": ctx.backend.name,
        "sddmm_default": list(kernels.sddmm_setting()),
    }
    import scipy

    info["scipy"] = scipy.__version__
    try:
        import numba

        info["numba"] = numba.__version__
    except ImportError:
        info["numba"] = None
    torch, why = torch_cuda()
    if torch is not None:
        info["torch"] = f"{torch.__version__} (CUDA {torch.version.cuda})"
    else:
        info["torch"] = why
    if ctx.gpu:
        cupy = ctx.backend.xp
        runtime = cupy.cuda.runtime
        props = runtime.getDeviceProperties(cupy.cuda.Device().id)
        info.update(cupy=cupy.__version__, driver=runtime.driverGetVersion(),
                    cuda_runtime=runtime.runtimeGetVersion(),
                    compute_capability=f"{props['major']}.{props['minor']}",
                    multiprocessors=props["multiProcessorCount"],
                    memory_gib=round(props["totalGlobalMem"] / 2**30, 1))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                                  "clocks.sm,clocks.max.sm,power.limit", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"not run: {exc}"
    return info


def part_env(ctx: Context) -> dict[str, Any]:
    info = environment(ctx)
    summary = f"{info['device']}, commit {info['commit'][:12]}"
    if ctx.gpu:
        summary += f", driver {info['driver']}, CUDA runtime {info['cuda_runtime']}, " \
                   f"CuPy {info['cupy']}"
    return result(ctx.measured(), summary, info)

"""What every operation's launch shares: the CUDA modules, compiled once per device,
the grid of a launch, and the Numba kernels (:mod:`.cpu`), imported on first use.

The ``.cu`` files are read from this folder (``KERNEL_DIR``; setup.cfg ships
them as package data) and compiled by NVRTC through CuPy the first time a kernel
of theirs runs on a device; the compiled module is kept for the process.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy

from ..backend import get_backend

KERNEL_DIR = Path(__file__).resolve().parent
CUDA_SOURCES = tuple(sorted(KERNEL_DIR.glob("*.cu")))

THREADS_PER_BLOCK = 256
MAX_BLOCKS = 65535
WARP_SIZE = 32
_SUFFIX = {numpy.dtype(numpy.float32): "f32", numpy.dtype(numpy.float64): "f64"}


@functools.lru_cache(maxsize=None)
def _cuda_module(filename: str, device_id: int) -> Any:
    """Compile a ``.cu`` file once per device (NVRTC, through CuPy)."""
    cupy = get_backend("gpu").xp
    source = (KERNEL_DIR / filename).read_text()
    with cupy.cuda.Device(device_id):
        return cupy.RawModule(code=source, options=("--std=c++14",))


_CPU_MODULE: list[Any] = []


def _cpu() -> Any:
    """The Numba kernels (:mod:`.cpu`), imported on first use: a GPU-only process
    never compiles or loads them, and a step's calls skip the import machinery."""
    if not _CPU_MODULE:
        from . import cpu

        _CPU_MODULE.append(cpu)
    return _CPU_MODULE[0]


def cuda_function(filename: str, name: str) -> Any:
    """The ``extern "C"`` kernel ``name`` of ``filename`` on the current device."""
    cupy = get_backend("gpu").xp
    return _cuda_module(filename, cupy.cuda.Device().id).get_function(name)


def _grid(n: int, max_blocks: int | None) -> tuple[int]:
    blocks = max(1, -(-n // THREADS_PER_BLOCK))
    return (min(blocks, max_blocks or MAX_BLOCKS),)


def numba_threads() -> int:
    import numba

    return int(numba.get_num_threads())

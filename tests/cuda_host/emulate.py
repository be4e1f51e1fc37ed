"""Run CUDA kernels on the CPU, one (block, thread) at a time.

A ``.cu`` file is compiled as plain C++ with ``cuda_host.h`` force-included
(g++, ``-x c++ -std=c++14``), loaded with :mod:`ctypes`, and :func:`launch`
calls a kernel once for every thread of a 1-D grid after setting the built-in
indices. This is exact for kernels whose threads are independent (one element
per thread, grid-stride loops), which is what lets the tests check the CUDA
sources against their NumPy twins on machines without a GPU. Kernels that
cooperate within a block do not compile under ``cuda_host.h``.

Typical use::

    lib = compile_cu(KERNEL_DIR / "adam.cu")
    launch(lib, "adam_f64", grid=2, block=32,
           argtypes=[pointer(numpy.float64)] * 4 + [ctypes.c_double] * 6 + [ctypes.c_longlong],
           args=[p, g, m, v, lr, b1, b2, eps, bc1, bc2, len(p)])

Arrays passed for pointer parameters must be C-contiguous and of the
pointer's element type; the kernel sees their data pointer only, as a CUDA
kernel launched through CuPy's ``RawKernel`` does.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy

HEADER = Path(__file__).resolve().parent / "cuda_host.h"
CXX_FLAGS = ("-x", "c++", "-std=c++14", "-O1", "-shared", "-fPIC")
SET_THREAD = "cupynn_host_set_thread"


class HostCompilerMissing(RuntimeError):
    """No C++ compiler to build the CPU emulation of a kernel."""


class HostCompileError(RuntimeError):
    """The C++ compiler rejected a ``.cu`` file; the message holds its log."""


def host_compiler() -> str:
    """Path of the C++ compiler: ``$CXX`` if set, else ``g++``.

    Raises
    ------
    HostCompilerMissing
        When that compiler is not on PATH.
    """
    name = os.environ.get("CXX") or "g++"
    path = shutil.which(name)
    if path is None:
        raise HostCompilerMissing(
            f"Emulating CUDA kernels on the CPU needs a C++ compiler, but {name!r} is not on "
            "PATH. Install g++ (e.g. `apt-get install g++`) or point $CXX at one.")
    return path


@functools.lru_cache(maxsize=None)
def _build_dir() -> Path:
    """One temporary directory per process for the compiled libraries."""
    path = Path(tempfile.mkdtemp(prefix="cupynn-cuda-host-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def compile_cu(path: str | os.PathLike) -> ctypes.CDLL:
    """Compile the ``.cu`` file at ``path`` for the CPU and load it.

    Cached per process on the file's content (and the header's), so each
    source is built once per test session and rebuilt when it changes.

    Raises
    ------
    HostCompilerMissing
        When there is no C++ compiler.
    HostCompileError
        When the source does not compile; the message has the compiler's log.
    """
    path = Path(path).resolve()
    cxx = host_compiler()
    digest = hashlib.sha256()
    for part in (cxx.encode(), " ".join(CXX_FLAGS).encode(), HEADER.read_bytes(),
                 path.read_bytes()):
        digest.update(part)
        digest.update(b"\0")
    return _compile(str(path), cxx, digest.hexdigest()[:16])


@functools.lru_cache(maxsize=None)
def _compile(path: str, cxx: str, digest: str) -> ctypes.CDLL:
    target = _build_dir() / f"{Path(path).stem}-{digest}.so"
    cmd = [cxx, *CXX_FLAGS, "-include", str(HEADER), path, "-o", str(target)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise HostCompileError(
            f"{Path(path).name} does not compile as host C++ with cuda_host.h "
            f"(exit status {result.returncode}).\ncommand: {' '.join(cmd)}\n"
            f"{result.stdout}{result.stderr}")
    lib = ctypes.CDLL(str(target))
    set_thread = getattr(lib, SET_THREAD)
    set_thread.argtypes = [ctypes.c_uint] * 4
    set_thread.restype = None
    return lib


def pointer(dtype: Any) -> type:
    """The ctypes pointer type for an array of ``dtype`` (``float*`` for float32)."""
    return ctypes.POINTER(numpy.ctypeslib.as_ctypes_type(numpy.dtype(dtype)))


def _dim(value: int | Sequence[int], what: str) -> int:
    """The x extent of a 1-D launch dimension given as an int or a tuple."""
    dims = (value,) if isinstance(value, (int, numpy.integer)) else tuple(value)
    if not dims or any(int(d) != 1 for d in dims[1:]):
        raise ValueError(f"launch emulates 1-D launches only; {what} must be an int or "
                         f"(x,), (x, 1) or (x, 1, 1). Got {value!r} instead.")
    if int(dims[0]) < 1:
        raise ValueError(f"{what} must be at least 1. Got {value!r} instead.")
    return int(dims[0])


def _argument(index: int, argtype: type, value: Any) -> Any:
    """Convert one kernel argument for ctypes, checking arrays against pointers."""
    if not isinstance(value, numpy.ndarray):
        return value
    is_pointer = argtype is ctypes.c_void_p or issubclass(argtype, ctypes._Pointer)
    if not is_pointer:
        raise TypeError(f"argument {index}: an array was given for a non-pointer "
                        f"parameter of type {argtype.__name__}.")
    if not value.flags.c_contiguous:
        raise ValueError(f"argument {index}: arrays passed to a kernel must be C-contiguous.")
    if argtype is not ctypes.c_void_p and numpy.dtype(argtype._type_) != value.dtype:
        raise TypeError(f"argument {index}: the kernel takes {argtype._type_.__name__}* but the "
                        f"array is {value.dtype}.")
    return value.ctypes.data_as(argtype)


def launch(lib: ctypes.CDLL, kernel_name: str, grid: int | Sequence[int],
           block: int | Sequence[int], argtypes: Sequence[type], args: Sequence[Any],
           reverse: bool = False) -> None:
    """Run ``kernel_name<<<grid, block>>>(*args)`` on the CPU, thread after thread.

    A GPU runs the threads in no set order; running them last to first
    (``reverse=True``) as well as first to last shows a kernel whose result
    depends on the order (a race between its threads).

    Parameters
    ----------
    lib : library from :func:`compile_cu`
    kernel_name : an ``extern "C"`` kernel of that library
    grid, block : int or 1-D tuple (y and z extents must be 1)
    argtypes : ctypes types of the kernel's parameters, in order
    args : NumPy arrays for pointer parameters, numbers for the others
    reverse : bool
        Run the blocks, and the threads of each block, last to first.
    """
    n_blocks = _dim(grid, "grid")
    n_threads = _dim(block, "block")
    if len(argtypes) != len(args):
        raise ValueError(f"{kernel_name}: {len(argtypes)} argtypes for {len(args)} arguments.")
    try:
        kernel = getattr(lib, kernel_name)
    except AttributeError:
        raise AttributeError(f"{lib._name} has no extern \"C\" kernel {kernel_name!r}.") from None
    kernel.argtypes = list(argtypes)
    kernel.restype = None
    c_args = [_argument(i, t, a) for i, (t, a) in enumerate(zip(argtypes, args, strict=True))]
    set_thread = getattr(lib, SET_THREAD)
    blocks, threads = range(n_blocks), range(n_threads)
    if reverse:
        blocks, threads = blocks[::-1], threads[::-1]
    for b in blocks:
        for t in threads:
            set_thread(b, t, n_threads, n_blocks)
            kernel(*c_args)

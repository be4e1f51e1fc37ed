"""Run CUDA kernels on the CPU: one (block, thread) at a time, or warp by warp.

A ``.cu`` file is compiled as plain C++ with ``cuda_host.h`` force-included
(g++, ``-x c++ -std=c++14``), loaded with :mod:`ctypes`, and :func:`launch`
calls a kernel once for every thread of a 1-D grid after setting the built-in
indices. That lets the tests check the CUDA sources against their NumPy twins
on machines without a GPU:

* kernels whose threads are independent (one element per thread, grid-stride
  loops) run one thread after another, which is exact for them;
* kernels whose lanes meet in warp-level calls (shuffles, ``__syncwarp``,
  votes) run warp by warp: the lanes of a warp are OS threads running the
  kernel together (ctypes lets go of the GIL during a call), and each
  warp-level call is a meeting of the lanes of its mask (``cuda_host.h``).
  Meetings that CUDA leaves undefined (a lane of the mask that has returned,
  lanes of one mask at different calls) raise :class:`WarpError`. Warps run
  one after another, so only what the lanes of one warp share is exercised.

Kernels that cooperate within a block (``__shared__``, ``__syncthreads``)
do not compile under ``cuda_host.h``.

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
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy

HEADER = Path(__file__).resolve().parent / "cuda_host.h"
CXX_FLAGS = ("-x", "c++", "-std=c++14", "-O1", "-shared", "-fPIC", "-pthread")
SET_THREAD = "cupynn_host_set_thread"
WARP_SIZE = 32
# A source that calls any of these runs warp by warp by default.
WARP_CALLS = re.compile(r"__(shfl|shfl_up|shfl_down|shfl_xor|ballot|any|all)_sync\b|__syncwarp\b")


class HostCompilerMissing(RuntimeError):
    """No C++ compiler to build the CPU emulation of a kernel."""


class HostCompileError(RuntimeError):
    """The C++ compiler rejected a ``.cu`` file; the message holds its log."""


class WarpError(RuntimeError):
    """Lanes of a warp met in a way CUDA leaves undefined (see ``cuda_host.h``)."""


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
    for name in (SET_THREAD, "cupynn_host_set_lane"):
        getattr(lib, name).argtypes = [ctypes.c_uint] * 4
        getattr(lib, name).restype = None
    lib.cupynn_host_begin_warp.argtypes = [ctypes.c_uint]
    lib.cupynn_host_begin_warp.restype = None
    lib.cupynn_host_lane_exit.argtypes = []
    lib.cupynn_host_lane_exit.restype = None
    lib.cupynn_host_take_error.argtypes = []
    lib.cupynn_host_take_error.restype = ctypes.c_char_p
    lib.cupynn_uses_warps = bool(WARP_CALLS.search(Path(path).read_text()))
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


@functools.lru_cache(maxsize=None)
def _lanes() -> ThreadPoolExecutor:
    """The OS threads that play the lanes of a warp (one per lane, reused)."""
    return ThreadPoolExecutor(max_workers=WARP_SIZE, thread_name_prefix="cuda-host-lane")


def _take_error(lib: ctypes.CDLL) -> str | None:
    message = lib.cupynn_host_take_error()
    return None if message is None else message.decode(errors="replace")


def launch(lib: ctypes.CDLL, kernel_name: str, grid: int | Sequence[int],
           block: int | Sequence[int], argtypes: Sequence[type], args: Sequence[Any],
           reverse: bool = False, warps: bool | None = None) -> None:
    """Run ``kernel_name<<<grid, block>>>(*args)`` on the CPU.

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
        Run the blocks, and the threads (or warps, and the lanes handed to
        the lane threads) of each block, last to first.
    warps : bool, optional
        Run warp by warp, the lanes of each warp together (see the module
        doc); by default when the source calls warp-level intrinsics. A last
        warp of fewer than 32 threads (``block`` not a multiple of 32) has
        only those lanes.

    Raises
    ------
    WarpError
        When the lanes of a warp meet in a way CUDA leaves undefined, or a
        warp-level call is made outside a warp launch.
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
    blocks = range(n_blocks)[::-1] if reverse else range(n_blocks)
    if warps is None:
        warps = getattr(lib, "cupynn_uses_warps", False)
    if not warps:
        set_thread = getattr(lib, SET_THREAD)
        threads = range(n_threads)[::-1] if reverse else range(n_threads)
        for b in blocks:
            for t in threads:
                set_thread(b, t, n_threads, n_blocks)
                kernel(*c_args)
        error = _take_error(lib)
        if error is not None:
            raise WarpError(f"{kernel_name}: {error}")
        return
    starts = range(0, n_threads, WARP_SIZE)
    for b in blocks:
        for start in (starts[::-1] if reverse else starts):
            lanes = range(start, min(start + WARP_SIZE, n_threads))
            _run_warp(lib, kernel, c_args, b, lanes, n_threads, n_blocks, reverse)
            error = _take_error(lib)
            if error is not None:
                raise WarpError(f"{kernel_name}, block {b}, warp {start // WARP_SIZE}: {error}")


def _run_warp(lib: ctypes.CDLL, kernel: Any, c_args: list[Any], block: int, lanes: range,
              n_threads: int, n_blocks: int, reverse: bool) -> None:
    """The lanes of one warp, each on its own OS thread, running the kernel together."""
    live = 0
    for t in lanes:
        live |= 1 << (t % WARP_SIZE)
    lib.cupynn_host_begin_warp(live)

    def lane(t: int) -> None:
        lib.cupynn_host_set_lane(block, t, n_threads, n_blocks)
        try:
            kernel(*c_args)
        finally:
            lib.cupynn_host_lane_exit()

    futures = [_lanes().submit(lane, t) for t in (lanes[::-1] if reverse else lanes)]
    for future in futures:
        future.result()

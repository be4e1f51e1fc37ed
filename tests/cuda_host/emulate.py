"""Run CUDA kernels on the CPU: one (block, thread) at a time, warp by warp, or block by block.

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
  one after another, so only what the lanes of one warp share is exercised;
* kernels that cooperate within a block (``__shared__`` memory,
  ``__syncthreads``) run block by block: the threads of a block (at most
  1024) are OS threads running the kernel together, sharing its
  ``__shared__`` variables and its ``extern __shared__`` array of
  ``shared_mem`` bytes, and each ``__syncthreads()`` is a barrier of all of
  them. Warp-level calls work there as in a warp launch. Barriers that CUDA
  leaves undefined raise :class:`BlockError`: a thread that reaches a
  ``__syncthreads`` after another thread of the block returned, or returns
  while others wait at one; threads at different ``__syncthreads`` calls
  (divergent barriers); a thread at a barrier while lanes of its warp wait for
  it at a warp-level call. Blocks run one after another, so they cannot see
  each other's shared memory, and each starts with its shared memory filled
  with 0xff bytes (NaN in floats, -1 in signed integers), so a kernel that
  reads shared memory before writing it gets numbers that show.

In warp and block launches the threads run one at a time: each runs until it
waits at a meeting or barrier, or returns, and then the first thread in launch
order that can go on runs (last to first with ``reverse=True``). A run is thus
deterministic; a kernel that lacks a ``__syncthreads`` between a write and
another thread's read reads the 0xff bytes in one order or both, so its
results differ from the expected ones or between the two orders; a deadlock
(every thread that has not returned waiting) is reported at once, never a
hang. A thread that spins on memory another thread writes would never end:
such a launch raises :class:`BlockError` after ``LAUNCH_TIMEOUT_S``.

Limitations: 1-D launches; ``extern __shared__`` declared as
``extern __shared__ T name[];`` in the ``.cu`` file itself (compile_cu
rewrites each into a pointer to the dynamic arena; not in included files); a
``__shared__`` variable inside a function template is not refilled between
blocks (g++ ignores its section, GCC bug 70435); no atomics.

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
import concurrent.futures
import ctypes
import functools
import hashlib
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy

HEADER = Path(__file__).resolve().parent / "cuda_host.h"
CXX_FLAGS = ("-x", "c++", "-std=c++14", "-O1", "-shared", "-fPIC", "-pthread")
# Added for files that declare __shared__ variables (see cuda_host.h).
SHARED_FLAGS = ("-fno-weak",)
SET_THREAD = "cupynn_host_set_thread"
WARP_SIZE = 32
MAX_BLOCK_THREADS = 1024  # CUDA's limit; in a block launch each thread is an OS thread
# How long the threads of one warp or block launch may run before launch gives up.
LAUNCH_TIMEOUT_S = 60.0
# A source that calls any of these (outside comments) runs warp by warp by default...
WARP_CALLS = re.compile(r"__(shfl|shfl_up|shfl_down|shfl_xor|ballot|any|all)_sync\b|__syncwarp\b")
# ... and one that uses any of these block by block.
BLOCK_CALLS = re.compile(r"\b__syncthreads(_count|_and|_or)?\b|\b__shared__\b")
COMMENTS = re.compile(r"//[^\n]*|/\*.*?\*/", re.DOTALL)
# `extern __shared__ T name[];`, which compile_cu rewrites as a pointer into the arena.
EXTERN_SHARED = re.compile(r"\bextern\s+__shared__\s+([^;\[\]{}]*?)\s*\b([A-Za-z_]\w*)\s*"
                           r"\[\s*\]\s*;")
ALIGN = re.compile(r"__align__\s*\(\s*\w+\s*\)|__attribute__\s*\(\(.*?\)\)")
_WARP_MODE, _BLOCK_MODE = 1, 2


class HostCompilerMissing(RuntimeError):
    """No C++ compiler to build the CPU emulation of a kernel."""


class HostCompileError(RuntimeError):
    """The C++ compiler rejected a ``.cu`` file; the message holds its log."""


class WarpError(RuntimeError):
    """Lanes of a warp met in a way CUDA leaves undefined (see ``cuda_host.h``)."""


class BlockError(RuntimeError):
    """Threads of a block met at ``__syncthreads`` in a way CUDA leaves undefined, deadlocked,
    or never ended (see ``cuda_host.h``)."""


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
    source is built once per test session and rebuilt when it changes. A file
    with ``extern __shared__`` declarations is compiled from a copy in which
    each is a pointer into the dynamic shared memory (same line numbers, and
    ``#line`` keeps the file's name in messages).

    The library's ``cupynn_uses_warps`` and ``cupynn_uses_blocks`` say whether
    its code (outside comments) calls warp-level intrinsics, and uses
    ``__shared__`` or ``__syncthreads``: :func:`launch`'s default mode.

    Raises
    ------
    HostCompilerMissing
        When there is no C++ compiler.
    HostCompileError
        When the source does not compile; the message has the compiler's log.
    """
    path = Path(path).resolve()
    cxx = host_compiler()
    text = path.read_text()
    code = _code(text)
    flags = CXX_FLAGS + (SHARED_FLAGS if "__shared__" in code else ())
    digest = hashlib.sha256()
    for part in (cxx.encode(), " ".join(flags).encode(), HEADER.read_bytes(), text.encode()):
        digest.update(part)
        digest.update(b"\0")
    lib = _compile(str(path), cxx, flags, digest.hexdigest()[:16])
    lib.cupynn_uses_warps = bool(WARP_CALLS.search(code))
    lib.cupynn_uses_blocks = bool(BLOCK_CALLS.search(code))
    return lib


def _code(text: str) -> str:
    """``text`` without its comments (their lines kept, so line numbers stay)."""
    return COMMENTS.sub(lambda m: "\n" * m.group(0).count("\n") or " ", text)


def _dynamic_shared(match: re.Match) -> str:
    """``extern __shared__ T name[];`` as a pointer into the dynamic shared memory."""
    element = " ".join(ALIGN.sub(" ", match.group(1)).split())
    newlines = "\n" * match.group(0).count("\n")  # keep the line numbers
    return (f"{element}* const {match.group(2)} = "
            f"static_cast<{element}*>(cupynn_host::dynamic_shared());{newlines}")


def _rewrite(path: Path, target: Path) -> Path:
    """The source to compile: ``path`` itself, or a copy with ``extern __shared__`` rewritten."""
    text = path.read_text()
    if not re.search(r"\bextern\s+__shared__\b", _code(text)):
        return path
    rewritten = EXTERN_SHARED.sub(_dynamic_shared, text)
    code = _code(rewritten)
    left = re.search(r"\bextern\s+__shared__\b[^;]*;?", code)
    if left:
        line = code.count("\n", 0, left.start()) + 1
        raise HostCompileError(
            f"{path.name}:{line}: cuda_host.h emulates dynamic shared memory declared as "
            f"`extern __shared__ T name[];` (one array per declaration); got {left.group(0)!r}.")
    source = target.with_suffix(".cu")
    source.write_text(f'#line 1 "{path}"\n{rewritten}')
    return source


@functools.lru_cache(maxsize=None)
def _compile(path: str, cxx: str, flags: tuple[str, ...], digest: str) -> ctypes.CDLL:
    target = _build_dir() / f"{Path(path).stem}-{digest}.so"
    source = _rewrite(Path(path), target)
    cmd = [cxx, *flags, "-include", str(HEADER), "-iquote", str(Path(path).parent),
           str(source), "-o", str(target)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise HostCompileError(
            f"{Path(path).name} does not compile as host C++ with cuda_host.h "
            f"(exit status {result.returncode}).\ncommand: {' '.join(cmd)}\n"
            f"{result.stdout}{result.stderr}")
    lib = ctypes.CDLL(str(target))
    for name in (SET_THREAD, "cupynn_host_enter"):
        getattr(lib, name).argtypes = [ctypes.c_uint] * 4
        getattr(lib, name).restype = None
    lib.cupynn_host_begin_block.argtypes = [ctypes.c_ulonglong]
    lib.cupynn_host_begin_block.restype = None
    lib.cupynn_host_dynamic_shared_capacity.argtypes = []
    lib.cupynn_host_dynamic_shared_capacity.restype = ctypes.c_ulonglong
    lib.cupynn_host_begin_group.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_int,
                                            ctypes.c_int]
    lib.cupynn_host_begin_group.restype = None
    lib.cupynn_host_exit.argtypes = []
    lib.cupynn_host_exit.restype = None
    lib.cupynn_host_take_error.argtypes = []
    lib.cupynn_host_take_error.restype = ctypes.c_char_p
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


class _Threads:
    """The OS threads that play the threads of a warp or block, one each, reused.

    Daemons, unlike a ThreadPoolExecutor's: a thread stuck in a kernel's endless loop (see
    LAUNCH_TIMEOUT_S) must not hold the interpreter at exit. Never fewer than the tasks
    submitted and not done, since the threads of a launch wait for each other.
    """

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0

    def submit(self, fn: Any, *args: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._idle:
                self._idle -= 1  # that thread takes this task
            else:
                threading.Thread(target=self._work, name="cuda-host", daemon=True).start()
        self._tasks.put((future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            future, fn, args = self._tasks.get()
            result = error = None
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the launch that waits for it
                error = exc
            with self._lock:  # idle before the launch hears it is done: the next reuses it
                self._idle += 1
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)


@functools.lru_cache(maxsize=None)
def _threads() -> _Threads:
    return _Threads()


def _raise_error(lib: ctypes.CDLL, where: str) -> None:
    """Raise the error the last launch recorded, as WarpError or BlockError by its kind."""
    message = lib.cupynn_host_take_error()
    if message is None:
        return
    kind, text = message[:1], message[1:].decode(errors="replace")
    raise (BlockError if kind == b"B" else WarpError)(f"{where}: {text}")


def launch(lib: ctypes.CDLL, kernel_name: str, grid: int | Sequence[int],
           block: int | Sequence[int], argtypes: Sequence[type], args: Sequence[Any],
           reverse: bool = False, warps: bool | None = None, blocks: bool | None = None,
           shared_mem: int = 0) -> None:
    """Run ``kernel_name<<<grid, block, shared_mem>>>(*args)`` on the CPU.

    A GPU runs the threads in no set order; running them last to first
    (``reverse=True``) as well as first to last shows a kernel whose result
    depends on the order (a race between its threads).

    Parameters
    ----------
    lib : library from :func:`compile_cu`
    kernel_name : an ``extern "C"`` kernel of that library
    grid, block : int or 1-D tuple (y and z extents must be 1); at most 1024
        threads in a block
    argtypes : ctypes types of the kernel's parameters, in order
    args : NumPy arrays for pointer parameters, numbers for the others
    reverse : bool
        Run the blocks, and the threads (or warps, and the lanes) of each
        block, last to first.
    warps : bool, optional
        Run warp by warp, the lanes of each warp together (see the module
        doc); by default when the source calls warp-level intrinsics. A last
        warp of fewer than 32 threads (``block`` not a multiple of 32) has
        only those lanes.
    blocks : bool, optional
        Run block by block, all the threads of each block together, with
        ``__syncthreads`` barriers and warp-level calls; by default when the
        source uses ``__shared__`` or ``__syncthreads``. Takes precedence over
        ``warps``; ``blocks=False`` with ``warps=False`` runs one thread at a
        time (then ``__syncthreads`` raises).
    shared_mem : int
        Bytes of dynamic shared memory (``extern __shared__ T name[];``) per
        block, as the third launch parameter of CUDA; at most 227 KiB.

    Raises
    ------
    ValueError
        For a block of more than 1024 threads or a bad ``shared_mem``.
    WarpError
        When the lanes of a warp meet in a way CUDA leaves undefined, or a
        warp-level call is made outside a warp or block launch.
    BlockError
        When the threads of a block meet at barriers in a way CUDA leaves
        undefined, deadlock, or have not ended after ``LAUNCH_TIMEOUT_S``.
    """
    n_blocks = _dim(grid, "grid")
    n_threads = _dim(block, "block")
    if n_threads > MAX_BLOCK_THREADS:
        raise ValueError(f"{kernel_name}: a block has at most {MAX_BLOCK_THREADS} threads in "
                         f"CUDA (and here each may be an OS thread). Got {n_threads} instead.")
    capacity = lib.cupynn_host_dynamic_shared_capacity()
    if (not isinstance(shared_mem, (int, numpy.integer)) or isinstance(shared_mem, bool)
            or not 0 <= shared_mem <= capacity):
        raise ValueError(f"{kernel_name}: shared_mem must be a number of bytes in [0, "
                         f"{capacity}] (227 KiB, the most a GPU gives a block). "
                         f"Got {shared_mem!r} instead.")
    if len(argtypes) != len(args):
        raise ValueError(f"{kernel_name}: {len(argtypes)} argtypes for {len(args)} arguments.")
    broken = getattr(lib, "cupynn_stuck", None)
    if broken is not None:
        raise BlockError(f"{kernel_name}: {lib._name} cannot launch again: {broken}")
    try:
        kernel = getattr(lib, kernel_name)
    except AttributeError:
        raise AttributeError(f"{lib._name} has no extern \"C\" kernel {kernel_name!r}.") from None
    kernel.argtypes = list(argtypes)
    kernel.restype = None
    c_args = [_argument(i, t, a) for i, (t, a) in enumerate(zip(argtypes, args, strict=True))]
    order = (lambda r: r[::-1]) if reverse else (lambda r: r)
    if blocks is None:
        blocks = getattr(lib, "cupynn_uses_blocks", False)
    if warps is None:
        warps = getattr(lib, "cupynn_uses_warps", False)
    if blocks:
        for b in order(range(n_blocks)):
            lib.cupynn_host_begin_block(shared_mem)
            _run_group(lib, kernel, kernel_name, c_args, b, range(n_threads), n_blocks, reverse,
                       _BLOCK_MODE)
            _raise_error(lib, f"{kernel_name}, block {b}")
    elif warps:
        starts = range(0, n_threads, WARP_SIZE)
        for b in order(range(n_blocks)):
            lib.cupynn_host_begin_block(shared_mem)
            for start in order(starts):
                lanes = range(start, min(start + WARP_SIZE, n_threads))
                _run_group(lib, kernel, kernel_name, c_args, b, lanes, n_blocks, reverse,
                           _WARP_MODE, n_threads)
                _raise_error(lib, f"{kernel_name}, block {b}, warp {start // WARP_SIZE}")
    else:
        set_thread = getattr(lib, SET_THREAD)
        for b in order(range(n_blocks)):
            lib.cupynn_host_begin_block(shared_mem)
            for t in order(range(n_threads)):
                set_thread(b, t, n_threads, n_blocks)
                kernel(*c_args)
        _raise_error(lib, kernel_name)


def _run_group(lib: ctypes.CDLL, kernel: Any, kernel_name: str, c_args: list[Any], block: int,
               threads: range, n_blocks: int, reverse: bool, mode: int,
               n_threads: int | None = None) -> None:
    """Threads ``threads`` of a block (a warp, or the whole block), each on its own OS thread,
    running the kernel together and one at a time, handing a baton on (``cuda_host.h``)."""
    block_dim = len(threads) if n_threads is None else n_threads
    lib.cupynn_host_begin_group(threads.start, threads.stop, int(reverse), mode)

    def thread(t: int) -> None:
        lib.cupynn_host_enter(block, t, block_dim, n_blocks)
        try:
            kernel(*c_args)
        finally:
            lib.cupynn_host_exit()

    futures = [_threads().submit(thread, t) for t in (threads[::-1] if reverse else threads)]
    _, running = concurrent.futures.wait(futures, timeout=LAUNCH_TIMEOUT_S)
    if running:
        lib.cupynn_stuck = (f"{kernel_name}, block {block}: {len(running)} of its threads still "
                            f"ran after {LAUNCH_TIMEOUT_S:g} s")
        raise BlockError(
            f"{lib.cupynn_stuck}: an endless loop, or a thread that spins on memory another "
            "thread writes (the threads run one at a time here, switching only at barriers, "
            "warp-level calls and returns). The library stays unusable.")
    for future in futures:
        future.result()

"""Sparse kernels, dispatched on the array's backend.

Each operation here runs a CUDA ``RawKernel`` (``*.cu`` beside this file; the
products can also go through cuSPARSE, see :func:`set_spmm`) on the GPU, and a
compiled Numba kernel (:mod:`.cpu`, :mod:`.cpu_fisher`) on the CPU.
Every custom CUDA kernel has a NumPy twin of the same name in
:mod:`.numpy_twins`; the tests compare all of them.

The wrappers check dtypes, contiguity and shapes on every call (cheap, no
device synchronisation). Index ranges cost a pass over the indices, so they are
checked when ``check=True`` (the default for direct calls); layers validate
their topology once when it is set and then call with ``check=False``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy

from ..backend import backend_of, get_backend
from ..validation import check_csr

KERNEL_DIR = Path(__file__).resolve().parent
CUDA_SOURCES = tuple(sorted(KERNEL_DIR.glob("*.cu")))

THREADS_PER_BLOCK = 256
# Blocks per tile of the packed inverse Fisher (fisher.cu): two warps' worth of
# lanes, and the width of the CPU kernels' vectorised loops.
FISHER_TILE = 64
MAX_BLOCKS = 65535
WARP_SIZE = 32
SDDMM_METHODS = ("thread", "warp")
SDDMM_ENV = "CUPYNN_SDDMM"
SPMM_METHODS = ("rows", "cusparse")
SPMM_ENV = "CUPYNN_SPMM"
SPMM_MAX_THREADS = 256  # threads per block of spmm.cu, along the batch
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


def _float_suffix(*arrays: Any, what: str) -> str:
    dtype = arrays[0].dtype
    if dtype not in _SUFFIX:
        raise TypeError(f"{what}: float arrays must be float32 or float64. Got {dtype} instead.")
    for a in arrays[1:]:
        if a.dtype != dtype:
            raise TypeError(f"{what}: all float arrays must have one dtype. "
                            f"Got {dtype} and {a.dtype} instead.")
    return _SUFFIX[dtype]


def _check_contiguous(what: str, **arrays: Any) -> None:
    for name, a in arrays.items():
        if not a.flags.c_contiguous:
            raise ValueError(f"{what}: {name!r} must be C-contiguous.")


def _check_same_backend(what: str, *arrays: Any) -> Any:
    backend = backend_of(arrays[0])
    if any(backend_of(a) is not backend for a in arrays[1:]):
        raise TypeError(f"{what}: all arrays must live on one device ({backend.name}).")
    return backend


def _check_pattern(what: str, indptr: Any, indices: Any, n_rows: int, n_cols: int,
                   check: bool, data: Any = None) -> None:
    """dtypes, shapes and contiguity of a CSR pattern (and its values); with
    ``check`` also the canonical structure and index ranges (a pass over indices).

    Kernels see raw pointers only, so a strided or mis-sized array would be read
    at the wrong places without any error: these checks are what stands between.
    """
    if indptr.dtype != numpy.int32 or indices.dtype != numpy.int32:
        raise TypeError(f"{what}: indptr and indices must be int32. "
                        f"Got {indptr.dtype} and {indices.dtype} instead.")
    if indptr.shape != (n_rows + 1,):
        raise ValueError(f"{what}: indptr must have shape ({n_rows + 1},). Got {indptr.shape} instead.")
    if indices.ndim != 1:
        raise ValueError(f"{what}: indices must be flat. Got shape {indices.shape} instead.")
    arrays = {"indptr": indptr, "indices": indices}
    if data is not None:
        if data.shape != indices.shape:
            raise ValueError(f"{what}: data must have the shape of indices {indices.shape}. "
                             f"Got {data.shape} instead.")
        arrays["data"] = data
    _check_contiguous(what, **arrays)
    if check:
        check_csr(indptr, indices, (n_rows, n_cols), what=what)


def _rows_of(what: str, indptr: Any) -> int:
    """n_rows of a CSR indptr, which must be flat and non-empty."""
    if indptr.ndim != 1 or indptr.shape[0] < 1:
        raise ValueError(f"{what}: indptr must be flat with n_rows + 1 >= 1 entries. "
                         f"Got shape {indptr.shape} instead.")
    return int(indptr.shape[0]) - 1


SDDMM_MAX_GROUP = 16  # measured: 16 lanes beat 32 at batch 512 on an H100 and an H200


def sddmm_group(batch: int) -> int:
    """Lanes per nonzero of the warp SDDMM for a batch: the power of two in [8, 16]
    that gives each lane about 8 products (8 float32 lanes fill a 32-byte sector),
    16 for any larger batch. The GPU checks of docs/gpu/ timed groups of 4 to 32:
    at batch 512 the 4096x4096 layer's SDDMM took 649 us with 16 lanes and 886 us
    with 32 (H200; 680 and 902 us on an H100), and 16 was fastest overall."""
    group = 8
    while group < SDDMM_MAX_GROUP and group * 8 < batch:
        group *= 2
    return group


def _check_sddmm_choice(method: Any, group: Any, source: str) -> tuple[str, int | None]:
    if method not in SDDMM_METHODS:
        raise ValueError(f"The SDDMM method ({source}) must be one of {list(SDDMM_METHODS)}. "
                         f"Got {method!r} instead.")
    if group is not None:
        if method != "warp":
            raise ValueError(f"An SDDMM group ({source}) goes with method 'warp'. "
                             f"Got method {method!r} with group {group!r}.")
        if (isinstance(group, bool) or not isinstance(group, (int, numpy.integer))
                or group < 1 or group > WARP_SIZE or group & (group - 1)):
            raise ValueError(f"The SDDMM group ({source}) must be a power of two in "
                             f"[1, {WARP_SIZE}]. Got {group!r} instead.")
        group = int(group)
    return method, group


def _sddmm_from_env() -> tuple[str, int | None]:
    """``$CUPYNN_SDDMM``: ``thread``, ``warp`` or ``warp:<group>`` (default ``warp``)."""
    text = os.environ.get(SDDMM_ENV, "").strip() or "warp"
    method, _, group = text.partition(":")
    try:
        parsed = int(group) if group else None
    except ValueError:
        raise ValueError(f"${SDDMM_ENV} must be 'thread', 'warp' or 'warp:<group>'. "
                         f"Got {text!r} instead.") from None
    return _check_sddmm_choice(method, parsed, f"${SDDMM_ENV}")


_SDDMM_DEFAULT: list[Any] = []  # [method, group], read from the environment on first use


def set_sddmm(method: str = "warp", group: int | None = None) -> None:
    """Choose the GPU SDDMM kernel that :func:`sddmm` uses when not told.

    Parameters
    ----------
    method : {"thread", "warp"}
        ``"thread"``: one thread per nonzero (``sddmm_*``); ``"warp"``: groups
        of lanes per nonzero, reading along the batch (``sddmm_warp_*``). See
        ``sddmm.cu``. The default is ``"warp"`` or ``$CUPYNN_SDDMM``.
    group : int, optional
        Lanes per nonzero for ``"warp"`` (a power of two up to 32); by default
        :func:`sddmm_group` of each call's batch.

    The CPU backend has one kernel and ignores the choice.
    """
    _SDDMM_DEFAULT[:] = _check_sddmm_choice(method, group, "set_sddmm")


def sddmm_setting() -> tuple[str, int | None]:
    """The (method, group) :func:`sddmm` uses when not told (group None: per batch)."""
    if not _SDDMM_DEFAULT:
        _SDDMM_DEFAULT[:] = _sddmm_from_env()
    return _SDDMM_DEFAULT[0], _SDDMM_DEFAULT[1]


def sddmm(indptr: Any, indices: Any, dy: Any, x: Any, out: Any = None, *,
          check: bool = True, max_blocks: int | None = None, method: str | None = None,
          group: int | None = None) -> Any:
    """Weight gradient at the active entries: ``out[k] = dy[row(k)] . x[indices[k]]``.

    Parameters
    ----------
    indptr : (n_rows + 1,) int32
    indices : (nnz,) int32
    dy : (n_rows, batch) float32 or float64, C-contiguous
    x : (n_cols, batch) same dtype, C-contiguous
    out : (nnz,) same dtype, optional
    check : bool
        Also check the CSR structure and index ranges (a pass over indices).
    max_blocks : int, optional
        Cap on the CUDA grid (tests use it to exercise the grid-stride loop).
    method : {"thread", "warp"}, optional
        The GPU kernel (see :func:`set_sddmm`; default :func:`sddmm_setting`).
    group : int, optional
        Lanes per nonzero of the ``"warp"`` kernel (default: the set one, else
        :func:`sddmm_group` of the batch).

    Returns
    -------
    (nnz,) array on the operands' device.
    """
    what = "sddmm"
    if method is None:
        method, default_group = sddmm_setting()
        group = default_group if group is None else group
    method, group = _check_sddmm_choice(method, group, what)
    backend = _check_same_backend(what, indptr, indices, dy, x)
    suffix = _float_suffix(dy, x, *(() if out is None else (out,)), what=what)
    if dy.ndim != 2 or x.ndim != 2 or dy.shape[1] != x.shape[1]:
        raise ValueError(f"{what}: dy (n_rows, batch) and x (n_cols, batch) must share the batch "
                         f"axis. Got {dy.shape} and {x.shape} instead.")
    _check_contiguous(what, dy=dy, x=x)
    _check_pattern(what, indptr, indices, dy.shape[0], x.shape[0], check)
    nnz = int(indices.shape[0])
    xp = backend.xp
    if out is None:
        out = xp.empty(nnz, dtype=dy.dtype)
    elif out.shape != (nnz,):
        raise ValueError(f"{what}: out must have shape ({nnz},). Got {out.shape} instead.")
    else:
        _check_contiguous(what, out=out)
    if nnz == 0:
        return out
    batch = int(dy.shape[1])
    if batch == 0:
        out[...] = 0
        return out
    if backend.is_gpu:
        sizes = (numpy.int32(dy.shape[0]), numpy.int32(nnz), numpy.int32(batch))
        if method == "thread":
            kernel = cuda_function("sddmm.cu", f"sddmm_{suffix}")
            kernel(_grid(nnz, max_blocks), (THREADS_PER_BLOCK,),
                   (indptr, indices, dy, x, out) + sizes)
        else:
            group = sddmm_group(batch) if group is None else group
            warps = -(-nnz // (WARP_SIZE // group))
            kernel = cuda_function("sddmm.cu", f"sddmm_warp_{suffix}")
            kernel(_grid(warps * WARP_SIZE, max_blocks), (THREADS_PER_BLOCK,),
                   (indptr, indices, dy, x, out) + sizes + (numpy.int32(group),))
    else:
        _cpu().sddmm(indptr, indices, dy, x, out)
    return out


def adam(p: Any, g: Any, m: Any, v: Any, *, lr: float, b1: float, b2: float, eps: float,
         bc1: float, bc2: float, max_blocks: int | None = None) -> None:
    """Fused in-place Adam update of ``p``, ``m``, ``v`` from gradient ``g``.

    All four arrays are flat, C-contiguous, of one float dtype and length.
    ``bc1``/``bc2`` are the bias corrections 1 - b1**t and 1 - b2**t.
    """
    what = "adam"
    backend = _check_same_backend(what, p, g, m, v)
    _float_suffix(p, g, m, v, what=what)
    _check_contiguous(what, p=p, g=g, m=m, v=v)
    if not (p.shape == g.shape == m.shape == v.shape) or p.ndim != 1:
        raise ValueError(f"{what}: p, g, m, v must be flat and of one length. "
                         f"Got {p.shape}, {g.shape}, {m.shape}, {v.shape} instead.")
    adam_apply(backend, p, g, m, v,
               adam_scalars(p.dtype, lr=lr, b1=b1, b2=b2, eps=eps, bc1=bc1, bc2=bc2),
               max_blocks=max_blocks)


def adam_scalars(dtype: Any, *, lr: float, b1: float, b2: float, eps: float, bc1: float,
                 bc2: float) -> tuple:
    """The eight scalars of ``adam.cu`` (and its twins) in ``dtype``:
    lr, b1, b2, 1 - b1, 1 - b2, eps, bc1, bc2."""
    t = numpy.dtype(dtype).type
    # 1 - b computed in double, then rounded (as the twin does): in float32,
    # 1 - float32(0.999) is 0.00099998713, not 0.001.
    return tuple(t(s) for s in (lr, b1, b2, 1.0 - b1, 1.0 - b2, eps, bc1, bc2))


def adam_apply(backend: Any, p: Any, g: Any, m: Any, v: Any, scalars: tuple, *,
               max_blocks: int | None = None) -> None:
    """:func:`adam` with its checks done by the caller and its scalars from
    :func:`adam_scalars`: ``p``, ``g``, ``m``, ``v`` flat, C-contiguous, of one
    float dtype and length on ``backend``. The optimizer checks what can change
    between steps and calls this once per parameter array, so the per-call cost
    is the launch alone (the paper's HIGGS step has eight arrays)."""
    n = int(p.shape[0])
    if n == 0:
        return
    if backend.is_gpu:
        kernel = cuda_function("adam.cu", f"adam_{_SUFFIX[p.dtype]}")
        kernel(_grid(n, max_blocks), (THREADS_PER_BLOCK,), (p, g, m, v, *scalars, numpy.int64(n)))
    else:
        _cpu().adam(p, g, m, v, *scalars)


def _check_spmm_choice(method: Any, source: str) -> str:
    if method not in SPMM_METHODS:
        raise ValueError(f"The GPU sparse product ({source}) must be one of "
                         f"{list(SPMM_METHODS)}. Got {method!r} instead.")
    return method


_SPMM_DEFAULT: list[str] = []  # [method], read from the environment on first use


def set_spmm(method: str = "rows") -> None:
    """Choose how :func:`spmm` and :func:`spmm_t` run on the GPU when not told.

    ``"rows"`` (the default, or ``$CUPYNN_SPMM``): the kernels of ``spmm.cu``,
    one thread per output element, the threads of a block along the batch;
    ``W.T @ dy`` reads W through its transposed pattern
    (:func:`transpose_pattern`). Each output is summed in a fixed order, so a
    run repeats bit for bit. ``"cusparse"``: cuSPARSE's SpMM through
    ``cupyx.scipy.sparse``, with the transposes it needs to and from its
    column-major layout; its transposed product adds with atomics, so two runs
    differ in the last bits. The CPU backend ignores the choice.
    """
    _SPMM_DEFAULT[:] = [_check_spmm_choice(method, "set_spmm")]


def spmm_setting() -> str:
    """The GPU method :func:`spmm` and :func:`spmm_t` use when not told."""
    if not _SPMM_DEFAULT:
        text = os.environ.get(SPMM_ENV, "").strip() or "rows"
        _SPMM_DEFAULT[:] = [_check_spmm_choice(text, f"${SPMM_ENV}")]
    return _SPMM_DEFAULT[0]


def _spmm_launch(n_out: int, batch: int, max_blocks: int | None) -> tuple[tuple[int], tuple[int]]:
    """Grid and block of spmm.cu: a block's threads along the batch (whole warps),
    one block per (output row, chunk of the batch), capped like every grid."""
    threads = min(SPMM_MAX_THREADS, WARP_SIZE * max(1, -(-batch // WARP_SIZE)))
    items = n_out * -(-batch // threads)
    return (max(1, min(items, max_blocks or MAX_BLOCKS)),), (threads,)


def transpose_pattern(indptr: Any, indices: Any, n_cols: int) -> tuple[Any, Any, Any]:
    """The pattern of ``W.T`` for CSR ``W`` (n_rows, n_cols): ``(t_indptr, t_rows, t_perm)``.

    ``t_indptr`` (n_cols + 1,) delimits each column's entries, ``t_rows[p]`` is
    the row of the p-th and ``t_perm[p]`` its position in ``W``'s data, the
    entries of each column in ascending row order; all int32, on the pattern's
    device, with no host synchronisation (``spmm.cu`` reads ``W.T`` through
    these; layers keep them until their topology changes). The sort key
    ``column * n_rows + row`` is unique, so the result does not depend on the
    sort's stability.
    """
    backend = _check_same_backend("transpose_pattern", indptr, indices)
    xp = backend.xp
    n_rows = int(indptr.shape[0]) - 1
    nnz = int(indices.shape[0])
    positions = xp.arange(nnz, dtype=indptr.dtype)
    rows = xp.searchsorted(indptr, positions, side="right") - 1
    order = xp.argsort(indices.astype(numpy.int64) * max(n_rows, 1) + rows)
    t_indptr = xp.searchsorted(indices[order], xp.arange(n_cols + 1, dtype=indices.dtype),
                               side="left")
    return (t_indptr.astype(numpy.int32), rows[order].astype(numpy.int32),
            order.astype(numpy.int32))


def _check_transpose(what: str, transpose: Any, backend: Any, nnz: int, n_cols: int) -> None:
    if not (isinstance(transpose, tuple) and len(transpose) == 3):
        raise TypeError(f"{what}: transpose must be the tuple (t_indptr, t_rows, t_perm) of "
                        f"transpose_pattern. Got {type(transpose).__name__} instead.")
    shapes = ((n_cols + 1,), (nnz,), (nnz,))
    for name, a, shape in zip(("t_indptr", "t_rows", "t_perm"), transpose, shapes):
        if backend_of(a) is not backend or a.dtype != numpy.int32 or a.shape != shape \
                or not a.flags.c_contiguous:
            raise ValueError(f"{what}: transpose's {name} must be a contiguous int32 array of "
                             f"shape {shape} on the operands' device (see transpose_pattern). "
                             f"Got {a.dtype} {a.shape} instead.")


def _gpu_csr(indptr: Any, indices: Any, data: Any, shape: tuple[int, int]) -> Any:
    sparse = backend_of(data).sparse
    w = sparse.csr_matrix((data, indices, indptr), shape=shape, copy=False)
    # Our CSR is canonical by construction (checked when the topology is set);
    # saying so spares cuSPARSE's wrapper a check that synchronises the device.
    w.has_canonical_format = True
    return w


def spmm(indptr: Any, indices: Any, data: Any, x: Any, *, check: bool = True,
         bias: Any = None, relu: bool = False, method: str | None = None,
         max_blocks: int | None = None) -> Any:
    """``W @ x`` for CSR ``W`` (n_rows, n_cols) and dense x (n_cols, batch).

    With ``bias`` (n_rows,) the bias is added to every column, and with
    ``relu`` the result is clipped at 0: a sparse layer with its activation.
    On the GPU one ``spmm.cu`` kernel does all three (or, with
    ``method="cusparse"``, cuSPARSE then two element-wise operations); on the
    CPU one row-parallel Numba kernel. ``max_blocks`` caps the CUDA grid (tests
    use it to exercise the grid-stride loop). Returns a C-contiguous
    (n_rows, batch) array.
    """
    what = "spmm"
    backend = _check_same_backend(what, indptr, indices, data, x)
    suffix = _float_suffix(data, x, *(() if bias is None else (bias,)), what=what)
    if x.ndim != 2:
        raise ValueError(f"{what}: x must be (n_cols, batch). Got shape {x.shape} instead.")
    _check_contiguous(what, x=x)
    n_rows = _rows_of(what, indptr)
    _check_pattern(what, indptr, indices, n_rows, x.shape[0], check, data)
    if bias is not None and (bias.shape != (n_rows,) or backend_of(bias) is not backend):
        raise ValueError(f"{what}: bias must be a ({n_rows},) array on the operands' device. "
                         f"Got {bias.shape} instead.")
    if relu and bias is None:
        raise ValueError(f"{what}: relu=True goes with a bias (the layer's).")
    if backend.is_gpu:
        method = _check_spmm_choice(spmm_setting() if method is None else method, what)
        xp = backend.xp
        batch = int(x.shape[1])
        if method == "rows":
            out = xp.empty((n_rows, batch), dtype=x.dtype)
            if batch and n_rows:
                grid, block = _spmm_launch(n_rows, batch, max_blocks)
                cuda_function("spmm.cu", f"spmm_{suffix}")(
                    grid, block, (indptr, indices, data, x, data if bias is None else bias, out,
                                  numpy.int32(n_rows), numpy.int32(batch),
                                  numpy.int32(bias is not None), numpy.int32(bool(relu))))
            return out
        if batch == 0 or n_rows == 0:  # cuSPARSE is not asked about empty products
            out = xp.zeros((n_rows, batch), dtype=x.dtype)
        else:
            w = _gpu_csr(indptr, indices, data, (n_rows, x.shape[0]))
            out = xp.ascontiguousarray(w @ x)
        if bias is not None:
            out += bias[:, None]
            if relu:
                xp.maximum(out, 0, out=out)
        return out
    out = numpy.empty((n_rows, x.shape[1]), dtype=x.dtype)
    _cpu().spmm(indptr, indices, data, x, out, data[:0] if bias is None else bias, bool(relu))
    return out


def relu_grad_rowsum(dy: Any, y: Any = None, *, in_place: bool = False) -> tuple[Any, Any]:
    """``(dy * (y > 0), its row sums)``, or ``(dy, row sums)`` without ``y``.

    A sparse layer's backward pass before its SDDMM: the gradient through its
    ReLU (``y`` is the layer's output after the ReLU) and its bias gradient. One
    Numba pass on the CPU; element-wise operations and a reduction on the
    GPU. ``dy`` and ``y`` are (n_rows, batch) C-contiguous of one float dtype;
    ``dy`` is not modified, unless ``in_place`` lets the result overwrite it
    (a caller that gives ``dy`` up saves an array of its size at the peak of
    the backward pass).
    """
    what = "relu_grad_rowsum"
    arrays = (dy,) if y is None else (dy, y)
    backend = _check_same_backend(what, *arrays)
    _float_suffix(*arrays, what=what)
    if dy.ndim != 2 or (y is not None and y.shape != dy.shape):
        raise ValueError(f"{what}: dy must be 2-D and y of its shape. Got {dy.shape} and "
                         f"{None if y is None else y.shape} instead.")
    _check_contiguous(what, **({"dy": dy} if y is None else {"dy": dy, "y": y}))
    if backend.is_gpu:
        if y is None:
            out = dy
        elif in_place:
            out = backend.xp.multiply(dy, y > 0, out=dy)
        else:
            out = dy * (y > 0)
        return out, out.sum(axis=1)
    out = dy if in_place else numpy.empty_like(dy)
    sums = numpy.empty(dy.shape[0], dtype=dy.dtype)
    _cpu().relu_grad_rowsum(dy, dy if y is None else y, y is not None, out, sums)
    return out, sums


def spmm_t(indptr: Any, indices: Any, data: Any, dy: Any, n_cols: int, *,
           check: bool = True, transpose: Any = None, method: str | None = None,
           max_blocks: int | None = None, sorted_rows: bool = False) -> Any:
    """``W.T @ dy`` for CSR ``W`` (n_rows, n_cols) and dense dy (n_rows, batch).

    On the GPU the ``spmm_t`` kernel of ``spmm.cu`` reads W column by column
    through ``transpose`` (:func:`transpose_pattern` of this pattern; built
    here when not given, which costs a sort: layers keep theirs), or, with
    ``method="cusparse"``, cuSPARSE's transposed product. On the CPU a Numba
    kernel that works on cache-sized bands of output rows in parallel (rows
    with sorted columns), or scatters over disjoint batch slices (unsorted
    rows); it needs no transposed pattern. With ``check=False`` it finds out
    which (a parallel pass over ``indices``, 20-50 us at the paper's sizes)
    unless ``sorted_rows=True`` says the columns of every row increase (layers
    say so: their pattern is checked canonical when set). Returns a
    C-contiguous (n_cols, batch) array.
    """
    what = "spmm_t"
    backend = _check_same_backend(what, indptr, indices, data, dy)
    suffix = _float_suffix(data, dy, what=what)
    if dy.ndim != 2 or _rows_of(what, indptr) != dy.shape[0]:
        raise ValueError(f"{what}: dy must be (n_rows, batch) with n_rows = len(indptr) - 1. "
                         f"Got dy {dy.shape} and indptr {indptr.shape} instead.")
    _check_contiguous(what, dy=dy)
    _check_pattern(what, indptr, indices, dy.shape[0], n_cols, check, data)
    if transpose is not None:
        _check_transpose(what, transpose, backend, int(indices.shape[0]), n_cols)
    if backend.is_gpu:
        method = _check_spmm_choice(spmm_setting() if method is None else method, what)
        xp = backend.xp
        batch = int(dy.shape[1])
        if batch == 0 or dy.shape[0] == 0:
            return xp.zeros((n_cols, batch), dtype=dy.dtype)
        if method == "rows":
            if transpose is None:
                transpose = transpose_pattern(indptr, indices, n_cols)
            out = xp.empty((n_cols, batch), dtype=dy.dtype)
            if n_cols:
                grid, block = _spmm_launch(n_cols, batch, max_blocks)
                cuda_function("spmm.cu", f"spmm_t_{suffix}")(
                    grid, block, (*transpose, data, dy, out, numpy.int32(n_cols),
                                  numpy.int32(batch)))
            return out
        w = _gpu_csr(indptr, indices, data, (dy.shape[0], n_cols))
        return xp.ascontiguousarray(w.T @ dy)
    cpu = _cpu()
    out = numpy.empty((n_cols, dy.shape[1]), dtype=dy.dtype)
    # The number of workers to plan for (bands, or batch slices when unsorted).
    if check or sorted_rows:  # canonical: checked above, or vouched for by the caller
        cpu._spmm_t_bands(indptr, indices, data, dy, out, numba_threads())
    else:  # finds out (a parallel pass over indices) and takes the kernel for the order
        cpu.spmm_t(indptr, indices, data, dy, out, numba_threads())
    return out


def numba_threads() -> int:
    import numba

    return int(numba.get_num_threads())


def fisher_shape(n_blocks: int, block_size: int) -> tuple[int, int, int]:
    """Shape of the tiled packed inverse Fisher of n_blocks blocks of B: (n_tiles, P, TILE)."""
    return (-(-int(n_blocks) // FISHER_TILE), block_size * (block_size + 1) // 2, FISHER_TILE)


def _check_fisher_blocks(what: str, finv: Any, block_size: int, **vectors: Any) -> int:
    """Check a tiled packed inverse Fisher ``finv`` against flat ``vectors``; return n_blocks."""
    if isinstance(block_size, bool) or not isinstance(block_size, (int, numpy.integer)) \
            or block_size < 1:
        raise ValueError(f"{what}: block_size must be a positive int. Got {block_size!r} instead.")
    b = int(block_size)
    packed = b * (b + 1) // 2
    if finv.ndim != 3 or tuple(finv.shape[1:]) != (packed, FISHER_TILE):
        raise ValueError(f"{what}: finv must have shape (n_tiles, {packed}, {FISHER_TILE}) for "
                         f"block_size={b} (the packed upper triangles of {FISHER_TILE} blocks "
                         f"per tile, see fisher.cu). Got {finv.shape} instead.")
    (name, first), *_ = vectors.items()
    if first.ndim != 1 or first.shape[0] % b:
        raise ValueError(f"{what}: {name} must be flat with a multiple of block_size={b} "
                         f"values (pad the last block with zeros). Got {first.shape} instead.")
    n_blocks = int(first.shape[0]) // b
    if fisher_shape(n_blocks, b) != tuple(finv.shape):
        raise ValueError(f"{what}: {name} has {n_blocks} blocks, which need finv of shape "
                         f"{fisher_shape(n_blocks, b)}. Got {finv.shape} instead.")
    if n_blocks * b > 2**31 - 1:
        raise ValueError(f"{what}: n_blocks * block_size must fit int32. Got {n_blocks} * {b}.")
    for name, a in vectors.items():
        if a.shape != (n_blocks * b,):
            raise ValueError(f"{what}: {name} must have shape ({n_blocks * b},) = n_blocks * "
                             f"block_size (pad the last block with zeros). Got {a.shape} instead.")
    _check_contiguous(what, finv=finv, **vectors)
    return n_blocks


def _check_no_overlap(what: str, xp: Any, written: str, arrays: dict[str, Any]) -> None:
    for name, a in arrays.items():
        if name != written and xp.may_share_memory(arrays[written], a):
            raise ValueError(f"{what}: {written} must not overlap {name} (it is written while "
                             f"{name} is read).")


def fisher_update(finv: Any, g: Any, m: float, *, block_size: int, work: Any = None,
                  max_blocks: int | None = None) -> None:
    """Sherman-Morrison rank-1 update of a packed block-diagonal inverse Fisher, in place.

    For every block b: ``u = F_b^{-1} g_b``, ``den = m + g_b . u``,
    ``F_b^{-1} <- F_b^{-1} - u u^T / den``: the inverse of ``F_b + g_b g_b^T / m``.
    Starting from ``finv = I / lambda`` and applying the m gradients of a batch
    gives ``inv(lambda I + G^T G / m)`` per block (the WoodFisher estimate).
    A block whose g_b is all zero is left as it is. On the GPU this is two
    launches (``packed_matvec``, ``fisher_rank1_update``), on the CPU one pass.

    Parameters
    ----------
    finv : (n_tiles, P, TILE) float32 or float64, C-contiguous, P = B (B + 1) / 2
        Upper triangles, row-major, of the symmetric blocks, TILE
        (:data:`FISHER_TILE`) blocks side by side per tile (see ``fisher.cu``;
        :func:`fisher_shape` gives the shape).
    g : (n_blocks * B,) same dtype, C-contiguous
        One gradient, the last block padded with zeros; n_tiles = ceil(n_blocks / TILE).
    m : float > 0
        The number of gradients the Fisher averages over.
    block_size : int
        B.
    work : (n_blocks * B,) same dtype, optional
        Scratch for u (allocated when not given); must not overlap finv or g.
        On return it holds u = F_b^{-1} g_b of the blocks before the step.
        Passing one saves an allocation per call.
    max_blocks : int, optional
        Cap on the CUDA grid (tests use it to exercise the grid-stride loop).
    """
    what = "fisher_update"
    arrays = {"finv": finv, "g": g, **({} if work is None else {"work": work})}
    backend = _check_same_backend(what, *arrays.values())
    suffix = _float_suffix(*arrays.values(), what=what)
    n_blocks = _check_fisher_blocks(what, finv, block_size, **{k: a for k, a in arrays.items()
                                                               if k != "finv"})
    m = float(m)
    if not (m > 0 and numpy.isfinite(m)):
        raise ValueError(f"{what}: m must be a positive finite number. Got {m!r} instead.")
    xp = backend.xp
    _check_no_overlap(what, xp, "finv", {"finv": finv, "g": g})
    if work is None:
        work = xp.empty(n_blocks * block_size, dtype=finv.dtype)
    else:
        _check_no_overlap(what, xp, "work", arrays)
    if n_blocks == 0:
        return
    t = finv.dtype.type
    if backend.is_gpu:
        # u = F^{-1} g into work, then the rank-1 step (see fisher.cu).
        grid = _grid(int(finv.shape[0]) * int(block_size) * FISHER_TILE, max_blocks)
        sizes = (numpy.int32(n_blocks), numpy.int32(block_size), numpy.int32(FISHER_TILE))
        cuda_function("fisher.cu", f"packed_matvec_{suffix}")(
            grid, (THREADS_PER_BLOCK,), (finv, g, work) + sizes)
        cuda_function("fisher.cu", f"fisher_rank1_update_{suffix}")(
            grid, (THREADS_PER_BLOCK,), (finv, g, work, t(m)) + sizes)
    else:
        from . import cpu_fisher

        # Padded like a model's gradient parts: one compiled version serves both.
        cpu_fisher.fisher_update(finv, cpu_fisher.padded_parts([g], g[:0]),
                                 cpu_fisher.part_starts((g.shape[0],)), work, t(m),
                                 int(block_size), g[:0])


def packed_matvec(finv: Any, v: Any, *, block_size: int, out: Any = None,
                  max_blocks: int | None = None) -> Any:
    """``out_b = F_b^{-1} v_b`` for a packed block-diagonal ``finv`` (see :func:`fisher_update`).

    Parameters
    ----------
    finv : (n_tiles, P, TILE) float32 or float64, C-contiguous, P = B (B + 1) / 2
    v : (n_blocks * B,) same dtype, C-contiguous, n_tiles = ceil(n_blocks / TILE)
    block_size : int
        B.
    out : (n_blocks * B,) same dtype, optional; must not overlap finv or v.
    max_blocks : int, optional
        Cap on the CUDA grid.

    Returns
    -------
    (n_blocks * B,) array on the operands' device.
    """
    what = "packed_matvec"
    arrays = {"finv": finv, "v": v, **({} if out is None else {"out": out})}
    backend = _check_same_backend(what, *arrays.values())
    suffix = _float_suffix(*arrays.values(), what=what)
    n_blocks = _check_fisher_blocks(what, finv, block_size, **{k: a for k, a in arrays.items()
                                                               if k != "finv"})
    xp = backend.xp
    if out is None:
        out = xp.empty(n_blocks * block_size, dtype=finv.dtype)
    else:
        _check_no_overlap(what, xp, "out", arrays)
    if n_blocks == 0:
        return out
    if backend.is_gpu:
        kernel = cuda_function("fisher.cu", f"packed_matvec_{suffix}")
        n_threads = int(finv.shape[0]) * int(block_size) * FISHER_TILE
        kernel(_grid(n_threads, max_blocks), (THREADS_PER_BLOCK,),
               (finv, v, out, numpy.int32(n_blocks), numpy.int32(block_size),
                numpy.int32(FISHER_TILE)))
    else:
        from . import cpu_fisher

        cpu_fisher.packed_matvec(finv, v, out, int(block_size))
    return out


def warm_up(backend: Any, dtype: Any = numpy.float32) -> None:
    """Run every kernel once on tiny arrays.

    Loads (or JIT-compiles) the Numba kernels and compiles the CUDA modules
    up front, so that neither the first training step's time nor a memory
    peak measured afterwards includes that one-time work.
    """
    xp = backend.xp
    dtype = numpy.dtype(dtype)
    indptr = xp.asarray(numpy.array([0, 1, 2], dtype=numpy.int32))
    indices = xp.asarray(numpy.array([0, 1], dtype=numpy.int32))
    data = xp.ones(2, dtype=dtype)
    x = xp.ones((2, 3), dtype=dtype)
    sddmm(indptr, indices, x, x)
    spmm(indptr, indices, data, x)
    spmm(indptr, indices, data, x, bias=data, relu=True)
    relu_grad_rowsum(x, x)
    spmm_t(indptr, indices, data, x, 2)
    p, g, m, v = (xp.zeros(4, dtype=dtype) for _ in range(4))
    adam(p, g, m, v, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, bc1=0.1, bc2=0.001)
    finv = xp.ones(fisher_shape(2, 2), dtype=dtype)
    vec = xp.ones(4, dtype=dtype)
    fisher_update(finv, vec, 1.0, block_size=2)
    packed_matvec(finv, vec, block_size=2)
    # On the CPU, fisher_update above compiled the version for up to
    # cpu_fisher.MIN_PARTS gradient parts, which BlockFisherInverse uses for any
    # model of up to that many (its layers' arrays, padded: see padded_parts).

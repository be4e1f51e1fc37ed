"""The sparse products of a layer: ``W @ x`` (:func:`spmm`, the forward pass with
its bias and ReLU) and ``W.T @ dy`` (:func:`spmm_t`, the input gradient), from
``spmm.cu`` or cuSPARSE on the GPU (:func:`set_spmm`, ``$CUPYNN_SPMM``) and from
``cpu.spmm`` / ``cpu.spmm_t`` on the CPU; :func:`transpose_pattern` is the
pattern of ``W.T`` that ``spmm.cu`` reads, and :func:`row_swizzle` the order of rows
its vectorised kernels (``"vec"``) take.
"""

from __future__ import annotations

from typing import Any

import numpy

from ..backend import backend_of
from ._checks import (_check_contiguous, _check_no_overlap, _check_out, _check_pattern,
                      _check_same_backend, _float_suffix, _rows_of)
from ._launch import MAX_BLOCKS, WARP_SIZE, _cpu, cuda_function, numba_threads
from ._settings import Choice
from .choice import choose, vector_width

SPMM_METHODS = ("rows", "cusparse", "tiles", "vec", "auto")
SPMM_ENV = "CUPYNN_SPMM"
SPMM_MAX_THREADS = 256  # threads per block of spmm.cu, along the batch
# The tiled kernels (issue 20): the widest batch tile and the threads of a block by
# default, and the shared entries of a block (spmm.cu's SPMM_TILE_SHARED).
SPMM_TILE_COLS = 16
SPMM_TILE_THREADS = 128
SPMM_TILE_SHARED = 1024
# The vectorised kernels (issue 20, "vec"): a batch tile of 128 bytes of a row of the
# dense operand (32 float32 or 16 float64 columns: one cache line a nonzero) and 128
# threads a block by default. Unmeasured guesses until a GPU check times them.
SPMM_VEC_TILE_BYTES = 128
SPMM_VEC_THREADS = 128


_SPMM = Choice("GPU sparse product", SPMM_ENV, SPMM_METHODS)
_check_spmm_choice = _SPMM.check


def set_spmm(method: str = "rows") -> None:
    """Choose how :func:`spmm` and :func:`spmm_t` run on the GPU when not told.

    ``"rows"`` (the default, or ``$CUPYNN_SPMM``): the kernels of ``spmm.cu``,
    one thread per output element, the threads of a block along the batch;
    ``W.T @ dy`` reads W through its transposed pattern
    (:func:`transpose_pattern`). Each output is summed in a fixed order, so a
    run repeats bit for bit. ``"tiles"`` (issue 20, off until a GPU check
    shows it faster): ``spmm.cu``'s tiled kernels, a block per tile of output
    rows times a narrow batch tile, the rows' nonzeros staged through shared
    memory (:func:`_spmm_tiles_launch`); same summation order as ``"rows"``,
    so the same bits. ``"cusparse"``: cuSPARSE's SpMM through
    ``cupyx.scipy.sparse``, with the transposes it needs to and from its
    column-major layout; its transposed product adds with atomics, so two runs
    differ in the last bits. ``"vec"`` (issue 20, off until a GPU check shows
    it faster): ``spmm.cu``'s vectorised kernels, the tiled kernels' staging
    with each thread computing 4 float32 (2 float64) batch columns through
    16-byte loads and the rows taken longest first (:func:`row_swizzle`,
    :func:`_spmm_vec_launch`); the same bits as ``"rows"``. ``"auto"``: per
    call, the method :func:`cupynn.kernels.choice.choose` picks for the shape
    (``"vec"`` or ``"rows"``). The CPU backend ignores the choice.
    """
    _SPMM.set(method, "set_spmm")


def spmm_setting() -> str:
    """The GPU method :func:`spmm` and :func:`spmm_t` use when not told."""
    return _SPMM.get()


def _spmm_launch(n_out: int, batch: int, max_blocks: int | None) -> tuple[tuple[int], tuple[int]]:
    """Grid and block of spmm.cu: a block's threads along the batch (whole warps),
    one block per (output row, chunk of the batch), capped like every grid."""
    threads = min(SPMM_MAX_THREADS, WARP_SIZE * max(1, -(-batch // WARP_SIZE)))
    items = n_out * -(-batch // threads)
    return (max(1, min(items, max_blocks or MAX_BLOCKS)),), (threads,)


def _spmm_tiles_launch(n_out: int, batch: int, max_blocks: int | None,
                       tile_cols: int | None = None, rows: int | None = None
                       ) -> tuple[tuple[int], tuple[int], int, int]:
    """Grid, block, batch tile and chunk of spmm.cu's tiled kernels: ``(grid, block,
    tile_cols, chunk)``.

    A block covers ``rows`` output rows times ``tile_cols`` batch columns (one
    thread each, ``block = rows * tile_cols``); by default the batch tile is
    the smallest power of two covering the batch, at most ``SPMM_TILE_COLS``,
    and ``rows`` fills ``SPMM_TILE_THREADS`` threads, at most 32 rows. Each
    row's nonzeros pass through shared memory ``chunk = SPMM_TILE_SHARED //
    rows`` at a time. One block per (row tile, batch tile), capped like every
    grid (the kernels stride over the rest).
    """
    if tile_cols is None:
        tile_cols = 1
        while tile_cols < min(batch, SPMM_TILE_COLS):
            tile_cols *= 2
    if rows is None:
        rows = max(1, min(32, SPMM_TILE_THREADS // tile_cols))
    if not (1 <= tile_cols and 1 <= rows and rows * tile_cols <= 1024
            and rows <= SPMM_TILE_SHARED):
        raise ValueError(f"spmm tiles: a block of rows * tile_cols threads, at most 1024, and "
                         f"at most {SPMM_TILE_SHARED} rows. Got rows={rows}, "
                         f"tile_cols={tile_cols} instead.")
    items = -(-n_out // rows) * -(-batch // tile_cols)
    return ((max(1, min(items, max_blocks or MAX_BLOCKS)),), (rows * tile_cols,), tile_cols,
            SPMM_TILE_SHARED // rows)


def _spmm_vec_launch(n_out: int, batch: int, max_blocks: int | None, itemsize: int, vec: int,
                     tile_cols: int | None = None, rows: int | None = None
                     ) -> tuple[tuple[int], tuple[int], int, int]:
    """Grid, block, batch tile and chunk of spmm.cu's vectorised kernels: ``(grid, block,
    tile_cols, chunk)``.

    A block covers ``rows`` output rows times ``tile_cols`` batch columns, each
    row served by ``tile_cols / vec`` threads of ``vec`` columns each (``block =
    rows * tile_cols / vec``). By default the batch tile is
    ``SPMM_VEC_TILE_BYTES`` of values (32 float32 or 16 float64 columns), halved
    while half of it still covers the batch (never below ``vec``), and ``rows``
    fills ``SPMM_VEC_THREADS`` threads: guesses, not measurements. Each row's
    nonzeros pass through shared memory ``chunk = SPMM_TILE_SHARED // rows`` at a
    time. One block per (row tile, batch tile), capped like every grid (the
    kernels stride over the rest).
    """
    if tile_cols is None:
        tile_cols = max(vec, SPMM_VEC_TILE_BYTES // itemsize)
        while tile_cols > vec and tile_cols // 2 >= batch:
            tile_cols //= 2
    per_row = tile_cols // vec if tile_cols >= vec and tile_cols % vec == 0 else 0
    if rows is None and per_row:
        rows = max(1, min(SPMM_TILE_SHARED, SPMM_VEC_THREADS // per_row))
    if not (per_row and rows is not None and 1 <= rows <= SPMM_TILE_SHARED
            and rows * per_row <= 1024):
        raise ValueError(f"spmm vec: tile_cols must be a multiple of the vector width {vec}, "
                         f"and a block of rows * tile_cols / {vec} threads at most 1024, with "
                         f"at most {SPMM_TILE_SHARED} rows. Got rows={rows}, "
                         f"tile_cols={tile_cols} instead.")
    items = -(-n_out // rows) * -(-batch // tile_cols)
    return ((max(1, min(items, max_blocks or MAX_BLOCKS)),), (rows * per_row,), tile_cols,
            SPMM_TILE_SHARED // rows)


def row_swizzle(indptr: Any) -> Any:
    """The rows of a CSR pattern longest first: ``order`` (n_rows,) int32, a permutation,
    on the pattern's device, with no host synchronisation.

    Rows by decreasing length, rows of one length by increasing index (a stable
    order). The ``"vec"`` kernels take a block's rows in this order (the row swizzle
    of Sputnik, Gale et al. SC20), so the threads of a block, and the blocks that
    run together, get rows of about equal length; any permutation gives the same
    bits. For ``spmm_t`` pass the transposed pattern's ``t_indptr`` (the columns of
    ``W`` longest first). The sort key ``row - length * n_rows`` is unique (rows of
    different lengths are at least ``n_rows`` apart), so the result does not depend
    on the sort's stability.
    """
    backend = _check_same_backend("row_swizzle", indptr)
    xp = backend.xp
    n_rows = int(indptr.shape[0]) - 1
    lengths = (indptr[1:] - indptr[:-1]).astype(numpy.int64)
    key = xp.arange(n_rows, dtype=numpy.int64) - lengths * max(n_rows, 1)
    return xp.argsort(key).astype(numpy.int32)


def _check_swizzle(what: str, swizzle: Any, backend: Any, n: int, check: bool) -> None:
    if (backend_of(swizzle) is not backend or swizzle.dtype != numpy.int32
            or swizzle.shape != (n,) or not swizzle.flags.c_contiguous):
        raise ValueError(f"{what}: swizzle must be a contiguous int32 array of shape ({n},) on "
                         f"the operands' device (see row_swizzle). Got {swizzle.dtype} "
                         f"{swizzle.shape} instead.")
    if check and n:
        xp = backend.xp
        if not bool((xp.sort(swizzle) == xp.arange(n, dtype=numpy.int32)).all()):
            raise ValueError(f"{what}: swizzle must be a permutation of 0 .. {n - 1} "
                             f"(see row_swizzle).")


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
         max_blocks: int | None = None, out: Any = None, swizzle: Any = None) -> Any:
    """``W @ x`` for CSR ``W`` (n_rows, n_cols) and dense x (n_cols, batch).

    With ``bias`` (n_rows,) the bias is added to every column, and with
    ``relu`` the result is clipped at 0: a sparse layer with its activation.
    On the GPU one ``spmm.cu`` kernel does all three (or, with
    ``method="cusparse"``, cuSPARSE then two element-wise operations); on the
    CPU one row-parallel Numba kernel. ``max_blocks`` caps the CUDA grid (tests
    use it to exercise the grid-stride loop). Returns a C-contiguous
    (n_rows, batch) array. ``method="tiles"`` runs ``spmm.cu``'s tiled kernel
    and ``"vec"`` its vectorised one (see :func:`set_spmm`), with the same bits as
    ``"rows"``; ``"auto"`` the one :func:`~cupynn.kernels.choice.choose` picks.
    ``swizzle`` (n_rows,) is the order of rows ``"vec"`` takes
    (:func:`row_swizzle`, built here when not given: layers keep theirs);
    other methods and the CPU ignore it.

    ``out`` (n_rows, batch), C-contiguous, of x's dtype and device, receives
    the product and is returned: then the ``"rows"`` GPU method and the CPU
    allocate nothing and the GPU is not synchronised (what a captured CUDA
    graph needs, issue 19); cuSPARSE computes into a new array and copies it
    over. Its shape is always checked, and with ``check`` that it does not
    overlap the operands (host-side checks only). With ``"vec"`` the GPU
    allocates nothing when ``out`` and ``swizzle`` are given.
    """
    what = "spmm"
    given = () if out is None else (out,)
    backend = _check_same_backend(what, indptr, indices, data, x, *given)
    suffix = _float_suffix(data, x, *(() if bias is None else (bias,)), *given, what=what)
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
    batch = int(x.shape[1])
    if out is not None:
        _check_out(what, out, (n_rows, batch))
        if check:
            read = {"indptr": indptr, "indices": indices, "data": data, "x": x,
                    **({} if swizzle is None else {"swizzle": swizzle})}
            _check_no_overlap(what, backend.xp, "out", {"out": out, **read,
                                                        **({} if bias is None else {"bias": bias})})
    if swizzle is not None:
        _check_swizzle(what, swizzle, backend, n_rows, check)
    if backend.is_gpu:
        method = _check_spmm_choice(spmm_setting() if method is None else method, what)
        if method == "auto":
            method = choose("spmm", n_rows, int(x.shape[0]), int(indices.shape[0]), batch,
                            x.dtype)[0]
        xp = backend.xp
        if method == "rows":
            if out is None:
                out = xp.empty((n_rows, batch), dtype=x.dtype)
            if batch and n_rows:
                grid, block = _spmm_launch(n_rows, batch, max_blocks)
                cuda_function("spmm.cu", f"spmm_{suffix}")(
                    grid, block, (indptr, indices, data, x, data if bias is None else bias, out,
                                  numpy.int32(n_rows), numpy.int32(batch),
                                  numpy.int32(bias is not None), numpy.int32(bool(relu))))
            return out
        if method == "tiles":
            if out is None:
                out = xp.empty((n_rows, batch), dtype=x.dtype)
            if batch and n_rows:
                grid, block, tile_cols, chunk = _spmm_tiles_launch(n_rows, batch, max_blocks)
                cuda_function("spmm.cu", f"spmm_tiled_{suffix}")(
                    grid, block, (indptr, indices, data, x, data if bias is None else bias, out,
                                  numpy.int32(n_rows), numpy.int32(batch),
                                  numpy.int32(bias is not None), numpy.int32(bool(relu)),
                                  numpy.int32(tile_cols), numpy.int32(chunk)))
            return out
        if method == "vec":
            if out is None:
                out = xp.empty((n_rows, batch), dtype=x.dtype)
            if batch and n_rows:
                order = row_swizzle(indptr) if swizzle is None else swizzle
                vec = vector_width(x.dtype, batch, x, out)
                grid, block, tile_cols, chunk = _spmm_vec_launch(
                    n_rows, batch, max_blocks, x.dtype.itemsize, vec)
                cuda_function("spmm.cu", f"spmm_vec_{suffix}")(
                    grid, block, (indptr, indices, data, x, data if bias is None else bias, out,
                                  order, numpy.int32(n_rows), numpy.int32(batch),
                                  numpy.int32(bias is not None), numpy.int32(bool(relu)),
                                  numpy.int32(tile_cols), numpy.int32(chunk),
                                  numpy.int32(vec)))
            return out
        if batch == 0 or n_rows == 0:  # cuSPARSE is not asked about empty products
            result = xp.zeros((n_rows, batch), dtype=x.dtype)
        else:
            w = _gpu_csr(indptr, indices, data, (n_rows, x.shape[0]))
            result = xp.ascontiguousarray(w @ x)
        if bias is not None:
            result += bias[:, None]
            if relu:
                xp.maximum(result, 0, out=result)
        if out is None:
            return result
        xp.copyto(out, result)
        return out
    if out is None:
        out = numpy.empty((n_rows, batch), dtype=x.dtype)
    _cpu().spmm(indptr, indices, data, x, out, data[:0] if bias is None else bias, bool(relu))
    return out


def spmm_t(indptr: Any, indices: Any, data: Any, dy: Any, n_cols: int, *,
           check: bool = True, transpose: Any = None, method: str | None = None,
           max_blocks: int | None = None, sorted_rows: bool = False, out: Any = None,
           swizzle: Any = None) -> Any:
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

    ``out`` (n_cols, batch), as for :func:`spmm`, receives the product: the
    ``"rows"`` and ``"tiles"`` GPU methods then allocate nothing when
    ``transpose`` is given (without it the transposed pattern is built here),
    nor does the CPU. ``"tiles"`` and ``"vec"`` read the same transposed
    pattern; ``"vec"`` takes W's columns in the order ``swizzle`` (n_cols,)
    (:func:`row_swizzle` of ``t_indptr``, built here when not given; then
    ``"vec"`` allocates nothing with ``out`` and ``transpose`` given). Other
    methods and the CPU ignore ``swizzle``.
    """
    what = "spmm_t"
    given = () if out is None else (out,)
    backend = _check_same_backend(what, indptr, indices, data, dy, *given)
    suffix = _float_suffix(data, dy, *given, what=what)
    if dy.ndim != 2 or _rows_of(what, indptr) != dy.shape[0]:
        raise ValueError(f"{what}: dy must be (n_rows, batch) with n_rows = len(indptr) - 1. "
                         f"Got dy {dy.shape} and indptr {indptr.shape} instead.")
    _check_contiguous(what, dy=dy)
    _check_pattern(what, indptr, indices, dy.shape[0], n_cols, check, data)
    if transpose is not None:
        _check_transpose(what, transpose, backend, int(indices.shape[0]), n_cols)
    batch = int(dy.shape[1])
    if out is not None:
        _check_out(what, out, (n_cols, batch))
        if check:
            _check_no_overlap(what, backend.xp, "out", {
                "out": out, "indptr": indptr, "indices": indices, "data": data, "dy": dy,
                **({} if transpose is None else dict(zip(("t_indptr", "t_rows", "t_perm"),
                                                         transpose))),
                **({} if swizzle is None else {"swizzle": swizzle})})
    if swizzle is not None:
        _check_swizzle(what, swizzle, backend, n_cols, check)
    if backend.is_gpu:
        method = _check_spmm_choice(spmm_setting() if method is None else method, what)
        if method == "auto":
            method = choose("spmm_t", int(dy.shape[0]), n_cols, int(indices.shape[0]), batch,
                            dy.dtype)[0]
        xp = backend.xp
        if batch == 0 or dy.shape[0] == 0:
            if out is None:
                return xp.zeros((n_cols, batch), dtype=dy.dtype)
            out.fill(0)  # a kernel launch, no allocation
            return out
        if method in ("rows", "tiles", "vec"):
            if transpose is None:
                transpose = transpose_pattern(indptr, indices, n_cols)
            if out is None:
                out = xp.empty((n_cols, batch), dtype=dy.dtype)
            if n_cols and method == "rows":
                grid, block = _spmm_launch(n_cols, batch, max_blocks)
                cuda_function("spmm.cu", f"spmm_t_{suffix}")(
                    grid, block, (*transpose, data, dy, out, numpy.int32(n_cols),
                                  numpy.int32(batch)))
            elif n_cols and method == "vec":
                order = row_swizzle(transpose[0]) if swizzle is None else swizzle
                vec = vector_width(dy.dtype, batch, dy, out)
                grid, block, tile_cols, chunk = _spmm_vec_launch(
                    n_cols, batch, max_blocks, dy.dtype.itemsize, vec)
                cuda_function("spmm.cu", f"spmm_t_vec_{suffix}")(
                    grid, block, (*transpose, data, dy, out, order, numpy.int32(n_cols),
                                  numpy.int32(batch), numpy.int32(tile_cols),
                                  numpy.int32(chunk), numpy.int32(vec)))
            elif n_cols:
                grid, block, tile_cols, chunk = _spmm_tiles_launch(n_cols, batch, max_blocks)
                cuda_function("spmm.cu", f"spmm_t_tiled_{suffix}")(
                    grid, block, (*transpose, data, dy, out, numpy.int32(n_cols),
                                  numpy.int32(batch), numpy.int32(tile_cols),
                                  numpy.int32(chunk)))
            return out
        w = _gpu_csr(indptr, indices, data, (dy.shape[0], n_cols))
        result = xp.ascontiguousarray(w.T @ dy)
        if out is None:
            return result
        xp.copyto(out, result)
        return out
    cpu = _cpu()
    if out is None:
        out = numpy.empty((n_cols, batch), dtype=dy.dtype)
    # The number of workers to plan for (bands, or batch slices when unsorted).
    if check or sorted_rows:  # canonical: checked above, or vouched for by the caller
        cpu._spmm_t_bands(indptr, indices, data, dy, out, numba_threads())
    else:  # finds out (a parallel pass over indices) and takes the kernel for the order
        cpu.spmm_t(indptr, indices, data, dy, out, numba_threads())
    return out

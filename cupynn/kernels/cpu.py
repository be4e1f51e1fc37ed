"""Compiled, parallel CPU twins of the sparse kernels (Numba).

SciPy's sparse products run on one thread and NumPy has no SDDMM, so the CPU
backend uses these. Each computes what its NumPy twin in
:mod:`cupynn.kernels.numpy_twins` computes, up to the rounding of a different
summation order; the tests compare them. All outputs are allocated by the
caller with NumPy, so that ``tracemalloc`` sees every byte the training step
uses.

Layout: activations are feature-major, ``x[feature, sample]``, so each nonzero
of a CSR weight works on a contiguous run of ``batch`` values: a row of 512
float32 samples is 2 KiB, too big for many of them to stay in L1. The inner
loops over the batch must vectorise, and the kernels limit how often such
rows travel between cache levels (measurements in ``docs/benchmarks.md``):

* ``spmm`` takes a row's nonzeros four at a time, so its accumulator row is
  read and written once per four input rows instead of once per input row;
* ``spmm_t`` scatters into bands of output rows small enough to stay in a
  core's L2 cache, instead of into whole output columns spread over the L3;
* ``sddmm`` lets the compiler reassociate its dot products (``reassoc``),
  which is what lets them vectorise (otherwise each is a chain of dependent
  scalar adds), and computes two of them per pass over the ``dy`` row.

Floating point: kernels may fuse multiply-adds (``fastmath`` ``contract``)
and ``sddmm`` may reassociate its sums (``reassoc``). Neither touches NaN or
infinity handling; the results differ from a strictly sequential loop by
rounding only, well within the tests' tolerance.
"""

from __future__ import annotations

import numba
import numpy

_JIT = dict(nogil=True, cache=True)
_FMA = {"contract"}
_FMA_REASSOC = {"contract", "reassoc"}

# spmm_t: bands of output rows of at most this many bytes, so a band (written
# once per nonzero that lands in it) stays in a core's L2 cache (1 MiB on the
# Zen 4 EPYC these were tuned on; 256 KiB leaves room for the rows read).
BAND_BYTES = 1 << 18
# ... and at least this many bands per worker, so narrow outputs still keep
# every worker busy and the static split of bands over threads stays even.
BANDS_PER_WORKER = 4


@numba.njit(parallel=True, fastmath=_FMA, **_JIT)
def spmm(indptr, indices, data, x, out, bias, relu):  # pragma: no cover - compiled
    """out[r, :] = sum_k data[k] * x[indices[k], :] over row r; rows in parallel.

    With a non-empty ``bias`` (n_rows,) each row then gets its bias added, and
    with ``relu`` the result is clipped at 0 — the layer's bias and activation
    in the same pass over the row, which is still in L1 (the same operations, so
    the same bits, as adding and clipping afterwards). Any column order within a
    row works (duplicates too).

    A row of ``x`` that is all zeros (an input unit the previous ReLU shut for
    the whole batch) is read as a row of +0 kept in cache instead: its products
    are zeros either way, and a zero added to a sum that is not zero leaves it
    as it is, while an all-zero sum only ever meets ``acc``, which is never -0
    (see :func:`_live_rows`): the same bits, without the random read of the row
    (finite weights assumed, as there).
    """
    n_rows = out.shape[0]
    batch = out.shape[1]
    add_bias = bias.shape[0] > 0
    zero = out.dtype.type(0)
    live = _live_rows(x)
    zeros = numpy.zeros(batch, out.dtype)
    for r in numba.prange(n_rows):
        acc = out[r]
        acc[:] = 0
        k = indptr[r]
        end = indptr[r + 1]
        while k + 3 < end:  # four nonzeros per pass over acc
            a0 = data[k]
            a1 = data[k + 1]
            a2 = data[k + 2]
            a3 = data[k + 3]
            s0 = x[indices[k]] if live[indices[k]] else zeros
            s1 = x[indices[k + 1]] if live[indices[k + 1]] else zeros
            s2 = x[indices[k + 2]] if live[indices[k + 2]] else zeros
            s3 = x[indices[k + 3]] if live[indices[k + 3]] else zeros
            for j in range(batch):
                acc[j] += (a0 * s0[j] + a1 * s1[j]) + (a2 * s2[j] + a3 * s3[j])
            k += 4
        while k < end:
            a0 = data[k]
            s0 = x[indices[k]] if live[indices[k]] else zeros
            for j in range(batch):
                acc[j] += a0 * s0[j]
            k += 1
        if add_bias:
            b = bias[r]
            if relu:
                for j in range(batch):
                    v = acc[j] + b
                    # numpy.maximum(v, 0): NaN and -0.0 stay as they are, negatives become +0.
                    acc[j] = v if not v < 0 else zero
            else:
                for j in range(batch):
                    acc[j] += b


@numba.njit(parallel=True, fastmath=_FMA_REASSOC, **_JIT)
def relu_grad_rowsum(dy, y, relu, out, sums):  # pragma: no cover - compiled
    """out = dy * (y > 0) (or dy itself without ``relu``); sums[r] = sum_j out[r, j].
    ``out`` may be ``dy`` itself (in place).

    A layer's backward pass before its SDDMM: the gradient through its ReLU (from
    the layer's own output ``y``) and its bias gradient, in one pass over the
    rows instead of a mask, a product and a reduction. ``reassoc`` lets the row
    sums be vectorised (their order differs from NumPy's pairwise one by rounding).
    """
    n_rows = dy.shape[0]
    batch = dy.shape[1]
    one = out.dtype.type(1)
    zero = out.dtype.type(0)
    for r in numba.prange(n_rows):
        src = dy[r]
        dst = out[r]
        acc = zero
        if relu and dst.ctypes.data == src.ctypes.data:
            # In place (out is dy): one array read and written at the same index,
            # which LLVM vectorises; through two names it would fall back to
            # scalar code after its run-time overlap check.
            live = y[r]
            for j in range(batch):
                v = src[j] * (one if live[j] > 0 else zero)
                src[j] = v
                acc += v
        elif relu:
            live = y[r]
            for j in range(batch):
                v = src[j] * (one if live[j] > 0 else zero)  # as dy * (y > 0)
                dst[j] = v
                acc += v
        else:
            for j in range(batch):
                v = src[j]
                dst[j] = v
                acc += v
        sums[r] = acc


@numba.njit(inline="always", **_JIT)
def _lower_bound(indices, lo, hi, value):  # pragma: no cover - compiled
    """First position k in [lo, hi) with indices[k] >= value (sorted run)."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if indices[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


@numba.njit(parallel=True, **_JIT)
def _rows_sorted(indptr, indices):  # pragma: no cover - compiled
    """True when the column indices of every row are non-decreasing."""
    n_rows = indptr.shape[0] - 1
    unsorted = 0
    for r in numba.prange(n_rows):
        for k in range(indptr[r] + 1, indptr[r + 1]):
            if indices[k] < indices[k - 1]:
                unsorted += 1
    return unsorted == 0


@numba.njit(parallel=True, **_JIT)
def _live_rows(dy):  # pragma: no cover - compiled
    """1 for each row of ``dy`` with a value that is not zero (NaN counts), else 0.

    A row of zeros is a unit the ReLU shut for the whole batch (a third to a half
    of them in wide sparse layers): its terms ``data[k] * dy[r]`` are all zeros,
    and adding a zero to a sum that starts at +0 never changes it (round to
    nearest gives +0 for x + (-x), so no sum is ever -0). The products skip such
    rows and give the same bits, as long as the weights they would have
    multiplied are finite (an infinite weight times 0 would have been NaN).
    """
    n_rows = dy.shape[0]
    live = numpy.zeros(n_rows, numpy.uint8)
    for r in numba.prange(n_rows):
        live[r] = _is_live(dy[r])
    return live


@numba.njit(inline="always", **_JIT)
def _is_live(row):  # pragma: no cover - compiled
    """Whether ``row`` holds a value that is not zero (NaN counts)."""
    for j in range(row.shape[0]):
        if row[j] != 0 or row[j] != row[j]:
            return True
    return False


@numba.njit(**_JIT)
def _band_width(n_cols, batch, itemsize, workers):  # pragma: no cover - compiled
    """Output rows per band of :func:`_spmm_t_band_scan`: at most ``BAND_BYTES``, and
    at least ``BANDS_PER_WORKER`` bands per worker where there are enough rows."""
    band = max(1, BAND_BYTES // max(1, batch * itemsize))
    pieces = BANDS_PER_WORKER * max(1, workers)
    return min(band, max(1, (n_cols + pieces - 1) // pieces))


@numba.njit(**_JIT)
def _spmm_t_bands(indptr, indices, data, dy, out, workers):  # pragma: no cover - compiled
    """out = W.T @ dy for rows with sorted columns, by the cheaper of two kernels
    with the same sums (each output value adds its terms from 0 in row order).

    The band scan (:func:`_spmm_t_band_scan`) keeps the band it writes in cache
    but searches every CSR row once per band: ``n_bands * n_rows`` binary
    searches. Where that is more than one search per nonzero (wide, very sparse
    layers: 333 333 x 333 333 with 20 inputs per neuron at batch 128 makes 651
    bands, 32 searches per nonzero, 2.7 s against 0.37 s for the scatter on 2
    cores) the batch-slice scatter (:func:`_spmm_t_slices`) runs instead.
    """
    n_rows = dy.shape[0]
    live = _live_rows(dy)
    n_bands = -(-out.shape[0] // _band_width(out.shape[0], dy.shape[1], out.itemsize, workers))
    if n_bands * n_rows > indices.shape[0]:
        _spmm_t_slices(indptr, indices, data, dy, out, max(1, workers), live)
    else:
        _spmm_t_band_scan(indptr, indices, data, dy, out, workers, live)


@numba.njit(parallel=True, fastmath=_FMA, **_JIT)
def _spmm_t_band_scan(indptr, indices, data, dy, out, workers, live):  # pragma: no cover - compiled
    """out = W.T @ dy for rows with sorted columns; parallel over bands of out rows.

    A band is a range [c0, c1) of output rows (input features). Its worker
    zeroes it, then scans every CSR row: a binary search finds the row's first
    nonzero in the band, and the nonzeros up to c1 add ``data[k] * dy[r]``
    into the band, which stays in cache. Every output value sums its terms in
    row order, as a plain scatter does; bands are disjoint, so no atomics.
    Rows of ``dy`` that ``live`` marks 0 (all zeros, :func:`_live_rows`) are
    skipped: the same bits.
    """
    n_rows = dy.shape[0]
    batch = dy.shape[1]
    n_cols = out.shape[0]
    band = _band_width(n_cols, batch, out.itemsize, workers)
    n_bands = (n_cols + band - 1) // band
    for b in numba.prange(n_bands):
        c0 = b * band
        c1 = min(n_cols, c0 + band)
        for c in range(c0, c1):
            dst = out[c]
            for j in range(batch):
                dst[j] = 0
        for r in range(n_rows):
            if live[r] == 0:
                continue
            end = indptr[r + 1]
            k = _lower_bound(indices, indptr[r], end, c0)
            if k < end and indices[k] < c1:
                src = dy[r]
                while k < end and indices[k] < c1:
                    a = data[k]
                    dst = out[indices[k]]
                    for j in range(batch):
                        dst[j] += a * src[j]
                    k += 1


@numba.njit(parallel=True, fastmath=_FMA, **_JIT)
def _spmm_t_slices(indptr, indices, data, dy, out, n_chunks, live):  # pragma: no cover - compiled
    """out = W.T @ dy for any column order; parallel over disjoint batch slices.

    Each worker owns columns [lo, hi) of ``out``, so the scatter needs no
    atomics and no transposed copy of the CSR structure. Rows that ``live``
    marks 0 are skipped, as in :func:`_spmm_t_band_scan`.
    """
    n_rows = dy.shape[0]
    batch = dy.shape[1]
    step = (batch + n_chunks - 1) // n_chunks
    for c in numba.prange(n_chunks):
        lo = c * step
        hi = min(batch, lo + step)
        if lo >= hi:
            continue
        width = hi - lo
        out[:, lo:hi] = 0
        for r in range(n_rows):
            if live[r] == 0:
                continue
            # Slices indexed from 0 (not range(lo, hi)) let LLVM vectorise.
            src = dy[r, lo:hi]
            for k in range(indptr[r], indptr[r + 1]):
                a = data[k]
                dst = out[indices[k], lo:hi]
                for j in range(width):
                    dst[j] += a * src[j]


@numba.njit(**_JIT)
def spmm_t(indptr, indices, data, dy, out, n_chunks):  # pragma: no cover - compiled
    """out = W.T @ dy, a scatter of each nonzero's ``data[k] * dy[r]``.

    ``n_chunks`` is the number of workers to split the work over. Rows with
    sorted columns (the canonical CSR of every layer) take
    :func:`_spmm_t_bands` (the cache-friendly band kernel, with at least
    ``BANDS_PER_WORKER * n_chunks`` bands where there are enough output rows,
    unless its searches would outnumber the nonzeros); otherwise (``check=False`` on an unsorted
    pattern) the scatter runs over ``n_chunks`` disjoint batch slices.
    Checking the order costs one parallel pass over ``indices``.
    """
    if _rows_sorted(indptr, indices):
        _spmm_t_bands(indptr, indices, data, dy, out, n_chunks)
    else:
        _spmm_t_slices(indptr, indices, data, dy, out, max(1, n_chunks), _live_rows(dy))


@numba.njit(parallel=True, fastmath=_FMA_REASSOC, **_JIT)
def sddmm(indptr, indices, dy, x, out):  # pragma: no cover - compiled
    """out[k] = dy[row(k)] . x[indices[k]]; rows in parallel, any column order.

    Two nonzeros per pass share the loads of the ``dy`` row; ``reassoc``
    lets each dot product be summed in vector lanes. A row of ``dy`` that is
    all zeros (a unit the ReLU shut for the whole batch) gets +0 at each of its
    entries without reading ``x``: what its sums give whenever ``x`` is finite
    (every product is ±0 and the lanes start at +0; see :func:`_live_rows`).
    Likewise a row of ``x`` that is all zeros is read as a row of +0 kept in
    cache: its sums are +0 either way (finite ``dy``).
    """
    n_rows = dy.shape[0]
    batch = dy.shape[1]
    zero = out.dtype.type(0)
    x_live = _live_rows(x)
    zeros = numpy.zeros(batch, out.dtype)
    for r in numba.prange(n_rows):
        a = dy[r]
        k = indptr[r]
        end = indptr[r + 1]
        if not _is_live(a):
            for i in range(k, end):
                out[i] = zero
            continue
        while k + 1 < end:
            b0 = x[indices[k]] if x_live[indices[k]] else zeros
            b1 = x[indices[k + 1]] if x_live[indices[k + 1]] else zeros
            acc0 = zero
            acc1 = zero
            for j in range(batch):
                aj = a[j]
                acc0 += aj * b0[j]
                acc1 += aj * b1[j]
            out[k] = acc0
            out[k + 1] = acc1
            k += 2
        if k < end:
            b = x[indices[k]] if x_live[indices[k]] else zeros
            acc = zero
            for j in range(batch):
                acc += a[j] * b[j]
            out[k] = acc


@numba.njit(parallel=True, **_JIT)
def adam(p, g, m, v, lr, b1, b2, c1, c2, eps, bc1, bc2):  # pragma: no cover - compiled
    """The fused Adam update of adam.cu, in place, elements in parallel."""
    for i in numba.prange(p.size):
        gi = g[i]
        mi = b1 * m[i] + c1 * gi
        vi = b2 * v[i] + c2 * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] -= lr * (mi / bc1) / (numpy.sqrt(vi / bc2) + eps)

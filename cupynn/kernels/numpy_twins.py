"""NumPy twins of the CUDA kernels: the reference each kernel is tested against.

Each function here has the name of a kernel family in a ``.cu`` file beside it
and computes the same thing with plain NumPy, written for clarity rather than
speed. They accept NumPy arrays only.
"""

from __future__ import annotations

import numpy


def csr_rows(indptr: numpy.ndarray) -> numpy.ndarray:
    """Row index of every nonzero of a CSR matrix, shape (nnz,), int64."""
    counts = numpy.diff(indptr.astype(numpy.int64))
    return numpy.repeat(numpy.arange(len(counts)), counts)


def sddmm(indptr: numpy.ndarray, indices: numpy.ndarray, dy: numpy.ndarray,
          x: numpy.ndarray, chunk: int = 65536) -> numpy.ndarray:
    """Twin of ``sddmm.cu``: ``out[k] = dy[row(k)] . x[indices[k]]``.

    Parameters
    ----------
    indptr, indices : (n_rows + 1,), (nnz,) int32
    dy : (n_rows, batch) float
    x : (n_cols, batch) float

    Returns
    -------
    (nnz,) array of dy's dtype.
    """
    rows = csr_rows(indptr)
    out = numpy.empty(len(indices), dtype=dy.dtype)
    # Chunked so the (chunk, batch) gathers stay small.
    for start in range(0, len(indices), chunk):
        stop = start + chunk
        out[start:stop] = numpy.einsum(
            "kb,kb->k", dy[rows[start:stop]], x[indices[start:stop]])
    return out


def sddmm_warp(indptr: numpy.ndarray, indices: numpy.ndarray, dy: numpy.ndarray,
               x: numpy.ndarray, group: int, chunk: int = 65536) -> numpy.ndarray:
    """Twin of ``sddmm_warp_*`` in ``sddmm.cu``: :func:`sddmm`, summed in the kernel's order.

    Lane ``s`` of a group of ``group`` lanes sums the products ``j = s, s + group,
    ...``; the group's partial sums are then added by a butterfly (lane l adds
    lane ``l ^ offset``, offsets ``group / 2, ..., 1``) and lane 0 holds the result.
    """
    rows = csr_rows(indptr)
    nnz, batch = len(indices), dy.shape[1]
    width = -(-batch // group) * group  # the batch padded to whole groups (zeros add nothing)
    out = numpy.empty(nnz, dtype=dy.dtype)
    lane = numpy.arange(group)
    for start in range(0, nnz, chunk):
        stop = start + chunk
        products = numpy.zeros((min(stop, nnz) - start, width), dtype=dy.dtype)
        products[:, :batch] = dy[rows[start:stop]] * x[indices[start:stop]]
        partial = products.reshape(len(products), width // group, group).sum(axis=1)
        offset = group // 2
        while offset:
            partial = partial + partial[:, lane ^ offset]
            offset //= 2
        out[start:stop] = partial[:, 0]
    return out


def adam(p: numpy.ndarray, g: numpy.ndarray, m: numpy.ndarray, v: numpy.ndarray,
         lr: float, b1: float, b2: float, eps: float, bc1: float, bc2: float) -> None:
    """Twin of ``adam.cu``, in place on ``p``, ``m`` and ``v``.

    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
    p <- p - lr (m / bc1) / (sqrt(v / bc2) + eps)
    """
    t = p.dtype.type
    m *= t(b1)
    m += t(1 - b1) * g
    v *= t(b2)
    v += t(1 - b2) * g * g
    p -= t(lr) * (m / t(bc1)) / (numpy.sqrt(v / t(bc2)) + t(eps))


def _bias_relu(out: numpy.ndarray, bias: numpy.ndarray | None, relu: bool) -> numpy.ndarray:
    """``out + bias[:, None]`` and, with ``relu``, ``maximum(., 0)``: the end of every
    ``spmm`` kernel, after the row's sum."""
    if bias is not None:
        out = out + bias[:, None]
        if relu:
            out = numpy.maximum(out, 0)
    return out


def spmm(indptr: numpy.ndarray, indices: numpy.ndarray, data: numpy.ndarray,
         x: numpy.ndarray, bias: numpy.ndarray | None = None, relu: bool = False
         ) -> numpy.ndarray:
    """Twin of ``spmm.cu``'s ``spmm``: ``W @ x`` for CSR ``W`` of shape (n_rows, len(x)),
    x (n_cols, batch); then ``+ bias[:, None]`` and, with ``relu``, ``maximum(., 0)``.

    SciPy sums each row's products in CSR order from 0, as the kernel does.
    """
    import scipy.sparse

    w = scipy.sparse.csr_matrix((data, indices, indptr), shape=(len(indptr) - 1, x.shape[0]))
    out = numpy.asarray(w @ x)
    return _bias_relu(out, bias, relu)


def spmm_t(indptr: numpy.ndarray, indices: numpy.ndarray, data: numpy.ndarray,
           dy: numpy.ndarray, n_cols: int) -> numpy.ndarray:
    """Twin of ``spmm.cu``'s ``spmm_t``: ``W.T @ dy`` for CSR ``W`` of shape
    (len(dy), n_cols), dy (n_rows, batch).

    SciPy adds each output row's products in ascending row order from 0, as the
    kernel does through the transposed pattern.
    """
    import scipy.sparse

    w = scipy.sparse.csr_matrix((data, indices, indptr), shape=(len(indptr) - 1, n_cols))
    return numpy.asarray(w.T @ dy)


def packed_size(block_size: int) -> int:
    """Values of one packed symmetric block: P = B (B + 1) / 2."""
    return block_size * (block_size + 1) // 2


def lanes(n_blocks: int, tile: int) -> tuple[numpy.ndarray, numpy.ndarray]:
    """(tile index, lane) of blocks 0 .. n_blocks-1 in the tiled layout."""
    blocks = numpy.arange(n_blocks)
    return blocks // tile, blocks % tile


def pack(dense: numpy.ndarray, tile: int) -> numpy.ndarray:
    """Upper triangles of (n_blocks, B, B) matrices in the tiled layout: (n_tiles, P, tile).

    Entry (i, j), i <= j, of block b lands at ``[b // tile, i*B - i*(i-1)/2 + (j - i),
    b % tile]``, the layout of ``fisher.cu``; n_tiles = ceil(n_blocks / tile) and the
    padding lanes of the last tile are 0. The lower triangle is ignored (the
    blocks are symmetric).
    """
    n_blocks, b = dense.shape[0], dense.shape[-1]
    rows, cols = numpy.triu_indices(b)  # row-major order of the upper triangle
    finv = numpy.zeros((-(-n_blocks // tile), len(rows), tile), dtype=dense.dtype)
    _store(finv, dense)
    return finv


def unpack(finv: numpy.ndarray, block_size: int, n_blocks: int | None = None) -> numpy.ndarray:
    """The symmetric (n_blocks, B, B) matrices of tiled packed blocks (n_tiles, P, tile).

    ``n_blocks`` defaults to every lane, padding included.
    """
    n_tiles, _, tile = finv.shape
    t, lane = lanes(n_tiles * tile if n_blocks is None else n_blocks, tile)
    packed = finv[t, :, lane]  # (n_blocks, P)
    rows, cols = numpy.triu_indices(block_size)
    dense = numpy.zeros((packed.shape[0], block_size, block_size), dtype=finv.dtype)
    dense[:, rows, cols] = packed
    dense[:, cols, rows] = packed
    return dense


def _store(finv: numpy.ndarray, dense: numpy.ndarray) -> None:
    """Write (n_blocks, B, B) blocks into the first n_blocks lanes of ``finv``."""
    rows, cols = numpy.triu_indices(dense.shape[-1])
    t, lane = lanes(dense.shape[0], finv.shape[2])
    finv[t, :, lane] = dense[:, rows, cols]


def fisher_rank1_update(finv: numpy.ndarray, g: numpy.ndarray, u: numpy.ndarray, m: float,
                        block_size: int) -> None:
    """Twin of ``fisher_rank1_update_*`` in ``fisher.cu``, in place on ``finv``.

    For every block b: F^{-1} <- F^{-1} - u_b u_b^T / (m + g_b . u_b), u = F^{-1} g
    from before the step (n_blocks = len(g) / B). Blocks whose g_b is all zero
    are left as they are.
    """
    gb, ub = g.reshape(-1, block_size), u.reshape(-1, block_size)
    dense = unpack(finv, block_size, gb.shape[0])
    den = m + numpy.einsum("bi,bi->b", gb, ub)
    live = (gb != 0).any(axis=1)
    dense[live] -= (ub[:, :, None] * ub[:, None, :] / den[:, None, None])[live]
    _store(finv, dense)


def fisher_update(finv: numpy.ndarray, g: numpy.ndarray, m: float, block_size: int) -> numpy.ndarray:
    """One Sherman-Morrison step of every block, in place on ``finv``; returns u.

    What the dispatcher ``cupynn.kernels.fisher_update`` launches on the GPU
    (``packed_matvec`` then ``fisher_rank1_update``) and the CPU kernel
    computes in one pass: u = F^{-1} g_b;  den = m + g_b . u;
    F^{-1} <- F^{-1} - u u^T / den.
    """
    u = packed_matvec(finv, g, block_size)
    fisher_rank1_update(finv, g, u, m, block_size)
    return u


def packed_matvec(finv: numpy.ndarray, v: numpy.ndarray, block_size: int) -> numpy.ndarray:
    """Twin of ``packed_matvec_*`` in ``fisher.cu``: out_b = F_b^{-1} v_b, flat (n_blocks*B,)."""
    vb = v.reshape(-1, block_size)
    dense = unpack(finv, block_size, vb.shape[0])
    return numpy.einsum("bij,bj->bi", dense, vb).reshape(-1)


def adam_multi(ps: list[numpy.ndarray], gs: list[numpy.ndarray], ms: list[numpy.ndarray],
               vs: list[numpy.ndarray], table: numpy.ndarray, row: numpy.ndarray) -> None:
    """Twin of ``adam.cu``'s ``adam_multi``: :func:`adam` of every array of the lists, in
    place, with the scalars of ``table[row[0]]`` (lr, b1, b2, 1 - b1, 1 - b2, eps, bc1,
    bc2, already in the arrays' dtype: the row of ``adam_scalars``, so the same bits as
    :func:`adam` given the hyper-parameters that made it)."""
    lr, b1, b2, c1, c2, eps, bc1, bc2 = table[int(row[0])]
    for p, g, m, v in zip(ps, gs, ms, vs):
        m *= b1
        m += c1 * g
        v *= b2
        v += c2 * g * g
        p -= lr * (m / bc1) / (numpy.sqrt(v / bc2) + eps)


# Losses (loss.cu, issue 19). Each row kernel's twin returns (grad, per_row) in its
# order of operations, the row sums running over the columns in turn as one thread
# adds them; mean_of_rows sums the rows in the one warp's order.


def softmax_cross_entropy_rows(logits: numpy.ndarray, labels: numpy.ndarray,
                               den: float) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Twin of ``softmax_cross_entropy_rows_*`` in ``loss.cu``: (grad, per_row).

    logits (n, classes >= 1) float, labels (n,) int, ``den`` the batch size or
    ``total``. per_row = log(sum_j exp(z_j - max z)) - (z_label - max z);
    grad = (softmax(z) - onehot(label)) / den. A label outside [0, classes)
    gives a row of NaN.
    """
    t = logits.dtype.type
    n, classes = logits.shape
    top = logits.max(axis=1) if n else numpy.zeros(0, logits.dtype)
    e = numpy.exp(logits - top[:, None])
    norm = numpy.zeros(n, dtype=logits.dtype)
    for j in range(classes):
        norm = norm + e[:, j]
    rows = numpy.arange(n)
    valid = (labels >= 0) & (labels < classes)
    label = numpy.where(valid, labels, 0)
    per_row = numpy.log(norm) - (logits[rows, label] - top)
    grad = e / norm[:, None]
    grad[rows[valid], label[valid]] -= 1
    grad = grad / t(den)
    per_row[~valid] = numpy.nan
    grad[~valid] = numpy.nan
    return grad, per_row


def binary_cross_entropy_rows(z: numpy.ndarray, y: numpy.ndarray,
                              den: float) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Twin of ``binary_cross_entropy_rows_*`` in ``loss.cu``: (grad, per_row), (n,) each.

    e = exp(-|z|); per_row = (max(z, 0) - y z) + log1p(e);
    grad = (sigmoid(z) - y) / den, sigmoid from e on the side of z's sign.
    """
    t = z.dtype.type
    e = numpy.exp(-numpy.abs(z))
    per_row = (numpy.where(z > 0, z, t(0)) - y * z) + numpy.log1p(e)
    sigmoid = numpy.where(z >= 0, 1 / (1 + e), e / (1 + e))
    return (sigmoid - y) / t(den), per_row


def squared_error_rows(pred: numpy.ndarray, target: numpy.ndarray,
                       scale: float) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Twin of ``squared_error_rows_*`` in ``loss.cu``: (grad of pred's shape, per_row).

    pred and target (n, outputs) or (n,); d = pred - target; grad = d * scale
    (``scale`` rounded to pred's dtype); per_row = sum over the outputs of d d.
    """
    n = pred.shape[0]
    d = (pred - target).reshape(n, -1)
    per_row = numpy.zeros(n, dtype=pred.dtype)
    for j in range(d.shape[1]):
        per_row = per_row + d[:, j] * d[:, j]
    return (d * pred.dtype.type(scale)).reshape(pred.shape), per_row


def mean_of_rows(per_row: numpy.ndarray, den: float) -> numpy.ndarray:
    """Twin of ``mean_of_rows_*`` in ``loss.cu``: sum(per_row) / den as a 0-d array.

    Lane l of one warp adds rows l, l + 32, ... in turn; then partial sums are
    added across lanes by a butterfly with offsets 16, 8, 4, 2, 1 (each lane
    adds the other's sum to its own). No rows: 0 / den (NaN for den 0).
    """
    t = per_row.dtype.type
    lanes = numpy.zeros(32, dtype=per_row.dtype)
    for start in range(0, per_row.shape[0], 32):
        chunk = per_row[start:start + 32]
        lanes[:chunk.shape[0]] = lanes[:chunk.shape[0]] + chunk
    other = numpy.arange(32)
    for offset in (16, 8, 4, 2, 1):
        lanes = lanes + lanes[other ^ offset]
    with numpy.errstate(invalid="ignore", divide="ignore"):
        return numpy.asarray(lanes[0] / t(den), dtype=per_row.dtype)


# relu_grad_rowsum (sddmm.cu) and the step's data movement (batch.cu), issue 19.


def relu_grad_rowsum(dy: numpy.ndarray, y: numpy.ndarray | None = None
                     ) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Twin of ``relu_grad_rowsum_*`` in ``sddmm.cu``: (dy * (y > 0) or dy, row sums).

    The kernel's order: lane l of a row's warp adds columns l, l + 32, ... in turn
    from 0; the 32 partial sums are then added by a butterfly (lane l adds lane
    ``l ^ offset``, offsets 16, 8, 4, 2, 1) and lane 0 holds the row's sum.
    """
    out = dy.copy() if y is None else dy * (y > 0)
    n_rows, batch = out.shape
    lanes = numpy.zeros((n_rows, 32), dtype=out.dtype)
    for start in range(0, batch, 32):
        chunk = out[:, start:start + 32]
        lanes[:, :chunk.shape[1]] = lanes[:, :chunk.shape[1]] + chunk
    other = numpy.arange(32)
    for offset in (16, 8, 4, 2, 1):
        lanes = lanes + lanes[:, other ^ offset]
    return out, lanes[:, 0].copy()


def _missing(dtype: numpy.dtype) -> float | int:
    """What batch.cu writes for an out-of-bounds position: NaN, or -1 for int64."""
    return -1 if dtype == numpy.int64 else numpy.nan


def _batch_sources(order: numpy.ndarray, counter: numpy.ndarray, stride: int, rows: int,
                   n: int) -> list[int | None]:
    """The data set's row of each batch position, None where batch.cu writes missing."""
    start = int(counter[0]) * int(stride)
    sources = []
    for j in range(rows):
        p = start + j
        s = int(order[p]) if 0 <= p < len(order) else -1
        sources.append(s if 0 <= s < n else None)
    return sources


def gather_batch(x: numpy.ndarray, order: numpy.ndarray, counter: numpy.ndarray, stride: int,
                 rows: int) -> numpy.ndarray:
    """Twin of ``gather_batch_*`` in ``batch.cu``: (features, rows),
    ``out[:, j] = x[order[counter[0] * stride + j]]``, NaN where out of bounds."""
    out = numpy.empty((x.shape[1], rows), dtype=x.dtype)
    for j, s in enumerate(_batch_sources(order, counter, stride, rows, x.shape[0])):
        out[:, j] = _missing(x.dtype) if s is None else x[s]
    return out


def gather_labels(y: numpy.ndarray, order: numpy.ndarray, counter: numpy.ndarray, stride: int,
                  rows: int) -> numpy.ndarray:
    """Twin of ``gather_labels_*`` in ``batch.cu``: (rows,),
    ``out[j] = y[order[counter[0] * stride + j]]``, NaN (-1 for int64) where out of bounds."""
    sources = _batch_sources(order, counter, stride, rows, y.shape[0])
    return numpy.array([_missing(y.dtype) if s is None else y[s] for s in sources],
                       dtype=y.dtype).reshape(rows)


def transpose(src: numpy.ndarray) -> numpy.ndarray:
    """Twin of ``transpose_*`` in ``batch.cu``: src (a, b) as a C-contiguous (b, a)."""
    return numpy.ascontiguousarray(src.T)


def end_step(value: numpy.ndarray, losses: numpy.ndarray, counter: numpy.ndarray) -> None:
    """Twin of ``end_step_*`` in ``batch.cu``, in place: ``losses[counter[0]] = value``
    (as float64; skipped outside [0, len(losses))), then ``counter[0] += 1``."""
    step = int(counter[0])
    if 0 <= step < len(losses):
        losses[step] = numpy.float64(numpy.asarray(value).reshape(()))
    counter[0] = step + 1



def _rows_in_order(ptr: numpy.ndarray, cols: numpy.ndarray, values: numpy.ndarray,
                   dense: numpy.ndarray) -> numpy.ndarray:
    """``out[r] = sum_p values[p] * dense[cols[p]]`` over the entries ``ptr[r] <= p <
    ptr[r + 1]``, each row's sum taken from 0 in entry order (all rows at once: step s adds
    every row's s-th product)."""
    n = len(ptr) - 1
    lengths = numpy.diff(ptr.astype(numpy.int64))
    out = numpy.zeros((n, dense.shape[1]), dtype=dense.dtype)
    for s in range(int(lengths.max(initial=0))):
        rows = numpy.flatnonzero(lengths > s)
        p = ptr[rows].astype(numpy.int64) + s
        out[rows] = out[rows] + values[p][:, None] * dense[cols[p]]
    return out


def spmm_tiled(indptr: numpy.ndarray, indices: numpy.ndarray, data: numpy.ndarray,
               x: numpy.ndarray, bias: numpy.ndarray | None = None, relu: bool = False
               ) -> numpy.ndarray:
    """Twin of ``spmm.cu``'s ``spmm_tiled`` (issue 20): :func:`spmm`, each output summed
    from 0 in the row's CSR order, then ``+ bias`` and ``maximum(., 0)``, as the kernel
    does whatever its tiles; the same order as ``spmm``'s, so the same bits (without FMA).

    indptr, indices: (n_rows + 1,), (nnz,) int32; data (nnz,), x (n_cols, batch):
    returns (n_rows, batch) of x's dtype.
    """
    out = _rows_in_order(indptr, indices, data, x)
    return _bias_relu(out, bias, relu)


def spmm_t_tiled(indptr: numpy.ndarray, indices: numpy.ndarray, data: numpy.ndarray,
                 dy: numpy.ndarray, n_cols: int) -> numpy.ndarray:
    """Twin of ``spmm.cu``'s ``spmm_t_tiled`` (issue 20): ``W.T @ dy`` (n_cols, batch),
    each output row (a column of W) summed from 0 in ascending row order, the order of the
    transposed pattern the kernel reads (and of ``spmm_t``'s kernel)."""
    rows = csr_rows(indptr)
    order = numpy.lexsort((rows, indices))  # by column, then row
    t_indptr = numpy.searchsorted(indices[order], numpy.arange(n_cols + 1), side="left")
    return _rows_in_order(t_indptr, rows[order], data[order], dy)


def spmm_vec(indptr: numpy.ndarray, indices: numpy.ndarray, data: numpy.ndarray,
             x: numpy.ndarray, bias: numpy.ndarray | None = None, relu: bool = False
             ) -> numpy.ndarray:
    """Twin of ``spmm.cu``'s ``spmm_vec`` (issue 20): :func:`spmm_tiled`. The kernel's
    vector loads, row swizzle and tiles change where each output is computed, not its
    order: summed from 0 in the row's CSR order, then ``+ bias`` and the ReLU."""
    return spmm_tiled(indptr, indices, data, x, bias, relu)


def spmm_t_vec(indptr: numpy.ndarray, indices: numpy.ndarray, data: numpy.ndarray,
               dy: numpy.ndarray, n_cols: int) -> numpy.ndarray:
    """Twin of ``spmm.cu``'s ``spmm_t_vec`` (issue 20): :func:`spmm_t_tiled` (each output
    row summed from 0 in ascending row order, wherever the kernel computes it)."""
    return spmm_t_tiled(indptr, indices, data, dy, n_cols)


def sddmm_tiled(indptr: numpy.ndarray, indices: numpy.ndarray, dy: numpy.ndarray,
                x: numpy.ndarray, group: int) -> numpy.ndarray:
    """Twin of ``sddmm_tiled_*`` in ``sddmm.cu`` (issue 20), to the bit: the kernel stages
    ``dy[r]`` in shared memory chunk by chunk, but lane ``s`` of a group still adds the
    products ``j = s, s + group, ...`` one after another from 0 into one accumulator, and
    the group ends in the butterfly of :func:`sddmm_warp` (offsets ``group / 2, ..., 1``),
    whatever the chunk and the launch: the warp kernel's order at the same ``group``. (Here
    each lane's terms are added one by one; :func:`sddmm_warp`'s NumPy sum may add them
    pairwise, within rounding of this.)

    indptr, indices: (n_rows + 1,), (nnz,) int32; dy (n_rows, batch), x (n_cols, batch):
    returns (nnz,) of dy's dtype.
    """
    rows = csr_rows(indptr)
    nnz, batch = len(indices), dy.shape[1]
    width = -(-batch // group) * group  # the batch padded to whole groups (zeros add nothing)
    products = numpy.zeros((nnz, width), dtype=dy.dtype)
    products[:, :batch] = dy[rows] * x[indices]
    partial = numpy.zeros((nnz, group), dtype=dy.dtype)
    for start in range(0, width, group):  # lane s adds j = start + s, in increasing j
        partial = partial + products[:, start:start + group]
    lane = numpy.arange(group)
    offset = group // 2
    while offset:
        partial = partial + partial[:, lane ^ offset]
        offset //= 2
    return partial[:, 0].copy()


def sddmm_vec(indptr: numpy.ndarray, indices: numpy.ndarray, dy: numpy.ndarray,
              x: numpy.ndarray, group: int, vec: int) -> numpy.ndarray:
    """Twin of ``sddmm_vec_*`` in ``sddmm.cu`` (issue 20), to the bit: the batch in slices of
    ``vec`` consecutive columns, slice ``q`` to lane ``q % group``; lane ``s`` adds the
    products of its slices in increasing column order (within a slice component by
    component) one after another from 0 into one accumulator, then the butterfly of
    :func:`sddmm_warp` (offsets ``group / 2, ..., 1``), whatever the chunk and the launch.
    With ``vec = 1`` this is :func:`sddmm_tiled`'s order.

    indptr, indices: (n_rows + 1,), (nnz,) int32; dy (n_rows, batch), x (n_cols, batch):
    returns (nnz,) of dy's dtype.
    """
    rows = csr_rows(indptr)
    nnz, batch = len(indices), dy.shape[1]
    step = vec * group
    width = -(-batch // step) * step  # the batch padded to whole steps (zeros add nothing)
    products = numpy.zeros((nnz, width), dtype=dy.dtype)
    products[:, :batch] = dy[rows] * x[indices]
    slices = products.reshape(nnz, width // step, group, vec)  # [k, m, lane, component]
    partial = numpy.zeros((nnz, group), dtype=dy.dtype)
    for m in range(width // step):  # lane s adds j = m * step + s * vec + v, in increasing j
        for v in range(vec):
            partial = partial + slices[:, m, :, v]
    lane = numpy.arange(group)
    offset = group // 2
    while offset:
        partial = partial + partial[:, lane ^ offset]
        offset //= 2
    return partial[:, 0].copy()

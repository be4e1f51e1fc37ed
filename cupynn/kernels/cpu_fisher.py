"""Compiled, parallel CPU twins of ``fisher.cu`` (Numba): the packed block-diagonal inverse Fisher.

Layout (see ``fisher.cu``): ``finv`` is (n_tiles, P, TILE), P = B (B + 1) / 2:
packed entry p of block b at ``finv[b // TILE, p, b % TILE]``; vectors are
flat (n_blocks * B,), block by block. Each function computes what its NumPy
twin in :mod:`cupynn.kernels.numpy_twins` computes, tiles in parallel.

Every loop innermost runs over the TILE blocks of a tile, a compile-time
constant: LLVM vectorises those loops (about 2x the old per-block kernel, whose
inner loops over a row of the triangle were too short for the vector units).
Indices are unsigned, so Numba emits no negative-index handling that would
stop it. A tile's transposed vectors live in small scratch arrays made per
tile inside the kernel (B TILE floats each, and TILE for the denominators):
fresh, so LLVM knows they alias nothing.

The CPU update also runs over the padding lanes of the last tile and the
blocks of a live tile whose gradient is zero, subtracting 0 * 0: finite
values there stay exactly as they are.
"""

from __future__ import annotations

import numba
import numpy
from numba import uint64 as _u

# The tile width of the layout, kernels.FISHER_TILE (a test checks they agree).
# It is written here, not imported: Numba's on-disk cache is keyed to this
# file, so changing the width must change this file to recompile the kernels.
TILE = 64

# Only the summation order may change (no fast-math on NaN, Inf or signed
# zeros): 'reassoc' and 'contract' let LLVM vectorise and fuse multiply-adds.
_JIT = dict(nogil=True, cache=True, fastmath={"reassoc", "contract"})


# Gradient parts per call, at least: Numba compiles fisher_update once per tuple
# length (3-4 s each per dtype), and one length for every model up to four parts
# (the paper's networks have three sparse layers) and for the dispatcher's single
# vector keeps a fresh machine's compile to one version.
MIN_PARTS = 4


def _padded_count(n_parts: int) -> int:
    """The smallest power of two >= n_parts, at least MIN_PARTS."""
    return max(MIN_PARTS, 1 << max(0, n_parts - 1).bit_length())


def padded_parts(parts: list, empty) -> tuple:
    """``parts`` as a tuple whose length is a power of two (at least MIN_PARTS),
    padded with ``empty``.

    Numba compiles :func:`fisher_update` once per tuple length; rounding up
    keeps that to a few versions (4, 8, 16, ... parts), of which
    :func:`cupynn.kernels.warm_up` compiles the first ahead. An empty part costs
    the kernel a comparison per tile.
    """
    return tuple(parts) + (empty,) * (_padded_count(len(parts)) - len(parts))


def part_starts(lengths: tuple) -> numpy.ndarray:
    """Offsets of the parts in their concatenation, (len(padded parts) + 1,) int64; the
    padding parts are empty, at the end."""
    starts = numpy.zeros(_padded_count(len(lengths)) + 1, dtype=numpy.int64)
    starts[1:len(lengths) + 1] = numpy.cumsum(lengths)
    starts[len(lengths) + 1:] = starts[len(lengths)]
    return starts


@numba.njit(**_JIT)
def _gather(parts, starts, first_block, block_size, vt, grad_sum):  # pragma: no cover - compiled
    """Transpose one tile of a vector given as consecutive parts; True if any value is nonzero.

    Value q of the concatenation (part k holds q in [starts[k], starts[k + 1]))
    lands at vt[i * TILE + lane] for q = (first_block + lane) * B + i; values
    past the end are 0. Each value is also added to grad_sum[q] when grad_sum
    is not empty.
    """
    b = block_size
    for k in range(b * TILE):
        vt[_u(k)] = 0
    lo = first_block * b
    hi = lo + TILE * b
    accumulate = grad_sum.shape[0] > 0
    nonzero = False
    for k in range(len(parts)):
        part = parts[k]
        q = max(lo, starts[k])
        e = min(hi, starts[k + 1])
        while q < e:  # one block's values of this part at a time
            lane = (q - lo) // b
            i0 = (q - lo) - lane * b
            n = min(b - i0, e - q)
            src = part[_u(q - starts[k]):_u(q - starts[k] + n)]
            dst = vt[_u(i0 * TILE + lane):]
            for i in range(n):
                dst[_u(i * TILE)] = src[_u(i)]
            for i in range(n):
                nonzero |= src[_u(i)] != 0
            if accumulate:
                total = grad_sum[_u(q):_u(q + n)]
                for i in range(n):
                    total[_u(i)] += src[_u(i)]
            q += n
    return nonzero


@numba.njit(**_JIT)
def _tile_matvec(f, vt, ut, block_size):  # pragma: no cover - compiled
    """ut = F vt for the TILE blocks of one tile; f (P * TILE,), vt and ut (B * TILE,).

    Packed entry (i, j), i < j, adds F[i, j] v_j to u_i and F[i, j] v_i to u_j.
    """
    b = block_size
    for k in range(b * TILE):
        ut[_u(k)] = 0
    p = _u(0)
    for i in range(b):
        io = _u(i * TILE)
        for t in range(TILE):
            ut[io + _u(t)] += f[p + _u(t)] * vt[io + _u(t)]
        p += _u(TILE)
        for j in range(i + 1, b):
            jo = _u(j * TILE)
            for t in range(TILE):
                r = f[p + _u(t)]
                ut[io + _u(t)] += r * vt[jo + _u(t)]
                ut[jo + _u(t)] += r * vt[io + _u(t)]
            p += _u(TILE)


@numba.njit(**_JIT)
def _tile_update(f, gt, ut, m, block_size):  # pragma: no cover - compiled
    """One Sherman-Morrison step of the TILE blocks of a tile; gt is overwritten."""
    b = block_size
    _tile_matvec(f, gt, ut, b)
    den = numpy.empty(TILE, f.dtype)
    for t in range(TILE):
        den[_u(t)] = m
    for i in range(b):
        io = _u(i * TILE)
        for t in range(TILE):
            den[_u(t)] += gt[io + _u(t)] * ut[io + _u(t)]
    for t in range(TILE):
        den[_u(t)] = 1 / den[_u(t)]
    for i in range(b):  # gt <- u / den, the left factor of the update
        io = _u(i * TILE)
        for t in range(TILE):
            gt[io + _u(t)] = ut[io + _u(t)] * den[_u(t)]
    p = _u(0)
    for i in range(b):
        io = _u(i * TILE)
        for j in range(i, b):
            jo = _u(j * TILE)
            for t in range(TILE):
                f[p + _u(t)] -= gt[io + _u(t)] * ut[jo + _u(t)]
            p += _u(TILE)


@numba.njit(**_JIT)
def _scatter(ut, first_block, n_blocks, block_size, out):  # pragma: no cover - compiled
    """out[(first_block + lane) * B + i] = ut[i * TILE + lane] for the tile's real blocks."""
    b = block_size
    for lane in range(min(TILE, n_blocks - first_block)):
        dst = out[_u((first_block + lane) * b):_u((first_block + lane) * b + b)]
        for i in range(b):
            dst[_u(i)] = ut[_u(i * TILE + lane)]


@numba.njit(parallel=True, **_JIT)
def fisher_update(finv, parts, starts, work, m, block_size, grad_sum):  # pragma: no cover
    """Sherman-Morrison step of every block, in place, for the gradient ``parts``.

    u = F^{-1} g_b;  den = m + g_b . u;  F^{-1} <- F^{-1} - u u^T / den.
    The gradient is the concatenation of ``parts`` (a tuple of flat arrays;
    ``starts`` (len(parts) + 1,) their offsets in it), zero-padded to whole
    blocks. ``work`` (n_blocks * B,) gets u, unless it is empty. ``grad_sum``
    gets the gradient added unless it is empty. A tile whose gradient is all
    zero is skipped (the step is the identity).
    """
    if finv.shape[2] != TILE:  # e.g. a cached build from before TILE changed
        raise ValueError("cpu_fisher.fisher_update: finv's tiles are not TILE blocks wide")
    b = block_size
    n_blocks = -(-starts[-1] // b)
    for tile in numba.prange(finv.shape[0]):
        gt = numpy.empty(b * TILE, finv.dtype)
        ut = numpy.empty(b * TILE, finv.dtype)
        if _gather(parts, starts, tile * TILE, b, gt, grad_sum):
            _tile_update(finv[tile].reshape(-1), gt, ut, m, b)
        else:
            ut[:] = 0
        if work.shape[0] > 0:
            _scatter(ut, tile * TILE, n_blocks, b, work)


@numba.njit(parallel=True, **_JIT)
def packed_matvec(finv, v, out, block_size):  # pragma: no cover - compiled
    """out_b = F_b^{-1} v_b for every block, tiles in parallel."""
    if finv.shape[2] != TILE:  # e.g. a cached build from before TILE changed
        raise ValueError("cpu_fisher.packed_matvec: finv's tiles are not TILE blocks wide")
    b = block_size
    n_blocks = v.shape[0] // b
    starts = numpy.array([0, v.shape[0]])
    none = v[:0]
    for tile in numba.prange(finv.shape[0]):
        vt = numpy.empty(b * TILE, finv.dtype)
        ut = numpy.empty(b * TILE, finv.dtype)
        _gather((v,), starts, tile * TILE, b, vt, none)
        _tile_matvec(finv[tile].reshape(-1), vt, ut, b)
        _scatter(ut, tile * TILE, n_blocks, b, out)

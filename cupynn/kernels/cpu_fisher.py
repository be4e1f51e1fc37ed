"""Compiled, parallel CPU twins of ``fisher.cu`` (Numba): the packed block-diagonal inverse Fisher.

Layout (see ``fisher.cu``): ``finv`` is (n_tiles, P, TILE), P = B (B + 1) / 2:
packed entry p of block b at ``finv[b // TILE, p, b % TILE]``; vectors are
flat (n_blocks * B,), block by block. Each function computes what its NumPy
twin in :mod:`cupynn.kernels.numpy_twins` computes, tiles in parallel.

Every loop innermost runs over the TILE blocks of a tile, a compile-time
constant: LLVM vectorises those loops (about 2x the old per-block kernel, whose
inner loops over a row of the triangle were too short for the vector units).
Indices are unsigned, so Numba emits no negative-index handling that would
stop it. A tile's transposed vectors live in two small scratch arrays made per
tile (B TILE floats each, made inside the kernel: its only allocations,
fresh, so LLVM knows they alias nothing).
"""

from __future__ import annotations

import numba
import numpy
from numba import uint64 as _u

from . import FISHER_TILE as TILE

# Only the summation order may change (no fast-math on NaN, Inf or signed
# zeros): 'reassoc' and 'contract' let LLVM vectorise and fuse multiply-adds.
_JIT = dict(nogil=True, cache=True, boundscheck=False, fastmath={"reassoc", "contract"})


@numba.njit(**_JIT)
def _gather(v, first_block, n_blocks, block_size, vt):  # pragma: no cover - compiled
    """vt[i * TILE + lane] = v[(first_block + lane) * B + i], 0 past n_blocks; True if any != 0."""
    b = block_size
    nonzero = False
    for lane in range(TILE):
        block = first_block + lane
        if block < n_blocks:
            src = v[_u(block * b):_u(block * b + b)]
            for i in range(b):
                x = src[_u(i)]
                vt[_u(i * TILE + lane)] = x
                nonzero = nonzero or x != 0
        else:
            for i in range(b):
                vt[_u(i * TILE + lane)] = 0
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


@numba.njit(parallel=True, **_JIT)
def fisher_update(finv, g, work, m, block_size):  # pragma: no cover - compiled
    """Sherman-Morrison step of every block, in place; ``work`` (n_tiles * B * TILE,) gets u.

    u = F^{-1} g_b;  den = m + g_b . u;  F^{-1} <- F^{-1} - u u^T / den.
    A tile whose gradient is all zero is skipped (the step is the identity).
    """
    b = block_size
    n_blocks = g.shape[0] // b
    for tile in numba.prange(finv.shape[0]):
        gt = numpy.empty(b * TILE, finv.dtype)
        ut = work[tile * b * TILE:(tile + 1) * b * TILE]
        if _gather(g, tile * TILE, n_blocks, b, gt):
            _tile_update(finv[tile].reshape(-1), gt, ut, m, b)
        else:
            ut[:] = 0


@numba.njit(parallel=True, **_JIT)
def packed_matvec(finv, v, out, block_size):  # pragma: no cover - compiled
    """out_b = F_b^{-1} v_b for every block, tiles in parallel."""
    b = block_size
    n_blocks = v.shape[0] // b
    for tile in numba.prange(finv.shape[0]):
        vt = numpy.empty(b * TILE, finv.dtype)
        ut = numpy.empty(b * TILE, finv.dtype)
        _gather(v, tile * TILE, n_blocks, b, vt)
        _tile_matvec(finv[tile].reshape(-1), vt, ut, b)
        for lane in range(min(TILE, n_blocks - tile * TILE)):
            dst = out[_u((tile * TILE + lane) * b):_u((tile * TILE + lane) * b + b)]
            for i in range(b):
                dst[_u(i)] = ut[_u(i * TILE + lane)]

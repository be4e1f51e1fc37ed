"""Compiled, parallel CPU twins of ``fisher.cu`` (Numba): the packed block-diagonal inverse Fisher.

Layout (see ``fisher.cu``): ``finv`` is (n_blocks, P), P = B (B + 1) / 2, each
row the upper triangle of one symmetric B x B block, row-major; vectors are
flat (n_blocks * B,). Each function computes what its NumPy twin in
:mod:`cupynn.kernels.numpy_twins` computes, blocks in parallel. Outputs and
scratch are allocated by the caller with NumPy (so ``tracemalloc`` sees them).
"""

from __future__ import annotations

import numba

_JIT = dict(nogil=True, cache=True)


# Only the summation order may change (no fast-math on NaN, Inf or signed
# zeros): 'reassoc' lets LLVM vectorise the row dot products, about 1.4x faster.
@numba.njit(fastmath={"reassoc"}, **_JIT)
def _block_matvec(f, v, out, block_size):  # pragma: no cover - compiled
    """out = F v for one packed block ``f`` (P,); v and out are (B,).

    Row i of the triangle holds F[i, j], j >= i: it adds F[i, j] v[j] to out[i]
    and, by symmetry, F[i, j] v[i] to out[j > i]. One pass over f, contiguous.
    Loops index slices from 0 (never ``f[off + j]``), so Numba drops its
    negative-index handling and LLVM vectorises them.
    """
    b = block_size
    out[:] = 0
    off = 0
    for i in range(b):
        n = b - i
        row = f[off:off + n]
        vt = v[i:]
        ot = out[i:]
        vi = v[i]
        acc = row[0] * vi
        for j in range(1, n):
            r = row[j]
            acc += r * vt[j]
            ot[j] += r * vi
        out[i] += acc
        off += n


@numba.njit(parallel=True, **_JIT)
def fisher_update(finv, g, work, m, block_size):  # pragma: no cover - compiled
    """Sherman-Morrison step of every block, in place; ``work`` (n_blocks * B,) holds u.

    u = F^{-1} g_b;  den = m + g_b . u;  F^{-1} <- F^{-1} - u u^T / den.
    """
    b = block_size
    one = finv.dtype.type(1)
    for blk in numba.prange(finv.shape[0]):
        f = finv[blk]
        gb = g[blk * b:(blk + 1) * b]
        u = work[blk * b:(blk + 1) * b]
        _block_matvec(f, gb, u, b)
        den = m
        for i in range(b):
            den += gb[i] * u[i]
        scale = one / den
        off = 0
        for i in range(b):
            n = b - i
            row = f[off:off + n]
            ut = u[i:]
            a = u[i] * scale
            for j in range(n):
                row[j] -= a * ut[j]
            off += n


@numba.njit(parallel=True, **_JIT)
def packed_matvec(finv, v, out, block_size):  # pragma: no cover - compiled
    """out_b = F_b^{-1} v_b for every block, blocks in parallel."""
    b = block_size
    for blk in numba.prange(finv.shape[0]):
        _block_matvec(finv[blk], v[blk * b:(blk + 1) * b], out[blk * b:(blk + 1) * b], b)

"""Compiled, parallel CPU twins of the sparse kernels (Numba).

SciPy's sparse products run on one thread and NumPy has no SDDMM, so the CPU
backend uses these. Each computes exactly what its NumPy twin in
:mod:`cupynn.kernels.numpy_twins` computes; the tests compare them. All
outputs are allocated by the caller with NumPy, so that ``tracemalloc`` sees
every byte the training step uses.

Layout: activations are feature-major, ``x[feature, sample]``, so each nonzero
of a CSR weight works on a contiguous run of ``batch`` values.
"""

from __future__ import annotations

import numba
import numpy

_JIT = dict(nogil=True, cache=True)


@numba.njit(parallel=True, **_JIT)
def spmm(indptr, indices, data, x, out):  # pragma: no cover - compiled
    """out[r, :] = sum_k data[k] * x[indices[k], :] over row r; rows in parallel."""
    n_rows = out.shape[0]
    batch = out.shape[1]
    for r in numba.prange(n_rows):
        acc = out[r]
        acc[:] = 0
        for k in range(indptr[r], indptr[r + 1]):
            a = data[k]
            src = x[indices[k]]
            for j in range(batch):
                acc[j] += a * src[j]


@numba.njit(parallel=True, **_JIT)
def spmm_t(indptr, indices, data, dy, out, n_chunks):  # pragma: no cover - compiled
    """out = W.T @ dy. Scatter over rows; parallel over disjoint batch slices.

    Each worker owns columns [lo, hi) of ``out``, so the scatter needs no
    atomics and no transposed copy of the CSR structure.
    """
    n_rows = dy.shape[0]
    batch = dy.shape[1]
    step = (batch + n_chunks - 1) // n_chunks
    for c in numba.prange(n_chunks):
        lo = c * step
        hi = min(batch, lo + step)
        if lo >= hi:
            continue
        out[:, lo:hi] = 0
        for r in range(n_rows):
            src = dy[r]
            for k in range(indptr[r], indptr[r + 1]):
                a = data[k]
                dst = out[indices[k]]
                for j in range(lo, hi):
                    dst[j] += a * src[j]


@numba.njit(parallel=True, **_JIT)
def sddmm(indptr, indices, dy, x, out):  # pragma: no cover - compiled
    """out[k] = dy[row(k)] . x[indices[k]]; rows in parallel."""
    n_rows = dy.shape[0]
    batch = dy.shape[1]
    zero = out.dtype.type(0)
    for r in numba.prange(n_rows):
        a = dy[r]
        for k in range(indptr[r], indptr[r + 1]):
            b = x[indices[k]]
            acc = zero
            for j in range(batch):
                acc += a[j] * b[j]
            out[k] = acc


@numba.njit(parallel=True, **_JIT)
def adam(p, g, m, v, lr, b1, b2, eps, bc1, bc2):  # pragma: no cover - compiled
    """The fused Adam update of adam.cu, in place, elements in parallel."""
    one = p.dtype.type(1)
    for i in numba.prange(p.size):
        gi = g[i]
        mi = b1 * m[i] + (one - b1) * gi
        vi = b2 * v[i] + (one - b2) * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] -= lr * (mi / bc1) / (numpy.sqrt(vi / bc2) + eps)

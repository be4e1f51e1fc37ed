"""Every kernel run once on tiny arrays, before the work that is measured."""

from __future__ import annotations

from typing import Any

import numpy

from .adam import adam
from .fisher import fisher_shape, fisher_update, packed_matvec
from .sddmm import relu_grad_rowsum, sddmm
from .spmm import spmm, spmm_t


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

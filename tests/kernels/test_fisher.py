"""``fisher.cu`` emulated on the CPU against its twins (the dispatchers'
tests are in ``tests/test_fisher_kernels.py``).
"""

from __future__ import annotations

import ctypes

import numpy

from cupynn.kernels import numpy_twins as twins
from kernel_cases import (GUARD, TILE, assert_close, dtype_params, fisher_params, fisher_state,
                          grid_and_block, host_library, launch_params, packed_abs_matvec,
                          suffix_of)

try:  # tests/ is on sys.path (pytest's default rootdir-relative import)
    from cuda_host import launch, pointer
except ModuleNotFoundError:  # tests/ became a package
    from tests.cuda_host import launch, pointer


@fisher_params
@dtype_params
@launch_params
def test_emulated_packed_matvec_matches_twin(n_blocks, block_size, dtype, config):
    lib = host_library("fisher.cu")
    s = fisher_state(n_blocks, block_size, dtype)
    n = n_blocks * block_size
    out = numpy.full(n + GUARD, numpy.nan, dtype=dtype)
    grid, block = grid_and_block(config, s["finv"].shape[0] * block_size * TILE)
    suffix = suffix_of(dtype)
    launch(lib, f"packed_matvec_{suffix}", grid, block,
           [pointer(dtype)] * 3 + [ctypes.c_int] * 3,
           [s["finv"], s["v"], out, n_blocks, block_size, TILE])
    expected = twins.packed_matvec(s["finv"], s["v"], block_size)
    assert_close(out[:n], expected, packed_abs_matvec(s["finv"], s["v"], block_size), dtype)
    assert numpy.isnan(out[n:]).all(), "the kernel wrote past n_blocks * B"


@fisher_params
@dtype_params
@launch_params
def test_emulated_fisher_rank1_update_matches_twin(n_blocks, block_size, dtype, config):
    lib = host_library("fisher.cu")
    s = fisher_state(n_blocks, block_size, dtype)
    n, shape, size = n_blocks * block_size, s["finv"].shape, s["finv"].size
    m = 10.0
    finv = numpy.full(size + GUARD, numpy.nan, dtype=dtype)
    finv[:size] = s["finv"].reshape(-1)
    g = s["g"].copy()
    dead = 1 if n_blocks > 1 else None  # a dead block (not the only block): left as it is
    if dead is not None:
        g[dead * block_size:(dead + 1) * block_size] = 0
    f64 = s["finv"].astype(numpy.float64)
    u = twins.packed_matvec(f64, g.astype(numpy.float64), block_size)
    expected = s["finv"].copy()
    twins.fisher_rank1_update(expected, g, u.astype(dtype), m, block_size)
    # Error scale: |F| + |u| |u|^T / den.
    ub = numpy.abs(u).reshape(n_blocks, block_size)
    den = m + numpy.einsum("bi,bi->b", g.reshape(n_blocks, -1), u.reshape(n_blocks, -1))
    bound = numpy.abs(f64) + twins.pack(ub[:, :, None] * ub[:, None, :] / den[:, None, None], TILE)

    grid, block = grid_and_block(config, shape[0] * block_size * TILE)
    suffix = suffix_of(dtype)
    real = numpy.ctypeslib.as_ctypes_type(numpy.dtype(dtype))
    launch(lib, f"fisher_rank1_update_{suffix}", grid, block,
           [pointer(dtype)] * 3 + [real, ctypes.c_int, ctypes.c_int, ctypes.c_int],
           [finv, g, u.astype(dtype), m, n_blocks, block_size, TILE])
    # (padding lanes: bound 0, so they must be exactly the 0 they were)
    assert_close(finv[:size].reshape(shape), expected, bound, dtype)
    after = twins.unpack(finv[:size].reshape(shape), block_size)
    before = twins.unpack(s["finv"], block_size)
    if dead is not None:
        assert numpy.array_equal(after[dead], before[dead]), "the dead block changed"
    assert numpy.array_equal(after[n_blocks:], before[n_blocks:]), "the padding changed"
    assert numpy.isnan(finv[size:]).all(), "the kernel wrote past finv"

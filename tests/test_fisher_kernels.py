"""Tests of the packed block-diagonal inverse Fisher kernels (``fisher.cu``).

``fisher_update`` is one Sherman-Morrison step of every B x B block,
``F^{-1} <- (F + g g^T / m)^{-1}``: on the GPU the kernels ``packed_matvec``
(``F^{-1} v`` per block) then ``fisher_rank1_update``; on the CPU one Numba pass.
The blocks are stored packed (upper triangle, row-major) and tiled (entry p of
``FISHER_TILE`` consecutive blocks side by side). Checked here:

(a) m updates from ``I / lambda`` give ``inv(lambda I + G^T G / m)`` per block,
    the WoodFisher estimate, for the NumPy twin, the Numba kernels and (with a
    GPU) the CUDA kernels; the zero padding of the last block stays ``I / lambda``,
    a block whose gradient is zero is left exactly as it was, and the padding
    lanes of the last tile are never changed;
(b) ``packed_matvec`` against dense matrix products;
(c) the CUDA source run on the CPU (``tests/cuda_host``) against the twins,
    float32 and float64, with more blocks than threads (grid-stride loops);
(d) every kernel of ``fisher.cu`` is among ``CUDA_SOURCES``, so the compile
    tests of ``tests/kernels/test_sources.py`` (nvcc / NVRTC and host C++) cover it;
(e) the dispatchers reject bad input with clear messages.

Where a toolchain is missing, its tests skip with the reason, except under
``CI=true``, where they fail.
"""

from __future__ import annotations

import ctypes
import re

import numpy
import pytest

import cupynn
from conftest import needs_gpu
from cupynn import kernels
from cupynn.backend import get_backend, to_numpy
from cupynn.kernels import CUDA_SOURCES, FISHER_TILE, THREADS_PER_BLOCK, numpy_twins as twins

try:  # tests/ is on sys.path (pytest's default rootdir-relative import)
    from cuda_host import HostCompilerMissing, compile_cu, launch, pointer
except ModuleNotFoundError:  # tests/ became a package
    from tests.cuda_host import HostCompilerMissing, compile_cu, launch, pointer

DTYPES = [numpy.float32, numpy.float64]
from kernel_cases import skip_or_fail  # noqa: E402
FISHER_CU = kernels.KERNEL_DIR / "fisher.cu"
FAMILIES = ("fisher_rank1_update", "packed_matvec")
KERNELS = {f"{family}_{suffix}" for family in FAMILIES for suffix in ("f32", "f64")}



def gpu(test):
    """Skip without a GPU; mark as a GPU test (conftest.needs_gpu)."""
    for mark in needs_gpu:
        test = mark(test)
    return test
dtype_params = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
block_params = pytest.mark.parametrize("block_size", [1, 5, 34])


def suffix(dtype) -> str:
    return "f32" if numpy.dtype(dtype) == numpy.float32 else "f64"


# ------------------------------------------------------------------ helpers


def packed_size(block_size: int) -> int:
    return block_size * (block_size + 1) // 2


# The padding lanes of the last tile hold this in every test: no kernel may change it.
PAD = 7.0


def padding(finv: numpy.ndarray, n_blocks: int) -> numpy.ndarray:
    """The padding lanes of tiled blocks, (n_tiles * TILE - n_blocks, P) (a copy)."""
    return finv.transpose(0, 2, 1).reshape(-1, finv.shape[1])[n_blocks:]


def tiled(dense: numpy.ndarray, dtype) -> numpy.ndarray:
    """Packed, tiled blocks with PAD in the padding lanes."""
    finv = twins.pack(dense, FISHER_TILE).astype(dtype)
    t, lane = twins.lanes(finv.shape[0] * FISHER_TILE, FISHER_TILE)
    finv[t[len(dense):], :, lane[len(dense):]] = PAD
    return finv


def identity_over(lam: float, n_blocks: int, block_size: int, dtype) -> numpy.ndarray:
    """Packed, tiled ``I / lam`` for every block."""
    eye = numpy.broadcast_to(numpy.eye(block_size) / lam, (n_blocks, block_size, block_size))
    return tiled(eye, dtype)


def n_tiles(n_blocks: int) -> int:
    return -(-n_blocks // FISHER_TILE)



def padded(grads: numpy.ndarray, block_size: int) -> numpy.ndarray:
    """(m, n_params) gradients padded with zeros to (m, n_blocks * B)."""
    m, n = grads.shape
    n_blocks = -(-n // block_size)
    out = numpy.zeros((m, n_blocks * block_size), dtype=grads.dtype)
    out[:, :n] = grads
    return out


def woodfisher_reference(grads: numpy.ndarray, lam: float, block_size: int) -> numpy.ndarray:
    """``inv(lam I + G_b^T G_b / m)`` per block (float64, dense), G already padded."""
    m = grads.shape[0]
    blocks = grads.reshape(m, -1, block_size).transpose(1, 0, 2)  # (n_blocks, m, B)
    fisher = lam * numpy.eye(block_size) + numpy.einsum("bki,bkj->bij", blocks, blocks) / m
    return numpy.linalg.inv(fisher)


def assert_blocks_close(actual: numpy.ndarray, expected: numpy.ndarray, rtol: float) -> None:
    """Dense (n_blocks, B, B) blocks agree to ``rtol`` times each block's largest entry."""
    actual = numpy.asarray(actual, dtype=numpy.float64)
    scale = numpy.abs(expected).max(axis=(1, 2), keepdims=True)
    err = numpy.abs(actual - expected)
    bad = ~(err <= rtol * scale)  # NaN counts as a difference
    assert not bad.any(), (f"{int(bad.sum())} of {bad.size} entries differ; worst relative "
                           f"error {float((err / scale).max()):.3g}, tolerance {rtol:.3g}")


# -------------------------------------------------------------- layout, twins


@block_params
@pytest.mark.parametrize("n_blocks", [3, FISHER_TILE, FISHER_TILE + 5])
def test_pack_layout_and_round_trip(block_size, n_blocks):
    rng = numpy.random.default_rng(0)
    b = block_size
    a = rng.standard_normal((n_blocks, b, b))
    sym = a + a.transpose(0, 2, 1)
    packed = twins.pack(sym, FISHER_TILE)
    assert packed.shape == kernels.fisher_shape(n_blocks, b) == (
        n_tiles(n_blocks), packed_size(b), FISHER_TILE)
    assert packed.flags.c_contiguous
    for blk in range(n_blocks):
        t, lane = divmod(blk, FISHER_TILE)
        for i in range(b):
            for j in range(i, b):
                assert packed[t, i * b - i * (i - 1) // 2 + (j - i), lane] == sym[blk, i, j]
    padding = packed.transpose(0, 2, 1).reshape(-1, packed_size(b))[n_blocks:]
    assert not padding.any()
    assert numpy.array_equal(twins.unpack(packed, b, n_blocks), sym)
    assert twins.unpack(packed, b).shape == (n_tiles(n_blocks) * FISHER_TILE, b, b)
    assert twins.packed_size(b) == packed_size(b)


def test_cpu_kernels_use_the_layout_tile_width():
    """cpu_fisher writes its tile width out (Numba's cache is keyed to that file) and
    refuses blocks tiled another way, which a stale cached build would meet."""
    from cupynn.kernels import cpu_fisher

    assert cpu_fisher.TILE == FISHER_TILE
    wrong = numpy.zeros((1, 3, FISHER_TILE // 2))
    g = numpy.ones(2)
    with pytest.raises(ValueError, match="not TILE blocks wide"):
        cpu_fisher.fisher_update(wrong, cpu_fisher.padded_parts([g], g[:0]),
                                 cpu_fisher.part_starts((2,)), g[:0], 1.0, 2, g[:0])
    with pytest.raises(ValueError, match="not TILE blocks wide"):
        cpu_fisher.packed_matvec(wrong, g, numpy.empty(2), 2)


# ---------------------------------------- (a) m updates give the WoodFisher inverse


LAMBDA = 0.1
# (n_params, m): a partial last block (padded), and for B=1 and B=5 also whole ones.
WOODFISHER_CASES = {1: [(7, 6)], 3: [(400, 4)], 5: [(23, 8), (20, 3)], 34: [(150, 10)]}
# (B = 3, 400 parameters: 134 blocks in three tiles, the last one partial)
woodfisher_params = pytest.mark.parametrize(
    "block_size, n_params, m",
    [(b, n, m) for b, cases in WOODFISHER_CASES.items() for n, m in cases],
    ids=lambda x: str(x))
# Relative error in the largest entry of a block (cond(F) is at most about 100 here).
WOODFISHER_RTOL = {numpy.float64: 1e-11, numpy.float32: 2e-4}


def woodfisher_run(update, block_size: int, n_params: int, m: int, dtype, xp=numpy):
    """Apply ``update(finv, g, m)`` for m gradients from ``I / LAMBDA``.

    Returns (dense result as float64, float64 reference, number of padded entries).
    """
    rng = numpy.random.default_rng(block_size * 1000 + n_params)
    grads = padded(rng.standard_normal((m, n_params)), block_size)
    n_blocks = grads.shape[1] // block_size
    finv = xp.asarray(identity_over(LAMBDA, n_blocks, block_size, dtype))
    for k in range(m):
        update(finv, xp.asarray(grads[k].astype(dtype)), m)
    host = to_numpy(finv)
    assert (padding(host, n_blocks) == PAD).all(), "a kernel changed the padding lanes"
    dense = twins.unpack(host, block_size, n_blocks).astype(numpy.float64)
    return dense, woodfisher_reference(grads, LAMBDA, block_size), grads.shape[1] - n_params


def assert_woodfisher(dense, expected, n_pad: int, block_size: int, dtype) -> None:
    assert_blocks_close(dense, expected, WOODFISHER_RTOL[dtype])
    if n_pad:
        # The padded coordinates never see a nonzero gradient: u is exactly 0
        # there, so their rows and columns stay exactly those of I / lambda.
        last = dense[-1]
        real = block_size - n_pad
        t = numpy.dtype(dtype).type
        assert numpy.array_equal(last[real:, real:], numpy.eye(n_pad) * float(t(1 / LAMBDA)))
        assert not last[real:, :real].any() and not last[:real, real:].any()


def test_woodfisher_reference_is_the_inverse_of_the_block_diagonal():
    """The reference: inv of the block diagonal of lam I + G^T G / m; padding gives I / lam."""
    rng = numpy.random.default_rng(5)
    grads = padded(rng.standard_normal((4, 8)), 5)
    ref = woodfisher_reference(grads, 0.5, 5)
    fisher = 0.5 * numpy.eye(10) + grads.T @ grads / 4
    mask = numpy.kron(numpy.eye(2), numpy.ones((5, 5)))
    full = numpy.linalg.inv(fisher * mask)
    assert numpy.allclose(ref[0], full[:5, :5]) and numpy.allclose(ref[1], full[5:, 5:])
    assert numpy.allclose(full[:5, 5:], 0)
    assert numpy.allclose(ref[1][3:, 3:], 2 * numpy.eye(2))
    assert numpy.allclose(ref[1][3:, :3], 0)


@woodfisher_params
@dtype_params
def test_twin_update_gives_woodfisher_inverse(block_size, n_params, m, dtype):
    dense, expected, n_pad = woodfisher_run(
        lambda f, g, m_: twins.fisher_update(f, g, m_, block_size), block_size, n_params, m, dtype)
    assert_woodfisher(dense, expected, n_pad, block_size, dtype)


@woodfisher_params
@dtype_params
@pytest.mark.parametrize("own_work", [False, True], ids=["work_allocated", "work_given"])
def test_cpu_update_gives_woodfisher_inverse(block_size, n_params, m, dtype, own_work):
    def update(finv, g, m_):
        work = numpy.full(g.shape, numpy.nan, dtype=dtype) if own_work else None
        assert kernels.fisher_update(finv, g, m_, block_size=block_size, work=work) is None

    dense, expected, n_pad = woodfisher_run(update, block_size, n_params, m, dtype)
    assert_woodfisher(dense, expected, n_pad, block_size, dtype)


@gpu
@woodfisher_params
@dtype_params
@pytest.mark.parametrize("max_blocks", [None, 2], ids=["full_grid", "max_blocks_2"])
def test_gpu_update_gives_woodfisher_inverse(block_size, n_params, m, dtype, max_blocks):
    xp = get_backend("gpu").xp

    def update(finv, g, m_):
        kernels.fisher_update(finv, g, m_, block_size=block_size, max_blocks=max_blocks)
        assert type(finv) is xp.ndarray

    dense, expected, n_pad = woodfisher_run(update, block_size, n_params, m, dtype, xp=xp)
    assert_woodfisher(dense, expected, n_pad, block_size, dtype)


@gpu
@dtype_params
@pytest.mark.parametrize("max_blocks", [None, 2], ids=["full_grid", "max_blocks_2"])
def test_gpu_update_matches_twin_many_blocks(dtype, max_blocks):
    """600 blocks in 10 tiles, one thread per (block, row): far more than the
    2 * THREADS_PER_BLOCK of max_blocks=2."""
    assert 600 * 5 > 2 * THREADS_PER_BLOCK
    xp = get_backend("gpu").xp
    finv, g, _ = random_state(600, 5, dtype, seed=4)
    expected = finv.copy()
    twins.fisher_update(expected, g, 3.0, 5)
    d = xp.asarray(finv)
    kernels.fisher_update(d, xp.asarray(g), 3.0, block_size=5, max_blocks=max_blocks)
    assert_blocks_close(twins.unpack(to_numpy(d), 5, 600),
                        twins.unpack(expected, 5, 600).astype(float), EMULATED_RTOL[dtype])


# ---------------------------------------------------------- (b) packed_matvec


def random_state(n_blocks: int, block_size: int, dtype, seed: int = 0):
    """Well-conditioned symmetric packed blocks (I + small noise), a gradient, a vector."""
    rng = numpy.random.default_rng(seed)
    a = 0.1 * rng.standard_normal((n_blocks, block_size, block_size))
    dense = numpy.eye(block_size) + a @ a.transpose(0, 2, 1)
    finv = tiled(dense, dtype)
    g = rng.standard_normal(n_blocks * block_size).astype(dtype)
    v = rng.standard_normal(n_blocks * block_size).astype(dtype)
    return finv, g, v


MATVEC_RTOL = {numpy.float32: 1e-5, numpy.float64: 1e-13}


def matvec_reference(finv: numpy.ndarray, v: numpy.ndarray, block_size: int):
    """Dense float64 product and its error scale (the same product of absolute values)."""
    vb = v.astype(numpy.float64).reshape(-1, block_size)
    dense = twins.unpack(finv, block_size, vb.shape[0]).astype(numpy.float64)
    expected = numpy.einsum("bij,bj->bi", dense, vb).reshape(-1)
    bound = numpy.einsum("bij,bj->bi", numpy.abs(dense), numpy.abs(vb)).reshape(-1)
    return expected, bound


def assert_matvec(actual, finv, v, block_size, dtype) -> None:
    actual = to_numpy(actual)
    assert actual.dtype == numpy.dtype(dtype) and actual.shape == v.shape
    expected, bound = matvec_reference(finv, v, block_size)
    err = numpy.abs(actual.astype(numpy.float64) - expected)
    bad = ~(err <= MATVEC_RTOL[dtype] * bound + numpy.finfo(dtype).tiny)
    assert not bad.any(), f"{int(bad.sum())} of {bad.size} entries differ"


MATVEC_SHAPES = [(0, 5), (1, 1), (3, 1), (7, 5), (40, 34), (130, 3)]
matvec_params = pytest.mark.parametrize("n_blocks, block_size", MATVEC_SHAPES,
                                        ids=lambda x: str(x))


@matvec_params
@dtype_params
def test_twin_matvec_matches_dense(n_blocks, block_size, dtype):
    finv, _, v = random_state(n_blocks, block_size, dtype)
    assert_matvec(twins.packed_matvec(finv, v, block_size), finv, v, block_size, dtype)


@matvec_params
@dtype_params
@pytest.mark.parametrize("own_out", [False, True], ids=["out_allocated", "out_given"])
def test_cpu_matvec_matches_dense(n_blocks, block_size, dtype, own_out):
    finv, _, v = random_state(n_blocks, block_size, dtype)
    out = numpy.full(v.shape, numpy.nan, dtype=dtype) if own_out else None
    result = kernels.packed_matvec(finv, v, block_size=block_size, out=out)
    if own_out:
        assert result is out
    assert_matvec(result, finv, v, block_size, dtype)


@gpu
@matvec_params
@dtype_params
@pytest.mark.parametrize("max_blocks", [None, 2], ids=["full_grid", "max_blocks_2"])
def test_gpu_matvec_matches_dense(n_blocks, block_size, dtype, max_blocks):
    xp = get_backend("gpu").xp
    finv, _, v = random_state(n_blocks, block_size, dtype)
    result = kernels.packed_matvec(xp.asarray(finv), xp.asarray(v), block_size=block_size,
                                   max_blocks=max_blocks)
    assert type(result) is xp.ndarray
    assert_matvec(result, finv, v, block_size, dtype)


@dtype_params
def test_cpu_update_matches_twin_on_random_blocks(dtype):
    """Random SPD blocks (not just I / lambda), 150 blocks in three tiles, a dead block:
    Numba against the twin; then no blocks."""
    finv, g, _ = random_state(150, 34, dtype, seed=3)
    expected = finv.copy()
    rng = numpy.random.default_rng(9)
    for _ in range(3):
        g = rng.standard_normal(g.shape).astype(dtype)
        g[70 * 34:71 * 34] = 0  # block 70, in the second tile
        twins.fisher_update(expected, g, 4.0, 34)
        kernels.fisher_update(finv, g, 4.0, block_size=34)
    assert_blocks_close(twins.unpack(finv, 34, 150),
                        twins.unpack(expected, 34, 150).astype(float), EMULATED_RTOL[dtype])
    assert numpy.array_equal(twins.unpack(finv, 34)[70], twins.unpack(expected, 34)[70])
    assert (padding(finv, 150) == PAD).all()
    empty = numpy.empty((0, packed_size(34), FISHER_TILE), dtype=dtype)
    kernels.fisher_update(empty, numpy.empty(0, dtype=dtype), 4.0, block_size=34)


# Part lengths of one gradient of 23 values, B=5 (5 blocks, the last padded), and
# of 3 * 34 * 70 values, B=34 (210 blocks in four tiles), as a model's layers give them.
PARTS_CASES = [(5, (7, 0, 16)), (34, (2380, 1, 4759, 1)), (34, (4000, 3140)),
               (5, tuple(range(1, 7)))]  # (six parts: a second compiled version)


def parts_run(xp, block_size: int, lengths: tuple, dtype, **kw):
    """The dispatcher given the parts (and a grad_sum) against one padded vector: finv,
    work and grad_sum of both, as NumPy."""
    rng = numpy.random.default_rng(sum(lengths))
    n = sum(lengths)
    n_blocks = -(-n // block_size)
    finv, _, _ = random_state(n_blocks, block_size, dtype, seed=2)
    flat = rng.standard_normal(n).astype(dtype)
    flat[:block_size] = 0  # a dead block
    ends = numpy.cumsum(lengths)
    parts = [xp.asarray(flat[end - length:end]) for end, length in zip(ends, lengths)]
    results = []
    for g in (parts, xp.asarray(padded(flat[None, :], block_size)[0])):
        f = xp.array(finv)  # a copy each
        work = xp.full(n_blocks * block_size, numpy.nan, dtype=dtype)
        grad_sum = xp.ones(g.shape[0] if not isinstance(g, list) else n, dtype=dtype)
        kernels.fisher_update(f, g, 3.0, block_size=block_size, work=work, grad_sum=grad_sum,
                              **kw)
        results.append((to_numpy(f), to_numpy(work), to_numpy(grad_sum)[:n]))
    return results, 1 + flat


def assert_parts_equal_vector(results, expected_sum) -> None:
    (f, work, grad_sum), (f1, work1, grad_sum1) = results
    assert numpy.array_equal(f, f1) and numpy.array_equal(work, work1)
    assert numpy.array_equal(grad_sum, grad_sum1)
    assert numpy.array_equal(grad_sum, expected_sum)


@dtype_params
@pytest.mark.parametrize("block_size, lengths", PARTS_CASES, ids=str)
def test_cpu_update_of_parts_equals_update_of_one_vector(block_size, lengths, dtype):
    """A gradient given as parts (read where they are, zero-padded) is the same step,
    bit for bit, as the padded vector, and adds the same to grad_sum."""
    results, expected_sum = parts_run(numpy, block_size, lengths, dtype)
    assert_parts_equal_vector(results, expected_sum)


def test_cpu_update_of_up_to_four_parts_compiles_one_version():
    """A single vector and up to four parts share one compiled kernel per dtype
    (cpu_fisher.MIN_PARTS); BlockFisherInverse passes a model's layers as parts."""
    import numba

    from cupynn.kernels import cpu_fisher

    for lengths in ((5,), (2, 3), (1, 1, 1, 2)):
        finv = identity_over(1.0, 1, 5, numpy.float64)
        kernels.fisher_update(finv, [numpy.ones(k) for k in lengths], 2.0, block_size=5)
    kernels.fisher_update(identity_over(1.0, 1, 5, numpy.float64), numpy.ones(5), 2.0,
                          block_size=5)
    kernels.fisher_update(identity_over(1.0, 1, 5, numpy.float64), numpy.ones(5), 2.0,
                          block_size=5, check=False)
    parts_types = {sig[1] for sig in cpu_fisher.fisher_update.signatures
                   if str(sig[0].dtype) == "float64"}
    flat = numba.types.Array(numba.types.float64, 1, "C")
    assert {t for t in parts_types if t.count <= cpu_fisher.MIN_PARTS} == {
        numba.types.UniTuple(flat, cpu_fisher.MIN_PARTS)}


@gpu
@dtype_params
@pytest.mark.parametrize("block_size, lengths", PARTS_CASES, ids=str)
@pytest.mark.parametrize("max_blocks", [None, 2], ids=["full_grid", "max_blocks_2"])
def test_gpu_update_of_parts_equals_update_of_one_vector(block_size, lengths, dtype, max_blocks):
    results, expected_sum = parts_run(get_backend("gpu").xp, block_size, lengths, dtype,
                                      max_blocks=max_blocks)
    assert_parts_equal_vector(results, expected_sum)


# ------------------------------------------------- (c) fisher.cu emulated on the CPU


def host_library():
    try:
        return compile_cu(FISHER_CU)
    except HostCompilerMissing as exc:
        skip_or_fail(str(exc))


# The dispatcher's launch, a small grid that makes every thread loop, one thread.
LAUNCHES = {"dispatcher_grid": None, "grid2_block32": ((2,), (32,)), "one_thread": ((1,), (1,))}
launch_params = pytest.mark.parametrize("config", list(LAUNCHES), ids=str)
GUARD = 5  # NaN cells after each written buffer: a kernel must not write past its end
EMULATED_RTOL = {numpy.float32: 2e-5, numpy.float64: 1e-13}
# (n_blocks, B): two tiles, the second partial, and a single partial tile; every
# shape has more (block, row) threads' work than grid2_block32's 64 threads.
EMULATED_SHAPES = [(70, 5), (67, 1), (3, 34)]


def grid_and_block(config: str, n: int):
    if LAUNCHES[config] is None:
        return kernels._grid(n, None), (THREADS_PER_BLOCK,)
    return LAUNCHES[config]


def guarded(values: numpy.ndarray) -> numpy.ndarray:
    """A flat copy of ``values`` followed by GUARD NaN cells."""
    out = numpy.full(values.size + GUARD, numpy.nan, dtype=values.dtype)
    out[:values.size] = values.reshape(-1)
    return out


def rank1_argtypes(dtype) -> list:
    real = numpy.ctypeslib.as_ctypes_type(numpy.dtype(dtype))
    return [pointer(dtype)] * 3 + [real, ctypes.c_int, ctypes.c_int, ctypes.c_int]


def matvec_argtypes(dtype) -> list:
    return [pointer(dtype)] * 3 + [ctypes.c_int, ctypes.c_int, ctypes.c_int]


def test_emulated_shapes_stride():
    assert all(n_blocks > FISHER_TILE for n_blocks, _ in EMULATED_SHAPES[:2])  # two tiles
    assert all(n_tiles(n) * b * FISHER_TILE > 2 * 32 for n, b in EMULATED_SHAPES)


@pytest.mark.parametrize("n_blocks, block_size", EMULATED_SHAPES, ids=lambda x: str(x))
@dtype_params
@launch_params
def test_emulated_update_matches_twin(n_blocks, block_size, dtype, config):
    """The dispatcher's two launches (packed_matvec into work, fisher_rank1_update), thrice."""
    lib = host_library()
    finv, g, _ = random_state(n_blocks, block_size, dtype, seed=1)
    f_buf, w_buf = guarded(finv), guarded(numpy.full(g.size, 7.0, dtype=dtype))
    expected = finv.copy()
    grid, block = grid_and_block(config, finv.shape[0] * block_size * FISHER_TILE)
    sizes = [n_blocks, block_size, FISHER_TILE]
    rng = numpy.random.default_rng(2)
    for m in (1.0, 2.5, 8.0):
        g = rng.standard_normal(g.shape).astype(dtype)
        g[:block_size] = 0  # a dead block: left exactly as it is, u = 0
        u = twins.fisher_update(expected, g, m, block_size)
        launch(lib, f"packed_matvec_{suffix(dtype)}", grid, block, matvec_argtypes(dtype),
               [f_buf, g, w_buf] + sizes)
        launch(lib, f"fisher_rank1_update_{suffix(dtype)}", grid, block, rank1_argtypes(dtype),
               [f_buf, g, w_buf, m] + sizes)
        actual = f_buf[:finv.size].reshape(finv.shape)
        assert_blocks_close(twins.unpack(actual, block_size, n_blocks),
                            twins.unpack(expected, block_size, n_blocks).astype(float),
                            EMULATED_RTOL[dtype])
        assert numpy.array_equal(twins.unpack(actual, block_size, 1),
                                 twins.unpack(finv, block_size, 1)), "the dead block changed"
        assert (padding(actual, n_blocks) == PAD).all(), "the kernel changed the padding lanes"
        # work holds u = F^{-1} g of the blocks before the step.
        assert not w_buf[:block_size].any()
        assert numpy.allclose(w_buf[:g.size], u, rtol=10 * EMULATED_RTOL[dtype],
                              atol=10 * EMULATED_RTOL[dtype] * numpy.abs(u).max())
        assert numpy.isnan(f_buf[finv.size:]).all(), "the kernel wrote past finv"
        assert numpy.isnan(w_buf[g.size:]).all(), "the kernel wrote past work"


@pytest.mark.parametrize("n_blocks, block_size", EMULATED_SHAPES, ids=lambda x: str(x))
def test_emulated_kernels_do_not_depend_on_thread_order(n_blocks, block_size):
    """A GPU runs threads in no set order: last to first must give the very same bits."""
    lib = host_library()
    finv, g, v = random_state(n_blocks, block_size, numpy.float64, seed=8)
    g[:block_size] = 0
    grid, block = grid_and_block("grid2_block32", 0)
    sizes = [n_blocks, block_size, FISHER_TILE]
    results = []
    for reverse in (False, True):
        f, u, out = finv.copy(), numpy.zeros_like(g), numpy.zeros_like(v)
        launch(lib, "packed_matvec_f64", grid, block, matvec_argtypes(numpy.float64),
               [f, v, out] + sizes, reverse=reverse)
        for m in (1.0, 3.0):
            launch(lib, "packed_matvec_f64", grid, block, matvec_argtypes(numpy.float64),
                   [f, g, u] + sizes, reverse=reverse)
            launch(lib, "fisher_rank1_update_f64", grid, block, rank1_argtypes(numpy.float64),
                   [f, g, u, m] + sizes, reverse=reverse)
        results.append((f, u, out))
    for forward, backward in zip(*results):
        assert numpy.array_equal(forward, backward)


@pytest.mark.parametrize("n_blocks, block_size", EMULATED_SHAPES + [(0, 4)], ids=lambda x: str(x))
@dtype_params
@launch_params
def test_emulated_matvec_matches_twin(n_blocks, block_size, dtype, config):
    lib = host_library()
    finv, _, v = random_state(n_blocks, block_size, dtype, seed=6)
    n = n_blocks * block_size
    out = numpy.full(n + GUARD, numpy.nan, dtype=dtype)
    grid, block = grid_and_block(config, finv.shape[0] * block_size * FISHER_TILE)
    launch(lib, f"packed_matvec_{suffix(dtype)}", grid, block, matvec_argtypes(dtype),
           [finv, v, out, n_blocks, block_size, FISHER_TILE])
    assert_matvec(out[:n], finv, v, block_size, dtype)
    twin = twins.packed_matvec(finv, v, block_size)
    assert numpy.allclose(out[:n], twin, rtol=EMULATED_RTOL[dtype], atol=0)
    assert numpy.isnan(out[n:]).all(), "the kernel wrote past out"


# ------------------------------------------------------ (d) compile coverage


def test_fisher_cu_is_a_cuda_source_with_all_kernels():
    """tests/kernels/test_sources.py compiles every CUDA_SOURCES file (nvcc/NVRTC and host C++)."""
    assert FISHER_CU in CUDA_SOURCES
    defined = set(re.findall(r'extern\s+"C"\s+__global__\s+void\s+(\w+)', FISHER_CU.read_text()))
    assert defined == KERNELS
    for family in FAMILIES:
        assert callable(getattr(twins, family))


# -------------------------------------------------------------- (e) bad input


@pytest.fixture
def valid():
    """Two blocks of B=3 (P=6), one tile, float64, to break one thing at a time."""
    finv = identity_over(1.0, 2, 3, numpy.float64)
    return {"finv": finv, "g": numpy.ones(6), "v": numpy.ones(6), "m": 2.0, "B": 3}


def call_update(s, **change):
    a = dict(s, **change)
    return kernels.fisher_update(a["finv"], a["g"], a["m"], block_size=a["B"],
                                 **a.get("kw", {}))


def call_matvec(s, **change):
    a = dict(s, **change)
    return kernels.packed_matvec(a["finv"], a["v"], block_size=a["B"], **a.get("kw", {}))


def test_valid_fisher_inputs_pass(valid):
    call_update(valid)
    assert call_matvec(valid).shape == (6,)


_F = identity_over(1.0, 2, 3, numpy.float64)
_G = numpy.ones(6)
FISHER_BAD = [
    ("update_int_g", call_update, dict(g=numpy.ones(6, dtype=numpy.int64)),
     TypeError, "one dtype. Got float64 and int64"),
    ("update_float16", call_update, dict(finv=_F.astype(numpy.float16), g=_G.astype(numpy.float16)),
     TypeError, "float arrays must be float32 or float64. Got float16"),
    ("update_mixed", call_update, dict(g=numpy.ones(6, dtype=numpy.float32)),
     TypeError, "one dtype. Got float64 and float32"),
    ("update_work_dtype", call_update, dict(kw=dict(work=numpy.ones(6, dtype=numpy.float32))),
     TypeError, "one dtype"),
    ("matvec_out_dtype", call_matvec, dict(kw=dict(out=numpy.ones(6, dtype=numpy.float32))),
     TypeError, "one dtype"),
    ("update_wrong_P", call_update, dict(finv=numpy.ones((1, 9, FISHER_TILE))),
     ValueError, rf"finv must have shape \(n_tiles, 6, {FISHER_TILE}\) for block_size=3 .*"
                 rf"Got \(1, 9, {FISHER_TILE}\)"),
    ("update_untiled_finv", call_update, dict(finv=numpy.ones((2, 6))),
     ValueError, rf"finv must have shape \(n_tiles, 6, {FISHER_TILE}\)"),
    ("update_flat_finv", call_update, dict(finv=numpy.ones(12)),
     ValueError, rf"finv must have shape \(n_tiles, 6, {FISHER_TILE}\)"),
    ("matvec_wrong_block_size", call_matvec, dict(B=4),
     ValueError, rf"finv must have shape \(n_tiles, 10, {FISHER_TILE}\) for block_size=4"),
    ("update_short_g", call_update, dict(g=numpy.ones(5)),
     ValueError, r"g must be flat with a multiple of block_size=3 values .*Got \(5,\)"),
    ("update_2d_g", call_update, dict(g=numpy.ones((2, 3))),
     ValueError, r"g must be flat with a multiple of block_size=3"),
    ("matvec_long_v", call_matvec, dict(v=numpy.ones(7)),
     ValueError, r"v must be flat with a multiple of block_size=3"),
    ("matvec_v_of_two_tiles", call_matvec, dict(v=numpy.ones(3 * (FISHER_TILE + 1))),
     ValueError, rf"v has {FISHER_TILE + 1} blocks, which need finv of shape "
                 rf"\(2, 6, {FISHER_TILE}\). Got \(1, 6, {FISHER_TILE}\)"),
    ("update_work_shape", call_update, dict(kw=dict(work=numpy.ones(3))),
     ValueError, r"work must have shape \(6,\)"),
    ("matvec_out_shape", call_matvec, dict(kw=dict(out=numpy.ones(5))),
     ValueError, r"out must have shape \(6,\)"),
    ("update_strided_g", call_update, dict(g=numpy.ones(12)[::2]),
     ValueError, "'g' must be C-contiguous"),
    ("update_strided_work", call_update,
     dict(kw=dict(work=numpy.ones(12)[::2])),
     ValueError, "'work' must be C-contiguous"),
    ("update_fortran_finv", call_update,
     dict(finv=numpy.asfortranarray(numpy.ones((1, 6, FISHER_TILE)))),
     ValueError, "'finv' must be C-contiguous"),
    ("matvec_strided_v", call_matvec, dict(v=numpy.ones(12)[::2]),
     ValueError, "'v' must be C-contiguous"),
    ("update_m_zero", call_update, dict(m=0.0),
     ValueError, "m must be a positive finite number. Got 0.0"),
    ("update_m_negative", call_update, dict(m=-1),
     ValueError, "m must be a positive finite number"),
    ("update_m_nan", call_update, dict(m=float("nan")),
     ValueError, "m must be a positive finite number. Got nan"),
    ("update_m_inf", call_update, dict(m=float("inf")),
     ValueError, "m must be a positive finite number"),
    ("update_block_size_zero", call_update, dict(B=0),
     ValueError, "block_size must be a positive int. Got 0"),
    ("matvec_block_size_float", call_matvec, dict(B=3.0),
     ValueError, "block_size must be a positive int. Got 3.0"),
    ("matvec_block_size_bool", call_matvec, dict(B=True),
     ValueError, "block_size must be a positive int. Got True"),
    ("update_parts_2d", call_update, dict(g=[numpy.ones(3), numpy.ones((1, 3))]),
     ValueError, r"g\[1\] must be flat. Got shape \(1, 3\)"),
    ("update_parts_strided", call_update, dict(g=[numpy.ones(2), numpy.ones(8)[::2]]),
     ValueError, r"'g\[1\]' must be C-contiguous"),
    ("update_parts_dtype", call_update, dict(g=[numpy.ones(3), numpy.ones(3, numpy.float32)]),
     TypeError, "one dtype. Got float64 and float32"),
    ("update_parts_of_two_tiles", call_update,
     dict(g=[numpy.ones(3 * FISHER_TILE), numpy.ones(1)]),
     ValueError, rf"g has {FISHER_TILE + 1} blocks, which need finv of shape "
                 rf"\(2, 6, {FISHER_TILE}\). Got \(1, 6, {FISHER_TILE}\)"),
    ("update_parts_work_shape", call_update, dict(g=[numpy.ones(4)], kw=dict(work=numpy.ones(4))),
     ValueError, r"work must have shape \(6,\)"),
    ("update_grad_sum_shape", call_update, dict(kw=dict(grad_sum=numpy.ones(5))),
     ValueError, r"grad_sum must have shape \(6,\), the length of g. Got \(5,\)"),
    ("update_parts_grad_sum_shape", call_update,
     dict(g=[numpy.ones(2), numpy.ones(2)], kw=dict(grad_sum=numpy.ones(6))),
     ValueError, r"grad_sum must have shape \(4,\)"),
    ("update_grad_sum_dtype", call_update,
     dict(kw=dict(grad_sum=numpy.ones(6, dtype=numpy.float32))), TypeError, "one dtype"),
    ("update_strided_grad_sum", call_update, dict(kw=dict(grad_sum=numpy.ones(12)[::2])),
     ValueError, "'grad_sum' must be C-contiguous"),
]


def _aliasing_cases():
    f = identity_over(1.0, 2, 3, numpy.float64)
    g = numpy.ones(6)
    return [
        ("update_work_is_finv", call_update, dict(finv=f, kw=dict(work=f.reshape(-1)[:6])),
         ValueError, "work must not overlap finv"),
        ("update_work_is_g", call_update, dict(g=g, kw=dict(work=g)),
         ValueError, "work must not overlap g"),
        ("update_g_in_finv", call_update, dict(finv=f, g=f.reshape(-1)[:6]),
         ValueError, "finv must not overlap g"),
        ("update_part_in_finv", call_update, dict(finv=f, g=[g[:2], f.reshape(-1)[:4]]),
         ValueError, r"finv must not overlap g\[1\]"),
        ("update_grad_sum_is_g", call_update, dict(g=g, kw=dict(grad_sum=g)),
         ValueError, "grad_sum must not overlap g"),
        ("update_grad_sum_is_a_part", call_update, dict(g=[g[:3], g[3:]], kw=dict(grad_sum=g)),
         ValueError, r"grad_sum must not overlap g\[0\]"),
        ("update_grad_sum_is_work", call_update, dict(kw=dict(work=g, grad_sum=g)),
         ValueError, "work must not overlap grad_sum"),
        ("matvec_out_is_v", call_matvec, dict(v=g, kw=dict(out=g)),
         ValueError, "out must not overlap v"),
        ("matvec_out_in_finv", call_matvec, dict(finv=f, kw=dict(out=f.reshape(-1)[6:12])),
         ValueError, "out must not overlap finv"),
    ]


ALL_BAD = FISHER_BAD + _aliasing_cases()


@pytest.mark.parametrize("call, change, error, message", [c[1:] for c in ALL_BAD],
                         ids=[c[0] for c in ALL_BAD])
def test_fisher_dispatchers_reject_bad_input(valid, call, change, error, message):
    before = valid["finv"].copy()
    with pytest.raises(error, match=message):
        call(valid, **change)
    assert numpy.array_equal(valid["finv"], before), "a rejected call changed finv"

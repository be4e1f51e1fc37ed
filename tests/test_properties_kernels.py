"""Property: every kernel equals its NumPy twin, over random shapes, densities, dtypes,
seeds and launches (hypothesis).

``tests/kernels/`` and ``test_fisher_kernels.py`` check each kernel on chosen cases;
here the cases are drawn: CSR patterns of 0-24 rows and 1-24 columns at any density
(empty rows, an empty matrix and a full one among them), batches of 0-10, float32 and
float64, values over six decades with exact zeros, and any grid and block for the CUDA
sources run on the CPU (``tests/cuda_host``, each ``.cu`` built once per session), their
threads run first to last or last to first. The implementations under test:

- the dispatchers of :mod:`cupynn.kernels` on every backend present (the Numba kernels
  on the CPU; with a GPU, the CUDA kernels too);
- the CUDA kernels of ``sddmm.cu``, ``spmm.cu``, ``adam.cu``, ``fisher.cu``, ``loss.cu``
  and ``batch.cu`` emulated on the CPU (issue 19's among them: ``adam_multi`` over any
  list of arrays and any row of a table of steps, the loss rows and ``mean_of_rows``,
  ``relu_grad_rowsum``, and the captured step's gathers, transpose and ``end_step``,
  which read and advance a device step counter).

Each is compared with its twin in :mod:`cupynn.kernels.numpy_twins` run in the same
dtype, within ``rtol`` times the same sums taken over absolute values (the scale of
any summation order's rounding; see ``kernel_cases.assert_close``), or, where kernel
and twin add in one order, to the bit (``adam_multi``, ``mean_of_rows``,
``relu_grad_rowsum``, the copies of ``batch.cu``) or within a few ulps (the loss rows,
whose exp and log are the C library's). What must hold exactly is checked exactly:
nothing is written past an output, a dead Fisher block and the padding lanes are left
as they were, the order of the threads changes no bit.

Run time: the ``max_examples`` of each property keep this file to about a dozen seconds
on two cores, the one-time builds of the ``.cu`` files included. CI (``CI=true``) draws the
same examples every run (Hypothesis's ``ci`` profile: derandomised, no database).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, replace

import numpy
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import cupynn
from conftest import BACKENDS
from cupynn import kernels
from cupynn.backend import to_numpy
from cupynn.kernels import CUDA_SOURCES, FISHER_TILE, THREADS_PER_BLOCK, numpy_twins as twins
from cupynn.kernels.adam import AdamPointers
from kernel_cases import (GUARD, LAUNCHES, LossCase, adam_argtypes, adam_multi_argtypes,
                          assert_close, assert_same_bits, emulated_loss_rows,
                          emulated_mean_of_rows, emulated_relu_grad_rowsum, guarded,
                          host_library, kernel_names, sddmm_argtypes, sddmm_tiled_argtypes,
                          sddmm_warp_argtypes, suffix_of)
from test_fisher_kernels import matvec_argtypes, rank1_argtypes

try:  # tests/ is on sys.path (pytest's default rootdir-relative import)
    from cuda_host import launch, pointer
except ModuleNotFoundError:  # tests/ became a package
    from tests.cuda_host import launch, pointer

DTYPES = (numpy.float32, numpy.float64)
# Numba compiles once per dtype and signature (cached on disk), so the first example of
# a property may take seconds: no deadline. The backend parameter is a plain string.
PROPERTY = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
backends = pytest.mark.parametrize("backend", BACKENDS)


# --------------------------------------------------------------------- strategies
@dataclass(frozen=True)
class Csr:
    """A drawn CSR pattern with its operands: W (n_rows, n_cols), ``batch`` samples.

    Entries are where a uniform draw falls below ``density``; values are standard
    normal times ``scale``, about a tenth of them exactly 0. Built from the seed, so
    a failing example prints as these few numbers.
    """

    n_rows: int
    n_cols: int
    batch: int
    density: float
    dtype: type
    scale: float
    seed: int

    def arrays(self) -> dict[str, numpy.ndarray]:
        rng = numpy.random.default_rng(self.seed)
        mask = rng.random((self.n_rows, self.n_cols)) < self.density
        rows, cols = numpy.nonzero(mask)  # row-major: canonical CSR order

        def values(*shape):
            v = (rng.standard_normal(shape) * self.scale).astype(self.dtype)
            v[rng.random(shape) < 0.1] = 0
            return v

        return {"indptr": numpy.concatenate([[0], numpy.cumsum(mask.sum(axis=1))]).astype(
                    numpy.int32),
                "indices": cols.astype(numpy.int32), "rows": rows,
                "data": values(len(cols)), "bias": values(self.n_rows),
                "x": values(self.n_cols, self.batch), "dy": values(self.n_rows, self.batch)}


DENSITY = st.one_of(st.sampled_from((0.0, 0.1, 1.0)), st.floats(0.0, 1.0))
SEED = st.integers(0, 2**32 - 1)
DTYPE = st.sampled_from(DTYPES)
SCALE = st.sampled_from((1e-3, 1e-1, 1.0, 10.0, 1e3))


def csr(max_side: int = 24, max_batch: int = 10) -> st.SearchStrategy[Csr]:
    return st.builds(Csr, n_rows=st.integers(0, max_side), n_cols=st.integers(1, max_side),
                     batch=st.integers(0, max_batch), density=DENSITY, dtype=DTYPE,
                     scale=SCALE, seed=SEED)


# A CUDA launch for the CPU emulation: the dispatcher's (None), or any grid and block
# (the kernels stride over their work, so any launch must give the same result).
LAUNCH = st.one_of(st.none(), st.tuples(st.integers(1, 3), st.sampled_from((1, 3, 32, 64))))
REVERSE = st.booleans()


def on(backend: str, *arrays: numpy.ndarray) -> list:
    """Copies of ``arrays`` on ``backend`` (the originals stay as drawn, for the twins)."""
    xp = cupynn.get_backend(backend).xp
    return [xp.array(a, copy=True) for a in arrays]


def emulated(lib, name: str, launch_config, default: tuple, argtypes: list, args: list,
             reverse: bool, warps: bool | None = None) -> None:
    grid, block = default if launch_config is None else ((launch_config[0],), (launch_config[1],))
    launch(lib, name, grid, block, argtypes, args, reverse=reverse, warps=warps)


def guarded_empty(size: int, dtype) -> numpy.ndarray:
    """An output buffer of ``size`` NaN cells followed by GUARD more."""
    return numpy.full(size + GUARD, numpy.nan, dtype=dtype)


def assert_guard(buffer: numpy.ndarray, size: int) -> None:
    assert numpy.isnan(buffer[size:]).all(), "the kernel wrote past its output"


@pytest.fixture(scope="module")
def cu():
    """The CUDA sources built for the CPU (compile_cu: once per session)."""
    return {name: host_library(name)
            for name in ("sddmm.cu", "spmm.cu", "adam.cu", "fisher.cu", "loss.cu", "batch.cu")}


# -------------------------------------------------------------------------- SDDMM
def sddmm_twin(a: dict) -> tuple[numpy.ndarray, numpy.ndarray]:
    return (twins.sddmm(a["indptr"], a["indices"], a["dy"], a["x"]),
            twins.sddmm(a["indptr"], a["indices"], numpy.abs(a["dy"]), numpy.abs(a["x"])))


@backends
@settings(max_examples=60, **PROPERTY)
@given(case=csr(), method=st.sampled_from(kernels.SDDMM_METHODS),
       group=st.sampled_from((None, 1, 4, 32)), into=st.booleans())
def test_sddmm_equals_twin(backend, case, method, group, into):
    a = case.arrays()
    if method == "thread":
        group = None
    indptr, indices, dy, x = on(backend, a["indptr"], a["indices"], a["dy"], a["x"])
    out = None
    if into:  # a given output is filled, whatever it held
        (out,) = on(backend, numpy.full(len(a["indices"]), numpy.nan, dtype=case.dtype))
    got = kernels.sddmm(indptr, indices, dy, x, out=out, method=method, group=group)
    assert out is None or got is out
    expected, bound = sddmm_twin(a)
    assert_close(to_numpy(got), expected, bound, case.dtype)


@settings(max_examples=40, **PROPERTY)
@given(case=csr(), config=LAUNCH, reverse=REVERSE)
def test_emulated_sddmm_equals_twin(cu, case, config, reverse):
    a = case.arrays()
    nnz = len(a["indices"])
    out = guarded_empty(nnz, case.dtype)
    # One thread per nonzero, no warp-level calls: thread by thread is exact (and fast).
    emulated(cu["sddmm.cu"], f"sddmm_{suffix_of(case.dtype)}", config,
             (kernels._grid(nnz, None), (THREADS_PER_BLOCK,)), sddmm_argtypes(case.dtype),
             [a["indptr"], a["indices"], a["dy"], a["x"], out, case.n_rows, nnz, case.batch],
             reverse, warps=False)
    expected, bound = sddmm_twin(a)
    assert_close(out[:nnz], expected, bound, case.dtype)
    assert_guard(out, nnz)


@settings(max_examples=15, **PROPERTY)
@given(case=csr(max_side=12, max_batch=40), group=st.sampled_from((1, 2, 4, 8, 16, 32)),
       blocks=st.integers(1, 2), warps_per_block=st.integers(1, 2), reverse=REVERSE)
def test_emulated_sddmm_warp_equals_twins(cu, case, group, blocks, warps_per_block, reverse):
    """Blocks of whole warps (the kernel's requirement); each shuffle is a meeting of 32 OS
    threads here, so the cases are small and few."""
    a = case.arrays()
    nnz = len(a["indices"])
    out = guarded_empty(nnz, case.dtype)
    launch(cu["sddmm.cu"], f"sddmm_warp_{suffix_of(case.dtype)}", (blocks,),
           (32 * warps_per_block,), sddmm_warp_argtypes(case.dtype),
           [a["indptr"], a["indices"], a["dy"], a["x"], out, case.n_rows, nnz, case.batch,
            group], reverse=reverse)
    expected, bound = sddmm_twin(a)
    assert_close(out[:nnz], expected, bound, case.dtype)
    # The twin that sums in the kernel's order (lanes, then the butterfly) too.
    assert_close(out[:nnz], twins.sddmm_warp(a["indptr"], a["indices"], a["dy"], a["x"], group),
                 bound, case.dtype)
    assert_guard(out, nnz)


@settings(max_examples=12, **PROPERTY)
@given(case=csr(max_side=12, max_batch=40), group=st.sampled_from((1, 2, 4, 8, 16, 32)),
       blocks=st.integers(1, 2), warps_per_block=st.integers(1, 2),
       chunk_groups=st.integers(1, 3), reverse=REVERSE)
def test_emulated_sddmm_tiled_equals_its_twin(cu, case, group, blocks, warps_per_block,
                                              chunk_groups, reverse):
    """sddmm_tiled (issue 20), block by block with its barriers: blocks striding over the
    rows, chunks of 1-3 groups' width (most batches span several, the last partial): the
    twin's bits, the warp kernel's order, and nothing written past nnz."""
    a = case.arrays()
    nnz = len(a["indices"])
    out = guarded_empty(nnz, case.dtype)
    launch(cu["sddmm.cu"], f"sddmm_tiled_{suffix_of(case.dtype)}", (blocks,),
           (32 * warps_per_block,), sddmm_tiled_argtypes(case.dtype),
           [a["indptr"], a["indices"], a["dy"], a["x"], out, case.n_rows, case.batch, group,
            group * chunk_groups], reverse=reverse, blocks=True)
    assert_same_bits(out[:nnz], twins.sddmm_tiled(a["indptr"], a["indices"], a["dy"], a["x"],
                                                  group))
    expected, bound = sddmm_twin(a)
    assert_close(out[:nnz], expected, bound, case.dtype)
    assert_guard(out, nnz)


# ---------------------------------------------------------------- SpMM and SpMM^T
def spmm_twin(a: dict, bias: bool, relu: bool) -> tuple[numpy.ndarray, numpy.ndarray]:
    expected = twins.spmm(a["indptr"], a["indices"], a["data"], a["x"],
                          a["bias"] if bias else None, relu)
    bound = twins.spmm(a["indptr"], a["indices"], numpy.abs(a["data"]), numpy.abs(a["x"]),
                       numpy.abs(a["bias"]) if bias else None)
    return expected.astype(a["x"].dtype), bound


EPILOGUE = st.sampled_from(((False, False), (True, False), (True, True)))  # (bias, relu)


@backends
@settings(max_examples=60, **PROPERTY)
@given(case=csr(), epilogue=EPILOGUE, method=st.sampled_from(kernels.SPMM_METHODS))
def test_spmm_equals_twin(backend, case, epilogue, method):
    """(``method``: the GPU's spmm.cu or cuSPARSE; the CPU has one kernel.)"""
    bias, relu = epilogue
    a = case.arrays()
    indptr, indices, data, x, b = on(backend, a["indptr"], a["indices"], a["data"], a["x"],
                                     a["bias"])
    got = kernels.spmm(indptr, indices, data, x, bias=b if bias else None, relu=relu,
                       method=method)
    expected, bound = spmm_twin(a, bias, relu)
    assert_close(to_numpy(got), expected, bound, case.dtype)
    if relu:
        assert (to_numpy(got) >= 0).all()


@settings(max_examples=40, **PROPERTY)
@given(case=csr(), epilogue=EPILOGUE, config=LAUNCH, reverse=REVERSE)
def test_emulated_spmm_equals_twin(cu, case, epilogue, config, reverse):
    bias, relu = epilogue
    a = case.arrays()
    size = case.n_rows * case.batch
    out = guarded_empty(size, case.dtype)
    real = pointer(case.dtype)
    emulated(cu["spmm.cu"], f"spmm_{suffix_of(case.dtype)}", config,
             kernels._spmm_launch(case.n_rows, case.batch, None),
             [pointer(numpy.int32)] * 2 + [real] * 4 + [ctypes.c_int] * 4,
             [a["indptr"], a["indices"], a["data"], a["x"], a["bias"] if bias else a["data"],
              out, case.n_rows, case.batch, int(bias), int(relu)], reverse)
    expected, bound = spmm_twin(a, bias, relu)
    assert_close(out[:size].reshape(case.n_rows, case.batch), expected, bound, case.dtype)
    assert_guard(out, size)


def spmm_t_twin(a: dict, n_cols: int) -> tuple[numpy.ndarray, numpy.ndarray]:
    expected = twins.spmm_t(a["indptr"], a["indices"], a["data"], a["dy"], n_cols)
    bound = twins.spmm_t(a["indptr"], a["indices"], numpy.abs(a["data"]), numpy.abs(a["dy"]),
                         n_cols)
    return expected.astype(a["dy"].dtype), bound


# How spmm_t is called: checked (canonical, so the CPU's bands), unchecked but vouched
# sorted (how layers call it), unchecked (finds out), and unchecked with each row's
# entries shuffled (the CPU's batch-slice kernel; not canonical, so never with check).
SPMM_T_CALLS = ("check", "sorted_rows", "find_out", "shuffled")


@backends
@settings(max_examples=60, **PROPERTY)
@given(case=csr(), call=st.sampled_from(SPMM_T_CALLS), transpose=st.booleans(),
       method=st.sampled_from(kernels.SPMM_METHODS))
def test_spmm_t_equals_twin(backend, case, call, transpose, method):
    a = case.arrays()
    if call == "shuffled":
        rng = numpy.random.default_rng(case.seed)
        order = numpy.lexsort((rng.random(len(a["rows"])), a["rows"]))  # rows kept, cols mixed
        a["indices"], a["data"] = a["indices"][order], a["data"][order]
    indptr, indices, data, dy = on(backend, a["indptr"], a["indices"], a["data"], a["dy"])
    options = {"check": call == "check", "sorted_rows": call == "sorted_rows", "method": method}
    if transpose:  # the transposed pattern a layer keeps (the GPU's kernel reads it)
        options["transpose"] = kernels.transpose_pattern(indptr, indices, case.n_cols)
    got = kernels.spmm_t(indptr, indices, data, dy, case.n_cols, **options)
    expected, bound = spmm_t_twin(a, case.n_cols)
    assert_close(to_numpy(got), expected, bound, case.dtype)


@settings(max_examples=40, **PROPERTY)
@given(case=csr(), config=LAUNCH, reverse=REVERSE)
def test_emulated_spmm_t_equals_twin(cu, case, config, reverse):
    a = case.arrays()
    size = case.n_cols * case.batch
    out = guarded_empty(size, case.dtype)
    real = pointer(case.dtype)
    emulated(cu["spmm.cu"], f"spmm_t_{suffix_of(case.dtype)}", config,
             kernels._spmm_launch(case.n_cols, case.batch, None),
             [pointer(numpy.int32)] * 3 + [real] * 3 + [ctypes.c_int] * 2,
             [*kernels.transpose_pattern(a["indptr"], a["indices"], case.n_cols), a["data"],
              a["dy"], out, case.n_cols, case.batch], reverse)
    expected, bound = spmm_t_twin(a, case.n_cols)
    assert_close(out[:size].reshape(case.n_cols, case.batch), expected, bound, case.dtype)
    assert_guard(out, size)


# spmm.cu's tiled kernels (issue 20): the dispatcher's launch (None) or any batch tile,
# rows per block and grid; the dispatcher's chunk (None) or chunks of 1-9 entries.
TILED_LAUNCH = st.one_of(st.none(), st.tuples(st.integers(1, 33), st.integers(1, 9),
                                              st.integers(1, 3)))
TILED_CHUNK = st.one_of(st.none(), st.integers(1, 9))


def tiled_launch(config, n_out: int, batch: int, chunk) -> tuple:
    """(grid, block, tile_cols, chunk) of a drawn tiled launch."""
    from cupynn.kernels.spmm import SPMM_TILE_SHARED, _spmm_tiles_launch

    if config is None:
        grid, block, tile, default = _spmm_tiles_launch(n_out, batch, None)
    else:
        tile, rows, blocks = config
        grid, block, default = (blocks,), (tile * rows,), SPMM_TILE_SHARED // rows
    return grid, block, tile, default if chunk is None else chunk


@settings(max_examples=25, **PROPERTY)
@given(case=csr(max_batch=40), epilogue=EPILOGUE, config=TILED_LAUNCH, chunk=TILED_CHUNK,
       reverse=REVERSE)
def test_emulated_spmm_tiled_equals_twins(cu, case, epilogue, config, chunk, reverse):
    """spmm_tiled, block by block with its barriers, under any tiles and chunks: the bits
    of its twin and of spmm's (one summation order), nothing written past the output."""
    bias, relu = epilogue
    a = case.arrays()
    size = case.n_rows * case.batch
    out = guarded_empty(size, case.dtype)
    real = pointer(case.dtype)
    grid, block, tile, chunk = tiled_launch(config, case.n_rows, case.batch, chunk)
    launch(cu["spmm.cu"], f"spmm_tiled_{suffix_of(case.dtype)}", grid, block,
           [pointer(numpy.int32)] * 2 + [real] * 4 + [ctypes.c_int] * 6,
           [a["indptr"], a["indices"], a["data"], a["x"], a["bias"] if bias else a["data"],
            out, case.n_rows, case.batch, int(bias), int(relu), tile, chunk], reverse=reverse)
    got = out[:size].reshape(case.n_rows, case.batch)
    b = a["bias"] if bias else None
    assert_same_bits(got, twins.spmm_tiled(a["indptr"], a["indices"], a["data"], a["x"], b,
                                           relu).astype(case.dtype))
    assert_same_bits(got, twins.spmm(a["indptr"], a["indices"], a["data"], a["x"], b,
                                     relu).astype(case.dtype))
    assert_guard(out, size)


@settings(max_examples=25, **PROPERTY)
@given(case=csr(max_batch=40), config=TILED_LAUNCH, chunk=TILED_CHUNK, reverse=REVERSE)
def test_emulated_spmm_t_tiled_equals_twins(cu, case, config, chunk, reverse):
    """spmm_t_tiled through the transposed pattern, under any tiles and chunks: the bits of
    its twin and of spmm_t's."""
    a = case.arrays()
    size = case.n_cols * case.batch
    out = guarded_empty(size, case.dtype)
    real = pointer(case.dtype)
    grid, block, tile, chunk = tiled_launch(config, case.n_cols, case.batch, chunk)
    launch(cu["spmm.cu"], f"spmm_t_tiled_{suffix_of(case.dtype)}", grid, block,
           [pointer(numpy.int32)] * 3 + [real] * 3 + [ctypes.c_int] * 4,
           [*kernels.transpose_pattern(a["indptr"], a["indices"], case.n_cols), a["data"],
            a["dy"], out, case.n_cols, case.batch, tile, chunk], reverse=reverse)
    got = out[:size].reshape(case.n_cols, case.batch)
    assert_same_bits(got, twins.spmm_t_tiled(a["indptr"], a["indices"], a["data"], a["dy"],
                                             case.n_cols).astype(case.dtype))
    assert_same_bits(got, twins.spmm_t(a["indptr"], a["indices"], a["data"], a["dy"],
                                       case.n_cols).astype(case.dtype))
    assert_guard(out, size)


# spmm.cu's vectorised kernels (issue 20): the dispatcher's launch (None) or any batch tile
# of 1-8 vectors, rows per block and grid; V the dtype's (4 float32, 2 float64) where the
# batch allows and `vectorised`, else 1; any chunk; the rows in row_swizzle's order or in
# any drawn permutation.
VEC_LAUNCH = st.one_of(st.none(), st.tuples(st.integers(1, 8), st.integers(1, 9),
                                            st.integers(1, 3), st.booleans()))
VEC_WIDTH = {numpy.float32: 4, numpy.float64: 2}


def vec_launch(config, n_out: int, batch: int, dtype, chunk, aligned: tuple) -> tuple:
    """(grid, block, tile_cols, chunk, vec) of a drawn vectorised launch."""
    from cupynn.kernels.spmm import SPMM_TILE_SHARED, _spmm_vec_launch

    if config is None:
        vec = kernels.vector_width(dtype, batch, *aligned)
        grid, block, tile, default = _spmm_vec_launch(n_out, batch, None,
                                                      numpy.dtype(dtype).itemsize, vec)
    else:
        vectors, rows, blocks, vectorised = config
        vec = VEC_WIDTH[dtype] if vectorised and batch % VEC_WIDTH[dtype] == 0 else 1
        tile = vectors * vec
        grid, block, default = (blocks,), (rows * vectors,), SPMM_TILE_SHARED // rows
    return grid, block, tile, default if chunk is None else chunk, vec


def drawn_order(indptr: numpy.ndarray, shuffle: int | None) -> numpy.ndarray:
    """row_swizzle's order, or (shuffle: a seed) a random permutation of the rows."""
    if shuffle is None:
        return kernels.row_swizzle(indptr)
    n = len(indptr) - 1
    return numpy.random.default_rng(shuffle).permutation(n).astype(numpy.int32)


SHUFFLE = st.one_of(st.none(), st.integers(0, 2**16))


@settings(max_examples=25, **PROPERTY)
@given(case=csr(max_batch=40), epilogue=EPILOGUE, config=VEC_LAUNCH, chunk=TILED_CHUNK,
       shuffle=SHUFFLE, reverse=REVERSE)
def test_emulated_spmm_vec_equals_twins(cu, case, epilogue, config, chunk, shuffle, reverse):
    """spmm_vec, block by block with its barriers, under any tiles, vector width, chunks and
    row order: the bits of spmm's twin (one summation order), nothing written past the
    output."""
    bias, relu = epilogue
    a = case.arrays()
    size = case.n_rows * case.batch
    out = guarded_empty(size, case.dtype)
    real = pointer(case.dtype)
    grid, block, tile, chunk, vec = vec_launch(config, case.n_rows, case.batch, case.dtype,
                                               chunk, (a["x"], out))
    launch(cu["spmm.cu"], f"spmm_vec_{suffix_of(case.dtype)}", grid, block,
           [pointer(numpy.int32)] * 2 + [real] * 4 + [pointer(numpy.int32)] + [ctypes.c_int] * 7,
           [a["indptr"], a["indices"], a["data"], a["x"], a["bias"] if bias else a["data"],
            out, drawn_order(a["indptr"], shuffle), case.n_rows, case.batch, int(bias),
            int(relu), tile, chunk, vec], reverse=reverse)
    got = out[:size].reshape(case.n_rows, case.batch)
    b = a["bias"] if bias else None
    assert_same_bits(got, twins.spmm(a["indptr"], a["indices"], a["data"], a["x"], b,
                                     relu).astype(case.dtype))
    assert_guard(out, size)


@settings(max_examples=25, **PROPERTY)
@given(case=csr(max_batch=40), config=VEC_LAUNCH, chunk=TILED_CHUNK, shuffle=SHUFFLE,
       reverse=REVERSE)
def test_emulated_spmm_t_vec_equals_twins(cu, case, config, chunk, shuffle, reverse):
    """spmm_t_vec through the transposed pattern, under any tiles, vector width, chunks and
    column order: the bits of spmm_t's twin."""
    a = case.arrays()
    size = case.n_cols * case.batch
    out = guarded_empty(size, case.dtype)
    real = pointer(case.dtype)
    grid, block, tile, chunk, vec = vec_launch(config, case.n_cols, case.batch, case.dtype,
                                               chunk, (a["dy"], out))
    t = kernels.transpose_pattern(a["indptr"], a["indices"], case.n_cols)
    launch(cu["spmm.cu"], f"spmm_t_vec_{suffix_of(case.dtype)}", grid, block,
           [pointer(numpy.int32)] * 3 + [real] * 3 + [pointer(numpy.int32)] + [ctypes.c_int] * 5,
           [*t, a["data"], a["dy"], out, drawn_order(t[0], shuffle), case.n_cols, case.batch,
            tile, chunk, vec], reverse=reverse)
    got = out[:size].reshape(case.n_cols, case.batch)
    assert_same_bits(got, twins.spmm_t(a["indptr"], a["indices"], a["data"], a["dy"],
                                       case.n_cols).astype(case.dtype))
    assert_guard(out, size)


@settings(max_examples=60, **PROPERTY)
@given(case=csr())
def test_row_swizzle_is_the_stable_order_by_decreasing_length(case):
    a = case.arrays()
    order = kernels.row_swizzle(a["indptr"])
    lengths = numpy.diff(a["indptr"].astype(numpy.int64))
    assert order.dtype == numpy.int32
    numpy.testing.assert_array_equal(order, numpy.argsort(-lengths, kind="stable"))


@settings(max_examples=12, **PROPERTY)
@given(case=csr(max_side=12, max_batch=40), group=st.sampled_from((1, 2, 4, 8, 16, 32)),
       blocks=st.integers(1, 2), warps_per_block=st.integers(1, 2),
       chunk_steps=st.integers(1, 3), vectorised=st.booleans(), reverse=REVERSE)
def test_emulated_sddmm_vec_equals_its_twin(cu, case, group, blocks, warps_per_block,
                                            chunk_steps, vectorised, reverse):
    """sddmm_vec (issue 20), block by block with its barriers, V the dtype's where the batch
    allows (else 1), chunks of 1-3 steps of V * group: the twin's bits, the twin of the
    plain SDDMM within rounding, and nothing written past nnz."""
    a = case.arrays()
    nnz = len(a["indices"])
    vec = VEC_WIDTH[case.dtype] if vectorised and case.batch % VEC_WIDTH[case.dtype] == 0 else 1
    out = guarded_empty(nnz, case.dtype)
    launch(cu["sddmm.cu"], f"sddmm_vec_{suffix_of(case.dtype)}", (blocks,),
           (32 * warps_per_block,), sddmm_tiled_argtypes(case.dtype) + [ctypes.c_int],
           [a["indptr"], a["indices"], a["dy"], a["x"], out, case.n_rows, case.batch, group,
            vec * group * chunk_steps, vec], reverse=reverse, blocks=True)
    assert_same_bits(out[:nnz], twins.sddmm_vec(a["indptr"], a["indices"], a["dy"], a["x"],
                                                group, vec))
    expected, bound = sddmm_twin(a)
    assert_close(out[:nnz], expected, bound, case.dtype)
    assert_guard(out, nnz)


@settings(max_examples=60, **PROPERTY)
@given(case=csr())
def test_transpose_pattern_is_the_csc_of_the_pattern(case):
    """What spmm.cu's spmm_t reads: each column's entries in ascending row order."""
    import scipy.sparse

    a = case.arrays()
    t_indptr, t_rows, t_perm = kernels.transpose_pattern(a["indptr"], a["indices"], case.n_cols)
    assert t_indptr.dtype == t_rows.dtype == t_perm.dtype == numpy.int32
    csc = scipy.sparse.csr_matrix((a["data"], a["indices"], a["indptr"]),
                                  shape=(case.n_rows, case.n_cols)).tocsc()
    csc.sort_indices()
    numpy.testing.assert_array_equal(t_indptr, csc.indptr)
    numpy.testing.assert_array_equal(t_rows, csc.indices)
    numpy.testing.assert_array_equal(numpy.sort(t_perm), numpy.arange(len(a["indices"])))
    numpy.testing.assert_array_equal(a["data"][t_perm], csc.data)


@backends
@settings(max_examples=40, **PROPERTY)
@given(case=csr(), with_y=st.booleans(), in_place=st.booleans())
def test_relu_grad_rowsum_equals_numpy(backend, case, with_y, in_place):
    """No CUDA kernel of its own (element-wise operations on the GPU): against NumPy."""
    a = case.arrays()
    y = numpy.maximum(a["dy"][::-1].copy(), 0) if with_y else None  # a ReLU output, zeros in it
    dy_in = on(backend, a["dy"])[0]
    got, sums = kernels.relu_grad_rowsum(dy_in, None if y is None else on(backend, y)[0],
                                         in_place=in_place)
    expected = a["dy"] * (y > 0) if with_y else a["dy"]
    numpy.testing.assert_array_equal(to_numpy(got), expected)  # a product by 0 or 1 is exact
    if not in_place:
        numpy.testing.assert_array_equal(to_numpy(dy_in), a["dy"])
    assert_close(to_numpy(sums), expected.sum(axis=1, dtype=numpy.float64).astype(case.dtype),
                 numpy.abs(expected).sum(axis=1, dtype=numpy.float64), case.dtype)


@settings(max_examples=15, **PROPERTY)
@given(case=csr(max_side=12, max_batch=70), relu=st.booleans(), in_place=st.booleans(),
       blocks=st.integers(1, 2), warps_per_block=st.integers(1, 2), reverse=REVERSE)
def test_emulated_relu_grad_rowsum_equals_twin(case, relu, in_place, blocks, warps_per_block,
                                               reverse):
    """sddmm.cu's relu_grad_rowsum (one warp a row, blocks of whole warps): the twin's bits,
    sums in its fixed order, and out = dy * (y > 0), the sign of every zero included."""
    a = case.arrays()
    y = a["dy"][::-1].copy() if relu else None  # negatives and exact zeros: dead units
    out, sums = emulated_relu_grad_rowsum(a["dy"], y, (blocks,), (32 * warps_per_block,),
                                          in_place=in_place, reverse=reverse)
    expected, expected_sums = twins.relu_grad_rowsum(a["dy"], y)
    assert_same_bits(out, expected)
    assert_same_bits(sums, expected_sums)
    assert_same_bits(out, a["dy"] * (y > 0) if relu else a["dy"])


# --------------------------------------------------------------------------- Adam
@dataclass(frozen=True)
class AdamCase:
    """Flat p, g, m, v of ``n`` values (g with exact zeros, v >= 0) and one step's scalars."""

    n: int
    dtype: type
    seed: int
    step: int
    lr: float
    b1: float
    b2: float
    eps: float

    def state(self) -> dict[str, numpy.ndarray]:
        rng = numpy.random.default_rng(self.seed)
        g = rng.standard_normal(self.n)
        g[rng.random(self.n) < 0.2] = 0
        return {k: v.astype(self.dtype) for k, v in (
            ("p", rng.standard_normal(self.n)), ("g", g),
            ("m", 0.1 * rng.standard_normal(self.n)), ("v", 0.01 * rng.random(self.n) ** 2))}

    def scalars(self) -> dict[str, float]:
        return dict(lr=self.lr, b1=self.b1, b2=self.b2, eps=self.eps,
                    bc1=1 - self.b1 ** self.step, bc2=1 - self.b2 ** self.step)


ADAM_CASES = st.builds(AdamCase, n=st.integers(0, 300), dtype=DTYPE, seed=SEED,
                       step=st.integers(1, 10_000), lr=st.floats(1e-5, 0.1),
                       b1=st.floats(0.0, 0.99), b2=st.floats(0.9, 0.9999),
                       eps=st.sampled_from((1e-8, 1e-6, 1e-3)))


def adam_twin(case: AdamCase) -> tuple[dict, dict]:
    """The state after one twin step, and each array's error scale."""
    s = case.state()
    after = {k: s[k].copy() for k in "pgmv"}
    twins.adam(after["p"], after["g"], after["m"], after["v"], **case.scalars())
    bounds = {"p": numpy.abs(s["p"]) + numpy.abs(s["p"] - after["p"]),
              "m": case.b1 * numpy.abs(s["m"]) + (1 - case.b1) * numpy.abs(s["g"]),
              "v": numpy.abs(after["v"])}
    return after, bounds


def assert_adam(p, m, v, case: AdamCase) -> None:
    after, bounds = adam_twin(case)
    for name, got in (("m", m), ("v", v), ("p", p)):
        assert_close(to_numpy(got), after[name], bounds[name], case.dtype)


@backends
@settings(max_examples=60, **PROPERTY)
@given(case=ADAM_CASES)
def test_adam_equals_twin(backend, case):
    s = case.state()
    p, g, m, v = on(backend, s["p"], s["g"], s["m"], s["v"])
    kernels.adam(p, g, m, v, **case.scalars())
    assert_adam(p, m, v, case)
    numpy.testing.assert_array_equal(to_numpy(g), s["g"])


@settings(max_examples=30, **PROPERTY)
@given(case=ADAM_CASES, config=LAUNCH, reverse=REVERSE)
def test_emulated_adam_equals_twin(cu, case, config, reverse):
    s = case.state()
    p, g, m, v = (numpy.concatenate([s[k], numpy.full(GUARD, numpy.nan, case.dtype)])
                  for k in "pgmv")
    h = case.scalars()
    emulated(cu["adam.cu"], f"adam_{suffix_of(case.dtype)}", config,
             (kernels._grid(case.n, None), (THREADS_PER_BLOCK,)), adam_argtypes(case.dtype),
             [p, g, m, v, *map(float, kernels.adam_scalars(case.dtype, **h)), case.n], reverse)
    # (adam_scalars: the order of adam.cu -- lr, b1, b2, 1 - b1, 1 - b2, eps, bc1, bc2)
    assert_adam(p[:case.n], m[:case.n], v[:case.n], case)
    for buffer in (p, m, v):
        assert_guard(buffer, case.n)


@settings(max_examples=20, **PROPERTY)
@given(case=ADAM_CASES, sizes=st.lists(st.integers(0, 80), max_size=5),
       steps=st.lists(st.integers(1, 10_000), min_size=1, max_size=4), pick=st.integers(0, 3),
       config=LAUNCH, reverse=REVERSE)
def test_emulated_adam_multi_equals_per_array_twin(cu, case, sizes, steps, pick, config,
                                                   reverse):
    """One launch over any list of arrays (empty ones, an empty list), with the scalars of
    any row of a table of steps (adam_scalars' rows): array by array, the per-array
    twin's step with that row's hyper-parameters, bit for bit; g and the guards kept."""
    row = pick % len(steps)
    cases = [replace(case, n=n, seed=(case.seed + i) % 2**32, step=steps[row])
             for i, n in enumerate(sizes)]
    states = [c.state() for c in cases]
    arrays = [{k: guarded(s[k]) for k in "pgmv"} for s in states]
    table = numpy.array([kernels.adam_scalars(case.dtype, **replace(case, step=t).scalars())
                         for t in steps], dtype=case.dtype)
    pointers = AdamPointers()
    pointers.update(*([a[k][:n] for a, n in zip(arrays, sizes)] for k in "pgmv"), numpy)
    emulated(cu["adam.cu"], f"adam_multi_{suffix_of(case.dtype)}", config,
             (kernels._grid(max(pointers.total, 1), None), (THREADS_PER_BLOCK,)),
             adam_multi_argtypes(case.dtype),
             [pointers.p_ptrs, pointers.g_ptrs, pointers.m_ptrs, pointers.v_ptrs,
              pointers.offsets, pointers.n_arrays, table, numpy.array([row], numpy.int64)],
             reverse)
    for c, s, a in zip(cases, states, arrays):
        twins.adam(s["p"], s["g"], s["m"], s["v"], **c.scalars())
        for k in "pgmv":
            assert_same_bits(a[k][:c.n], s[k])
            assert_guard(a[k], c.n)


# ------------------------------------------------------------ the inverse Fisher
@dataclass(frozen=True)
class FisherCase:
    """Packed, tiled inverses of ``n_blocks`` SPD B x B blocks (0.5 I + Q Q^T / B, so the
    updates are well conditioned), 7.0 in the padding lanes, and a gradient and a vector
    with about a quarter of the blocks all zero (dead)."""

    n_blocks: int
    block_size: int
    dtype: type
    seed: int
    m: float

    def state(self) -> dict[str, numpy.ndarray]:
        rng = numpy.random.default_rng(self.seed)
        b = self.block_size
        q = rng.standard_normal((self.n_blocks, b, b))
        blocks = 0.5 * numpy.eye(b) + q @ q.transpose(0, 2, 1) / b
        finv = twins.pack(numpy.linalg.inv(blocks), FISHER_TILE).astype(self.dtype)
        t, lane = twins.lanes(finv.shape[0] * FISHER_TILE, FISHER_TILE)
        finv[t[self.n_blocks:], :, lane[self.n_blocks:]] = 7.0
        g, v = (rng.standard_normal((self.n_blocks, b)) for _ in range(2))
        dead = rng.random(self.n_blocks) < 0.25
        g[dead] = 0
        return {"finv": finv, "g": g.reshape(-1).astype(self.dtype),
                "v": v.reshape(-1).astype(self.dtype), "dead": dead}


FISHER_CASES = st.builds(FisherCase, n_blocks=st.integers(0, 2 * FISHER_TILE + 3),
                         block_size=st.sampled_from((1, 2, 3, 5, 8)), dtype=DTYPE, seed=SEED,
                         m=st.floats(0.5, 100.0))
# The update divides by m + g.u and forms u u^T: a few B ulps of the blocks' scale. The
# bound below (|F| + |F||g| (|F||g|)^T / den) takes |F||g| for |u|, which can exceed |u|
# by the blocks' condition number (< 10 here) times B; float32 needs that much room.
FISHER_RTOL = {numpy.float32: 1e-4, numpy.float64: 1e-12}


def fisher_twin(case: FisherCase, s: dict) -> tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]:
    """The twin's finv and u after one update, and the error scale of finv."""
    expected = s["finv"].copy()
    u = twins.fisher_update(expected, s["g"], case.m, case.block_size)
    f64 = numpy.abs(s["finv"].astype(numpy.float64))
    scale = twins.packed_matvec(f64, numpy.abs(s["g"].astype(numpy.float64)),
                                case.block_size).reshape(case.n_blocks, case.block_size)
    den = case.m + numpy.einsum("bi,bi->b", s["g"].astype(numpy.float64).reshape(scale.shape),
                                u.astype(numpy.float64).reshape(scale.shape))
    outer = scale[:, :, None] * scale[:, None, :] / den[:, None, None]
    bound = f64 + twins.pack(outer, FISHER_TILE) if case.n_blocks else f64
    return expected, u, bound


def assert_fisher(finv, case: FisherCase, s: dict) -> None:
    """finv after one update equals the twin's; dead blocks and padding lanes to the bit."""
    finv = to_numpy(finv)
    expected, _, bound = fisher_twin(case, s)
    assert finv.dtype == numpy.dtype(case.dtype) and finv.shape == expected.shape
    err = numpy.abs(finv.astype(numpy.float64) - expected)
    tol = FISHER_RTOL[case.dtype] * bound + numpy.finfo(case.dtype).tiny
    bad = ~(err <= tol)  # NaN (a value never written) counts as a difference
    assert not bad.any(), (f"{int(bad.sum())} of {bad.size} packed values differ; worst "
                           f"excess {float(numpy.nanmax(err - tol)):.3g}")
    b = case.block_size
    before, after = twins.unpack(s["finv"], b), twins.unpack(finv, b)
    numpy.testing.assert_array_equal(after[:case.n_blocks][s["dead"]],
                                     before[:case.n_blocks][s["dead"]], "a dead block changed")
    t, lane = twins.lanes(finv.shape[0] * FISHER_TILE, FISHER_TILE)
    assert (finv[t[case.n_blocks:], :, lane[case.n_blocks:]] == 7.0).all(), "padding changed"


def matvec_bound(case: FisherCase, s: dict) -> numpy.ndarray:
    return twins.packed_matvec(numpy.abs(s["finv"].astype(numpy.float64)),
                               numpy.abs(s["v"].astype(numpy.float64)), case.block_size)


@backends
@settings(max_examples=50, **PROPERTY)
@given(case=FISHER_CASES, with_work=st.booleans())
def test_fisher_update_equals_twin(backend, case, with_work):
    s = case.state()
    finv, g = on(backend, s["finv"], s["g"])
    work = on(backend, numpy.full(len(s["g"]), numpy.nan, case.dtype))[0] if with_work else None
    kernels.fisher_update(finv, g, case.m, block_size=case.block_size, work=work)
    assert_fisher(finv, case, s)
    if work is not None:  # u = F^{-1} g of the blocks before the step
        _, u, _ = fisher_twin(case, s)
        assert_close(to_numpy(work), u, matvec_bound(
            case, {"finv": s["finv"], "v": s["g"]}), case.dtype)


@backends
@settings(max_examples=50, **PROPERTY)
@given(case=FISHER_CASES)
def test_packed_matvec_equals_twin(backend, case):
    s = case.state()
    finv, v = on(backend, s["finv"], s["v"])
    got = kernels.packed_matvec(finv, v, block_size=case.block_size)
    assert_close(to_numpy(got), twins.packed_matvec(s["finv"], s["v"], case.block_size),
                 matvec_bound(case, s), case.dtype)


@settings(max_examples=30, **PROPERTY)
@given(case=FISHER_CASES, config=LAUNCH, reverse=REVERSE)
def test_emulated_fisher_kernels_equal_twins(cu, case, config, reverse):
    """The dispatcher's two launches: packed_matvec (into work), fisher_rank1_update."""
    s = case.state()
    lib, suffix, b = cu["fisher.cu"], suffix_of(case.dtype), case.block_size
    n = case.n_blocks * b
    default = (kernels._grid(s["finv"].shape[0] * b * FISHER_TILE, None), (THREADS_PER_BLOCK,))
    sizes = [case.n_blocks, b, FISHER_TILE]
    out = guarded_empty(n, case.dtype)
    emulated(lib, f"packed_matvec_{suffix}", config, default, matvec_argtypes(case.dtype),
             [s["finv"], s["v"], out] + sizes, reverse)
    assert_close(out[:n], twins.packed_matvec(s["finv"], s["v"], b), matvec_bound(case, s),
                 case.dtype)
    assert_guard(out, n)
    finv = numpy.concatenate([s["finv"].reshape(-1),
                              numpy.full(GUARD, numpy.nan, case.dtype)])
    work = guarded_empty(n, case.dtype)
    emulated(lib, f"packed_matvec_{suffix}", config, default, matvec_argtypes(case.dtype),
             [finv, s["g"], work] + sizes, reverse)
    emulated(lib, f"fisher_rank1_update_{suffix}", config, default, rank1_argtypes(case.dtype),
             [finv, s["g"], work, case.m] + sizes, reverse)
    assert_fisher(finv[:s["finv"].size].reshape(s["finv"].shape), case, s)
    assert_guard(finv, s["finv"].size)
    assert_guard(work, n)


# ------------------------------------------------------------------ loss.cu
# Drawn LossCases: batch 1 to more rows than grid2_block32's 64 threads, one class and
# more than a warp's lanes, logits up to +-1e4 (exp overflows without the shift by the
# row's max), den the batch or a larger global batch.
LOSS_DRAWS = st.builds(LossCase, name=st.just("drawn"), batch=st.integers(1, 70),
                       classes=st.integers(1, 40), scale=st.sampled_from((1e-3, 1.0, 3.0, 1e4)),
                       total=st.one_of(st.none(), st.integers(70, 1000)), seed=SEED)
LOSS_ROWS = ("softmax_cross_entropy_rows", "binary_cross_entropy_rows", "squared_error_rows")
# The kernels and their twins add in one order; they differ where exp, log and log1p of
# the C library and of NumPy round differently: a few units in the last place.
LOSS_ULPS = 8


def assert_ulps(got: numpy.ndarray, expected: numpy.ndarray, bound, dtype) -> None:
    """NaN where ``expected`` is NaN, elsewhere within LOSS_ULPS * eps * ``bound``."""
    assert got.dtype == expected.dtype == numpy.dtype(dtype) and got.shape == expected.shape
    nan = numpy.isnan(expected)
    numpy.testing.assert_array_equal(numpy.isnan(got), nan)
    err = numpy.abs(got.astype(numpy.float64) - expected)[~nan]
    tol = (LOSS_ULPS * numpy.finfo(dtype).eps * numpy.broadcast_to(bound, got.shape)[~nan]
           + numpy.finfo(dtype).tiny)
    assert (err <= tol).all(), f"up to {float(numpy.max(err / tol)):.3g} x {LOSS_ULPS} ulps off"


@settings(max_examples=30, **PROPERTY)
@given(case=LOSS_DRAWS, dtype=DTYPE, family=st.sampled_from(LOSS_ROWS), bad_label=st.booleans(),
       config=st.sampled_from(list(LAUNCHES)), reverse=REVERSE)
def test_emulated_loss_rows_equal_twins(case, dtype, family, bad_label, config, reverse):
    """Each per-row kernel: gradient and row losses within a few ulps of its twin (the
    squared error's gradient to the bit); softmax cross-entropy's gradient rows sum to
    0 within the rounding of the classes' sum, and a label outside [0, classes) gives
    a row of NaN."""
    a = case.arrays(dtype)
    n, den = case.batch, case.den
    z = a["logits"].astype(numpy.float64)
    if family == "softmax_cross_entropy_rows":
        if bad_label:
            a["labels"][case.seed % n] = -1 if case.seed % 2 else case.classes
        reads, sizes, scalar = [a["logits"], a["labels"]], [n, case.classes], den
        valid = (a["labels"] >= 0) & (a["labels"] < case.classes)
        label = numpy.where(valid, a["labels"], 0)
        top = z.max(axis=1)
        e = numpy.exp(z - top[:, None])
        onehot = numpy.eye(case.classes)[label]
        grad_bound = (e / e.sum(axis=1, keepdims=True) + onehot) / den
        row_bound = (numpy.abs(numpy.log(e.sum(axis=1))) + numpy.abs(z[numpy.arange(n), label])
                     + numpy.abs(top) + 1)
    elif family == "binary_cross_entropy_rows":
        reads, sizes, scalar = [a["z"], a["y"]], [n], den
        z, y = z[:, 0], a["y"].astype(numpy.float64)
        grad_bound = (numpy.exp(-numpy.logaddexp(0, -z)) + y) / den  # sigmoid(z) + y
        row_bound = numpy.abs(z) * (1 + y) + numpy.log1p(numpy.exp(-numpy.abs(z)))
    else:
        scalar = 2.0 / (den * case.classes)
        reads, sizes = [a["logits"], a["target"]], [n, case.classes]
        grad_bound = None
        row_bound = ((z - a["target"]) ** 2).sum(axis=1)
    grad, per_row = emulated_loss_rows(family, reads, sizes, scalar, reads[0].shape, dtype,
                                       config, reverse)
    expected_grad, expected_rows = getattr(twins, family)(*reads, scalar)
    assert_ulps(per_row, expected_rows, row_bound, dtype)
    if grad_bound is None:  # a subtraction and a product: the same bits
        assert_same_bits(grad, expected_grad)
    else:
        assert_ulps(grad, expected_grad, grad_bound, dtype)
    if family == "softmax_cross_entropy_rows":
        assert numpy.isnan(grad[~valid]).all() and numpy.isnan(per_row[~valid]).all()
        sums = grad[valid].astype(numpy.float64).sum(axis=1)
        assert (numpy.abs(sums) <= 2 * (case.classes + 4) * numpy.finfo(dtype).eps / den).all()


@settings(max_examples=20, **PROPERTY)
@given(n=st.integers(0, 100), dtype=DTYPE, scale=SCALE, seed=SEED, den=st.integers(1, 1000),
       grid=st.integers(1, 3), warps_per_block=st.integers(1, 3), reverse=REVERSE)
def test_emulated_mean_of_rows_equals_twin(n, dtype, scale, seed, den, grid, warps_per_block,
                                           reverse):
    """Additions in the one warp's fixed order and one division: the twin's bits under
    any launch of whole warps (threads past the first warp leave), within rounding of
    the plain mean; rows over six decades, exact zeros among them."""
    rng = numpy.random.default_rng(seed)
    per_row = (rng.standard_normal(n) * scale * 10.0 ** rng.integers(-3, 3, n)).astype(dtype)
    per_row[rng.random(n) < 0.1] = 0
    got = emulated_mean_of_rows(per_row, den, (grid,), (32 * warps_per_block,), reverse)
    assert_same_bits(got, twins.mean_of_rows(per_row, den))
    wide = per_row.astype(numpy.float64)
    assert_close(got, numpy.asarray(wide.sum() / den, dtype=dtype),
                 numpy.asarray(numpy.abs(wide).sum() / den), dtype)


# ----------------------------------------------------------------- batch.cu
@dataclass(frozen=True)
class Schedule:
    """A data set of ``n`` samples of ``features``, an epoch's order of them (a
    permutation; with ``bad``, about a fifth of its values -1 or n), and the batch of
    step ``counter`` (-1: before the order; past its end too): ``rows`` of ``stride``."""

    n: int
    features: int
    stride: int
    rows: int
    counter: int
    bad: bool
    seed: int

    def arrays(self, dtype: type) -> dict[str, numpy.ndarray]:
        rng = numpy.random.default_rng(self.seed)
        order = rng.permutation(self.n).astype(numpy.int64)
        if self.bad:
            order[rng.random(self.n) < 0.2] = rng.choice((-1, self.n))
        x = rng.standard_normal((self.n, self.features)).astype(dtype)
        x[rng.random(x.shape) < 0.1] = -0.0
        y = (rng.integers(0, 10, self.n) if dtype == numpy.int64 else rng.standard_normal(self.n))
        return {"x": x, "y": y.astype(dtype), "order": order,
                "counter": numpy.array([self.counter], dtype=numpy.int64)}

    def sources(self, order: numpy.ndarray) -> numpy.ndarray:
        """The row of batch position j: order[counter * stride + j], or -1 where that
        position is outside the order or its value outside the data set."""
        positions = self.counter * self.stride + numpy.arange(self.rows)
        inside = (positions >= 0) & (positions < len(order))
        rows = numpy.where(inside, order[numpy.where(inside, positions, 0)], -1)
        return numpy.where((rows >= 0) & (rows < self.n), rows, -1)


SCHEDULES = st.builds(Schedule, n=st.integers(1, 30), features=st.integers(1, 6),
                      stride=st.integers(1, 8), rows=st.integers(0, 8),
                      counter=st.integers(-1, 8), bad=st.booleans(), seed=SEED).filter(
                          lambda s: s.rows <= s.stride)
LABEL_DTYPE = st.sampled_from((numpy.int64, numpy.float32, numpy.float64))
SENTINEL = -7  # what a batch.cu output holds before the launch (no draw gives it)


def sentinel_buffer(size: int, dtype) -> numpy.ndarray:
    return numpy.full(size + GUARD, SENTINEL, dtype=dtype)


def batch_launch(total: int) -> tuple:
    return kernels._grid(total, None), (THREADS_PER_BLOCK,)


I64 = pointer(numpy.int64)


@settings(max_examples=25, **PROPERTY)
@given(case=SCHEDULES, dtype=DTYPE, config=LAUNCH, reverse=REVERSE)
def test_emulated_gather_batch_takes_the_rows_of_the_order(cu, case, dtype, config, reverse):
    """out[:, j] is row order[counter * stride + j] of x to the bit (NaN where out of
    bounds), as the twin; counter and order are read, never changed."""
    a = case.arrays(dtype)
    size = case.features * case.rows
    out = sentinel_buffer(size, dtype)
    real = pointer(dtype)
    emulated(cu["batch.cu"], f"gather_batch_{suffix_of(dtype)}", config, batch_launch(size),
             [real, I64, I64, ctypes.c_longlong, real, ctypes.c_longlong, ctypes.c_longlong,
              ctypes.c_int, ctypes.c_int],
             [a["x"], a["order"], a["counter"], case.stride, out, case.n, case.n,
              case.features, case.rows], reverse)
    rows = case.sources(a["order"])
    expected = numpy.where(rows >= 0, a["x"][rows].T, numpy.nan).astype(dtype)
    got = out[:size].reshape(case.features, case.rows)
    assert_same_bits(got, expected)
    assert_same_bits(got, twins.gather_batch(a["x"], a["order"], a["counter"], case.stride,
                                             case.rows))
    assert (out[size:] == SENTINEL).all(), "the kernel wrote past its output"
    assert_same_bits(a["counter"], numpy.array([case.counter]))
    assert_same_bits(a["order"], case.arrays(dtype)["order"])


@settings(max_examples=25, **PROPERTY)
@given(case=SCHEDULES, dtype=LABEL_DTYPE, config=LAUNCH, reverse=REVERSE)
def test_emulated_gather_labels_takes_the_rows_of_the_order(cu, case, dtype, config, reverse):
    """out[j] = y[order[counter * stride + j]] (int64 labels too), NaN or -1 where out
    of bounds, as the twin."""
    a = case.arrays(dtype)
    out = sentinel_buffer(case.rows, dtype)
    suffix = "i64" if dtype == numpy.int64 else suffix_of(dtype)
    emulated(cu["batch.cu"], f"gather_labels_{suffix}", config, batch_launch(case.rows),
             [pointer(dtype), I64, I64, ctypes.c_longlong, pointer(dtype), ctypes.c_longlong,
              ctypes.c_longlong, ctypes.c_int],
             [a["y"], a["order"], a["counter"], case.stride, out, case.n, case.n, case.rows],
             reverse)
    rows = case.sources(a["order"])
    missing = -1 if dtype == numpy.int64 else numpy.nan
    expected = numpy.where(rows >= 0, a["y"][rows], missing).astype(dtype)
    assert_same_bits(out[:case.rows], expected)
    assert_same_bits(out[:case.rows], twins.gather_labels(a["y"], a["order"], a["counter"],
                                                          case.stride, case.rows))
    assert (out[case.rows:] == SENTINEL).all(), "the kernel wrote past its output"


@settings(max_examples=20, **PROPERTY)
@given(shape=st.tuples(st.integers(0, 20), st.integers(0, 20)), dtype=DTYPE, seed=SEED,
       config=LAUNCH, reverse=REVERSE)
def test_emulated_transpose_is_a_transpose(cu, shape, dtype, seed, config, reverse):
    rng = numpy.random.default_rng(seed)
    src = rng.standard_normal(shape).astype(dtype)
    src[rng.random(shape) < 0.1] = -0.0
    size = src.size
    out = sentinel_buffer(size, dtype)
    emulated(cu["batch.cu"], f"transpose_{suffix_of(dtype)}", config, batch_launch(size),
             [pointer(dtype)] * 2 + [ctypes.c_int] * 2, [src, out, *shape], reverse)
    assert_same_bits(out[:size].reshape(shape[::-1]), src.T)
    assert_same_bits(out[:size].reshape(shape[::-1]), twins.transpose(src))
    assert (out[size:] == SENTINEL).all(), "the kernel wrote past its output"


@settings(max_examples=20, **PROPERTY)
@given(values=st.lists(st.floats(-1e30, 1e30), min_size=1, max_size=4), dtype=DTYPE,
       n_losses=st.integers(0, 4), start=st.integers(-2, 5), config=LAUNCH, reverse=REVERSE)
def test_emulated_end_step_records_at_the_counter_and_advances(cu, values, dtype, n_losses,
                                                               start, config, reverse):
    """Each launch, whatever its shape: losses[counter] = value (as float64) when the
    counter is within losses, nothing written otherwise, and the counter one further."""
    losses = numpy.full(n_losses + GUARD, numpy.nan)
    counter = numpy.array([start], dtype=numpy.int64)
    twin_losses, twin_counter = losses[:n_losses].copy(), counter.copy()
    for step, v in enumerate(values):
        value = numpy.array([v], dtype=dtype)
        expected = losses.copy()
        if 0 <= start + step < n_losses:
            expected[start + step] = numpy.float64(value[0])
        emulated(cu["batch.cu"], f"end_step_{suffix_of(dtype)}", config, ((1,), (1,)),
                 [pointer(dtype), pointer(numpy.float64), I64, ctypes.c_longlong],
                 [value, losses, counter, n_losses], reverse)
        twins.end_step(value, twin_losses, twin_counter)
        assert_same_bits(losses, expected)
        assert_same_bits(losses[:n_losses], twin_losses)
        assert counter[0] == twin_counter[0] == start + step + 1


# ---------------------------------------------------------------------- coverage
# The kernel families the emulated properties above launch.
EMULATED = {"sddmm", "sddmm_warp", "sddmm_tiled", "spmm", "spmm_t", "adam", "packed_matvec",
            "fisher_rank1_update",
            "spmm_tiled", "spmm_t_tiled", "spmm_vec", "spmm_t_vec", "sddmm_vec",  # issue 20
            # issue 19
            "adam_multi", "softmax_cross_entropy_rows", "binary_cross_entropy_rows",
            "squared_error_rows", "mean_of_rows", "relu_grad_rowsum", "gather_batch",
            "gather_labels", "transpose", "end_step"}


def test_every_cuda_kernel_has_a_property_here():
    """A new kernel in a .cu file needs an emulated property above (and a twin)."""
    families = {name.rsplit("_", 1)[0] for source in CUDA_SOURCES
                for name in kernel_names(source)}
    assert families == EMULATED, f"kernel families without a property here: {families - EMULATED}"

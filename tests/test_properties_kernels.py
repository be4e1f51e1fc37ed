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
- the CUDA kernels of ``sddmm.cu``, ``spmm.cu``, ``adam.cu`` and ``fisher.cu`` emulated
  on the CPU.

Each is compared with its twin in :mod:`cupynn.kernels.numpy_twins` run in the same
dtype, within ``rtol`` times the same sums taken over absolute values (the scale of
any summation order's rounding; see ``kernel_cases.assert_close``). What must hold
exactly is checked exactly: nothing is written past an output, a dead Fisher block
and the padding lanes are left as they were, the order of the threads changes no bit.

Run time: the ``max_examples`` of each property keep this file to about ten seconds on
two cores, the one-time builds of the ``.cu`` files included. CI (``CI=true``) draws the
same examples every run (Hypothesis's ``ci`` profile: derandomised, no database).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import cupynn
from conftest import BACKENDS
from cupynn import kernels
from cupynn.backend import to_numpy
from cupynn.kernels import CUDA_SOURCES, FISHER_TILE, THREADS_PER_BLOCK, numpy_twins as twins
from kernel_cases import (GUARD, adam_argtypes, assert_close, host_library, kernel_names,
                          sddmm_argtypes, sddmm_warp_argtypes, suffix_of)
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
    return {name: host_library(name) for name in ("sddmm.cu", "spmm.cu", "adam.cu", "fisher.cu")}


# -------------------------------------------------------------------------- SDDMM
def sddmm_twin(a: dict) -> tuple[numpy.ndarray, numpy.ndarray]:
    return (twins.sddmm(a["indptr"], a["indices"], a["dy"], a["x"]),
            twins.sddmm(a["indptr"], a["indices"], numpy.abs(a["dy"]), numpy.abs(a["x"])))


@backends
@settings(max_examples=60, **PROPERTY)
@given(case=csr(), method=st.sampled_from(("thread", "warp")),
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


# ---------------------------------------------------------------------- coverage
# The kernel families the emulated properties above launch.
EMULATED = {"sddmm", "sddmm_warp", "spmm", "spmm_t", "adam", "packed_matvec",
            "fisher_rank1_update"}


def test_every_cuda_kernel_has_a_property_here():
    """A new kernel in a .cu file needs an emulated property above (and a twin)."""
    families = {name.rsplit("_", 1)[0] for source in CUDA_SOURCES
                for name in kernel_names(source)}
    assert families == EMULATED, f"kernel families without a property here: {families - EMULATED}"

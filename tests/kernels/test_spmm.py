"""``kernels.spmm`` and ``kernels.spmm_t`` (``spmm.cu``, cuSPARSE, ``cpu.spmm`` /
``cpu.spmm_t``) and ``transpose_pattern``: emulated CUDA, Numba and GPU against
the twins, and the choice of GPU method.
"""

from __future__ import annotations

import importlib

import numpy
import pytest

from cupynn import kernels
from cupynn.backend import to_numpy
from cupynn.kernels import numpy_twins as twins
from kernel_cases import (CASES, Case, assert_close, assert_fused_spmm, call_fused_spmm,
                          case_params, dtype_params, emulated_spmm, emulated_spmm_t, fused_inputs,
                          gpu, launch_params, spmm_gpu_params, to_gpu)

# The module that keeps the setting (kernels.spmm is the function).
SPMM_MODULE = importlib.import_module("cupynn.kernels.spmm")


@case_params
@dtype_params
@launch_params
def test_emulated_spmm_matches_twin(case, dtype, config):
    a = fused_inputs(case, dtype)
    bound = twins.spmm(a["indptr"], a["indices"], numpy.abs(a["data"]), numpy.abs(a["x"]))
    plain = emulated_spmm(a, case, dtype, config)
    assert_close(plain, twins.spmm(a["indptr"], a["indices"], a["data"], a["x"]).astype(dtype),
                 bound, dtype)
    # The epilogue: bias then ReLU on the kernel's own sum, bit for bit as numpy does them.
    if a["x"].size:
        a["x"][0, 0] = numpy.nan  # reaches every row with column 0: NaN passes the ReLU
    plain = emulated_spmm(a, case, dtype, config)
    with_bias = emulated_spmm(a, case, dtype, config, bias=True)
    with_relu = emulated_spmm(a, case, dtype, config, bias=True, relu=True)
    numpy.testing.assert_array_equal(with_bias, plain + a["bias"][:, None])
    numpy.testing.assert_array_equal(with_relu, numpy.maximum(with_bias, 0))
    numpy.testing.assert_array_equal(numpy.signbit(with_relu),
                                     numpy.signbit(numpy.maximum(with_bias, 0)))


@case_params
@dtype_params
@launch_params
def test_emulated_spmm_t_matches_twin(case, dtype, config):
    a = case.arrays(dtype)
    got = emulated_spmm_t(a, case, dtype, config)
    expected = twins.spmm_t(a["indptr"], a["indices"], a["data"], a["dy"], case.n_cols)
    bound = twins.spmm_t(a["indptr"], a["indices"], numpy.abs(a["data"]), numpy.abs(a["dy"]),
                         case.n_cols)
    assert_close(got, expected.astype(dtype), bound, dtype)


@pytest.mark.parametrize("kernel", ["spmm", "spmm_t"])
def test_emulated_spmm_does_not_depend_on_thread_order(kernel):
    """Threads run last to first give the same bits: each output has one thread and
    one summation order (what makes a GPU run repeat exactly)."""
    case = next(c for c in CASES if c.name == "grid_stride")
    a = fused_inputs(case, numpy.float32)
    run = emulated_spmm if kernel == "spmm" else emulated_spmm_t
    forward = run(a, case, numpy.float32, "grid2_block32")
    backward = run(a, case, numpy.float32, "grid2_block32", reverse=True)
    assert numpy.array_equal(forward, backward, equal_nan=True)


@case_params
def test_transpose_pattern_is_the_csc_of_the_pattern(case):
    import scipy.sparse

    a = case.arrays(numpy.float64)
    t_indptr, t_rows, t_perm = kernels.transpose_pattern(a["indptr"], a["indices"], case.n_cols)
    assert t_indptr.dtype == t_rows.dtype == t_perm.dtype == numpy.int32
    w = scipy.sparse.csr_matrix((a["data"], a["indices"], a["indptr"]),
                                shape=(case.n_rows, case.n_cols))
    csc = w.tocsc()
    csc.sort_indices()
    numpy.testing.assert_array_equal(t_indptr, csc.indptr)
    numpy.testing.assert_array_equal(t_rows, csc.indices)
    numpy.testing.assert_array_equal(a["data"][t_perm], csc.data)
    if case.n_rows:  # every position exactly once
        numpy.testing.assert_array_equal(numpy.sort(t_perm), numpy.arange(len(a["indices"])))


def test_spmm_t_checks_the_transposed_pattern():
    a = CASES[0].arrays(numpy.float64)
    n_cols = CASES[0].n_cols
    t = kernels.transpose_pattern(a["indptr"], a["indices"], n_cols)
    with pytest.raises(TypeError, match="tuple \\(t_indptr, t_rows, t_perm\\)"):
        kernels.spmm_t(a["indptr"], a["indices"], a["data"], a["dy"], n_cols, transpose=t[:2])
    with pytest.raises(ValueError, match="t_rows must be a contiguous int32 array"):
        kernels.spmm_t(a["indptr"], a["indices"], a["data"], a["dy"], n_cols,
                       transpose=(t[0], t[1].astype(numpy.int64), t[2]))
    with pytest.raises(ValueError, match="t_indptr must be"):
        kernels.spmm_t(a["indptr"], a["indices"], a["data"], a["dy"], n_cols,
                       transpose=(t[0][:-1], t[1], t[2]))


def test_spmm_method_is_checked(monkeypatch):
    with pytest.raises(ValueError, match="must be one of \\['rows', 'cusparse'\\]"):
        kernels.set_spmm("atomics")
    monkeypatch.setattr(SPMM_MODULE, "_SPMM_DEFAULT", [])
    monkeypatch.setenv(kernels.SPMM_ENV, "dense")
    with pytest.raises(ValueError, match="\\$CUPYNN_SPMM"):
        kernels.spmm_setting()
    monkeypatch.setenv(kernels.SPMM_ENV, "cusparse")
    assert kernels.spmm_setting() == "cusparse"
    monkeypatch.setattr(SPMM_MODULE, "_SPMM_DEFAULT", [])
    monkeypatch.delenv(kernels.SPMM_ENV)
    assert kernels.spmm_setting() == "rows"


@case_params
@dtype_params
def test_cpu_spmm_matches_twin(case, dtype):
    a = case.arrays(dtype)
    result = kernels.spmm(a["indptr"], a["indices"], a["data"], a["x"])
    assert result.flags.c_contiguous
    expected = twins.spmm(a["indptr"], a["indices"], a["data"], a["x"]).astype(dtype)
    bound = twins.spmm(a["indptr"], a["indices"], numpy.abs(a["data"]), numpy.abs(a["x"]))
    assert_close(result, expected, bound, dtype)


@case_params
@dtype_params
def test_cpu_spmm_t_matches_twin(case, dtype):
    a = case.arrays(dtype)
    result = kernels.spmm_t(a["indptr"], a["indices"], a["data"], a["dy"], case.n_cols)
    assert result.flags.c_contiguous
    expected = twins.spmm_t(a["indptr"], a["indices"], a["data"], a["dy"], case.n_cols)
    bound = twins.spmm_t(a["indptr"], a["indices"], numpy.abs(a["data"]), numpy.abs(a["dy"]),
                         case.n_cols)
    assert_close(result, expected.astype(dtype), bound, dtype)


@pytest.mark.parametrize("n_chunks", [1, 2, 3, 5, 8, 40])
@dtype_params
def test_cpu_spmm_t_batch_slices(n_chunks, dtype):
    """Batch 37 split into slices that do not divide it, and more slices than samples."""
    from cupynn.kernels import cpu

    case = next(c for c in CASES if c.name == "large")
    a = case.arrays(dtype)
    out = numpy.full((case.n_cols, case.batch), numpy.nan, dtype=dtype)
    cpu.spmm_t(a["indptr"], a["indices"], a["data"], a["dy"], out, n_chunks)
    expected = twins.spmm_t(a["indptr"], a["indices"], a["data"], a["dy"], case.n_cols)
    bound = twins.spmm_t(a["indptr"], a["indices"], numpy.abs(a["data"]), numpy.abs(a["dy"]),
                         case.n_cols)
    assert_close(out, expected.astype(dtype), bound, dtype)


def fused_inputs(case: Case, dtype: type) -> dict:
    """The case's arrays plus a bias, and a ``y`` with zeros, negatives, -0.0 and NaN."""
    a = case.arrays(dtype)
    rng = numpy.random.default_rng(7)
    a["bias"] = rng.standard_normal(case.n_rows).astype(dtype)
    y = rng.standard_normal(a["dy"].shape).astype(dtype)
    y.flat[::5] = 0.0
    y.flat[1::7] = -0.0
    y.flat[2::11] = numpy.nan
    a["y"] = y
    return a


def assert_fused_spmm(kernels_spmm, a: dict, xp_to_numpy, dtype: type) -> None:
    """spmm with bias (and relu) gives, bit for bit, spmm then ``+= bias`` then ``maximum``."""
    plain = xp_to_numpy(kernels_spmm(a, {}))
    with_bias = xp_to_numpy(kernels_spmm(a, {"bias": True}))
    with_relu = xp_to_numpy(kernels_spmm(a, {"bias": True, "relu": True}))
    bias = xp_to_numpy(a["bias"])
    expected = plain + bias[:, None]
    numpy.testing.assert_array_equal(with_bias, expected)
    expected = numpy.maximum(expected, 0)
    numpy.testing.assert_array_equal(with_relu, expected)
    numpy.testing.assert_array_equal(numpy.signbit(with_relu), numpy.signbit(expected))
    assert with_bias.dtype == with_relu.dtype == dtype


def call_fused_spmm(a: dict, options: dict):
    bias = a["bias"] if options.get("bias") else None
    return kernels.spmm(a["indptr"], a["indices"], a["data"], a["x"], bias=bias,
                        relu=options.get("relu", False))


@case_params
@dtype_params
def test_cpu_spmm_with_bias_and_relu(case, dtype):
    a = fused_inputs(case, dtype)
    if a["x"].size:  # reaches every row with column 0: NaN passes the ReLU as NaN
        a["x"][0, 0] = numpy.nan
    assert_fused_spmm(call_fused_spmm, a, numpy.asarray, dtype)


@gpu
@case_params
@dtype_params
@spmm_gpu_params
def test_gpu_spmm_matches_twin(case, dtype, method, max_blocks):
    a = case.arrays(dtype)
    d = to_gpu(a)
    result = kernels.spmm(d["indptr"], d["indices"], d["data"], d["x"], method=method,
                          **({} if max_blocks is None else {"max_blocks": max_blocks}))
    assert result.flags.c_contiguous
    expected = twins.spmm(a["indptr"], a["indices"], a["data"], a["x"]).astype(dtype)
    bound = twins.spmm(a["indptr"], a["indices"], numpy.abs(a["data"]), numpy.abs(a["x"]))
    assert_close(result, expected, bound, dtype)


@gpu
@pytest.mark.parametrize("kernel", ["spmm", "spmm_t"])
def test_gpu_spmm_repeats_bit_for_bit(kernel):
    """The default GPU products give the same bits on every call (one thread and one
    summation order per output), and the same as the emulated kernel, less FMA contraction."""
    case = next(c for c in CASES if c.name == "large")
    a = case.arrays(numpy.float32)
    d = to_gpu(a)
    if kernel == "spmm":
        runs = [to_numpy(kernels.spmm(d["indptr"], d["indices"], d["data"], d["x"]))
                for _ in range(3)]
    else:
        runs = [to_numpy(kernels.spmm_t(d["indptr"], d["indices"], d["data"], d["dy"],
                                        case.n_cols)) for _ in range(3)]
    for other in runs[1:]:
        numpy.testing.assert_array_equal(runs[0], other)


@gpu
@case_params
def test_gpu_transpose_pattern_matches_the_cpu(case):
    a = case.arrays(numpy.float32)
    d = to_gpu(a)
    for got, expected in zip(kernels.transpose_pattern(d["indptr"], d["indices"], case.n_cols),
                             kernels.transpose_pattern(a["indptr"], a["indices"], case.n_cols)):
        assert got.dtype == numpy.int32
        numpy.testing.assert_array_equal(to_numpy(got), expected)


@gpu
@case_params
@dtype_params
def test_gpu_spmm_with_bias_and_relu(case, dtype):
    a = fused_inputs(case, dtype)
    if a["x"].size:
        a["x"][0, 0] = numpy.nan
    assert_fused_spmm(call_fused_spmm, to_gpu(a), to_numpy, dtype)


@gpu
@case_params
@dtype_params
@spmm_gpu_params
def test_gpu_spmm_t_matches_twin(case, dtype, method, max_blocks):
    a = case.arrays(dtype)
    d = to_gpu(a)
    options = {"method": method} if max_blocks is None else {"method": method,
                                                             "max_blocks": max_blocks}
    result = kernels.spmm_t(d["indptr"], d["indices"], d["data"], d["dy"], case.n_cols,
                            **options)
    assert result.flags.c_contiguous
    expected = twins.spmm_t(a["indptr"], a["indices"], a["data"], a["dy"], case.n_cols)
    bound = twins.spmm_t(a["indptr"], a["indices"], numpy.abs(a["data"]), numpy.abs(a["dy"]),
                         case.n_cols)
    assert_close(result, expected.astype(dtype), bound, dtype)
    if method == "rows":  # with the transposed pattern given, as layers pass it
        t = kernels.transpose_pattern(d["indptr"], d["indices"], case.n_cols)
        again = kernels.spmm_t(d["indptr"], d["indices"], d["data"], d["dy"], case.n_cols,
                               transpose=t, **options)
        numpy.testing.assert_array_equal(to_numpy(again), to_numpy(result))

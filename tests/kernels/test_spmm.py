"""``kernels.spmm`` and ``kernels.spmm_t`` (``spmm.cu``, cuSPARSE, ``cpu.spmm`` /
``cpu.spmm_t``) and ``transpose_pattern``: one body checks every implementation
against the twin (the twin, the Numba kernels, ``spmm.cu`` emulated on the CPU,
``spmm.cu`` and cuSPARSE on a GPU), another the fused bias and ReLU; then thread
order, the transposed pattern and the choice of GPU method; last, the products
written into a given ``out`` (issue 19: a captured CUDA graph's buffers) on the
CPU, on the GPU path with ``spmm.cu`` emulated, and on a GPU.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import numpy
import pytest

from conftest import needs_gpu
from cupynn import kernels
from cupynn.backend import get_backend, to_numpy
from cupynn.kernels import numpy_twins as twins
from kernel_cases import (CASES, LAUNCHES, SPMM_GPU, Case, assert_allocates_no, assert_close,
                          assert_fused_spmm, assert_same_bits, call_fused_spmm, case_params,
                          dtype_params, emulated_gpu, emulated_spmm, emulated_spmm_t,
                          fused_inputs, gpu, suffix_of, to_gpu)

# The module that keeps the setting (kernels.spmm is the function).
SPMM_MODULE = importlib.import_module("cupynn.kernels.spmm")


def _twin(a: dict, case: Case, dtype: type, kernel: str) -> numpy.ndarray:
    if kernel == "spmm":
        return twins.spmm(a["indptr"], a["indices"], a["data"], a["x"])
    return twins.spmm_t(a["indptr"], a["indices"], a["data"], a["dy"], case.n_cols)


def _dispatcher(backend: str, **options: Any) -> Callable:
    """kernels.spmm / spmm_t with ``options`` on the case's arrays moved to ``backend``."""
    def run(a: dict, case: Case, dtype: type, kernel: str) -> numpy.ndarray:
        d = to_gpu(a) if backend == "gpu" else a
        if kernel == "spmm":
            result = kernels.spmm(d["indptr"], d["indices"], d["data"], d["x"], **options)
        else:
            result = kernels.spmm_t(d["indptr"], d["indices"], d["data"], d["dy"], case.n_cols,
                                    **options)
            if options.get("method") == "rows":  # the transposed pattern given, as layers do
                t = kernels.transpose_pattern(d["indptr"], d["indices"], case.n_cols)
                again = kernels.spmm_t(d["indptr"], d["indices"], d["data"], d["dy"],
                                       case.n_cols, transpose=t, **options)
                numpy.testing.assert_array_equal(to_numpy(again), to_numpy(result))
        assert result.flags.c_contiguous
        return to_numpy(result)
    return run


def _emulated(config: str) -> Callable:
    """spmm.cu run on the CPU one (block, thread) at a time."""
    def run(a: dict, case: Case, dtype: type, kernel: str) -> numpy.ndarray:
        return (emulated_spmm if kernel == "spmm" else emulated_spmm_t)(a, case, dtype, config)
    return run


GPU_IDS = dict(zip(SPMM_GPU, ["rows", "rows_max_blocks_2", "cusparse"]))
# name: run(case arrays, case, dtype, "spmm" or "spmm_t") -> NumPy result, and marks
IMPLEMENTATIONS = {
    "twin": (_twin, ()),
    "numba": (_dispatcher("cpu"), ()),
    **{f"emulated-{config}": (_emulated(config), ()) for config in LAUNCHES},
    **{f"gpu-{GPU_IDS[m, b]}": (_dispatcher("gpu", method=m,
                                             **({} if b is None else {"max_blocks": b})),
                                 needs_gpu) for m, b in SPMM_GPU},
}
CALLS = [pytest.param(name, kernel, id=f"{name}-{kernel}", marks=marks)
         for name, (_, marks) in IMPLEMENTATIONS.items() for kernel in ("spmm", "spmm_t")]


@pytest.mark.parametrize("name, kernel", CALLS)
@case_params
@dtype_params
def test_spmm_matches_twin(name, kernel, case, dtype):
    """One body over every implementation of W @ x and W.T @ dy: the twin, the Numba
    kernels, spmm.cu emulated under several launch shapes, spmm.cu and cuSPARSE on a GPU."""
    a = case.arrays(dtype)
    absolute = {**a, "data": numpy.abs(a["data"]), "x": numpy.abs(a["x"]),
                "dy": numpy.abs(a["dy"])}
    expected = _twin(a, case, dtype, kernel).astype(dtype)
    bound = _twin(absolute, case, dtype, kernel)
    assert_close(IMPLEMENTATIONS[name][0](a, case, dtype, kernel), expected, bound, dtype)


def _emulated_fused(config: str) -> Callable:
    def fused(case: Case) -> Callable:
        def call(a: dict, options: dict) -> numpy.ndarray:
            return emulated_spmm(a, case, a["x"].dtype.type, config, **options)
        return call
    return fused


# name: (spmm(arrays, {"bias": ..., "relu": ...}) for a case, on the GPU?, marks)
FUSED = {
    "numba": (lambda case: call_fused_spmm, False, ()),
    **{f"emulated-{config}": (_emulated_fused(config), False, ()) for config in LAUNCHES},
    "gpu": (lambda case: call_fused_spmm, True, needs_gpu),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=m) for n, (_, _, m) in FUSED.items()])
@case_params
@dtype_params
def test_spmm_with_bias_and_relu(name, case, dtype):
    """The epilogue: bias then ReLU on the kernel's own sum, bit for bit as NumPy does them."""
    spmm, on_gpu, _ = FUSED[name]
    a = fused_inputs(case, dtype)
    if a["x"].size:  # reaches every row with column 0: NaN passes the ReLU as NaN
        a["x"][0, 0] = numpy.nan
    a = to_gpu(a) if on_gpu else a
    assert_fused_spmm(spmm(case), a, to_numpy, dtype)


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
    monkeypatch.setattr(SPMM_MODULE._SPMM, "chosen", None)
    monkeypatch.setenv(kernels.SPMM_ENV, "dense")
    with pytest.raises(ValueError, match="\\$CUPYNN_SPMM"):
        kernels.spmm_setting()
    monkeypatch.setenv(kernels.SPMM_ENV, "cusparse")
    assert kernels.spmm_setting() == "cusparse"
    monkeypatch.setattr(SPMM_MODULE._SPMM, "chosen", None)
    monkeypatch.delenv(kernels.SPMM_ENV)
    assert kernels.spmm_setting() == "rows"


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


# --- out=: the product written into a given buffer (issue 19) ------------------------


def _product(kernel: str, a: dict, case: Case, **options: Any) -> Any:
    if kernel == "spmm":
        bias = options.pop("bias", False)
        return kernels.spmm(a["indptr"], a["indices"], a["data"], a["x"],
                            bias=a["bias"] if bias else None, **options)
    return kernels.spmm_t(a["indptr"], a["indices"], a["data"], a["dy"], case.n_cols, **options)


# (kernel, options): the plain products, the layer's forward pass (bias, ReLU), and
# spmm_t as layers call it (their transposed pattern, check=False, sorted rows).
OUT_CALLS = [("spmm", {}), ("spmm", {"bias": True, "relu": True}), ("spmm_t", {}),
             ("spmm_t", {"transpose": True, "check": False, "sorted_rows": True})]
out_call_params = pytest.mark.parametrize(
    "kernel, options", OUT_CALLS,
    ids=["spmm", "spmm_bias_relu", "spmm_t", "spmm_t_as_layers_call"])


def _with_out(kernel: str, options: dict, a: dict, case: Case, xp: Any,
              **extra: Any) -> tuple[Any, Any]:
    """(the allocating call's result, the result written into a NaN-filled out)."""
    options = dict(options, **extra)
    if options.get("transpose") is True:
        options["transpose"] = kernels.transpose_pattern(a["indptr"], a["indices"], case.n_cols)
    expected = _product(kernel, a, case, **options)
    out = xp.full(expected.shape, numpy.nan, dtype=expected.dtype)
    got = _product(kernel, a, case, out=out, **options)
    assert got is out
    return expected, out


@out_call_params
@case_params
@dtype_params
def test_cpu_out_equals_the_allocating_call(kernel, options, case, dtype):
    """The Numba kernels write into a given out, empty shapes included, bit for bit."""
    a = fused_inputs(case, dtype)
    expected, out = _with_out(kernel, options, a, case, numpy)
    assert_same_bits(out, expected)


@out_call_params
@case_params
@dtype_params
def test_emulated_gpu_out_equals_the_allocating_call(kernel, options, case, dtype, monkeypatch):
    """The "rows" GPU path, spmm.cu emulated: out is written by the kernel (or, with
    no rows for spmm_t, filled with zeros), bit for bit as a fresh array."""
    launches = emulated_gpu(monkeypatch, SPMM_MODULE, "spmm.cu")
    a = fused_inputs(case, dtype)
    expected, out = _with_out(kernel, options, a, case, numpy, method="rows")
    assert_same_bits(out, expected)
    n_in, n_out = (case.n_cols, case.n_rows) if kernel == "spmm" else (case.n_rows, case.n_cols)
    if case.batch and n_in and n_out:
        assert [name for name, _, _ in launches] == [f"{kernel}_{suffix_of(dtype)}"] * 2
    elif kernel == "spmm" or not n_out:
        assert not launches


@gpu
@pytest.mark.parametrize("method", ["rows", "cusparse"])
@out_call_params
@case_params
@dtype_params
def test_gpu_out_equals_the_allocating_call(method, kernel, options, case, dtype):
    a = to_gpu(fused_inputs(case, dtype))
    expected, out = _with_out(kernel, options, a, case, get_backend("gpu").xp, method=method)
    if method == "rows":
        assert_same_bits(out, expected)
    else:  # cuSPARSE's transposed product adds with atomics: not the same bits twice
        numpy.testing.assert_allclose(to_numpy(out), to_numpy(expected),
                                      rtol=1e-5 if dtype == numpy.float32 else 1e-12,
                                      atol=1e-5 if dtype == numpy.float32 else 1e-12)


@pytest.mark.parametrize("kernel", ["spmm", "spmm_t"])
@dtype_params
def test_cpu_out_allocates_nothing(kernel, dtype):
    """With out given, the CPU step's products allocate no NumPy array (tracemalloc),
    as layers call them (checked pattern once, then check=False)."""
    case = Case("layer", 64, 96, 512, 0.1)
    a = fused_inputs(case, dtype)
    if kernel == "spmm":
        out = numpy.empty((case.n_rows, case.batch), dtype=dtype)
        assert_allocates_no(out.nbytes, lambda: kernels.spmm(
            a["indptr"], a["indices"], a["data"], a["x"], bias=a["bias"], relu=True,
            check=False, out=out))
    else:
        out = numpy.empty((case.n_cols, case.batch), dtype=dtype)
        assert_allocates_no(out.nbytes, lambda: kernels.spmm_t(
            a["indptr"], a["indices"], a["data"], a["dy"], case.n_cols, check=False,
            sorted_rows=True, out=out))


@pytest.mark.parametrize("kernel", ["spmm", "spmm_t"])
def test_out_is_checked(kernel):
    case = CASES[0]
    a = case.arrays(numpy.float64)
    shape = (case.n_rows, case.batch) if kernel == "spmm" else (case.n_cols, case.batch)
    with pytest.raises(ValueError, match=rf"out must be a C-contiguous array of shape "
                                         rf"\({shape[0]}, {shape[1]}\). Got shape"):
        _product(kernel, a, case, out=numpy.empty((shape[0] + 1, shape[1])))
    with pytest.raises(ValueError, match="not C-contiguous"):
        _product(kernel, a, case, out=numpy.empty(shape[::-1]).T)
    with pytest.raises(TypeError, match="all float arrays must have one dtype"):
        _product(kernel, a, case, out=numpy.empty(shape, dtype=numpy.float32))
    # The operand read and out over one buffer, out starting a row after it.
    read = "x" if kernel == "spmm" else "dy"
    operand = a[read]
    memory = numpy.zeros(operand.size + shape[0] * shape[1])
    overlapping = dict(a, **{read: memory[:operand.size].reshape(operand.shape)})
    out = memory[case.batch:case.batch + shape[0] * shape[1]].reshape(shape)
    with pytest.raises(ValueError, match=f"out must not overlap {read}"):
        _product(kernel, overlapping, case, out=out)

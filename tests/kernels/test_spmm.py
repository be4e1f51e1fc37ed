"""``kernels.spmm`` and ``kernels.spmm_t`` (``spmm.cu``, cuSPARSE, ``cpu.spmm`` /
``cpu.spmm_t``) and ``transpose_pattern``: one body checks every implementation
against the twin (the twin, the Numba kernels, ``spmm.cu`` emulated on the CPU,
``spmm.cu`` and cuSPARSE on a GPU), another the fused bias and ReLU; then thread
order, the transposed pattern and the choice of GPU method; last, the products
written into a given ``out`` (issue 19: a captured CUDA graph's buffers) on the
CPU, on the GPU path with ``spmm.cu`` emulated, and on a GPU. The tiled kernels
(issue 20, ``method="tiles"``) run in both bodies too, and then against their
twins and the ``"rows"`` twins bit for bit under many launch shapes and chunks,
on a GPU against ``"rows"``, and in a training step on the fake GPU. So do the
vectorised kernels (issue 20, ``method="vec"``: vector widths 4, 2 and 1, the row
swizzle, misaligned operands), with ``row_swizzle``, the vector width and
``method="auto"`` (``kernels.choose``) after them.
"""

from __future__ import annotations

import ctypes
import importlib
from typing import Any, Callable

import numpy
import pytest

from conftest import needs_gpu
from cupynn import kernels
from cupynn.backend import get_backend, to_numpy
from cupynn.kernels import numpy_twins as twins
from kernel_cases import (CASES, GUARD, LAUNCHES, SPMM_GPU, TILED_CASES, TILED_LAUNCHES,
                          Case, assert_allocates_no, assert_close, assert_fused_spmm,
                          assert_same_bits, call_fused_spmm, case_params, dtype_params,
                          emulated_gpu, emulated_spmm,
                          emulated_spmm_t, emulated_spmm_t_tiled, emulated_spmm_tiled,
                          fused_inputs, gpu, host_library, suffix_of, to_gpu)

try:  # tests/ is on sys.path (pytest's default rootdir-relative import)
    from cuda_host import launch, pointer
except ModuleNotFoundError:  # tests/ became a package
    from tests.cuda_host import launch, pointer

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
            if options.get("method") in ("rows", "tiles", "vec"):  # the transposed pattern
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


def _emulated_vec(config: str) -> Callable:
    """spmm.cu's vectorised kernels run on the CPU block by block (VEC_LAUNCHES)."""
    def run(a: dict, case: Case, dtype: type, kernel: str) -> numpy.ndarray:
        if kernel == "spmm":
            return emulated_spmm_vec(a, case, dtype, config)
        return emulated_spmm_t_vec(a, case, dtype, config)
    return run


def _emulated_tiles(config: str) -> Callable:
    """spmm.cu's tiled kernels run on the CPU block by block (TILED_LAUNCHES)."""
    def run(a: dict, case: Case, dtype: type, kernel: str) -> numpy.ndarray:
        if kernel == "spmm":
            return emulated_spmm_tiled(a, case, dtype, config)
        return emulated_spmm_t_tiled(a, case, dtype, config)
    return run


# The tiled kernels' launches in the bodies over every case (blocks of OS threads are
# slow: the others run on the small TILED_CASES below).
TILES_IN_BODIES = ("dispatcher", "tile8_rows4_grid2")
VEC_IN_BODIES = ("dispatcher", "tile8_rows4_grid2")
GPU_IDS = dict(zip(SPMM_GPU, ["rows", "rows_max_blocks_2", "cusparse"]))
# name: run(case arrays, case, dtype, "spmm" or "spmm_t") -> NumPy result, and marks
IMPLEMENTATIONS = {
    "twin": (_twin, ()),
    "numba": (_dispatcher("cpu"), ()),
    **{f"emulated-{config}": (_emulated(config), ()) for config in LAUNCHES},
    **{f"emulated-tiles-{config}": (_emulated_tiles(config), ()) for config in TILES_IN_BODIES},
    **{f"emulated-vec-{config}": (_emulated_vec(config), ()) for config in VEC_IN_BODIES},
    **{f"gpu-{GPU_IDS[m, b]}": (_dispatcher("gpu", method=m,
                                             **({} if b is None else {"max_blocks": b})),
                                 needs_gpu) for m, b in SPMM_GPU},
    "gpu-tiles": (_dispatcher("gpu", method="tiles"), needs_gpu),
    "gpu-tiles_max_blocks_2": (_dispatcher("gpu", method="tiles", max_blocks=2), needs_gpu),
    "gpu-vec": (_dispatcher("gpu", method="vec"), needs_gpu),
    "gpu-vec_max_blocks_2": (_dispatcher("gpu", method="vec", max_blocks=2), needs_gpu),
    "gpu-auto": (_dispatcher("gpu", method="auto"), needs_gpu),
}
CALLS = [pytest.param(name, kernel, id=f"{name}-{kernel}", marks=marks)
         for name, (_, marks) in IMPLEMENTATIONS.items() for kernel in ("spmm", "spmm_t")]


@pytest.mark.parametrize("name, kernel", CALLS)
@case_params
@dtype_params
def test_spmm_matches_twin(name, kernel, case, dtype):
    """One body over every implementation of W @ x and W.T @ dy: the twin, the Numba
    kernels, spmm.cu (its tiled kernels too) emulated under several launch shapes, spmm.cu
    and cuSPARSE on a GPU."""
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


def _emulated_tiles_fused(config: str) -> Callable:
    def fused(case: Case) -> Callable:
        def call(a: dict, options: dict) -> numpy.ndarray:
            return emulated_spmm_tiled(a, case, a["x"].dtype.type, config, **options)
        return call
    return fused


def _emulated_vec_fused(config: str) -> Callable:
    def fused(case: Case) -> Callable:
        def call(a: dict, options: dict) -> numpy.ndarray:
            return emulated_spmm_vec(a, case, a["x"].dtype.type, config, **options)
        return call
    return fused


def _gpu_method_fused(method: str) -> Callable:
    def fused(case: Case) -> Callable:
        def call(a: dict, options: dict) -> Any:
            return kernels.spmm(a["indptr"], a["indices"], a["data"], a["x"], method=method,
                                bias=a["bias"] if options.get("bias") else None,
                                relu=options.get("relu", False))
        return call
    return fused


# name: (spmm(arrays, {"bias": ..., "relu": ...}) for a case, on the GPU?, marks)
FUSED = {
    "numba": (lambda case: call_fused_spmm, False, ()),
    **{f"emulated-{config}": (_emulated_fused(config), False, ()) for config in LAUNCHES},
    **{f"emulated-tiles-{config}": (_emulated_tiles_fused(config), False, ())
       for config in TILES_IN_BODIES},
    **{f"emulated-vec-{config}": (_emulated_vec_fused(config), False, ())
       for config in VEC_IN_BODIES},
    "gpu": (lambda case: call_fused_spmm, True, needs_gpu),
    "gpu-tiles": (_gpu_method_fused("tiles"), True, needs_gpu),
    "gpu-vec": (_gpu_method_fused("vec"), True, needs_gpu),
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
    with pytest.raises(ValueError, match="must be one of \\['rows', 'cusparse', 'tiles', 'vec', "
                                         "'auto'\\]"):
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


# The tiled path on every case but the large one (blocks of OS threads are slow; the
# bodies above run it there).
OUT_EMULATED = [("rows", c) for c in CASES] + [(m, c) for m in ("tiles", "vec") for c in CASES
                                                if c.name != "large"]


@pytest.mark.parametrize("method, case", OUT_EMULATED,
                         ids=[f"{m}-{c.name}" for m, c in OUT_EMULATED])
@out_call_params
@dtype_params
def test_emulated_gpu_out_equals_the_allocating_call(method, kernel, options, case, dtype,
                                                     monkeypatch):
    """The "rows", "tiles" and "vec" GPU paths, spmm.cu emulated: out is written by the kernel
    (or, with no rows for spmm_t, filled with zeros), bit for bit as a fresh array."""
    launches = emulated_gpu(monkeypatch, SPMM_MODULE, "spmm.cu")
    a = fused_inputs(case, dtype)
    expected, out = _with_out(kernel, options, a, case, numpy, method=method)
    assert_same_bits(out, expected)
    n_in, n_out = (case.n_cols, case.n_rows) if kernel == "spmm" else (case.n_rows, case.n_cols)
    family = {"rows": kernel, "tiles": f"{kernel}_tiled", "vec": f"{kernel}_vec"}[method]
    if case.batch and n_in and n_out:
        assert [name for name, _, _ in launches] == [f"{family}_{suffix_of(dtype)}"] * 2
    elif kernel == "spmm" or not n_out:
        assert not launches


@gpu
@pytest.mark.parametrize("method", ["rows", "cusparse", "tiles", "vec"])
@out_call_params
@case_params
@dtype_params
def test_gpu_out_equals_the_allocating_call(method, kernel, options, case, dtype):
    a = to_gpu(fused_inputs(case, dtype))
    expected, out = _with_out(kernel, options, a, case, get_backend("gpu").xp, method=method)
    if method in ("rows", "tiles", "vec"):
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


# --- the tiled kernels (issue 20): method="tiles" -------------------------------------


def _tiled_and_rows_twins(kernel: str, a: dict, case: Case, bias: bool, relu: bool
                          ) -> tuple[numpy.ndarray, numpy.ndarray]:
    if kernel == "spmm":
        b = a["bias"] if bias else None
        return (twins.spmm_tiled(a["indptr"], a["indices"], a["data"], a["x"], b, relu),
                twins.spmm(a["indptr"], a["indices"], a["data"], a["x"], b, relu))
    return (twins.spmm_t_tiled(a["indptr"], a["indices"], a["data"], a["dy"], case.n_cols),
            twins.spmm_t(a["indptr"], a["indices"], a["data"], a["dy"], case.n_cols))


# (launch, chunk): every launch shape, with its default chunk (SPMM_TILE_SHARED / rows)
# or chunks of 1 and 4 entries (the long rows take up to 50 stages).
TILED_CHUNKS = [("dispatcher", None), ("dispatcher", 4), ("tile8_rows4_grid2", 1),
                ("tile2_rows32_grid2", None), ("tile32_rows1_grid3", 4),
                ("tile1_rows8_grid1", None), ("tile3_rows5_grid1", 1)]
assert {c for c, _ in TILED_CHUNKS} == set(TILED_LAUNCHES)
# (kernel, bias, relu)
TILED_CALLS = [("spmm", False, False), ("spmm", True, True), ("spmm_t", False, False)]


@pytest.mark.parametrize("kernel, bias, relu", TILED_CALLS,
                         ids=["spmm", "spmm_bias_relu", "spmm_t"])
@pytest.mark.parametrize("config, chunk", TILED_CHUNKS,
                         ids=[f"{c}-chunk{k or '_default'}" for c, k in TILED_CHUNKS])
@pytest.mark.parametrize("case", TILED_CASES, ids=lambda c: c.name)
@dtype_params
def test_emulated_tiles_equal_the_twins_bit_for_bit(kernel, bias, relu, chunk, config, case,
                                                    dtype):
    """spmm.cu's tiled kernels, block by block with CUDA's barrier rules, under several
    launch shapes and chunks (rows longer than a chunk, batches not a multiple of the
    tile, batch 1, row counts not a multiple of the row tile, empty rows): the bits of
    their twins, which are those of the "rows" twins (one summation order)."""
    a = fused_inputs(case, dtype)
    if kernel == "spmm":
        got = emulated_spmm_tiled(a, case, dtype, config, bias=bias, relu=relu, chunk=chunk)
    else:
        got = emulated_spmm_t_tiled(a, case, dtype, config, chunk=chunk)
    tiled, rows = _tiled_and_rows_twins(kernel, a, case, bias, relu)
    assert_same_bits(got, tiled.astype(dtype))
    assert_same_bits(got, rows.astype(dtype))


def test_tiled_cases_cover_what_they_claim():
    """long_rows has rows longer than the 32-entry chunks of 32-row blocks; every tiled
    launch leaves a partial batch tile or row tile on some case."""
    from cupynn.kernels.spmm import SPMM_TILE_SHARED

    long_rows = next(c for c in TILED_CASES if c.name == "long_rows")
    lengths = numpy.diff(long_rows.arrays(numpy.float64)["indptr"])
    assert lengths.max() > SPMM_TILE_SHARED // 32 and 0 in lengths
    assert any(c.batch == 1 for c in TILED_CASES)
    for config, shape in TILED_LAUNCHES.items():
        if shape is not None:
            tile, rows, _ = shape
            assert any(c.batch % tile for c in TILED_CASES if c.batch) or tile == 1, config
            assert any(c.n_rows % rows for c in TILED_CASES) or rows == 1, config


@pytest.mark.parametrize("kernel", ["spmm", "spmm_t"])
def test_emulated_tiles_do_not_depend_on_thread_order(kernel):
    """Blocks and threads run last to first give the same bits (each output one thread,
    one order; a missing barrier would read shared memory's 0xff bytes in one order)."""
    case = next(c for c in TILED_CASES if c.name == "long_rows")
    a = fused_inputs(case, numpy.float32)
    for config in ("tile8_rows4_grid2", "tile2_rows32_grid2"):
        if kernel == "spmm":
            runs = [emulated_spmm_tiled(a, case, numpy.float32, config, bias=True, relu=True,
                                        chunk=4, reverse=r) for r in (False, True)]
        else:
            runs = [emulated_spmm_t_tiled(a, case, numpy.float32, config, chunk=4, reverse=r)
                    for r in (False, True)]
        assert_same_bits(runs[0], runs[1])


def test_tiles_launch_shape():
    """The dispatcher's tiles: the batch's power of two up to SPMM_TILE_COLS, a block of
    SPMM_TILE_THREADS threads (at most 32 rows), chunks filling the shared arrays."""
    launch_of = SPMM_MODULE._spmm_tiles_launch
    assert launch_of(4096, 512, None) == ((512 * 32,), (128,), 16, 128)
    assert launch_of(10, 1, None) == ((1,), (32,), 1, 32)
    assert launch_of(10, 5, None) == ((1,), (128,), 8, 64)
    assert launch_of(4096, 512, 2) == ((2,), (128,), 16, 128)
    assert launch_of(7, 9, None, tile_cols=8, rows=4) == ((4,), (32,), 8, 256)
    with pytest.raises(ValueError, match="at most 1024"):
        launch_of(7, 9, None, tile_cols=64, rows=32)


@gpu
@pytest.mark.parametrize("kernel, bias, relu", TILED_CALLS,
                         ids=["spmm", "spmm_bias_relu", "spmm_t"])
@case_params
@dtype_params
def test_gpu_tiles_equal_rows_bit_for_bit(kernel, bias, relu, case, dtype):
    """On the device, "tiles" gives the bits of "rows" (one summation order, the same
    FMA contraction), and the same bits on every call."""
    a = to_gpu(fused_inputs(case, dtype))

    def run(method: str) -> numpy.ndarray:
        if kernel == "spmm":
            return to_numpy(kernels.spmm(a["indptr"], a["indices"], a["data"], a["x"],
                                         bias=a["bias"] if bias else None, relu=relu,
                                         method=method))
        return to_numpy(kernels.spmm_t(a["indptr"], a["indices"], a["data"], a["dy"],
                                       case.n_cols, method=method))

    tiles = run("tiles")
    assert_same_bits(tiles, run("rows"))
    assert_same_bits(tiles, run("tiles"))


def _fake_gpu_step(monkeypatch, method, batch, inspect=None):
    """One training step of a small MLP on the fake GPU (kernels emulated) with
    set_spmm(method): (logits, loss, [(data, bias) per layer]) on the host and the
    kernels launched; ``inspect(model)`` runs on the model after the step."""
    import cupynn

    try:
        from fake_gpu import FakeGpu
    except ModuleNotFoundError:  # tests/ became a package
        from tests.fake_gpu import FakeGpu
    rng = numpy.random.default_rng(3)
    x, labels = rng.standard_normal((batch, 6)), rng.integers(0, 3, batch)
    monkeypatch.setattr(SPMM_MODULE._SPMM, "chosen", None)
    kernels.set_spmm(method)
    with FakeGpu() as fake:
        model = cupynn.MLP([6, 8, 3], density=0.5, device=fake.backend, dtype="float64", seed=2)
        optimizer = cupynn.Adam(model, lr=1e-2)
        logits = model.forward(fake.xp.asarray(x))
        loss, grad = cupynn.losses.cross_entropy(logits, fake.xp.asarray(labels))
        model.backward(grad)
        optimizer.step()
        if inspect is not None:
            inspect(model)
        return ((logits.get(), float(loss),
                 [(layer.data.get(), layer.bias.get()) for layer in model.layers]),
                set(fake.launches))


def test_tiles_train_on_the_fake_gpu_as_rows(monkeypatch):
    """set_spmm("tiles"): a training step on the fake GPU (kernels emulated) launches the
    tiled kernels and ends where the "rows" step does, within rounding."""
    results = {}
    for method in ("rows", "tiles"):
        results[method], launched = _fake_gpu_step(monkeypatch, method, 9)
        tiled = {"spmm_tiled_f64", "spmm_t_tiled_f64"}
        assert (tiled <= launched) if method == "tiles" else not (tiled & launched)
    (rows_logits, rows_loss, rows_layers), (logits, loss, layers) = results["rows"], \
        results["tiles"]
    numpy.testing.assert_allclose(logits, rows_logits, rtol=0, atol=1e-12)
    assert abs(loss - rows_loss) <= 1e-12
    for (data, bias), (rows_data, rows_bias) in zip(layers, rows_layers):
        numpy.testing.assert_allclose(data, rows_data, rtol=0, atol=1e-12)
        numpy.testing.assert_allclose(bias, rows_bias, rtol=0, atol=1e-12)


# --- the vectorised kernels (issue 20): method="vec" -----------------------------------

CHOICE_MODULE = importlib.import_module("cupynn.kernels.choice")
VEC_WIDTH = {numpy.float32: 4, numpy.float64: 2}
# Launch shapes as (tile_cols, rows per block, grid, vectorised): None for the
# dispatcher's (its own tile, rows and vector width); vector launches whose tiles are
# multiples of 4 (every V): several rows a block on two blocks that stride, a tile of
# one float32 vector over 8 rows, a wide tile of 3 rows on 3 blocks (rows not a multiple
# of 3 here); and scalar launches (V = 1, what misaligned or odd batches get), one with a
# tile of 3 columns. Vectorised launches take V = 1 where the batch is not a multiple of
# V (the wrapper's rule).
VEC_LAUNCHES = {
    "dispatcher": None,
    "tile8_rows4_grid2": (8, 4, 2, True),
    "tile4_rows8_grid1": (4, 8, 1, True),
    "tile16_rows3_grid3": (16, 3, 3, True),
    "tile8_rows5_grid2_scalar": (8, 5, 2, False),
    "tile3_rows4_grid1_scalar": (3, 4, 1, False),
}
# The tiled kernels' cases (empty rows, an empty matrix, no rows, batch 0 and 1, one row,
# one column, rows longer than a chunk) and batches the vector width divides: 8 (one
# float32 vector per thread at tile 8), 12 (not a multiple of the tiles 8 and 16), and 40
# (longer than the dispatcher's float32 tile of 32 and float64 tile of 16), with rows
# longer than the chunks of 4 and 8 entries used below.
VEC_CASES = TILED_CASES + [
    Case("long_rows_b8", 11, 60, 8, 0.7, empty_rows=(0, 6), seed=1),
    Case("batch_12", 13, 17, 12, 0.4, empty_rows=(3, 12), seed=2),
    Case("batch_40", 7, 30, 40, 0.5, empty_rows=(2,), seed=3),
]


def _vec_launch(config: str, n_out: int, batch: int, dtype: type, chunk: int | None,
                aligned: tuple) -> tuple:
    """(grid, block, tile_cols, chunk, vec) of ``VEC_LAUNCHES[config]`` for an output of
    ``n_out`` rows; ``aligned`` are the arrays the dispatcher checks for vector access."""
    if VEC_LAUNCHES[config] is None:
        vec = kernels.vector_width(dtype, batch, *aligned)
        grid, block, tile, default = SPMM_MODULE._spmm_vec_launch(
            n_out, batch, None, numpy.dtype(dtype).itemsize, vec)
    else:
        tile, rows, grid, vectorised = VEC_LAUNCHES[config]
        vec = VEC_WIDTH[dtype] if vectorised and batch % VEC_WIDTH[dtype] == 0 else 1
        grid, block = (grid,), (rows * tile // vec,)
        default = SPMM_MODULE.SPMM_TILE_SHARED // rows
    return grid, block, tile, default if chunk is None else chunk, vec


def emulated_spmm_vec(a: dict, case: Case, dtype: type, config: str, bias: bool = False,
                      relu: bool = False, chunk: int | None = None, order: Any = None,
                      reverse: bool = False) -> numpy.ndarray:
    """spmm.cu's spmm_vec, emulated block by block: (n_rows, batch); the rows in
    ``order`` (default row_swizzle); guard cells after the output stay NaN."""
    real = pointer(dtype)
    size = case.n_rows * case.batch
    out = numpy.full(size + GUARD, numpy.nan, dtype=dtype)
    grid, block, tile, chunk, vec = _vec_launch(config, case.n_rows, case.batch, dtype, chunk,
                                                (a["x"], out))
    order = kernels.row_swizzle(a["indptr"]) if order is None else order
    launch(host_library("spmm.cu"), f"spmm_vec_{suffix_of(dtype)}", grid, block,
           [pointer(numpy.int32)] * 2 + [real] * 4 + [pointer(numpy.int32)] + [ctypes.c_int] * 7,
           [a["indptr"], a["indices"], a["data"], a["x"], a["bias"] if bias else a["data"], out,
            order, case.n_rows, case.batch, int(bias), int(relu), tile, chunk, vec],
           reverse=reverse)
    assert numpy.isnan(out[size:]).all(), "the kernel wrote past its output"
    return out[:size].reshape(case.n_rows, case.batch)


def emulated_spmm_t_vec(a: dict, case: Case, dtype: type, config: str,
                        chunk: int | None = None, order: Any = None,
                        reverse: bool = False) -> numpy.ndarray:
    """spmm.cu's spmm_t_vec, emulated, through the transposed pattern: (n_cols, batch)."""
    real = pointer(dtype)
    size = case.n_cols * case.batch
    out = numpy.full(size + GUARD, numpy.nan, dtype=dtype)
    grid, block, tile, chunk, vec = _vec_launch(config, case.n_cols, case.batch, dtype, chunk,
                                                (a["dy"], out))
    t = kernels.transpose_pattern(a["indptr"], a["indices"], case.n_cols)
    order = kernels.row_swizzle(t[0]) if order is None else order
    launch(host_library("spmm.cu"), f"spmm_t_vec_{suffix_of(dtype)}", grid, block,
           [pointer(numpy.int32)] * 3 + [real] * 3 + [pointer(numpy.int32)] + [ctypes.c_int] * 5,
           [*t, a["data"], a["dy"], out, order, case.n_cols, case.batch, tile, chunk, vec],
           reverse=reverse)
    assert numpy.isnan(out[size:]).all(), "the kernel wrote past its output"
    return out[:size].reshape(case.n_cols, case.batch)


def test_vec_cases_cover_what_they_claim():
    """Vector launches get V > 1 on some case of each dtype and V = 1 on others; some
    batch is not a multiple of each vector tile; a batch is longer than the dispatcher's
    tiles; long rows are longer than the chunks of 4 and 8 entries and than 1024 / rows."""
    for dtype, width in VEC_WIDTH.items():
        assert any(c.batch and c.batch % width == 0 for c in VEC_CASES)
        assert any(c.batch % width for c in VEC_CASES)
    for config, shape in VEC_LAUNCHES.items():
        if shape is not None and shape[0] > 1:
            assert any(c.batch % shape[0] for c in VEC_CASES if c.batch), config
    assert max(c.batch for c in VEC_CASES) > SPMM_MODULE.SPMM_VEC_TILE_BYTES // 4
    lengths = numpy.diff(next(c for c in VEC_CASES if c.name == "long_rows_b8")
                         .arrays(numpy.float64)["indptr"])
    assert lengths.max() > 8 and 0 in lengths


# (launch, chunk): every launch shape with its default chunk, and chunks of 1, 4 and 8
# entries (rows of 30-50 entries take many stages).
VEC_CHUNKS = [("dispatcher", None), ("dispatcher", 8), ("tile8_rows4_grid2", 4),
              ("tile4_rows8_grid1", None), ("tile16_rows3_grid3", 1),
              ("tile8_rows5_grid2_scalar", 8), ("tile3_rows4_grid1_scalar", None)]
assert {c for c, _ in VEC_CHUNKS} == set(VEC_LAUNCHES)


@pytest.mark.parametrize("kernel, bias, relu", TILED_CALLS,
                         ids=["spmm", "spmm_bias_relu", "spmm_t"])
@pytest.mark.parametrize("config, chunk", VEC_CHUNKS,
                         ids=[f"{c}-chunk{k or '_default'}" for c, k in VEC_CHUNKS])
@pytest.mark.parametrize("case", VEC_CASES, ids=lambda c: c.name)
@dtype_params
def test_emulated_vec_equals_rows_bit_for_bit(kernel, bias, relu, chunk, config, case, dtype):
    """spmm.cu's vectorised kernels, block by block with CUDA's barrier rules, under every
    launch shape, vector width (V = 4 float32, 2 float64, or 1) and chunk, the rows in
    row_swizzle's order: the bits of the "rows" twins (the same summation order), and
    nothing written past the output."""
    a = fused_inputs(case, dtype)
    if kernel == "spmm":
        got = emulated_spmm_vec(a, case, dtype, config, bias=bias, relu=relu, chunk=chunk)
    else:
        got = emulated_spmm_t_vec(a, case, dtype, config, chunk=chunk)
    tiled, rows = _tiled_and_rows_twins(kernel, a, case, bias, relu)
    assert_same_bits(got, rows.astype(dtype))
    assert_same_bits(got, tiled.astype(dtype))
    if kernel == "spmm":
        twin = twins.spmm_vec(a["indptr"], a["indices"], a["data"], a["x"],
                              a["bias"] if bias else None, relu)
    else:
        twin = twins.spmm_t_vec(a["indptr"], a["indices"], a["data"], a["dy"], case.n_cols)
    assert_same_bits(got, twin.astype(dtype))


@pytest.mark.parametrize("kernel", ["spmm", "spmm_t"])
@dtype_params
def test_emulated_vec_takes_any_row_order(kernel, dtype):
    """Rows taken in any permutation (reversed, random) give the bits of the swizzled order:
    each output's sum does not depend on the block that computes it. Blocks and threads
    run last to first change nothing either (a missing barrier would read shared memory's
    0xff bytes in one of the two orders)."""
    case = next(c for c in VEC_CASES if c.name == "long_rows_b8")
    a = fused_inputs(case, dtype)
    n = case.n_rows if kernel == "spmm" else case.n_cols
    orders = [None, numpy.arange(n, dtype=numpy.int32)[::-1].copy(),
              numpy.random.default_rng(4).permutation(n).astype(numpy.int32)]
    runs = []
    for order in orders:
        for reverse in (False, True):
            if kernel == "spmm":
                runs.append(emulated_spmm_vec(a, case, dtype, "tile8_rows4_grid2", bias=True,
                                              relu=True, chunk=4, order=order,
                                              reverse=reverse))
            else:
                runs.append(emulated_spmm_t_vec(a, case, dtype, "tile8_rows4_grid2", chunk=4,
                                                order=order, reverse=reverse))
    for run in runs[1:]:
        assert_same_bits(run, runs[0])
    assert not numpy.isnan(runs[0]).any()


@case_params
def test_row_swizzle_orders_rows_longest_first(case):
    """A permutation of the rows, by decreasing length, rows of one length by increasing
    index: NumPy's stable argsort of the negated lengths."""
    a = case.arrays(numpy.float64)
    for indptr in (a["indptr"],
                   kernels.transpose_pattern(a["indptr"], a["indices"], case.n_cols)[0]):
        order = kernels.row_swizzle(indptr)
        lengths = numpy.diff(indptr.astype(numpy.int64))
        assert order.dtype == numpy.int32 and order.shape == lengths.shape
        numpy.testing.assert_array_equal(numpy.sort(order), numpy.arange(len(lengths)))
        numpy.testing.assert_array_equal(order, numpy.argsort(-lengths, kind="stable"))
        taken = lengths[order]
        assert (numpy.diff(taken) <= 0).all()
        ties = numpy.diff(taken) == 0
        assert (numpy.diff(order)[ties] > 0).all()


def test_row_swizzle_of_a_literal_pattern():
    # rows of lengths 2, 0, 3, 2, 3: the two of 3 (rows 2, 4), the two of 2 (0, 3), row 1
    indptr = numpy.array([0, 2, 2, 5, 7, 10], dtype=numpy.int32)
    numpy.testing.assert_array_equal(kernels.row_swizzle(indptr), [2, 4, 0, 3, 1])
    assert kernels.row_swizzle(numpy.zeros(1, dtype=numpy.int32)).shape == (0,)


def test_vec_launch_shape():
    """The dispatcher's vector launch: a tile of 128 bytes (32 float32, 16 float64 columns)
    halved while half covers the batch, 128 threads, chunks filling the shared arrays."""
    launch_of = SPMM_MODULE._spmm_vec_launch
    assert launch_of(4096, 512, None, 4, 4) == ((256 * 16,), (128,), 32, 64)
    assert launch_of(4096, 512, None, 8, 2) == ((256 * 32,), (128,), 16, 64)
    assert launch_of(4096, 512, None, 4, 1) == ((1024 * 16,), (128,), 32, 256)
    assert launch_of(4096, 512, 3, 4, 4) == ((3,), (128,), 32, 64)
    assert launch_of(10, 8, None, 4, 4) == ((1,), (128,), 8, 16)
    assert launch_of(10, 1, None, 4, 1) == ((1,), (128,), 1, 8)
    assert launch_of(10, 5, None, 8, 1) == ((1,), (128,), 8, 64)
    assert launch_of(7, 12, None, 4, 4, tile_cols=8, rows=4) == ((4,), (8,), 8, 256)
    with pytest.raises(ValueError, match="multiple of the vector width 4"):
        launch_of(7, 12, None, 4, 4, tile_cols=6, rows=4)
    with pytest.raises(ValueError, match="at most 1024"):
        launch_of(7, 12, None, 4, 1, tile_cols=64, rows=32)


def test_vector_width():
    """V = 16 bytes of values when the batch is a multiple of it and every array is
    16-byte aligned; 1 otherwise."""
    aligned = numpy.zeros(64, dtype=numpy.float32)
    assert aligned.ctypes.data % 16 == 0  # NumPy's allocations are (at least) 16-aligned
    off = aligned[1:9]
    assert kernels.vector_width(numpy.float32, 8, aligned) == 4
    assert kernels.vector_width(numpy.float64, 8, aligned) == 2
    assert kernels.vector_width(numpy.float32, 6, aligned) == 1
    assert kernels.vector_width(numpy.float64, 6, aligned) == 2
    assert kernels.vector_width(numpy.float32, 8, aligned, off) == 1
    assert kernels.vector_width(numpy.float64, 7, aligned) == 1


def _misaligned(array: numpy.ndarray) -> numpy.ndarray:
    """A C-contiguous copy of ``array`` starting one element past a 16-byte boundary."""
    memory = numpy.full(array.size + 1, numpy.nan, dtype=array.dtype)
    view = memory[1:].reshape(array.shape)
    view[...] = array
    assert view.ctypes.data % 16 and view.flags.c_contiguous
    return view


def _vec_product(kernel: str, a: dict, case: Case, **options: Any) -> Any:
    if kernel == "spmm":
        return kernels.spmm(a["indptr"], a["indices"], a["data"], a["x"], bias=a["bias"],
                            relu=True, **options)
    return kernels.spmm_t(a["indptr"], a["indices"], a["data"], a["dy"], case.n_cols,
                          **options)


@pytest.mark.parametrize("kernel", ["spmm", "spmm_t"])
@pytest.mark.parametrize("where", ["aligned", "operand_off_by_one", "out_off_by_one"])
@dtype_params
def test_emulated_gpu_vec_takes_vectors_only_where_aligned(kernel, where, dtype, monkeypatch):
    """The "vec" GPU path (kernels emulated): V = 4 float32 / 2 float64 with every pointer
    16-byte aligned; a dense operand or an out one element past a boundary (a view)
    launches V = 1, with the same bits, those of "rows"."""
    launches = emulated_gpu(monkeypatch, SPMM_MODULE, "spmm.cu")
    widths = []

    def width(*args: Any) -> int:
        widths.append(kernels.vector_width(*args))
        return widths[-1]

    monkeypatch.setattr(SPMM_MODULE, "vector_width", width)
    case = next(c for c in VEC_CASES if c.name == "batch_12")
    a = fused_inputs(case, dtype)
    read = "x" if kernel == "spmm" else "dy"
    if where == "operand_off_by_one":
        a[read] = _misaligned(a[read])
    shape = (case.n_rows if kernel == "spmm" else case.n_cols, case.batch)
    out = numpy.full(shape, numpy.nan, dtype=dtype)
    if where == "out_off_by_one":
        out = _misaligned(out)
    got = _vec_product(kernel, a, case, method="vec", out=out)
    assert got is out
    assert widths == [1 if where != "aligned" else VEC_WIDTH[dtype]]
    assert [name for name, _, _ in launches] == [f"{kernel}_vec_{suffix_of(dtype)}"]
    rows = _vec_product(kernel, a, case, method="rows")
    assert_same_bits(got, rows)


@pytest.mark.parametrize("op", ["spmm", "spmm_t"])
@pytest.mark.parametrize("big", [False, True])
def test_emulated_gpu_auto_runs_what_choose_picks(op, big, monkeypatch):
    """method="auto" launches the kernel of choose(op, shape): "vec" past the thresholds
    (lowered here to the case's size), "rows" below them; the same bits either way."""
    launches = emulated_gpu(monkeypatch, SPMM_MODULE, "spmm.cu")
    case = next(c for c in VEC_CASES if c.name == "batch_12")
    a = fused_inputs(case, numpy.float32)
    nnz = len(a["indices"])
    monkeypatch.setattr(CHOICE_MODULE, "VEC_MIN_BATCH", case.batch if big else case.batch + 1)
    monkeypatch.setattr(CHOICE_MODULE, "VEC_MIN_PRODUCTS", nnz * case.batch)
    picked, _ = kernels.choose(op, case.n_rows, case.n_cols, nnz, case.batch, numpy.float32)
    assert picked == ("vec" if big else "rows")
    got = _vec_product(op, a, case, method="auto")
    family = f"{op}_vec" if big else op
    assert [name for name, _, _ in launches] == [f"{family}_f32"]
    assert_same_bits(got, _vec_product(op, a, case, method="rows"))


def test_choose_is_the_written_rule():
    """"vec" from batch 64 and 2**24 products on, the defaults below; both dtypes alike."""
    for dtype in (numpy.float32, numpy.float64):
        assert kernels.choose("spmm", 4096, 4096, 1_680_000, 512, dtype) == ("vec", None)
        assert kernels.choose("spmm_t", 4096, 4096, 1_680_000, 512, dtype) == ("vec", None)
        assert kernels.choose("sddmm", 4096, 4096, 1_680_000, 512, dtype) == ("vec", None)
        assert kernels.choose("spmm", 4096, 4096, 1_680_000, 32, dtype) == ("rows", None)
        assert kernels.choose("sddmm", 4096, 4096, 1_680_000, 32, dtype) == ("warp", None)
        assert kernels.choose("spmm_t", 300, 784, 23_520, 512, dtype) == ("rows", None)
        assert kernels.choose("spmm", 1, 1, 2 ** 18, 64, dtype) == ("vec", None)
        assert kernels.choose("spmm", 1, 1, 2 ** 18 - 1, 64, dtype) == ("rows", None)
    with pytest.raises(ValueError, match=r"op must be one of \['spmm', 'spmm_t', 'sddmm'\]"):
        kernels.choose("adam", 1, 1, 1, 1, numpy.float32)
    with pytest.raises(TypeError, match="float32 or float64"):
        kernels.choose("spmm", 1, 1, 1, 1, numpy.int32)


def test_swizzle_is_checked():
    case = next(c for c in VEC_CASES if c.name == "batch_12")
    a = case.arrays(numpy.float64)
    order = kernels.row_swizzle(a["indptr"])
    with pytest.raises(ValueError, match=r"swizzle must be a contiguous int32 array of shape "
                                         rf"\({case.n_rows},\)"):
        kernels.spmm(a["indptr"], a["indices"], a["data"], a["x"], swizzle=order[:-1])
    with pytest.raises(ValueError, match="contiguous int32"):
        kernels.spmm(a["indptr"], a["indices"], a["data"], a["x"],
                     swizzle=order.astype(numpy.int64))
    with pytest.raises(ValueError, match="must be a permutation"):
        kernels.spmm(a["indptr"], a["indices"], a["data"], a["x"], swizzle=order * 0)
    with pytest.raises(ValueError, match=rf"of shape \({case.n_cols},\)"):
        kernels.spmm_t(a["indptr"], a["indices"], a["data"], a["dy"], case.n_cols,
                       swizzle=order)
    # unchecked: the permutation is taken on trust (the CPU ignores it)
    kernels.spmm(a["indptr"], a["indices"], a["data"], a["x"], swizzle=order * 0, check=False)


def test_vec_trains_on_the_fake_gpu_as_rows(monkeypatch):
    """set_spmm("vec"): a training step on the fake GPU launches the vectorised kernels,
    with the layers' swizzle orders (kept per topology), and gives the "rows" step's bits."""
    def orders_kept(model):
        orders = [layer.swizzle_orders() for layer in model.layers]
        if kernels.spmm_setting() != "vec":
            assert orders == [None, None]
            return
        again = [layer.swizzle_orders() for layer in model.layers]
        assert all(o is p for o, p in zip(orders, again))  # kept
        for layer, (rows, cols) in zip(model.layers, orders):
            assert_same_bits(rows.get(), kernels.row_swizzle(layer.indptr.get()))
            t_indptr = layer.transposed_pattern()[0]
            assert_same_bits(cols.get(), kernels.row_swizzle(t_indptr.get()))

    results = {}
    for method in ("rows", "vec"):
        (logits, _, layers), launched = _fake_gpu_step(monkeypatch, method, 8, orders_kept)
        results[method] = [logits] + [a for pair in layers for a in pair]
        vec = {"spmm_vec_f64", "spmm_t_vec_f64"}
        assert (vec <= launched) if method == "vec" else not (vec & launched)
    for got, expected in zip(results["vec"], results["rows"], strict=True):
        assert_same_bits(got, expected)


@gpu
@pytest.mark.parametrize("kernel, bias, relu", TILED_CALLS,
                         ids=["spmm", "spmm_bias_relu", "spmm_t"])
@pytest.mark.parametrize("case", CASES + [c for c in VEC_CASES if c not in CASES],
                         ids=lambda c: c.name)
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@dtype_params
def test_gpu_vec_equals_rows_bit_for_bit(kernel, bias, relu, case, misaligned, dtype):
    """On the device, "vec" gives the bits of "rows" (one summation order, the same FMA
    contraction), vector loads or not (a dense operand one element off a boundary), and
    the same bits on every call, with max_blocks=2 too."""
    d = to_gpu(fused_inputs(case, dtype))
    if misaligned:
        xp = get_backend("gpu").xp
        for name in ("x", "dy"):
            memory = xp.full(d[name].size + 1, numpy.nan, dtype=dtype)
            memory[1:] = d[name].reshape(-1)
            d[name] = memory[1:].reshape(d[name].shape)

    def run(method: str, **options: Any) -> numpy.ndarray:
        if kernel == "spmm":
            return to_numpy(kernels.spmm(d["indptr"], d["indices"], d["data"], d["x"],
                                         bias=d["bias"] if bias else None, relu=relu,
                                         method=method, **options))
        return to_numpy(kernels.spmm_t(d["indptr"], d["indices"], d["data"], d["dy"],
                                       case.n_cols, method=method, **options))

    vec = run("vec")
    assert_same_bits(vec, run("rows"))
    assert_same_bits(vec, run("vec"))
    assert_same_bits(vec, run("vec", max_blocks=2))


@gpu
@case_params
def test_gpu_row_swizzle_matches_the_cpu(case):
    a = case.arrays(numpy.float32)
    got = kernels.row_swizzle(to_gpu(a)["indptr"])
    assert got.dtype == numpy.int32
    numpy.testing.assert_array_equal(to_numpy(got), kernels.row_swizzle(a["indptr"]))


def test_layer_swizzle_orders_follow_the_topology(monkeypatch):
    """A layer's orders: None on the CPU and under "rows"; on the (fake) GPU under "vec",
    built once per pattern and built again when set_topology replaces it."""
    import cupynn

    try:
        from fake_gpu import FakeGpu
    except ModuleNotFoundError:  # tests/ became a package
        from tests.fake_gpu import FakeGpu
    monkeypatch.setattr(SPMM_MODULE._SPMM, "chosen", None)
    kernels.set_spmm("vec")
    assert cupynn.SparseLinear(5, 4, density=0.5, device="cpu").swizzle_orders() is None
    with FakeGpu() as fake:
        layer = cupynn.SparseLinear(5, 4, density=0.5, device=fake.backend, dtype="float64")
        first = layer.swizzle_orders()
        assert layer.swizzle_orders() is first
        indptr = numpy.array([0, 0, 3, 4, 4], dtype=numpy.int32)  # rows of 0, 3, 1, 0
        layer.set_topology(fake.xp.asarray(indptr),
                           fake.xp.asarray(numpy.array([0, 2, 4, 1], dtype=numpy.int32)),
                           fake.xp.zeros(4, dtype=numpy.float64))
        rows, cols = layer.swizzle_orders()
        assert rows is not first[0]
        numpy.testing.assert_array_equal(rows.get(), [1, 2, 0, 3])
        numpy.testing.assert_array_equal(cols.get(), [0, 1, 2, 4, 3])  # columns of 1, 1, 1, 0, 1
        kernels.set_spmm("rows")
        assert layer.swizzle_orders() is None

"""``kernels.sddmm`` (``sddmm.cu`` thread, warp and tiled kernels, ``cpu.sddmm``) and
``kernels.relu_grad_rowsum``: one body checks every implementation against the
twin (the twins, the Numba kernel, ``sddmm.cu`` emulated on the CPU, ``sddmm.cu`` on
a GPU); then the warp kernel's order, the choice of GPU kernel and the ReLU step,
with its buffers given (issue 19: ``out=``, ``sums=``, the ``relu_grad_rowsum``
kernel of ``sddmm.cu`` against its twin, emulated and through the GPU path);
then the tiled kernel (issue 20: ``dy`` staged in shared memory, emulated block by block);
last the vectorised kernel (issue 20, ``method="vec"``: 16-byte loads where the batch and
the operands' addresses allow, in its own order, the bits of ``numpy_twins.sddmm_vec``)
and ``method="auto"``.
"""

from __future__ import annotations

import ctypes
import importlib
import re
from typing import Callable

import numpy
import pytest

from conftest import needs_gpu
from cupynn import kernels
from cupynn.backend import get_backend, to_numpy
from cupynn.kernels import THREADS_PER_BLOCK, numpy_twins as twins
from kernel_cases import (CASES, GPU_SDDMM_CHOICES, GUARD, LAUNCHES, SDDMM_TILED_CASES,
                          SDDMM_TILED_GROUPS, SDDMM_TILED_LAUNCHES, WARP_CASES, WARP_GROUPS,
                          WARP_LAUNCHES, Case, assert_allocates_no, assert_close,
                          assert_relu_grad_rowsum, assert_same_bits, case_params, dtype_params,
                          emulated_gpu, emulated_relu_grad_rowsum, fused_inputs, gpu,
                          grid_and_block, host_library, launch_sddmm_tiled,
                          launch_sddmm_warp, sddmm_argtypes,
                          sddmm_reference, small, suffix_of, to_gpu)

try:  # tests/ is on sys.path (pytest's default rootdir-relative import)
    from cuda_host import BlockError, WarpError, launch, pointer
except ModuleNotFoundError:  # tests/ became a package
    from tests.cuda_host import BlockError, WarpError, launch, pointer

# The module that keeps the setting (kernels.sddmm is the function).
SDDMM_MODULE = importlib.import_module("cupynn.kernels.sddmm")


def _twin(a: dict, case: Case, dtype: type) -> numpy.ndarray:
    return twins.sddmm(a["indptr"], a["indices"], a["dy"], a["x"])


def _twin_warp(group: int) -> Callable:
    def run(a: dict, case: Case, dtype: type) -> numpy.ndarray:
        return twins.sddmm_warp(a["indptr"], a["indices"], a["dy"], a["x"], group)
    return run


def _numba(a: dict, case: Case, dtype: type) -> numpy.ndarray:
    return kernels.sddmm(a["indptr"], a["indices"], a["dy"], a["x"])


def _emulated_thread(config: str) -> Callable:
    """sddmm.cu's thread kernel run on the CPU one (block, thread) at a time."""
    def run(a: dict, case: Case, dtype: type) -> numpy.ndarray:
        nnz = len(a["indices"])
        out = numpy.full(nnz + GUARD, numpy.nan, dtype=dtype)
        launch(host_library("sddmm.cu"), f"sddmm_{suffix_of(dtype)}",
               *grid_and_block(config, nnz), sddmm_argtypes(dtype),
               [a["indptr"], a["indices"], a["dy"], a["x"], out, case.n_rows, nnz, case.batch])
        assert numpy.isnan(out[nnz:]).all(), "the kernel wrote past nnz"
        return out[:nnz]
    return run


def _emulated_warp(group: int, config: str) -> Callable:
    """sddmm.cu's warp kernel run on the CPU, lanes in step."""
    def run(a: dict, case: Case, dtype: type) -> numpy.ndarray:
        nnz = len(a["indices"])
        out = launch_sddmm_warp(a, case, dtype, group, *WARP_LAUNCHES[config])
        assert numpy.isnan(out[nnz:]).all(), "the kernel wrote past nnz"
        # The twin that sums in the kernel's order is within rounding of the kernel too.
        assert_close(out[:nnz], _twin_warp(group)(a, case, dtype), sddmm_reference(a)[1], dtype)
        return out[:nnz]
    return run


def _twin_tiled(group: int) -> Callable:
    def run(a: dict, case: Case, dtype: type) -> numpy.ndarray:
        return twins.sddmm_tiled(a["indptr"], a["indices"], a["dy"], a["x"], group)
    return run


def _emulated_tiled(group: int, config: str) -> Callable:
    """sddmm.cu's tiled kernel run on the CPU block by block: its twin's bits."""
    def run(a: dict, case: Case, dtype: type) -> numpy.ndarray:
        out = launch_sddmm_tiled(a, dtype, group, *SDDMM_TILED_LAUNCHES[config])
        assert_same_bits(out, twins.sddmm_tiled(a["indptr"], a["indices"], a["dy"], a["x"],
                                                group))
        return out
    return run


def _gpu(method: str, group: int | None, max_blocks: int | None) -> Callable:
    def run(a: dict, case: Case, dtype: type) -> numpy.ndarray:
        d = to_gpu(a)
        out = get_backend("gpu").xp.full(len(a["indices"]), numpy.nan, dtype=dtype)
        result = kernels.sddmm(d["indptr"], d["indices"], d["dy"], d["x"], out=out,
                               max_blocks=max_blocks, method=method, group=group)
        assert result is out
        return to_numpy(result)
    return run


CHOICE_MODULE = importlib.import_module("cupynn.kernels.choice")
VEC_WIDTH = {numpy.float32: 4, numpy.float64: 2}
# sddmm_vec (issue 20; its tests at the end of this file). Launches as (grid, block, chunk
# in steps of V * group values, or None for the dispatcher's SDDMM_TILE_CHUNK): the
# dispatcher's block on 3 blocks, blocks of two warps and one warp that stride over the
# rows with chunks of one and two steps (most batches here span several chunks, the last
# one partial).
SDDMM_VEC_LAUNCHES = {
    "dispatcher_block_grid3": ((3,), (THREADS_PER_BLOCK,), None),
    "grid2_block64_chunk1step": ((2,), (64,), 1),
    "one_warp_chunk2steps": ((1,), (32,), 2),
}
SDDMM_VEC_GROUPS = [1, 4, 16]
# The tiled kernel's cases (empty rows, an empty matrix, batch 0 and 1, batches 3, 5, 7
# and 70 that no vector width divides, long rows) and batches that 4 divides: 64 (several
# chunks of one or two steps), 40 with rows longer than a pass of one warp at group 1.
SDDMM_VEC_CASES = SDDMM_TILED_CASES + [
    Case("batch_64", 6, 9, 64, 0.5, empty_rows=(2,), seed=4),
    Case("long_rows_b40", 4, 150, 40, 0.9, empty_rows=(1,), seed=5)]


def _vec_width(dtype: type, batch: int) -> int:
    """The dispatcher's vector width for aligned operands."""
    return VEC_WIDTH[dtype] if batch % VEC_WIDTH[dtype] == 0 else 1


def sddmm_vec_argtypes(dtype: type) -> list:
    real = pointer(dtype)
    return [pointer(numpy.int32), pointer(numpy.int32), real, real, real] + [ctypes.c_int] * 5


def launch_sddmm_vec(a: dict, dtype: type, group: int, vec: int, grid, block,
                     chunk_steps: int | None, reverse: bool = False) -> numpy.ndarray:
    """The emulated sddmm_vec kernel's output for arrays ``a`` (block by block); chunks of
    ``chunk_steps * vec * group`` values (None: SDDMM_TILE_CHUNK). Guard cells stay NaN."""
    nnz = len(a["indices"])
    chunk = SDDMM_MODULE.SDDMM_TILE_CHUNK if chunk_steps is None else chunk_steps * vec * group
    out = numpy.full(nnz + GUARD, numpy.nan, dtype=dtype)
    launch(host_library("sddmm.cu"), f"sddmm_vec_{suffix_of(dtype)}", grid, block,
           sddmm_vec_argtypes(dtype),
           [a["indptr"], a["indices"], a["dy"], a["x"], out, len(a["indptr"]) - 1,
            a["dy"].shape[1], group, chunk, vec], reverse=reverse, blocks=True)
    assert numpy.isnan(out[nnz:]).all(), "the kernel wrote past nnz"
    return out[:nnz]


def _twin_vec(group: int, vec: int) -> Callable:
    def run(a: dict, case: Case, dtype: type) -> numpy.ndarray:
        return twins.sddmm_vec(a["indptr"], a["indices"], a["dy"], a["x"], group, vec)
    return run


def _emulated_vec(group: int, config: str) -> Callable:
    """sddmm.cu's vectorised kernel run on the CPU block by block, at the dtype's vector
    width where the batch allows (else 1): its twin's bits."""
    def run(a: dict, case: Case, dtype: type) -> numpy.ndarray:
        vec = _vec_width(dtype, case.batch)
        out = launch_sddmm_vec(a, dtype, group, vec, *SDDMM_VEC_LAUNCHES[config])
        assert_same_bits(out, twins.sddmm_vec(a["indptr"], a["indices"], a["dy"], a["x"],
                                              group, vec))
        return out
    return run


# name: (run(case arrays, case, dtype) -> (nnz,) NumPy result, the cases it runs, marks)
IMPLEMENTATIONS = {
    "twin": (_twin, CASES, ()),
    **{f"twin_warp{g}": (_twin_warp(g), WARP_CASES, ()) for g in WARP_GROUPS},
    "numba": (_numba, CASES, ()),
    **{f"emulated_thread-{c}": (_emulated_thread(c), CASES, ()) for c in LAUNCHES},
    **{f"emulated_warp{g}-{c}": (_emulated_warp(g, c), WARP_CASES, ())
       for g in WARP_GROUPS for c in WARP_LAUNCHES},
    **{f"twin_tiled{g}": (_twin_tiled(g), SDDMM_TILED_CASES, ()) for g in SDDMM_TILED_GROUPS},
    **{f"emulated_tiled{g}-{c}": (_emulated_tiled(g, c), SDDMM_TILED_CASES, ())
       for g in SDDMM_TILED_GROUPS for c in SDDMM_TILED_LAUNCHES},
    **{f"twin_vec{g}_{v}": (_twin_vec(g, v), SDDMM_VEC_CASES, ()) for g in SDDMM_VEC_GROUPS
       for v in (1, 2, 4)},
    **{f"emulated_vec{g}-{c}": (_emulated_vec(g, c), SDDMM_VEC_CASES, ())
       for g in SDDMM_VEC_GROUPS for c in SDDMM_VEC_LAUNCHES},
    **{f"gpu_{m}{g or ''}-{blocks}": (_gpu(m, g, max_blocks), CASES, needs_gpu)
       for m, g in GPU_SDDMM_CHOICES + [("tiles", None), ("tiles", 4), ("vec", None),
                                        ("vec", 4), ("vec", 32), ("auto", None)]
       for blocks, max_blocks in (("full_grid", None), ("max_blocks_2", 2))},
}
CALLS = [pytest.param(name, case, id=f"{name}-{case.name}", marks=marks)
         for name, (_, cases, marks) in IMPLEMENTATIONS.items() for case in cases]


@pytest.mark.parametrize("name, case", CALLS)
@dtype_params
def test_sddmm_matches_twin(name, case, dtype):
    """One body over every implementation: the twins, the Numba kernel, sddmm.cu's
    kernels emulated under several launch shapes, and sddmm.cu on a GPU."""
    a = case.arrays(dtype)
    expected, bound = sddmm_reference(a)
    assert_close(IMPLEMENTATIONS[name][0](a, case, dtype), expected, bound, dtype)


@pytest.mark.parametrize("group", [4, 32])
def test_emulated_sddmm_warp_is_order_free(group):
    """Lanes handed to their threads last to first, and blocks and warps run last to first,
    give the same bits: no lane depends on another's timing."""
    case = next(c for c in WARP_CASES if c.name == "mid")
    a = case.arrays(numpy.float32)
    grid, block = WARP_LAUNCHES["grid2_block64"]
    forward = launch_sddmm_warp(a, case, numpy.float32, group, grid, block)
    backward = launch_sddmm_warp(a, case, numpy.float32, group, grid, block, reverse=True)
    assert numpy.array_equal(forward, backward, equal_nan=True)


def test_emulated_sddmm_warp_needs_whole_warps():
    """A block of 48 threads ends in a warp of 16 lanes, whose full-mask shuffles are
    undefined on a GPU: the emulation says so instead of answering."""
    case = next(c for c in WARP_CASES if c.name == "grid_stride")
    with pytest.raises(WarpError, match="have returned or are not part of the launch"):
        launch_sddmm_warp(case.arrays(numpy.float64), case, numpy.float64, 8, (1,), (48,))


@pytest.mark.parametrize("group", WARP_GROUPS)
@pytest.mark.parametrize("batch", [1, 7, 33])
def test_twin_sddmm_warp_matches_sddmm(group, batch):
    """The order-faithful twin computes the same products (batches shorter than a group,
    and not a multiple of it, included)."""
    case = Case("twin", 30, 40, batch, 0.2, empty_rows=(3,))
    a = case.arrays(numpy.float64)
    expected, bound = sddmm_reference(a)
    got = twins.sddmm_warp(a["indptr"], a["indices"], a["dy"], a["x"], group)
    assert_close(got, expected, bound, numpy.float64)


@dtype_params
def test_cpu_sddmm_fills_the_given_out(dtype):
    a = next(c for c in CASES if c.name == "empty_rows").arrays(dtype)
    out = numpy.full(len(a["indices"]), numpy.nan, dtype=dtype)
    result = kernels.sddmm(a["indptr"], a["indices"], a["dy"], a["x"], out=out)
    assert result is out
    expected, bound = sddmm_reference(a)
    assert_close(out, expected, bound, dtype)


@pytest.mark.parametrize("method, group", [("thread", None), ("warp", None), ("warp", 4),
                                           ("tiles", None), ("tiles", 16), ("vec", None),
                                           ("vec", 8), ("auto", None)])
def test_cpu_sddmm_takes_every_method(method, group):
    """The CPU has one kernel: any valid GPU choice gives the same result there."""
    a = next(c for c in CASES if c.name == "grid_stride").arrays(numpy.float64)
    expected, bound = sddmm_reference(a)
    got = kernels.sddmm(a["indptr"], a["indices"], a["dy"], a["x"], method=method, group=group)
    assert_close(got, expected, bound, numpy.float64)


@pytest.mark.parametrize("batch, group", [(1, 8), (64, 8), (65, 16), (128, 16), (256, 16),
                                          (512, 16), (100_000, 16)])
def test_sddmm_group_gives_lanes_about_eight_products(batch, group):
    assert kernels.sddmm_group(batch) == group


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="block"), r"must be one of \['thread', 'warp', 'tiles', 'vec', 'auto'\]. "
                           r"Got 'block'"),
    (dict(method="warp", group=3), r"power of two in \[1, 32\]. Got 3"),
    (dict(method="warp", group=64), r"power of two in \[1, 32\]. Got 64"),
    (dict(method="warp", group=True), r"power of two in \[1, 32\]. Got True"),
    (dict(method="thread", group=8), "goes with method 'warp', 'tiles', 'vec' or 'auto'"),
    (dict(method="tiles", group=3), r"power of two in \[1, 32\]. Got 3"),
    (dict(method="vec", group=64), r"power of two in \[1, 32\]. Got 64"),
])
def test_sddmm_rejects_bad_choices(small, kwargs, message):
    with pytest.raises(ValueError, match=message):
        kernels.sddmm(small["indptr"], small["indices"], small["dy"], small["x"], **kwargs)
    with pytest.raises(ValueError, match=message):
        kernels.set_sddmm(**kwargs)


@pytest.mark.parametrize("text, expected", [("", ("warp", None)), ("thread", ("thread", None)),
                                            ("warp", ("warp", None)), ("warp:16", ("warp", 16)),
                                            ("tiles", ("tiles", None)),
                                            ("tiles:8", ("tiles", 8)), ("vec", ("vec", None)),
                                            ("vec:4", ("vec", 4)), ("auto", ("auto", None))])
def test_sddmm_default_comes_from_the_environment(monkeypatch, text, expected):
    monkeypatch.setenv(kernels.SDDMM_ENV, text)
    monkeypatch.setattr(SDDMM_MODULE, "_SDDMM_DEFAULT", [])
    assert kernels.sddmm_setting() == expected
    kernels.set_sddmm("thread")
    assert kernels.sddmm_setting() == ("thread", None)


@pytest.mark.parametrize("text, message", [("warp:x", "with ':<group>' \\('warp:16'\\). "
                                                     "Got 'warp:x'"),
                                           ("warp:12", r"power of two in \[1, 32\]. Got 12"),
                                           ("thread:4", "goes with method 'warp', 'tiles'"),
                                           ("fast", r"must be one of \['thread', 'warp', "
                                                    r"'tiles', 'vec', 'auto'\]")])
def test_sddmm_environment_is_checked(monkeypatch, text, message):
    monkeypatch.setenv(kernels.SDDMM_ENV, text)
    monkeypatch.setattr(SDDMM_MODULE, "_SDDMM_DEFAULT", [])
    with pytest.raises(ValueError, match=message):
        kernels.sddmm_setting()


@pytest.mark.parametrize("on_gpu", [False, pytest.param(True, marks=needs_gpu)],
                         ids=["numba", "gpu"])
@case_params
@dtype_params
def test_relu_grad_rowsum(on_gpu, case, dtype):
    a = fused_inputs(case, dtype)
    assert_relu_grad_rowsum(to_gpu(a) if on_gpu else a, to_numpy, dtype)


@gpu
@pytest.mark.parametrize("group", [4, 32])
def test_gpu_sddmm_warp_runs_the_emulated_kernel(group):
    """The GPU and the CPU emulation of sddmm_warp, on the same launch, sum in one order."""
    case = next(c for c in WARP_CASES if c.name == "mid")
    a = case.arrays(numpy.float64)
    emulated = launch_sddmm_warp(a, case, numpy.float64, group, (2,), (THREADS_PER_BLOCK,))
    d = to_gpu(a)
    got = to_numpy(kernels.sddmm(d["indptr"], d["indices"], d["dy"], d["x"], max_blocks=2,
                                 method="warp", group=group))
    expected, bound = sddmm_reference(a)
    assert_close(got, expected, bound, numpy.float64)
    assert_close(got, emulated[:len(got)], bound, numpy.float64)


# --- relu_grad_rowsum with given buffers, and its kernel (issue 19) ------------------


RELU_CASES = [c for c in WARP_CASES if c.name != "mid"] + [
    Case("batch_70", 5, 3, 70, 0.5)]  # a batch over two warps' widths, not a multiple
relu_case_params = pytest.mark.parametrize("case", RELU_CASES, ids=lambda c: c.name)
# (y given, in place): with and without the ReLU, into a new array and over dy.
RELU_MODES = [(True, False), (False, False), (True, True), (False, True)]
relu_mode_params = pytest.mark.parametrize("relu, in_place", RELU_MODES,
                                           ids=["relu", "no_relu", "relu_in_place",
                                                "no_relu_in_place"])


@relu_mode_params
@pytest.mark.parametrize("config", list(WARP_LAUNCHES))
@relu_case_params
@dtype_params
def test_emulated_relu_grad_rowsum_is_its_twin(relu, in_place, config, case, dtype):
    """sddmm.cu's relu_grad_rowsum on the CPU, under launches with more warps than
    rows and fewer: the twin's bits (the same products, the same summation order),
    NaN, -0.0 and dead units included."""
    a = fused_inputs(case, dtype)
    y = a["y"] if relu else None
    out, sums = emulated_relu_grad_rowsum(a["dy"], y, *WARP_LAUNCHES[config], in_place=in_place)
    expected_out, expected_sums = twins.relu_grad_rowsum(a["dy"], y)
    assert_same_bits(out, expected_out)
    assert_same_bits(sums, expected_sums)


def test_emulated_relu_grad_rowsum_does_not_depend_on_thread_order():
    case = next(c for c in RELU_CASES if c.name == "grid_stride")
    a = fused_inputs(case, numpy.float32)
    grid, block = WARP_LAUNCHES["grid2_block64"]
    forward = emulated_relu_grad_rowsum(a["dy"], a["y"], grid, block)
    backward = emulated_relu_grad_rowsum(a["dy"], a["y"], grid, block, reverse=True)
    for f, b in zip(forward, backward):
        assert_same_bits(f, b)


@pytest.mark.parametrize("batch", [0, 1, 31, 32, 33, 100])
def test_twin_relu_grad_rowsum_sums_the_rows(batch):
    """The order-faithful twin is within rounding of a plain sum (NaN-free input)."""
    rng = numpy.random.default_rng(batch)
    dy, y = rng.standard_normal((7, batch)), rng.standard_normal((7, batch))
    out, sums = twins.relu_grad_rowsum(dy, y)
    numpy.testing.assert_array_equal(out, dy * (y > 0))
    assert_close(sums, out.sum(axis=1), numpy.abs(out).sum(axis=1), numpy.float64)


def _given(dy: numpy.ndarray, in_place: bool) -> tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]:
    """(dy to pass, out, sums): NaN-filled buffers, or out = a copy of dy written over."""
    source = dy.copy()
    out = source if in_place else numpy.full_like(dy, numpy.nan)
    return source, out, numpy.full(dy.shape[0], numpy.nan, dtype=dy.dtype)


@relu_mode_params
@case_params
@dtype_params
def test_cpu_relu_grad_rowsum_fills_the_given_buffers(relu, in_place, case, dtype):
    """out= and sums= on the CPU: the allocating call's bits, dy itself as out included.
    (The Numba kernel's sums may round differently in place, where LLVM vectorises
    another loop, so each is compared with the allocating call of its own kind.)"""
    a = fused_inputs(case, dtype)
    y = a["y"] if relu else None
    expected = kernels.relu_grad_rowsum(a["dy"].copy(), y, in_place=in_place)
    dy, out, sums = _given(a["dy"], in_place)
    got = kernels.relu_grad_rowsum(dy, y, out=out, sums=sums, in_place=in_place)
    assert got[0] is out and got[1] is sums
    assert_same_bits(out, expected[0])
    assert_same_bits(sums, expected[1])


@relu_mode_params
@pytest.mark.parametrize("max_blocks", [None, 1])
@relu_case_params
@dtype_params
def test_emulated_gpu_relu_grad_rowsum_runs_the_kernel(relu, in_place, max_blocks, case, dtype,
                                                       monkeypatch):
    """The GPU path with sums given: one launch of the kernel (emulated), the twin's bits
    in the given buffers; without sums, CuPy's operations as before (no kernel)."""
    launches = emulated_gpu(monkeypatch, SDDMM_MODULE, "sddmm.cu")
    a = fused_inputs(case, dtype)
    y = a["y"] if relu else None
    dy, out, sums = _given(a["dy"], in_place)
    got = kernels.relu_grad_rowsum(dy, y, out=out, sums=sums, in_place=in_place,
                                   max_blocks=max_blocks)
    assert got[0] is out and got[1] is sums
    expected_out, expected_sums = twins.relu_grad_rowsum(a["dy"], y)
    assert_same_bits(out, expected_out)
    assert_same_bits(sums, expected_sums)
    assert [name for name, _, _ in launches] == (
        [f"relu_grad_rowsum_{suffix_of(dtype)}"] if case.n_rows else [])
    if max_blocks is not None and launches:
        assert launches[0][1] == (1,)
    # Without sums: no launch; the results of dy * (y > 0) and a reduction.
    default_out, default_sums = kernels.relu_grad_rowsum(a["dy"].copy(), y)
    assert len(launches) == (1 if case.n_rows else 0)
    assert_same_bits(default_out, expected_out)
    assert_close(default_sums, expected_sums, numpy.abs(expected_out).sum(axis=1), dtype)


@gpu
@relu_mode_params
@relu_case_params
@dtype_params
def test_gpu_relu_grad_rowsum_kernel_is_its_twin(relu, in_place, case, dtype):
    a = fused_inputs(case, dtype)
    y = a["y"] if relu else None
    d = to_gpu(a)
    xp = get_backend("gpu").xp
    dy = d["dy"].copy()
    out = dy if in_place else xp.full_like(dy, numpy.nan)
    sums = xp.full(dy.shape[0], numpy.nan, dtype=dtype)
    got = kernels.relu_grad_rowsum(dy, d["y"] if relu else None, out=out, sums=sums,
                                   in_place=in_place)
    assert got[0] is out and got[1] is sums
    expected_out, expected_sums = twins.relu_grad_rowsum(a["dy"], y)
    assert_same_bits(out, expected_out)
    assert_same_bits(sums, expected_sums)


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@dtype_params
def test_cpu_relu_grad_rowsum_allocates_nothing(relu, dtype):
    """With out and sums given, the CPU step allocates no NumPy array (tracemalloc)."""
    a = fused_inputs(Case("layer", 4096, 4, 64, 0.1), dtype)  # sums of 16 KiB or more
    y = a["y"] if relu else None
    out, sums = numpy.empty_like(a["dy"]), numpy.empty(4096, dtype=dtype)
    assert_allocates_no(sums.nbytes, lambda: kernels.relu_grad_rowsum(a["dy"], y, out=out,
                                                                      sums=sums))
    assert_allocates_no(sums.nbytes, lambda: kernels.relu_grad_rowsum(
        out, y, out=out, sums=sums, in_place=True))


def test_relu_grad_rowsum_checks_its_buffers():
    a = fused_inputs(CASES[0], numpy.float64)
    dy, y = a["dy"], a["y"]
    n_rows = dy.shape[0]
    with pytest.raises(ValueError, match="in_place=True writes over dy; out must be dy"):
        kernels.relu_grad_rowsum(dy, y, in_place=True, out=numpy.empty_like(dy))
    with pytest.raises(ValueError, match=r"out must be a C-contiguous array of shape"):
        kernels.relu_grad_rowsum(dy, y, out=numpy.empty(dy.shape[::-1]).T)
    with pytest.raises(ValueError, match=rf"out must be a C-contiguous array of shape "
                                         rf"\({n_rows},\). Got shape \({n_rows + 1},\)"):
        kernels.relu_grad_rowsum(dy, y, sums=numpy.empty(n_rows + 1))
    with pytest.raises(TypeError, match="all float arrays must have one dtype"):
        kernels.relu_grad_rowsum(dy, y, sums=numpy.empty(n_rows, dtype=numpy.float32))
    with pytest.raises(ValueError, match="out must not overlap y"):
        kernels.relu_grad_rowsum(dy, y, out=y)
    with pytest.raises(ValueError, match="sums must not overlap dy"):
        kernels.relu_grad_rowsum(dy, y, sums=dy[0, :n_rows] if dy.shape[1] >= n_rows
                                 else dy.reshape(-1)[:n_rows])


def test_relu_grad_setting_runs_the_kernel_without_sums(monkeypatch):
    """CUPYNN_RELU_GRAD=kernel: the eager layers' call (no ``sums``) takes the kernel on
    the GPU (here the fake device), with the twin's bits; "arrays" stays CuPy's."""
    from fake_gpu import FakeGpu

    sddmm_module = importlib.import_module("cupynn.kernels.sddmm")
    monkeypatch.setattr(sddmm_module._RELU_GRAD, "chosen", None)
    monkeypatch.setenv("CUPYNN_RELU_GRAD", "kernel")
    assert kernels.relu_grad_setting() == "kernel"
    rng = numpy.random.default_rng(3)
    dy, y = rng.standard_normal((5, 37)), numpy.maximum(rng.standard_normal((5, 37)), 0)
    expected = twins.relu_grad_rowsum(dy, y)
    with FakeGpu() as fake:
        out, sums = kernels.relu_grad_rowsum(fake.asarray(dy), fake.asarray(y))
        assert fake.launches == ["relu_grad_rowsum_f64"]
        assert numpy.array_equal(out.get(), expected[0])
        assert numpy.array_equal(sums.get(), expected[1])
        kernels.set_relu_grad("arrays")
        kernels.relu_grad_rowsum(fake.asarray(dy), fake.asarray(y))
        assert fake.launches == ["relu_grad_rowsum_f64"]  # no kernel: CuPy's operations
    with pytest.raises(ValueError, match=r"\(set_relu_grad\) must be one of \['arrays', "
                                         r"'kernel'\]"):
        kernels.set_relu_grad("fused")


# --- the tiled SDDMM (issue 20) ------------------------------------------------------


def _tiled_case(name: str) -> Case:
    return next(c for c in SDDMM_TILED_CASES if c.name == name)


@pytest.mark.parametrize("group", [2, 8])
@pytest.mark.parametrize("config", list(SDDMM_TILED_LAUNCHES))
def test_emulated_sddmm_tiled_has_the_warp_kernels_bits(group, config):
    """dy read from the shared tile instead of global memory changes no bit: the tiled
    kernel's output is the emulated warp kernel's at the same group, whatever the chunk."""
    case = _tiled_case("batch_70")
    a = case.arrays(numpy.float32)
    tiled = launch_sddmm_tiled(a, numpy.float32, group, *SDDMM_TILED_LAUNCHES[config])
    warp = launch_sddmm_warp(a, case, numpy.float32, group, (2,), (64,))
    assert_same_bits(tiled, warp[:len(tiled)])


@pytest.mark.parametrize("config", ["grid2_block64_chunk32", "one_warp_chunk16"])
def test_emulated_sddmm_tiled_is_order_free(config):
    """Blocks, and the threads of each block, run last to first: the same bits. A missing
    barrier would let a thread read the tile's 0xff (NaN) cells in one of the two orders."""
    a = _tiled_case("long_rows").arrays(numpy.float64)
    forward = launch_sddmm_tiled(a, numpy.float64, 4, *SDDMM_TILED_LAUNCHES[config])
    backward = launch_sddmm_tiled(a, numpy.float64, 4, *SDDMM_TILED_LAUNCHES[config],
                                  reverse=True)
    assert_same_bits(forward, backward)
    assert not numpy.isnan(forward).any()


def test_emulated_sddmm_tiled_needs_whole_warps():
    """A block of 48 threads ends in a warp of 16 lanes: its full-mask shuffles are
    undefined on a GPU, and the emulation says so."""
    a = _tiled_case("batch_1").arrays(numpy.float64)
    with pytest.raises((WarpError, BlockError), match="returned or are not part of the launch"):
        launch_sddmm_tiled(a, numpy.float64, 8, (1,), (48,), 16)


@pytest.mark.parametrize("case", [_tiled_case(n) for n in ("empty_rows", "batch_70", "no_rows",
                                                             "batch_0")], ids=lambda c: c.name)
@pytest.mark.parametrize("max_blocks", [None, 2])
@dtype_params
def test_emulated_gpu_sddmm_tiles_fills_out(case, max_blocks, dtype, monkeypatch):
    """The dispatcher's GPU path for "tiles" (the kernel emulated): one launch of
    sddmm_tiled on its launch shape, the twin's bits written into the given out."""
    launches = emulated_gpu(monkeypatch, SDDMM_MODULE, "sddmm.cu")
    a = case.arrays(dtype)
    nnz = len(a["indices"])
    out = numpy.full(nnz, numpy.nan, dtype=dtype)
    got = kernels.sddmm(a["indptr"], a["indices"], a["dy"], a["x"], out=out, method="tiles",
                        max_blocks=max_blocks)
    assert got is out
    group = kernels.sddmm_group(case.batch)
    if nnz and case.batch:
        assert launches == [(f"sddmm_tiled_{suffix_of(dtype)}",
                             *SDDMM_MODULE._sddmm_tiles_launch(case.n_rows, max_blocks))]
        assert_same_bits(out, twins.sddmm_tiled(a["indptr"], a["indices"], a["dy"], a["x"],
                                                group))
    else:
        assert launches == []
        assert_same_bits(out, numpy.zeros(nnz, dtype=dtype))


@pytest.mark.parametrize("n_rows, max_blocks, grid", [(1, None, 1), (300, None, 300),
                                                      (100_000, None, 65535), (300, 2, 2)])
def test_sddmm_tiles_launch_shape(n_rows, max_blocks, grid):
    """A block per row of the pattern, whole warps, at most MAX_BLOCKS (or max_blocks)."""
    assert SDDMM_MODULE._sddmm_tiles_launch(n_rows, max_blocks) == ((grid,), (THREADS_PER_BLOCK,))
    assert THREADS_PER_BLOCK % kernels.WARP_SIZE == 0
    assert SDDMM_MODULE.SDDMM_TILE_CHUNK % kernels.WARP_SIZE == 0  # a multiple of every group


def test_sddmm_tile_chunk_is_the_kernels_tile():
    """The wrapper's chunk fits the kernel's static tile (SDDMM_TILE_MAX)."""
    text = (kernels.KERNEL_DIR / "sddmm.cu").read_text()
    tile = int(re.search(r"#define SDDMM_TILE_MAX (\d+)", text).group(1))
    assert SDDMM_MODULE.SDDMM_TILE_CHUNK <= tile


def _fake_gpu_steps(monkeypatch, methods, batch):
    """A forward/backward/Adam step of a small MLP on the fake GPU per SDDMM method:
    {method: (gradients, weights)} on the host, and asserts each launched its kernel."""
    import cupynn
    from fake_gpu import FakeGpu

    monkeypatch.setattr(SDDMM_MODULE, "_SDDMM_DEFAULT", [])
    monkeypatch.delenv(kernels.SDDMM_ENV, raising=False)
    rng = numpy.random.default_rng(5)
    x = rng.standard_normal((batch, 6))
    labels = rng.integers(0, 3, batch)
    kernel = {"warp": "warp", "tiles": "tiled", "vec": "vec"}
    results = {}
    with FakeGpu() as fake:
        for method in methods:
            kernels.set_sddmm(method)
            model = cupynn.MLP([6, 8, 3], density=0.5, device=fake.backend, dtype="float64",
                               seed=2)
            optimizer = cupynn.Adam(model, lr=1e-2)
            start = len(fake.launches)
            _, grad = cupynn.losses.cross_entropy(model.forward(x), fake.xp.asarray(labels))
            model.backward(grad, need_input_grad=False)
            optimizer.step()
            results[method] = ([layer.grad_data.get() for layer in model.layers],
                               [layer.data.get() for layer in model.layers])
            assert f"sddmm_{kernel[method]}_f64" in fake.launches[start:]
    return results


def test_fake_gpu_training_step_with_tiles_matches_the_default(monkeypatch):
    """set_sddmm("tiles") on the fake GPU: a forward/backward/Adam step launches the tiled
    kernel and gives the default (warp) step's weights within rounding (here the same bits:
    the tiled sums are the warp kernel's)."""
    results = _fake_gpu_steps(monkeypatch, ("warp", "tiles"), 10)
    warp_arrays = results["warp"][0] + results["warp"][1]
    tiles_arrays = results["tiles"][0] + results["tiles"][1]
    for warp, tiles in zip(warp_arrays, tiles_arrays, strict=True):
        numpy.testing.assert_allclose(tiles, warp, rtol=1e-12, atol=1e-14)


@gpu
@pytest.mark.parametrize("group", [None, 4])
@pytest.mark.parametrize("case", SDDMM_TILED_CASES + [next(c for c in CASES if c.name == "large")],
                         ids=lambda c: c.name)
@dtype_params
def test_gpu_sddmm_tiles_is_the_warp_kernel(group, case, dtype):
    """On a GPU the tiled kernel sums each nonzero as the warp kernel does (the same
    group): the same bits (both contract a[j] * b[j] + acc alike), and the twin's values."""
    a = case.arrays(dtype)
    d = to_gpu(a)
    tiles = to_numpy(kernels.sddmm(d["indptr"], d["indices"], d["dy"], d["x"], method="tiles",
                                   group=group))
    warp = to_numpy(kernels.sddmm(d["indptr"], d["indices"], d["dy"], d["x"], method="warp",
                                  group=group))
    assert_same_bits(tiles, warp)
    expected, bound = sddmm_reference(a)
    assert_close(tiles, expected, bound, dtype)


# --- the vectorised SDDMM (issue 20): method="vec" ------------------------------------

def test_sddmm_vec_cases_cover_what_they_claim():
    for dtype, width in VEC_WIDTH.items():
        assert any(c.batch and c.batch % width == 0 for c in SDDMM_VEC_CASES)
        assert any(c.batch % width for c in SDDMM_VEC_CASES)
    assert SDDMM_MODULE.SDDMM_TILE_CHUNK % (4 * kernels.WARP_SIZE) == 0  # every V * group


@pytest.mark.parametrize("group", SDDMM_VEC_GROUPS)
@pytest.mark.parametrize("config", list(SDDMM_VEC_LAUNCHES))
@pytest.mark.parametrize("case", SDDMM_VEC_CASES, ids=lambda c: c.name)
def test_emulated_sddmm_vec_with_one_lane_width_is_the_tiled_kernel(group, config, case):
    """V = 1 (what a batch no width divides, or a misaligned operand, gets): the tiled
    kernel's order, so its bits (and the warp kernel's)."""
    a = case.arrays(numpy.float32)
    vec = launch_sddmm_vec(a, numpy.float32, group, 1, *SDDMM_VEC_LAUNCHES[config])
    assert_same_bits(vec, twins.sddmm_tiled(a["indptr"], a["indices"], a["dy"], a["x"], group))


@pytest.mark.parametrize("group, vec", [(1, 4), (4, 2), (16, 4), (2, 1)])
@pytest.mark.parametrize("config", ["grid2_block64_chunk1step", "one_warp_chunk2steps"])
def test_emulated_sddmm_vec_is_order_free(group, vec, config):
    """Blocks, and the threads of each block, run last to first: the same bits (a missing
    barrier would let a thread read the tile's 0xff (NaN) cells in one of the two orders)."""
    a = next(c for c in SDDMM_VEC_CASES if c.name == "long_rows_b40").arrays(numpy.float64)
    forward = launch_sddmm_vec(a, numpy.float64, group, vec, *SDDMM_VEC_LAUNCHES[config])
    backward = launch_sddmm_vec(a, numpy.float64, group, vec, *SDDMM_VEC_LAUNCHES[config],
                                reverse=True)
    assert_same_bits(forward, backward)
    assert not numpy.isnan(forward).any()


@pytest.mark.parametrize("group", [1, 2, 8])
@pytest.mark.parametrize("vec", [1, 2, 4])
@pytest.mark.parametrize("batch", [1, 8, 12, 33])
def test_twin_sddmm_vec_sums_in_its_order(group, vec, batch):
    """The twin against a plain loop of the documented order: lane s adds, from 0, the
    products at j with (j // vec) % group == s in increasing j; then the butterfly."""
    case = Case("twin", 7, 9, batch, 0.5, empty_rows=(3,))
    a = case.arrays(numpy.float32)
    rows = twins.csr_rows(a["indptr"])
    expected = numpy.empty(len(a["indices"]), dtype=numpy.float32)
    for k, (r, c) in enumerate(zip(rows, a["indices"])):
        lanes = [numpy.float32(0)] * group
        for j in range(batch):
            s = (j // vec) % group
            lanes[s] = numpy.float32(lanes[s] + a["dy"][r, j] * a["x"][c, j])
        offset = group // 2
        while offset:
            lanes = [numpy.float32(lanes[i] + lanes[i ^ offset]) for i in range(group)]
            offset //= 2
        expected[k] = lanes[0]
    assert_same_bits(twins.sddmm_vec(a["indptr"], a["indices"], a["dy"], a["x"], group, vec),
                     expected)


def _off_by_one(array: numpy.ndarray) -> numpy.ndarray:
    """A C-contiguous copy of ``array`` starting one element past a 16-byte boundary."""
    memory = numpy.full(array.size + 1, numpy.nan, dtype=array.dtype)
    view = memory[1:].reshape(array.shape)
    view[...] = array
    assert view.ctypes.data % 16 or not view.size
    return view


@pytest.mark.parametrize("where", ["aligned", "dy_off_by_one", "x_off_by_one"])
@pytest.mark.parametrize("case", [c for c in SDDMM_VEC_CASES
                                  if c.name in ("batch_64", "batch_70", "empty_rows", "batch_0")],
                         ids=lambda c: c.name)
@pytest.mark.parametrize("max_blocks", [None, 2])
@dtype_params
def test_emulated_gpu_sddmm_vec_fills_out(where, case, max_blocks, dtype, monkeypatch):
    """The dispatcher's GPU path for "vec" (the kernel emulated): one launch of sddmm_vec
    on the tiled kernel's launch shape, at the dtype's vector width when the batch allows
    and dy and x are 16-byte aligned, else 1 (a view one element off a boundary); the
    twin's bits of that width written into the given out."""
    launches = emulated_gpu(monkeypatch, SDDMM_MODULE, "sddmm.cu")
    widths = []

    def width(*args):
        widths.append(kernels.vector_width(*args))
        return widths[-1]

    monkeypatch.setattr(SDDMM_MODULE, "vector_width", width)
    a = case.arrays(dtype)
    if where != "aligned":
        name = where.split("_")[0]
        a[name] = _off_by_one(a[name])
    nnz = len(a["indices"])
    out = numpy.full(nnz, numpy.nan, dtype=dtype)
    got = kernels.sddmm(a["indptr"], a["indices"], a["dy"], a["x"], out=out, method="vec",
                        max_blocks=max_blocks)
    assert got is out
    group = kernels.sddmm_group(case.batch)
    if nnz and case.batch:
        vec = _vec_width(dtype, case.batch) if where == "aligned" else 1
        assert widths == [vec]
        assert launches == [(f"sddmm_vec_{suffix_of(dtype)}",
                             *SDDMM_MODULE._sddmm_tiles_launch(case.n_rows, max_blocks))]
        assert_same_bits(out, twins.sddmm_vec(a["indptr"], a["indices"], a["dy"], a["x"],
                                              group, vec))
    else:
        assert launches == []
        assert_same_bits(out, numpy.zeros(nnz, dtype=dtype))


@pytest.mark.parametrize("big", [False, True])
def test_emulated_gpu_sddmm_auto_runs_what_choose_picks(big, monkeypatch):
    """method="auto" launches the kernel of choose("sddmm", shape): "vec" past the
    thresholds (lowered here to the case's size), "warp" below them."""
    launches = emulated_gpu(monkeypatch, SDDMM_MODULE, "sddmm.cu")
    case = next(c for c in SDDMM_VEC_CASES if c.name == "batch_64")
    a = case.arrays(numpy.float32)
    nnz = len(a["indices"])
    monkeypatch.setattr(CHOICE_MODULE, "VEC_MIN_BATCH", case.batch)
    monkeypatch.setattr(CHOICE_MODULE, "VEC_MIN_PRODUCTS",
                        nnz * case.batch if big else nnz * case.batch + 1)
    picked = kernels.choose("sddmm", case.n_rows, case.n_cols, nnz, case.batch, numpy.float32)
    assert picked == ("vec" if big else "warp", None)
    got = kernels.sddmm(a["indptr"], a["indices"], a["dy"], a["x"], method="auto")
    assert [name for name, _, _ in launches] == [f"sddmm_{picked[0]}_f32"]
    group = kernels.sddmm_group(case.batch)
    twin = (twins.sddmm_vec(a["indptr"], a["indices"], a["dy"], a["x"], group, 4) if big
            else twins.sddmm_warp(a["indptr"], a["indices"], a["dy"], a["x"], group))
    assert_close(got, twin, sddmm_reference(a)[1], numpy.float32)
    if big:
        assert_same_bits(got, twin)


def test_fake_gpu_training_step_with_vec_matches_the_default(monkeypatch):
    """set_sddmm("vec") on the fake GPU: a forward/backward/Adam step launches the
    vectorised kernel and gives the default (warp) step's gradients within rounding."""
    results = _fake_gpu_steps(monkeypatch, ("warp", "vec"), 12)
    for warp, vec in zip(results["warp"][0], results["vec"][0], strict=True):
        numpy.testing.assert_allclose(vec, warp, rtol=1e-12, atol=1e-14)


@gpu
@pytest.mark.parametrize("group", [None, 4])
@pytest.mark.parametrize("case", SDDMM_VEC_CASES + [next(c for c in CASES if c.name == "large")],
                         ids=lambda c: c.name)
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@dtype_params
def test_gpu_sddmm_vec_repeats_and_has_the_twins_values(group, case, misaligned, dtype):
    """On a GPU "vec" gives the same bits on every call and for any grid, the twin's values
    within rounding (the GPU contracts to FMAs), and with a misaligned operand (V = 1) the
    bits of the tiled kernel at the same group (the same order and contraction)."""
    a = case.arrays(dtype)
    d = to_gpu(a)
    xp = get_backend("gpu").xp
    if misaligned:
        memory = xp.full(d["x"].size + 1, numpy.nan, dtype=dtype)
        memory[1:] = d["x"].reshape(-1)
        d["x"] = memory[1:].reshape(d["x"].shape)

    def run(method: str, **options) -> numpy.ndarray:
        return to_numpy(kernels.sddmm(d["indptr"], d["indices"], d["dy"], d["x"], method=method,
                                      group=group, **options))

    vec = run("vec")
    assert_same_bits(vec, run("vec"))
    assert_same_bits(vec, run("vec", max_blocks=2))
    expected, bound = sddmm_reference(a)
    assert_close(vec, expected, bound, dtype)
    if misaligned or case.batch % VEC_WIDTH[dtype]:
        assert_same_bits(vec, run("tiles"))


@pytest.mark.parametrize("method", ["vec", "auto"])
def test_a_captured_graph_step_runs_sddmm_vec(method, monkeypatch):
    """set_sddmm("vec") (and "auto" with its thresholds lowered) with set_spmm("vec"): the
    graph step's capture holds only kernels (the vector width is read from the buffers'
    addresses on the host, nothing is allocated or synchronised), launches sddmm_vec, and
    its replay is the eager step bit for bit. Its products stay spmm.cu's "rows", which it
    names."""
    import cupynn
    from cupynn.graph import GraphStep
    from fake_gpu import FakeGpu

    spmm_module = importlib.import_module("cupynn.kernels.spmm")
    monkeypatch.setattr(SDDMM_MODULE, "_SDDMM_DEFAULT", [])
    monkeypatch.setattr(spmm_module._SPMM, "chosen", None)
    monkeypatch.setattr(CHOICE_MODULE, "VEC_MIN_BATCH", 1)
    monkeypatch.setattr(CHOICE_MODULE, "VEC_MIN_PRODUCTS", 1)
    kernels.set_sddmm(method)
    kernels.set_spmm("vec")
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((16, 6))
    y = rng.integers(0, 3, 16)
    runs = []
    with FakeGpu() as fake:
        for capture in (True, False):
            model = cupynn.MLP([6, 8, 3], density=0.5, seed=4, dtype="float64",
                               device=fake.backend)
            optimizer = cupynn.Adam(model, lr=1e-2)
            step = GraphStep(model, optimizer, "cross_entropy", batch_size=8, capture=capture)
            step.begin_epoch(x, y, numpy.arange(len(x)), 2)
            start = len(fake.launches)
            step.step(8)
            step.step(8)
            launched = fake.launches[start:]
            if capture:
                graph = step._buffers[8].graph
                assert graph.host_ops == []
                assert graph.allocations.larger_than(256) == []
                launched = graph.launches
            assert "sddmm_vec_f64" in launched
            assert not any(name.startswith(("spmm_vec", "spmm_t_vec")) for name in launched)
            runs.append(([a.get().copy() for layer in model.layers
                          for a in (layer.data, layer.bias)], step.epoch_losses()))
    (graph_arrays, graph_losses), (eager_arrays, eager_losses) = runs
    for a, b in zip(graph_arrays + [graph_losses], eager_arrays + [eager_losses], strict=True):
        assert numpy.array_equal(a, b)
    assert numpy.isfinite(graph_losses).all()

"""``kernels.sddmm`` (``sddmm.cu`` thread and warp kernels, ``cpu.sddmm``) and
``kernels.relu_grad_rowsum``: one body checks every implementation against the
twin (the twins, the Numba kernel, ``sddmm.cu`` emulated on the CPU, ``sddmm.cu`` on
a GPU); then the warp kernel's order, the choice of GPU kernel and the ReLU step.
"""

from __future__ import annotations

import importlib
from typing import Callable

import numpy
import pytest

from conftest import needs_gpu
from cupynn import kernels
from cupynn.backend import get_backend, to_numpy
from cupynn.kernels import THREADS_PER_BLOCK, numpy_twins as twins
from kernel_cases import (CASES, GPU_SDDMM_CHOICES, GUARD, LAUNCHES, WARP_CASES, WARP_GROUPS,
                          WARP_LAUNCHES, Case, assert_close, assert_relu_grad_rowsum, case_params,
                          dtype_params, fused_inputs, gpu, grid_and_block, host_library,
                          launch_sddmm_warp, sddmm_argtypes, sddmm_reference, small, suffix_of,
                          to_gpu)

try:  # tests/ is on sys.path (pytest's default rootdir-relative import)
    from cuda_host import WarpError, launch
except ModuleNotFoundError:  # tests/ became a package
    from tests.cuda_host import WarpError, launch

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


def _gpu(method: str, group: int | None, max_blocks: int | None) -> Callable:
    def run(a: dict, case: Case, dtype: type) -> numpy.ndarray:
        d = to_gpu(a)
        out = get_backend("gpu").xp.full(len(a["indices"]), numpy.nan, dtype=dtype)
        result = kernels.sddmm(d["indptr"], d["indices"], d["dy"], d["x"], out=out,
                               max_blocks=max_blocks, method=method, group=group)
        assert result is out
        return to_numpy(result)
    return run


# name: (run(case arrays, case, dtype) -> (nnz,) NumPy result, the cases it runs, marks)
IMPLEMENTATIONS = {
    "twin": (_twin, CASES, ()),
    **{f"twin_warp{g}": (_twin_warp(g), WARP_CASES, ()) for g in WARP_GROUPS},
    "numba": (_numba, CASES, ()),
    **{f"emulated_thread-{c}": (_emulated_thread(c), CASES, ()) for c in LAUNCHES},
    **{f"emulated_warp{g}-{c}": (_emulated_warp(g, c), WARP_CASES, ())
       for g in WARP_GROUPS for c in WARP_LAUNCHES},
    **{f"gpu_{m}{g or ''}-{blocks}": (_gpu(m, g, max_blocks), CASES, needs_gpu)
       for m, g in GPU_SDDMM_CHOICES
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


@pytest.mark.parametrize("method, group", [("thread", None), ("warp", None), ("warp", 4)])
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
    (dict(method="block"), r"must be one of \['thread', 'warp'\]. Got 'block'"),
    (dict(method="warp", group=3), r"power of two in \[1, 32\]. Got 3"),
    (dict(method="warp", group=64), r"power of two in \[1, 32\]. Got 64"),
    (dict(method="warp", group=True), r"power of two in \[1, 32\]. Got True"),
    (dict(method="thread", group=8), "goes with method 'warp'"),
])
def test_sddmm_rejects_bad_choices(small, kwargs, message):
    with pytest.raises(ValueError, match=message):
        kernels.sddmm(small["indptr"], small["indices"], small["dy"], small["x"], **kwargs)
    with pytest.raises(ValueError, match=message):
        kernels.set_sddmm(**kwargs)


@pytest.mark.parametrize("text, expected", [("", ("warp", None)), ("thread", ("thread", None)),
                                            ("warp", ("warp", None)), ("warp:16", ("warp", 16))])
def test_sddmm_default_comes_from_the_environment(monkeypatch, text, expected):
    monkeypatch.setenv(kernels.SDDMM_ENV, text)
    monkeypatch.setattr(SDDMM_MODULE, "_SDDMM_DEFAULT", [])
    assert kernels.sddmm_setting() == expected
    kernels.set_sddmm("thread")
    assert kernels.sddmm_setting() == ("thread", None)


@pytest.mark.parametrize("text, message", [("warp:x", "'warp:<group>'. Got 'warp:x'"),
                                           ("warp:12", r"power of two in \[1, 32\]. Got 12"),
                                           ("fast", r"must be one of \['thread', 'warp'\]")])
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

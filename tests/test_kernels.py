"""Tests of the sparse kernels against their NumPy twins.

Every custom CUDA kernel (``cupynn/kernels/*.cu``) has a NumPy twin in
:mod:`cupynn.kernels.numpy_twins`. Here each implementation is compared with
its twin on the same cases (empty rows, an all-empty matrix, batch 1, more
nonzeros than threads, a larger random matrix):

1. the CUDA sources compile for the GPU (nvcc, else NVRTC through CuPy);
2. the CUDA sources compile as host C++ (``tests/cuda_host/cuda_host.h``) and
   their kernels, run on the CPU one (block, thread) at a time, match the
   twins -- so the CUDA code itself is checked on machines without a GPU;
3. the Numba CPU kernels, through the public dispatchers, match the twins;
4. the dispatchers reject bad input with the documented errors;
5. with a working GPU, the CUDA kernels through the dispatchers match the twins.

Where a toolchain is missing, its tests skip with the reason, except under
``CI=true``, where they fail: CI must run them.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy
import pytest

import cupynn
from conftest import needs_gpu
from cupynn import kernels
from cupynn.backend import get_backend, to_numpy
from cupynn.kernels import CUDA_SOURCES, THREADS_PER_BLOCK, numpy_twins as twins

# The modules that keep the settings (kernels.spmm and kernels.sddmm are the functions).
SPMM_MODULE = importlib.import_module("cupynn.kernels.spmm")
SDDMM_MODULE = importlib.import_module("cupynn.kernels.sddmm")

try:  # tests/ is on sys.path (pytest's default rootdir-relative import)
    from cuda_host import (HostCompileError, HostCompilerMissing, WarpError, compile_cu, launch,
                           pointer)
except ModuleNotFoundError:  # tests/ became a package
    from tests.cuda_host import (HostCompileError, HostCompilerMissing, WarpError, compile_cu,
                                 launch, pointer)

DTYPES = [numpy.float32, numpy.float64]
# Relative to the same sum taken over absolute values (see assert_close).
RTOL = {numpy.float32: 1e-5, numpy.float64: 1e-12}
IN_CI = os.environ.get("CI", "").strip().lower() in ("true", "1")



def gpu(test):
    """Skip without a GPU; mark as a GPU test (conftest.needs_gpu)."""
    for mark in needs_gpu:
        test = mark(test)
    return test


def skip_or_fail(reason: str) -> None:
    """Skip a test whose toolchain is missing; fail instead under CI=true."""
    if IN_CI:
        pytest.fail(f"{reason} CI=true, so this test must run.")
    pytest.skip(reason)


def kernel_names(source: Path) -> list[str]:
    """The ``extern "C" __global__`` kernels a ``.cu`` file defines."""
    return re.findall(r'extern\s+"C"\s+__global__\s+void\s+(\w+)', source.read_text())


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """A CSR pattern with dense operands: (n_rows, n_cols) weights, ``batch`` samples.

    Rows in ``empty_rows`` have no nonzeros; every other row has at least one.
    """

    name: str
    n_rows: int
    n_cols: int
    batch: int
    density: float
    empty_rows: tuple[int, ...] = ()
    seed: int = 0

    def arrays(self, dtype: type) -> dict[str, numpy.ndarray]:
        rng = numpy.random.default_rng(self.seed)
        indptr = [0]
        columns = []
        for r in range(self.n_rows):
            count = 0 if r in self.empty_rows else max(1, rng.binomial(self.n_cols, self.density))
            columns.append(numpy.sort(rng.choice(self.n_cols, size=count, replace=False)))
            indptr.append(indptr[-1] + count)
        indices = numpy.concatenate(columns) if columns else numpy.empty(0)
        nnz = indptr[-1]
        return {
            "indptr": numpy.asarray(indptr, dtype=numpy.int32),
            "indices": indices.astype(numpy.int32),
            "data": rng.standard_normal(nnz).astype(dtype),
            "dy": rng.standard_normal((self.n_rows, self.batch)).astype(dtype),
            "x": rng.standard_normal((self.n_cols, self.batch)).astype(dtype),
        }


CASES = [
    # Empty rows first, in the middle and last, two of them in a row at each end.
    Case("empty_rows", 9, 11, 5, 0.4, empty_rows=(0, 1, 4, 7, 8)),
    Case("all_empty", 6, 7, 3, 0.5, empty_rows=tuple(range(6))),
    Case("no_rows", 0, 5, 4, 0.5),
    Case("batch_1", 12, 10, 1, 0.3, empty_rows=(5,)),
    Case("batch_0", 5, 6, 0, 0.5, empty_rows=(2,)),
    Case("one_row", 1, 20, 4, 0.5),
    Case("one_column", 8, 1, 3, 1.0, empty_rows=(2, 5)),
    # nnz > 2 * THREADS_PER_BLOCK: strides with max_blocks=2 on the GPU and
    # with the emulated grid=2, block=32 (about 13 nonzeros per thread).
    Case("grid_stride", 40, 60, 7, 0.35, empty_rows=(0, 20, 39)),
    Case("large", 300, 500, 37, 0.05, empty_rows=(0, 150, 299)),
]
case_params = pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
dtype_params = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)


def test_cases_cover_what_they_claim():
    grid_stride = next(c for c in CASES if c.name == "grid_stride").arrays(numpy.float64)
    assert len(grid_stride["indices"]) > 2 * THREADS_PER_BLOCK
    empty = next(c for c in CASES if c.name == "empty_rows").arrays(numpy.float64)
    counts = numpy.diff(empty["indptr"])
    assert list(numpy.flatnonzero(counts == 0)) == [0, 1, 4, 7, 8]
    all_empty = next(c for c in CASES if c.name == "all_empty").arrays(numpy.float64)
    assert len(all_empty["indices"]) == 0


def assert_close(actual, expected: numpy.ndarray, bound: numpy.ndarray, dtype: type,
                 extra: numpy.ndarray | float = 0.0) -> None:
    """Check ``|actual - expected| <= rtol * bound + extra`` entrywise.

    ``bound`` is the same sum of products taken over absolute values, the scale
    of the rounding error of any summation order (plain relative tolerance
    fails where a sum cancels to nearly zero). ``extra`` is a known, explained
    difference between the two computations.
    """
    actual = to_numpy(actual)
    assert actual.dtype == expected.dtype == numpy.dtype(dtype)
    assert actual.shape == expected.shape
    err = numpy.abs(actual.astype(numpy.float64) - expected)
    tol = RTOL[dtype] * bound.astype(numpy.float64) + extra + numpy.finfo(dtype).tiny
    tol = numpy.broadcast_to(tol, err.shape)
    bad = ~(err <= tol)  # NaN (an entry never written) counts as a difference
    if bad.any():
        excess = numpy.where(numpy.isnan(err), numpy.inf, err - tol)
        worst = numpy.unravel_index(numpy.argmax(excess), err.shape)
        pytest.fail(f"{int(bad.sum())} of {bad.size} entries differ; the worst, at "
                    f"{tuple(int(i) for i in worst)}, is {float(actual[worst])!r} for "
                    f"{float(expected[worst])!r} (tolerance {float(tol[worst]):.3g})")


def sddmm_reference(a: dict) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Twin result and its error scale for the SDDMM of case arrays ``a``."""
    expected = twins.sddmm(a["indptr"], a["indices"], a["dy"], a["x"])
    bound = twins.sddmm(a["indptr"], a["indices"], numpy.abs(a["dy"]), numpy.abs(a["x"]))
    return expected, bound


ADAM = dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8)


def adam_state(n: int, dtype: type, seed: int = 1) -> dict[str, numpy.ndarray]:
    rng = numpy.random.default_rng(seed)
    g = rng.standard_normal(n).astype(dtype)
    g[::7] = 0  # a zero gradient leaves m and v decaying
    return {"p": rng.standard_normal(n).astype(dtype), "g": g,
            "m": (0.1 * rng.standard_normal(n)).astype(dtype),
            "v": (0.01 * rng.random(n)).astype(dtype)}


def adam_hyper(step: int) -> dict[str, float]:
    return dict(ADAM, bc1=1 - ADAM["b1"] ** step, bc2=1 - ADAM["b2"] ** step)


def adam_reference(s: dict, step: int) -> dict[str, numpy.ndarray]:
    """Twin's (p, m, v) after one step from state ``s``, with error scales.

    Kernels and twin both take 1 - b computed in double and rounded, so no
    allowance beyond rounding is needed (with 1 - fl(b) the float32 kernels
    were 1.3e-5 relative off in v).
    """
    p, m, v = s["p"].copy(), s["m"].copy(), s["v"].copy()
    twins.adam(p, s["g"], m, v, **adam_hyper(step))
    b1 = ADAM["b1"]
    return {"p": p, "m": m, "v": v,
            "p_bound": numpy.abs(s["p"]) + numpy.abs(s["p"] - p),
            "m_bound": b1 * numpy.abs(s["m"]) + (1 - b1) * numpy.abs(s["g"]),
            "v_bound": numpy.abs(v)}


def assert_adam_step(p, m, v, ref: dict, dtype: type) -> None:
    assert_close(m, ref["m"], ref["m_bound"], dtype)
    assert_close(v, ref["v"], ref["v_bound"], dtype)
    assert_close(p, ref["p"], ref["p_bound"], dtype)


ADAM_SIZES = [0, 1, 7, 1000]
STEPS = (1, 2, 10)  # bias corrections of the first steps and a later one

# ------------------------------------------------------------ 1. GPU compilation


@functools.lru_cache(maxsize=None)
def nvcc_arch(nvcc: str) -> str:
    """sm_70 (Volta, the oldest GPU targeted) or, where dropped, the oldest left."""
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True)
    archs = [int(a) for a in re.findall(r"compute_(\d+)", listed.stdout)]
    return f"sm_{70 if not archs or 70 in archs else min(archs)}"


def nvrtc_ptx(source: Path) -> str:
    """PTX of ``source`` from NVRTC (through CuPy's bindings), as cupynn compiles it."""
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # no CuPy, or no libnvrtc
        skip_or_fail("nvcc is not on PATH and NVRTC cannot be loaded through CuPy "
                     f"({type(exc).__name__}: {exc}).")
    supported = getattr(nvrtc, "getSupportedArchs", lambda: (70,))
    archs = [int(a) for a in supported()]
    arch = 70 if 70 in archs else min(archs)
    program = nvrtc.createProgram(source.read_text(), source.name, (), ())
    try:
        try:
            nvrtc.compileProgram(program, ("--std=c++14", f"-arch=compute_{arch}"))
        except nvrtc.NVRTCError:
            pytest.fail(f"NVRTC rejects {source.name}:\n{nvrtc.getProgramLog(program)}")
        ptx = nvrtc.getPTX(program)
    finally:
        nvrtc.destroyProgram(program)
    return ptx.decode() if isinstance(ptx, bytes) else ptx


def test_cuda_sources_are_found():
    names = {p.name for p in CUDA_SOURCES}
    assert {"sddmm.cu", "adam.cu"} <= names
    for source in CUDA_SOURCES:
        assert kernel_names(source), f"{source.name} defines no extern \"C\" __global__ kernel"


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_for_gpu(source, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        ptx_path = tmp_path / f"{source.stem}.ptx"
        cmd = [nvcc, "--ptx", f"-arch={nvcc_arch(nvcc)}", "--std=c++14", str(source),
               "-o", str(ptx_path)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}{result.stderr}"
        ptx = ptx_path.read_text()
    else:
        ptx = nvrtc_ptx(source)
    for name in kernel_names(source):
        assert re.search(rf"\.entry\s+{name}\s*\(", ptx), f"no PTX entry for {name}"


# ------------------------------------------------- 2. CUDA kernels emulated on the CPU


def host_library(source: str | Path) -> ctypes.CDLL:
    """``source`` (a path, or a file name in cupynn/kernels) built for the CPU."""
    try:
        return compile_cu(kernels.KERNEL_DIR / source)
    except HostCompilerMissing as exc:
        skip_or_fail(str(exc))


# Launch configurations: the one the dispatcher uses, a small grid that makes
# every thread loop, and a single thread that does all the work.
LAUNCHES = {
    "dispatcher_grid": None,
    "grid2_block32": ((2,), (32,)),
    "one_thread": ((1,), (1,)),
}
launch_params = pytest.mark.parametrize("config", list(LAUNCHES), ids=str)


def grid_and_block(config: str, n: int) -> tuple[tuple[int], tuple[int]]:
    if LAUNCHES[config] is None:
        return kernels._grid(n, None), (THREADS_PER_BLOCK,)
    return LAUNCHES[config]


def suffix_of(dtype: type) -> str:
    """The kernels' name suffix for a float dtype."""
    return "f32" if dtype == numpy.float32 else "f64"


GUARD = 5  # NaN cells after each output: a kernel must not write past n


def guarded(values: numpy.ndarray) -> numpy.ndarray:
    out = numpy.full(len(values) + GUARD, numpy.nan, dtype=values.dtype)
    out[:len(values)] = values
    return out


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_as_host_cpp(source):
    lib = host_library(source)
    for name in kernel_names(source):
        assert hasattr(lib, name), f"{source.name} built for the CPU lacks {name}"


EMULATED_FAMILIES = ("sddmm", "sddmm_warp", "spmm", "spmm_t", "adam", "fisher_rank1_update",
                     "packed_matvec")


def test_every_kernel_is_emulated_in_these_tests():
    """A new kernel needs a NumPy twin and emulation tests here before it is trusted."""
    defined = {name for source in CUDA_SOURCES for name in kernel_names(source)}
    families = {re.sub(r"_f(32|64)$", "", name) for name in defined}
    untested = sorted(families - set(EMULATED_FAMILIES))
    assert not untested, f"kernel families without CPU-emulation tests here: {untested}"
    for family in families:
        assert callable(getattr(twins, family, None)), f"kernel family {family} has no NumPy twin"
        assert {f"{family}_f32", f"{family}_f64"} <= defined, f"{family} lacks a float variant"


def test_host_header_rejects_block_cooperation(tmp_path):
    source = tmp_path / "reduce.cu"
    source.write_text(
        'extern "C" __global__ void block_sum(const float* x, float* out) {\n'
        "    __shared__ float tile[32];\n"
        "    tile[threadIdx.x] = x[threadIdx.x];\n"
        "    __syncthreads();\n"
        "    if (threadIdx.x == 0) out[blockIdx.x] = tile[0] + tile[31];\n"
        "}\n")
    try:
        compile_cu(source)
    except HostCompilerMissing as exc:
        skip_or_fail(str(exc))
    except HostCompileError as exc:
        message = str(exc)
        assert "__shared__ needs threads that run together" in message
        assert "__syncthreads needs threads that run together" in message
    else:
        pytest.fail("cuda_host.h let a kernel with __shared__ and __syncthreads compile")


def test_launch_sets_every_thread_index(tmp_path):
    source = tmp_path / "ids.cu"
    source.write_text(
        'extern "C" __global__ void ids(int* out, int n) {\n'
        "    int i = blockIdx.x * blockDim.x + threadIdx.x;\n"
        "    if (i < n) out[i] = 1000 * (int)gridDim.x + 100 * (int)blockDim.x + i;\n"
        "}\n")
    lib = host_library(source)
    out = numpy.full(3 * 4 + 1, -1, dtype=numpy.int32)
    launch(lib, "ids", (3,), 4, [pointer(numpy.int32), ctypes.c_int], [out, 12])
    assert list(out[:12]) == [3400 + i for i in range(12)]
    assert out[12] == -1
    with pytest.raises(TypeError, match="takes c_int\\* but the array is float64"):
        launch(lib, "ids", 1, 1, [pointer(numpy.int32), ctypes.c_int], [numpy.zeros(2), 2])
    with pytest.raises(ValueError, match="1-D launches only"):
        launch(lib, "ids", (2, 2), 1, [pointer(numpy.int32), ctypes.c_int], [out, 2])
    with pytest.raises(AttributeError, match="no extern \"C\" kernel 'missing'"):
        launch(lib, "missing", 1, 1, [], [])


def test_launch_can_run_threads_last_to_first(tmp_path):
    """The last thread to write a shared cell wins: which one shows the order."""
    source = tmp_path / "race.cu"
    source.write_text(
        'extern "C" __global__ void race(int* out) {\n'
        "    out[0] = blockIdx.x * blockDim.x + threadIdx.x;\n"
        "}\n")
    lib = host_library(source)
    out = numpy.full(1, -1, dtype=numpy.int32)
    launch(lib, "race", 3, 4, [pointer(numpy.int32)], [out])
    assert out[0] == 11
    launch(lib, "race", 3, 4, [pointer(numpy.int32)], [out], reverse=True)
    assert out[0] == 0


def sddmm_argtypes(dtype: type) -> list:
    real = pointer(dtype)
    return [pointer(numpy.int32), pointer(numpy.int32), real, real, real,
            ctypes.c_int, ctypes.c_int, ctypes.c_int]


@case_params
@dtype_params
@launch_params
def test_emulated_sddmm_matches_twin(case, dtype, config):
    lib = host_library("sddmm.cu")
    a = case.arrays(dtype)
    nnz = len(a["indices"])
    out = numpy.full(nnz + GUARD, numpy.nan, dtype=dtype)
    grid, block = grid_and_block(config, nnz)
    suffix = suffix_of(dtype)
    launch(lib, f"sddmm_{suffix}", grid, block, sddmm_argtypes(dtype),
           [a["indptr"], a["indices"], a["dy"], a["x"], out, case.n_rows, nnz, case.batch])
    expected, bound = sddmm_reference(a)
    assert_close(out[:nnz], expected, bound, dtype)
    assert numpy.isnan(out[nnz:]).all(), "the kernel wrote past nnz"


# sddmm_warp: launches whose blocks are whole warps (the kernel's requirement): the
# dispatcher's block of 256 threads on a grid of 3 (24 warps, each looping), two blocks of
# 64 and one warp alone. Each shuffle is a meeting of 32 OS threads here (about 0.2 ms),
# so the cases are the small ones plus a mid-sized one with about 13 nonzeros per warp
# and iteration at group 1.
WARP_LAUNCHES = {
    "dispatcher_block_grid3": ((3,), (THREADS_PER_BLOCK,)),
    "grid2_block64": ((2,), (64,)),
    "one_warp": ((1,), (32,)),
}
WARP_CASES = [c for c in CASES if c.name != "large"] + [
    Case("mid", 60, 90, 19, 0.05, empty_rows=(0, 30, 59))]
WARP_GROUPS = [1, 2, 8, 32]


def sddmm_warp_argtypes(dtype: type) -> list:
    return sddmm_argtypes(dtype) + [ctypes.c_int]


def launch_sddmm_warp(a: dict, case: Case, dtype: type, group: int, grid, block,
                      reverse: bool = False) -> numpy.ndarray:
    """The emulated sddmm_warp kernel's output for case arrays ``a`` (guard cells after)."""
    lib = host_library("sddmm.cu")
    nnz = len(a["indices"])
    out = numpy.full(nnz + GUARD, numpy.nan, dtype=dtype)
    suffix = suffix_of(dtype)
    launch(lib, f"sddmm_warp_{suffix}", grid, block, sddmm_warp_argtypes(dtype),
           [a["indptr"], a["indices"], a["dy"], a["x"], out, case.n_rows, nnz, case.batch, group],
           reverse=reverse)
    return out


@pytest.mark.parametrize("case", WARP_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("group", WARP_GROUPS)
@dtype_params
@pytest.mark.parametrize("config", list(WARP_LAUNCHES))
def test_emulated_sddmm_warp_matches_twin(case, group, dtype, config):
    a = case.arrays(dtype)
    nnz = len(a["indices"])
    out = launch_sddmm_warp(a, case, dtype, group, *WARP_LAUNCHES[config])
    expected, bound = sddmm_reference(a)
    assert_close(out[:nnz], expected, bound, dtype)
    assert numpy.isnan(out[nnz:]).all(), "the kernel wrote past nnz"
    # The twin that sums in the kernel's order is within rounding of the kernel too.
    assert_close(out[:nnz], twins.sddmm_warp(a["indptr"], a["indices"], a["dy"], a["x"], group),
                 bound, dtype)


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


def spmm_launch(config: str, n_out: int, batch: int) -> tuple:
    if LAUNCHES[config] is None:
        return kernels._spmm_launch(n_out, batch, None)
    return LAUNCHES[config]


def emulated_spmm(a: dict, case: Case, dtype: type, config: str, bias: bool = False,
                  relu: bool = False, reverse: bool = False) -> numpy.ndarray:
    """spmm.cu's spmm, emulated, for case arrays ``a``: (n_rows, batch) then guard cells."""
    lib = host_library("spmm.cu")
    real = pointer(dtype)
    size = case.n_rows * case.batch
    out = numpy.full(size + GUARD, numpy.nan, dtype=dtype)
    grid, block = spmm_launch(config, case.n_rows, case.batch)
    launch(lib, f"spmm_{suffix_of(dtype)}", grid, block,
           [pointer(numpy.int32), pointer(numpy.int32), real, real, real, real] + [ctypes.c_int] * 4,
           [a["indptr"], a["indices"], a["data"], a["x"], a["bias"] if bias else a["data"], out,
            case.n_rows, case.batch, int(bias), int(relu)], reverse=reverse)
    assert numpy.isnan(out[size:]).all(), "the kernel wrote past its output"
    return out[:size].reshape(case.n_rows, case.batch)


def emulated_spmm_t(a: dict, case: Case, dtype: type, config: str,
                    reverse: bool = False) -> numpy.ndarray:
    """spmm.cu's spmm_t, emulated, through the transposed pattern: (n_cols, batch)."""
    lib = host_library("spmm.cu")
    real = pointer(dtype)
    size = case.n_cols * case.batch
    out = numpy.full(size + GUARD, numpy.nan, dtype=dtype)
    grid, block = spmm_launch(config, case.n_cols, case.batch)
    t_indptr, t_rows, t_perm = kernels.transpose_pattern(a["indptr"], a["indices"], case.n_cols)
    launch(lib, f"spmm_t_{suffix_of(dtype)}", grid, block,
           [pointer(numpy.int32)] * 3 + [real, real, real, ctypes.c_int, ctypes.c_int],
           [t_indptr, t_rows, t_perm, a["data"], a["dy"], out, case.n_cols, case.batch],
           reverse=reverse)
    assert numpy.isnan(out[size:]).all(), "the kernel wrote past its output"
    return out[:size].reshape(case.n_cols, case.batch)


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


def adam_argtypes(dtype: type) -> list:
    real = numpy.ctypeslib.as_ctypes_type(numpy.dtype(dtype))
    return [pointer(dtype)] * 4 + [real] * 8 + [ctypes.c_longlong]


@pytest.mark.parametrize("n", ADAM_SIZES)
@dtype_params
@launch_params
def test_emulated_adam_matches_twin(n, dtype, config):
    lib = host_library("adam.cu")
    state = adam_state(n, dtype)
    p, g, m, v = (guarded(state[k]) for k in "pgmv")
    grid, block = grid_and_block(config, n)
    suffix = suffix_of(dtype)
    for step in STEPS:
        ref = adam_reference({"p": p[:n], "g": g[:n], "m": m[:n], "v": v[:n]}, step)
        h = adam_hyper(step)
        launch(lib, f"adam_{suffix}", grid, block, adam_argtypes(dtype),
               [p, g, m, v, h["lr"], h["b1"], h["b2"], 1 - h["b1"], 1 - h["b2"], h["eps"],
                h["bc1"], h["bc2"], n])
        assert_adam_step(p[:n], m[:n], v[:n], ref, dtype)
        for buffer in (p, m, v):
            assert numpy.isnan(buffer[n:]).all(), "the kernel wrote past n"


# fisher.cu: a packed, tiled block-diagonal inverse Fisher. (n_blocks, B) pairs:
# B = 1 (P = 1), a few small blocks, and more blocks than the 64 threads of
# grid2_block32 and than one tile.
TILE = kernels.FISHER_TILE
FISHER_SHAPES = [(1, 1), (5, 1), (1, 4), (5, 3), (70, 8)]
fisher_params = pytest.mark.parametrize("n_blocks, block_size", FISHER_SHAPES,
                                        ids=[f"{n}x{b}" for n, b in FISHER_SHAPES])


def fisher_state(n_blocks: int, block_size: int, dtype: type, seed: int = 2) -> dict:
    """Packed inverses of random SPD blocks (lambda I + Q Q^T / B), a gradient and a vector."""
    rng = numpy.random.default_rng(seed)
    q = rng.standard_normal((n_blocks, block_size, block_size))
    blocks = 0.5 * numpy.eye(block_size) + q @ q.transpose(0, 2, 1) / block_size
    n = n_blocks * block_size
    finv = twins.pack(numpy.linalg.inv(blocks), TILE).astype(dtype)
    t, lane = twins.lanes(finv.shape[0] * TILE, TILE)
    finv[t[n_blocks:], :, lane[n_blocks:]] = 7.0  # padding lanes: no kernel may change them
    return {"finv": finv,
            "g": rng.standard_normal(n).astype(dtype), "v": rng.standard_normal(n).astype(dtype)}


def packed_abs_matvec(finv: numpy.ndarray, v: numpy.ndarray, block_size: int) -> numpy.ndarray:
    """|F| |v| blockwise, in float64: the error scale of F v."""
    return twins.packed_matvec(numpy.abs(finv.astype(numpy.float64)),
                               numpy.abs(v.astype(numpy.float64)), block_size)


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


# --------------------------------------------------- 3. Numba kernels (dispatchers)


@case_params
@dtype_params
def test_cpu_sddmm_matches_twin(case, dtype):
    a = case.arrays(dtype)
    result = kernels.sddmm(a["indptr"], a["indices"], a["dy"], a["x"])
    expected, bound = sddmm_reference(a)
    assert_close(result, expected, bound, dtype)


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


def assert_relu_grad_rowsum(a: dict, xp_to_numpy, dtype: type) -> None:
    dy, y = a["dy"], a["y"]
    dy_before = xp_to_numpy(dy).copy()
    for live in (y, None):
        out, sums = kernels.relu_grad_rowsum(dy, live)
        host_dy = xp_to_numpy(dy)
        expected = host_dy if live is None else host_dy * (xp_to_numpy(live) > 0)
        numpy.testing.assert_array_equal(xp_to_numpy(out), expected)
        assert out.dtype == sums.dtype == dtype and sums.shape == (dy.shape[0],)
        bound = numpy.abs(expected).sum(axis=1)
        assert_close(sums, expected.sum(axis=1), bound, dtype)
    numpy.testing.assert_array_equal(xp_to_numpy(dy), dy_before)  # dy is not modified
    # in_place: the same result, written over dy (and the same sums).
    copy = dy.copy()
    out, sums = kernels.relu_grad_rowsum(copy, y, in_place=True)
    assert out is copy
    expected = dy_before * (xp_to_numpy(y) > 0)
    numpy.testing.assert_array_equal(xp_to_numpy(copy), expected)
    assert_close(sums, expected.sum(axis=1), numpy.abs(expected).sum(axis=1), dtype)


@case_params
@dtype_params
def test_cpu_relu_grad_rowsum(case, dtype):
    assert_relu_grad_rowsum(fused_inputs(case, dtype), numpy.asarray, dtype)


@pytest.mark.parametrize("n", ADAM_SIZES + [100_003])
@dtype_params
def test_cpu_adam_matches_twin(n, dtype):
    state = adam_state(n, dtype)
    p, g, m, v = (state[k].copy() for k in "pgmv")
    for step in STEPS:
        ref = adam_reference({"p": p, "g": g, "m": m, "v": v}, step)
        kernels.adam(p, g, m, v, **adam_hyper(step))
        assert_adam_step(p, m, v, ref, dtype)


@dtype_params
def test_check_false_skips_the_index_pass(dtype):
    """check=False trusts the pattern: unsorted columns pass, and SDDMM needs no order."""
    a = next(c for c in CASES if c.name == "grid_stride").arrays(dtype)
    indptr, indices = a["indptr"], a["indices"].copy()
    for r in range(len(indptr) - 1):
        indices[indptr[r]:indptr[r + 1]] = indices[indptr[r]:indptr[r + 1]][::-1]
    with pytest.raises(ValueError, match="sorted and unique within each row"):
        kernels.sddmm(indptr, indices, a["dy"], a["x"])
    result = kernels.sddmm(indptr, indices, a["dy"], a["x"], check=False)
    expected, bound = sddmm_reference(dict(a, indices=indices))
    assert_close(result, expected, bound, dtype)
    # spmm_t takes its batch-slice scatter for unsorted rows (the band kernel
    # needs sorted columns): it must agree with the twin too.
    data = a["data"] if "data" in a else numpy.linspace(-1, 1, len(indices)).astype(dtype)
    got = kernels.spmm_t(indptr, indices, data, a["dy"], a["x"].shape[0], check=False)
    expected = twins.spmm_t(indptr, indices, data, a["dy"], a["x"].shape[0])
    bound = twins.spmm_t(indptr, indices, numpy.abs(data), numpy.abs(a["dy"]), a["x"].shape[0])
    assert_close(got, expected, bound, dtype)


# ------------------------------------------------------------ 4. dispatcher errors


@pytest.fixture
def small():
    """A valid 3 x 4 pattern with batch 5 (float64), to break one thing at a time."""
    return {
        "indptr": numpy.array([0, 2, 2, 3], dtype=numpy.int32),
        "indices": numpy.array([0, 3, 1], dtype=numpy.int32),
        "data": numpy.array([1.0, -2.0, 0.5]),
        "dy": numpy.ones((3, 5)),
        "x": numpy.ones((4, 5)),
        "flat": numpy.ones(6),
    }


def call_sddmm(s, **change):
    a = dict(s, **change)
    return kernels.sddmm(a["indptr"], a["indices"], a["dy"], a["x"], **a.get("kw", {}))


def call_spmm(s, **change):
    a = dict(s, **change)
    return kernels.spmm(a["indptr"], a["indices"], a["data"], a["x"], **a.get("kw", {}))


def call_spmm_t(s, **change):
    a = dict(s, **change)
    return kernels.spmm_t(a["indptr"], a["indices"], a["data"], a["dy"], a["x"].shape[0])


def call_relu_grad_rowsum(s, **change):
    a = dict(s, **change)
    return kernels.relu_grad_rowsum(a["dy"], a.get("y", a["dy"]))


def call_adam(s, **change):
    a = {k: s["flat"].copy() for k in "pgmv"}
    a.update(change)
    kernels.adam(a["p"], a["g"], a["m"], a["v"], **adam_hyper(1))


def test_valid_inputs_pass(small):
    """The baseline every error case below breaks one thing of."""
    assert call_sddmm(small).shape == (3,)
    assert call_spmm(small).shape == (3, 5)
    assert call_spmm_t(small).shape == (4, 5)
    assert call_spmm(small, kw=dict(bias=numpy.ones(3), relu=True)).shape == (3, 5)
    assert [r.shape for r in call_relu_grad_rowsum(small)] == [(3, 5), (3,)]
    call_adam(small)


I32 = numpy.int32
BAD_INPUTS = [
    # the fused layer epilogue
    ("spmm_bias_shape", call_spmm, dict(kw=dict(bias=numpy.ones(4))),
     ValueError, r"bias must be a \(3,\) array on the operands' device. Got \(4,\)"),
    ("spmm_bias_dtype", call_spmm, dict(kw=dict(bias=numpy.ones(3, dtype=numpy.float32))),
     TypeError, "one dtype. Got float64 and float32"),
    ("spmm_relu_without_bias", call_spmm, dict(kw=dict(relu=True)),
     ValueError, "relu=True goes with a bias"),
    ("relu_grad_shapes", call_relu_grad_rowsum, dict(y=numpy.ones((3, 4))),
     ValueError, r"dy must be 2-D and y of its shape. Got \(3, 5\) and \(3, 4\)"),
    ("relu_grad_dtype", call_relu_grad_rowsum, dict(y=numpy.ones((3, 5), dtype=numpy.float32)),
     TypeError, "one dtype"),
    ("relu_grad_strided", call_relu_grad_rowsum, dict(dy=numpy.ones((5, 3)).T),
     ValueError, "C-contiguous"),
    # wrong dtypes
    ("sddmm_int_operands", call_sddmm, dict(dy=numpy.ones((3, 5), dtype=numpy.int64)),
     TypeError, "float arrays must be float32 or float64. Got int64"),
    ("sddmm_mixed_floats", call_sddmm, dict(x=numpy.ones((4, 5), dtype=numpy.float32)),
     TypeError, "one dtype. Got float64 and float32"),
    ("sddmm_int64_indptr", call_sddmm, dict(indptr=numpy.array([0, 2, 2, 3])),
     TypeError, "indptr and indices must be int32. Got int64 and int32"),
    ("sddmm_out_dtype", call_sddmm, dict(kw=dict(out=numpy.empty(3, dtype=numpy.float32))),
     TypeError, "one dtype"),
    ("spmm_float16_data", call_spmm, dict(data=numpy.ones(3, dtype=numpy.float16)),
     TypeError, "float arrays must be float32 or float64. Got float16"),
    ("spmm_t_int64_indices", call_spmm_t, dict(indices=numpy.array([0, 3, 1])),
     TypeError, "must be int32"),
    ("spmm_short_data", call_spmm, dict(data=numpy.ones(2)),
     ValueError, r"data must have the shape of indices \(3,\). Got \(2,\)"),
    ("spmm_t_2d_data", call_spmm_t, dict(data=numpy.ones((3, 1))),
     ValueError, "data must have the shape of indices"),
    ("spmm_empty_indptr", call_spmm, dict(indptr=numpy.array([], dtype=numpy.int32)),
     ValueError, r"indptr must be flat with n_rows \+ 1 >= 1 entries"),
    ("spmm_strided_data", call_spmm, dict(data=numpy.ones(6)[::2]),
     ValueError, "'data' must be C-contiguous"),
    ("spmm_t_strided_indptr", call_spmm_t,
     dict(indptr=numpy.array([0, 0, 2, 2, 3, 3, 3, 3], dtype=numpy.int32)[::2]),
     ValueError, "'indptr' must be C-contiguous"),
    ("sddmm_strided_out", call_sddmm, dict(kw=dict(out=numpy.empty(6)[::2])),
     ValueError, "'out' must be C-contiguous"),
    ("adam_int", call_adam, dict(g=numpy.ones(6, dtype=numpy.int32)),
     TypeError, "one dtype"),
    ("adam_all_float16", call_adam, {k: numpy.ones(6, dtype=numpy.float16) for k in "pgmv"},
     TypeError, "must be float32 or float64"),
    # non-contiguous operands
    ("sddmm_strided_dy", call_sddmm, dict(dy=numpy.ones((3, 10))[:, ::2]),
     ValueError, "'dy' must be C-contiguous"),
    ("sddmm_fortran_x", call_sddmm, dict(x=numpy.asfortranarray(numpy.ones((4, 5)))),
     ValueError, "'x' must be C-contiguous"),
    ("spmm_strided_x", call_spmm, dict(x=numpy.ones((4, 10))[:, ::2]),
     ValueError, "'x' must be C-contiguous"),
    ("spmm_t_strided_dy", call_spmm_t, dict(dy=numpy.ones((3, 10))[:, ::2]),
     ValueError, "'dy' must be C-contiguous"),
    ("adam_strided_g", call_adam, dict(g=numpy.ones(12)[::2]),
     ValueError, "'g' must be C-contiguous"),
    # mismatched shapes
    ("sddmm_batch_mismatch", call_sddmm, dict(x=numpy.ones((4, 6))),
     ValueError, r"must share the batch axis. Got \(3, 5\) and \(4, 6\)"),
    ("sddmm_flat_dy", call_sddmm, dict(dy=numpy.ones(15)),
     ValueError, "must share the batch axis"),
    ("sddmm_out_shape", call_sddmm, dict(kw=dict(out=numpy.empty(4))),
     ValueError, r"out must have shape \(3,\). Got \(4,\)"),
    ("spmm_flat_x", call_spmm, dict(x=numpy.ones(4)),
     ValueError, r"x must be \(n_cols, batch\)"),
    ("adam_lengths", call_adam, dict(m=numpy.ones(5)),
     ValueError, "flat and of one length"),
    ("adam_2d", call_adam, {k: numpy.ones((2, 3)) for k in "pgmv"},
     ValueError, "flat and of one length"),
    # indptr of the wrong length
    ("sddmm_short_indptr", call_sddmm, dict(indptr=numpy.array([0, 2, 3], dtype=I32)),
     ValueError, r"indptr must have shape \(4,\). Got \(3,\)"),
    ("sddmm_long_indptr", call_sddmm, dict(indptr=numpy.array([0, 2, 2, 3, 3], dtype=I32)),
     ValueError, r"indptr must have shape \(4,\). Got \(5,\)"),
    ("spmm_t_short_indptr", call_spmm_t, dict(indptr=numpy.array([0, 2, 3], dtype=I32)),
     ValueError, "n_rows = len\\(indptr\\) - 1"),
    ("spmm_indptr_too_long_for_nnz", call_spmm, dict(indptr=numpy.array([0, 2, 2], dtype=I32)),
     ValueError, "indptr must start at 0 and end at nnz=3. Got 0 and 2"),
    # malformed patterns (check=True)
    ("sddmm_index_too_large", call_sddmm, dict(indices=numpy.array([0, 4, 1], dtype=I32)),
     ValueError, r"column indices must be in \[0, 4\). Got values in \[0, 4\]"),
    ("spmm_negative_index", call_spmm, dict(indices=numpy.array([0, 3, -1], dtype=I32)),
     ValueError, r"column indices must be in \[0, 4\). Got values in \[-1, 3\]"),
    ("spmm_t_index_too_large", call_spmm_t, dict(indices=numpy.array([0, 9, 1], dtype=I32)),
     ValueError, r"column indices must be in \[0, 4\)"),
    ("sddmm_unsorted_row", call_sddmm, dict(indices=numpy.array([3, 0, 1], dtype=I32)),
     ValueError, "sorted and unique within each row"),
    ("spmm_duplicate_in_row", call_spmm, dict(indices=numpy.array([3, 3, 1], dtype=I32)),
     ValueError, "sorted and unique within each row"),
    ("spmm_t_decreasing_indptr", call_spmm_t, dict(indptr=numpy.array([0, 2, 1, 3], dtype=I32)),
     ValueError, "indptr must be non-decreasing"),
    ("sddmm_indptr_not_at_zero", call_sddmm, dict(indptr=numpy.array([1, 2, 2, 3], dtype=I32)),
     ValueError, "indptr must start at 0 and end at nnz=3. Got 1 and 3"),
]


@pytest.mark.parametrize("call, change, error, message",
                         [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_dispatcher_rejects_bad_input(small, call, change, error, message):
    with pytest.raises(error, match=message):
        call(small, **change)


# ------------------------------------------------------- 5. CUDA kernels on a GPU


def to_gpu(arrays: dict) -> dict:
    xp = get_backend("gpu").xp
    return {k: xp.asarray(v) for k, v in arrays.items()}


GPU_SDDMM_CHOICES = [("thread", None), ("warp", None), ("warp", 1), ("warp", 4), ("warp", 32)]


@gpu
@pytest.mark.parametrize("max_blocks", [None, 2], ids=["full_grid", "max_blocks_2"])
@pytest.mark.parametrize("method, group", GPU_SDDMM_CHOICES,
                         ids=[f"{m}{g or ''}" for m, g in GPU_SDDMM_CHOICES])
@case_params
@dtype_params
def test_gpu_sddmm_matches_twin(case, dtype, method, group, max_blocks):
    a = case.arrays(dtype)
    d = to_gpu(a)
    out = get_backend("gpu").xp.full(len(a["indices"]), numpy.nan, dtype=dtype)
    result = kernels.sddmm(d["indptr"], d["indices"], d["dy"], d["x"], out=out,
                           max_blocks=max_blocks, method=method, group=group)
    assert result is out
    expected, bound = sddmm_reference(a)
    assert_close(result, expected, bound, dtype)


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


@gpu
@pytest.mark.parametrize("max_blocks", [None, 2], ids=["full_grid", "max_blocks_2"])
@pytest.mark.parametrize("n", ADAM_SIZES + [3000])
@dtype_params
def test_gpu_adam_matches_twin(n, dtype, max_blocks):
    d = to_gpu(adam_state(n, dtype))
    for step in STEPS:
        ref = adam_reference({k: to_numpy(d[k]) for k in "pgmv"}, step)
        kernels.adam(d["p"], d["g"], d["m"], d["v"], max_blocks=max_blocks, **adam_hyper(step))
        assert_adam_step(d["p"], d["m"], d["v"], ref, dtype)


SPMM_GPU = [("rows", None), ("rows", 2), ("cusparse", None)]
spmm_gpu_params = pytest.mark.parametrize("method,max_blocks", SPMM_GPU,
                                          ids=["rows", "rows_max_blocks_2", "cusparse"])


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
def test_gpu_relu_grad_rowsum(case, dtype):
    assert_relu_grad_rowsum(to_gpu(fused_inputs(case, dtype)), to_numpy, dtype)


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

"""The CUDA sources: they compile for the GPU (nvcc, else NVRTC) and as host C++,
every kernel has a NumPy twin and emulation tests, and the host emulation
(``tests/cuda_host``) runs each (block, thread) as CUDA would.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess

import numpy
import pytest

from cupynn.kernels import CUDA_SOURCES, THREADS_PER_BLOCK, numpy_twins as twins
from kernel_cases import (CASES, host_library, kernel_names, nvcc_arch, nvrtc_ptx, skip_or_fail)

try:  # tests/ is on sys.path (pytest's default rootdir-relative import)
    from cuda_host import HostCompilerMissing, compile_cu, launch, pointer
except ModuleNotFoundError:  # tests/ became a package
    from tests.cuda_host import HostCompilerMissing, compile_cu, launch, pointer


def test_cases_cover_what_they_claim():
    grid_stride = next(c for c in CASES if c.name == "grid_stride").arrays(numpy.float64)
    assert len(grid_stride["indices"]) > 2 * THREADS_PER_BLOCK
    empty = next(c for c in CASES if c.name == "empty_rows").arrays(numpy.float64)
    counts = numpy.diff(empty["indptr"])
    assert list(numpy.flatnonzero(counts == 0)) == [0, 1, 4, 7, 8]
    all_empty = next(c for c in CASES if c.name == "all_empty").arrays(numpy.float64)
    assert len(all_empty["indices"]) == 0


def test_cuda_sources_are_found():
    names = {p.name for p in CUDA_SOURCES}
    assert {"sddmm.cu", "adam.cu", "spmm.cu", "batch.cu"} <= names
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


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_as_host_cpp(source):
    lib = host_library(source)
    for name in kernel_names(source):
        assert hasattr(lib, name), f"{source.name} built for the CPU lacks {name}"


EMULATED_FAMILIES = ("sddmm", "sddmm_warp", "spmm", "spmm_t", "adam", "fisher_rank1_update",
                     "sddmm_tiled",  # issue 20: test_sddmm.py
                     "packed_matvec",
                     "spmm_tiled", "spmm_t_tiled",  # issue 20: test_spmm.py
                     "spmm_vec", "spmm_t_vec",  # issue 20: test_spmm.py
                     "sddmm_vec",  # issue 20: test_sddmm.py
                     # issue 19: test_adam.py, test_loss.py, test_sddmm.py, test_batch.py
                     "adam_multi", "softmax_cross_entropy_rows", "binary_cross_entropy_rows",
                     "squared_error_rows", "mean_of_rows", "relu_grad_rowsum",
                     "gather_batch", "gather_labels", "transpose", "end_step")


def test_every_kernel_is_emulated_in_these_tests():
    """A new kernel needs a NumPy twin and emulation tests here before it is trusted.
    Every family has float32 and float64 kernels (gather_labels an int64 one too)."""
    defined = {name for source in CUDA_SOURCES for name in kernel_names(source)}
    families = {re.sub(r"_(f32|f64|i64)$", "", name) for name in defined}
    untested = sorted(families - set(EMULATED_FAMILIES))
    assert not untested, f"kernel families without CPU-emulation tests here: {untested}"
    for family in families:
        assert callable(getattr(twins, family, None)), f"kernel family {family} has no NumPy twin"
        assert {f"{family}_f32", f"{family}_f64"} <= defined, f"{family} lacks a float variant"


def test_host_header_emulates_block_cooperation(tmp_path):
    """``__shared__`` and ``__syncthreads`` run block by block (issue 20's tiled kernels
    need them; tests/test_cuda_host_blocks.py holds the rules' tests)."""
    source = tmp_path / "reduce.cu"
    source.write_text(
        'extern "C" __global__ void block_sum(const float* x, float* out) {\n'
        "    __shared__ float tile[32];\n"
        "    tile[threadIdx.x] = x[blockIdx.x * 32 + threadIdx.x];\n"
        "    __syncthreads();\n"
        "    if (threadIdx.x == 0) out[blockIdx.x] = tile[0] + tile[31];\n"
        "}\n")
    try:
        lib = compile_cu(source)
    except HostCompilerMissing as exc:
        skip_or_fail(str(exc))
    x = numpy.arange(64, dtype=numpy.float32)
    out = numpy.zeros(2, dtype=numpy.float32)
    launch(lib, "block_sum", 2, 32, [pointer(numpy.float32)] * 2, [x, out])
    assert list(out) == [x[0] + x[31], x[32] + x[63]]  # each block its own tile


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

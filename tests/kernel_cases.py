"""What the kernel tests share: cases, references, and the host emulation's launches.

The tests mirror ``cupynn/kernels/``: ``tests/kernels/test_spmm.py``,
``test_sddmm.py``, ``test_adam.py``, ``test_fisher.py`` (with
``tests/test_fisher_kernels.py``), ``test_checks.py`` (the dispatchers' errors)
and ``test_sources.py`` (the ``.cu`` files themselves).

Every custom CUDA kernel (``cupynn/kernels/*.cu``) has a NumPy twin in
:mod:`cupynn.kernels.numpy_twins`. Each implementation is compared with
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
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy
import pytest

from conftest import needs_gpu
from cupynn import kernels
from cupynn.backend import get_backend, to_numpy
from cupynn.kernels import THREADS_PER_BLOCK, numpy_twins as twins

try:  # tests/ is on sys.path (pytest's default rootdir-relative import)
    from cuda_host import HostCompilerMissing, compile_cu, launch, pointer
except ModuleNotFoundError:  # tests/ became a package
    from tests.cuda_host import HostCompilerMissing, compile_cu, launch, pointer

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


def sddmm_argtypes(dtype: type) -> list:
    real = pointer(dtype)
    return [pointer(numpy.int32), pointer(numpy.int32), real, real, real,
            ctypes.c_int, ctypes.c_int, ctypes.c_int]


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


def adam_argtypes(dtype: type) -> list:
    real = numpy.ctypeslib.as_ctypes_type(numpy.dtype(dtype))
    return [pointer(dtype)] * 4 + [real] * 8 + [ctypes.c_longlong]


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


def to_gpu(arrays: dict) -> dict:
    xp = get_backend("gpu").xp
    return {k: xp.asarray(v) for k, v in arrays.items()}


GPU_SDDMM_CHOICES = [("thread", None), ("warp", None), ("warp", 1), ("warp", 4), ("warp", 32)]
SPMM_GPU = [("rows", None), ("rows", 2), ("cusparse", None)]
spmm_gpu_params = pytest.mark.parametrize("method,max_blocks", SPMM_GPU,
                                          ids=["rows", "rows_max_blocks_2", "cusparse"])


# adam_multi (issue 19): lists of arrays of these lengths (0 and 1 among them; more
# elements than the 64 threads of grid2_block32 and than one block), stepped with
# the rows of a table of several steps, row 0 last.
ADAM_MULTI_SIZES = {"one_1000": (1000,), "one_empty": (0,), "one_single": (1,),
                    "seven": (5, 0, 1, 700, 0, 1, 300), "all_empty": (0, 0, 0)}
ADAM_TABLE_STEPS = (5, 1, 2, 10)
ADAM_TABLE_ORDER = (1, 2, 3, 0)


def adam_table(dtype: type, steps=ADAM_TABLE_STEPS) -> numpy.ndarray:
    """(len(steps), 8) rows of kernels.adam_scalars for the steps, as Adam makes them."""
    from cupynn.kernels.adam import adam_scalars

    return numpy.array([adam_scalars(dtype, **adam_hyper(s)) for s in steps], dtype=dtype)


def adam_multi_argtypes(dtype: type) -> list:
    table = [pointer(numpy.uint64)] * 4
    return table + [pointer(numpy.int64), ctypes.c_int, pointer(dtype), pointer(numpy.int64)]


# loss.cu (issue 19): batches of logits and targets, and its kernels emulated.
@dataclass(frozen=True)
class LossCase:
    """``batch`` rows of ``classes`` logits (standard normal times ``scale``) with their
    int64 labels; a column of them as binary logits with 0/1 and soft (0.25) targets;
    regression targets near the logits. ``total``: the global batch (None: the batch)."""

    name: str
    batch: int
    classes: int
    scale: float = 3.0
    total: int | None = None
    seed: int = 0

    @property
    def den(self) -> int:
        return self.batch if self.total is None else self.total

    def arrays(self, dtype: type) -> dict[str, numpy.ndarray]:
        rng = numpy.random.default_rng(self.seed)
        logits = (self.scale * rng.standard_normal((self.batch, self.classes))).astype(dtype)
        y = (rng.random(self.batch) < 0.5).astype(dtype)
        y[::3] = 0.25
        return {"logits": logits,
                "labels": rng.integers(0, self.classes, self.batch).astype(numpy.int64),
                "z": numpy.ascontiguousarray(logits[:, 0]), "y": y,
                "target": (logits + rng.standard_normal(logits.shape)).astype(dtype)}


LOSS_CASES = [
    LossCase("batch_1", 1, 5),
    LossCase("one_class", 6, 1),
    LossCase("two_classes", 5, 2, seed=1),
    # A batch that is not a multiple of a warp, more classes than a warp's lanes.
    LossCase("batch_37_classes_33", 37, 33, seed=2),
    # Logits of +-1e4: exp overflows without the shift by the row's max.
    LossCase("huge_logits", 9, 4, scale=1e4, seed=3),
    LossCase("total", 10, 7, total=25, seed=4),
    # More rows than the dispatcher's block and than grid2_block32's 64 threads.
    LossCase("grid_stride", 300, 10, total=512, seed=5),
]
loss_case_params = pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: c.name)


def emulated_loss_rows(family: str, reads: list[numpy.ndarray], sizes: list[int], scalar: float,
                       grad_shape: tuple[int, ...], dtype: type, config: str,
                       reverse: bool = False) -> tuple[numpy.ndarray, numpy.ndarray]:
    """loss.cu's per-row kernel ``family`` emulated one thread at a time: (grad, per_row).

    ``reads`` are its input arrays, ``sizes`` its int arguments (n first), ``scalar``
    its last (den or scale). Guard cells after both outputs must stay NaN."""
    lib = host_library("loss.cu")
    n = sizes[0]
    real = pointer(dtype)
    size = int(numpy.prod(grad_shape))
    grad = numpy.full(size + GUARD, numpy.nan, dtype=dtype)
    per_row = numpy.full(n + GUARD, numpy.nan, dtype=dtype)
    argtypes = ([pointer(r.dtype) for r in reads] + [real, real] + [ctypes.c_int] * len(sizes)
                + [numpy.ctypeslib.as_ctypes_type(numpy.dtype(dtype))])
    launch(lib, f"{family}_{suffix_of(dtype)}", *grid_and_block(config, n), argtypes,
           [*reads, grad, per_row, *sizes, scalar], reverse=reverse, warps=False)
    assert numpy.isnan(grad[size:]).all() and numpy.isnan(per_row[n:]).all(), \
        "the kernel wrote past its outputs"
    return grad[:size].reshape(grad_shape), per_row[:n]


def emulated_mean_of_rows(per_row: numpy.ndarray, den: float, grid=(1,), block=(kernels.WARP_SIZE,),
                          reverse: bool = False) -> numpy.ndarray:
    """loss.cu's mean_of_rows emulated (lanes in step): a 0-d array."""
    dtype = per_row.dtype
    out = numpy.full(1 + GUARD, numpy.nan, dtype=dtype)
    launch(host_library("loss.cu"), f"mean_of_rows_{suffix_of(dtype)}", grid, block,
           [pointer(dtype), pointer(dtype), ctypes.c_int,
            numpy.ctypeslib.as_ctypes_type(dtype)],
           [numpy.ascontiguousarray(per_row), out, per_row.shape[0], den], reverse=reverse)
    assert numpy.isnan(out[1:]).all(), "mean_of_rows wrote past its output"
    return out[:1].reshape(())


def emulated_loss(loss: str, a: dict, case: LossCase, dtype: type, config: str,
                  reverse: bool = False) -> tuple[numpy.ndarray, numpy.ndarray]:
    """(value, grad) of one of cupynn.kernels.loss's losses from loss.cu emulated: the
    per-row kernel under launch ``config``, then mean_of_rows on one warp."""
    n, den = case.batch, case.den
    if loss == "softmax_cross_entropy":
        grad, per_row = emulated_loss_rows(
            "softmax_cross_entropy_rows", [a["logits"], a["labels"]], [n, case.classes], den,
            a["logits"].shape, dtype, config, reverse)
    elif loss == "binary_cross_entropy":
        grad, per_row = emulated_loss_rows("binary_cross_entropy_rows", [a["z"], a["y"]], [n],
                                           den, a["z"].shape, dtype, config, reverse)
    else:
        grad, per_row = emulated_loss_rows(
            "squared_error_rows", [a["logits"], a["target"]], [n, case.classes],
            2.0 / (den * case.classes), a["logits"].shape, dtype, config, reverse)
        den = den * case.classes
    return emulated_mean_of_rows(per_row, den, reverse=reverse), grad


# Issue 19: the dispatchers' GPU paths with their kernels emulated on the CPU, the
# given buffers of a captured step (out=, sums=), and what the CPU paths allocate.
SCALAR_CTYPES = {numpy.int32: ctypes.c_int, numpy.int64: ctypes.c_longlong,
                 numpy.float32: ctypes.c_float, numpy.float64: ctypes.c_double}


def argtypes_of(name: str, args) -> list:
    """ctypes types of a RawKernel call's arguments: arrays as pointers to their dtype,
    NumPy scalars as their C type (the wrappers must not pass Python numbers)."""
    types = []
    for i, a in enumerate(args):
        if isinstance(a, numpy.ndarray):
            types.append(pointer(a.dtype))
        elif type(a) in SCALAR_CTYPES:
            types.append(SCALAR_CTYPES[type(a)])
        else:
            raise TypeError(f"{name}: argument {i} is a {type(a).__name__}; pass scalars as "
                            "numpy.int32/int64/float32/float64 (STYLE.md).")
    return types


def emulated_gpu(monkeypatch, module, source: str) -> list[tuple[str, tuple, tuple]]:
    """Make ``module``'s wrappers take NumPy arrays for GPU arrays and run ``source``'s
    kernels emulated on the CPU: their GPU path (given buffers, grids, empty shapes)
    without a GPU. Returns the list each launch appends (kernel, grid, block) to."""
    from cupynn.backend import Backend

    fake = Backend("gpu", numpy, None)  # NumPy arrays, taken for device arrays
    launches: list[tuple[str, tuple, tuple]] = []

    def cuda_function(filename: str, name: str):
        assert filename == source, f"{name} asked of {filename}"

        def kernel(grid: tuple, block: tuple, args: tuple) -> None:
            launches.append((name, tuple(grid), tuple(block)))
            launch(host_library(source), name, grid, block, argtypes_of(name, args),
                   [a if isinstance(a, numpy.ndarray) else a.item() for a in args])
        return kernel

    monkeypatch.setattr(module, "_check_same_backend", lambda what, *arrays: fake)
    if hasattr(module, "backend_of"):
        monkeypatch.setattr(module, "backend_of", lambda array: fake)
    monkeypatch.setattr(module, "cuda_function", cuda_function)
    return launches


def numpy_allocations(call) -> tuple[list[int], int]:
    """``call()`` under tracemalloc: (the sizes of NumPy data blocks it left allocated,
    by NumPy's tracemalloc domain; how far traced memory peaked above where it started,
    temporaries included)."""
    import tracemalloc

    if tracemalloc.is_tracing():
        pytest.skip("tracemalloc is already tracing in this process")
    numpy_data = tracemalloc.DomainFilter(True, numpy.lib.tracemalloc_domain)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot().filter_traces([numpy_data])
        tracemalloc.reset_peak()
        start, _ = tracemalloc.get_traced_memory()
        kept = call()  # what it returns stays alive until the snapshot
        _, peak = tracemalloc.get_traced_memory()
        after = tracemalloc.take_snapshot().filter_traces([numpy_data])
        del kept
    finally:
        tracemalloc.stop()
    new = [s.size_diff for s in after.compare_to(before, "lineno") if s.size_diff > 0]
    return new, peak - start


def assert_allocates_no(nbytes: int, call) -> None:
    """``call()``, after a warm-up call (compilation, caches), allocates no NumPy block
    of ``nbytes`` (an output's size) and its traced memory never grows by that much."""
    call()
    new, peak = numpy_allocations(call)
    assert max(new, default=0) < nbytes, f"NumPy blocks left allocated: {new}"
    assert peak < nbytes, f"traced memory peaked {peak} bytes above its start"


def assert_same_bits(got, expected) -> None:
    """Equal arrays, NaN where NaN and the sign of every zero as well."""
    got, expected = to_numpy(got), to_numpy(expected)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    numpy.testing.assert_array_equal(got, expected)
    if got.dtype.kind == "f":
        numpy.testing.assert_array_equal(numpy.signbit(got), numpy.signbit(expected))


def relu_grad_rowsum_argtypes(dtype: type) -> list:
    real = pointer(dtype)
    return [real] * 4 + [ctypes.c_int] * 3


def emulated_relu_grad_rowsum(dy: numpy.ndarray, y: numpy.ndarray | None, grid, block,
                              in_place: bool = False, reverse: bool = False
                              ) -> tuple[numpy.ndarray, numpy.ndarray]:
    """sddmm.cu's relu_grad_rowsum emulated (lanes in step): (out, sums). Guard cells
    after both must stay NaN; in place, ``out`` is a copy of dy written over."""
    dtype = dy.dtype.type
    n_rows, batch = dy.shape
    size = n_rows * batch
    source = guarded(dy.reshape(-1))
    out = source if in_place else numpy.full(size + GUARD, numpy.nan, dtype=dtype)
    sums = numpy.full(n_rows + GUARD, numpy.nan, dtype=dtype)
    launch(host_library("sddmm.cu"), f"relu_grad_rowsum_{suffix_of(dtype)}", grid, block,
           relu_grad_rowsum_argtypes(dtype),
           [source, source if y is None else numpy.ascontiguousarray(y), out, sums, n_rows,
            batch, int(y is not None)], reverse=reverse)
    assert numpy.isnan(out[size:]).all() and numpy.isnan(sums[n_rows:]).all(), \
        "relu_grad_rowsum wrote past its outputs"
    return out[:size].reshape(n_rows, batch), sums[:n_rows]



# spmm.cu's tiled kernels (issue 20). Launch shapes as (tile_cols, rows per block,
# grid): None for the dispatcher's; a narrow tile over several rows with two blocks
# striding; 32 rows a block (chunks of 32 entries: long_rows' rows take two); a wide
# tile one row per block; tiles of 1 and 3 columns (3 divides no batch here) on one
# block that does every item. Each block's threads are OS threads meeting at every
# __syncthreads, so the cases are small.
TILED_LAUNCHES = {
    "dispatcher": None,
    "tile8_rows4_grid2": (8, 4, 2),
    "tile2_rows32_grid2": (2, 32, 2),
    "tile32_rows1_grid3": (32, 1, 3),
    "tile1_rows8_grid1": (1, 8, 1),
    "tile3_rows5_grid1": (3, 5, 1),
}
TILED_CASES = [c for c in CASES if c.name not in ("large", "grid_stride")] + [
    # Rows of 30-50 nonzeros: longer than a chunk of 32 (rows=32) or 8 (chunk given).
    Case("long_rows", 11, 60, 10, 0.7, empty_rows=(0, 6)),
]


def tiled_launch(config: str, n_out: int, batch: int, chunk: int | None = None):
    """(grid, block, tile_cols, chunk) of ``TILED_LAUNCHES[config]``."""
    from cupynn.kernels.spmm import SPMM_TILE_SHARED, _spmm_tiles_launch

    if TILED_LAUNCHES[config] is None:
        grid, block, tile, default = _spmm_tiles_launch(n_out, batch, None)
    else:
        tile, rows, grid = TILED_LAUNCHES[config]
        grid, block, default = (grid,), (tile * rows,), SPMM_TILE_SHARED // rows
    return grid, block, tile, default if chunk is None else chunk


def emulated_spmm_tiled(a: dict, case: Case, dtype: type, config: str, bias: bool = False,
                        relu: bool = False, chunk: int | None = None,
                        reverse: bool = False) -> numpy.ndarray:
    """spmm.cu's spmm_tiled, emulated block by block: (n_rows, batch); guard cells stay NaN."""
    real = pointer(dtype)
    size = case.n_rows * case.batch
    out = numpy.full(size + GUARD, numpy.nan, dtype=dtype)
    grid, block, tile, chunk = tiled_launch(config, case.n_rows, case.batch, chunk)
    launch(host_library("spmm.cu"), f"spmm_tiled_{suffix_of(dtype)}", grid, block,
           [pointer(numpy.int32)] * 2 + [real] * 4 + [ctypes.c_int] * 6,
           [a["indptr"], a["indices"], a["data"], a["x"], a["bias"] if bias else a["data"], out,
            case.n_rows, case.batch, int(bias), int(relu), tile, chunk], reverse=reverse)
    assert numpy.isnan(out[size:]).all(), "the kernel wrote past its output"
    return out[:size].reshape(case.n_rows, case.batch)


def emulated_spmm_t_tiled(a: dict, case: Case, dtype: type, config: str,
                          chunk: int | None = None, reverse: bool = False) -> numpy.ndarray:
    """spmm.cu's spmm_t_tiled, emulated, through the transposed pattern: (n_cols, batch)."""
    real = pointer(dtype)
    size = case.n_cols * case.batch
    out = numpy.full(size + GUARD, numpy.nan, dtype=dtype)
    grid, block, tile, chunk = tiled_launch(config, case.n_cols, case.batch, chunk)
    t = kernels.transpose_pattern(a["indptr"], a["indices"], case.n_cols)
    launch(host_library("spmm.cu"), f"spmm_t_tiled_{suffix_of(dtype)}", grid, block,
           [pointer(numpy.int32)] * 3 + [real] * 3 + [ctypes.c_int] * 4,
           [*t, a["data"], a["dy"], out, case.n_cols, case.batch, tile, chunk], reverse=reverse)
    assert numpy.isnan(out[size:]).all(), "the kernel wrote past its output"
    return out[:size].reshape(case.n_cols, case.batch)


# sddmm_tiled (issue 20): a block per row, dy[r] staged in shared memory chunk by chunk.
# (grid, block, chunk): the dispatcher's block and chunk, blocks of two warps and one warp
# that stride over the rows, chunks smaller than the batches of SDDMM_TILED_CASES (several
# stages a row, the last one partial) and a chunk of one group's width.
SDDMM_TILED_LAUNCHES = {
    "dispatcher_block_grid3": ((3,), (THREADS_PER_BLOCK,), 512),
    "grid2_block64_chunk32": ((2,), (64,), 32),
    "one_warp_chunk16": ((1,), (32,), 16),
}
SDDMM_TILED_GROUPS = [1, 4, 16]
# The warp kernel's cases (empty rows, an empty matrix, batch 0 and 1, rows striding over
# the grid), a batch longer than the chunks and not a multiple of them (70), and rows longer
# than a pass of one warp (32 / group * 4 nonzeros) over two chunks of 16.
SDDMM_TILED_CASES = [c for c in WARP_CASES if c.name != "mid"] + [
    Case("batch_70", 6, 9, 70, 0.5, empty_rows=(2,)),
    Case("long_rows", 4, 150, 20, 0.9, empty_rows=(1,), seed=3)]


def sddmm_tiled_argtypes(dtype: type) -> list:
    real = pointer(dtype)
    return [pointer(numpy.int32), pointer(numpy.int32), real, real, real] + [ctypes.c_int] * 4


def launch_sddmm_tiled(a: dict, dtype: type, group: int, grid, block, chunk: int,
                       reverse: bool = False) -> numpy.ndarray:
    """The emulated sddmm_tiled kernel's output for arrays ``a`` (block by block, the
    threads of a block meeting at its barriers); the guard cells after it must stay NaN."""
    nnz = len(a["indices"])
    out = numpy.full(nnz + GUARD, numpy.nan, dtype=dtype)
    launch(host_library("sddmm.cu"), f"sddmm_tiled_{suffix_of(dtype)}", grid, block,
           sddmm_tiled_argtypes(dtype),
           [a["indptr"], a["indices"], a["dy"], a["x"], out, len(a["indptr"]) - 1,
            a["dy"].shape[1], group, chunk], reverse=reverse, blocks=True)
    assert numpy.isnan(out[nnz:]).all(), "the kernel wrote past nnz"
    return out[:nnz]

"""The CPU emulation of warp-level CUDA calls (``tests/cuda_host``) against CUDA's rules.

Kernels whose lanes meet in warp-level calls run warp by warp, the lanes as OS
threads (``launch(..., warps=True)``, chosen by default for such sources). These
tests pin the emulation to the semantics of the CUDA C++ Programming Guide:
shuffles (``__shfl_sync`` with a source lane taken modulo ``width``,
``__shfl_up_sync`` / ``__shfl_down_sync`` keeping their own value past the ends
of a segment of ``width`` lanes, ``__shfl_xor_sync`` reading earlier segments
but not later ones), votes (``__ballot_sync``, ``__any_sync``, ``__all_sync``)
and ``__syncwarp`` with a partial mask; and to the errors it raises where CUDA
leaves the result undefined, so that a kernel that relies on undefined
behaviour fails here instead of passing by luck.
"""

from __future__ import annotations

import ctypes
import os

import numpy
import pytest

try:  # tests/ is on sys.path (pytest's default rootdir-relative import)
    from cuda_host import HostCompilerMissing, WarpError, compile_cu, launch, pointer
except ModuleNotFoundError:  # tests/ became a package
    from tests.cuda_host import HostCompilerMissing, WarpError, compile_cu, launch, pointer

from kernel_cases import skip_or_fail  # noqa: E402
FULL = 0xFFFFFFFF
I32 = pointer(numpy.int32)

SOURCE = r'''
extern "C" __global__ void shuffles(const int* arg, int* out, int width) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    const int v = 100 * (int)blockIdx.x + (int)threadIdx.x;
    out[4 * t + 0] = __shfl_sync(0xffffffffu, v, arg[t], width);
    out[4 * t + 1] = __shfl_up_sync(0xffffffffu, v, (unsigned)arg[t], width);
    out[4 * t + 2] = __shfl_down_sync(0xffffffffu, v, (unsigned)arg[t], width);
    out[4 * t + 3] = __shfl_xor_sync(0xffffffffu, v, arg[t], width);
}

extern "C" __global__ void wide(const double* x, double* out, long long* big) {
    const int t = threadIdx.x;
    out[t] = __shfl_down_sync(0xffffffffu, x[t], 1);
    big[t] = __shfl_xor_sync(0xffffffffu, big[t] * 1000000007LL, 5);
}

extern "C" __global__ void votes(const int* pred, unsigned* out) {
    const int t = threadIdx.x;
    out[3 * t + 0] = __ballot_sync(0xffffffffu, pred[t]);
    out[3 * t + 1] = __any_sync(0xffffffffu, pred[t]);
    out[3 * t + 2] = __all_sync(0xffffffffu, pred[t]);
}

// Lanes 0-15 meet among themselves (twice); lanes 16-31 never call anything.
extern "C" __global__ void half_warp(int* out) {
    const int t = threadIdx.x;
    if (t < 16) {
        __syncwarp(0x0000ffffu);
        out[t] = __shfl_down_sync(0x0000ffffu, t, 8, 16);
    } else {
        out[t] = -t;
    }
}

extern "C" __global__ void divergent(int* out) {
    const int t = threadIdx.x;
    if (t < 16) out[t] = __shfl_xor_sync(0xffffffffu, t, 1);
    else out[t] = __shfl_xor_sync(0xffffffffu, t, 2);
}

extern "C" __global__ void full_mask(int* out) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 1);
}

extern "C" __global__ void early_return(int* out) {
    const int t = threadIdx.x;
    if (t == 7) return;
    out[t] = __shfl_xor_sync(0xffffffffu, t, 1);
}

extern "C" __global__ void self_excluded(int* out) {
    const int t = threadIdx.x;
    out[t] = __shfl_xor_sync(t == 3 ? 0xfffffff7u : 0xffffffffu, t, 1);
}

extern "C" __global__ void outside_mask(int* out) {
    const int t = threadIdx.x;
    if (t < 16) out[t] = __shfl_sync(0x0000ffffu, t, 20);
}

extern "C" __global__ void bad_width(int* out) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 1, 12);
}
'''


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    source = tmp_path_factory.mktemp("warp") / "warp.cu"
    source.write_text(SOURCE)
    try:
        return compile_cu(source)
    except HostCompilerMissing as exc:
        skip_or_fail(str(exc))


def cuda_sources(lane: int, arg: int, width: int) -> tuple[int, int, int, int]:
    """The source lanes CUDA's four shuffles read for ``lane`` (own lane when out of range)."""
    base = lane - lane % width
    within = lane - base
    idx = base + arg % width
    up = lane - arg if within >= arg else lane
    down = lane + arg if within + arg < width else lane
    xor = lane ^ arg
    if xor >= base + width:
        xor = lane
    return idx, up, down, xor


@pytest.mark.parametrize("width", [32, 16, 8, 4, 2, 1])
def test_shuffles_follow_cuda(lib, width):
    rng = numpy.random.default_rng(width)
    blocks, threads = 2, 64  # four warps
    arg = rng.integers(0, 40, size=blocks * threads).astype(numpy.int32)
    out = numpy.full(4 * blocks * threads, -1, dtype=numpy.int32)
    launch(lib, "shuffles", blocks, threads, [I32, I32, ctypes.c_int], [arg, out, width])
    got = out.reshape(-1, 4)
    for t in range(blocks * threads):
        block, thread = divmod(t, threads)
        warp_start, lane = thread - thread % 32, thread % 32
        expected = [100 * block + warp_start + src for src in cuda_sources(lane, int(arg[t]), width)]
        assert list(got[t]) == expected, f"thread {t} (lane {lane}, arg {arg[t]})"


def test_eight_byte_values_travel_whole(lib):
    x = numpy.linspace(-1.5, 2.5, 32)
    big = numpy.arange(1, 33, dtype=numpy.int64) * (1 << 33)
    out = numpy.zeros(32)
    expected_big = (big * 1000000007)[numpy.arange(32) ^ 5]
    launch(lib, "wide", 1, 32, [pointer(numpy.float64)] * 2 + [pointer(numpy.int64)], [x, out, big])
    assert numpy.array_equal(out, numpy.append(x[1:], x[31]))
    assert numpy.array_equal(big, expected_big)


@pytest.mark.parametrize("pattern", ["none", "one", "all", "random"])
def test_votes_follow_cuda(lib, pattern):
    pred = {"none": numpy.zeros(32), "one": numpy.eye(1, 32, 9)[0], "all": numpy.full(32, 3),
            "random": numpy.random.default_rng(0).integers(0, 2, 32)}[pattern].astype(numpy.int32)
    out = numpy.zeros(3 * 32, dtype=numpy.uint32)
    launch(lib, "votes", 1, 32, [I32, pointer(numpy.uint32)], [pred, out])
    ballot = sum(1 << i for i in range(32) if pred[i])
    assert list(out.reshape(32, 3)[:, 0]) == [ballot] * 32
    assert list(out.reshape(32, 3)[:, 1]) == [int(ballot != 0)] * 32
    assert list(out.reshape(32, 3)[:, 2]) == [int(ballot == FULL)] * 32


def test_half_warp_meets_without_the_other_half(lib):
    out = numpy.zeros(32, dtype=numpy.int32)
    launch(lib, "half_warp", 1, 32, [I32], [out])
    assert list(out[:16]) == [t + 8 if t < 8 else t for t in range(16)]
    assert list(out[16:]) == [-t for t in range(16, 32)]


@pytest.mark.parametrize("kernel, block, message", [
    ("divergent", 32, r"divergent warp-level calls: lanes .* wait at __shfl_xor_sync \(line \d+"),
    ("early_return", 32, "lane 7 returned while lanes .* wait for it at __shfl_xor_sync"),
    ("self_excluded", 32, "lane 3 called __shfl_xor_sync .* mask 0xfffffff7, which leaves itself"),
    ("outside_mask", 32, "asked __shfl_sync .* for the value of lane 20, outside mask 0x0000ffff"),
    ("bad_width", 32, "width 12 is not a power of two"),
    # A block of 40 threads: its second warp has 8 lanes, and a full mask names 24 more.
    ("full_mask", 40, "warp 1: .* lanes 0xffffff00 of that mask have returned or are not part"),
])
def test_undefined_meetings_raise(lib, kernel, block, message):
    out = numpy.zeros(64, dtype=numpy.int32)
    with pytest.raises(WarpError, match=message):
        launch(lib, kernel, 1, block, [I32], [out])


def test_warp_calls_outside_a_warp_launch_raise(lib):
    out = numpy.zeros(32, dtype=numpy.int32)
    with pytest.raises(WarpError, match="outside a warp launch"):
        launch(lib, "divergent", 1, 32, [I32], [out], warps=False)
    # The error was taken: the next, valid launch passes.
    launch(lib, "half_warp", 1, 32, [I32], [out])


def test_warp_sources_run_by_warps_by_default(lib):
    assert lib.cupynn_uses_warps
    plain = compile_cu(os.path.join(os.path.dirname(__file__), "..", "cupynn", "kernels",
                                    "adam.cu"))
    assert not plain.cupynn_uses_warps

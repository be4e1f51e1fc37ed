"""The CPU emulation of block-level CUDA (``tests/cuda_host``): ``__shared__`` memory and
``__syncthreads`` against CUDA's rules.

Kernels that use ``__shared__`` or ``__syncthreads`` run block by block, the threads of a
block as OS threads that share its shared memory and meet at its barriers
(``launch(..., blocks=True)``, chosen by default for such sources). These tests pin the
emulation to the CUDA C++ Programming Guide: a barrier waits for every thread of the block,
``__syncthreads_count/_and/_or`` reduce a predicate over them, static ``__shared__`` variables
and the ``extern __shared__`` array (``shared_mem`` bytes) belong to one block; and to the
errors raised where CUDA leaves the result undefined (a thread that returns while others reach
a barrier, divergent barriers), so that a kernel relying on undefined behaviour fails here
instead of passing by luck.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy
import pytest

try:  # tests/ is on sys.path (pytest's default rootdir-relative import)
    import cuda_host.emulate as emulate
    from cuda_host import (BlockError, HostCompileError, HostCompilerMissing, WarpError,
                           compile_cu, launch, pointer)
except ModuleNotFoundError:  # tests/ became a package
    import tests.cuda_host.emulate as emulate
    from tests.cuda_host import (BlockError, HostCompileError, HostCompilerMissing, WarpError,
                                 compile_cu, launch, pointer)

from kernel_cases import skip_or_fail  # noqa: E402
I32 = pointer(numpy.int32)
I64 = pointer(numpy.int64)
F32 = pointer(numpy.float32)
F64 = pointer(numpy.float64)
KERNEL_DIR = Path(__file__).resolve().parent.parent / "cupynn" / "kernels"

SOURCE = r'''
// At file scope, as CUDA allows.
__shared__ int file_scope_tile[64];

// Each block sums its slice of a grid-stride loop, then a tree in shared memory
// (any blockDim: a thread adds its partner's partial when it exists).
extern "C" __global__ void block_sum(const long long* x, long long* out, int n) {
    __shared__ long long tile[1024];
    const unsigned t = threadIdx.x;
    long long mine = 0;
    for (int i = blockIdx.x * blockDim.x + t; i < n; i += gridDim.x * blockDim.x) mine += x[i];
    tile[t] = mine;
    __syncthreads();
    for (unsigned s = 1; s < blockDim.x; s *= 2) {
        if (t % (2 * s) == 0 && t + s < blockDim.x) tile[t] += tile[t + s];
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = tile[0];
}

// The block's values reversed through dynamic shared memory, which holds an int
// and a double array one after the other.
extern "C" __global__ void reverse_dynamic(const int* x, int* out, double* twice) {
    extern __shared__ __align__(16) unsigned char raw[];
    double* d = reinterpret_cast<double*>(raw);
    int* i = reinterpret_cast<int*>(d + blockDim.x);
    const unsigned t = threadIdx.x, g = blockIdx.x * blockDim.x + t;
    i[t] = x[g];
    d[t] = 2.0 * x[g];
    __syncthreads();
    out[g] = i[blockDim.x - 1 - t];
    twice[g] = d[blockDim.x - 1 - t];
}

// What a block finds in its shared memory before writing it, then writes.
extern "C" __global__ void first_look(int* seen, float* seen_f, int* seen_dyn, int* seen_file) {
    __shared__ int cell[2];
    __shared__ float real;
    extern __shared__ int dyn[];
    const unsigned t = threadIdx.x, b = blockIdx.x;
    if (t == 0) {
        seen[2 * b] = cell[0];
        seen[2 * b + 1] = cell[1];
        seen_f[b] = real;
        seen_dyn[b] = dyn[0];
        seen_file[b] = file_scope_tile[0];
    }
    __syncthreads();
    if (t == 0) {
        cell[0] = cell[1] = 1000 + (int)b;
        real = 1.5f;
        dyn[0] = 2000 + (int)b;
        file_scope_tile[0] = 3000 + (int)b;
    }
    __syncthreads();
}

// Each thread writes its cell; thread 0 sums the block's cells: the block's own only.
extern "C" __global__ void own_cells(int* out) {
    __shared__ int cells[64];
    const unsigned t = threadIdx.x;
    cells[t] = 100 * (int)blockIdx.x + (int)t;
    __syncthreads();
    if (t == 0) {
        int sum = 0;
        for (unsigned i = 0; i < blockDim.x; ++i) sum += cells[i];
        out[blockIdx.x] = sum;
    }
}

// A neighbour's value: with the barrier, and without it (a race).
extern "C" __global__ void shift(const int* x, int* out) {
    __shared__ int tile[64];
    const unsigned t = threadIdx.x;
    tile[t] = x[t];
    __syncthreads();
    out[t] = tile[(t + 1) % blockDim.x];
}

extern "C" __global__ void shift_racy(const int* x, int* out) {
    __shared__ int tile[64];
    const unsigned t = threadIdx.x;
    tile[t] = x[t];
    out[t] = tile[(t + 1) % blockDim.x];
}

// Warp sums by shuffles, the warps' partial sums through shared memory, the
// last sum by the first warp's shuffles again: blockDim a multiple of 32.
extern "C" __global__ void warp_block_sum(const double* x, double* out) {
    __shared__ double partial[32];
    const unsigned t = threadIdx.x, lane = t % 32, warp = t / 32;
    double v = x[blockIdx.x * blockDim.x + t];
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < blockDim.x / 32 ? partial[lane] : 0.0;
        for (int offset = 16; offset > 0; offset /= 2)
            v += __shfl_down_sync(0xffffffffu, v, offset);
        if (lane == 0) out[blockIdx.x] = v;
    }
}

extern "C" __global__ void votes(const int* pred, int* out) {
    const unsigned t = threadIdx.x;
    const int count = __syncthreads_count(pred[t]);
    const int all = __syncthreads_and(pred[t]);
    const int any = __syncthreads_or(pred[t]);
    out[3 * t] = count;
    out[3 * t + 1] = all;
    out[3 * t + 2] = any;
}

// Shared memory in an inline device function (a COMDAT static: compile_cu's -fno-weak).
__device__ inline int block_max(int v) {
    __shared__ int best[64];
    best[threadIdx.x] = v;
    __syncthreads();
    int m = best[0];
    for (unsigned i = 1; i < blockDim.x; ++i) m = best[i] > m ? best[i] : m;
    __syncthreads();
    return m;
}

extern "C" __global__ void max_of_block(const int* x, int* out) {
    const unsigned g = blockIdx.x * blockDim.x + threadIdx.x;
    out[g] = block_max(x[g]);
}

// Shared memory in a function template (g++ 12 ignores its section: shared by the
// block's threads all the same, but not refilled between blocks).
template <typename T> __device__ T block_first(T v) {
    __shared__ T first;
    if (threadIdx.x == 0) first = v;
    __syncthreads();
    const T r = first;
    __syncthreads();
    return r;
}

extern "C" __global__ void broadcast_first(const double* x, double* out, const int* xi,
                                           int* outi) {
    const unsigned g = blockIdx.x * blockDim.x + threadIdx.x;
    out[g] = block_first(x[g]);
    outi[g] = block_first(xi[g]);
}

extern "C" __global__ void ids(int* out) {
    __syncthreads();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    out[i] = 1000 * (int)gridDim.x + 100 * (int)blockDim.x + i;
}

// Undefined: a thread leaves before a barrier the others reach.
extern "C" __global__ void early_return(int* out, int who) {
    if ((int)threadIdx.x == who) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}

// Undefined: two barriers, each reached by part of the block.
extern "C" __global__ void divergent(int* out) {
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}

// Undefined: the barrier inside a loop that threads take a different number of times.
extern "C" __global__ void loop_count(int* out) {
    for (unsigned i = 0; i <= threadIdx.x % 2; ++i) __syncthreads();
    __syncthreads_count(1);
    out[threadIdx.x] = 1;
}

// Undefined: lane 0 at the barrier while the other lanes wait for it at a shuffle.
extern "C" __global__ void barrier_vs_shuffle(int* out) {
    const unsigned t = threadIdx.x;
    if (t == 0) __syncthreads();
    else out[t] = __shfl_xor_sync(0xffffffffu, (int)t, 1);
}

// Undefined (warp level, inside a block launch): lane 7 of warp 1 leaves a shuffle.
extern "C" __global__ void shuffle_early_return(int* out) {
    const unsigned t = threadIdx.x;
    __syncthreads();
    if (t == 39) return;
    out[t] = __shfl_xor_sync(0xffffffffu, (int)t, 1);
}
'''


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    source = tmp_path_factory.mktemp("block") / "block.cu"
    source.write_text(SOURCE)
    return build(source)


def build(source: Path):
    try:
        return compile_cu(source)
    except HostCompilerMissing as exc:
        skip_or_fail(str(exc))


def block_sums(x: numpy.ndarray, grid: int, block: int) -> numpy.ndarray:
    """What block_sum's blocks return: block b sums x[i] for the i its threads stride over."""
    owner = (numpy.arange(len(x)) // block) % grid
    return numpy.array([x[owner == b].sum() for b in range(grid)], dtype=numpy.int64)


@pytest.mark.parametrize("grid, block", [(1, 1), (1, 32), (3, 64), (2, 100), (4, 256), (1, 1024)])
@pytest.mark.parametrize("reverse", [False, True])
def test_block_reduction_sums(lib, grid, block, reverse):
    x = numpy.random.default_rng(block).integers(-10**9, 10**9, size=3 * grid * block + 5)
    out = numpy.full(grid, -1, dtype=numpy.int64)
    launch(lib, "block_sum", grid, block, [I64, I64, ctypes.c_int], [x, out, len(x)],
           reverse=reverse)
    assert list(out) == list(block_sums(x, grid, block))
    assert out.sum() == x.sum()


def test_block_sources_run_by_blocks_by_default(lib):
    assert lib.cupynn_uses_blocks
    # loss.cu says "no __shared__" in a comment only: not a block source.
    assert not compile_cu(KERNEL_DIR / "loss.cu").cupynn_uses_blocks
    assert not compile_cu(KERNEL_DIR / "adam.cu").cupynn_uses_blocks


@pytest.mark.parametrize("grid, block", [(1, 1), (2, 32), (3, 50)])
def test_dynamic_shared_memory(lib, grid, block):
    n = grid * block
    x = numpy.arange(n, dtype=numpy.int32) * 3 + 1
    out = numpy.zeros(n, dtype=numpy.int32)
    twice = numpy.zeros(n)
    launch(lib, "reverse_dynamic", grid, block, [I32, I32, F64], [x, out, twice],
           shared_mem=block * (8 + 4))
    expected = x.reshape(grid, block)[:, ::-1].ravel()
    assert list(out) == list(expected)
    assert list(twice) == list(2.0 * expected)


def test_shared_memory_is_fresh_in_every_block(lib):
    """On a GPU a block's shared memory starts with whatever was there; here with 0xff bytes
    (-1, NaN) in every block, not with what the block before wrote."""
    grid = 3
    seen = numpy.zeros(2 * grid, dtype=numpy.int32)
    seen_f = numpy.zeros(grid, dtype=numpy.float32)
    seen_dyn = numpy.zeros(grid, dtype=numpy.int32)
    seen_file = numpy.zeros(grid, dtype=numpy.int32)
    for reverse in (False, True):
        launch(lib, "first_look", grid, 4, [I32, F32, I32, I32],
               [seen, seen_f, seen_dyn, seen_file], shared_mem=4, reverse=reverse)
        assert list(seen) == [-1] * (2 * grid)
        assert numpy.isnan(seen_f).all()
        assert list(seen_dyn) == [-1] * grid
        assert list(seen_file) == [-1] * grid


@pytest.mark.parametrize("reverse", [False, True])
def test_shared_memory_is_per_block(lib, reverse):
    grid, block = 4, 64
    out = numpy.zeros(grid, dtype=numpy.int32)
    launch(lib, "own_cells", grid, block, [I32], [out], reverse=reverse)
    assert list(out) == [sum(100 * b + t for t in range(block)) for b in range(grid)]


def test_inline_device_function_shares_memory(lib):
    grid, block = 2, 40
    x = numpy.random.default_rng(1).integers(-1000, 1000, size=grid * block).astype(numpy.int32)
    out = numpy.zeros_like(x)
    launch(lib, "max_of_block", grid, block, [I32, I32], [x, out])
    assert list(out) == list(numpy.repeat(x.reshape(grid, block).max(axis=1), block))


def test_function_template_shares_memory(lib):
    grid, block = 3, 33
    x = numpy.random.default_rng(2).normal(size=grid * block)
    xi = numpy.arange(grid * block, dtype=numpy.int32) * 7
    out, outi = numpy.zeros_like(x), numpy.zeros_like(xi)
    launch(lib, "broadcast_first", grid, block, [F64, F64, I32, I32], [x, out, xi, outi],
           reverse=True)
    assert list(out) == list(numpy.repeat(x[::block], block))
    assert list(outi) == list(numpy.repeat(xi[::block], block))


def test_block_launch_sets_every_thread_index(lib):
    out = numpy.full(3 * 5 + 1, -1, dtype=numpy.int32)
    launch(lib, "ids", 3, 5, [I32], [out])
    assert list(out[:15]) == [3500 + i for i in range(15)]
    assert out[15] == -1


@pytest.mark.parametrize("pattern", ["none", "one", "all", "random"])
def test_barrier_votes_follow_cuda(lib, pattern):
    block = 48
    pred = {"none": numpy.zeros(block), "one": numpy.eye(1, block, 40)[0],
            "all": numpy.full(block, 7),
            "random": numpy.random.default_rng(0).integers(0, 2, block)}[pattern]
    pred = pred.astype(numpy.int32)
    out = numpy.zeros(3 * block, dtype=numpy.int32)
    launch(lib, "votes", 1, block, [I32, I32], [pred, out])
    count = int(numpy.count_nonzero(pred))
    assert out.reshape(block, 3).tolist() == [[count, int(count == block), int(count > 0)]] * block


@pytest.mark.parametrize("grid, block", [(1, 32), (2, 64), (3, 96), (1, 1024)])
def test_warp_shuffles_and_barriers_together(lib, grid, block):
    x = numpy.random.default_rng(block).integers(-1000, 1000, size=grid * block).astype(float)
    out = numpy.zeros(grid)
    for reverse in (False, True):
        launch(lib, "warp_block_sum", grid, block, [F64, F64], [x, out], reverse=reverse)
        assert list(out) == list(x.reshape(grid, block).sum(axis=1))


def test_a_missing_barrier_shows_as_a_race(lib):
    """Threads run one at a time between barriers, first to last or last to first: without
    the barrier a thread reads its neighbour's cell before or after the neighbour writes it."""
    block = 64
    x = numpy.arange(block, dtype=numpy.int32) + 10
    expected = list(numpy.roll(x, -1))
    results = {}
    for kernel in ("shift", "shift_racy"):
        for reverse in (False, True):
            out = numpy.zeros(block, dtype=numpy.int32)
            launch(lib, kernel, 1, block, [I32, I32], [x, out], reverse=reverse)
            results[kernel, reverse] = list(out)
    assert results["shift", False] == results["shift", True] == expected
    assert results["shift_racy", False] != results["shift_racy", True]
    assert expected not in (results["shift_racy", False], results["shift_racy", True])
    # Forward, a thread reads its right neighbour before it writes: still 0xff bytes.
    assert results["shift_racy", False] == [-1] * (block - 1) + [x[0]]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("who", [0, 5, 31])
def test_a_thread_that_returns_before_a_barrier_raises(lib, who, reverse):
    out = numpy.zeros(32, dtype=numpy.int32)
    first = (who == 31) if reverse else (who == 0)
    if first:  # it returns before any thread reaches the barrier
        message = (rf"early_return, block 0: thread \d+ reached __syncthreads \(line \d+\) after "
                   rf"thread {who} of the block returned")
    else:
        waiting = 31 - who if reverse else who
        message = (rf"early_return, block 0: thread {who} returned while {waiting} threads of "
                   rf"the block wait for it at __syncthreads \(line \d+\)")
    with pytest.raises(BlockError, match=message):
        launch(lib, "early_return", 1, 32, [I32, ctypes.c_int], [out, who], reverse=reverse)


def test_all_threads_returning_is_fine(lib):
    """who = -1: nobody returns early, the barrier is reached by all."""
    out = numpy.zeros(32, dtype=numpy.int32)
    launch(lib, "early_return", 1, 32, [I32, ctypes.c_int], [out, -1])
    assert list(out) == [1] * 32


@pytest.mark.parametrize("reverse", [False, True])
def test_divergent_barriers_raise(lib, reverse):
    out = numpy.zeros(32, dtype=numpy.int32)
    with pytest.raises(BlockError, match=r"divergent barriers: 16 threads wait at __syncthreads "
                                         r"\(line \d+\) while thread \d+ reaches __syncthreads"):
        launch(lib, "divergent", 1, 32, [I32], [out], reverse=reverse)


def test_barrier_reached_a_different_number_of_times_raises(lib):
    out = numpy.zeros(4, dtype=numpy.int32)
    with pytest.raises(BlockError, match=r"divergent barriers: \d+ threads wait at "
                                         r"__syncthreads(_count)? \(line \d+\) while thread "
                                         r"\d+ reaches __syncthreads"):
        launch(lib, "loop_count", 1, 4, [I32], [out])


@pytest.mark.parametrize("reverse, message", [
    (False, r"lane 1 called __shfl_xor_sync .* but lanes 0x00000001 of that mask wait at "
            r"__syncthreads"),
    (True, r"thread 0 reached __syncthreads \(line \d+\) while lanes 0xfffffffe of its warp wait "
           r"for it at __shfl_xor_sync"),
])
def test_barrier_against_warp_call_raises(lib, reverse, message):
    out = numpy.zeros(32, dtype=numpy.int32)
    with pytest.raises(BlockError, match=message):
        launch(lib, "barrier_vs_shuffle", 1, 32, [I32], [out], reverse=reverse)


def test_warp_errors_in_a_block_launch_name_the_warp(lib):
    out = numpy.zeros(64, dtype=numpy.int32)
    with pytest.raises(WarpError, match=r"shuffle_early_return, block 0: warp 1: lane 7 returned "
                                        r"while lanes .* wait for it at __shfl_xor_sync"):
        launch(lib, "shuffle_early_return", 1, 64, [I32], [out])
    # The error was taken: the next, valid launch passes.
    launch(lib, "ids", 1, 64, [I32], [out])


def test_barrier_outside_a_block_launch_raises(lib):
    out = numpy.zeros(32, dtype=numpy.int32)
    for warps in (False, True):
        with pytest.raises(BlockError, match=r"__syncthreads \(line \d+\) was called outside a "
                                             r"block launch"):
            launch(lib, "ids", 1, 32, [I32], [out], blocks=False, warps=warps)
    launch(lib, "ids", 1, 32, [I32], [out])


def test_bad_launches_raise(lib):
    out = numpy.zeros(2048, dtype=numpy.int32)
    with pytest.raises(ValueError, match="a block has at most 1024 threads in CUDA .* Got 1025"):
        launch(lib, "ids", 1, 1025, [I32], [out])
    for shared_mem in (-1, 227 * 1024 + 1, 1.5):
        with pytest.raises(ValueError, match=r"shared_mem must be a number of bytes in \[0, "
                                             r"232448\]"):
            launch(lib, "ids", 1, 32, [I32], [out], shared_mem=shared_mem)


def test_unsupported_dynamic_shared_declaration_is_a_compile_error(tmp_path):
    source = tmp_path / "two.cu"
    source.write_text('extern "C" __global__ void two(float* out) {\n'
                      "    extern __shared__ float a[], b[];\n"
                      "    out[0] = a[0] + b[0];\n"
                      "}\n")
    with pytest.raises(HostCompileError, match=r"two.cu:2: cuda_host.h emulates dynamic "
                                               r"shared memory declared as "
                                               r"`extern __shared__ T name\[\];`"):
        build(source)


def test_comments_do_not_count(tmp_path):
    """Only code selects the launch and the rewriting: comments may name anything."""
    source = tmp_path / "comments.cu"
    source.write_text("// No __syncthreads, __shared__ or extern __shared__ float x[], y[];\n"
                      "/* nor __shfl_xor_sync */\n"
                      'extern "C" __global__ void plain(int* out) { out[threadIdx.x] = 7; }\n')
    plain = build(source)
    assert not plain.cupynn_uses_blocks and not plain.cupynn_uses_warps
    out = numpy.zeros(3, dtype=numpy.int32)
    launch(plain, "plain", 1, 3, [I32], [out])
    assert list(out) == [7, 7, 7]


def test_compile_errors_keep_the_file_and_line(tmp_path):
    """A rewritten file (extern __shared__) still reports the original file's name and lines."""
    source = tmp_path / "typo.cu"
    source.write_text('extern "C" __global__ void typo(float* out) {\n'
                      "    extern __shared__ float a[];\n"
                      "    out[0] = a[0] + not_declared;\n"
                      "}\n")
    with pytest.raises(HostCompileError, match=r"typo.cu:3:\d+: error: .not_declared."):
        build(source)


def test_a_thread_that_never_ends_raises_after_the_timeout(tmp_path, monkeypatch):
    """Threads run one at a time, so one spinning on a flag another thread sets would wait
    forever: launch gives up after LAUNCH_TIMEOUT_S (here the spin ends by itself later)."""
    source = tmp_path / "spin.cu"
    source.write_text(
        'extern "C" __global__ void spin(int* out) {\n'
        "    volatile __shared__ int flag;\n"
        "    if (threadIdx.x == 1) flag = 1;\n"
        "    if (threadIdx.x == 0) for (long i = 0; i < 400000000L && flag != 1; ++i) {}\n"
        "    __syncthreads();\n"
        "    out[threadIdx.x] = flag;\n"
        "}\n")
    spin = build(source)
    monkeypatch.setattr(emulate, "LAUNCH_TIMEOUT_S", 0.2)
    out = numpy.zeros(2, dtype=numpy.int32)
    with pytest.raises(BlockError, match=r"spin, block 0: 2 of its threads still ran after 0.2 s"):
        launch(spin, "spin", 1, 2, [I32], [out])
    with pytest.raises(BlockError, match="cannot launch again"):
        launch(spin, "spin", 1, 2, [I32], [out])

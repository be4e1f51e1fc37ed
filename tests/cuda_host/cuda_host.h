// cuda_host.h: compile a CUDA kernel file as plain C++ so that its kernels can
// run on the CPU.
//
//   g++ -x c++ -std=c++14 -O1 -shared -fPIC -pthread
//       -include tests/cuda_host/cuda_host.h kernel.cu -o libkernel.so
//
// A driver (tests/cuda_host/emulate.py) sets the built-in indices and then
// calls an extern "C" kernel as an ordinary function, in one of two ways:
//
// * one (block, thread) at a time, with cupynn_host_set_thread(): exact for
//   kernels whose threads are independent (one element per thread,
//   grid-stride loops, no communication);
// * warp by warp, with the warp's lanes running together as OS threads
//   (cupynn_host_begin_warp / cupynn_host_set_lane / cupynn_host_lane_exit /
//   cupynn_host_end_warp): for kernels whose lanes meet in warp-level calls
//   (__shfl*_sync, __syncwarp, __ballot_sync, __any_sync, __all_sync). Each
//   such call is a meeting of the lanes of its mask: a lane waits there until
//   every lane of the mask has arrived at the same call (same intrinsic, same
//   source line, same mask), and the results are computed from the values all
//   of them brought. A meeting that CUDA leaves undefined is reported as an
//   error instead of being given some answer: a lane of the mask that has
//   returned or is not part of the launch, lanes of one mask at different
//   calls, a lane whose mask leaves itself out, a shuffle from a lane outside
//   the mask, a width that is not a power of two up to 32, or a warp-level
//   call outside a warp launch. Lanes keep running after an error (getting
//   their own value back) so that the warp ends; the driver then raises.
//
// Block-level cooperation (__shared__ memory, __syncthreads) is still out of
// reach, so those names are compile errors here rather than silently wrong.
// Atomics are left undeclared for the same reason: a kernel that needs them
// fails to compile.

#ifndef CUPYNN_CUDA_HOST_H
#define CUPYNN_CUDA_HOST_H

#ifdef __CUDACC__
#error "cuda_host.h is for compiling kernels as host C++ (g++), not with nvcc or NVRTC."
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>

// Function and variable qualifiers: plain host C++.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __constant__
// g++ understands __restrict__ itself.

// Cooperation within a block: out of scope, so a compile error.
// static_assert(false) outside any template dependency is diagnosed where the
// kernel uses the name, even inside a template that is never instantiated.
#define CUPYNN_HOST_UNSUPPORTED(what) \
    static_assert(false, "cuda_host.h: " #what " needs threads that run together; " \
                  "this kernel cannot be emulated one thread at a time")
#define __shared__ CUPYNN_HOST_UNSUPPORTED(__shared__);
#define __syncthreads() CUPYNN_HOST_UNSUPPORTED(__syncthreads)
#define __syncthreads_count(p) CUPYNN_HOST_UNSUPPORTED(__syncthreads_count)
#define __syncthreads_and(p) CUPYNN_HOST_UNSUPPORTED(__syncthreads_and)
#define __syncthreads_or(p) CUPYNN_HOST_UNSUPPORTED(__syncthreads_or)

// The math a kernel calls unqualified. `using std::sqrt` brings in the float
// overload, so sqrt(float) stays in single precision as it does on the GPU.
using std::abs;
using std::ceil;
using std::exp;
using std::fabs;
using std::floor;
using std::fma;
using std::fmax;
using std::fmin;
using std::isfinite;
using std::isnan;
using std::log;
using std::log1p;
using std::pow;
using std::sqrt;
using std::tanh;

inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline double rsqrt(double a) { return 1.0 / std::sqrt(a); }
template <typename T> inline T __ldg(const T* p) { return *p; }

// Built-in indices, with CUDA's types (unsigned components). Thread-local, so
// that the lanes of a warp, each an OS thread, see their own.
struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x, y, z; };

static thread_local uint3 threadIdx = {0, 0, 0};
static thread_local uint3 blockIdx = {0, 0, 0};
static thread_local dim3 blockDim = {1, 1, 1};
static thread_local dim3 gridDim = {1, 1, 1};
static const int warpSize = 32;

#include <chrono>
#include <cstdarg>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>

namespace cupynn_host {

// The warp being run (one at a time) and the meeting its lanes are at.
struct Warp {
    std::mutex mu;
    std::condition_variable cv;
    unsigned live = 0;        // lanes that are part of the launch and have not returned
    unsigned pending = 0;     // lanes waiting at the current meeting
    unsigned mask = 0;        // the current meeting's mask
    const char* what = "";    // its intrinsic
    int line = 0;             // its source line
    unsigned long long generation = 0;  // meetings completed
    unsigned long long in[32];          // what each lane brought
    int src[32];                        // the lane whose value each lane asks for
    unsigned long long out[32];         // each lane's result
    unsigned ballot[32];                // each lane's ballot of the predicates
    bool failed = false;
    char error[1024] = {0};
};

inline Warp& warp() { static Warp w; return w; }
static thread_local bool in_warp_launch = false;
static const std::chrono::seconds MEETING_TIMEOUT(20);

inline unsigned lane_id() { return threadIdx.x % 32u; }

// Record the first error (the caller holds the lock) and wake every waiting lane.
inline void fail(Warp& w, const char* format, ...) __attribute__((format(printf, 2, 3)));
inline void fail(Warp& w, const char* format, ...)
{
    if (!w.failed) {
        va_list args;
        va_start(args, format);
        std::vsnprintf(w.error, sizeof(w.error), format, args);
        va_end(args);
        w.failed = true;
    }
    w.cv.notify_all();
}

// Lane `lane` meets the other lanes of `mask` at `what` (source `line`),
// bringing `value` and asking for the value of lane `src`. Returns that value
// (or, with `ballot_out`, also the ballot of the values brought).
inline unsigned long long meet(const char* what, int line, unsigned mask, unsigned long long value,
                               int src, unsigned* ballot_out = nullptr)
{
    const unsigned lane = lane_id();
    const unsigned bit = 1u << lane;
    Warp& w = warp();
    std::unique_lock<std::mutex> lock(w.mu);
    if (!in_warp_launch) {
        fail(w, "%s (line %d) was called outside a warp launch: this kernel's lanes meet, so "
             "run it with launch(..., warps=True)", what, line);
        return value;
    }
    if (w.failed) return value;
    if (!(mask & bit)) {
        fail(w, "lane %u called %s (line %d) with mask 0x%08x, which leaves itself out",
             lane, what, line, mask);
        return value;
    }
    if (mask & ~w.live) {
        fail(w, "lane %u called %s (line %d) with mask 0x%08x, but lanes 0x%08x of that mask "
             "have returned or are not part of the launch", lane, what, line, mask,
             mask & ~w.live);
        return value;
    }
    if (src >= 0 && !((mask >> src) & 1u)) {
        fail(w, "lane %u asked %s (line %d) for the value of lane %d, outside mask 0x%08x",
             lane, what, line, src, mask);
        return value;
    }
    if (w.pending == 0) {
        w.mask = mask;
        w.what = what;
        w.line = line;
    } else if (w.mask != mask || w.line != line || std::strcmp(w.what, what) != 0) {
        fail(w, "divergent warp-level calls: lanes 0x%08x wait at %s (line %d, mask 0x%08x) "
             "while lane %u calls %s (line %d, mask 0x%08x)", w.pending, w.what, w.line, w.mask,
             lane, what, line, mask);
        return value;
    }
    w.in[lane] = value;
    w.src[lane] = src;
    w.pending |= bit;
    if (w.pending == w.mask) {  // the last to arrive: everyone's results
        unsigned votes = 0;
        for (unsigned l = 0; l < 32; ++l)
            if (((w.mask >> l) & 1u) && w.in[l] != 0) votes |= 1u << l;
        for (unsigned l = 0; l < 32; ++l) {
            if (!((w.mask >> l) & 1u)) continue;
            w.out[l] = w.src[l] >= 0 ? w.in[w.src[l]] : w.in[l];
            w.ballot[l] = votes;
        }
        w.pending = 0;
        ++w.generation;
        w.cv.notify_all();
    } else {
        const unsigned long long generation = w.generation;
        const bool met = w.cv.wait_for(lock, MEETING_TIMEOUT, [&] {
            return w.generation != generation || w.failed;
        });
        if (!met)
            fail(w, "lanes 0x%08x waited %lld s at %s (line %d) for lanes 0x%08x of mask 0x%08x "
                 "that never came", w.pending, (long long)MEETING_TIMEOUT.count(), w.what,
                 w.line, w.mask & ~w.pending, w.mask);
        if (w.failed) return value;
    }
    if (ballot_out) *ballot_out = w.ballot[lane];
    return w.out[lane];
}

template <typename T>
inline unsigned long long bits_of(T v)
{
    static_assert(sizeof(T) <= sizeof(unsigned long long), "a shuffled value fits 8 bytes");
    unsigned long long b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}

template <typename T>
inline T from_bits(unsigned long long b)
{
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}

// The first lane of `lane`'s segment of `width` lanes (width checked by the caller).
inline int segment_start(unsigned lane, int width) { return (int)(lane & ~(unsigned)(width - 1)); }

inline bool width_ok(const char* what, int line, int width)
{
    if (width >= 1 && width <= 32 && (width & (width - 1)) == 0) return true;
    Warp& w = warp();
    std::lock_guard<std::mutex> lock(w.mu);
    fail(w, "%s (line %d): width %d is not a power of two in [1, 32]", what, line, width);
    return false;
}

template <typename T>
inline T shfl(int line, unsigned mask, T var, int src_lane, int width = 32)
{
    if (!width_ok("__shfl_sync", line, width)) return var;
    const unsigned lane = lane_id();
    const int src = segment_start(lane, width) + (src_lane % width + width) % width;
    return from_bits<T>(meet("__shfl_sync", line, mask, bits_of(var), src));
}

template <typename T>
inline T shfl_up(int line, unsigned mask, T var, unsigned delta, int width = 32)
{
    if (!width_ok("__shfl_up_sync", line, width)) return var;
    const unsigned lane = lane_id();
    const int within = (int)lane - segment_start(lane, width);
    const int src = within >= (int)delta ? (int)(lane - delta) : (int)lane;
    return from_bits<T>(meet("__shfl_up_sync", line, mask, bits_of(var), src));
}

template <typename T>
inline T shfl_down(int line, unsigned mask, T var, unsigned delta, int width = 32)
{
    if (!width_ok("__shfl_down_sync", line, width)) return var;
    const unsigned lane = lane_id();
    const int within = (int)lane - segment_start(lane, width);
    const int src = within + (int)delta < width ? (int)(lane + delta) : (int)lane;
    return from_bits<T>(meet("__shfl_down_sync", line, mask, bits_of(var), src));
}

template <typename T>
inline T shfl_xor(int line, unsigned mask, T var, int lane_mask, int width = 32)
{
    if (!width_ok("__shfl_xor_sync", line, width)) return var;
    const unsigned lane = lane_id();
    int src = (int)(lane ^ (unsigned)lane_mask);
    // A lane may read from earlier segments, not from later ones (own value then).
    if (src >= segment_start(lane, width) + width) src = (int)lane;
    return from_bits<T>(meet("__shfl_xor_sync", line, mask, bits_of(var), src));
}

inline void syncwarp(int line, unsigned mask = 0xffffffffu)
{
    meet("__syncwarp", line, mask, 0, -1);
}

inline unsigned ballot(const char* what, int line, unsigned mask, int predicate)
{
    unsigned votes = 0;
    meet(what, line, mask, predicate != 0, -1, &votes);
    return votes;
}

}  // namespace cupynn_host

#define __shfl_sync(mask, ...) cupynn_host::shfl(__LINE__, mask, __VA_ARGS__)
#define __shfl_up_sync(mask, ...) cupynn_host::shfl_up(__LINE__, mask, __VA_ARGS__)
#define __shfl_down_sync(mask, ...) cupynn_host::shfl_down(__LINE__, mask, __VA_ARGS__)
#define __shfl_xor_sync(mask, ...) cupynn_host::shfl_xor(__LINE__, mask, __VA_ARGS__)
#define __syncwarp(...) cupynn_host::syncwarp(__LINE__, ##__VA_ARGS__)
#define __ballot_sync(mask, p) cupynn_host::ballot("__ballot_sync", __LINE__, mask, (p))
#define __any_sync(mask, p) (cupynn_host::ballot("__any_sync", __LINE__, mask, (p)) != 0u)
#define __all_sync(mask, p) \
    (cupynn_host::ballot("__all_sync", __LINE__, mask, (p)) == (unsigned)(mask))

// Set the indices of the (block, thread) the next kernel call plays, one thread at a time.
extern "C" void cupynn_host_set_thread(unsigned int block, unsigned int thread,
                                       unsigned int block_dim, unsigned int grid_dim)
{
    blockIdx = {block, 0, 0};
    threadIdx = {thread, 0, 0};
    blockDim = {block_dim, 1, 1};
    gridDim = {grid_dim, 1, 1};
    cupynn_host::in_warp_launch = false;
}

// Warp launches: begin a warp whose lanes `live` take part, then on each lane's
// own OS thread set_lane, the kernel call and lane_exit; then take_error.
extern "C" void cupynn_host_begin_warp(unsigned int live)
{
    cupynn_host::Warp& w = cupynn_host::warp();
    std::lock_guard<std::mutex> lock(w.mu);
    w.live = live;
    w.pending = 0;
    w.generation = 0;
    w.failed = false;
    w.error[0] = 0;
}

extern "C" void cupynn_host_set_lane(unsigned int block, unsigned int thread,
                                     unsigned int block_dim, unsigned int grid_dim)
{
    cupynn_host_set_thread(block, thread, block_dim, grid_dim);
    cupynn_host::in_warp_launch = true;
}

extern "C" void cupynn_host_lane_exit(void)
{
    cupynn_host::Warp& w = cupynn_host::warp();
    const unsigned bit = 1u << cupynn_host::lane_id();
    std::lock_guard<std::mutex> lock(w.mu);
    w.live &= ~bit;
    if (w.pending && (w.mask & bit))
        cupynn_host::fail(w, "lane %u returned while lanes 0x%08x wait for it at %s (line %d, "
                          "mask 0x%08x)", cupynn_host::lane_id(), w.pending, w.what, w.line,
                          w.mask);
    cupynn_host::in_warp_launch = false;
}

// The error of the last warp, or of a warp-level call made outside a warp
// launch (which end_warp cannot report); cleared by taking it.
extern "C" const char* cupynn_host_take_error(void)
{
    static thread_local char taken[sizeof(cupynn_host::Warp::error)];
    cupynn_host::Warp& w = cupynn_host::warp();
    std::lock_guard<std::mutex> lock(w.mu);
    if (!w.failed) return nullptr;
    std::memcpy(taken, w.error, sizeof(taken));
    w.failed = false;
    w.error[0] = 0;
    return taken;
}

#endif  // CUPYNN_CUDA_HOST_H

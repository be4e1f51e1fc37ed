// cuda_host.h: compile a CUDA kernel file as plain C++ so that its kernels can
// run on the CPU.
//
//   g++ -x c++ -std=c++14 -O1 -shared -fPIC -pthread [-fno-weak]
//       -include tests/cuda_host/cuda_host.h kernel.cu -o libkernel.so
//
// (-fno-weak where the file declares __shared__ variables, and `extern
// __shared__` declarations rewritten first: tests/cuda_host/emulate.py's
// compile_cu does both.) The driver, emulate.py's launch(), sets the built-in
// indices and then calls an extern "C" kernel as an ordinary function, in one
// of three ways:
//
// * one (block, thread) at a time, with cupynn_host_set_thread(): exact for
//   kernels whose threads are independent (one element per thread,
//   grid-stride loops, no communication);
// * warp by warp: the lanes of one warp are OS threads running the kernel
//   together, for kernels whose lanes meet in warp-level calls (__shfl*_sync,
//   __syncwarp, __ballot_sync, __any_sync, __all_sync);
// * block by block: all the threads of one block (at most 1024) are OS
//   threads running the kernel together, for kernels that use __shared__
//   memory or __syncthreads. Warp-level calls work there too, each warp's
//   lanes meeting as in a warp launch.
//
// In the last two, the threads run one at a time, handing a baton on: a
// thread runs until it waits at a meeting or a barrier, or returns; then the
// first thread in launch order (last to first in a reversed launch) that can
// go on runs. So a run is deterministic, the kernel's memory accesses never
// race in C++, and a kernel whose result depends on the order of its threads
// between two barriers (a missing __syncthreads) gives a different result
// reversed. A thread that spins on memory another thread writes never ends;
// the driver gives up after a timeout.
//
// Warp-level calls. Each is a meeting of the lanes of its mask: a lane waits
// there until every lane of the mask has arrived at the same call (same
// intrinsic, same source line, same mask), and the results are computed from
// the values all of them brought.
//
// __syncthreads() (and __syncthreads_count/_and/_or) is a barrier of every
// thread of the block: a thread waits there until all the block's threads have
// arrived at the same call (same function, file and line).
//
// A meeting or barrier that CUDA leaves undefined is reported as an error
// instead of being given some answer:
// * warp level: a lane of the mask that has returned or is not part of the
//   launch, lanes of one mask at different calls, a lane whose mask leaves
//   itself out, a shuffle from a lane outside the mask, a width that is not a
//   power of two up to 32, a warp-level call outside a warp or block launch;
// * block level: a thread that reaches a __syncthreads after another thread
//   of the block has returned, or returns while others wait at one (CUDA
//   requires every thread of the block to reach each barrier); threads at
//   different __syncthreads calls (divergent barriers, a barrier inside a
//   branch or loop that not all threads take equally often); a thread at a
//   barrier while lanes of its warp wait for it at a warp-level call, or the
//   other way round; a barrier outside a block launch;
// * any launch: every thread that has not returned waits and none can go on
//   (a deadlock), reported at once, never a hang.
// Threads keep running after an error (getting their own value back, barriers
// letting them through) so that the launch ends; the driver then raises.
//
// __shared__ memory. `__shared__ T name[N];` (in a kernel, a device function
// or at file scope) becomes a static variable in the ELF section
// "cupynn_shared", so the threads of a block, which run together, share it.
// Blocks run one after another, so they cannot see each other's; and at the
// start of every block the driver fills the whole section with 0xff bytes (a
// NaN in float or double, -1 in signed integers), so a kernel that reads
// shared memory it has not written in this block reads numbers that show.
// `extern __shared__ T name[];` (dynamic shared memory, sized by the launch's
// shared_mem) becomes a pointer into one arena of DYNAMIC_SHARED_CAPACITY
// bytes, filled with 0xff for the launch's size at the start of every block.
// Limitations: g++ ignores the section of a static variable inside a function
// template (GCC bug 70435), so a __shared__ variable declared in a template is
// shared and kept from block to block, not refilled; and the section holds the
// __shared__ variables of all the file's kernels, not only the launched one's.
//
// Atomics are left undeclared: a kernel that needs them fails to compile.

#ifndef CUPYNN_CUDA_HOST_H
#define CUPYNN_CUDA_HOST_H

#ifdef __CUDACC__
#error "cuda_host.h is for compiling kernels as host C++ (g++), not with nvcc or NVRTC."
#endif

#include <cmath>
#include <condition_variable>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>

// Function and variable qualifiers: plain host C++.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __constant__
#define __align__(n) __attribute__((aligned(n)))
// g++ understands __restrict__ itself.

// Shared memory: static storage in one section, refilled with 0xff at the
// start of every block (cupynn_host_begin_block). Inline functions' statics are
// COMDAT, which g++ refuses to mix with plain ones in one section unless
// compiled with -fno-weak (compile_cu adds it to files that declare any).
#define __shared__ static __attribute__((section("cupynn_shared")))

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
// that the threads of a warp or block, each an OS thread, see their own.
struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x, y, z; };

static thread_local uint3 threadIdx = {0, 0, 0};
static thread_local uint3 blockIdx = {0, 0, 0};
static thread_local dim3 blockDim = {1, 1, 1};
static thread_local dim3 gridDim = {1, 1, 1};
static const int warpSize = 32;

// The bounds of the section (the linker defines them); the anchor makes sure
// the section exists in a file without __shared__ variables.
extern "C" char __start_cupynn_shared[] __attribute__((visibility("hidden")));
extern "C" char __stop_cupynn_shared[] __attribute__((visibility("hidden")));

namespace cupynn_host {

static char shared_anchor __attribute__((section("cupynn_shared"), used)) = 0;

// The most dynamic shared memory a launch may ask for: 227 KiB, what an
// H100 allows a kernel that opts in (48 KiB without).
const std::size_t DYNAMIC_SHARED_CAPACITY = 227 * 1024;
alignas(128) static unsigned char dynamic_arena[DYNAMIC_SHARED_CAPACITY];

// What `extern __shared__ T name[];` becomes (emulate.py rewrites it).
inline void* dynamic_shared() { return dynamic_arena; }

const unsigned MAX_THREADS = 1024;  // CUDA's limit on the threads of a block

enum Mode { ONE_THREAD = 0, WARP = 1, BLOCK = 2 };
enum State : unsigned char { RUNNABLE, WAITING, DONE };

// A warp's lanes and the meeting they are at.
struct Warp {
    unsigned live = 0;        // lanes that are part of the launch and have not returned
    unsigned pending = 0;     // lanes waiting at the current meeting
    unsigned at_barrier = 0;  // lanes waiting at a __syncthreads
    unsigned mask = 0;        // the current meeting's mask
    const char* what = "";    // its intrinsic
    int line = 0;             // its source line
    unsigned long long in[32];   // what each lane brought
    int src[32];                 // the lane whose value each lane asks for
    unsigned long long out[32];  // each lane's result
    unsigned ballot[32];         // each lane's ballot of the predicates
};

// The threads that run together (one warp, or one block), the baton they hand
// on, their meetings and barrier, and the first error.
struct Group {
    std::mutex mu;
    std::condition_variable turn[MAX_THREADS];  // one per thread: who runs next
    State state[MAX_THREADS];
    int mode = ONE_THREAD;
    unsigned lo = 0, hi = 0;  // the group is threads [lo, hi) of the block
    bool reverse = false;     // hand the baton on last to first
    int running = -1;         // the thread holding the baton
    unsigned live = 0;        // threads of the group that have not returned
    int returned = -1;        // the first of them that returned
    Warp warps[MAX_THREADS / 32];
    // The barrier: the threads waiting at it, at which call, and its results.
    unsigned arrived = 0;
    const char* bar_what = "";
    const char* bar_function = "";
    const char* bar_file = "";
    int bar_line = 0;
    unsigned bar_count = 0;   // predicates true so far
    unsigned bar_result = 0;  // of the last completed barrier
    bool failed = false;
    char kind = 'W';          // of the error: 'W' warp level, 'B' block level
    char error[1024] = {0};
};

inline Group& group() { static Group g; return g; }
static thread_local int mode = ONE_THREAD;  // of this OS thread's current launch

inline unsigned lane_id() { return threadIdx.x % 32u; }
inline Warp& warp_of(Group& g) { return g.warps[threadIdx.x / 32u]; }

// "" in a warp launch (the driver names the warp), "warp N: " in a block launch.
inline const char* warp_prefix(char* buffer, std::size_t size)
{
    buffer[0] = 0;
    if (mode == BLOCK) std::snprintf(buffer, size, "warp %u: ", threadIdx.x / 32u);
    return buffer;
}

// Record the first error (the caller holds the lock). Threads waiting at a
// meeting or barrier may go on: they get their own value back.
inline void fail(Group& g, char kind, const char* format, ...)
    __attribute__((format(printf, 3, 4)));
inline void fail(Group& g, char kind, const char* format, ...)
{
    if (!g.failed) {
        va_list args;
        va_start(args, format);
        std::vsnprintf(g.error, sizeof(g.error), format, args);
        va_end(args);
        g.failed = true;
        g.kind = kind;
    }
    for (unsigned t = g.lo; t < g.hi; ++t)
        if (g.state[t] == WAITING) g.state[t] = RUNNABLE;
}

inline int next_runnable(const Group& g)
{
    for (unsigned i = 0; i < g.hi - g.lo; ++i) {
        const unsigned t = g.reverse ? g.hi - 1 - i : g.lo + i;
        if (g.state[t] == RUNNABLE) return (int)t;
    }
    return -1;
}

// Every thread that has not returned waits at a meeting or barrier that cannot
// complete (the checks at arrival catch most such cases with a better message).
inline void deadlock(Group& g)
{
    char what[600] = {0};
    std::size_t used = 0;
    if (g.arrived)
        used += std::snprintf(what + used, sizeof(what) - used, "; %u threads at %s (line %d)",
                              g.arrived, g.bar_what, g.bar_line);
    for (unsigned w = g.lo / 32; w < (g.hi + 31) / 32 && used < sizeof(what); ++w)
        if (g.warps[w].pending)
            used += std::snprintf(what + used, sizeof(what) - used,
                                  "; warp %u lanes 0x%08x at %s (line %d, mask 0x%08x)", w,
                                  g.warps[w].pending, g.warps[w].what, g.warps[w].line,
                                  g.warps[w].mask);
    fail(g, g.mode == BLOCK ? 'B' : 'W',
         "deadlock: the %u threads that have not returned all wait, and none can go on%s",
         g.live, what);
}

// Hand the baton to the first runnable thread in launch order (the caller holds the lock).
inline void pass_baton(Group& g)
{
    int next = next_runnable(g);
    if (next < 0 && g.live > 0) {
        deadlock(g);
        next = next_runnable(g);
    }
    g.running = next;
    if (next >= 0) g.turn[next].notify_one();
}

inline void wait_turn(Group& g, std::unique_lock<std::mutex>& lock)
{
    const int me = (int)threadIdx.x;
    g.turn[me].wait(lock, [&] { return g.running == me; });
}

// Let the first thread in launch order run (perhaps this one), then go on.
inline void yield(Group& g, std::unique_lock<std::mutex>& lock)
{
    pass_baton(g);
    wait_turn(g, lock);
}

// Wait (as WAITING) until a meeting or barrier completes or an error lets us go.
inline void wait_here(Group& g, std::unique_lock<std::mutex>& lock)
{
    g.state[threadIdx.x] = WAITING;
    pass_baton(g);
    wait_turn(g, lock);
}

// Lane `lane` meets the other lanes of `mask` at `what` (source `line`),
// bringing `value` and asking for the value of lane `src`. Returns that value
// (or, with `ballot_out`, also the ballot of the values brought).
inline unsigned long long meet(const char* what, int line, unsigned mask, unsigned long long value,
                               int src, unsigned* ballot_out = nullptr)
{
    const unsigned lane = lane_id();
    const unsigned bit = 1u << lane;
    Group& g = group();
    std::unique_lock<std::mutex> lock(g.mu);
    if (mode == ONE_THREAD) {
        fail(g, 'W', "%s (line %d) was called outside a warp launch: this kernel's lanes meet, "
             "so run it with launch(..., warps=True)", what, line);
        return value;
    }
    if (g.failed) return value;
    char at[32];
    const char* pre = warp_prefix(at, sizeof(at));
    Warp& w = warp_of(g);
    if (!(mask & bit)) {
        fail(g, 'W', "%slane %u called %s (line %d) with mask 0x%08x, which leaves itself out",
             pre, lane, what, line, mask);
        return value;
    }
    if (mask & ~w.live) {
        fail(g, 'W', "%slane %u called %s (line %d) with mask 0x%08x, but lanes 0x%08x of that "
             "mask have returned or are not part of the launch", pre, lane, what, line, mask,
             mask & ~w.live);
        return value;
    }
    if (src >= 0 && !((mask >> src) & 1u)) {
        fail(g, 'W', "%slane %u asked %s (line %d) for the value of lane %d, outside mask 0x%08x",
             pre, lane, what, line, src, mask);
        return value;
    }
    if (mask & w.at_barrier) {
        fail(g, 'B', "%slane %u called %s (line %d) with mask 0x%08x, but lanes 0x%08x of that "
             "mask wait at %s (line %d)", pre, lane, what, line, mask, mask & w.at_barrier,
             g.bar_what, g.bar_line);
        return value;
    }
    if (w.pending == 0) {
        w.mask = mask;
        w.what = what;
        w.line = line;
    } else if (w.mask != mask || w.line != line || std::strcmp(w.what, what) != 0) {
        fail(g, 'W', "%sdivergent warp-level calls: lanes 0x%08x wait at %s (line %d, mask "
             "0x%08x) while lane %u calls %s (line %d, mask 0x%08x)", pre, w.pending, w.what,
             w.line, w.mask, lane, what, line, mask);
        return value;
    }
    w.in[lane] = value;
    w.src[lane] = src;
    w.pending |= bit;
    unsigned long long result;
    unsigned votes = 0;
    if (w.pending == w.mask) {  // the last to arrive: everyone's results
        for (unsigned l = 0; l < 32; ++l)
            if (((w.mask >> l) & 1u) && w.in[l] != 0) votes |= 1u << l;
        const unsigned base = threadIdx.x - lane;
        for (unsigned l = 0; l < 32; ++l) {
            if (!((w.mask >> l) & 1u)) continue;
            w.out[l] = w.src[l] >= 0 ? w.in[w.src[l]] : w.in[l];
            w.ballot[l] = votes;
            if (g.state[base + l] == WAITING) g.state[base + l] = RUNNABLE;
        }
        w.pending = 0;
        result = w.out[lane];
        yield(g, lock);  // the lanes go on in launch order
    } else {
        wait_here(g, lock);
        if (g.failed) return value;
        result = w.out[lane];
        votes = w.ballot[lane];
    }
    if (ballot_out) *ballot_out = votes;
    return result;
}

// Thread threadIdx.x reaches a barrier of the block with `predicate`; returns
// how many threads of the block brought a true one.
inline unsigned barrier(const char* what, const char* function, const char* file, int line,
                        bool predicate)
{
    Group& g = group();
    std::unique_lock<std::mutex> lock(g.mu);
    const unsigned me = threadIdx.x;
    if (mode != BLOCK) {
        fail(g, 'B', "%s (line %d) was called outside a block launch: this kernel's threads "
             "meet at barriers, so run it with launch(..., blocks=True)", what, line);
        return predicate;
    }
    if (g.failed) return predicate;
    Warp& w = warp_of(g);
    const unsigned bit = 1u << lane_id();
    if (g.returned >= 0) {
        fail(g, 'B', "thread %u reached %s (line %d) after thread %d of the block returned: "
             "every thread of the block must reach each __syncthreads", me, what, line,
             g.returned);
        return predicate;
    }
    if (w.pending && (w.mask & bit)) {  // lanes of its warp wait for it at a warp-level call
        fail(g, 'B', "thread %u reached %s (line %d) while lanes 0x%08x of its warp wait for it "
             "at %s (line %d, mask 0x%08x)", me, what, line, w.pending, w.what, w.line, w.mask);
        return predicate;
    }
    if (g.arrived == 0) {
        g.bar_what = what;
        g.bar_function = function;
        g.bar_file = file;
        g.bar_line = line;
        g.bar_count = 0;
    } else if (g.bar_line != line || std::strcmp(g.bar_what, what) != 0 ||
               std::strcmp(g.bar_file, file) != 0 || std::strcmp(g.bar_function, function) != 0) {
        fail(g, 'B', "divergent barriers: %u threads wait at %s (line %d) while thread %u reaches "
             "%s (line %d); every thread of the block must reach the same __syncthreads",
             g.arrived, g.bar_what, g.bar_line, me, what, line);
        return predicate;
    }
    ++g.arrived;
    if (predicate) ++g.bar_count;
    w.at_barrier |= bit;
    if (g.arrived == g.live) {  // the last to arrive (no thread has returned)
        g.bar_result = g.bar_count;
        g.arrived = 0;
        for (unsigned t = g.lo; t < g.hi; ++t)
            if (g.state[t] == WAITING) g.state[t] = RUNNABLE;
        for (unsigned v = g.lo / 32; v < (g.hi + 31) / 32; ++v) g.warps[v].at_barrier = 0;
        const unsigned result = g.bar_result;
        yield(g, lock);  // the threads go on in launch order
        return result;
    }
    wait_here(g, lock);
    return g.failed ? predicate : g.bar_result;
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
    Group& g = group();
    std::lock_guard<std::mutex> lock(g.mu);
    fail(g, 'W', "%s (line %d): width %d is not a power of two in [1, 32]", what, line, width);
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

#define CUPYNN_HOST_BARRIER(what, p) cupynn_host::barrier(what, __func__, __FILE__, __LINE__, (p))
#define __syncthreads() ((void)CUPYNN_HOST_BARRIER("__syncthreads", false))
#define __syncthreads_count(p) ((int)CUPYNN_HOST_BARRIER("__syncthreads_count", (p) != 0))
#define __syncthreads_and(p) \
    ((int)(CUPYNN_HOST_BARRIER("__syncthreads_and", (p) != 0) == blockDim.x))
#define __syncthreads_or(p) ((int)(CUPYNN_HOST_BARRIER("__syncthreads_or", (p) != 0) != 0u))

// Set the indices of the (block, thread) the next kernel call plays, one thread at a time.
extern "C" void cupynn_host_set_thread(unsigned int block, unsigned int thread,
                                       unsigned int block_dim, unsigned int grid_dim)
{
    blockIdx = {block, 0, 0};
    threadIdx = {thread, 0, 0};
    blockDim = {block_dim, 1, 1};
    gridDim = {grid_dim, 1, 1};
    cupynn_host::mode = cupynn_host::ONE_THREAD;
}

// A block begins (in every kind of launch): its shared memory, the static
// section and the first `dynamic_bytes` of the arena, is filled with 0xff.
extern "C" void cupynn_host_begin_block(unsigned long long dynamic_bytes)
{
    std::memset(__start_cupynn_shared, 0xff, (std::size_t)(__stop_cupynn_shared -
                                                           __start_cupynn_shared));
    if (dynamic_bytes > cupynn_host::DYNAMIC_SHARED_CAPACITY)
        dynamic_bytes = cupynn_host::DYNAMIC_SHARED_CAPACITY;  // the driver checks first
    std::memset(cupynn_host::dynamic_arena, 0xff, (std::size_t)dynamic_bytes);
}

extern "C" unsigned long long cupynn_host_dynamic_shared_capacity(void)
{
    return cupynn_host::DYNAMIC_SHARED_CAPACITY;
}

// Warp and block launches: begin a group, threads [lo, hi) of the block with
// `mode` 1 (a warp) or 2 (the block), then on each thread's own OS thread
// enter, the kernel call and exit; then take_error.
extern "C" void cupynn_host_begin_group(unsigned int lo, unsigned int hi, int reverse, int mode)
{
    using namespace cupynn_host;
    Group& g = group();
    std::lock_guard<std::mutex> lock(g.mu);
    g.mode = mode;
    g.lo = lo;
    g.hi = hi;
    g.reverse = reverse != 0;
    g.live = hi - lo;
    g.returned = -1;
    for (unsigned t = 0; t < MAX_THREADS; ++t) g.state[t] = (t >= lo && t < hi) ? RUNNABLE : DONE;
    for (unsigned w = 0; w < MAX_THREADS / 32; ++w) {
        Warp& warp = g.warps[w];
        warp.live = 0;
        for (unsigned l = 0; l < 32; ++l)
            if (32 * w + l >= lo && 32 * w + l < hi) warp.live |= 1u << l;
        warp.pending = 0;
        warp.at_barrier = 0;
    }
    g.arrived = 0;
    g.failed = false;
    g.error[0] = 0;
    g.running = next_runnable(g);
}

extern "C" void cupynn_host_enter(unsigned int block, unsigned int thread,
                                  unsigned int block_dim, unsigned int grid_dim)
{
    using namespace cupynn_host;
    cupynn_host_set_thread(block, thread, block_dim, grid_dim);
    Group& g = group();
    std::unique_lock<std::mutex> lock(g.mu);
    cupynn_host::mode = g.mode;
    wait_turn(g, lock);
}

extern "C" void cupynn_host_exit(void)
{
    using namespace cupynn_host;
    Group& g = group();
    const unsigned me = threadIdx.x;
    const unsigned bit = 1u << lane_id();
    std::unique_lock<std::mutex> lock(g.mu);
    Warp& w = warp_of(g);
    char at[32];
    const char* pre = warp_prefix(at, sizeof(at));
    g.state[me] = DONE;
    --g.live;
    w.live &= ~bit;
    if (w.pending && (w.mask & bit))
        fail(g, 'W', "%slane %u returned while lanes 0x%08x wait for it at %s (line %d, mask "
             "0x%08x)", pre, lane_id(), w.pending, w.what, w.line, w.mask);
    else if (g.arrived)
        fail(g, 'B', "thread %u returned while %u threads of the block wait for it at %s "
             "(line %d): every thread of the block must reach each __syncthreads", me,
             g.arrived, g.bar_what, g.bar_line);
    if (g.returned < 0) g.returned = (int)me;
    cupynn_host::mode = ONE_THREAD;
    pass_baton(g);
}

// The last error, prefixed with its kind ('W' warp level, 'B' block level),
// or null; cleared by taking it.
extern "C" const char* cupynn_host_take_error(void)
{
    static thread_local char taken[sizeof(cupynn_host::Group::error) + 1];
    cupynn_host::Group& g = cupynn_host::group();
    std::lock_guard<std::mutex> lock(g.mu);
    if (!g.failed) return nullptr;
    taken[0] = g.kind;
    std::memcpy(taken + 1, g.error, sizeof(g.error));
    g.failed = false;
    g.error[0] = 0;
    return taken;
}

#endif  // CUPYNN_CUDA_HOST_H

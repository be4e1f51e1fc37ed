// cuda_host.h: compile a CUDA kernel file as plain C++ so that its kernels can
// run, one (block, thread) at a time, on the CPU.
//
//   g++ -x c++ -std=c++14 -O1 -shared -fPIC
//       -include tests/cuda_host/cuda_host.h kernel.cu -o libkernel.so
//
// A driver (tests/cuda_host/emulate.py) sets the built-in indices with
// cupynn_host_set_thread() and then calls an extern "C" kernel as an ordinary
// function, for every block and thread of a 1-D grid in turn.
//
// That sequential schedule is exact only for kernels whose threads are
// independent: one element per thread, grid-stride loops, no communication.
// Block- or warp-level cooperation (__shared__ memory, __syncthreads, warp
// shuffles and votes) cannot be emulated this way, so those names are made
// compile errors here rather than silently wrong. Atomics are left undeclared
// for the same reason: a kernel that needs them fails to compile.

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

// Cooperation between threads: out of scope, so a compile error.
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
#define __syncwarp(...) CUPYNN_HOST_UNSUPPORTED(__syncwarp)
#define __shfl_sync(...) CUPYNN_HOST_UNSUPPORTED(__shfl_sync)
#define __shfl_up_sync(...) CUPYNN_HOST_UNSUPPORTED(__shfl_up_sync)
#define __shfl_down_sync(...) CUPYNN_HOST_UNSUPPORTED(__shfl_down_sync)
#define __shfl_xor_sync(...) CUPYNN_HOST_UNSUPPORTED(__shfl_xor_sync)
#define __ballot_sync(...) CUPYNN_HOST_UNSUPPORTED(__ballot_sync)
#define __any_sync(...) CUPYNN_HOST_UNSUPPORTED(__any_sync)
#define __all_sync(...) CUPYNN_HOST_UNSUPPORTED(__all_sync)

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

// Built-in indices, with CUDA's types (unsigned components).
struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x, y, z; };

static uint3 threadIdx = {0, 0, 0};
static uint3 blockIdx = {0, 0, 0};
static dim3 blockDim = {1, 1, 1};
static dim3 gridDim = {1, 1, 1};
static const int warpSize = 32;

// Set the indices of the (block, thread) the next kernel call plays.
extern "C" void cupynn_host_set_thread(unsigned int block, unsigned int thread,
                                       unsigned int block_dim, unsigned int grid_dim)
{
    blockIdx = {block, 0, 0};
    threadIdx = {thread, 0, 0};
    blockDim = {block_dim, 1, 1};
    gridDim = {grid_dim, 1, 1};
}

#endif  // CUPYNN_CUDA_HOST_H

// Block-diagonal inverse empirical Fisher, stored packed and tiled (WoodFisher / WoodTaylor).
//
// The parameters (active weights of all sparse layers, concatenated, the last
// block padded with zeros by the caller) are cut into n_blocks consecutive
// blocks of B. Block b keeps its inverse Fisher F_b^{-1} (B x B, symmetric) as
// its upper triangle, row-major, P = B (B + 1) / 2 values. The blocks are
// grouped in tiles of T consecutive blocks, and a tile stores entry p of its
// T blocks side by side:
//
//   finv[(b / T) * P * T + (off(i) + (j - i)) * T + b % T] = F_b^{-1}[i, j]   for i <= j,
//   off(i) = i B - i (i - 1) / 2,   off(i + 1) = off(i) + (B - i).
//
// finv is (n_tiles, P, T) C-contiguous, n_tiles = ceil(n_blocks / T); the lanes
// of the last tile past n_blocks are padding, which these kernels never touch
// (the CPU twin subtracts 0 there, which leaves finite values as they are).
// Vectors are flat (n_blocks * B,), block by block. With this layout threads
// that take the same entry of consecutive blocks read and write consecutive
// addresses of finv (and the CPU twins vectorise across the T blocks of a tile).
//
// One Sherman-Morrison rank-1 step of every block, for F_b <- F_b + g_b g_b^T / m
// (the empirical Fisher of m gradients, built up one gradient at a time from
// F_b = lambda I, i.e. finv = I / lambda):
//
//   u = F_b^{-1} g_b,   den = m + g_b^T u,   F_b^{-1} <- F_b^{-1} - u u^T / den,
//
// is two launches: packed_matvec (u = F^{-1} g, into a separate buffer), then
// fisher_rank1_update. Both run one thread per (block, row i) of every block,
// numbered so that the 32 threads of a warp take the same row i of 32
// consecutive blocks of a tile: k = ((b / T) * B + i) * T + b % T, grid-stride
// over n_tiles * B * T (lanes past n_blocks do nothing). Their reads and writes
// of finv are then consecutive addresses, every thread of a warp walks a row
// of the same length, and a model's n * B threads (rather than one per block,
// n / B) keep the GPU's memory pipeline busy.
//
// packed_matvec: out_b = F_b^{-1} v_b. Thread (b, i) walks column i of the
// upper triangle for j < i and row i for j >= i. out must not overlap v or finv.
//
// fisher_rank1_update: F_b^{-1} <- F_b^{-1} - u u^T / (m + g_b . u), upper
// triangle; thread (b, i) computes den itself (B products, read by the B
// threads of the block alike) and rewrites row i, entries j >= i. A block whose
// g_b is all zero is left as it is (the step is the identity; u = 0 there),
// which skips the dead units' blocks. u must be F_b^{-1} g_b from before the
// step and must not overlap finv: no thread reads an entry of finv that
// another writes.
//
// den >= m > 0 while F_b^{-1} is positive semi-definite; rounding in float32
// over very many steps can erode that, so callers re-initialise (or refresh)
// the blocks rather than updating forever.
//
// Offsets are 64-bit: n_tiles * P * T overflows int32 for 10^6 blocks of B = 64.
// NumPy twins: cupynn.kernels.numpy_twins.packed_matvec and .fisher_rank1_update.

// Threads of a launch over n_blocks blocks: one per (block, row) of every tile.
__device__ __forceinline__ long long tiled_threads(long long n_blocks, int B, int tile)
{
    return (n_blocks + tile - 1) / tile * B * tile;
}

// Thread k's block b (or -1 past n_blocks) and row i, in the numbering above;
// *entries is the offset in finv of the block's packed entry 0 (entry p is at
// *entries + p * tile).
__device__ __forceinline__ long long thread_block(long long k, int B, int tile,
                                                  long long n_blocks, int* i, long long* entries)
{
    const long long P = (long long)B * (B + 1) / 2;
    const long long t = k / ((long long)B * tile);
    const long long rest = k - t * B * tile;
    *i = (int)(rest / tile);
    const long long lane = rest - (long long)(*i) * tile;
    *entries = t * P * tile + lane;
    const long long b = t * tile + lane;
    return b < n_blocks ? b : -1;
}

template <typename T>
__device__ __forceinline__ void fisher_rank1_update_impl(
    T* __restrict__ finv, const T* __restrict__ g, const T* __restrict__ u,
    T m, int n_blocks, int B, int tile)
{
    const long long n = tiled_threads(n_blocks, B, tile);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += stride) {
        int i;
        long long entries;
        const long long b = thread_block(k, B, tile, n_blocks, &i, &entries);
        if (b < 0) continue;
        const T* gb = g + b * B;
        const T* ub = u + b * B;
        bool zero = true;
        T den = m;
        for (int j = 0; j < B; ++j) {
            zero = zero && gb[j] == T(0);
            den += gb[j] * ub[j];
        }
        if (zero) continue;  // the step is the identity
        const T a = ub[i] / den;
        // Row i of the triangle: entries (i, j >= i), from off(i) on.
        T* F = finv + entries + ((long long)i * B - (long long)i * (i - 1) / 2) * tile;
        for (int j = i; j < B; ++j) F[(long long)(j - i) * tile] -= a * ub[j];
    }
}

template <typename T>
__device__ __forceinline__ void packed_matvec_impl(
    const T* __restrict__ finv, const T* __restrict__ v, T* __restrict__ out,
    int n_blocks, int B, int tile)
{
    const long long n = tiled_threads(n_blocks, B, tile);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += stride) {
        int i;
        long long entries;
        const long long b = thread_block(k, B, tile, n_blocks, &i, &entries);
        if (b < 0) continue;
        const T* F = finv + entries;
        const T* vb = v + b * B;
        T acc = 0;
        // j < i: F[i, j] = F[j, i] at off(j) + (i - j).
        long long off = 0;
        for (int j = 0; j < i; ++j) {
            acc += F[(off + (i - j)) * tile] * vb[j];
            off += B - j;
        }
        // j >= i: row i, starting at off(i).
        for (int j = i; j < B; ++j) acc += F[(off + (j - i)) * tile] * vb[j];
        out[b * B + i] = acc;
    }
}

extern "C" __global__ void fisher_rank1_update_f32(
    float* finv, const float* g, const float* u, float m, int n_blocks, int B, int tile)
{
    fisher_rank1_update_impl<float>(finv, g, u, m, n_blocks, B, tile);
}

extern "C" __global__ void fisher_rank1_update_f64(
    double* finv, const double* g, const double* u, double m, int n_blocks, int B, int tile)
{
    fisher_rank1_update_impl<double>(finv, g, u, m, n_blocks, B, tile);
}

extern "C" __global__ void packed_matvec_f32(
    const float* finv, const float* v, float* out, int n_blocks, int B, int tile)
{
    packed_matvec_impl<float>(finv, v, out, n_blocks, B, tile);
}

extern "C" __global__ void packed_matvec_f64(
    const double* finv, const double* v, double* out, int n_blocks, int B, int tile)
{
    packed_matvec_impl<double>(finv, v, out, n_blocks, B, tile);
}

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
// of the last tile past n_blocks are padding, which the kernels leave as it is.
// Vectors are flat (n_blocks * B,), block by block. With this layout the
// threads of a warp, one block each, read and write consecutive addresses of
// finv (and the CPU twins vectorise across the T blocks of a tile).
//
// fisher_update: one Sherman-Morrison rank-1 step of every block, in place,
// for F_b <- F_b + g_b g_b^T / m (the empirical Fisher of m gradients, built up
// one gradient at a time from F_b = lambda I, i.e. finv = I / lambda):
//
//   u = F_b^{-1} g_b,   den = m + g_b^T u,   F_b^{-1} <- F_b^{-1} - u u^T / den.
//
// One thread per block, grid-stride over blocks. Each thread first writes u
// into its own lanes of work, laid out like one (n_tiles, B, T) array
// (work[(b / T) * B * T + i * T + b % T] = u_i), and then rewrites its own lanes
// of finv. Hazards, all on the caller (the dispatcher checks the first two):
//  * work must not overlap finv or g: u is written while they are read.
//  * lanes of different blocks are disjoint, so threads never race.
//  * u must be complete before the first entry of F_b^{-1} is overwritten, which
//    holds because one thread does both, in that order.
//  * den >= m > 0 while F_b^{-1} is positive semi-definite; rounding in float32
//    over very many steps can erode that, so callers re-initialise (or refresh)
//    the blocks rather than updating forever.
// A block whose gradient slice is all zero is left as it is (u = 0: the step
// is the identity), which skips the dead units' blocks. The lanes of work past
// n_blocks are not written.
// The work is O(B^2) per block; computing u_i on the fly for every packed entry
// instead of storing it would be O(B^3).
//
// packed_matvec: out_b = F_b^{-1} v_b, one thread per output element (b, i),
// numbered so that consecutive threads take consecutive blocks of a tile
// (k = ((b / T) * B + i) * T + b % T), grid-stride over n_tiles * B * T; lanes
// past n_blocks do nothing. The thread walks column i of the upper triangle for
// j < i and row i for j >= i. out must not overlap v.
//
// Offsets are 64-bit: n_tiles * P * T overflows int32 for 10^6 blocks of B = 64.
// NumPy twins: cupynn.kernels.numpy_twins.fisher_update and .packed_matvec.

template <typename T>
__device__ __forceinline__ void fisher_update_impl(
    T* __restrict__ finv, const T* __restrict__ g, T* __restrict__ work,
    T m, int n_blocks, int B, int tile)
{
    const long long P = (long long)B * (B + 1) / 2;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (long long b = first; b < n_blocks; b += stride) {
        const long long t = b / tile, lane = b - t * tile;
        T* F = finv + t * P * tile + lane;        // entry p at F[p * tile]
        T* u = work + t * B * tile + lane;        // u_i at u[i * tile]
        const T* gb = g + b * B;

        bool zero = true;
        for (int i = 0; i < B; ++i) {
            u[i * tile] = T(0);
            zero = zero && gb[i] == T(0);
        }
        if (zero) continue;  // u = 0: the step is the identity

        // u = F g. Row i of the triangle holds F[i, j] for j >= i: it adds
        // F[i, j] g[j] to u[i] and, by symmetry, F[i, j] g[i] to u[j > i].
        long long p = 0;
        for (int i = 0; i < B; ++i) {
            const T gi = gb[i];
            T acc = F[p * tile] * gi;
            ++p;
            for (int j = i + 1; j < B; ++j, ++p) {
                const T f = F[p * tile];
                acc += f * gb[j];
                u[j * tile] += f * gi;
            }
            u[i * tile] += acc;
        }

        T den = m;
        for (int i = 0; i < B; ++i) den += gb[i] * u[i * tile];
        const T scale = T(1) / den;

        // F <- F - u u^T / den, upper triangle only.
        p = 0;
        for (int i = 0; i < B; ++i) {
            const T a = u[i * tile] * scale;
            for (int j = i; j < B; ++j, ++p) F[p * tile] -= a * u[j * tile];
        }
    }
}

template <typename T>
__device__ __forceinline__ void packed_matvec_impl(
    const T* __restrict__ finv, const T* __restrict__ v, T* __restrict__ out,
    int n_blocks, int B, int tile)
{
    const long long P = (long long)B * (B + 1) / 2;
    const long long n_tiles = ((long long)n_blocks + tile - 1) / tile;
    const long long n = n_tiles * B * tile;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += stride) {
        const long long t = k / ((long long)B * tile);
        const long long rest = k - t * B * tile;
        const int i = (int)(rest / tile);
        const long long lane = rest - (long long)i * tile;
        const long long b = t * tile + lane;
        if (b >= n_blocks) continue;
        const T* F = finv + t * P * tile + lane;
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

extern "C" __global__ void fisher_update_f32(
    float* finv, const float* g, float* work, float m, int n_blocks, int B, int tile)
{
    fisher_update_impl<float>(finv, g, work, m, n_blocks, B, tile);
}

extern "C" __global__ void fisher_update_f64(
    double* finv, const double* g, double* work, double m, int n_blocks, int B, int tile)
{
    fisher_update_impl<double>(finv, g, work, m, n_blocks, B, tile);
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

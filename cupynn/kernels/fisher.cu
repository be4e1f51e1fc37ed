// Block-diagonal inverse empirical Fisher, stored packed (WoodFisher / WoodTaylor).
//
// The parameters (active weights of all sparse layers, concatenated, the last
// block padded with zeros by the caller) are cut into n_blocks consecutive
// blocks of B. Block b keeps its inverse Fisher F_b^{-1} (B x B, symmetric) as
// its upper triangle, row-major, P = B (B + 1) / 2 values:
//
//   finv[b * P + off(i) + (j - i)] = F_b^{-1}[i, j]      for i <= j,
//   off(i) = i B - i (i - 1) / 2,   off(i + 1) = off(i) + (B - i).
//
// finv is (n_blocks, P) C-contiguous; vectors are flat (n_blocks * B,).
//
// fisher_update: one Sherman-Morrison rank-1 step of every block, in place,
// for F_b <- F_b + g_b g_b^T / m (the empirical Fisher of m gradients, built up
// one gradient at a time from F_b = lambda I, i.e. finv = I / lambda):
//
//   u = F_b^{-1} g_b,   den = m + g_b^T u,   F_b^{-1} <- F_b^{-1} - u u^T / den.
//
// One thread per block, grid-stride over blocks. Each thread first writes u
// into its own slice work[b * B, (b + 1) B) and then rewrites its own slice of
// finv. Hazards, all on the caller (the dispatcher checks the first two):
//  * work must not overlap finv or g: u is written while they are read.
//  * slices of different blocks are disjoint, so threads never race; a work
//    buffer shared between blocks (shorter than n_blocks * B) would race.
//  * u must be complete before the first entry of F_b^{-1} is overwritten, which
//    holds because one thread does both, in that order.
//  * den >= m > 0 while F_b^{-1} is positive semi-definite; rounding in float32
//    over very many steps can erode that, so callers re-initialise (or refresh)
//    the blocks rather than updating forever.
// The work is O(B^2) per block; computing u_i on the fly for every packed entry
// instead of storing it would be O(B^3).
//
// packed_matvec: out_b = F_b^{-1} v_b, one thread per output element (b, i),
// grid-stride; the thread walks column i of the upper triangle for j < i
// (stride B - j) and the contiguous row i for j >= i. out must not overlap v.
//
// Offsets are 64-bit: n_blocks * P overflows int32 for 10^6 blocks of B = 64.
// NumPy twins: cupynn.kernels.numpy_twins.fisher_update and .packed_matvec.

template <typename T>
__device__ __forceinline__ void fisher_update_impl(
    T* __restrict__ finv, const T* __restrict__ g, T* __restrict__ work,
    T m, int n_blocks, int B)
{
    const long long P = (long long)B * (B + 1) / 2;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (long long b = first; b < n_blocks; b += stride) {
        T* F = finv + b * P;
        const T* gb = g + b * B;
        T* u = work + b * B;

        // u = F g. Row i of the triangle holds F[i, j] for j >= i: it adds
        // F[i, j] g[j] to u[i] and, by symmetry, F[i, j] g[i] to u[j > i].
        for (int i = 0; i < B; ++i) u[i] = T(0);
        long long off = 0;
        for (int i = 0; i < B; ++i) {
            const T gi = gb[i];
            T acc = F[off] * gi;
            for (int j = i + 1; j < B; ++j) {
                const T f = F[off + (j - i)];
                acc += f * gb[j];
                u[j] += f * gi;
            }
            u[i] += acc;
            off += B - i;
        }

        T den = m;
        for (int i = 0; i < B; ++i) den += gb[i] * u[i];
        const T scale = T(1) / den;

        // F <- F - u u^T / den, upper triangle only.
        off = 0;
        for (int i = 0; i < B; ++i) {
            const T a = u[i] * scale;
            for (int j = i; j < B; ++j) F[off + (j - i)] -= a * u[j];
            off += B - i;
        }
    }
}

template <typename T>
__device__ __forceinline__ void packed_matvec_impl(
    const T* __restrict__ finv, const T* __restrict__ v, T* __restrict__ out,
    int n_blocks, int B)
{
    const long long P = (long long)B * (B + 1) / 2;
    const long long n = (long long)n_blocks * B;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += stride) {
        const long long b = k / B;
        const int i = (int)(k - b * B);
        const T* F = finv + b * P;
        const T* vb = v + b * B;
        T acc = 0;
        // j < i: F[i, j] = F[j, i] at off(j) + (i - j).
        long long off = 0;
        for (int j = 0; j < i; ++j) {
            acc += F[off + (i - j)] * vb[j];
            off += B - j;
        }
        // j >= i: the contiguous row i, starting at off(i).
        for (int j = i; j < B; ++j) acc += F[off + (j - i)] * vb[j];
        out[k] = acc;
    }
}

extern "C" __global__ void fisher_update_f32(
    float* finv, const float* g, float* work, float m, int n_blocks, int B)
{
    fisher_update_impl<float>(finv, g, work, m, n_blocks, B);
}

extern "C" __global__ void fisher_update_f64(
    double* finv, const double* g, double* work, double m, int n_blocks, int B)
{
    fisher_update_impl<double>(finv, g, work, m, n_blocks, B);
}

extern "C" __global__ void packed_matvec_f32(
    const float* finv, const float* v, float* out, int n_blocks, int B)
{
    packed_matvec_impl<float>(finv, v, out, n_blocks, B);
}

extern "C" __global__ void packed_matvec_f64(
    const double* finv, const double* v, double* out, int n_blocks, int B)
{
    packed_matvec_impl<double>(finv, v, out, n_blocks, B);
}

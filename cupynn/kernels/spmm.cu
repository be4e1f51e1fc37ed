// Sparse x dense products of a sparse layer, with the dense operands
// feature-major (C-contiguous (features, batch)), as cupynn stores activations.
//
//   spmm_*:    out[r, j] = relu?(sum_{k in row r} data[k] * x[indices[k], j] + bias[r])
//   spmm_t_*:  out[c, j] = sum_{k: indices[k] = c} data[k] * dy[row(k), j]
//
// One output row per item: an item is (row, chunk of blockDim.x batch
// columns); the threads of a block run along the batch, so every warp reads
// consecutive addresses of one row of x (or dy) and writes consecutive
// addresses of one output row, and the nonzero's value and index are the same
// address for the whole warp (one broadcast load). Grid-stride over items, so
// any shape fits any grid. Each output element is summed by one thread in a
// fixed order: the results do not depend on the launch and are the same on
// every run (cuSPARSE's transposed product adds with atomics and is not).
//
// spmm_t_* reads W column by column through the transposed pattern
// (kernels.transpose_pattern, built once per topology): t_indptr (n_cols + 1)
// delimits column c's entries, t_rows[p] is the row of the p-th entry and
// t_perm[p] its position in data, with the entries of a column in ascending
// row order (the order in which the sum is taken). The values are read
// through t_perm, so the kernel follows every Adam step without a copy.
//
// ReLU as numpy.maximum(v, 0): negatives become +0, NaN and -0.0 stay.
// Offsets are 64-bit: row * batch overflows int32 for 4096 x 2^20 operands.
//
// NumPy twins: cupynn.kernels.numpy_twins.spmm and .spmm_t (the same
// summation order).
//
// Tiled variants (issue 20, after Sputnik, Gale et al. SC20): spmm_tiled_* and
// spmm_t_tiled_* compute the same outputs. A block takes an item: a tile of
// R = blockDim.x / tile_cols consecutive output rows times a tile of tile_cols
// consecutive batch columns (tile_cols is a launch parameter, 8-32 on a GPU).
// Thread t works for row group g = t / tile_cols (output row row0 + g) and
// column j = col0 + t % tile_cols. The nonzeros of the block's rows (index and
// value) are staged through __shared__ memory in chunks of `chunk` entries per
// row (R * chunk <= SPMM_TILE_SHARED): the tile_cols threads of a row group
// load their row's chunk, __syncthreads(), every thread adds its products
// from shared memory, __syncthreads() again before the next chunk is loaded.
// The block runs as many chunks as its longest row needs (read from indptr by
// every thread alike), so every thread reaches every barrier, the threads of
// rows past the end, of shorter rows and of columns past the batch included;
// only the loads and the final store are guarded. Items are numbered batch
// tile first: the blocks that run together read the same narrow slice of x
// (n_cols x tile_cols), which caches keep, instead of whole batch rows.
//
// Each output is summed by one thread, from 0, in the row's nonzero order
// (CSR order; ascending row for spmm_t_tiled), then the bias and the ReLU as
// above: the order of spmm_* / spmm_t_*, so the tiled kernels give the same
// bits as those (on a GPU too: the same expression, contracted to the same
// FMAs), whatever the launch. Twins: numpy_twins.spmm_tiled, .spmm_t_tiled.

template <typename T>
__device__ __forceinline__ void spmm_impl(
    const int* __restrict__ indptr, const int* __restrict__ indices,
    const T* __restrict__ data, const T* __restrict__ x, const T* __restrict__ bias,
    T* __restrict__ out, int n_rows, int batch, int has_bias, int relu)
{
    const long long chunks = (batch + (long long)blockDim.x - 1) / blockDim.x;
    const long long items = (long long)n_rows * chunks;
    for (long long item = blockIdx.x; item < items; item += gridDim.x) {
        const int r = (int)(item / chunks);
        const long long j = (item % chunks) * blockDim.x + threadIdx.x;
        if (j >= batch) continue;
        T acc = 0;
        const int end = indptr[r + 1];
        for (int k = indptr[r]; k < end; ++k)
            acc += data[k] * x[(long long)indices[k] * batch + j];
        if (has_bias) {
            acc += bias[r];
            if (relu && acc < 0) acc = 0;
        }
        out[(long long)r * batch + j] = acc;
    }
}

template <typename T>
__device__ __forceinline__ void spmm_t_impl(
    const int* __restrict__ t_indptr, const int* __restrict__ t_rows,
    const int* __restrict__ t_perm, const T* __restrict__ data, const T* __restrict__ dy,
    T* __restrict__ out, int n_cols, int batch)
{
    const long long chunks = (batch + (long long)blockDim.x - 1) / blockDim.x;
    const long long items = (long long)n_cols * chunks;
    for (long long item = blockIdx.x; item < items; item += gridDim.x) {
        const int c = (int)(item / chunks);
        const long long j = (item % chunks) * blockDim.x + threadIdx.x;
        if (j >= batch) continue;
        T acc = 0;
        const int end = t_indptr[c + 1];
        for (int p = t_indptr[c]; p < end; ++p)
            acc += data[t_perm[p]] * dy[(long long)t_rows[p] * batch + j];
        out[(long long)c * batch + j] = acc;
    }
}

extern "C" __global__ void spmm_f32(
    const int* indptr, const int* indices, const float* data, const float* x,
    const float* bias, float* out, int n_rows, int batch, int has_bias, int relu)
{
    spmm_impl<float>(indptr, indices, data, x, bias, out, n_rows, batch, has_bias, relu);
}

extern "C" __global__ void spmm_f64(
    const int* indptr, const int* indices, const double* data, const double* x,
    const double* bias, double* out, int n_rows, int batch, int has_bias, int relu)
{
    spmm_impl<double>(indptr, indices, data, x, bias, out, n_rows, batch, has_bias, relu);
}

extern "C" __global__ void spmm_t_f32(
    const int* t_indptr, const int* t_rows, const int* t_perm, const float* data,
    const float* dy, float* out, int n_cols, int batch)
{
    spmm_t_impl<float>(t_indptr, t_rows, t_perm, data, dy, out, n_cols, batch);
}

extern "C" __global__ void spmm_t_f64(
    const int* t_indptr, const int* t_rows, const int* t_perm, const double* data,
    const double* dy, double* out, int n_cols, int batch)
{
    spmm_t_impl<double>(t_indptr, t_rows, t_perm, data, dy, out, n_cols, batch);
}


// ------------------------------------------------------------------ tiled (issue 20)
// Shared entries per block: R * chunk <= SPMM_TILE_SHARED (12 KiB for float64).
#define SPMM_TILE_SHARED 1024

// Rows [row0, row0 + R) of a CSR pattern (ptr delimits them, n rows in all): the most
// chunks of `chunk` entries any of them needs. Every thread of a block computes it
// alike, so the block's threads run the same number of stages (and barriers).
__device__ __forceinline__ int spmm_tile_stages(const int* __restrict__ ptr, int row0, int R,
                                                int n, int chunk)
{
    int longest = 0;
    for (int g = 0; g < R && row0 + g < n; ++g) {
        const int len = ptr[row0 + g + 1] - ptr[row0 + g];
        longest = len > longest ? len : longest;
    }
    return (longest + chunk - 1) / chunk;
}

// One tiled product: out[r, j] = sum over the entries p of row r (ptr[r] <= p < ptr[r+1],
// in order) of value(p) * dense[col(p), j]; value(p) = data[perm ? perm[p] : p],
// col(p) = cols[p]. spmm_tiled: (indptr, indices, no perm); spmm_t_tiled: (t_indptr,
// t_rows, t_perm). s_col and s_val are the block's shared arrays (SPMM_TILE_SHARED each).
template <typename T>
__device__ __forceinline__ void spmm_tiled_impl(
    const int* __restrict__ ptr, const int* __restrict__ cols, const int* __restrict__ perm,
    const T* __restrict__ data, const T* __restrict__ dense, const T* __restrict__ bias,
    T* __restrict__ out, int n, int batch, int has_bias, int relu, int tile_cols, int chunk,
    int* s_col, T* s_val)
{
    const int R = blockDim.x / tile_cols;          // rows per block
    const int g = threadIdx.x / tile_cols;         // this thread's row group (g >= R: idle)
    const int lane = threadIdx.x % tile_cols;
    const long long row_tiles = (n + (long long)R - 1) / R;
    const long long col_tiles = (batch + (long long)tile_cols - 1) / tile_cols;
    const long long items = row_tiles * col_tiles;
    // Uniform over the block (blockIdx only): every thread runs every iteration.
    for (long long item = blockIdx.x; item < items; item += gridDim.x) {
        const int row0 = (int)(item % row_tiles) * R;
        const long long j = (item / row_tiles) * tile_cols + lane;
        const int r = row0 + g;
        const bool has_row = g < R && r < n;
        const int begin = has_row ? ptr[r] : 0;
        const int end = has_row ? ptr[r + 1] : 0;
        const int stages = spmm_tile_stages(ptr, row0, R, n, chunk);
        T acc = 0;
        for (int s = 0; s < stages; ++s) {
            const int base = begin + s * chunk;
            const int count = end - base < chunk ? end - base : chunk;  // <= 0 when done
            for (int e = lane; e < count; e += tile_cols) {
                const int p = base + e;
                s_col[g * chunk + e] = cols[p];
                s_val[g * chunk + e] = data[perm ? perm[p] : p];
            }
            __syncthreads();  // the chunk is in shared memory
            if (has_row && j < batch) {
                const int* col = s_col + g * chunk;
                const T* val = s_val + g * chunk;
                for (int e = 0; e < count; ++e)
                    acc += val[e] * dense[(long long)col[e] * batch + j];
            }
            __syncthreads();  // every thread is done with it before the next is loaded
        }
        if (has_row && j < batch) {
            if (has_bias) {
                acc += bias[r];
                if (relu && acc < 0) acc = 0;
            }
            out[(long long)r * batch + j] = acc;
        }
    }
}

// The shared arrays are declared in the kernels, not in the template: CUDA gives each
// kernel its own, and the host emulation refills them between blocks (see cuda_host.h).
extern "C" __global__ void spmm_tiled_f32(
    const int* indptr, const int* indices, const float* data, const float* x,
    const float* bias, float* out, int n_rows, int batch, int has_bias, int relu,
    int tile_cols, int chunk)
{
    __shared__ int s_col[SPMM_TILE_SHARED];
    __shared__ float s_val[SPMM_TILE_SHARED];
    spmm_tiled_impl<float>(indptr, indices, nullptr, data, x, bias, out, n_rows, batch,
                           has_bias, relu, tile_cols, chunk, s_col, s_val);
}

extern "C" __global__ void spmm_tiled_f64(
    const int* indptr, const int* indices, const double* data, const double* x,
    const double* bias, double* out, int n_rows, int batch, int has_bias, int relu,
    int tile_cols, int chunk)
{
    __shared__ int s_col[SPMM_TILE_SHARED];
    __shared__ double s_val[SPMM_TILE_SHARED];
    spmm_tiled_impl<double>(indptr, indices, nullptr, data, x, bias, out, n_rows, batch,
                            has_bias, relu, tile_cols, chunk, s_col, s_val);
}

extern "C" __global__ void spmm_t_tiled_f32(
    const int* t_indptr, const int* t_rows, const int* t_perm, const float* data,
    const float* dy, float* out, int n_cols, int batch, int tile_cols, int chunk)
{
    __shared__ int s_col[SPMM_TILE_SHARED];
    __shared__ float s_val[SPMM_TILE_SHARED];
    spmm_tiled_impl<float>(t_indptr, t_rows, t_perm, data, dy, nullptr, out, n_cols, batch,
                           0, 0, tile_cols, chunk, s_col, s_val);
}

extern "C" __global__ void spmm_t_tiled_f64(
    const int* t_indptr, const int* t_rows, const int* t_perm, const double* data,
    const double* dy, double* out, int n_cols, int batch, int tile_cols, int chunk)
{
    __shared__ int s_col[SPMM_TILE_SHARED];
    __shared__ double s_val[SPMM_TILE_SHARED];
    spmm_tiled_impl<double>(t_indptr, t_rows, t_perm, data, dy, nullptr, out, n_cols, batch,
                            0, 0, tile_cols, chunk, s_col, s_val);
}


// ------------------------------------------------------------- vectorised (issue 20)
// spmm_vec_* and spmm_t_vec_*: the tiled kernels' products with vector loads and a
// row swizzle, after Sputnik (Gale et al. SC20). Same outputs, same bits.
//
// A block takes an item: R output rows times a batch tile of tile_cols (TN) columns.
// Each of the R rows is served by a subwarp of S = TN / V threads, each thread
// computing V consecutive batch columns j0 .. j0 + V - 1 (j0 = col0 + V * lane),
// so R = blockDim.x / S. V is 4 for float32 and 2 for float64 (one 16-byte load
// of x, or dy, per nonzero and thread, through an __align__(16) struct of V
// values), or 1. The host wrapper takes V > 1 only when batch % V == 0 and the
// dense operand and out start on a 16-byte boundary: then every V-wide load and
// store is aligned (col * batch + j0 is a multiple of V), and a thread's V
// columns are all inside the batch or all past it. Otherwise it launches V = 1.
// (nvcc 13 emits the loads as ld.global.v4.f32 / .v2.f64; it splits the store of
// the V outputs into scalar stores, which happen once per output.)
//
// Row swizzle: the block's R row slots i = row0 .. row0 + R - 1 are rows order[i]
// of the pattern, `order` a permutation of the rows (spmm.row_swizzle: by
// decreasing length, ties by row index), so that the subwarps of a block, and
// the blocks that run together, get rows of about equal length; the outputs go
// to out[order[i]]. Any permutation gives the same outputs (each row's sum does
// not depend on where it is computed), only the balance of work changes.
//
// The nonzeros (index and value) of the block's rows are staged through
// __shared__ memory `chunk` entries a row at a time (R * chunk <= SPMM_TILE_SHARED)
// as in spmm_tiled_*: the S threads of a slot load its chunk, __syncthreads(),
// each thread reads every (index, value) of the chunk once from shared memory for
// its V products, __syncthreads() again. The block runs as many chunks as its
// longest row needs (computed alike by every thread from indptr and order), so
// every thread reaches every barrier; only the loads and the store are guarded.
// Items are numbered batch tile first, as in spmm_tiled_*.
//
// Each output out[r, j] is summed by one thread, from 0, in the row's nonzero
// order (CSR order; ascending row for spmm_t_vec through the transposed
// pattern), its V columns in V separate accumulators, then the bias and the ReLU
// as in spmm_impl: the order and the expressions of spmm_* / spmm_t_*, so the
// same bits whatever the launch, V, TN, R, chunk or order (on a GPU too: the same
// `acc += value * x` contracted to the same FMA). No atomics.
// Twins: numpy_twins.spmm_tiled and .spmm_t_tiled (the same order).

// V values of type T at a (sizeof(T) * V)-aligned address: one vector load or store.
template <typename T, int V>
struct __align__(sizeof(T) * V) SpmmVec {
    T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void spmm_vec_impl(
    const int* __restrict__ ptr, const int* __restrict__ cols, const int* __restrict__ perm,
    const T* __restrict__ data, const T* __restrict__ dense, const T* __restrict__ bias,
    T* __restrict__ out, const int* __restrict__ order, int n, int batch, int has_bias,
    int relu, int tile_cols, int chunk, int* s_col, T* s_val)
{
    typedef SpmmVec<T, V> Vec;
    const int S = tile_cols / V;                   // threads per row (a subwarp)
    const int R = blockDim.x / S;                  // row slots per block
    const int g = threadIdx.x / S;                 // this thread's slot (g >= R: idle)
    const int lane = threadIdx.x % S;
    const long long row_tiles = (n + (long long)R - 1) / R;
    const long long col_tiles = (batch + (long long)tile_cols - 1) / tile_cols;
    const long long items = row_tiles * col_tiles;
    // Uniform over the block (blockIdx only): every thread runs every iteration.
    for (long long item = blockIdx.x; item < items; item += gridDim.x) {
        const int slot0 = (int)(item % row_tiles) * R;
        const long long j0 = (item / row_tiles) * tile_cols + (long long)lane * V;
        const bool has_row = g < R && slot0 + g < n;
        const int r = has_row ? order[slot0 + g] : 0;
        const int begin = has_row ? ptr[r] : 0;
        const int end = has_row ? ptr[r + 1] : 0;
        int longest = 0;  // the block's longest row, alike in every thread
        for (int h = 0; h < R && slot0 + h < n; ++h) {
            const int q = order[slot0 + h];
            const int len = ptr[q + 1] - ptr[q];
            longest = len > longest ? len : longest;
        }
        const int stages = (longest + chunk - 1) / chunk;
        const bool active = has_row && j0 < batch;  // V > 1: batch % V == 0, all V inside
        Vec acc;  // the V outputs' sums, stored at once
        for (int v = 0; v < V; ++v) acc.v[v] = 0;
        for (int s = 0; s < stages; ++s) {
            const int base = begin + s * chunk;
            const int count = end - base < chunk ? end - base : chunk;  // <= 0 when done
            for (int e = lane; e < count; e += S) {
                const int p = base + e;
                s_col[g * chunk + e] = cols[p];
                s_val[g * chunk + e] = data[perm ? perm[p] : p];
            }
            __syncthreads();  // the chunk is in shared memory
            if (active) {
                const int* col = s_col + g * chunk;
                const T* val = s_val + g * chunk;
                for (int e = 0; e < count; ++e) {
                    const T w = val[e];
                    const Vec d = *reinterpret_cast<const Vec*>(
                        dense + (long long)col[e] * batch + j0);
                    for (int v = 0; v < V; ++v) acc.v[v] += w * d.v[v];
                }
            }
            __syncthreads();  // every thread is done with it before the next is loaded
        }
        if (active) {
            if (has_bias) {
                const T b = bias[r];
                for (int v = 0; v < V; ++v) {
                    acc.v[v] += b;
                    if (relu && acc.v[v] < 0) acc.v[v] = 0;
                }
            }
            *reinterpret_cast<Vec*>(out + (long long)r * batch + j0) = acc;
        }
    }
}

// `vec` (4 or 1 for float32, 2 or 1 for float64) picks the instantiation; the shared
// arrays are the kernels' own, as for the tiled kernels.
extern "C" __global__ void spmm_vec_f32(
    const int* indptr, const int* indices, const float* data, const float* x,
    const float* bias, float* out, const int* order, int n_rows, int batch, int has_bias,
    int relu, int tile_cols, int chunk, int vec)
{
    __shared__ int s_col[SPMM_TILE_SHARED];
    __shared__ float s_val[SPMM_TILE_SHARED];
    if (vec == 4)
        spmm_vec_impl<float, 4>(indptr, indices, nullptr, data, x, bias, out, order, n_rows,
                                batch, has_bias, relu, tile_cols, chunk, s_col, s_val);
    else
        spmm_vec_impl<float, 1>(indptr, indices, nullptr, data, x, bias, out, order, n_rows,
                                batch, has_bias, relu, tile_cols, chunk, s_col, s_val);
}

extern "C" __global__ void spmm_vec_f64(
    const int* indptr, const int* indices, const double* data, const double* x,
    const double* bias, double* out, const int* order, int n_rows, int batch, int has_bias,
    int relu, int tile_cols, int chunk, int vec)
{
    __shared__ int s_col[SPMM_TILE_SHARED];
    __shared__ double s_val[SPMM_TILE_SHARED];
    if (vec == 2)
        spmm_vec_impl<double, 2>(indptr, indices, nullptr, data, x, bias, out, order, n_rows,
                                 batch, has_bias, relu, tile_cols, chunk, s_col, s_val);
    else
        spmm_vec_impl<double, 1>(indptr, indices, nullptr, data, x, bias, out, order, n_rows,
                                 batch, has_bias, relu, tile_cols, chunk, s_col, s_val);
}

extern "C" __global__ void spmm_t_vec_f32(
    const int* t_indptr, const int* t_rows, const int* t_perm, const float* data,
    const float* dy, float* out, const int* order, int n_cols, int batch, int tile_cols,
    int chunk, int vec)
{
    __shared__ int s_col[SPMM_TILE_SHARED];
    __shared__ float s_val[SPMM_TILE_SHARED];
    if (vec == 4)
        spmm_vec_impl<float, 4>(t_indptr, t_rows, t_perm, data, dy, nullptr, out, order,
                                n_cols, batch, 0, 0, tile_cols, chunk, s_col, s_val);
    else
        spmm_vec_impl<float, 1>(t_indptr, t_rows, t_perm, data, dy, nullptr, out, order,
                                n_cols, batch, 0, 0, tile_cols, chunk, s_col, s_val);
}

extern "C" __global__ void spmm_t_vec_f64(
    const int* t_indptr, const int* t_rows, const int* t_perm, const double* data,
    const double* dy, double* out, const int* order, int n_cols, int batch, int tile_cols,
    int chunk, int vec)
{
    __shared__ int s_col[SPMM_TILE_SHARED];
    __shared__ double s_val[SPMM_TILE_SHARED];
    if (vec == 2)
        spmm_vec_impl<double, 2>(t_indptr, t_rows, t_perm, data, dy, nullptr, out, order,
                                 n_cols, batch, 0, 0, tile_cols, chunk, s_col, s_val);
    else
        spmm_vec_impl<double, 1>(t_indptr, t_rows, t_perm, data, dy, nullptr, out, order,
                                 n_cols, batch, 0, 0, tile_cols, chunk, s_col, s_val);
}

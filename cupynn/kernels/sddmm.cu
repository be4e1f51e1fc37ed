// Sampled dense-dense product (SDDMM) at the active entries of a CSR matrix.
//
//   out[k] = sum_j dy[row(k), j] * x[indices[k], j]      for k in [0, nnz)
//
// dy is (n_rows, batch) and x is (n_cols, batch), both C-contiguous: cupynn
// stores activations feature-major, so both operands of every dot product are
// contiguous runs of length `batch`. This is the weight gradient of a sparse
// layer at its active entries only; no dense (n_rows x n_cols) array exists.
//
// The row of nonzero k is found by binary search in indptr: the largest r with
// indptr[r] <= k. Empty rows (indptr[r] == indptr[r+1]) are skipped naturally.
// Offsets are 64-bit: row * batch overflows int32 for 4096 x 2^20 operands.
//
// Two kernels compute the same thing:
//
// sddmm_*: one thread per nonzero, grid-stride loop (any nnz fits any grid);
//   the thread walks its two rows alone. The 32 threads of a warp then read
//   32 different rows at each step: every load of the warp touches 32 cache
//   lines, of which it uses 4 bytes each.
//
// sddmm_warp_*: groups of `group` lanes (a power of two, 1 to 32) of a warp
//   take one nonzero each, `32 / group` nonzeros per warp. Lane s of a group
//   sums the products j = s, s + group, s + 2 group, ... of its nonzero's two
//   rows, so the lanes of a group read consecutive addresses (a group of 8 or
//   more float32 lanes fills whole 32-byte sectors); then the group's partial
//   sums are added by a butterfly of warp shuffles (offsets group/2, ..., 1),
//   and lane 0 of the group writes out[k]. Grid-stride over nonzeros in steps
//   of whole warps: every lane of a warp runs the same iterations, as the
//   full-mask shuffles need (lanes past nnz add zeros and write nothing).
//   blockDim.x must be a multiple of 32, so that the threads the index
//   arithmetic puts in one warp are one hardware warp.
//   NumPy twin: cupynn.kernels.numpy_twins.sddmm_warp (the same summation order).
//
// NumPy twin of both: cupynn.kernels.numpy_twins.sddmm.
//
// sddmm_tiled_* (issue 20): the warp kernel's sums with dy staged in shared
//   memory. A block takes row r of the pattern (grid-stride over rows, every
//   thread of a block on the same rows, so that all reach every barrier) and
//   reads dy[r, :] from global memory once per pass instead of once per
//   nonzero: the row's batch is staged through the __shared__ tile `chunk`
//   values at a time (chunk <= SDDMM_TILE_MAX and a multiple of group), and
//   the block's groups of `group` lanes take the row's nonzeros, ACC of them
//   a lane, blockDim.x / group * ACC nonzeros a pass. Lane s of a group sums
//   j = s, s + group, ... from 0, chunk after chunk, into one accumulator per
//   nonzero; the butterfly and the write are the warp kernel's. Each nonzero's
//   sum is thus the warp kernel's at the same group, term for term: the same
//   bits (the products read tile[j] instead of dy[r, j], the same value).
//   A row's tile is staged (then __syncthreads) before it is read and read
//   by all (then __syncthreads) before it is staged again. When the batch
//   fits one chunk the tile is staged once per row, for all its passes.
//   An empty row has no pass and no barrier (the whole block skips it).
//   blockDim.x must be a multiple of 32 (full-mask shuffles), as for the
//   warp kernel. No atomics; deterministic for any launch.
//   NumPy twin: cupynn.kernels.numpy_twins.sddmm_tiled (the same order).
//
// sddmm_vec_* (issue 20): sddmm_tiled_* with vector loads. The same blocks (one per
//   row of the pattern, grid-stride), the same staging of dy[r] through the shared
//   tile (chunk values at a time), the same groups of `group` lanes per nonzero and
//   ACC nonzeros per lane, the same butterfly and write; but the batch is read in
//   slices of V consecutive values: V = 4 for float32, 2 for float64 (one 16-byte
//   load, through an __align__(16) struct), or 1. Lane s of a group takes the
//   slices j = V s, V s + V group, V s + 2 V group, ... (slice q of the row goes to
//   lane q % group) and reads each with one vector load of x and one of the tile;
//   the tile is staged with vector loads and stores too. The host wrapper takes V > 1
//   only when batch % V == 0 and dy and x start on a 16-byte boundary, so that every
//   vector access is aligned (row * batch, c0 and j are multiples of V; the tile is
//   __align__(16)); otherwise it launches V = 1. chunk must be a multiple of
//   V * group (SDDMM_TILE_CHUNK = 512 is, for every group up to 32).
//   Summation order, fixed whatever the launch: lane s adds the products of its
//   slices in increasing j, within a slice component by component (j, j + 1, ...,
//   j + V - 1), one after another from 0 into one accumulator per nonzero; then the
//   warp kernel's butterfly (offsets group/2, ..., 1). With V = 1 that is
//   sddmm_tiled's (and the warp kernel's) order: the same bits; with V > 1 lane s
//   sums other columns than there, so the bits differ from the warp kernel's by
//   rounding. Barriers as in sddmm_tiled_*; blockDim.x a multiple of 32. No atomics.
//   NumPy twin: cupynn.kernels.numpy_twins.sddmm_vec (the same order, to the bit).
//
// relu_grad_rowsum_*: the step of a layer's backward pass before its SDDMM,
//   out = dy * (y > 0) (relu = 1; dy alone when relu = 0) and
//   sums[r] = sum_j out[r, j] (the bias gradient), with no temporary array,
//   so a captured CUDA graph can run it (issue 19). out may be dy itself.
//   One warp per row, grid-stride over rows in whole warps (blockDim.x a
//   multiple of 32); lane l adds out[r, l], out[r, l + 32], ... in turn from
//   0, then the 32 partial sums are added by a butterfly of warp shuffles
//   (offsets 16, 8, 4, 2, 1) and lane 0 writes sums[r]. A fixed order for
//   any launch: the same bits on every run.
//   NumPy twin: cupynn.kernels.numpy_twins.relu_grad_rowsum (the same order).

// The row of nonzero k: the largest r with indptr[r] <= k (n_rows >= 1).
__device__ __forceinline__ int row_of(const int* __restrict__ indptr, int n_rows, long long k)
{
    int lo = 0;
    int hi = n_rows;  // invariant: indptr[lo] <= k < indptr[hi]
    while (hi - lo > 1) {
        const int mid = lo + (hi - lo) / 2;
        if (indptr[mid] <= k) lo = mid; else hi = mid;
    }
    return lo;
}

template <typename T>
__device__ __forceinline__ void sddmm_impl(
    const int* __restrict__ indptr, const int* __restrict__ indices,
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ out,
    int n_rows, int nnz, int batch)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < nnz; k += stride) {
        const T* a = dy + (long long)row_of(indptr, n_rows, k) * batch;
        const T* b = x + (long long)indices[k] * batch;
        T acc = 0;
        for (int j = 0; j < batch; ++j) acc += a[j] * b[j];
        out[k] = acc;
    }
}

template <typename T>
__device__ __forceinline__ void sddmm_warp_impl(
    const int* __restrict__ indptr, const int* __restrict__ indices,
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ out,
    int n_rows, int nnz, int batch, int group)
{
    const int lane = threadIdx.x & 31;
    const int sub = lane & (group - 1);           // lane within its group
    const int per_warp = 32 / group;              // nonzeros per warp and iteration
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const long long stride = (((long long)gridDim.x * blockDim.x) >> 5) * per_warp;
    for (long long base = warp * per_warp; base < nnz; base += stride) {
        const long long k = base + lane / group;
        T acc = 0;
        if (k < nnz) {
            const T* a = dy + (long long)row_of(indptr, n_rows, k) * batch;
            const T* b = x + (long long)indices[k] * batch;
            for (int j = sub; j < batch; j += group) acc += a[j] * b[j];
        }
        for (int offset = group >> 1; offset > 0; offset >>= 1)
            acc += __shfl_xor_sync(0xffffffffu, acc, offset);
        if (k < nnz && sub == 0) out[k] = acc;
    }
}

// Shared tile of sddmm_tiled_*: at most this many batch values of dy[r] at a time.
#define SDDMM_TILE_MAX 512
// Nonzeros a lane accumulates at once in sddmm_tiled_* (registers).
#define SDDMM_TILE_ACC 4

template <typename T>
__device__ __forceinline__ void sddmm_tiled_impl(
    const int* __restrict__ indptr, const int* __restrict__ indices,
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ out,
    int n_rows, int batch, int group, int chunk, T* tile)
{
    const int lane = threadIdx.x & 31;
    const int sub = lane & (group - 1);              // lane within its group
    const int slot = threadIdx.x / group;            // the group's place in the block
    const int groups = blockDim.x / group;
    const int per_pass = groups * SDDMM_TILE_ACC;    // nonzeros of a row per pass
    const bool one_chunk = batch <= chunk;           // the tile holds the whole row
    for (long long r = blockIdx.x; r < n_rows; r += gridDim.x) {  // the same rows block-wide
        const int start = indptr[r];
        const int end = indptr[r + 1];
        const T* dy_row = dy + r * batch;
        for (int base = start; base < end; base += per_pass) {
            T acc[SDDMM_TILE_ACC];
            for (int i = 0; i < SDDMM_TILE_ACC; ++i) acc[i] = 0;
            for (int c0 = 0; c0 < batch; c0 += chunk) {
                const int len = batch - c0 < chunk ? batch - c0 : chunk;
                if (!one_chunk || base == start) {
                    for (int j = threadIdx.x; j < len; j += blockDim.x) tile[j] = dy_row[c0 + j];
                    __syncthreads();  // the tile is written before any thread reads it
                }
                for (int i = 0; i < SDDMM_TILE_ACC; ++i) {
                    const long long k = (long long)base + slot + (long long)i * groups;
                    if (k < end) {
                        const T* b = x + (long long)indices[k] * batch + c0;
                        for (int j = sub; j < len; j += group) acc[i] += tile[j] * b[j];
                    }
                }
                if (!one_chunk) __syncthreads();  // read by all before the next chunk's stage
            }
            for (int i = 0; i < SDDMM_TILE_ACC; ++i) {
                T v = acc[i];
                for (int offset = group >> 1; offset > 0; offset >>= 1)
                    v += __shfl_xor_sync(0xffffffffu, v, offset);
                const long long k = (long long)base + slot + (long long)i * groups;
                if (k < end && sub == 0) out[k] = v;
            }
        }
        if (one_chunk && start < end) __syncthreads();  // read by all before the next row's
    }
}

extern "C" __global__ void sddmm_f32(
    const int* indptr, const int* indices, const float* dy, const float* x,
    float* out, int n_rows, int nnz, int batch)
{
    sddmm_impl<float>(indptr, indices, dy, x, out, n_rows, nnz, batch);
}

extern "C" __global__ void sddmm_f64(
    const int* indptr, const int* indices, const double* dy, const double* x,
    double* out, int n_rows, int nnz, int batch)
{
    sddmm_impl<double>(indptr, indices, dy, x, out, n_rows, nnz, batch);
}

extern "C" __global__ void sddmm_warp_f32(
    const int* indptr, const int* indices, const float* dy, const float* x,
    float* out, int n_rows, int nnz, int batch, int group)
{
    sddmm_warp_impl<float>(indptr, indices, dy, x, out, n_rows, nnz, batch, group);
}

extern "C" __global__ void sddmm_warp_f64(
    const int* indptr, const int* indices, const double* dy, const double* x,
    double* out, int n_rows, int nnz, int batch, int group)
{
    sddmm_warp_impl<double>(indptr, indices, dy, x, out, n_rows, nnz, batch, group);
}

// Static shared tiles, declared in the kernels themselves (not in the template:
// one array per element type).
extern "C" __global__ void sddmm_tiled_f32(
    const int* indptr, const int* indices, const float* dy, const float* x,
    float* out, int n_rows, int batch, int group, int chunk)
{
    __shared__ float tile[SDDMM_TILE_MAX];
    sddmm_tiled_impl<float>(indptr, indices, dy, x, out, n_rows, batch, group, chunk, tile);
}

extern "C" __global__ void sddmm_tiled_f64(
    const int* indptr, const int* indices, const double* dy, const double* x,
    double* out, int n_rows, int batch, int group, int chunk)
{
    __shared__ double tile[SDDMM_TILE_MAX];
    sddmm_tiled_impl<double>(indptr, indices, dy, x, out, n_rows, batch, group, chunk, tile);
}

// V values of type T at a (sizeof(T) * V)-aligned address: one vector load or store.
template <typename T, int V>
struct __align__(sizeof(T) * V) SddmmVec {
    T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void sddmm_vec_impl(
    const int* __restrict__ indptr, const int* __restrict__ indices,
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ out,
    int n_rows, int batch, int group, int chunk, T* tile)
{
    typedef SddmmVec<T, V> Vec;
    const int lane = threadIdx.x & 31;
    const int sub = lane & (group - 1);              // lane within its group
    const int slot = threadIdx.x / group;            // the group's place in the block
    const int groups = blockDim.x / group;
    const int per_pass = groups * SDDMM_TILE_ACC;    // nonzeros of a row per pass
    const int step = V * group;                      // a lane's slices are this far apart
    const bool one_chunk = batch <= chunk;           // the tile holds the whole row
    for (long long r = blockIdx.x; r < n_rows; r += gridDim.x) {  // the same rows block-wide
        const int start = indptr[r];
        const int end = indptr[r + 1];
        const T* dy_row = dy + r * batch;
        for (int base = start; base < end; base += per_pass) {
            T acc[SDDMM_TILE_ACC];
            for (int i = 0; i < SDDMM_TILE_ACC; ++i) acc[i] = 0;
            for (int c0 = 0; c0 < batch; c0 += chunk) {
                const int len = batch - c0 < chunk ? batch - c0 : chunk;  // V > 1: a multiple
                if (!one_chunk || base == start) {
                    for (int j = V * threadIdx.x; j < len; j += V * blockDim.x)
                        *reinterpret_cast<Vec*>(tile + j) =
                            *reinterpret_cast<const Vec*>(dy_row + c0 + j);
                    __syncthreads();  // the tile is written before any thread reads it
                }
                for (int i = 0; i < SDDMM_TILE_ACC; ++i) {
                    const long long k = (long long)base + slot + (long long)i * groups;
                    if (k < end) {
                        const T* b = x + (long long)indices[k] * batch + c0;
                        for (int j = V * sub; j < len; j += step) {
                            const Vec t = *reinterpret_cast<const Vec*>(tile + j);
                            const Vec u = *reinterpret_cast<const Vec*>(b + j);
                            for (int v = 0; v < V; ++v) acc[i] += t.v[v] * u.v[v];
                        }
                    }
                }
                if (!one_chunk) __syncthreads();  // read by all before the next chunk's stage
            }
            for (int i = 0; i < SDDMM_TILE_ACC; ++i) {
                T v = acc[i];
                for (int offset = group >> 1; offset > 0; offset >>= 1)
                    v += __shfl_xor_sync(0xffffffffu, v, offset);
                const long long k = (long long)base + slot + (long long)i * groups;
                if (k < end && sub == 0) out[k] = v;
            }
        }
        if (one_chunk && start < end) __syncthreads();  // read by all before the next row's
    }
}

// `vec` (4 or 1 for float32, 2 or 1 for float64) picks the instantiation. The tile is
// aligned for the vector accesses.
extern "C" __global__ void sddmm_vec_f32(
    const int* indptr, const int* indices, const float* dy, const float* x,
    float* out, int n_rows, int batch, int group, int chunk, int vec)
{
    __shared__ __align__(16) float tile[SDDMM_TILE_MAX];
    if (vec == 4)
        sddmm_vec_impl<float, 4>(indptr, indices, dy, x, out, n_rows, batch, group, chunk, tile);
    else
        sddmm_vec_impl<float, 1>(indptr, indices, dy, x, out, n_rows, batch, group, chunk, tile);
}

extern "C" __global__ void sddmm_vec_f64(
    const int* indptr, const int* indices, const double* dy, const double* x,
    double* out, int n_rows, int batch, int group, int chunk, int vec)
{
    __shared__ __align__(16) double tile[SDDMM_TILE_MAX];
    if (vec == 2)
        sddmm_vec_impl<double, 2>(indptr, indices, dy, x, out, n_rows, batch, group, chunk,
                                  tile);
    else
        sddmm_vec_impl<double, 1>(indptr, indices, dy, x, out, n_rows, batch, group, chunk,
                                  tile);
}

// out = dy * (y > 0) as NumPy computes it: the mask is a factor of 1 or 0, so a
// NaN or infinite dy at a dead unit gives NaN and a negative one -0.0, as
// `dy * (y > 0)` does. dy, y and out are not __restrict__: out may be dy, and
// without the ReLU the wrapper passes dy for y (not read).
template <typename T>
__device__ __forceinline__ void relu_grad_rowsum_impl(
    const T* dy, const T* y, T* out, T* __restrict__ sums,
    int n_rows, int batch, int relu)
{
    const int lane = threadIdx.x & 31;
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const long long n_warps = ((long long)gridDim.x * blockDim.x) >> 5;
    const bool write = relu || out != dy;  // in place without the ReLU: nothing to write
    for (long long r = warp; r < n_rows; r += n_warps) {  // the same rows for every lane
        const long long base = r * batch;
        T acc = 0;
        for (int j = lane; j < batch; j += 32) {
            T v = dy[base + j];
            if (relu) v = v * (y[base + j] > 0 ? (T)1 : (T)0);
            if (write) out[base + j] = v;
            acc += v;
        }
        for (int offset = 16; offset > 0; offset >>= 1)
            acc += __shfl_xor_sync(0xffffffffu, acc, offset);
        if (lane == 0) sums[r] = acc;
    }
}

extern "C" __global__ void relu_grad_rowsum_f32(
    const float* dy, const float* y, float* out, float* sums, int n_rows, int batch, int relu)
{
    relu_grad_rowsum_impl<float>(dy, y, out, sums, n_rows, batch, relu);
}

extern "C" __global__ void relu_grad_rowsum_f64(
    const double* dy, const double* y, double* out, double* sums, int n_rows, int batch,
    int relu)
{
    relu_grad_rowsum_impl<double>(dy, y, out, sums, n_rows, batch, relu);
}

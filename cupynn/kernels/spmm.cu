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
// NumPy twins: cupynn.kernels.numpy_twins.spmm_rows and .spmm_t_rows (the same
// summation order).

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

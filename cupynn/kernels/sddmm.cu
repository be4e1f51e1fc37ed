// Sampled dense-dense product (SDDMM) at the active entries of a CSR matrix.
//
//   out[k] = sum_j dy[row(k), j] * x[indices[k], j]      for k in [0, nnz)
//
// dy is (n_rows, batch) and x is (n_cols, batch), both C-contiguous: cupynn
// stores activations feature-major, so both operands of every dot product are
// contiguous runs of length `batch`. This is the weight gradient of a sparse
// layer at its active entries only; no dense (n_rows x n_cols) array exists.
//
// One thread per nonzero, grid-stride loop (any nnz fits any grid). The row of
// nonzero k is found by binary search in indptr: the largest r with
// indptr[r] <= k. Empty rows (indptr[r] == indptr[r+1]) are skipped naturally.
// Offsets are 64-bit: row * batch overflows int32 for 4096 x 2^20 operands.
// NumPy twin: cupynn.kernels.numpy_twins.sddmm.

template <typename T>
__device__ __forceinline__ void sddmm_impl(
    const int* __restrict__ indptr, const int* __restrict__ indices,
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ out,
    int n_rows, int nnz, int batch)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < nnz; k += stride) {
        int lo = 0;
        int hi = n_rows;  // invariant: indptr[lo] <= k < indptr[hi]
        while (hi - lo > 1) {
            const int mid = lo + (hi - lo) / 2;
            if (indptr[mid] <= k) lo = mid; else hi = mid;
        }
        const T* a = dy + (long long)lo * batch;
        const T* b = x + (long long)indices[k] * batch;
        T acc = 0;
        for (int j = 0; j < batch; ++j) acc += a[j] * b[j];
        out[k] = acc;
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

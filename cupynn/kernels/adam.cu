// Fused Adam update, in place, one element per thread (grid-stride loop).
//
//   m <- b1 m + c1 g               (c1 = 1 - b1)
//   v <- b2 v + c2 g^2             (c2 = 1 - b2)
//   p <- p - lr * (m / bc1) / (sqrt(v / bc2) + eps)
//
// bc1 = 1 - b1^t and bc2 = 1 - b2^t are the bias corrections of step t.
// c1, c2, bc1 and bc2 are computed once on the host in double precision and
// then rounded: 1 - float(0.999) would be 0.00099998713, not float(0.001). One pass over p, g, m and v instead of the eight
// temporaries the same formula costs as separate array expressions.
//
// adam_* updates one array with scalars passed by value; adam_multi_* updates
// every array of a list in one launch (issue 19), its scalars read from device
// memory so that a captured CUDA graph can take a new step's scalars without
// being captured again. Both run adam_element, so an element's update is the
// same instructions in either.
// NumPy twins: cupynn.kernels.numpy_twins.adam and .adam_multi.

// The update of element i: the one formula both kernels run.
template <typename T>
__device__ __forceinline__ void adam_element(
    T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
    T lr, T b1, T b2, T c1, T c2, T eps, T bc1, T bc2, long long i)
{
    const T gi = g[i];
    const T mi = b1 * m[i] + c1 * gi;
    const T vi = b2 * v[i] + c2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] -= lr * (mi / bc1) / (sqrt(vi / bc2) + eps);
}

template <typename T>
__device__ __forceinline__ void adam_impl(
    T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
    T lr, T b1, T b2, T c1, T c2, T eps, T bc1, T bc2, long long n)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        adam_element<T>(p, g, m, v, lr, b1, b2, c1, c2, eps, bc1, bc2, i);
    }
}

extern "C" __global__ void adam_f32(
    float* p, const float* g, float* m, float* v,
    float lr, float b1, float b2, float c1, float c2, float eps, float bc1, float bc2,
    long long n)
{
    adam_impl<float>(p, g, m, v, lr, b1, b2, c1, c2, eps, bc1, bc2, n);
}

extern "C" __global__ void adam_f64(
    double* p, const double* g, double* m, double* v,
    double lr, double b1, double b2, double c1, double c2, double eps, double bc1, double bc2,
    long long n)
{
    adam_impl<double>(p, g, m, v, lr, b1, b2, c1, c2, eps, bc1, bc2, n);
}

// Every array a of a list, in one launch: element j of array a is element
// offsets[a] + j of the concatenation of the arrays (offsets: n_arrays + 1
// cumulative lengths, offsets[0] = 0; a length may be 0). A grid-stride loop
// runs over the concatenation; a thread's elements only increase, so it walks
// the arrays forwards, loading an array's four pointers once per array it
// visits. p_ptrs[a] (and g_, m_, v_ptrs[a]) hold the data pointer of array a.
//
// The scalars are row row[0] of table (rows of 8: lr, b1, b2, 1 - b1, 1 - b2,
// eps, bc1, bc2, as adam_* takes them): eagerly a row of a table of the coming
// steps, in a captured graph a device counter that a kernel advances.
template <typename T>
__device__ __forceinline__ void adam_multi_impl(
    const unsigned long long* __restrict__ p_ptrs, const unsigned long long* __restrict__ g_ptrs,
    const unsigned long long* __restrict__ m_ptrs, const unsigned long long* __restrict__ v_ptrs,
    const long long* __restrict__ offsets, int n_arrays, const T* __restrict__ table,
    const long long* __restrict__ row)
{
    const long long total = offsets[n_arrays];
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) {
        return;
    }
    const T* s = table + 8 * row[0];
    const T lr = s[0], b1 = s[1], b2 = s[2], c1 = s[3], c2 = s[4], eps = s[5], bc1 = s[6],
            bc2 = s[7];
    int a = 0;
    while (i < total) {
        while (offsets[a + 1] <= i) {  // stops below n_arrays: i < total = offsets[n_arrays]
            ++a;
        }
        const long long begin = offsets[a], end = offsets[a + 1];
        T* p = reinterpret_cast<T*>(p_ptrs[a]);
        const T* g = reinterpret_cast<const T*>(g_ptrs[a]);
        T* m = reinterpret_cast<T*>(m_ptrs[a]);
        T* v = reinterpret_cast<T*>(v_ptrs[a]);
        for (; i < end; i += stride) {
            adam_element<T>(p, g, m, v, lr, b1, b2, c1, c2, eps, bc1, bc2, i - begin);
        }
    }
}

extern "C" __global__ void adam_multi_f32(
    const unsigned long long* p_ptrs, const unsigned long long* g_ptrs,
    const unsigned long long* m_ptrs, const unsigned long long* v_ptrs,
    const long long* offsets, int n_arrays, const float* table, const long long* row)
{
    adam_multi_impl<float>(p_ptrs, g_ptrs, m_ptrs, v_ptrs, offsets, n_arrays, table, row);
}

extern "C" __global__ void adam_multi_f64(
    const unsigned long long* p_ptrs, const unsigned long long* g_ptrs,
    const unsigned long long* m_ptrs, const unsigned long long* v_ptrs,
    const long long* offsets, int n_arrays, const double* table, const long long* row)
{
    adam_multi_impl<double>(p_ptrs, g_ptrs, m_ptrs, v_ptrs, offsets, n_arrays, table, row);
}

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
// NumPy twin: cupynn.kernels.numpy_twins.adam.

template <typename T>
__device__ __forceinline__ void adam_impl(
    T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
    T lr, T b1, T b2, T c1, T c2, T eps, T bc1, T bc2, long long n)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const T gi = g[i];
        const T mi = b1 * m[i] + c1 * gi;
        const T vi = b2 * v[i] + c2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] -= lr * (mi / bc1) / (sqrt(vi / bc2) + eps);
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

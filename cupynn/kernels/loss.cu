// Losses and their gradients from the logits in two launches (issue 19), in
// place of the ten or so array expressions of cupynn/losses.py on the GPU: a
// step that launches a fixed list of kernels into buffers it owns can be
// captured as a CUDA graph.
//
// 1. A per-row kernel, one thread per row of the batch (grid-stride loop, so
//    any batch fits any grid), writes the gradient row and the row's loss into
//    per_row[i]:
//
//    softmax_cross_entropy_rows_*: logits (n, classes) C-order, int64 labels.
//        top = max_j z_j;  e_j = exp(z_j - top);  norm = sum_j e_j (j = 0, 1, ...)
//        per_row = log(norm) - (z_label - top)
//        grad_j  = (e_j / norm - [j == label]) / den
//      the stable shift by the row's max of cupynn.losses.cross_entropy, and its
//      order of operations (e / norm, minus 1 at the label, then / den). A
//      label outside [0, classes) gives a row of NaN (loss and gradient)
//      instead of a read out of bounds: the wrappers check labels only when
//      asked, and a NaN loss is seen.
//    binary_cross_entropy_rows_*: logits z (n,), targets y (n,) in [0, 1].
//        e = exp(-|z|)                                  (in (0, 1]: no overflow)
//        per_row = (max(z, 0) - y z) + log1p(e)
//        grad    = ((z >= 0 ? 1 / (1 + e) : e / (1 + e)) - y) / den
//      as cupynn.losses.binary_cross_entropy.
//    squared_error_rows_*: pred and target (n, outputs) C-order.
//        d_j = pred_j - target_j;  grad_j = d_j * scale;  per_row = sum_j d_j d_j
//      scale = 2 / (den_rows * outputs) is rounded once on the host from
//      double, as NumPy rounds the Python float of cupynn.losses.mean_squared_error.
//
//    den is the batch size n, or the global batch `total` of a data-parallel
//    step (cupynn.losses' module doc). One thread per row reads the rows of a
//    warp `classes` elements apart; at the classes of a classifier (2 to a few
//    hundred) the row fits in the cache lines the thread touches again in its
//    next passes.
//
// 2. mean_of_rows_*: one warp sums per_row in a fixed order and writes
//    out[0] = sum / den: lane l adds rows l, l + 32, l + 64, ... in turn, then a
//    butterfly of shuffles (offsets 16, 8, 4, 2, 1) adds the 32 partial sums,
//    which leaves every lane the same total. No atomics and no __shared__
//    memory: the result repeats bit for bit, and the C++ emulation of
//    tests/cuda_host runs the kernel. Launch it as one block of 32 threads.
//    n = 0 gives 0 / den: 0 with a `total`, NaN (0 / 0) for the mean of no rows,
//    as NumPy's mean.
//
// On a GPU the compiler may contract a * b + c into one fused multiply-add
// (nvcc's default), which rounds once where NumPy rounds twice: the kernels
// agree with their twins to rounding, not bit for bit.
//
// NumPy twins (the same order of operations): cupynn.kernels.numpy_twins.
// softmax_cross_entropy_rows, binary_cross_entropy_rows, squared_error_rows,
// mean_of_rows.

template <typename T>
__device__ __forceinline__ T not_a_number() { return (T)nan(""); }

template <typename T>
__device__ __forceinline__ void softmax_cross_entropy_rows_impl(
    const T* __restrict__ logits, const long long* __restrict__ labels, T* __restrict__ grad,
    T* __restrict__ per_row, int n, int classes, T den)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const T* z = logits + i * classes;  // 64-bit offsets: n * classes may pass 2^31
        T* g = grad + i * classes;
        const long long label = labels[i];
        if (label < 0 || label >= classes) {
            per_row[i] = not_a_number<T>();
            for (int j = 0; j < classes; ++j) g[j] = not_a_number<T>();
            continue;
        }
        // fmax skips a NaN where NumPy's max keeps it, but the NaN then makes
        // norm, the loss and the whole gradient row NaN all the same.
        T top = z[0];
        for (int j = 1; j < classes; ++j) top = fmax(top, z[j]);
        T norm = 0;
        for (int j = 0; j < classes; ++j) {
            const T e = exp(z[j] - top);
            g[j] = e;
            norm += e;
        }
        per_row[i] = log(norm) - (z[label] - top);
        for (int j = 0; j < classes; ++j) {
            T p = g[j] / norm;
            if (j == label) p -= 1;
            g[j] = p / den;
        }
    }
}

template <typename T>
__device__ __forceinline__ void binary_cross_entropy_rows_impl(
    const T* __restrict__ z, const T* __restrict__ y, T* __restrict__ grad,
    T* __restrict__ per_row, int n, T den)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const T zi = z[i];
        const T yi = y[i];
        const T e = exp(-fabs(zi));
        per_row[i] = ((zi > 0 ? zi : (T)0) - yi * zi) + log1p(e);  // NaN z: NaN e
        const T sigmoid = zi >= 0 ? 1 / (1 + e) : e / (1 + e);
        grad[i] = (sigmoid - yi) / den;
    }
}

template <typename T>
__device__ __forceinline__ void squared_error_rows_impl(
    const T* __restrict__ pred, const T* __restrict__ target, T* __restrict__ grad,
    T* __restrict__ per_row, int n, int outputs, T scale)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const long long base = i * outputs;
        T acc = 0;
        for (int j = 0; j < outputs; ++j) {
            const T d = pred[base + j] - target[base + j];
            grad[base + j] = d * scale;
            acc += d * d;
        }
        per_row[i] = acc;
    }
}

template <typename T>
__device__ __forceinline__ void mean_of_rows_impl(
    const T* __restrict__ per_row, T* __restrict__ out, int n, T den)
{
    // One warp works; any other thread of a larger launch leaves at once.
    if (blockIdx.x != 0 || threadIdx.x >= 32) return;
    const int lane = threadIdx.x;
    T acc = 0;
    for (int i = lane; i < n; i += 32) acc += per_row[i];
    for (int offset = 16; offset > 0; offset >>= 1)
        acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    if (lane == 0) out[0] = acc / den;
}

extern "C" __global__ void softmax_cross_entropy_rows_f32(
    const float* logits, const long long* labels, float* grad, float* per_row,
    int n, int classes, float den)
{
    softmax_cross_entropy_rows_impl<float>(logits, labels, grad, per_row, n, classes, den);
}

extern "C" __global__ void softmax_cross_entropy_rows_f64(
    const double* logits, const long long* labels, double* grad, double* per_row,
    int n, int classes, double den)
{
    softmax_cross_entropy_rows_impl<double>(logits, labels, grad, per_row, n, classes, den);
}

extern "C" __global__ void binary_cross_entropy_rows_f32(
    const float* z, const float* y, float* grad, float* per_row, int n, float den)
{
    binary_cross_entropy_rows_impl<float>(z, y, grad, per_row, n, den);
}

extern "C" __global__ void binary_cross_entropy_rows_f64(
    const double* z, const double* y, double* grad, double* per_row, int n, double den)
{
    binary_cross_entropy_rows_impl<double>(z, y, grad, per_row, n, den);
}

extern "C" __global__ void squared_error_rows_f32(
    const float* pred, const float* target, float* grad, float* per_row,
    int n, int outputs, float scale)
{
    squared_error_rows_impl<float>(pred, target, grad, per_row, n, outputs, scale);
}

extern "C" __global__ void squared_error_rows_f64(
    const double* pred, const double* target, double* grad, double* per_row,
    int n, int outputs, double scale)
{
    squared_error_rows_impl<double>(pred, target, grad, per_row, n, outputs, scale);
}

extern "C" __global__ void mean_of_rows_f32(const float* per_row, float* out, int n, float den)
{
    mean_of_rows_impl<float>(per_row, out, n, den);
}

extern "C" __global__ void mean_of_rows_f64(const double* per_row, double* out, int n, double den)
{
    mean_of_rows_impl<double>(per_row, out, n, den);
}

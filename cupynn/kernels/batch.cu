// The per-step data movement of a training step captured as a CUDA graph
// (issue 19): a graph replays fixed launches on fixed buffers, so the batch
// number is not a launch argument but a device counter that the kernels read
// (`counter[0]`, int64) and the last kernel of the step advances.
//
//   gather_batch_*:  out[f, j] = x[order[counter[0] * stride + j], f]
//                    x (n, features) C-contiguous; out (features, rows),
//                    feature-major as the model's activations
//   gather_labels_*: out[j] = y[order[counter[0] * stride + j]]  (f32, f64, i64)
//   transpose_*:     out[c, r] = src[r, c], src (a, b) -> out (b, a)
//   end_step_*:      losses[counter[0]] = (double)value[0]; counter[0] += 1
//
// The wrappers cannot check counter and order against their bounds without
// reading them on the host, so the kernels do: a position counter[0] * stride
// + j outside [0, n_order), or an order value outside [0, n), gives NaN (-1
// for int64 labels, which the losses take for an invalid label and answer
// with NaN) instead of a read out of bounds; end_step skips the write, not the
// increment, when counter[0] is outside [0, n_losses). A wrong counter then
// shows as a NaN loss instead of corrupting memory.
//
// One thread per output element, grid-stride (any shape fits any grid),
// consecutive threads along an output row: the writes are coalesced, the
// reads of the gather and the transpose stride through rows that the caches
// keep for the neighbouring elements. (A shared-memory tile would make both
// sides coalesced; these are small next to the sparse layers, and kernels
// without __shared__ also run under the CPU emulation of the tests.) Each
// element is a copy: the results are exact, whatever the launch.
//
// Offsets are 64-bit: n * features overflows int32 for large data sets.
// NumPy twins: cupynn.kernels.numpy_twins.gather_batch, .gather_labels,
// .transpose, .end_step.

template <typename T>
__device__ __forceinline__ T missing() { return (T)nan(""); }

template <>
__device__ __forceinline__ long long missing<long long>() { return -1; }

// The row of the data set that batch position j reads, or -1 when out of bounds.
__device__ __forceinline__ long long source_row(
    const long long* __restrict__ order, long long start, long long j, long long n_order,
    long long n)
{
    const long long p = start + j;
    if (p < 0 || p >= n_order) return -1;
    const long long s = order[p];
    return (s < 0 || s >= n) ? -1 : s;
}

template <typename T>
__device__ __forceinline__ void gather_batch_impl(
    const T* __restrict__ x, const long long* __restrict__ order,
    const long long* __restrict__ counter, long long stride, T* __restrict__ out,
    long long n, long long n_order, int features, int rows)
{
    const long long start = counter[0] * stride;
    const long long total = (long long)features * rows;
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const long long f = i / rows;
        const long long s = source_row(order, start, i - f * rows, n_order, n);
        out[i] = s < 0 ? missing<T>() : x[s * features + f];
    }
}

template <typename T>
__device__ __forceinline__ void gather_labels_impl(
    const T* __restrict__ y, const long long* __restrict__ order,
    const long long* __restrict__ counter, long long stride, T* __restrict__ out,
    long long n, long long n_order, int rows)
{
    const long long start = counter[0] * stride;
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < rows; j += step) {
        const long long s = source_row(order, start, j, n_order, n);
        out[j] = s < 0 ? missing<T>() : y[s];
    }
}

template <typename T>
__device__ __forceinline__ void transpose_impl(
    const T* __restrict__ src, T* __restrict__ out, int a, int b)
{
    const long long total = (long long)a * b;
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const long long c = i / a;  // out row c is src column c
        out[i] = src[(i - c * a) * b + c];
    }
}

template <typename T>
__device__ __forceinline__ void end_step_impl(
    const T* __restrict__ value, double* __restrict__ losses, long long* __restrict__ counter,
    long long n_losses)
{
    if (blockIdx.x != 0 || threadIdx.x != 0) return;  // one thread, whatever the launch
    const long long c = counter[0];
    if (c >= 0 && c < n_losses) losses[c] = (double)value[0];
    counter[0] = c + 1;
}

extern "C" __global__ void gather_batch_f32(
    const float* x, const long long* order, const long long* counter, long long stride,
    float* out, long long n, long long n_order, int features, int rows)
{
    gather_batch_impl<float>(x, order, counter, stride, out, n, n_order, features, rows);
}

extern "C" __global__ void gather_batch_f64(
    const double* x, const long long* order, const long long* counter, long long stride,
    double* out, long long n, long long n_order, int features, int rows)
{
    gather_batch_impl<double>(x, order, counter, stride, out, n, n_order, features, rows);
}

extern "C" __global__ void gather_labels_f32(
    const float* y, const long long* order, const long long* counter, long long stride,
    float* out, long long n, long long n_order, int rows)
{
    gather_labels_impl<float>(y, order, counter, stride, out, n, n_order, rows);
}

extern "C" __global__ void gather_labels_f64(
    const double* y, const long long* order, const long long* counter, long long stride,
    double* out, long long n, long long n_order, int rows)
{
    gather_labels_impl<double>(y, order, counter, stride, out, n, n_order, rows);
}

extern "C" __global__ void gather_labels_i64(
    const long long* y, const long long* order, const long long* counter, long long stride,
    long long* out, long long n, long long n_order, int rows)
{
    gather_labels_impl<long long>(y, order, counter, stride, out, n, n_order, rows);
}

extern "C" __global__ void transpose_f32(const float* src, float* out, int a, int b)
{
    transpose_impl<float>(src, out, a, b);
}

extern "C" __global__ void transpose_f64(const double* src, double* out, int a, int b)
{
    transpose_impl<double>(src, out, a, b);
}

extern "C" __global__ void end_step_f32(
    const float* value, double* losses, long long* counter, long long n_losses)
{
    end_step_impl<float>(value, losses, counter, n_losses);
}

extern "C" __global__ void end_step_f64(
    const double* value, double* losses, long long* counter, long long n_losses)
{
    end_step_impl<double>(value, losses, counter, n_losses);
}

// triuvec CUDA kernels (SPEC section 3). One thread per element of the n x n matrix:
// those with i <= j copy to / from packed position i n - i (i-1)/2 + (j - i).
#include "triuvec_kernel.cuh"

#include "common.cuh"

namespace mpncov {
namespace cuda {
namespace {

// v[b, triu(i, j)] = s[b, i, j] for i <= j. total = batch * n * n.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    triuvec_kernel(const T* __restrict__ s, T* __restrict__ v, int n, int64_t total) {
  const int64_t k = static_cast<int64_t>(n) * (n + 1) / 2;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const auto [b, i, j] = matrix_index(idx, n);
    if (i <= j) v[b * k + triu_index(n, i, j)] = s[idx];
  }
}

// out[b, i, j] = g[b, triu(i, j)] for i <= j, else 0. total = batch * n * n.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    triuvec_backward_kernel(const T* __restrict__ g, T* __restrict__ out, int n, int64_t total) {
  const int64_t k = static_cast<int64_t>(n) * (n + 1) / 2;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const auto [b, i, j] = matrix_index(idx, n);
    out[idx] = i <= j ? g[b * k + triu_index(n, i, j)] : T(0);
  }
}

}  // namespace

template <typename T>
cudaError_t triuvec_forward(const T* s, T* v, int64_t batch, int64_t n, cudaStream_t stream) {
  if (batch == 0 || n == 0) return cudaSuccess;
  if (batch < 0 || !fits_int(n)) return cudaErrorInvalidValue;
  const int64_t total = batch * n * n;
  triuvec_kernel<T><<<elementwise_blocks(total), kThreads, 0, stream>>>(s, v, static_cast<int>(n),
                                                                       total);
  return cudaGetLastError();
}

template <typename T>
cudaError_t triuvec_backward(const T* g, T* out, int64_t batch, int64_t n, cudaStream_t stream) {
  if (batch == 0 || n == 0) return cudaSuccess;
  if (batch < 0 || !fits_int(n)) return cudaErrorInvalidValue;
  const int64_t total = batch * n * n;
  triuvec_backward_kernel<T><<<elementwise_blocks(total), kThreads, 0, stream>>>(
      g, out, static_cast<int>(n), total);
  return cudaGetLastError();
}

template cudaError_t triuvec_forward<float>(const float*, float*, int64_t, int64_t, cudaStream_t);
template cudaError_t triuvec_forward<double>(const double*, double*, int64_t, int64_t,
                                             cudaStream_t);
template cudaError_t triuvec_backward<float>(const float*, float*, int64_t, int64_t, cudaStream_t);
template cudaError_t triuvec_backward<double>(const double*, double*, int64_t, int64_t,
                                              cudaStream_t);

}  // namespace cuda
}  // namespace mpncov

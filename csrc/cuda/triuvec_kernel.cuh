// triuvec on CUDA (SPEC section 3). Torch-free launchers.
//
// forward:  s (batch, n, n) -> v (batch, n(n+1)/2), the upper triangle including the
//           diagonal in row-major order: (0,0), (0,1), .., (0,n-1), (1,1), ...
// backward: g (batch, n(n+1)/2) -> (batch, n, n), scattered into the upper triangle,
//           zeros elsewhere.
// Contiguous row-major tensors; runs on `stream`; returns the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mpncov {
namespace cuda {

// Position of (i, j), i <= j, in the packed vector: rows 0..i-1 hold
// n + (n-1) + ... + (n-i+1) = i n - i (i-1) / 2 entries. Linear in j, so (i, j + e) is at
// triu_index(n, i, j) + e for every j + e >= i. Host and device (triuvec's and the Gram
// pipeline's kernels).
__host__ __device__ inline int64_t triu_index(int64_t n, int64_t i, int64_t j) {
  return i * n - i * (i - 1) / 2 + (j - i);
}

template <typename T>
cudaError_t triuvec_forward(const T* s, T* v, int64_t batch, int64_t n, cudaStream_t stream);

template <typename T>
cudaError_t triuvec_backward(const T* g, T* out, int64_t batch, int64_t n, cudaStream_t stream);

}  // namespace cuda
}  // namespace mpncov

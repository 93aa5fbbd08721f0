// covpool on CUDA (SPEC section 1). Torch-free host launchers over raw device pointers.
//
//   forward:  S = (1/M) Xc Xc^T,     Xc = X - mean of X over its M columns
//   backward: dX = (1/M) (G + G^T) Xc
//
// All tensors are contiguous row-major: x (batch, c, m), S / G (batch, c, c).
// `work` is caller-allocated scratch of *_workspace(...) elements of T; the kernels
// never allocate. Everything runs on `stream`. Returns the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mpncov {
namespace cuda {

// Scratch of covpool_forward: Xc = X - row means (batch * c * m).
inline int64_t covpool_forward_workspace(int64_t batch, int64_t c, int64_t m) {
  return batch * c * m;
}

// Scratch of covpool_backward: Xc, then G + G^T (batch * c * c).
inline int64_t covpool_backward_workspace(int64_t batch, int64_t c, int64_t m) {
  return batch * c * m + batch * c * c;
}

// out = S (batch, c, c). Requires m >= 1.
template <typename T>
cudaError_t covpool_forward(const T* x, T* out, T* work, int64_t batch, int64_t c, int64_t m,
                            cudaStream_t stream);

// dx (batch, c, m) from grad (batch, c, c) and x. Requires m >= 1.
template <typename T>
cudaError_t covpool_backward(const T* grad, const T* x, T* dx, T* work, int64_t batch, int64_t c,
                             int64_t m, cudaStream_t stream);

}  // namespace cuda
}  // namespace mpncov

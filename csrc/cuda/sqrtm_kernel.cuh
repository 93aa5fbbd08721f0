// sqrtm (iSQRT, coupled Newton-Schulz) on CUDA (SPEC section 2). Torch-free launchers.
//
// Forward, per sample with t = tr(S) (t = 0 replaced by 1), A = S / t:
//   N = 1:  Y = A T0,  T0 = 0.5 (3I - A)
//   N >= 2: Y1 = A T0, Z1 = T0; Tk = 0.5 (3I - Zk Yk), Y(k+1) = Yk Tk, Z(k+1) = Tk Zk;
//           Y = Y(N-1) T(N-1)
//   out = sqrt(t) Y
// saved (batch, 3(N-1)+1, n, n) = [Y_1..Y_{N-1}, Z_1..Z_{N-1}, T_1..T_{N-1}, Y].
// Backward: dA from GY = sqrt(t) G by forward-mode differentiation of the recurrence
// when symmetric_grad (the pipeline), else by its reverse chain rule (see
// sqrtm_kernel.cu), then
//   dS = dA / t + (<G, Y> / (2 sqrt t) - <dA, A> / t) I, and dS = 0 where t = 0.
//
// All matrices are contiguous row-major; `work` is caller-allocated scratch of
// sqrtm_*_workspace(...) elements of T. Everything runs on `stream`.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mpncov {
namespace cuda {

// Number of n x n matrices per sample in `saved`.
inline int64_t sqrtm_saved_slots(int64_t iters) { return 3 * (iters - 1) + 1; }

// Per-sample scalars are stored first, padded to a multiple of 64 elements.
inline int64_t sqrtm_scalar_block(int64_t batch, int64_t per_sample) {
  return (batch * per_sample + 63) / 64 * 64;
}

// Scratch of sqrtm_forward: t, then A (and T0 when iters == 1; otherwise T0 = Z1 lives
// in saved).
inline int64_t sqrtm_forward_workspace(int64_t batch, int64_t n, int64_t iters) {
  return sqrtm_scalar_block(batch, 1) + (iters == 1 ? 2 : 1) * batch * n * n;
}

// Number of n x n scratch matrices of sqrtm_backward: A, GY, dT (also dA), then up to
// four for dY, dZ and their ping-pong copies (iters = 2 needs two, iters >= 3 four).
inline int64_t sqrtm_backward_matrices(int64_t iters) {
  return iters == 1 ? 3 : (iters == 2 ? 5 : 7);
}

// Scratch of sqrtm_backward: t, <G, Y>, <dA, A>, then the matrices above.
inline int64_t sqrtm_backward_workspace(int64_t batch, int64_t n, int64_t iters) {
  return sqrtm_scalar_block(batch, 3) + sqrtm_backward_matrices(iters) * batch * n * n;
}

// s (batch, n, n) -> out (batch, n, n), saved (batch, sqrtm_saved_slots(iters), n, n).
template <typename T>
cudaError_t sqrtm_forward(const T* s, T* out, T* saved, T* work, int64_t batch, int64_t n,
                          int64_t iters, cudaStream_t stream);

// grad, s (batch, n, n), saved from sqrtm_forward -> grad_s (batch, n, n).
// symmetric_grad: use (G + G^T) / 2 in place of G and compute only half of the products
// whose results are then symmetric.
template <typename T>
cudaError_t sqrtm_backward(const T* grad, const T* s, const T* saved, T* grad_s, T* work,
                           int64_t batch, int64_t n, int64_t iters, bool symmetric_grad,
                           cudaStream_t stream);

}  // namespace cuda
}  // namespace mpncov

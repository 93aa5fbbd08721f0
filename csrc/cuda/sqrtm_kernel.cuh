// sqrtm (iSQRT, coupled Newton-Schulz) on CUDA (SPEC section 2). Torch-free launchers.
//
// The op is iSQRT of the symmetric part Ssym = (S + S^T) / 2 of its input (for an exactly
// symmetric S that is S itself, bit for bit). Per sample, t = tr(S) (t = 0 replaced by 1),
// A = Ssym / t:
//   N = 1:  Y = A T0,  T0 = 0.5 (3I - A)
//   N >= 2: Y1 = A T0, Z1 = T0; Tk = 0.5 (3I - Zk Yk), Y(k+1) = Yk Tk, Z(k+1) = Tk Zk;
//           Y = Y(N-1) T(N-1)
//   out = sqrt(t) Y
// saved (batch, 3(N-1)+1, n, n) = [Y_1..Y_{N-1}, Z_1..Z_{N-1}, T_1..T_{N-1}, Y].
// Backward, the exact gradient of that function for any G: dA = L(A, GY), the Frechet
// derivative of the recurrence along GY = sqrt(t) (G + G^T) / 2 (forward-mode, see
// sqrtm_kernel.cu), then
//   dS = dA / t + (<G, Y> / (2 sqrt t) - <dA, A> / t) I.
// t = 0 gives out = 0 and dS = 0; t < 0 gives NaN in out and dS (sqrt(t)) for that sample
// only; tiny t (denormals) stays finite: everything divides by t, never multiplies by 1/t.
//
// Which products are mirrored (only the upper triangle computed, then copied): for
// iters <= kMaxMirroredIters (csrc/limits.h, "short") all of them. For longer runs
// ("long") the products giving Tk and Z(k+1) (and in the backward dTk, dZ(k+1)) are computed in full: mirroring
// them makes the coupled iteration unstable on rank-deficient inputs (their rounding errors
// grow like 1.5^k in the null space of A); Y-type products stay mirrored.
//
// All matrices are contiguous row-major; `work` is caller-allocated scratch of
// sqrtm_*_workspace(...) elements of T. Everything runs on `stream`.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../limits.h"  // kMaxIters, kMaxMirroredIters (shared with the CPU side)

namespace mpncov {
namespace cuda {

// Valid range of iters, 1..kMaxIters (the binding rejects others with a message; the
// launchers return cudaErrorInvalidValue).
inline bool sqrtm_iters_valid(int64_t iters) { return iters >= 1 && iters <= kMaxIters; }
// Up to kMaxMirroredIters iterations every product is mirrored; above, T / Z are full.
inline bool sqrtm_mirrors_tz(int64_t iters) { return mirrors_all_products(iters); }

// Number of n x n matrices per sample in `saved`.
inline int64_t sqrtm_saved_slots(int64_t iters) { return 3 * (iters - 1) + 1; }

// Per-sample scalars are stored first, padded to a multiple of 64 elements.
inline int64_t sqrtm_scalar_block(int64_t batch, int64_t per_sample) {
  return (batch * per_sample + 63) / 64 * 64;
}

// Blocks per sample of the prep kernels: pairs of 32 x 32 tiles (ti <= tj).
inline int64_t sqrtm_prep_pairs(int64_t n) {
  const int64_t t = (n + 31) / 32;
  return t * (t + 1) / 2;
}

// Scratch of sqrtm_forward: t, then A (and T0 when iters == 1; otherwise T0 = Z1 lives
// in saved).
inline int64_t sqrtm_forward_workspace(int64_t batch, int64_t n, int64_t iters) {
  return sqrtm_scalar_block(batch, 1) + (iters == 1 ? 2 : 1) * batch * n * n;
}

// Number of n x n scratch matrices of sqrtm_backward: A, GY, dT, then dY and its
// ping-pong copy, dZ1 = -0.5 GY and dZ's ping-pong copy (iters = 1 needs only A and GY,
// iters = 2 no second dZ).
inline int64_t sqrtm_backward_matrices(int64_t iters) {
  return iters == 1 ? 3 : (iters == 2 ? 6 : 7);
}

// Per-sample scalars of sqrtm_backward: t, the partial sums of <G, Y> (one per prep
// block) and of <dS, A> (one per upper 64-tile of the last product).
inline int64_t sqrtm_backward_scalars(int64_t batch, int64_t n) {
  const int64_t tiles = (n + 63) / 64;
  return sqrtm_scalar_block(batch, 1 + sqrtm_prep_pairs(n) + tiles * (tiles + 1) / 2);
}

// Scratch of sqrtm_backward: the scalars above, then the matrices.
inline int64_t sqrtm_backward_workspace(int64_t batch, int64_t n, int64_t iters) {
  return sqrtm_backward_scalars(batch, n) + sqrtm_backward_matrices(iters) * batch * n * n;
}

// s (batch, n, n) -> out (batch, n, n), saved (batch, sqrtm_saved_slots(iters), n, n).
template <typename T>
cudaError_t sqrtm_forward(const T* s, T* out, T* saved, T* work, int64_t batch, int64_t n,
                          int64_t iters, cudaStream_t stream);

// grad, s (batch, n, n), saved from sqrtm_forward -> grad_s (batch, n, n), exactly
// symmetric.
template <typename T>
cudaError_t sqrtm_backward(const T* grad, const T* s, const T* saved, T* grad_s, T* work,
                           int64_t batch, int64_t n, int64_t iters, cudaStream_t stream);

}  // namespace cuda
}  // namespace mpncov

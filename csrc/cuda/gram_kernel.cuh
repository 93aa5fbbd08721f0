// The Gram-space iSQRT-COV pipeline triuvec(sqrtm(covpool(x))) on CUDA (SPEC section 8):
// the same function, `saved` layout and degenerate samples as the CPU kernel
// (csrc/cpu/isqrt_cov_gram_cpu.cpp, whose header states the math), so that a `saved` of
// either implementation (or of the ATen form, csrc/gram_aten.cpp) serves the other's
// backward. Torch-free launchers.
//
// Per sample, X (C x M):  Xc = X - mean over the positions (in double),
//   W = Xc / ||Xc|| (the norm in double, divided by), G = W^T W (M x M), the Newton-Schulz
//   recurrence on G with R = Z_N as its result, vec = triuvec(s W R W^T), s = ||Xc|| / sqrt(M).
// Backward: E = sym(Gamma), H = W^T E W, D = L_r(G, H) (forward-mode),
//   dX = centred((2 (E W R + W D) - (<H, R> + 2 <G, D>) W) / sqrt(M)).
//
// x is (batch, C, M) in one of the two feature layouts of csrc/cpu/features.h: channels
// first (contiguous (B, C, M)) or tokens (`tokens` = true: the transposed view of a
// contiguous (B, M, C), passed as that (B, M, C) buffer); dx comes back in the same
// layout, and no transposed copy of x is made. vec is (batch, C (C + 1) / 2), saved is
// (batch, isqrt_cov_gram_saved_slots(iters, recompute_t), M, M):
//   [G, Y_1..Y_{N-1}, Z_2..Z_{N-1}, T_1..T_{N-1}, Z_N]   or, with recompute_t,
//   [G, Y_1..Y_{N-1}, Z_2..Z_N]   (N = 1: [G]).
// Products with a symmetric result are mirrored, T and Z products only up to
// kMaxMirroredIters steps (csrc/limits.h), as on the CPU. ||Xc|| = 0 gives zero vec and
// zero dx, NaN gives NaN, for that sample only. Fixed-order reductions, no atomics, no
// host synchronisation; `work` is caller-allocated scratch of the *_workspace() size in
// elements of T; everything runs on `stream`.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../limits.h"  // kMaxIters, kMaxMirroredIters (shared with the CPU side)
#include "fp32_math.h"  // Fp32Math

namespace mpncov {
namespace cuda {

// Matrices per sample in `saved`: 3N-2 with the T_k, 2N-1 without (the same for N = 1).
inline int64_t isqrt_cov_gram_saved_slots(int64_t iters, bool recompute_t) {
  return recompute_t ? 2 * iters - 1 : 3 * iters - 2;
}

// Scratch regions are padded to whole 64-element blocks (16-byte aligned starts).
inline int64_t gram_padded(int64_t n) { return (n + 63) / 64 * 64; }

// n doubles in elements of T: the per-sample norms ||Xc|| and channel sums (C + 1 per
// sample) that start the scratch.
template <typename T>
int64_t gram_doubles_size(int64_t n) {
  return gram_padded((n * static_cast<int64_t>(sizeof(double)) + sizeof(T) - 1) / sizeof(T));
}

// Scratch of the forward: norms and channel sums, W and P = W R (C x M each), Z_1 and,
// when the T_k are not kept, one T_k (M x M each).
template <typename T>
int64_t isqrt_cov_gram_forward_workspace(int64_t batch, int64_t C, int64_t M, int64_t iters,
                                         bool recompute_t) {
  const int64_t cm = gram_padded(batch * C * M), mm = gram_padded(batch * M * M);
  return gram_doubles_size<T>(batch * (C + 1)) + 2 * cm + (recompute_t && iters > 1 ? 2 : 1) * mm;
}

// M x M matrices of the backward's scratch: H, Z_1, then dZ_1 = -0.5 H (D itself for
// N = 1), and for N >= 2 its ping-pong copy, dY and its copy, dT, and one T_k when the
// forward did not keep them.
inline int64_t gram_backward_matrices(int64_t iters, bool recompute_t) {
  return iters == 1 ? 3 : (recompute_t ? 8 : 7);
}

// Scratch of the backward: norms and channel sums, W, E W (C x M), E (C x C), the
// matrices above.
template <typename T>
int64_t isqrt_cov_gram_backward_workspace(int64_t batch, int64_t C, int64_t M, int64_t iters,
                                          bool recompute_t) {
  const int64_t cm = gram_padded(batch * C * M), mm = gram_padded(batch * M * M);
  return gram_doubles_size<T>(batch * (C + 1)) + 2 * cm + gram_padded(batch * C * C) +
         gram_backward_matrices(iters, recompute_t) * mm;
}

// x -> vec, saved. iters in 1..kMaxIters (else cudaErrorInvalidValue). `math`: how float
// products run (mma_tf32.cuh; double always FFMA).
template <typename T>
cudaError_t isqrt_cov_gram_forward(const T* x, bool tokens, T* vec, T* saved, T* work,
                                   int64_t batch, int64_t C, int64_t M, int64_t iters,
                                   bool recompute_t, Fp32Math math, cudaStream_t stream);

// grad (batch, C (C + 1) / 2), x and saved as the forward's -> dx (in x's layout).
template <typename T>
cudaError_t isqrt_cov_gram_backward(const T* grad, const T* x, bool tokens, const T* saved,
                                    T* dx, T* work, int64_t batch, int64_t C, int64_t M,
                                    int64_t iters, bool recompute_t, Fp32Math math,
                                    cudaStream_t stream);

}  // namespace cuda
}  // namespace mpncov

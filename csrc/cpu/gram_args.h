// Arguments of the Gram-space pipeline's ops (isqrt_cov_gram, isqrt_cov_gram_backward),
// checked by all of their implementations: the CPU kernels (isqrt_cov_gram_cpu.cpp), the
// CUDA binding of the hand-written kernels (cuda/ops_binding.cpp) and the batched ATen
// form (gram_aten.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace mpncov {

// Matrices per sample in the saved iterates: 3N-2 with the T_k, 2N-1 without
// (recompute_t; the same for N = 1).
int64_t gram_saved_count(int64_t N, bool recompute_t);

// Checks grad (B, C(C+1)/2), x (B, C, M) features, saved (B, 3N-2 or 2N-1, M, M) and iters
// of isqrt_cov_gram_backward, all on one device; returns whether the forward left out the
// T_k (recompute_t).
bool check_gram_backward_args(const at::Tensor& grad, const at::Tensor& x,
                              const at::Tensor& saved, int64_t iters, const char* op);

}  // namespace mpncov

// The Gram-space iSQRT-COV pipeline (ops isqrt_cov_gram / isqrt_cov_gram_backward) with every
// step a batched ATen op: the same function, the same `saved` layout and the same degenerate
// samples as the CPU kernels (csrc/cpu/isqrt_cov_gram_cpu.cpp, whose header has the math),
// on any device. The CUDA binding runs it with MPNCOV_CUDA_PRODUCTS=cublas (products in
// cuBLAS; the default is the hand-written kernels, cuda/gram_kernel.cuh); the CPU build
// compiles it too and exposes it as the test-only ops
// mpncov::_isqrt_cov_gram_aten / _isqrt_cov_gram_aten_backward, so that tests compare it
// with the CPU kernels on a machine without a GPU. Torch ops only, no CUDA headers.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace mpncov {

// x (B, C, M), channels first or token-major -> (vec (B, C(C+1)/2) in x's dtype, saved).
std::tuple<at::Tensor, at::Tensor> isqrt_cov_gram_aten(const at::Tensor& x, int64_t iters,
                                                       bool recompute_t);

// dX in x's dtype, laid out like x's (empty_features_like, csrc/cpu/features.h).
at::Tensor isqrt_cov_gram_backward_aten(const at::Tensor& grad, const at::Tensor& x,
                                        const at::Tensor& saved, int64_t iters);

}  // namespace mpncov

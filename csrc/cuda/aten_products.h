// The cuBLAS product path of the CUDA ops (aten_products_binding.cpp): same functions
// as the hand-written kernels, products through ATen's batched matmul. Arguments are
// contiguous tensors of the compute dtype on one CUDA device (covpool's x may also be
// token-major: read as it is, dX returned in its layout); shapes are checked by the caller
// (ops_binding.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace mpncov {
namespace cuda {

// x (B, C, M) -> S (B, C, C).
at::Tensor covpool_aten(const at::Tensor& x);
// grad (B, C, C), x (B, C, M) -> dX (B, C, M).
at::Tensor covpool_backward_aten(const at::Tensor& grad, const at::Tensor& x);
// s (B, C, C) -> (out, saved) with the layout of sqrtm_forward.
std::tuple<at::Tensor, at::Tensor> sqrtm_aten(const at::Tensor& s, int64_t iters);
at::Tensor sqrtm_backward_aten(const at::Tensor& grad, const at::Tensor& s,
                               const at::Tensor& saved, int64_t iters);

}  // namespace cuda
}  // namespace mpncov

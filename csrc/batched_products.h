// Batched matrix products through ATen (cuBLAS on CUDA, the CPU's BLAS on CPU tensors) with
// the conventions of the hand-written kernels: a product with a symmetric result is mirrored
// (its upper triangle copied to the lower), so it is exactly symmetric where the kernels'
// results are. Shared by the cuBLAS product path of the CUDA ops (cuda/aten_products_binding.cpp)
// and the device-generic Gram-space pipeline (gram_aten.cpp). Torch ops only.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace mpncov {
namespace batched {

// Held while a kernel made of ATen ops runs: autocast passes the mpncov ops through
// unchanged, but the ATen ops inside would still see it (bmm under torch.autocast runs in
// float16 / bfloat16, and mixes dtypes with the float32 operands of baddbmm_). Excluding
// the autocast keys keeps the compute dtype the op chose.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// The upper triangle of p (B, n, n) (diagonal included) copied to the lower: exactly symmetric.
inline at::Tensor mirror_upper(const at::Tensor& p) {
  return p.triu() + p.triu(1).transpose(1, 2);
}

// a1 P1 Q1 (+ a2 P2 Q2) (+ gamma I), mirrored when `upper`. Operands may be transposed views
// (bmm hands them to BLAS as op 'T', without a copy).
inline at::Tensor product(const at::Tensor& p1, const at::Tensor& q1, double a1,
                          const at::Tensor& p2, const at::Tensor& q2, double a2, double gamma,
                          bool upper) {
  at::Tensor r = at::bmm(p1, q1);
  if (a1 != 1) r.mul_(a1);  // most products have a1 = 1: no extra pass
  if (p2.defined()) r.baddbmm_(p2, q2, /*beta=*/1, /*alpha=*/a2);
  if (gamma != 0) r.diagonal(0, 1, 2).add_(gamma);
  return upper ? mirror_upper(r) : r;
}
inline at::Tensor product(const at::Tensor& p1, const at::Tensor& q1, double a1, double gamma,
                          bool upper) {
  return product(p1, q1, a1, at::Tensor(), at::Tensor(), 0, gamma, upper);
}

}  // namespace batched
}  // namespace mpncov

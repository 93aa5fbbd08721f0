// The cuBLAS product path of the CUDA ops: the same recurrences as csrc/cuda/*_kernel.cu
// with every matrix product a batched matmul of ATen (cuBLAS), chosen at run time with
// MPNCOV_CUDA_PRODUCTS=cublas (see ops_binding.cpp), so that one GPU run can compare it
// with the hand-written kernels. cuBLAS uses TF32 only where torch allows it
// (torch.backends.cuda.matmul.allow_tf32 / torch.set_float32_matmul_precision); the
// default stays fp32-exact.
//
// Products the kernels mirror (compute the upper triangle and copy it) are mirrored here
// too after a full product, so both paths compute the same function, exactly symmetric
// where the kernels' results are. Inputs are tensors of the compute dtype, contiguous, or
// for covpool's features also token-major (cpu/features.h), read without a copy.
#include "aten_products.h"

#include <ATen/ATen.h>

#include "../batched_products.h"
#include "sqrtm_kernel.cuh"

namespace mpncov {
namespace cuda {
namespace {

using at::Tensor;
using batched::mirror_upper;
using batched::product;

// 0.5 (m + m^T), and m itself where m_ij == m_ji (as the kernels' sym_value).
Tensor symmetric_part(const Tensor& m) {
  const Tensor mt = m.transpose(1, 2);
  return at::where(m == mt, m, 0.5 * (m + mt));
}

Tensor eye_like(const Tensor& s) {
  return at::eye(s.size(1), s.options()).expand_as(s);
}

// t = tr(S) per sample as (B, 1, 1), and t with 0 replaced by 1.
std::pair<Tensor, Tensor> traces(const Tensor& s) {
  const Tensor t = s.diagonal(0, 1, 2).sum(-1).view({-1, 1, 1});
  return {t, at::where(t == 0, at::ones_like(t), t)};
}

}  // namespace

Tensor covpool_aten(const Tensor& x) {
  const batched::NoAutocast no_autocast;
  const Tensor xc = x - x.mean(-1, /*keepdim=*/true);
  return mirror_upper(at::bmm(xc, xc.transpose(1, 2)).div_(static_cast<double>(x.size(2))));
}

// dX = (G + G^T) Xc / M in x's layout: Xc and the result keep x's strides, and bmm writes a
// token-major result (column-major per sample) as it is (cuBLAS computes its transpose).
Tensor covpool_backward_aten(const Tensor& grad, const Tensor& x) {
  const batched::NoAutocast no_autocast;
  const Tensor xc = x - x.mean(-1, /*keepdim=*/true);
  Tensor dx = at::empty_like(xc);
  at::bmm_out(dx, grad + grad.transpose(1, 2), xc);
  return dx.div_(static_cast<double>(x.size(2)));
}

std::tuple<Tensor, Tensor> sqrtm_aten(const Tensor& s, int64_t iters) {
  const batched::NoAutocast no_autocast;
  const int64_t N = iters;
  const bool mirror_tz = sqrtm_mirrors_tz(iters);
  const auto [t, tt] = traces(s);
  const Tensor a = symmetric_part(s) / tt;
  const Tensor t0 = (eye_like(s) * 3 - a) * 0.5;
  const batched::Iterates it = batched::newton_schulz(a, t0, N, mirror_tz, batched::Result::y);
  // saved = [Y_1..Y_{N-1}, Z_1..Z_{N-1}, T_1..T_{N-1}, Y_N]
  std::vector<Tensor> slots(it.y.begin(), it.y.end() - 1);
  slots.insert(slots.end(), it.z.begin(), it.z.begin() + (N - 1));
  slots.insert(slots.end(), it.t.begin(), it.t.end());
  const Tensor y_last = it.y.back();
  slots.push_back(y_last);
  return {at::sqrt(tt) * y_last, at::stack(slots, 1)};
}

Tensor sqrtm_backward_aten(const Tensor& grad, const Tensor& s, const Tensor& saved,
                           int64_t iters) {
  const batched::NoAutocast no_autocast;
  const int64_t N = iters;
  const bool mirror_tz = sqrtm_mirrors_tz(iters);
  auto Y = [&](int64_t k) { return saved.select(1, k - 1); };
  auto Z = [&](int64_t k) { return saved.select(1, N - 1 + k - 1); };
  auto Tm = [&](int64_t k) { return saved.select(1, 2 * (N - 1) + k - 1); };
  const Tensor y_final = saved.select(1, 3 * (N - 1));
  const auto [t, tt] = traces(s);
  const Tensor a = symmetric_part(s) / tt;
  const Tensor e = at::sqrt(tt) * symmetric_part(grad);
  // Forward-mode along E (see sqrtm_kernel.cu)
  const Tensor dy =
      batched::newton_schulz_derivative(e, a, N, mirror_tz, batched::Result::y, Y, Z, Tm);
  // dS = dA / t (0 where t = 0) + (<G, Y> / (2 sqrt t) - <dA / t, A>) I where t != 0.
  const Tensor zero = at::zeros_like(dy);
  Tensor ds = at::where(t == 0, zero, dy / t);
  const Tensor diag = (grad * y_final).sum({1, 2}, /*keepdim=*/true) / (2 * at::sqrt(t)) -
                      (ds * a).sum({1, 2}, /*keepdim=*/true);
  ds.diagonal(0, 1, 2).add_(at::where(t == 0, at::zeros_like(diag), diag).view({-1, 1}));
  return ds;
}

}  // namespace cuda
}  // namespace mpncov

// The Gram-space pipeline in batched ATen ops (gram_aten.h). Step by step the CPU kernel's
// computation (csrc/cpu/isqrt_cov_gram_cpu.cpp), per sample b of the batch:
//   Xc = X - mean (the mean accumulated in double and rounded, as centre_features),
//   W = Xc / ||Xc|| (norm in double, divided, never multiplied by a reciprocal),
//   G = W^T W, the Newton-Schulz recurrence on G with Z_N = R as its result,
//   vec = triuvec(s W R W^T), s = ||Xc|| / sqrt(M),
// and the backward dXc = (2 (E W R + W D) - (<H, R> + 2 <G, D>) W) / sqrt(M), centred.
// Every per-sample scalar is a (B, 1, 1) tensor: nothing is read back to the host, and a
// degenerate sample only affects itself (||Xc|| = 0 gives W = 0, hence zero vec and zero
// dX; NaN gives NaN). Products with a symmetric result are mirrored as in the CPU kernels
// (batched_products.h), T and Z products only up to kMaxMirroredIters steps (limits.h).
//
// Token-major features (a transposed view of a contiguous (B, M, C) tensor) are never
// copied: W and Xc keep x's strides (elementwise ops preserve a dense input's layout), bmm
// takes their transposed views as they are (BLAS / cuBLAS op 'T'), and dX is computed as
// the product that has it in x's layout ((E W R)^T = R^T (E W)^T in the token case).
#include "gram_aten.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "limits.h"
#include "batched_products.h"
#include "cpu/common.h"
#include "cpu/features.h"
#include "cpu/gram_args.h"

namespace mpncov {
namespace {

using at::Tensor;
using batched::product;

// The row-major positions of the upper triangle (diagonal included) in a flattened n x n.
Tensor upper_triangle_index(int64_t n, const at::Device& device) {
  const Tensor rc = at::triu_indices(n, n, 0, at::TensorOptions().dtype(at::kLong).device(device));
  return rc[0] * n + rc[1];
}

struct Normalised {
  Tensor w;     // Xc / ||Xc|| (Xc where ||Xc|| is 0 or NaN), in x's dtype and layout
  Tensor norm;  // ||Xc|| per sample, (B, 1, 1) double
};

Normalised normalised_features(const Tensor& x) {
  const at::ScalarType ct = x.scalar_type();
  const Tensor mean = at::mean(x, {2}, /*keepdim=*/true, at::kDouble).to(ct);
  const Tensor xc = x - mean;
  Tensor norm;
  if (ct == at::kDouble) {
    // Scaled by the largest magnitude first: squares of values below 1e-154 underflow.
    const Tensor amax = xc.abs().amax({1, 2}, /*keepdim=*/true);
    const Tensor scale = at::where(amax > 0, amax, at::ones_like(amax));
    norm = amax * at::linalg_vector_norm(xc / scale, 2, at::IntArrayRef{1, 2}, true);
  } else {
    norm = at::linalg_vector_norm(xc, 2, at::IntArrayRef{1, 2}, true, at::kDouble);
  }
  const Tensor divisor = at::where(norm > 0, norm, at::ones_like(norm));
  // Divided in double (divisor's dtype) and rounded once into x's dtype and layout.
  Tensor w = at::empty_like(xc);
  at::div_out(w, xc, divisor);
  return {w, norm};
}

// Z_1 = T_0 = 1.5 I - 0.5 G (the same two steps as newton_schulz_first_z: a recomputed Z_1
// is bitwise the forward's).
Tensor first_z(const Tensor& g) {
  Tensor z = g.mul(-0.5);
  z.diagonal(0, 1, 2).add_(1.5);
  return z;
}

// T_k = 1.5 I - 0.5 Z_k Y_k (recomputed in the backward when not saved).
Tensor t_step(const Tensor& z, const Tensor& y, bool mirror_tz) {
  return product(z, y, -0.5, 1.5, mirror_tz);
}

// The saved iterates as the backward reads them:
//   [G, Y_1..Y_{N-1}, Z_2..Z_{N-1}, T_1..T_{N-1}, Z_N]   or, without the T_k,
//   [G, Y_1..Y_{N-1}, Z_2..Z_N];  Z_1 recomputed from G, T_k from Z_k and Y_k.
struct SavedIterates {
  Tensor saved, z1;
  int64_t N;
  bool keeps_t, mirror_tz;

  Tensor G() const { return saved.select(1, 0); }
  Tensor Y(int64_t k) const { return saved.select(1, k); }
  Tensor Z(int64_t k) const {
    if (k == 1) return z1;
    return saved.select(1, (k < N || !keeps_t) ? N + k - 2 : 3 * N - 3);
  }
  Tensor T(int64_t k) const {
    return keeps_t ? saved.select(1, 2 * N - 2 + k - 1) : t_step(Z(k), Y(k), mirror_tz);
  }
};

// <A, B> per sample as (B, 1, 1), accumulated in double.
Tensor sample_dot(const Tensor& a, const Tensor& b) {
  return (a * b).sum({1, 2}, /*keepdim=*/true, at::kDouble);
}

// E = sym(Gamma) for the Gamma whose upper triangle is the incoming vector: g on the
// diagonal, g / 2 on both sides of it (both exact).
Tensor symmetric_from_triangle(const Tensor& grad, int64_t C) {
  Tensor upper = at::zeros({grad.size(0), C * C}, grad.options());
  upper.index_copy_(1, upper_triangle_index(C, grad.device()), grad);
  upper = upper.view({grad.size(0), C, C});
  return (upper + upper.transpose(1, 2)).mul_(0.5);
}

// a1 P1 Q1 + a2 P2 Q2, a (B, C, M) result in `layout`: for tokens computed as the transposed
// product Q1^T P1^T + ... into a contiguous (B, M, C) and seen through its transpose.
Tensor features_product(const Tensor& p1, const Tensor& q1, const Tensor& p2, const Tensor& q2,
                        double alpha, FeatureLayout layout) {
  if (layout == FeatureLayout::channels_first)
    return product(p1, q1, alpha, p2, q2, alpha, 0, false);
  return product(q1.transpose(1, 2), p1.transpose(1, 2), alpha, q2.transpose(1, 2),
                 p2.transpose(1, 2), alpha, 0, false)
      .transpose(1, 2);
}

}  // namespace

std::tuple<Tensor, Tensor> isqrt_cov_gram_aten(const Tensor& x_in, int64_t iters,
                                               bool recompute_t) {
  const char* op = "isqrt_cov_gram";
  const batched::NoAutocast no_autocast;
  check_features_input(x_in, op);
  check_iters(iters, op);
  const int64_t B = x_in.size(0), C = x_in.size(1), M = x_in.size(2), N = iters;
  const at::ScalarType ct = sqrtm_compute_dtype(x_in.scalar_type(), N);
  const int64_t count = gram_saved_count(N, recompute_t);
  if (B == 0 || C == 0)
    return {at::empty({B, C * (C + 1) / 2}, x_in.options()),
            at::empty({B, count, M, M}, x_in.options().dtype(ct))};
  FeatureLayout layout;
  const Tensor x = features_in(x_in, ct, &layout);
  const auto [w, norm] = normalised_features(x);
  const Tensor wt = w.transpose(1, 2);
  const Tensor g = product(wt, w, 1, 0, true);
  const batched::Iterates it =
      batched::newton_schulz(g, first_z(g), N, mirrors_all_products(N), batched::Result::z);
  std::vector<Tensor> slots{g};
  slots.insert(slots.end(), it.y.begin(), it.y.end());
  if (recompute_t) {
    slots.insert(slots.end(), it.z.begin() + 1, it.z.end());
  } else if (N > 1) {
    slots.insert(slots.end(), it.z.begin() + 1, it.z.end() - 1);
    slots.insert(slots.end(), it.t.begin(), it.t.end());
    slots.push_back(it.z.back());
  }
  // vec = triuvec(s W R W^T), s = ||Xc|| / sqrt(M), the scaling in double (s may be tiny).
  const Tensor out = at::bmm(at::bmm(w, it.z.back()), wt);
  const Tensor upper = out.reshape({B, C * C}).index_select(1, upper_triangle_index(C, x.device()));
  const Tensor s = (norm / std::sqrt(static_cast<double>(M))).view({B, 1});
  const Tensor vec = (upper.to(at::kDouble) * s).to(ct);
  return {vec.to(x_in.scalar_type()), at::stack(slots, 1)};
}

Tensor isqrt_cov_gram_backward_aten(const Tensor& grad_in, const Tensor& x_in,
                                    const Tensor& saved_in, int64_t iters) {
  const char* op = "isqrt_cov_gram_backward";
  const batched::NoAutocast no_autocast;
  const bool keeps_t = !check_gram_backward_args(grad_in, x_in, saved_in, iters, op);
  const int64_t B = x_in.size(0), C = x_in.size(1), M = x_in.size(2), N = iters;
  const at::ScalarType ct = sqrtm_compute_dtype(x_in.scalar_type(), N);
  if (B == 0 || C == 0) return empty_features_like(x_in, ct).zero_().to(x_in.scalar_type());
  FeatureLayout layout;
  const Tensor x = features_in(x_in, ct, &layout);
  const auto [w, norm] = normalised_features(x);
  const Tensor wt = w.transpose(1, 2);
  const Tensor e = symmetric_from_triangle(grad_in.to(ct), C);
  // E W, then H = W^T E W
  const Tensor ew = at::bmm(e, w);
  const Tensor h = product(wt, ew, 1, 0, true);
  // Z_1 recomputed from G
  const Tensor saved = saved_in.to(ct);
  const Tensor z1 = first_z(saved.select(1, 0));
  const SavedIterates it{saved, z1, N, keeps_t, mirrors_all_products(N)};
  // D = L_r(G, H), the derivative of Z_N along H
  const Tensor d = batched::newton_schulz_derivative(
      h, it.G(), N, it.mirror_tz, batched::Result::z, [&](int64_t k) { return it.Y(k); },
      [&](int64_t k) { return it.Z(k); }, [&](int64_t k) { return it.T(k); });
  const Tensor r = it.Z(N);
  // dXc = (2 (E W R + W D) - (<H, R> + 2 <G, D>) W) / sqrt(M), then centred
  const double root_m = std::sqrt(static_cast<double>(M));
  const Tensor coef = ((sample_dot(h, r) + 2 * sample_dot(it.G(), d)) / -root_m).to(ct);
  Tensor dxc = features_product(ew, r, w, d, 2 / root_m, layout);
  dxc.add_(coef * w);
  const Tensor dx = dxc - at::mean(dxc, {2}, /*keepdim=*/true, at::kDouble).to(ct);
  return dx.to(x_in.scalar_type());
}

// Test-only: the ATen implementation on any device, so that the CPU test suite compares it
// with the CPU kernels (tests/test_gram_aten.py). Not part of the public API.
TORCH_LIBRARY_IMPL(mpncov, CompositeExplicitAutograd, m) {
  m.impl("_isqrt_cov_gram_aten", &isqrt_cov_gram_aten);
  m.impl("_isqrt_cov_gram_aten_backward", &isqrt_cov_gram_backward_aten);
}

}  // namespace mpncov

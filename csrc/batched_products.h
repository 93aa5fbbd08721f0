// Batched matrix products through ATen (cuBLAS on CUDA, the CPU's BLAS on CPU tensors) with
// the conventions of the hand-written kernels: a product with a symmetric result is mirrored
// (its upper triangle copied to the lower), so it is exactly symmetric where the kernels'
// results are. Shared by the cuBLAS product path of the CUDA ops (cuda/aten_products_binding.cpp)
// and the device-generic Gram-space pipeline (gram_aten.cpp). Torch ops only.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cstdint>
#include <vector>

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

// Which iterate of the coupled Newton-Schulz recurrence is the result: Y_N (sqrtm) or Z_N
// (the Gram space), as in cpu/newton_schulz.h.
enum class Result { y, z };

// The iterates of the recurrence on a symmetric A (cpu/newton_schulz.h), given Z_1 = T_0 =
// 1.5 I - 0.5 A (each caller forms it as its kernels do):
//   Y_1 = A Z_1;  k = 1..N-1: T_k = 1.5 I - 0.5 Z_k Y_k, Y_{k+1} = Y_k T_k, Z_{k+1} = T_k Z_k,
// of which the last step forms only the result. y holds Y_1..Y_{N-1} (and Y_N for
// Result::y), z holds Z_1..Z_{N-1} (and Z_N for Result::z), t holds T_1..T_{N-1}. Y
// products are mirrored, T and Z products when mirror_tz.
struct Iterates {
  std::vector<at::Tensor> y, z, t;
};
inline Iterates newton_schulz(const at::Tensor& a, const at::Tensor& z1, int64_t N,
                              bool mirror_tz, Result result) {
  Iterates it;
  it.z.push_back(z1);
  if (N == 1 && result == Result::z) return it;
  it.y.push_back(product(a, z1, 1, 0, true));
  for (int64_t k = 1; k <= N - 1; ++k) {
    const bool last = k == N - 1;
    it.t.push_back(product(it.z[k - 1], it.y[k - 1], -0.5, 1.5, mirror_tz));
    const at::Tensor yk = it.y[k - 1], zk = it.z[k - 1], tk = it.t[k - 1];  // handles
    if (!last || result == Result::y) it.y.push_back(product(yk, tk, 1, 0, true));
    if (!last || result == Result::z) it.z.push_back(product(tk, zk, 1, 0, mirror_tz));
  }
  return it;
}

// The derivative of the result (Y_N or Z_N) at A along a symmetric H, forward mode:
//   dY_1 = 1.5 H - 0.5 (H A + A H),  dZ_1 = -0.5 H;  k = 1..N-1:
//   dT = -0.5 (dZ_k Y_k + Z_k dY_k),  dY_{k+1} = dY_k T_k + Y_k dT,  dZ_{k+1} = dT Z_k + T_k dZ_k,
// with only the result's derivative formed at the last step. At a symmetric A the Frechet
// derivative of a polynomial is self-adjoint, so this is also the gradient along H. The
// iterates come from y(k), z(k), t(k) for k = 1..N-1 (t(k) is called once per step).
template <typename Y, typename Z, typename Tk>
at::Tensor newton_schulz_derivative(const at::Tensor& h, const at::Tensor& a, int64_t N,
                                    bool mirror_tz, Result result, Y&& y, Z&& z, Tk&& t) {
  at::Tensor dz = h.mul(-0.5);
  if (N == 1 && result == Result::z) return dz;
  at::Tensor dy = product(h, a, -0.5, a, h, -0.5, 0, true).add_(h, 1.5);
  for (int64_t k = 1; k <= N - 1; ++k) {
    const bool last = k == N - 1;
    const at::Tensor yk = y(k), zk = z(k), tk = t(k);
    const at::Tensor dt = product(dz, yk, -0.5, zk, dy, -0.5, 0, mirror_tz);
    at::Tensor dy_next;
    if (!last || result == Result::y) dy_next = product(dy, tk, 1, yk, dt, 1, 0, true);
    if (!last || result == Result::z) dz = product(dt, zk, 1, tk, dz, 1, 0, mirror_tz);
    dy = dy_next;
  }
  return result == Result::z ? dz : dy;
}

}  // namespace batched
}  // namespace mpncov

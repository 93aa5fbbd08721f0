// sqrtm on the CPU: iSQRT, the coupled Newton-Schulz iteration of SPEC section 2, of the
// symmetric part of the input (one function for every C and code path; for symmetric
// input, which covariances are exactly, that is the input itself):
//
//   t = tr(S), A = (S + S^T) / (2 t)
//   N = 1:  Y = 0.5 A (3I - A)
//   N >= 2: T0 = 0.5 (3I - A); Y1 = A T0; Z1 = T0
//           Tk = 0.5 (3I - Zk Yk); Y(k+1) = Yk Tk; Z(k+1) = Tk Zk      k = 1 .. N-2
//           Y = Y(N-1) T(N-1),  T(N-1) = 0.5 (3I - Z(N-1) Y(N-1))
//   out = sqrt(t) Y
//
// The recurrence and its derivative are newton_schulz.{h,cpp} (shared with the Gram-space
// pipeline). Every iterate is a polynomial in A: symmetric, and all of them commute. So
// each product of the forward has a symmetric result; up to kMaxMirroredIters steps only
// its block upper triangle is computed, beyond that only Y's and float32 runs in float64
// (see limits.h), and the backward needs no transposes. t = 0 (a zero matrix) gives
// out = 0 and dS = 0; t < 0 (an indefinite input) gives NaN in both, like sqrt(t);
// per-sample scalars are kept in double and divided by, so a tiny positive t gives finite
// results.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "common.h"
#include "elementwise.h"
#include "matrix_product.h"
#include "newton_schulz.h"

namespace mpncov {
namespace {

// One sample's slice of the `saved` output of sqrtm, 3(N-1)+1 matrices of C x C:
// [Y_1..Y_{N-1}, Z_1..Z_{N-1}, T_1..T_{N-1}, Y_N]. For N = 1 only Y_1 (no Z_1 is kept).
template <typename scalar_t>
NewtonSchulzIterates<scalar_t> saved_iterates(scalar_t* base, int64_t N, int64_t C) {
  const int64_t CC = C * C;
  scalar_t* z1 = N >= 2 ? base + (N - 1) * CC : nullptr;
  return {N, C, NewtonSchulzResult::y, base, z1, base + N * CC, base + 2 * (N - 1) * CC,
          base + 3 * (N - 1) * CC};
}

template <typename scalar_t>
double trace_of(const scalar_t* m, int64_t C) {
  double t = 0;
  for (int64_t i = 0; i < C; ++i) t += m[i * C + i];
  return t;
}

// The forward of one sample; `a` is scratch for A, `saved_sample` (saved_count values) the
// sample's slice of `saved` that `it` describes. When the trace is not positive the slice is
// zeroed (defined contents; the backward checks the trace again and never reads it).
template <typename scalar_t>
void sqrtm_forward_sample(const scalar_t* s, scalar_t* root_out,
                          const NewtonSchulzIterates<scalar_t>& it, scalar_t* saved_sample,
                          int64_t saved_count, scalar_t* a) {
  const int64_t C = it.n, CC = C * C;
  using T = scalar_t;
  const double t = trace_of(s, C);
  if (!(t > 0)) {
    std::fill(saved_sample, saved_sample + saved_count, T(0));
    return fill_degenerate(root_out, t, CC);
  }
  symmetric_part(a, s, T(0.5), C);
  divide_into(a, a, t, CC);
  newton_schulz(a, it);
  // Post-compensation: out = sqrt(t) Y.
  scale_into(root_out, it.final_iterate(), T(std::sqrt(t)), CC);
}

std::tuple<at::Tensor, at::Tensor> sqrtm_cpu(const at::Tensor& s_in, int64_t iters) {
  check_square(s_in, "sqrtm", "s");
  check_iters(iters, "sqrtm");
  const int64_t B = s_in.size(0), C = s_in.size(1), N = iters;
  const auto ct = sqrtm_compute_dtype(s_in.scalar_type(), iters);
  const int64_t count = newton_schulz_saved_count(N);
  at::Tensor saved = cached_buffer({B, count, C, C}, s_in.options().dtype(ct));
  if (B == 0 || C == 0) return {at::empty({B, C, C}, s_in.options()), saved};
  at::Tensor s = s_in.to(ct).contiguous();
  at::Tensor root = at::empty({B, C, C}, s.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "sqrtm_cpu", [&] {
    const scalar_t* sp = s.data_ptr<scalar_t>();
    scalar_t* rp = root.data_ptr<scalar_t>();
    scalar_t* vp = saved.data_ptr<scalar_t>();
    const int64_t CC = C * C, per_sample = count * CC;
    parallel_over_samples<scalar_t>(B, CC, [&](int64_t b, scalar_t* a) {
      scalar_t* sample_saved = vp + b * per_sample;
      sqrtm_forward_sample(sp + b * CC, rp + b * CC, saved_iterates(sample_saved, N, C),
                           sample_saved, per_sample, a);
    });
  });
  return {root.to(s_in.scalar_type()), saved};
}

// Scratch of the backward of one sample: A, GY and the derivative's work matrices.
constexpr int64_t kBackwardScratch = 2 + kNewtonSchulzDerivativeWork;

// The backward of one sample. out = sqrt(t) Y(A), A = sym(S) / t:
//   GY = sqrt(t) sym(G), dA = L(A, GY) (newton_schulz_derivative),
//   dS = dA / t + (<G, Y> / (2 sqrt(t)) - <dA, A> / t) I
// At t = 0 (the zero matrix) sqrt(t) is not differentiable; SPEC asks for a finite zero
// gradient there instead of 0/0. At t < 0 the gradient is NaN, like the output.
template <typename scalar_t>
void sqrtm_backward_sample(const scalar_t* g, const scalar_t* s,
                           const NewtonSchulzIterates<scalar_t>& it, scalar_t* ds,
                           scalar_t* scratch) {
  using T = scalar_t;
  const int64_t C = it.n, CC = C * C;
  const double t = trace_of(s, C);
  if (!(t > 0)) return fill_degenerate(ds, t, CC);
  T* a = scratch;
  T* gy = scratch + CC;
  T* work = scratch + 2 * CC;
  const T* y = it.final_iterate();
  const double root = std::sqrt(t);
  symmetric_part(a, s, T(0.5), C);
  divide_into(a, a, t, CC);
  symmetric_part(gy, g, T(0.5 * root), C);
  const double g_dot_y = dot_of(g, y, CC);
  // dA = L(A, GY): the derivative of Y_N along the symmetric GY (see newton_schulz.h).
  const T* da = newton_schulz_derivative<T>(gy, a, it, work);
  const T diag = T(g_dot_y / (2 * root) - dot_of(da, a, CC) / t);
  divide_into(ds, da, t, CC);
  add_identity(dense(ds, C, C), diag);
}

at::Tensor sqrtm_backward_cpu(const at::Tensor& grad, const at::Tensor& s_in,
                              const at::Tensor& saved, int64_t iters) {
  check_square(s_in, "sqrtm_backward", "s");
  check_square(grad, "sqrtm_backward", "grad");
  check_iters(iters, "sqrtm_backward");
  TORCH_CHECK_VALUE(grad.sizes() == s_in.sizes(), "mpncov.sqrtm_backward: grad ", grad.sizes(),
                    " does not match s ", s_in.sizes());
  const int64_t B = s_in.size(0), C = s_in.size(1), N = iters;
  const int64_t count = newton_schulz_saved_count(N);
  TORCH_CHECK_VALUE(saved.dim() == 4 && saved.size(0) == B && saved.size(1) == count &&
                        saved.size(2) == C && saved.size(3) == C,
                    "mpncov.sqrtm_backward: saved has shape ", saved.sizes(), ", expected (", B,
                    ", ", count, ", ", C, ", ", C, ") for iters=", N);
  TORCH_CHECK(grad.device() == s_in.device() && saved.device() == s_in.device(),
              "mpncov.sqrtm_backward: tensors on different devices: grad ", grad.device(),
              ", s ", s_in.device(), ", saved ", saved.device());
  if (B == 0 || C == 0) return at::zeros_like(s_in, at::MemoryFormat::Contiguous);

  const auto ct = sqrtm_compute_dtype(s_in.scalar_type(), iters);
  at::Tensor s = s_in.to(ct).contiguous();
  at::Tensor sv = saved.to(ct).contiguous();
  at::Tensor g = grad.to(ct).contiguous();
  at::Tensor ds = at::empty({B, C, C}, s.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "sqrtm_backward_cpu", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    scalar_t* vp = sv.data_ptr<scalar_t>();
    scalar_t* dp = ds.data_ptr<scalar_t>();
    const int64_t CC = C * C, per_sample = count * CC;
    parallel_over_samples<scalar_t>(B, kBackwardScratch * CC, [&](int64_t b, scalar_t* scratch) {
      sqrtm_backward_sample(gp + b * CC, sp + b * CC, saved_iterates(vp + b * per_sample, N, C),
                            dp + b * CC, scratch);
    });
  });
  return ds.to(s_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(mpncov, CPU, m) {
  m.impl("sqrtm", &sqrtm_cpu);
  m.impl("sqrtm_backward", &sqrtm_backward_cpu);
}

}  // namespace mpncov

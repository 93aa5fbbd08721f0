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
// Every iterate is a polynomial in A: symmetric, and all of them commute. So each product
// of the forward has a symmetric result; up to kMaxMirroredIters steps only its block upper
// triangle is computed, beyond that only Y's and float32 runs in float64 (see limits.h),
// and the backward needs no transposes. t = 0 (a zero matrix) gives out = 0 and dS = 0; t < 0 (an indefinite input)
// gives NaN in both, like sqrt(t); per-sample scalars are kept in double and divided by,
// so a tiny positive t gives finite results.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "common.h"
#include "elementwise.h"
#include "matrix_product.h"

namespace mpncov {
namespace {

// One sample's slice of the `saved` output of sqrtm, (3(N-1)+1) matrices of C x C:
// [Y_1..Y_{N-1}, Z_1..Z_{N-1}, T_1..T_{N-1}, Y_N], k = 1..N-1 for Y, Z and T.
template <typename scalar_t>
struct SavedIterates {
  scalar_t* base;
  int64_t N, C;
  static int64_t count(int64_t N) { return 3 * (N - 1) + 1; }
  scalar_t* at(int64_t i) const { return base + i * C * C; }
  scalar_t* Y(int64_t k) const { return at(k - 1); }
  scalar_t* Z(int64_t k) const { return at(N - 1 + k - 1); }
  scalar_t* T(int64_t k) const { return at(2 * (N - 1) + k - 1); }
  scalar_t* final_y() const { return at(3 * (N - 1)); }
};

void check_iters(int64_t iters, const char* op) {
  TORCH_CHECK_VALUE(iters >= 1 && iters <= kMaxIters, "mpncov.", op,
                    ": iters must be between 1 and ", kMaxIters, ", got ", iters);
}

// Which products with a symmetric result are computed as their mirrored upper triangle.
struct Mirroring {
  bool y;      // Y(k+1) = Yk Tk, and dY(k+1) in the backward: always
  bool z_t;    // Tk from Zk Yk, Z(k+1) = Tk Zk, and their derivatives
  static Mirroring for_iters(int64_t N) { return {true, mirrors_all_products(N)}; }
};

// out = (t == 0 ? 0 : NaN) for a sample whose trace is not positive.
template <typename T>
void fill_degenerate(T* out, double t, int64_t n) {
  std::fill(out, out + n, t == 0 ? T(0) : std::numeric_limits<T>::quiet_NaN());
}

template <typename scalar_t>
double trace_of(const scalar_t* m, int64_t C) {
  double t = 0;
  for (int64_t i = 0; i < C; ++i) t += m[i * C + i];
  return t;
}

// A C x C operand / result of one sample.
template <typename scalar_t>
MatrixView<const scalar_t> in(const scalar_t* p, int64_t C) {
  return dense<const scalar_t>(p, C, C);
}
template <typename scalar_t>
MatrixView<scalar_t> out(scalar_t* p, int64_t C) {
  return dense<scalar_t>(p, C, C);
}

// The forward of one sample; `a` is scratch for A. Nothing of `it` is written when the
// trace is not positive (the backward checks the trace again and never reads it).
template <typename scalar_t>
void sqrtm_forward_sample(const scalar_t* s, scalar_t* root_out, const SavedIterates<scalar_t>& it,
                          scalar_t* a) {
  const int64_t C = it.C, N = it.N, CC = C * C;
  using T = scalar_t;
  const double t = trace_of(s, C);
  if (!(t > 0)) return fill_degenerate(root_out, t, CC);
  const Mirroring mirror = Mirroring::for_iters(N);
  symmetric_part(a, s, T(0.5), C);
  divide_into(a, a, t, CC);
  T* y_final = it.final_y();
  if (N == 1) {
    // Y = 0.5 A (3I - A) = 1.5 A - 0.5 A A
    std::copy(a, a + CC, y_final);
    matrix_product<T>(out(y_final, C), {{in(a, C), in(a, C), T(-0.5)}}, T(1.5), true);
  } else {
    // First step: Z1 = T0 = 0.5 (3I - A), Y1 = A T0.
    T* z1 = it.Z(1);
    scale_into(z1, a, T(-0.5), CC);
    add_identity(out(z1, C), T(1.5));
    matrix_product<T>(out(it.Y(1), C), {{in(a, C), in(z1, C), T(1)}}, T(0), mirror.y);
    for (int64_t k = 1; k <= N - 1; ++k) {
      // Tk = 1.5 I - 0.5 Zk Yk;  Y(k+1) = Yk Tk;  Z(k+1) = Tk Zk
      T* tk = it.T(k);
      matrix_product<T>(out(tk, C), {{in(it.Z(k), C), in(it.Y(k), C), T(-0.5)}}, T(0),
                        mirror.z_t);
      add_identity(out(tk, C), T(1.5));
      T* y_next = (k == N - 1) ? y_final : it.Y(k + 1);
      matrix_product<T>(out(y_next, C), {{in(it.Y(k), C), in(tk, C), T(1)}}, T(0), mirror.y);
      if (k < N - 1)
        matrix_product<T>(out(it.Z(k + 1), C), {{in(tk, C), in(it.Z(k), C), T(1)}}, T(0),
                          mirror.z_t);
    }
  }
  // Post-compensation: out = sqrt(t) Y.
  scale_into(root_out, y_final, T(std::sqrt(t)), CC);
}

std::tuple<at::Tensor, at::Tensor> sqrtm_cpu(const at::Tensor& s_in, int64_t iters) {
  check_square(s_in, "sqrtm", "s");
  check_iters(iters, "sqrtm");
  const int64_t B = s_in.size(0), C = s_in.size(1), N = iters;
  const auto ct = sqrtm_compute_dtype(s_in.scalar_type(), iters);
  at::Tensor saved = cached_buffer({B, 3 * (N - 1) + 1, C, C}, s_in.options().dtype(ct));
  if (B == 0 || C == 0) return {at::empty({B, C, C}, s_in.options()), saved};
  at::Tensor s = s_in.to(ct).contiguous();
  at::Tensor root = at::empty({B, C, C}, s.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "sqrtm_cpu", [&] {
    const scalar_t* sp = s.data_ptr<scalar_t>();
    scalar_t* rp = root.data_ptr<scalar_t>();
    scalar_t* vp = saved.data_ptr<scalar_t>();
    const int64_t CC = C * C, per_sample = SavedIterates<scalar_t>::count(N) * CC;
    parallel_over_samples<scalar_t>(B, CC, [&](int64_t b, scalar_t* a) {
      sqrtm_forward_sample(sp + b * CC, rp + b * CC, SavedIterates<scalar_t>{vp + b * per_sample, N, C},
                           a);
    });
  });
  return {root.to(s_in.scalar_type()), saved};
}

// Scratch of the backward of one sample: A, GY and five C x C work matrices.
constexpr int64_t kBackwardScratch = 7;

// The five C x C work matrices of the backward (in `work`, after A and GY): the derivatives
// dY, dZ, dT and the next step's dY, dZ.
template <typename T>
struct GradientWork {
  T *dy, *dz, *dt, *dy_next, *dz_next;
  static GradientWork in(T* work, int64_t CC) {
    return {work, work + CC, work + 2 * CC, work + 3 * CC, work + 4 * CC};
  }
};

// dL/dA = L(A, E) for the symmetric E = GY, by forward-mode differentiation.
//
// Y_N is a polynomial in A, and at a symmetric A the Frechet derivative L(A, .) of a
// polynomial is self-adjoint and commutes with transposition. So the gradient of
// f(sym(S)) for ANY incoming gradient G is L(A, sym(GY)), and instead of running the
// recurrence backwards we differentiate it forwards in the direction E = sym(GY). Every
// derivative dYk, dZk, dTk is then symmetric (a symmetric-valued function differentiated
// along a symmetric direction), so each sum of products may compute only its block upper
// triangle (with the same mirroring rule as the forward, see limits.h):
//   dZ1 = -0.5 E,  dY1 = 1.5 E - 0.5 (E A + A E)
//   dTk = -0.5 (dZk Yk + Zk dYk)
//   dY(k+1) = dYk Tk + Yk dTk,   dZ(k+1) = dTk Zk + Tk dZk
//   dA = dY_N
// About half the work of the reverse recurrence (which needs the full, non-symmetric dT).
// Returns the work matrix holding dA.
template <typename scalar_t>
scalar_t* grad_a(const scalar_t* e, const scalar_t* a, const SavedIterates<scalar_t>& it,
                 scalar_t* work) {
  using T = scalar_t;
  const int64_t C = it.C, N = it.N, CC = C * C;
  const Mirroring mirror = Mirroring::for_iters(N);
  auto [dy, dz, dt, dy_next, dz_next] = GradientWork<T>::in(work, CC);
  std::copy(e, e + CC, dy);
  matrix_product<T>(out(dy, C), {{in(e, C), in(a, C), T(-0.5)}, {in(a, C), in(e, C), T(-0.5)}},
                    T(1.5), mirror.y);
  if (N == 1) return dy;  // Y = 1.5 A - 0.5 A A has the same derivative as Y1
  scale_into(dz, e, T(-0.5), CC);
  for (int64_t k = 1; k <= N - 1; ++k) {
    matrix_product<T>(out(dt, C), {{in(dz, C), in(it.Y(k), C), T(-0.5)},
                                   {in(it.Z(k), C), in(dy, C), T(-0.5)}}, T(0), mirror.z_t);
    matrix_product<T>(out(dy_next, C), {{in(dy, C), in(it.T(k), C), T(1)},
                                        {in(it.Y(k), C), in(dt, C), T(1)}}, T(0), mirror.y);
    std::swap(dy, dy_next);
    if (k < N - 1) {
      matrix_product<T>(out(dz_next, C), {{in(dt, C), in(it.Z(k), C), T(1)},
                                          {in(it.T(k), C), in(dz, C), T(1)}}, T(0), mirror.z_t);
      std::swap(dz, dz_next);
    }
  }
  return dy;
}

// The backward of one sample. out = sqrt(t) Y(A), A = sym(S) / t:
//   GY = sqrt(t) sym(G), dA = L(A, GY) (see grad_a),
//   dS = dA / t + (<G, Y> / (2 sqrt(t)) - <dA, A> / t) I
// At t = 0 (the zero matrix) sqrt(t) is not differentiable; SPEC asks for a finite zero
// gradient there instead of 0/0. At t < 0 the gradient is NaN, like the output.
template <typename scalar_t>
void sqrtm_backward_sample(const scalar_t* g, const scalar_t* s, const SavedIterates<scalar_t>& it,
                           scalar_t* ds, scalar_t* scratch) {
  using T = scalar_t;
  const int64_t C = it.C, CC = C * C;
  const double t = trace_of(s, C);
  if (!(t > 0)) return fill_degenerate(ds, t, CC);
  T* a = scratch;
  T* gy = scratch + CC;
  T* work = scratch + 2 * CC;
  const T* y = it.final_y();
  const double root = std::sqrt(t);
  symmetric_part(a, s, T(0.5), C);
  divide_into(a, a, t, CC);
  symmetric_part(gy, g, T(0.5 * root), C);
  const double g_dot_y = dot_of(g, y, CC);
  const T* da = grad_a<T>(gy, a, it, work);
  const T diag = T(g_dot_y / (2 * root) - dot_of(da, a, CC) / t);
  divide_into(ds, da, t, CC);
  add_identity(out(ds, C), diag);
}

at::Tensor sqrtm_backward_cpu(const at::Tensor& grad, const at::Tensor& s_in,
                              const at::Tensor& saved, int64_t iters) {
  check_square(s_in, "sqrtm_backward", "s");
  check_square(grad, "sqrtm_backward", "grad");
  check_iters(iters, "sqrtm_backward");
  TORCH_CHECK_VALUE(grad.sizes() == s_in.sizes(), "mpncov.sqrtm_backward: grad ", grad.sizes(),
                    " does not match s ", s_in.sizes());
  const int64_t B = s_in.size(0), C = s_in.size(1), N = iters;
  TORCH_CHECK_VALUE(saved.dim() == 4 && saved.size(0) == B && saved.size(1) == 3 * (N - 1) + 1 &&
                        saved.size(2) == C && saved.size(3) == C,
                    "mpncov.sqrtm_backward: saved has shape ", saved.sizes(), ", expected (", B,
                    ", ", 3 * (N - 1) + 1, ", ", C, ", ", C, ") for iters=", N);
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
    const int64_t CC = C * C, per_sample = SavedIterates<scalar_t>::count(N) * CC;
    parallel_over_samples<scalar_t>(B, kBackwardScratch * CC, [&](int64_t b, scalar_t* scratch) {
      sqrtm_backward_sample(gp + b * CC, sp + b * CC,
                            SavedIterates<scalar_t>{vp + b * per_sample, N, C}, dp + b * CC,
                            scratch);
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

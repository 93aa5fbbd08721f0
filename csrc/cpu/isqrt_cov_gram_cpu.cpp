// The iSQRT-COV pipeline triuvec(sqrtm(covpool(x))) computed in the M x M Gram space
// (SPEC section 8): the same function as the C x C pipeline, cheaper when the positions M
// are fewer than the channels C (mpncov/_space.py picks the space).
//
// Forward, one sample, X (C x M) in either feature layout (features.h):
//   Xc = X - mean over the positions,  t = tr(S) = ||Xc||_F^2 / M,  s = sqrt(t),
//   W = Xc / ||Xc||_F,  so that A = S / t = W W^T,  and  G = W^T W  (M x M)
// A and G have the same trace (1) and the same non-zero eigenvalues. Every Newton-Schulz
// iterate is a polynomial in its matrix and Y_N = A Z_N (newton_schulz.h), so with
// Z_N = r(A) for the polynomial r fixed by N (r(A) = 1.5 I - 0.5 A for N = 1)
//   out = s Y_N(A) = s A r(A) = s W r(G) W^T,
// since W G^j W^T = (W W^T)^(j+1) = A^(j+1) for every j. So the recurrence runs on G with
// Z_N as its result, R = Z_N(G), mapped back by P = W R and out = s P W^T, of which only the
// upper triangle is computed (the result is triuvec(out)). Per sample, in multiply-adds:
// G M^2 C / 2, the recurrence (3N-3) M^3 / 2, P C M^2, out C^2 M / 2; the covariance
// (C^2 M / 2) is never formed.
//
// Backward. L = <Gamma, out> for the incoming gradient Gamma (C x C, the incoming vector in
// the upper triangle); out is symmetric, so only E = sym(Gamma) matters. Write
// out = rho Phi(W) with rho = ||Xc|| / sqrt(M) (= s) and Phi(W) = W r(W^T W) W^T. Then
//   d<E, Phi> = <E, dW R W^T + W R dW^T + W dR W^T> = 2 <E W R, dW> + <H, dR>,
//     H = W^T E W (M x M, symmetric),
//   <H, dR> = <H, L_r(G, dG)> = <L_r(G, H), dG>   (the Frechet derivative L_r(G, .) of a
//     polynomial is self-adjoint at a symmetric G) = <D, dW^T W + W^T dW> = 2 <W D, dW>,
//     D = L_r(G, H), the derivative of Z_N along H (newton_schulz_derivative),
// so grad_W <E, Phi> = Psi = 2 (E W R + W D). With grad_Xc rho = W / sqrt(M) and the
// Jacobian of W = Xc / ||Xc|| (J^T Psi = (Psi - W <W, Psi>) / ||Xc||):
//   grad_Xc = (<E, Phi> W + Psi - <W, Psi> W) / sqrt(M),
// and <E, Phi> = <H, R>, <W, Psi> = 2 <H, R> + 2 <G, D>:
//   grad_Xc = (2 (E W R + W D) - (<H, R> + 2 <G, D>) W) / sqrt(M).
// out is homogeneous of degree 1 in Xc, so its gradient does not depend on the scale of Xc:
// a tiny ||Xc|| gives finite gradients. dX is grad_Xc minus its mean over the positions
// (the chain rule of the centring; that mean is zero in exact arithmetic, as W 1 = 0 and
// H 1 = 0 give D 1 = 0). Per sample: E W C^2 M, H C M^2 / 2, D (6N-6) M^3 / 2 (none for
// N = 1: D = -0.5 H), dX 2 C M^2; every M x M product has a symmetric result and is
// computed half-size, like the C x C path.
//
// Saved for the backward, (3N-2) matrices of M x M per sample:
//   [G, Y_1..Y_{N-1}, Z_2..Z_{N-1}, T_1..T_{N-1}, Z_N]      (N = 1: [G])
// or, with recompute_t, the 2N-1 of [G, Y_1..Y_{N-1}, Z_2..Z_N] and T_k = 1.5 I - 0.5 Z_k Y_k
// computed again in the backward (one half M x M product per step; mpncov/_space.py turns
// it on where that costs little next to the C x M and C x C products). Z_1 = 1.5 I - 0.5 G
// is recomputed (bitwise the forward's); W is recomputed from x (one pass). Degenerate samples as in the C x C path: ||Xc|| = 0 (constant features, M = 1)
// gives zero output and zero gradient, NaN gives NaN; per-sample scalars are doubles that
// are divided by. Beyond kMaxMirroredIters steps float32 runs in float64 and Z and T are
// full products (limits.h): measured on the Gram matrix (which always has the null vector
// 1, and more null vectors when M > C) mirroring Z and T diverges from 15-20 steps on as
// in the C x C space, in float64 too, and float32 diverges by 30 steps when M > C.
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "common.h"
#include "elementwise.h"
#include "features.h"
#include "gram_args.h"
#include "matrix_product.h"
#include "newton_schulz.h"

namespace mpncov {
namespace {

// One sample's Gram-space iterates: `base` is its slice of `saved` (laid out as above), z1
// scratch for Z_1, t_scratch for T_k when they are not kept.
template <typename T>
NewtonSchulzIterates<T> gram_iterates(T* base, int64_t N, int64_t M, bool recompute_t, T* z1,
                                      T* t_scratch) {
  const int64_t MM = M * M;
  if (recompute_t)
    return {N, M, NewtonSchulzResult::z, base + MM, z1, base + N * MM, t_scratch,
            base + (2 * N - 2) * MM, /*keeps_t=*/false};
  return {N, M, NewtonSchulzResult::z, base + MM, z1, base + N * MM, base + (2 * N - 2) * MM,
          base + (3 * N - 3) * MM};
}

// The Gram matrix lives in slot 0 of a sample's saved iterates.
template <typename T>
T* gram_of(T* base) {
  return base;
}

// Dimensions and layout shared by one call's samples.
struct GramShape {
  int64_t C, M, N;
  bool recompute_t;
  FeatureLayout layout;
  int64_t K() const { return C * (C + 1) / 2; }
};

// Scratch of the forward of one sample, in T units: the channel means (C doubles), W, P,
// the C x C upper triangle of out, Z_1, and T_k when they are not kept.
int64_t forward_scratch(const GramShape& d) {
  return 2 * d.C + 2 * d.C * d.M + d.C * d.C + 2 * d.M * d.M;
}

// W = Xc / ||Xc|| (in w, in the layout of x); returns ||Xc||.
template <typename T>
double normalised_features(const T* x, T* w, const GramShape& d, double* acc) {
  const int64_t CM = d.C * d.M;
  centre_features(x, w, d.C, d.M, d.layout, acc);
  const double norm = frobenius_norm(w, CM);
  if (norm > 0) divide_into(w, w, norm, CM);
  return norm;
}

template <typename T>
void gram_forward_sample(const T* x, T* vec, T* saved, T* scratch, const GramShape& d) {
  const int64_t C = d.C, M = d.M;
  double* acc = reinterpret_cast<double*>(scratch);
  T* w = scratch + 2 * C;
  T* p = w + C * M;
  T* upper = p + C * M;
  T* z1 = upper + C * C;
  T* t_scratch = z1 + d.M * d.M;
  // A degenerate sample runs through too, so that its saved iterates are defined (those of
  // the ATen form and the CUDA kernels): ||Xc|| = 0 leaves W = Xc = 0, whose iterates are
  // finite and whose output s P W^T is 0 (s = 0); ||Xc|| = NaN leaves the NaN in W and s.
  const double norm = normalised_features(x, w, d, acc);
  const MatrixView<const T> wv = feature_view<const T>(w, C, M, d.layout);
  // G = W^T W
  T* g = gram_of(saved);
  matrix_product<T>(dense(g, M, M), {{wv.transposed(), wv, T(1)}}, T(0), /*symmetric=*/true);
  const NewtonSchulzIterates<T> it = gram_iterates(saved, d.N, M, d.recompute_t, z1, t_scratch);
  newton_schulz(g, it);
  // P = W R, then the upper triangle of P W^T
  matrix_product<T>(feature_view(p, C, M, d.layout),
                    {{wv, dense<const T>(it.final_iterate(), M, M), T(1)}}, T(0), false);
  matrix_product<T>(dense(upper, C, C),
                    {{feature_view<const T>(p, C, M, d.layout), wv.transposed(), T(1)}}, T(0),
                    /*symmetric=*/true, /*mirror=*/false);
  // vec = triuvec(s P W^T), s = sqrt(t) = ||Xc|| / sqrt(M)
  const double s = norm / std::sqrt(double(M));
  for (int64_t i = 0; i < C; ++i) {
    const T* row = upper + i * C;
    for (int64_t j = i; j < C; ++j) *vec++ = static_cast<T>(s * double(row[j]));
  }
}

std::tuple<at::Tensor, at::Tensor> isqrt_cov_gram_cpu(const at::Tensor& x_in, int64_t iters,
                                                      bool recompute_t) {
  check_features_input(x_in, "isqrt_cov_gram");
  check_iters(iters, "isqrt_cov_gram");
  const int64_t B = x_in.size(0), C = x_in.size(1), M = x_in.size(2), N = iters;
  const auto ct = sqrtm_compute_dtype(x_in.scalar_type(), N);
  const int64_t count = gram_saved_count(N, recompute_t);
  at::Tensor saved = cached_buffer({B, count, M, M}, x_in.options().dtype(ct));
  GramShape d{C, M, N, recompute_t, FeatureLayout::channels_first};
  at::Tensor vec = at::empty({B, d.K()}, x_in.options().dtype(ct));
  if (B == 0 || C == 0) return {vec.to(x_in.scalar_type()), saved};
  at::Tensor x = features_in(x_in, ct, &d.layout);
  AT_DISPATCH_FLOATING_TYPES(ct, "isqrt_cov_gram_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* vp = vec.data_ptr<scalar_t>();
    scalar_t* sp = saved.data_ptr<scalar_t>();
    const int64_t per_sample = count * M * M;
    parallel_over_samples<scalar_t>(B, forward_scratch(d), [&](int64_t b, scalar_t* scratch) {
      gram_forward_sample(xp + b * C * M, vp + b * d.K(), sp + b * per_sample, scratch, d);
    });
  });
  return {vec.to(x_in.scalar_type()), saved};
}

// Scratch of the backward of one sample, in T units: the channel means, W, E W, E, H, Z_1,
// T_k when they are not kept, and the derivative's work matrices.
int64_t backward_scratch(const GramShape& d) {
  return 2 * d.C + 2 * d.C * d.M + d.C * d.C + (3 + kNewtonSchulzDerivativeWork) * d.M * d.M;
}

// E = sym(Gamma) for the Gamma whose upper triangle is the incoming vector: g on the
// diagonal, g / 2 on both sides of it.
template <typename T>
void symmetric_from_triangle(const T* g, T* e, int64_t C) {
  for (int64_t i = 0; i < C; ++i) {
    e[i * C + i] = *g++;
    for (int64_t j = i + 1; j < C; ++j) e[i * C + j] = e[j * C + i] = T(0.5) * *g++;
  }
}

template <typename T>
void gram_backward_sample(const T* grad, const T* x, T* saved, T* dx, T* scratch,
                          const GramShape& d) {
  const int64_t C = d.C, M = d.M, CM = C * M, MM = M * M;
  double* acc = reinterpret_cast<double*>(scratch);
  T* w = scratch + 2 * C;
  T* ew = w + CM;
  T* e = ew + CM;
  T* h = e + C * C;
  T* z1 = h + MM;
  T* t_scratch = z1 + MM;
  T* work = t_scratch + MM;
  const double norm = normalised_features(x, w, d, acc);
  if (!(norm > 0)) return fill_degenerate(dx, norm, CM);
  const MatrixView<const T> wv = feature_view<const T>(w, C, M, d.layout);
  symmetric_from_triangle(grad, e, C);
  // E W, then H = W^T E W
  matrix_product<T>(feature_view(ew, C, M, d.layout), {{dense<const T>(e, C, C), wv, T(1)}},
                    T(0), false);
  const MatrixView<const T> ewv = feature_view<const T>(ew, C, M, d.layout);
  matrix_product<T>(dense(h, M, M), {{wv.transposed(), ewv, T(1)}}, T(0), /*symmetric=*/true);
  // D = L_r(G, H), with Z_1 recomputed from G
  const T* g = gram_of(saved);
  const NewtonSchulzIterates<T> it = gram_iterates(saved, d.N, M, d.recompute_t, z1, t_scratch);
  newton_schulz_first_z(g, z1, M);
  const T* dmat = newton_schulz_derivative<T>(h, g, it, work);
  const T* r = it.final_iterate();
  const double h_dot_r = dot_of(h, r, MM), g_dot_d = dot_of(g, dmat, MM);
  // dXc = (2 (E W R + W D) - (<H, R> + 2 <G, D>) W) / sqrt(M), then centred
  const double root_m = std::sqrt(double(M));
  matrix_product<T>(feature_view(dx, C, M, d.layout),
                    {{ewv, dense<const T>(r, M, M), T(2 / root_m)},
                     {wv, dense<const T>(dmat, M, M), T(2 / root_m)}},
                    T(0), false);
  const T coef = static_cast<T>(-(h_dot_r + 2 * g_dot_d) / root_m);
#pragma omp simd
  for (int64_t i = 0; i < CM; ++i) dx[i] += coef * w[i];
  centre_features(dx, dx, C, M, d.layout, acc);
}

at::Tensor isqrt_cov_gram_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                       const at::Tensor& saved_in, int64_t iters) {
  const char* op = "isqrt_cov_gram_backward";
  const bool recompute_t = check_gram_backward_args(grad_in, x_in, saved_in, iters, op);
  const int64_t B = x_in.size(0), C = x_in.size(1), M = x_in.size(2), N = iters;
  const int64_t count = saved_in.size(1);
  GramShape d{C, M, N, recompute_t, FeatureLayout::channels_first};
  const auto ct = sqrtm_compute_dtype(x_in.scalar_type(), N);
  at::Tensor dx = empty_features_like(x_in, ct);
  if (B == 0 || C == 0) return dx.zero_().to(x_in.scalar_type());
  at::Tensor x = features_in(x_in, ct, &d.layout);
  TORCH_INTERNAL_ASSERT(is_token_major(dx) == (d.layout == FeatureLayout::tokens),
                        "isqrt_cov_gram_backward: dx and x in different layouts");
  at::Tensor g = grad_in.to(ct).contiguous();
  at::Tensor saved = saved_in.to(ct).contiguous();
  AT_DISPATCH_FLOATING_TYPES(ct, "isqrt_cov_gram_backward_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* sp = saved.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const int64_t per_sample = count * M * M;
    parallel_over_samples<scalar_t>(B, backward_scratch(d), [&](int64_t b, scalar_t* scratch) {
      gram_backward_sample(gp + b * d.K(), xp + b * C * M, sp + b * per_sample,
                           dxp + b * C * M, scratch, d);
    });
  });
  return dx.to(x_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(mpncov, CPU, m) {
  m.impl("isqrt_cov_gram", &isqrt_cov_gram_cpu);
  m.impl("isqrt_cov_gram_backward", &isqrt_cov_gram_backward_cpu);
}

}  // namespace mpncov

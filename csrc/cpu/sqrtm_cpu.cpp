// sqrtm on the CPU: iSQRT, the coupled Newton-Schulz iteration of SPEC section 2.
//
//   t = tr(S), A = S / t
//   N = 1:  Y = 0.5 A (3I - A)
//   N >= 2: T0 = 0.5 (3I - A); Y1 = A T0; Z1 = T0
//           Tk = 0.5 (3I - Zk Yk); Y(k+1) = Yk Tk; Z(k+1) = Tk Zk      k = 1 .. N-2
//           Y = Y(N-1) T(N-1),  T(N-1) = 0.5 (3I - Z(N-1) Y(N-1))
//   out = sqrt(t) Y
//
// Every iterate is a polynomial in A: symmetric, and all of them commute. So each product
// of the forward has a symmetric result and only its block upper triangle is computed,
// and the backward needs no transposes. t = 0 (a zero matrix) gives out = 0 and dS = 0.
#include <torch/library.h>

#include <cmath>
#include <algorithm>
#include <tuple>
#include <vector>

#include "blas.h"
#include "common.h"

namespace mpncov {
namespace {

// Per-sample trace and the divisor used in its place: t itself, or 1 where t == 0 so
// that a zero matrix stays zero instead of becoming 0/0.
struct Traces {
  at::Tensor t;        // (B) the true trace
  at::Tensor divisor;  // (B) t, or 1 where t == 0
};

Traces traces(const at::Tensor& s) {
  at::Tensor t = s.diagonal(0, 1, 2).sum(-1);
  return {t, at::where(t == 0, at::ones_like(t), t)};
}

// m[b] = a * I + c * m[b] for every sample (the elementwise step 0.5 (3I - P) and kin).
void scale_add_identity(at::Tensor& m, double c, double a) {
  m.mul_(c);
  m.diagonal(0, 1, 2).add_(a);
}

// The layout of the `saved` output of sqrtm, (B, 3(N-1)+1, C, C):
// [Y_1..Y_{N-1}, Z_1..Z_{N-1}, T_1..T_{N-1}, Y_N], k = 1..N-1 for Y, Z and T.
struct SavedIterates {
  const at::Tensor& saved;
  int64_t N;
  at::Tensor Y(int64_t k) const { return saved.select(1, k - 1); }
  at::Tensor Z(int64_t k) const { return saved.select(1, N - 1 + k - 1); }
  at::Tensor T(int64_t k) const { return saved.select(1, 2 * (N - 1) + k - 1); }
  at::Tensor final_y() const { return saved.select(1, 3 * (N - 1)); }
};

void check_iters(int64_t iters, const char* op) {
  TORCH_CHECK_VALUE(iters >= 1, "mpncov.", op, ": iters must be >= 1, got ", iters);
}

std::tuple<at::Tensor, at::Tensor> sqrtm_cpu(const at::Tensor& s_in, int64_t iters) {
  check_square(s_in, "sqrtm", "s");
  check_iters(iters, "sqrtm");
  const int64_t B = s_in.size(0), C = s_in.size(1), N = iters;
  const auto ct = compute_dtype(s_in.scalar_type());
  at::Tensor saved = empty_buffer({B, 3 * (N - 1) + 1, C, C}, s_in.options().dtype(ct));
  if (B == 0 || C == 0) return {at::empty({B, C, C}, s_in.options()), saved};

  at::Tensor s = s_in.to(ct).contiguous();
  Traces tr = traces(s);
  at::Tensor a = s / tr.divisor.view({B, 1, 1});
  at::Tensor y_final = SavedIterates{saved, N}.final_y();
  if (N == 1) {
    // Y = 0.5 A (3I - A) = 1.5 A - 0.5 A A
    y_final.copy_(a);
    batched_product(y_final, a, a, -0.5, 1.5, /*upper=*/true);
    mirror_upper(y_final);
  } else {
    const SavedIterates it{saved, N};
    // First step: Z1 = T0 = 0.5 (3I - A), Y1 = A T0.
    at::Tensor z1 = it.Z(1);
    z1.copy_(a);
    scale_add_identity(z1, -0.5, 1.5);
    at::Tensor y1 = it.Y(1);
    batched_product(y1, a, z1, 1.0, 0.0, true);
    mirror_upper(y1);
    for (int64_t k = 1; k <= N - 1; ++k) {
      // Tk = 1.5 I - 0.5 Zk Yk
      at::Tensor tk = it.T(k);
      batched_product(tk, it.Z(k), it.Y(k), -0.5, 0.0, true);
      tk.diagonal(0, 1, 2).add_(1.5);
      mirror_upper(tk);
      at::Tensor ynext = (k == N - 1) ? y_final : it.Y(k + 1);
      batched_product(ynext, it.Y(k), tk, 1.0, 0.0, true);
      mirror_upper(ynext);
      if (k < N - 1) {
        at::Tensor znext = it.Z(k + 1);
        batched_product(znext, tk, it.Z(k), 1.0, 0.0, true);
        mirror_upper(znext);
      }
    }
  }
  // Post-compensation: out = sqrt(t) Y, with sqrt(0) = 0 for the zero matrix.
  at::Tensor out = y_final * tr.t.clamp_min(0).sqrt().view({B, 1, 1});
  return {out.to(s_in.scalar_type()), saved};
}

// dL/dA from GY = dL/dY for a symmetric GY, by forward-mode differentiation.
//
// Y_N is a polynomial in A, and at a symmetric A the Frechet derivative L(A, .) of a
// polynomial is self-adjoint: dL/dA = L(A, GY). So instead of running the recurrence
// backwards we differentiate it forwards in the direction E = GY. For symmetric E every
// derivative dYk, dZk, dTk is symmetric (a symmetric-valued function differentiated along
// a symmetric direction), so each product computes only its block upper triangle:
//   dZ1 = -0.5 E,  dY1 = 1.5 E - 0.5 (E A + A E)
//   dTk = -0.5 (dZk Yk + Zk dYk)
//   dY(k+1) = dYk Tk + Yk dTk,   dZ(k+1) = dTk Zk + Tk dZk
//   dA = dY_N
// About half the work of the reverse recurrence (which needs the full, non-symmetric dT).
at::Tensor sqrtm_grad_a_symmetric(const at::Tensor& e, const at::Tensor& a,
                                  const at::Tensor& saved, int64_t N) {
  // E A + A E = X + X^T with X = E A.
  at::Tensor x = at::bmm(e, a);
  at::Tensor dy = e * 1.5 - (x + x.transpose(1, 2)) * 0.5;
  if (N == 1) return dy;  // Y = 1.5 A - 0.5 A A has the same derivative as Y1
  const SavedIterates it{saved, N};
  at::Tensor dz = e * -0.5;
  at::Tensor dt = empty_buffer(dy.sizes(), dy.options());
  at::Tensor dy_next = empty_buffer(dy.sizes(), dy.options());
  at::Tensor dz_next = empty_buffer(dy.sizes(), dy.options());
  // Packing workspaces, only needed where BLAS is not called directly.
  const bool pack = !blas_available(e.scalar_type());
  at::Tensor left = pack ? at::empty({e.size(0), e.size(1), 2 * e.size(2)}, e.options()) : e;
  at::Tensor right = pack ? at::empty({e.size(0), 2 * e.size(1), e.size(2)}, e.options()) : e;
  for (int64_t k = 1; k <= N - 1; ++k) {
    batched_product_sum(dt, dz, it.Y(k), it.Z(k), dy, -0.5, true, left, right);
    mirror_upper(dt);
    batched_product_sum(dy_next, dy, it.T(k), it.Y(k), dt, 1.0, true, left, right);
    mirror_upper(dy_next);
    std::swap(dy, dy_next);
    if (k < N - 1) {
      batched_product_sum(dz_next, dt, it.Z(k), it.T(k), dz, 1.0, true, left, right);
      mirror_upper(dz_next);
      std::swap(dz, dz_next);
    }
  }
  return dy;
}

// dL/dA from GY = dL/dY for any GY, by the reverse recurrence of SPEC section 2 (the
// iterates are symmetric, so no transposes appear).
at::Tensor sqrtm_grad_a_general(const at::Tensor& gy, const at::Tensor& a,
                                const at::Tensor& saved, int64_t N) {
  if (N == 1) {
    // dA = 0.5 (GY (3I - A) - A GY) = 1.5 GY - 0.5 GY A - 0.5 A GY
    at::Tensor da = gy * 1.5;
    batched_product(da, gy, a, -0.5, 1.0, false);
    batched_product(da, a, gy, -0.5, 1.0, false);
    return da;
  }
  const SavedIterates it{saved, N};
  at::Tensor dt = at::empty_like(gy);
  at::Tensor dy = at::empty_like(gy);
  at::Tensor dz = at::empty_like(gy);
  at::Tensor dy_next = at::empty_like(gy);
  at::Tensor dz_next = at::empty_like(gy);
  // Last step, Y = Y(N-1) T(N-1):
  //   dT = Y(N-1) GY;  dY = GY T(N-1) - 0.5 Z(N-1) dT;  dZ = -0.5 dT Y(N-1)
  const int64_t L = N - 1;
  batched_product(dt, it.Y(L), gy, 1.0, 0.0, false);
  batched_product(dy, gy, it.T(L), 1.0, 0.0, false);
  batched_product(dy, it.Z(L), dt, -0.5, 1.0, false);
  batched_product(dz, dt, it.Y(L), -0.5, 0.0, false);
  // Steps k = N-2 .. 1: Y(k+1) = Yk Tk, Z(k+1) = Tk Zk, Tk = 0.5 (3I - Zk Yk):
  //   dT = Yk dY + dZ Zk;  dY' = dY Tk - 0.5 Zk dT;  dZ' = Tk dZ - 0.5 dT Yk
  for (int64_t k = N - 2; k >= 1; --k) {
    batched_product(dt, it.Y(k), dy, 1.0, 0.0, false);
    batched_product(dt, dz, it.Z(k), 1.0, 1.0, false);
    batched_product(dy_next, dy, it.T(k), 1.0, 0.0, false);
    batched_product(dy_next, it.Z(k), dt, -0.5, 1.0, false);
    batched_product(dz_next, it.T(k), dz, 1.0, 0.0, false);
    batched_product(dz_next, dt, it.Y(k), -0.5, 1.0, false);
    std::swap(dy, dy_next);
    std::swap(dz, dz_next);
  }
  // First step, Y1 = A T0, Z1 = T0 = 0.5 (3I - A):  dA = dY T0 - 0.5 (A dY + dZ)
  at::Tensor da = dz * -0.5;
  batched_product(da, dy, it.Z(1), 1.0, 1.0, false);
  batched_product(da, a, dy, -0.5, 1.0, false);
  return da;
}

at::Tensor sqrtm_backward_cpu(const at::Tensor& grad, const at::Tensor& s_in,
                              const at::Tensor& saved, int64_t iters, bool symmetric_grad) {
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

  const auto ct = compute_dtype(s_in.scalar_type());
  at::Tensor s = s_in.to(ct).contiguous();
  at::Tensor sv = saved.to(ct).contiguous();
  at::Tensor g = grad.to(ct).contiguous();
  at::Tensor y = SavedIterates{sv, N}.final_y();
  at::Tensor a = empty_buffer({B, C, C}, s.options());
  at::Tensor gy = empty_buffer({B, C, C}, s.options());
  // Per sample: t (the trace), the divisor (t, or 1 for the zero matrix) and <G, Y>.
  std::vector<double> trace(B), divisor(B), g_dot_y(B);
  AT_DISPATCH_FLOATING_TYPES(ct, "sqrtm_backward_prologue", [&] {
    // One pass: A = S / t, GY = sqrt(t) G (or its symmetric part), <G, Y>.
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t off = b * C * C;
        const scalar_t* sp = s.data_ptr<scalar_t>() + off;
        const scalar_t* gp = g.data_ptr<scalar_t>() + off;
        const scalar_t* yp = y.data_ptr<scalar_t>() + b * y.stride(0);
        scalar_t* ap = a.data_ptr<scalar_t>() + off;
        scalar_t* gyp = gy.data_ptr<scalar_t>() + off;
        double t = 0;
        for (int64_t i = 0; i < C; ++i) t += sp[i * C + i];
        const double div = t == 0 ? 1.0 : t;
        const scalar_t inv = scalar_t(1.0 / div), root = scalar_t(std::sqrt(div));
        const scalar_t half_root = root * scalar_t(0.5);
        double gdy = 0;
        for (int64_t i = 0; i < C; ++i) {
          for (int64_t j = 0; j < C; ++j) {
            const int64_t ij = i * C + j;
            ap[ij] = sp[ij] * inv;
            gyp[ij] = symmetric_grad ? half_root * (gp[ij] + gp[j * C + i]) : root * gp[ij];
            gdy += double(gp[ij]) * double(yp[ij]);
          }
        }
        trace[b] = t;
        divisor[b] = div;
        g_dot_y[b] = gdy;
      }
    });
  });
  at::Tensor da = symmetric_grad ? sqrtm_grad_a_symmetric(gy, a, sv, N)
                                 : sqrtm_grad_a_general(gy, a, sv, N);
  // out = sqrt(t) Y(A), A = S / t:
  //   dS = dA / t + (<G, Y> / (2 sqrt(t)) - <dA, A> / t) I
  // At t = 0 (the zero matrix) sqrt(t) is not differentiable; SPEC asks for a finite zero
  // gradient there instead of 0/0. The division by t is done on dA in place.
  at::Tensor ds = da.is_contiguous() ? da : da.contiguous();
  AT_DISPATCH_FLOATING_TYPES(ct, "sqrtm_backward_epilogue", [&] {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t off = b * C * C;
        scalar_t* dp = ds.data_ptr<scalar_t>() + off;
        const scalar_t* ap = a.data_ptr<scalar_t>() + off;
        if (trace[b] == 0) {
          std::fill(dp, dp + C * C, scalar_t(0));
          continue;
        }
        double da_a = 0;
        for (int64_t k = 0; k < C * C; ++k) da_a += double(dp[k]) * double(ap[k]);
        const double div = divisor[b];
        const scalar_t inv = scalar_t(1.0 / div);
        const scalar_t diag = scalar_t(g_dot_y[b] / (2 * std::sqrt(div)) - da_a / div);
        for (int64_t k = 0; k < C * C; ++k) dp[k] *= inv;
        for (int64_t i = 0; i < C; ++i) dp[i * C + i] += diag;
      }
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

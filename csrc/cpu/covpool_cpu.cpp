// covpool on the CPU (SPEC section 1):
//   S = (1/M) Xc Xc^T,  Xc = X - mean over M          forward
//   dX = (1/M) (G + G^T) Xc                           backward
// Centring is one fused pass per row; there is never an M x M centring matrix. S is
// symmetric, so only its block upper triangle is multiplied out.
#include <torch/library.h>

#include <algorithm>

#include "common.h"
#include "elementwise.h"
#include "matrix_product.h"

namespace mpncov {
namespace {

// Row means of one sample's C x M rows, accumulated in double for float rows too: the
// mean of a long constant row must come out as that constant.
template <typename T>
void row_means(const T* x, T* mean, int64_t C, int64_t M) {
  for (int64_t r = 0; r < C; ++r) mean[r] = static_cast<T>(sum_of(x + r * M, M) / M);
}

// xc = one sample's rows minus their means (C x M, dense).
template <typename T>
void centre_rows(const T* x, const T* mean, T* xc, int64_t C, int64_t M) {
  for (int64_t r = 0; r < C; ++r) {
    const T* row = x + r * M;
    T* out = xc + r * M;
    const T m = mean[r];
#pragma omp simd
    for (int64_t j = 0; j < M; ++j) out[j] = row[j] - m;
  }
}

void check_covpool_input(const at::Tensor& x, const char* op) {
  check_input(x, op, "x", 3);
  TORCH_CHECK_VALUE(x.size(2) >= 1, "mpncov.", op,
                    ": x must have at least one position (M >= 1), got shape ", x.sizes());
}

at::Tensor covpool_cpu(const at::Tensor& x_in) {
  check_covpool_input(x_in, "covpool");
  const int64_t B = x_in.size(0), C = x_in.size(1), M = x_in.size(2);
  if (B == 0 || C == 0) return at::zeros({B, C, C}, x_in.options());
  at::Tensor x = x_in.to(compute_dtype(x_in.scalar_type())).contiguous();
  at::Tensor s = at::empty({B, C, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "covpool_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* sp = s.data_ptr<scalar_t>();
    parallel_over_samples<scalar_t>(B, C * M + C, [&](int64_t b, scalar_t* scratch) {
      scalar_t* xc = scratch;
      scalar_t* mean = scratch + C * M;
      row_means(xp + b * C * M, mean, C, M);
      centre_rows(xp + b * C * M, mean, xc, C, M);
      // S = (1/M) Xc Xc^T: symmetric, half of it multiplied out.
      const MatrixView<const scalar_t> xcv = dense<const scalar_t>(xc, C, M);
      matrix_product<scalar_t>(dense(sp + b * C * C, C, C),
                               {{xcv, xcv.transposed(), scalar_t(1.0 / M)}}, scalar_t(0),
                               /*symmetric=*/true);
    });
  });
  return s.to(x_in.scalar_type());
}

at::Tensor covpool_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in) {
  check_covpool_input(x_in, "covpool_backward");
  check_square(grad_in, "covpool_backward", "grad");
  TORCH_CHECK(grad_in.device() == x_in.device(), "mpncov.covpool_backward: grad is on ",
              grad_in.device(), " but x is on ", x_in.device());
  const int64_t B = x_in.size(0), C = x_in.size(1), M = x_in.size(2);
  TORCH_CHECK_VALUE(grad_in.size(0) == B && grad_in.size(1) == C,
                    "mpncov.covpool_backward: grad ", grad_in.sizes(), " does not match x ",
                    x_in.sizes());
  if (B == 0 || C == 0) return at::zeros_like(x_in, at::MemoryFormat::Contiguous);
  const auto ct = compute_dtype(x_in.scalar_type());
  at::Tensor x = x_in.to(ct).contiguous();
  at::Tensor g = grad_in.to(ct).contiguous();
  at::Tensor dx = empty_buffer({B, C, M}, x.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "covpool_backward_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    parallel_over_samples<scalar_t>(B, C * M + C * C + C, [&](int64_t b, scalar_t* scratch) {
      scalar_t* xc = scratch;
      scalar_t* gs = scratch + C * M;
      scalar_t* mean = gs + C * C;
      row_means(xp + b * C * M, mean, C, M);
      centre_rows(xp + b * C * M, mean, xc, C, M);
      // dX = (1/M) (G + G^T) Xc
      const scalar_t* gb = gp + b * C * C;
      symmetric_part(gs, gb, scalar_t(1), C);
      matrix_product<scalar_t>(dense(dxp + b * C * M, C, M),
                               {{dense<const scalar_t>(gs, C, C), dense<const scalar_t>(xc, C, M),
                                 scalar_t(1.0 / M)}},
                               scalar_t(0), /*symmetric=*/false);
    });
  });
  return dx.to(x_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(mpncov, CPU, m) {
  m.impl("covpool", &covpool_cpu);
  m.impl("covpool_backward", &covpool_backward_cpu);
}

}  // namespace mpncov

// covpool on the CPU (SPEC section 1):
//   S = (1/M) Xc Xc^T,  Xc = X - mean over M          forward
//   dX = (1/M) (G + G^T) Xc                           backward
// Centring is one pass over the features; there is never an M x M centring matrix. S is
// symmetric, so only its block upper triangle is multiplied out. The features are read in
// their own layout, channels first or tokens (features.h), and dX is written in it.
#include <torch/library.h>

#include <algorithm>

#include "common.h"
#include "elementwise.h"
#include "features.h"
#include "matrix_product.h"

namespace mpncov {
namespace {

at::Tensor covpool_cpu(const at::Tensor& x_in) {
  check_features_input(x_in, "covpool");
  const int64_t B = x_in.size(0), C = x_in.size(1), M = x_in.size(2);
  if (B == 0 || C == 0) return at::zeros({B, C, C}, x_in.options());
  FeatureLayout layout;
  at::Tensor x = features_in(x_in, compute_dtype(x_in.scalar_type()), &layout);
  at::Tensor s = at::empty({B, C, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "covpool_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* sp = s.data_ptr<scalar_t>();
    // Scratch: the C means in double, then Xc.
    parallel_over_samples<scalar_t>(B, C * M + 2 * C, [&](int64_t b, scalar_t* scratch) {
      double* acc = reinterpret_cast<double*>(scratch);
      scalar_t* xc = scratch + 2 * C;
      centre_features(xp + b * C * M, xc, C, M, layout, acc);
      // S = (1/M) Xc Xc^T: symmetric, half of it multiplied out.
      const MatrixView<const scalar_t> xcv = feature_view<const scalar_t>(xc, C, M, layout);
      matrix_product<scalar_t>(dense(sp + b * C * C, C, C),
                               {{xcv, xcv.transposed(), scalar_t(1.0 / M)}}, scalar_t(0),
                               /*symmetric=*/true);
    });
  });
  return s.to(x_in.scalar_type());
}

// dX in the layout of x (see features.h).
at::Tensor covpool_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in) {
  check_features_input(x_in, "covpool_backward");
  check_square(grad_in, "covpool_backward", "grad");
  TORCH_CHECK(grad_in.device() == x_in.device(), "mpncov.covpool_backward: grad is on ",
              grad_in.device(), " but x is on ", x_in.device());
  const int64_t B = x_in.size(0), C = x_in.size(1), M = x_in.size(2);
  TORCH_CHECK_VALUE(grad_in.size(0) == B && grad_in.size(1) == C,
                    "mpncov.covpool_backward: grad ", grad_in.sizes(), " does not match x ",
                    x_in.sizes());
  const auto ct = compute_dtype(x_in.scalar_type());
  at::Tensor dx = empty_features_like(x_in, ct);
  if (B == 0 || C == 0) return dx.zero_().to(x_in.scalar_type());
  FeatureLayout layout;
  at::Tensor x = features_in(x_in, ct, &layout);
  const FeatureLayout dx_layout = is_token_major(dx) ? FeatureLayout::tokens
                                                     : FeatureLayout::channels_first;
  at::Tensor g = grad_in.to(ct).contiguous();
  AT_DISPATCH_FLOATING_TYPES(ct, "covpool_backward_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    parallel_over_samples<scalar_t>(B, C * M + C * C + 2 * C, [&](int64_t b, scalar_t* scratch) {
      double* acc = reinterpret_cast<double*>(scratch);
      scalar_t* xc = scratch + 2 * C;
      scalar_t* gs = xc + C * M;
      centre_features(xp + b * C * M, xc, C, M, layout, acc);
      // dX = (1/M) (G + G^T) Xc
      symmetric_part(gs, gp + b * C * C, scalar_t(1), C);
      matrix_product<scalar_t>(
          feature_view(dxp + b * C * M, C, M, dx_layout),
          {{dense<const scalar_t>(gs, C, C), feature_view<const scalar_t>(xc, C, M, layout),
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

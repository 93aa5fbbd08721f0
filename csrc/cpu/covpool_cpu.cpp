// covpool on the CPU (SPEC section 1):
//   S = (1/M) Xc Xc^T,  Xc = X - mean over M          forward
//   dX = (1/M) (G + G^T) Xc                           backward
// Centring is one fused pass per row; there is never an M x M centring matrix. S is
// symmetric, so only its block upper triangle is multiplied out.
#include <torch/library.h>

#include "common.h"

namespace mpncov {
namespace {

// Xc = X - row means, in the compute dtype, contiguous (B, C, M).
at::Tensor centred(const at::Tensor& x) {
  at::Tensor xc = empty_buffer(x.sizes(), x.options().dtype(compute_dtype(x.scalar_type())));
  xc.copy_(x);
  const int64_t rows = xc.size(0) * xc.size(1), M = xc.size(2);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "covpool_centre", [&] {
    scalar_t* p = xc.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(M, 1)),
                     [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* row = p + r * M;
        // Accumulate in double for float rows too: M is small, and the mean of a long
        // constant row must come out as that constant.
        double sum = 0;
        for (int64_t j = 0; j < M; ++j) sum += row[j];
        const scalar_t mean = static_cast<scalar_t>(sum / M);
        for (int64_t j = 0; j < M; ++j) row[j] -= mean;
      }
    });
  });
  return xc;
}

void check_covpool_input(const at::Tensor& x, const char* op) {
  check_input(x, op, "x", 3);
  TORCH_CHECK_VALUE(x.size(2) >= 1, "mpncov.", op,
                    ": x must have at least one position (M >= 1), got shape ", x.sizes());
}

at::Tensor covpool_cpu(const at::Tensor& x) {
  check_covpool_input(x, "covpool");
  const int64_t B = x.size(0), C = x.size(1), M = x.size(2);
  if (B == 0 || C == 0) return at::zeros({B, C, C}, x.options());
  at::Tensor xc = centred(x);
  at::Tensor s = at::empty({B, C, C}, xc.options());
  batched_product(s, xc, xc.transpose(1, 2), 1.0 / M, 0.0, /*upper=*/true);
  mirror_upper(s);
  return s.to(x.scalar_type());
}

at::Tensor covpool_backward_cpu(const at::Tensor& grad, const at::Tensor& x) {
  check_covpool_input(x, "covpool_backward");
  check_square(grad, "covpool_backward", "grad");
  TORCH_CHECK(grad.device() == x.device(), "mpncov.covpool_backward: grad is on ", grad.device(),
              " but x is on ", x.device());
  const int64_t B = x.size(0), C = x.size(1), M = x.size(2);
  TORCH_CHECK_VALUE(grad.size(0) == B && grad.size(1) == C, "mpncov.covpool_backward: grad ",
                    grad.sizes(), " does not match x ", x.sizes());
  if (B == 0 || C == 0) return at::zeros_like(x, at::MemoryFormat::Contiguous);
  at::Tensor xc = centred(x);
  // G + G^T, fused into one pass.
  at::Tensor g = grad.to(xc.scalar_type());
  at::Tensor gs = (g + g.transpose(1, 2)).contiguous();
  at::Tensor dx = empty_buffer({B, C, M}, xc.options());
  batched_product(dx, gs, xc, 1.0 / M, 0.0, /*upper=*/false);
  return dx.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(mpncov, CPU, m) {
  m.impl("covpool", &covpool_cpu);
  m.impl("covpool_backward", &covpool_backward_cpu);
}

}  // namespace mpncov

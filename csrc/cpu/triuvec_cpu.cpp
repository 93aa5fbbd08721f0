// triuvec on the CPU (SPEC section 3): the row-major upper triangle of each (C, C) matrix,
// diagonal included, as a vector of K = C(C+1)/2; the backward scatters into the upper
// triangle and leaves zeros below it.
#include <torch/library.h>

#include <cstring>

#include "common.h"

namespace mpncov {
namespace {

at::Tensor triuvec_cpu(const at::Tensor& s_in) {
  check_square(s_in, "triuvec", "s");
  const int64_t B = s_in.size(0), C = s_in.size(1), K = C * (C + 1) / 2;
  at::Tensor s = s_in.contiguous();
  at::Tensor out = at::empty({B, K}, s.options());
  if (B == 0 || K == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "triuvec", [&] {
    const scalar_t* src = s.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* m = src + b * C * C;
        scalar_t* v = dst + b * K;
        // Row i contributes its entries i..C-1, contiguous in memory.
        for (int64_t i = 0; i < C; ++i) {
          std::memcpy(v, m + i * C + i, (C - i) * sizeof(scalar_t));
          v += C - i;
        }
      }
    });
  });
  return out;
}

at::Tensor triuvec_backward_cpu(const at::Tensor& grad_in, int64_t n) {
  check_input(grad_in, "triuvec_backward", "grad", 2);
  TORCH_CHECK_VALUE(n >= 0 && grad_in.size(1) == n * (n + 1) / 2,
                    "mpncov.triuvec_backward: grad has shape ", grad_in.sizes(),
                    ", expected (B, ", n * (n + 1) / 2, ") for n=", n);
  const int64_t B = grad_in.size(0), K = grad_in.size(1);
  at::Tensor grad = grad_in.contiguous();
  at::Tensor out = at::empty({B, n, n}, grad.options());
  if (B == 0 || n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "triuvec_backward", [&] {
    const scalar_t* src = grad.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* v = src + b * K;
        scalar_t* m = dst + b * n * n;
        for (int64_t i = 0; i < n; ++i) {
          for (int64_t j = 0; j < i; ++j) m[i * n + j] = scalar_t(0);
          std::memcpy(m + i * n + i, v, (n - i) * sizeof(scalar_t));
          v += n - i;
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mpncov, CPU, m) {
  m.impl("triuvec", &triuvec_cpu);
  m.impl("triuvec_backward", &triuvec_backward_cpu);
}

}  // namespace mpncov

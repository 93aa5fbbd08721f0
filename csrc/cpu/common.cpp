#include "common.h"

#include <algorithm>

namespace mpncov {

void check_input(const at::Tensor& t, const char* op, const char* arg, int64_t ndim) {
  TORCH_CHECK(t.defined(), "mpncov.", op, ": ", arg, " is undefined");
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "mpncov.", op, ": ", arg,
                   " must be a floating tensor (float16, bfloat16, float32 or float64), got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == ndim, "mpncov.", op, ": ", arg, " must have ", ndim,
                    " dimensions, got shape ", t.sizes());
}

void check_square(const at::Tensor& t, const char* op, const char* arg) {
  check_input(t, op, arg, 3);
  TORCH_CHECK_VALUE(t.size(1) == t.size(2), "mpncov.", op, ": ", arg,
                    " must be a batch of square matrices (B, C, C), got shape ", t.sizes());
}

int64_t symmetric_block_size(int64_t n) {
  // Blocks of 64 rows keep each piece a BLAS-friendly size; below 96 rows the saving of
  // splitting does not pay for the extra calls.
  if (n < 96) return n;
  return 64;
}

void batched_product(at::Tensor& out, const at::Tensor& a, const at::Tensor& bm, double alpha,
                     double beta, bool upper) {
  const int64_t n = out.size(1);
  const int64_t step = upper ? symmetric_block_size(n) : n;
  for (int64_t r0 = 0; r0 < n; r0 += step) {
    const int64_t rows = std::min(step, n - r0);
    // Row block [r0, r0+rows) needs columns [r0, n) only when the output is symmetric.
    const int64_t c0 = upper ? r0 : 0;
    at::Tensor o = out.narrow(1, r0, rows).narrow(2, c0, out.size(2) - c0);
    at::Tensor x = a.narrow(1, r0, rows);
    at::Tensor y = bm.narrow(2, c0, bm.size(2) - c0);
    if (beta == 0.0) {
      at::bmm_out(o, x, y);
      if (alpha != 1.0) o.mul_(alpha);
    } else {
      // In-place baddbmm_ on a strided block falls back to one addmm_ per sample; a
      // product into fresh memory plus an add is much faster and costs only O(n^2).
      if (beta != 1.0) o.mul_(beta);
      o.add_(at::bmm(x, y), alpha);
    }
  }
}

void batched_product_sum(at::Tensor& out, const at::Tensor& a1, const at::Tensor& b1,
                         const at::Tensor& a2, const at::Tensor& b2, double alpha, bool upper,
                         at::Tensor& left, at::Tensor& right) {
  const int64_t k = a1.size(2);
  left.narrow(2, 0, k).copy_(a1);
  left.narrow(2, k, k).copy_(a2);
  right.narrow(1, 0, k).copy_(b1);
  right.narrow(1, k, k).copy_(b2);
  batched_product(out, left, right, alpha, 0.0, upper);
}

void mirror_upper(at::Tensor& m) {
  const int64_t B = m.size(0), n = m.size(1);
  const int64_t step = symmetric_block_size(n);
  if (step >= n) return;  // computed in full
  TORCH_INTERNAL_ASSERT(m.stride(2) == 1 && m.stride(1) == n, "mirror_upper: rows must be dense");
  const int64_t batch_stride = m.stride(0);
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "mirror_upper", [&] {
    scalar_t* base = m.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        scalar_t* p = base + b * batch_stride;
        // Entries below the diagonal blocks were not written: copy them from above.
        for (int64_t i = step; i < n; ++i) {
          const int64_t jmax = (i / step) * step;
          for (int64_t j = 0; j < jmax; ++j) p[i * n + j] = p[j * n + i];
        }
      }
    });
  });
}

}  // namespace mpncov

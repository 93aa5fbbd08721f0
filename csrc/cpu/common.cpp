#include "common.h"

#include "blas.h"

#include <algorithm>
#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

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

at::Tensor empty_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#ifdef __linux__
  constexpr uintptr_t huge = uintptr_t(1) << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t first = (begin + huge - 1) & ~(huge - 1), last = end & ~(huge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return t;
}

int64_t symmetric_block_size(int64_t n) {
  // Measured on a 2-core AVX-512 machine (C = 64..256): rows of 32 up to C ~ 160, then 64;
  // below 48 rows the saving of splitting does not pay for the extra BLAS calls.
  if (n < 48) return n;
  return n < 160 ? 32 : 64;
}

namespace {

// One product per (sample, row block) straight to BLAS, threads over the batch (BLAS runs
// single-threaded inside the parallel region; with one sample it may use its own threads).
void batched_product_blas(at::Tensor& out, const at::Tensor& a, const at::Tensor& bm,
                          double alpha, double beta, int64_t step, bool upper) {
  const int64_t B = out.size(0), n = out.size(1), m = out.size(2), k = a.size(2);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "batched_product_blas", [&] {
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = bm.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t r0 = 0; r0 < n; r0 += step) {
          const int64_t rows = std::min(step, n - r0);
          const int64_t c0 = upper ? r0 : 0;
          MatrixView<const scalar_t> x{ap + b * a.stride(0) + r0 * a.stride(1), rows, k,
                                       a.stride(1), a.stride(2)};
          MatrixView<const scalar_t> y{bp + b * bm.stride(0) + c0 * bm.stride(2), k, m - c0,
                                       bm.stride(1), bm.stride(2)};
          MatrixView<scalar_t> o{op + b * out.stride(0) + r0 * out.stride(1) + c0, rows, m - c0,
                                 out.stride(1), 1};
          blas_gemm<scalar_t>(x, y, o, static_cast<scalar_t>(alpha), static_cast<scalar_t>(beta));
        }
      }
    });
  });
}

bool rows_or_cols_dense(const at::Tensor& t) {
  return t.stride(2) == 1 || t.stride(1) == 1;
}

}  // namespace

void batched_product(at::Tensor& out, const at::Tensor& a, const at::Tensor& bm, double alpha,
                     double beta, bool upper) {
  const int64_t n = out.size(1);
  const int64_t step = upper ? symmetric_block_size(n) : n;
  if (blas_available(out.scalar_type()) && out.stride(2) == 1 && rows_or_cols_dense(a) &&
      rows_or_cols_dense(bm)) {
    batched_product_blas(out, a, bm, alpha, beta, step, upper);
    return;
  }
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
      // product into fresh memory plus an add is faster and costs only O(n^2).
      if (beta != 1.0) o.mul_(beta);
      o.add_(at::bmm(x, y), alpha);
    }
  }
}

void batched_product_sum(at::Tensor& out, const at::Tensor& a1, const at::Tensor& b1,
                         const at::Tensor& a2, const at::Tensor& b2, double alpha, bool upper,
                         at::Tensor& left, at::Tensor& right) {
  if (blas_available(out.scalar_type())) {
    // BLAS accumulates into the strided blocks directly: no packing needed.
    batched_product(out, a1, b1, alpha, 0.0, upper);
    batched_product(out, a2, b2, alpha, 1.0, upper);
    return;
  }
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
        // Entries left of the diagonal blocks were not written: copy them from their
        // mirror images, in small square tiles so both sides stay in L1.
        constexpr int64_t tile = 32;
        for (int64_t i0 = step; i0 < n; i0 += tile) {
          const int64_t i1 = std::min(n, i0 + tile);
          const int64_t jmax = (i0 / step) * step;  // tiles never straddle a block edge
          for (int64_t j0 = 0; j0 < jmax; j0 += tile) {
            const int64_t j1 = std::min(jmax, j0 + tile);
            for (int64_t i = i0; i < i1; ++i)
              for (int64_t j = j0; j < j1; ++j) p[i * n + j] = p[j * n + i];
          }
        }
      }
    });
  });
}

}  // namespace mpncov

#include "matrix_product.h"

#include <algorithm>

#include "transpose.h"

namespace mpncov {

int64_t symmetric_block_size(int64_t n) {
  // Measured on a 2-core AVX-512 machine with MKL, one sample per thread: rows of 32 are
  // the best of 16/32/64/128 at C = 64..256 (at C = 256: 0.61 of a full product's time
  // with 32 rows, 0.65 with 64, 0.68 with MKL's own triangular gemmt); below 48 rows the
  // saving of splitting does not pay for the extra BLAS calls.
  return n < 48 ? n : 32;
}

namespace {

// Copy the entries left of the diagonal blocks from their mirror images, in square tiles
// so both sides stay in L1.
template <typename T>
void mirror_block_upper(const MatrixView<T>& m, int64_t step) {
  const int64_t n = m.rows, ld = m.row_stride;
  T* p = m.data;
  constexpr int64_t tile = 32;
  for (int64_t i0 = step; i0 < n; i0 += tile) {
    const int64_t i1 = std::min(n, i0 + tile);
    const int64_t jmax = (i0 / step) * step;  // tiles never straddle a block edge
    for (int64_t j0 = 0; j0 < jmax; j0 += tile) {
      const int64_t j1 = std::min(jmax, j0 + tile);
      // rows [i0, i1) x columns [j0, j1) from rows [j0, j1) x columns [i0, i1)
      transpose_tile(p + j0 * ld + i0, ld, p + i0 * ld + j0, ld, i1 - i0, j1 - j0);
    }
  }
}

}  // namespace

template <typename T>
void matrix_product(const MatrixView<T>& out, std::initializer_list<Term<T>> terms, T beta,
                    bool symmetric, bool mirror) {
  const int64_t n = out.rows, m = out.cols;
  if (!symmetric && m > 1 && out.col_stride != 1) {
    // Dense columns: out^T = sum_i alpha_i b_i^T a_i^T has dense rows.
    T b = beta;
    for (const Term<T>& t : terms) {
      blas_gemm<T>(t.b.transposed(), t.a.transposed(), out.transposed(), t.alpha, b);
      b = T(1);
    }
    return;
  }
  TORCH_INTERNAL_ASSERT(!symmetric || (n == m && out.col_stride == 1),
                        "matrix_product: a symmetric result must be square with dense rows");
  const int64_t step = symmetric ? symmetric_block_size(n) : std::max<int64_t>(n, 1);
  for (int64_t r0 = 0; r0 < n; r0 += step) {
    const int64_t rows = std::min(step, n - r0);
    const int64_t c0 = symmetric ? r0 : 0;
    const MatrixView<T> o = out.block(r0, rows, c0, m - c0);
    T b = beta;
    for (const Term<T>& t : terms) {
      blas_gemm<T>(t.a.block(r0, rows, 0, t.a.cols), t.b.block(0, t.b.rows, c0, m - c0), o,
                   t.alpha, b);
      b = T(1);
    }
  }
  if (symmetric && mirror && step < n) mirror_block_upper(out, step);
}

template void matrix_product<float>(const MatrixView<float>&, std::initializer_list<Term<float>>,
                                    float, bool, bool);
template void matrix_product<double>(const MatrixView<double>&,
                                     std::initializer_list<Term<double>>, double, bool, bool);

}  // namespace mpncov

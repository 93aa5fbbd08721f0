// Sums of products of one sample's matrices, exploiting symmetric results.
//
// Every iterate of iSQRT is a polynomial in A, so most products of sqrtm (and the
// covariance itself) have symmetric results. For those only the block upper triangle is
// multiplied out, in row blocks of symmetric_block_size(n) rows (row block [r0, r0+h)
// needs columns [r0, n) only), and then copied to the lower triangle while the sample's
// matrices are still in cache. With k row blocks this costs (k+1)/(2k) of the full product.
#pragma once

#include <initializer_list>

#include "blas.h"

namespace mpncov {

// One term alpha * a @ b of a sum of products: a is n x k, b is k x m.
template <typename T>
struct Term {
  MatrixView<const T> a, b;
  T alpha;
};

// out = beta * out + sum_i alpha_i a_i @ b_i. beta == 0 ignores the old content of out.
// out's rows or its columns must be dense (a result with dense columns is computed as its
// transpose, sum_i alpha_i b_i^T a_i^T).
// symmetric: the caller guarantees the result is symmetric (out square, rows dense), so
// only the block upper triangle is computed and then mirrored; with mirror = false the
// entries left of the diagonal blocks are not written (a caller that reads only the upper
// triangle).
template <typename T>
void matrix_product(const MatrixView<T>& out, std::initializer_list<Term<T>> terms, T beta,
                    bool symmetric, bool mirror = true);

// out += shift * I for a square matrix with dense rows.
template <typename T>
void add_identity(const MatrixView<T>& out, T shift) {
  for (int64_t i = 0; i < out.rows; ++i) out.data[i * out.row_stride + i] += shift;
}

// Row-block size of matrix_product's symmetric mode for an n x n result.
int64_t symmetric_block_size(int64_t n);

}  // namespace mpncov

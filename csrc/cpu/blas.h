// Products of one sample's matrices, called from inside a parallel loop over the batch.
//
// They go straight to the BLAS that libtorch_cpu links (MKL or OpenBLAS) through its
// Fortran symbols sgemm_/dgemm_: ATen's bmm on strided sub-blocks takes a per-sample slow
// path whose dispatch and view overhead costs as much as the arithmetic at C <= 256. The
// symbols are weak; where torch's BLAS does not export them (or MPNCOV_CPU_DIRECT_BLAS=0
// is set, which the tests use), the same product runs through ATen's mm on a view.
#pragma once

#include <ATen/ATen.h>

namespace mpncov {

// A strided row-major matrix view: element (i, j) at data[i * row_stride + j * col_stride];
// rows or columns must be dense (col_stride == 1 or row_stride == 1).
template <typename T>
struct MatrixView {
  T* data;
  int64_t rows, cols, row_stride, col_stride;

  MatrixView block(int64_t r0, int64_t nrows, int64_t c0, int64_t ncols) const {
    return {data + r0 * row_stride + c0 * col_stride, nrows, ncols, row_stride, col_stride};
  }
  MatrixView transposed() const { return {data, cols, rows, col_stride, row_stride}; }
};

// A dense row-major n x m matrix at p.
template <typename T>
MatrixView<T> dense(T* p, int64_t n, int64_t m) {
  return {p, n, m, m, 1};
}

// c = alpha * a @ b + beta * c (float or double). beta == 0 ignores the old content of c.
template <typename T>
void blas_gemm(const MatrixView<const T>& a, const MatrixView<const T>& b, const MatrixView<T>& c,
               T alpha, T beta);

}  // namespace mpncov

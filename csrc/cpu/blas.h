// Direct calls of the BLAS that libtorch_cpu links (MKL or OpenBLAS), for per-sample
// products on strided sub-blocks: ATen's bmm on such blocks takes a per-sample slow path
// whose dispatch and view overhead costs as much as the arithmetic at C <= 256.
// The symbols are weak: where torch's BLAS does not export them, blas_available() is
// false and the caller falls back to ATen.
#pragma once

#include <ATen/ATen.h>

namespace mpncov {

bool blas_available(at::ScalarType t);

// A strided row-major matrix view: element (i, j) at data[i * row_stride + j * col_stride];
// rows or columns must be dense (col_stride == 1 or row_stride == 1).
template <typename T>
struct MatrixView {
  T* data;
  int64_t rows, cols, row_stride, col_stride;
};

// c = alpha * a @ b + beta * c (float or double).
template <typename T>
void blas_gemm(const MatrixView<const T>& a, const MatrixView<const T>& b, const MatrixView<T>& c,
               T alpha, T beta);

}  // namespace mpncov

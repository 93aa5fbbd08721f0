#include "blas.h"

#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

extern "C" {
// Fortran BLAS (column-major), resolved at load time from torch's own BLAS if exported.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace mpncov {
namespace {

// A row-major operand seen by column-major BLAS is its own transpose: dense rows give
// op 'N' with ld = row_stride, dense columns op 'T' with ld = col_stride.
struct Operand {
  char op;
  int ld;
};

template <typename T>
Operand as_operand(const MatrixView<T>& x) {
  if (x.cols == 1 || x.col_stride == 1)
    return {'N', static_cast<int>(std::max<int64_t>({x.row_stride, x.cols, 1}))};
  return {'T', static_cast<int>(std::max<int64_t>({x.col_stride, x.rows, 1}))};
}

void call_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
               const float* alpha, const float* a, const int* lda, const float* b,
               const int* ldb, const float* beta, float* c, const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void call_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
               const double* alpha, const double* a, const int* lda, const double* b,
               const int* ldb, const double* beta, double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

bool direct_blas_allowed() {
  static const bool allowed = [] {
    const char* v = std::getenv("MPNCOV_CPU_DIRECT_BLAS");
    return !(v && std::strcmp(v, "0") == 0);
  }();
  return allowed;
}

template <typename T>
at::Tensor as_tensor(const MatrixView<T>& x) {
  return at::from_blob(const_cast<std::remove_const_t<T>*>(x.data), {x.rows, x.cols},
                       {x.row_stride, x.col_stride},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<std::remove_const_t<T>>::value));
}

// True when products go to BLAS directly (see blas.h).
bool direct_blas(at::ScalarType t) {
  if (!direct_blas_allowed()) return false;
  if (t == at::kFloat) return sgemm_ != nullptr;
  if (t == at::kDouble) return dgemm_ != nullptr;
  return false;
}

}  // namespace

template <typename T>
void blas_gemm(const MatrixView<const T>& a, const MatrixView<const T>& b, const MatrixView<T>& c,
               T alpha, T beta) {
  const int m = static_cast<int>(c.rows), n = static_cast<int>(c.cols);
  const int k = static_cast<int>(a.cols);
  if (m == 0 || n == 0) return;
  if (!direct_blas(c10::CppTypeToScalarType<T>::value)) {
    // addmm with beta == 0 ignores (does not propagate NaN from) the old content of c.
    at::Tensor ct = as_tensor(c);
    ct.addmm_(as_tensor(a), as_tensor(b), beta, alpha);
    return;
  }
  // Row-major C = A B  <=>  column-major C^T = B^T A^T.
  const int ldc = static_cast<int>(std::max<int64_t>({c.row_stride, c.cols, 1}));
  const Operand ob = as_operand(b), oa = as_operand(a);
  call_gemm(&ob.op, &oa.op, &n, &m, &k, &alpha, b.data, &ob.ld, a.data, &oa.ld, &beta, c.data,
            &ldc);
}

// How the CPU kernels multiply matrices, for `python -m mpncov.info` and the tests.
std::string cpu_products() {
  if (direct_blas(at::kFloat) && direct_blas(at::kDouble)) return "direct BLAS (sgemm_/dgemm_ of torch's BLAS)";
  if (!direct_blas_allowed()) return "ATen mm (direct BLAS disabled by MPNCOV_CPU_DIRECT_BLAS=0)";
  return "ATen mm (torch's BLAS exports no sgemm_/dgemm_)";
}

TORCH_LIBRARY_FRAGMENT(mpncov, m) {
  m.def("_cpu_products() -> str", &cpu_products);
}

template void blas_gemm<float>(const MatrixView<const float>&, const MatrixView<const float>&,
                               const MatrixView<float>&, float, float);
template void blas_gemm<double>(const MatrixView<const double>&, const MatrixView<const double>&,
                                const MatrixView<double>&, double, double);

}  // namespace mpncov

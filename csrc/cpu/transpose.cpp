#include "transpose.h"

#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MPNCOV_X86_AVX2 1
#include <immintrin.h>
#endif

namespace mpncov {
namespace {

template <typename T>
void transpose_scalar(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t rows,
                      int64_t cols) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[i * ldd + j] = src[j * lds + i];
}

#ifdef MPNCOV_X86_AVX2

// MPNCOV_CPU_SIMD=0 in the environment forces the scalar path (tests compare the two).
bool avx2_available() {
  static const bool ok = [] {
    const char* v = std::getenv("MPNCOV_CPU_SIMD");
    return !(v && std::strcmp(v, "0") == 0) && __builtin_cpu_supports("avx2");
  }();
  return ok;
}

// 8 x 8 floats: rows r0..r7 of src become columns of dst (unpack pairs, shuffle quads,
// then swap 128-bit halves).
__attribute__((target("avx2"))) inline void transpose_kernel(const float* src, int64_t lds,
                                                             float* dst, int64_t ldd) {
  const __m256 r0 = _mm256_loadu_ps(src + 0 * lds), r1 = _mm256_loadu_ps(src + 1 * lds);
  const __m256 r2 = _mm256_loadu_ps(src + 2 * lds), r3 = _mm256_loadu_ps(src + 3 * lds);
  const __m256 r4 = _mm256_loadu_ps(src + 4 * lds), r5 = _mm256_loadu_ps(src + 5 * lds);
  const __m256 r6 = _mm256_loadu_ps(src + 6 * lds), r7 = _mm256_loadu_ps(src + 7 * lds);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * ldd, _mm256_permute2f128_ps(s0, s4, 0x20));
  _mm256_storeu_ps(dst + 1 * ldd, _mm256_permute2f128_ps(s1, s5, 0x20));
  _mm256_storeu_ps(dst + 2 * ldd, _mm256_permute2f128_ps(s2, s6, 0x20));
  _mm256_storeu_ps(dst + 3 * ldd, _mm256_permute2f128_ps(s3, s7, 0x20));
  _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(s0, s4, 0x31));
  _mm256_storeu_ps(dst + 5 * ldd, _mm256_permute2f128_ps(s1, s5, 0x31));
  _mm256_storeu_ps(dst + 6 * ldd, _mm256_permute2f128_ps(s2, s6, 0x31));
  _mm256_storeu_ps(dst + 7 * ldd, _mm256_permute2f128_ps(s3, s7, 0x31));
}

// 4 x 4 doubles.
__attribute__((target("avx2"))) inline void transpose_kernel(const double* src, int64_t lds,
                                                             double* dst, int64_t ldd) {
  const __m256d r0 = _mm256_loadu_pd(src + 0 * lds), r1 = _mm256_loadu_pd(src + 1 * lds);
  const __m256d r2 = _mm256_loadu_pd(src + 2 * lds), r3 = _mm256_loadu_pd(src + 3 * lds);
  const __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1);
  const __m256d t2 = _mm256_unpacklo_pd(r2, r3), t3 = _mm256_unpackhi_pd(r2, r3);
  _mm256_storeu_pd(dst + 0 * ldd, _mm256_permute2f128_pd(t0, t2, 0x20));
  _mm256_storeu_pd(dst + 1 * ldd, _mm256_permute2f128_pd(t1, t3, 0x20));
  _mm256_storeu_pd(dst + 2 * ldd, _mm256_permute2f128_pd(t0, t2, 0x31));
  _mm256_storeu_pd(dst + 3 * ldd, _mm256_permute2f128_pd(t1, t3, 0x31));
}

// Whole k x k sub-tiles in registers, the ragged right and bottom edges element by element.
template <typename T>
__attribute__((target("avx2"))) void transpose_avx2(const T* src, int64_t lds, T* dst,
                                                    int64_t ldd, int64_t rows, int64_t cols) {
  constexpr int64_t k = 32 / sizeof(T);
  const int64_t rows_k = rows - rows % k, cols_k = cols - cols % k;
  for (int64_t i = 0; i < rows_k; i += k)
    for (int64_t j = 0; j < cols_k; j += k)
      transpose_kernel(src + j * lds + i, lds, dst + i * ldd + j, ldd);
  if (cols_k < cols)
    transpose_scalar(src + cols_k * lds, lds, dst + cols_k, ldd, rows, cols - cols_k);
  if (rows_k < rows)
    transpose_scalar(src + rows_k, lds, dst + rows_k * ldd, ldd, rows - rows_k, cols_k);
}

#endif  // MPNCOV_X86_AVX2

}  // namespace

bool transpose_uses_avx2() {
#ifdef MPNCOV_X86_AVX2
  return avx2_available();
#else
  return false;
#endif
}

template <typename T>
void transpose_tile(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t rows,
                    int64_t cols) {
#ifdef MPNCOV_X86_AVX2
  if (avx2_available()) return transpose_avx2(src, lds, dst, ldd, rows, cols);
#endif
  transpose_scalar(src, lds, dst, ldd, rows, cols);
}

TORCH_LIBRARY_FRAGMENT(mpncov, m) {
  m.def("_cpu_transpose_kernel() -> str",
        [] { return std::string(transpose_uses_avx2() ? "avx2" : "scalar"); });
}

template void transpose_tile<float>(const float*, int64_t, float*, int64_t, int64_t, int64_t);
template void transpose_tile<double>(const double*, int64_t, double*, int64_t, int64_t,
                                     int64_t);

}  // namespace mpncov

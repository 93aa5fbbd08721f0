// Elementwise steps and reductions on one sample's matrices (inner loops of the CPU
// kernels). Reductions accumulate in double in independent partial sums: a single running
// sum is one serial chain of dependent additions, latency-bound (about 0.5 ms per covpool
// call at B = 64, C = 64, M = 196). The order of additions is fixed for a given length, so
// results are reproducible run to run.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "transpose.h"

namespace mpncov {

// Independent partial sums per reduction: enough to hide the latency of the additions.
constexpr int64_t kLanes = 16;

template <typename T>
double sum_of(const T* p, int64_t n) {
  double lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += double(p[i + l]);
  double s = 0;
  for (; i < n; ++i) s += double(p[i]);
  for (int64_t l = 0; l < kLanes; ++l) s += lane[l];
  return s;
}

// <a, b> = sum_i a_i b_i
template <typename T>
double dot_of(const T* a, const T* b, int64_t n) {
  double lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += double(a[i + l]) * double(b[i + l]);
  double s = 0;
  for (; i < n; ++i) s += double(a[i]) * double(b[i]);
  for (int64_t l = 0; l < kLanes; ++l) s += lane[l];
  return s;
}

// out = alpha * x (n elements; out may alias x).
template <typename T>
void scale_into(T* out, const T* x, T alpha, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = alpha * x[i];
}

// out = (t == 0 ? 0 : NaN) for a sample whose trace t is not positive (or is NaN): a zero
// matrix gives zero results, an indefinite or NaN one NaN, like sqrt(t).
template <typename T>
void fill_degenerate(T* out, double t, int64_t n) {
  std::fill(out, out + n, t == 0 ? T(0) : std::numeric_limits<T>::quiet_NaN());
}

// out = x / d, the division in double: d may be a tiny trace whose reciprocal overflows
// (a float32 trace below 3e-39, a float64 denormal), and x / d stays finite where x <= d.
template <typename T>
void divide_into(T* out, const T* x, double d, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(static_cast<double>(x[i]) / d);
}

// out = alpha * (g + g^T) for a dense C x C matrix (out must not alias g), in square
// tiles: each tile of out first receives the transposed tile of g, then adds its own.
template <typename T>
void symmetric_part(T* out, const T* g, T alpha, int64_t C) {
  constexpr int64_t tile = 32;
  for (int64_t i0 = 0; i0 < C; i0 += tile) {
    const int64_t i1 = std::min(C, i0 + tile);
    for (int64_t j0 = 0; j0 < C; j0 += tile) {
      const int64_t j1 = std::min(C, j0 + tile);
      transpose_tile(g + j0 * C + i0, C, out + i0 * C + j0, C, i1 - i0, j1 - j0);
      for (int64_t i = i0; i < i1; ++i)
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) out[i * C + j] = alpha * (g[i * C + j] + out[i * C + j]);
    }
  }
}

}  // namespace mpncov

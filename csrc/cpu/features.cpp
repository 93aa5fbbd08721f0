#include "features.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common.h"
#include "elementwise.h"

namespace mpncov {

bool is_token_major(const at::Tensor& x) {
  return x.dim() == 3 && !x.is_contiguous() && x.transpose(1, 2).is_contiguous();
}

void check_features_input(const at::Tensor& x, const char* op) {
  check_input(x, op, "x", 3);
  TORCH_CHECK_VALUE(x.size(2) >= 1, "mpncov.", op,
                    ": x must have at least one position (M >= 1), got shape ", x.sizes());
}

at::Tensor features_in(const at::Tensor& x_in, at::ScalarType ct, FeatureLayout* layout) {
  at::Tensor x = x_in.to(ct);  // keeps the strides of a dense tensor
  if (is_token_major(x)) {
    *layout = FeatureLayout::tokens;
    return x;
  }
  *layout = FeatureLayout::channels_first;
  return x.contiguous();
}

at::Tensor empty_features(int64_t B, int64_t C, int64_t M, FeatureLayout layout,
                          const at::TensorOptions& options) {
  if (layout == FeatureLayout::tokens) return empty_buffer({B, M, C}, options).transpose(1, 2);
  return empty_buffer({B, C, M}, options);
}

at::Tensor empty_features_like(const at::Tensor& x, at::ScalarType dtype) {
  const FeatureLayout layout =
      is_token_major(x) ? FeatureLayout::tokens : FeatureLayout::channels_first;
  return empty_features(x.size(0), x.size(1), x.size(2), layout, x.options().dtype(dtype));
}

template <typename T>
void centre_features(const T* x, T* xc, int64_t C, int64_t M, FeatureLayout layout,
                     double* acc) {
  if (layout == FeatureLayout::channels_first) {
    // Row r holds channel r's M values.
    for (int64_t r = 0; r < C; ++r) {
      const T mean = static_cast<T>(sum_of(x + r * M, M) / M);
      const T* row = x + r * M;
      T* o = xc + r * M;
#pragma omp simd
      for (int64_t j = 0; j < M; ++j) o[j] = row[j] - mean;
    }
    return;
  }
  // Row j holds position j's C channels: column sums, one double per channel.
  std::fill(acc, acc + C, 0.0);
  for (int64_t j = 0; j < M; ++j) {
    const T* row = x + j * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[c] += double(row[c]);
  }
  for (int64_t c = 0; c < C; ++c) acc[c] = double(static_cast<T>(acc[c] / M));
  for (int64_t j = 0; j < M; ++j) {
    const T* row = x + j * C;
    T* o = xc + j * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) o[c] = row[c] - static_cast<T>(acc[c]);
  }
}

template <typename T>
double frobenius_norm(const T* x, int64_t n) {
  const double sum_sq = dot_of(x, x, n);
  // Squares of values below ~1e-154 lose digits (or vanish) in double, above ~1e154 they
  // overflow; only then is the sum taken again over x / max|x|.
  if (sum_sq > 1e-200 && sum_sq <= std::numeric_limits<double>::max()) return std::sqrt(sum_sq);
  double largest = 0;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const double v = std::abs(double(x[i]));
    nan |= std::isnan(v);
    largest = std::max(largest, v);
  }
  if (nan) return std::numeric_limits<double>::quiet_NaN();
  if (largest == 0 || std::isinf(largest)) return largest;
  double scaled = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double v = double(x[i]) / largest;
    scaled += v * v;
  }
  return largest * std::sqrt(scaled);
}

template void centre_features<float>(const float*, float*, int64_t, int64_t, FeatureLayout,
                                     double*);
template void centre_features<double>(const double*, double*, int64_t, int64_t, FeatureLayout,
                                      double*);
template double frobenius_norm<float>(const float*, int64_t);
template double frobenius_norm<double>(const double*, int64_t);

}  // namespace mpncov

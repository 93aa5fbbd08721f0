// One sample's features X (C channels x M positions) as the CPU kernels read them, and the
// steps every feature kernel starts with: centring over the positions and the norm.
//
// A (B, C, M) feature tensor comes in one of two dense layouts, both read without a copy:
// * channels first: (B, C, M) contiguous, the rows of each X dense ((B, C, H, W) flattened);
// * tokens: a (B, M, C) contiguous tensor seen through transpose(1, 2), the columns of each
//   X dense (vision-transformer tokens, and channels_last (B, C, H, W) flattened).
// Any other strides are copied to channels first. The products see X through a strided
// MatrixView, and BLAS takes either orientation as it is (op 'N' or 'T'); a gradient with
// respect to the features is written in the features' own layout.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "blas.h"

namespace mpncov {

enum class FeatureLayout { channels_first, tokens };

// True for a (B, C, M) tensor that is a transposed view of a contiguous (B, M, C) one (and
// not itself contiguous: where both hold, C == 1 or M == 1, it counts as channels first).
bool is_token_major(const at::Tensor& x);

// x must be (B, C, M) features with at least one position (a clear error naming op).
void check_features_input(const at::Tensor& x, const char* op);

// x in dtype ct and one of the two layouts: no copy where x already has one (and the dtype).
at::Tensor features_in(const at::Tensor& x, at::ScalarType ct, FeatureLayout* layout);

// An uninitialised (B, C, M) tensor in `layout`.
at::Tensor empty_features(int64_t B, int64_t C, int64_t M, FeatureLayout layout,
                          const at::TensorOptions& options);

// The gradient of features x: a (B, C, M) tensor in x's layout when x is token-major, else
// contiguous (mpncov/_meta.py's fake kernels follow the same rule).
at::Tensor empty_features_like(const at::Tensor& x, at::ScalarType dtype);

// Sample b's X (C x M) in a batch of features at p.
template <typename T>
MatrixView<T> feature_view(T* p, int64_t C, int64_t M, FeatureLayout layout) {
  return layout == FeatureLayout::channels_first ? dense<T>(p, C, M)
                                                 : dense<T>(p, M, C).transposed();
}

// xc = x minus its mean over the M positions, per channel, in the same layout (x and xc
// are one sample's dense C * M block; xc may alias x). The means are accumulated in double
// (the mean of a long constant row must come out as that constant) and rounded to T, as
// covpool always did. `acc` is scratch for C doubles.
template <typename T>
void centre_features(const T* x, T* xc, int64_t C, int64_t M, FeatureLayout layout,
                     double* acc);

// ||x||_F of n values, in double. Values whose squares would underflow or overflow double
// (below about 1e-154, above 1e154) are scaled by the largest magnitude first, so a float64
// sample of 1e-160 still has an accurate (tiny, positive) norm. NaN gives NaN.
template <typename T>
double frobenius_norm(const T* x, int64_t n);

}  // namespace mpncov

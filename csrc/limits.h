// Limits and thresholds shared by the schemas (ops.cpp), the CPU kernels and the CUDA
// binding. Torch-free.
#pragma once

#include <cstdint>

namespace mpncov {

// iters is refused above this. Newton-Schulz converges to the exact root in 20-30 steps
// (and on rank-deficient float32 input rounding makes any longer run diverge), and the
// iterates saved for the backward grow as 3 (iters - 1) + 1 matrices per sample.
constexpr int64_t kMaxIters = 100;

// Up to this many iterations every product of sqrtm with a symmetric result computes its
// upper triangle and mirrors it. Mirroring forces the iterates to be exactly symmetric, but
// the coupled iteration relies on the order of its products to damp rounding errors in the
// null space of A, where Z_k grows like 1.5^k: with Z_k and T_k mirrored those errors
// grow by about 2.25 per step. Measured in float32 on rank-deficient covariances (C = 64
// and 256, M < C) against the float64 recurrence: the same error as the plain recurrence
// up to 12 steps, 10 % more at 13, 3x at 15, diverged by 20. So beyond this threshold
// T_k = 1.5 I - 0.5 Z_k Y_k and Z_(k+1) = T_k Z_k (and their derivatives in the backward)
// are full products, and only Y (and dY) is mirrored.
//
// Such long runs are asked for to get the exact root, and in float32 they meet a second
// limit: a float32 covariance of rank r < C has C - r eigenvalues of about +-1e-9 of its
// trace, and Newton-Schulz diverges on the negative ones (its error there grows by 2.25
// per step): the plain float32 recurrence drifts from 1e-5 to 5e-4 of the exact root
// between 20 and 28 steps and diverges by 30 (C = 256, M = 196). Iterating the same
// float32 matrix in float64 stays within 4e-5 up to 30 steps there. So beyond this
// threshold float32 input is computed in float64 (twice the cost of float32 products,
// for a mode used to converge, not in training heads).
constexpr int64_t kMaxMirroredIters = 8;

// True when the iteration of this length mirrors every symmetric product (and float32
// stays float32).
constexpr bool mirrors_all_products(int64_t iters) { return iters <= kMaxMirroredIters; }

}  // namespace mpncov

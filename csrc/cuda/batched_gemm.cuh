// Tiled shared-memory matrix-product core used by the covpool and sqrtm kernels.
//
// One thread block (256 threads, 16 x 16) computes a 64 x 64 tile of a product
// P @ Q (P: rows x K, Q: K x cols) for one sample; each thread owns a 4 x 4 set of
// outputs at rows ty + 16 r and columns tx + 16 c (strided, so that shared-memory reads
// are conflict-free and global stores are coalesced). K is walked in slabs of 16 staged
// in shared memory. Every output element is a sum over k in increasing order, the same
// in every block, so results are bitwise reproducible.
//
// Operands are read through `Operand`, which returns scale * (p[i, k] - shift[i]) and 0
// outside the matrix, so arbitrary sizes need no padding and covpool can centre its
// input on the fly.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace mpncov {
namespace cuda {
namespace gemm {

constexpr int kTile = 64;                   // output tile side
constexpr int kSlab = 16;                   // K-slab staged in shared memory
constexpr int kDimX = 16;                   // threads along columns
constexpr int kDimY = 16;                   // threads along rows
constexpr int kBlock = kDimX * kDimY;       // 256 threads
constexpr int kPerY = kTile / kDimY;        // 4 rows per thread
constexpr int kPerX = kTile / kDimX;        // 4 columns per thread
static_assert(kBlock == kThreads, "gemm block must match kThreads");

// Element (i, k) of a row-major rows x cols matrix with leading dimension ld, read as
// scale * (p[i * ld + k] - shift[i]) (no shift when shift == nullptr); 0 outside.
template <typename T>
struct Operand {
  const T* p;
  const T* shift;
  int rows;
  int cols;
  int64_t ld;
  T scale;

  __device__ __forceinline__ T at(int i, int k) const {
    if (i >= rows || k >= cols) return T(0);
    T v = p[static_cast<int64_t>(i) * ld + k];
    if (shift != nullptr) v -= shift[i];
    return scale * v;
  }
};

// Shared-memory staging: a[k][r] = P(row0 + r, k0 + k), b[k][c] = Q(k0 + k, col0 + c).
// The +1 padding spreads the transposing stores of load_rows_k over the banks.
template <typename T>
struct Tiles {
  T a[kSlab][kTile + 1];
  T b[kSlab][kTile + 1];
};

// dst[k][r] = op(r0 + r, k0 + k): a slab of an operand stored with K as its column index.
// Consecutive threads read consecutive k (the contiguous direction in global memory).
template <typename T>
__device__ __forceinline__ void load_rows_k(T (*dst)[kTile + 1], const Operand<T>& op, int r0,
                                            int k0) {
  for (int e = threadIdx.x; e < kTile * kSlab; e += kBlock) {
    const int r = e / kSlab;
    const int k = e % kSlab;
    dst[k][r] = op.at(r0 + r, k0 + k);
  }
}

// dst[k][c] = op(k0 + k, c0 + c): a slab of an operand stored with K as its row index.
template <typename T>
__device__ __forceinline__ void load_k_cols(T (*dst)[kTile + 1], const Operand<T>& op, int k0,
                                            int c0) {
  for (int e = threadIdx.x; e < kTile * kSlab; e += kBlock) {
    const int k = e / kTile;
    const int c = e % kTile;
    dst[k][c] = op.at(k0 + k, c0 + c);
  }
}

// acc[r][c] += sum_{k < K} P(row0 + ty + 16 r, k) * Q(k, col0 + tx + 16 c).
// p stores P (rows x K). If Q_TRANSPOSED, q stores Q^T (cols x K), else Q (K x cols).
// Must be called by all threads of the block (it synchronises).
template <typename T, bool Q_TRANSPOSED>
__device__ __forceinline__ void accumulate(T (&acc)[kPerY][kPerX], Tiles<T>& sm,
                                           const Operand<T>& p, const Operand<T>& q, int K,
                                           int row0, int col0) {
  const int tx = threadIdx.x % kDimX;
  const int ty = threadIdx.x / kDimX;
  for (int k0 = 0; k0 < K; k0 += kSlab) {
    load_rows_k(sm.a, p, row0, k0);
    if (Q_TRANSPOSED) {
      load_rows_k(sm.b, q, col0, k0);
    } else {
      load_k_cols(sm.b, q, k0, col0);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kSlab; ++k) {
      T a[kPerY];
      T b[kPerX];
#pragma unroll
      for (int r = 0; r < kPerY; ++r) a[r] = sm.a[k][ty + kDimY * r];
#pragma unroll
      for (int c = 0; c < kPerX; ++c) b[c] = sm.b[k][tx + kDimX * c];
#pragma unroll
      for (int r = 0; r < kPerY; ++r)
#pragma unroll
        for (int c = 0; c < kPerX; ++c) acc[r][c] += a[r] * b[c];
    }
    __syncthreads();  // the slab is overwritten by the next iteration
  }
}

template <typename T>
__device__ __forceinline__ void zero(T (&acc)[kPerY][kPerX]) {
#pragma unroll
  for (int r = 0; r < kPerY; ++r)
#pragma unroll
    for (int c = 0; c < kPerX; ++c) acc[r][c] = T(0);
}

// Number of 64-tiles covering n.
__host__ __device__ inline int tiles_for(int n) { return (n + kTile - 1) / kTile; }

// Tiles on or above the diagonal of a tiles x tiles grid, numbered row by row:
// row r holds tiles (r, r) .. (r, tiles - 1). Maps the linear index to (tr, tc), tr <= tc.
__device__ __forceinline__ void upper_tile(int idx, int tiles, int& tr, int& tc) {
  int r = 0;
  while (idx >= tiles - r) {
    idx -= tiles - r;
    ++r;
  }
  tr = r;
  tc = r + idx;
}

// Blocks needed for an n x n output: all tiles, or only those with tr <= tc.
inline int64_t square_tile_blocks(int64_t n, bool upper) {
  const int64_t t = (n + kTile - 1) / kTile;
  return upper ? t * (t + 1) / 2 : t * t;
}

}  // namespace gemm
}  // namespace cuda
}  // namespace mpncov

// Tiled shared-memory matrix-product core used by the covpool and sqrtm kernels.
//
// One thread block (64 threads, 8 x 8) computes a 64 x 64 tile of a product P @ Q
// (P: rows x K, Q: K x cols) for one sample. Each thread owns an 8 x 8 set of outputs:
// rows tile_row(0..7) = {4 ty .. 4 ty + 3} and {32 + 4 ty .. 32 + 4 ty + 3}, columns
// likewise with tx. Per k it reads 8 values of P and 8 of Q from shared memory as four
// 16-byte vectors and does 64 FMAs, so the FMA units, not shared memory, set the pace
// (a 4 x 4 set per thread needs one shared load per two FMAs). The split into two groups
// of 4 keeps a warp's vector loads free of bank conflicts. K is walked in slabs of 16
// staged in shared memory. Every output is a sum over k in increasing order, the same in
// every block, so results are bitwise reproducible.
//
// Operands are read through `Operand`, which returns scale * (p[i, k] - shift[i]) and 0
// outside the matrix, so arbitrary sizes and alignments need no padding and covpool can
// centre its input on the fly.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace mpncov {
namespace cuda {
namespace gemm {

constexpr int kTile = 64;                   // output tile side
constexpr int kSlab = 16;                   // K-slab staged in shared memory
constexpr int kDimX = 8;                    // threads along columns
constexpr int kDimY = 8;                    // threads along rows
constexpr int kBlock = kDimX * kDimY;       // 64 threads
constexpr int kPerY = kTile / kDimY;        // 8 rows per thread
constexpr int kPerX = kTile / kDimX;        // 8 columns per thread
constexpr int kPitch = kTile + 4;           // shared row pitch: keeps 16-byte alignment
static_assert(kPerY == 8 && kPerX == 8, "tile_row / tile_col assume 8 x 8 per thread");

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
template <typename T>
struct Tiles {
  alignas(16) T a[kSlab][kPitch];
  alignas(16) T b[kSlab][kPitch];
};

// Offset within the tile of the r-th row (c-th column) the calling thread owns.
__device__ __forceinline__ int tile_row(int r) {
  return (r >> 2) * 32 + (static_cast<int>(threadIdx.x) / kDimX) * 4 + (r & 3);
}
__device__ __forceinline__ int tile_col(int c) {
  return (c >> 2) * 32 + (static_cast<int>(threadIdx.x) % kDimX) * 4 + (c & 3);
}

// v[0..3] = p[0..3] from 16-byte aligned shared memory, as vector loads.
__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
  const float4 q = *reinterpret_cast<const float4*>(p);
  v[0] = q.x;
  v[1] = q.y;
  v[2] = q.z;
  v[3] = q.w;
}
__device__ __forceinline__ void load4(const double* p, double (&v)[4]) {
  const double2 q0 = *reinterpret_cast<const double2*>(p);
  const double2 q1 = *reinterpret_cast<const double2*>(p + 2);
  v[0] = q0.x;
  v[1] = q0.y;
  v[2] = q1.x;
  v[3] = q1.y;
}

// dst[k][r] = op(r0 + r, k0 + k): a slab of an operand stored with K as its column index.
// Consecutive threads read consecutive k (the contiguous direction in global memory).
template <typename T>
__device__ __forceinline__ void load_rows_k(T (*dst)[kPitch], const Operand<T>& op, int r0,
                                            int k0) {
  for (int e = threadIdx.x; e < kTile * kSlab; e += kBlock) {
    const int r = e / kSlab;
    const int k = e % kSlab;
    dst[k][r] = op.at(r0 + r, k0 + k);
  }
}

// dst[k][c] = op(k0 + k, c0 + c): a slab of an operand stored with K as its row index.
template <typename T>
__device__ __forceinline__ void load_k_cols(T (*dst)[kPitch], const Operand<T>& op, int k0,
                                            int c0) {
  for (int e = threadIdx.x; e < kTile * kSlab; e += kBlock) {
    const int k = e / kTile;
    const int c = e % kTile;
    dst[k][c] = op.at(k0 + k, c0 + c);
  }
}

// acc[r][c] += sum_{k < K} P(row0 + tile_row(r), k) * Q(k, col0 + tile_col(c)).
// p stores P (rows x K). If Q_TRANSPOSED, q stores Q^T (cols x K), else Q (K x cols).
// Must be called by all threads of the block (it synchronises).
template <typename T, bool Q_TRANSPOSED>
__device__ __forceinline__ void accumulate(T (&acc)[kPerY][kPerX], Tiles<T>& sm,
                                           const Operand<T>& p, const Operand<T>& q, int K,
                                           int row0, int col0) {
  const int ra = (static_cast<int>(threadIdx.x) / kDimX) * 4;
  const int cb = (static_cast<int>(threadIdx.x) % kDimX) * 4;
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
      T a[2][4];
      T b[2][4];
      load4(&sm.a[k][ra], a[0]);
      load4(&sm.a[k][32 + ra], a[1]);
      load4(&sm.b[k][cb], b[0]);
      load4(&sm.b[k][32 + cb], b[1]);
#pragma unroll
      for (int r = 0; r < kPerY; ++r)
#pragma unroll
        for (int c = 0; c < kPerX; ++c) acc[r][c] += a[r >> 2][r & 3] * b[c >> 2][c & 3];
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

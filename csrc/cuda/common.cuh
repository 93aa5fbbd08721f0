// Shared helpers of the mpncov CUDA kernels: launch geometry, numeric helpers and a
// deterministic block reduction. Torch-free: only CUDA headers.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace mpncov {
namespace cuda {

// Threads of the 1-D elementwise / reduction kernels.
constexpr int kThreads = 256;
// gridDim.y / gridDim.z are limited to 65535: kernels loop over the batch with this stride.
constexpr int kMaxGridY = 65535;
// Cap on the number of blocks of grid-stride elementwise kernels.
constexpr int64_t kMaxElementwiseBlocks = 65535LL * 8;

inline int grid_y_for_batch(int64_t batch) {
  return static_cast<int>(batch < kMaxGridY ? batch : kMaxGridY);
}

inline unsigned int elementwise_blocks(int64_t total) {
  int64_t blocks = (total + kThreads - 1) / kThreads;
  if (blocks < 1) blocks = 1;
  if (blocks > kMaxElementwiseBlocks) blocks = kMaxElementwiseBlocks;
  return static_cast<unsigned int>(blocks);
}

// Sizes the kernels index with int (matrix sides, M). Larger ones are refused.
inline bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

// The block's dynamic shared memory (the size given at launch), 16-byte aligned, as a
// byte array `name`. The CUDA emulation of the tests hands out a NaN-filled buffer.
#if defined(MPNCOV_EMULATION)
#define MPNCOV_DYNAMIC_SHARED(name) unsigned char* name = ::emu::dynamic_shared()
#else
#define MPNCOV_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// Square root for either precision (IEEE-rounded, no fast-math).
__device__ __forceinline__ float dev_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double dev_sqrt(double x) { return sqrt(x); }

// Sample b, row i, column j of the flat index idx into a batch of row-major n x n matrices.
struct MatrixIndex {
  int64_t b, i, j;
};
__device__ __forceinline__ MatrixIndex matrix_index(int64_t idx, int n) {
  const int64_t nn = static_cast<int64_t>(n) * n;
  const int64_t b = idx / nn;
  const int64_t rem = idx - b * nn;
  const int64_t i = rem / n;
  return {b, i, rem - i * n};
}

// trace used for normalisation: 0 is replaced by 1 so that a zero matrix stays zero.
template <typename T>
__device__ __forceinline__ T safe_trace(T t) {
  return t == T(0) ? T(1) : t;
}

// Element (i, j) of the symmetric part of a matrix: u = M(i, j), l = M(j, i); exactly
// symmetric (addition commutes), and u itself where u == l (also when u + l would
// overflow). Every sqrtm kernel reads its input through this, so all paths compute the
// same function of a non-symmetric input.
template <typename T>
__device__ __forceinline__ T sym_value(T u, T l) {
  return u == l ? u : T(0.5) * (u + l);
}

// Sum of v over the block; every thread gets the result. blockDim.x must be a multiple
// of 32 and at most 1024; `scratch` holds >= 32 values. The order of additions depends
// only on blockDim.x, so the result is bitwise reproducible run to run (no atomics).
template <typename T>
__device__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? scratch[lane] : T(0);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  return scratch[0];
}

}  // namespace cuda
}  // namespace mpncov

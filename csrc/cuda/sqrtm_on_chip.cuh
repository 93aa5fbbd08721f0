// sqrtm for n <= kOnChipMaxN in one kernel per op: one block per sample runs the whole
// Newton-Schulz loop (forward) or its derivative (backward) with the iterates in shared
// memory (SPEC section 7: at d <= 128 one sample's loop fits on chip). Torch-free launchers.
//
// Same function, same `saved` layout and the same numerics rules as the tiled launchers of
// sqrtm_kernel.cuh, for short mode only (iters <= kMaxMirroredIters: every product
// mirrored); long mode keeps the tiled path. Every product sums over k in increasing order
// with the same epilogue as the tiled product kernel, so the forward gives the tiled
// forward's results (bit for bit where the compiler contracts the same multiply-adds; the
// CPU emulation checks bitwise equality); the backward's two per-sample dot products are
// summed in a different (fixed) order, so its diagonal may differ in the last bits.
//
// Shared memory per block: three n x p matrices (p = n rounded up to 8) and, in the
// backward, two slabs of kOnChipSlab rows of p through which the saved iterates stream
// from global memory (cp.async). float at n = 128: 192 KB forward, 208 KB backward, which
// H100/H200 (227 KB per block) allow and A100 (163 KB) does not: there the on-chip
// kernels serve n <= 115 (forward) and n <= 112 (backward). The launch checks the
// current device's opt-in limit (sqrtm_on_chip_fits); callers fall back to the tiled path.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../limits.h"

namespace mpncov {
namespace cuda {

constexpr int64_t kOnChipMaxN = 128;
// Rows of a saved iterate per streamed slab of the backward.
constexpr int kOnChipSlab = 16;

// Row pitch (elements) of the shared matrices: n rounded up to a whole cell (8).
#if defined(__CUDACC__)
__host__ __device__
#endif
inline int64_t sqrtm_on_chip_pitch(int64_t n) { return (n + 7) / 8 * 8; }

// Dynamic shared memory of the on-chip forward / backward kernel for side n.
inline int64_t sqrtm_on_chip_smem_bytes(int64_t n, int64_t elem_size, bool backward) {
  const int64_t p = sqrtm_on_chip_pitch(n);
  return (3 * n * p + (backward ? 2 * kOnChipSlab * p : 0)) * elem_size;
}

// Whether the on-chip kernel serves this call: short mode, 1 <= n <= kOnChipMaxN, and its
// shared memory (dynamic + the kernel's static) within the current device's per-block
// opt-in limit.
template <typename T>
bool sqrtm_on_chip_fits(int64_t n, int64_t iters, bool backward);

// The same contracts as sqrtm_forward / sqrtm_backward (sqrtm_kernel.cuh); no scratch.
// cudaErrorInvalidValue where sqrtm_on_chip_fits is false.
template <typename T>
cudaError_t sqrtm_on_chip_forward(const T* s, T* out, T* saved, int64_t batch, int64_t n,
                                  int64_t iters, cudaStream_t stream);
template <typename T>
cudaError_t sqrtm_on_chip_backward(const T* grad, const T* s, const T* saved, T* grad_s,
                                   int64_t batch, int64_t n, int64_t iters, cudaStream_t stream);

}  // namespace cuda
}  // namespace mpncov

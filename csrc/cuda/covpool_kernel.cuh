// covpool on CUDA (SPEC section 1). Torch-free host launchers over raw device pointers.
//
//   forward:  S = (1/M) Xc Xc^T,     Xc = X - mean of X over its M columns
//   backward: dX = (1/M) (G + G^T) Xc
//
// All tensors are contiguous row-major: x (batch, c, m), S / G (batch, c, c).
// `work` is caller-allocated scratch of *_workspace(...) elements of T; the kernels
// never allocate. Everything runs on `stream`. Returns the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mpncov {
namespace cuda {

// Blocks the forward product should have for a full wave on current GPUs (H100: 132 SMs
// x 6 resident tile blocks = 792; A100: 108 x 6 = 648).
constexpr int64_t kCovpoolTargetBlocks = 1024;

// Parts into which covpool_forward splits the sum over M when the upper tiles of the
// batch alone would leave the GPU partly idle (C = 128, B = 128: 384 blocks -> 3 parts),
// each part at least 4 slabs of 16 positions, at most 8 parts. The parts are added in
// fixed order afterwards, so results stay bitwise reproducible.
inline int64_t covpool_forward_splits(int64_t batch, int64_t c, int64_t m) {
  const int64_t tiles = (c + 63) / 64;
  const int64_t blocks = tiles * (tiles + 1) / 2 * (batch < 65535 ? batch : 65535);
  if (blocks <= 0 || blocks >= kCovpoolTargetBlocks) return 1;
  int64_t splits = (kCovpoolTargetBlocks + blocks - 1) / blocks;
  const int64_t by_depth = (m + 63) / 64;  // parts of at least 4 slabs
  if (splits > by_depth) splits = by_depth;
  if (splits > 8) splits = 8;
  return splits < 1 ? 1 : splits;
}

// Scratch of covpool_forward: Xc^T, X centred and transposed (batch * m * c), then the partial sums
// of the split (splits * batch * c * c) when it splits.
inline int64_t covpool_forward_workspace(int64_t batch, int64_t c, int64_t m) {
  const int64_t splits = covpool_forward_splits(batch, c, m);
  return batch * c * m + (splits > 1 ? splits * batch * c * c : 0);
}

// Scratch of covpool_backward: Xc, then G + G^T (batch * c * c).
inline int64_t covpool_backward_workspace(int64_t batch, int64_t c, int64_t m) {
  return batch * c * m + batch * c * c;
}

// out = S (batch, c, c). Requires m >= 1.
template <typename T>
cudaError_t covpool_forward(const T* x, T* out, T* work, int64_t batch, int64_t c, int64_t m,
                            cudaStream_t stream);

// dx (batch, c, m) from grad (batch, c, c) and x. Requires m >= 1.
template <typename T>
cudaError_t covpool_backward(const T* grad, const T* x, T* dx, T* work, int64_t batch, int64_t c,
                             int64_t m, cudaStream_t stream);

}  // namespace cuda
}  // namespace mpncov

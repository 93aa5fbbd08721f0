// covpool CUDA kernels (SPEC section 1).
#include "covpool_kernel.cuh"

#include "batched_gemm.cuh"
#include "common.cuh"

namespace mpncov {
namespace cuda {
namespace {

using gemm::kPerX;
using gemm::kPerY;
using gemm::kTile;
using gemm::Operand;
using gemm::Tiles;

constexpr int kWarpsPerBlock = kThreads / 32;

// mean[row] = (1/m) sum_k x[row, k] for rows_total rows of length m; one warp per row,
// fixed summation order (lane-strided partial sums, then a shuffle tree).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    row_mean_kernel(const T* __restrict__ x, T* __restrict__ mean, int64_t rows_total, int m) {
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
       row < rows_total; row += stride) {  // uniform within a warp
    const T* p = x + row * m;
    T s = T(0);
    for (int k = lane; k < m; k += 32) s += p[k];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
    if (lane == 0) mean[row] = s / static_cast<T>(m);
  }
}

// S = (1/m) Xc Xc^T for each sample. Only tiles on or above the diagonal are computed
// (blockIdx.x numbers them, see gemm::upper_tile); each S[i, j] with i <= j is written at
// (i, j) and (j, i), so S is exactly symmetric. blockIdx.y strides over the batch.
template <typename T>
__global__ void __launch_bounds__(gemm::kBlock)
    covpool_kernel(const T* __restrict__ x, const T* __restrict__ mean, T* __restrict__ out,
                   int c, int m, int64_t batch) {
  __shared__ Tiles<T> sm;
  int tr, tc;
  gemm::upper_tile(blockIdx.x, gemm::tiles_for(c), tr, tc);
  const int row0 = tr * kTile;
  const int col0 = tc * kTile;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    // Xc(i, k) = x[i, k] - mean[i]; P = Xc, Q = Xc^T (read as Xc).
    const Operand<T> xc{x + b * c * static_cast<int64_t>(m), mean + b * c, c, m, m, T(1)};
    T acc[kPerY][kPerX];
    gemm::zero(acc);
    gemm::accumulate<T, /*Q_TRANSPOSED=*/true>(acc, sm, xc, xc, m, row0, col0);
    T* o = out + b * c * static_cast<int64_t>(c);
#pragma unroll
    for (int r = 0; r < kPerY; ++r) {
      const int i = row0 + gemm::tile_row(r);
#pragma unroll
      for (int q = 0; q < kPerX; ++q) {
        const int j = col0 + gemm::tile_col(q);
        if (i < c && j < c && i <= j) {
          const T v = acc[r][q] / static_cast<T>(m);
          o[static_cast<int64_t>(i) * c + j] = v;
          o[static_cast<int64_t>(j) * c + i] = v;
        }
      }
    }
  }
}

// h = g + g^T per sample (exactly symmetric: fp addition commutes). total = batch * n * n.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sym_sum_kernel(const T* __restrict__ g, T* __restrict__ h, int n, int64_t total) {
  const int64_t nn = static_cast<int64_t>(n) * n;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const auto [b, i, j] = matrix_index(idx, n);
    h[idx] = g[idx] + g[b * nn + j * n + i];
  }
}

// dX = (1/m) H Xc with H = G + G^T (c x c) and Xc = X - mean (c x m). Full output:
// blockIdx.x numbers the tiles of the c x m result row by row.
template <typename T>
__global__ void __launch_bounds__(gemm::kBlock)
    covpool_backward_kernel(const T* __restrict__ h, const T* __restrict__ x,
                            const T* __restrict__ mean, T* __restrict__ dx, int c, int m,
                            int64_t batch) {
  __shared__ Tiles<T> sm;
  const int tiles_m = gemm::tiles_for(m);
  const int row0 = (blockIdx.x / tiles_m) * kTile;
  const int col0 = (blockIdx.x % tiles_m) * kTile;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const int64_t xoff = b * c * static_cast<int64_t>(m);
    const Operand<T> hp{h + b * c * static_cast<int64_t>(c), nullptr, c, c, c, T(1)};
    const Operand<T> xc{x + xoff, mean + b * c, c, m, m, T(1)};  // Xc(k, j), K = c rows
    T acc[kPerY][kPerX];
    gemm::zero(acc);
    gemm::accumulate<T, /*Q_TRANSPOSED=*/false>(acc, sm, hp, xc, c, row0, col0);
    T* o = dx + xoff;
#pragma unroll
    for (int r = 0; r < kPerY; ++r) {
      const int i = row0 + gemm::tile_row(r);
#pragma unroll
      for (int q = 0; q < kPerX; ++q) {
        const int j = col0 + gemm::tile_col(q);
        if (i < c && j < m) o[static_cast<int64_t>(i) * m + j] = acc[r][q] / static_cast<T>(m);
      }
    }
  }
}

template <typename T>
cudaError_t launch_row_mean(const T* x, T* mean, int64_t rows_total, int m, cudaStream_t stream) {
  int64_t blocks = (rows_total + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > kMaxElementwiseBlocks) blocks = kMaxElementwiseBlocks;
  row_mean_kernel<T><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(x, mean,
                                                                                 rows_total, m);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t covpool_forward(const T* x, T* out, T* work, int64_t batch, int64_t c, int64_t m,
                            cudaStream_t stream) {
  if (batch == 0 || c == 0) return cudaSuccess;
  if (batch < 0 || !fits_int(c) || !fits_int(m) || m < 1) return cudaErrorInvalidValue;
  const int64_t blocks = gemm::square_tile_blocks(c, /*upper=*/true);
  if (!fits_int(blocks)) return cudaErrorInvalidValue;
  T* mean = work;
  cudaError_t err = launch_row_mean(x, mean, batch * c, static_cast<int>(m), stream);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned int>(blocks), grid_y_for_batch(batch));
  covpool_kernel<T><<<grid, gemm::kBlock, 0, stream>>>(x, mean, out, static_cast<int>(c),
                                                       static_cast<int>(m), batch);
  return cudaGetLastError();
}

template <typename T>
cudaError_t covpool_backward(const T* grad, const T* x, T* dx, T* work, int64_t batch, int64_t c,
                             int64_t m, cudaStream_t stream) {
  if (batch == 0 || c == 0) return cudaSuccess;
  if (batch < 0 || !fits_int(c) || !fits_int(m) || m < 1) return cudaErrorInvalidValue;
  const int64_t blocks = static_cast<int64_t>(gemm::tiles_for(static_cast<int>(c))) *
                         gemm::tiles_for(static_cast<int>(m));
  if (!fits_int(blocks)) return cudaErrorInvalidValue;
  T* mean = work;
  T* h = work + batch * c;
  cudaError_t err = launch_row_mean(x, mean, batch * c, static_cast<int>(m), stream);
  if (err != cudaSuccess) return err;
  const int64_t total = batch * c * c;
  sym_sum_kernel<T><<<elementwise_blocks(total), kThreads, 0, stream>>>(
      grad, h, static_cast<int>(c), total);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned int>(blocks), grid_y_for_batch(batch));
  covpool_backward_kernel<T><<<grid, gemm::kBlock, 0, stream>>>(
      h, x, mean, dx, static_cast<int>(c), static_cast<int>(m), batch);
  return cudaGetLastError();
}

template cudaError_t covpool_forward<float>(const float*, float*, float*, int64_t, int64_t,
                                            int64_t, cudaStream_t);
template cudaError_t covpool_forward<double>(const double*, double*, double*, int64_t, int64_t,
                                             int64_t, cudaStream_t);
template cudaError_t covpool_backward<float>(const float*, const float*, float*, float*, int64_t,
                                             int64_t, int64_t, cudaStream_t);
template cudaError_t covpool_backward<double>(const double*, const double*, double*, double*,
                                              int64_t, int64_t, int64_t, cudaStream_t);

}  // namespace cuda
}  // namespace mpncov

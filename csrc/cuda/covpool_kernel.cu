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

constexpr int kWarpsPerBlock = kThreads / 32;

// xc[row, :] = x[row, :] - mean of x[row, :] for rows_total rows of length m; one warp
// per row, fixed summation order (lane-strided partial sums, then a shuffle tree). The
// product kernels then read Xc like any other operand (centring while staging cost more
// registers than the 12-warps-per-SM budget of the tile kernels has).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    centre_kernel(const T* __restrict__ x, T* __restrict__ xc, int64_t rows_total, int m) {
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
       row < rows_total; row += stride) {  // uniform within a warp
    const T* p = x + row * m;
    T s = T(0);
    for (int k = lane; k < m; k += 32) s += p[k];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
    const T mean = __shfl_sync(0xffffffffu, s, 0) / static_cast<T>(m);
    T* q = xc + row * m;
    for (int k = lane; k < m; k += 32) q[k] = p[k] - mean;
  }
}

// S = (1/m) Xc Xc^T for each sample. Only tiles on or above the diagonal are computed
// (blockIdx.x numbers them, see gemm::upper_tile); each S[i, j] with i <= j is written at
// (i, j) and (j, i), so S is exactly symmetric. blockIdx.y strides over the batch.
// Both operands are Xc read along its rows (k_contig).
template <typename T>
__global__ void __launch_bounds__(gemm::kBlock, sizeof(T) == 4 ? gemm::kMinBlocksFloat : 1)
    covpool_kernel(const T* __restrict__ xc, T* __restrict__ out, int c, int m, int64_t batch,
                   bool vec) {
  __shared__ gemm::Smem<T> sm;
  int tr, tc;
  gemm::upper_tile(blockIdx.x, gemm::tiles_for(c), tr, tc);
  const int row0 = tr * kTile;
  const int col0 = tc * kTile;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const gemm::Operand<T> xcb =
        gemm::operand(xc + b * c * static_cast<int64_t>(m), m, c, m, /*k_contig=*/true);
    gemm::Terms<T> terms;
    terms.p[0] = terms.p[1] = terms.q[0] = terms.q[1] = xcb;
    terms.k[0] = terms.k[1] = m;
    terms.count = 1;
    T acc[kPerY][kPerX];
    gemm::accumulate(acc, sm, terms, row0, col0);
    T* o = out + b * c * static_cast<int64_t>(c);
    gemm::epilogue(sm, acc, row0, col0, /*mirror=*/true, [&](int i, int j, T(&v)[4], bool mirrored) {
      if (i >= c) return;
      bool keep[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        keep[e] = j + e < c && (mirrored ? i > j + e : i <= j + e);
        v[e] = v[e] / static_cast<T>(m);
      }
      gemm::store_masked(o + static_cast<int64_t>(i) * c + j, v, keep, vec);
    });
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

// dX = (1/m) H Xc with H = G + G^T (c x c, exactly symmetric: read as H^T, vectors
// along the tile) and Xc = X - mean (c x m). Full output: blockIdx.x numbers the tiles of
// the c x m result row by row.
template <typename T>
__global__ void __launch_bounds__(gemm::kBlock, sizeof(T) == 4 ? gemm::kMinBlocksFloat : 1)
    covpool_backward_kernel(const T* __restrict__ h, const T* __restrict__ xc,
                            T* __restrict__ dx, int c, int m, int64_t batch, bool vec) {
  __shared__ gemm::Smem<T> sm;
  const int tiles_m = gemm::tiles_for(m);
  const int row0 = (blockIdx.x / tiles_m) * kTile;
  const int col0 = (blockIdx.x % tiles_m) * kTile;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const int64_t xoff = b * c * static_cast<int64_t>(m);
    gemm::Terms<T> terms;
    terms.p[0] = terms.p[1] =
        gemm::operand(h + b * c * static_cast<int64_t>(c), c, c, c, /*k_contig=*/false);
    terms.q[0] = terms.q[1] = gemm::operand(xc + xoff, m, c, m, /*k_contig=*/false);
    terms.k[0] = terms.k[1] = c;
    terms.count = 1;
    T acc[kPerY][kPerX];
    gemm::accumulate(acc, sm, terms, row0, col0);
    T* o = dx + xoff;
    gemm::epilogue(sm, acc, row0, col0, /*mirror=*/false, [&](int i, int j, T(&v)[4], bool) {
      if (i >= c) return;
      bool keep[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        keep[e] = j + e < m;
        v[e] = v[e] / static_cast<T>(m);
      }
      gemm::store_masked(o + static_cast<int64_t>(i) * m + j, v, keep, vec);
    });
  }
}

template <typename T>
cudaError_t launch_centre(const T* x, T* xc, int64_t rows_total, int m, cudaStream_t stream) {
  int64_t blocks = (rows_total + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > kMaxElementwiseBlocks) blocks = kMaxElementwiseBlocks;
  centre_kernel<T><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(x, xc,
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
  T* xc = work;
  cudaError_t err = launch_centre(x, xc, batch * c, static_cast<int>(m), stream);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned int>(blocks), grid_y_for_batch(batch));
  const bool vec = c % gemm::kVec == 0 && gemm::aligned16(out);
  covpool_kernel<T><<<grid, gemm::kBlock, 0, stream>>>(xc, out, static_cast<int>(c),
                                                       static_cast<int>(m), batch, vec);
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
  T* xc = work;
  T* h = work + batch * c * m;
  cudaError_t err = launch_centre(x, xc, batch * c, static_cast<int>(m), stream);
  if (err != cudaSuccess) return err;
  const int64_t total = batch * c * c;
  sym_sum_kernel<T><<<elementwise_blocks(total), kThreads, 0, stream>>>(
      grad, h, static_cast<int>(c), total);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned int>(blocks), grid_y_for_batch(batch));
  const bool vec = m % gemm::kVec == 0 && gemm::aligned16(dx);
  covpool_backward_kernel<T><<<grid, gemm::kBlock, 0, stream>>>(
      h, xc, dx, static_cast<int>(c), static_cast<int>(m), batch, vec);
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

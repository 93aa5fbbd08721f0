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

// xct[b][k][i] = x[b][i][k] - mean of x[b][i][:]: Xc transposed (m x c per sample), so
// that both operands of the forward product (Xc and Xc^T) are read with their vectors
// along the tile and copied asynchronously (no registers held for a transpose). One block
// per (32 channels, sample): each warp reduces 4 rows (fixed order), then 32 x 32 tiles
// go through shared memory, read along m and written along c (both coalesced).
constexpr int kCentreRows = 32;
template <typename T>
__global__ void __launch_bounds__(kThreads)
    centre_transposed_kernel(const T* __restrict__ x, T* __restrict__ xct, int c, int m,
                             int64_t batch) {
  __shared__ T mean[kCentreRows];
  __shared__ T tile[kCentreRows][kCentreRows + 1];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int i0 = blockIdx.x * kCentreRows;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const T* xb = x + b * c * static_cast<int64_t>(m);
    T* ob = xct + b * c * static_cast<int64_t>(m);
    for (int r = warp; r < kCentreRows; r += kWarpsPerBlock) {  // uniform within a warp
      const int i = i0 + r;
      T s = T(0);
      if (i < c)
        for (int k = lane; k < m; k += 32) s += xb[static_cast<int64_t>(i) * m + k];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
      if (lane == 0) mean[r] = s / static_cast<T>(m);
    }
    __syncthreads();
    for (int k0 = 0; k0 < m; k0 += kCentreRows) {
      for (int r = warp; r < kCentreRows; r += kWarpsPerBlock) {
        const int i = i0 + r, k = k0 + lane;
        tile[r][lane] = (i < c && k < m) ? xb[static_cast<int64_t>(i) * m + k] - mean[r] : T(0);
      }
      __syncthreads();
      for (int r = warp; r < kCentreRows; r += kWarpsPerBlock) {
        const int k = k0 + r, i = i0 + lane;
        if (k < m && i < c) ob[static_cast<int64_t>(k) * c + i] = tile[lane][r];
      }
      __syncthreads();
    }
  }
}

// S = (1/m) Xc Xc^T for each sample. Only tiles on or above the diagonal are computed
// (see gemm::upper_tile); each S[i, j] with i <= j is written at (i, j) and (j, i), so S
// is exactly symmetric. blockIdx.y strides over the batch. Both operands are read from
// Xc^T (xct, m x c): P(i, k) = Xc^T(k, i), Q(k, j) = Xc^T(k, j), vectors along the tile.
// With splits > 1, blockIdx.x = tile * splits + part and the
// block sums positions [part * kper, (part + 1) * kper) only, writing the unscaled
// partial sum into out + part * batch * c * c (added up by covpool_sum_parts_kernel).
template <typename T>
__global__ void __launch_bounds__(gemm::kBlock, sizeof(T) == 4 ? gemm::kMinBlocksFloat : 1)
    covpool_kernel(const T* __restrict__ xct, T* __restrict__ out, int c, int m, int64_t batch,
                   int splits, int kper, bool vec) {
  __shared__ gemm::Smem<T> sm;
  const int part = static_cast<int>(blockIdx.x) % splits;
  int tr, tc;
  gemm::upper_tile(static_cast<int>(blockIdx.x) / splits, gemm::tiles_for(c), tr, tc);
  const int row0 = tr * kTile;
  const int col0 = tc * kTile;
  const int k0 = part * kper;
  const int kn = splits > 1 ? (m - k0 < kper ? m - k0 : kper) : m;
  const T scale = splits > 1 ? T(1) : static_cast<T>(m);  // divide by m unless partial
  T* dst = out + static_cast<int64_t>(part) * batch * c * c;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const gemm::Operand<T> xcb = gemm::operand(
        xct + b * c * static_cast<int64_t>(m) + static_cast<int64_t>(k0) * c, c, kn, c,
        /*k_contig=*/false);
    gemm::Terms<T> terms;
    terms.p[0] = terms.p[1] = terms.q[0] = terms.q[1] = xcb;
    terms.k[0] = terms.k[1] = kn;
    terms.count = 1;
    T acc[kPerY][kPerX];
    gemm::accumulate<T, /*kTwoTerms=*/false>(acc, sm, terms, row0, col0);
    T* o = dst + b * c * static_cast<int64_t>(c);
    gemm::epilogue(sm, acc, row0, col0, /*mirror=*/true, [&](int i, int j, T(&v)[4], bool mirrored) {
      if (i >= c) return;
      bool keep[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        keep[e] = j + e < c && (mirrored ? i > j + e : i <= j + e);
        v[e] = v[e] / scale;
      }
      gemm::store_masked(o + static_cast<int64_t>(i) * c + j, v, keep, vec);
    });
  }
}

// out = (1/m) sum_p part_p, p in increasing order (total = batch * c * c elements).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    covpool_sum_parts_kernel(const T* __restrict__ parts, T* __restrict__ out, int splits,
                             int m, int64_t total) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    T v = parts[idx];
    for (int p = 1; p < splits; ++p) v += parts[p * total + idx];
    out[idx] = v / static_cast<T>(m);
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
    gemm::accumulate<T, /*kTwoTerms=*/false>(acc, sm, terms, row0, col0);
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
  if (!fits_int(blocks * 8)) return cudaErrorInvalidValue;
  T* xct = work;
  centre_transposed_kernel<T><<<dim3(static_cast<unsigned int>((c + kCentreRows - 1) / kCentreRows),
                                     grid_y_for_batch(batch)),
                                kThreads, 0, stream>>>(x, xct, static_cast<int>(c),
                                                       static_cast<int>(m), batch);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  // Parts of whole slabs: kper is a multiple of 16, every part but the last is full, and
  // rounding kper up may leave fewer (non-empty) parts than covpool_forward_splits.
  const int slabs = static_cast<int>((m + gemm::kSlab - 1) / gemm::kSlab);
  const int per = static_cast<int>((slabs + covpool_forward_splits(batch, c, m) - 1) /
                                   covpool_forward_splits(batch, c, m));
  const int splits = (slabs + per - 1) / per;
  const int kper = per * gemm::kSlab;
  T* dst = splits > 1 ? work + batch * c * m : out;
  const dim3 grid(static_cast<unsigned int>(blocks * splits), grid_y_for_batch(batch));
  const bool vec = c % gemm::kVec == 0 && gemm::aligned16(dst);
  covpool_kernel<T><<<grid, gemm::kBlock, 0, stream>>>(xct, dst, static_cast<int>(c),
                                                       static_cast<int>(m), batch, splits, kper,
                                                       vec);
  err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1) return err;
  const int64_t total = batch * c * c;
  covpool_sum_parts_kernel<T><<<elementwise_blocks(total), kThreads, 0, stream>>>(
      dst, out, splits, static_cast<int>(m), total);
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

// sqrtm for n <= 128 with one block per sample and the iterates in shared memory (see
// sqrtm_on_chip.cuh for the contract and sqrtm_kernel.cu for the recurrences).
//
// Work split: every product has a symmetric result, so only the cells of an upper-triangle
// cover are computed, one cell per thread: a cell is kRows x kCols outputs (float 8 x 8,
// double 4 x 8) at rows kRows r .., columns kCols c .., for the cells that reach the upper
// triangle (kCols c + kCols - 1 >= kRows r); at n = 128, float: 136 cells of 8 x 8 (8,704
// outputs for the 8,256 of the triangle), 160 threads. A cell's outputs with i <= j are
// stored at (i, j) and (j, i). Operands are symmetric too, so P(i, k) = P(k, i): a thread
// reads row k of P at its kRows rows and row k of Q at its kCols columns, as 16-byte
// vectors, and does kRows x kCols FMAs per k (the product core's pattern, from shared
// memory that holds the whole matrices instead of slabs).
//
// Shared memory: three n x p matrices (p = n rounded up to 8; columns n .. p - 1 are
// padding that only feeds outputs never stored). Results of a product are kept in
// registers until every thread has finished reading its operands (a barrier), then
// written over an operand that is no longer needed; each saved iterate is then copied to
// global memory with coalesced stores.
//   forward:  buffers Y, Z, T. Raw S goes into T, A into Y, T0 = Z1 into Z; Y1 = A T0
//             replaces A; then per step T_k (into T), Y_(k+1) (over Y), Z_(k+1) (over Z).
//   backward: buffers dY, dZ, dT. A (from raw S in dZ) into dY, E from raw G in dZ into
//             dT; dY1 over A, dZ1 = -0.5 E into dZ; per step dT, dY', dZ' with the saved
//             Y_k, Z_k, T_k streamed from global memory through two slabs of kOnChipSlab
//             rows (cp.async, double-buffered) by all threads of the block.
// The trace is summed in the order of the tiled path's prep kernel and every product in
// the order of the tiled product kernel, so both paths give the same bits (up to the
// compiler's FMA contraction); <G, Y> and <dS, A> are fixed-order block sums of their own.
#include "sqrtm_on_chip.cuh"

#include <atomic>

#include "async_copy.cuh"
#include "batched_gemm.cuh"
#include "common.cuh"

namespace mpncov {
namespace cuda {
namespace {

// Outputs per thread: kRows x kCols (double: half the rows, so that the accumulators fit
// in registers).
template <typename T>
struct CellShape {
  static constexpr int kRows = sizeof(T) == 4 ? 8 : 4;
  static constexpr int kCols = 8;
};

// Cells covering the upper triangle of an n x n matrix, numbered row by row.
template <int R, int C>
__host__ __device__ inline int upper_cells(int n) {
  const int nr = (n + R - 1) / R, nc = (n + C - 1) / C;
  int count = 0;
  for (int r = 0; r < nr; ++r) count += nc - (R * r) / C;
  return count;
}
// Cell number idx -> (r, c); false if idx is past the last cell.
template <int R, int C>
__device__ inline bool cell_of(int idx, int n, int& r, int& c) {
  const int nr = (n + R - 1) / R, nc = (n + C - 1) / C;
  for (r = 0; r < nr; ++r) {
    const int first = (R * r) / C;  // the column block holding the diagonal element (R r, R r)
    if (idx < nc - first) {
      c = first + idx;
      return true;
    }
    idx -= nc - first;
  }
  r = c = 0;
  return false;
}

// Threads of the on-chip kernels: one per cell, whole warps.
template <typename T>
int on_chip_threads(int n) {
  const int cells = upper_cells<CellShape<T>::kRows, CellShape<T>::kCols>(n);
  return (cells + 31) / 32 * 32;
}
// The most threads any n <= kOnChipMaxN needs (float 160, double 288).
template <typename T>
constexpr int kMaxOnChipThreads = sizeof(T) == 4 ? 160 : 288;

// v[0..N) = p[0..N), p 16-byte aligned.
template <int N, typename T>
__device__ __forceinline__ void load_segment(const T* p, T (&v)[N]) {
#pragma unroll
  for (int q = 0; q < N / gemm::kVec; ++q) {
    T w[4];
    gemm::load4(p + q * gemm::kVec, w);
#pragma unroll
    for (int e = 0; e < 4; ++e) v[q * gemm::kVec + e] = w[e];
  }
}

// An operand of a product: resident in shared memory (row k at smem + k * pitch) or, when
// `global` is set, a saved iterate streamed from global memory (n x n, row-major).
template <typename T>
struct Source {
  const T* smem;
  const T* global;
};
template <typename T>
__device__ __forceinline__ Source<T> resident(const T* p) {
  return Source<T>{p, nullptr};
}
template <typename T>
__device__ __forceinline__ Source<T> streamed(const T* p) {
  return Source<T>{nullptr, p};
}

// What one thread of the block works on.
template <typename T>
struct Ctx {
  int n, pitch;
  bool has_cell;
  int x0, y0;       // first row and column of the thread's cell
  T* stage[2];      // two slabs of kOnChipSlab rows (backward only)
};

// acc[r][c] += P(k, x0 + r) Q(k, y0 + c) for k in [k_begin, k_end), P rows at prow + k'
// pitch, Q rows at qrow + k' pitch (k' counted from the pointers' first row).
template <typename T, int R, int C>
__device__ __forceinline__ void multiply_rows(T (&acc)[R][C], const T* prow, const T* qrow,
                                              int rows, int pitch) {
  // Unrolled so that the loop's address and counter updates are few per FMA (float: 4 k of
  // 64 FMAs; double: its 32 accumulators are 64 registers, 2 k).
  constexpr int kUnroll = sizeof(T) == 4 ? 4 : 2;
#pragma unroll kUnroll
  for (int k = 0; k < rows; ++k) {
    T a[R], b[C];
    load_segment(prow + static_cast<int64_t>(k) * pitch, a);
    load_segment(qrow + static_cast<int64_t>(k) * pitch, b);
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int c = 0; c < C; ++c) acc[r][c] += a[r] * b[c];
  }
}

// Starts copying rows [k0, k0 + kOnChipSlab) (those < n) of the n x n matrix g into the
// slab dst (pitch p): cp.async 16-byte copies when the rows allow them, else plain loads
// and stores (visible after the barrier that follows the wait). Every thread commits one
// group.
template <typename T>
__device__ __forceinline__ void copy_slab(T* dst, const T* g, int k0, const Ctx<T>& cx) {
  const int n = cx.n;
  const int rows = (n - k0 < kOnChipSlab ? n - k0 : kOnChipSlab);
  constexpr int kPer16 = 16 / sizeof(T);
  if (n % kPer16 == 0 && gemm::aligned16(g)) {
    const int chunks = n / kPer16;
    for (int e = threadIdx.x; e < rows * chunks; e += blockDim.x) {
      const int r = e / chunks, q = (e - r * chunks) * kPer16;
      async_copy::copy16(dst + r * cx.pitch + q, g + static_cast<int64_t>(k0 + r) * n + q);
    }
  } else {
    for (int e = threadIdx.x; e < rows * n; e += blockDim.x) {
      const int r = e / n, q = e - r * n;
      dst[r * cx.pitch + q] = g[static_cast<int64_t>(k0 + r) * n + q];
    }
  }
  async_copy::commit();
}

// acc += sum over k < n of P(x0 + r, k) Q(k, y0 + c) for one term (P, Q symmetric, so
// P(x, k) = P(k, x)). A streamed operand goes through the slabs, which every thread of the
// block helps to fill (so all threads call this, with or without a cell).
template <typename T, int R, int C>
__device__ __forceinline__ void accumulate_term(T (&acc)[R][C], Source<T> p, Source<T> q,
                                                const Ctx<T>& cx) {
  const int n = cx.n, pitch = cx.pitch;
  const T* g = p.global != nullptr ? p.global : q.global;
  if (g == nullptr) {
    if (cx.has_cell) multiply_rows(acc, p.smem + cx.x0, q.smem + cx.y0, n, pitch);
    return;
  }
  const int slabs = (n + kOnChipSlab - 1) / kOnChipSlab;
  copy_slab(cx.stage[0], g, 0, cx);
  for (int s = 0; s < slabs; ++s) {
    const int k0 = s * kOnChipSlab;
    if (s + 1 < slabs) {
      copy_slab((s & 1) ? cx.stage[0] : cx.stage[1], g, k0 + kOnChipSlab, cx);
      async_copy::wait<1>();
    } else {
      async_copy::wait<0>();
    }
    __syncthreads();  // slab s is in (every thread's copies), slab s + 1 may be in flight
    if (cx.has_cell) {
      const T* slab = (s & 1) ? cx.stage[1] : cx.stage[0];  // no run-time index: no stack
      const T* prow = p.global != nullptr ? slab : p.smem + static_cast<int64_t>(k0) * pitch;
      const T* qrow = q.global != nullptr ? slab : q.smem + static_cast<int64_t>(k0) * pitch;
      const int rows = n - k0 < kOnChipSlab ? n - k0 : kOnChipSlab;
      multiply_rows(acc, prow + cx.x0, qrow + cx.y0, rows, pitch);
    }
    __syncthreads();  // the slab is free for slab s + 2
  }
}

// acc = P1 Q1 [+ P2 Q2], k increasing, term by term (the tiled product kernel's order).
template <typename T, int R, int C>
__device__ __forceinline__ void product(T (&acc)[R][C], const Ctx<T>& cx, Source<T> p1,
                                        Source<T> q1) {
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < C; ++c) acc[r][c] = T(0);
  accumulate_term(acc, p1, q1, cx);
}
template <typename T, int R, int C>
__device__ __forceinline__ void product(T (&acc)[R][C], const Ctx<T>& cx, Source<T> p1,
                                        Source<T> q1, Source<T> p2, Source<T> q2) {
  product(acc, cx, p1, q1);
  accumulate_term(acc, p2, q2, cx);
}

// Stores the thread's cell into the symmetric shared matrix dst: value f(i, j, acc) at
// (i, j) and (j, i) for i <= j < n. f is the tiled epilogue: alpha acc [+ beta R] + gamma I.
template <typename T, int R, int C, typename F>
__device__ __forceinline__ void store_cell(T* dst, const T (&acc)[R][C], const Ctx<T>& cx,
                                           F&& f) {
  if (!cx.has_cell) return;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = cx.x0 + r;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int j = cx.y0 + c;
      if (i < cx.n && j < cx.n && i <= j) {
        const T v = f(i, j, acc[r][c]);
        dst[i * cx.pitch + j] = v;
        dst[j * cx.pitch + i] = v;
      }
    }
  }
}

// The epilogue alpha v + gamma [i == j] of the tiled product kernel (same operations in
// the same order: gamma is added on the diagonal even when it is 0).
template <typename T>
struct Affine {
  T alpha, gamma;
  __device__ T operator()(int i, int j, T v) const {
    v *= alpha;
    if (i == j) v += gamma;
    return v;
  }
};

// dst (n x n in global memory) = src (shared, pitch p), coalesced.
template <typename T>
__device__ __forceinline__ void copy_out(T* dst, const T* src, const Ctx<T>& cx) {
  const int n = cx.n;
  for (int e = threadIdx.x; e < n * n; e += blockDim.x) {
    const int i = e / n, j = e - i * n;
    dst[e] = src[i * cx.pitch + j];
  }
}

// dst (shared, pitch p) = the n x n matrix src of global memory, coalesced.
template <typename T>
__device__ __forceinline__ void copy_in(T* dst, const T* src, const Ctx<T>& cx) {
  const int n = cx.n;
  for (int e = threadIdx.x; e < n * n; e += blockDim.x) {
    const int i = e / n, j = e - i * n;
    dst[i * cx.pitch + j] = src[e];
  }
}

// tr(S) added up in the order of block_sum over the prep kernel's kPrepThreads = 256
// threads with diagonal element i on thread i (n <= 256), so that both paths divide by the
// same t: eight virtual warps, shared among the block's warps, then a tree over them.
// scratch holds >= 33 values.
constexpr int kPrepVirtualWarps = 256 / 32;
template <typename T>
__device__ T trace_in_prep_order(const T* sb, int n, T* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  __syncthreads();  // scratch may still be read
  for (int w = warp; w < kPrepVirtualWarps; w += nwarps) {  // uniform within a warp
    const int i = 32 * w + lane;
    T v = T(0);
    if (i < n) v += sb[static_cast<int64_t>(i) * (n + 1)];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) scratch[w] = v;
  }
  __syncthreads();
  if (warp == 0) {
    T v = lane < kPrepVirtualWarps ? scratch[lane] : T(0);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) scratch[32] = v;
  }
  __syncthreads();
  return scratch[32];
}

// The block's context: cell and shared buffers (three matrices, then the slabs).
template <typename T>
__device__ Ctx<T> make_ctx(int n, unsigned char* smem, T*& m0, T*& m1, T*& m2) {
  constexpr int R = CellShape<T>::kRows, C = CellShape<T>::kCols;
  Ctx<T> cx;
  cx.n = n;
  cx.pitch = static_cast<int>(sqrtm_on_chip_pitch(n));
  int r, c;
  cx.has_cell = cell_of<R, C>(threadIdx.x, n, r, c);
  cx.x0 = R * r;
  cx.y0 = C * c;
  const int64_t mat = static_cast<int64_t>(n) * cx.pitch;
  m0 = reinterpret_cast<T*>(smem);
  m1 = m0 + mat;
  m2 = m1 + mat;
  cx.stage[0] = m2 + mat;
  cx.stage[1] = cx.stage[0] + kOnChipSlab * cx.pitch;
  return cx;
}

// Forward (see the top of this file and sqrtm_kernel.cu's sqrtm_forward): saved =
// [Y_1..Y_(N-1), Z_1..Z_(N-1), T_1..T_(N-1), Y_N], out = sqrt(t) Y_N.
template <typename T>
__global__ void __launch_bounds__(kMaxOnChipThreads<T>)
    on_chip_forward_kernel(const T* __restrict__ s, T* __restrict__ out, T* __restrict__ saved,
                           int n, int iters, int64_t batch) {
  constexpr int R = CellShape<T>::kRows, C = CellShape<T>::kCols;
  MPNCOV_DYNAMIC_SHARED(smem);
  __shared__ T scratch[33];
  T *y, *z, *tk;
  const Ctx<T> cx = make_ctx<T>(n, smem, y, z, tk);
  const int N = iters;
  const int64_t nn = static_cast<int64_t>(n) * n;
  const int p = cx.pitch;
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    const T* sb = s + b * nn;
    T* vb = saved + b * (3 * (N - 1) + 1) * nn;
    auto slot = [&](int i) { return vb + i * nn; };  // Y_k = k-1, Z_k = N-2+k, T_k = 2N-3+k
    const T t = trace_in_prep_order(sb, n, scratch);
    const T tt = safe_trace(t);
    const T root = dev_sqrt(tt);
    // A = sym(S) / t (over Y), T0 = 0.5 (3I - A) (Z_1, in Z), from raw S (in T).
    copy_in(tk, sb, cx);
    __syncthreads();
    for (int e = threadIdx.x; e < n * n; e += blockDim.x) {
      const int i = e / n, j = e - i * n;
      const T av = sym_value(tk[i * p + j], tk[j * p + i]) / tt;
      y[i * p + j] = av;
      z[i * p + j] = T(0.5) * ((i == j ? T(3) : T(0)) - av);
    }
    __syncthreads();
    if (N >= 2) copy_out(slot(N - 1), z, cx);
    T acc[R][C];
    // Y_1 = A T0 (the final Y when N = 1).
    product(acc, cx, resident<T>(y), resident<T>(z));
    __syncthreads();
    store_cell(y, acc, cx, Affine<T>{T(1), T(0)});
    __syncthreads();
    copy_out(slot(0), y, cx);  // Y_1, or Y_N (slot 3(N-1) = 0) when N = 1
    for (int k = 1; k <= N - 1; ++k) {
      // T_k = 1.5 I - 0.5 Z_k Y_k
      product(acc, cx, resident<T>(z), resident<T>(y));
      store_cell(tk, acc, cx, Affine<T>{T(-0.5), T(1.5)});  // nobody reads T now
      __syncthreads();
      copy_out(slot(2 * N - 3 + k), tk, cx);
      // Y_(k+1) = Y_k T_k (the final Y at k = N-1)
      product(acc, cx, resident<T>(y), resident<T>(tk));
      __syncthreads();
      store_cell(y, acc, cx, Affine<T>{T(1), T(0)});
      if (k == N - 1) break;
      // Z_(k+1) = T_k Z_k
      product(acc, cx, resident<T>(tk), resident<T>(z));
      __syncthreads();
      store_cell(z, acc, cx, Affine<T>{T(1), T(0)});
      __syncthreads();
      copy_out(slot(k), y, cx);
      copy_out(slot(N - 2 + k + 1), z, cx);
    }
    if (N >= 2) __syncthreads();  // the final Y is stored
    // Y_N into saved, out = sqrt(t) Y_N (N = 1: Y_1 was written above as slot 0).
    T* ob = out + b * nn;
    T* yf = slot(3 * (N - 1));
    for (int e = threadIdx.x; e < n * n; e += blockDim.x) {
      const int i = e / n, j = e - i * n;
      const T v = y[i * p + j];
      if (N >= 2) yf[e] = v;
      ob[e] = root * v;
    }
    __syncthreads();  // the buffers are reused by the next sample
  }
}

// Backward (forward-mode along E = sqrt(t) sym(G), see sqrtm_kernel.cu's sqrtm_backward):
//   dY1 = 1.5 E - 0.5 (E A + A E),  dZ1 = -0.5 E
//   dT = -0.5 (dZ Y_k + Z_k dY);  dY' = dY T_k + Y_k dT;  dZ' = dT Z_k + T_k dZ
//   dS = dY_N / t + (<G, Y_N> / (2 sqrt t) - <dS, A>) I   (t != 0; dS = 0 where t = 0)
template <typename T>
__global__ void __launch_bounds__(kMaxOnChipThreads<T>)
    on_chip_backward_kernel(const T* __restrict__ grad, const T* __restrict__ s,
                            const T* __restrict__ saved, T* __restrict__ grad_s, int n, int iters,
                            int64_t batch) {
  constexpr int R = CellShape<T>::kRows, C = CellShape<T>::kCols;
  MPNCOV_DYNAMIC_SHARED(smem);
  __shared__ T scratch[33];
  T *dy, *dz, *dt;
  const Ctx<T> cx = make_ctx<T>(n, smem, dy, dz, dt);
  const int N = iters;
  const int64_t nn = static_cast<int64_t>(n) * n;
  const int p = cx.pitch;
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    const T* sb = s + b * nn;
    const T* gb = grad + b * nn;
    const T* vb = saved + b * (3 * (N - 1) + 1) * nn;
    auto Y = [&](int k) { return vb + (k - 1) * nn; };
    auto Z = [&](int k) { return vb + (N - 2 + k) * nn; };
    auto Tm = [&](int k) { return vb + (2 * N - 3 + k) * nn; };
    const T* yf = vb + 3 * (N - 1) * nn;
    const T tb = trace_in_prep_order(sb, n, scratch);
    const T tt = safe_trace(tb);
    const T root = dev_sqrt(tt);
    // A = sym(S) / t into dY (raw S in dZ); E = sqrt(t) sym(G) into dT (raw G in dZ); the
    // thread's part of <G, Y_N> on the way.
    copy_in(dz, sb, cx);
    __syncthreads();
    for (int e = threadIdx.x; e < n * n; e += blockDim.x) {
      const int i = e / n, j = e - i * n;
      dy[i * p + j] = sym_value(dz[i * p + j], dz[j * p + i]) / tt;
    }
    __syncthreads();
    T gy = T(0);
    for (int e = threadIdx.x; e < n * n; e += blockDim.x) {
      const int i = e / n, j = e - i * n;
      dz[i * p + j] = gb[e];
      gy += gb[e] * yf[e];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < n * n; e += blockDim.x) {
      const int i = e / n, j = e - i * n;
      dt[i * p + j] = root * sym_value(dz[i * p + j], dz[j * p + i]);
    }
    __syncthreads();
    T acc[R][C];
    // dY1 = 1.5 E - 0.5 (E A + A E)
    product(acc, cx, resident<T>(dt), resident<T>(dy), resident<T>(dy), resident<T>(dt));
    __syncthreads();
    // The epilogue of the last product: dS = dA / t (0 where t = 0), into dY.
    auto over_trace = [&](T v) { return tb == T(0) ? T(0) : v / tb; };
    const T* e_mat = dt;
    auto dy1 = [&](int i, int j, T v) {
      v *= T(-0.5);
      v += T(1.5) * e_mat[i * p + j];
      if (i == j) v += T(0);
      return v;
    };
    if (N == 1) {
      store_cell(dy, acc, cx, [&](int i, int j, T v) { return over_trace(dy1(i, j, v)); });
    } else {
      store_cell(dy, acc, cx, dy1);
      for (int e = threadIdx.x; e < n * n; e += blockDim.x) {
        const int i = e / n, j = e - i * n;
        dz[i * p + j] = T(-0.5) * e_mat[i * p + j];
      }
    }
    __syncthreads();
    for (int k = 1; k <= N - 1; ++k) {
      // dT = -0.5 (dZ Y_k + Z_k dY)
      product(acc, cx, resident<T>(dz), streamed<T>(Y(k)), streamed<T>(Z(k)), resident<T>(dy));
      store_cell(dt, acc, cx, Affine<T>{T(-0.5), T(0)});  // nobody reads dT now
      __syncthreads();
      // dY' = dY T_k + Y_k dT (dA at k = N-1: stored as dS = dA / t)
      product(acc, cx, resident<T>(dy), streamed<T>(Tm(k)), streamed<T>(Y(k)), resident<T>(dt));
      __syncthreads();
      if (k == N - 1) {
        store_cell(dy, acc, cx, [&](int i, int j, T v) { return over_trace(v); });
        break;
      }
      store_cell(dy, acc, cx, Affine<T>{T(1), T(0)});
      // dZ' = dT Z_k + T_k dZ
      product(acc, cx, resident<T>(dt), streamed<T>(Z(k)), streamed<T>(Tm(k)), resident<T>(dz));
      __syncthreads();
      store_cell(dz, acc, cx, Affine<T>{T(1), T(0)});
      __syncthreads();
    }
    __syncthreads();  // dS = dA / t is in dY
    // <dS, A> with A again from raw S (in dZ), then the diagonal term, written out with dS.
    copy_in(dz, sb, cx);
    __syncthreads();
    T ad = T(0);
    for (int e = threadIdx.x; e < n * n; e += blockDim.x) {
      const int i = e / n, j = e - i * n;
      ad += dy[i * p + j] * (sym_value(dz[i * p + j], dz[j * p + i]) / tt);
    }
    const T gdot = block_sum(gy, scratch);
    const T adot = block_sum(ad, scratch);
    T* ob = grad_s + b * nn;
    const bool diag = tb != T(0);
    const T dd = diag ? gdot / (T(2) * dev_sqrt(tb)) - adot : T(0);
    for (int e = threadIdx.x; e < n * n; e += blockDim.x) {
      const int i = e / n, j = e - i * n;
      T v = dy[i * p + j];
      if (diag && i == j) v += dd;
      ob[e] = v;
    }
    __syncthreads();  // the buffers are reused by the next sample
  }
}

// Opt-in dynamic shared memory set per kernel and device (cudaFuncSetAttribute is a host
// call, not a stream operation; done once per size increase).
constexpr int kMaxDevices = 64;
template <typename Kernel>
cudaError_t allow_shared(Kernel* kernel, int bytes, std::atomic<int> (&set)[kMaxDevices],
                         int device) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  if (device >= 0 && device < kMaxDevices && set[device].load() >= bytes) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && device >= 0 && device < kMaxDevices) set[device].store(bytes);
  return err;
}

template <typename T>
std::atomic<int> forward_shared_set[kMaxDevices];
template <typename T>
std::atomic<int> backward_shared_set[kMaxDevices];

dim3 on_chip_grid(int64_t batch) {
  return dim3(static_cast<unsigned int>(batch < INT_MAX ? batch : INT_MAX));
}

}  // namespace

template <typename T>
bool sqrtm_on_chip_fits(int64_t n, int64_t iters, bool backward) {
  if (n < 1 || n > kOnChipMaxN || iters < 1 || !mirrors_all_products(iters)) return false;
  int device = 0, optin = 0;
  cudaFuncAttributes attr{};  // its static shared memory (the kernel's block_sum scratch)
  const void* kernel = backward ? reinterpret_cast<const void*>(&on_chip_backward_kernel<T>)
                                : reinterpret_cast<const void*>(&on_chip_forward_kernel<T>);
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
          cudaSuccess ||
      cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    cudaGetLastError();  // clear the error: the caller takes the tiled path
    return false;
  }
  return sqrtm_on_chip_smem_bytes(n, sizeof(T), backward) +
             static_cast<int64_t>(attr.sharedSizeBytes) <=
         static_cast<int64_t>(optin);
}

template <typename T>
cudaError_t sqrtm_on_chip_forward(const T* s, T* out, T* saved, int64_t batch, int64_t n,
                                  int64_t iters, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  if (batch < 0 || !sqrtm_on_chip_fits<T>(n, iters, false)) return cudaErrorInvalidValue;
  const int bytes = static_cast<int>(sqrtm_on_chip_smem_bytes(n, sizeof(T), false));
  int device = 0;
  cudaGetDevice(&device);
  const cudaError_t err = allow_shared(&on_chip_forward_kernel<T>, bytes, forward_shared_set<T>,
                                       device);
  if (err != cudaSuccess) return err;
  on_chip_forward_kernel<T><<<on_chip_grid(batch), on_chip_threads<T>(static_cast<int>(n)), bytes,
                              stream>>>(s, out, saved, static_cast<int>(n),
                                        static_cast<int>(iters), batch);
  return cudaGetLastError();
}

template <typename T>
cudaError_t sqrtm_on_chip_backward(const T* grad, const T* s, const T* saved, T* grad_s,
                                   int64_t batch, int64_t n, int64_t iters, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  if (batch < 0 || !sqrtm_on_chip_fits<T>(n, iters, true)) return cudaErrorInvalidValue;
  const int bytes = static_cast<int>(sqrtm_on_chip_smem_bytes(n, sizeof(T), true));
  int device = 0;
  cudaGetDevice(&device);
  const cudaError_t err = allow_shared(&on_chip_backward_kernel<T>, bytes,
                                       backward_shared_set<T>, device);
  if (err != cudaSuccess) return err;
  on_chip_backward_kernel<T><<<on_chip_grid(batch), on_chip_threads<T>(static_cast<int>(n)),
                               bytes, stream>>>(grad, s, saved, grad_s, static_cast<int>(n),
                                                static_cast<int>(iters), batch);
  return cudaGetLastError();
}

template bool sqrtm_on_chip_fits<float>(int64_t, int64_t, bool);
template bool sqrtm_on_chip_fits<double>(int64_t, int64_t, bool);
template cudaError_t sqrtm_on_chip_forward<float>(const float*, float*, float*, int64_t, int64_t,
                                                  int64_t, cudaStream_t);
template cudaError_t sqrtm_on_chip_forward<double>(const double*, double*, double*, int64_t,
                                                   int64_t, int64_t, cudaStream_t);
template cudaError_t sqrtm_on_chip_backward<float>(const float*, const float*, const float*,
                                                   float*, int64_t, int64_t, int64_t,
                                                   cudaStream_t);
template cudaError_t sqrtm_on_chip_backward<double>(const double*, const double*, const double*,
                                                    double*, int64_t, int64_t, int64_t,
                                                    cudaStream_t);

}  // namespace cuda
}  // namespace mpncov

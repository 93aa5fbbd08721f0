// Tiled shared-memory matrix-product core used by the covpool and sqrtm kernels.
//
// One thread block (64 threads, 8 x 8) computes a 64 x 64 tile of a sum of products
// sum_terms P @ Q for one sample. Each thread owns an 8 x 8 set of outputs: rows
// tile_row(0..7) = {4 ty .. 4 ty + 3} and {32 + 4 ty .. 32 + 4 ty + 3}, columns likewise
// with tx. Per k it reads 8 values of P and 8 of Q from shared memory as four 16-byte
// vectors and does 64 FMAs (FMA units, not shared memory, set the pace). K is walked in
// slabs of 16, staged in shared memory as [k][x] (x = row of P or column of Q).
//
// Staging (fast by construction, see benchmarks/results/static/cuda-kernels.md): a slab
// of each operand is 64 x 16 values, 16 per thread, as four 16-byte vectors when the slab
// is interior and aligned (every slab of a C = 128 / 256 product but a partial last one),
// with one bounds-checked scalar path for edge tiles and partial slabs. Two shared
// buffers alternate: while slab s is multiplied, slab s + 1 is on its way:
// - an operand whose vectors run along the tile (a symmetric P read as P^T, a row-major
//   Q, covpool's operands read from Xc^T or Xc: `k_contig` false) is copied by cp.async
//   straight into shared memory (float and double, sm_80+), no registers held;
// - an operand whose vectors run along k (a non-symmetric P in row-major order: sqrtm's
//   T / Z products beyond 8 iterations) must be transposed: float loads it into registers
//   before the multiply and stores it after; double, whose 8 x 8 accumulators leave no
//   registers for that, loads it after.
// A checked slab is loaded after the multiply too (edges only), so its scalar loads never
// add to the multiply's registers.
// Every output is a sum over k in increasing order (term by term), the same in every
// block, so results are bitwise reproducible.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "async_copy.cuh"
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
constexpr int kVec = 4;                     // elements per staged vector
constexpr int kStagedPerThread = kTile * kSlab / kBlock;  // 16 values per operand and slab
// Resident blocks per SM the float kernels are compiled for: 6 x 2 warps = 12 warps,
// which caps registers at 65536 / (6 * 64) = 170 per thread (ptxas must not spill).
constexpr int kMinBlocksFloat = 6;
static_assert(kPerY == 8 && kPerX == 8, "tile_row / tile_col assume 8 x 8 per thread");
static_assert(kStagedPerThread == kSlab && kTile == kBlock, "staging layout below");

// One operand of a product, as a slab source. The stored matrix M (urows x vcols,
// row-major, leading dimension ld) is read as M(u, v), 0 outside. The operand's element (x, k) is M(x, k) when k_contig,
// else M(k, x). So P (rows x K) row-major has k_contig = true; a symmetric P can be read
// as M(k, x) (k_contig = false, vectors along the tile); Q (K x cols) row-major has
// k_contig = false, and Q given by its transpose (covpool's Xc^T) k_contig = true.
template <typename T>
struct Operand {
  const T* p;
  int64_t ld;
  int urows, vcols;
  bool k_contig;
};

// Builds an Operand (nvcc-friendly aggregate construction).
template <typename T>
__host__ __device__ inline Operand<T> operand(const T* p, int64_t ld, int urows, int vcols,
                                              bool k_contig) {
  return Operand<T>{p, ld, urows, vcols, k_contig};
}

// Staging buffers: two stages of [k][x] slabs for P and Q. After the K loop the same
// memory holds one 64 x kPitch output tile for the epilogue.
template <typename T>
struct Stage {
  alignas(16) T a[kSlab][kPitch];
  alignas(16) T b[kSlab][kPitch];
};
template <typename T>
union Smem {
  Stage<T> stage[2];
  alignas(16) T tile[kTile][kPitch];
};
static_assert(sizeof(Stage<float>) * 2 == sizeof(float) * kTile * kPitch, "epilogue tile fits");

// Offset within the tile of the r-th row (c-th column) the calling thread owns.
__device__ __forceinline__ int tile_row(int r) {
  return (r >> 2) * 32 + (static_cast<int>(threadIdx.x) / kDimX) * 4 + (r & 3);
}
__device__ __forceinline__ int tile_col(int c) {
  return (c >> 2) * 32 + (static_cast<int>(threadIdx.x) % kDimX) * 4 + (c & 3);
}

// A misaligned 16-byte access faults on a GPU; the CUDA emulation of the tests defines
// this hook to abort on one instead of running it as x86 would.
#ifndef MPNCOV_ASSERT_ALIGNED16
#define MPNCOV_ASSERT_ALIGNED16(p) ((void)0)
#endif

// v[0..3] = p[0..3] from 16-byte aligned memory, as vector loads (shared or global).
__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
  MPNCOV_ASSERT_ALIGNED16(p);
  const float4 q = *reinterpret_cast<const float4*>(p);
  v[0] = q.x;
  v[1] = q.y;
  v[2] = q.z;
  v[3] = q.w;
}
__device__ __forceinline__ void load4(const double* p, double (&v)[4]) {
  MPNCOV_ASSERT_ALIGNED16(p);
  const double2 q0 = *reinterpret_cast<const double2*>(p);
  const double2 q1 = *reinterpret_cast<const double2*>(p + 2);
  v[0] = q0.x;
  v[1] = q0.y;
  v[2] = q1.x;
  v[3] = q1.y;
}
// p[0..3] = v[0..3], p 16-byte aligned.
__device__ __forceinline__ void store4(float* p, float a, float b, float c, float d) {
  MPNCOV_ASSERT_ALIGNED16(p);
  *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
}
__device__ __forceinline__ void store4(double* p, double a, double b, double c, double d) {
  MPNCOV_ASSERT_ALIGNED16(p);
  *reinterpret_cast<double2*>(p) = make_double2(a, b);
  *reinterpret_cast<double2*>(p + 2) = make_double2(c, d);
}

__host__ __device__ inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// The 16 values one thread stages per operand and slab, held in registers between the
// global loads and the shared stores. Thread t covers
//   k_contig:  x = t, k = 0..15                (four vectors along k)
//   otherwise: x = 4 (t % 16) + 0..3, k = t / 16 + 4 i, i = 0..3 (vectors along x)
template <typename T>
struct Staged {
  T v[kStagedPerThread];
};

// Loads the thread's part of the slab (x0, k0) of `op` into st. `fast`: the slab is
// interior and 16-byte aligned, so four unchecked vector loads do; otherwise every
// element is bounds-checked (0 outside, so the padding of edge tiles is 0).
template <typename T>
__device__ __forceinline__ void load_slab(Staged<T>& st, const Operand<T>& op, int x0, int k0,
                                          bool fast) {
  const int t = threadIdx.x;
  if (op.k_contig) {
    const int u = x0 + t;
    if (fast) {
      const T* src = op.p + static_cast<int64_t>(u) * op.ld + k0;
#pragma unroll
      for (int q = 0; q < kSlab / kVec; ++q) {
        T w[4];
        load4(src + q * kVec, w);
#pragma unroll
        for (int e = 0; e < 4; ++e) st.v[q * kVec + e] = w[e];
      }
    } else {
      // Elements k < lim of the row exist (lim = 0 for a row outside the matrix).
      const int lim = u < op.urows ? op.vcols - k0 : 0;
      const T* src = op.p + static_cast<int64_t>(u < op.urows ? u : 0) * op.ld + k0;
#pragma unroll
      for (int k = 0; k < kSlab; ++k) st.v[k] = k < lim ? src[k] : T(0);
    }
  } else {
    const int xv = x0 + kVec * (t % 16);
    const int kr = t / 16;
    if (fast) {
      const T* src = op.p + static_cast<int64_t>(k0 + kr) * op.ld + xv;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        T w[4];
        load4(src + 4 * i * op.ld, w);
#pragma unroll
        for (int e = 0; e < 4; ++e) st.v[i * kVec + e] = w[e];
      }
    } else {
      const int lim = op.vcols - xv;  // elements e < lim of the thread's vector exist
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int u = k0 + kr + 4 * i;
        const T* src = op.p + static_cast<int64_t>(u < op.urows ? u : 0) * op.ld + xv;
#pragma unroll
        for (int e = 0; e < 4; ++e)
          st.v[i * kVec + e] = (u < op.urows && e < lim) ? src[e] : T(0);
      }
    }
  }
}

// Stores st into the [k][x] slab dst.
template <typename T>
__device__ __forceinline__ void store_slab(T (*dst)[kPitch], const Staged<T>& st,
                                           const Operand<T>& op) {
  const int t = threadIdx.x;
  if (op.k_contig) {
#pragma unroll
    for (int k = 0; k < kSlab; ++k) dst[k][t] = st.v[k];
  } else {
    const int xv = kVec * (t % 16);
    const int kr = t / 16;
#pragma unroll
    for (int i = 0; i < 4; ++i)
      store4(&dst[kr + 4 * i][xv], st.v[i * kVec], st.v[i * kVec + 1], st.v[i * kVec + 2],
             st.v[i * kVec + 3]);
  }
}

// Starts cp.async copies of the thread's part of an interior, aligned slab (x0, k0) of a
// non-k_contig operand into the [k][x] slab dst (same layout as load_slab + store_slab).
template <typename T>
__device__ __forceinline__ void copy_slab_async(T (*dst)[kPitch], const Operand<T>& op, int x0,
                                                int k0) {
  const int t = threadIdx.x;
  const int xv = kVec * (t % 16);
  const int kr = t / 16;
  const T* src = op.p + static_cast<int64_t>(k0 + kr) * op.ld + x0 + xv;
  constexpr int kCopies = kVec * sizeof(T) / 16;  // 16-byte copies per vector
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int c = 0; c < kCopies; ++c)
      async_copy::copy16(&dst[kr + 4 * i][xv + c * (16 / sizeof(T))],
                         src + 4 * i * op.ld + c * (16 / sizeof(T)));
}

// Whether the slab (x0, k0) of op lies inside the matrix with 16-byte aligned vectors.
// MPNCOV_GEMM_ASSUME_FAST (defined only by scripts/cuda_static_report.py, never in a
// build) compiles the checked path out, so that the SASS of the slab loop shows exactly
// the instructions an interior slab executes.
template <typename T>
__device__ __forceinline__ bool slab_is_fast(const Operand<T>& op, int x0, int k0) {
#ifdef MPNCOV_GEMM_ASSUME_FAST
  return true;
#endif
  const int xs = op.k_contig ? op.urows : op.vcols;  // extent along x
  const int ks = op.k_contig ? op.vcols : op.urows;  // extent along k
  return x0 + kTile <= xs && k0 + kSlab <= ks && (op.ld % kVec) == 0 && aligned16(op.p);
}

// acc[r][c] += sum_k a[k][tile_row(r)] * b[k][tile_col(c)] over one staged slab.
template <typename T>
__device__ __forceinline__ void multiply_slab(T (&acc)[kPerY][kPerX], const Stage<T>& st) {
  const int ra = (static_cast<int>(threadIdx.x) / kDimX) * 4;
  const int cb = (static_cast<int>(threadIdx.x) % kDimX) * 4;
  // double: its 128 accumulator registers leave no room for the fragments of several k in
  // flight (unrolled, ptxas spills up to 72 bytes; one k at a time, at most 20).
  constexpr int kUnrollK = sizeof(T) == 4 ? kSlab : 1;
#pragma unroll kUnrollK
  for (int k = 0; k < kSlab; ++k) {
    T a[2][4];
    T b[2][4];
    load4(&st.a[k][ra], a[0]);
    load4(&st.a[k][32 + ra], a[1]);
    load4(&st.b[k][cb], b[0]);
    load4(&st.b[k][32 + cb], b[1]);
#pragma unroll
    for (int r = 0; r < kPerY; ++r)
#pragma unroll
      for (int c = 0; c < kPerX; ++c) acc[r][c] += a[r >> 2][r & 3] * b[c >> 2][c & 3];
  }
}

// Up to two products P_i (rows x K_i) @ Q_i (K_i x cols) summed into one tile.
template <typename T>
struct Terms {
  Operand<T> p[2];
  Operand<T> q[2];
  int k[2];
  int count;  // 1 or 2
};

// acc[r][c] = sum_i sum_{k < K_i} P_i(row0 + tile_row(r), k) Q_i(k, col0 + tile_col(c)).
// Both terms run as one sequence of slabs, so the pipeline does not drain between them.
// kTwoTerms = false: terms.p[0] @ terms.q[0] only. Must be called by all threads of the
// block (it synchronises); on return the shared memory is free.
template <typename T, bool kTwoTerms = true>
__device__ __forceinline__ void accumulate(T (&acc)[kPerY][kPerX], Smem<T>& sm,
                                           const Terms<T>& terms, int row0, int col0) {
  constexpr bool kPrefetchRegisters = sizeof(T) == 4;
#pragma unroll
  for (int r = 0; r < kPerY; ++r)
#pragma unroll
    for (int c = 0; c < kPerX; ++c) acc[r][c] = T(0);
  const int s0 = (terms.k[0] + kSlab - 1) / kSlab;
  const int slabs = s0 + (kTwoTerms && terms.count > 1 ? (terms.k[1] + kSlab - 1) / kSlab : 0);
  if (slabs <= 0) return;
  Staged<T> pa, qb;
  // Operands are selected by value: a run-time index into the parameter array would make
  // the compiler copy it to local memory.
  auto operands = [&](int s, Operand<T>& p, Operand<T>& q, int& k0) {
    const bool first = !kTwoTerms || s < s0;
    k0 = (first ? s : s - s0) * kSlab;
    p = first ? terms.p[0] : terms.p[1];
    q = first ? terms.q[0] : terms.q[1];
  };
  // One fast/checked decision for both operands: two code paths, not four.
  // Phase 1 (before the multiply): cp.async copies; float's fast register loads.
  auto start = [&](int s, Stage<T>& dst) {
    Operand<T> p, q;
    int k0;
    operands(s, p, q, k0);
    const bool fast = slab_is_fast(p, row0, k0) && slab_is_fast(q, col0, k0);
    if (fast) {
      if (!p.k_contig) copy_slab_async(dst.a, p, row0, k0);
      else if (kPrefetchRegisters) load_slab(pa, p, row0, k0, true);
      if (!q.k_contig) copy_slab_async(dst.b, q, col0, k0);
      else if (kPrefetchRegisters) load_slab(qb, q, col0, k0, true);
    }
    async_copy::commit();  // possibly empty: every thread commits one group per slab
  };
  // Phase 2 (after the multiply): whatever phase 1 did not copy, through registers.
  auto finish = [&](int s, Stage<T>& dst) {
    Operand<T> p, q;
    int k0;
    operands(s, p, q, k0);
    const bool fast = slab_is_fast(p, row0, k0) && slab_is_fast(q, col0, k0);
    if (!fast || p.k_contig) {
      if (!fast || !kPrefetchRegisters) load_slab(pa, p, row0, k0, fast);
      store_slab(dst.a, pa, p);
    }
    if (!fast || q.k_contig) {
      if (!fast || !kPrefetchRegisters) load_slab(qb, q, col0, k0, fast);
      store_slab(dst.b, qb, q);
    }
  };
  start(0, sm.stage[0]);
  finish(0, sm.stage[0]);
  for (int s = 0; s < slabs; ++s) {
    const bool next = s + 1 < slabs;
    if (next) start(s + 1, sm.stage[(s + 1) & 1]);
    // Slab s's copies have landed (slab s + 1's may not) ...
    if (next) {
      async_copy::wait<1>();
    } else {
      async_copy::wait<0>();
    }
    __syncthreads();  // ... and every thread's copies and stores of slab s are visible.
    multiply_slab(acc, sm.stage[s & 1]);
    if (next) finish(s + 1, sm.stage[(s + 1) & 1]);
    // Stage s & 1 is free for slab s + 2 only once every thread has multiplied it.
    __syncthreads();
  }
}

// Writes the thread's accumulators into the shared output tile, as in the product
// (transposed = false: tile[i][j] = acc(i, j)) or transposed (tile[j][i] = acc(i, j)),
// 16-byte stores either way (a thread owns 4 consecutive rows and 4 consecutive columns).
template <typename T>
__device__ __forceinline__ void acc_to_tile(T (*tile)[kPitch], const T (&acc)[kPerY][kPerX],
                                            bool transposed) {
  if (!transposed) {
#pragma unroll
    for (int r = 0; r < kPerY; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        store4(&tile[tile_row(r)][tile_col(4 * h)], acc[r][4 * h], acc[r][4 * h + 1],
               acc[r][4 * h + 2], acc[r][4 * h + 3]);
  } else {
#pragma unroll
    for (int c = 0; c < kPerX; ++c)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        store4(&tile[tile_col(c)][tile_row(4 * h)], acc[4 * h][c], acc[4 * h + 1][c],
               acc[4 * h + 2][c], acc[4 * h + 3][c]);
  }
}

// Calls f(r, c, v[4]) for each 4-wide row segment (r, 4 c4 .. 4 c4 + 3) of the shared
// tile, threads taking consecutive segments (a warp covers two 64-wide rows), so the
// global accesses f makes at (row0 + r, col0 + 4 c4 ..) are coalesced.
template <typename T, typename F>
__device__ __forceinline__ void for_tile_segments(const T (*tile)[kPitch], F&& f) {
#pragma unroll 4
  for (int e = threadIdx.x; e < kTile * kTile / kVec; e += kBlock) {
    const int r = e / (kTile / kVec);
    const int c = (e % (kTile / kVec)) * kVec;
    T v[4];
    load4(&tile[r][c], v);
    f(r, c, v);
  }
}

// dst[e] = v[e] where keep[e] (e = 0..3): one 16-byte store when all are kept and `vec`
// (dst then 16-byte aligned), else scalar stores.
template <typename T>
__device__ __forceinline__ void store_masked(T* dst, const T (&v)[4], const bool (&keep)[4],
                                             bool vec) {
  if (vec && keep[0] && keep[1] && keep[2] && keep[3]) {
    store4(dst, v[0], v[1], v[2], v[3]);
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (keep[e]) dst[e] = v[e];
  }
}
// v[e] = src[e] where keep[e], else 0; as load4 when all are kept and `vec`.
template <typename T>
__device__ __forceinline__ void load_masked(const T* src, T (&v)[4], const bool (&keep)[4],
                                            bool vec) {
  if (vec && keep[0] && keep[1] && keep[2] && keep[3]) {
    load4(src, v);
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = keep[e] ? src[e] : T(0);
  }
}

// The epilogue of a tile: emit(i, j, v, mirrored) is called for every 4-wide segment
// (i, j .. j + 3) of the tile at (row0, col0) with v = acc at those positions, threads
// taking consecutive segments so that emit's global accesses are coalesced. With
// `mirror`, a second pass calls emit for the transposed tile at (col0, row0) with
// v[e] = acc(j + e, i) (mirrored = true). emit applies bounds and masks. Uses the shared
// memory, which must be free (accumulate leaves it so); all threads must call it.
template <typename T, typename Emit>
__device__ __forceinline__ void epilogue(Smem<T>& sm, const T (&acc)[kPerY][kPerX], int row0,
                                         int col0, bool mirror, Emit&& emit) {
  for (int pass = 0; pass < (mirror ? 2 : 1); ++pass) {
    const bool mirrored = pass == 1;
    if (mirrored) __syncthreads();  // every thread has read the first pass's tile
    acc_to_tile(sm.tile, acc, mirrored);
    __syncthreads();
    const int i0 = mirrored ? col0 : row0;
    const int j0 = mirrored ? row0 : col0;
    for_tile_segments(sm.tile, [&](int r, int c, T(&v)[4]) { emit(i0 + r, j0 + c, v, mirrored); });
  }
  __syncthreads();  // the shared memory is free again (for a next sample's accumulate)
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

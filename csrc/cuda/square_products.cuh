// Batched products of square n x n matrices with a fused epilogue, shared by the tiled
// sqrtm kernels (sqrtm_kernel.cu) and the Newton-Schulz recurrence of the Gram-space
// pipeline (gram_kernel.cu), which runs on M x M matrices:
//   out = alpha (P1 Q1 [+ P2 Q2]) [+ beta R] + gamma I,   out2 = f(t) * out
// One launch runs one or two such jobs (Y and Z of a forward step, dY and dZ of a backward
// step are independent given T / dT). With `upper`, only tiles on or above the diagonal
// are computed and each value is also written to its mirror position: used where the
// result is symmetric, which halves the work and makes the stored result exactly
// symmetric. alpha is 1 or -0.5 (a power of 2, so scaling the sum equals summing scaled
// products, bit for bit). An operand known to be exactly symmetric (a mirrored result) is
// read as its transpose, which the staging loads as vectors along the tile (see
// batched_gemm.cuh). Internal to the CUDA sources (an unnamed namespace: each .cu has its
// own copy of the kernel).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "batched_gemm.cuh"
#include "common.cuh"
#include "fp32_math.h"

namespace mpncov {
namespace cuda {
namespace {

using gemm::kPerX;
using gemm::kPerY;
using gemm::kTile;

// A batch of n x n row-major matrices: sample b starts at p + b * bstride.
template <typename T>
struct Mat {
  const T* p;
  int64_t bstride;
};

// What the epilogue writes into out2: f(t) * value with t the sample's trace.
enum Out2Kind : int {
  kOut2None = 0,
  kOut2TimesSqrtTrace = 1,  // sqrt(t) value (t = 0 treated as 1): the forward's output
  kOut2OverTrace = 2,       // value / t, 0 where t = 0: the backward's dA / t
};

// One product job (see the top of this file).
template <typename T>
struct Job {
  Mat<T> p[2], q[2];
  T alpha;
  bool p_sym[2];  // P_i is exactly symmetric: staged as P_i^T (vectors along the tile)
  int terms;      // 1 or 2
  Mat<T> r;       // + beta R, skipped when r.p == nullptr; symmetric when upper
  T beta;
  T gamma;   // + gamma I
  T* out;    // may be nullptr (only out2 wanted); must not alias any input
  int64_t out_bstride;
  bool upper;
  int out2_kind;
  T* out2;
  int64_t out2_bstride;
  const T* trace;     // per sample, for out2
  Mat<T> dot_with;    // kOut2OverTrace with upper: partial <out2, dot_with> per tile ...
  T* dot_part;        // ... into dot_part[b * tiles + tile] (nullptr: none)
  bool vec;           // out, out2, r, dot_with rows are 16-byte aligned (n % 4 == 0 too)
  int tiles;          // blocks of this job per sample
};

template <typename T>
struct ProductArgs {
  Job<T> job[2];
  int jobs;
  int n;
  int64_t batch;
};

// kMath: an Fp32Math (FFMA, TF32, 3xTF32; float only).
template <typename T, int kMath>
__global__ void __launch_bounds__(gemm::kBlock, gemm::min_blocks<T, kMath>())
    product_kernel(const ProductArgs<T> args) {
  __shared__ gemm::Smem<T> sm;
  __shared__ T scratch[32];
  const bool second = args.jobs > 1 && static_cast<int>(blockIdx.x) >= args.job[0].tiles;
  const Job<T> job = second ? args.job[1] : args.job[0];  // by value: see gemm::accumulate
  const int tile = static_cast<int>(blockIdx.x) - (second ? args.job[0].tiles : 0);
  const int n = args.n;
  const int tiles = gemm::tiles_for(n);
  int tr, tc;
  if (job.upper) {
    gemm::upper_tile(tile, tiles, tr, tc);
  } else {
    tr = tile / tiles;
    tc = tile % tiles;
  }
  const int row0 = tr * kTile;
  const int col0 = tc * kTile;
  for (int64_t b = blockIdx.y; b < args.batch; b += gridDim.y) {
    gemm::Terms<T> terms;
    terms.count = job.terms;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      terms.p[i] = gemm::operand(job.p[i].p + b * job.p[i].bstride, n, n, n, !job.p_sym[i]);
      terms.q[i] = gemm::operand(job.q[i].p + b * job.q[i].bstride, n, n, n, false);
      terms.k[i] = n;
    }
    T acc[kPerY][kPerX];
    gemm::accumulate<T, true, kMath>(acc, sm, terms, row0, col0);

    const T tb = job.trace != nullptr ? job.trace[b] : T(0);
    const T root = dev_sqrt(safe_trace(tb));
    const T* rb = job.r.p != nullptr ? job.r.p + b * job.r.bstride : nullptr;
    const T* db = job.dot_part != nullptr ? job.dot_with.p + b * job.dot_with.bstride : nullptr;
    T* ob = job.out != nullptr ? job.out + b * job.out_bstride : nullptr;
    T* o2b = job.out2 != nullptr ? job.out2 + b * job.out2_bstride : nullptr;
    T dot = T(0);
    gemm::epilogue<kMath>(sm, acc, row0, col0, job.upper, [&](int i, int j, T(&v)[4], bool mirrored) {
      if (i >= n) return;
      bool keep[4];
#pragma unroll
      for (int e = 0; e < 4; ++e)
        keep[e] = j + e < n && (!job.upper || (mirrored ? i > j + e : i <= j + e));
      const int64_t ij = static_cast<int64_t>(i) * n + j;
#pragma unroll
      for (int e = 0; e < 4; ++e) v[e] *= job.alpha;
      if (rb != nullptr) {
        T rv[4];
        gemm::load_masked(rb + ij, rv, keep, job.vec);
#pragma unroll
        for (int e = 0; e < 4; ++e) v[e] += job.beta * rv[e];
      }
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (i == j + e) v[e] += job.gamma;
      if (ob != nullptr) gemm::store_masked(ob + ij, v, keep, job.vec);
      if (o2b == nullptr) return;
      T w[4];
#pragma unroll
      for (int e = 0; e < 4; ++e)
        w[e] = job.out2_kind == kOut2TimesSqrtTrace ? root * v[e]
                                                    : (tb == T(0) ? T(0) : v[e] / tb);
      gemm::store_masked(o2b + ij, w, keep, job.vec);
      if (db != nullptr && !mirrored) {
        // Upper triangle only: an off-diagonal value stands for itself and its mirror.
        T dv[4];
        gemm::load_masked(db + ij, dv, keep, job.vec);
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (keep[e]) dot += (i == j + e ? T(1) : T(2)) * (w[e] * dv[e]);
      }
    });
    if (job.dot_part != nullptr) {
      dot = block_sum(dot, scratch);
      if (threadIdx.x == 0) job.dot_part[b * job.tiles + tile] = dot;
    }
  }
}

// Host side: builds and launches jobs for one batch of n x n matrices.
template <typename T>
struct Runner {
  int n;
  int64_t batch;
  Fp32Math math;
  cudaStream_t stream;

  static Mat<T> none() { return Mat<T>{nullptr, 0}; }

  // out = alpha P1 Q1 + gamma I (more terms and outputs are set on the returned job).
  Job<T> job(Mat<T> p1, bool p1_sym, Mat<T> q1, T alpha, T gamma, T* out, int64_t out_bstride,
             bool upper) const {
    Job<T> j{};
    j.p[0] = p1;
    j.q[0] = q1;
    j.alpha = alpha;
    j.p_sym[0] = p1_sym;
    j.p[1] = p1;  // unused unless terms == 2
    j.q[1] = q1;
    j.p_sym[1] = p1_sym;
    j.terms = 1;
    j.r = none();
    j.gamma = gamma;
    j.out = out;
    j.out_bstride = out_bstride;
    j.upper = upper;
    j.out2_kind = kOut2None;
    j.dot_with = none();
    return j;
  }
  // + alpha P2 Q2 (the same alpha).
  static Job<T> plus(Job<T> j, Mat<T> p2, bool p2_sym, Mat<T> q2) {
    j.p[1] = p2;
    j.q[1] = q2;
    j.p_sym[1] = p2_sym;
    j.terms = 2;
    return j;
  }

  // Whether the epilogue may use 16-byte accesses on every matrix it touches.
  bool vector_ok(const Job<T>& j) const {
    auto ok = [&](const T* p, int64_t bstride) {
      return p == nullptr || (gemm::aligned16(p) && bstride % gemm::kVec == 0);
    };
    return n % gemm::kVec == 0 && ok(j.out, j.out_bstride) && ok(j.out2, j.out2_bstride) &&
           ok(j.r.p, j.r.bstride) && ok(j.dot_with.p, j.dot_with.bstride);
  }

  cudaError_t launch(Job<T> j0, const Job<T>* j1 = nullptr) const {
    ProductArgs<T> args{};
    args.n = n;
    args.batch = batch;
    args.jobs = j1 != nullptr ? 2 : 1;
    args.job[0] = j0;
    if (j1 != nullptr) args.job[1] = *j1;
    int64_t blocks = 0;
    for (int i = 0; i < args.jobs; ++i) {
      const int64_t t = gemm::square_tile_blocks(n, args.job[i].upper);
      if (!fits_int(t)) return cudaErrorInvalidValue;
      args.job[i].tiles = static_cast<int>(t);
      args.job[i].vec = vector_ok(args.job[i]);
      blocks += t;
    }
    if (!fits_int(blocks)) return cudaErrorInvalidValue;
    const dim3 grid(static_cast<unsigned int>(blocks), grid_y_for_batch(batch));
    return with_fp32_math<T>(math, [&](auto m) {
      constexpr int M = decltype(m)::value;
      product_kernel<T, M><<<grid, gemm::kBlock, 0, stream>>>(args);
      return cudaGetLastError();
    });
  }
  cudaError_t launch_pair(Job<T> j0, Job<T> j1) const { return launch(j0, &j1); }
};

#define MPNCOV_TRY(expr)                  \
  do {                                    \
    const cudaError_t err_ = (expr);      \
    if (err_ != cudaSuccess) return err_; \
  } while (0)

}  // namespace
}  // namespace cuda
}  // namespace mpncov

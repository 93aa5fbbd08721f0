// Gram-space pipeline CUDA kernels (SPEC section 8; the math in gram_kernel.cuh and
// csrc/cpu/isqrt_cov_gram_cpu.cpp).
//
// Kernels:
// * normalisation: channel_sums_kernel and norm_kernel (one block per sample: fixed-order
//   sums in double), centre_kernel and divide_kernel (elementwise): W = Xc / ||Xc||;
// * gram_product_kernel: the products with a C-sized dimension (G = W^T W, H = W^T (E W),
//   E W, P = W R, the upper triangle of P W^T straight into vec, dXc = E W R + W D), on the
//   64 x 64 tile core of batched_gemm.cuh. Features are read in their own layout by
//   choosing each operand's orientation (Operand::k_contig), and a result in the tokens
//   layout is computed as the transposed product (which is that layout's row-major form);
// * the M x M products of the recurrence and of its derivative through the square-product
//   kernel shared with sqrtm (square_products.cuh);
// * small elementwise kernels (Z_1 = 1.5 I - 0.5 G, dZ_1 = -0.5 H, E from the vector) and
//   gram_finish_kernel (one block per sample): <H, R>, <G, D>, the W term of dXc and the
//   channel sums for the centring of dX (centre_kernel).
// Every reduction is in double with a fixed order (block_sum); no atomics.
#include "gram_kernel.cuh"

#include <cfloat>

#include "batched_gemm.cuh"
#include "common.cuh"
#include "square_products.cuh"
#include "triuvec_kernel.cuh"  // triu_index

namespace mpncov {
namespace cuda {
namespace {

constexpr int kWarps = kThreads / 32;

// One operand of a product over the batch: sample b's stored matrix starts at
// p + b * bstride (see gemm::Operand for the rest).
template <typename T>
struct Side {
  const T* p;
  int64_t bstride, ld;
  int urows, vcols;
  bool k_contig;
};

// What gram_product_kernel does with the product of a tile.
enum GramEpilogue : int {
  kStore = 0,    // out = alpha * product (mirrored too, for an upper-triangle product)
  kTriuvec = 1,  // vec[triu(i, j)] = (||Xc|| / sqrt(M)) * product(i, j) for i <= j, in double
};

template <typename T>
struct GramProductArgs {
  Side<T> p[2], q[2];
  int k[2];
  int terms;  // 1 or 2
  int rows, cols;
  bool upper;  // rows == cols: only tiles on or above the diagonal (see gemm::upper_tile)
  int epilogue;
  T alpha;
  T* out;
  int64_t out_bstride, out_ld;
  bool vec;            // out rows are 16-byte aligned (kStore)
  const double* norm;  // kTriuvec: ||Xc|| per sample ...
  double root_m;       // ... and sqrt(M)
  int64_t batch;
};

// out = alpha sum_i P_i Q_i per sample (blockIdx.y strides over the batch). With upper,
// the result is symmetric: kStore writes each value of an upper tile at (i, j) and at
// (j, i), kTriuvec only the upper triangle (i <= j) into the packed vector.
template <typename T, int kMath>
__global__ void __launch_bounds__(gemm::kBlock, gemm::min_blocks<T, kMath>())
    gram_product_kernel(const GramProductArgs<T> args) {
  __shared__ gemm::Smem<T> sm;
  const int tiles_c = gemm::tiles_for(args.cols);
  int tr, tc;
  if (args.upper) {
    gemm::upper_tile(static_cast<int>(blockIdx.x), tiles_c, tr, tc);
  } else {
    tr = static_cast<int>(blockIdx.x) / tiles_c;
    tc = static_cast<int>(blockIdx.x) % tiles_c;
  }
  const int row0 = tr * gemm::kTile;
  const int col0 = tc * gemm::kTile;
  const bool triuvec = args.epilogue == kTriuvec;
  for (int64_t b = blockIdx.y; b < args.batch; b += gridDim.y) {
    gemm::Terms<T> terms;
    terms.count = args.terms;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const Side<T> p = args.p[i], q = args.q[i];
      terms.p[i] = gemm::operand(p.p + b * p.bstride, p.ld, p.urows, p.vcols, p.k_contig);
      terms.q[i] = gemm::operand(q.p + b * q.bstride, q.ld, q.urows, q.vcols, q.k_contig);
      terms.k[i] = args.k[i];
    }
    T acc[gemm::kPerY][gemm::kPerX];
    gemm::accumulate<T, true, kMath>(acc, sm, terms, row0, col0);
    T* ob = args.out + b * args.out_bstride;
    const double s = triuvec ? args.norm[b] / args.root_m : 0.0;
    gemm::epilogue<kMath>(sm, acc, row0, col0, args.upper && !triuvec,
                          [&](int i, int j, T(&v)[4], bool mirrored) {
      if (i >= args.rows) return;
      bool keep[4];
#pragma unroll
      for (int e = 0; e < 4; ++e)
        keep[e] = j + e < args.cols && (!args.upper || (mirrored ? i > j + e : i <= j + e));
      if (triuvec) {
        T* row = ob + triu_index(args.cols, i, j);  // (i, j + e) at row[e]
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (keep[e]) row[e] = static_cast<T>(s * static_cast<double>(v[e]));
        return;
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) v[e] *= args.alpha;
      gemm::store_masked(ob + static_cast<int64_t>(i) * args.out_ld + j, v, keep, args.vec);
    });
  }
}

// NaN-propagating maximum (fmax would drop a NaN).
__device__ __forceinline__ double nan_max(double a, double b) {
  return a != a ? a : (b != b ? b : (a > b ? a : b));
}

// The maximum of v over the block (every thread gets it); the pattern of block_sum.
__device__ double block_max(double v, double* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = nan_max(v, __shfl_down_sync(0xffffffffu, v, off));
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? scratch[lane] : 0.0;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = nan_max(v, __shfl_down_sync(0xffffffffu, v, off));
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  return scratch[0];
}

// One sample's features F (C x M) at p in its layout: element (c, m).
__device__ __forceinline__ int64_t feature_at(int c, int m, int C, int M, bool tokens) {
  return tokens ? static_cast<int64_t>(m) * C + c : static_cast<int64_t>(c) * M + m;
}

// sums[c] = sum over the positions of channel c of one sample's features f (C x M), in
// double and in a fixed order. Channels first: a warp per channel (lane-strided partial
// sums, then the shuffle tree); tokens: a thread per channel (consecutive threads read
// consecutive channels), in position order. Called by the whole block.
template <typename T>
__device__ void channel_sums(const T* f, double* sums, int C, int M, bool tokens) {
  if (!tokens) {
    const int lane = threadIdx.x & 31;
    for (int c = threadIdx.x >> 5; c < C; c += kWarps) {  // uniform within a warp
      const T* row = f + static_cast<int64_t>(c) * M;
      double s = 0;
      for (int m = lane; m < M; m += 32) s += static_cast<double>(row[m]);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
      if (lane == 0) sums[c] = s;
    }
    return;
  }
  for (int c = threadIdx.x; c < C; c += kThreads) {
    double s = 0;
    for (int m = 0; m < M; ++m) s += static_cast<double>(f[static_cast<int64_t>(m) * C + c]);
    sums[c] = s;
  }
}

// Per sample (blockIdx.x strides over the batch): the channel sums of x.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    channel_sums_kernel(const T* __restrict__ x, double* __restrict__ sums, int C, int M,
                        bool tokens, int64_t batch) {
  const int64_t cm = static_cast<int64_t>(C) * M;
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x)
    channel_sums(x + b * cm, sums + b * C, C, M, tokens);
}

// out = f - mean over the positions, the mean = sum / M rounded to T (as
// csrc/cpu/features.cpp's centre_features). out may alias f. total = batch C M. The
// divisions are in elementwise kernels: inside a loop with more live state, the double
// division's slow path (a call) makes ptxas spill.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    centre_kernel(const T* f, const double* __restrict__ sums, T* out, int C, int M,
                  bool tokens, int64_t total) {
  const int64_t cm = static_cast<int64_t>(C) * M;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / cm, r = idx - b * cm;
    const int64_t c = tokens ? r % C : r / M;
    out[idx] = f[idx] - static_cast<T>(sums[b * C + c] / M);
  }
}

// Per sample (blockIdx.x strides over the batch): norm = ||Xc|| in double. Squares of
// values below ~1e-154 lose digits in double and above ~1e154 overflow; only then is the
// sum taken again over Xc scaled by the power of two nearest above max |Xc| (the rule of
// csrc/cpu/features.cpp, which divides by max |Xc|; a power of two scales exactly). NaN
// gives NaN.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    norm_kernel(const T* __restrict__ xc, double* __restrict__ norm, int64_t cm, int64_t batch) {
  __shared__ double scratch[32];
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    const T* xb = xc + b * cm;
    double sq = 0;
    for (int64_t i = threadIdx.x; i < cm; i += kThreads) {
      const double v = static_cast<double>(xb[i]);
      sq += v * v;
    }
    double nb = block_sum(sq, scratch);
    if (!(nb > 1e-200 && nb <= DBL_MAX)) {
      double largest = 0;
      for (int64_t i = threadIdx.x; i < cm; i += kThreads)
        largest = nan_max(largest, fabs(static_cast<double>(xb[i])));
      largest = block_max(largest, scratch);
      if (largest != largest || largest == 0 || largest > DBL_MAX) {
        nb = largest;
      } else {
        int e;
        frexp(largest, &e);  // largest = f 2^e, f in [0.5, 1)
        double scaled = 0;
        for (int64_t i = threadIdx.x; i < cm; i += kThreads) {
          const double v = ldexp(static_cast<double>(xb[i]), -e);
          scaled += v * v;
        }
        nb = ldexp(sqrt(block_sum(scaled, scratch)), e);
      }
    } else {
      nb = sqrt(nb);
    }
    if (threadIdx.x == 0) norm[b] = nb;
    __syncthreads();  // scratch is free for the next sample
  }
}

// w = w / norm of its sample (divided in double, rounded once), except where the norm is
// 0 (w = Xc = 0 stays). total = batch C M.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    divide_kernel(T* __restrict__ w, const double* __restrict__ norm, int64_t cm, int64_t total) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double nb = norm[idx / cm];
    if (nb != 0) w[idx] = static_cast<T>(static_cast<double>(w[idx]) / nb);
  }
}

// out = alpha in + gamma I per n x n sample (in: batch stride in_bstride; out: n n).
// Z_1 = 1.5 I - 0.5 G and dZ_1 = -0.5 H (the steps of newton_schulz_first_z, so a
// recomputed Z_1 is bitwise the forward's). total = batch n n.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    scale_shift_kernel(const T* __restrict__ in, int64_t in_bstride, T* __restrict__ out,
                       T alpha, T gamma, int n, int64_t total) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const auto [b, i, j] = matrix_index(idx, n);
    T v = alpha * in[b * in_bstride + i * n + j];
    if (i == j) v += gamma;
    out[idx] = v;
  }
}

// E = sym(Gamma) per sample, Gamma's upper triangle being the incoming vector g: g on the
// diagonal, g / 2 on both sides of it. total = batch C C.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sym_from_triangle_kernel(const T* __restrict__ g, T* __restrict__ e, int C, int64_t total) {
  const int64_t k = static_cast<int64_t>(C) * (C + 1) / 2;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const auto [b, i, j] = matrix_index(idx, C);
    const T v = g[b * k + (i <= j ? triu_index(C, i, j) : triu_index(C, j, i))];
    e[idx] = i == j ? v : T(0.5) * v;
  }
}

// Per sample (blockIdx.x strides over the batch), with dx = (2 / sqrt M)(E W R + W D)
// already written: dx += coef W, coef = -(<H, R> + 2 <G, D>) / sqrt(M) (the dots summed in
// double in a fixed order), and the channel sums of the result (centre_kernel then
// subtracts their means).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    gram_finish_kernel(T* __restrict__ dx, const T* __restrict__ w, const T* __restrict__ h,
                       const T* __restrict__ r, int64_t r_bstride, const T* __restrict__ g,
                       int64_t g_bstride, const T* __restrict__ d, double* __restrict__ sums,
                       int C, int M, bool tokens, int64_t batch) {
  __shared__ double scratch[32];
  const int64_t cm = static_cast<int64_t>(C) * M, mm = static_cast<int64_t>(M) * M;
  const double root_m = sqrt(static_cast<double>(M));
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    const T* hb = h + b * mm;
    const T* rb = r + b * r_bstride;
    const T* gb = g + b * g_bstride;
    const T* db = d + b * mm;
    double hr = 0, gd = 0;
    for (int64_t i = threadIdx.x; i < mm; i += kThreads) {
      hr += static_cast<double>(hb[i]) * static_cast<double>(rb[i]);
      gd += static_cast<double>(gb[i]) * static_cast<double>(db[i]);
    }
    hr = block_sum(hr, scratch);
    gd = block_sum(gd, scratch);
    const T coef = static_cast<T>(-(hr + 2 * gd) / root_m);
    T* o = dx + b * cm;
    const T* wb = w + b * cm;
    for (int64_t i = threadIdx.x; i < cm; i += kThreads) o[i] += coef * wb[i];
    __syncthreads();  // every value is updated before the channel sums read them
    channel_sums(o, sums + b * C, C, M, tokens);
    __syncthreads();
  }
}

// ---- host side ---------------------------------------------------------------------------

// A batch of features F (C x M, batch stride C M) in its layout as an operand whose
// element (x, k) is F(x, k) (x_is_channel: P = F, or Q = F^T) or F(k, x) (P = F^T,
// Q = F): contiguous along k exactly when the stored rows run along k.
template <typename T>
Side<T> features(const T* p, int C, int M, bool tokens, bool x_is_channel) {
  return Side<T>{p, static_cast<int64_t>(C) * M, tokens ? C : M, tokens ? M : C,
                 tokens ? C : M, x_is_channel != tokens};
}

// A batch of row-major n x n matrices S read as S(k, x): Q = S, P = S^T, or P = S for an
// exactly symmetric S.
template <typename T>
Side<T> square_side(const T* p, int64_t bstride, int n) {
  return Side<T>{p, bstride, n, n, n, false};
}

template <typename T>
GramProductArgs<T> product_args(int rows, int cols, T* out, int64_t out_bstride,
                                int64_t out_ld, int64_t batch) {
  GramProductArgs<T> a{};
  a.terms = 1;
  a.rows = rows;
  a.cols = cols;
  a.epilogue = kStore;
  a.alpha = T(1);
  a.out = out;
  a.out_bstride = out_bstride;
  a.out_ld = out_ld;
  a.batch = batch;
  return a;
}

template <typename T>
void set_term(GramProductArgs<T>& a, int i, Side<T> p, Side<T> q, int k) {
  a.p[i] = p;
  a.q[i] = q;
  a.k[i] = k;
  if (i == 0) {  // the second term defaults to the first (unused when terms == 1)
    a.p[1] = p;
    a.q[1] = q;
    a.k[1] = k;
  }
}

template <typename T>
cudaError_t launch_product(GramProductArgs<T> a, Fp32Math math, cudaStream_t stream) {
  const int64_t tr = gemm::tiles_for(a.rows), tc = gemm::tiles_for(a.cols);
  const int64_t blocks = a.upper ? tc * (tc + 1) / 2 : tr * tc;
  if (!fits_int(blocks)) return cudaErrorInvalidValue;
  a.vec = a.out_ld % gemm::kVec == 0 && a.out_bstride % gemm::kVec == 0 && gemm::aligned16(a.out);
  const dim3 grid(static_cast<unsigned int>(blocks), grid_y_for_batch(a.batch));
  return with_fp32_math<T>(math, [&](auto m) {
    constexpr int kM = decltype(m)::value;
    gram_product_kernel<T, kM><<<grid, gemm::kBlock, 0, stream>>>(a);
    return cudaGetLastError();
  });
}

// out (C x M, the features layout) = alpha sum_i A_i B_i, A_i features (C x M), B_i
// n x n row-major (batch stride b_bstride[i]). Tokens: the transposed product
// out^T = sum_i B_i^T A_i^T (M x C row-major, that layout's storage).
template <typename T>
cudaError_t features_times_square(const T* const (&a)[2], const T* const (&b)[2],
                                  const int64_t (&b_bstride)[2], int terms, T alpha, T* out,
                                  int C, int M, bool tokens, int64_t batch, Fp32Math math,
                                  cudaStream_t stream) {
  GramProductArgs<T> args = product_args<T>(tokens ? M : C, tokens ? C : M, out,
                                            static_cast<int64_t>(C) * M, tokens ? C : M, batch);
  for (int i = 0; i < terms; ++i) {
    const Side<T> f = features(a[i], C, M, tokens, /*x_is_channel=*/true);
    const Side<T> s = square_side(b[i], b_bstride[i], M);
    if (tokens) {
      set_term(args, i, s, f, M);
    } else {
      set_term(args, i, f, s, M);
    }
  }
  args.terms = terms;
  args.alpha = alpha;
  return launch_product(args, math, stream);
}

// out (M x M, batch stride out_bstride) = W^T F, upper tiles mirrored (a symmetric result:
// F = W, or F = E W with E symmetric).
template <typename T>
cudaError_t gram_of(const T* w, const T* f, T* out, int64_t out_bstride, int C, int M,
                    bool tokens, int64_t batch, Fp32Math math, cudaStream_t stream) {
  GramProductArgs<T> args = product_args<T>(M, M, out, out_bstride, M, batch);
  set_term(args, 0, features(w, C, M, tokens, false), features(f, C, M, tokens, false), C);
  args.upper = true;
  return launch_product(args, math, stream);
}

// centre_kernel with its grid.
template <typename T>
cudaError_t launch_centre(const T* f, const double* sums, T* out, int C, int M, bool tokens,
                          int64_t batch, cudaStream_t stream) {
  const int64_t total = batch * C * M;
  centre_kernel<T><<<elementwise_blocks(total), kThreads, 0, stream>>>(f, sums, out, C, M, tokens,
                                                                      total);
  return cudaGetLastError();
}

unsigned int sample_blocks(int64_t batch) {
  return static_cast<unsigned int>(batch < kMaxGridY ? batch : kMaxGridY);
}

// w = (x - channel means) / ||Xc|| and norm = ||Xc|| (sums: C doubles per sample).
template <typename T>
cudaError_t launch_normalise(const T* x, T* w, double* sums, double* norm, int C, int M,
                             bool tokens, int64_t batch, cudaStream_t stream) {
  const int64_t cm = static_cast<int64_t>(C) * M, total = batch * cm;
  channel_sums_kernel<T><<<sample_blocks(batch), kThreads, 0, stream>>>(x, sums, C, M, tokens,
                                                                        batch);
  MPNCOV_TRY(cudaGetLastError());
  MPNCOV_TRY(launch_centre(x, sums, w, C, M, tokens, batch, stream));
  norm_kernel<T><<<sample_blocks(batch), kThreads, 0, stream>>>(w, norm, cm, batch);
  MPNCOV_TRY(cudaGetLastError());
  divide_kernel<T><<<elementwise_blocks(total), kThreads, 0, stream>>>(w, norm, cm, total);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_scale_shift(const T* in, int64_t in_bstride, T* out, T alpha, T gamma,
                               int n, int64_t batch, cudaStream_t stream) {
  const int64_t total = batch * n * n;
  scale_shift_kernel<T><<<elementwise_blocks(total), kThreads, 0, stream>>>(
      in, in_bstride, out, alpha, gamma, n, total);
  return cudaGetLastError();
}

bool sizes_valid(int64_t batch, int64_t C, int64_t M, int64_t iters) {
  return batch >= 0 && fits_int(C) && fits_int(M) && M >= 1 && fits_int(C * (C + 1) / 2) &&
         iters >= 1 && iters <= kMaxIters;
}

// Where one sample's iterates are, as batches of M x M matrices: slot s of saved (batch
// stride sb), Z_1 and the T_k scratch (batch stride M M).
template <typename T>
struct GramSlots {
  T* saved;
  T* z1;
  T* t_scratch;
  int N;
  int64_t mm, sb;
  bool recompute_t;

  Mat<T> slot(int64_t s) const { return Mat<T>{saved + s * mm, sb}; }
  Mat<T> G() const { return slot(0); }
  Mat<T> Y(int k) const { return slot(k); }
  Mat<T> Z(int k) const {
    if (k == 1) return Mat<T>{z1, mm};
    return slot(recompute_t || k < N ? N + k - 2 : 3 * N - 3);
  }
  Mat<T> Tk(int k) const {
    return recompute_t ? Mat<T>{t_scratch, mm} : slot(2 * N - 3 + k);
  }
};

template <typename T>
T* writable(Mat<T> m) {
  return const_cast<T*>(m.p);
}

// T_k = 1.5 I - 0.5 Z_k Y_k into it.Tk(k).
template <typename T>
Job<T> t_job(const Runner<T>& run, const GramSlots<T>& it, int k, bool mirror_tz) {
  const Mat<T> t = it.Tk(k);
  return run.job(it.Z(k), k == 1 || mirror_tz, it.Y(k), T(-0.5), T(1.5), writable(t), t.bstride,
                 mirror_tz);
}

}  // namespace

template <typename T>
cudaError_t isqrt_cov_gram_forward(const T* x, bool tokens, T* vec, T* saved, T* work,
                                   int64_t batch, int64_t C, int64_t M, int64_t iters,
                                   bool recompute_t, Fp32Math math, cudaStream_t stream) {
  if (!sizes_valid(batch, C, M, iters)) return cudaErrorInvalidValue;
  if (batch == 0 || C == 0) return cudaSuccess;
  const int c = static_cast<int>(C), m = static_cast<int>(M), N = static_cast<int>(iters);
  const bool mirror_tz = mirrors_all_products(iters);
  const int64_t mm = M * M, cm = C * M;
  double* norm = reinterpret_cast<double*>(work);
  double* sums = norm + batch;
  T* w = work + gram_doubles_size<T>(batch * (C + 1));
  T* p = w + gram_padded(batch * cm);
  T* z1 = p + gram_padded(batch * cm);
  T* t_scratch = z1 + gram_padded(batch * mm);
  const GramSlots<T> it{saved, z1, t_scratch, N, mm,
                        isqrt_cov_gram_saved_slots(iters, recompute_t) * mm, recompute_t};
  const Runner<T> run{m, batch, math, stream};

  MPNCOV_TRY(launch_normalise(x, w, sums, norm, c, m, tokens, batch, stream));
  // G = W^T W into slot 0, Z_1 = 1.5 I - 0.5 G
  MPNCOV_TRY(gram_of(w, w, saved, it.sb, c, m, tokens, batch, math, stream));
  MPNCOV_TRY(launch_scale_shift(saved, it.sb, z1, T(-0.5), T(1.5), m, batch, stream));
  if (N >= 2) {
    // Y_1 = G Z_1 = 1.5 G - 0.5 G G
    Job<T> y1 = run.job(it.G(), true, it.G(), T(-0.5), T(0), writable(it.Y(1)), it.sb, true);
    y1.r = it.G();
    y1.beta = T(1.5);
    MPNCOV_TRY(run.launch(y1));
  }
  for (int k = 1; k <= N - 1; ++k) {
    MPNCOV_TRY(run.launch(t_job(run, it, k, mirror_tz)));
    // Z_{k+1} = T_k Z_k, and Y_{k+1} = Y_k T_k in the same launch unless k = N - 1.
    const Mat<T> zn = it.Z(k + 1);
    const Job<T> z = run.job(it.Tk(k), mirror_tz, it.Z(k), T(1), T(0), writable(zn), zn.bstride,
                             mirror_tz);
    if (k == N - 1) {
      MPNCOV_TRY(run.launch(z));
    } else {
      MPNCOV_TRY(run.launch_pair(
          run.job(it.Y(k), true, it.Tk(k), T(1), T(0), writable(it.Y(k + 1)), it.sb, true), z));
    }
  }
  // P = W R in x's layout, then vec = triuvec(s P W^T) from the upper tiles only.
  const Mat<T> r = it.Z(N);
  const T* const a[2] = {w, w};
  const T* const bm[2] = {r.p, r.p};
  const int64_t bs[2] = {r.bstride, r.bstride};
  MPNCOV_TRY(features_times_square(a, bm, bs, 1, T(1), p, c, m, tokens, batch, math, stream));
  GramProductArgs<T> out = product_args<T>(c, c, vec, C * (C + 1) / 2, 0, batch);
  set_term(out, 0, features<T>(p, c, m, tokens, true), features<T>(w, c, m, tokens, true), m);
  out.upper = true;
  out.epilogue = kTriuvec;
  out.norm = norm;
  out.root_m = sqrt(static_cast<double>(M));
  return launch_product(out, math, stream);
}

// D = L_r(G, H) by the forward-mode recurrence (newton_schulz.h), carried to dZ_N:
//   dZ_1 = -0.5 H,  dY_1 = 1.5 H - 0.5 (H G + G H)
//   dT_k = -0.5 (dZ_k Y_k + Z_k dY_k),  dY_{k+1} = dY_k T_k + Y_k dT_k,
//   dZ_{k+1} = dT_k Z_k + T_k dZ_k
// dY products are mirrored, dT and dZ in short mode only (like T and Z).
template <typename T>
cudaError_t isqrt_cov_gram_backward(const T* grad, const T* x, bool tokens, const T* saved,
                                    T* dx, T* work, int64_t batch, int64_t C, int64_t M,
                                    int64_t iters, bool recompute_t, Fp32Math math,
                                    cudaStream_t stream) {
  if (!sizes_valid(batch, C, M, iters)) return cudaErrorInvalidValue;
  if (batch == 0 || C == 0) return cudaSuccess;
  const int c = static_cast<int>(C), m = static_cast<int>(M), N = static_cast<int>(iters);
  const bool mirror_tz = mirrors_all_products(iters);
  const int64_t mm = M * M, cm = C * M, mmp = gram_padded(batch * mm);
  double* norm = reinterpret_cast<double*>(work);
  double* sums = norm + batch;
  T* w = work + gram_doubles_size<T>(batch * (C + 1));
  T* ew = w + gram_padded(batch * cm);
  T* e = ew + gram_padded(batch * cm);
  T* h = e + gram_padded(batch * C * C);
  T* z1 = h + mmp;
  T* dz[2] = {z1 + mmp, z1 + 2 * mmp};
  T* dy[2] = {z1 + 3 * mmp, z1 + 4 * mmp};
  T* dt = z1 + 5 * mmp;
  T* t_scratch = z1 + 6 * mmp;
  // The recurrence only reads saved; GramSlots also describes the forward's outputs.
  const GramSlots<T> it{const_cast<T*>(saved), z1, t_scratch, N, mm,
                        isqrt_cov_gram_saved_slots(iters, recompute_t) * mm, recompute_t};
  const Runner<T> run{m, batch, math, stream};
  auto scratch = [&](const T* p) { return Mat<T>{p, mm}; };

  MPNCOV_TRY(launch_normalise(x, w, sums, norm, c, m, tokens, batch, stream));
  const int64_t ecount = batch * C * C;
  sym_from_triangle_kernel<T><<<elementwise_blocks(ecount), kThreads, 0, stream>>>(grad, e, c,
                                                                                    ecount);
  MPNCOV_TRY(cudaGetLastError());
  // E W in x's layout (tokens: (E W)^T = W^T E), then H = W^T (E W).
  GramProductArgs<T> ewa = product_args<T>(tokens ? m : c, tokens ? c : m, ew, cm,
                                           tokens ? c : m, batch);
  const Side<T> es = square_side<T>(e, C * C, c);
  const Side<T> wp = features<T>(w, c, m, tokens, false);
  if (tokens) {
    set_term(ewa, 0, wp, es, c);
  } else {
    set_term(ewa, 0, es, wp, c);
  }
  MPNCOV_TRY(launch_product(ewa, math, stream));
  MPNCOV_TRY(gram_of<T>(w, ew, h, mm, c, m, tokens, batch, math, stream));
  // Z_1 from G, dZ_1 = -0.5 H (D itself for N = 1)
  MPNCOV_TRY(launch_scale_shift(saved, it.sb, z1, T(-0.5), T(1.5), m, batch, stream));
  MPNCOV_TRY(launch_scale_shift<T>(h, mm, dz[0], T(-0.5), T(0), m, batch, stream));
  int cy = 0, cz = 0;
  if (N >= 2) {
    Job<T> dy1 = Runner<T>::plus(run.job(scratch(h), true, it.G(), T(-0.5), T(0), dy[0], mm, true),
                                 it.G(), true, scratch(h));
    dy1.r = scratch(h);
    dy1.beta = T(1.5);
    MPNCOV_TRY(run.launch(dy1));
  }
  for (int k = 1; k <= N - 1; ++k) {
    if (recompute_t) MPNCOV_TRY(run.launch(t_job(run, it, k, mirror_tz)));
    const bool dz_sym = k == 1 || mirror_tz;
    MPNCOV_TRY(run.launch(Runner<T>::plus(
        run.job(scratch(dz[cz]), dz_sym, it.Y(k), T(-0.5), T(0), dt, mm, mirror_tz), it.Z(k),
        k == 1 || mirror_tz, scratch(dy[cy]))));
    const Job<T> dzn = Runner<T>::plus(
        run.job(scratch(dt), mirror_tz, it.Z(k), T(1), T(0), dz[1 - cz], mm, mirror_tz), it.Tk(k),
        mirror_tz, scratch(dz[cz]));
    if (k == N - 1) {
      MPNCOV_TRY(run.launch(dzn));
    } else {
      MPNCOV_TRY(run.launch_pair(
          Runner<T>::plus(run.job(scratch(dy[cy]), true, it.Tk(k), T(1), T(0), dy[1 - cy], mm, true),
                          it.Y(k), true, scratch(dt)),
          dzn));
      cy = 1 - cy;
    }
    cz = 1 - cz;
  }
  const T* d = dz[cz];
  // dx = (2 / sqrt M)(E W R + W D), then the W term and the centring.
  const Mat<T> r = it.Z(N);
  const double root_m = sqrt(static_cast<double>(M));
  const T* const a[2] = {ew, w};
  const T* const bm[2] = {r.p, d};
  const int64_t bs[2] = {r.bstride, mm};
  MPNCOV_TRY(features_times_square(a, bm, bs, 2, static_cast<T>(2 / root_m), dx, c, m, tokens,
                                   batch, math, stream));
  gram_finish_kernel<T><<<sample_blocks(batch), kThreads, 0, stream>>>(
      dx, w, h, r.p, r.bstride, saved, it.sb, d, sums, c, m, tokens, batch);
  MPNCOV_TRY(cudaGetLastError());
  return launch_centre<T>(dx, sums, dx, c, m, tokens, batch, stream);
}

template cudaError_t isqrt_cov_gram_forward<float>(const float*, bool, float*, float*, float*,
                                                   int64_t, int64_t, int64_t, int64_t, bool,
                                                   Fp32Math, cudaStream_t);
template cudaError_t isqrt_cov_gram_forward<double>(const double*, bool, double*, double*,
                                                    double*, int64_t, int64_t, int64_t, int64_t,
                                                    bool, Fp32Math, cudaStream_t);
template cudaError_t isqrt_cov_gram_backward<float>(const float*, const float*, bool,
                                                    const float*, float*, float*, int64_t,
                                                    int64_t, int64_t, int64_t, bool, Fp32Math,
                                                    cudaStream_t);
template cudaError_t isqrt_cov_gram_backward<double>(const double*, const double*, bool,
                                                     const double*, double*, double*, int64_t,
                                                     int64_t, int64_t, int64_t, bool, Fp32Math,
                                                     cudaStream_t);

}  // namespace cuda
}  // namespace mpncov

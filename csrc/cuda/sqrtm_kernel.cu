// sqrtm CUDA kernels (SPEC section 2).
//
// Every matrix product goes through one batched kernel with a fused epilogue:
//   out = a1 P1 Q1 + a2 P2 Q2 + beta R + gamma I
// (the second product and R optional). With `upper`, only tiles on or above the diagonal
// are computed and each value is also written to its mirror position: used where the
// result is symmetric (see sqrtm_kernel.cuh for which ones), which halves the work and
// makes the stored result exactly symmetric.
// a1, a2 are 1 or -0.5 here and are applied to P when it is staged (exact: powers of 2).
//
// Per-sample traces and <P, Q> are deterministic block reductions, one block per sample.
#include "sqrtm_kernel.cuh"

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

// A batch of n x n row-major matrices: sample b starts at p + b * bstride.
template <typename T>
struct Mat {
  const T* p;
  int64_t bstride;
};

template <typename T>
struct ProductArgs {
  Mat<T> p1, q1;  // a1 * P1 @ Q1
  T a1;
  Mat<T> p2, q2;  // + a2 * P2 @ Q2, skipped when p2.p == nullptr
  T a2;
  Mat<T> r;  // + beta * R, skipped when r.p == nullptr
  T beta;
  T gamma;  // + gamma * I
  T* out;   // must not alias any input
  int64_t out_bstride;
  int n;
  int64_t batch;
  bool upper;
};

template <typename T>
__global__ void __launch_bounds__(gemm::kBlock) product_kernel(const ProductArgs<T> args) {
  __shared__ Tiles<T> sm;
  const int n = args.n;
  const int tiles = gemm::tiles_for(n);
  int tr, tc;
  if (args.upper) {
    gemm::upper_tile(blockIdx.x, tiles, tr, tc);
  } else {
    tr = blockIdx.x / tiles;
    tc = blockIdx.x % tiles;
  }
  const int row0 = tr * kTile;
  const int col0 = tc * kTile;
  for (int64_t b = blockIdx.y; b < args.batch; b += gridDim.y) {
    T acc[kPerY][kPerX];
    gemm::zero(acc);
    {
      const Operand<T> p{args.p1.p + b * args.p1.bstride, nullptr, n, n, n, args.a1};
      const Operand<T> q{args.q1.p + b * args.q1.bstride, nullptr, n, n, n, T(1)};
      gemm::accumulate<T, false>(acc, sm, p, q, n, row0, col0);
    }
    if (args.p2.p != nullptr) {
      const Operand<T> p{args.p2.p + b * args.p2.bstride, nullptr, n, n, n, args.a2};
      const Operand<T> q{args.q2.p + b * args.q2.bstride, nullptr, n, n, n, T(1)};
      gemm::accumulate<T, false>(acc, sm, p, q, n, row0, col0);
    }
    const T* rb = args.r.p != nullptr ? args.r.p + b * args.r.bstride : nullptr;
    T* o = args.out + b * args.out_bstride;
#pragma unroll
    for (int r = 0; r < kPerY; ++r) {
      const int i = row0 + gemm::tile_row(r);
#pragma unroll
      for (int q = 0; q < kPerX; ++q) {
        const int j = col0 + gemm::tile_col(q);
        if (i >= n || j >= n) continue;
        if (args.upper && i > j) continue;  // only in diagonal tiles
        const int64_t ij = static_cast<int64_t>(i) * n + j;
        T v = acc[r][q];
        if (rb != nullptr) v += args.beta * rb[ij];
        if (i == j) v += args.gamma;
        o[ij] = v;
        if (args.upper) o[static_cast<int64_t>(j) * n + i] = v;
      }
    }
  }
}

// t[b] = sum_i s[b][i, i]; one block per sample.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    trace_kernel(const T* __restrict__ s, T* __restrict__ t, int n, int64_t batch) {
  __shared__ T scratch[32];
  const int64_t nn = static_cast<int64_t>(n) * n;
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    T v = T(0);
    for (int i = threadIdx.x; i < n; i += blockDim.x) v += s[b * nn + static_cast<int64_t>(i) * (n + 1)];
    v = block_sum(v, scratch);
    if (threadIdx.x == 0) t[b] = v;
  }
}

// out[b] = <P_b, Q_b> = sum_ij P_b[i, j] Q_b[i, j]; one block per sample.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    dot_kernel(Mat<T> p, Mat<T> q, T* __restrict__ out, int64_t nn, int64_t batch) {
  __shared__ T scratch[32];
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    const T* pb = p.p + b * p.bstride;
    const T* qb = q.p + b * q.bstride;
    T v = T(0);
    for (int64_t e = threadIdx.x; e < nn; e += blockDim.x) v += pb[e] * qb[e];
    v = block_sum(v, scratch);
    if (threadIdx.x == 0) out[b] = v;
  }
}

// Element (i, j) of the symmetric part of a row-major n x n matrix: 0.5 (m_ij + m_ji),
// exactly symmetric (addition commutes). Where m_ij == m_ji it is m_ij itself, also when
// m_ij + m_ji would overflow.
template <typename T>
__device__ __forceinline__ T sym_part(const T* m, int64_t i, int64_t j, int n) {
  const T u = m[i * n + j];
  const T l = m[j * n + i];
  return u == l ? u : T(0.5) * (u + l);
}

// A = Ssym / t and T0 = 0.5 (3I - A) (written with batch stride t0_bstride).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_prep_kernel(const T* __restrict__ s, const T* __restrict__ t, T* __restrict__ a,
                        T* __restrict__ t0, int64_t t0_bstride, int n, int64_t total) {
  const int64_t nn = static_cast<int64_t>(n) * n;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const auto [b, i, j] = matrix_index(idx, n);
    const T v = sym_part(s + b * nn, i, j, n) / safe_trace(t[b]);
    a[idx] = v;
    t0[b * t0_bstride + i * n + j] = T(0.5) * ((i == j ? T(3) : T(0)) - v);
  }
}

// out = sqrt(t) Y (Y read with batch stride y_bstride).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    scale_kernel(const T* __restrict__ y, int64_t y_bstride, const T* __restrict__ t,
                 T* __restrict__ out, int n, int64_t total) {
  const int64_t nn = static_cast<int64_t>(n) * n;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / nn;
    const int64_t rem = idx - b * nn;
    out[idx] = dev_sqrt(safe_trace(t[b])) * y[b * y_bstride + rem];
  }
}

// A = Ssym / t and GY = sqrt(t) (G + G^T) / 2. t < 0 makes GY (and so dS) NaN.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_prep_kernel(const T* __restrict__ g, const T* __restrict__ s,
                         const T* __restrict__ t, T* __restrict__ a, T* __restrict__ gy, int n,
                         int64_t total) {
  const int64_t nn = static_cast<int64_t>(n) * n;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const auto [b, i, j] = matrix_index(idx, n);
    const T tt = safe_trace(t[b]);
    a[idx] = sym_part(s + b * nn, i, j, n) / tt;
    gy[idx] = dev_sqrt(tt) * sym_part(g + b * nn, i, j, n);
  }
}

// dS = dA / t + (gdot / (2 sqrt t) - adot / t) I; dS = 0 where t = 0 (t < 0 is not
// caught: its dA is NaN already). Every term divides by t, so a denormal t stays finite.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_final_kernel(const T* __restrict__ da, const T* __restrict__ t,
                          const T* __restrict__ gdot, const T* __restrict__ adot,
                          T* __restrict__ ds, int n, int64_t total) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const auto [b, i, j] = matrix_index(idx, n);
    const T tb = t[b];
    if (tb == T(0)) {
      ds[idx] = T(0);
      continue;
    }
    T v = da[idx] / tb;
    if (i == j) v += gdot[b] / (T(2) * dev_sqrt(tb)) - adot[b] / tb;
    ds[idx] = v;
  }
}

// Host-side helper that issues the batched products of one sample layout.
template <typename T>
struct Runner {
  int n;
  int64_t batch;
  cudaStream_t stream;

  // out = a1 P1 Q1 [+ a2 P2 Q2] [+ beta R] + gamma I
  cudaError_t product(Mat<T> p1, Mat<T> q1, T a1, Mat<T> p2, Mat<T> q2, T a2, Mat<T> r, T beta,
                      T gamma, T* out, int64_t out_bstride, bool upper) const {
    const int64_t blocks = gemm::square_tile_blocks(n, upper);
    if (!fits_int(blocks)) return cudaErrorInvalidValue;
    const ProductArgs<T> args{p1, q1, a1, p2, q2, a2, r, beta, gamma, out, out_bstride,
                              n, batch, upper};
    const dim3 grid(static_cast<unsigned int>(blocks), grid_y_for_batch(batch));
    product_kernel<T><<<grid, gemm::kBlock, 0, stream>>>(args);
    return cudaGetLastError();
  }
  // out = a1 P1 Q1 + gamma I
  cudaError_t product(Mat<T> p1, Mat<T> q1, T a1, T gamma, T* out, int64_t out_bstride,
                      bool upper) const {
    return product(p1, q1, a1, none(), none(), T(0), none(), T(0), gamma, out, out_bstride,
                   upper);
  }
  static Mat<T> none() { return Mat<T>{nullptr, 0}; }

  unsigned int sample_blocks() const {
    return static_cast<unsigned int>(batch < kMaxElementwiseBlocks ? batch
                                                                   : kMaxElementwiseBlocks);
  }
  cudaError_t trace(const T* s, T* t) const {
    trace_kernel<T><<<sample_blocks(), kThreads, 0, stream>>>(s, t, n, batch);
    return cudaGetLastError();
  }
  cudaError_t dot(Mat<T> p, Mat<T> q, T* out) const {
    dot_kernel<T><<<sample_blocks(), kThreads, 0, stream>>>(p, q, out,
                                                            static_cast<int64_t>(n) * n, batch);
    return cudaGetLastError();
  }
};

#define MPNCOV_TRY(expr)                  \
  do {                                    \
    const cudaError_t err_ = (expr);      \
    if (err_ != cudaSuccess) return err_; \
  } while (0)

}  // namespace

template <typename T>
cudaError_t sqrtm_forward(const T* s, T* out, T* saved, T* work, int64_t batch, int64_t n,
                          int64_t iters, cudaStream_t stream) {
  if (batch == 0 || n == 0) return cudaSuccess;
  if (batch < 0 || !fits_int(n) || !sqrtm_iters_valid(iters)) return cudaErrorInvalidValue;
  const int N = static_cast<int>(iters);
  const bool mirror_tz = sqrtm_mirrors_tz(iters);
  const int64_t nn = n * n;
  const int64_t sb = sqrtm_saved_slots(iters) * nn;  // batch stride of saved
  const int64_t total = batch * nn;
  const Runner<T> run{static_cast<int>(n), batch, stream};

  // saved slots: Y_k = k-1, Z_k = N-1 + k-1, T_k = 2(N-1) + k-1 (k = 1..N-1), Y = 3(N-1).
  auto Y = [&](int k) { return saved + (k - 1) * nn; };
  auto Z = [&](int k) { return saved + (N - 1 + k - 1) * nn; };
  auto Tm = [&](int k) { return saved + (2 * (N - 1) + k - 1) * nn; };
  T* y_final = saved + 3 * (N - 1) * nn;
  auto S = [&](const T* p) { return Mat<T>{p, sb}; };  // a slot of saved

  T* t = work;
  T* a = work + sqrtm_scalar_block(batch, 1);
  // T0 = 0.5 (3I - A): in saved as Z_1 when N >= 2, else in scratch.
  T* t0 = N == 1 ? a + total : Z(1);
  const int64_t t0_bstride = N == 1 ? nn : sb;

  MPNCOV_TRY(run.trace(s, t));
  forward_prep_kernel<T><<<elementwise_blocks(total), kThreads, 0, stream>>>(
      s, t, a, t0, t0_bstride, static_cast<int>(n), total);
  MPNCOV_TRY(cudaGetLastError());
  // Y_1 = A T0 (slot 0: Y_1 when N >= 2, the final Y when N = 1).
  MPNCOV_TRY(run.product(Mat<T>{a, nn}, Mat<T>{t0, t0_bstride}, T(1), T(0), saved, sb, true));
  for (int k = 1; k <= N - 2; ++k) {
    // T_k = 0.5 (3I - Z_k Y_k); Y_{k+1} = Y_k T_k; Z_{k+1} = T_k Z_k.
    MPNCOV_TRY(run.product(S(Z(k)), S(Y(k)), T(-0.5), T(1.5), Tm(k), sb, mirror_tz));
    MPNCOV_TRY(run.product(S(Y(k)), S(Tm(k)), T(1), T(0), Y(k + 1), sb, true));
    MPNCOV_TRY(run.product(S(Tm(k)), S(Z(k)), T(1), T(0), Z(k + 1), sb, mirror_tz));
  }
  if (N >= 2) {
    // T_{N-1} = 0.5 (3I - Z_{N-1} Y_{N-1}); Y = Y_{N-1} T_{N-1}.
    MPNCOV_TRY(run.product(S(Z(N - 1)), S(Y(N - 1)), T(-0.5), T(1.5), Tm(N - 1), sb, mirror_tz));
    MPNCOV_TRY(run.product(S(Y(N - 1)), S(Tm(N - 1)), T(1), T(0), y_final, sb, true));
  }
  scale_kernel<T><<<elementwise_blocks(total), kThreads, 0, stream>>>(
      y_final, sb, t, out, static_cast<int>(n), total);
  return cudaGetLastError();
}

// dA from GY = sqrt(t) sym(G) by forward-mode differentiation along E = GY. Y_N is a
// polynomial in A, and at symmetric A the Frechet derivative L(A, .) of a polynomial is
// self-adjoint and commutes with transposition, so dA = L(A, sym(G) sqrt t) is the exact
// gradient of f(sym(S)) for any G. Along a symmetric E every derivative is symmetric:
//   dY1 = 1.5 E - 0.5 (E A + A E),  dZ1 = -0.5 E      (N = 1: dA = dY1)
//   k = 1..N-1: dT = -0.5 (dZk Yk + Zk dYk);  dY(k+1) = dYk Tk + Yk dT;
//               dZ(k+1) = dT Zk + Tk dZk (k < N-1);   dA = dY_N
// dY products are mirrored; dT and dZ are mirrored in short mode and full in long mode
// (see sqrtm_kernel.cuh).
template <typename T>
cudaError_t sqrtm_backward(const T* grad, const T* s, const T* saved, T* grad_s, T* work,
                           int64_t batch, int64_t n, int64_t iters, cudaStream_t stream) {
  if (batch == 0 || n == 0) return cudaSuccess;
  if (batch < 0 || !fits_int(n) || !sqrtm_iters_valid(iters)) return cudaErrorInvalidValue;
  const int N = static_cast<int>(iters);
  const bool mirror_tz = sqrtm_mirrors_tz(iters);
  const int64_t nn = n * n;
  const int64_t sb = sqrtm_saved_slots(iters) * nn;
  const int64_t total = batch * nn;
  const Runner<T> run{static_cast<int>(n), batch, stream};

  auto S = [&](int64_t slot) { return Mat<T>{saved + slot * nn, sb}; };
  auto Y = [&](int k) { return S(k - 1); };
  auto Z = [&](int k) { return S(N - 1 + k - 1); };
  auto Tm = [&](int k) { return S(2 * (N - 1) + k - 1); };
  const Mat<T> y_final = S(3 * (N - 1));
  auto W = [&](const T* p) { return Mat<T>{p, nn}; };  // a scratch matrix (or grad)
  const Mat<T> none = Runner<T>::none();

  T* t = work;
  T* gdot = work + batch;
  T* adot = work + 2 * batch;
  T* m0 = work + sqrtm_scalar_block(batch, 3);
  T* a = m0;
  T* gy = m0 + total;
  T* dt = m0 + 2 * total;
  // The gradients dY, dZ and their ping-pong copies (sqrtm_backward_matrices): only the
  // ones the recurrence of this N uses exist.
  auto slot = [&](int i) -> T* {
    return 3 + i < sqrtm_backward_matrices(iters) ? m0 + (3 + i) * total : nullptr;
  };

  MPNCOV_TRY(run.trace(s, t));
  backward_prep_kernel<T><<<elementwise_blocks(total), kThreads, 0, stream>>>(
      grad, s, t, a, gy, static_cast<int>(n), total);
  MPNCOV_TRY(cudaGetLastError());
  MPNCOV_TRY(run.dot(W(grad), y_final, gdot));

  T* dy[2] = {N == 1 ? dt : slot(0), slot(1)};
  T* dz[2] = {slot(2), slot(3)};
  // dY1 = 1.5 E - 0.5 (E A + A E)
  MPNCOV_TRY(run.product(W(gy), W(a), T(-0.5), W(a), W(gy), T(-0.5), W(gy), T(1.5), T(0), dy[0],
                         nn, true));
  int cy = 0, cz = 0;
  for (int k = 1; k <= N - 1; ++k) {
    // dT = -0.5 (dZk Yk + Zk dYk); at k = 1, dZ1 = -0.5 E is folded into the coefficient.
    const Mat<T> dzk = k == 1 ? W(gy) : W(dz[cz]);
    const T c_dz = k == 1 ? T(0.25) : T(-0.5);
    MPNCOV_TRY(run.product(dzk, Y(k), c_dz, Z(k), W(dy[cy]), T(-0.5), none, T(0), T(0), dt, nn,
                           mirror_tz));
    // dY(k+1) = dYk Tk + Yk dT
    MPNCOV_TRY(run.product(W(dy[cy]), Tm(k), T(1), Y(k), W(dt), T(1), none, T(0), T(0),
                           dy[1 - cy], nn, true));
    cy = 1 - cy;
    if (k < N - 1) {
      // dZ(k+1) = dT Zk + Tk dZk
      T* dz_next = k == 1 ? dz[0] : dz[1 - cz];
      MPNCOV_TRY(run.product(W(dt), Z(k), T(1), Tm(k), dzk, k == 1 ? T(-0.5) : T(1), none,
                             T(0), T(0), dz_next, nn, mirror_tz));
      cz = k == 1 ? 0 : 1 - cz;
    }
  }
  const T* da = dy[cy];
  MPNCOV_TRY(run.dot(W(da), W(a), adot));
  backward_final_kernel<T><<<elementwise_blocks(total), kThreads, 0, stream>>>(
      da, t, gdot, adot, grad_s, static_cast<int>(n), total);
  return cudaGetLastError();
}

template cudaError_t sqrtm_forward<float>(const float*, float*, float*, float*, int64_t, int64_t,
                                          int64_t, cudaStream_t);
template cudaError_t sqrtm_forward<double>(const double*, double*, double*, double*, int64_t,
                                           int64_t, int64_t, cudaStream_t);
template cudaError_t sqrtm_backward<float>(const float*, const float*, const float*, float*,
                                           float*, int64_t, int64_t, int64_t, cudaStream_t);
template cudaError_t sqrtm_backward<double>(const double*, const double*, const double*, double*,
                                            double*, int64_t, int64_t, int64_t, cudaStream_t);

}  // namespace cuda
}  // namespace mpncov

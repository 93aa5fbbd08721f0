// sqrtm CUDA kernels (SPEC section 2).
//
// Every matrix product goes through the batched square-product kernel with its fused
// epilogue (square_products.cuh): Y, Z and T products (and dY, dZ, dT in the backward),
// mirrored where the result is symmetric (see sqrtm_kernel.cuh for which ones). A, E and
// every mirrored result are exactly symmetric and read as their transposes.
//
// Per-sample scalars: the trace is computed by every block of the prep kernel that needs
// it (n diagonal reads); <G, Y> and <dS, A> are summed per tile in fixed order inside the
// kernels that already read those matrices, and the partial sums are added in fixed tile
// order by the kernel that uses them. No atomics: results are bitwise reproducible.
#include "sqrtm_kernel.cuh"

#include "batched_gemm.cuh"
#include "common.cuh"
#include "sqrtm_on_chip.cuh"
#include "square_products.cuh"

namespace mpncov {
namespace cuda {
namespace {

constexpr int kPrepTile = 32;
constexpr int kPrepThreads = 256;

// Grid of sym_prep_kernel: its pairs of tiles per sample, the batch along y.
template <typename T>
dim3 prep_grid(const Runner<T>& run) {
  return dim3(static_cast<unsigned int>(sqrtm_prep_pairs(run.n)), grid_y_for_batch(run.batch));
}

// Per sample b and pair of 32-tiles (ti, tj), ti <= tj (blockIdx.x, numbered as
// gemm::upper_tile does): t = tr(S) (every block sums the diagonal; blocks with
// blockIdx.x = 0 store it), A = sym(S) / t at both tiles, and
//   forward:  T0 = 0.5 (3I - A)  into t0e (batch stride t0e_bstride)
//   backward: E = sqrt(t) sym(G) into t0e, dZ1 = -0.5 E into dz1 (unless nullptr), and
//             the partial sum of G o Y over both tiles into gpart[b * pairs + pair]
//             (Y = Y_N from saved).
// Tiles are read coalesced into shared memory, so both M(i, j) and M(j, i) are at hand.
template <typename T, bool kBackward>
__global__ void __launch_bounds__(kPrepThreads)
    sym_prep_kernel(const T* __restrict__ s, const T* __restrict__ g, Mat<T> y,
                    T* __restrict__ t_out, T* __restrict__ a, T* __restrict__ t0e,
                    int64_t t0e_bstride, T* __restrict__ dz1, T* __restrict__ gpart, int n,
                    int64_t batch) {
  constexpr int P = kPrepTile;
  __shared__ T su[P][P + 1], sl[P][P + 1];  // S(ti, tj) and S(tj, ti) tiles
  __shared__ T gu[kBackward ? P : 1][P + 1], gl[kBackward ? P : 1][P + 1];
  __shared__ T scratch[32];
  const int pairs_side = (n + P - 1) / P;
  int ti, tj;
  gemm::upper_tile(blockIdx.x, pairs_side, ti, tj);
  const int tx = threadIdx.x % P;
  const int ty = threadIdx.x / P;
  constexpr int kRowsPerPass = kPrepThreads / P;
  const int64_t nn = static_cast<int64_t>(n) * n;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const T* sb = s + b * nn;
    T tv = T(0);
    for (int i = threadIdx.x; i < n; i += kPrepThreads) tv += sb[static_cast<int64_t>(i) * (n + 1)];
    const T t = block_sum(tv, scratch);  // its barriers also order the tile reuse below
    if (blockIdx.x == 0 && threadIdx.x == 0) t_out[b] = t;
    const T tt = safe_trace(t);
    const T root = dev_sqrt(tt);
    for (int r = ty; r < P; r += kRowsPerPass) {
      const int iu = ti * P + r, ju = tj * P + tx;  // (ti, tj) tile
      const int il = tj * P + r, jl = ti * P + tx;  // (tj, ti) tile
      const bool inu = iu < n && ju < n, inl = il < n && jl < n;
      su[r][tx] = inu ? sb[static_cast<int64_t>(iu) * n + ju] : T(0);
      sl[r][tx] = inl ? sb[static_cast<int64_t>(il) * n + jl] : T(0);
      if (kBackward) {
        gu[r][tx] = inu ? g[b * nn + static_cast<int64_t>(iu) * n + ju] : T(0);
        gl[r][tx] = inl ? g[b * nn + static_cast<int64_t>(il) * n + jl] : T(0);
      }
    }
    __syncthreads();
    T gy = T(0);
    // Element (i, j) with M(i, j) = mu, M(j, i) = ml for S (and G).
    auto visit = [&](int i, int j, T mu, T ml, T gu_, T gl_) {
      if (i >= n || j >= n) return;
      const T av = sym_value(mu, ml) / tt;
      a[b * nn + static_cast<int64_t>(i) * n + j] = av;
      const int64_t e = b * t0e_bstride + static_cast<int64_t>(i) * n + j;
      if (kBackward) {
        const T ev = root * sym_value(gu_, gl_);
        t0e[e] = ev;
        if (dz1 != nullptr) dz1[e] = T(-0.5) * ev;
        gy += gu_ * y.p[b * y.bstride + static_cast<int64_t>(i) * n + j];
      } else {
        t0e[e] = T(0.5) * ((i == j ? T(3) : T(0)) - av);
      }
    };
    for (int r = ty; r < P; r += kRowsPerPass) {
      // (ti P + r, tj P + tx) in tile (ti, tj), and (tj P + r, ti P + tx) in (tj, ti).
      visit(ti * P + r, tj * P + tx, su[r][tx], sl[tx][r], kBackward ? gu[r][tx] : T(0),
            kBackward ? gl[tx][r] : T(0));
      if (ti != tj)
        visit(tj * P + r, ti * P + tx, sl[r][tx], su[tx][r], kBackward ? gl[r][tx] : T(0),
              kBackward ? gu[tx][r] : T(0));
    }
    if (kBackward) {
      gy = block_sum(gy, scratch);
      if (threadIdx.x == 0) gpart[b * gridDim.x + blockIdx.x] = gy;
    }
    __syncthreads();  // the tiles are rewritten for the next sample
  }
}

// dS_ii += <G, Y> / (2 sqrt t) - <dS, A> for every sample with t != 0, where dS = dA / t
// already holds the rest (and is 0 where t = 0, NaN where t < 0), <G, Y> and <dS, A> are
// the fixed-order sums of their partials. total = batch * n (one thread per diagonal
// element). Dividing by t, never multiplying by 1/t, keeps a denormal t finite.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_diag_kernel(T* __restrict__ ds, const T* __restrict__ t,
                         const T* __restrict__ gpart, int gparts, const T* __restrict__ apart,
                         int aparts, int n, int64_t total) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / n;
    const int64_t i = idx - b * n;
    const T tb = t[b];
    if (tb == T(0)) continue;
    T gdot = T(0), adot = T(0);
    for (int p = 0; p < gparts; ++p) gdot += gpart[b * gparts + p];
    for (int p = 0; p < aparts; ++p) adot += apart[b * aparts + p];
    ds[b * n * n + i * (n + 1)] += gdot / (T(2) * dev_sqrt(tb)) - adot;
  }
}


}  // namespace

template <typename T>
SqrtmPath sqrtm_path(int64_t n, int64_t iters, bool backward, bool allow_on_chip) {
  return allow_on_chip && sqrtm_on_chip_fits<T>(n, iters, backward) ? SqrtmPath::kOnChip
                                                                     : SqrtmPath::kTiled;
}

template <typename T>
cudaError_t sqrtm_forward(const T* s, T* out, T* saved, T* work, int64_t batch, int64_t n,
                          int64_t iters, SqrtmPath path, Fp32Math math, cudaStream_t stream) {
  if (batch == 0 || n == 0) return cudaSuccess;
  if (batch < 0 || !fits_int(n) || !sqrtm_iters_valid(iters)) return cudaErrorInvalidValue;
  if (path == SqrtmPath::kOnChip)
    return sqrtm_on_chip_forward(s, out, saved, batch, n, iters, stream);
  const int N = static_cast<int>(iters);
  const bool mirror_tz = sqrtm_mirrors_tz(iters);
  const int64_t nn = n * n;
  const int64_t sb = sqrtm_saved_slots(iters) * nn;  // batch stride of saved
  const Runner<T> run{static_cast<int>(n), batch, math, stream};

  // saved slots: Y_k = k-1, Z_k = N-1 + k-1, T_k = 2(N-1) + k-1 (k = 1..N-1), Y = 3(N-1).
  auto Y = [&](int k) { return saved + (k - 1) * nn; };
  auto Z = [&](int k) { return saved + (N - 1 + k - 1) * nn; };
  auto Tm = [&](int k) { return saved + (2 * (N - 1) + k - 1) * nn; };
  T* y_final = saved + 3 * (N - 1) * nn;
  auto S = [&](const T* p) { return Mat<T>{p, sb}; };  // a slot of saved

  T* t = work;
  T* a = work + sqrtm_scalar_block(batch, 1);
  // T0 = 0.5 (3I - A): in saved as Z_1 when N >= 2, else in scratch.
  T* t0 = N == 1 ? a + batch * nn : Z(1);
  const int64_t t0_bstride = N == 1 ? nn : sb;
  // Exactly symmetric: A, T0 = Z_1 and every Y_k; Z_k and T_k in short mode.
  auto z_sym = [&](int k) { return mirror_tz || k == 1; };

  sym_prep_kernel<T, false><<<prep_grid(run), kPrepThreads, 0, stream>>>(
      s, nullptr, Runner<T>::none(), t, a, t0, t0_bstride, nullptr, nullptr, static_cast<int>(n),
      batch);
  MPNCOV_TRY(cudaGetLastError());
  // Y_1 = A T0 (the final Y when N = 1, with out = sqrt(t) Y).
  Job<T> y1 = run.job(Mat<T>{a, nn}, true, Mat<T>{t0, t0_bstride}, T(1), T(0), saved, sb, true);
  if (N == 1) {
    y1.out2_kind = kOut2TimesSqrtTrace;
    y1.out2 = out;
    y1.out2_bstride = nn;
    y1.trace = t;
  }
  MPNCOV_TRY(run.launch(y1));
  for (int k = 1; k <= N - 1; ++k) {
    // T_k = 1.5 I - 0.5 Z_k Y_k
    MPNCOV_TRY(run.launch(
        run.job(S(Z(k)), z_sym(k), S(Y(k)), T(-0.5), T(1.5), Tm(k), sb, mirror_tz)));
    // Y_{k+1} = Y_k T_k (the final Y at k = N-1, with out = sqrt(t) Y)
    Job<T> yn = run.job(S(Y(k)), true, S(Tm(k)), T(1), T(0), k == N - 1 ? y_final : Y(k + 1),
                        sb, true);
    if (k == N - 1) {
      yn.out2_kind = kOut2TimesSqrtTrace;
      yn.out2 = out;
      yn.out2_bstride = nn;
      yn.trace = t;
      MPNCOV_TRY(run.launch(yn));
    } else {
      // Z_{k+1} = T_k Z_k, in the same launch.
      MPNCOV_TRY(run.launch_pair(
          yn, run.job(S(Tm(k)), mirror_tz, S(Z(k)), T(1), T(0), Z(k + 1), sb, mirror_tz)));
    }
  }
  return cudaSuccess;
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
                           int64_t batch, int64_t n, int64_t iters, SqrtmPath path,
                           Fp32Math math, cudaStream_t stream) {
  if (batch == 0 || n == 0) return cudaSuccess;
  if (batch < 0 || !fits_int(n) || !sqrtm_iters_valid(iters)) return cudaErrorInvalidValue;
  if (path == SqrtmPath::kOnChip)
    return sqrtm_on_chip_backward(grad, s, saved, grad_s, batch, n, iters, stream);
  const int N = static_cast<int>(iters);
  const bool mirror_tz = sqrtm_mirrors_tz(iters);
  const int64_t nn = n * n;
  const int64_t sb = sqrtm_saved_slots(iters) * nn;
  const int64_t total = batch * nn;
  const Runner<T> run{static_cast<int>(n), batch, math, stream};

  auto S = [&](int64_t slot) { return Mat<T>{saved + slot * nn, sb}; };
  auto Y = [&](int k) { return S(k - 1); };
  auto Z = [&](int k) { return S(N - 1 + k - 1); };
  auto Tm = [&](int k) { return S(2 * (N - 1) + k - 1); };
  const Mat<T> y_final = S(3 * (N - 1));
  auto W = [&](const T* p) { return Mat<T>{p, nn}; };  // a scratch matrix
  auto z_sym = [&](int k) { return mirror_tz || k == 1; };

  const int64_t gparts = sqrtm_prep_pairs(n);
  const int64_t aparts = gemm::square_tile_blocks(n, true);
  T* t = work;
  T* gpart = t + batch;
  T* apart = gpart + batch * gparts;
  T* m0 = work + sqrtm_backward_scalars(batch, n);
  T* a = m0;
  T* e = m0 + total;
  T* dt = m0 + 2 * total;
  // dY, dZ and their ping-pong copies (sqrtm_backward_matrices): only the ones the
  // recurrence of this N uses exist.
  auto slot = [&](int i) -> T* {
    return 3 + i < sqrtm_backward_matrices(iters) ? m0 + (3 + i) * total : nullptr;
  };

  T* dy[2] = {slot(0), slot(1)};
  T* dz[2] = {slot(2), slot(3)};  // dz[0] = dZ1 = -0.5 E, written by the prep kernel
  sym_prep_kernel<T, true><<<prep_grid(run), kPrepThreads, 0, stream>>>(
      s, grad, y_final, t, a, e, nn, dz[0], gpart, static_cast<int>(n), batch);
  MPNCOV_TRY(cudaGetLastError());

  // The last product writes dS = dA / t and the partial sums of <dS, A>, not dA.
  auto last = [&](Job<T> j) {
    j.out = nullptr;
    j.out2_kind = kOut2OverTrace;
    j.out2 = grad_s;
    j.out2_bstride = nn;
    j.trace = t;
    j.dot_with = W(a);
    j.dot_part = apart;
    return j;
  };
  // dY1 = 1.5 E - 0.5 (E A + A E)
  Job<T> dy1 = Runner<T>::plus(run.job(W(e), true, W(a), T(-0.5), T(0), dy[0], nn, true), W(a),
                               true, W(e));
  dy1.r = W(e);
  dy1.beta = T(1.5);
  MPNCOV_TRY(run.launch(N == 1 ? last(dy1) : dy1));
  int cy = 0, cz = 0;
  for (int k = 1; k <= N - 1; ++k) {
    // dT = -0.5 (dZk Yk + Zk dYk)
    const bool dzk_sym = k == 1 || mirror_tz;
    MPNCOV_TRY(run.launch(Runner<T>::plus(
        run.job(W(dz[cz]), dzk_sym, Y(k), T(-0.5), T(0), dt, nn, mirror_tz), Z(k), z_sym(k),
        W(dy[cy]))));
    // dY(k+1) = dYk Tk + Yk dT
    Job<T> dyn = Runner<T>::plus(run.job(W(dy[cy]), true, Tm(k), T(1), T(0), dy[1 - cy], nn, true),
                                 Y(k), true, W(dt));
    if (k == N - 1) {
      MPNCOV_TRY(run.launch(last(dyn)));
    } else {
      // dZ(k+1) = dT Zk + Tk dZk, in the same launch.
      MPNCOV_TRY(run.launch_pair(
          dyn, Runner<T>::plus(run.job(W(dt), mirror_tz, Z(k), T(1), T(0), dz[1 - cz], nn,
                                       mirror_tz),
                               Tm(k), mirror_tz, W(dz[cz]))));
      cz = 1 - cz;
    }
    cy = 1 - cy;
  }
  const int64_t diag = batch * n;
  backward_diag_kernel<T><<<elementwise_blocks(diag), kThreads, 0, stream>>>(
      grad_s, t, gpart, static_cast<int>(gparts), apart, static_cast<int>(aparts),
      static_cast<int>(n), diag);
  return cudaGetLastError();
}

template SqrtmPath sqrtm_path<float>(int64_t, int64_t, bool, bool);
template SqrtmPath sqrtm_path<double>(int64_t, int64_t, bool, bool);
template cudaError_t sqrtm_forward<float>(const float*, float*, float*, float*, int64_t, int64_t,
                                          int64_t, SqrtmPath, Fp32Math, cudaStream_t);
template cudaError_t sqrtm_forward<double>(const double*, double*, double*, double*, int64_t,
                                           int64_t, int64_t, SqrtmPath, Fp32Math, cudaStream_t);
template cudaError_t sqrtm_backward<float>(const float*, const float*, const float*, float*,
                                           float*, int64_t, int64_t, int64_t, SqrtmPath,
                                           Fp32Math, cudaStream_t);
template cudaError_t sqrtm_backward<double>(const double*, const double*, const double*, double*,
                                            double*, int64_t, int64_t, int64_t, SqrtmPath,
                                            Fp32Math, cudaStream_t);

}  // namespace cuda
}  // namespace mpncov

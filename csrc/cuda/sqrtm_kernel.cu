// sqrtm CUDA kernels (SPEC section 2).
//
// Every matrix product goes through one batched kernel with a fused epilogue:
//   out = alpha (P1 Q1 [+ P2 Q2]) [+ beta R] + gamma I,   out2 = f(t) * out
// One launch runs one or two such jobs (Y and Z of a forward step, dY and dZ of a backward
// step are independent given T / dT). With `upper`, only tiles on or above the diagonal
// are computed and each value is also written to its mirror position: used where the
// result is symmetric (see sqrtm_kernel.cuh for which ones), which halves the work and
// makes the stored result exactly symmetric. alpha is 1 or -0.5 (a power of 2, so
// scaling the sum equals summing scaled products, bit for bit). An operand known to be exactly
// symmetric (a mirrored result, A, E) is read as its transpose, which the staging loads
// as vectors along the tile (see batched_gemm.cuh).
//
// Per-sample scalars: the trace is computed by every block of the prep kernel that needs
// it (n diagonal reads); <G, Y> and <dS, A> are summed per tile in fixed order inside the
// kernels that already read those matrices, and the partial sums are added in fixed tile
// order by the kernel that uses them. No atomics: results are bitwise reproducible.
#include "sqrtm_kernel.cuh"

#include "batched_gemm.cuh"
#include "common.cuh"

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

template <typename T>
__global__ void __launch_bounds__(gemm::kBlock, sizeof(T) == 4 ? gemm::kMinBlocksFloat : 1)
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
    gemm::accumulate(acc, sm, terms, row0, col0);

    const T tb = job.trace != nullptr ? job.trace[b] : T(0);
    const T root = dev_sqrt(safe_trace(tb));
    const T* rb = job.r.p != nullptr ? job.r.p + b * job.r.bstride : nullptr;
    const T* db = job.dot_part != nullptr ? job.dot_with.p + b * job.dot_with.bstride : nullptr;
    T* ob = job.out != nullptr ? job.out + b * job.out_bstride : nullptr;
    T* o2b = job.out2 != nullptr ? job.out2 + b * job.out2_bstride : nullptr;
    T dot = T(0);
    gemm::epilogue(sm, acc, row0, col0, job.upper, [&](int i, int j, T(&v)[4], bool mirrored) {
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

// Element (i, j) of the symmetric part of a matrix from its tiles: u = M(i, j),
// l = M(j, i); exactly symmetric (addition commutes), and u itself where u == l (also
// when u + l would overflow).
template <typename T>
__device__ __forceinline__ T sym_value(T u, T l) {
  return u == l ? u : T(0.5) * (u + l);
}

constexpr int kPrepTile = 32;
constexpr int kPrepThreads = 256;

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

// Host side: builds and launches jobs for one batch of n x n matrices.
template <typename T>
struct Runner {
  int n;
  int64_t batch;
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
    product_kernel<T><<<grid, gemm::kBlock, 0, stream>>>(args);
    return cudaGetLastError();
  }
  cudaError_t launch_pair(Job<T> j0, Job<T> j1) const { return launch(j0, &j1); }

  // Blocks of sym_prep_kernel per sample.
  int prep_pairs() const { return static_cast<int>(sqrtm_prep_pairs(n)); }
  dim3 prep_grid() const {
    return dim3(static_cast<unsigned int>(prep_pairs()), grid_y_for_batch(batch));
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
  T* t0 = N == 1 ? a + batch * nn : Z(1);
  const int64_t t0_bstride = N == 1 ? nn : sb;
  // Exactly symmetric: A, T0 = Z_1 and every Y_k; Z_k and T_k in short mode.
  auto z_sym = [&](int k) { return mirror_tz || k == 1; };

  sym_prep_kernel<T, false><<<run.prep_grid(), kPrepThreads, 0, stream>>>(
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
  sym_prep_kernel<T, true><<<run.prep_grid(), kPrepThreads, 0, stream>>>(
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

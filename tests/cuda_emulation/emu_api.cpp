// C entry points into the emulated CUDA launchers of csrc/cuda, for ctypes. Scratch is
// allocated here and filled with NaN, so a kernel that reads scratch it never wrote
// poisons its result instead of passing by luck.
#include <cstdint>
#include <limits>
#include <vector>

#include "covpool_kernel.cuh"
#include "emu_runtime.h"
#include "gram_kernel.cuh"
#include "sqrtm_kernel.cuh"
#include "triuvec_kernel.cuh"

namespace {

template <typename T>
std::vector<T> scratch(int64_t n) {
  return std::vector<T>(static_cast<size_t>(n > 0 ? n : 1), std::numeric_limits<T>::quiet_NaN());
}

// math: an mpncov::cuda::Fp32Math (0 FFMA, 1 TF32, 2 3xTF32).
mpncov::cuda::Fp32Math fp32_math(int math) { return static_cast<mpncov::cuda::Fp32Math>(math); }

template <typename T>
int covpool_forward(const void* x, void* out, int64_t b, int64_t c, int64_t m, int math) {
  auto w = scratch<T>(mpncov::cuda::covpool_forward_workspace(b, c, m));
  return mpncov::cuda::covpool_forward<T>(static_cast<const T*>(x), static_cast<T*>(out),
                                          w.data(), b, c, m, fp32_math(math), nullptr);
}

template <typename T>
int covpool_backward(const void* g, const void* x, void* dx, int64_t b, int64_t c, int64_t m,
                     int math) {
  auto w = scratch<T>(mpncov::cuda::covpool_backward_workspace(b, c, m));
  return mpncov::cuda::covpool_backward<T>(static_cast<const T*>(g), static_cast<const T*>(x),
                                           static_cast<T*>(dx), w.data(), b, c, m,
                                           fp32_math(math), nullptr);
}

// path: 0 the tiled path, 1 the on-chip path where it serves (as the binding's default),
// 2 the on-chip path whether it serves or not (the launcher must refuse where it does not).
mpncov::cuda::SqrtmPath pick_path(int path, bool on_chip_fits) {
  return path == 2 || (path == 1 && on_chip_fits) ? mpncov::cuda::SqrtmPath::kOnChip
                                                  : mpncov::cuda::SqrtmPath::kTiled;
}

template <typename T>
int sqrtm_forward(const void* s, void* out, void* saved, int64_t b, int64_t n, int64_t iters,
                  int path, int math) {
  const auto chosen = pick_path(path, mpncov::cuda::sqrtm_path<T>(n, iters, false, true) ==
                                          mpncov::cuda::SqrtmPath::kOnChip);
  // An invalid iters must be refused by the launcher, not size the scratch; the on-chip
  // path gets no scratch.
  auto w = scratch<T>(mpncov::cuda::sqrtm_iters_valid(iters) &&
                              chosen == mpncov::cuda::SqrtmPath::kTiled
                          ? mpncov::cuda::sqrtm_forward_workspace(b, n, iters) : 1);
  return mpncov::cuda::sqrtm_forward<T>(static_cast<const T*>(s), static_cast<T*>(out),
                                        static_cast<T*>(saved), w.data(), b, n, iters, chosen,
                                        fp32_math(math), nullptr);
}

template <typename T>
int sqrtm_backward(const void* g, const void* s, const void* saved, void* ds, int64_t b,
                   int64_t n, int64_t iters, int path, int math) {
  const auto chosen = pick_path(path, mpncov::cuda::sqrtm_path<T>(n, iters, true, true) ==
                                          mpncov::cuda::SqrtmPath::kOnChip);
  auto w = scratch<T>(mpncov::cuda::sqrtm_iters_valid(iters) &&
                              chosen == mpncov::cuda::SqrtmPath::kTiled
                          ? mpncov::cuda::sqrtm_backward_workspace(b, n, iters) : 1);
  return mpncov::cuda::sqrtm_backward<T>(static_cast<const T*>(g), static_cast<const T*>(s),
                                         static_cast<const T*>(saved), static_cast<T*>(ds),
                                         w.data(), b, n, iters, chosen, fp32_math(math),
                                         nullptr);
}

template <typename T>
int triuvec_forward(const void* s, void* v, int64_t b, int64_t n) {
  return mpncov::cuda::triuvec_forward<T>(static_cast<const T*>(s), static_cast<T*>(v), b, n,
                                          nullptr);
}

template <typename T>
int triuvec_backward(const void* g, void* out, int64_t b, int64_t n) {
  return mpncov::cuda::triuvec_backward<T>(static_cast<const T*>(g), static_cast<T*>(out), b, n,
                                           nullptr);
}

// x: (b, c, m) channels first, or (tokens != 0) the (b, m, c) buffer of token-major features.
template <typename T>
int isqrt_cov_gram_forward(const void* x, int tokens, void* vec, void* saved, int64_t b,
                           int64_t c, int64_t m, int64_t iters, int recompute_t, int math) {
  auto w = scratch<T>(iters >= 1 && iters <= mpncov::kMaxIters
                          ? mpncov::cuda::isqrt_cov_gram_forward_workspace<T>(b, c, m, iters,
                                                                               recompute_t != 0)
                          : 1);
  return mpncov::cuda::isqrt_cov_gram_forward<T>(static_cast<const T*>(x), tokens != 0,
                                                 static_cast<T*>(vec), static_cast<T*>(saved),
                                                 w.data(), b, c, m, iters, recompute_t != 0,
                                                 fp32_math(math), nullptr);
}

template <typename T>
int isqrt_cov_gram_backward(const void* g, const void* x, int tokens, const void* saved,
                            void* dx, int64_t b, int64_t c, int64_t m, int64_t iters,
                            int recompute_t, int math) {
  auto w = scratch<T>(iters >= 1 && iters <= mpncov::kMaxIters
                          ? mpncov::cuda::isqrt_cov_gram_backward_workspace<T>(b, c, m, iters,
                                                                                recompute_t != 0)
                          : 1);
  return mpncov::cuda::isqrt_cov_gram_backward<T>(
      static_cast<const T*>(g), static_cast<const T*>(x), tokens != 0,
      static_cast<const T*>(saved), static_cast<T*>(dx), w.data(), b, c, m, iters,
      recompute_t != 0, fp32_math(math), nullptr);
}

}  // namespace

#define MPNCOV_EMU_EXPORT(name, suffix, T, params, args) \
  extern "C" int emu_##name##_##suffix params { return name<T> args; }

#define MPNCOV_EMU_EXPORT_BOTH(name, params, args)      \
  MPNCOV_EMU_EXPORT(name, f32, float, params, args)     \
  MPNCOV_EMU_EXPORT(name, f64, double, params, args)

MPNCOV_EMU_EXPORT_BOTH(covpool_forward,
                       (const void* x, void* out, int64_t b, int64_t c, int64_t m, int math),
                       (x, out, b, c, m, math))
MPNCOV_EMU_EXPORT_BOTH(covpool_backward,
                       (const void* g, const void* x, void* dx, int64_t b, int64_t c, int64_t m,
                        int math),
                       (g, x, dx, b, c, m, math))
MPNCOV_EMU_EXPORT_BOTH(sqrtm_forward,
                       (const void* s, void* out, void* saved, int64_t b, int64_t n, int64_t it,
                        int path, int math),
                       (s, out, saved, b, n, it, path, math))
MPNCOV_EMU_EXPORT_BOTH(sqrtm_backward,
                       (const void* g, const void* s, const void* saved, void* ds, int64_t b,
                        int64_t n, int64_t it, int path, int math),
                       (g, s, saved, ds, b, n, it, path, math))
MPNCOV_EMU_EXPORT_BOTH(triuvec_forward, (const void* s, void* v, int64_t b, int64_t n),
                       (s, v, b, n))
MPNCOV_EMU_EXPORT_BOTH(triuvec_backward, (const void* g, void* out, int64_t b, int64_t n),
                       (g, out, b, n))

MPNCOV_EMU_EXPORT_BOTH(isqrt_cov_gram_forward,
                       (const void* x, int tokens, void* vec, void* saved, int64_t b, int64_t c,
                        int64_t m, int64_t it, int recompute_t, int math),
                       (x, tokens, vec, saved, b, c, m, it, recompute_t, math))
MPNCOV_EMU_EXPORT_BOTH(isqrt_cov_gram_backward,
                       (const void* g, const void* x, int tokens, const void* saved, void* dx,
                        int64_t b, int64_t c, int64_t m, int64_t it, int recompute_t, int math),
                       (g, x, tokens, saved, dx, b, c, m, it, recompute_t, math))

// Kernel launches made so far by the emulated launchers.
extern "C" long long emu_launches() { return ::emu::launches; }

// The emulated device's opt-in shared memory per block (bytes); returns the previous value.
extern "C" int emu_set_shared_optin(int bytes) {
  const int previous = ::emu::shared_optin;
  ::emu::shared_optin = bytes;
  return previous;
}

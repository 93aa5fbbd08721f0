// C entry points into the emulated CUDA launchers of csrc/cuda, for ctypes. Scratch is
// allocated here and filled with NaN, so a kernel that reads scratch it never wrote
// poisons its result instead of passing by luck.
#include <cstdint>
#include <limits>
#include <vector>

#include "covpool_kernel.cuh"
#include "emu_runtime.h"
#include "sqrtm_kernel.cuh"
#include "triuvec_kernel.cuh"

namespace {

template <typename T>
std::vector<T> scratch(int64_t n) {
  return std::vector<T>(static_cast<size_t>(n > 0 ? n : 1), std::numeric_limits<T>::quiet_NaN());
}

template <typename T>
int covpool_forward(const void* x, void* out, int64_t b, int64_t c, int64_t m) {
  auto w = scratch<T>(mpncov::cuda::covpool_forward_workspace(b, c, m));
  return mpncov::cuda::covpool_forward<T>(static_cast<const T*>(x), static_cast<T*>(out),
                                          w.data(), b, c, m, nullptr);
}

template <typename T>
int covpool_backward(const void* g, const void* x, void* dx, int64_t b, int64_t c, int64_t m) {
  auto w = scratch<T>(mpncov::cuda::covpool_backward_workspace(b, c, m));
  return mpncov::cuda::covpool_backward<T>(static_cast<const T*>(g), static_cast<const T*>(x),
                                           static_cast<T*>(dx), w.data(), b, c, m, nullptr);
}

template <typename T>
int sqrtm_forward(const void* s, void* out, void* saved, int64_t b, int64_t n, int64_t iters) {
  // An invalid iters must be refused by the launcher, not size the scratch.
  auto w = scratch<T>(mpncov::cuda::sqrtm_iters_valid(iters)
                          ? mpncov::cuda::sqrtm_forward_workspace(b, n, iters) : 1);
  return mpncov::cuda::sqrtm_forward<T>(static_cast<const T*>(s), static_cast<T*>(out),
                                        static_cast<T*>(saved), w.data(), b, n, iters, nullptr);
}

template <typename T>
int sqrtm_backward(const void* g, const void* s, const void* saved, void* ds, int64_t b,
                   int64_t n, int64_t iters) {
  auto w = scratch<T>(mpncov::cuda::sqrtm_iters_valid(iters)
                          ? mpncov::cuda::sqrtm_backward_workspace(b, n, iters) : 1);
  return mpncov::cuda::sqrtm_backward<T>(static_cast<const T*>(g), static_cast<const T*>(s),
                                         static_cast<const T*>(saved), static_cast<T*>(ds),
                                         w.data(), b, n, iters, nullptr);
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

}  // namespace

#define MPNCOV_EMU_EXPORT(name, suffix, T, params, args) \
  extern "C" int emu_##name##_##suffix params { return name<T> args; }

#define MPNCOV_EMU_EXPORT_BOTH(name, params, args)      \
  MPNCOV_EMU_EXPORT(name, f32, float, params, args)     \
  MPNCOV_EMU_EXPORT(name, f64, double, params, args)

MPNCOV_EMU_EXPORT_BOTH(covpool_forward, (const void* x, void* out, int64_t b, int64_t c, int64_t m),
                       (x, out, b, c, m))
MPNCOV_EMU_EXPORT_BOTH(covpool_backward,
                       (const void* g, const void* x, void* dx, int64_t b, int64_t c, int64_t m),
                       (g, x, dx, b, c, m))
MPNCOV_EMU_EXPORT_BOTH(sqrtm_forward,
                       (const void* s, void* out, void* saved, int64_t b, int64_t n, int64_t it),
                       (s, out, saved, b, n, it))
MPNCOV_EMU_EXPORT_BOTH(sqrtm_backward,
                       (const void* g, const void* s, const void* saved, void* ds, int64_t b,
                        int64_t n, int64_t it),
                       (g, s, saved, ds, b, n, it))
MPNCOV_EMU_EXPORT_BOTH(triuvec_forward, (const void* s, void* v, int64_t b, int64_t n),
                       (s, v, b, n))
MPNCOV_EMU_EXPORT_BOTH(triuvec_backward, (const void* g, void* out, int64_t b, int64_t n),
                       (g, out, b, n))

// Kernel launches made so far by the emulated launchers.
extern "C" long long emu_launches() { return ::emu::launches; }

// How the hand-written CUDA kernels compute float32 products: FFMA (fp32-exact, the
// default), TF32 tensor-core MMAs, or 3xTF32 (mma_tf32.cuh). Chosen per call by the
// binding (ops_binding.cpp, MPNCOV_CUDA_TF32 and torch's TF32 setting) and passed to the
// launchers; the kernels take it as an int template argument. Host-only, torch-free.
#pragma once

#include <type_traits>

namespace mpncov {
namespace cuda {

enum class Fp32Math : int { kFfma = 0, kTf32 = 1, k3xTf32 = 2 };

// Returns f(std::integral_constant<int, M>()) with M = math for float and M = 0 (FFMA)
// for double, whose products are never TF32.
template <typename T, typename F>
auto with_fp32_math(Fp32Math math, F&& f) {
  if constexpr (sizeof(T) == 4) {
    if (math == Fp32Math::kTf32) return f(std::integral_constant<int, 1>());
    if (math == Fp32Math::k3xTf32) return f(std::integral_constant<int, 2>());
  }
  return f(std::integral_constant<int, 0>());
}

}  // namespace cuda
}  // namespace mpncov

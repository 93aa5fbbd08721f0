// TF32 tensor-core multiply-adds for the float product core (batched_gemm.cuh), sm_80+:
// `mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32`, D (16 x 8) = A (16 x 8) B (8 x 8) + C,
// a warp-wide instruction. Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k8", .tf32),
// with g = lane / 4 and t = lane % 4:
//   A: a0 = A(g, t), a1 = A(g + 8, t), a2 = A(g, t + 4), a3 = A(g + 8, t + 4)
//   B: b0 = B(t, g), b1 = B(t + 4, g)
//   C, D: c0 = C(g, 2t), c1 = C(g, 2t + 1), c2 = C(g + 8, 2t), c3 = C(g + 8, 2t + 1)
// Operands are rounded to TF32 (10 mantissa bits, to nearest with ties away from zero:
// `cvt.rna.tf32.f32`) before the MMA, which reads only those bits; products are exact and
// the sums are at least float accurate, so a TF32 product has the error of its rounded
// inputs, about 2^-11 relative per operand (~1e-3 of a product's scale over a sum).
//
// 3xTF32 (Fp32Math::k3xTf32) splits each operand x into big = tf32(x) and
// small = tf32(x - big) and adds small_a big_b + big_a small_b + big_a big_b (the small
// terms first): the dropped small_a small_b is ~2^-22 relative, so the result is about as
// accurate as a float FFMA product, for three MMAs.
//
// The CUDA emulation of the tests (MPNCOV_EMULATION) runs the MMA as the warp-wide
// exchange it is: every lane contributes its fragments and receives its part of D, so a
// fragment in the wrong place gives wrong numbers there too.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "fp32_math.h"

namespace mpncov {
namespace cuda {

namespace mma {

// x rounded to TF32 (the bits of a float whose low 13 mantissa bits are 0).
__device__ __forceinline__ uint32_t to_tf32(float x) {
#if defined(MPNCOV_EMULATION)
  return ::emu::cvt_rna_tf32(x);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
#else
  return __float_as_uint(x);  // not reached: the TF32 kernels are only chosen on sm_80+
#endif
}

__device__ __forceinline__ float tf32_value(uint32_t bits) {
#if defined(MPNCOV_EMULATION)
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#else
  return __uint_as_float(bits);
#endif
}

// d += A B for one m16n8k8 (fragments as above, operands already TF32). All 32 lanes of
// the warp must call it together.
__device__ __forceinline__ void mma_m16n8k8(float (&d)[4], const uint32_t (&a)[4],
                                            const uint32_t (&b)[2]) {
#if defined(MPNCOV_EMULATION)
  ::emu::mma_m16n8k8_tf32(d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // not reached: the TF32 kernels are only chosen on sm_80+
#endif
}

}  // namespace mma
}  // namespace cuda
}  // namespace mpncov

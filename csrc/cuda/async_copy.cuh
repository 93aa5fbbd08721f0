// Asynchronous global -> shared copies (sm_80+ `cp.async`): the staging of the product
// kernels issues a slab's copies, multiplies the previous slab while they are in flight,
// and waits for them before the next multiply, without holding the data in registers.
//
//   copy16(dst, src):    start copying 16 bytes (both 16-byte aligned; dst in shared)
//   commit():            close the group of copies started since the last commit
//   wait<N>():           wait until at most N of this thread's groups are still pending
// A wait covers the calling thread's own copies only; a barrier after it makes them
// visible to the block. Before sm_80 the copy is a plain synchronous 16-byte copy. The
// CUDA emulation of the tests (MPNCOV_EMULATION) defers each copy to the wait that
// covers it and fills its destination with NaN until then, so a read before the wait or
// an overwrite of a buffer still being read shows in the results.
#pragma once

#include <cuda_runtime.h>

namespace mpncov {
namespace cuda {
namespace async_copy {

__device__ __forceinline__ void copy16(void* dst, const void* src) {
#if defined(MPNCOV_EMULATION)
  ::emu::cp_async(dst, src, 16);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned int s = static_cast<unsigned int>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(src) : "memory");
#else
  *static_cast<float4*>(dst) = *static_cast<const float4*>(src);
#endif
}

__device__ __forceinline__ void commit() {
#if defined(MPNCOV_EMULATION)
  ::emu::cp_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void wait() {
#if defined(MPNCOV_EMULATION)
  ::emu::cp_async_wait(N);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

}  // namespace async_copy
}  // namespace cuda
}  // namespace mpncov

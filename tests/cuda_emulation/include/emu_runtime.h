// A CPU emulation of the CUDA features the torch-free kernels in csrc/cuda use, so that
// their logic (indexing, tiling, barriers, reductions, the launch sequence of each op)
// can be tested on a machine without a GPU. It is a test tool, not a backend: it says
// nothing about speed, the memory model, coalescing, occupancy or launch limits beyond
// the ones checked in launch().
//
// Model: the blocks of a grid run one after another; the threads of a block are
// cooperative fibers (ucontext) that run round-robin, each until it reaches a barrier
// (__syncthreads, or the warp barrier inside __shfl_down_sync / __shfl_sync) or returns. __shared__
// becomes `static`, one object shared by all fibers of the running block. A barrier that
// can never complete (some threads returned or wait elsewhere) aborts with a message, as
// it would hang (or be undefined) on a GPU.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define MPNCOV_EMULATION 1

// Vector accesses of the kernels (csrc/cuda/batched_gemm.cuh) must be 16-byte aligned.
#define MPNCOV_ASSERT_ALIGNED16(p) ::emu::check_aligned16(p, __FILE__, __LINE__)

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};

// CUDA's built-in vector types (16-byte aligned like on the device).
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline double2 make_double2(double x, double y) { return double2{x, y}; }

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
// The emulated kernels' __shared__ variables are static objects, not counted: 0 bytes.
struct cudaFuncAttributes {
  size_t sharedSizeBytes;
};
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };

namespace emu {

void misaligned_access(const void* p, const char* file, int line);  // aborts
inline void check_aligned16(const void* p, const char* file, int line) {
  if ((reinterpret_cast<uintptr_t>(p) & 15u) != 0) misaligned_access(p, file, line);
}

extern dim3 thread_idx, block_idx, block_dim, grid_dim;
extern cudaError_t last_error;
extern long long launches;  // kernel launches so far (tests count them per op)

// Dynamic shared memory: a kernel may be launched with more than 48 KB only after
// cudaFuncSetAttribute raised its limit, and never beyond the device's opt-in limit
// (shared_optin, settable by the tests to play an A100 or an H100).
extern int shared_optin;
constexpr size_t kStaticSharedLimit = 48 * 1024;
size_t dynamic_shared_limit(const void* kernel);
void set_dynamic_shared_limit(const void* kernel, size_t bytes);
// The running block's dynamic shared memory, NaN bytes at the start of every block.
unsigned char* dynamic_shared();
void set_dynamic_shared_size(size_t bytes);

// Barrier of all threads of the running block.
void sync_block();
// Barrier of the 32 threads of the calling thread's warp.
void sync_warp();
// 32 slots of 16 bytes for the calling thread's warp (shuffle exchange).
unsigned char* warp_slots();
int linear_thread();

// cp.async of the calling thread: the copy is deferred to the cp_async_wait that covers
// its group, and dst holds NaN bytes until then (see csrc/cuda/async_copy.cuh).
void cp_async(void* dst, const void* src, int bytes);
void cp_async_commit();
void cp_async_wait(int pending_groups_allowed);

// cvt.rna.tf32.f32: x rounded to 10 mantissa bits, to nearest with ties away from zero
// (the bits of a float whose low 13 bits are 0; NaN and infinity kept).
uint32_t cvt_rna_tf32(float x);
// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, d += A B, warp-wide: every lane
// hands in its fragments (layouts of the PTX ISA) and gets its part of D. The MMA reads only
// the TF32 bits of a and b (the low 13 bits are ignored); the products are exact and the
// sum c + sum_k a_k b_k is rounded once to float (a model of the hardware's internal
// accumulation, which the ISA does not specify to the bit).
void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

// Runs body() once per thread of every block of the grid.
void run_grid(dim3 grid, dim3 block, const std::function<void()>& body);

template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t, Kernel* kernel,
            Args&&... args) {
  const unsigned long long threads = 1ULL * block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.y > 65535 || grid.z > 65535 ||
      shared_bytes > dynamic_shared_limit(reinterpret_cast<const void*>(kernel))) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  ++launches;
  set_dynamic_shared_size(shared_bytes);
  run_grid(grid, block, [&] { kernel(args...); });
}

template <typename T>
T shfl_down(T v, unsigned int offset) {
  static_assert(sizeof(T) <= 16, "shuffle of a type wider than 16 bytes");
  const int lane = linear_thread() & 31;
  unsigned char* slots = warp_slots();
  std::memcpy(slots + 16 * lane, &v, sizeof(T));
  sync_warp();
  T r = v;  // a source lane outside the warp returns the caller's own value
  if (lane + offset < 32) std::memcpy(&r, slots + 16 * (lane + offset), sizeof(T));
  sync_warp();  // nobody overwrites a slot before every lane has read
  return r;
}

// Value of v in lane src_lane of the calling thread's warp.
template <typename T>
T shfl_idx(T v, int src_lane) {
  static_assert(sizeof(T) <= 16, "shuffle of a type wider than 16 bytes");
  const int lane = linear_thread() & 31;
  unsigned char* slots = warp_slots();
  std::memcpy(slots + 16 * lane, &v, sizeof(T));
  sync_warp();
  T r;
  std::memcpy(&r, slots + 16 * (src_lane & 31), sizeof(T));
  sync_warp();
  return r;
}

}  // namespace emu

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

inline void __syncthreads() { ::emu::sync_block(); }

template <typename T>
T __shfl_down_sync(unsigned int /*mask: all lanes take part here*/, T v, unsigned int offset) {
  return ::emu::shfl_down(v, offset);
}

template <typename T>
T __shfl_sync(unsigned int /*mask: all lanes take part here*/, T v, int src_lane) {
  return ::emu::shfl_idx(v, src_lane);
}

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin || device != 0) return cudaErrorInvalidValue;
  *value = ::emu::shared_optin;
  return cudaSuccess;
}

inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void*) {
  attr->sharedSizeBytes = 0;
  return cudaSuccess;
}

inline cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value > ::emu::shared_optin)
    return cudaErrorInvalidValue;
  ::emu::set_dynamic_shared_limit(kernel, static_cast<size_t>(value));
  return cudaSuccess;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ::emu::last_error;
  ::emu::last_error = cudaSuccess;
  return e;
}

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

namespace emu {

void misaligned_access(const void* p, const char* file, int line);  // aborts
inline void check_aligned16(const void* p, const char* file, int line) {
  if ((reinterpret_cast<uintptr_t>(p) & 15u) != 0) misaligned_access(p, file, line);
}

extern dim3 thread_idx, block_idx, block_dim, grid_dim;
extern cudaError_t last_error;
extern long long launches;  // kernel launches so far (tests count them per op)

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

// Runs body() once per thread of every block of the grid.
void run_grid(dim3 grid, dim3 block, const std::function<void()>& body);

template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t, Kernel* kernel,
            Args&&... args) {
  const unsigned long long threads = 1ULL * block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.y > 65535 || grid.z > 65535 || shared_bytes > 48 * 1024) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  ++launches;
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

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ::emu::last_error;
  ::emu::last_error = cudaSuccess;
  return e;
}

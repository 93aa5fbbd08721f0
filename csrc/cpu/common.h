// Shared helpers of the CPU kernels: argument checks, the compute dtype policy, work
// buffers and the loop over the batch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <memory>

#include "../limits.h"

namespace mpncov {

// fp16/bf16 inputs are computed in fp32 and returned in their own dtype (the autocast
// policy of every mpncov op); float32 and float64 are computed natively.
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// sqrtm's compute dtype: as above, and float32 in float64 beyond kMaxMirroredIters
// iterations (see limits.h). Its saved iterates have this dtype.
inline at::ScalarType sqrtm_compute_dtype(at::ScalarType t, int64_t iters) {
  const at::ScalarType ct = compute_dtype(t);
  return (ct == at::kFloat && !mirrors_all_products(iters)) ? at::kDouble : ct;
}

// at::empty for large work buffers: asks the kernel for transparent huge pages where it
// offers them on request (THP "madvise" mode), so first touch costs one fault per 2 MB
// instead of one per 4 KB; at C = 256 those faults cost as much as a third of the run.
at::Tensor empty_buffer(at::IntArrayRef sizes, const at::TensorOptions& options);

// A buffer for the `saved` output of sqrtm, reused across calls. A fresh buffer of that
// size (over glibc's mmap threshold, so it comes from and returns to the kernel on every
// call) costs a page fault and a page clear per touched page: ~26 ms for the 109 MB of
// B = 32, C = 256, N = 5 on a 2-core machine, 15 % of a training step of the pipeline.
// Up to two buffers are kept; one is handed out again only when nothing else refers to
// its storage any more (the autograd graph that saved it is gone). Set
// MPNCOV_CPU_BUFFER_CACHE=0 to allocate every time; release_cached_buffers() frees
// the buffers not in use (mpncov.release_cpu_buffers() in Python).
at::Tensor cached_buffer(at::IntArrayRef sizes, const at::TensorOptions& options);
void release_cached_buffers();
int64_t cached_buffer_bytes();  // held by the cache, in use or not

// A floating tensor of rank `ndim`; the message names the op, the argument and what was
// wrong, so a user sees the bad shape or dtype.
void check_input(const at::Tensor& t, const char* op, const char* arg, int64_t ndim);

// A (B, n, n) tensor.
void check_square(const at::Tensor& t, const char* op, const char* arg);

// iters in 1..kMaxIters.
void check_iters(int64_t iters, const char* op);

// fn(b, scratch) for every sample b in [0, B), threads over the batch. Each sample runs
// start to finish on one thread, so its matrices stay in that core's cache between the
// steps, and there is no barrier between steps. `scratch` is a per-thread buffer of
// scratch_size elements (uninitialised). BLAS called inside runs single-threaded; when
// there is one sample (no parallel region) it may use its own threads.
//
// Samples are handed out on demand in shrinking runs (half of what is left, split over
// the threads, down to one sample), not as one fixed slice per thread: a thread that
// starts late (woken from sleep for this parallel region) or is slowed down (a shared
// machine) no longer holds up the whole call. Measured on a 2-core VM, pipeline fwd+bwd
// at B = 64, C = 64, N = 3, alternating runs against fixed slices: medians 7.5 vs 10.0 ms
// (8 pairs), 9.1 vs 9.7 ms (6 pairs); at B = 32, C = 256, N = 5: 223 vs 242 ms (5 pairs).
// Which thread computes a sample does not change its result.
template <typename T, typename F>
void parallel_over_samples(int64_t B, int64_t scratch_size, const F& fn) {
  const int64_t workers = std::min<int64_t>(B, at::get_num_threads());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::unique_ptr<T[]> scratch(new T[std::max<int64_t>(scratch_size, 1)]);
    int64_t b0 = next.load(std::memory_order_relaxed);
    while (b0 < B) {
      const int64_t run = std::max<int64_t>(1, (B - b0) / (2 * workers));
      if (!next.compare_exchange_weak(b0, b0 + run, std::memory_order_relaxed)) continue;
      for (int64_t b = b0; b < b0 + run; ++b) fn(b, scratch.get());
      b0 = next.load(std::memory_order_relaxed);
    }
  });
}

}  // namespace mpncov

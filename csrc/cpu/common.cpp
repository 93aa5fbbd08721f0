#include "common.h"

#include <c10/util/strides.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace mpncov {

void check_input(const at::Tensor& t, const char* op, const char* arg, int64_t ndim) {
  TORCH_CHECK(t.defined(), "mpncov.", op, ": ", arg, " is undefined");
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "mpncov.", op, ": ", arg,
                   " must be a floating tensor (float16, bfloat16, float32 or float64), got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == ndim, "mpncov.", op, ": ", arg, " must have ", ndim,
                    " dimensions, got shape ", t.sizes());
}

void check_square(const at::Tensor& t, const char* op, const char* arg) {
  check_input(t, op, arg, 3);
  TORCH_CHECK_VALUE(t.size(1) == t.size(2), "mpncov.", op, ": ", arg,
                    " must be a batch of square matrices (B, C, C), got shape ", t.sizes());
}

void check_iters(int64_t iters, const char* op) {
  TORCH_CHECK_VALUE(iters >= 1 && iters <= kMaxIters, "mpncov.", op,
                    ": iters must be between 1 and ", kMaxIters, ", got ", iters);
}

at::Tensor empty_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#ifdef __linux__
  constexpr uintptr_t huge = uintptr_t(1) << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t first = (begin + huge - 1) & ~(huge - 1), last = end & ~(huge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return t;
}

namespace {

std::mutex cache_mutex;
std::vector<at::Tensor> cache;  // flat buffers; each is free when only the cache holds it
constexpr size_t kCacheSlots = 2;

// Fork safety: a data loader forks while other threads may be inside cached_buffer. The
// child inherits the mutex locked by a thread that does not exist there and would block
// forever on its first mpncov call. The prepare handler takes the lock, so no other thread
// holds it across fork(); parent and child release it afterwards.
#if defined(__unix__) || defined(__APPLE__)
[[maybe_unused]] const bool fork_handlers_registered = [] {
  pthread_atfork([] { cache_mutex.lock(); }, [] { cache_mutex.unlock(); },
                 [] { cache_mutex.unlock(); });
  return true;
}();
#endif

bool cache_enabled() {
  const char* v = std::getenv("MPNCOV_CPU_BUFFER_CACHE");
  return !(v && std::strcmp(v, "0") == 0);
}

bool is_free(const at::Tensor& t) {
  return t.use_count() == 1 && t.storage().use_count() == 1;
}

}  // namespace

at::Tensor cached_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (!cache_enabled()) return empty_buffer(sizes, options);
  const int64_t numel = c10::multiply_integers(sizes);
  std::lock_guard<std::mutex> lock(cache_mutex);
  // The caller gets a tensor of its own on the cached storage (not a view of the cached
  // tensor: a custom op's outputs must not be views).
  auto on_storage = [&](const at::Tensor& t) {
    return at::empty({0}, options).set_(t.storage(), 0, sizes, c10::contiguous_strides(sizes));
  };
  for (const at::Tensor& t : cache)
    if (t.numel() == numel && t.dtype() == options.dtype() && is_free(t)) return on_storage(t);
  at::Tensor fresh = empty_buffer({numel}, options);
  if (cache.size() < kCacheSlots) {
    cache.push_back(fresh);
  } else {
    // Replace a buffer nobody uses; if all are in use, the new one is not cached.
    auto it = std::find_if(cache.begin(), cache.end(), is_free);
    if (it != cache.end()) *it = fresh;
  }
  return on_storage(fresh);
}

void release_cached_buffers() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  cache.erase(std::remove_if(cache.begin(), cache.end(), is_free), cache.end());
}

int64_t cached_buffer_bytes() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  int64_t total = 0;
  for (const at::Tensor& t : cache) total += t.nbytes();
  return total;
}

// Test hook: holds the cache's lock for `ms` milliseconds (as a call in another thread does
// for a moment), so a test can fork at exactly that time.
void hold_cache_lock(int64_t ms) {
  std::lock_guard<std::mutex> lock(cache_mutex);
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
}

TORCH_LIBRARY_FRAGMENT(mpncov, m) {
  m.def("_cpu_release_buffers() -> ()", &release_cached_buffers);
  m.def("_cpu_buffer_bytes() -> int", &cached_buffer_bytes);
  m.def("_cpu_hold_buffer_cache_lock(int ms) -> ()", &hold_cache_lock);
}

}  // namespace mpncov

#include "common.h"

#include <algorithm>
#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
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

}  // namespace mpncov

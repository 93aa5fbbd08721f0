#include "gram_args.h"

#include "common.h"
#include "features.h"
#include "newton_schulz.h"

namespace mpncov {

int64_t gram_saved_count(int64_t N, bool recompute_t) {
  return recompute_t ? 2 * N - 1 : newton_schulz_saved_count(N);
}

bool check_gram_backward_args(const at::Tensor& grad, const at::Tensor& x,
                              const at::Tensor& saved, int64_t iters, const char* op) {
  check_features_input(x, op);
  check_input(grad, op, "grad", 2);
  check_iters(iters, op);
  const int64_t B = x.size(0), C = x.size(1), M = x.size(2), N = iters;
  TORCH_CHECK_VALUE(grad.size(0) == B && grad.size(1) == C * (C + 1) / 2, "mpncov.", op,
                    ": grad ", grad.sizes(), " does not match x ", x.sizes(),
                    " (expected (", B, ", ", C * (C + 1) / 2, "))");
  // The forward kept the T_k (3N-2 matrices) or not (2N-1; the same for N = 1).
  const int64_t count = saved.dim() == 4 ? saved.size(1) : -1;
  const bool recompute_t = count == gram_saved_count(N, true);
  TORCH_CHECK_VALUE(saved.dim() == 4 && saved.size(0) == B &&
                        (recompute_t || count == gram_saved_count(N, false)) &&
                        saved.size(2) == M && saved.size(3) == M,
                    "mpncov.", op, ": saved has shape ", saved.sizes(), ", expected (", B,
                    ", ", gram_saved_count(N, false), " or ", gram_saved_count(N, true), ", ", M,
                    ", ", M, ") for iters=", N);
  TORCH_CHECK(grad.device() == x.device() && saved.device() == x.device(), "mpncov.", op,
              ": tensors on different devices: grad ", grad.device(), ", x ", x.device(),
              ", saved ", saved.device());
  return recompute_t;
}

}  // namespace mpncov

// Operator schemas of the mpncov library (SPEC sections 1-3).
//
// Every forward op has its backward registered as an op of its own, so that autograd,
// torch.compile and opcheck see the same kernels as eager code. The kernels live in
// cpu/*.cpp and cuda/*_binding.cpp; fake kernels and autograd are registered in Python
// (mpncov/ops.py).
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>

#include "limits.h"

TORCH_LIBRARY(mpncov, m) {
  // x: (B, C, M) -> S: (B, C, C), S = (1/M) Xc Xc^T with Xc = X - mean over M. Features
  // that come as tokens (B, M, C) are passed as x = tokens.transpose(1, 2): the CPU kernels
  // read that layout as it is (csrc/cpu/features.h).
  m.def("covpool(Tensor x) -> Tensor");
  // dX = (1/M) (G + G^T) Xc; on the CPU in x's layout when x is token-major, else contiguous.
  m.def("covpool_backward(Tensor grad, Tensor x) -> Tensor");
  // iSQRT of the symmetric part (S + S^T)/2 of s with `iters` (1..kMaxIters) coupled
  // Newton-Schulz steps. Returns (out, saved): saved holds the iterates the backward needs,
  // (B, 3*(iters-1)+1, C, C) in the compute dtype: [Y_1..Y_{N-1}, Z_1..Z_{N-1},
  // T_1..T_{N-1}, Y_N] (Y_N before post-compensation). tr(s) = 0 gives 0, tr(s) < 0 NaN.
  m.def("sqrtm(Tensor s, int iters) -> (Tensor, Tensor)");
  // dS from G = dL/dout: the exact gradient of that function, so symmetric for any G.
  m.def("sqrtm_backward(Tensor grad, Tensor s, Tensor saved, int iters) -> Tensor");
  // (B, C, C) -> (B, C(C+1)/2), row-major upper triangle including the diagonal.
  m.def("triuvec(Tensor s) -> Tensor");
  // Scatter (B, K) into the upper triangle of (B, n, n), zeros elsewhere.
  m.def("triuvec_backward(Tensor grad, SymInt n) -> Tensor");
  // The whole iSQRT-COV pipeline triuvec(sqrtm(covpool(x))). Returns (vec, cov, saved);
  // float16/bfloat16 x is computed in float32 throughout (cov and saved in float32), and
  // only vec is returned in x's dtype.
  m.def("isqrt_cov(Tensor x, int iters) -> (Tensor, Tensor, Tensor)");
  m.def("isqrt_cov_backward(Tensor grad, Tensor x, Tensor cov, Tensor saved, int iters) -> Tensor");
  // The same function computed in the M x M Gram space (SPEC section 8; cheaper when the
  // positions M are fewer than the channels C): Newton-Schulz on G = Xc^T Xc / (M t) and
  // two products back. Returns (vec, saved): saved (B, 3*(iters-1)+1, M, M) in the compute
  // dtype holds [G, Y_1..Y_{N-1}, Z_2..Z_{N-1}, T_1..T_{N-1}, Z_N] of that recurrence; with
  // recompute_t (B, 2*iters-1, M, M) without the T_k, which the backward computes again.
  // float16/bfloat16 x is computed in float32 (float32 in float64 beyond
  // kMaxMirroredIters iterations, like sqrtm), only vec is returned in x's dtype.
  m.def("isqrt_cov_gram(Tensor x, int iters, bool recompute_t=False) -> (Tensor, Tensor)");
  // dX in x's dtype, laid out like covpool_backward's.
  m.def("isqrt_cov_gram_backward(Tensor grad, Tensor x, Tensor saved, int iters) -> Tensor");
  // Test-only (not public API): the Gram-space pipeline in batched ATen ops, the CUDA
  // cuBLAS path of the two ops above (csrc/gram_aten.h), on any device, so that the CPU test
  // suite can compare it with the CPU kernels. Same arguments and results as those ops.
  m.def("_isqrt_cov_gram_aten(Tensor x, int iters, bool recompute_t=False) -> (Tensor, Tensor)");
  m.def("_isqrt_cov_gram_aten_backward(Tensor grad, Tensor x, Tensor saved, int iters) -> Tensor");
}

namespace {

// float16 and bfloat16 run in float32; float32 and float64 natively.
at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

void check_pipeline_iters(int64_t iters, const char* op) {
  TORCH_CHECK_VALUE(iters >= 1 && iters <= mpncov::kMaxIters, "mpncov.", op,
                    ": iters must be between 1 and ", mpncov::kMaxIters, ", got ", iters);
}

// The parts exchange the covariance and its gradient in the compute dtype: in float16 they
// would overflow (features of magnitude 255 give a covariance entry of 65025) or lose all
// precision (features of 1e-4 give 1e-8, below float16's smallest normal number).
std::tuple<at::Tensor, at::Tensor, at::Tensor> isqrt_cov(const at::Tensor& x, int64_t iters) {
  static auto covpool_op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("mpncov::covpool", "").typed<at::Tensor(const at::Tensor&)>();
  static auto sqrtm_op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("mpncov::sqrtm", "")
      .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>();
  static auto triuvec_op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("mpncov::triuvec", "").typed<at::Tensor(const at::Tensor&)>();
  check_pipeline_iters(iters, "isqrt_cov");
  at::Tensor cov = covpool_op.call(x.to(compute_dtype(x.scalar_type())));
  auto [root, saved] = sqrtm_op.call(cov, iters);
  return {triuvec_op.call(root).to(x.scalar_type()), cov, saved};
}

at::Tensor isqrt_cov_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& cov,
                              const at::Tensor& saved, int64_t iters) {
  static auto triuvec_backward_op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("mpncov::triuvec_backward", "")
      .typed<at::Tensor(const at::Tensor&, c10::SymInt)>();
  static auto sqrtm_backward_op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("mpncov::sqrtm_backward", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
  static auto covpool_backward_op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("mpncov::covpool_backward", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  check_pipeline_iters(iters, "isqrt_cov_backward");
  // dL/dY has only an upper triangle; sqrtm_backward uses its symmetric part.
  at::Tensor g_root = triuvec_backward_op.call(grad.to(cov.scalar_type()), cov.sym_size(-1));
  at::Tensor g_cov = sqrtm_backward_op.call(g_root, cov, saved, iters);
  return covpool_backward_op.call(g_cov, x);
}

}  // namespace

// Backend-independent: the pipeline dispatches to the CPU or CUDA kernels of its parts.
TORCH_LIBRARY_IMPL(mpncov, CompositeExplicitAutograd, m) {
  m.impl("isqrt_cov", &isqrt_cov);
  m.impl("isqrt_cov_backward", &isqrt_cov_backward);
}

// The extension is loaded as a Python module (mpncov._C) only to run the registrations
// above; it has no Python functions of its own.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "mpncov operator registrations", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// CUDA kernels of the mpncov operators (schemas in csrc/ops.cpp): argument checks, device
// guard, stream, contiguity, allocation of outputs and scratch, dtype dispatch. The
// numerical work is in the torch-free launchers of csrc/cuda/*_kernel.cu.
//
// Dtypes: float32 and float64 are computed natively; float16 and bfloat16 are computed
// in float32 and the result is cast back to the input dtype (sqrtm's `saved` stays in
// the compute dtype, and sqrtm_backward reads it in that dtype; so does isqrt_cov_gram's).
// sqrtm and isqrt_cov_gram with more than kMaxMirroredIters iterations compute float32 in
// float64 (csrc/limits.h).
//
// The stream comes from c10/cuda/CUDAStream.h (the same stream at::cuda::
// getCurrentCUDAStream returns); ATen/cuda/CUDAContext.h is avoided because it pulls in
// the cuBLAS / cuSPARSE / cuSOLVER headers, which this extension does not need.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>
#include <tuple>

#include "../cpu/common.h"
#include "../cpu/features.h"
#include "../cpu/gram_args.h"
#include "../gram_aten.h"
#include "../limits.h"
#include "aten_products.h"
#include "covpool_kernel.cuh"
#include "gram_kernel.cuh"
#include "sqrtm_kernel.cuh"
#include "sqrtm_on_chip.cuh"
#include "triuvec_kernel.cuh"

namespace {

using at::Tensor;

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// float64 stays float64; float32, float16 and bfloat16 are computed in float32.
at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_tensor(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "mpncov.", op, ": expected ", name, " on a CUDA device, got ",
              t.device());
  TORCH_CHECK(is_supported_dtype(t.scalar_type()), "mpncov.", op, ": expected ", name,
              " of dtype float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

void check_same_device(const Tensor& a, const char* name_a, const Tensor& b, const char* name_b,
                       const char* op) {
  TORCH_CHECK(a.device() == b.device(), "mpncov.", op, ": expected ", name_a, " and ", name_b,
              " on the same device, got ", a.device(), " and ", b.device());
}

// (B, C, C) batch of square matrices.
void check_square_batch(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 3, "mpncov.", op, ": expected ", name,
              " of shape (B, C, C) (3 dims), got ", t.dim(), " dims with shape ", t.sizes());
  TORCH_CHECK(t.size(1) == t.size(2), "mpncov.", op, ": expected ", name,
              " to be a batch of square matrices (B, C, C), got shape ", t.sizes());
}

// iters in 1..kMaxIters, and sqrtm's compute dtype (float32 in float64 beyond
// kMaxMirroredIters iterations, csrc/limits.h): the CPU kernels' rules, shared.
using mpncov::check_iters;
using mpncov::sqrtm_compute_dtype;

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "mpncov.", op, ": CUDA kernel failed: ",
              cudaGetErrorString(err));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// MPNCOV_CUDA_PRODUCTS (read at every call): "kernels" (default) runs the hand-written
// kernels, "cublas" the same recurrences with ATen's batched matmul (aten_products.h, and
// gram_aten.h for the Gram-space pipeline).
bool use_cublas_products() {
  const char* v = std::getenv("MPNCOV_CUDA_PRODUCTS");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "kernels") == 0) return false;
  TORCH_CHECK_VALUE(std::strcmp(v, "cublas") == 0,
                    "mpncov: MPNCOV_CUDA_PRODUCTS must be 'kernels' or 'cublas', got '", v, "'");
  return true;
}

// MPNCOV_CUDA_TF32 (read at every call): how the hand-written kernels compute float32
// products (covpool, covpool_backward, the tiled sqrtm products, the Gram-space pipeline's
// products; mma_tf32.cuh). "auto"
// (default): TF32 tensor-core MMAs where torch allows TF32 for float32 matmuls
// (torch.backends.cuda.matmul.allow_tf32, or torch.set_float32_matmul_precision other than
// "highest"), else fp32-exact FFMA; "off": always FFMA; "on": always TF32; "3x": 3xTF32
// (three TF32 MMAs per product, about float32 accuracy). Before sm_80 (no TF32): FFMA.
mpncov::cuda::Fp32Math fp32_math(const Tensor& t) {
  using mpncov::cuda::Fp32Math;
  const char* v = std::getenv("MPNCOV_CUDA_TF32");
  Fp32Math math = Fp32Math::kFfma;
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) {
    const auto& ctx = at::globalContext();
    if (ctx.allowTF32CuBLAS() ||
        ctx.float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST)
      math = Fp32Math::kTf32;
  } else if (std::strcmp(v, "on") == 0) {
    math = Fp32Math::kTf32;
  } else if (std::strcmp(v, "3x") == 0) {
    math = Fp32Math::k3xTf32;
  } else {
    TORCH_CHECK_VALUE(std::strcmp(v, "off") == 0,
                      "mpncov: MPNCOV_CUDA_TF32 must be 'auto', 'off', 'on' or '3x', got '", v,
                      "'");
  }
  int major = 0;
  if (math != Fp32Math::kFfma &&
      (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.get_device()) !=
           cudaSuccess ||
       major < 8)) {
    cudaGetLastError();
    math = Fp32Math::kFfma;
  }
  return math;
}

// MPNCOV_CUDA_SQRTM (read at every call): "auto" (default) runs sqrtm's hand-written
// kernels on chip where that path serves the call (n <= 128, iters <= 8, its shared memory
// within the device's limit: sqrtm_on_chip.cuh) and its products are FFMA, and tiled
// elsewhere (so TF32, where allowed, runs in the tiled path's tensor-core products);
// "tiled" always runs the tiled path; "onchip" requires the on-chip path (FFMA products;
// an error where it does not serve), so that one GPU run can time both.
template <typename T>
mpncov::cuda::SqrtmPath sqrtm_path_of_call(int64_t n, int64_t iters, bool backward,
                                           mpncov::cuda::Fp32Math math, const char* op) {
  using mpncov::cuda::SqrtmPath;
  const char* v = std::getenv("MPNCOV_CUDA_SQRTM");
  const bool tiled = v != nullptr && std::strcmp(v, "tiled") == 0;
  const bool required = v != nullptr && std::strcmp(v, "onchip") == 0;
  TORCH_CHECK_VALUE(v == nullptr || *v == '\0' || tiled || required || std::strcmp(v, "auto") == 0,
                    "mpncov: MPNCOV_CUDA_SQRTM must be 'auto', 'tiled' or 'onchip', got '", v,
                    "'");
  const bool ffma = sizeof(T) == 8 || math == mpncov::cuda::Fp32Math::kFfma;
  const SqrtmPath path =
      mpncov::cuda::sqrtm_path<T>(n, iters, backward, required || (!tiled && ffma));
  TORCH_CHECK(!required || path == SqrtmPath::kOnChip, "mpncov.", op,
              ": MPNCOV_CUDA_SQRTM=onchip, but the on-chip kernel does not serve C = ", n,
              ", iters = ", iters, " in ", sizeof(T) == 4 ? "float32" : "float64",
              ": it needs C <= ", mpncov::cuda::kOnChipMaxN, ", iters <= ",
              mpncov::kMaxMirroredIters, " and ",
              mpncov::cuda::sqrtm_on_chip_smem_bytes(n, sizeof(T), backward),
              " bytes of shared memory per block on this device");
  return path;
}

// x: (B, C, H, W) or (B, C, M) -> M.
int64_t positions(const Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 3 || x.dim() == 4, "mpncov.", op,
              ": expected x of shape (B, C, H, W) or (B, C, M), got ", x.dim(),
              " dims with shape ", x.sizes());
  return x.dim() == 4 ? x.size(2) * x.size(3) : x.size(2);
}

// ---- covpool ------------------------------------------------------------------------------
// Token-major features (a transposed view of a contiguous (B, M, C) tensor: vision-transformer
// tokens, channels_last (B, C, H, W) flattened; cpu/features.h) go to cuBLAS as they are
// (covpool_aten: bmm takes the transposed view as op 'T'), instead of a transposed copy to
// channels first for the hand-written kernels, which stage Xc from channels-first rows (a
// second load path there would need its own tiles). dX comes back in x's layout, as on the
// CPU (mpncov/_meta.py). cuBLAS uses TF32 where torch allows it (MPNCOV_CUDA_TF32 is for
// the hand-written kernels).

Tensor covpool_cuda(const Tensor& x) {
  check_tensor(x, "covpool", "x");
  const int64_t m = positions(x, "covpool");
  const int64_t b = x.size(0);
  const int64_t c = x.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType ct = compute_dtype(x.scalar_type());
  Tensor out = at::empty({b, c, c}, x.options().dtype(ct));
  if (b == 0 || c == 0) return out.to(x.scalar_type());
  TORCH_CHECK(m >= 1, "mpncov.covpool: expected at least one position (M = H*W >= 1), got x of "
              "shape ", x.sizes());
  const Tensor x3 = x.reshape({b, c, m}).to(ct);  // a view, and x's layout, where x is dense
  if (use_cublas_products() || mpncov::is_token_major(x3))
    return mpncov::cuda::covpool_aten(x3).to(x.scalar_type());
  const Tensor xc = x3.contiguous();
  AT_DISPATCH_FLOATING_TYPES(ct, "mpncov_covpool_cuda", [&] {
    Tensor work = at::empty({mpncov::cuda::covpool_forward_workspace(b, c, m)}, xc.options());
    check_launch(mpncov::cuda::covpool_forward<scalar_t>(
                     xc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                     work.data_ptr<scalar_t>(), b, c, m, fp32_math(x), current_stream()),
                 "covpool");
  });
  return out.to(x.scalar_type());
}

// dX = (1/M) (G + G^T) Xc, returned with x's shape and dtype.
Tensor covpool_backward_cuda(const Tensor& grad, const Tensor& x) {
  check_tensor(grad, "covpool_backward", "grad");
  check_tensor(x, "covpool_backward", "x");
  check_same_device(grad, "grad", x, "x", "covpool_backward");
  const int64_t m = positions(x, "covpool_backward");
  const int64_t b = x.size(0);
  const int64_t c = x.size(1);
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == b && grad.size(1) == c && grad.size(2) == c,
              "mpncov.covpool_backward: expected grad of shape (", b, ", ", c, ", ", c,
              ") for x of shape ", x.sizes(), ", got ", grad.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType ct =
      (x.scalar_type() == at::kDouble || grad.scalar_type() == at::kDouble) ? at::kDouble
                                                                              : at::kFloat;
  Tensor dx = at::empty({b, c, m}, x.options().dtype(ct));
  if (b == 0 || c == 0 || m == 0) return dx.view(x.sizes()).to(x.scalar_type());
  const Tensor x3 = x.reshape({b, c, m}).to(ct);
  const Tensor gc = grad.to(ct).contiguous();
  if (use_cublas_products() || mpncov::is_token_major(x3))
    return mpncov::cuda::covpool_backward_aten(gc, x3).view(x.sizes()).to(x.scalar_type());
  const Tensor xc = x3.contiguous();
  AT_DISPATCH_FLOATING_TYPES(ct, "mpncov_covpool_backward_cuda", [&] {
    Tensor work = at::empty({mpncov::cuda::covpool_backward_workspace(b, c, m)}, xc.options());
    check_launch(mpncov::cuda::covpool_backward<scalar_t>(
                     gc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
                     work.data_ptr<scalar_t>(), b, c, m, fp32_math(x), current_stream()),
                 "covpool_backward");
  });
  return dx.view(x.sizes()).to(x.scalar_type());
}

// ---- sqrtm --------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> sqrtm_cuda(const Tensor& s, int64_t iters) {
  check_tensor(s, "sqrtm", "s");
  check_square_batch(s, "sqrtm", "s");
  check_iters(iters, "sqrtm");
  const int64_t b = s.size(0);
  const int64_t n = s.size(1);
  const c10::cuda::CUDAGuard guard(s.device());
  const at::ScalarType ct = sqrtm_compute_dtype(s.scalar_type(), iters);
  const auto opts = s.options().dtype(ct);
  Tensor out = at::empty({b, n, n}, opts);
  Tensor saved = at::empty({b, mpncov::cuda::sqrtm_saved_slots(iters), n, n}, opts);
  if (b == 0 || n == 0) return {out.to(s.scalar_type()), saved};
  const Tensor sc = s.to(ct).contiguous();
  if (use_cublas_products()) {
    auto [root, saved_aten] = mpncov::cuda::sqrtm_aten(sc, iters);
    return {root.to(s.scalar_type()), saved_aten};
  }
  AT_DISPATCH_FLOATING_TYPES(ct, "mpncov_sqrtm_cuda", [&] {
    const auto math = fp32_math(s);
    const auto path = sqrtm_path_of_call<scalar_t>(n, iters, false, math, "sqrtm");
    const bool tiled = path == mpncov::cuda::SqrtmPath::kTiled;
    Tensor work = at::empty({tiled ? mpncov::cuda::sqrtm_forward_workspace(b, n, iters) : 0},
                            opts);
    check_launch(mpncov::cuda::sqrtm_forward<scalar_t>(
                     sc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                     saved.data_ptr<scalar_t>(), work.data_ptr<scalar_t>(), b, n, iters, path,
                     math, current_stream()),
                 "sqrtm");
  });
  return {out.to(s.scalar_type()), saved};
}

// dS in s's dtype: the gradient of sqrtm(sym(S)) for any grad.
Tensor sqrtm_backward_cuda(const Tensor& grad, const Tensor& s, const Tensor& saved,
                           int64_t iters) {
  check_tensor(grad, "sqrtm_backward", "grad");
  check_tensor(s, "sqrtm_backward", "s");
  check_tensor(saved, "sqrtm_backward", "saved");
  check_same_device(grad, "grad", s, "s", "sqrtm_backward");
  check_same_device(saved, "saved", s, "s", "sqrtm_backward");
  check_square_batch(s, "sqrtm_backward", "s");
  check_iters(iters, "sqrtm_backward");
  const int64_t b = s.size(0);
  const int64_t n = s.size(1);
  const int64_t slots = mpncov::cuda::sqrtm_saved_slots(iters);
  TORCH_CHECK(grad.sizes() == s.sizes(), "mpncov.sqrtm_backward: expected grad of the shape of s ",
              s.sizes(), ", got ", grad.sizes());
  TORCH_CHECK(saved.dim() == 4 && saved.size(0) == b && saved.size(1) == slots &&
                  saved.size(2) == n && saved.size(3) == n,
              "mpncov.sqrtm_backward: expected saved of shape (", b, ", ", slots, ", ", n, ", ",
              n, ") for iters = ", iters, ", got ", saved.sizes());
  const c10::cuda::CUDAGuard guard(s.device());
  const at::ScalarType ct = sqrtm_compute_dtype(s.scalar_type(), iters);
  const auto opts = s.options().dtype(ct);
  Tensor ds = at::empty({b, n, n}, opts);
  if (b == 0 || n == 0) return ds.to(s.scalar_type());
  const Tensor gc = grad.to(ct).contiguous();
  const Tensor sc = s.to(ct).contiguous();
  const Tensor savedc = saved.to(ct).contiguous();
  if (use_cublas_products())
    return mpncov::cuda::sqrtm_backward_aten(gc, sc, savedc, iters).to(s.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(ct, "mpncov_sqrtm_backward_cuda", [&] {
    const auto math = fp32_math(s);
    const auto path = sqrtm_path_of_call<scalar_t>(n, iters, true, math, "sqrtm_backward");
    const bool tiled = path == mpncov::cuda::SqrtmPath::kTiled;
    Tensor work = at::empty({tiled ? mpncov::cuda::sqrtm_backward_workspace(b, n, iters) : 0},
                            opts);
    check_launch(mpncov::cuda::sqrtm_backward<scalar_t>(
                     gc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(),
                     savedc.data_ptr<scalar_t>(), ds.data_ptr<scalar_t>(),
                     work.data_ptr<scalar_t>(), b, n, iters, path, math, current_stream()),
                 "sqrtm_backward");
  });
  return ds.to(s.scalar_type());
}

// ---- triuvec ------------------------------------------------------------------------------

Tensor triuvec_cuda(const Tensor& s) {
  check_tensor(s, "triuvec", "s");
  check_square_batch(s, "triuvec", "s");
  const int64_t b = s.size(0);
  const int64_t n = s.size(1);
  const c10::cuda::CUDAGuard guard(s.device());
  const at::ScalarType ct = compute_dtype(s.scalar_type());
  Tensor v = at::empty({b, n * (n + 1) / 2}, s.options().dtype(ct));
  if (b == 0 || n == 0) return v.to(s.scalar_type());
  const Tensor sc = s.to(ct).contiguous();
  AT_DISPATCH_FLOATING_TYPES(ct, "mpncov_triuvec_cuda", [&] {
    check_launch(mpncov::cuda::triuvec_forward<scalar_t>(sc.data_ptr<scalar_t>(),
                                                         v.data_ptr<scalar_t>(), b, n,
                                                         current_stream()),
                 "triuvec");
  });
  return v.to(s.scalar_type());
}

// (B, n(n+1)/2) -> (B, n, n) in grad's dtype.
Tensor triuvec_backward_cuda(const Tensor& grad, c10::SymInt n_sym) {
  check_tensor(grad, "triuvec_backward", "grad");
  const int64_t n = n_sym.guard_int(__FILE__, __LINE__);
  TORCH_CHECK(n >= 0, "mpncov.triuvec_backward: expected n >= 0, got ", n);
  TORCH_CHECK(grad.dim() == 2, "mpncov.triuvec_backward: expected grad of shape (B, n(n+1)/2) "
              "(2 dims), got ", grad.dim(), " dims with shape ", grad.sizes());
  TORCH_CHECK(grad.size(1) == n * (n + 1) / 2, "mpncov.triuvec_backward: expected grad of shape (B, ",
              n * (n + 1) / 2, ") for n = ", n, ", got ", grad.sizes());
  const int64_t b = grad.size(0);
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::ScalarType ct = compute_dtype(grad.scalar_type());
  Tensor out = at::empty({b, n, n}, grad.options().dtype(ct));
  if (b == 0 || n == 0) return out.to(grad.scalar_type());
  const Tensor gc = grad.to(ct).contiguous();
  AT_DISPATCH_FLOATING_TYPES(ct, "mpncov_triuvec_backward_cuda", [&] {
    check_launch(mpncov::cuda::triuvec_backward<scalar_t>(gc.data_ptr<scalar_t>(),
                                                          out.data_ptr<scalar_t>(), b, n,
                                                          current_stream()),
                 "triuvec_backward");
  });
  return out.to(grad.scalar_type());
}

// ---- isqrt_cov_gram -----------------------------------------------------------------------
// The Gram-space pipeline: the hand-written kernels (gram_kernel.cuh) by default, the
// batched ATen form with its products in cuBLAS (csrc/gram_aten.h) with
// MPNCOV_CUDA_PRODUCTS=cublas. Both follow the CPU kernel's checks, dtype policy (float16 /
// bfloat16 in float32, float32 in float64 beyond kMaxMirroredIters steps; only vec in x's
// dtype), saved layout and degenerate samples; token-major x is read as it is (no
// transposed copy) and dX comes back in x's layout.

std::tuple<Tensor, Tensor> isqrt_cov_gram_cuda(const Tensor& x_in, int64_t iters,
                                               bool recompute_t) {
  const char* op = "isqrt_cov_gram";
  check_tensor(x_in, op, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  if (use_cublas_products()) return mpncov::isqrt_cov_gram_aten(x_in, iters, recompute_t);
  mpncov::check_features_input(x_in, op);
  check_iters(iters, op);
  const int64_t b = x_in.size(0), c = x_in.size(1), m = x_in.size(2);
  const at::ScalarType ct = sqrtm_compute_dtype(x_in.scalar_type(), iters);
  const auto opts = x_in.options().dtype(ct);
  Tensor vec = at::empty({b, c * (c + 1) / 2}, opts);
  Tensor saved = at::empty({b, mpncov::gram_saved_count(iters, recompute_t), m, m}, opts);
  if (b == 0 || c == 0) return {vec.to(x_in.scalar_type()), saved};
  mpncov::FeatureLayout layout;
  const Tensor x = mpncov::features_in(x_in, ct, &layout);
  const bool tokens = layout == mpncov::FeatureLayout::tokens;
  AT_DISPATCH_FLOATING_TYPES(ct, "mpncov_isqrt_cov_gram_cuda", [&] {
    Tensor work = at::empty(
        {mpncov::cuda::isqrt_cov_gram_forward_workspace<scalar_t>(b, c, m, iters, recompute_t)},
        opts);
    check_launch(mpncov::cuda::isqrt_cov_gram_forward<scalar_t>(
                     x.data_ptr<scalar_t>(), tokens, vec.data_ptr<scalar_t>(),
                     saved.data_ptr<scalar_t>(), work.data_ptr<scalar_t>(), b, c, m, iters,
                     recompute_t, fp32_math(x_in), current_stream()),
                 op);
  });
  return {vec.to(x_in.scalar_type()), saved};
}

Tensor isqrt_cov_gram_backward_cuda(const Tensor& grad, const Tensor& x_in, const Tensor& saved_in,
                                    int64_t iters) {
  const char* op = "isqrt_cov_gram_backward";
  check_tensor(grad, op, "grad");
  check_tensor(x_in, op, "x");
  check_tensor(saved_in, op, "saved");
  check_same_device(grad, "grad", x_in, "x", op);
  check_same_device(saved_in, "saved", x_in, "x", op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  if (use_cublas_products()) return mpncov::isqrt_cov_gram_backward_aten(grad, x_in, saved_in, iters);
  const bool recompute_t = mpncov::check_gram_backward_args(grad, x_in, saved_in, iters, op);
  const int64_t b = x_in.size(0), c = x_in.size(1), m = x_in.size(2);
  const at::ScalarType ct = sqrtm_compute_dtype(x_in.scalar_type(), iters);
  Tensor dx = mpncov::empty_features_like(x_in, ct);
  if (b == 0 || c == 0) return dx.zero_().to(x_in.scalar_type());
  mpncov::FeatureLayout layout;
  const Tensor x = mpncov::features_in(x_in, ct, &layout);
  const bool tokens = layout == mpncov::FeatureLayout::tokens;
  TORCH_INTERNAL_ASSERT(mpncov::is_token_major(dx) == tokens,
                        "mpncov.isqrt_cov_gram_backward: dx and x in different layouts");
  const Tensor g = grad.to(ct).contiguous();
  const Tensor saved = saved_in.to(ct).contiguous();
  AT_DISPATCH_FLOATING_TYPES(ct, "mpncov_isqrt_cov_gram_backward_cuda", [&] {
    Tensor work = at::empty(
        {mpncov::cuda::isqrt_cov_gram_backward_workspace<scalar_t>(b, c, m, iters, recompute_t)},
        x.options());
    check_launch(mpncov::cuda::isqrt_cov_gram_backward<scalar_t>(
                     g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), tokens,
                     saved.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
                     work.data_ptr<scalar_t>(), b, c, m, iters, recompute_t, fp32_math(x_in),
                     current_stream()),
                 op);
  });
  return dx.to(x_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(mpncov, CUDA, m) {
  m.impl("covpool", &covpool_cuda);
  m.impl("covpool_backward", &covpool_backward_cuda);
  m.impl("sqrtm", &sqrtm_cuda);
  m.impl("sqrtm_backward", &sqrtm_backward_cuda);
  m.impl("triuvec", &triuvec_cuda);
  m.impl("triuvec_backward", &triuvec_backward_cuda);
  m.impl("isqrt_cov_gram", &isqrt_cov_gram_cuda);
  m.impl("isqrt_cov_gram_backward", &isqrt_cov_gram_backward_cuda);
}

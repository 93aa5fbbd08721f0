// Shared helpers of the CPU kernels: argument checks, the compute dtype policy, and
// batched products that exploit symmetric outputs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

namespace mpncov {

// fp16/bf16 inputs are computed in fp32 and returned in their own dtype (the autocast
// policy of every mpncov op); float32 and float64 are computed natively.
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// at::empty for large work buffers: asks the kernel for transparent huge pages where it
// offers them on request (THP "madvise" mode), so first touch costs one fault per 2 MB
// instead of one per 4 KB; at C = 256 those faults cost as much as a third of the run.
at::Tensor empty_buffer(at::IntArrayRef sizes, const at::TensorOptions& options);

// A floating tensor of rank `ndim`; the message names the op, the argument and what was
// wrong, so a user sees the bad shape or dtype.
void check_input(const at::Tensor& t, const char* op, const char* arg, int64_t ndim);

// A (B, n, n) tensor.
void check_square(const at::Tensor& t, const char* op, const char* arg);

// out[b] = beta * out[b] + alpha * a[b] @ bm[b] for every sample b. When `upper` is set only
// the blocks on or above the diagonal of out are computed (a symmetric result is completed
// by mirror_upper); this costs about (k+1)/(2k) of the full product for k row blocks.
// beta == 0 ignores the old content of out (it may be uninitialised).
void batched_product(at::Tensor& out, const at::Tensor& a, const at::Tensor& bm, double alpha,
                     double beta, bool upper);

// out[b] = alpha * (a1[b] @ b1[b] + a2[b] @ b2[b]). With direct BLAS the second product
// accumulates into the first (beta = 1). Without it, ATen cannot accumulate into strided
// blocks cheaply, so the sum is one product [a1 | a2] @ [b1 ; b2] packed into the
// caller-owned workspaces `left` (B, n, 2k) and `right` (B, 2k, m).
void batched_product_sum(at::Tensor& out, const at::Tensor& a1, const at::Tensor& b1,
                         const at::Tensor& a2, const at::Tensor& b2, double alpha, bool upper,
                         at::Tensor& left, at::Tensor& right);

// Copy the block upper triangle written by batched_product(..., upper=true) to the lower
// one, so that m[b] is symmetric.
void mirror_upper(at::Tensor& m);

// Row-block size used by batched_product's upper mode for an n x n output.
int64_t symmetric_block_size(int64_t n);

}  // namespace mpncov

// Pieces shared by the CUDA spmm and sddmm kernels: the dtype dispatch (fp32 / bf16 / fp16, fp32
// accumulation), a warp sum, argument checks and launch-size checks.
//
// Both kernels work on batch-contiguous operands: x (B, n_in) is transposed to (n_in, B) on the device first,
// so the 32 lanes of a warp, which run over the batch, read 32 consecutive elements for every nonzero
// (coalesced) whatever the column pattern. The transpose costs one pass over x; the gathers it makes coalesced
// cost B * nnz reads.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace sparsekern {
namespace csr {
namespace cuda {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Calls f(scalar_t{}) for float, c10::BFloat16 or c10::Half; any other dtype is a TypeError naming `what`.
template <typename F>
void dispatch_float(at::ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case at::kFloat:
      f(float{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    default:
      TORCH_CHECK_TYPE(false, what, " must be float32, bfloat16 or float16, got ", dtype);
  }
}

// Host-side checks; the messages name the op and the argument, like the CPU implementation's.
inline void check_on(const char* fn, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK_VALUE(t.is_cuda(), fn, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK_VALUE(t.device() == device, fn, ": tensors must be on one device, got ", name, " on ", t.device(),
                    " and the others on ", device);
}

inline void check_matrix(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 2, fn, ": ", name, " must be 2-D, got ", t.dim(), "-D");
  TORCH_CHECK_VALUE(t.is_contiguous(), fn, ": ", name, " must be contiguous");
}

// The index of a CSR matrix with n_rows rows. Only shapes and dtypes are checked: reading row_ptr's last entry
// or the column range would synchronise with the device, so the index contents are the caller's contract. The
// Python entry points keep it: every index a user gives is validated once (sparsekern/_csr.py, check_csr) before
// any launch, and a SparseLinear's buffers again whenever their version counters move.
inline void check_csr(const char* fn, const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t n_rows,
                      const at::Device& device) {
  TORCH_CHECK_TYPE(row_ptr.scalar_type() == at::kLong, fn, ": row_ptr must be int64, got ", row_ptr.scalar_type());
  TORCH_CHECK_TYPE(col_idx.scalar_type() == at::kInt, fn, ": col_idx must be int32, got ", col_idx.scalar_type());
  TORCH_CHECK_VALUE(row_ptr.dim() == 1, fn, ": row_ptr must be 1-D, got ", row_ptr.dim(), "-D");
  TORCH_CHECK_VALUE(col_idx.dim() == 1, fn, ": col_idx must be 1-D, got ", col_idx.dim(), "-D");
  TORCH_CHECK_VALUE(row_ptr.numel() == n_rows + 1, fn, ": row_ptr must have n_rows + 1 = ", n_rows + 1,
                    " entries, got ", row_ptr.numel());
  TORCH_CHECK_VALUE(row_ptr.is_contiguous(), fn, ": row_ptr must be contiguous");
  TORCH_CHECK_VALUE(col_idx.is_contiguous(), fn, ": col_idx must be contiguous");
  check_on(fn, "row_ptr", row_ptr, device);
  check_on(fn, "col_idx", col_idx, device);
}

// Grid dimensions as unsigned, or an error when the problem is too large for one launch.
inline unsigned grid_x(const char* fn, int64_t blocks) {
  TORCH_CHECK(blocks > 0 && blocks <= INT32_MAX, fn, ": problem too large for one launch (", blocks, " blocks)");
  return static_cast<unsigned>(blocks);
}

inline unsigned grid_y(const char* fn, int64_t blocks) {
  TORCH_CHECK(blocks > 0 && blocks <= 65535, fn, ": batch too large for one launch (", blocks, " batch tiles)");
  return static_cast<unsigned>(blocks);
}

}  // namespace cuda
}  // namespace csr
}  // namespace sparsekern

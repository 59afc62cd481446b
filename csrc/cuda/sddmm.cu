// SDDMM on CUDA: the gradient of a CSR weight's values, out[j] = sum_b g[b, row(j)] * x[b, col_idx[j]].
// One warp owns kNnzPerWarp consecutive nonzeros (balanced whatever the row lengths): it finds the row of the
// first by binary search in row_ptr (csr::row_of) and walks forward from there (csr::advance_row); for each
// nonzero its lanes run over the batch of the batch-contiguous g and x, accumulate in fp32 and reduce with
// warp shuffles.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "sparsekern/csr.h"
#include "sparsekern/spmm_cuda.cuh"

namespace sparsekern {
namespace {

namespace cu = csr::cuda;

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * cu::kWarp;
constexpr int kNnzPerWarp = cu::kWarp;  // one coalesced col_idx load per warp, then shuffles

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    sddmm_kernel(const scalar_t* __restrict__ gt,  // (n_out, batch)
                 const scalar_t* __restrict__ xt,  // (n_in, batch)
                 const int64_t* __restrict__ row_ptr, const int32_t* __restrict__ col_idx,
                 scalar_t* __restrict__ out, int64_t n_out, int64_t nnz, int64_t batch) {
  const int lane = static_cast<int>(threadIdx.x) % cu::kWarp;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / cu::kWarp;
  const int64_t first = warp * kNnzPerWarp;
  if (first >= nnz) return;  // whole warps leave together
  const int count = nnz - first < kNnzPerWarp ? static_cast<int>(nnz - first) : kNnzPerWarp;
  const int32_t lane_col = lane < count ? col_idx[first + lane] : 0;

  int64_t row = csr::row_of(row_ptr, n_out, first);
  for (int k = 0; k < count; ++k) {
    const int64_t j = first + k;
    row = csr::advance_row(row_ptr, row, j);  // uniform across the warp: every lane reads the same entries
    const int64_t c = __shfl_sync(cu::kFullMask, lane_col, k);
    const scalar_t* __restrict__ grow = gt + row * batch;
    const scalar_t* __restrict__ xrow = xt + c * batch;
    float acc = 0.f;
#pragma unroll 4
    for (int64_t b = lane; b < batch; b += cu::kWarp) {
      acc += static_cast<float>(grow[b]) * static_cast<float>(xrow[b]);
    }
    acc = cu::warp_sum(acc);
    if (lane == 0) out[j] = static_cast<scalar_t>(acc);
  }
}

}  // namespace

at::Tensor sddmm_cuda(const at::Tensor& g, const at::Tensor& x, const at::Tensor& row_ptr,
                      const at::Tensor& col_idx) {
  constexpr const char* fn = "sddmm";
  TORCH_CHECK_VALUE(g.is_cuda(), fn, ": g must be a CUDA tensor, got one on ", g.device());
  cu::check_matrix(fn, "g", g);
  cu::check_matrix(fn, "x", x);
  cu::check_on(fn, "x", x, g.device());
  TORCH_CHECK_TYPE(x.scalar_type() == g.scalar_type(), fn, ": x must have g's dtype ", g.scalar_type(), ", got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.size(0) == g.size(0), fn, ": g and x must have the same batch size, got ", g.size(0),
                    " and ", x.size(0));
  const int64_t n_out = g.size(1);
  cu::check_csr(fn, row_ptr, col_idx, n_out, g.device());

  const c10::cuda::CUDAGuard device_guard(g.device());
  const int64_t batch = g.size(0), nnz = col_idx.numel();
  at::Tensor out;
  cu::dispatch_float(g.scalar_type(), "sddmm: g", [&](auto tag) {
    using scalar_t = decltype(tag);
    if (nnz == 0 || batch == 0) {
      out = at::zeros({nnz}, g.options());
      return;
    }
    const at::Tensor gt = g.t().contiguous();
    const at::Tensor xt = x.t().contiguous();
    out = at::empty({nnz}, g.options());
    const int64_t warps = (nnz + kNnzPerWarp - 1) / kNnzPerWarp;
    const unsigned blocks = cu::grid_x(fn, (warps + kWarpsPerBlock - 1) / kWarpsPerBlock);
    sddmm_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        gt.data_ptr<scalar_t>(), xt.data_ptr<scalar_t>(), row_ptr.data_ptr<int64_t>(), col_idx.data_ptr<int32_t>(),
        out.data_ptr<scalar_t>(), n_out, nnz, batch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) { m.impl("sddmm", &sddmm_cuda); }

}  // namespace sparsekern

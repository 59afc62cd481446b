// ELL SpMM on CUDA: y = x @ W.T for a constant fan-in weight W (n_out, n_in) stored as cols / values (n_out, k).
// Every row has k nonzeros at cols[o, :], so a warp finds its row without a row_ptr and every warp does the same
// work. The schedules (lanes over the batch for large batches, lanes over the nonzeros for B <= 16) are in
// sparsekern/ell_cuda.cuh; fp32 accumulation, one rounding to x's dtype per output.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "sparsekern/ell_cuda.cuh"

namespace sparsekern {

at::Tensor ell_spmm_cuda(const at::Tensor& x, const at::Tensor& cols, const at::Tensor& values) {
  namespace cu = csr::cuda;
  namespace ec = ell::cuda;
  constexpr const char* fn = "ell_spmm";
  TORCH_CHECK_VALUE(x.is_cuda(), fn, ": x must be a CUDA tensor, got one on ", x.device());
  cu::check_matrix(fn, "x", x);
  ec::check_cols(fn, cols, x.device());
  ec::check_values(fn, values, cols, x.scalar_type(), "x", x.device());

  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t batch = x.size(0), n_out = cols.size(0), k = cols.size(1);
  at::Tensor y;
  cu::dispatch_float(x.scalar_type(), "ell_spmm: x", [&](auto tag) {
    using scalar_t = decltype(tag);
    if (batch == 0 || n_out == 0 || k == 0) {
      y = at::zeros({batch, n_out}, x.options());
      return;
    }
    const ec::EllRows<scalar_t> rows{cols.data_ptr<int32_t>(), values.data_ptr<scalar_t>(), k};
    y = ec::launch_gather<scalar_t>(fn, x, rows, n_out, c10::cuda::getCurrentCUDAStream());
  });
  return y;
}

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) { m.impl("ell_spmm", &ell_spmm_cuda); }

}  // namespace sparsekern

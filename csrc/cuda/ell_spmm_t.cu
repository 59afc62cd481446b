// ELL SpMM with the transposed weight on CUDA: dX = G @ W for a constant fan-in W (n_out, n_in) in cols / values.
// dX scatters each row of W over its columns; it is computed as a gather instead, deterministically and without
// atomics: W's transposed index is built on the device (a stable sort of the flattened cols gives perm, the flat
// positions o * k + t of each input column's nonzeros in ascending o; searchsorted gives the column pointers; O(nnz)
// work, no host sync), then every input column sums its nonzeros in that fixed order (sparsekern/ell_cuda.cuh,
// TransposedEllRows): the same bits on every run.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "sparsekern/ell_cuda.cuh"

namespace sparsekern {

at::Tensor ell_spmm_t_cuda(const at::Tensor& g, const at::Tensor& cols, const at::Tensor& values, int64_t n_in) {
  namespace cu = csr::cuda;
  namespace ec = ell::cuda;
  constexpr const char* fn = "ell_spmm_t";
  TORCH_CHECK_VALUE(g.is_cuda(), fn, ": g must be a CUDA tensor, got one on ", g.device());
  cu::check_matrix(fn, "g", g);
  ec::check_cols(fn, cols, g.device());
  ec::check_values(fn, values, cols, g.scalar_type(), "g", g.device());
  TORCH_CHECK_VALUE(n_in >= 0, fn, ": n_in must be >= 0, got ", n_in);
  TORCH_CHECK_VALUE(g.size(1) == cols.size(0), fn, ": g must have one column per row of cols (", cols.size(0),
                    "), got ", g.size(1));

  const c10::cuda::CUDAGuard device_guard(g.device());
  const int64_t batch = g.size(0), k = cols.size(1), nnz = cols.numel();
  at::Tensor dx;
  cu::dispatch_float(g.scalar_type(), "ell_spmm_t: g", [&](auto tag) {
    using scalar_t = decltype(tag);
    if (batch == 0 || n_in == 0 || nnz == 0) {
      dx = at::zeros({batch, n_in}, g.options());
      return;
    }
    const auto sorted = at::sort(cols.reshape({-1}), /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const at::Tensor& sorted_cols = std::get<0>(sorted);
    const at::Tensor col_ptr = at::searchsorted(sorted_cols, at::arange(n_in + 1, cols.options()));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    if (nnz <= INT32_MAX) {
      const at::Tensor perm = std::get<1>(sorted).to(at::kInt);  // half the index reads
      const ec::TransposedEllRows<scalar_t, int32_t> rows{col_ptr.data_ptr<int64_t>(), perm.data_ptr<int32_t>(),
                                                          values.data_ptr<scalar_t>(), k};
      dx = ec::launch_gather<scalar_t>(fn, g, rows, n_in, stream);
    } else {
      const at::Tensor& perm = std::get<1>(sorted);
      const ec::TransposedEllRows<scalar_t, int64_t> rows{col_ptr.data_ptr<int64_t>(), perm.data_ptr<int64_t>(),
                                                          values.data_ptr<scalar_t>(), k};
      dx = ec::launch_gather<scalar_t>(fn, g, rows, n_in, stream);
    }
  });
  return dx;
}

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) { m.impl("ell_spmm_t", &ell_spmm_t_cuda); }

}  // namespace sparsekern

// SDDMM on the CPU: the gradient of a CSR weight's values, out[j] = sum_b g[b, row(j)] * x[b, col_idx[j]].
// The kernel (batch tiles, the AVX-512 / AVX2 / portable walks, the per-worker accumulators) is sddmm_walk.h's,
// shared with the ELL op; here its rows come from the row pointer.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#include "sparsekern/batch_tiles.h"
#include "sparsekern/sddmm_walk.h"

namespace sparsekern {

at::Tensor sddmm_cpu(const at::Tensor& g, const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx) {
  batch_tiles::check_activation("sddmm", "g", g);
  batch_tiles::check_activation("sddmm", "x", x);
  TORCH_CHECK_TYPE(g.scalar_type() == x.scalar_type(), "sddmm: g and x must have the same dtype, got ",
                   g.scalar_type(), " and ", x.scalar_type());
  TORCH_CHECK_VALUE(g.size(0) == x.size(0), "sddmm: g and x must have the same batch size, got ", g.sizes(), " and ",
                    x.sizes());
  const int64_t batch = x.size(0), n_in = x.size(1), n_out = g.size(1);
  const int64_t nnz = batch_tiles::check_csr("sddmm", row_ptr, col_idx, n_out, x.size(1));
  if (nnz == 0 || batch == 0) return at::zeros({nnz}, x.options());

  const sddmm_walk::Args<sddmm_walk::CsrRows> a{g.data_ptr(), x.data_ptr(), {row_ptr.data_ptr<int64_t>()},
                                                 col_idx.data_ptr<int32_t>(), batch, n_in, n_out};
  at::Tensor out = at::empty({nnz}, x.options());
  sddmm_walk::run(a, nnz, out, [&](int64_t lanes) {
    return batch_tiles::split_work(batch, lanes, a.rows.row_ptr, n_out);
  });
  return out;
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("sddmm", &sddmm_cpu); }

}  // namespace sparsekern

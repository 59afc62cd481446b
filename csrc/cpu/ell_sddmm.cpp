// ELL SDDMM on the CPU: the gradient of a constant fan-in W's values, out[o, t] = sum_b g[b, o] * x[b, cols[o, t]],
// in the layout of values (n_out, k). The kernel is the CSR op's (sddmm_walk.h) with rows found by counting (every
// k-th nonzero starts a row), never by reading a row pointer, and an exact work split by rows.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#include "sparsekern/batch_tiles.h"
#include "sparsekern/ell.h"
#include "sparsekern/sddmm_walk.h"

namespace sparsekern {

at::Tensor ell_sddmm_cpu(const at::Tensor& g, const at::Tensor& x, const at::Tensor& cols) {
  batch_tiles::check_activation("ell_sddmm", "g", g);
  batch_tiles::check_activation("ell_sddmm", "x", x);
  TORCH_CHECK_TYPE(g.scalar_type() == x.scalar_type(), "ell_sddmm: g and x must have the same dtype, got ",
                   g.scalar_type(), " and ", x.scalar_type());
  TORCH_CHECK_VALUE(g.size(0) == x.size(0), "ell_sddmm: g and x must have the same batch size, got ", g.sizes(),
                    " and ", x.sizes());
  const int64_t batch = x.size(0), n_in = x.size(1), n_out = g.size(1);
  const int64_t k = ell::check_cols("ell_sddmm", cols, n_out, n_in);
  const int64_t nnz = n_out * k;
  if (nnz == 0 || batch == 0) return at::zeros(cols.sizes(), x.options());

  const sddmm_walk::Args<sddmm_walk::EllRows> a{g.data_ptr(), x.data_ptr(), {k}, cols.data_ptr<int32_t>(), batch,
                                                n_in, n_out};
  at::Tensor out = at::empty(cols.sizes(), x.options());
  sddmm_walk::run(a, nnz, out, [&](int64_t lanes) { return ell::split_rows(batch, lanes, n_out); });
  return out;
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("ell_sddmm", &ell_sddmm_cpu); }

}  // namespace sparsekern

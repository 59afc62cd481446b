// Constant fan-in (ELL) index checks and work split shared by the CPU ELL kernels (ell_spmm, ell_spmm_t,
// ell_sddmm).
//
// W (n_out, n_in) keeps k nonzeros in every row: cols int32 (n_out, k), each row strictly ascending in [0, n_in),
// values (n_out, k). The Python ops validate the index on every call; the ops are public through torch.ops too and
// tensors can be edited behind those checks' back, so the kernels scan cols again here: one branch-free,
// vectorised O(n_out * k) integer pass (split across threads), next to kernels that read every nonzero at least
// once per batch tile. Only a refused index is walked again row by row, for the message.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "sparsekern/batch_tiles.h"

namespace sparsekern {
namespace ell {

// Whether a row of cols (k per row) is valid: first >= 0, last < n_cols, strictly ascending (so all in range).
// The steps down are counted in an int (no early exit, no bool reduction), which GCC vectorises even for the
// x86-64 baseline: a bool |= loop stayed scalar and cost 70 us for 1024 x 102 columns, most of a B=1 forward.
inline bool row_ok(const int32_t* c, int64_t k, int64_t n_cols) {
  if (k == 0) return true;
  int32_t descents = 0;
  for (int64_t t = 1; t < k; ++t) descents += c[t] <= c[t - 1] ? 1 : 0;
  return descents == 0 && c[0] >= 0 && c[k - 1] < n_cols;
}

// cols: a contiguous int32 (n_rows, k) CPU tensor (n_rows < 0: any) whose rows are valid for n_cols columns.
// Returns k.
inline int64_t check_cols(const char* op, const at::Tensor& cols, int64_t n_rows, int64_t n_cols) {
  TORCH_CHECK_VALUE(cols.device().is_cpu(), op, ": cols must be a CPU tensor, got ", cols.device());
  TORCH_CHECK_TYPE(cols.scalar_type() == at::kInt, op, ": cols must be int32, got ", cols.scalar_type());
  TORCH_CHECK_VALUE(cols.dim() == 2, op, ": cols must be 2-D (n_out, k), got ", cols.dim(), "-D");
  TORCH_CHECK_VALUE(cols.is_contiguous(), op, ": cols must be contiguous");
  TORCH_CHECK_VALUE(n_rows < 0 || cols.size(0) == n_rows, op, ": cols must have ", n_rows,
                    " rows (one per output), got ", cols.sizes());
  const int64_t rows = cols.size(0), k = cols.size(1);
  TORCH_CHECK_VALUE(k <= n_cols, op, ": cols holds ", k, " columns per row, more than n_in=", n_cols,
                    " (columns are unique)");
  const int32_t* c = cols.data_ptr<int32_t>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / std::max<int64_t>(1, k));
  const bool ok = at::parallel_reduce(
      0, rows, grain, true,
      [&](int64_t r0, int64_t r1, bool) {
        bool all = true;
        for (int64_t r = r0; r < r1; ++r) all &= row_ok(c + r * k, k, n_cols);
        return all;
      },
      [](bool a, bool b) { return a && b; });
  if (!ok) {
    int64_t r = 0;
    while (row_ok(c + r * k, k, n_cols)) ++r;
    const int32_t* row = c + r * k;
    const auto [lo, hi] = std::minmax_element(row, row + k);
    TORCH_CHECK_VALUE(*lo >= 0 && *hi < n_cols, op, ": cols must lie in [0, ", n_cols, "), got ",
                      *lo < 0 ? *lo : *hi, " in row ", r);
    TORCH_CHECK_VALUE(false, op, ": cols must be ascending and unique within each row, row ", r, " is not");
  }
  return k;
}

// values: a contiguous CPU tensor of cols' shape in `dtype`.
inline void check_values(const char* op, const char* name, const at::Tensor& values, const at::Tensor& cols,
                         at::ScalarType dtype) {
  TORCH_CHECK_VALUE(values.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", values.device());
  TORCH_CHECK_TYPE(values.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ",
                   values.scalar_type());
  TORCH_CHECK_VALUE(values.sizes() == cols.sizes() && values.is_contiguous(), op, ": ", name,
                    " must be a contiguous tensor of cols' shape ", cols.sizes(), ", got ", values.sizes());
}

// A batch_tiles::Split for equal rows: whole tiles per worker when the tiles divide evenly among the threads,
// otherwise every tile cut into `threads` row ranges of whole 16-row staging blocks (equal rows: equal work).
inline batch_tiles::Split split_rows(int64_t batch, int64_t lanes, int64_t n_rows) {
  batch_tiles::Split s;
  s.lanes = lanes;
  s.n_tiles = (batch + lanes - 1) / lanes;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t blocks = (n_rows + batch_tiles::kBlock - 1) / batch_tiles::kBlock;
  if (s.n_tiles % threads != 0) s.splits = std::max<int64_t>(1, std::min(threads, blocks));
  s.workers = std::max<int64_t>(1, std::min(threads, s.items()));
  s.row_bounds.resize(s.splits + 1);
  for (int64_t i = 0; i <= s.splits; ++i) {
    s.row_bounds[i] = std::min(n_rows, blocks * i / s.splits * batch_tiles::kBlock);
  }
  return s;
}

}  // namespace ell
}  // namespace sparsekern

// outer_topk's argument checks shared by its CPU and CUDA entry points, after each has checked its tensors'
// devices and layouts: x and g agree in dtype and batch, n_out * n_in fits the packed flat index, and k is in
// [0, candidates]. Host only (ATen); the selection rules themselves are in outer_topk.h.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "sparsekern/outer_topk.h"

namespace sparsekern {
namespace outer_topk {

inline void check_sizes(const char* fn, const at::Tensor& x, const at::Tensor& g) {
  TORCH_CHECK_VALUE(g.scalar_type() == x.scalar_type(), fn, ": g must have x's dtype ", x.scalar_type(), ", got ",
                    g.scalar_type());
  TORCH_CHECK_VALUE(g.size(0) == x.size(0), fn, ": x and g must have the same batch size, got ", x.size(0), " and ",
                    g.size(0));
  const int64_t n_positions = g.size(1) * x.size(1);
  TORCH_CHECK_VALUE(n_positions <= int64_t{1} << kIndexBits, fn, ": n_out * n_in must be at most 2**33, got ",
                    n_positions);
}

inline void check_k(const char* fn, int64_t k, int64_t n_candidates) {
  TORCH_CHECK_VALUE(k >= 0 && k <= n_candidates, fn, ": k must be in [0, candidates = ", n_candidates, "], got ", k);
}

}  // namespace outer_topk
}  // namespace sparsekern

// CSR index arithmetic shared by the CPU and CUDA sparse-matmul kernels (spmm, sddmm). Header-only, no ATen,
// __host__ __device__ and constexpr: the CUDA kernels, CPU code and the compile-time checks below all execute
// these same functions.
//
// A CSR matrix with n_rows rows: row r holds nonzeros row_ptr[r] .. row_ptr[r + 1] - 1, row_ptr[0] == 0,
// row_ptr is non-decreasing (empty rows repeat a value) and row_ptr[n_rows] == nnz.
#pragma once

#include <cstdint>

#include "sparsekern/hd.h"

namespace sparsekern {
namespace csr {

// The row holding nonzero j (0 <= j < nnz): the one r with row_ptr[r] <= j < row_ptr[r + 1]. Empty rows never
// satisfy that, so they are skipped. Binary search, O(log n_rows) reads of row_ptr.
SPARSEKERN_HD int64_t row_of(const int64_t* row_ptr, int64_t n_rows, int64_t j) {
  int64_t lo = 0, hi = n_rows;  // invariant: row_ptr[lo] <= j < row_ptr[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (row_ptr[mid] <= j) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// The row holding nonzero j, given the row `row` of an earlier nonzero (row <= row_of(j)): a linear walk, for
// code that visits nonzeros in ascending order and would otherwise search for every one.
SPARSEKERN_HD int64_t advance_row(const int64_t* row_ptr, int64_t row, int64_t j) {
  while (row_ptr[row + 1] <= j) ++row;
  return row;
}

namespace detail {

// Rows 0, 2, 3 and 6 are empty; rows 1, 4, 5 hold 2, 3 and 1 nonzeros.
SPARSEKERN_HD bool row_of_self_test() {
  const int64_t row_ptr[] = {0, 0, 2, 2, 2, 5, 6, 6};
  const int64_t n_rows = 7;
  const int64_t expected[] = {1, 1, 4, 4, 4, 5};
  int64_t walked = 0;
  for (int64_t j = 0; j < 6; ++j) {
    if (row_of(row_ptr, n_rows, j) != expected[j]) return false;
    walked = advance_row(row_ptr, walked, j);
    if (walked != expected[j]) return false;
  }
  const int64_t one_row[] = {0, 3};  // a single row: every nonzero is in row 0
  return row_of(one_row, 1, 0) == 0 && row_of(one_row, 1, 2) == 0;
}
static_assert(row_of_self_test(), "csr::row_of / advance_row must find the row of every nonzero");

}  // namespace detail

}  // namespace csr
}  // namespace sparsekern

// CSR index arithmetic shared by the CPU and CUDA sparse-matmul kernels (spmm, sddmm). Header-only, no ATen,
// __host__ __device__ and constexpr: the CUDA kernels, CPU code and the compile-time checks below all execute
// these same functions.
//
// A CSR matrix with n_rows rows: row r holds nonzeros row_ptr[r] .. row_ptr[r + 1] - 1, row_ptr[0] == 0,
// row_ptr is non-decreasing (empty rows repeat a value) and row_ptr[n_rows] == nnz; within each row the columns
// are strictly ascending and lie in [0, n_cols).
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

// What is wrong with one row's columns (see row_fault).
enum RowFault : int { kRowOk = 0, kColumnBelowZero, kColumnTooLarge, kColumnOrder };

// Whether row r's columns are valid: strictly ascending (sorted, no repeats), the first >= 0 and the last < n_cols,
// so all lie in [0, n_cols). row_ptr must already be known nondecreasing within [0, nnz]: this reads col_idx at
// row_ptr[r] .. row_ptr[r + 1] - 1. The inner loop has no early exit, so the compiler vectorises it.
SPARSEKERN_HD int row_fault(const int64_t* row_ptr, const int32_t* col_idx, int64_t r, int64_t n_cols) {
  const int64_t begin = row_ptr[r], end = row_ptr[r + 1];
  if (begin == end) return kRowOk;
  if (col_idx[begin] < 0) return kColumnBelowZero;
  if (col_idx[end - 1] >= n_cols) return kColumnTooLarge;
  bool unordered = false;
  for (int64_t j = begin + 1; j < end; ++j) unordered |= col_idx[j] <= col_idx[j - 1];
  return unordered ? kColumnOrder : kRowOk;
}

// The first r < n_rows with row_ptr[r + 1] < row_ptr[r], or -1 when row_ptr is nondecreasing.
SPARSEKERN_HD int64_t first_decrease(const int64_t* row_ptr, int64_t n_rows) {
  bool decreasing = false;
  for (int64_t r = 0; r < n_rows; ++r) decreasing |= row_ptr[r + 1] < row_ptr[r];
  if (!decreasing) return -1;
  for (int64_t r = 0; r < n_rows; ++r) {
    if (row_ptr[r + 1] < row_ptr[r]) return r;
  }
  return -1;
}

// Over the nonzeros [j0, j1): the smallest and largest column, and how many j in (max(j0, 0), j1) step down or
// repeat (col_idx[j] <= col_idx[j - 1]). Branch-free reductions over the flat column array, which the compiler
// vectorises whatever the row lengths; see columns_valid.
struct ColumnStats {
  int32_t lo;
  int32_t hi;
  int64_t descents;
};

SPARSEKERN_HD ColumnStats column_stats(const int32_t* col_idx, int64_t j0, int64_t j1) {
  ColumnStats s{INT32_MAX, INT32_MIN, 0};
  constexpr int64_t kChunk = int64_t{1} << 20;  // an int32 count per chunk vectorises better than an int64 one
  for (int64_t c0 = j0; c0 < j1; c0 += kChunk) {
    const int64_t c1 = c0 + kChunk < j1 ? c0 + kChunk : j1;
    int32_t lo = INT32_MAX, hi = INT32_MIN, descents = 0;
    for (int64_t j = c0; j < c1; ++j) {
      lo = col_idx[j] < lo ? col_idx[j] : lo;
      hi = col_idx[j] > hi ? col_idx[j] : hi;
    }
    for (int64_t j = c0 > 0 ? c0 : 1; j < c1; ++j) descents += col_idx[j] <= col_idx[j - 1];
    s.lo = lo < s.lo ? lo : s.lo;
    s.hi = hi > s.hi ? hi : s.hi;
    s.descents += descents;
  }
  return s;
}

// How many nonempty rows in [r0, r1) start one step down or at a repeat of the column before them (the last one
// of an earlier row): the descents that are allowed. row_ptr must be nondecreasing within [0, nnz].
SPARSEKERN_HD int64_t row_start_descents(const int64_t* row_ptr, const int32_t* col_idx, int64_t r0, int64_t r1) {
  int64_t n = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t j = row_ptr[r];
    n += j > 0 && j < row_ptr[r + 1] && col_idx[j] <= col_idx[j - 1];
  }
  return n;
}

// Whether every row's columns are strictly ascending in [0, n_cols), from the stats of all nonzeros: every
// descent of the flat array is then one at a row start. Equivalent to row_fault == kRowOk for every row.
SPARSEKERN_HD bool columns_valid(ColumnStats s, int64_t start_descents, int64_t nnz, int64_t n_cols) {
  return nnz == 0 || (s.lo >= 0 && s.hi < n_cols && s.descents == start_descents);
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

// Row 0: columns 1, 4; row 1 empty; row 2: 0, 2, 5 (n_cols 6).
SPARSEKERN_HD bool row_fault_self_test() {
  const int64_t row_ptr[] = {0, 2, 2, 5};
  const int32_t good[] = {1, 4, 0, 2, 5};
  const int32_t negative[] = {-1, 4, 0, 2, 5};
  const int32_t too_large[] = {1, 4, 0, 2, 6};
  const int32_t repeated[] = {1, 4, 0, 2, 2};
  const int32_t unsorted[] = {4, 1, 0, 2, 5};
  for (int64_t r = 0; r < 3; ++r) {
    if (row_fault(row_ptr, good, r, 6) != kRowOk) return false;
  }
  const int64_t non_monotone[] = {0, 5, 0, 5};
  return row_fault(row_ptr, negative, 0, 6) == kColumnBelowZero &&
         row_fault(row_ptr, too_large, 2, 6) == kColumnTooLarge && row_fault(row_ptr, repeated, 2, 6) == kColumnOrder &&
         row_fault(row_ptr, unsorted, 0, 6) == kColumnOrder && row_fault(row_ptr, good, 2, 5) == kColumnTooLarge &&
         first_decrease(row_ptr, 3) == -1 && first_decrease(non_monotone, 3) == 1;
}
static_assert(row_fault_self_test(), "csr::row_fault / first_decrease must find every fault of a CSR index");

// columns_valid of the 5 nonzeros c in the rows of row_fault_self_test.
SPARSEKERN_HD bool columns_valid_of(const int32_t* c, int64_t n_cols) {
  const int64_t row_ptr[] = {0, 2, 2, 5};
  return columns_valid(column_stats(c, 0, 5), row_start_descents(row_ptr, c, 0, 3), 5, n_cols);
}

// columns_valid agrees with row_fault on every case above, also where a row starts below the row before it or at
// a repeat of its last column; a pass cut into chunks counts each descent once.
SPARSEKERN_HD bool columns_valid_self_test() {
  const int32_t good[] = {1, 4, 0, 2, 5}, negative[] = {-1, 4, 0, 2, 5}, too_large[] = {1, 4, 0, 2, 6};
  const int32_t repeated[] = {1, 4, 0, 2, 2}, unsorted[] = {4, 1, 0, 2, 5}, at_start[] = {1, 4, 4, 5, 6};
  const int64_t split_ptr[] = {0, 2, 5};
  const int32_t split[] = {0, 3, 1, 2, 3};  // chunks that cut a row still count each descent once
  const ColumnStats a = column_stats(split, 0, 3), b = column_stats(split, 3, 5);
  return columns_valid_of(good, 6) && !columns_valid_of(negative, 6) && !columns_valid_of(too_large, 6) &&
         !columns_valid_of(repeated, 6) && !columns_valid_of(unsorted, 6) && !columns_valid_of(good, 5) &&
         columns_valid_of(at_start, 7) && !columns_valid_of(at_start, 6) && a.descents + b.descents == 1 &&
         row_start_descents(split_ptr, split, 0, 2) == 1;
}
static_assert(columns_valid_self_test(), "csr::columns_valid must agree with row_fault");

}  // namespace detail

}  // namespace csr
}  // namespace sparsekern

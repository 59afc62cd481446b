// Moves a CSR weight's values into and out of a dense (n_rows, n_cols) matrix: the dense path of the sparse
// linear layer scatters W's nonzeros before its GEMM and gathers dW at the nonzeros after it.
//
// torch's scatter_/index_select do the same with int64 flat indices and a bounds check per element: 0.66 ms for
// 1.2M bf16 values (a copy of them takes 0.03 ms), which at 50% density and B=256 was a quarter of a bf16 GEMM;
// this takes 0.26 ms. Here each worker walks whole rows with their int32 columns; the elements are moved as
// same-size integers, so one copy serves every dtype bit for bit.
// The index is scanned first (batch_tiles::check_csr), so every write lands inside dense whatever the caller passes.
//
// One path for every ISA, on purpose: AVX2 has no scatter instruction, and its gather (vpgatherdd, 8 columns per
// instruction) measured 2x slower than this scalar loop on the Zen 4 machine (fp32 3072x768 at 50% density, one
// thread: 2.0 ms against 0.91 ms), AMD's gathers being microcoded; the loops are bound by memory traffic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <utility>

#include "sparsekern/batch_tiles.h"
#include "sparsekern/cpu_alloc.h"
#include "sparsekern/cpu_features.h"

namespace sparsekern {
namespace {

constexpr int64_t kGrainNnz = 1 << 15;  // nonzeros per task: below this a thread costs more than it saves

// Calls f(E{}) for the unsigned integer E of the element size of t.
template <typename F>
void dispatch_bits(const at::Tensor& t, F&& f) {
  switch (t.element_size()) {
    case 1: f(uint8_t{}); break;
    case 2: f(uint16_t{}); break;
    case 4: f(uint32_t{}); break;
    case 8: f(uint64_t{}); break;
    default: TORCH_CHECK_TYPE(false, "sparsekern: unsupported element size ", t.element_size());
  }
}

// Runs fn(row_begin, row_end) over all rows, in tasks of about kGrainNnz nonzeros.
template <typename F>
void for_rows(const int64_t* row_ptr, int64_t n_rows, F&& fn) {
  const int64_t nnz = row_ptr[n_rows];
  const int64_t grain = std::max<int64_t>(1, n_rows * kGrainNnz / std::max<int64_t>(1, nnz));
  at::parallel_for(0, n_rows, grain, fn);
}

void check_dense(const char* op, const at::Tensor& dense) {
  TORCH_CHECK_VALUE(dense.device().is_cpu(), op, ": dense must be a CPU tensor, got ", dense.device());
  TORCH_CHECK_VALUE(dense.dim() == 2, op, ": dense must be 2-D (rows, cols), got ", dense.dim(), "-D");
  TORCH_CHECK_VALUE(dense.is_contiguous(), op, ": dense must be contiguous");
}

// dense[r, col_idx[j]] = values[j] for every nonzero j of row r; the rest of dense is left as it is. With a
// shadow (the values of the previous call, which dense already holds at the nonzeros), only the rows whose values
// differ from it bit-wise are written, and the shadow is brought up to date: an inference loop over unchanged
// weights then reads 2 x nnz values per call instead of writing every line of dense.
void csr_dense_scatter_cpu(at::Tensor dense, const at::Tensor& values, const at::Tensor& row_ptr,
                           const at::Tensor& col_idx, const std::optional<at::Tensor>& shadow) {
  const char* op = "csr_dense_scatter_";
  (void)cpu_isa();  // a refused SPARSEKERN_CPU_ISA raises in every CPU op
  check_dense(op, dense);
  const int64_t n_rows = dense.size(0), n_cols = dense.size(1);
  const int64_t nnz = batch_tiles::check_csr(op, row_ptr, col_idx, n_rows, n_cols);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"values", &values},
                                {"shadow", shadow ? &*shadow : nullptr}}) {
    if (t == nullptr) continue;
    TORCH_CHECK_VALUE(t->device().is_cpu() && t->dim() == 1 && t->is_contiguous(), op, ": ", name,
                      " must be a contiguous 1-D CPU tensor");
    TORCH_CHECK_TYPE(t->scalar_type() == dense.scalar_type(), op, ": ", name, " (", t->scalar_type(),
                     ") and dense (", dense.scalar_type(), ") must have the same dtype");
    TORCH_CHECK_VALUE(t->numel() == nnz, op, ": ", name, " must have one entry per nonzero (", nnz, "), got ",
                      t->numel());
  }
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int32_t* ci = col_idx.data_ptr<int32_t>();
  dispatch_bits(dense, [&](auto e) {
    using E = decltype(e);
    E* d = static_cast<E*>(dense.data_ptr());
    const E* v = static_cast<const E*>(values.data_ptr());
    E* old = shadow ? static_cast<E*>(shadow->data_ptr()) : nullptr;
    for_rows(rp, n_rows, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t j0 = rp[r], len = rp[r + 1] - j0;
        if (old != nullptr) {
          if (std::memcmp(old + j0, v + j0, len * sizeof(E)) == 0) continue;
          std::memcpy(old + j0, v + j0, len * sizeof(E));
        }
        E* row = d + r * n_cols;
        for (int64_t j = j0; j < j0 + len; ++j) row[ci[j]] = v[j];
      }
    });
  });
}

// values[j] = dense[r, col_idx[j]] for every nonzero j of row r.
at::Tensor csr_dense_gather_cpu(const at::Tensor& dense, const at::Tensor& row_ptr, const at::Tensor& col_idx) {
  const char* op = "csr_dense_gather";
  (void)cpu_isa();
  check_dense(op, dense);
  const int64_t n_rows = dense.size(0), n_cols = dense.size(1);
  const int64_t nnz = batch_tiles::check_csr(op, row_ptr, col_idx, n_rows, n_cols);
  at::Tensor values = empty_cpu_output({nnz}, dense.options());
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int32_t* ci = col_idx.data_ptr<int32_t>();
  dispatch_bits(dense, [&](auto e) {
    using E = decltype(e);
    const E* d = static_cast<const E*>(dense.data_ptr());
    E* v = static_cast<E*>(values.data_ptr());
    for_rows(rp, n_rows, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const E* row = d + r * n_cols;
        for (int64_t j = rp[r]; j < rp[r + 1]; ++j) v[j] = row[ci[j]];
      }
    });
  });
  return values;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("csr_dense_scatter_", &csr_dense_scatter_cpu);
  m.impl("csr_dense_gather", &csr_dense_gather_cpu);
}

}  // namespace sparsekern

// The exact inverse of semi24_compress on the CPU: reads the reordered metadata and writes every dense group
// in full (kept values where the codes say, +0 elsewhere), so no separate zero-fill pass is needed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "sparsekern/cpu_features.h"
#include "sparsekern/semi24.h"
#include "sparsekern/semi24_dispatch.h"

namespace sparsekern {
namespace {

using semi24::code_idx0;
using semi24::code_idx1;
using semi24::code_valid;
using semi24::meta_offset;

// Returns the flat index (row * groups_per_row + group) of the first invalid code in rows [r0, r1), or INT64_MAX.
template <typename Fmt>
int64_t decompress_rows(const typename Fmt::Bits* packed, const typename Fmt::Meta* meta,
                        typename Fmt::Bits* dense, int64_t m, int64_t k, int64_t r0, int64_t r1) {
  using Bits = typename Fmt::Bits;
  const int64_t k_meta = k / Fmt::kElems;
  const int64_t groups_per_row = k / Fmt::kGroup;
  int64_t first_bad = INT64_MAX;
  for (int64_t r = r0; r < r1; ++r) {
    const Bits* in = packed + r * (k / 2);
    Bits* row = dense + r * k;
    for (int64_t c = 0; c < k_meta; ++c) {
      const uint32_t word = static_cast<uint32_t>(meta[meta_offset(r, c, m, Fmt::kMetaInt32)]);
      for (int j = 0; j < Fmt::kCodes; ++j) {
        const int64_t g = c * Fmt::kCodes + j;
        const uint32_t code = (word >> (4 * j)) & 0xfu;
        Bits* x = row + g * Fmt::kGroup;
        for (int e = 0; e < Fmt::kGroup; ++e) x[e] = 0;
        if (!code_valid(code, Fmt::kPairs)) {
          first_bad = std::min(first_bad, r * groups_per_row + g);
          continue;
        }
        if constexpr (Fmt::kPairs) {
          x[code_idx0(code) / 2] = in[g];
        } else {
          x[code_idx0(code)] = in[2 * g];
          x[code_idx1(code)] = in[2 * g + 1];
        }
      }
    }
  }
  return first_bad;
}

}  // namespace

at::Tensor semi24_decompress_cpu(const at::Tensor& packed, const at::Tensor& meta) {
  (void)cpu_isa();  // a refused SPARSEKERN_CPU_ISA raises in every CPU op
  TORCH_CHECK_VALUE(packed.dim() == 2 && meta.dim() == 2, "semi24_decompress: packed and meta must be 2-D");
  TORCH_CHECK_VALUE(packed.is_contiguous() && meta.is_contiguous(),
                    "semi24_decompress: packed and meta must be contiguous");
  const int64_t m = packed.size(0), k = packed.size(1) * 2;
  at::Tensor dense = at::empty({m, k}, packed.options());
  semi24::dispatch_format(packed.scalar_type(), "semi24_decompress: packed", [&](auto fmt) {
    using Fmt = decltype(fmt);
    using Bits = typename Fmt::Bits;
    using Meta = typename Fmt::Meta;
    TORCH_CHECK_TYPE(meta.scalar_type() == semi24::meta_dtype(packed.scalar_type()),
                     "semi24_decompress: meta must be ", semi24::meta_dtype(packed.scalar_type()), " for ",
                     packed.scalar_type(), " values, got ", meta.scalar_type());
    TORCH_CHECK_VALUE(m % 32 == 0 || (Fmt::kMetaInt32 && m % 16 == 0), "semi24_decompress: rows must be a multiple of ",
                      Fmt::kMetaInt32 ? 16 : 32, ", got ", m);
    TORCH_CHECK_VALUE(k % (2 * Fmt::kElems) == 0 && meta.size(0) == m && meta.size(1) == k / Fmt::kElems,
                      "semi24_decompress: packed ", packed.sizes(), " and meta ", meta.sizes(),
                      " do not describe one compressed matrix");
    const Bits* in = reinterpret_cast<const Bits*>(packed.data_ptr());
    const Meta* meta_ptr = reinterpret_cast<const Meta*>(meta.data_ptr());
    Bits* out = reinterpret_cast<Bits*>(dense.data_ptr());
    std::atomic<int64_t> first_bad{INT64_MAX};
    at::parallel_for(0, m, 32, [&](int64_t r0, int64_t r1) {
      semi24::atomic_min(first_bad, decompress_rows<Fmt>(in, meta_ptr, out, m, k, r0, r1));
    });
    semi24::check_no_bad_code<Fmt>(first_bad.load(), k);
  });
  return dense;
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("semi24_decompress", &semi24_decompress_cpu); }

}  // namespace sparsekern

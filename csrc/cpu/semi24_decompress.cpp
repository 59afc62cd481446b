// The exact inverse of semi24_compress on the CPU: reads the reordered metadata and writes every dense group
// in full (kept values where the codes say, +0 elsewhere), so no separate zero-fill pass is needed. An AVX2
// path (also taken on AVX-512 CPUs: one shuffle per 32 output bytes is already bound by the writes) and a
// portable one.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "sparsekern/cpu_alloc.h"
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

#if defined(SPARSEKERN_X86)
// The AVX2 path's table, per byte of metadata (the codes of a unit of two groups): the byte-shuffle control that
// spreads the unit's kept elements (8 input bytes; int8: 4) over its dense output (16 bytes; int8: 8), with 0x80
// (shuffle in a zero) everywhere else, and whether either code is invalid.
template <typename Fmt>
struct DecompressUnitTable {
  struct Entry {
    uint64_t ctrl[2] = {0, 0};
    uint8_t bad = 0;
  };
  Entry unit[256] = {};
  constexpr DecompressUnitTable() {
    constexpr int kSize = static_cast<int>(sizeof(typename Fmt::Bits));
    for (uint32_t codes = 0; codes < 256; ++codes) {
      Entry e;
      uint8_t ctrl[16] = {};
      for (int i = 0; i < 16; ++i) ctrl[i] = 0x80;
      for (int g = 0; g < 2; ++g) {
        const uint32_t code = (codes >> (4 * g)) & 0xfu;
        if (!code_valid(code, Fmt::kPairs)) {
          e.bad = 1;
          continue;
        }
        const uint32_t idx[2] = {Fmt::kPairs ? code_idx0(code) / 2 : code_idx0(code), code_idx1(code)};
        for (int kept = 0; kept < Fmt::kKept; ++kept) {
          for (int b = 0; b < kSize; ++b) {
            ctrl[(g * Fmt::kGroup + idx[kept]) * kSize + b] = static_cast<uint8_t>((g * Fmt::kKept + kept) * kSize + b);
          }
        }
      }
      for (int i = 0; i < 16; ++i) e.ctrl[i / 8] |= static_cast<uint64_t>(ctrl[i]) << (8 * (i % 8));
      unit[codes] = e;
    }
  }
};

// AVX2 path: one metadata element covers 32 bytes of a dense row, built by one byte shuffle of its 16 packed
// bytes. A row with an invalid code is redone by the portable loop, which names the first one.
template <typename Fmt>
__attribute__((target("avx2"))) int64_t decompress_rows_avx2(const typename Fmt::Bits* packed,
                                                            const typename Fmt::Meta* meta,
                                                            typename Fmt::Bits* dense, int64_t m, int64_t k,
                                                            int64_t r0, int64_t r1) {
  using Bits = typename Fmt::Bits;
  static constexpr DecompressUnitTable<Fmt> table{};
  static_assert(Fmt::kElems * sizeof(Bits) == 32, "one vector = one metadata element");
  const int64_t k_meta = k / Fmt::kElems;
  for (int64_t r = r0; r < r1; ++r) {
    const Bits* in = packed + r * (k / 2);
    Bits* row = dense + r * k;
    const int64_t off[2] = {meta_offset(r, 0, m, Fmt::kMetaInt32), meta_offset(r, 1, m, Fmt::kMetaInt32)};
    uint32_t any_bad = 0;
    for (int64_t c = 0; c < k_meta; ++c) {
      const uint32_t word = static_cast<uint32_t>(meta[(c / 2) * 2 * m + off[c % 2]]);
      uint64_t lane_ctrl[4];
      if constexpr (sizeof(typename Fmt::Meta) == 2) {  // one unit per 128-bit lane
        const auto& lo = table.unit[word & 0xffu];
        const auto& hi = table.unit[(word >> 8) & 0xffu];
        any_bad |= lo.bad | hi.bad;
        lane_ctrl[0] = lo.ctrl[0], lane_ctrl[1] = lo.ctrl[1], lane_ctrl[2] = hi.ctrl[0], lane_ctrl[3] = hi.ctrl[1];
      } else {  // int8: two units per lane; the second reads its lane's input bytes 4..7 (0x80 + 4 stays a zero)
        for (int l = 0; l < 2; ++l) {
          const auto& a = table.unit[(word >> (16 * l)) & 0xffu];
          const auto& b = table.unit[(word >> (16 * l + 8)) & 0xffu];
          any_bad |= a.bad | b.bad;
          lane_ctrl[2 * l] = a.ctrl[0], lane_ctrl[2 * l + 1] = b.ctrl[0] + 0x0404040404040404ull;
        }
      }
      // Lane 0 shuffles packed bytes 0..7, lane 1 bytes 8..15.
      const __m128i p = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + c * Fmt::kElems / 2));
      const __m256i src = _mm256_permute4x64_epi64(_mm256_castsi128_si256(p), 0x50);
      const __m256i ctrl = _mm256_set_epi64x(static_cast<int64_t>(lane_ctrl[3]), static_cast<int64_t>(lane_ctrl[2]),
                                             static_cast<int64_t>(lane_ctrl[1]), static_cast<int64_t>(lane_ctrl[0]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + c * Fmt::kElems), _mm256_shuffle_epi8(src, ctrl));
    }
    if (any_bad) return decompress_rows<Fmt>(packed, meta, dense, m, k, r, r + 1);
  }
  return INT64_MAX;
}
#endif

// The AVX2 rows on AVX2 and AVX-512 CPUs; else the portable ones (compiled for the baseline only).
template <typename Fmt>
int64_t decompress_fn(const typename Fmt::Bits* packed, const typename Fmt::Meta* meta, typename Fmt::Bits* dense,
                      int64_t m, int64_t k, int64_t r0, int64_t r1) {
#if defined(SPARSEKERN_X86)
  if (cpu_isa() >= CpuIsa::kAvx2) return decompress_rows_avx2<Fmt>(packed, meta, dense, m, k, r0, r1);
#endif
  return decompress_rows<Fmt>(packed, meta, dense, m, k, r0, r1);
}

}  // namespace

at::Tensor semi24_decompress_cpu(const at::Tensor& packed, const at::Tensor& meta) {
  (void)cpu_isa();  // a refused SPARSEKERN_CPU_ISA raises in every CPU op
  TORCH_CHECK_VALUE(packed.dim() == 2 && meta.dim() == 2, "semi24_decompress: packed and meta must be 2-D");
  TORCH_CHECK_VALUE(packed.is_contiguous() && meta.is_contiguous(),
                    "semi24_decompress: packed and meta must be contiguous");
  const int64_t m = packed.size(0), k = packed.size(1) * 2;
  at::Tensor dense = empty_cpu_output({m, k}, packed.options());
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
    at::parallel_for(0, m, semi24::rows_per_task(k, sizeof(Bits)), [&](int64_t r0, int64_t r1) {
      semi24::atomic_min(first_bad, decompress_fn<Fmt>(in, meta_ptr, out, m, k, r0, r1));
    });
    semi24::check_no_bad_code<Fmt>(first_bad.load(), k);
  });
  return dense;
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("semi24_decompress", &semi24_decompress_cpu); }

}  // namespace sparsekern

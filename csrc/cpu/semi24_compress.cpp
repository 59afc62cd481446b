// 2:4 compression on the CPU: one pass over the dense rows that validates, codes, packs and writes the
// reordered metadata. Bit-identical to torch's sparse_semi_structured_from_dense_cutlass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "sparsekern/cpu_alloc.h"
#include "sparsekern/cpu_features.h"
#if defined(SPARSEKERN_X86)
#define SPARSEKERN_HAVE_AVX512_PATH 1
#endif
#include "sparsekern/semi24.h"
#include "sparsekern/semi24_dispatch.h"

namespace sparsekern {
namespace {

using semi24::group_code;
using semi24::meta_offset;
using semi24::pair_code;
using semi24::popcount4;

// Per nonzero pattern of a group (bit j = element j nonzero): its code, or kBad when it keeps too many.
constexpr uint8_t kBad = 0xff;
template <bool kPairs>
struct CodeTable {
  uint8_t code[16] = {};
  constexpr CodeTable() {
    for (uint32_t nz = 0; nz < (kPairs ? 4u : 16u); ++nz) {
      const bool bad = kPairs ? nz == 3u : popcount4(nz) > 2;
      code[nz] = bad ? kBad : static_cast<uint8_t>(kPairs ? pair_code(nz) : group_code(nz));
    }
  }
};

// The vector paths' table, per nonzero pattern of a unit of two groups (bit j = element j of the unit nonzero):
// the byte-shuffle control that moves the unit's kept elements, in order, to the front of the unit's output
// (8 bytes; int8: 4; AVX2), the kept elements as a mask (AVX-512's compress), the two groups' codes (first in the
// low nibble) and whether either keeps too many.
template <typename Fmt>
struct CompressUnitTable {
  static constexpr int kUnitBits = 2 * Fmt::kGroup;
  static constexpr int kUnits = 32 / (kUnitBits * static_cast<int>(sizeof(typename Fmt::Bits)));  // per vector
  static constexpr int kUnitsPerLane = kUnits / 2;
  struct Entry {
    uint64_t ctrl = 0;
    uint8_t keep = 0;
    uint8_t codes = 0;
    uint8_t bad = 0;
  };
  Entry unit[1 << kUnitBits] = {};
  constexpr CompressUnitTable() {
    constexpr CodeTable<Fmt::kPairs> codes{};
    constexpr int kSize = static_cast<int>(sizeof(typename Fmt::Bits));
    for (uint32_t nz = 0; nz < (1u << kUnitBits); ++nz) {
      Entry e;
      for (int g = 0; g < 2; ++g) {
        const uint32_t code = codes.code[(nz >> (g * Fmt::kGroup)) & ((1u << Fmt::kGroup) - 1)];
        e.bad |= code == kBad;
        e.codes |= static_cast<uint8_t>((code & 0xfu) << (4 * g));
        const uint32_t idx[2] = {Fmt::kPairs ? semi24::code_idx0(code) / 2 : semi24::code_idx0(code),
                                 semi24::code_idx1(code)};
        for (int kept = 0; kept < Fmt::kKept; ++kept) {
          e.keep |= static_cast<uint8_t>(1u << (g * Fmt::kGroup + idx[kept]));
          for (int b = 0; b < kSize; ++b) {
            const uint64_t src = (g * Fmt::kGroup + idx[kept]) * kSize + b;
            e.ctrl |= src << (8 * ((g * Fmt::kKept + kept) * kSize + b));
          }
        }
      }
      unit[nz] = e;
    }
  }
};

// Cold path: the flat index of the first group of row r that keeps too many nonzeros.
template <typename Fmt>
int64_t first_bad_in_row(const typename Fmt::Bits* row, int64_t r, int64_t k) {
  static constexpr CodeTable<Fmt::kPairs> table{};
  for (int64_t g = 0; g < k / Fmt::kGroup; ++g) {
    uint32_t nz = 0;
    for (int e = 0; e < Fmt::kGroup; ++e) nz |= uint32_t((row[g * Fmt::kGroup + e] & Fmt::kMagnitude) != 0) << e;
    if (table.code[nz] == kBad) return r * (k / Fmt::kGroup) + g;
  }
  return INT64_MAX;
}

// Compresses rows [r0, r1). Returns the flat index (row * groups_per_row + group) of the first group that keeps
// more than the format allows, or INT64_MAX; the caller throws on a bad index.
template <typename Fmt>
inline __attribute__((always_inline)) int64_t compress_rows(const typename Fmt::Bits* in,
                                                            typename Fmt::Bits* packed,
                                                            typename Fmt::Meta* meta, int64_t m, int64_t k,
                                                            int64_t r0, int64_t r1) {
  using Bits = typename Fmt::Bits;
  static constexpr CodeTable<Fmt::kPairs> table{};
  using Word = std::conditional_t<sizeof(Bits) * Fmt::kGroup == 8, uint64_t, uint32_t>;
  constexpr int kLane = 8 * sizeof(Bits);
  const int64_t k_meta = k / Fmt::kElems;
  for (int64_t r = r0; r < r1; ++r) {
    const Bits* row = in + r * k;
    Bits* out = packed + r * (k / 2);
    uint32_t any_bad = 0;
    for (int64_t c = 0; c < k_meta; ++c) {
      uint32_t word = 0;
      for (int j = 0; j < Fmt::kCodes; ++j) {
        const int64_t g = c * Fmt::kCodes + j;
        // A whole group is one 32- or 64-bit word: flags and the kept lanes come out of registers.
        Word w;
        std::memcpy(&w, row + g * Fmt::kGroup, sizeof(Word));
        uint32_t nz = 0;
        for (int e = 0; e < Fmt::kGroup; ++e) nz |= uint32_t(((w >> (kLane * e)) & Fmt::kMagnitude) != 0) << e;
        const uint32_t code = table.code[nz];
        any_bad |= code == kBad;
        if constexpr (Fmt::kPairs) {
          out[g] = static_cast<Bits>(w >> (kLane * (semi24::code_idx0(code) / 2)));
        } else {
          out[2 * g] = static_cast<Bits>(w >> (kLane * semi24::code_idx0(code)));
          out[2 * g + 1] = static_cast<Bits>(w >> (kLane * semi24::code_idx1(code)));
        }
        word |= code << (4 * j);
      }
      meta[meta_offset(r, c, m, Fmt::kMetaInt32)] = static_cast<typename Fmt::Meta>(word);
    }
    if (any_bad) return first_bad_in_row<Fmt>(row, r, k);
  }
  return INT64_MAX;
}

#if defined(SPARSEKERN_HAVE_AVX512_PATH)
// AVX-512 VBMI2 path: one 64-byte vector holds exactly two metadata elements' worth of a row (32 fp16/bf16,
// 64 int8 or 16 fp32 elements). The nonzero flags come out as one mask register; the kept lanes and the codes of
// each unit of two groups from the table; a single masked compress packs the kept lanes in ascending column order.
template <typename Fmt>
__attribute__((target("avx512f,avx512bw,avx512vbmi2"))) int64_t compress_rows_avx512(
    const typename Fmt::Bits* in, typename Fmt::Bits* packed, typename Fmt::Meta* meta, int64_t m, int64_t k,
    int64_t r0, int64_t r1) {
  using Bits = typename Fmt::Bits;
  using Meta = typename Fmt::Meta;
  using Table = CompressUnitTable<Fmt>;
  static constexpr Table table{};
  constexpr int kUnitBits = Table::kUnitBits;
  constexpr int kUnits = 2 * Table::kUnits;  // per 64-byte vector
  constexpr int kLanes = 64 / sizeof(Bits);
  static_assert(kLanes == 2 * Fmt::kElems, "one vector = two metadata elements");
  const int64_t k_meta = k / Fmt::kElems;
  for (int64_t r = r0; r < r1; ++r) {
    const Bits* row = in + r * k;
    Bits* out = packed + r * (k / 2);
    const int64_t off[2] = {meta_offset(r, 0, m, Fmt::kMetaInt32), meta_offset(r, 1, m, Fmt::kMetaInt32)};
    uint32_t any_bad = 0;
    for (int64_t c = 0; c < k_meta; c += 2) {
      const __m512i v = _mm512_loadu_si512(row + c * Fmt::kElems);
      uint64_t nz;
      if constexpr (sizeof(Bits) == 1) {
        nz = _mm512_test_epi8_mask(v, v);
      } else if constexpr (sizeof(Bits) == 2) {
        nz = _mm512_test_epi16_mask(v, _mm512_set1_epi16(static_cast<int16_t>(Fmt::kMagnitude)));
      } else {
        nz = _mm512_test_epi32_mask(v, _mm512_set1_epi32(static_cast<int32_t>(Fmt::kMagnitude)));
      }
      uint64_t keep = 0, codes = 0;
      for (int u = 0; u < kUnits; ++u) {
        const auto& e = table.unit[(nz >> (u * kUnitBits)) & ((1u << kUnitBits) - 1)];
        any_bad |= e.bad;
        keep |= static_cast<uint64_t>(e.keep) << (u * kUnitBits);
        codes |= static_cast<uint64_t>(e.codes) << (8 * u);
      }
      Bits* dst = out + c * Fmt::kElems / 2;
      if constexpr (sizeof(Bits) == 1) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                            _mm512_castsi512_si256(_mm512_maskz_compress_epi8(keep, v)));
      } else if constexpr (sizeof(Bits) == 2) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                            _mm512_castsi512_si256(_mm512_maskz_compress_epi16(static_cast<__mmask32>(keep), v)));
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                            _mm512_castsi512_si256(_mm512_maskz_compress_epi32(static_cast<__mmask16>(keep), v)));
      }
      constexpr int kWordBits = 8 * sizeof(Meta);
      const int64_t base = (c / 2) * 2 * m;  // c is even: its element at off[0], c + 1's at off[1]
      meta[base + off[0]] = static_cast<Meta>(codes & ((1ull << kWordBits) - 1));
      meta[base + off[1]] = static_cast<Meta>(codes >> kWordBits);
    }
    if (any_bad) return first_bad_in_row<Fmt>(row, r, k);
  }
  return INT64_MAX;
}
#endif

#if defined(SPARSEKERN_X86)
// AVX2 path: one 32-byte vector holds exactly one metadata element's worth of a row (16 fp16/bf16, 32 int8 or
// 8 fp32 elements). AVX2 has no compress instruction, so the kept lanes are gathered with a byte shuffle whose
// control comes from a table indexed by the nonzero flags of a "unit" of two groups (8 flags; fp32: 4).
template <typename Fmt>
__attribute__((target("avx2,bmi,bmi2,popcnt"))) int64_t compress_rows_avx2(const typename Fmt::Bits* in,
                                                                         typename Fmt::Bits* packed,
                                                                         typename Fmt::Meta* meta, int64_t m,
                                                                         int64_t k, int64_t r0, int64_t r1) {
  using Bits = typename Fmt::Bits;
  using Meta = typename Fmt::Meta;
  using Table = CompressUnitTable<Fmt>;
  static constexpr Table table{};
  constexpr int kUnitBits = Table::kUnitBits;
  static_assert(Fmt::kElems * sizeof(Bits) == 32, "one vector = one metadata element");
  const int64_t k_meta = k / Fmt::kElems;
  const __m256i magnitude = sizeof(Bits) == 2   ? _mm256_set1_epi16(static_cast<int16_t>(Fmt::kMagnitude))
                            : sizeof(Bits) == 4 ? _mm256_set1_epi32(static_cast<int32_t>(Fmt::kMagnitude))
                                                : _mm256_set1_epi8(-1);
  for (int64_t r = r0; r < r1; ++r) {
    const Bits* row = in + r * k;
    Bits* out = packed + r * (k / 2);
    // meta_offset(r, c) = (c / 2) * 2m + meta_offset(r, c % 2): two row offsets serve the whole row.
    const int64_t off[2] = {meta_offset(r, 0, m, Fmt::kMetaInt32), meta_offset(r, 1, m, Fmt::kMetaInt32)};
    uint32_t any_bad = 0;
    for (int64_t c = 0; c < k_meta; ++c) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c * Fmt::kElems));
      // One bit per element, in column order (set: zero; -0.0 counts as zero).
      uint32_t zero;
      if constexpr (sizeof(Bits) == 1) {
        zero = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, _mm256_setzero_si256())));
      } else if constexpr (sizeof(Bits) == 2) {
        const __m256i z = _mm256_cmpeq_epi16(_mm256_and_si256(v, magnitude), _mm256_setzero_si256());
        // packs keeps each 128-bit lane apart: bits 0-7 = elements 0-7, bits 16-23 = elements 8-15.
        const uint32_t mm = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_packs_epi16(z, z)));
        zero = (mm & 0xffu) | ((mm >> 8) & 0xff00u);
      } else {
        const __m256i z = _mm256_cmpeq_epi32(_mm256_and_si256(v, magnitude), _mm256_setzero_si256());
        zero = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(z)));
      }
      const uint32_t nz = ~zero;
      uint32_t word = 0;
      uint64_t lane_ctrl[2] = {0, 0};
      for (int u = 0; u < Table::kUnits; ++u) {
        const auto& e = table.unit[(nz >> (u * kUnitBits)) & ((1u << kUnitBits) - 1)];
        any_bad |= e.bad;
        word |= static_cast<uint32_t>(e.codes) << (8 * u);
        // Two units per 128-bit lane (int8): the second reads the upper 8 bytes of its lane.
        if constexpr (Table::kUnitsPerLane == 1) {
          lane_ctrl[u] = e.ctrl;
        } else {
          lane_ctrl[u / 2] |= (u % 2 == 0) ? e.ctrl : (e.ctrl + 0x08080808ull) << 32;
        }
      }
      // Each lane's kept bytes land in its low 8 bytes; then the two low halves are joined.
      const __m256i ctrl = _mm256_set_epi64x(0, static_cast<int64_t>(lane_ctrl[1]), 0,
                                             static_cast<int64_t>(lane_ctrl[0]));
      const __m256i kept = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, ctrl), 0x08);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c * Fmt::kElems / 2), _mm256_castsi256_si128(kept));
      meta[(c / 2) * 2 * m + off[c % 2]] = static_cast<Meta>(word);
    }
    if (any_bad) return first_bad_in_row<Fmt>(row, r, k);
  }
  return INT64_MAX;
}
#endif

// The portable rows, compiled for the baseline only (forcing "baseline" runs what a CPU without AVX2 runs).
int64_t compress_portable(const semi24::FormatHalf::Bits* in, semi24::FormatHalf::Bits* packed,
                          semi24::FormatHalf::Meta* meta, int64_t m, int64_t k, int64_t r0, int64_t r1) {
  return compress_rows<semi24::FormatHalf>(in, packed, meta, m, k, r0, r1);
}
int64_t compress_portable(const semi24::FormatInt8::Bits* in, semi24::FormatInt8::Bits* packed,
                          semi24::FormatInt8::Meta* meta, int64_t m, int64_t k, int64_t r0, int64_t r1) {
  return compress_rows<semi24::FormatInt8>(in, packed, meta, m, k, r0, r1);
}
int64_t compress_portable(const semi24::FormatFloat::Bits* in, semi24::FormatFloat::Bits* packed,
                          semi24::FormatFloat::Meta* meta, int64_t m, int64_t k, int64_t r0, int64_t r1) {
  return compress_rows<semi24::FormatFloat>(in, packed, meta, m, k, r0, r1);
}

template <typename Fmt>
int64_t compress_fn(const typename Fmt::Bits* in, typename Fmt::Bits* packed, typename Fmt::Meta* meta,
                    int64_t m, int64_t k, int64_t r0, int64_t r1) {
#if defined(SPARSEKERN_HAVE_AVX512_PATH)
  const CpuIsa isa = cpu_isa();
  if (isa == CpuIsa::kAvx512 && cpu_has_avx512_vbmi2()) return compress_rows_avx512<Fmt>(in, packed, meta, m, k, r0, r1);
  if (isa >= CpuIsa::kAvx2) return compress_rows_avx2<Fmt>(in, packed, meta, m, k, r0, r1);
#endif
  return compress_portable(in, packed, meta, m, k, r0, r1);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> semi24_compress_cpu(const at::Tensor& dense) {
  (void)cpu_isa();  // a refused SPARSEKERN_CPU_ISA raises here, not inside the parallel region
  TORCH_CHECK_VALUE(dense.dim() == 2, "semi24_compress: dense must be 2-D, got ", dense.dim(), "-D");
  TORCH_CHECK_VALUE(dense.is_contiguous(), "semi24_compress: dense must be contiguous");
  const int64_t m = dense.size(0), k = dense.size(1);
  at::Tensor packed = empty_cpu_output({m, k / 2}, dense.options());
  at::Tensor meta;
  semi24::dispatch_format(dense.scalar_type(), "semi24_compress: dense", [&](auto fmt) {
    using Fmt = decltype(fmt);
    TORCH_CHECK_VALUE(m % 32 == 0 || (Fmt::kMetaInt32 && m % 16 == 0),
                      "semi24_compress: rows must be a multiple of ", Fmt::kMetaInt32 ? 16 : 32, ", got ", m);
    TORCH_CHECK_VALUE(k % (2 * Fmt::kElems) == 0, "semi24_compress: columns must be a multiple of ",
                      2 * Fmt::kElems, ", got ", k);
    meta = empty_cpu_output({m, k / Fmt::kElems}, dense.options().dtype(semi24::meta_dtype(dense.scalar_type())));
    using Bits = typename Fmt::Bits;
    const Bits* in = reinterpret_cast<const Bits*>(dense.data_ptr());
    Bits* out = reinterpret_cast<Bits*>(packed.data_ptr());
    auto* meta_ptr = reinterpret_cast<typename Fmt::Meta*>(meta.data_ptr());
    std::atomic<int64_t> first_bad{INT64_MAX};
    at::parallel_for(0, m, semi24::rows_per_task(k, sizeof(Bits)), [&](int64_t r0, int64_t r1) {
      semi24::atomic_min(first_bad, compress_fn<Fmt>(in, out, meta_ptr, m, k, r0, r1));
    });
    semi24::check_no_bad_group<Fmt>(first_bad.load(), k);
  });
  return {packed, meta};
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("semi24_compress", &semi24_compress_cpu); }

}  // namespace sparsekern

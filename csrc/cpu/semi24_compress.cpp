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
// 64 int8 or 16 fp32 elements). The nonzero flags come out as one mask register, the codes from the table,
// and a single masked compress packs the kept lanes in ascending column order.
template <typename Fmt>
__attribute__((target("avx512f,avx512bw,avx512vbmi2"))) int64_t compress_rows_avx512(
    const typename Fmt::Bits* in, typename Fmt::Bits* packed, typename Fmt::Meta* meta, int64_t m, int64_t k,
    int64_t r0, int64_t r1) {
  using Bits = typename Fmt::Bits;
  using Meta = typename Fmt::Meta;
  static constexpr CodeTable<Fmt::kPairs> table{};
  constexpr int kLanes = 64 / sizeof(Bits);
  constexpr int kGroups = kLanes / Fmt::kGroup;
  static_assert(kGroups == 2 * Fmt::kCodes, "one vector = two metadata elements");
  const int64_t k_meta = k / Fmt::kElems;
  for (int64_t r = r0; r < r1; ++r) {
    const Bits* row = in + r * k;
    Bits* out = packed + r * (k / 2);
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
      uint64_t keep = 0;
      uint32_t words[2] = {0, 0};
      for (int g = 0; g < kGroups; ++g) {
        const uint32_t code = table.code[(nz >> (g * Fmt::kGroup)) & ((1u << Fmt::kGroup) - 1)];
        any_bad |= code == kBad;
        const uint64_t lanes = Fmt::kPairs ? (1ull << (semi24::code_idx0(code) / 2))
                                           : ((1ull << semi24::code_idx0(code)) | (1ull << semi24::code_idx1(code)));
        keep |= lanes << (g * Fmt::kGroup);
        words[g / Fmt::kCodes] |= code << (4 * (g % Fmt::kCodes));
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
      meta[meta_offset(r, c, m, Fmt::kMetaInt32)] = static_cast<Meta>(words[0]);
      meta[meta_offset(r, c + 1, m, Fmt::kMetaInt32)] = static_cast<Meta>(words[1]);
    }
    if (any_bad) return first_bad_in_row<Fmt>(row, r, k);
  }
  return INT64_MAX;
}
#endif

// The portable rows compiled for the baseline and (until AVX2 has its own path) for AVX2.
#define SPARSEKERN_DEFINE_COMPRESS(NAME, FMT, ATTR)                                                          \
  ATTR int64_t NAME(const FMT::Bits* in, FMT::Bits* packed, FMT::Meta* meta, int64_t m, int64_t k, int64_t r0, \
                    int64_t r1) {                                                                           \
    return compress_rows<FMT>(in, packed, meta, m, k, r0, r1);                                             \
  }
SPARSEKERN_DEFINE_COMPRESS(compress_half, semi24::FormatHalf, )
SPARSEKERN_DEFINE_COMPRESS(compress_int8, semi24::FormatInt8, )
SPARSEKERN_DEFINE_COMPRESS(compress_float, semi24::FormatFloat, )
#if defined(SPARSEKERN_X86)
SPARSEKERN_DEFINE_COMPRESS(compress_half_avx2, semi24::FormatHalf, SPARSEKERN_AVX2)
SPARSEKERN_DEFINE_COMPRESS(compress_int8_avx2, semi24::FormatInt8, SPARSEKERN_AVX2)
SPARSEKERN_DEFINE_COMPRESS(compress_float_avx2, semi24::FormatFloat, SPARSEKERN_AVX2)
#endif

template <typename Fmt>
int64_t compress_fn(const typename Fmt::Bits* in, typename Fmt::Bits* packed, typename Fmt::Meta* meta,
                    int64_t m, int64_t k, int64_t r0, int64_t r1) {
#if defined(SPARSEKERN_HAVE_AVX512_PATH)
  const CpuIsa isa = cpu_isa();
  if (isa == CpuIsa::kAvx512 && cpu_has_avx512_vbmi2()) return compress_rows_avx512<Fmt>(in, packed, meta, m, k, r0, r1);
  if (isa >= CpuIsa::kAvx2) {
    if constexpr (std::is_same_v<Fmt, semi24::FormatHalf>) return compress_half_avx2(in, packed, meta, m, k, r0, r1);
    if constexpr (std::is_same_v<Fmt, semi24::FormatInt8>) return compress_int8_avx2(in, packed, meta, m, k, r0, r1);
    if constexpr (std::is_same_v<Fmt, semi24::FormatFloat>) return compress_float_avx2(in, packed, meta, m, k, r0, r1);
  }
#endif
  if constexpr (std::is_same_v<Fmt, semi24::FormatHalf>) return compress_half(in, packed, meta, m, k, r0, r1);
  if constexpr (std::is_same_v<Fmt, semi24::FormatInt8>) return compress_int8(in, packed, meta, m, k, r0, r1);
  if constexpr (std::is_same_v<Fmt, semi24::FormatFloat>) return compress_float(in, packed, meta, m, k, r0, r1);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> semi24_compress_cpu(const at::Tensor& dense) {
  (void)cpu_isa();  // a refused SPARSEKERN_CPU_ISA raises here, not inside the parallel region
  TORCH_CHECK_VALUE(dense.dim() == 2, "semi24_compress: dense must be 2-D, got ", dense.dim(), "-D");
  TORCH_CHECK_VALUE(dense.is_contiguous(), "semi24_compress: dense must be contiguous");
  const int64_t m = dense.size(0), k = dense.size(1);
  at::Tensor packed = at::empty({m, k / 2}, dense.options());
  at::Tensor meta;
  semi24::dispatch_format(dense.scalar_type(), "semi24_compress: dense", [&](auto fmt) {
    using Fmt = decltype(fmt);
    // Row blocks of 32 keep every metadata tile of a thread in one contiguous run of the output.
    TORCH_CHECK_VALUE(m % 32 == 0 || (Fmt::kMetaInt32 && m % 16 == 0),
                      "semi24_compress: rows must be a multiple of ", Fmt::kMetaInt32 ? 16 : 32, ", got ", m);
    TORCH_CHECK_VALUE(k % (2 * Fmt::kElems) == 0, "semi24_compress: columns must be a multiple of ",
                      2 * Fmt::kElems, ", got ", k);
    meta = at::empty({m, k / Fmt::kElems}, dense.options().dtype(semi24::meta_dtype(dense.scalar_type())));
    using Bits = typename Fmt::Bits;
    const Bits* in = reinterpret_cast<const Bits*>(dense.data_ptr());
    Bits* out = reinterpret_cast<Bits*>(packed.data_ptr());
    auto* meta_ptr = reinterpret_cast<typename Fmt::Meta*>(meta.data_ptr());
    std::atomic<int64_t> first_bad{INT64_MAX};
    at::parallel_for(0, m, 32, [&](int64_t r0, int64_t r1) {
      semi24::atomic_min(first_bad, compress_fn<Fmt>(in, out, meta_ptr, m, k, r0, r1));
    });
    semi24::check_no_bad_group<Fmt>(first_bad.load(), k);
  });
  return {packed, meta};
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("semi24_compress", &semi24_compress_cpu); }

}  // namespace sparsekern

// Host-side dtype dispatch shared by the CPU and CUDA 2:4 kernels: which bit width the elements are moved as,
// which metadata type holds the codes, and whether the format is 2:4 groups or fp32 1:2 pairs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "sparsekern/semi24.h"

namespace sparsekern {
namespace semi24 {

template <typename BitsT, typename MetaT, bool kPairsV>
struct Format {
  using Bits = BitsT;  // elements are copied as raw bits: the output is bit-identical, -0.0 and NaN included
  using Meta = MetaT;
  static constexpr bool kPairs = kPairsV;        // fp32: 1:2 pairs instead of 2:4 groups
  static constexpr int kGroup = kPairsV ? 2 : 4;  // elements per group
  static constexpr int kKept = kPairsV ? 1 : 2;   // elements kept per group
  static constexpr int kCodes = static_cast<int>(sizeof(MetaT)) * 2;  // 4-bit codes per metadata element
  static constexpr int kElems = kCodes * kGroup;  // elements of a row covered by one metadata element
  static constexpr bool kMetaInt32 = sizeof(MetaT) == 4;
  static constexpr BitsT kMagnitude =
      sizeof(BitsT) == 1 ? BitsT(0xff) : (sizeof(BitsT) == 2 ? BitsT(kHalfMagnitude) : BitsT(kFloatMagnitude));
};

using FormatHalf = Format<uint16_t, int16_t, false>;  // fp16 and bf16
using FormatInt8 = Format<uint8_t, int32_t, false>;
using FormatFloat = Format<uint32_t, int16_t, true>;

// Calls f(FormatX{}) for the format of `dtype`.
template <typename F>
void dispatch_format(at::ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case at::kHalf:
    case at::kBFloat16:
      f(FormatHalf{});
      break;
    case at::kChar:
      f(FormatInt8{});
      break;
    case at::kFloat:
      f(FormatFloat{});
      break;
    default:
      TORCH_CHECK_TYPE(false, what, " must be float16, bfloat16, int8 or float32, got ", dtype);
  }
}

inline at::ScalarType meta_dtype(at::ScalarType dtype) { return dtype == at::kChar ? at::kInt : at::kShort; }

// Kernels report the first offending group as a row-major flat index (row * groups_per_row + group), or
// INT64_MAX when there is none; these turn it into the ValueError every backend raises.
template <typename Fmt>
void check_no_bad_group(int64_t bad, int64_t k) {
  if (bad == INT64_MAX) return;
  const int64_t groups_per_row = k / Fmt::kGroup;
  const int64_t row = bad / groups_per_row, col = (bad % groups_per_row) * Fmt::kGroup;
  TORCH_CHECK_VALUE(false, "semi24_compress: dense is not ", Fmt::kPairs ? "1:2" : "2:4", " sparse: row ", row,
                    ", columns ", col, "..", col + Fmt::kGroup - 1, " hold more than ", Fmt::kKept, " nonzero",
                    Fmt::kKept > 1 ? "s" : "",
                    " (prune first: sparsekern.semi24_mask or to_semi_structured(prune=True))");
}

template <typename Fmt>
void check_no_bad_code(int64_t bad, int64_t k) {
  if (bad == INT64_MAX) return;
  const int64_t groups_per_row = k / Fmt::kGroup;
  const int64_t row = bad / groups_per_row, col = (bad % groups_per_row) * Fmt::kGroup;
  TORCH_CHECK_VALUE(false, "semi24_decompress: meta holds an invalid code for row ", row, ", columns ", col, "..",
                    col + Fmt::kGroup - 1, " (not produced by semi24_compress?)");
}

// Rows per CPU task: whole 32-row blocks (each metadata tile of a task lands in one contiguous run of the output),
// and at least ~1 MiB of dense input, so a small matrix runs on the calling thread: waking a second thread costs
// more than it saves there, and on an oversubscribed machine it can wait a whole time slice for it.
inline int64_t rows_per_task(int64_t k, int64_t elem_bytes) {
  const int64_t rows = (int64_t{1} << 20) / std::max<int64_t>(1, k * elem_bytes);
  return std::max<int64_t>(32, (rows + 31) / 32 * 32);
}

// Lowers `target` to `value` if smaller (CPU threads merging their first bad group).
inline void atomic_min(std::atomic<int64_t>& target, int64_t value) {
  int64_t seen = target.load();
  while (value < seen && !target.compare_exchange_weak(seen, value)) {
  }
}

}  // namespace semi24
}  // namespace sparsekern

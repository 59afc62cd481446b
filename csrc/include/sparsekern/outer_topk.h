// The selection rules of outer_topk shared by the CPU and CUDA kernels (the Triton launcher mirrors them in
// Python). Header-only, no ATen, __host__ __device__ and constexpr, so the CPU build and the compile-time checks
// below execute the very functions the CUDA kernels run.
//
// Score. s(o, i) = sum over b = 0, 1, ..., B - 1 of g[b, o] * x[b, i], in float32 from +0, each product rounded
// and then added: two roundings, never a fused multiply-add (CPU: compiled with fp-contract off; CUDA: __fmul_rn
// and __fadd_rn; Triton: enable_fp_fusion=False), so the reference, the interpreter and every kernel get the same
// bits. The score is |s|. These are the scores of precision="exact" (fast=false).
//
// precision="fast" (fast=true) scores with each device's fastest arithmetic instead and keeps every rule below (key,
// rank, ties, selection): the CPU's AVX2 and AVX-512 kernels compute s = fma(g[b, o], x[b, i], s) for b in order
// from +0 (one rounding per step; the same bits on both ISAs and for every thread count), its portable path the
// exact scores. Any float32 sum of the B products, fused or not, in any order, is within
// gamma_B * sum_b |g[b, o] * x[b, i]| of the real sum (gamma_B = B u / (1 - B u), u = 2**-24), the bound the
// Python layer documents and the tests check.
//
// Key. The bits of |s| as uint32 (sign cleared) order non-negative floats like the floats themselves, so the top-k
// is a top-k over integers: keys above kInfKey are NaN (an overflow inf - inf), kExcludedKey marks excluded
// positions in a tile. Radix passes split a key into kHiBits + kLoBits.
//
// Rank. The 31-bit key and the flat index o * n_in + i (< 2**33) are packed into one uint64,
// key << 33 | (2**33 - 1 - index): a larger rank is a larger score, or an equal score at a lower index. All ranks
// are distinct, so "the k largest ranks" is exactly the documented result, ties included.
#pragma once

#include <cstdint>

#include "sparsekern/hd.h"

namespace sparsekern {
namespace outer_topk {

constexpr uint32_t kInfKey = 0x7F800000u;       // the key of +inf; larger keys are NaN
constexpr uint32_t kExcludedKey = 0xFFFFFFFFu;  // above every score key, NaN included
constexpr int kIndexBits = 33;
constexpr uint64_t kIndexMask = (uint64_t{1} << kIndexBits) - 1;
constexpr int kLoBits = 16;
constexpr int kHiBins = 1 << (31 - kLoBits);  // keys are 31 bits: 32768 high buckets
constexpr int kLoBins = 1 << kLoBits;

SPARSEKERN_HD uint32_t key_of_bits(uint32_t bits) { return bits & 0x7FFFFFFFu; }
SPARSEKERN_HD bool is_nan_key(uint32_t key) { return key > kInfKey && key != kExcludedKey; }

SPARSEKERN_HD uint64_t rank_of(uint32_t key, int64_t index) {
  return (uint64_t{key} << kIndexBits) | (kIndexMask - static_cast<uint64_t>(index));
}
SPARSEKERN_HD uint32_t rank_key(uint64_t rank) { return static_cast<uint32_t>(rank >> kIndexBits); }
SPARSEKERN_HD int64_t rank_index(uint64_t rank) { return static_cast<int64_t>(kIndexMask - (rank & kIndexMask)); }

// The radix bucket a histogram pass picks: with counts[b] the number of candidates in bucket b, the bucket
// holding the k-th largest (1 <= k <= total), scanning from the top. *above receives the count in higher
// buckets, so above < k <= above + counts[bucket].
template <typename Count>
SPARSEKERN_HD int select_bucket(const Count* counts, int n_buckets, int64_t k, int64_t* above) {
  int64_t seen = 0;
  for (int b = n_buckets - 1; b > 0; --b) {
    if (seen + static_cast<int64_t>(counts[b]) >= k) {
      *above = seen;
      return b;
    }
    seen += static_cast<int64_t>(counts[b]);
  }
  *above = seen;
  return 0;
}

// The first of the sorted, unique columns cols[begin, end) that is >= col (binary search; end when none).
SPARSEKERN_HD int64_t lower_bound(const int32_t* cols, int64_t begin, int64_t end, int64_t col) {
  while (begin < end) {
    const int64_t mid = begin + (end - begin) / 2;
    if (cols[mid] < col) {
      begin = mid + 1;
    } else {
      end = mid;
    }
  }
  return begin;
}

namespace detail {

SPARSEKERN_HD bool rank_self_test() {
  // a higher key ranks higher whatever the index; an equal key ranks the lower index higher
  const uint64_t a = rank_of(0x3F800000u, 5), b = rank_of(0x3F800000u, 7), c = rank_of(0x3F800001u, 9);
  const uint64_t top = rank_of(kInfKey, 0), zero_last = rank_of(0, static_cast<int64_t>(kIndexMask));
  return a > b && c > a && rank_key(b) == 0x3F800000u && rank_index(b) == 7 && rank_index(top) == 0 &&
         rank_key(top) == kInfKey && zero_last == 0 && !is_nan_key(kInfKey) && is_nan_key(kInfKey + 1) &&
         !is_nan_key(kExcludedKey) && key_of_bits(0x80000000u) == 0;
}
static_assert(rank_self_test(), "outer_topk ranks must order by key, then by ascending index");

SPARSEKERN_HD bool select_self_test() {
  const int counts[] = {4, 0, 2, 1};  // from the top: 1 in bucket 3, 2 in bucket 2, none in 1, 4 in 0
  int64_t above = -1;
  bool ok = select_bucket(counts, 4, 1, &above) == 3 && above == 0;
  ok = ok && select_bucket(counts, 4, 2, &above) == 2 && above == 1;
  ok = ok && select_bucket(counts, 4, 3, &above) == 2 && above == 1;
  ok = ok && select_bucket(counts, 4, 4, &above) == 0 && above == 3;
  ok = ok && select_bucket(counts, 4, 7, &above) == 0 && above == 3;
  const int32_t cols[] = {2, 5, 9};
  return ok && lower_bound(cols, 0, 3, 0) == 0 && lower_bound(cols, 0, 3, 5) == 1 && lower_bound(cols, 0, 3, 6) == 2 &&
         lower_bound(cols, 0, 3, 10) == 3 && lower_bound(cols, 1, 1, 0) == 1;
}
static_assert(select_self_test(), "outer_topk::select_bucket must find the bucket of the k-th largest");

}  // namespace detail

}  // namespace outer_topk
}  // namespace sparsekern

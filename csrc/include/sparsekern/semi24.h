// 2:4 (and fp32 1:2) compression to the CUTLASS semi-structured layout used by
// torch.sparse.SparseSemiStructuredTensorCUTLASS. Header-only and __host__ __device__: the CPU kernels, the
// CUDA kernels and the CPU tests all execute these same functions.
//
// Layout (torch.sparse._semi_structured_conversions is the oracle):
// - values (m, k/2): the two kept elements of every group of 4, in ascending column order
//   (fp32: one kept element of every pair);
// - every group gets a 4-bit code idx0 | idx1 << 2 (fp32 pairs are coded as if they were 4 halves);
// - codes are packed 4 per int16 (fp16, bf16, fp32) or 8 per int32 (int8), lowest group in the lowest bits;
// - the (m, k_meta) code matrix is then reordered (row interleave inside 32-row (int16) / 16-row (int32)
//   groups, a swap inside each 2x2 block, then column-major interleave of column pairs).
#pragma once

#include <cstdint>

#include "sparsekern/hd.h"

namespace sparsekern {
namespace semi24 {

// Bit masks that clear the sign bit: -0.0 counts as zero, exactly like `dense != 0` in the oracle.
constexpr uint16_t kHalfMagnitude = 0x7fff;
constexpr uint32_t kFloatMagnitude = 0x7fffffffu;

SPARSEKERN_HD int popcount4(uint32_t nz) {
  return static_cast<int>((nz & 1u) + ((nz >> 1) & 1u) + ((nz >> 2) & 1u) + ((nz >> 3) & 1u));
}

// Nonzero flags of one group of 4 (bit j set = element j nonzero) -> its 4-bit code idx0 | idx1 << 2.
// This is torch's Espresso-minimised boolean encoding, so groups with fewer than two nonzeros get exactly
// the padding positions torch gives them (for example all-zero -> columns 2, 3).
// Callers reject groups with more than two nonzeros before coding them.
SPARSEKERN_HD uint32_t group_code(uint32_t nz) {
  const uint32_t m0 = nz & 1u, m1 = (nz >> 1) & 1u, m3 = (nz >> 3) & 1u;
  const uint32_t e0 = m0 & m1, e1 = (m0 ^ 1u) & m1, e2 = (m0 ^ 1u) & (m1 ^ 1u);
  const uint32_t idx0 = e1 | (e2 << 1);
  const uint32_t idx1 = (e0 | e2 | m3) | ((e1 | (m1 ^ 1u)) << 1);
  return idx0 | (idx1 << 2);
}

// fp32 is 1:2: a pair (p, q) is coded as the 4 halves (p, p, q, q); the kept float is idx0 / 2.
SPARSEKERN_HD uint32_t pair_code(uint32_t nz2) {
  const uint32_t p = nz2 & 1u, q = (nz2 >> 1) & 1u;
  return group_code(p | (p << 1) | (q << 2) | (q << 3));
}

SPARSEKERN_HD uint32_t code_idx0(uint32_t code) { return code & 3u; }
SPARSEKERN_HD uint32_t code_idx1(uint32_t code) { return (code >> 2) & 3u; }

// A code read back from metadata is valid when it names two distinct columns in ascending order
// (fp32: one of the two whole floats, 0b0100 or 0b1110).
SPARSEKERN_HD bool code_valid(uint32_t code, bool pairs) {
  if (pairs) return code == 0x4u || code == 0xeu;
  return code_idx0(code) < code_idx1(code);
}

// Elements of one row covered by one metadata element: groups per element x group width.
SPARSEKERN_HD int elems_per_meta(int elem_bytes) {
  return elem_bytes == 1 ? 32 : (elem_bytes == 2 ? 16 : 8);
}

// Flat offset, in the (m, k_meta) metadata tensor, where logical metadata element (r, c) is stored.
// meta_int32: int8 input (8 codes per int32) uses 16-row groups and an interweave of 2; int16 metadata
// uses 32-row groups and an interweave of 4. Every 32-row (16-row) x 2-column block of logical metadata
// lands in one contiguous run of the output, which is what lets a GPU tile store it coalesced.
SPARSEKERN_HD int64_t meta_offset(int64_t r, int64_t c, int64_t m, bool meta_int32) {
  const int64_t group = meta_int32 ? 16 : 32;
  const int64_t interweave = meta_int32 ? 2 : 4;
  int64_t dr = r / group * group + (r % 8) * interweave + (r % group) / 8;
  int64_t dc = c;
  const int64_t topright = (dr % 2 == 0 && dc % 2 == 1) ? 1 : 0;
  const int64_t bottomleft = (dr % 2 == 1 && dc % 2 == 0) ? 1 : 0;
  dr += topright - bottomleft;
  dc -= topright - bottomleft;
  return (dc / 2) * m * 2 + dr * 2 + (dc % 2);
}

}  // namespace semi24
}  // namespace sparsekern

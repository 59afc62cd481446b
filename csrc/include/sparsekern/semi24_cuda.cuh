// Pieces shared by the CUDA 2:4 compress and decompress kernels: the thread -> metadata element mapping, the
// 32-byte / 16-byte register views of one metadata element's dense and packed data, and host helpers for
// launching and for the first-invalid-group report.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "sparsekern/semi24.h"
#include "sparsekern/semi24_dispatch.h"

namespace sparsekern {
namespace semi24 {
namespace cuda {

// Every format moves 32 dense bytes and 16 packed bytes per metadata element (16 fp16/bf16, 32 int8 or 8 fp32
// elements), so one thread = one metadata element = two uint4 loads + one uint4 store (or the reverse).
constexpr int kDenseBytes = 32;
constexpr int kPackedBytes = 16;
static_assert(FormatHalf::kElems * sizeof(FormatHalf::Bits) == kDenseBytes, "fp16/bf16 tile size");
static_assert(FormatInt8::kElems * sizeof(FormatInt8::Bits) == kDenseBytes, "int8 tile size");
static_assert(FormatFloat::kElems * sizeof(FormatFloat::Bits) == kDenseBytes, "fp32 tile size");
static_assert(FormatHalf::kElems / 2 * sizeof(FormatHalf::Bits) == kPackedBytes &&
                  FormatInt8::kElems / 2 * sizeof(FormatInt8::Bits) == kPackedBytes &&
                  FormatFloat::kElems / 2 * sizeof(FormatFloat::Bits) == kPackedBytes,
              "half of every tile is kept");

// Threads per 32-row x 2-column block of logical metadata: meta_offset stores such a block as one contiguous run
// of 64 elements, so giving thread p of the block the element stored at position p makes every warp store 32
// consecutive metadata elements (and read them, in decompress) instead of 32 scattered ones.
constexpr int kBlockRows = 32;
constexpr int kBlockThreads = 2 * kBlockRows;
constexpr int kThreads = 256;  // 4 metadata blocks per CTA: 32 rows x 8 metadata columns of the matrix
static_assert(kThreads % kBlockThreads == 0, "a CTA holds whole metadata blocks");

struct BlockPos {
  int row;  // 0..31 within the 32-row block
  int col;  // 0..1 within the column pair
};

// Position p (0..63) inside a block's contiguous run -> the logical (row, col) meta_offset puts there. This only
// decides which thread handles which element (the address itself always comes from meta_offset), so a mistake
// here would cost coalescing, not correctness; block_pos_matches_meta_offset checks it at compile time anyway.
SPARSEKERN_HD BlockPos block_pos(int p, bool meta_int32) {
  const int group = meta_int32 ? 16 : 32;
  const int interweave = meta_int32 ? 2 : 4;
  int dr = p / 2, dc = p % 2;
  if (dr % 2 != dc) {  // the 2x2 swap is its own inverse
    dr ^= 1;
    dc ^= 1;
  }
  const int d = dr % group;
  return {dr / group * group + (d % interweave) * 8 + d / interweave, dc};
}

SPARSEKERN_HD bool block_pos_matches_meta_offset(bool meta_int32) {
  constexpr int64_t m = 96;  // three 32-row blocks: checks a block away from the origin too
  for (int64_t rb = 0; rb < m / kBlockRows; ++rb) {
    for (int64_t cp = 0; cp < 3; ++cp) {
      for (int p = 0; p < kBlockThreads; ++p) {
        const BlockPos pos = block_pos(p, meta_int32);
        const int64_t off = meta_offset(rb * kBlockRows + pos.row, cp * 2 + pos.col, m, meta_int32);
        if (off != cp * 2 * m + rb * kBlockThreads + p) return false;
      }
    }
  }
  return true;
}
static_assert(block_pos_matches_meta_offset(false), "block_pos must invert meta_offset (int16 metadata)");
static_assert(block_pos_matches_meta_offset(true), "block_pos must invert meta_offset (int32 metadata)");

// One dense group as a single register word (fp16/bf16: 4 x 16 bits, int8: 4 x 8, fp32 pair: 2 x 32).
template <typename Fmt>
using GroupWord = std::conditional_t<sizeof(typename Fmt::Bits) * Fmt::kGroup == 8, uint64_t, uint32_t>;

template <typename Fmt>
constexpr int kLaneBits = 8 * static_cast<int>(sizeof(typename Fmt::Bits));

// Element i of a group word, zero-extended, and the group word with element i set (i is 0..kGroup-1).
template <typename Fmt>
__device__ __forceinline__ uint32_t group_get(GroupWord<Fmt> w, uint32_t i) {
  return static_cast<typename Fmt::Bits>(w >> (kLaneBits<Fmt> * i));
}

template <typename Fmt>
__device__ __forceinline__ GroupWord<Fmt> group_with(GroupWord<Fmt> w, uint32_t i, uint32_t value) {
  return w | static_cast<GroupWord<Fmt>>(value) << (kLaneBits<Fmt> * i);
}

// The 16 packed bytes of one metadata element as 4 x 32 bits; element i sits at bits i * kLaneBits.
template <typename Fmt>
__device__ __forceinline__ uint32_t packed_get(const uint32_t (&w)[4], int i) {
  constexpr int kLane = kLaneBits<Fmt>;
  const uint32_t word = w[i * kLane / 32] >> ((i * kLane) % 32);
  if constexpr (kLane == 32) {
    return word;
  } else {
    return word & ((1u << kLane) - 1u);
  }
}

// value must fit in kLaneBits (it comes from group_get / packed_get).
template <typename Fmt>
__device__ __forceinline__ void packed_set(uint32_t (&w)[4], int i, uint32_t value) {
  constexpr int kLane = kLaneBits<Fmt>;
  w[i * kLane / 32] |= value << ((i * kLane) % 32);
}

// Thread t of the grid -> (row, metadata column) it handles, or false past the end of the matrix. Blocks are
// numbered row-block-major, so a CTA covers 32 rows x 8 metadata columns: 256 contiguous dense bytes per row.
__device__ __forceinline__ bool thread_elem(bool meta_int32, int64_t m, int64_t k_meta, int64_t& r, int64_t& c) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t block = t / kBlockThreads;
  const int64_t col_pairs = k_meta / 2;
  const BlockPos pos = block_pos(static_cast<int>(t % kBlockThreads), meta_int32);
  r = block / col_pairs * kBlockRows + pos.row;
  c = block % col_pairs * 2 + pos.col;
  return r < m;  // int8 allows m % 32 == 16: the last block then has 16 rows
}

// Host side. Grid for m x k_meta metadata elements (k_meta even), or 0 blocks for an empty matrix.
inline int64_t grid_blocks(int64_t m, int64_t k_meta) {
  const int64_t threads = (m + kBlockRows - 1) / kBlockRows * (k_meta / 2) * kBlockThreads;
  return (threads + kThreads - 1) / kThreads;
}

// The kernels read through uint4: an input whose data pointer is not 16-byte aligned (a view at an odd storage
// offset) is copied to a fresh, aligned allocation first. Outputs are always fresh allocations.
inline at::Tensor aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone();
}

// Device slot for the flat index of the first invalid group, starting at the no-error sentinel INT64_MAX;
// kernels atomicMin into it as unsigned long long (all real indices are non-negative).
inline at::Tensor first_bad_slot(const at::Tensor& like) {
  return at::full({1}, INT64_MAX, like.options().dtype(at::kLong));
}

inline unsigned long long* first_bad_ptr(at::Tensor& slot) {
  return reinterpret_cast<unsigned long long*>(slot.data_ptr<int64_t>());
}

// Copies the slot to the host; this is the one synchronisation of each op.
inline int64_t first_bad_value(const at::Tensor& slot) { return slot.item<int64_t>(); }

}  // namespace cuda
}  // namespace semi24
}  // namespace sparsekern

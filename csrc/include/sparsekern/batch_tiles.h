// Batch-contiguous tiles for the CPU sparse matmul kernels (spmm, sddmm), their shared argument checks and
// work split.
//
// A row-major (B, n) activation is repacked per block of L batch rows into a tile [n][L]: the L values one
// nonzero multiplies (one column, L batch rows) are one contiguous run of L/16 zmm (L/8 ymm) registers. L is chosen
// so the tile stays in a core's L2 (tile_budget) while every nonzero of W reads it from there at random columns.
// Tiles hold fp32, except that bf16 stays bf16: exact, and half the L2 footprint and traffic per nonzero (the
// kernels widen it in registers with one shift or mask). Batch rows past B are zero-filled.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include <unistd.h>

#include "sparsekern/cpu_features.h"
#include "sparsekern/csr.h"

#if defined(SPARSEKERN_X86)
#define SPARSEKERN_BATCH_TILES_AVX512 1
#define SPARSEKERN_BATCH_TILES_AVX2 1
#endif

namespace sparsekern {
namespace batch_tiles {

constexpr int64_t kBlock = 16;          // W rows staged per transposed write-back: one 64-byte fp32 line of y
constexpr int kPortableLanes = 16;      // the portable tile width: 4 xmm per accumulator
constexpr int64_t kTileBudget = 512 << 10;  // bytes of a tile when the L2 size is unknown

// Bytes of a tile: half of one core's L2 as the OS reports it (1 MiB on Zen 4 and Skylake-X, 512 KiB on Zen 2/3,
// 256 KiB on Intel client cores), the rest for W's stream and y; kTileBudget where it is not reported.
inline int64_t tile_budget() {
  static const int64_t budget = [] {
#if defined(_SC_LEVEL2_CACHE_SIZE)
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (l2 >= (128 << 10)) return int64_t(l2) / 2;
#endif
    return kTileBudget;
  }();
  return budget;
}

// The element type of an AVX-512 tile for activations of type T.
template <typename T>
using tile_t = std::conditional_t<std::is_same_v<T, c10::BFloat16>, c10::BFloat16, float>;

// The tile width (up to `widest`: 64, 32 or 16 lanes; bf16 at least 32): the widest whose n columns fit the L2
// budget, but no wider than a small batch needs (padding lanes cost as much as real ones).
inline int tile_lanes(int64_t n, int64_t elem_bytes, int64_t batch, int widest = 64) {
  const int narrowest = elem_bytes == 2 ? 32 : 16;
  for (int lanes : {64, 32}) {
    if (lanes > widest && lanes > narrowest) continue;
    if (lanes > narrowest && (lanes / 2 >= batch || n * lanes * elem_bytes > tile_budget())) continue;
    return lanes;
  }
  return narrowest;
}

// {make(std::integral_constant<int, L>{}), L} for the tile width L of tile_lanes, at most Widest (bf16 tiles: at
// least 32); only those widths are instantiated.
template <typename TileT, typename Fn, int Widest, typename Make>
std::pair<Fn, int> kernel_for_lanes(int64_t n, int64_t batch, Make make) {
  const int lanes = tile_lanes(n, sizeof(TileT), batch, Widest);
  if constexpr (Widest >= 64) {
    if (lanes == 64) return {make(std::integral_constant<int, 64>{}), 64};
  }
  if (lanes == 32) return {make(std::integral_constant<int, 32>{}), 32};
  if constexpr (std::is_same_v<TileT, float>) return {make(std::integral_constant<int, 16>{}), 16};
  TORCH_INTERNAL_ASSERT(false, "bf16 tiles are at least 32 lanes wide");
  return {};
}

// Calls f(T{}) for the element type T of a float32, bfloat16 or float16 tensor (checked before).
template <typename F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK_TYPE(false, "sparsekern: unsupported dtype ", dtype);
  }
}

// fp32, bf16 or fp16's entry of a per-dtype triple (the portable kernels).
template <typename T, typename V>
V by_dtype(V f32, V bf16, V f16) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) return bf16;
  if constexpr (std::is_same_v<T, c10::Half>) return f16;
  return f32;
}

// ---------------------------------------------------------------------------------------------------------------
// Argument checks shared by the CPU entry points (spmm, sddmm, outer_topk, csr_dense_*). The Python layer checks
// every index the user gives once, but the ops are public through torch.ops too and tensors can be edited behind
// the Python checks' back, so the CSR is scanned here as well: an O(n_rows + nnz) integer pass (vectorised, split
// across threads) next to kernels that read every nonzero at least once per batch tile.

inline void check_activation(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be 2-D (batch, features), got ", t.dim(), "-D");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
                   op, ": ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// row_ptr int64 (n_rows + 1) and col_idx int32 (nnz), both contiguous CPU vectors forming a valid CSR index of an
// (n_rows, n_cols) matrix: row_ptr nondecreasing from 0 to nnz, every row's columns strictly ascending in
// [0, n_cols). Returns nnz.
inline int64_t check_csr(const char* op, const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t n_rows,
                         int64_t n_cols) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"row_ptr", row_ptr}, {"col_idx", col_idx}}) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
    TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be 1-D, got ", t.dim(), "-D");
    TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
  }
  TORCH_CHECK_TYPE(row_ptr.scalar_type() == at::kLong, op, ": row_ptr must be int64, got ", row_ptr.scalar_type());
  TORCH_CHECK_TYPE(col_idx.scalar_type() == at::kInt, op, ": col_idx must be int32, got ", col_idx.scalar_type());
  TORCH_CHECK_VALUE(row_ptr.numel() == n_rows + 1, op, ": row_ptr must have ", n_rows + 1,
                    " entries (rows + 1), got ", row_ptr.numel());
  const int64_t nnz = col_idx.numel();
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(rp[0] == 0 && rp[n_rows] == nnz, op, ": row_ptr must run from 0 to nnz=", nnz, ", got ", rp[0],
                    "..", rp[n_rows]);
  // Nondecreasing from 0 to nnz puts every row inside col_idx, so the column pass below reads only within it.
  const int64_t down = csr::first_decrease(rp, n_rows);
  TORCH_CHECK_VALUE(down < 0, op, ": row_ptr must be nondecreasing, got row_ptr[", down + 1, "]=", rp[down + 1],
                    " < row_ptr[", down, "]=", rp[down]);
  const int32_t* ci = col_idx.data_ptr<int32_t>();
  // Branch-free reductions over the flat columns (vectorised), in parallel above kGrainNnz nonzeros per thread;
  // the row starts are counted apart (csr::columns_valid). Only a refused index is walked row by row (the message).
  constexpr int64_t kGrainNnz = 1 << 17;
  const csr::ColumnStats stats = at::parallel_reduce(
      0, nnz, kGrainNnz, csr::ColumnStats{INT32_MAX, INT32_MIN, 0},
      [&](int64_t j0, int64_t j1, csr::ColumnStats) { return csr::column_stats(ci, j0, j1); },
      [](csr::ColumnStats a, csr::ColumnStats b) {
        return csr::ColumnStats{std::min(a.lo, b.lo), std::max(a.hi, b.hi), a.descents + b.descents};
      });
  if (!csr::columns_valid(stats, csr::row_start_descents(rp, ci, 0, n_rows), nnz, n_cols)) {
    int64_t bad = 0;  // some row is at fault (columns_valid is exact): the first one
    while (bad < n_rows && csr::row_fault(rp, ci, bad, n_cols) == csr::kRowOk) ++bad;
    TORCH_INTERNAL_ASSERT(bad < n_rows, op, ": a refused index with no faulty row");
    const auto [lo, hi] = std::minmax_element(ci + rp[bad], ci + rp[bad + 1]);
    TORCH_CHECK_VALUE(*lo >= 0 && *hi < n_cols, op, ": col_idx must lie in [0, ", n_cols, "), got ",
                      *lo < 0 ? *lo : *hi, " in row ", bad);
    TORCH_CHECK_VALUE(false, op, ": col_idx must be ascending and unique within each row, row ", bad, " is not");
  }
  return nnz;
}

// ---------------------------------------------------------------------------------------------------------------
// Work split: one work item is (batch tile, range of W rows). Whole tiles per thread when the tiles divide evenly
// (each thread packs its own tile into its own L2); otherwise every tile is cut into `splits` row ranges of
// about equal work, so no thread idles on a tail. Worker p takes items [p*N/P, (p+1)*N/P): consecutive items
// share a tile, which is packed once per worker. Deterministic for a given thread count.
struct Split {
  int64_t lanes = 0;
  int64_t n_tiles = 0;
  int64_t splits = 1;
  int64_t workers = 1;
  std::vector<int64_t> row_bounds;  // splits + 1 row boundaries

  int64_t items() const { return n_tiles * splits; }
  int64_t item_begin(int64_t p) const { return p * items() / workers; }
};

inline Split split_work(int64_t batch, int64_t lanes, const int64_t* row_ptr, int64_t n_rows) {
  Split s;
  s.lanes = lanes;
  s.n_tiles = (batch + lanes - 1) / lanes;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  if (s.n_tiles % threads != 0) s.splits = std::max<int64_t>(1, std::min<int64_t>(threads, n_rows));
  s.workers = std::max<int64_t>(1, std::min(threads, s.items()));
  // Cost of rows [0, r): their nonzeros plus a charge per row for the accumulators and the write-back.
  constexpr int64_t kRowCost = 4;
  const auto cost = [&](int64_t r) { return row_ptr[r] + kRowCost * r; };
  s.row_bounds.assign(s.splits + 1, n_rows);
  s.row_bounds[0] = 0;
  for (int64_t k = 1; k < s.splits; ++k) {
    const int64_t target = cost(n_rows) * k / s.splits;
    int64_t lo = s.row_bounds[k - 1], hi = n_rows;  // the first r in [lo, hi] with cost(r) >= target
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (cost(mid) < target) lo = mid + 1; else hi = mid;
    }
    // whole staging blocks, so every block of an output row starts 16-aligned (streaming write-back)
    s.row_bounds[k] = std::max(s.row_bounds[k - 1], std::min(n_rows, (lo + kBlock / 2) / kBlock * kBlock));
  }
  return s;
}

// Runs fn(worker, tile, row_begin, row_end, new_tile) for every work item, the workers in parallel; new_tile
// says the worker has not seen this tile yet (it must pack it into its buffer).
template <typename F>
void for_each_item(const Split& s, F&& fn) {
  at::parallel_for(0, s.workers, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t i = s.item_begin(p); i < s.item_begin(p + 1); ++i) {
        const int64_t tile = i / s.splits, k = i % s.splits;
        fn(p, tile, s.row_bounds[k], s.row_bounds[k + 1], i == s.item_begin(p) || k == 0);
      }
    }
  });
}

// Scratch of `floats` fp32 per worker, each worker's part 64-byte aligned.
struct WorkerBuffers {
  at::Tensor storage;
  int64_t stride = 0;

  WorkerBuffers(int64_t workers, int64_t floats) : stride((std::max<int64_t>(1, floats) + 15) / 16 * 16) {
    storage = at::empty({workers * stride}, at::TensorOptions().dtype(at::kFloat));
  }
  float* operator[](int64_t p) const { return storage.data_ptr<float>() + p * stride; }
};

// ---------------------------------------------------------------------------------------------------------------
// Portable packing, write-back and lane vectors (fp32 tiles); compiled into each caller's target_clones clones.

// 4 fp32 lanes as a GCC/Clang vector, the width every target has natively (SSE2, NEON; AVX2 and AVX-512 as xmm).
// Arrays of them with constant trip counts stay in registers, where a plain float[L] accumulator would round-trip
// memory; a wider vector type would live in memory wherever the target lacks it.
typedef float vec4 __attribute__((vector_size(16)));
constexpr int kVec = 4;

inline void load_vec(vec4& v, const float* p) { std::memcpy(&v, p, sizeof(v)); }

// tile[c][l] = src[l][c] for l < rows (src row-major with leading dimension ld), 0 for rows <= l < L.
template <int L, typename T>
inline void pack_tile_portable(const T* src, int64_t ld, int64_t rows, int64_t n, float* tile) {
  constexpr int64_t kC = 16;  // L lanes x 16 columns stay in L1 while transposing
  for (int64_t c0 = 0; c0 < n; c0 += kC) {
    const int64_t c1 = std::min(n, c0 + kC);
    for (int64_t l = 0; l < L; ++l) {
      for (int64_t c = c0; c < c1; ++c) tile[c * L + l] = l < rows ? static_cast<float>(src[l * ld + c]) : 0.0f;
    }
  }
}

// dst[l][c] = T(stage[c][l]) for l < rows, c < cols: a staged [cols][L] block written back row-major.
template <int L, typename T>
inline void store_block_portable(const float* stage, int64_t cols, T* dst, int64_t ld, int64_t rows) {
  for (int64_t l = 0; l < rows; ++l) {
    for (int64_t c = 0; c < cols; ++c) dst[l * ld + c] = static_cast<T>(stage[c * L + l]);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// AVX-512 packing, lane loads and write-back. Packing and write-back go through 16x16 register transposes, so
// both the activations and the tiles move whole 64-byte lines.
#if defined(SPARSEKERN_BATCH_TILES_AVX512)
// GCC 12's AVX-512 intrinsics seed their results with _mm512_undefined_*(), which -W(maybe-)uninitialized
// misreports once inlined (GCC bug 105593); kernels built on them include this header and use the same guard.
#define SPARSEKERN_AVX512_DIAGNOSTICS_BEGIN                                \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wuninitialized\"") \
      _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define SPARSEKERN_AVX512_DIAGNOSTICS_END _Pragma("GCC diagnostic pop")
SPARSEKERN_AVX512_DIAGNOSTICS_BEGIN

// r[i][j] -> r[j][i] for a 16x16 fp32 block.
SPARSEKERN_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  // r[4i + k] now holds rows 4i..4i+3 of column 4L + k in its 128-bit lane L; gather the lanes.
  for (int k = 0; k < 4; ++k) {
    const __m512 a = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88), b = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xdd);
    const __m512 c = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
    const __m512 d = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xdd);
    t[k] = _mm512_shuffle_f32x4(a, c, 0x88);
    t[4 + k] = _mm512_shuffle_f32x4(b, d, 0x88);
    t[8 + k] = _mm512_shuffle_f32x4(a, c, 0xdd);
    t[12 + k] = _mm512_shuffle_f32x4(b, d, 0xdd);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

inline __mmask16 first_n(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }

// The first popcount(mask) elements at p, widened to fp32 (the rest zero).
template <typename T>
SPARSEKERN_AVX512 inline __m512 load16(const T* p, __mmask16 mask) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(mask, p);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(h);
    }
  }
}

// Rounds to T (nearest-even like c10's conversions; NaN stays NaN) and stores the masked lanes.
template <typename T>
SPARSEKERN_AVX512 inline void store16(T* p, __m512 v, __mmask16 mask) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(p, mask, v);
  } else {
    __m256i h;
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const __m512i u = _mm512_castps_si512(v);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
      r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
      h = _mm512_cvtepi32_epi16(r);
    } else {
      h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    _mm256_mask_storeu_epi16(p, mask, h);
  }
}

// store16 of all 16 lanes as a non-temporal store; p is aligned to 16 elements.
template <typename T>
SPARSEKERN_AVX512 inline void stream16(T* p, __m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_stream_ps(p, v);
  } else {
    alignas(32) T h[16];
    store16(h, v, __mmask16(0xffff));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm256_load_si256(reinterpret_cast<const __m256i*>(h)));
  }
}

// tile[c][l] = src[l][c] as in pack_tile_portable, for an fp32 or (from bf16, exactly) bf16 tile. Sixteen batch
// rows at a time, so the reads are sixteen sequential streams the prefetchers can follow.
template <int L, typename T, typename TileT>
SPARSEKERN_AVX512 inline void pack_tile_avx512(const T* src, int64_t ld, int64_t rows, int64_t n, TileT* tile) {
  static_assert(std::is_same_v<TileT, float> || std::is_same_v<T, TileT>, "bf16 tiles hold bf16 activations");
  __m512 r[16];
  for (int64_t q = 0; q < L; q += 16) {
    for (int64_t c0 = 0; c0 < n; c0 += 16) {
      const int64_t nc = std::min<int64_t>(16, n - c0);
      const __mmask16 cmask = first_n(nc);
      for (int64_t i = 0; i < 16; ++i) {
        r[i] = q + i < rows ? load16(src + (q + i) * ld + c0, cmask) : _mm512_setzero_ps();
      }
      transpose16(r);
      for (int64_t i = 0; i < nc; ++i) {
        if constexpr (std::is_same_v<TileT, float>) {
          _mm512_store_ps(tile + (c0 + i) * L + q, r[i]);
        } else {
          const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(r[i]), 16));
          _mm256_store_si256(reinterpret_cast<__m256i*>(tile + (c0 + i) * L + q), h);
        }
      }
    }
  }
}

// The L lanes of one tile column as NV = L/16 fp32 vectors. fp32 tiles load in lane order. A bf16 tile loads 32
// lanes per zmm and widens them in place: the shift gives the even lanes, the mask the odd ones (no shuffle on
// the hot path); `to_lane_order` restores the order once per accumulated result.
template <int L, typename TileT>
struct Lanes {
  static constexpr int NV = L / 16;

  SPARSEKERN_AVX512 static inline void load(const TileT* p, __m512 v[NV]) {
    if constexpr (std::is_same_v<TileT, float>) {
      for (int i = 0; i < NV; ++i) v[i] = _mm512_load_ps(p + 16 * i);
    } else {
      static_assert(L % 32 == 0, "bf16 tiles hold whole zmm registers of 32 lanes");
      for (int i = 0; i < NV / 2; ++i) {
        const __m512i w = _mm512_load_si512(p + 32 * i);
        v[2 * i] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
        v[2 * i + 1] = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(int32_t(0xffff0000u))));
      }
    }
  }

  SPARSEKERN_AVX512 static inline void to_lane_order(__m512 v[NV]) {
    if constexpr (!std::is_same_v<TileT, float>) {
      // lane m of a 32-lane group is element m/2 of the even (m even) or odd vector; bit 4 picks the odd one
      const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
      const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
      for (int i = 0; i < NV / 2; ++i) {
        const __m512 even = v[2 * i], odd = v[2 * i + 1];
        v[2 * i] = _mm512_permutex2var_ps(even, lo, odd);
        v[2 * i + 1] = _mm512_permutex2var_ps(even, hi, odd);
      }
    }
  }
};

// dst[l][c] = T(stage[c][l]) for l < rows, c < cols <= 16: a staged [cols][L] fp32 block written back row-major.
// Whole aligned runs of 16 (every block of a row-aligned output whose row length is a multiple of 16) are streamed
// past the caches: the output is written once and is far larger than L2, so a normal store would first read each
// line from memory and evict the tile for it. The caller ends its writes with _mm_sfence().
template <int L, typename T>
SPARSEKERN_AVX512 inline void store_block_avx512(const float* stage, int64_t cols, T* dst, int64_t ld,
                                                 int64_t rows) {
  __m512 r[16];
  const __mmask16 cmask = first_n(cols);
  constexpr int64_t kRun = 16 * sizeof(T);  // bytes of 16 outputs, the alignment a streaming store needs
  const bool stream = cols == 16 && reinterpret_cast<uintptr_t>(dst) % kRun == 0 && (ld * sizeof(T)) % kRun == 0;
  for (int64_t q = 0; q < std::min<int64_t>(rows, L); q += 16) {
    for (int64_t c = 0; c < 16; ++c) r[c] = c < cols ? _mm512_load_ps(stage + c * L + q) : _mm512_setzero_ps();
    transpose16(r);
    const int64_t nl = std::min<int64_t>(16, rows - q);
    if (stream) {
      for (int64_t i = 0; i < nl; ++i) stream16(dst + (q + i) * ld, r[i]);
    } else {
      for (int64_t i = 0; i < nl; ++i) store16(dst + (q + i) * ld, r[i], cmask);
    }
  }
}

SPARSEKERN_AVX512_DIAGNOSTICS_END
#endif  // SPARSEKERN_BATCH_TILES_AVX512

// ---------------------------------------------------------------------------------------------------------------
// AVX2 packing, lane loads and write-back: the AVX-512 section's layout with 8-lane ymm vectors and 8x8 register
// transposes (AVX2 has no masked 16-bit moves, so partial rows of 16-bit data go through a small buffer).
#if defined(SPARSEKERN_BATCH_TILES_AVX2)

// r[i][j] -> r[j][i] for an 8x8 fp32 block.
SPARSEKERN_AVX2 inline void transpose8(__m256 r[8]) {
  __m256 t[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    r[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  // r[4i + k] now holds rows 4i..4i+3 of column k (low 128 bits) and of column 4 + k (high); pair the halves.
  for (int k = 0; k < 4; ++k) {
    t[k] = _mm256_permute2f128_ps(r[k], r[4 + k], 0x20);
    t[4 + k] = _mm256_permute2f128_ps(r[k], r[4 + k], 0x31);
  }
  for (int i = 0; i < 8; ++i) r[i] = t[i];
}

// The first n (<= 8) elements at p widened to fp32, the rest zero.
template <typename T>
SPARSEKERN_AVX2 inline __m256 load8(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (n >= 8) return _mm256_loadu_ps(p);
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), idx));
  } else {
    __m128i h;
    if (n >= 8) {
      h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    } else {
      alignas(16) uint16_t part[8] = {};
      std::memcpy(part, p, n * sizeof(T));
      h = _mm_load_si128(reinterpret_cast<const __m128i*>(part));
    }
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
      return _mm256_cvtph_ps(h);
    }
  }
}

// Rounds v to T (nearest-even like c10's conversions; NaN stays NaN) and stores the first n (<= 8) lanes.
template <typename T>
SPARSEKERN_AVX2 inline void store8(T* p, __m256 v, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (n >= 8) return _mm256_storeu_ps(p, v);
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), idx), v);
  } else {
    __m128i h;
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const __m256i u = _mm256_castps_si256(v);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
      const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
      r = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc0)),
                                               nan));
      h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));  // values fit 16 bits
    } else {
      h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    if (n >= 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
    } else {
      alignas(16) uint16_t part[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(part), h);
      std::memcpy(p, part, n * sizeof(T));
    }
  }
}

// tile[c][l] = src[l][c] as in pack_tile_portable, for an fp32 or (from bf16, exactly) bf16 tile: 8x8 blocks, so
// the reads are eight sequential streams; a bf16 tile joins two blocks' 8 lanes into one 32-byte run.
template <int L, typename T, typename TileT>
SPARSEKERN_AVX2 inline void pack_tile_avx2(const T* src, int64_t ld, int64_t rows, int64_t n, TileT* tile) {
  static_assert(std::is_same_v<TileT, float> || std::is_same_v<T, TileT>, "bf16 tiles hold bf16 activations");
  constexpr int64_t kStep = std::is_same_v<TileT, float> ? 8 : 16;  // lanes per store
  __m256 r[8], s[8];
  for (int64_t q = 0; q < L; q += kStep) {
    for (int64_t c0 = 0; c0 < n; c0 += 8) {
      const int64_t nc = std::min<int64_t>(8, n - c0);
      for (int64_t i = 0; i < 8; ++i) r[i] = q + i < rows ? load8(src + (q + i) * ld + c0, nc) : _mm256_setzero_ps();
      transpose8(r);
      if constexpr (std::is_same_v<TileT, float>) {
        for (int64_t i = 0; i < nc; ++i) _mm256_store_ps(tile + (c0 + i) * L + q, r[i]);
      } else {
        for (int64_t i = 0; i < 8; ++i) {
          s[i] = q + 8 + i < rows ? load8(src + (q + 8 + i) * ld + c0, nc) : _mm256_setzero_ps();
        }
        transpose8(s);
        for (int64_t i = 0; i < nc; ++i) {
          // the upper halves of the fp32 words are the bf16 bits; pack them in lane order
          const __m256i lo = _mm256_srli_epi32(_mm256_castps_si256(r[i]), 16);
          const __m256i hi = _mm256_srli_epi32(_mm256_castps_si256(s[i]), 16);
          const __m256i h = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), _MM_SHUFFLE(3, 1, 2, 0));
          _mm256_store_si256(reinterpret_cast<__m256i*>(tile + (c0 + i) * L + q), h);
        }
      }
    }
  }
}

// The L lanes of one tile column as NV = L/8 fp32 vectors, as Lanes does with zmm: a bf16 tile widens 16 lanes
// per ymm load in place (shift: even lanes, mask: odd ones), and to_lane_order restores the order of a result.
template <int L, typename TileT>
struct LanesAvx2 {
  static constexpr int NV = L / 8;

  SPARSEKERN_AVX2 static inline void load(const TileT* p, __m256 v[NV]) {
    if constexpr (std::is_same_v<TileT, float>) {
      for (int i = 0; i < NV; ++i) v[i] = _mm256_load_ps(p + 8 * i);
    } else {
      static_assert(L % 16 == 0, "bf16 tiles hold whole ymm registers of 16 lanes");
      for (int i = 0; i < NV / 2; ++i) {
        const __m256i w = _mm256_load_si256(reinterpret_cast<const __m256i*>(p + 16 * i));
        v[2 * i] = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
        v[2 * i + 1] = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(int32_t(0xffff0000u))));
      }
    }
  }

  SPARSEKERN_AVX2 static inline void to_lane_order(__m256 v[NV]) {
    if constexpr (!std::is_same_v<TileT, float>) {
      for (int i = 0; i < NV / 2; ++i) {
        // unpack interleaves within 128-bit halves: lanes 0-3 | 8-11 and 4-7 | 12-15; then pair the halves
        const __m256 a = _mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]);
        const __m256 b = _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]);
        v[2 * i] = _mm256_permute2f128_ps(a, b, 0x20);
        v[2 * i + 1] = _mm256_permute2f128_ps(a, b, 0x31);
      }
    }
  }
};

// dst[l][c] = T(stage[c][l]) for l < rows, c < cols <= 16: a staged [cols][L] fp32 block written back row-major.
template <int L, typename T>
SPARSEKERN_AVX2 inline void store_block_avx2(const float* stage, int64_t cols, T* dst, int64_t ld, int64_t rows) {
  __m256 r[8];
  for (int64_t h = 0; h < cols; h += 8) {
    const int64_t nc = std::min<int64_t>(8, cols - h);
    for (int64_t q = 0; q < std::min<int64_t>(rows, L); q += 8) {
      for (int64_t c = 0; c < 8; ++c) r[c] = c < nc ? _mm256_load_ps(stage + (h + c) * L + q) : _mm256_setzero_ps();
      transpose8(r);
      const int64_t nl = std::min<int64_t>(8, rows - q);
      for (int64_t i = 0; i < nl; ++i) store8(dst + (q + i) * ld + h, r[i], nc);
    }
  }
}

#endif  // SPARSEKERN_BATCH_TILES_AVX2

}  // namespace batch_tiles
}  // namespace sparsekern

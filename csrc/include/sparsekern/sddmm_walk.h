// The CPU SDDMM, out[j] = sum_b g[b, row(j)] * x[b, col_idx[j]], shared by the CSR op (sddmm.cpp) and the
// constant fan-in ELL op (ell_sddmm.cpp). The two differ only in how the walk finds where a row's nonzeros begin:
// a row pointer (CsrRows) or every k-th nonzero (EllRows); everything else, and so the summation order, is one code.
//
// Per batch tile (see batch_tiles.h) x is packed to [n_in][L] and stays in L2. The rows of g are packed 64 at a
// time into an L1-sized block; the current row's L lanes of g sit in registers while its nonzeros stream by, each a
// register-wide product with the run tile[col]. Nonzeros go in groups of 16 (8 on AVX2) across row boundaries
// (rows are often shorter than that at high sparsity), whose partial sums are reduced together by one transposing
// add tree (3 shuffles and adds per nonzero instead of a full horizontal sum each) and added to a per-worker fp32
// accumulator; the workers' accumulators are summed in a fixed order at the end: deterministic for a given thread
// count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "sparsekern/batch_tiles.h"
#include "sparsekern/csr.h"

namespace sparsekern {
namespace sddmm_walk {

// A walk policy says where the rows' nonzeros begin. at(o0) is the same rows counted from row o0 (a block's rows
// are 0, 1, ...; nonzeros keep their global index), so the walk indexes g's block by its own row.

// Rows of a CSR index: row r's nonzeros are row_ptr[r] .. row_ptr[r + 1] - 1; rows may be empty.
struct CsrRows {
  const int64_t* row_ptr;
  CsrRows at(int64_t o0) const { return {row_ptr + o0}; }
  int64_t begin(int64_t r) const { return row_ptr[r]; }
  // The row holding nonzero begin(r), the first nonempty row at or after r (r < n_rows, begin(r) < nnz).
  int64_t first(int64_t r) const { return csr::advance_row(row_ptr, r, row_ptr[r]); }
  // The row holding the nonzero after row r's last one, the next nonempty row (begin(r + 1) < nnz).
  int64_t next(int64_t r) const { return csr::advance_row(row_ptr, r + 1, row_ptr[r + 1]); }
  // The end of row r, begin(r + 1), given its start begin(r) (the walk knows it: the previous row's end).
  int64_t end(int64_t r, int64_t /*start*/) const { return row_ptr[r + 1]; }
};

// Rows of a constant fan-in (ELL) index: row r's nonzeros are base + r * k .. base + r * k + k - 1, k >= 1; no row
// pointer read.
struct EllRows {
  int64_t k;
  int64_t base = 0;
  EllRows at(int64_t o0) const { return {k, base + o0 * k}; }
  int64_t begin(int64_t r) const { return base + r * k; }
  int64_t first(int64_t r) const { return r; }
  int64_t next(int64_t r) const { return r + 1; }
  int64_t end(int64_t /*r*/, int64_t start) const { return start + k; }
};

constexpr int64_t kGRows = 64;  // rows of g packed per block: 64 x L lanes, at most 16 KiB

template <typename Rows>
struct Args {
  const void* g;
  const void* x;
  Rows rows;
  const int32_t* col_idx;  // the nonzeros' columns, flat in row order
  int64_t batch, n_in, n_out;
};

// One work item: packs x's tile `tile` (when new to the worker), then adds every nonzero of rows [r0, r1) over the
// tile's batch rows to acc, one block of kGRows rows of g at a time. walk_fn(g_block, x_tile, rows.at(o0), col_idx,
// o1 - o0, acc) does the rows [o0, o1) of a block.
template <int L, typename T, typename TileT, typename Rows, typename Pack, typename Walk>
inline __attribute__((always_inline)) void item(const Args<Rows>& a, int64_t tile, int64_t r0, int64_t r1,
                                                float* xbuf, bool new_tile, float* acc, Pack pack_fn, Walk walk_fn) {
  const int64_t b0 = tile * L, rows = std::min<int64_t>(L, a.batch - b0);
  TileT* xt = reinterpret_cast<TileT*>(xbuf);
  if (new_tile) pack_fn(static_cast<const T*>(a.x) + b0 * a.n_in, a.n_in, rows, a.n_in, xt);
  alignas(64) TileT gblock[kGRows * L];
  const T* g = static_cast<const T*>(a.g) + b0 * a.n_out;
  for (int64_t o0 = r0; o0 < r1; o0 += kGRows) {
    const int64_t o1 = std::min(r1, o0 + kGRows);
    if (a.rows.begin(o0) == a.rows.begin(o1)) continue;
    pack_fn(g + o0, a.n_out, rows, o1 - o0, gblock);
    walk_fn(gblock, xt, a.rows.at(o0), a.col_idx, o1 - o0, acc);
  }
}

// The sum of the 4 lanes, pairwise.
inline float sum_lanes(const batch_tiles::vec4& v) { return (v[0] + v[2]) + (v[1] + v[3]); }

// Portable path: per nonzero one 4-lane vector of partial products (GCC/Clang vectors), then its lane sum.
template <int L, typename Rows>
inline __attribute__((always_inline)) void walk_portable(const float* gblock, const float* xt, const Rows rs,
                                                         const int32_t* col_idx, int64_t n, float* acc) {
  using batch_tiles::kVec;
  using batch_tiles::load_vec;
  using batch_tiles::vec4;
  constexpr int NV = L / kVec;
  for (int64_t o = 0; o < n; ++o) {
    vec4 g[NV];
    for (int i = 0; i < NV; ++i) load_vec(g[i], gblock + o * L + kVec * i);
    const int64_t je = rs.begin(o + 1);
    for (int64_t j = rs.begin(o); j < je; ++j) {
      const float* xs = xt + int64_t(col_idx[j]) * L;
      vec4 s = {}, xv;
      for (int i = 0; i < NV; ++i) {
        load_vec(xv, xs + kVec * i);
        s += g[i] * xv;
      }
      acc[j] += sum_lanes(s);
    }
  }
}

constexpr int kPL = batch_tiles::kPortableLanes;

template <typename Rows, typename T>
void item_portable(const Args<Rows>& a, int64_t tile, int64_t r0, int64_t r1, float* xbuf, bool new_tile,
                   float* acc) {
  item<kPL, T, float>(a, tile, r0, r1, xbuf, new_tile, acc, batch_tiles::pack_tile_portable<kPL, T>,
                      walk_portable<kPL, Rows>);
}

#if defined(SPARSEKERN_BATCH_TILES_AVX2)
// Lane k of the result = the sum of the 8 lanes of v[k]: a transposing add tree, 7 shuffle pairs and adds.
SPARSEKERN_AVX2 inline __m256 reduce8(const __m256 v[8]) {
  __m256 a[4], b[2];
  for (int i = 0; i < 4; ++i) {  // per 128-bit half: v[2i] and v[2i+1] folded to pairs
    a[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 2; ++i) {  // per 128-bit half: the four sums of v[4i..4i+3]
    b[i] = _mm256_add_ps(_mm256_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm256_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  return _mm256_add_ps(_mm256_permute2f128_ps(b[0], b[1], 0x20), _mm256_permute2f128_ps(b[0], b[1], 0x31));
}

// walk_avx512 with ymm vectors: nonzeros in groups of 8 across row boundaries, the row's g (NV <= 4 registers:
// tiles of at most 32 lanes) held while eight partial sums and their loads fill the other registers.
template <int L, typename TileT, typename Rows>
SPARSEKERN_AVX2 inline void walk_avx2(const TileT* gblock, const TileT* xt, const Rows rs, const int32_t* col_idx,
                                      int64_t n_rows, float* acc) {
  using Lanes = batch_tiles::LanesAvx2<L, TileT>;
  constexpr int NV = Lanes::NV;
  static_assert(NV <= 4, "g's lanes and eight partial sums share the 16 ymm registers");
  const int64_t js = rs.begin(0), je = rs.begin(n_rows);
  int64_t row = rs.first(0);
  int64_t row_end = rs.begin(row + 1);
  __m256 g[NV];
  Lanes::load(gblock + row * L, g);
  for (int64_t j = js; j < je; j += 8) {
    const int64_t n = std::min<int64_t>(8, je - j);
    __m256 part[8];
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      if (k < n) {
        if (j + k == row_end) {
          row = rs.next(row);
          row_end = rs.end(row, row_end);
          Lanes::load(gblock + row * L, g);
        }
        __m256 xv[NV];
        Lanes::load(xt + int64_t(col_idx[j + k]) * L, xv);
        __m256 s = _mm256_mul_ps(g[0], xv[0]);
        for (int i = 1; i < NV; ++i) s = _mm256_fmadd_ps(g[i], xv[i], s);
        part[k] = s;
      } else {
        part[k] = _mm256_setzero_ps();
      }
    }
    const __m256 sums = reduce8(part);
    if (n == 8) {
      _mm256_storeu_ps(acc + j, _mm256_add_ps(_mm256_loadu_ps(acc + j), sums));
    } else {
      batch_tiles::store8(acc + j, _mm256_add_ps(batch_tiles::load8(acc + j, n), sums), n);
    }
  }
}

template <int L, typename T, typename Rows>
SPARSEKERN_AVX2 void item_avx2(const Args<Rows>& a, int64_t tile, int64_t r0, int64_t r1, float* xbuf, bool new_tile,
                               float* acc) {
  using TileT = batch_tiles::tile_t<T>;
  item<L, T, TileT>(a, tile, r0, r1, xbuf, new_tile, acc, batch_tiles::pack_tile_avx2<L, T, TileT>,
                    walk_avx2<L, TileT, Rows>);
}
#endif

#if defined(SPARSEKERN_BATCH_TILES_AVX512)
SPARSEKERN_AVX512_DIAGNOSTICS_BEGIN
// Lane k of the result = the sum of the 16 lanes of v[k]: a transposing add tree, 15 shuffle pairs and adds.
SPARSEKERN_AVX512 inline __m512 reduce16(const __m512 v[16]) {
  __m512 a[8], b[4];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: v[2i] and v[2i+1] folded to pairs
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the four sums of v[4i..4i+3]
    b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  const __m512 c0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x88), _mm512_shuffle_f32x4(b[0], b[1], 0xdd));
  const __m512 c1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x88), _mm512_shuffle_f32x4(b[2], b[3], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c0, c1, 0x88), _mm512_shuffle_f32x4(c0, c1, 0xdd));
}

// Nonzeros in groups of 16 across row boundaries; the row's g is reloaded into registers when a group crosses
// into the next row. g and x share the tiles' lane order, so a bf16 tile's even/odd lane split needs no undoing
// for a dot product.
template <int L, typename TileT, typename Rows>
SPARSEKERN_AVX512 inline void walk_avx512(const TileT* gblock, const TileT* xt, const Rows rs,
                                          const int32_t* col_idx, int64_t n_rows, float* acc) {
  using Lanes = batch_tiles::Lanes<L, TileT>;
  constexpr int NV = Lanes::NV;
  const int64_t js = rs.begin(0), je = rs.begin(n_rows);
  int64_t row = rs.first(0);
  int64_t row_end = rs.begin(row + 1);
  __m512 g[NV];
  Lanes::load(gblock + row * L, g);
  for (int64_t j = js; j < je; j += 16) {
    const int64_t n = std::min<int64_t>(16, je - j);
    __m512 part[16];
#pragma GCC unroll 16
    for (int k = 0; k < 16; ++k) {
      if (k < n) {
        if (j + k == row_end) {
          row = rs.next(row);
          row_end = rs.end(row, row_end);
          Lanes::load(gblock + row * L, g);
        }
        __m512 xv[NV];
        Lanes::load(xt + int64_t(col_idx[j + k]) * L, xv);
        __m512 s = _mm512_mul_ps(g[0], xv[0]);
        for (int i = 1; i < NV; ++i) s = _mm512_fmadd_ps(g[i], xv[i], s);
        part[k] = s;
      } else {
        part[k] = _mm512_setzero_ps();
      }
    }
    const __mmask16 m = batch_tiles::first_n(n);
    _mm512_mask_storeu_ps(acc + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, acc + j), reduce16(part)));
  }
}

template <int L, typename T, typename Rows>
SPARSEKERN_AVX512 void item_avx512(const Args<Rows>& a, int64_t tile, int64_t r0, int64_t r1, float* xbuf,
                                   bool new_tile, float* acc) {
  using TileT = batch_tiles::tile_t<T>;
  item<L, T, TileT>(a, tile, r0, r1, xbuf, new_tile, acc, batch_tiles::pack_tile_avx512<L, T, TileT>,
                    walk_avx512<L, TileT, Rows>);
}
SPARSEKERN_AVX512_DIAGNOSTICS_END
#endif

template <typename Rows>
using ItemFn = void (*)(const Args<Rows>&, int64_t, int64_t, int64_t, float*, bool, float*);

// The kernel for activations of type T, and its tile width.
template <typename Rows, typename T>
std::pair<ItemFn<Rows>, int> kernel(int64_t n_in, int64_t batch) {
  using TileT = batch_tiles::tile_t<T>;
#if defined(SPARSEKERN_BATCH_TILES_AVX512)
  if (cpu_isa() == CpuIsa::kAvx512) {
    return batch_tiles::kernel_for_lanes<TileT, ItemFn<Rows>, 64>(
        n_in, batch, [](auto l) -> ItemFn<Rows> { return item_avx512<l.value, T, Rows>; });
  }
#endif
#if defined(SPARSEKERN_BATCH_TILES_AVX2)
  if (cpu_isa() == CpuIsa::kAvx2) {
    return batch_tiles::kernel_for_lanes<TileT, ItemFn<Rows>, 32>(
        n_in, batch, [](auto l) -> ItemFn<Rows> { return item_avx2<l.value, T, Rows>; });
  }
#endif
  return {item_portable<Rows, T>, kPL};
}

// Fills out (nnz elements, x's dtype, contiguous; nnz > 0, batch > 0) with the SDDMM of a. split(lanes) gives the
// work split (batch_tiles::Split) for a tile width.
template <typename Rows, typename SplitFn>
void run(const Args<Rows>& a, int64_t nnz, at::Tensor& out, SplitFn split_fn) {
  batch_tiles::dispatch_dtype(out.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto [fn, lanes] = kernel<Rows, T>(a.n_in, a.batch);
    const batch_tiles::Split split = split_fn(lanes);
    const batch_tiles::WorkerBuffers xbufs(split.workers, a.n_in * lanes);
    // fp32 accumulators, one per worker; a single fp32 worker accumulates straight into out
    const bool direct = split.workers == 1 && std::is_same_v<T, float>;
    const batch_tiles::WorkerBuffers accs(direct ? 0 : split.workers, direct ? 0 : nnz);
    float* out_f32 = direct ? out.data_ptr<float>() : nullptr;
    at::parallel_for(0, split.workers, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) std::fill_n(direct ? out_f32 : accs[p], nnz, 0.0f);
    });
    batch_tiles::for_each_item(split, [&](int64_t p, int64_t tile, int64_t r0, int64_t r1, bool new_tile) {
      fn(a, tile, r0, r1, xbufs[p], new_tile, direct ? out_f32 : accs[p]);
    });
    if (direct) return;
    T* o = out.data_ptr<T>();
    at::parallel_for(0, nnz, 1 << 14, [&](int64_t j0, int64_t j1) {
      constexpr int64_t kChunk = 256;  // sum the workers in fp32 in L1, then round once
      float s[kChunk];
      for (int64_t c0 = j0; c0 < j1; c0 += kChunk) {
        const int64_t n = std::min(kChunk, j1 - c0);
        std::copy_n(accs[0] + c0, n, s);
        for (int64_t p = 1; p < split.workers; ++p) {
          const float* acc = accs[p] + c0;
          for (int64_t i = 0; i < n; ++i) s[i] += acc[i];
        }
        for (int64_t i = 0; i < n; ++i) o[c0 + i] = static_cast<T>(s[i]);
      }
    });
  });
}

}  // namespace sddmm_walk
}  // namespace sparsekern

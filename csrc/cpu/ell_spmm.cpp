// ELL SpMM on the CPU: y = x @ W.T for a constant fan-in W (n_out, n_in), cols int32 (n_out, k), values (n_out, k).
//
// The CSR kernel's layout (spmm.cpp, batch_tiles.h): per batch tile of L rows x is packed to [n_in][L] and stays
// in L2, y is written back through a [16][L] staging block and register transposes. What equal rows change: the
// trip count is k for every row and there is no row_ptr, so R rows run interleaved, each with its own NV = L/16
// accumulators (R * NV = 8 independent FMA chains, no per-row reduction of unrolled chains), and the work split is
// exact. Every lane of a row is summed in three levels, as the CSR kernel does (spmm.cpp): chunks of kChunk
// nonzeros as one serial FMA chain from +0, kChunks chunks into a block sum, blocks into the row's total. One long
// chain over k = 1000+ nonzeros made ~4x the rounding error of dense F.linear; this keeps it at or below it. Equal
// rows reach the chunk boundaries together, so the R interleaved rows flush their chunks at the same step. The
// per-lane order is the same on AVX-512 and AVX2 (the same bits whatever their tile widths); the portable path
// rounds each product (no FMA on the x86-64 baseline). Batches of one or two rows read x with scalar loads
// instead (see kGatherBatch below).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "sparsekern/batch_tiles.h"
#include "sparsekern/cpu_alloc.h"
#include "sparsekern/ell.h"

namespace sparsekern {
namespace {

using batch_tiles::kBlock;

// The summation levels (spmm.cpp's kChunk and kChunks): at most kChunk additions onto a chunk sum, kChunks onto a
// block sum, k / (kChunk * kChunks) onto the total.
constexpr int64_t kChunk = 32;
constexpr int64_t kChunks = 16;
constexpr int64_t kSpan = kChunk * kChunks;

struct EllArgs {
  const void* x;
  void* y;
  const int32_t* cols;
  const float* values;
  int64_t batch, n_in, n_out, k;
};

// One work item: packs batch tile `tile` (unless the worker's buffer already holds it), then computes W rows
// [r0, r1) for it, kBlock rows at a time through the staging block.
template <int L, typename T, typename TileT, typename Pack, typename Rows, typename Store>
inline __attribute__((always_inline)) void ell_item(const EllArgs& a, int64_t tile, int64_t r0, int64_t r1, void* buf,
                                                    bool pack, Pack pack_fn, Rows rows_fn, Store store_fn) {
  const int64_t b0 = tile * L, rows = std::min<int64_t>(L, a.batch - b0);
  TileT* t = static_cast<TileT*>(buf);
  if (pack) pack_fn(static_cast<const T*>(a.x) + b0 * a.n_in, a.n_in, rows, a.n_in, t);
  alignas(64) float stage[kBlock * L];
  T* y = static_cast<T*>(a.y) + b0 * a.n_out;
  for (int64_t o0 = r0; o0 < r1; o0 += kBlock) {
    const int64_t n = std::min(kBlock, r1 - o0);
    rows_fn(t, a.cols + o0 * a.k, a.values + o0 * a.k, a.k, n, stage);
    store_fn(stage, n, y + o0, a.n_out, rows);
  }
}

// Portable path: R = 2 rows at a time, 4-lane GCC/Clang vectors (NV = L/4 per row).
// One chunk, steps [t0, t1) of R rows, into acc (chains continue from acc's contents).
template <int L, int R>
inline __attribute__((always_inline)) void ell_chunk_portable(const float* tile, const int32_t* cols,
                                                              const float* values, int64_t k, int64_t t0,
                                                              int64_t t1, batch_tiles::vec4 (&acc)[R][L / 4]) {
  using batch_tiles::kVec;
  using batch_tiles::load_vec;
  using batch_tiles::vec4;
  for (int64_t t = t0; t < t1; ++t) {
    for (int r = 0; r < R; ++r) {
      const float* p = tile + int64_t(cols[r * k + t]) * L;
      const vec4 v = vec4{} + values[r * k + t];
      for (int i = 0; i < L / kVec; ++i) {
        vec4 xv;
        load_vec(xv, p + kVec * i);
        acc[r][i] += v * xv;
      }
    }
  }
}

// Portable path: R = 2 rows at a time, 4-lane GCC/Clang vectors (NV = L/4 per row); the block sums live in the
// stage (one span) or a scratch block, so the hot loop's accumulators keep the 16 xmm registers of SSE2.
template <int L, int R>
inline __attribute__((always_inline)) void ell_rows_portable_r(const float* tile, const int32_t* cols,
                                                               const float* values, int64_t k, float* stage) {
  using batch_tiles::kVec;
  using batch_tiles::load_vec;
  using batch_tiles::vec4;
  constexpr int NV = L / kVec;
  alignas(64) float scratch[R * L];
  for (int64_t s0 = 0; s0 < k; s0 += kSpan) {
    const int64_t s1 = std::min(k, s0 + kSpan);
    float* block = s0 == 0 ? stage : scratch;  // the first span's block is the total
    for (int64_t c0 = s0; c0 < s1; c0 += kChunk) {
      vec4 acc[R][NV] = {};
      ell_chunk_portable<L, R>(tile, cols, values, k, c0, std::min(s1, c0 + kChunk), acc);
      for (int r = 0; r < R; ++r) {
        for (int i = 0; i < NV; ++i) {
          vec4 b = acc[r][i];
          if (c0 != s0) {
            load_vec(b, block + r * L + kVec * i);
            b += acc[r][i];
          }
          std::memcpy(block + r * L + kVec * i, &b, sizeof(b));
        }
      }
    }
    if (s0 != 0) {
      for (int64_t e = 0; e < R * L; ++e) stage[e] += scratch[e];
    }
  }
}

template <int L>
inline __attribute__((always_inline)) void ell_rows_portable(const float* tile, const int32_t* cols,
                                                             const float* values, int64_t k, int64_t n, float* stage) {
  int64_t c = 0;
  for (; c + 2 <= n; c += 2) ell_rows_portable_r<L, 2>(tile, cols + c * k, values + c * k, k, stage + c * L);
  for (; c < n; ++c) ell_rows_portable_r<L, 1>(tile, cols + c * k, values + c * k, k, stage + c * L);
}

constexpr int kPL = batch_tiles::kPortableLanes;
#define SPARSEKERN_ELL_SPMM_PORTABLE(NAME, T)                                                                  \
  void NAME(const EllArgs& a, int64_t tile, int64_t r0, int64_t r1, void* buf, bool pack) {                   \
    ell_item<kPL, T, float>(a, tile, r0, r1, buf, pack, batch_tiles::pack_tile_portable<kPL, T>,               \
                            ell_rows_portable<kPL>, batch_tiles::store_block_portable<kPL, T>);                \
  }
SPARSEKERN_ELL_SPMM_PORTABLE(ell_item_portable_f32, float)
SPARSEKERN_ELL_SPMM_PORTABLE(ell_item_portable_bf16, c10::BFloat16)
SPARSEKERN_ELL_SPMM_PORTABLE(ell_item_portable_f16, c10::Half)

#if defined(SPARSEKERN_BATCH_TILES_AVX2)
// One chunk of R rows (cols, values at its first step; rows k apart), n steps: R * NV chains from +0.0 in
// registers, then onto the block sums in memory (`first`: the chunk is its block's start, stored as is: 0 + s == s
// bit for bit). Offset pointers and a count, not a [t0, t1) range: with the range GCC ran out of general registers
// and reloaded the rows' column pointers from the stack on every step (~10% at B = 16). (Not inlined, GCC kept the
// accumulators in memory: slower still.)
template <int L, typename TileT, int R>
SPARSEKERN_AVX2 inline __attribute__((always_inline)) void ell_chunk_avx2(const TileT* tile, const int32_t* cols,
                                                                         const float* values, int64_t k, int64_t n,
                                                                         float* block, bool first) {
  using Lanes = batch_tiles::LanesAvx2<L, TileT>;
  constexpr int NV = Lanes::NV;
  __m256 acc[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int i = 0; i < NV; ++i) acc[r][i] = _mm256_setzero_ps();
  }
#pragma GCC unroll 2
  for (int64_t t = 0; t < n; ++t) {
    for (int r = 0; r < R; ++r) {
      __m256 xv[NV];
      Lanes::load(tile + int64_t(cols[r * k + t]) * L, xv);
      const __m256 v = _mm256_broadcast_ss(values + r * k + t);
      for (int i = 0; i < NV; ++i) acc[r][i] = _mm256_fmadd_ps(v, xv[i], acc[r][i]);
    }
  }
  if (!first) {
    for (int r = 0; r < R; ++r) {
      for (int i = 0; i < NV; ++i) acc[r][i] = _mm256_add_ps(_mm256_load_ps(block + r * L + 8 * i), acc[r][i]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int i = 0; i < NV; ++i) _mm256_store_ps(block + r * L + 8 * i, acc[r][i]);
  }
}

// R rows at once, NV = L/8 accumulators each: R * NV = 8 chains, with the NV loaded lanes and the broadcast at
// most 13 of the 16 ymm registers (tiles of at most 32 lanes), so no room for the block sums: they live in the
// stage for the first kSpan nonzeros (then they are the total) and in a scratch block for later spans, added onto
// the stage once per span.
template <int L, typename TileT, int R>
SPARSEKERN_AVX2 inline void ell_rows_avx2_r(const TileT* tile, const int32_t* cols, const float* values, int64_t k,
                                  float* stage) {
  using Lanes = batch_tiles::LanesAvx2<L, TileT>;
  constexpr int NV = Lanes::NV;
  alignas(64) float scratch[R * L];
  for (int64_t s0 = 0; s0 < k; s0 += kSpan) {
    const int64_t s1 = std::min(k, s0 + kSpan);
    float* block = s0 == 0 ? stage : scratch;
    for (int64_t c0 = s0; c0 < s1; c0 += kChunk) {
      ell_chunk_avx2<L, TileT, R>(tile, cols + c0, values + c0, k, std::min(s1, c0 + kChunk) - c0, block, c0 == s0);
    }
    if (s0 != 0) {
      for (int e = 0; e < R * L; e += 8) {
        _mm256_store_ps(stage + e, _mm256_add_ps(_mm256_load_ps(stage + e), _mm256_load_ps(scratch + e)));
      }
    }
  }
  if constexpr (!std::is_same_v<TileT, float>) {
    for (int r = 0; r < R; ++r) {
      __m256 t[NV];
      for (int i = 0; i < NV; ++i) t[i] = _mm256_load_ps(stage + r * L + 8 * i);
      Lanes::to_lane_order(t);
      for (int i = 0; i < NV; ++i) _mm256_store_ps(stage + r * L + 8 * i, t[i]);
    }
  }
}

template <int L, typename TileT>
SPARSEKERN_AVX2 inline void ell_rows_avx2(const TileT* tile, const int32_t* cols, const float* values, int64_t k,
                                          int64_t n, float* stage) {
  constexpr int R = 8 / batch_tiles::LanesAvx2<L, TileT>::NV;
  static_assert(R >= 1 && L <= 32, "at most 32 lanes: 8 accumulators, 4 loads and a broadcast in 16 ymm");
  int64_t c = 0;
  for (; c + R <= n; c += R) ell_rows_avx2_r<L, TileT, R>(tile, cols + c * k, values + c * k, k, stage + c * L);
  for (; c < n; ++c) ell_rows_avx2_r<L, TileT, 1>(tile, cols + c * k, values + c * k, k, stage + c * L);
}

template <int L, typename T>
SPARSEKERN_AVX2 void ell_item_avx2(const EllArgs& a, int64_t tile, int64_t r0, int64_t r1, void* buf, bool pack) {
  using TileT = batch_tiles::tile_t<T>;
  ell_item<L, T, TileT>(a, tile, r0, r1, buf, pack, batch_tiles::pack_tile_avx2<L, T, TileT>,
                        ell_rows_avx2<L, TileT>, batch_tiles::store_block_avx2<L, T>);
}
#endif

#if defined(SPARSEKERN_BATCH_TILES_AVX512)
SPARSEKERN_AVX512_DIAGNOSTICS_BEGIN
// One chunk of R rows, steps [t0, t1), into acc (the chains continue from acc's contents).
template <int L, typename TileT, int R>
SPARSEKERN_AVX512 inline __attribute__((always_inline)) void ell_chunk_avx512(
    const TileT* tile, const int32_t* cols, const float* values, int64_t k, int64_t t0, int64_t t1,
    __m512 (&acc)[R][batch_tiles::Lanes<L, TileT>::NV]) {
  using Lanes = batch_tiles::Lanes<L, TileT>;
#pragma GCC unroll 2
  for (int64_t t = t0; t < t1; ++t) {
    for (int r = 0; r < R; ++r) {
      __m512 xv[Lanes::NV];
      Lanes::load(tile + int64_t(cols[r * k + t]) * L, xv);
      const __m512 v = _mm512_set1_ps(values[r * k + t]);
      for (int i = 0; i < Lanes::NV; ++i) acc[r][i] = _mm512_fmadd_ps(v, xv[i], acc[r][i]);
    }
  }
}

// R rows at once, NV = L/16 zmm accumulators each: R * NV = 8 chains; the loads of later rows and steps issue
// while earlier ones wait on L2. The block sums take 8 more zmm registers (measured faster than keeping them in
// memory as the AVX2 path must); the first chunk of a block runs straight into them (chains from +0.0: the same
// bits as 0 + chunk), so a row of at most kChunk nonzeros costs nothing over one chain. Totals over several blocks
// (k > kSpan) live in the stage.
template <int L, typename TileT, int R>
SPARSEKERN_AVX512 inline void ell_rows_avx512_r(const TileT* tile, const int32_t* cols, const float* values,
                                                int64_t k, float* stage) {
  using Lanes = batch_tiles::Lanes<L, TileT>;
  constexpr int NV = Lanes::NV;
  for (int64_t s0 = 0; s0 < k; s0 += kSpan) {
    const int64_t s1 = std::min(k, s0 + kSpan);
    __m512 block[R][NV];
    for (int r = 0; r < R; ++r) {
      for (int i = 0; i < NV; ++i) block[r][i] = _mm512_setzero_ps();
    }
    ell_chunk_avx512<L, TileT, R>(tile, cols, values, k, s0, std::min(s1, s0 + kChunk), block);
    for (int64_t c0 = s0 + kChunk; c0 < s1; c0 += kChunk) {
      __m512 acc[R][NV];
      for (int r = 0; r < R; ++r) {
        for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_setzero_ps();
      }
      ell_chunk_avx512<L, TileT, R>(tile, cols, values, k, c0, std::min(s1, c0 + kChunk), acc);
      for (int r = 0; r < R; ++r) {
        for (int i = 0; i < NV; ++i) block[r][i] = _mm512_add_ps(block[r][i], acc[r][i]);
      }
    }
    if (s0 == 0 && s1 == k) {  // one block (k <= kSpan, the common case): it is the total
      for (int r = 0; r < R; ++r) {
        Lanes::to_lane_order(block[r]);
        for (int i = 0; i < NV; ++i) _mm512_store_ps(stage + r * L + 16 * i, block[r][i]);
      }
      return;
    }
    for (int r = 0; r < R; ++r) {
      for (int i = 0; i < NV; ++i) {
        float* tot = stage + r * L + 16 * i;
        _mm512_store_ps(tot, s0 == 0 ? block[r][i] : _mm512_add_ps(_mm512_load_ps(tot), block[r][i]));
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    __m512 t[NV];
    for (int i = 0; i < NV; ++i) t[i] = _mm512_load_ps(stage + r * L + 16 * i);
    Lanes::to_lane_order(t);
    for (int i = 0; i < NV; ++i) _mm512_store_ps(stage + r * L + 16 * i, t[i]);
  }
}

template <int L, typename TileT>
SPARSEKERN_AVX512 inline void ell_rows_avx512(const TileT* tile, const int32_t* cols, const float* values, int64_t k,
                                              int64_t n, float* stage) {
  constexpr int R = 8 / batch_tiles::Lanes<L, TileT>::NV;
  int64_t c = 0;
  for (; c + R <= n; c += R) ell_rows_avx512_r<L, TileT, R>(tile, cols + c * k, values + c * k, k, stage + c * L);
  for (; c < n; ++c) ell_rows_avx512_r<L, TileT, 1>(tile, cols + c * k, values + c * k, k, stage + c * L);
}

template <int L, typename T>
SPARSEKERN_AVX512 void ell_item_avx512(const EllArgs& a, int64_t tile, int64_t r0, int64_t r1, void* buf, bool pack) {
  using TileT = batch_tiles::tile_t<T>;
  ell_item<L, T, TileT>(a, tile, r0, r1, buf, pack, batch_tiles::pack_tile_avx512<L, T, TileT>,
                        ell_rows_avx512<L, TileT>, batch_tiles::store_block_avx512<L, T>);
  _mm_sfence();  // the streamed write-back is visible before the worker reports done
}
SPARSEKERN_AVX512_DIAGNOSTICS_END
#endif

// ---------------------------------------------------------------------------------------------------------------
// Batches of one or two rows (B <= kGatherBatch): a batch tile would be mostly padding lanes, every nonzero
// loading a 64-byte run of which B values count. Instead x stays row-major (fp32; bf16/fp16 widened once into a
// scratch copy of B x n_in, which sits in L1/L2) and each nonzero's input is a scalar load: three loads and B
// FMAs per nonzero. (The vector gathers were 2-3x slower on Zen 4: a 16-lane vgatherdps costs about as much as 16
// scalar loads, plus its latency in the accumulator chain.) Lane u of a row sums the nonzeros t = u, u + 4, ...
// (four independent chains from +0, for the FMA latency) within chunks of kChunk nonzeros, added as
// (0 + 2) + (1 + 3) into the chunk's sum, then the chunks into blocks and the total as the tile paths do. The
// AVX2 and AVX-512 paths are the same scalar code with fused multiply-adds (the same bits); the portable one
// rounds each product.
// Measured on Zen 4 (1024x1024, k=102, one thread): 131 us at B=1 against 195 us for a 16-lane tile, but 209 us
// at B=4 and 364 us at B=8 against 163-179 us for the tile at B=9..16: from 3 rows on the tile is cheaper.
constexpr int64_t kGatherBatch = 2;
constexpr int kGatherRows = 4;  // batch rows per pass over a row's index

struct GatherArgs {
  const float* x;  // (batch, n_in) fp32
  void* y;
  const int32_t* cols;
  const float* values;
  int64_t batch, n_in, n_out, k;
};

// Scalar code on purpose: GCC would otherwise turn the four lanes into (slow) vector gathers.
#pragma GCC push_options
#pragma GCC optimize("no-tree-vectorize")

template <bool kFma>
inline __attribute__((always_inline)) float mad(float w, float x, float acc) {
  if constexpr (kFma) {
    return __builtin_fmaf(w, x, acc);
  } else {
    return w * x + acc;  // (never contracted: the portable path is compiled for the x86-64 baseline)
  }
}

template <typename T, int NB, bool kFma>
inline __attribute__((always_inline)) void gather_rows_nb(const GatherArgs& a, int64_t b0, int64_t o0, int64_t o1) {
  T* y = static_cast<T*>(a.y);
  const float* x = a.x + b0 * a.n_in;
  const int64_t k = a.k, n_in = a.n_in;
  for (int64_t o = o0; o < o1; ++o) {
    float total[NB] = {};
    const int32_t* c = a.cols + o * k;
    const float* v = a.values + o * k;
    for (int64_t s0 = 0; s0 < k; s0 += kSpan) {
      const int64_t s1 = std::min(k, s0 + kSpan);
      float block[NB] = {};
      for (int64_t c0 = s0; c0 < s1; c0 += kChunk) {
        const int64_t stop = std::min(s1, c0 + kChunk);
        float acc[NB][4] = {};
        int64_t t = c0;
        for (; t + 4 <= stop; t += 4) {
          for (int u = 0; u < 4; ++u) {
            const int64_t col = c[t + u];
            const float w = v[t + u];
            for (int b = 0; b < NB; ++b) acc[b][u] = mad<kFma>(w, x[b * n_in + col], acc[b][u]);
          }
        }
        for (int u = 0; t < stop; ++t, ++u) {
          const int64_t col = c[t];
          for (int b = 0; b < NB; ++b) acc[b][u] = mad<kFma>(v[t], x[b * n_in + col], acc[b][u]);
        }
        for (int b = 0; b < NB; ++b) block[b] += (acc[b][0] + acc[b][2]) + (acc[b][1] + acc[b][3]);
      }
      for (int b = 0; b < NB; ++b) total[b] += block[b];
    }
    for (int b = 0; b < NB; ++b) {
      y[(b0 + b) * a.n_out + o] = static_cast<T>(total[b]);
    }
  }
}

template <typename T, bool kFma>
inline __attribute__((always_inline)) void gather_rows_any(const GatherArgs& a, int64_t o0, int64_t o1) {
  for (int64_t b0 = 0; b0 < a.batch; b0 += kGatherRows) {
    switch (std::min<int64_t>(kGatherRows, a.batch - b0)) {
      case 1: gather_rows_nb<T, 1, kFma>(a, b0, o0, o1); break;
      case 2: gather_rows_nb<T, 2, kFma>(a, b0, o0, o1); break;
      case 3: gather_rows_nb<T, 3, kFma>(a, b0, o0, o1); break;
      default: gather_rows_nb<T, 4, kFma>(a, b0, o0, o1); break;
    }
  }
}

template <typename T>
void gather_rows_portable(const GatherArgs& a, int64_t o0, int64_t o1) {
  gather_rows_any<T, false>(a, o0, o1);
}

#if defined(SPARSEKERN_BATCH_TILES_AVX2)
template <typename T>
SPARSEKERN_AVX2 void gather_rows_avx2(const GatherArgs& a, int64_t o0, int64_t o1) {
  gather_rows_any<T, true>(a, o0, o1);
}
#endif

#if defined(SPARSEKERN_BATCH_TILES_AVX512)
template <typename T>
SPARSEKERN_AVX512 void gather_rows_avx512(const GatherArgs& a, int64_t o0, int64_t o1) {
  gather_rows_any<T, true>(a, o0, o1);
}
#endif

#pragma GCC pop_options

template <typename T>
void (*gather_kernel())(const GatherArgs&, int64_t, int64_t) {
#if defined(SPARSEKERN_BATCH_TILES_AVX512)
  if (cpu_isa() == CpuIsa::kAvx512) return gather_rows_avx512<T>;
#endif
#if defined(SPARSEKERN_BATCH_TILES_AVX2)
  if (cpu_isa() == CpuIsa::kAvx2) return gather_rows_avx2<T>;
#endif
  return gather_rows_portable<T>;
}

using ItemFn = void (*)(const EllArgs&, int64_t, int64_t, int64_t, void*, bool);

template <typename T>
std::pair<ItemFn, int> ell_spmm_kernel(int64_t n_in, int64_t batch) {
  using TileT = batch_tiles::tile_t<T>;
#if defined(SPARSEKERN_BATCH_TILES_AVX512)
  if (cpu_isa() == CpuIsa::kAvx512) {
    return batch_tiles::kernel_for_lanes<TileT, ItemFn, 64>(
        n_in, batch, [](auto l) -> ItemFn { return ell_item_avx512<l.value, T>; });
  }
#endif
#if defined(SPARSEKERN_BATCH_TILES_AVX2)
  if (cpu_isa() == CpuIsa::kAvx2) {
    return batch_tiles::kernel_for_lanes<TileT, ItemFn, 32>(
        n_in, batch, [](auto l) -> ItemFn { return ell_item_avx2<l.value, T>; });
  }
#endif
  return {batch_tiles::by_dtype<T>(ell_item_portable_f32, ell_item_portable_bf16, ell_item_portable_f16), kPL};
}

}  // namespace

at::Tensor ell_spmm_cpu(const at::Tensor& x, const at::Tensor& cols, const at::Tensor& values) {
  batch_tiles::check_activation("ell_spmm", "x", x);
  const int64_t batch = x.size(0), n_in = x.size(1), n_out = cols.dim() == 2 ? cols.size(0) : 0;
  const int64_t k = ell::check_cols("ell_spmm", cols, -1, n_in);
  ell::check_values("ell_spmm", "values", values, cols, x.scalar_type());
  at::Tensor y = empty_cpu_output({batch, n_out}, x.options(), kGlibcMmapMax);
  if (batch == 0 || n_out == 0) return y;
  if (k == 0) return y.zero_();

  const at::Tensor values_f32 = values.to(at::kFloat);
  if (batch <= kGatherBatch) {
    const at::Tensor x_f32 = x.to(at::kFloat);
    const GatherArgs a{x_f32.data_ptr<float>(), y.data_ptr(), cols.data_ptr<int32_t>(), values_f32.data_ptr<float>(),
                       batch, n_in, n_out, k};
    batch_tiles::dispatch_dtype(x.scalar_type(), [&](auto tag) {
      const auto fn = gather_kernel<decltype(tag)>();
      const int64_t grain = std::max<int64_t>(16, (int64_t{1} << 14) / (k * batch));  // ~16K products per task
      at::parallel_for(0, n_out, grain, [&](int64_t o0, int64_t o1) { fn(a, o0, o1); });
    });
    return y;
  }
  EllArgs a{x.data_ptr(), y.data_ptr(), cols.data_ptr<int32_t>(), values_f32.data_ptr<float>(), batch, n_in, n_out, k};
  batch_tiles::dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto [fn, lanes] = ell_spmm_kernel<T>(n_in, batch);
    const batch_tiles::Split split = ell::split_rows(batch, lanes, n_out);
    const batch_tiles::WorkerBuffers bufs(split.workers, n_in * lanes);
    batch_tiles::for_each_item(split, [&](int64_t p, int64_t tile, int64_t r0, int64_t r1, bool new_tile) {
      fn(a, tile, r0, r1, bufs[p], new_tile);
    });
  });
  return y;
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("ell_spmm", &ell_spmm_cpu); }

}  // namespace sparsekern

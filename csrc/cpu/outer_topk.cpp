// outer_topk on the CPU: the k largest |g.T @ x| outside an excluded CSR pattern, without the dense scores.
//
// The (n_out, n_in) score matrix is cut into kMC x kNC tiles, one task each. A task computes its tile with a
// register-blocked GEMM over the batch (packed panels of g and x, MR x NR accumulators, the batch in blocks of
// KC rows that continue from the previous block's partial sums, so every score is summed over b in order), turns it
// into keys (outer_topk.h), and hands the keys at or above a threshold that are not excluded to its thread's
// collector. A collector that reaches its capacity keeps only its k largest ranks, which also raises its
// threshold; its k largest always contain the thread's share of the result, so the merge at the end is exact.
//
// The threshold starts from a sample: a few rows' scores are computed first, and the key that about 1.1 k
// candidates of the full matrix would reach is estimated from them, so most keys are dropped in the tile and the
// collectors stay near k entries in all. If fewer than k candidates reach the estimate, the pass is repeated with
// no threshold (exact either way; the sample only saves memory and time).
//
// Two arithmetics (outer_topk.h): "exact" multiplies and adds with two roundings (the bits of every backend);
// "fast" accumulates with fused multiply-adds, s = fma(g[b, o], x[b, i], s) for b in order, on AVX2 and AVX-512
// (the same bits on both, and for every thread count: each score is one chain in batch order whatever the tiling).
// The portable path has no FMA instruction on x86-64, so there "fast" runs the exact arithmetic.
//
// Why not hand the work to the BLAS torch uses (at::mm into a per-thread buffer, then the same selection)? Measured
// on the Zen 4 (one thread, 4096^2, a loaded machine, so +-20%): at::mm per 192-row stripe took 0.9x (B = 64) to
// 1.25x (B = 256) the time of these fused tiles, and per 192 x 256 tile 1.3x to 1.6x. No clear gain, and a BLAS
// may change its blocking with the thread count, the build or the inputs' alignment (MKL documents the last), which
// would break bit-equality across ranks in DDP; these kernels' bits depend on nothing but the inputs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "sparsekern/batch_tiles.h"
#include "sparsekern/outer_topk.h"
#include "sparsekern/outer_topk_checks.h"

// The exact scores are defined with a rounded product and a rounded sum (outer_topk.h): the compiler must not fuse
// them. The fast kernels fuse explicitly (fma_acc below), never by contraction.
#pragma GCC optimize("fp-contract=off")

namespace sparsekern {
namespace {

namespace ot = outer_topk;

constexpr int64_t kMC = 192;  // tile rows (a multiple of every MR): a batch block of g's stripe is 96 KiB, in L2
constexpr int64_t kNC = 256;  // tile columns (a multiple of every NR): the packed x block and the tile stay in L2

// Vectors of 16, 8 or 4 lanes. Packed panels and tile rows are float-aligned only, and a template argument loses a
// typedef's aligned(4), so the kernels move them with memcpy (unaligned vector moves).
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef float v4 __attribute__((vector_size(16), aligned(4)));

// v = {s, s, ...}: one broadcast instruction (a loop over the lanes compiles to one masked move per lane).
inline __attribute__((always_inline)) void splat(v16& v, float s) {
  v = v16{s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s};
}
inline __attribute__((always_inline)) void splat(v8& v, float s) { v = v8{s, s, s, s, s, s, s, s}; }
inline __attribute__((always_inline)) void splat(v4& v, float s) { v = v4{s, s, s, s}; }

// acc = a * b + acc with one rounding. The builtins expand in the target function the micro tile is inlined into
// (AVX2 or AVX-512 below), so a portable template can name them; references keep vectors out of the call ABI.
#if defined(SPARSEKERN_X86)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // the builtins' vector results never cross a call: always inlined
inline __attribute__((always_inline)) void fma_acc(v16& acc, const v16& a, const v16& b) {
  acc = reinterpret_cast<v16>(__builtin_ia32_vfmaddps512_mask(reinterpret_cast<__v16sf>(a),
                                                              reinterpret_cast<__v16sf>(b),
                                                              reinterpret_cast<__v16sf>(acc), -1, 4));
}
inline __attribute__((always_inline)) void fma_acc(v8& acc, const v8& a, const v8& b) {
  acc = reinterpret_cast<v8>(__builtin_ia32_vfmaddps256(reinterpret_cast<__v8sf>(a), reinterpret_cast<__v8sf>(b),
                                                        reinterpret_cast<__v8sf>(acc)));
}
#pragma GCC diagnostic pop
#endif

// acc[r][j] += a[p][r] * b[p][j] for p in [0, kc), from zero (first block) or from the partial sums in c (row
// stride kNC): MR rows of g times NV vectors of W lanes of x. kFused: one fused multiply-add per step, else a
// rounded product and a rounded sum.
template <typename V, int MR, int NV, bool kFused>
inline __attribute__((always_inline)) void micro_tile(const float* __restrict a, const float* __restrict b,
                                                      float* __restrict c, int64_t kc, bool first) {
  constexpr int W = sizeof(V) / sizeof(float), NR = NV * W;
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      acc[r][j] = V{};
      if (!first) std::memcpy(&acc[r][j], c + r * kNC + W * j, sizeof(V));
    }
  }
  for (int64_t p = 0; p < kc; ++p) {
    V bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) std::memcpy(&bv[j], b + p * NR + W * j, sizeof(V));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      V av;
      splat(av, a[p * MR + r]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) {
        if constexpr (kFused) {
          fma_acc(acc[r][j], av, bv[j]);
        } else {
          acc[r][j] += av * bv[j];  // vmulps then vaddps: fp-contract is off
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) std::memcpy(c + r * kNC + W * j, &acc[r][j], sizeof(V));
  }
}

// One batch block of a tile: c (kMC x kNC, row stride kNC) from the packed panels.
template <typename V, int MR, int NV, bool kFused>
inline __attribute__((always_inline)) void tile_block_body(const float* ap, const float* bp, float* c,
                                                           int64_t m_panels, int64_t n_panels, int64_t kc,
                                                           bool first) {
  constexpr int64_t NR = NV * static_cast<int64_t>(sizeof(V) / sizeof(float));
  for (int64_t np = 0; np < n_panels; ++np) {  // x's micro panel stays in L1 while g's stream from L2
    for (int64_t mp = 0; mp < m_panels; ++mp) {
      micro_tile<V, MR, NV, kFused>(ap + mp * kc * MR, bp + np * kc * NR, c + mp * MR * kNC + np * NR, kc, first);
    }
  }
}

using TileBlockFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, bool);

// A compiled tile kernel, the panel shapes it reads (kMC and kNC are multiples of mr and nr) and its batch block kc:
// one micro panel of x (kc x nr floats) takes at most half of L1's 32 KiB, so g's panels streaming past it from L2
// do not evict it.
struct Kernel {
  TileBlockFn tile_block;
  int64_t mr, nr, kc;
};

#define SPARSEKERN_OT_TILE_BLOCK(NAME, ATTR, V, MR, NV, FUSED)                                                    \
  ATTR void NAME(const float* ap, const float* bp, float* c, int64_t m_panels, int64_t n_panels, int64_t kc, \
                 bool first) {                                                                               \
    tile_block_body<V, MR, NV, FUSED>(ap, bp, c, m_panels, n_panels, kc, first);                             \
  }
// Register budgets: AVX-512 has 32 zmm (24 accumulators of 6 x 64, 4 x vectors, a broadcast); AVX2 has 16 ymm:
// fused 6 x 16 (12 accumulators, 2 x vectors, a broadcast), exact 4 x 16 (8 accumulators: each step also needs a
// product register); the portable path (SSE2's 16 xmm) 4 x 8.
SPARSEKERN_OT_TILE_BLOCK(tile_block_baseline, , v4, 4, 2, false)
#if defined(SPARSEKERN_X86)
SPARSEKERN_OT_TILE_BLOCK(tile_block_avx2_exact, SPARSEKERN_AVX2, v8, 4, 2, false)
SPARSEKERN_OT_TILE_BLOCK(tile_block_avx2_fast, SPARSEKERN_AVX2, v8, 6, 2, true)
SPARSEKERN_OT_TILE_BLOCK(tile_block_avx512_exact, SPARSEKERN_AVX512, v16, 6, 4, false)
SPARSEKERN_OT_TILE_BLOCK(tile_block_avx512_fast, SPARSEKERN_AVX512, v16, 6, 4, true)
#endif
#undef SPARSEKERN_OT_TILE_BLOCK

Kernel tile_kernel(bool fast) {
#if defined(SPARSEKERN_X86)
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: return {fast ? tile_block_avx512_fast : tile_block_avx512_exact, 6, 64, 64};
    case CpuIsa::kAvx2:
      return fast ? Kernel{tile_block_avx2_fast, 6, 16, 128} : Kernel{tile_block_avx2_exact, 4, 16, 128};
    default: break;
  }
#endif
  return {tile_block_baseline, 4, 8, 128};  // no FMA on the portable path: fast computes the exact scores
}

struct Problem {
  const void* x;
  const void* g;
  int64_t batch, n_in, n_out;
  const int64_t* row_ptr;
  const int32_t* col_idx;
  const int64_t* rows;  // the score rows to compute (a sample), or nullptr: all n_out rows
  int64_t n_rows;
  Kernel kernel;
};

// A thread's candidates as ranks (outer_topk.h). Keys below min_key, or ranks below floor, cannot be in the
// result; floor rises to the thread's k-th largest rank each time the buffer reaches its capacity.
struct Collector {
  std::vector<uint64_t> ranks;
  int64_t k = 0, cap = 0;
  uint64_t floor = 0;
  uint32_t min_key = 0;
  bool nan = false;

  // `reserve` entries are reserved up front: address space only (pages count once written), so a buffer that
  // stays within its expected size is never copied to grow.
  void reset(int64_t k_, int64_t cap_, uint32_t min_key_, int64_t reserve) {
    k = k_;
    cap = cap_;
    floor = 0;
    min_key = min_key_;
    nan = false;
    ranks = {};
    ranks.reserve(static_cast<size_t>(std::min(cap, reserve)));
  }

  void push(uint64_t rank) {
    if (rank < floor) return;
    ranks.push_back(rank);
    if (static_cast<int64_t>(ranks.size()) >= cap) {
      std::nth_element(ranks.begin(), ranks.begin() + (k - 1), ranks.end(), std::greater<uint64_t>());
      ranks.resize(static_cast<size_t>(k));
      floor = *std::min_element(ranks.begin(), ranks.end());
      min_key = std::max(min_key, ot::rank_key(floor));
    }
  }
};

template <typename T>
void pack_g(const Problem& p, int64_t r0, int64_t b0, int64_t kc, float* ap) {
  const T* g = static_cast<const T*>(p.g);
  const int64_t height = std::min(kMC, p.n_rows - r0), mr = p.kernel.mr;
  if (p.rows == nullptr && height == kMC) {  // the common case: kMC contiguous rows, no padding
    for (int64_t q = 0; q < kc; ++q) {
      const T* src = g + (b0 + q) * p.n_out + r0;
      for (int64_t mp = 0; mp < kMC / mr; ++mp) {
        float* dst = ap + mp * kc * mr + q * mr;
        for (int64_t rr = 0; rr < mr; ++rr) dst[rr] = static_cast<float>(src[mp * mr + rr]);
      }
    }
    return;
  }
  for (int64_t q = 0; q < kc; ++q) {
    const T* src = g + (b0 + q) * p.n_out;
    for (int64_t r = 0; r < kMC; ++r) {
      const float v = r < height ? static_cast<float>(src[p.rows ? p.rows[r0 + r] : r0 + r]) : 0.f;
      ap[r / mr * kc * mr + q * mr + r % mr] = v;
    }
  }
}

template <typename T>
void pack_x(const Problem& p, int64_t i0, int64_t b0, int64_t kc, float* bp) {
  const T* x = static_cast<const T*>(p.x);
  const int64_t nr = p.kernel.nr;
  for (int64_t np = 0; np < kNC / nr; ++np) {
    float* panel = bp + np * kc * nr;
    const int64_t c0 = i0 + np * nr, width = std::clamp<int64_t>(p.n_in - c0, 0, nr);
    if (width == 0) break;  // the micro tiles stop at the last panel holding columns
    for (int64_t q = 0; q < kc; ++q) {
      const T* src = x + (b0 + q) * p.n_in + c0;
      float* dst = panel + q * nr;
      if (width == nr) {
        for (int64_t j = 0; j < nr; ++j) dst[j] = static_cast<float>(src[j]);
      } else {
        for (int64_t j = 0; j < width; ++j) dst[j] = static_cast<float>(src[j]);
        for (int64_t j = width; j < nr; ++j) dst[j] = 0.f;
      }
    }
  }
}

// Bit j of the result: key j of the n <= 32 scores' bits reaches min_key. A full block of 32 takes 8 SSE2
// compares (every x86-64 CPU has them; keys and min_key are below 2**31, so a signed compare orders them).
template <int64_t N>
inline uint32_t keys_at_least(const uint32_t* bits, int64_t n, uint32_t min_key) {
  uint32_t mask = 0;
#if defined(__SSE2__)
  if constexpr (N == 32) {
    const __m128i magnitude = _mm_set1_epi32(0x7FFFFFFF), below = _mm_set1_epi32(static_cast<int32_t>(min_key) - 1);
    for (int q = 0; q < 8; ++q) {
      const __m128i keys = _mm_and_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bits + 4 * q)), magnitude);
      const int passed = _mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(keys, below)));
      mask |= static_cast<uint32_t>(passed) << (4 * q);
    }
    return mask;
  }
#endif
  for (int64_t j = 0; j < (N ? N : n); ++j) mask |= uint32_t{ot::key_of_bits(bits[j]) >= min_key} << j;
  return mask;
}

// Keys of one computed tile row (score row o, columns [i0, i0 + width)) into the collector. Each block of 32 keys
// is compared with the threshold at once (most fail), and only the set bits of the result are visited: exclusion
// and NaN are looked at only for keys that pass, walking the row's sorted excluded columns alongside.
void collect_row(const Problem& p, int64_t o, int64_t i0, int64_t width, const float* tile_row, Collector& out) {
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(tile_row);
  const int64_t end = p.row_ptr[o + 1], base = o * p.n_in + i0;
  int64_t e = ot::lower_bound(p.col_idx, p.row_ptr[o], end, i0);
  for (int64_t j0 = 0; j0 < width; j0 += 32) {
    uint32_t pass = width - j0 >= 32 ? keys_at_least<32>(bits + j0, 32, out.min_key)
                                     : keys_at_least<0>(bits + j0, width - j0, out.min_key);
    for (; pass != 0; pass &= pass - 1) {
      const int64_t j = j0 + __builtin_ctz(pass);
      const uint32_t key = ot::key_of_bits(bits[j]);
      if (key < out.min_key) continue;  // a push since the block's test raised the threshold
      while (e < end && p.col_idx[e] < i0 + j) ++e;
      if (e < end && p.col_idx[e] == i0 + j) continue;  // excluded
      if (key > ot::kInfKey) {
        out.nan = true;
        continue;
      }
      out.push(ot::rank_of(key, base + j));
    }
  }
}

// Computes every tile of p's rows and feeds its keys to the calling thread's collector. Threads take tiles one at a
// time from a shared counter (a thread slowed by other processes on its core takes fewer), in row-stripe order, so
// a thread packs g's stripe (kMC rows, the whole batch: the broadcast operand, whose packing is a transpose) once
// per stripe and reuses it for the tiles beside it; x's block is packed per tile, as contiguous runs of nr.
template <typename T>
void run_tiles(const Problem& p, std::vector<Collector>& collectors) {
  const int64_t n_mb = (p.n_rows + kMC - 1) / kMC, n_nb = (p.n_in + kNC - 1) / kNC, n_tiles = n_mb * n_nb;
  const int64_t kKC = p.kernel.kc;
  const int64_t n_kb = std::max<int64_t>(1, (p.batch + kKC - 1) / kKC);  // an empty batch: one block of zeros
  std::atomic<int64_t> next{0};
  const TileBlockFn tile_block = p.kernel.tile_block;
  const int64_t mr = p.kernel.mr, nr = p.kernel.nr;
  at::parallel_for(0, static_cast<int64_t>(collectors.size()), 1, [&](int64_t, int64_t) {
    Collector& out = collectors[at::get_thread_num()];
    std::vector<float> gs, xb, tile;
    int64_t packed = -1;
    for (int64_t t = next++; t < n_tiles; t = next++) {
      if (gs.empty()) {  // only threads that get a tile allocate
        gs.resize(kMC * kKC * n_kb);
        xb.resize(kNC * kKC);
        tile.resize(kMC * kNC);
      }
      const int64_t r0 = t / n_nb * kMC, i0 = t % n_nb * kNC;
      const int64_t width = std::min(kNC, p.n_in - i0), height = std::min(kMC, p.n_rows - r0);
      const int64_t m_panels = (height + mr - 1) / mr, n_panels = (width + nr - 1) / nr;
      if (packed != r0) {
        for (int64_t kb = 0; kb < n_kb; ++kb) {
          pack_g<T>(p, r0, kb * kKC, std::min(kKC, p.batch - kb * kKC), gs.data() + kb * kKC * kMC);
        }
        packed = r0;
      }
      for (int64_t kb = 0; kb < n_kb; ++kb) {
        const int64_t b0 = kb * kKC, kc = std::min(kKC, p.batch - b0);
        pack_x<T>(p, i0, b0, kc, xb.data());
        tile_block(gs.data() + kb * kKC * kMC, xb.data(), tile.data(), m_panels, n_panels, kc, kb == 0);
      }
      for (int64_t r = 0; r < height; ++r) {
        const int64_t o = p.rows ? p.rows[r0 + r] : r0 + r;
        collect_row(p, o, i0, width, tile.data() + r * kNC, out);
      }
    }
  });
}

// The rank-th largest key held by the collectors (1 <= rank <= entries): two radix histograms (outer_topk.h).
uint32_t key_at_rank(const std::vector<Collector>& collectors, int64_t rank) {
  std::vector<int64_t> counts(ot::kHiBins);
  for (const auto& c : collectors) {
    for (const uint64_t r : c.ranks) ++counts[ot::rank_key(r) >> ot::kLoBits];
  }
  int64_t above = 0, above_lo = 0;
  const uint32_t hi = static_cast<uint32_t>(ot::select_bucket(counts.data(), ot::kHiBins, rank, &above));
  counts.assign(ot::kLoBins, 0);
  for (const auto& c : collectors) {
    for (const uint64_t r : c.ranks) {
      const uint32_t key = ot::rank_key(r);
      if (key >> ot::kLoBits == hi) ++counts[key & (ot::kLoBins - 1)];
    }
  }
  const int lo = ot::select_bucket(counts.data(), ot::kLoBins, rank - above, &above_lo);
  return hi << ot::kLoBits | static_cast<uint32_t>(lo);
}

// The key that about 1.1 k of the n_candidates candidates reach, estimated from a sample of rows; 0 (keep every
// key) when the sample would be a large part of the work or k is a large part of the candidates.
template <typename T>
uint32_t estimate_threshold(const Problem& full, int64_t k, int64_t n_candidates, std::vector<Collector>& collectors) {
  constexpr int64_t kSamplePositions = 1 << 18;  // 64 rows of 4096: 1.6% of the work there
  const int64_t n_rows = std::min(full.n_out / 32, std::max<int64_t>(1, kSamplePositions / full.n_in));
  if (n_rows < 4 || 4 * k > n_candidates) return 0;
  std::vector<int64_t> rows(static_cast<size_t>(n_rows));
  for (int64_t j = 0; j < n_rows; ++j) rows[j] = (2 * j + 1) * full.n_out / (2 * n_rows);  // evenly spread
  Problem p = full;
  p.rows = rows.data();
  p.n_rows = n_rows;
  for (auto& c : collectors) c.reset(INT64_MAX, INT64_MAX, 0, n_rows * full.n_in);
  run_tiles<T>(p, collectors);
  int64_t size = 0;
  for (const auto& c : collectors) size += static_cast<int64_t>(c.ranks.size());
  const double expected = static_cast<double>(k) * static_cast<double>(size) / static_cast<double>(n_candidates);
  const int64_t rank = static_cast<int64_t>(std::ceil(1.1 * expected + 4.0 * std::sqrt(expected) + 32.0));
  return rank > size ? 0 : key_at_rank(collectors, rank);
}

// ranks sorted descending: an LSD radix sort of ~rank in 11-bit digits (stable, so the passes compose), skipping
// the digits every entry shares (the high key bits, above the threshold). About 5x faster than std::sort at the
// ~k / threads entries of a collector, where the sort was a visible part of a small-batch grow.
void sort_descending(std::vector<uint64_t>& ranks) {
  const size_t n = ranks.size();
  if (n < 2048) {
    std::sort(ranks.begin(), ranks.end(), std::greater<uint64_t>());
    return;
  }
  constexpr int kDigitBits = 11;
  constexpr uint64_t kDigits = uint64_t{1} << kDigitBits;
  std::vector<uint64_t> scratch(n);
  uint64_t* src = ranks.data();
  uint64_t* dst = scratch.data();
  std::vector<size_t> offset(kDigits);
  for (int shift = 0; shift < 64; shift += kDigitBits) {
    std::fill(offset.begin(), offset.end(), 0);
    for (size_t i = 0; i < n; ++i) ++offset[(~src[i] >> shift) & (kDigits - 1)];
    if (offset[(~src[0] >> shift) & (kDigits - 1)] == n) continue;  // one digit value: the order stands
    size_t sum = 0;
    for (auto& o : offset) sum += std::exchange(o, sum);
    for (size_t i = 0; i < n; ++i) dst[offset[(~src[i] >> shift) & (kDigits - 1)]++] = src[i];
    std::swap(src, dst);
  }
  if (src != ranks.data()) std::memcpy(ranks.data(), src, n * sizeof(uint64_t));
}

// Fills index and score with the k largest ranks of all candidates, by rank descending.
template <typename T>
void select_top(const Problem& p, int64_t k, int64_t n_candidates, int64_t* index, float* score) {
  std::vector<Collector> collectors(static_cast<size_t>(std::max(1, at::get_num_threads())));
  const int64_t cap = 2 * k + 4096;
  for (uint32_t min_key = estimate_threshold<T>(p, k, n_candidates, collectors);;) {
    const int64_t share = cap / static_cast<int64_t>(collectors.size()) + 4096;  // about what a thread keeps
    for (auto& c : collectors) c.reset(k, cap, min_key, share);
    run_tiles<T>(p, collectors);
    int64_t kept = 0;
    for (auto& c : collectors) {
      TORCH_CHECK_VALUE(!c.nan, "outer_topk: a score overflowed float32 to NaN (inf - inf); scale x or g down");
      kept += static_cast<int64_t>(c.ranks.size());
    }
    // Every key at or above min_key was kept (or dropped below a collector's k largest): exact when k reached it.
    if (kept >= k || min_key == 0) break;
    min_key = 0;
  }
  // Each collector's k largest, sorted, then merged straight into the outputs: no buffer of all candidates.
  at::parallel_for(0, static_cast<int64_t>(collectors.size()), 1, [&](int64_t begin, int64_t stop) {
    for (int64_t t = begin; t < stop; ++t) {
      auto& ranks = collectors[t].ranks;
      if (static_cast<int64_t>(ranks.size()) > k) {
        std::nth_element(ranks.begin(), ranks.begin() + (k - 1), ranks.end(), std::greater<uint64_t>());
        ranks.resize(static_cast<size_t>(k));
      }
      sort_descending(ranks);
    }
  });
  std::vector<size_t> head(collectors.size(), 0);
  for (int64_t j = 0; j < k; ++j) {
    size_t best = collectors.size();
    for (size_t t = 0; t < collectors.size(); ++t) {
      if (head[t] < collectors[t].ranks.size() &&
          (best == collectors.size() || collectors[t].ranks[head[t]] > collectors[best].ranks[head[best]])) {
        best = t;
      }
    }
    // The exclusion was checked strictly ascending per row, so n_candidates is exact and k keys were kept.
    TORCH_INTERNAL_ASSERT(best < collectors.size(), "outer_topk: fewer candidates kept than k");
    const uint64_t rank = collectors[best].ranks[head[best]++];
    index[j] = ot::rank_index(rank);
    const uint32_t key = ot::rank_key(rank);
    std::memcpy(score + j, &key, sizeof(key));
  }
}

// Whether no element of a float32, bfloat16 or float16 tensor is inf or NaN: its exponent bits are not all set.
// One pass in blocks with an early exit (the Python layer leaves this check to the kernel on the CPU: one
// sequential read of x and g instead of several parallel regions and temporaries).
template <typename T>
bool all_finite(const at::Tensor& t) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>;
  constexpr Bits kExponent = std::is_same_v<T, float> ? Bits(0x7F800000u)
                             : std::is_same_v<T, c10::BFloat16> ? Bits(0x7F80u)
                                                                 : Bits(0x7C00u);
  const Bits* bits = static_cast<const Bits*>(t.data_ptr());
  const int64_t n = t.numel();
  for (int64_t i0 = 0; i0 < n; i0 += 4096) {
    bool bad = false;
    for (int64_t i = i0; i < std::min(n, i0 + 4096); ++i) bad |= (bits[i] & kExponent) == kExponent;
    if (bad) return false;
  }
  return true;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> outer_topk_cpu(const at::Tensor& x, const at::Tensor& g, int64_t k,
                                                  const at::Tensor& row_ptr, const at::Tensor& col_idx, bool fast) {
  constexpr const char* fn = "outer_topk";
  batch_tiles::check_activation(fn, "x", x);
  batch_tiles::check_activation(fn, "g", g);
  ot::check_sizes(fn, x, g);
  const int64_t batch = x.size(0), n_in = x.size(1), n_out = g.size(1);
  const int64_t nnz = batch_tiles::check_csr(fn, row_ptr, col_idx, n_out, n_in);
  const int64_t n_candidates = n_out * n_in - nnz;
  ot::check_k(fn, k, n_candidates);
  at::Tensor index = at::empty({k}, x.options().dtype(at::kLong));
  at::Tensor score = at::empty({k}, x.options().dtype(at::kFloat));
  if (k == 0) return {index, score};

  const Problem p{x.data_ptr(), g.data_ptr(), batch, n_in, n_out, row_ptr.data_ptr<int64_t>(), col_idx.data_ptr<int32_t>(),
                  nullptr,      n_out,        tile_kernel(fast)};
  batch_tiles::dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    TORCH_CHECK_VALUE(all_finite<T>(x), fn, ": x must be finite, got inf or NaN");
    TORCH_CHECK_VALUE(all_finite<T>(g), fn, ": g must be finite, got inf or NaN");
    select_top<T>(p, k, n_candidates, index.data_ptr<int64_t>(), score.data_ptr<float>());
  });
  return {index, score};
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("outer_topk", &outer_topk_cpu); }

}  // namespace sparsekern

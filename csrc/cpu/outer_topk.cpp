// outer_topk on the CPU: the k largest |g.T @ x| outside an excluded CSR pattern, without the dense scores.
//
// The (n_out, n_in) score matrix is cut into kMC x kNC tiles, one task each. A task computes its tile with a
// register-blocked GEMM over the batch (packed panels of g and x, kMR x kNR accumulators, the batch in blocks of
// kKC that continue from the previous block's partial sums, so every score is summed over b in order), turns it
// into keys (outer_topk.h), and hands the keys at or above a threshold that are not excluded to its thread's
// collector. A collector that reaches its capacity keeps only its k largest ranks, which also raises its
// threshold; its k largest always contain the thread's share of the result, so the merge at the end is exact.
//
// The threshold starts from a sample: a few rows' scores are computed first, and the key that about 1.1 k
// candidates of the full matrix would reach is estimated from them, so most keys are dropped in the tile and the
// collectors stay near k entries in all. If fewer than k candidates reach the estimate, the pass is repeated with
// no threshold (exact either way; the sample only saves memory and time).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "sparsekern/batch_tiles.h"
#include "sparsekern/outer_topk.h"
#include "sparsekern/outer_topk_checks.h"

// Scores are defined with a rounded product and a rounded sum (outer_topk.h): the compiler must not fuse them.
#pragma GCC optimize("fp-contract=off")

namespace sparsekern {
namespace {

namespace ot = outer_topk;

constexpr int64_t kMR = 6;    // g rows per micro tile: 6 x 4 accumulator registers
constexpr int64_t kNR = 64;   // x columns per micro tile: four 16-lane vectors
constexpr int64_t kMC = 192;  // tile rows (32 micro panels): a batch block of g's stripe is 96 KiB, in L2
constexpr int64_t kNC = 256;  // tile columns: the packed x block (128 KiB) and the tile (192 KiB) stay in L2
constexpr int64_t kKC = 128;  // batch rows per block: one micro panel of x (kKC x kNR) fills L1's 32 KiB

typedef float v16 __attribute__((vector_size(64), aligned(4)));  // unaligned loads and stores

// acc[r][j] += a[p][r] * b[p][j] for p in [0, kc), from zero (first block) or from the partial sums in c.
inline __attribute__((always_inline)) void micro_tile(const float* __restrict a, const float* __restrict b,
                                                      float* __restrict c, int64_t kc, bool first) {
  v16 acc[kMR][4];
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[r][j] = first ? v16{} : *reinterpret_cast<const v16*>(c + r * kNC + 16 * j);
  }
  for (int64_t p = 0; p < kc; ++p) {
    const v16* bv = reinterpret_cast<const v16*>(b + p * kNR);
    const v16 b0 = bv[0], b1 = bv[1], b2 = bv[2], b3 = bv[3];
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r) {
      const float s = a[p * kMR + r];
      const v16 av = {s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s};
      // vmulps then vaddps: fp-contract is off
      acc[r][0] += av * b0;
      acc[r][1] += av * b1;
      acc[r][2] += av * b2;
      acc[r][3] += av * b3;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) *reinterpret_cast<v16*>(c + r * kNC + 16 * j) = acc[r][j];
  }
}

// One batch block of a tile: c (kMC x kNC, row stride kNC) from the packed panels, compiled once per ISA
// (AVX-512: the 24 accumulators and 4 x vectors fit the 32 zmm registers).
inline __attribute__((always_inline)) void tile_block_body(const float* ap, const float* bp, float* c,
                                                           int64_t m_panels, int64_t n_panels, int64_t kc,
                                                           bool first) {
  for (int64_t np = 0; np < n_panels; ++np) {  // x's micro panel stays in L1 while g's stream from L2
    for (int64_t mp = 0; mp < m_panels; ++mp) {
      micro_tile(ap + mp * kc * kMR, bp + np * kc * kNR, c + mp * kMR * kNC + np * kNR, kc, first);
    }
  }
}
void tile_block_baseline(const float* ap, const float* bp, float* c, int64_t m_panels, int64_t n_panels, int64_t kc,
                         bool first) {
  tile_block_body(ap, bp, c, m_panels, n_panels, kc, first);
}
#if defined(SPARSEKERN_X86)
SPARSEKERN_AVX2 void tile_block_avx2(const float* ap, const float* bp, float* c, int64_t m_panels, int64_t n_panels,
                                     int64_t kc, bool first) {
  tile_block_body(ap, bp, c, m_panels, n_panels, kc, first);
}
SPARSEKERN_AVX512 void tile_block_avx512(const float* ap, const float* bp, float* c, int64_t m_panels,
                                         int64_t n_panels, int64_t kc, bool first) {
  tile_block_body(ap, bp, c, m_panels, n_panels, kc, first);
}
#endif
using TileBlockFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, bool);
TileBlockFn tile_block_fn() {
#if defined(SPARSEKERN_X86)
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: return tile_block_avx512;
    case CpuIsa::kAvx2: return tile_block_avx2;
    default: break;
  }
#endif
  return tile_block_baseline;
}

struct Problem {
  const void* x;
  const void* g;
  int64_t batch, n_in, n_out;
  const int64_t* row_ptr;
  const int32_t* col_idx;
  const int64_t* rows;  // the score rows to compute (a sample), or nullptr: all n_out rows
  int64_t n_rows;
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
  const int64_t height = std::min(kMC, p.n_rows - r0);
  if (p.rows == nullptr && height == kMC) {  // the common case: kMC contiguous rows, no padding
    for (int64_t q = 0; q < kc; ++q) {
      const T* src = g + (b0 + q) * p.n_out + r0;
      for (int64_t mp = 0; mp < kMC / kMR; ++mp) {
        float* dst = ap + mp * kc * kMR + q * kMR;
        for (int64_t rr = 0; rr < kMR; ++rr) dst[rr] = static_cast<float>(src[mp * kMR + rr]);
      }
    }
    return;
  }
  for (int64_t q = 0; q < kc; ++q) {
    const T* src = g + (b0 + q) * p.n_out;
    for (int64_t r = 0; r < kMC; ++r) {
      const float v = r < height ? static_cast<float>(src[p.rows ? p.rows[r0 + r] : r0 + r]) : 0.f;
      ap[r / kMR * kc * kMR + q * kMR + r % kMR] = v;
    }
  }
}

template <typename T>
void pack_x(const Problem& p, int64_t i0, int64_t b0, int64_t kc, float* bp) {
  const T* x = static_cast<const T*>(p.x);
  for (int64_t np = 0; np < kNC / kNR; ++np) {
    float* panel = bp + np * kc * kNR;
    const int64_t c0 = i0 + np * kNR, width = std::clamp<int64_t>(p.n_in - c0, 0, kNR);
    if (width == 0) break;  // the micro tiles stop at the last panel holding columns
    for (int64_t q = 0; q < kc; ++q) {
      const T* src = x + (b0 + q) * p.n_in + c0;
      float* dst = panel + q * kNR;
      if (width == kNR) {
        for (int64_t j = 0; j < kNR; ++j) dst[j] = static_cast<float>(src[j]);
      } else {
        for (int64_t j = 0; j < width; ++j) dst[j] = static_cast<float>(src[j]);
        for (int64_t j = width; j < kNR; ++j) dst[j] = 0.f;
      }
    }
  }
}

// Keys of one computed tile row (score row o, columns [i0, i0 + width)) into the collector. Blocks of 16 keys all
// below the threshold (most of them) are skipped after one vectorised test; exclusion and NaN are looked at only
// for keys that pass, walking the row's sorted excluded columns alongside.
void collect_row(const Problem& p, int64_t o, int64_t i0, int64_t width, float* tile_row, Collector& out) {
  uint32_t* keys = reinterpret_cast<uint32_t*>(tile_row);
  for (int64_t j = 0; j < width; ++j) keys[j] = ot::key_of_bits(keys[j]);
  const int64_t end = p.row_ptr[o + 1], base = o * p.n_in + i0;
  int64_t e = ot::lower_bound(p.col_idx, p.row_ptr[o], end, i0);
  for (int64_t j0 = 0; j0 < width; j0 += 16) {
    const int64_t j1 = std::min(width, j0 + 16);
    bool any = false;
    for (int64_t j = j0; j < j1; ++j) any |= keys[j] >= out.min_key;
    if (!any) continue;
    for (int64_t j = j0; j < j1; ++j) {
      const uint32_t key = keys[j];
      if (key < out.min_key) continue;
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
// per stripe and reuses it for the tiles beside it; x's block is packed per tile, as contiguous runs of kNR.
template <typename T>
void run_tiles(const Problem& p, std::vector<Collector>& collectors) {
  const int64_t n_mb = (p.n_rows + kMC - 1) / kMC, n_nb = (p.n_in + kNC - 1) / kNC, n_tiles = n_mb * n_nb;
  const int64_t n_kb = std::max<int64_t>(1, (p.batch + kKC - 1) / kKC);  // an empty batch: one block of zeros
  std::atomic<int64_t> next{0};
  const TileBlockFn tile_block = tile_block_fn();
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
      const int64_t m_panels = (height + kMR - 1) / kMR, n_panels = (width + kNR - 1) / kNR;
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
  constexpr int64_t kSamplePositions = 1 << 19;
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
      std::sort(ranks.begin(), ranks.end(), std::greater<uint64_t>());
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
    const uint64_t rank = collectors[best].ranks[head[best]++];
    index[j] = ot::rank_index(rank);
    const uint32_t key = ot::rank_key(rank);
    std::memcpy(score + j, &key, sizeof(key));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> outer_topk_cpu(const at::Tensor& x, const at::Tensor& g, int64_t k,
                                                  const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                                  bool /*fast: the CPU fast kernels are issue 10's CPU side*/) {
  constexpr const char* fn = "outer_topk";
  batch_tiles::check_activation(fn, "x", x);
  batch_tiles::check_activation(fn, "g", g);
  ot::check_sizes(fn, x, g);
  const int64_t batch = x.size(0), n_in = x.size(1), n_out = g.size(1);
  const int64_t nnz = batch_tiles::check_csr(fn, row_ptr, col_idx, n_out);
  const int64_t n_candidates = n_out * n_in - nnz;
  ot::check_k(fn, k, n_candidates);
  at::Tensor index = at::empty({k}, x.options().dtype(at::kLong));
  at::Tensor score = at::empty({k}, x.options().dtype(at::kFloat));
  if (k == 0) return {index, score};

  const Problem p{x.data_ptr(),           g.data_ptr(), batch,   n_in, n_out, row_ptr.data_ptr<int64_t>(),
                  col_idx.data_ptr<int32_t>(), nullptr,      n_out};
  batch_tiles::dispatch_dtype(x.scalar_type(), [&](auto tag) {
    select_top<decltype(tag)>(p, k, n_candidates, index.data_ptr<int64_t>(), score.data_ptr<float>());
  });
  return {index, score};
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("outer_topk", &outer_topk_cpu); }

}  // namespace sparsekern

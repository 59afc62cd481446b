// ELL SDDMM on the CPU: the gradient of a constant fan-in W's values, out[o, t] = sum_b g[b, o] * x[b, cols[o, t]],
// in the layout of values (n_out, k).
//
// The CSR kernel's layout (sddmm.cpp): per batch tile x is packed to [n_in][L] and stays in L2, g's rows are packed
// 64 at a time into an L1-sized block; a row's L lanes of g sit in registers while its nonzeros stream by, and
// sixteen nonzeros' partial sums are reduced together by one transposing add tree. Equal rows: the nonzeros are
// walked flat in groups of 16 across row boundaries, the row of each found by counting (every k-th nonzero starts
// a row), never by reading a row pointer, and the work split is exact. Per-worker fp32 accumulators over batch
// tiles, added in a fixed worker order at the end: deterministic for a given thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "sparsekern/batch_tiles.h"
#include "sparsekern/ell.h"

namespace sparsekern {
namespace {

constexpr int64_t kGRows = 64;  // rows of g packed per block: 64 x L lanes, at most 16 KiB

struct EllSArgs {
  const void* g;
  const void* x;
  const int32_t* cols;
  int64_t batch, n_in, n_out, k;
};

// One work item: packs x's tile `tile` (when new to the worker), then adds every nonzero of rows [r0, r1) over the
// tile's batch rows to acc (indexed by the flat nonzero o * k + t), one block of kGRows rows of g at a time.
template <int L, typename T, typename TileT, typename Pack, typename Walk>
inline __attribute__((always_inline)) void ell_sddmm_item(const EllSArgs& a, int64_t tile, int64_t r0, int64_t r1,
                                                          float* xbuf, bool new_tile, float* acc, Pack pack_fn,
                                                          Walk walk_fn) {
  const int64_t b0 = tile * L, rows = std::min<int64_t>(L, a.batch - b0);
  TileT* xt = reinterpret_cast<TileT*>(xbuf);
  if (new_tile) pack_fn(static_cast<const T*>(a.x) + b0 * a.n_in, a.n_in, rows, a.n_in, xt);
  alignas(64) TileT gblock[kGRows * L];
  const T* g = static_cast<const T*>(a.g) + b0 * a.n_out;
  for (int64_t o0 = r0; o0 < r1; o0 += kGRows) {
    const int64_t o1 = std::min(r1, o0 + kGRows);
    pack_fn(g + o0, a.n_out, rows, o1 - o0, gblock);
    walk_fn(gblock, xt, a.cols + o0 * a.k, a.k, o1 - o0, acc + o0 * a.k);
  }
}

inline float sum_lanes(const batch_tiles::vec4& v) { return (v[0] + v[2]) + (v[1] + v[3]); }

// Portable path: per nonzero one 4-lane vector of partial products, then its lane sum.
template <int L>
inline __attribute__((always_inline)) void walk_portable(const float* gblock, const float* xt, const int32_t* cols,
                                                         int64_t k, int64_t n, float* acc) {
  using batch_tiles::kVec;
  using batch_tiles::load_vec;
  using batch_tiles::vec4;
  constexpr int NV = L / kVec;
  for (int64_t o = 0; o < n; ++o) {
    vec4 g[NV];
    for (int i = 0; i < NV; ++i) load_vec(g[i], gblock + o * L + kVec * i);
    for (int64_t t = 0; t < k; ++t) {
      const float* xs = xt + int64_t(cols[o * k + t]) * L;
      vec4 s = {}, xv;
      for (int i = 0; i < NV; ++i) {
        load_vec(xv, xs + kVec * i);
        s += g[i] * xv;
      }
      acc[o * k + t] += sum_lanes(s);
    }
  }
}

constexpr int kPL = batch_tiles::kPortableLanes;
#define SPARSEKERN_ELL_SDDMM_PORTABLE(NAME, T)                                                                  \
  void NAME(const EllSArgs& a, int64_t tile, int64_t r0, int64_t r1, float* xbuf, bool new_tile, float* acc) { \
    ell_sddmm_item<kPL, T, float>(a, tile, r0, r1, xbuf, new_tile, acc, batch_tiles::pack_tile_portable<kPL, T>, \
                                  walk_portable<kPL>);                                                          \
  }
SPARSEKERN_ELL_SDDMM_PORTABLE(ell_sddmm_portable_f32, float)
SPARSEKERN_ELL_SDDMM_PORTABLE(ell_sddmm_portable_bf16, c10::BFloat16)
SPARSEKERN_ELL_SDDMM_PORTABLE(ell_sddmm_portable_f16, c10::Half)

#if defined(SPARSEKERN_BATCH_TILES_AVX2)
// Lane u of the result = the sum of the 8 lanes of v[u]: a transposing add tree.
SPARSEKERN_AVX2 inline __m256 reduce8(const __m256 v[8]) {
  __m256 a[4], b[2];
  for (int i = 0; i < 4; ++i) {
    a[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 2; ++i) {
    b[i] = _mm256_add_ps(_mm256_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm256_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  return _mm256_add_ps(_mm256_permute2f128_ps(b[0], b[1], 0x20), _mm256_permute2f128_ps(b[0], b[1], 0x31));
}

// Nonzeros of rows [0, n) flat in groups of 8; the row's g (NV <= 4 ymm) is reloaded when the walk reaches the
// next multiple of k.
template <int L, typename TileT>
SPARSEKERN_AVX2 inline void walk_avx2(const TileT* gblock, const TileT* xt, const int32_t* cols, int64_t k, int64_t n,
                                      float* acc) {
  using Lanes = batch_tiles::LanesAvx2<L, TileT>;
  constexpr int NV = Lanes::NV;
  static_assert(NV <= 4, "g's lanes and eight partial sums share the 16 ymm registers");
  const int64_t nnz = n * k;
  int64_t row = 0, row_end = k;
  __m256 g[NV];
  Lanes::load(gblock, g);
  for (int64_t j = 0; j < nnz; j += 8) {
    const int64_t m = std::min<int64_t>(8, nnz - j);
    __m256 part[8];
#pragma GCC unroll 8
    for (int u = 0; u < 8; ++u) {
      if (u < m) {
        if (j + u == row_end) {
          ++row;
          row_end += k;
          Lanes::load(gblock + row * L, g);
        }
        __m256 xv[NV];
        Lanes::load(xt + int64_t(cols[j + u]) * L, xv);
        __m256 s = _mm256_mul_ps(g[0], xv[0]);
        for (int i = 1; i < NV; ++i) s = _mm256_fmadd_ps(g[i], xv[i], s);
        part[u] = s;
      } else {
        part[u] = _mm256_setzero_ps();
      }
    }
    const __m256 sums = reduce8(part);
    if (m == 8) {
      _mm256_storeu_ps(acc + j, _mm256_add_ps(_mm256_loadu_ps(acc + j), sums));
    } else {
      batch_tiles::store8(acc + j, _mm256_add_ps(batch_tiles::load8(acc + j, m), sums), m);
    }
  }
}

template <int L, typename T>
SPARSEKERN_AVX2 void ell_sddmm_avx2(const EllSArgs& a, int64_t tile, int64_t r0, int64_t r1, float* xbuf,
                                    bool new_tile, float* acc) {
  using TileT = batch_tiles::tile_t<T>;
  ell_sddmm_item<L, T, TileT>(a, tile, r0, r1, xbuf, new_tile, acc, batch_tiles::pack_tile_avx2<L, T, TileT>,
                              walk_avx2<L, TileT>);
}
#endif

#if defined(SPARSEKERN_BATCH_TILES_AVX512)
SPARSEKERN_AVX512_DIAGNOSTICS_BEGIN
// Lane u of the result = the sum of the 16 lanes of v[u]: a transposing add tree.
SPARSEKERN_AVX512 inline __m512 reduce16(const __m512 v[16]) {
  __m512 a[8], b[4];
  for (int i = 0; i < 8; ++i) {
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {
    b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  const __m512 c0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x88), _mm512_shuffle_f32x4(b[0], b[1], 0xdd));
  const __m512 c1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x88), _mm512_shuffle_f32x4(b[2], b[3], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c0, c1, 0x88), _mm512_shuffle_f32x4(c0, c1, 0xdd));
}

// walk_avx2 with zmm: groups of 16 nonzeros.
template <int L, typename TileT>
SPARSEKERN_AVX512 inline void walk_avx512(const TileT* gblock, const TileT* xt, const int32_t* cols, int64_t k,
                                          int64_t n, float* acc) {
  using Lanes = batch_tiles::Lanes<L, TileT>;
  constexpr int NV = Lanes::NV;
  const int64_t nnz = n * k;
  int64_t row = 0, row_end = k;
  __m512 g[NV];
  Lanes::load(gblock, g);
  for (int64_t j = 0; j < nnz; j += 16) {
    const int64_t m = std::min<int64_t>(16, nnz - j);
    __m512 part[16];
#pragma GCC unroll 16
    for (int u = 0; u < 16; ++u) {
      if (u < m) {
        if (j + u == row_end) {
          ++row;
          row_end += k;
          Lanes::load(gblock + row * L, g);
        }
        __m512 xv[NV];
        Lanes::load(xt + int64_t(cols[j + u]) * L, xv);
        __m512 s = _mm512_mul_ps(g[0], xv[0]);
        for (int i = 1; i < NV; ++i) s = _mm512_fmadd_ps(g[i], xv[i], s);
        part[u] = s;
      } else {
        part[u] = _mm512_setzero_ps();
      }
    }
    const __mmask16 mask = batch_tiles::first_n(m);
    _mm512_mask_storeu_ps(acc + j, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, acc + j), reduce16(part)));
  }
}

template <int L, typename T>
SPARSEKERN_AVX512 void ell_sddmm_avx512(const EllSArgs& a, int64_t tile, int64_t r0, int64_t r1, float* xbuf,
                                        bool new_tile, float* acc) {
  using TileT = batch_tiles::tile_t<T>;
  ell_sddmm_item<L, T, TileT>(a, tile, r0, r1, xbuf, new_tile, acc, batch_tiles::pack_tile_avx512<L, T, TileT>,
                              walk_avx512<L, TileT>);
}
SPARSEKERN_AVX512_DIAGNOSTICS_END
#endif

using ItemFn = void (*)(const EllSArgs&, int64_t, int64_t, int64_t, float*, bool, float*);

template <typename T>
std::pair<ItemFn, int> ell_sddmm_kernel(int64_t n_in, int64_t batch) {
  using TileT = batch_tiles::tile_t<T>;
#if defined(SPARSEKERN_BATCH_TILES_AVX512)
  if (cpu_isa() == CpuIsa::kAvx512) {
    return batch_tiles::kernel_for_lanes<TileT, ItemFn, 64>(
        n_in, batch, [](auto l) -> ItemFn { return ell_sddmm_avx512<l.value, T>; });
  }
#endif
#if defined(SPARSEKERN_BATCH_TILES_AVX2)
  if (cpu_isa() == CpuIsa::kAvx2) {
    return batch_tiles::kernel_for_lanes<TileT, ItemFn, 32>(
        n_in, batch, [](auto l) -> ItemFn { return ell_sddmm_avx2<l.value, T>; });
  }
#endif
  return {batch_tiles::by_dtype<T>(ell_sddmm_portable_f32, ell_sddmm_portable_bf16, ell_sddmm_portable_f16), kPL};
}

}  // namespace

at::Tensor ell_sddmm_cpu(const at::Tensor& g, const at::Tensor& x, const at::Tensor& cols) {
  batch_tiles::check_activation("ell_sddmm", "g", g);
  batch_tiles::check_activation("ell_sddmm", "x", x);
  TORCH_CHECK_TYPE(g.scalar_type() == x.scalar_type(), "ell_sddmm: g and x must have the same dtype, got ",
                   g.scalar_type(), " and ", x.scalar_type());
  TORCH_CHECK_VALUE(g.size(0) == x.size(0), "ell_sddmm: g and x must have the same batch size, got ", g.sizes(),
                    " and ", x.sizes());
  const int64_t batch = x.size(0), n_in = x.size(1), n_out = g.size(1);
  const int64_t k = ell::check_cols("ell_sddmm", cols, n_out, n_in);
  const int64_t nnz = n_out * k;
  if (nnz == 0 || batch == 0) return at::zeros(cols.sizes(), x.options());

  const EllSArgs a{g.data_ptr(), x.data_ptr(), cols.data_ptr<int32_t>(), batch, n_in, n_out, k};
  at::Tensor out = at::empty(cols.sizes(), x.options());
  batch_tiles::dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto [fn, lanes] = ell_sddmm_kernel<T>(n_in, batch);
    const batch_tiles::Split split = ell::split_rows(batch, lanes, n_out);
    const batch_tiles::WorkerBuffers xbufs(split.workers, n_in * lanes);
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
        const int64_t m = std::min(kChunk, j1 - c0);
        std::copy_n(accs[0] + c0, m, s);
        for (int64_t p = 1; p < split.workers; ++p) {
          const float* acc = accs[p] + c0;
          for (int64_t i = 0; i < m; ++i) s[i] += acc[i];
        }
        for (int64_t i = 0; i < m; ++i) o[c0 + i] = static_cast<T>(s[i]);
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("ell_sddmm", &ell_sddmm_cpu); }

}  // namespace sparsekern

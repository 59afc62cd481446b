// ELL dX on the CPU: dx = g @ W for a constant fan-in W (n_out, n_in), straight from W's ELL index (no transposed
// index): a scatter along each row of W.
//
// Per batch tile of L rows, g is packed to [n_out][L] (fp32) and an fp32 accumulator tile dx[n_in][L] is zeroed;
// both stay in L2. Row o of W holds its L lanes of g in registers while its k nonzeros stream by, each a
// read-modify-write dx[cols[o, t]] += values[o, t] * g[o] of L lanes (the columns of a row are unique, so its
// writes are independent). The tile is then written back through 16x16 (8x8) register transposes. No two threads
// write one element and nothing is atomic: whole batch tiles per thread when the batch is large; for a small batch
// each thread scatters a range of W's rows into its own accumulator tile and the ranges are added in a fixed
// order. Every lane is summed in two levels: W's rows go in chunks of about kColumnChunk nonzeros per column of dx
// (chunk_rows), each chunk one serial FMA chain over its rows in ascending order from +0, and the chunk sums are
// added in order (one chain over all of a tall W's rows, the first kernel, made 2.0x dense's fp32 error at
// 768->3072, 90%). The chunks depend on the shape only, so the AVX-512 and AVX2 paths give the same bits whatever
// their tile widths (the split also depends on the batch and the thread count); the portable path rounds each
// product (no FMA on the x86-64 baseline).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "sparsekern/batch_tiles.h"
#include "sparsekern/cpu_alloc.h"
#include "sparsekern/ell.h"

namespace sparsekern {
namespace {

struct EllTArgs {
  const void* g;
  void* dx;
  const int32_t* cols;
  const float* values;
  int64_t batch, n_in, n_out, k;
};

// Scatters rows [o0, o1) of W with the packed g tile gt [n_out][L] into the accumulator tile acc [n_in][L].
template <int L>
inline __attribute__((always_inline)) void scatter_portable(const float* gt, const int32_t* cols,
                                                            const float* values, int64_t k, int64_t o0, int64_t o1,
                                                            float* acc) {
  using batch_tiles::kVec;
  using batch_tiles::load_vec;
  using batch_tiles::vec4;
  constexpr int NV = L / kVec;
  for (int64_t o = o0; o < o1; ++o) {
    vec4 gv[NV];
    for (int i = 0; i < NV; ++i) load_vec(gv[i], gt + o * L + kVec * i);
    const int32_t* c = cols + o * k;
    const float* v = values + o * k;
    for (int64_t t = 0; t < k; ++t) {
      float* p = acc + int64_t(c[t]) * L;
      const vec4 vb = vec4{} + v[t];
      for (int i = 0; i < NV; ++i) {
        vec4 a;
        load_vec(a, p + kVec * i);
        a += vb * gv[i];
        std::memcpy(p + kVec * i, &a, sizeof(a));
      }
    }
  }
}

#if defined(SPARSEKERN_BATCH_TILES_AVX2)
template <int L>
SPARSEKERN_AVX2 inline void scatter_avx2(const float* gt, const int32_t* cols, const float* values, int64_t k,
                                         int64_t o0, int64_t o1, float* acc) {
  constexpr int NV = L / 8;
  for (int64_t o = o0; o < o1; ++o) {
    __m256 gv[NV];
    for (int i = 0; i < NV; ++i) gv[i] = _mm256_load_ps(gt + o * L + 8 * i);
    const int32_t* c = cols + o * k;
    const float* v = values + o * k;
#pragma GCC unroll 4
    for (int64_t t = 0; t < k; ++t) {
      float* p = acc + int64_t(c[t]) * L;
      const __m256 vb = _mm256_broadcast_ss(v + t);
      for (int i = 0; i < NV; ++i) _mm256_store_ps(p + 8 * i, _mm256_fmadd_ps(vb, gv[i], _mm256_load_ps(p + 8 * i)));
    }
  }
}
#endif

#if defined(SPARSEKERN_BATCH_TILES_AVX512)
SPARSEKERN_AVX512_DIAGNOSTICS_BEGIN
template <int L>
SPARSEKERN_AVX512 inline void scatter_avx512(const float* gt, const int32_t* cols, const float* values, int64_t k,
                                             int64_t o0, int64_t o1, float* acc) {
  constexpr int NV = L / 16;
  for (int64_t o = o0; o < o1; ++o) {
    __m512 gv[NV];
    for (int i = 0; i < NV; ++i) gv[i] = _mm512_load_ps(gt + o * L + 16 * i);
    const int32_t* c = cols + o * k;
    const float* v = values + o * k;
#pragma GCC unroll 4
    for (int64_t t = 0; t < k; ++t) {
      float* p = acc + int64_t(c[t]) * L;
      const __m512 vb = _mm512_set1_ps(v[t]);
      for (int i = 0; i < NV; ++i) _mm512_store_ps(p + 16 * i, _mm512_fmadd_ps(vb, gv[i], _mm512_load_ps(p + 16 * i)));
    }
  }
}
SPARSEKERN_AVX512_DIAGNOSTICS_END
#endif

// The three steps of a tile on one ISA: pack g's rows [b0, b0 + rows) into gt, scatter W's rows [o0, o1) into acc,
// write columns [c0, c1) of acc back to dx (row-major, leading dimension n_in).
struct Steps {
  void (*pack)(const EllTArgs&, int64_t b0, int64_t rows, float* gt);
  void (*scatter)(const EllTArgs&, const float* gt, int64_t o0, int64_t o1, float* acc);
  void (*store)(const EllTArgs&, const float* acc, int64_t c0, int64_t c1, int64_t b0, int64_t rows);
};

template <int L, typename T, auto Pack, auto Scatter, auto Store>
struct StepsFor {
  static void pack(const EllTArgs& a, int64_t b0, int64_t rows, float* gt) {
    Pack(static_cast<const T*>(a.g) + b0 * a.n_out, a.n_out, rows, a.n_out, gt);
  }
  static void scatter(const EllTArgs& a, const float* gt, int64_t o0, int64_t o1, float* acc) {
    Scatter(gt, a.cols, a.values, a.k, o0, o1, acc);
  }
  static void store(const EllTArgs& a, const float* acc, int64_t c0, int64_t c1, int64_t b0, int64_t rows) {
    T* dx = static_cast<T*>(a.dx) + b0 * a.n_in;
    for (int64_t c = c0; c < c1; c += 16) Store(acc + c * L, std::min<int64_t>(16, c1 - c), dx + c, a.n_in, rows);
  }
  static Steps get() { return {pack, scatter, store}; }
};

template <int L, typename T>
Steps portable_steps() {
  return StepsFor<L, T, batch_tiles::pack_tile_portable<L, T>, scatter_portable<L>,
                  batch_tiles::store_block_portable<L, T>>::get();
}

#if defined(SPARSEKERN_BATCH_TILES_AVX2)
template <int L, typename T>
Steps avx2_steps() {
  return StepsFor<L, T, batch_tiles::pack_tile_avx2<L, T, float>, scatter_avx2<L>,
                  batch_tiles::store_block_avx2<L, T>>::get();
}
#endif

#if defined(SPARSEKERN_BATCH_TILES_AVX512)
template <int L, typename T>
Steps avx512_steps() {
  return StepsFor<L, T, batch_tiles::pack_tile_avx512<L, T, float>, scatter_avx512<L>,
                  batch_tiles::store_block_avx512<L, T>>::get();
}
#endif

// Orders this thread's streamed (non-temporal) stores before its work is reported done.
inline void fence_streams() {
#if defined(SPARSEKERN_X86)
  _mm_sfence();
#endif
}

// The steps for activations of type T and their tile width: both tiles (g's and dx's, fp32) share the L2 budget.
// (The chunk tile `part` is not counted: while a chunk scatters, only it and g's tile are in use.)
template <typename T>
std::pair<Steps, int> ell_spmm_t_steps(int64_t n_in, int64_t n_out, int64_t batch) {
#if defined(SPARSEKERN_BATCH_TILES_AVX512)
  if (cpu_isa() == CpuIsa::kAvx512) {
    return batch_tiles::kernel_for_lanes<float, Steps, 64>(n_in + n_out, batch,
                                                           [](auto l) { return avx512_steps<l.value, T>(); });
  }
#endif
#if defined(SPARSEKERN_BATCH_TILES_AVX2)
  if (cpu_isa() == CpuIsa::kAvx2) {
    return batch_tiles::kernel_for_lanes<float, Steps, 32>(n_in + n_out, batch,
                                                           [](auto l) { return avx2_steps<l.value, T>(); });
  }
#endif
  return {portable_steps<batch_tiles::kPortableLanes, T>(), batch_tiles::kPortableLanes};
}

// About this many of a chunk's nonzeros land on each column of dx (kChunk of ell_spmm.cpp and spmm.cpp, doubled:
// each chunk costs a zeroing and an addition of the whole accumulator tile, n_in lanes, about 3% of its scatter).
constexpr int64_t kColumnChunk = 32;

// Rows of W per summation chunk (all of them when a column gets at most kColumnChunk nonzeros on average).
int64_t chunk_rows(int64_t n_in, int64_t n_out, int64_t k) {
  if (n_out * k <= kColumnChunk * n_in) return n_out;
  return std::max<int64_t>(1, kColumnChunk * n_in / k);
}

// Scatters W's rows [o0, o1) into acc (zeroed) in chunks of `chunk` rows counted from row 0: the first into acc,
// each later one into `part` (zeroed), then added onto acc.
void scatter_chunked(const Steps& steps, const EllTArgs& a, const float* gt, int64_t o0, int64_t o1, int64_t chunk,
                     float* acc, float* part, int64_t asize) {
  int64_t end = std::min(o1, (o0 / chunk + 1) * chunk);
  steps.scatter(a, gt, o0, end, acc);
  for (int64_t c = end; c < o1; c = end) {
    end = std::min(o1, c + chunk);
    std::fill_n(part, asize, 0.0f);
    steps.scatter(a, gt, c, end, part);
    for (int64_t i = 0; i < asize; ++i) acc[i] += part[i];
  }
}

// Batches of at least kWholeTiles rows per thread give each thread whole batch tiles; smaller ones split W's rows.
// A fixed row count (not a tile count), so the split, and with it every result bit, is the same on every ISA.
constexpr int64_t kWholeTiles = 128;

}  // namespace

at::Tensor ell_spmm_t_cpu(const at::Tensor& g, const at::Tensor& cols, const at::Tensor& values, int64_t n_in) {
  batch_tiles::check_activation("ell_spmm_t", "g", g);
  TORCH_CHECK_VALUE(n_in >= 0, "ell_spmm_t: n_in must be >= 0, got ", n_in);
  const int64_t batch = g.size(0), n_out = g.size(1);
  const int64_t k = ell::check_cols("ell_spmm_t", cols, n_out, n_in);
  ell::check_values("ell_spmm_t", "values", values, cols, g.scalar_type());
  at::Tensor dx = empty_cpu_output({batch, n_in}, g.options(), kGlibcMmapMax);
  if (batch == 0 || n_in == 0) return dx;
  if (k == 0 || n_out == 0) return dx.zero_();

  const at::Tensor values_f32 = values.to(at::kFloat);
  const EllTArgs a{g.data_ptr(), dx.data_ptr(), cols.data_ptr<int32_t>(), values_f32.data_ptr<float>(),
                   batch, n_in, n_out, k};
  batch_tiles::dispatch_dtype(g.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const int64_t chunk = chunk_rows(n_in, n_out, k);
    const int64_t tiles_in = chunk < n_out ? 2 : 1;
    const auto [steps, lanes] = ell_spmm_t_steps<T>(n_in, n_out, batch);
    const int64_t n_tiles = (batch + lanes - 1) / lanes;
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t gsize = n_out * lanes, asize = n_in * lanes;
    const int64_t gpad = (gsize + 15) / 16 * 16, apad = (asize + 15) / 16 * 16;
    if (threads == 1 || batch >= kWholeTiles * threads) {
      const int64_t workers = std::min(threads, n_tiles);
      const batch_tiles::WorkerBuffers bufs(workers, gpad + tiles_in * apad);
      at::parallel_for(0, workers, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          float* gt = bufs[p];
          float* acc = gt + gpad;
          float* part = acc + apad;
          for (int64_t tile = p * n_tiles / workers; tile < (p + 1) * n_tiles / workers; ++tile) {
            const int64_t b0 = tile * lanes, rows = std::min<int64_t>(lanes, batch - b0);
            steps.pack(a, b0, rows, gt);
            std::fill_n(acc, asize, 0.0f);
            scatter_chunked(steps, a, gt, 0, n_out, chunk, acc, part, asize);
            steps.store(a, acc, 0, n_in, b0, rows);
          }
        }
        fence_streams();
      });
    } else {
      // Each part scatters W's rows [n_out * q / parts, n_out * (q + 1) / parts) into its own accumulator; the
      // parts are then added in order, one 16-column block at a time, and written back.
      const int64_t parts = std::min(threads, n_out);
      const batch_tiles::WorkerBuffers gbuf(1, gsize);
      const batch_tiles::WorkerBuffers accs(parts, tiles_in * apad);
      for (int64_t tile = 0; tile < n_tiles; ++tile) {
        const int64_t b0 = tile * lanes, rows = std::min<int64_t>(lanes, batch - b0);
        steps.pack(a, b0, rows, gbuf[0]);
        at::parallel_for(0, parts, 1, [&](int64_t q0, int64_t q1) {
          for (int64_t q = q0; q < q1; ++q) {
            std::fill_n(accs[q], asize, 0.0f);
            scatter_chunked(steps, a, gbuf[0], n_out * q / parts, n_out * (q + 1) / parts, chunk, accs[q],
                            accs[q] + apad, asize);
          }
        });
        const int64_t blocks = (n_in + 15) / 16;
        at::parallel_for(0, blocks, std::max<int64_t>(1, blocks / threads), [&](int64_t c0, int64_t c1) {
          float* sum = accs[0];
          for (int64_t q = 1; q < parts; ++q) {
            const float* part = accs[q];
            for (int64_t i = c0 * 16 * lanes; i < std::min(c1 * 16, n_in) * lanes; ++i) sum[i] += part[i];
          }
          steps.store(a, sum, c0 * 16, std::min(c1 * 16, n_in), b0, rows);
          fence_streams();
        });
      }
    }
  });
  return dx;
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("ell_spmm_t", &ell_spmm_t_cpu); }

}  // namespace sparsekern

// CSR SpMM on the CPU: y = x @ W.T with W (n_out, n_in) in CSR; also dX = G @ W through W's transposed index.
//
// Per batch tile of L rows (see batch_tiles.h): x is packed to [n_in][L] and stays in L2; one row of W is L batch
// lanes held in registers while its nonzeros stream by, each an FMA of a broadcast value with the run tile[col].
// Sixteen W rows are staged as [16][L] and written back through register transposes (16x16 zmm, 8x8 ymm), so y is
// written in whole runs of a row, never at stride n_out. Three paths (cpu_features.h): AVX-512 (tiles of up to 64
// lanes), AVX2 + FMA (up to 32 lanes, sized for 16 ymm registers) and portable (16 lanes, 4-wide vectors).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "sparsekern/batch_tiles.h"
#include "sparsekern/cpu_alloc.h"

namespace sparsekern {
namespace {

using batch_tiles::kBlock;

struct SpmmArgs {
  const void* x;
  void* y;
  const int64_t* row_ptr;
  const int32_t* col_idx;
  const float* values;
  int64_t batch, n_in, n_out;
};

// One work item: packs batch tile `tile` (unless the worker's buffer already holds it), then computes W rows
// [r0, r1) for it, kBlock rows at a time through the staging block.
template <int L, typename T, typename TileT, typename Pack, typename Rows, typename Store>
inline __attribute__((always_inline)) void spmm_item(const SpmmArgs& a, int64_t tile, int64_t r0, int64_t r1,
                                                     void* buf, bool pack, Pack pack_fn, Rows rows_fn,
                                                     Store store_fn) {
  const int64_t b0 = tile * L, rows = std::min<int64_t>(L, a.batch - b0);
  TileT* t = static_cast<TileT*>(buf);
  if (pack) pack_fn(static_cast<const T*>(a.x) + b0 * a.n_in, a.n_in, rows, a.n_in, t);
  alignas(64) float stage[kBlock * L];
  T* y = static_cast<T*>(a.y) + b0 * a.n_out;
  for (int64_t o0 = r0; o0 < r1; o0 += kBlock) {
    const int64_t cols = std::min(kBlock, r1 - o0);
    rows_fn(t, a.row_ptr, a.col_idx, a.values, o0, cols, stage);
    store_fn(stage, cols, y + o0, a.n_out, rows);
  }
}

// A row is summed in three levels: chunks of kChunk nonzeros from zero (the unrolled chains combined pairwise),
// kChunks chunks into a block sum, blocks into the row's total. Few additions land on a large running sum, so the
// rounding error stays at or below that of MKL's K-blocked GEMM instead of growing like one long serial chain's.
constexpr int64_t kChunk = 32;
constexpr int64_t kChunks = 16;

// Portable path: the AVX-512 kernel's summation order in GCC/Clang vectors (two chains of L/4 vectors). The
// row total lives in the staging block, so the hot loop's accumulators fit the 16 xmm registers of SSE2 and AVX2.
template <int L>
inline __attribute__((always_inline)) void spmm_rows_portable(const float* tile, const int64_t* row_ptr,
                                                              const int32_t* col_idx, const float* values,
                                                              int64_t o0, int64_t cols, float* stage) {
  using batch_tiles::kVec;
  using batch_tiles::load_vec;
  using batch_tiles::vec4;
  constexpr int NV = L / kVec;
  for (int64_t c = 0; c < cols; ++c) {
    float* total = stage + c * L;
    std::fill_n(total, L, 0.0f);
    const int64_t end = row_ptr[o0 + c + 1];
    for (int64_t j = row_ptr[o0 + c]; j < end;) {
      vec4 block[NV] = {};
      for (int64_t k = 0; k < kChunks && j < end; ++k) {
        const int64_t stop = std::min(end, j + kChunk);
        vec4 a0[NV] = {}, a1[NV] = {};
        for (; j + 2 <= stop; j += 2) {
          const float *p = tile + int64_t(col_idx[j]) * L, *q = tile + int64_t(col_idx[j + 1]) * L;
          const vec4 v = vec4{} + values[j], w = vec4{} + values[j + 1];
          for (int i = 0; i < NV; ++i) {
            vec4 xp, xq;
            load_vec(xp, p + kVec * i);
            load_vec(xq, q + kVec * i);
            a0[i] += v * xp;
            a1[i] += w * xq;
          }
        }
        if (j < stop) {
          const float* p = tile + int64_t(col_idx[j]) * L;
          const vec4 v = vec4{} + values[j];
          for (int i = 0; i < NV; ++i) {
            vec4 xp;
            load_vec(xp, p + kVec * i);
            a0[i] += v * xp;
          }
          ++j;
        }
        for (int i = 0; i < NV; ++i) block[i] += a0[i] + a1[i];
      }
      for (int i = 0; i < NV; ++i) {
        vec4 t;
        load_vec(t, total + kVec * i);
        t += block[i];
        std::memcpy(total + kVec * i, &t, sizeof(t));
      }
    }
  }
}

constexpr int kPL = batch_tiles::kPortableLanes;
#define SPARSEKERN_SPMM_PORTABLE(NAME, T, ATTR)                                                                       \
  ATTR void NAME(const SpmmArgs& a, int64_t tile, int64_t r0, int64_t r1, void* buf,      \
                                       bool pack) {                                                             \
    spmm_item<kPL, T, float>(a, tile, r0, r1, buf, pack, batch_tiles::pack_tile_portable<kPL, T>,              \
                             spmm_rows_portable<kPL>, batch_tiles::store_block_portable<kPL, T>);               \
  }
SPARSEKERN_SPMM_PORTABLE(spmm_item_portable_f32, float, )
SPARSEKERN_SPMM_PORTABLE(spmm_item_portable_bf16, c10::BFloat16, )
SPARSEKERN_SPMM_PORTABLE(spmm_item_portable_f16, c10::Half, )

#if defined(SPARSEKERN_BATCH_TILES_AVX2)
// The AVX-512 kernel's summation order with 16 ymm registers: U nonzeros per step into U sets of NV = L/8
// accumulators, always 8 FMA chains (FMA latency 4 x 2 per cycle), which leaves room for the chunk sum (NV) and
// the broadcasts; the row total lives in the staging block and is touched once per kChunks chunks. Tiles are at
// most 32 lanes: at 64, 8 accumulators and an 8-register chunk sum do not fit and GCC spills accumulators.
template <int L, typename TileT>
SPARSEKERN_AVX2 inline void spmm_rows_avx2(const TileT* tile, const int64_t* row_ptr, const int32_t* col_idx,
                                           const float* values, int64_t o0, int64_t cols, float* stage) {
  using Lanes = batch_tiles::LanesAvx2<L, TileT>;
  constexpr int NV = Lanes::NV, U = 8 / NV;
  static_assert(NV <= 4 && kChunk % U == 0, "chunks hold whole unrolled steps; at most 4 + 8 + U registers");
  for (int64_t c = 0; c < cols; ++c) {
    float* total = stage + c * L;
    const int64_t end = row_ptr[o0 + c + 1];
    __m256 block[NV], acc[U][NV];
    for (int i = 0; i < NV; ++i) block[i] = _mm256_setzero_ps();
    bool first = true;
    for (int64_t j = row_ptr[o0 + c]; j < end;) {
      for (int64_t k = 0; k < kChunks && j < end; ++k) {
        const int64_t stop = std::min(end, j + kChunk);
        for (int u = 0; u < U; ++u) {
          for (int i = 0; i < NV; ++i) acc[u][i] = _mm256_setzero_ps();
        }
        for (; j + U <= stop; j += U) {
#pragma GCC unroll 8
          for (int u = 0; u < U; ++u) {
            __m256 xv[NV];
            Lanes::load(tile + int64_t(col_idx[j + u]) * L, xv);
            const __m256 v = _mm256_broadcast_ss(values + j + u);
            for (int i = 0; i < NV; ++i) acc[u][i] = _mm256_fmadd_ps(v, xv[i], acc[u][i]);
          }
        }
        for (; j < stop; ++j) {
          __m256 xv[NV];
          Lanes::load(tile + int64_t(col_idx[j]) * L, xv);
          const __m256 v = _mm256_broadcast_ss(values + j);
          for (int i = 0; i < NV; ++i) acc[0][i] = _mm256_fmadd_ps(v, xv[i], acc[0][i]);
        }
        for (int w = U / 2; w >= 1; w /= 2) {  // the chains pairwise, then one add onto the block
          for (int u = 0; u < w; ++u) {
            for (int i = 0; i < NV; ++i) acc[u][i] = _mm256_add_ps(acc[u][i], acc[u + w][i]);
          }
        }
        for (int i = 0; i < NV; ++i) block[i] = _mm256_add_ps(block[i], acc[0][i]);
      }
      // the block onto the row total: the first block is the total (0 + b == b, bit for bit, also for -0.0
      // since the chains start from +0.0)
      for (int i = 0; i < NV; ++i) {
        const __m256 t = first ? block[i] : _mm256_add_ps(_mm256_load_ps(total + 8 * i), block[i]);
        _mm256_store_ps(total + 8 * i, t);
        block[i] = _mm256_setzero_ps();
      }
      first = false;
    }
    if (first) {
      for (int i = 0; i < NV; ++i) _mm256_store_ps(total + 8 * i, _mm256_setzero_ps());
    } else if constexpr (!std::is_same_v<TileT, float>) {
      __m256 t[NV];
      for (int i = 0; i < NV; ++i) t[i] = _mm256_load_ps(total + 8 * i);
      Lanes::to_lane_order(t);
      for (int i = 0; i < NV; ++i) _mm256_store_ps(total + 8 * i, t[i]);
    }
  }
}

template <int L, typename T>
SPARSEKERN_AVX2 void spmm_item_avx2(const SpmmArgs& a, int64_t tile, int64_t r0, int64_t r1, void* buf,
                                    bool pack) {
  using TileT = batch_tiles::tile_t<T>;
  spmm_item<L, T, TileT>(a, tile, r0, r1, buf, pack, batch_tiles::pack_tile_avx2<L, T, TileT>,
                         spmm_rows_avx2<L, TileT>, batch_tiles::store_block_avx2<L, T>);
}
#endif

#if defined(SPARSEKERN_BATCH_TILES_AVX512)
SPARSEKERN_AVX512_DIAGNOSTICS_BEGIN
// U nonzeros per iteration into U accumulator sets of NV registers: eight independent FMA chains hide the FMA
// latency, and the loads of later nonzeros issue while earlier ones wait on L2.
template <int L, typename TileT>
SPARSEKERN_AVX512 inline void spmm_rows_avx512(const TileT* tile, const int64_t* row_ptr, const int32_t* col_idx,
                                               const float* values, int64_t o0, int64_t cols, float* stage) {
  using Lanes = batch_tiles::Lanes<L, TileT>;
  constexpr int NV = Lanes::NV, U = NV >= 8 ? 1 : 8 / NV;
  static_assert(kChunk % U == 0, "chunks hold whole unrolled steps");
  for (int64_t c = 0; c < cols; ++c) {
    __m512 total[NV], block[NV], acc[U][NV];
    for (int i = 0; i < NV; ++i) total[i] = _mm512_setzero_ps();
    const int64_t end = row_ptr[o0 + c + 1];
    for (int64_t j = row_ptr[o0 + c]; j < end;) {
      for (int i = 0; i < NV; ++i) block[i] = _mm512_setzero_ps();
      for (int64_t k = 0; k < kChunks && j < end; ++k) {
        const int64_t stop = std::min(end, j + kChunk);
        for (int u = 0; u < U; ++u) {
          for (int i = 0; i < NV; ++i) acc[u][i] = _mm512_setzero_ps();
        }
        for (; j + U <= stop; j += U) {
#pragma GCC unroll 8
          for (int u = 0; u < U; ++u) {
            __m512 xv[NV];
            Lanes::load(tile + int64_t(col_idx[j + u]) * L, xv);
            const __m512 v = _mm512_set1_ps(values[j + u]);
            for (int i = 0; i < NV; ++i) acc[u][i] = _mm512_fmadd_ps(v, xv[i], acc[u][i]);
          }
        }
        for (; j < stop; ++j) {
          __m512 xv[NV];
          Lanes::load(tile + int64_t(col_idx[j]) * L, xv);
          const __m512 v = _mm512_set1_ps(values[j]);
          for (int i = 0; i < NV; ++i) acc[0][i] = _mm512_fmadd_ps(v, xv[i], acc[0][i]);
        }
        for (int w = U / 2; w >= 1; w /= 2) {  // the chains pairwise, then one add onto the block
          for (int u = 0; u < w; ++u) {
            for (int i = 0; i < NV; ++i) acc[u][i] = _mm512_add_ps(acc[u][i], acc[u + w][i]);
          }
        }
        for (int i = 0; i < NV; ++i) block[i] = _mm512_add_ps(block[i], acc[0][i]);
      }
      for (int i = 0; i < NV; ++i) total[i] = _mm512_add_ps(total[i], block[i]);
    }
    Lanes::to_lane_order(total);
    for (int i = 0; i < NV; ++i) _mm512_store_ps(stage + c * L + 16 * i, total[i]);
  }
}

template <int L, typename T>
SPARSEKERN_AVX512 void spmm_item_avx512(const SpmmArgs& a, int64_t tile, int64_t r0, int64_t r1, void* buf,
                                        bool pack) {
  using TileT = batch_tiles::tile_t<T>;
  spmm_item<L, T, TileT>(a, tile, r0, r1, buf, pack, batch_tiles::pack_tile_avx512<L, T, TileT>,
                         spmm_rows_avx512<L, TileT>, batch_tiles::store_block_avx512<L, T>);
  _mm_sfence();  // the streamed write-back is visible before the worker reports done
}
SPARSEKERN_AVX512_DIAGNOSTICS_END
#endif

using ItemFn = void (*)(const SpmmArgs&, int64_t, int64_t, int64_t, void*, bool);

// The kernel for activations of type T, and its tile width.
template <typename T>
std::pair<ItemFn, int> spmm_kernel(int64_t n_in, int64_t batch) {
  using TileT = batch_tiles::tile_t<T>;
#if defined(SPARSEKERN_BATCH_TILES_AVX512)
  if (cpu_isa() == CpuIsa::kAvx512) {
    return batch_tiles::kernel_for_lanes<TileT, ItemFn, 64>(
        n_in, batch, [](auto l) -> ItemFn { return spmm_item_avx512<l.value, T>; });
  }
#endif
#if defined(SPARSEKERN_BATCH_TILES_AVX2)
  if (cpu_isa() == CpuIsa::kAvx2) {
    return batch_tiles::kernel_for_lanes<TileT, ItemFn, 32>(
        n_in, batch, [](auto l) -> ItemFn { return spmm_item_avx2<l.value, T>; });
  }
#endif
  return {batch_tiles::by_dtype<T>(spmm_item_portable_f32, spmm_item_portable_bf16, spmm_item_portable_f16), kPL};
}

}  // namespace

at::Tensor spmm_cpu(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                    const at::Tensor& values, int64_t n_out) {
  batch_tiles::check_activation("spmm", "x", x);
  TORCH_CHECK_VALUE(n_out >= 0, "spmm: n_out must be >= 0, got ", n_out);
  const int64_t nnz = batch_tiles::check_csr("spmm", row_ptr, col_idx, n_out, x.size(1));
  TORCH_CHECK_VALUE(values.device().is_cpu(), "spmm: values must be a CPU tensor, got ", values.device());
  TORCH_CHECK_TYPE(values.scalar_type() == x.scalar_type(), "spmm: values must have x's dtype ", x.scalar_type(),
                   ", got ", values.scalar_type());
  TORCH_CHECK_VALUE(values.dim() == 1 && values.numel() == nnz && values.is_contiguous(),
                    "spmm: values must be a contiguous 1-D tensor of nnz=", nnz, " elements (one per col_idx), got ",
                    values.sizes());
  const int64_t batch = x.size(0), n_in = x.size(1);
  // A (2048, 4096) fp32 y (above glibc's mmap threshold, so mapped afresh every call) took 19 ms of faults in 4 KiB
  // pages, a quarter of the forward at 98%: huge pages there. Below the threshold glibc recycles freed memory
  // without faults, which beat fresh huge pages (768->3072, B=2048, 98%: 2.9-3.2 ms against 4.6-37 ms per call).
  at::Tensor y = empty_cpu_output({batch, n_out}, x.options(), kGlibcMmapMax);
  if (batch == 0 || n_out == 0) return y;

  const at::Tensor values_f32 = values.to(at::kFloat);
  SpmmArgs a{x.data_ptr(), y.data_ptr(), row_ptr.data_ptr<int64_t>(), col_idx.data_ptr<int32_t>(),
             values_f32.data_ptr<float>(), batch, n_in, n_out};
  batch_tiles::dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto [fn, lanes] = spmm_kernel<T>(n_in, batch);
    const batch_tiles::Split split = batch_tiles::split_work(batch, lanes, a.row_ptr, n_out);
    // one tile buffer per worker (fp32-sized, which also fits a bf16 tile); 64-byte aligned rows
    const batch_tiles::WorkerBuffers bufs(split.workers, n_in * lanes);
    batch_tiles::for_each_item(split, [&](int64_t p, int64_t tile, int64_t r0, int64_t r1, bool new_tile) {
      fn(a, tile, r0, r1, bufs[p], new_tile);
    });
  });
  return y;
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("spmm", &spmm_cpu); }

}  // namespace sparsekern

// outer_topk on CUDA: the k largest |g.T @ x| outside an excluded CSR pattern, without the dense scores. The
// algorithm of the Triton kernel (sparsekern/kernels/outer_topk.py): every pass recomputes the score tiles and
// either histograms their keys (high bits, then low bits within the selected bucket, then the rows of the keys
// equal to the k-th largest when only some of them fit) or compacts the selected positions; the host picks the
// buckets with outer_topk::select_bucket (outer_topk.h, shared with the CPU kernel) and finishes with sorts over
// O(k + n_in) entries. Built and linked in CI; not yet run on a GPU.
//
// A block owns a kTileO x kTileI tile of scores; only how it computes them depends on `fast`, what each pass does
// with them (select_tile) is shared. The batch is staged through shared memory kStageB rows at a time.
// - exact: each thread sums its kRowsPerThread x kColsPerThread scores over b in order with __fmul_rn /
//   __fadd_rn, which the compiler never fuses: the same bits as the CPU kernel, the Triton kernel and the
//   reference.
// - fast: tensor cores through WMMA (sm_80+), float32 accumulation: float32 inputs as TF32 (m16n16k8, inputs
//   rounded to TF32 when staged), bf16 / fp16 as they are (m16n16k16). Each warp owns a 16 x 16 sub-tile and
//   steps through the batch in a fixed order, so the same GPU gives the same bits every run. Rounding bound: the
//   one the Triton fast kernel documents. On a GPU older than sm_80 fast falls back to exact (warned once).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

#include "sparsekern/outer_topk.h"
#include "sparsekern/outer_topk_checks.h"
#include "sparsekern/spmm_cuda.cuh"

namespace sparsekern {
namespace {

namespace cu = csr::cuda;
namespace ot = outer_topk;

constexpr int kThreadsX = 16, kThreadsY = 16;
constexpr int kRowsPerThread = 2, kColsPerThread = 4;
constexpr int kTileO = kThreadsY * kRowsPerThread;  // 32
constexpr int kTileI = kThreadsX * kColsPerThread;  // 64
constexpr int kStageB = 32;

enum Mode : int { kHistHi = 0, kHistLo = 1, kHistTieRows = 2, kCompact = 3 };

struct PassArgs {
  int64_t batch, n_out, n_in;
  const int64_t* row_ptr;
  const int32_t* col_idx;
  unsigned long long* hist;     // histogram of this pass (kHist* modes)
  int64_t* out_above;           // kCompact: flat indices above the threshold
  int32_t* out_above_key;       // kCompact: their keys
  int64_t* out_ties;            // kCompact: flat indices equal to it, in rows <= last_tie_row
  unsigned long long* counter;  // kCompact: entries written to out_above, out_ties
  uint32_t hi;                  // kHistLo: the selected high bucket
  uint32_t threshold;           // the k-th largest key
  int64_t last_tie_row;
};

constexpr int kThreads = kThreadsX * kThreadsY;
using Scores = float[kRowsPerThread][kColsPerThread];  // a thread's scores: rows ty + 16 r, columns tx + 16 c

// Stages batch rows [b0, b0 + kStageB) of the tile's columns of g and x in shared memory as convert(value),
// zeros past the edges (zero rows and columns add nothing to any score).
template <typename scalar_t, typename T, typename Convert>
__device__ __forceinline__ void stage_chunk(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                            const PassArgs& a, int64_t b0, int64_t o0, int64_t i0,
                                            T (&gs)[kStageB][kTileO], T (&xs)[kStageB][kTileI], Convert convert) {
  const int tid = threadIdx.y * kThreadsX + threadIdx.x;
  const scalar_t zero(0.f);
  for (int e = tid; e < kStageB * kTileO; e += kThreads) {
    const int64_t b = b0 + e / kTileO, o = o0 + e % kTileO;
    gs[e / kTileO][e % kTileO] = convert(b < a.batch && o < a.n_out ? g[b * a.n_out + o] : zero);
  }
  for (int e = tid; e < kStageB * kTileI; e += kThreads) {
    const int64_t b = b0 + e / kTileI, i = i0 + e % kTileI;
    xs[e / kTileI][e % kTileI] = convert(b < a.batch && i < a.n_in ? x[b * a.n_in + i] : zero);
  }
}

// Exact scores: in order over b, a rounded product and a rounded sum per step.
template <typename scalar_t>
__device__ __forceinline__ void exact_tile(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                           const PassArgs& a, int64_t o0, int64_t i0, Scores& acc) {
  __shared__ float gs[kStageB][kTileO];
  __shared__ float xs[kStageB][kTileI];
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int64_t b0 = 0; b0 < a.batch; b0 += kStageB) {
    stage_chunk(x, g, a, b0, o0, i0, gs, xs, [](scalar_t v) { return static_cast<float>(v); });
    __syncthreads();
    const int steps = a.batch - b0 < kStageB ? static_cast<int>(a.batch - b0) : kStageB;
    for (int bb = 0; bb < steps; ++bb) {
#pragma unroll
      for (int r = 0; r < kRowsPerThread; ++r) {
        const float gv = gs[bb][ty + kThreadsY * r];
#pragma unroll
        for (int c = 0; c < kColsPerThread; ++c) {
          acc[r][c] = __fadd_rn(acc[r][c], __fmul_rn(gv, xs[bb][tx + kThreadsX * c]));  // never fused
        }
      }
    }
    __syncthreads();
  }
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
namespace wmma = nvcuda::wmma;

// The WMMA shape and element type per input dtype; stage() converts an element for shared memory.
template <typename scalar_t>
struct Mma;
template <>
struct Mma<float> {
  using elem = wmma::precision::tf32;
  using smem_t = float;
  static constexpr int K = 8;
  __device__ static float stage(float v) { return wmma::__float_to_tf32(v); }  // WMMA wants TF32-rounded inputs
};
template <>
struct Mma<c10::Half> {
  using elem = __half;
  using smem_t = __half;
  static constexpr int K = 16;
  __device__ static __half stage(c10::Half v) { return __ushort_as_half(v.x); }
};
template <>
struct Mma<c10::BFloat16> {
  using elem = __nv_bfloat16;
  using smem_t = __nv_bfloat16;
  static constexpr int K = 16;
  __device__ static __nv_bfloat16 stage(c10::BFloat16 v) { return __ushort_as_bfloat16(v.x); }
};
#endif

constexpr int kMmaTile = 16;  // a warp's WMMA sub-tile is 16 x 16
static_assert((kTileO / kMmaTile) * (kTileI / kMmaTile) * 32 == kThreads, "one 16 x 16 sub-tile per warp");
static_assert(kStageB % 16 == 0, "a staged batch chunk is a whole number of WMMA k-steps");

// Fast scores: G[:, tile].T @ X[:, tile] on tensor cores, the batch in kStageB-row chunks, zero rows past B.
template <typename scalar_t>
__device__ __forceinline__ void fast_tile(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                          const PassArgs& a, int64_t o0, int64_t i0, Scores& acc) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using M = Mma<scalar_t>;
  using T = typename M::smem_t;
  // WMMA loads want 256-bit aligned pointers; the leading dimensions are multiples of 16 bytes.
  __shared__ __align__(32) T gs[kStageB][kTileO];  // (b, o): A = G.T is column-major with ld kTileO
  __shared__ __align__(32) T xs[kStageB][kTileI];  // (b, i): B = X is row-major with ld kTileI
  __shared__ __align__(32) float cs[kTileO][kTileI];
  const int tid = threadIdx.y * kThreadsX + threadIdx.x, warp = tid / 32;
  const int wo = warp / (kTileI / kMmaTile) * kMmaTile, wi = warp % (kTileI / kMmaTile) * kMmaTile;
  wmma::fragment<wmma::accumulator, kMmaTile, kMmaTile, M::K, float> c_frag;
  wmma::fill_fragment(c_frag, 0.f);
  for (int64_t b0 = 0; b0 < a.batch; b0 += kStageB) {
    stage_chunk(x, g, a, b0, o0, i0, gs, xs, [](scalar_t v) { return M::stage(v); });
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kStageB; kk += M::K) {
      wmma::fragment<wmma::matrix_a, kMmaTile, kMmaTile, M::K, typename M::elem, wmma::col_major> a_frag;
      wmma::fragment<wmma::matrix_b, kMmaTile, kMmaTile, M::K, typename M::elem, wmma::row_major> b_frag;
      wmma::load_matrix_sync(a_frag, &gs[kk][wo], kTileO);
      wmma::load_matrix_sync(b_frag, &xs[kk][wi], kTileI);
      wmma::mma_sync(c_frag, a_frag, b_frag, c_frag);
    }
    __syncthreads();
  }
  // The accumulator's element-to-lane layout is opaque: through shared memory to the layout select_tile reads.
  wmma::store_matrix_sync(&cs[wo][wi], c_frag, kTileI, wmma::mem_row_major);
  __syncthreads();
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) acc[r][c] = cs[threadIdx.y + kThreadsY * r][threadIdx.x + kThreadsX * c];
  }
#else
  __trap();  // never launched: the host takes the exact path below sm_80
#endif
}

// What a pass does with a thread's scores; the same for exact and fast.
template <int MODE>
__device__ __forceinline__ void select_tile(const PassArgs& a, int64_t o0, int64_t i0, const Scores& acc) {
  const int tx = threadIdx.x, ty = threadIdx.y;
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int64_t o = o0 + ty + kThreadsY * r;
    if (o >= a.n_out) continue;
    const int64_t start = a.row_ptr[o], end = a.row_ptr[o + 1];
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) {
      const int64_t i = i0 + tx + kThreadsX * c;
      if (i >= a.n_in) continue;
      const int64_t e = ot::lower_bound(a.col_idx, start, end, i);
      if (e < end && a.col_idx[e] == i) continue;  // excluded
      const uint32_t key = ot::key_of_bits(__float_as_uint(acc[r][c]));
      if (MODE == kHistHi) {
        atomicAdd(a.hist + (key > ot::kInfKey ? ot::kHiBins : key >> ot::kLoBits), 1ull);
      } else if (MODE == kHistLo) {
        if (key >> ot::kLoBits == a.hi) atomicAdd(a.hist + (key & (ot::kLoBins - 1)), 1ull);
      } else if (MODE == kHistTieRows) {
        if (key == a.threshold) atomicAdd(a.hist + o, 1ull);
      } else {
        // slots are claimed in a varying order; the host's sorts make the result independent of it
        const int64_t flat = o * a.n_in + i;
        if (key > a.threshold) {
          const unsigned long long slot = atomicAdd(a.counter, 1ull);
          a.out_above[slot] = flat;
          a.out_above_key[slot] = static_cast<int32_t>(key);
        } else if (key == a.threshold && o <= a.last_tie_row) {
          a.out_ties[atomicAdd(a.counter + 1, 1ull)] = flat;
        }
      }
    }
  }
}

template <typename scalar_t, bool FAST, int MODE>
__global__ void __launch_bounds__(kThreads)
    outer_topk_pass_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g, PassArgs a) {
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kTileO, i0 = static_cast<int64_t>(blockIdx.x) * kTileI;
  float acc[kRowsPerThread][kColsPerThread] = {};
  if constexpr (FAST) {
    fast_tile(x, g, a, o0, i0, acc);
  } else {
    exact_tile(x, g, a, o0, i0, acc);
  }
  select_tile<MODE>(a, o0, i0, acc);
}

template <typename scalar_t, bool FAST>
void launch_mode(int mode, dim3 grid, dim3 block, cudaStream_t stream, const scalar_t* x, const scalar_t* g,
                 const PassArgs& a) {
  switch (mode) {
    case kHistHi: outer_topk_pass_kernel<scalar_t, FAST, kHistHi><<<grid, block, 0, stream>>>(x, g, a); break;
    case kHistLo: outer_topk_pass_kernel<scalar_t, FAST, kHistLo><<<grid, block, 0, stream>>>(x, g, a); break;
    case kHistTieRows:
      outer_topk_pass_kernel<scalar_t, FAST, kHistTieRows><<<grid, block, 0, stream>>>(x, g, a);
      break;
    default: outer_topk_pass_kernel<scalar_t, FAST, kCompact><<<grid, block, 0, stream>>>(x, g, a); break;
  }
}

template <typename scalar_t>
void launch_pass(int mode, bool fast, const at::Tensor& x, const at::Tensor& g, const PassArgs& a) {
  const dim3 block(kThreadsX, kThreadsY);
  const dim3 grid(cu::grid_x("outer_topk", (a.n_in + kTileI - 1) / kTileI),
                  cu::grid_y("outer_topk", (a.n_out + kTileO - 1) / kTileO));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* gp = g.data_ptr<scalar_t>();
  if (fast) {
    launch_mode<scalar_t, true>(mode, grid, block, stream, xp, gp, a);
  } else {
    launch_mode<scalar_t, false>(mode, grid, block, stream, xp, gp, a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether the device has the tensor-core shapes fast uses (TF32 and bf16 WMMA: sm_80 and newer).
bool has_tf32_wmma(c10::DeviceIndex device) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 8;
}

// The bucket holding the k-th largest key of a histogram computed on the device (read back to the host).
int select_on_host(const at::Tensor& hist, int n_buckets, int64_t k, int64_t* above) {
  const at::Tensor counts = hist.cpu();
  return ot::select_bucket(counts.data_ptr<int64_t>(), n_buckets, k, above);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> outer_topk_cuda(const at::Tensor& x, const at::Tensor& g, int64_t k,
                                                   const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                                   bool fast) {
  constexpr const char* fn = "outer_topk";
  TORCH_CHECK_VALUE(x.is_cuda(), fn, ": x must be a CUDA tensor, got one on ", x.device());
  cu::check_matrix(fn, "x", x);
  cu::check_matrix(fn, "g", g);
  cu::check_on(fn, "g", g, x.device());
  ot::check_sizes(fn, x, g);
  const int64_t batch = x.size(0), n_in = x.size(1), n_out = g.size(1);
  cu::check_csr(fn, row_ptr, col_idx, n_out, x.device());
  const int64_t n_candidates = n_out * n_in - col_idx.numel();
  ot::check_k(fn, k, n_candidates);

  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto i64 = x.options().dtype(at::kLong);
  if (k == 0) return {at::empty({0}, i64), at::empty({0}, x.options().dtype(at::kFloat))};
  if (fast && !has_tf32_wmma(x.device().index())) {
    TORCH_WARN_ONCE(fn, ": precision='fast' needs tensor cores with TF32 / bf16 (sm_80 or newer); this GPU takes "
                    "the exact path");
    fast = false;
  }
  at::Tensor index, score;
  cu::dispatch_float(x.scalar_type(), "outer_topk: x", [&](auto tag) {
    using scalar_t = decltype(tag);
    PassArgs a{batch, n_out, n_in, row_ptr.data_ptr<int64_t>(), col_idx.data_ptr<int32_t>()};

    at::Tensor hist_hi = at::zeros({ot::kHiBins + 1}, i64);  // + a bin counting NaN keys
    a.hist = reinterpret_cast<unsigned long long*>(hist_hi.data_ptr<int64_t>());
    launch_pass<scalar_t>(kHistHi, fast, x, g, a);
    TORCH_CHECK_VALUE(hist_hi[ot::kHiBins].item<int64_t>() == 0, fn,
                      ": a score overflowed float32 to NaN (inf - inf); scale x or g down");
    int64_t above_hi = 0, above_lo = 0;
    a.hi = static_cast<uint32_t>(select_on_host(hist_hi, ot::kHiBins, k, &above_hi));

    at::Tensor hist_lo = at::zeros({ot::kLoBins}, i64);
    a.hist = reinterpret_cast<unsigned long long*>(hist_lo.data_ptr<int64_t>());
    launch_pass<scalar_t>(kHistLo, fast, x, g, a);
    const int lo = select_on_host(hist_lo, ot::kLoBins, k - above_hi, &above_lo);
    a.threshold = a.hi << ot::kLoBits | static_cast<uint32_t>(lo);
    const int64_t n_above = above_hi + above_lo, need = k - n_above;
    int64_t n_ties = hist_lo[lo].item<int64_t>();
    a.last_tie_row = n_out - 1;
    if (need < n_ties) {  // keep ties only in the rows holding the `need` lowest flat indices among them
      at::Tensor tie_rows = at::zeros({n_out}, i64);
      a.hist = reinterpret_cast<unsigned long long*>(tie_rows.data_ptr<int64_t>());
      launch_pass<scalar_t>(kHistTieRows, fast, x, g, a);
      const at::Tensor through = tie_rows.cumsum(0);
      a.last_tie_row = (through >= need).nonzero().min().item<int64_t>();
      n_ties = through[a.last_tie_row].item<int64_t>();
    }
    at::Tensor above = at::empty({n_above}, i64), above_key = at::empty({n_above}, x.options().dtype(at::kInt));
    at::Tensor ties = at::empty({n_ties}, i64), counter = at::zeros({2}, i64);
    a.out_above = above.data_ptr<int64_t>();
    a.out_above_key = above_key.data_ptr<int32_t>();
    a.out_ties = ties.data_ptr<int64_t>();
    a.counter = reinterpret_cast<unsigned long long*>(counter.data_ptr<int64_t>());
    launch_pass<scalar_t>(kCompact, fast, x, g, a);

    const at::Tensor kept_ties = std::get<0>(ties.sort()).slice(0, 0, need);
    const at::Tensor all_index = at::cat({above, kept_ties});
    const at::Tensor all_key =
        at::cat({above_key, at::full({need}, static_cast<int64_t>(a.threshold), x.options().dtype(at::kInt))});
    // by index, then stably by key descending: equal scores keep ascending flat index
    const at::Tensor by_index = std::get<1>(all_index.sort());
    const at::Tensor order =
        by_index.index_select(0, std::get<1>(all_key.index_select(0, by_index).sort(true, 0, true)));
    index = all_index.index_select(0, order);
    score = all_key.index_select(0, order).view(at::kFloat);
  });
  return {index, score};
}

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) { m.impl("outer_topk", &outer_topk_cuda); }

}  // namespace sparsekern

// ELL SDDMM on CUDA: the gradient of a constant fan-in weight's values, out[o, t] = sum_b g[b, o] * x[b, cols[o, t]].
// Two schedules, by batch size, both deterministic (a fixed summation order per output), fp32 accumulation:
// - batch > kSmallBatch: one warp per (row o, kGroup consecutive nonzeros of it); lanes run over the batch of the
//   batch-contiguous g and x (transposed to (n_out, B) and (n_in, B)), so every load is coalesced; each lane loads
//   g[o, b] once and uses it for all kGroup nonzeros (kGroup independent gathers in flight), and the kGroup sums are
//   reduced with warp shuffles at the end. The equal rows give every warp the same work.
// - batch <= kSmallBatch (online): one thread per nonzero over the (B, n) layouts, nothing transposed.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "sparsekern/ell_cuda.cuh"

namespace sparsekern {
namespace {

namespace cu = csr::cuda;
namespace ec = ell::cuda;

constexpr int kGroup = 8;  // nonzeros of one row per warp
constexpr int kThreads = ec::kThreads;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    ell_sddmm_batch_kernel(const scalar_t* __restrict__ gt,  // (n_out, batch)
                           const scalar_t* __restrict__ xt,  // (n_in, batch)
                           const int32_t* __restrict__ cols, scalar_t* __restrict__ out, int64_t n_out, int64_t k,
                           int64_t batch) {
  const int lane = static_cast<int>(threadIdx.x) % cu::kWarp;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * ec::kWarpsPerBlock + threadIdx.x / cu::kWarp;
  const int64_t groups = (k + kGroup - 1) / kGroup;
  const int64_t o = warp / groups;
  if (o >= n_out) return;  // whole warps leave together
  const int64_t t0 = (warp - o * groups) * kGroup;
  const int count = k - t0 < kGroup ? static_cast<int>(k - t0) : kGroup;
  const scalar_t* __restrict__ g_row = gt + o * batch;
  const scalar_t* __restrict__ x_row[kGroup];
  float acc[kGroup];
#pragma unroll
  for (int q = 0; q < kGroup; ++q) {
    // Slots past the row's end (k not a multiple of kGroup) point at its last nonzero and are skipped.
    const int64_t t = t0 + (q < count ? q : count - 1);
    x_row[q] = xt + static_cast<int64_t>(cols[o * k + t]) * batch;
    acc[q] = 0.f;
  }
  for (int64_t b = lane; b < batch; b += cu::kWarp) {
    const float gv = static_cast<float>(g_row[b]);
#pragma unroll
    for (int q = 0; q < kGroup; ++q) {
      if (q < count) acc[q] += gv * static_cast<float>(x_row[q][b]);  // count is warp-uniform: no divergence
    }
  }
#pragma unroll
  for (int q = 0; q < kGroup; ++q) acc[q] = cu::warp_sum(acc[q]);
  float mine = 0.f;
#pragma unroll
  for (int q = 0; q < kGroup; ++q) mine = lane == q ? acc[q] : mine;
  if (lane < count) out[o * k + t0 + lane] = static_cast<scalar_t>(mine);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    ell_sddmm_small_kernel(const scalar_t* __restrict__ g,  // (batch, n_out)
                           const scalar_t* __restrict__ x,  // (batch, n_in)
                           const int32_t* __restrict__ cols, scalar_t* __restrict__ out, int64_t n_out,
                           int64_t n_in, int64_t k, int64_t batch) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= n_out * k) return;
  const int64_t o = j / k;
  const int64_t c = cols[j];
  float acc = 0.f;
  for (int64_t b = 0; b < batch; ++b) acc += static_cast<float>(g[b * n_out + o]) * static_cast<float>(x[b * n_in + c]);
  out[j] = static_cast<scalar_t>(acc);
}

}  // namespace

at::Tensor ell_sddmm_cuda(const at::Tensor& g, const at::Tensor& x, const at::Tensor& cols) {
  constexpr const char* fn = "ell_sddmm";
  TORCH_CHECK_VALUE(g.is_cuda(), fn, ": g must be a CUDA tensor, got one on ", g.device());
  cu::check_matrix(fn, "g", g);
  cu::check_matrix(fn, "x", x);
  cu::check_on(fn, "x", x, g.device());
  TORCH_CHECK_TYPE(x.scalar_type() == g.scalar_type(), fn, ": x must have g's dtype ", g.scalar_type(), ", got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.size(0) == g.size(0), fn, ": g and x must have the same batch size, got ", g.size(0), " and ",
                    x.size(0));
  ec::check_cols(fn, cols, g.device());
  TORCH_CHECK_VALUE(g.size(1) == cols.size(0), fn, ": g must have one column per row of cols (", cols.size(0),
                    "), got ", g.size(1));

  const c10::cuda::CUDAGuard device_guard(g.device());
  const int64_t batch = g.size(0), n_out = cols.size(0), k = cols.size(1), n_in = x.size(1);
  at::Tensor out;
  cu::dispatch_float(g.scalar_type(), "ell_sddmm: g", [&](auto tag) {
    using scalar_t = decltype(tag);
    if (batch == 0 || n_out == 0 || k == 0) {
      out = at::zeros({n_out, k}, g.options());
      return;
    }
    out = at::empty({n_out, k}, g.options());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    if (batch <= ec::kSmallBatch) {
      const unsigned blocks = cu::grid_x(fn, (n_out * k + kThreads - 1) / kThreads);
      ell_sddmm_small_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), cols.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), n_out,
          n_in, k, batch);
    } else {
      const at::Tensor gt = g.t().contiguous();
      const at::Tensor xt = x.t().contiguous();
      const int64_t warps = n_out * ((k + kGroup - 1) / kGroup);
      const unsigned blocks = cu::grid_x(fn, (warps + ec::kWarpsPerBlock - 1) / ec::kWarpsPerBlock);
      ell_sddmm_batch_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          gt.data_ptr<scalar_t>(), xt.data_ptr<scalar_t>(), cols.data_ptr<int32_t>(), out.data_ptr<scalar_t>(),
          n_out, k, batch);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) { m.impl("ell_sddmm", &ell_sddmm_cuda); }

}  // namespace sparsekern

// SpMM on CUDA, the sparse path: y = x @ W.T for a CSR weight W (n_out, n_in); also dX = g @ W through the
// transposed (CSC) index. One warp computes one output row for a tile of kLanesBatch batch columns: the warp
// loads 32 nonzeros of its row at a time (col_idx and values, one coalesced load each), broadcasts each with a
// shuffle, and every lane accumulates kPerLane batch columns in fp32 from the batch-contiguous x.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "sparsekern/spmm_cuda.cuh"

namespace sparsekern {
namespace {

namespace cu = csr::cuda;

constexpr int kWarpsPerBlock = 4;  // one output row per warp
constexpr int kThreads = kWarpsPerBlock * cu::kWarp;
constexpr int kPerLane = 4;  // independent accumulators per lane: memory-level parallelism for the gathers
constexpr int kLanesBatch = kPerLane * cu::kWarp;  // batch columns per warp

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    spmm_kernel(const scalar_t* __restrict__ xt,  // (n_in, batch)
                const int64_t* __restrict__ row_ptr, const int32_t* __restrict__ col_idx,
                const scalar_t* __restrict__ values,
                scalar_t* __restrict__ yt,  // (n_out, batch)
                int64_t n_out, int64_t batch) {
  const int lane = static_cast<int>(threadIdx.x) % cu::kWarp;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / cu::kWarp;
  if (o >= n_out) return;  // whole warps leave together, so the shuffles below always see 32 lanes
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * kLanesBatch + lane;
  const int64_t start = row_ptr[o], end = row_ptr[o + 1];

  // Lanes past the batch read the last column instead (batch > 0) and skip only the store: no predicate in the
  // inner loop.
  int64_t bcol[kPerLane];
  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int64_t b = b0 + i * cu::kWarp;
    bcol[i] = b < batch ? b : batch - 1;
    acc[i] = 0.f;
  }

  for (int64_t base = start; base < end; base += cu::kWarp) {
    const int64_t j = base + lane;
    int32_t lane_col = 0;
    float lane_val = 0.f;
    if (j < end) {
      lane_col = col_idx[j];
      lane_val = static_cast<float>(values[j]);
    }
    const int count = end - base < cu::kWarp ? static_cast<int>(end - base) : cu::kWarp;  // the same on all lanes
#pragma unroll 4
    for (int k = 0; k < count; ++k) {
      const int64_t c = __shfl_sync(cu::kFullMask, lane_col, k);
      const float v = __shfl_sync(cu::kFullMask, lane_val, k);
      const scalar_t* __restrict__ xrow = xt + c * batch;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[i] += v * static_cast<float>(xrow[bcol[i]]);
    }
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int64_t b = b0 + i * cu::kWarp;
    if (b < batch) yt[o * batch + b] = static_cast<scalar_t>(acc[i]);
  }
}

}  // namespace

at::Tensor spmm_cuda(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                     const at::Tensor& values, int64_t n_out) {
  constexpr const char* fn = "spmm";
  TORCH_CHECK_VALUE(x.is_cuda(), fn, ": x must be a CUDA tensor, got one on ", x.device());
  cu::check_matrix(fn, "x", x);
  TORCH_CHECK_VALUE(n_out >= 0, fn, ": n_out must be >= 0, got ", n_out);
  cu::check_csr(fn, row_ptr, col_idx, n_out, x.device());
  TORCH_CHECK_TYPE(values.scalar_type() == x.scalar_type(), fn, ": values must have x's dtype ", x.scalar_type(),
                   ", got ", values.scalar_type());
  TORCH_CHECK_VALUE(values.dim() == 1 && values.numel() == col_idx.numel(), fn,
                    ": values must be 1-D with one entry per col_idx entry (", col_idx.numel(), "), got shape ",
                    values.sizes());
  TORCH_CHECK_VALUE(values.is_contiguous(), fn, ": values must be contiguous");
  cu::check_on(fn, "values", values, x.device());

  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t batch = x.size(0);
  at::Tensor y;
  cu::dispatch_float(x.scalar_type(), "spmm: x", [&](auto tag) {
    using scalar_t = decltype(tag);
    if (batch == 0 || n_out == 0 || col_idx.numel() == 0) {
      y = at::zeros({batch, n_out}, x.options());
      return;
    }
    const at::Tensor xt = x.t().contiguous();
    at::Tensor yt = at::empty({n_out, batch}, x.options());
    const dim3 grid(cu::grid_x(fn, (n_out + kWarpsPerBlock - 1) / kWarpsPerBlock),
                    cu::grid_y(fn, (batch + kLanesBatch - 1) / kLanesBatch));
    spmm_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        xt.data_ptr<scalar_t>(), row_ptr.data_ptr<int64_t>(), col_idx.data_ptr<int32_t>(),
        values.data_ptr<scalar_t>(), yt.data_ptr<scalar_t>(), n_out, batch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    y = yt.t().contiguous();
  });
  return y;
}

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) { m.impl("spmm", &spmm_cuda); }

}  // namespace sparsekern

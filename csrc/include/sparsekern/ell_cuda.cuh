// Pieces shared by the CUDA ELL (constant fan-in) kernels: argument checks and the two gather kernels that compute
// out[b, r] = sum over the nonzeros j of row r of val(j) * src[b, col(j)] for a row source `Rows`:
// - EllRows: the ELL weight itself (row r holds cols[r, :] / values[r, :]; no row_ptr), for ell_spmm;
// - TransposedEllRows: W's transposed index (column i of W holds perm[col_ptr[i]:col_ptr[i+1]], flat positions
//   o * k + t into cols / values), for ell_spmm_t, which is then a gather: deterministic, no atomics.
//
// Two schedules, chosen by batch size:
// - batch_lanes_kernel (batch > kSmallBatch): one warp per output row, lanes over the batch of the batch-contiguous
//   source (src transposed to (n_src, batch): 32 consecutive elements per nonzero, coalesced whatever the columns),
//   kPerLane independent fp32 accumulators per lane. The warp loads 32 nonzeros of its row at a time (one coalesced
//   load of cols and values for EllRows) and broadcasts each with a shuffle.
// - nonzero_lanes_kernel (batch <= kSmallBatch, online inference): one warp per output row, lanes over the row's
//   nonzeros, NB batch columns per warp accumulated in registers and reduced with warp shuffles; src stays in its
//   (batch, n_src) layout, so nothing is transposed and no lane idles on batch columns that do not exist.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "sparsekern/spmm_cuda.cuh"

namespace sparsekern {
namespace ell {
namespace cuda {

namespace cu = csr::cuda;

constexpr int kSmallBatch = 16;  // at most this many batch columns: nonzero_lanes_kernel
constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarpsPerBlock * cu::kWarp;

// cols: int32 (n_out, k), contiguous, on `device`. The contents (range, order) are the caller's contract: reading
// them would synchronise with the device; the Python entry points validate every index once before any launch.
inline void check_cols(const char* fn, const at::Tensor& cols, const at::Device& device) {
  TORCH_CHECK_TYPE(cols.scalar_type() == at::kInt, fn, ": cols must be int32, got ", cols.scalar_type());
  TORCH_CHECK_VALUE(cols.dim() == 2, fn, ": cols must be 2-D (n_out, k), got ", cols.dim(), "-D");
  TORCH_CHECK_VALUE(cols.is_contiguous(), fn, ": cols must be contiguous");
  cu::check_on(fn, "cols", cols, device);
}

// values: (n_out, k) like cols, in `dtype`, contiguous, on `device`.
inline void check_values(const char* fn, const at::Tensor& values, const at::Tensor& cols, at::ScalarType dtype,
                         const char* dtype_of, const at::Device& device) {
  TORCH_CHECK_TYPE(values.scalar_type() == dtype, fn, ": values must have ", dtype_of, "'s dtype ", dtype, ", got ",
                   values.scalar_type());
  TORCH_CHECK_VALUE(values.sizes() == cols.sizes(), fn, ": values must have cols' shape ", cols.sizes(), ", got ",
                    values.sizes());
  TORCH_CHECK_VALUE(values.is_contiguous(), fn, ": values must be contiguous");
  cu::check_on(fn, "values", values, device);
}

template <typename scalar_t>
struct EllRows {
  const int32_t* __restrict__ cols;
  const scalar_t* __restrict__ values;
  int64_t k;
  __device__ __forceinline__ int64_t begin(int64_t r) const { return r * k; }
  __device__ __forceinline__ int64_t end(int64_t r) const { return r * k + k; }
  __device__ __forceinline__ void get(int64_t j, int32_t& col, float& val) const {
    col = cols[j];
    val = static_cast<float>(values[j]);
  }
};

template <typename scalar_t, typename index_t>
struct TransposedEllRows {
  const int64_t* __restrict__ col_ptr;  // (n_in + 1)
  const index_t* __restrict__ perm;     // (nnz): flat positions o * k + t, input column by input column
  const scalar_t* __restrict__ values;  // (n_out * k)
  int64_t k;
  __device__ __forceinline__ int64_t begin(int64_t r) const { return col_ptr[r]; }
  __device__ __forceinline__ int64_t end(int64_t r) const { return col_ptr[r + 1]; }
  __device__ __forceinline__ void get(int64_t j, int32_t& col, float& val) const {
    const int64_t p = static_cast<int64_t>(perm[j]);
    col = static_cast<int32_t>(p / k);  // the output row o: the "column" of the transposed weight
    val = static_cast<float>(values[p]);
  }
};

// outt (n_rows, batch): outt[r, b] = sum_{j in row r} val(j) * srct[col(j), b]; srct is (n_src, batch).
template <typename scalar_t, typename Rows, int kPerLane>
__global__ void __launch_bounds__(kThreads)
    batch_lanes_kernel(const scalar_t* __restrict__ srct, Rows rows, scalar_t* __restrict__ outt, int64_t n_rows,
                       int64_t batch) {
  const int lane = static_cast<int>(threadIdx.x) % cu::kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / cu::kWarp;
  if (r >= n_rows) return;  // whole warps leave together, so the shuffles below always see 32 lanes
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * (kPerLane * cu::kWarp) + lane;
  const int64_t start = rows.begin(r), end = rows.end(r);

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
    if (j < end) rows.get(j, lane_col, lane_val);
    const int count = end - base < cu::kWarp ? static_cast<int>(end - base) : cu::kWarp;  // the same on all lanes
#pragma unroll 4
    for (int q = 0; q < count; ++q) {
      const int64_t c = __shfl_sync(cu::kFullMask, lane_col, q);
      const float v = __shfl_sync(cu::kFullMask, lane_val, q);
      const scalar_t* __restrict__ src_row = srct + c * batch;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[i] += v * static_cast<float>(src_row[bcol[i]]);
    }
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int64_t b = b0 + i * cu::kWarp;
    if (b < batch) outt[r * batch + b] = static_cast<scalar_t>(acc[i]);
  }
}

// out (batch, n_rows): out[b, r] = sum_{j in row r} val(j) * src[b, col(j)] for the NB batch columns from
// blockIdx.y * NB; src is (batch, n_src).
template <typename scalar_t, typename Rows, int NB>
__global__ void __launch_bounds__(kThreads)
    nonzero_lanes_kernel(const scalar_t* __restrict__ src, Rows rows, scalar_t* __restrict__ out, int64_t n_rows,
                         int64_t n_src, int64_t batch) {
  const int lane = static_cast<int>(threadIdx.x) % cu::kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / cu::kWarp;
  if (r >= n_rows) return;  // whole warps leave together
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * NB;
  const int nb = batch - b0 < NB ? static_cast<int>(batch - b0) : NB;
  float acc[NB];
#pragma unroll
  for (int i = 0; i < NB; ++i) acc[i] = 0.f;
  const int64_t start = rows.begin(r), end = rows.end(r);
  for (int64_t j = start + lane; j < end; j += cu::kWarp) {
    int32_t c;
    float v;
    rows.get(j, c, v);
    const scalar_t* __restrict__ src_col = src + b0 * n_src + c;
#pragma unroll
    for (int i = 0; i < NB; ++i) {
      if (i < nb) acc[i] += v * static_cast<float>(src_col[i * n_src]);
    }
  }
#pragma unroll
  for (int i = 0; i < NB; ++i) acc[i] = cu::warp_sum(acc[i]);
  // Lane i stores batch column b0 + i (the sums are on every lane after the xor reduction).
  float mine = 0.f;
#pragma unroll
  for (int i = 0; i < NB; ++i) mine = lane == i ? acc[i] : mine;
  if (lane < nb) out[(b0 + lane) * n_rows + r] = static_cast<scalar_t>(mine);
}

// Launches the schedule that fits `batch` for out (batch, n_rows) from src (batch, n_src). batch > 0, n_rows > 0.
template <typename scalar_t, typename Rows>
at::Tensor launch_gather(const char* fn, const at::Tensor& src, const Rows& rows, int64_t n_rows, cudaStream_t stream) {
  const int64_t batch = src.size(0), n_src = src.size(1);
  const int64_t row_blocks = (n_rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (batch <= kSmallBatch) {
    at::Tensor out = at::empty({batch, n_rows}, src.options());
    const scalar_t* s = src.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    if (batch <= 4) {
      const dim3 grid(cu::grid_x(fn, row_blocks), cu::grid_y(fn, (batch + 3) / 4));
      nonzero_lanes_kernel<scalar_t, Rows, 4><<<grid, kThreads, 0, stream>>>(s, rows, o, n_rows, n_src, batch);
    } else {
      const dim3 grid(cu::grid_x(fn, row_blocks), cu::grid_y(fn, (batch + 7) / 8));
      nonzero_lanes_kernel<scalar_t, Rows, 8><<<grid, kThreads, 0, stream>>>(s, rows, o, n_rows, n_src, batch);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  const at::Tensor srct = src.t().contiguous();
  at::Tensor outt = at::empty({n_rows, batch}, src.options());
  const scalar_t* s = srct.data_ptr<scalar_t>();
  scalar_t* o = outt.data_ptr<scalar_t>();
  if (batch <= 32) {
    const dim3 grid(cu::grid_x(fn, row_blocks), 1);
    batch_lanes_kernel<scalar_t, Rows, 1><<<grid, kThreads, 0, stream>>>(s, rows, o, n_rows, batch);
  } else if (batch <= 64) {
    const dim3 grid(cu::grid_x(fn, row_blocks), 1);
    batch_lanes_kernel<scalar_t, Rows, 2><<<grid, kThreads, 0, stream>>>(s, rows, o, n_rows, batch);
  } else {
    const dim3 grid(cu::grid_x(fn, row_blocks), cu::grid_y(fn, (batch + 127) / 128));
    batch_lanes_kernel<scalar_t, Rows, 4><<<grid, kThreads, 0, stream>>>(s, rows, o, n_rows, batch);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return outt.t().contiguous();
}

}  // namespace cuda
}  // namespace ell
}  // namespace sparsekern

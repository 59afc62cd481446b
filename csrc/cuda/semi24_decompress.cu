// The exact inverse of semi24_compress on CUDA: one thread per metadata element reads it and its 16 packed bytes
// and writes the 32 dense bytes it covers in full (kept values where the codes say, +0 elsewhere), so no
// separate zero-fill pass is needed. Same output and errors as the CPU kernel.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#include "sparsekern/semi24.h"
#include "sparsekern/semi24_cuda.cuh"
#include "sparsekern/semi24_dispatch.h"

namespace sparsekern {
namespace {

namespace cu = semi24::cuda;

template <typename Fmt>
__global__ void __launch_bounds__(cu::kThreads)
    decompress_kernel(const uint4* __restrict__ packed, const typename Fmt::Meta* __restrict__ meta,
                      uint4* __restrict__ dense, int64_t m, int64_t k_meta,
                      unsigned long long* __restrict__ first_bad) {
  using Word = cu::GroupWord<Fmt>;
  int64_t r, c;
  if (!cu::thread_elem(Fmt::kMetaInt32, m, k_meta, r, c)) return;

  const int64_t tile = r * k_meta + c;  // in units of this thread's 32 dense / 16 packed bytes
  const uint32_t word = static_cast<uint32_t>(meta[semi24::meta_offset(r, c, m, Fmt::kMetaInt32)]);
  const uint4 in4 = packed[tile];
  const uint32_t in[4] = {in4.x, in4.y, in4.z, in4.w};

  Word groups[Fmt::kCodes];
  int first = -1;
#pragma unroll
  for (int j = 0; j < Fmt::kCodes; ++j) {
    const uint32_t code = (word >> (4 * j)) & 0xfu;
    Word w = 0;
    if (!semi24::code_valid(code, Fmt::kPairs)) {
      if (first < 0) first = j;
    } else if constexpr (Fmt::kPairs) {
      w = cu::group_with<Fmt>(w, semi24::code_idx0(code) / 2, cu::packed_get<Fmt>(in, j));
    } else {
      w = cu::group_with<Fmt>(w, semi24::code_idx0(code), cu::packed_get<Fmt>(in, 2 * j));
      w = cu::group_with<Fmt>(w, semi24::code_idx1(code), cu::packed_get<Fmt>(in, 2 * j + 1));
    }
    groups[j] = w;
  }
  if (first >= 0) atomicMin(first_bad, static_cast<unsigned long long>(tile * Fmt::kCodes + first));

  uint4 out[2];
  static_assert(sizeof(groups) == sizeof(out), "one metadata element covers 32 dense bytes");
  memcpy(out, groups, sizeof(out));
  dense[2 * tile] = out[0];
  dense[2 * tile + 1] = out[1];
}

}  // namespace

at::Tensor semi24_decompress_cuda(const at::Tensor& packed_in, const at::Tensor& meta) {
  TORCH_CHECK_VALUE(packed_in.dim() == 2 && meta.dim() == 2, "semi24_decompress: packed and meta must be 2-D");
  TORCH_CHECK_VALUE(packed_in.is_contiguous() && meta.is_contiguous(),
                    "semi24_decompress: packed and meta must be contiguous");
  TORCH_CHECK_VALUE(packed_in.is_cuda() && meta.device() == packed_in.device(),
                    "semi24_decompress: packed and meta must be on one CUDA device, got ", packed_in.device(),
                    " and ", meta.device());
  const c10::cuda::CUDAGuard device_guard(packed_in.device());
  const int64_t m = packed_in.size(0), k = packed_in.size(1) * 2;
  at::Tensor dense = at::empty({m, k}, packed_in.options());
  semi24::dispatch_format(packed_in.scalar_type(), "semi24_decompress: packed", [&](auto fmt) {
    using Fmt = decltype(fmt);
    using Meta = typename Fmt::Meta;
    TORCH_CHECK_TYPE(meta.scalar_type() == semi24::meta_dtype(packed_in.scalar_type()),
                     "semi24_decompress: meta must be ", semi24::meta_dtype(packed_in.scalar_type()), " for ",
                     packed_in.scalar_type(), " values, got ", meta.scalar_type());
    TORCH_CHECK_VALUE(m % 32 == 0 || (Fmt::kMetaInt32 && m % 16 == 0), "semi24_decompress: rows must be a multiple of ",
                      Fmt::kMetaInt32 ? 16 : 32, ", got ", m);
    TORCH_CHECK_VALUE(k % (2 * Fmt::kElems) == 0 && meta.size(0) == m && meta.size(1) == k / Fmt::kElems,
                      "semi24_decompress: packed ", packed_in.sizes(), " and meta ", meta.sizes(),
                      " do not describe one compressed matrix");
    const int64_t k_meta = k / Fmt::kElems;
    const int64_t blocks = cu::grid_blocks(m, k_meta);
    if (blocks == 0) return;
    TORCH_CHECK(blocks <= INT32_MAX, "semi24_decompress: matrix too large (", m, " x ", k, ")");
    const at::Tensor packed = cu::aligned16(packed_in);
    at::Tensor first_bad = cu::first_bad_slot(packed);
    decompress_kernel<Fmt><<<static_cast<unsigned>(blocks), cu::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const uint4*>(packed.data_ptr()), reinterpret_cast<const Meta*>(meta.data_ptr()),
        reinterpret_cast<uint4*>(dense.data_ptr()), m, k_meta, cu::first_bad_ptr(first_bad));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    semi24::check_no_bad_code<Fmt>(cu::first_bad_value(first_bad), k);
  });
  return dense;
}

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) { m.impl("semi24_decompress", &semi24_decompress_cuda); }

}  // namespace sparsekern

// 2:4 compression on CUDA: one thread per metadata element validates, codes and packs the 32 dense bytes it
// covers, then writes 16 packed bytes and one metadata element. Same output and errors as the CPU kernel.
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
    compress_kernel(const uint4* __restrict__ dense, uint4* __restrict__ packed,
                    typename Fmt::Meta* __restrict__ meta, int64_t m, int64_t k_meta,
                    unsigned long long* __restrict__ first_bad) {
  using Word = cu::GroupWord<Fmt>;
  constexpr int kLane = cu::kLaneBits<Fmt>;
  int64_t r, c;
  if (!cu::thread_elem(Fmt::kMetaInt32, m, k_meta, r, c)) return;

  const int64_t tile = r * k_meta + c;  // in units of this thread's 32 dense / 16 packed bytes
  const uint4 raw[2] = {dense[2 * tile], dense[2 * tile + 1]};
  Word groups[Fmt::kCodes];
  static_assert(sizeof(groups) == sizeof(raw), "one metadata element covers 32 dense bytes");
  memcpy(groups, raw, sizeof(raw));

  uint32_t out[4] = {0u, 0u, 0u, 0u};
  uint32_t word = 0;
  int first = -1;
#pragma unroll
  for (int j = 0; j < Fmt::kCodes; ++j) {
    const Word w = groups[j];
    uint32_t nz = 0;
#pragma unroll
    for (int e = 0; e < Fmt::kGroup; ++e) nz |= uint32_t(((w >> (kLane * e)) & Fmt::kMagnitude) != 0) << e;
    const bool bad = Fmt::kPairs ? nz == 3u : semi24::popcount4(nz) > 2;
    if (bad && first < 0) first = j;
    const uint32_t code = Fmt::kPairs ? semi24::pair_code(nz) : semi24::group_code(nz);
    if constexpr (Fmt::kPairs) {
      cu::packed_set<Fmt>(out, j, cu::group_get<Fmt>(w, semi24::code_idx0(code) / 2));
    } else {
      cu::packed_set<Fmt>(out, 2 * j, cu::group_get<Fmt>(w, semi24::code_idx0(code)));
      cu::packed_set<Fmt>(out, 2 * j + 1, cu::group_get<Fmt>(w, semi24::code_idx1(code)));
    }
    word |= code << (4 * j);
  }
  if (first >= 0) atomicMin(first_bad, static_cast<unsigned long long>(tile * Fmt::kCodes + first));

  packed[tile] = make_uint4(out[0], out[1], out[2], out[3]);
  meta[semi24::meta_offset(r, c, m, Fmt::kMetaInt32)] = static_cast<typename Fmt::Meta>(word);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> semi24_compress_cuda(const at::Tensor& dense_in) {
  TORCH_CHECK_VALUE(dense_in.dim() == 2, "semi24_compress: dense must be 2-D, got ", dense_in.dim(), "-D");
  TORCH_CHECK_VALUE(dense_in.is_contiguous(), "semi24_compress: dense must be contiguous");
  TORCH_CHECK_VALUE(dense_in.is_cuda(), "semi24_compress: dense must be a CUDA tensor, got ", dense_in.device());
  const c10::cuda::CUDAGuard device_guard(dense_in.device());
  const int64_t m = dense_in.size(0), k = dense_in.size(1);
  at::Tensor packed = at::empty({m, k / 2}, dense_in.options());
  at::Tensor meta;
  semi24::dispatch_format(dense_in.scalar_type(), "semi24_compress: dense", [&](auto fmt) {
    using Fmt = decltype(fmt);
    TORCH_CHECK_VALUE(m % 32 == 0 || (Fmt::kMetaInt32 && m % 16 == 0),
                      "semi24_compress: rows must be a multiple of ", Fmt::kMetaInt32 ? 16 : 32, ", got ", m);
    TORCH_CHECK_VALUE(k % (2 * Fmt::kElems) == 0, "semi24_compress: columns must be a multiple of ",
                      2 * Fmt::kElems, ", got ", k);
    meta = at::empty({m, k / Fmt::kElems},
                     dense_in.options().dtype(semi24::meta_dtype(dense_in.scalar_type())));
    const int64_t k_meta = k / Fmt::kElems;
    const int64_t blocks = cu::grid_blocks(m, k_meta);
    if (blocks == 0) return;
    TORCH_CHECK(blocks <= INT32_MAX, "semi24_compress: matrix too large (", m, " x ", k, ")");
    const at::Tensor dense = cu::aligned16(dense_in);
    at::Tensor first_bad = cu::first_bad_slot(dense);
    compress_kernel<Fmt><<<static_cast<unsigned>(blocks), cu::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const uint4*>(dense.data_ptr()), reinterpret_cast<uint4*>(packed.data_ptr()),
        reinterpret_cast<typename Fmt::Meta*>(meta.data_ptr()), m, k_meta, cu::first_bad_ptr(first_bad));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    semi24::check_no_bad_group<Fmt>(cu::first_bad_value(first_bad), k);
  });
  return {packed, meta};
}

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) { m.impl("semi24_compress", &semi24_compress_cuda); }

}  // namespace sparsekern

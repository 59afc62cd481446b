// Output tensors of the CPU kernels that write large results once (spmm, 2:4 compress/decompress, csr_dense_gather).
//
// A fresh multi-megabyte output is page-faulted in 4 KiB at a time by the kernel's first writes: on the 2-core
// VMs this project is measured on a fault costs ~8 us, so the 4576 faults of a 4096x4096 fp16 compress's
// outputs took 36 ms against 24 ms for the work itself, and whether a call got fresh or recycled pages (which
// depends on what the process freed just before) swung the measured speed 2x. Large outputs are therefore
// allocated 2 MiB-aligned and marked MADV_HUGEPAGE (what torch itself does under THP_MEM_ALLOC_ENABLE=1), so a
// first touch faults once per 2 MiB where the system allows transparent huge pages (the "madvise" or "always"
// modes); elsewhere it is an ordinary allocation.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace sparsekern {

constexpr int64_t kHugePage = int64_t{1} << 21;

// glibc's largest dynamic mmap threshold (64-bit): a freed block below it is recycled by the next malloc of its size
// without faults, one above it is unmapped, so every call of that size faults its pages in afresh.
constexpr int64_t kGlibcMmapMax = int64_t{32} << 20;

// at::empty(sizes, options) for a CPU tensor, with huge pages when it is at least min_bytes (>= kHugePage).
inline at::Tensor empty_cpu_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                                   int64_t min_bytes = kHugePage) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const int64_t nbytes = numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  if (nbytes >= std::max(min_bytes, kHugePage)) {
    void* ptr = nullptr;
    const size_t rounded = static_cast<size_t>((nbytes + kHugePage - 1) / kHugePage * kHugePage);
    if (posix_memalign(&ptr, kHugePage, rounded) == 0) {
      madvise(ptr, rounded, MADV_HUGEPAGE);  // a hint: on failure the pages are ordinary ones
      return at::from_blob(ptr, sizes, [](void* p) { std::free(p); }, options);
    }
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace sparsekern

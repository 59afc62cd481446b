// SPARSEKERN_HD marks the functions that CPU and CUDA code share (DESIGN §3): __host__ __device__ under nvcc,
// so the GPU kernels call them, and plain inline functions in the C++ build, so the CPU tests execute them.
#pragma once

#if defined(__CUDACC__)
#define SPARSEKERN_HD __host__ __device__ __forceinline__ constexpr
#else
#define SPARSEKERN_HD inline constexpr
#endif

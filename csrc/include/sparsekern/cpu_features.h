// The CPU kernels' instruction-set selection (the build never uses -march=native).
//
// Every hot CPU kernel has three paths: AVX-512 (32 zmm registers), AVX2 + FMA (16 ymm registers, its own tile
// shapes) and a portable one (plain C++ and 4-lane GCC/Clang vectors, compiled for the x86-64 baseline or the
// target's default, Arm included). Kernels ask cpu_isa() which one to run on each call; it is
//   - the widest the CPU supports, or
//   - SPARSEKERN_CPU_ISA=avx512|avx2|baseline (read once, at the first call), or
//   - the last set_cpu_isa() (tests and benchmarks switch within one process),
// and a forced ISA the CPU lacks, or an unknown name, is a ValueError at the call that would have run it.
// The AVX2 and AVX-512 paths are functions with target attributes below; the baseline path is never compiled for
// a wider target, so forcing it runs what a CPU without AVX2 runs.
#pragma once

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SPARSEKERN_X86 1
// AVX2 + FMA + F16C: Haswell, Zen 1 and newer. AVX-512: F, BW, DQ and VL (Skylake-X, Ice Lake, Zen 4).
#define SPARSEKERN_AVX2 __attribute__((target("avx2,fma,f16c,bmi,bmi2,popcnt")))
#define SPARSEKERN_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2,popcnt")))
#endif

namespace sparsekern {

enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

// The widest ISA this CPU runs.
inline CpuIsa cpu_isa_supported() {
#if defined(SPARSEKERN_X86)
  static const CpuIsa isa = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    return avx512 ? CpuIsa::kAvx512 : avx2 ? CpuIsa::kAvx2 : CpuIsa::kBaseline;
  }();
  return isa;
#else
  return CpuIsa::kBaseline;
#endif
}

// AVX-512 with byte/word compress (VBMI2: Ice Lake, Zen 4 and newer): semi24_compress's widest path.
inline bool cpu_has_avx512_vbmi2() {
#if defined(SPARSEKERN_X86)
  static const bool ok = [] {
    __builtin_cpu_init();
    return cpu_isa_supported() == CpuIsa::kAvx512 && __builtin_cpu_supports("avx512vbmi2");
  }();
  return ok;
#else
  return false;
#endif
}

namespace detail {

// -1: not chosen yet; -2: the request was refused (the message says why); else a CpuIsa.
inline std::atomic<int>& isa_choice() {
  static std::atomic<int> choice{-1};
  return choice;
}

inline std::string& isa_error() {
  static std::string message;
  return message;
}

// Sets the choice to `name` (or the widest supported when empty); returns "" or why it was refused.
inline std::string choose_isa(const char* name, const char* source) {
  const CpuIsa widest = cpu_isa_supported();
  CpuIsa want = widest;
  if (name != nullptr && name[0] != '\0') {
    if (std::strcmp(name, "avx512") == 0) {
      want = CpuIsa::kAvx512;
    } else if (std::strcmp(name, "avx2") == 0) {
      want = CpuIsa::kAvx2;
    } else if (std::strcmp(name, "baseline") == 0) {
      want = CpuIsa::kBaseline;
    } else {
      return std::string(source) + "='" + name + "' is not an instruction set; use avx512, avx2 or baseline";
    }
    if (static_cast<int>(want) > static_cast<int>(widest)) {
      return std::string(source) + "=" + name + " asks for " + cpu_isa_name(want) +
             " kernels, but this CPU runs at most " + cpu_isa_name(widest) +
             " (choose that or a lower one: avx512 > avx2 > baseline)";
    }
  }
  isa_choice().store(static_cast<int>(want));
  return "";
}

}  // namespace detail

// The ISA the CPU kernels run now. Throws ValueError when SPARSEKERN_CPU_ISA asks for one the CPU lacks.
inline CpuIsa cpu_isa() {
  int choice = detail::isa_choice().load(std::memory_order_relaxed);
  if (choice == -1) {
    static const std::string from_env = detail::choose_isa(std::getenv("SPARSEKERN_CPU_ISA"), "SPARSEKERN_CPU_ISA");
    if (!from_env.empty()) {
      detail::isa_error() = from_env;
      int expected = -1;
      detail::isa_choice().compare_exchange_strong(expected, -2);
    }
    choice = detail::isa_choice().load();
  }
  TORCH_CHECK_VALUE(choice != -2, "sparsekern: ", detail::isa_error());
  return static_cast<CpuIsa>(choice);
}

// Forces `name` ("avx512", "avx2", "baseline", or "" for the widest) for every later call in this process; throws
// ValueError (and changes nothing) when the CPU lacks it.
inline void set_cpu_isa(const char* name) {
  const int before = detail::isa_choice().load();
  const std::string error = detail::choose_isa(name, "cpu_isa");
  if (!error.empty()) {
    detail::isa_choice().store(before);
    TORCH_CHECK_VALUE(false, "sparsekern: ", error);
  }
}

}  // namespace sparsekern

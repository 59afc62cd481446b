// Runtime CPU feature checks for the kernels' ISA dispatch (the build never uses -march=native).
#pragma once

#include <cstdlib>
#include <cstring>

namespace sparsekern {

// SPARSEKERN_CPU_ISA=baseline forces the portable kernels (how tests cover them on AVX-512 machines).
inline bool cpu_isa_forced_baseline() {
  const char* forced = std::getenv("SPARSEKERN_CPU_ISA");
  return forced != nullptr && std::strcmp(forced, "baseline") == 0;
}

// AVX-512 with byte/word compress (VBMI2: Ice Lake, Zen 4 and newer).
inline bool cpu_has_avx512_vbmi2() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_isa_forced_baseline()) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vbmi2");
#else
  return false;
#endif
}

inline const char* cpu_isa_name() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_isa_forced_baseline()) return "baseline (forced by SPARSEKERN_CPU_ISA)";
  if (cpu_has_avx512_vbmi2()) return "avx512-vbmi2";
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) return "avx2";
#endif
  return "baseline";
}

}  // namespace sparsekern

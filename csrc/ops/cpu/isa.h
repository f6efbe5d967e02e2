#pragma once

// Run-time choice of instruction set for the CPU kernels' hot loops. The extension is built for
// the baseline x86-64 ISA, so that it loads on any x86-64 CPU; a kernel compiles its hot loop
// again with CNNOPS_AVX512 (and AVX2+FMA) and picks the copy at run time.

#if defined(__x86_64__) && defined(__GNUC__)
#define CNNOPS_HAS_ISA_VARIANTS 1
#define CNNOPS_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))

namespace cnnops {

// Whether this CPU runs the AVX-512 variants (compiled with exactly these features).
inline bool cpu_has_avx512() {
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  return avx512;
}

}  // namespace cnnops
#endif

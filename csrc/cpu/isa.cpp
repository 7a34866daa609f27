#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace performer::cpu {
namespace {

// 0 baseline, 1 avx2, 2 avx512, 3 avx512 with VNNI.
int detect_level() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma"))
    return __builtin_cpu_supports("avx512vnni") ? 3 : 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return 1;
  return 0;
}

int capped_level() {
  int level = detect_level();
  if (const char* cap = std::getenv("PERFORMER_CPU_ISA")) {
    if (std::strcmp(cap, "baseline") == 0) level = 0;
    else if (std::strcmp(cap, "avx2") == 0) level = level > 1 ? 1 : level;
    else if (std::strcmp(cap, "avx512") == 0) level = level > 2 ? 2 : level;
    else if (std::strcmp(cap, "avx512_vnni") != 0)
      std::fprintf(stderr, "performer: ignoring PERFORMER_CPU_ISA=%s (expected baseline, avx2, avx512 or "
                   "avx512_vnni)\n", cap);
  }
  return level;
}

}  // namespace

const KernelTable& kernels() {
  static const KernelTable avx512_vnni_table = [] {
    KernelTable t = avx512::table;
    t.name = "avx512_vnni";
    t.int8_linear = avx512_vnni::int8_linear;
    return t;
  }();
  static const KernelTable* table = [] {
    switch (capped_level()) {
      case 3: return &avx512_vnni_table;
      case 2: return &avx512::table;
      case 1: return &avx2::table;
      default: return &baseline::table;
    }
  }();
  return *table;
}

}  // namespace performer::cpu

// CPU kernels compiled for AVX2 + FMA; chosen at run time by isa.cpp.
// System headers come before the target pragma, so none of their inline functions is compiled
// for this ISA under a name the other units share.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#pragma GCC target("avx2,fma,f16c")
#define PERFORMER_ISA_AVX2 1  // `#pragma GCC target` defines no __AVX2__ in C++
#define PERFORMER_VEC_BYTES 32
#define PERFORMER_GEMM_MR 6

#include "kernels.h"

namespace performer::cpu::avx2 {

#include "isa_common.h"
#include "gemm.h"
#include "favor_kernel.h"
#include "favor_parallel.h"
#include "favor_step_kernel.h"
#include "matmul_kernel.h"
#include "sparse_kernel.h"
#include "int8_kernel.h"
#include "fma_peak.h"

extern const KernelTable table = {"avx2", favor_forward, favor_backward, favor_step, matmul, sparse_linear,
                                   int8_linear, fma_peak_gflops};

}  // namespace performer::cpu::avx2

// CPU kernels compiled for x86-64 baseline (SSE2); chosen at run time by isa.cpp.
// System headers come before the target pragma, so none of their inline functions is compiled
// for this ISA under a name the other units share.
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#define PERFORMER_VEC_BYTES 16
#define PERFORMER_GEMM_MR 4

#include "kernels.h"

namespace performer::cpu::baseline {

#include "isa_common.h"
#include "gemm.h"
#include "favor_kernel.h"
#include "favor_parallel.h"
#include "favor_step_kernel.h"
#include "matmul_kernel.h"
#include "sparse_kernel.h"
#include "int8_kernel.h"
#include "fma_peak.h"

extern const KernelTable table = {"baseline", favor_forward, favor_backward, favor_step, matmul, sparse_linear,
                                   int8_linear, fma_peak_gflops};

}  // namespace performer::cpu::baseline

// The int8 product compiled for AVX-512 with VNNI (vpdpbusd: four u8 x s8 products added into each
// 32-bit lane in one instruction); isa.cpp puts it in the avx512 table where the CPU has VNNI.
// System headers come before the target pragma, so none of their inline functions is compiled
// for this ISA under a name the other units share.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
#define PERFORMER_ISA_AVX512 1
#define PERFORMER_ISA_AVX512_VNNI 1
#define PERFORMER_VEC_BYTES 64

#include "kernels.h"

namespace performer::cpu::avx512_vnni {

namespace detail {
#include "isa_common.h"
#include "int8_kernel.h"
}  // namespace detail

void int8_linear(const Int8LinearParams& p) { detail::int8_linear(p); }

}  // namespace performer::cpu::avx512_vnni

// Helpers for the per-ISA translation units. Included inside namespace performer::cpu::<isa>,
// after the unit's `#pragma GCC target`, so everything here is compiled once per ISA. Only C
// headers and builtins: no inline functions shared with other units.
#pragma once

#ifndef PERFORMER_VEC_BYTES
#error "define PERFORMER_VEC_BYTES (and PERFORMER_GEMM_MR) before including the kernels"
#endif

static constexpr int kVecFloats = PERFORMER_VEC_BYTES / 4;

// One SIMD register of floats: intrinsics where the ISA has them, GCC vectors otherwise.
#if defined(PERFORMER_ISA_AVX512)
typedef __m512 vreg;
static inline vreg vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, vreg v) { _mm512_storeu_ps(p, v); }
static inline vreg vbroadcast(float x) { return _mm512_set1_ps(x); }
static inline vreg vfma(vreg a, vreg b, vreg c) { return _mm512_fmadd_ps(a, b, c); }
static inline vreg vadd(vreg a, vreg b) { return _mm512_add_ps(a, b); }
static inline vreg vzero() { return _mm512_setzero_ps(); }
static inline float vsum(vreg v) {
  // (masked extracts: GCC 12 warns that _mm512_reduce_add_ps and the cast read an undefined vector)
  const __m512d d = _mm512_castps_pd(v);
  const __m256 h = _mm256_add_ps(_mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xff, d, 0)),
                                 _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xff, d, 1)));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#elif defined(PERFORMER_ISA_AVX2)
typedef __m256 vreg;
static inline vreg vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, vreg v) { _mm256_storeu_ps(p, v); }
static inline vreg vbroadcast(float x) { return _mm256_set1_ps(x); }
static inline vreg vfma(vreg a, vreg b, vreg c) { return _mm256_fmadd_ps(a, b, c); }
static inline vreg vadd(vreg a, vreg b) { return _mm256_add_ps(a, b); }
static inline vreg vzero() { return _mm256_setzero_ps(); }
static inline float vsum(vreg v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#else
typedef float vreg __attribute__((vector_size(PERFORMER_VEC_BYTES), aligned(4)));
static inline vreg vload(const float* p) { vreg v; __builtin_memcpy(&v, p, sizeof(v)); return v; }
static inline void vstore(float* p, vreg v) { __builtin_memcpy(p, &v, sizeof(v)); }
static inline vreg vbroadcast(float x) { return vreg{} + x; }
static inline vreg vfma(vreg a, vreg b, vreg c) { return a * b + c; }
static inline vreg vadd(vreg a, vreg b) { return a + b; }
static inline vreg vzero() { return vreg{}; }
static inline float vsum(vreg v) {
  float s = 0.f;
  for (int i = 0; i < kVecFloats; ++i) s += v[i];
  return s;
}
#endif

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
static inline float fmax2(float a, float b) { return a > b ? a : b; }
static inline double fmax2(double a, double b) { return a > b ? a : b; }

static constexpr float kNegInf = -__builtin_inff();

// exp(a - b) for running maxima a <= b, where -inf (no visible key yet) contributes nothing.
template <typename T>
static inline T rescale(T a, T b) {
  return a == -__builtin_inf() ? T(0) : (sizeof(T) == 4 ? T(::expf(float(a - b))) : T(::exp(double(a - b))));
}

// exp(x) for float, branch-free so that `omp simd` loops vectorize: Cody-Waite reduction and a
// degree-6 polynomial, ~2 ulp; exactly 0 below -87.3 (and for -inf).
static inline float exp_fast(float x) {
  const float xc = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  __builtin_memcpy(&bits, &p, 4);
  bits += static_cast<int32_t>(static_cast<uint32_t>(static_cast<int32_t>(n)) << 23);
  float out;
  __builtin_memcpy(&out, &bits, 4);
  return x < -87.3f ? 0.0f : out;
}
static inline double exp_fast(double x) { return ::exp(x); }

// 16-bit floats, stored as their bits: conversion to and from float (round to nearest even).
static inline float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
static inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                            // round to nearest even
  return uint16_t(u >> 16);
}
static inline float f16_to_float(uint16_t h) {
  _Float16 x;
  __builtin_memcpy(&x, &h, 2);
  return float(x);
}
static inline uint16_t float_to_f16(float f) {
  _Float16 x = _Float16(f);
  uint16_t h;
  __builtin_memcpy(&h, &x, 2);
  return h;
}

// A grow-only, 64-byte aligned scratch buffer (one per thread per call).
template <typename T>
struct Scratch {
  T* p = nullptr;
  int64_t n = 0;
  T* get(int64_t count) {
    if (count > n) {
      ::free(p);
      n = count;
      p = static_cast<T*>(::aligned_alloc(64, ((count * sizeof(T) + 63) / 64) * 64));
    }
    return p;
  }
  ~Scratch() { ::free(p); }
};

// The package's GEMM core: C = (accumulate ? C : 0) + A B for strided A and B, packed into
// MR x K and K x NR panels (zero-padded, so edge tiles read nothing out of bounds) and
// multiplied by a register-blocked micro-kernel. Single-threaded: callers parallelize above it.
// Included inside namespace performer::cpu::<isa> (see isa_common.h).
#pragma once

static constexpr int kMR = PERFORMER_GEMM_MR;
static constexpr int kNR = 2 * kVecFloats;
static constexpr int64_t kKC = 256, kMC = 16 * kMR, kNC = 1024;

template <typename T>
struct GemmScratch {
  Scratch<T> a, b;
};

// Strided matrix view: element (i, j) at p[i * rs + j * cs].
template <typename T>
struct Mat {
  const T* p;
  int64_t rs, cs;
  T at(int64_t i, int64_t j) const { return p[i * rs + j * cs]; }
};

static void pack_a(const Mat<float>& a, int64_t i0, int64_t mc, int64_t k0, int64_t kc, float* dst) {
  for (int64_t ip = 0; ip < mc; ip += kMR) {
    const int64_t mr = imin(kMR, mc - ip);
    for (int64_t k = 0; k < kc; ++k) {
      for (int64_t i = 0; i < mr; ++i) dst[i] = a.at(i0 + ip + i, k0 + k);
      for (int64_t i = mr; i < kMR; ++i) dst[i] = 0.f;
      dst += kMR;
    }
  }
}

static void pack_b(const Mat<float>& b, int64_t k0, int64_t kc, int64_t j0, int64_t nc, float* dst) {
  for (int64_t jp = 0; jp < nc; jp += kNR) {
    const int64_t nr = imin(kNR, nc - jp);
    for (int64_t k = 0; k < kc; ++k) {
      const float* src = b.p + (k0 + k) * b.rs + (j0 + jp) * b.cs;
      if (b.cs == 1) {
        for (int64_t j = 0; j < nr; ++j) dst[j] = src[j];
      } else {
        for (int64_t j = 0; j < nr; ++j) dst[j] = src[j * b.cs];
      }
      for (int64_t j = nr; j < kNR; ++j) dst[j] = 0.f;
      dst += kNR;
    }
  }
}

// c[0:mr, 0:nr] (+)= ap (kc x MR panel) * bp (kc x NR panel)
static inline void micro_kernel(int64_t kc, const float* __restrict ap, const float* __restrict bp,
                                float* __restrict c, int64_t ldc, bool accumulate, int64_t mr, int64_t nr) {
  vfloat c0[kMR], c1[kMR];
#pragma GCC unroll 16
  for (int i = 0; i < kMR; ++i) c0[i] = c1[i] = vfloat{};
  for (int64_t k = 0; k < kc; ++k) {
    vfloat b0, b1;
    __builtin_memcpy(&b0, bp, sizeof(vfloat));
    __builtin_memcpy(&b1, bp + kVecFloats, sizeof(vfloat));
#pragma GCC unroll 16
    for (int i = 0; i < kMR; ++i) {
      c0[i] += ap[i] * b0;
      c1[i] += ap[i] * b1;
    }
    ap += kMR;
    bp += kNR;
  }
  if (mr == kMR && nr == kNR) {
#pragma GCC unroll 16
    for (int i = 0; i < kMR; ++i) {
      float* row = c + i * ldc;
      vfloat r0 = c0[i], r1 = c1[i];
      if (accumulate) {
        vfloat o0, o1;
        __builtin_memcpy(&o0, row, sizeof(vfloat));
        __builtin_memcpy(&o1, row + kVecFloats, sizeof(vfloat));
        r0 += o0;
        r1 += o1;
      }
      __builtin_memcpy(row, &r0, sizeof(vfloat));
      __builtin_memcpy(row + kVecFloats, &r1, sizeof(vfloat));
    }
    return;
  }
  alignas(64) float tile[kMR * kNR];
  for (int i = 0; i < kMR; ++i) {
    __builtin_memcpy(tile + i * kNR, &c0[i], sizeof(vfloat));
    __builtin_memcpy(tile + i * kNR + kVecFloats, &c1[i], sizeof(vfloat));
  }
  for (int64_t i = 0; i < mr; ++i)
    for (int64_t j = 0; j < nr; ++j)
      c[i * ldc + j] = (accumulate ? c[i * ldc + j] : 0.f) + tile[i * kNR + j];
}

static void gemm(int64_t M, int64_t N, int64_t K, Mat<float> a, Mat<float> b, float* c, int64_t ldc,
                 bool accumulate, GemmScratch<float>& ws) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) c[i * ldc + j] = 0.f;
    return;
  }
  const int64_t nc_max = imin(kNC, ((N + kNR - 1) / kNR) * kNR);
  const int64_t kc_max = imin(kKC, K);
  float* bpack = ws.b.get(kc_max * nc_max);
  float* apack = ws.a.get(kc_max * imin(kMC, ((M + kMR - 1) / kMR) * kMR));
  for (int64_t j0 = 0; j0 < N; j0 += kNC) {
    const int64_t nc = imin(kNC, N - j0);
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const int64_t kc = imin(kKC, K - k0);
      const bool acc = accumulate || k0 > 0;
      pack_b(b, k0, kc, j0, nc, bpack);
      for (int64_t i0 = 0; i0 < M; i0 += kMC) {
        const int64_t mc = imin(kMC, M - i0);
        pack_a(a, i0, mc, k0, kc, apack);
        for (int64_t jr = 0; jr < nc; jr += kNR)
          for (int64_t ir = 0; ir < mc; ir += kMR)
            micro_kernel(kc, apack + ir * kc, bpack + jr * kc, c + (i0 + ir) * ldc + j0 + jr, ldc, acc,
                         imin(kMR, mc - ir), imin(kNR, nc - jr));
      }
    }
  }
}

// float64: the reference-precision path (tests, gradcheck); plain loops, no packing.
static void gemm(int64_t M, int64_t N, int64_t K, Mat<double> a, Mat<double> b, double* c, int64_t ldc,
                 bool accumulate, GemmScratch<double>&) {
  for (int64_t i = 0; i < M; ++i) {
    double* row = c + i * ldc;
    if (!accumulate)
      for (int64_t j = 0; j < N; ++j) row[j] = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      const double aik = a.at(i, k);
      const double* brow = b.p + k * b.rs;
      for (int64_t j = 0; j < N; ++j) row[j] += aik * brow[j * b.cs];
    }
  }
}

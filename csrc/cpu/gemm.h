// The package's GEMM core: C = (accumulate ? C : 0) + A B for strided A and B, packed into
// MR x K and K x NR panels (zero-padded, so edge tiles read nothing out of bounds) and
// multiplied by a register-blocked micro-kernel in float. A and B may be float, bfloat16 or
// float16 (converted to float while packing); float64 has its own plain path. Single-threaded:
// callers parallelize above it (matmul_kernel.h, favor_parallel.h).
// Included inside namespace performer::cpu::<isa> (see isa_common.h).
#pragma once

static constexpr int kMR = PERFORMER_GEMM_MR;
static constexpr int kNR = 2 * kVecFloats;
// Cache blocking: a kKC x NR panel of B (32 KiB with AVX-512) stays in L1 while the kMC x kKC
// block of A (~230 KiB) streams from L2; the kKC x kNC block of B (1 MiB) is reused from L2/L3.
static constexpr int64_t kKC = 256, kMC = 16 * kMR, kNC = 1024;

// 16-bit floating-point storage types, so that element loads can pick the conversion by type.
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };
static inline float to_float(float x) { return x; }
static inline float to_float(bf16_t x) { return bf16_to_float(x.bits); }
static inline float to_float(f16_t x) { return f16_to_float(x.bits); }
static inline void store_float(float x, float* d) { *d = x; }
template <typename T>
static constexpr bool kIsFloat = false;
template <>
constexpr bool kIsFloat<float> = true;
static inline void store_float(float x, bf16_t* d) { d->bits = float_to_bf16(x); }
static inline void store_float(float x, f16_t* d) { d->bits = float_to_f16(x); }

// Strided matrix view: element (i, j) at p[i * rs + j * cs].
template <typename T>
struct Mat {
  const T* p;
  int64_t rs, cs;
  T at(int64_t i, int64_t j) const { return p[i * rs + j * cs]; }
};

// Rows i0..i0+mc, columns k0..k0+kc of A as MR-row panels, each k-major (dst[k * MR + i]).
template <typename T>
static void pack_a(const Mat<T>& a, int64_t i0, int64_t mc, int64_t k0, int64_t kc, float* dst) {
  for (int64_t ip = 0; ip < mc; ip += kMR) {
    const int64_t mr = imin(kMR, mc - ip);
    if (a.rs == 1) {  // columns of A are contiguous
      for (int64_t k = 0; k < kc; ++k) {
        const T* col = a.p + (i0 + ip) + (k0 + k) * a.cs;
        for (int64_t i = 0; i < mr; ++i) dst[k * kMR + i] = to_float(col[i]);
        for (int64_t i = mr; i < kMR; ++i) dst[k * kMR + i] = 0.f;
      }
    } else {
      for (int64_t i = 0; i < mr; ++i) {
        const T* row = a.p + (i0 + ip + i) * a.rs + k0 * a.cs;
        if (a.cs == 1)
          for (int64_t k = 0; k < kc; ++k) dst[k * kMR + i] = to_float(row[k]);
        else
          for (int64_t k = 0; k < kc; ++k) dst[k * kMR + i] = to_float(row[k * a.cs]);
      }
      for (int64_t k = 0; k < kc; ++k)
        for (int64_t i = mr; i < kMR; ++i) dst[k * kMR + i] = 0.f;
    }
    dst += kc * kMR;
  }
}

// Rows k0..k0+kc, columns j0..j0+nc of B as NR-column panels, each k-major (dst[k * NR + j]).
template <typename T>
static void pack_b(const Mat<T>& b, int64_t k0, int64_t kc, int64_t j0, int64_t nc, float* dst) {
  for (int64_t jp = 0; jp < nc; jp += kNR) {
    const int64_t nr = imin(kNR, nc - jp);
    if (b.cs != 1 && b.rs == 1) {  // columns of B are contiguous: read them in order
      for (int64_t j = 0; j < nr; ++j) {
        const T* col = b.p + k0 + (j0 + jp + j) * b.cs;
        for (int64_t k = 0; k < kc; ++k) dst[k * kNR + j] = to_float(col[k]);
      }
      for (int64_t k = 0; k < kc; ++k)
        for (int64_t j = nr; j < kNR; ++j) dst[k * kNR + j] = 0.f;
    } else {
      for (int64_t k = 0; k < kc; ++k) {
        const T* src = b.p + (k0 + k) * b.rs + (j0 + jp) * b.cs;
        float* out = dst + k * kNR;
        if (b.cs == 1) {
          for (int64_t j = 0; j < nr; ++j) out[j] = to_float(src[j]);
        } else {
          for (int64_t j = 0; j < nr; ++j) out[j] = to_float(src[j * b.cs]);
        }
        for (int64_t j = nr; j < kNR; ++j) out[j] = 0.f;
      }
    }
    dst += kc * kNR;
  }
}

// c[0:mr, 0:nr] (+)= A (MR x kc) * bp (kc x NR panel): MR x 2 registers of accumulators, per k two
// loads of B and MR broadcasts of A. A(i, k) is a[i * ars + k * acs]: a packed panel (ars = 1,
// acs = MR, known at compile time) or, for row- or column-major A, the matrix itself (BLIS's
// "small/unpacked" case: no packing pass for the small products FAVOR+ is made of).
template <bool kPacked>
static inline void micro_kernel(int64_t kc, const float* __restrict a, int64_t ars, int64_t acs,
                                const float* __restrict bp, float* __restrict c, int64_t ldc, bool accumulate,
                                int64_t mr, int64_t nr) {
  if (kPacked) { ars = 1; acs = kMR; }
  // The C tile is touched only after the k loop: start fetching it now (a miss per row otherwise).
#pragma GCC unroll 16
  for (int i = 0; i < kMR; ++i) {
    __builtin_prefetch(c + i * ldc, 1, 3);
    __builtin_prefetch(c + i * ldc + kNR - 1, 1, 3);
  }
  vreg c0[kMR], c1[kMR];
#pragma GCC unroll 16
  for (int i = 0; i < kMR; ++i) c0[i] = c1[i] = vzero();
  for (int64_t k = 0; k < kc; ++k) {
    const vreg b0 = vload(bp), b1 = vload(bp + kVecFloats);
#pragma GCC unroll 16
    for (int i = 0; i < kMR; ++i) {
      const vreg av = vbroadcast(a[i * ars]);
      c0[i] = vfma(av, b0, c0[i]);
      c1[i] = vfma(av, b1, c1[i]);
    }
    a += acs;
    bp += kNR;
  }
  if (mr == kMR && nr == kNR) {
#pragma GCC unroll 16
    for (int i = 0; i < kMR; ++i) {
      float* row = c + i * ldc;
      if (accumulate) {
        c0[i] = vadd(c0[i], vload(row));
        c1[i] = vadd(c1[i], vload(row + kVecFloats));
      }
      vstore(row, c0[i]);
      vstore(row + kVecFloats, c1[i]);
    }
    return;
  }
  alignas(64) float tile[kMR * kNR];
#pragma GCC unroll 16
  for (int i = 0; i < kMR; ++i) {
    vstore(tile + i * kNR, c0[i]);
    vstore(tile + i * kNR + kVecFloats, c1[i]);
  }
  for (int64_t i = 0; i < mr; ++i)
    for (int64_t j = 0; j < nr; ++j)
      c[i * ldc + j] = (accumulate ? c[i * ldc + j] : 0.f) + tile[i * kNR + j];
}

// B (K x N) packed once into kKC-deep blocks of NR-wide panels, for reuse across many products:
// block k0 starts at k0 * Npad, its panel p at p * NR * kc within the block.
template <typename T>
struct PackedB;

template <>
struct PackedB<float> {
  Scratch<float> buf;
  int64_t K = 0, N = 0, Npad = 0;
  void pack(int64_t K_, int64_t N_, Mat<float> b) {
    K = K_; N = N_; Npad = ((N + kNR - 1) / kNR) * kNR;
    float* dst = buf.get(imax(1, K * Npad));
    for (int64_t k0 = 0; k0 < K; k0 += kKC) pack_b(b, k0, imin(kKC, K - k0), 0, N, dst + k0 * Npad);
  }
};

template <>
struct PackedB<double> {  // float64 is not packed: the view is kept
  int64_t K = 0, N = 0;
  Mat<double> src{nullptr, 0, 0};
  void pack(int64_t K_, int64_t N_, Mat<double> b) { K = K_; N = N_; src = b; }
};

template <typename T>
struct GemmScratch {
  Scratch<T> a;
  PackedB<T> bp;
};

// The loops around the micro-kernel for one block: C[mc x nc] (+)= A[mc x kc] Bblock[kc x nc].
// Rows below `direct_rows` are read in place from float A (a, ars, acs); the rest come from packed
// panels at `apack` (panel 0 = row direct_rows). Each NR panel of B is reused across all rows.
static void macro_kernel(int64_t mc, int64_t nc, int64_t kc, const float* a, int64_t ars, int64_t acs,
                         int64_t direct_rows, const float* apack, const float* bblock, float* c, int64_t ldc,
                         bool accumulate) {
  for (int64_t jr = 0; jr < nc; jr += kNR) {
    const int64_t nr = imin(kNR, nc - jr);
    for (int64_t ir = 0; ir < mc; ir += kMR) {
      const int64_t mr = imin(kMR, mc - ir);
      float* cp = c + ir * ldc + jr;
      if (ir < direct_rows)
        micro_kernel<false>(kc, a + ir * ars, ars, acs, bblock + jr * kc, cp, ldc, accumulate, mr, nr);
      else
        micro_kernel<true>(kc, apack + (ir - direct_rows) * kc, 1, kMR, bblock + jr * kc, cp, ldc, accumulate,
                           mr, nr);
    }
  }
}

// Whether macro_kernel reads float A in place (BLIS's "unpacked" case) rather than packing it:
// A's rows or columns are contiguous, and either few B panels reuse each A panel (nc small, so
// packing would not pay) or the micro-kernel's MR row streams are close together. MR streams a
// multiple of 4 KiB apart (large power-of-2 leading dimensions) would share one L1 set.
static constexpr int64_t kDirectMaxCols = 4 * kNR, kDirectMaxStride = 256;
template <typename T>
static inline bool reads_a_in_place(const Mat<T>& a, int64_t nc) {
  if constexpr (!kIsFloat<T>) return false;
  if (a.cs != 1 && a.rs != 1) return false;
  const int64_t lead = a.cs == 1 ? a.rs : a.cs;
  return nc <= kDirectMaxCols || lead <= kDirectMaxStride;
}

// Rows i0..i0+mc, columns k0..k0+kc of A for macro_kernel: read in place (reads_a_in_place)
// except a last partial row panel, which is packed (zero-padded) so that nothing past the matrix
// is read; or all packed. Returns the number of rows read in place.
template <typename T>
static int64_t prepare_a(const Mat<T>& a, int64_t i0, int64_t mc, int64_t k0, int64_t kc, int64_t nc, float* apack) {
  const int64_t direct_rows = reads_a_in_place(a, nc) ? (mc / kMR) * kMR : 0;
  if (direct_rows < mc) pack_a(a, i0 + direct_rows, mc - direct_rows, k0, kc, apack);
  return direct_rows;
}

// Floats of A-panel scratch that prepare_a needs for an mc x kc block.
static inline int64_t apack_size(int64_t mc, int64_t kc) { return ((mc + kMR - 1) / kMR) * kMR * kc; }

// C[M x N] (+)= A B with B pre-packed (the whole K x N, in kKC-deep blocks).
static void gemm(int64_t M, const PackedB<float>& b, Mat<float> a, float* c, int64_t ldc, bool accumulate,
                 GemmScratch<float>& ws) {
  const int64_t N = b.N, K = b.K;
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) c[i * ldc + j] = 0.f;
    return;
  }
  float* apack = ws.a.get(apack_size(imin(kMC, M), imin(kKC, K)));
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kc = imin(kKC, K - k0);
    for (int64_t i0 = 0; i0 < M; i0 += kMC) {
      const int64_t mc = imin(kMC, M - i0);
      const int64_t direct_rows = prepare_a(a, i0, mc, k0, kc, N, apack);
      macro_kernel(mc, N, kc, a.p + i0 * a.rs + k0 * a.cs, a.rs, a.cs, direct_rows, apack, b.buf.p + k0 * b.Npad,
                   c + i0 * ldc, ldc, accumulate || k0 > 0);
    }
  }
}

static void gemm(int64_t M, int64_t N, int64_t K, Mat<float> a, Mat<float> b, float* c, int64_t ldc,
                 bool accumulate, GemmScratch<float>& ws) {
  ws.bp.pack(K, N, b);
  gemm(M, ws.bp, a, c, ldc, accumulate, ws);
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

static void gemm(int64_t M, const PackedB<double>& b, Mat<double> a, double* c, int64_t ldc, bool accumulate,
                 GemmScratch<double>& ws) {
  gemm(M, b.N, b.K, a, b.src, c, ldc, accumulate, ws);
}

// The package's GEMM core: C = (accumulate ? C : 0) + A B for strided A and B, packed into
// MR x K and K x NR panels (zero-padded, so edge tiles read nothing out of bounds) and
// multiplied by a register-blocked micro-kernel. Single-threaded: callers parallelize above it.
// Included inside namespace performer::cpu::<isa> (see isa_common.h).
#pragma once

static constexpr int kMR = PERFORMER_GEMM_MR;
static constexpr int kNR = 2 * kVecFloats;
static constexpr int64_t kKC = 256, kMC = 16 * kMR, kNC = 1024;


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
      } else if (b.rs != 1) {
        for (int64_t j = 0; j < nr; ++j) dst[j] = src[j * b.cs];
      }
      for (int64_t j = nr; j < kNR; ++j) dst[j] = 0.f;
      dst += kNR;
    }
    if (b.cs != 1 && b.rs == 1) {  // columns of B are contiguous: read them in order
      float* panel = dst - kc * kNR;
      for (int64_t j = 0; j < nr; ++j) {
        const float* col = b.p + k0 + (j0 + jp + j) * b.cs;
        for (int64_t k = 0; k < kc; ++k) panel[k * kNR + j] = col[k];
      }
    }
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

// C[M x N] (+)= A B with B pre-packed.
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
  // A with contiguous rows or columns is read in place, except a last partial row panel, which is
  // packed (zero-padded) so that nothing past the matrix is read.
  const bool direct = a.cs == 1 || a.rs == 1;
  float* apack = ws.a.get(imin(kKC, K) * (direct ? kMR : imin(kMC, ((M + kMR - 1) / kMR) * kMR)));
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kc = imin(kKC, K - k0);
    const bool acc = accumulate || k0 > 0;
    const float* bblock = b.buf.p + k0 * b.Npad;
    for (int64_t i0 = 0; i0 < M; i0 += kMC) {
      const int64_t mc = imin(kMC, M - i0);
      if (!direct) pack_a(a, i0, mc, k0, kc, apack);
      const int64_t full = direct ? (mc / kMR) * kMR : mc;
      if (full < mc) pack_a(a, i0 + full, mc - full, k0, kc, apack);
      for (int64_t jr = 0; jr < N; jr += kNR) {
        const int64_t nr = imin(kNR, N - jr);
        for (int64_t ir = 0; ir < mc; ir += kMR) {
          float* cp = c + (i0 + ir) * ldc + jr;
          const int64_t mr = imin(kMR, mc - ir);
          if (ir < full && direct)
            micro_kernel<false>(kc, a.p + (i0 + ir) * a.rs + k0 * a.cs, a.rs, a.cs, bblock + jr * kc, cp, ldc, acc,
                                mr, nr);
          else
            micro_kernel<true>(kc, apack + (ir - (direct ? full : 0)) * kc, 1, kMR, bblock + jr * kc, cp, ldc, acc,
                               mr, nr);
        }
      }
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

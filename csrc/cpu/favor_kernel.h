// FAVOR+ CPU kernels, compiled once per ISA (included inside namespace performer::cpu::<isa>).
//
// Per (batch, key/value head) and over chunks of C rows, with c = sqrt(scale), W the (m, E)
// features, k' = c k, q' = c q and V_aug = [V, 1] (so one product yields numerator and
// denominator):
//   keys:     w_s = W k'_s - |k'_s|^2/2 (softmax) or W k'_s (relu);  phi_k(s) = exp(w_s - M)
//   queries:  phi_q(t) = exp(W q'_t - max_j (W q'_t)_j)  (relu: relu(W q'_t) + eps)
//   out_t     = phi_q(t)^T S / phi_q(t)^T z  with [S, z] = sum_s phi_k(s) V_aug(s)^T.
// The shifts cancel exactly in the ratio and carry no gradient. Causal mode uses, for key s,
// the running maximum m_s of w over keys <= s, so nothing at position t depends on later keys:
//   out_t ~ sum_{s <= t} phi_q(t).phi_k(s) e^{m_s - m_t} V_aug(s),  phi_k(s) = exp(w_s - m_s),
// computed per chunk as a masked intra-chunk product plus phi_q times the state of earlier
// chunks (held relative to the running maximum at the chunk start). The backward pass
// recomputes features; causal backward is a forward sweep for dq and a reverse sweep for dk, dv.
#pragma once

static constexpr int64_t kChunk = 64;
static constexpr double kReluEps = 1e-3;  // keep in sync with performer/ops/favor/reference.py

// ---- element conversion ----------------------------------------------------------------------

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

// dst[r * ld + d] = mul * view[b, h, t0 + r, d] for r < n, d < D.
template <typename T>
static void load_rows(const View& v, DType dt, int64_t b, int64_t h, int64_t t0, int64_t n, int64_t D, T mul,
                      T* dst, int64_t ld) {
  for (int64_t r = 0; r < n; ++r) {
    const int64_t off = b * v.stride[0] + h * v.stride[1] + (t0 + r) * v.stride[2];
    const int64_t cs = v.stride[3];
    T* out = dst + r * ld;
    switch (dt) {
      case DType::f32: { const float* s = static_cast<const float*>(v.data) + off;
        for (int64_t d = 0; d < D; ++d) out[d] = mul * T(s[d * cs]); } break;
      case DType::f64: { const double* s = static_cast<const double*>(v.data) + off;
        for (int64_t d = 0; d < D; ++d) out[d] = mul * T(s[d * cs]); } break;
      case DType::bf16: { const uint16_t* s = static_cast<const uint16_t*>(v.data) + off;
        for (int64_t d = 0; d < D; ++d) out[d] = mul * T(bf16_to_float(s[d * cs])); } break;
      case DType::f16: { const uint16_t* s = static_cast<const uint16_t*>(v.data) + off;
        for (int64_t d = 0; d < D; ++d) out[d] = mul * T(f16_to_float(s[d * cs])); } break;
    }
  }
}

// Contiguous (rows x D) destination starting at element offset `off`: dst[off + r*D + d] = mul * src[r*ld + d].
template <typename T>
static void store_rows(void* base, DType dt, int64_t off, int64_t n, int64_t D, T mul, const T* src, int64_t ld) {
  for (int64_t r = 0; r < n; ++r) {
    const T* in = src + r * ld;
    const int64_t o = off + r * D;
    switch (dt) {
      case DType::f32: { float* d = static_cast<float*>(base) + o;
        for (int64_t j = 0; j < D; ++j) d[j] = float(mul * in[j]); } break;
      case DType::f64: { double* d = static_cast<double*>(base) + o;
        for (int64_t j = 0; j < D; ++j) d[j] = double(mul * in[j]); } break;
      case DType::bf16: { uint16_t* d = static_cast<uint16_t*>(base) + o;
        for (int64_t j = 0; j < D; ++j) d[j] = float_to_bf16(float(mul * in[j])); } break;
      case DType::f16: { uint16_t* d = static_cast<uint16_t*>(base) + o;
        for (int64_t j = 0; j < D; ++j) d[j] = float_to_f16(float(mul * in[j])); } break;
    }
  }
}

// ---- per-thread context ----------------------------------------------------------------------

template <typename T>
struct Favor {
  const FavorParams& p;
  const int64_t C, m, E, Ev, Ev1, g;
  const T c;
  const T* W;
  const bool softmax;
  T* const state_out;
  T* const den_out;
  T* const shift_out;
  // Thread-local buffers: rows of q', k', V_aug; projections and features of a chunk; intra-chunk
  // products; the state [S, z] and its gradient / the reverse-sweep accumulator.
  Scratch<T> qc_, kc_, vaug_, u_, phiq_, w_, phik_, a_, da_, oaug_, gaug_, dphiq_, dphik_, dv_, dx_, st_, dst_, rows_;
  T *qc, *kc, *vaug, *u, *phiq, *w, *phik, *a, *da, *oaug, *gaug, *dphiq, *dphik, *dv, *dx, *st, *dst, *ms, *ref, *rsum;
  GemmScratch<T> gs;

  explicit Favor(const FavorParams& p_)
      : p(p_), C(kChunk), m(p_.m), E(p_.E), Ev(p_.Ev), Ev1(p_.Ev + 1), g(p_.H / p_.Hk),
        c(T(__builtin_sqrt(p_.scale))), W(static_cast<const T*>(p_.features)), softmax(p_.kernel == Kernel::softmax),
        state_out(static_cast<T*>(p_.state)), den_out(static_cast<T*>(p_.den)), shift_out(static_cast<T*>(p_.key_shift)) {
    qc = qc_.get(C * E); kc = kc_.get(C * E); vaug = vaug_.get(C * Ev1);
    u = u_.get(C * m); phiq = phiq_.get(C * m); w = w_.get(C * m); phik = phik_.get(C * m);
    a = a_.get(C * C); da = da_.get(C * C); oaug = oaug_.get(C * Ev1); gaug = gaug_.get(C * Ev1);
    dphiq = dphiq_.get(C * m); dphik = dphik_.get(C * m); dv = dv_.get(C * Ev1); dx = dx_.get(C * E);
    st = st_.get(m * Ev1); dst = dst_.get(m * Ev1);
    ms = rows_.get(3 * C); ref = ms + C; rsum = ms + 2 * C;
  }

  void gemm_(int64_t M, int64_t N, int64_t K, const T* ap, int64_t ars, int64_t acs, const T* bp, int64_t brs,
             int64_t bcs, T* cp, int64_t ldc, bool accumulate) {
    gemm(M, N, K, Mat<T>{ap, ars, acs}, Mat<T>{bp, brs, bcs}, cp, ldc, accumulate, gs);
  }

  const bool* mask_rows(int64_t b, int64_t s0) const { return p.mask ? p.mask + b * p.S + s0 : nullptr; }
  T* shift_of(int64_t b, int64_t hk) const { return shift_out + (b * p.Hk + hk) * p.S; }

  // k' and V_aug rows of keys [s0, s0+n); projections into w and per-row maxima into ms
  // (softmax: max_j w_sj; relu: 0; padding: -inf).
  void load_keys(int64_t b, int64_t hk, int64_t s0, int64_t n) {
    load_rows<T>(p.k, p.dtype, b, hk, s0, n, E, c, kc, E);
    load_rows<T>(p.v, p.dtype, b, hk, s0, n, Ev, T(1), vaug, Ev1);
    for (int64_t s = 0; s < n; ++s) vaug[s * Ev1 + Ev] = T(1);
    gemm_(n, m, E, kc, E, 1, W, 1, E, w, m, false);
    const bool* mk = mask_rows(b, s0);
    for (int64_t s = 0; s < n; ++s) {
      T* ws = w + s * m;
      if (mk && mk[s]) { ms[s] = T(kNegInf); continue; }
      if (!softmax) { ms[s] = T(0); continue; }
      T half_norm = 0;
      for (int64_t e = 0; e < E; ++e) half_norm += kc[s * E + e] * kc[s * E + e];
      half_norm *= T(0.5);
      T mx = T(kNegInf);
      for (int64_t j = 0; j < m; ++j) { ws[j] -= half_norm; mx = fmax2(mx, ws[j]); }
      ms[s] = mx;
    }
  }

  // phi_k(s) = exp(w_s - ref[s]) (relu: relu(w_s) + eps); padding rows are zero.
  void key_features(int64_t b, int64_t s0, int64_t n, const T* refs) {
    const bool* mk = mask_rows(b, s0);
    for (int64_t s = 0; s < n; ++s) {
      const T* ws = w + s * m;
      T* ph = phik + s * m;
      if ((mk && mk[s]) || refs[s] == T(kNegInf)) {
        for (int64_t j = 0; j < m; ++j) ph[j] = T(0);
      } else if (softmax) {
        const T r = refs[s];
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) ph[j] = exp_fast(ws[j] - r);
      } else {
        for (int64_t j = 0; j < m; ++j) ph[j] = (ws[j] > T(0) ? ws[j] : T(0)) + T(kReluEps);
      }
    }
  }

  void query_features(int64_t b, int64_t h, int64_t t0, int64_t n) {
    load_rows<T>(p.q, p.dtype, b, h, t0, n, E, c, qc, E);
    gemm_(n, m, E, qc, E, 1, W, 1, E, u, m, false);
    for (int64_t t = 0; t < n; ++t) {
      const T* ut = u + t * m;
      T* ph = phiq + t * m;
      if (softmax) {
        T mx = T(kNegInf);
        for (int64_t j = 0; j < m; ++j) mx = fmax2(mx, ut[j]);
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) ph[j] = exp_fast(ut[j] - mx);
      } else {
        for (int64_t j = 0; j < m; ++j) ph[j] = (ut[j] > T(0) ? ut[j] : T(0)) + T(kReluEps);
      }
    }
  }

  // x[t, s] = s <= t ? x[t, s] * e^{ms[s] - ms[t]} : 0 on an (n x n) block with leading dim C.
  void causal_weights(T* x, int64_t n) const {
    for (int64_t t = 0; t < n; ++t) {
      T* row = x + t * C;
      if (ms[0] != ms[t])
        for (int64_t s = 0; s <= t; ++s) row[s] *= rescale(ms[s], ms[t]);
      for (int64_t s = t + 1; s < n; ++s) row[s] = T(0);
    }
  }

  void scale_rows(T* x, int64_t n, int64_t ld, int64_t width, const T* f) const {
    for (int64_t r = 0; r < n; ++r)
      if (f[r] != T(1))
        for (int64_t j = 0; j < width; ++j) x[r * ld + j] *= f[r];
  }

  // oaug = [numerator, denominator] rows -> out rows (dtype) and den; zero where den == 0.
  void finish_rows(int64_t b, int64_t h, int64_t t0, int64_t n) {
    T* den = den_out + (b * p.H + h) * p.L + t0;
    for (int64_t t = 0; t < n; ++t) {
      const T d = oaug[t * Ev1 + Ev];
      den[t] = d;
      const T inv = d > T(0) ? T(1) / d : T(0);
      for (int64_t e = 0; e < Ev; ++e) oaug[t * Ev1 + e] *= inv;
    }
    store_rows<T>(p.out.data, p.dtype, ((b * p.H + h) * p.L + t0) * Ev, n, Ev, T(1), oaug, Ev1);
  }

  // gaug[t] = [g_t / den_t, -(g_t . out_t) / den_t]: the gradient with respect to [num_t, den_t].
  void grad_rows(int64_t b, int64_t h, int64_t t0, int64_t n) {
    const T* den = den_out + (b * p.H + h) * p.L + t0;
    load_rows<T>(p.grad_out, p.dtype, b, h, t0, n, Ev, T(1), gaug, Ev1);
    load_rows<T>(p.out, p.dtype, b, h, t0, n, Ev, T(1), oaug, Ev1);
    for (int64_t t = 0; t < n; ++t) {
      const T inv = den[t] > T(0) ? T(1) / den[t] : T(0);
      T dot = 0;
      for (int64_t e = 0; e < Ev; ++e) dot += gaug[t * Ev1 + e] * oaug[t * Ev1 + e];
      for (int64_t e = 0; e < Ev; ++e) gaug[t * Ev1 + e] *= inv;
      gaug[t * Ev1 + Ev] = -dot * inv;
    }
  }

  // dq rows from dphiq (in place: du = dphi_q * dphi_q/du) -> dq = c du W.
  void store_dq(int64_t b, int64_t h, int64_t t0, int64_t n) {
    for (int64_t i = 0; i < n * m; ++i) dphiq[i] *= softmax ? phiq[i] : (u[i] > T(0) ? T(1) : T(0));
    gemm_(n, E, m, dphiq, m, 1, W, E, 1, dx, E, false);
    store_rows<T>(p.dq, p.dtype, ((b * p.H + h) * p.L + t0) * E, n, E, c, dx, E);
  }

  // dk rows from dphik: dw = dphi_k * dphi_k/dw; dk = c (dw W - k' sum_j dw_j) (relu: c dw W).
  void store_dk_dv(int64_t b, int64_t hk, int64_t s0, int64_t n) {
    const bool* mk = mask_rows(b, s0);
    for (int64_t s = 0; s < n; ++s) {
      T* d = dphik + s * m;
      const T* ph = phik + s * m;
      const T* ws = w + s * m;
      const bool masked = mk && mk[s];
      T sum = 0;
      for (int64_t j = 0; j < m; ++j) {
        d[j] = masked ? T(0) : d[j] * (softmax ? ph[j] : (ws[j] > T(0) ? T(1) : T(0)));
        sum += d[j];
      }
      rsum[s] = sum;
    }
    gemm_(n, E, m, dphik, m, 1, W, E, 1, dx, E, false);
    if (softmax)
      for (int64_t s = 0; s < n; ++s)
        for (int64_t e = 0; e < E; ++e) dx[s * E + e] -= kc[s * E + e] * rsum[s];
    const int64_t row0 = (b * p.Hk + hk) * p.S + s0;
    store_rows<T>(p.dk, p.dtype, row0 * E, n, E, c, dx, E);
    store_rows<T>(p.dv, p.dtype, row0 * Ev, n, Ev, T(1), dv, Ev1);
  }

  // S (m x Ev1) += phi_k^T V_aug for the n rows in phik/vaug.
  void add_to_state(T* S, int64_t n) { gemm_(m, Ev1, n, phik, 1, m, vaug, Ev1, 1, S, Ev1, true); }

  void scale_state(T* S, T f) const {
    if (f != T(1))
      for (int64_t i = 0; i < m * Ev1; ++i) S[i] *= f;
  }

  // ---- forward ----

  void forward_bidirectional(int64_t b, int64_t hk) {
    T* S = state_out + (b * p.Hk + hk) * m * Ev1;
    for (int64_t i = 0; i < m * Ev1; ++i) S[i] = T(0);
    T M = T(kNegInf);
    for (int64_t s0 = 0; s0 < p.S; s0 += C) {
      const int64_t n = imin(C, p.S - s0);
      load_keys(b, hk, s0, n);
      T Mn = M;
      for (int64_t s = 0; s < n; ++s) Mn = fmax2(Mn, ms[s]);
      scale_state(S, rescale(M, Mn));
      for (int64_t s = 0; s < n; ++s) ref[s] = Mn;
      key_features(b, s0, n, ref);
      add_to_state(S, n);
      M = Mn;
    }
    T* shift = shift_of(b, hk);
    for (int64_t s = 0; s < p.S; ++s) shift[s] = M;
    for (int64_t h = hk * g; h < (hk + 1) * g; ++h)
      for (int64_t t0 = 0; t0 < p.L; t0 += C) {
        const int64_t n = imin(C, p.L - t0);
        query_features(b, h, t0, n);
        gemm_(n, Ev1, m, phiq, m, 1, S, Ev1, 1, oaug, Ev1, false);
        finish_rows(b, h, t0, n);
      }
  }

  void forward_causal(int64_t b, int64_t hk) {
    T* S = state_out + (b * p.Hk + hk) * m * Ev1;
    for (int64_t i = 0; i < m * Ev1; ++i) S[i] = T(0);
    T* shift = shift_of(b, hk);
    T M = T(kNegInf);
    for (int64_t t0 = 0; t0 < p.L; t0 += C) {
      const int64_t n = imin(C, p.L - t0);
      load_keys(b, hk, t0, n);
      for (int64_t s = 0; s < n; ++s) shift[t0 + s] = ms[s] = fmax2(s ? ms[s - 1] : M, ms[s]);
      key_features(b, t0, n, ms);
      for (int64_t t = 0; t < n; ++t) ref[t] = rescale(M, ms[t]);
      for (int64_t h = hk * g; h < (hk + 1) * g; ++h) {
        query_features(b, h, t0, n);
        gemm_(n, n, m, phiq, m, 1, phik, 1, m, a, C, false);
        causal_weights(a, n);
        gemm_(n, Ev1, m, phiq, m, 1, S, Ev1, 1, oaug, Ev1, false);
        scale_rows(oaug, n, Ev1, Ev1, ref);
        gemm_(n, Ev1, n, a, C, 1, vaug, Ev1, 1, oaug, Ev1, true);
        finish_rows(b, h, t0, n);
      }
      const T Mend = ms[n - 1];
      scale_state(S, rescale(M, Mend));
      for (int64_t s = 0; s < n; ++s) ref[s] = rescale(ms[s], Mend);
      scale_rows(phik, n, m, m, ref);
      add_to_state(S, n);
      M = Mend;
    }
  }

  // ---- backward ----

  void backward_bidirectional(int64_t b, int64_t hk) {
    const T* S = state_out + (b * p.Hk + hk) * m * Ev1;
    T* dS = dst;
    for (int64_t i = 0; i < m * Ev1; ++i) dS[i] = T(0);
    for (int64_t h = hk * g; h < (hk + 1) * g; ++h)
      for (int64_t t0 = 0; t0 < p.L; t0 += C) {
        const int64_t n = imin(C, p.L - t0);
        query_features(b, h, t0, n);
        grad_rows(b, h, t0, n);
        gemm_(n, m, Ev1, gaug, Ev1, 1, S, 1, Ev1, dphiq, m, false);
        gemm_(m, Ev1, n, phiq, 1, m, gaug, Ev1, 1, dS, Ev1, true);
        store_dq(b, h, t0, n);
      }
    const T M = p.S > 0 ? shift_of(b, hk)[0] : T(kNegInf);
    for (int64_t s0 = 0; s0 < p.S; s0 += C) {
      const int64_t n = imin(C, p.S - s0);
      load_keys(b, hk, s0, n);
      for (int64_t s = 0; s < n; ++s) ref[s] = M;
      key_features(b, s0, n, ref);
      gemm_(n, m, Ev1, vaug, Ev1, 1, dS, 1, Ev1, dphik, m, false);
      gemm_(n, Ev, m, phik, m, 1, dS, Ev1, 1, dv, Ev1, false);
      store_dk_dv(b, hk, s0, n);
    }
  }

  void backward_causal(int64_t b, int64_t hk) {
    const T* shift = shift_of(b, hk);
    // Forward sweep: dq from the intra-chunk weights and the state of earlier chunks.
    T* S = st;
    for (int64_t i = 0; i < m * Ev1; ++i) S[i] = T(0);
    for (int64_t t0 = 0; t0 < p.L; t0 += C) {
      const int64_t n = imin(C, p.L - t0);
      const T Mprev = t0 ? shift[t0 - 1] : T(kNegInf);
      load_keys(b, hk, t0, n);
      for (int64_t s = 0; s < n; ++s) ms[s] = shift[t0 + s];
      key_features(b, t0, n, ms);
      for (int64_t t = 0; t < n; ++t) ref[t] = rescale(Mprev, ms[t]);
      for (int64_t h = hk * g; h < (hk + 1) * g; ++h) {
        query_features(b, h, t0, n);
        grad_rows(b, h, t0, n);
        gemm_(n, n, Ev1, gaug, Ev1, 1, vaug, 1, Ev1, da, C, false);
        causal_weights(da, n);
        gemm_(n, m, n, da, C, 1, phik, m, 1, dphiq, m, false);
        scale_rows(gaug, n, Ev1, Ev1, ref);
        gemm_(n, m, Ev1, gaug, Ev1, 1, S, 1, Ev1, dphiq, m, true);
        store_dq(b, h, t0, n);
      }
      const T Mend = ms[n - 1];
      scale_state(S, rescale(Mprev, Mend));
      for (int64_t s = 0; s < n; ++s) ref[s] = rescale(ms[s], Mend);
      scale_rows(phik, n, m, m, ref);
      add_to_state(S, n);
    }
    // Reverse sweep: dk, dv from the intra-chunk weights and P, the sum over later queries of
    // e^{Mc - m_t} phi_q(t) gaug_t^T, held relative to the running maximum Mc at the chunk's end.
    T* P = dst;
    for (int64_t i = 0; i < m * Ev1; ++i) P[i] = T(0);
    for (int64_t t0 = ((p.L - 1) / C) * C; t0 >= 0 && p.L > 0; t0 -= C) {
      const int64_t n = imin(C, p.L - t0);
      const T Mprev = t0 ? shift[t0 - 1] : T(kNegInf);
      load_keys(b, hk, t0, n);
      for (int64_t s = 0; s < n; ++s) ms[s] = shift[t0 + s];
      key_features(b, t0, n, ms);
      const T Mc = ms[n - 1];
      gemm_(n, m, Ev1, vaug, Ev1, 1, P, 1, Ev1, dphik, m, false);
      gemm_(n, Ev, m, phik, m, 1, P, Ev1, 1, dv, Ev1, false);
      for (int64_t s = 0; s < n; ++s) ref[s] = rescale(ms[s], Mc);
      scale_rows(dphik, n, m, m, ref);
      scale_rows(dv, n, Ev1, Ev, ref);
      scale_state(P, rescale(Mprev, Mc));
      for (int64_t t = 0; t < n; ++t) ref[t] = rescale(Mprev, ms[t]);
      for (int64_t h = hk * g; h < (hk + 1) * g; ++h) {
        query_features(b, h, t0, n);
        grad_rows(b, h, t0, n);
        gemm_(n, n, m, phiq, m, 1, phik, 1, m, a, C, false);
        causal_weights(a, n);
        gemm_(n, n, Ev1, gaug, Ev1, 1, vaug, 1, Ev1, da, C, false);
        causal_weights(da, n);
        gemm_(n, m, n, da, 1, C, phiq, m, 1, dphik, m, true);
        gemm_(n, Ev, n, a, 1, C, gaug, Ev1, 1, dv, Ev1, true);
        scale_rows(gaug, n, Ev1, Ev1, ref);
        gemm_(m, Ev1, n, phiq, 1, m, gaug, Ev1, 1, P, Ev1, true);
      }
      store_dk_dv(b, hk, t0, n);
    }
  }
};

template <typename T>
static void run_items(const FavorParams& p, bool backward) {
  const int64_t items = p.B * p.Hk;
#pragma omp parallel num_threads(p.num_threads)
  {
    Favor<T> f(p);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = it / p.Hk, hk = it % p.Hk;
      if (backward) {
        if (p.causal) f.backward_causal(b, hk);
        else f.backward_bidirectional(b, hk);
      } else {
        if (p.causal) f.forward_causal(b, hk);
        else f.forward_bidirectional(b, hk);
      }
    }
  }
}

static void favor_forward(const FavorParams& p) {
  if (p.dtype == DType::f64) run_items<double>(p, false);
  else run_items<float>(p, false);
}

static void favor_backward(const FavorParams& p) {
  if (p.dtype == DType::f64) run_items<double>(p, true);
  else run_items<float>(p, true);
}

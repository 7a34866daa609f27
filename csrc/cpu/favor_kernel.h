// FAVOR+ CPU kernels, compiled once per ISA (included inside namespace performer::cpu::<isa>).
//
// Per (batch, key/value head) and over chunks of C rows, with c = sqrt(scale), W the (m, E)
// features of that batch and head, b their bias (zero if none), k' = c k and q' = c q:
//   keys:     w_s = W k'_s + b - |k'_s|^2/2 (softmax) or W k'_s + b (relu);  phi_k(s) = exp(w_s - M)
//             softmax_normalized: w_s = W k'_s + b - lse_s with lse_s = log sum_j exp(W k'_s + b)_j, the
//             key's features divided by their sum (m times their mean): a per-key factor that the
//             estimator no longer has to get right by chance, which lowers its variance.
//   queries:  phi_q(t) = exp(W q'_t + b - c_t)  (relu: relu(W q'_t + b) + eps)
//   out_t     = phi_q(t)^T S / phi_q(t)^T z  with S = sum_s phi_k(s) v_s^T (m x Ev), z = sum_s phi_k(s).
// The shifts M and c_t cancel exactly in the ratio and carry no gradient. c_t is chosen so that
// the query's normalizer stays >= 1 (see query_shift_*) and is saved for the backward pass.
// Causal mode uses, for key s, the running maximum m_s of w over keys <= s, so nothing at
// position t depends on later keys:
//   out_t ~ sum_{s <= t} phi_q(t).phi_k(s) e^{m_s - m_t} [v_s, 1],  phi_k(s) = exp(w_s - m_s),
// computed per chunk as a masked intra-chunk product plus phi_q times the state of earlier
// chunks (held relative to the running maximum at the chunk start). The backward pass
// recomputes features; causal backward is a forward sweep for dq and a reverse sweep for dk, dv.
// With p.dfeatures, the backward also accumulates dW = sum dphi^T x' and db = sum dphi over the rows
// of queries and keys (dphi: the gradient with respect to u or w), per thread, added up at the end.
#pragma once

// Rows per chunk: a multiple of the GEMM tile height near 64, so chunk products use full tiles.
static constexpr int64_t kChunk = kMR * (64 / kMR);
static constexpr double kReluEps = 1e-3;        // keep in sync with performer/ops/favor/reference.py
static constexpr double kQueryShiftSpan = 30.0;  // query features stay <= e^30 (likewise)
// A normalizer below this has no usable key weight: the query returns zeros, as one with no visible
// key does (likewise). With features <= e^span, gradients g / den times features stay finite.
template <typename T>
static constexpr T kMinDen = sizeof(T) == 4 ? T(1e-15) : T(1e-200);

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
        if (cs == 1) {
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) out[d] = mul * T(s[d]);
        } else {
          for (int64_t d = 0; d < D; ++d) out[d] = mul * T(s[d * cs]);
        } } break;
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
#pragma omp simd
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

// ---- small vector helpers ----------------------------------------------------------------------

template <typename T>
static inline T dot(const T* x, const T* y, int64_t n) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += x[j] * y[j];
  return sum;
}

template <typename T>
static inline void axpy(T alpha, const T* x, T* y, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] += alpha * x[j];
}

// ---- per-thread context ----------------------------------------------------------------------

template <typename T>
struct Favor {
  const FavorParams& p;
  const int64_t C, m, E, Ev, g;
  const T c;
  const T* const W0;     // all features (Bf, Hf, m, E), and their bias (Bf, Hf, m) or null
  const T* const bias0;
  const T* W = nullptr;  // those of the batch and head in hand (use_features)
  const T* bias = nullptr;
  int64_t slot = -1;
  const bool softmax;     // softmax or softmax_normalized: exponential features
  const bool normalized;  // softmax_normalized
  T* const state_out;
  T* const den_out;
  T* const qshift_out;
  T* const shift_out;
  // Thread-local buffers (rows of a chunk unless noted): q', k', v; projections u (queries) and w
  // (keys) and features phiq, phik; intra-chunk products a, da; numerators / gradients with
  // respect to them; the state S (m x Ev) and z (m), and dS/dz or the reverse-sweep P/p.
  Scratch<T> qc_, kc_, vc_, u_, phiq_, w_, phik_, a_, da_, num_, gq_, dphiq_, dphik_, dv_, dx_, st_, dst_, rows_, logz_;
  T *qc, *kc, *vc, *u, *phiq, *w, *phik, *a, *da, *num, *gq, *dphiq, *dphik, *dv, *dx, *S, *z, *dS, *dz;
  T *ms, *ref, *rsum, *dens, *beta, *ones, *qs, *kinv, *logz;
  GemmScratch<T> gs;
  PackedB<T> w_t, w_n, s_p, chunk_p;  // W^T (E x m), W (m x E), the state, a per-chunk operand
  Scratch<T> dW_;                     // this thread's share of dfeatures and dfeature_bias, or empty
  T *dW = nullptr, *db = nullptr;

  explicit Favor(const FavorParams& p_)
      : p(p_), C(kChunk), m(p_.m), E(p_.E), Ev(p_.Ev), g(p_.H / p_.Hk),
        c(T(__builtin_sqrt(p_.scale))), W0(static_cast<const T*>(p_.features)),
        bias0(static_cast<const T*>(p_.feature_bias)), softmax(p_.kernel != Kernel::relu),
        normalized(p_.kernel == Kernel::softmax_normalized),
        state_out(static_cast<T*>(p_.state)), den_out(static_cast<T*>(p_.den)),
        qshift_out(static_cast<T*>(p_.query_shift)), shift_out(static_cast<T*>(p_.key_shift)) {
    qc = qc_.get(C * E); kc = kc_.get(C * E); vc = vc_.get(C * Ev);
    u = u_.get(C * m); phiq = phiq_.get(C * m); w = w_.get(C * m); phik = phik_.get(C * m);
    a = a_.get(C * C); da = da_.get(C * C); num = num_.get(C * Ev); gq = gq_.get(C * Ev);
    dphiq = dphiq_.get(C * m); dphik = dphik_.get(C * m); dv = dv_.get(C * Ev); dx = dx_.get(C * E);
    S = st_.get(m * Ev + m); z = S + m * Ev;
    dS = dst_.get(m * Ev + m); dz = dS + m * Ev;
    logz = logz_.get(m);
    ms = rows_.get(8 * C); qs = ms + 6 * C; kinv = ms + 7 * C; ref = ms + C; rsum = ms + 2 * C; dens = ms + 3 * C; beta = ms + 4 * C; ones = ms + 5 * C;
    for (int64_t i = 0; i < C; ++i) ones[i] = T(1);
    use_features(0, 0);
    if (p.dfeatures) {
      const int64_t slots = p.Bf * p.Hf;
      dW = dW_.get(slots * m * (E + 1));
      db = dW + slots * m * E;
      zero(dW, slots * m * (E + 1));
    }
  }

  // Adds this thread's share of the feature gradients to the outputs (inside the parallel region).
  ~Favor() {
    if (!dW) return;
    const int64_t slots = p.Bf * p.Hf;
    T* out_w = static_cast<T*>(p.dfeatures);
    T* out_b = static_cast<T*>(p.dfeature_bias);
#pragma omp critical(performer_favor_feature_grads)
    {
      for (int64_t i = 0; i < slots * m * E; ++i) out_w[i] += dW[i];
      if (out_b)
        for (int64_t i = 0; i < slots * m; ++i) out_b[i] += db[i];
    }
  }

  // The features (and bias) of batch b, key head hk: packed again only when they change.
  int64_t feature_slot(int64_t b, int64_t hk) const { return (p.Bf > 1 ? b : 0) * p.Hf + (p.Hf > 1 ? hk : 0); }
  void use_features(int64_t b, int64_t hk) {
    const int64_t s = feature_slot(b, hk);
    if (s == slot) return;
    slot = s;
    W = W0 + s * m * E;
    bias = bias0 ? bias0 + s * m : nullptr;
    w_t.pack(E, m, Mat<T>{W, 1, E});
    w_n.pack(m, E, Mat<T>{W, E, 1});
  }

  // Backward: dW += dphi^T x' and db += sum dphi for n rows of dphi (the gradient with respect to the
  // projections u or w, in place in dphiq / dphik) and x' (qc / kc) of the features in hand.
  void add_feature_grads(int64_t n, const T* dphi, const T* x) {
    if (!dW) return;
    gemm_(m, E, n, dphi, 1, m, x, E, 1, dW + slot * m * E, E, true);
    T* dbs = db + slot * m;
    for (int64_t r = 0; r < n; ++r) axpy(T(1), dphi + r * m, dbs, m);
  }

  void gemm_(int64_t M, int64_t N, int64_t K, const T* ap, int64_t ars, int64_t acs, const T* bp, int64_t brs,
             int64_t bcs, T* cp, int64_t ldc, bool accumulate) {
    gemm(M, N, K, Mat<T>{ap, ars, acs}, Mat<T>{bp, brs, bcs}, cp, ldc, accumulate, gs);
  }
  void gemm_(int64_t M, const PackedB<T>& b, const T* ap, int64_t ars, int64_t acs, T* cp, int64_t ldc,
             bool accumulate) {
    gemm(M, b, Mat<T>{ap, ars, acs}, cp, ldc, accumulate, gs);
  }

  const bool* mask_rows(int64_t b, int64_t s0) const { return p.mask ? p.mask + b * p.S + s0 : nullptr; }
  T* shift_of(int64_t b, int64_t hk) const { return shift_out + (b * p.Hk + hk) * p.S; }
  T* state_of(int64_t b, int64_t hk) const { return state_out + (b * p.Hk + hk) * m * (Ev + 1); }

  void zero(T* x, int64_t n) const {
    for (int64_t i = 0; i < n; ++i) x[i] = T(0);
  }
  static void copy(T* dst, const T* src, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
  }

  // The (m, Ev + 1) state tensor <-> the working S (m x Ev) and z (m).
  void save_state(int64_t b, int64_t hk) const {
    T* out = state_of(b, hk);
    for (int64_t j = 0; j < m; ++j) {
      for (int64_t e = 0; e < Ev; ++e) out[j * (Ev + 1) + e] = S[j * Ev + e];
      out[j * (Ev + 1) + Ev] = z[j];
    }
  }
  void load_state(int64_t b, int64_t hk) {
    const T* in = state_of(b, hk);
    for (int64_t j = 0; j < m; ++j) {
      for (int64_t e = 0; e < Ev; ++e) S[j * Ev + e] = in[j * (Ev + 1) + e];
      z[j] = in[j * (Ev + 1) + Ev];
    }
  }

  // k' and v rows of keys [s0, s0+n); projections into w and per-row maxima into ms
  // (softmax: max_j w_sj; relu: 0; padding: -inf).
  void load_keys(int64_t b, int64_t hk, int64_t s0, int64_t n) {
    use_features(b, hk);
    load_rows<T>(p.k, p.dtype, b, hk, s0, n, E, c, kc, E);
    load_rows<T>(p.v, p.dtype, b, hk, s0, n, Ev, T(1), vc, Ev);
    gemm_(n, w_t, kc, E, 1, w, m, false);
    add_bias(w, n);
    const bool* mk = mask_rows(b, s0);
    for (int64_t s = 0; s < n; ++s) {
      T* ws = w + s * m;
      if (mk && mk[s]) { ms[s] = T(kNegInf); continue; }
      if (!softmax) { ms[s] = T(0); continue; }
      if (normalized) { ms[s] = normalize_row(ws, phik + s * m, kinv[s]); continue; }
      const T half_norm = T(0.5) * dot(kc + s * E, kc + s * E, E);
      T mx = T(kNegInf);
#pragma omp simd reduction(max : mx)
      for (int64_t j = 0; j < m; ++j) {
        ws[j] -= half_norm;
        mx = ws[j] > mx ? ws[j] : mx;
      }
      ms[s] = half_norm == half_norm ? mx : half_norm;  // a NaN key propagates, never pads
    }
  }

  // One key's row: w -= lse = log sum_j exp(w_j), and its features' exponentials e_j = exp(w_j - max_j w_j)
  // into ph with inv = 1 / sum_j e_j, so that the key's features are e_j * inv * exp(-ref) (key_features:
  // no second exponential). Returns the new max_j w_j, in [-log m, 0] (NaN for a NaN key).
  T normalize_row(T* ws, T* ph, T& inv) const {
    T mx = T(kNegInf);
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < m; ++j) mx = ws[j] > mx ? ws[j] : mx;
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < m; ++j) {
      ph[j] = exp_fast(ws[j] - mx);
      sum += ph[j];
    }
    const T lse = mx + T(::log(double(sum)));  // NaN propagates through sum
    inv = T(1) / sum;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) ws[j] -= lse;
    return mx - lse;
  }

  // phi_k(s) = exp(w_s - ref[s]) (relu: relu(w_s) + eps; softmax_normalized: from load_keys' exponentials,
  // e_j * inv * exp(-ref[s]) with max_j w_sj <= ref[s] <= 0); padding rows are zero.
  void key_features(int64_t b, int64_t s0, int64_t n, const T* refs) {
    const bool* mk = mask_rows(b, s0);
    for (int64_t s = 0; s < n; ++s) {
      const T* ws = w + s * m;
      T* ph = phik + s * m;
      if ((mk && mk[s]) || refs[s] == T(kNegInf)) {
        zero(ph, m);
      } else if (normalized) {
        const T f = kinv[s] * T(::exp(double(-refs[s])));
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) ph[j] *= f;
      } else if (softmax) {
        const T r = refs[s];
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) ph[j] = exp_fast(ws[j] - r);
      } else {
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) ph[j] = (ws[j] < T(0) ? T(0) : ws[j]) + T(kReluEps);
      }
    }
  }

  // x rows (n x m) += the feature bias, if any.
  void add_bias(T* x, int64_t n) const {
    if (!bias) return;
    const T* bb = bias;  // a local, not a member, in a vectorized loop
    for (int64_t r = 0; r < n; ++r) {
      T* row = x + r * m;
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) row[j] += bb[j];
    }
  }

  // u = W q' + bias for queries [t0, t0+n) of head h.
  void project_queries(int64_t b, int64_t h, int64_t t0, int64_t n) {
    use_features(b, h / g);
    load_rows<T>(p.q, p.dtype, b, h, t0, n, E, c, qc, E);
    gemm_(n, w_t, qc, E, 1, u, m, false);
    add_bias(u, n);
  }

  // phi_q(t) = exp(u_t - qs[t]) (relu: relu(u_t) + eps); with_den: also dens[t] = phi_q(t) . z,
  // in the same pass.
  void query_features(int64_t n, bool with_den = false) {
    const T* zz = z;  // locals, not members, in vectorized loops
    for (int64_t t = 0; t < n; ++t) {
      const T* ut = u + t * m;
      T* ph = phiq + t * m;
      if (softmax) {
        const T sh = qs[t];
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) ph[j] = exp_fast(ut[j] - sh);
      } else {
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) ph[j] = (ut[j] < T(0) ? T(0) : ut[j]) + T(kReluEps);
      }
      if (with_den) {
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < m; ++j) sum += ph[j] * zz[j];
        dens[t] = sum;
      }
    }
  }

  // Query shifts. With lam_tj <= log Z_tj, where Z_t is the key normalizer that query t sees,
  // c_t = max(max_j (u_tj + lam_tj), max_j u_tj - span) makes den_t >= 1 whenever the first term
  // wins, and phi_q <= e^span always: outputs and gradients stay finite for logits of any size.
  void set_log_normalizer() {
    for (int64_t j = 0; j < m; ++j) logz[j] = z[j] > T(0) ? T(::log(double(z[j]))) : T(kNegInf);
  }
  T shift_from(const T* ut, const T* lam) const {
    T best = T(kNegInf), top = T(kNegInf);
#pragma omp simd reduction(max : best, top)
    for (int64_t j = 0; j < m; ++j) {
      best = ut[j] + lam[j] > best ? ut[j] + lam[j] : best;
      top = ut[j] > top ? ut[j] : top;
    }
    return fmax2(best, top - T(kQueryShiftSpan));
  }
  // Bidirectional: lam = log z, the final normalizer.
  void query_shift_bidirectional(int64_t n) {
    for (int64_t t = 0; t < n; ++t) qs[t] = softmax ? shift_from(u + t * m, logz) : T(0);
  }
  // Causal: lam_t = max(log z_prev + Mprev - m_t, w_t - m_t): the state before the chunk and key t
  // itself, both parts of Z_t; nothing after position t.
  void query_shift_causal(int64_t b, int64_t t0, int64_t n, T Mprev) {
    const bool* mk = mask_rows(b, t0);
    for (int64_t t = 0; t < n; ++t) {
      if (!softmax) { qs[t] = T(0); continue; }
      const T* ut = u + t * m;
      const T off = (Mprev == T(kNegInf) || ms[t] == T(kNegInf)) ? T(kNegInf) : Mprev - ms[t];
      const T* lz = logz;  // locals, not members, in vectorized loops
      T best = T(kNegInf), top = T(kNegInf);
      if (!(mk && mk[t]) && ms[t] != T(kNegInf)) {
        const T* wt = w + t * m;
        const T mt = ms[t];
#pragma omp simd reduction(max : best, top)
        for (int64_t j = 0; j < m; ++j) {
          const T from_state = lz[j] + off, from_key = wt[j] - mt;
          const T x = ut[j] + (from_state > from_key ? from_state : from_key);
          best = x > best ? x : best;
          top = ut[j] > top ? ut[j] : top;
        }
      } else {
#pragma omp simd reduction(max : best, top)
        for (int64_t j = 0; j < m; ++j) {
          best = ut[j] + lz[j] + off > best ? ut[j] + lz[j] + off : best;
          top = ut[j] > top ? ut[j] : top;
        }
      }
      qs[t] = fmax2(best, top - T(kQueryShiftSpan));
    }
  }
  // The saved shifts of queries [t0, t0+n) of head h (backward).
  void load_query_shift(int64_t b, int64_t h, int64_t t0, int64_t n) {
    const T* src = qshift_out + (b * p.H + h) * p.L + t0;
    for (int64_t t = 0; t < n; ++t) qs[t] = src[t];
  }
  // Backward: recompute u and phi_q with the forward's shifts.
  void saved_query_features(int64_t b, int64_t h, int64_t t0, int64_t n) {
    project_queries(b, h, t0, n);
    load_query_shift(b, h, t0, n);
    query_features(n);
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

  // Chunk results -> out rows (dtype) and den; zero where den == 0.
  void finish_rows(int64_t b, int64_t h, int64_t t0, int64_t n) {
    T* den = den_out + (b * p.H + h) * p.L + t0;
    T* qshift = qshift_out + (b * p.H + h) * p.L + t0;
    for (int64_t t = 0; t < n; ++t) {
      const bool visible = dens[t] >= kMinDen<T>;
      den[t] = visible ? dens[t] : T(0);
      qshift[t] = qs[t];
      store_rows<T>(p.out.data, p.dtype, ((b * p.H + h) * p.L + t0 + t) * Ev, 1, Ev, visible ? T(1) / dens[t] : T(0),
                    num + t * Ev, Ev);
    }
  }

  // The gradient with respect to a query's numerator and denominator: gq_t = g_t / den_t and
  // -beta_t with beta_t = (g_t . out_t) / den_t (zero where den_t == 0).
  void grad_rows(int64_t b, int64_t h, int64_t t0, int64_t n) {
    const T* den = den_out + (b * p.H + h) * p.L + t0;
    load_rows<T>(p.grad_out, p.dtype, b, h, t0, n, Ev, T(1), gq, Ev);
    load_rows<T>(p.out, p.dtype, b, h, t0, n, Ev, T(1), num, Ev);
    for (int64_t t = 0; t < n; ++t) {
      const T inv = den[t] > T(0) ? T(1) / den[t] : T(0);
      beta[t] = dot(gq + t * Ev, num + t * Ev, Ev) * inv;
      for (int64_t e = 0; e < Ev; ++e) gq[t * Ev + e] *= inv;
    }
  }

  // dq rows from dphiq (in place: du = dphi_q * dphi_q/du) -> dq = c du W.
  void store_dq(int64_t b, int64_t h, int64_t t0, int64_t n) {
    for (int64_t i = 0; i < n * m; ++i) dphiq[i] *= softmax ? phiq[i] : (u[i] > T(0) ? T(1) : T(0));
    gemm_(n, w_n, dphiq, m, 1, dx, E, false);
    add_feature_grads(n, dphiq, qc);
    store_rows<T>(p.dq, p.dtype, ((b * p.H + h) * p.L + t0) * E, n, E, c, dx, E);
  }

  // dk rows from dphik: dw = dphi_k * dphi_k/dw; dk = c (dw W - k' sum_j dw_j) (relu: c dw W;
  // softmax_normalized: dw_j -= p_j sum_i dw_i with p_j = exp(w_j) the key's softmax over the features,
  // then dk = c dw W: the gradient through lse, which also reaches the features and bias; phi_k rows of
  // visible keys sum to exp(-ref) >= 1, see key_features).
  void store_dk_dv(int64_t b, int64_t hk, int64_t s0, int64_t n) {
    const bool* mk = mask_rows(b, s0);
    for (int64_t s = 0; s < n; ++s) {
      T* d = dphik + s * m;
      const T* ph = phik + s * m;
      const T* ws = w + s * m;
      if (mk && mk[s]) {
        zero(d, m);
      } else if (softmax) {
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) d[j] *= ph[j];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) d[j] = ws[j] > T(0) ? d[j] : T(0);
      }
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < m; ++j) sum += d[j];
      rsum[s] = sum;
      if (normalized && !(mk && mk[s])) {  // p = phi_k / sum_j phi_kj: the key's softmax over the features
        T total = 0;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < m; ++j) total += ph[j];
        const T f = sum / total;
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) d[j] -= ph[j] * f;
      }
    }
    gemm_(n, w_n, dphik, m, 1, dx, E, false);
    add_feature_grads(n, dphik, kc);
    if (softmax && !normalized)
      for (int64_t s = 0; s < n; ++s) axpy(-rsum[s], kc + s * E, dx + s * E, E);
    const int64_t row0 = (b * p.Hk + hk) * p.S + s0;
    store_rows<T>(p.dk, p.dtype, row0 * E, n, E, c, dx, E);
    store_rows<T>(p.dv, p.dtype, row0 * Ev, n, Ev, T(1), dv, Ev);
  }

  // [S, z] += phi_k^T [v, 1] for the n rows in phik / vc.
  void add_to_state(int64_t n) {
    gemm_(m, Ev, n, phik, 1, m, vc, Ev, 1, S, Ev, true);
    for (int64_t s = 0; s < n; ++s) axpy(T(1), phik + s * m, z, m);
  }

  void scale_state(T* x, T f) const {
    if (f != T(1))
      for (int64_t i = 0; i < m * Ev + m; ++i) x[i] *= f;
  }

  // Causal: carries [S, z] (relative to Mprev, the running maximum before the chunk) past the n
  // keys in phik, ms; returns the running maximum at the chunk's end, the new reference.
  T advance_state(int64_t n, T Mprev) {
    const T Mend = ms[n - 1];
    scale_state(S, rescale(Mprev, Mend));
    for (int64_t s = 0; s < n; ++s) ref[s] = rescale(ms[s], Mend);
    scale_rows(phik, n, m, m, ref);
    add_to_state(n);
    return Mend;
  }

  // Backward, causal: keys [t0, t0+n) with the forward's running maxima (in ms) and features.
  void saved_key_features(int64_t b, int64_t hk, int64_t t0, int64_t n) {
    const T* shift = shift_of(b, hk);
    load_keys(b, hk, t0, n);
    for (int64_t s = 0; s < n; ++s) ms[s] = shift[t0 + s];
    key_features(b, t0, n, ms);
  }

  // [gq, beta] rows *= ref: a query's gradient moved to another reference maximum.
  void scale_grad_rows(int64_t n) {
    scale_rows(gq, n, Ev, Ev, ref);
    for (int64_t t = 0; t < n; ++t) beta[t] *= ref[t];
  }

  // num rows = phi_q S for the n rows in phiq, with S packed in s_p (dens: query_features(n, true)).
  void apply_state(int64_t n) { gemm_(n, s_p, phiq, m, 1, num, Ev, false); }

  // dphi = gq X^T - beta x^T for n query rows: the gradient through [num, den] = phi [X, x] for
  // X (rows x Ev, leading dim Ev) and x (rows); accumulate or overwrite.
  void grad_through(int64_t n, const T* X, const T* x, int64_t rows, T* dphi, int64_t ldd, bool accumulate) {
    gemm_(n, rows, Ev, gq, Ev, 1, X, 1, Ev, dphi, ldd, accumulate);
    for (int64_t t = 0; t < n; ++t) axpy(-beta[t], x, dphi + t * ldd, rows);
  }

  // ---- forward ----

  // [S, z] (relative to the running maximum M, updated) += the keys [s_begin, s_end).
  void accumulate_keys(int64_t b, int64_t hk, int64_t s_begin, int64_t s_end, T& M) {
    for (int64_t s0 = s_begin; s0 < s_end; s0 += C) {
      const int64_t n = imin(C, s_end - s0);
      load_keys(b, hk, s0, n);
      T Mn = M;
      for (int64_t s = 0; s < n; ++s) Mn = fmax2(Mn, ms[s]);
      scale_state(S, rescale(M, Mn));
      for (int64_t s = 0; s < n; ++s) ref[s] = Mn;
      key_features(b, s0, n, ref);
      add_to_state(n);
      M = Mn;
    }
  }

  // Outputs of query head h, rows [t_begin, t_end), from the final [S, z].
  void output_rows(int64_t b, int64_t h, int64_t t_begin, int64_t t_end) {
    s_p.pack(m, Ev, Mat<T>{S, Ev, 1});
    set_log_normalizer();
    for (int64_t t0 = t_begin; t0 < t_end; t0 += C) {
      const int64_t n = imin(C, t_end - t0);
      project_queries(b, h, t0, n);
      query_shift_bidirectional(n);
      query_features(n, true);
      apply_state(n);
      finish_rows(b, h, t0, n);
    }
  }

  void forward_bidirectional(int64_t b, int64_t hk) {
    zero(S, m * Ev + m);
    T M = T(kNegInf);
    accumulate_keys(b, hk, 0, p.S, M);
    save_state(b, hk);
    T* shift = shift_of(b, hk);
    for (int64_t s = 0; s < p.S; ++s) shift[s] = M;
    for (int64_t h = hk * g; h < (hk + 1) * g; ++h) output_rows(b, h, 0, p.L);
  }

  // Causal outputs for positions [t_begin, t_end) of every query head of kv head hk, starting
  // from [S, z] relative to M: the keys before t_begin.
  void forward_causal(int64_t b, int64_t hk, int64_t t_begin, int64_t t_end, T M) {
    T* shift = shift_of(b, hk);
    for (int64_t t0 = t_begin; t0 < t_end; t0 += C) {
      const int64_t n = imin(C, t_end - t0);
      load_keys(b, hk, t0, n);
      for (int64_t s = 0; s < n; ++s) shift[t0 + s] = ms[s] = fmax2(s ? ms[s - 1] : M, ms[s]);
      key_features(b, t0, n, ms);
      for (int64_t t = 0; t < n; ++t) ref[t] = rescale(M, ms[t]);
      s_p.pack(m, Ev, Mat<T>{S, Ev, 1});
      chunk_p.pack(m, n, Mat<T>{phik, 1, m});
      set_log_normalizer();
      for (int64_t h = hk * g; h < (hk + 1) * g; ++h) {
        project_queries(b, h, t0, n);
        query_shift_causal(b, t0, n, M);
        query_features(n, true);
        gemm_(n, chunk_p, phiq, m, 1, a, C, false);
        causal_weights(a, n);
        apply_state(n);
        scale_rows(num, n, Ev, Ev, ref);
        for (int64_t t = 0; t < n; ++t) dens[t] *= ref[t];
        gemm_(n, Ev, n, a, C, 1, vc, Ev, 1, num, Ev, true);
        for (int64_t t = 0; t < n; ++t) {
          T sum = 0;
          for (int64_t s = 0; s <= t; ++s) sum += a[t * C + s];
          dens[t] += sum;
        }
        finish_rows(b, h, t0, n);
      }
      M = advance_state(n, M);
    }
  }

  void forward_causal(int64_t b, int64_t hk) {
    zero(S, m * Ev + m);
    forward_causal(b, hk, 0, p.L, T(kNegInf));
    save_state(b, hk);
  }

  // ---- backward ----

  // dq of head h, rows [t_begin, t_end), from the saved [S, z] (load_state first); their part
  // of [dS, dz] (the gradient with respect to the state) is added to dS, dz.
  void query_grads(int64_t b, int64_t h, int64_t t_begin, int64_t t_end) {
    for (int64_t t0 = t_begin; t0 < t_end; t0 += C) {
      const int64_t n = imin(C, t_end - t0);
      saved_query_features(b, h, t0, n);
      grad_rows(b, h, t0, n);
      grad_through(n, S, z, m, dphiq, m, false);
      add_query_part(n);
      store_dq(b, h, t0, n);
    }
  }

  // dk, dv of keys [s_begin, s_end) from the complete [dS, dz].
  void key_grads(int64_t b, int64_t hk, int64_t s_begin, int64_t s_end) {
    const T M = p.S > 0 ? shift_of(b, hk)[0] : T(kNegInf);
    for (int64_t s0 = s_begin; s0 < s_end; s0 += C) {
      const int64_t n = imin(C, s_end - s0);
      load_keys(b, hk, s0, n);
      for (int64_t s = 0; s < n; ++s) ref[s] = M;
      key_features(b, s0, n, ref);
      gemm_(n, m, Ev, vc, Ev, 1, dS, 1, Ev, dphik, m, false);
      for (int64_t s = 0; s < n; ++s) axpy(T(1), dz, dphik + s * m, m);
      gemm_(n, Ev, m, phik, m, 1, dS, Ev, 1, dv, Ev, false);
      store_dk_dv(b, hk, s0, n);
    }
  }

  void backward_bidirectional(int64_t b, int64_t hk) {
    load_state(b, hk);
    zero(dS, m * Ev + m);
    for (int64_t h = hk * g; h < (hk + 1) * g; ++h) query_grads(b, h, 0, p.L);
    key_grads(b, hk, 0, p.S);
  }

  // Causal backward, forward sweep: dq of positions [t_begin, t_end) (every query head of kv head
  // hk) from the intra-chunk weights and [S, z], the keys before t_begin relative to
  // shift[t_begin - 1].
  void causal_dq(int64_t b, int64_t hk, int64_t t_begin, int64_t t_end) {
    const T* shift = shift_of(b, hk);
    for (int64_t t0 = t_begin; t0 < t_end; t0 += C) {
      const int64_t n = imin(C, t_end - t0);
      const T Mprev = t0 ? shift[t0 - 1] : T(kNegInf);
      saved_key_features(b, hk, t0, n);
      for (int64_t t = 0; t < n; ++t) ref[t] = rescale(Mprev, ms[t]);
      for (int64_t h = hk * g; h < (hk + 1) * g; ++h) {
        saved_query_features(b, h, t0, n);
        grad_rows(b, h, t0, n);
        grad_through(n, vc, ones, n, da, C, false);
        causal_weights(da, n);
        gemm_(n, m, n, da, C, 1, phik, m, 1, dphiq, m, false);
        scale_grad_rows(n);
        grad_through(n, S, z, m, dphiq, m, true);
        store_dq(b, h, t0, n);
      }
      advance_state(n, Mprev);
    }
  }

  // Causal backward, reverse sweep: dk, dv of keys [t_begin, t_end) from the intra-chunk weights
  // and [P, p] (in dS, dz): the sum over later queries of e^{Mc - m_t} phi_q(t) [gq_t, -beta_t]^T,
  // relative to the running maximum Mc at the end of the chunk in hand (initially shift[t_end - 1]).
  void causal_dkdv(int64_t b, int64_t hk, int64_t t_begin, int64_t t_end) {
    const T* shift = shift_of(b, hk);
    T* P = dS;
    T* pv = dz;
    for (int64_t t0 = t_begin + (t_end - 1 - t_begin) / C * C; t0 >= t_begin && t_end > t_begin; t0 -= C) {
      const int64_t n = imin(C, t_end - t0);
      const T Mprev = t0 ? shift[t0 - 1] : T(kNegInf);
      saved_key_features(b, hk, t0, n);
      const T Mc = ms[n - 1];
      gemm_(n, m, Ev, vc, Ev, 1, P, 1, Ev, dphik, m, false);
      for (int64_t s = 0; s < n; ++s) axpy(T(1), pv, dphik + s * m, m);
      gemm_(n, Ev, m, phik, m, 1, P, Ev, 1, dv, Ev, false);
      for (int64_t s = 0; s < n; ++s) ref[s] = rescale(ms[s], Mc);
      scale_rows(dphik, n, m, m, ref);
      scale_rows(dv, n, Ev, Ev, ref);
      scale_state(P, rescale(Mprev, Mc));
      for (int64_t t = 0; t < n; ++t) ref[t] = rescale(Mprev, ms[t]);
      chunk_p.pack(m, n, Mat<T>{phik, 1, m});
      for (int64_t h = hk * g; h < (hk + 1) * g; ++h) {
        saved_query_features(b, h, t0, n);
        grad_rows(b, h, t0, n);
        gemm_(n, chunk_p, phiq, m, 1, a, C, false);
        causal_weights(a, n);
        grad_through(n, vc, ones, n, da, C, false);
        causal_weights(da, n);
        gemm_(n, m, n, da, 1, C, phiq, m, 1, dphik, m, true);
        gemm_(n, Ev, n, a, 1, C, gq, Ev, 1, dv, Ev, true);
        scale_grad_rows(n);
        add_query_part(n);
      }
      store_dk_dv(b, hk, t0, n);
    }
  }

  // [P, p] += phi_q^T [gq, -beta] for the n query rows in hand (already scaled).
  void add_query_part(int64_t n) {
    gemm_(m, Ev, n, phiq, 1, m, gq, Ev, 1, dS, Ev, true);
    for (int64_t t = 0; t < n; ++t) axpy(-beta[t], phiq + t * m, dz, m);
  }

  // [P, p] += the part of the queries [t_begin, t_end), relative to shift[t_begin - 1]: what the
  // reverse sweep holds after those queries (for splitting it across threads).
  void causal_query_part(int64_t b, int64_t hk, int64_t t_begin, int64_t t_end) {
    const T* shift = shift_of(b, hk);
    const T R = t_begin ? shift[t_begin - 1] : T(kNegInf);
    for (int64_t t0 = t_begin; t0 < t_end; t0 += C) {
      const int64_t n = imin(C, t_end - t0);
      for (int64_t t = 0; t < n; ++t) ref[t] = rescale(R, shift[t0 + t]);
      for (int64_t h = hk * g; h < (hk + 1) * g; ++h) {
        saved_query_features(b, h, t0, n);
        grad_rows(b, h, t0, n);
        scale_grad_rows(n);
        add_query_part(n);
      }
    }
  }

  void backward_causal(int64_t b, int64_t hk) {
    zero(S, m * Ev + m);
    causal_dq(b, hk, 0, p.L);
    zero(dS, m * Ev + m);
    causal_dkdv(b, hk, 0, p.L);
  }
};


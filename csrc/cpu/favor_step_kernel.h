// The FAVOR+ decoding step (favor_step), compiled once per ISA (included after favor_kernel.h inside
// namespace performer::cpu::<isa>): the recurrent form, one new position after another.
//
// Per (batch, key head) "item", the state is S = sum_s exp(w_s - M) v_s^T (m x Ev), z = sum_s
// exp(w_s - M) (m) and M = key_max, the largest key logit so far (w_s as in favor_kernel.h; relu:
// phi(k_s) in place of exp(w_s - M), M = 0 once a key was seen). For each new position t:
//   key:    r = max_j w_tj (-inf when padding; relu: 0), M' = max(M, r), f = exp(M - M') (0 if M = -inf),
//           phi_k = exp(w_t - M') (relu: relu(w_t) + eps; zero when padding),
//           S <- f S + phi_k v_t^T, z <- f z + phi_k, M <- M'.
//   query:  out_t = phi_q . S / phi_q . z with phi_q = exp(u - c_t), u = W q'_t, over the updated
//           state (position t sees itself). c_t is favor_kernel.h's query shift with lam_j = log of
//           max(f z_j, phi_k,j) <= log z'_j: c_t = max(max_j (u_j + lam_j), max_j u_j - span), so the
//           normalizer is >= 1 unless the second term wins. Written without logarithms: with
//           e_j = exp(u_j - max u + span) (<= e^span) and best = max_j e_j max(f z_j, phi_k,j),
//           phi_q = e / max(1, best).
//
// Layout: the rows of one position (per item its key, then its g query heads; R rows in all) are the
// lanes of P (m x R, feature-major): the projection P = W X^T (features times the rows' transpose) is
// a stream of broadcast FMAs over full vectors of rows, whatever the head size, and the maxima,
// exponentials and gates per row are lane-wise. Features of their own per item (per key head, or per
// batch entry and key head: calibrated or FAVOR++ maps) project each item's 1 + g rows with dot
// products along E instead; a feature_bias b_j is added to the projections of every row (P = W X^T +
// b), as favor_kernel.h's project() does. Phases per position (one OpenMP team):
//   0. items split over threads: scaled rows (a frozen map's per-dimension transform applied, StepParams
//      q_mul, k_mul, k_add, k_post) into X^T (E x R) (and X, R x E, for per-item features), the key's |k'|^2 / 2.
//   A. features split over threads: P rows (plus the bias) and per-lane partial maxima.
//   B. the same rows: each thread combines the maxima, then P <- phi (exp, or relu + eps).
//   C. (item, part of the features) units: the state update and each head's partial numerator,
//      denominator and best; with one part per item the unit writes the output at once.
//   D. (only with several parts) per item: sum the parts and write the output.
#pragma once

template <typename T>
struct StepWorkspace {
  int64_t R, Rpad, items, g, team, parts, units, nr;
  T* xt;     // (E, Rpad) scaled rows, zero padding lanes
  T* P;      // (m, Rpad)
  T* pmax;   // (team, Rpad) partial lane maxima
  T* half;   // (items) |k'|^2 / 2 (softmax), 0 (relu and softmax_normalized, whose lse phase B takes)
  T* ksum;   // (team, items) softmax_normalized: partial sums of exp(w - lane max) of the key lanes
  T* res;    // (units, g, Ev + 2) partial [num (Ev), den, best]
};

// Lane multiple for R: a vector of T.
template <typename T>
static constexpr int64_t step_lanes() { return sizeof(T) == 4 ? kVecFloats : (kVecFloats / 2 > 0 ? kVecFloats / 2 : 1); }

// P[j][r] = sum_e W[j, e] xt[e][r] for j in [j0, j1), every lane.
template <typename T>
static void step_project(const T* W, const T* xt, T* P, int64_t E, int64_t Rpad, int64_t j0, int64_t j1) {
  int64_t j = j0;
  if constexpr (sizeof(T) == 4) {
    for (; j + 8 <= j1; j += 8) {  // 8 independent accumulators per vector of rows hide the FMA latency
      const T* w = W + j * E;
      for (int64_t r = 0; r < Rpad; r += kVecFloats) {
        vreg a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero(), a4 = vzero(), a5 = vzero(), a6 = vzero(),
             a7 = vzero();
        for (int64_t e = 0; e < E; ++e) {
          const vreg x = vload(xt + e * Rpad + r);
          a0 = vfma(vbroadcast(w[e]), x, a0);
          a1 = vfma(vbroadcast(w[E + e]), x, a1);
          a2 = vfma(vbroadcast(w[2 * E + e]), x, a2);
          a3 = vfma(vbroadcast(w[3 * E + e]), x, a3);
          a4 = vfma(vbroadcast(w[4 * E + e]), x, a4);
          a5 = vfma(vbroadcast(w[5 * E + e]), x, a5);
          a6 = vfma(vbroadcast(w[6 * E + e]), x, a6);
          a7 = vfma(vbroadcast(w[7 * E + e]), x, a7);
        }
        T* o = P + j * Rpad + r;
        vstore(o, a0); vstore(o + Rpad, a1); vstore(o + 2 * Rpad, a2); vstore(o + 3 * Rpad, a3);
        vstore(o + 4 * Rpad, a4); vstore(o + 5 * Rpad, a5); vstore(o + 6 * Rpad, a6); vstore(o + 7 * Rpad, a7);
      }
    }
  }
  for (; j < j1; ++j) {
    T* o = P + j * Rpad;
#pragma omp simd
    for (int64_t r = 0; r < Rpad; ++r) o[r] = T(0);
    for (int64_t e = 0; e < E; ++e) {
      const T we = W[j * E + e];
      const T* x = xt + e * Rpad;
#pragma omp simd
      for (int64_t r = 0; r < Rpad; ++r) o[r] += we * x[r];
    }
  }
}

// o[i] = w . X[i] for N rows X (N x E, row-major): each vector of w loaded once for the N rows.
template <int N>
static inline void step_dot_rows(const float* w, const float* X, int64_t E, float* o) {
  vreg acc[N];
  for (int i = 0; i < N; ++i) acc[i] = vzero();
  int64_t e = 0;
  for (; e + kVecFloats <= E; e += kVecFloats) {
    const vreg wv = vload(w + e);
    for (int i = 0; i < N; ++i) acc[i] = vfma(wv, vload(X + i * E + e), acc[i]);
  }
  for (int i = 0; i < N; ++i) {
    float s = vsum(acc[i]);
    for (int64_t t = e; t < E; ++t) s += w[t] * X[i * E + t];
    o[i] = s;
  }
}

// P[j][r0 + r] = W[j] . X[r] for one item's nr rows X (nr x E, row-major) and j in [j0, j1): the
// item's own features, too few rows to fill step_project's lanes.
template <typename T>
static void step_project_item(const T* W, const T* X, int64_t nr, T* P, int64_t E, int64_t Rpad, int64_t r0,
                              int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    const T* w = W + j * E;
    T* o = P + j * Rpad + r0;
    if constexpr (sizeof(T) == 4) {
      int64_t r = 0;
      for (; r + 4 <= nr; r += 4) step_dot_rows<4>(w, X + r * E, E, o + r);
      switch (nr - r) {
        case 3: step_dot_rows<3>(w, X + r * E, E, o + r); break;
        case 2: step_dot_rows<2>(w, X + r * E, E, o + r); break;
        case 1: step_dot_rows<1>(w, X + r * E, E, o + r); break;
        default: break;
      }
    } else {
      for (int64_t r = 0; r < nr; ++r) o[r] = dot(w, X + r * E, E);
    }
  }
}

// The state update of one item's feature rows [j0, j1) and the heads' sums over them, Ev columns
// [c0, c0 + NV vectors): kv[j] = f kv_prev[j] + phi_k,j v; acc_h += e_hj kv[j]. Heads [h0, h0 + HB);
// `update` is false after the first head group (the rows are then read, already updated).
template <int NV, int HB>
static void step_rows_vec(const float* P, int64_t Rpad, int64_t rk, int64_t rq, int64_t j0, int64_t j1, float f,
                          const float* kv_prev, float* kv, const float* v, int64_t Ev, int64_t c0, bool update,
                          float* num, int64_t ldn) {
  vreg acc[HB][NV];
  for (int h = 0; h < HB; ++h)
    for (int x = 0; x < NV; ++x) acc[h][x] = vzero();
  vreg vv[NV];
  for (int x = 0; x < NV; ++x) vv[x] = vload(v + c0 + x * kVecFloats);
  const vreg vf = vbroadcast(f);
  for (int64_t j = j0; j < j1; ++j) {
    const float* pj = P + j * Rpad;
    float* dst = kv + j * Ev + c0;
    vreg d[NV];
    if (update) {
      const vreg pk = vbroadcast(pj[rk]);
      if (kv_prev) {
        const float* src = kv_prev + j * Ev + c0;
        for (int x = 0; x < NV; ++x) d[x] = vfma(vf, vload(src + x * kVecFloats), pk * vv[x]);
      } else {
        for (int x = 0; x < NV; ++x) d[x] = pk * vv[x];
      }
      for (int x = 0; x < NV; ++x) vstore(dst + x * kVecFloats, d[x]);
    } else {
      for (int x = 0; x < NV; ++x) d[x] = vload(dst + x * kVecFloats);
    }
    for (int h = 0; h < HB; ++h) {
      const vreg e = vbroadcast(pj[rq + h]);
      for (int x = 0; x < NV; ++x) acc[h][x] = vfma(e, d[x], acc[h][x]);
    }
  }
  for (int h = 0; h < HB; ++h)
    for (int x = 0; x < NV; ++x) vstore(num + h * ldn + c0 + x * kVecFloats, acc[h][x]);
}

template <int NV>
static void step_rows_heads(const float* P, int64_t Rpad, int64_t rk, int64_t rq, int64_t g, int64_t j0, int64_t j1,
                            float f, const float* kv_prev, float* kv, const float* v, int64_t Ev, int64_t c0,
                            float* num, int64_t ldn) {
  for (int64_t h0 = 0; h0 < g; h0 += 4) {
    const bool update = h0 == 0;
    float* nh = num + h0 * ldn;
    switch (imin(4, g - h0)) {
      case 1: step_rows_vec<NV, 1>(P, Rpad, rk, rq + h0, j0, j1, f, kv_prev, kv, v, Ev, c0, update, nh, ldn); break;
      case 2: step_rows_vec<NV, 2>(P, Rpad, rk, rq + h0, j0, j1, f, kv_prev, kv, v, Ev, c0, update, nh, ldn); break;
      case 3: step_rows_vec<NV, 3>(P, Rpad, rk, rq + h0, j0, j1, f, kv_prev, kv, v, Ev, c0, update, nh, ldn); break;
      default: step_rows_vec<NV, 4>(P, Rpad, rk, rq + h0, j0, j1, f, kv_prev, kv, v, Ev, c0, update, nh, ldn); break;
    }
  }
}

// The whole unit: scalar sums (normalizer, den, best) over the rows, then the value columns.
// res: g x (Ev + 2) [num, den, best].
template <typename T>
static void step_unit(const T* P, int64_t Rpad, int64_t rk, int64_t rq, int64_t g, int64_t j0, int64_t j1, T f,
                      const T* kv_prev, const T* z_prev, T* kv, T* z, const T* v, int64_t Ev, bool softmax, T* res,
                      T* zz) {
  const int64_t ld = Ev + 2;
  for (int64_t j = j0; j < j1; ++j) {  // the normalizer, and max(f z, phi_k) in zz
    const T pk = P[j * Rpad + rk];
    const T old = z_prev ? f * z_prev[j] : T(0);
    z[j] = old + pk;
    zz[j] = old > pk ? old : pk;
  }
  for (int64_t h = 0; h < g; ++h) {  // den and best: four independent chains each
    const T* ph = P + rq + h;
    T d0 = 0, d1 = 0, d2 = 0, d3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4) {
      const T e0 = ph[j * Rpad], e1 = ph[(j + 1) * Rpad], e2 = ph[(j + 2) * Rpad], e3 = ph[(j + 3) * Rpad];
      d0 += e0 * z[j]; d1 += e1 * z[j + 1]; d2 += e2 * z[j + 2]; d3 += e3 * z[j + 3];
      b0 = fmax2(b0, e0 * zz[j]); b1 = fmax2(b1, e1 * zz[j + 1]);
      b2 = fmax2(b2, e2 * zz[j + 2]); b3 = fmax2(b3, e3 * zz[j + 3]);
    }
    for (; j < j1; ++j) {
      const T e = ph[j * Rpad];
      d0 += e * z[j];
      b0 = fmax2(b0, e * zz[j]);
    }
    res[h * ld + Ev] = (d0 + d1) + (d2 + d3);
    res[h * ld + Ev + 1] = softmax ? fmax2(fmax2(b0, b1), fmax2(b2, b3)) : T(0);
  }
  int64_t c0 = 0;
  if constexpr (sizeof(T) == 4) {
    for (; c0 + 4 * kVecFloats <= Ev; c0 += 4 * kVecFloats)
      step_rows_heads<4>(P, Rpad, rk, rq, g, j0, j1, f, kv_prev, kv, v, Ev, c0, res, ld);
    for (; c0 + kVecFloats <= Ev; c0 += kVecFloats)
      step_rows_heads<1>(P, Rpad, rk, rq, g, j0, j1, f, kv_prev, kv, v, Ev, c0, res, ld);
  }
  if (c0 < Ev) {  // the remaining columns (all of them for double)
    for (int64_t h = 0; h < g; ++h)
      for (int64_t x = c0; x < Ev; ++x) res[h * ld + x] = T(0);
    for (int64_t j = j0; j < j1; ++j) {
      const T* pj = P + j * Rpad;
      const T pk = pj[rk];
      T* dst = kv + j * Ev;
      const T* src = kv_prev ? kv_prev + j * Ev : nullptr;
      if (src) {
#pragma omp simd
        for (int64_t x = c0; x < Ev; ++x) dst[x] = f * src[x] + pk * v[x];
      } else {
#pragma omp simd
        for (int64_t x = c0; x < Ev; ++x) dst[x] = pk * v[x];
      }
      for (int64_t h = 0; h < g; ++h) {
        const T e = pj[rq + h];
        T* rh = res + h * ld;
#pragma omp simd
        for (int64_t x = c0; x < Ev; ++x) rh[x] += e * dst[x];
      }
    }
  }
}

// row <- (row * mul + add) * post, elementwise over E (a frozen feature map's transform); mul and
// add may be null.
template <typename T>
static inline void affine_row(T* row, const T* mul, const T* add, int64_t E, T post = T(1)) {
  if (mul)
#pragma omp simd
    for (int64_t e = 0; e < E; ++e) row[e] *= mul[e];
  if (add)
#pragma omp simd
    for (int64_t e = 0; e < E; ++e) row[e] += add[e];
  if (post != T(1))
#pragma omp simd
    for (int64_t e = 0; e < E; ++e) row[e] *= post;
}

template <typename T>
static void favor_step_typed(const StepParams& p) {
  const int64_t items = p.B * p.Hk, g = p.H / p.Hk, nr = 1 + g, m = p.m, E = p.E, Ev = p.Ev;
  const int64_t V = step_lanes<T>();
  const int64_t R = items * nr, Rpad = (R + V - 1) / V * V;
  const bool softmax = p.kernel != Kernel::relu;
  const bool normalized = p.kernel == Kernel::softmax_normalized;
  const T c = T(__builtin_sqrt(p.scale));
  const T* W = static_cast<const T*>(p.features);
  const T* bias = static_cast<const T*>(p.bias);
  const T* q_mul = static_cast<const T*>(p.q_mul);
  const T* k_mul = static_cast<const T*>(p.k_mul);
  const T* k_add = static_cast<const T*>(p.k_add);
  const T* k_post = static_cast<const T*>(p.k_post);
  const bool per_item = p.Bf > 1 || p.Hf > 1;
  // Item it's feature set in (Bf, Hf): its features are W + set * m * E; its bias is bias + set * m
  // with its set in (bias_Bf, bias_Hf).
  auto feature_set = [&](int64_t it) { return (p.Bf > 1 ? it / p.Hk : 0) * p.Hf + (p.Hf > 1 ? it % p.Hk : 0); };
  auto bias_set = [&](int64_t it) {
    return (p.bias_Bf > 1 ? it / p.Hk : 0) * p.bias_Hf + (p.bias_Hf > 1 ? it % p.Hk : 0);
  };
  // Threads (favor_step calls this with several only for a single item, or work too small to share
  // out by items): none beyond what the work pays for. Each position costs a team four barriers and
  // the rows of P cross between cores: splitting the features pays from about 2^20 multiply-adds
  // (on a 2-core Xeon, eight items of H=8, E=64, m=256 took 24.1 us on one thread, 26.9 us split).
  const double work = double(R) * double(m) * double(E) + double(items) * double(g + 1) * double(m) * double(Ev);
  const int64_t team = imax(1, imin(imin(p.num_threads, int64_t(work / 1048576.0) + 1), (m + 7) / 8));
  const int64_t parts = items >= team ? 1 : imax(1, imin((team + items - 1) / items, m / 32));
  const int64_t units = items * parts;
  const int64_t part_rows = ((m + parts - 1) / parts + 7) / 8 * 8;

  static thread_local Scratch<T> buf;  // the calling thread's; grow-only
  T* xt = buf.get(E * Rpad + m * Rpad + team * Rpad + items + team * items + units * g * (Ev + 2) +
                  (per_item ? R * E : 0));
  T* P = xt + E * Rpad;
  T* pmax = P + m * Rpad;
  T* half = pmax + team * Rpad;
  T* ksum = half + items;
  T* res = ksum + team * items;
  T* xr = res + units * g * (Ev + 2);  // per-item features: the rows, R x E
  if (!per_item)
    for (int64_t i = 0; i < E * Rpad; ++i) xt[i] = T(0);

  const bool* mask = p.mask;
  T* const kv_all = static_cast<T*>(p.kv);
  T* const z_all = static_cast<T*>(p.normalizer);
  T* const kmax_all = static_cast<T*>(p.key_max);
  const T* const kv_in = static_cast<const T*>(p.kv_in);
  const T* const z_in = static_cast<const T*>(p.normalizer_in);
  const T* const kmax_in = static_cast<const T*>(p.key_max_in);

#pragma omp parallel num_threads(int(team))
  {
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
    static thread_local Scratch<T> local;  // per thread: row buffer, v row, M, M', f, shifts, gates
    T* row = local.get(imax(E, Ev) + Ev + 3 * items + 2 * Rpad + m);
    T* vrow = row + imax(E, Ev);
    T* M = vrow + Ev;       // the running maximum per item
    T* Mn = M + items;
    T* fac = Mn + items;
    T* shift = fac + items;
    T* gate = shift + Rpad;
    T* zz = gate + Rpad;
    for (int64_t i = 0; i < items; ++i) M[i] = kmax_in ? kmax_in[i] : T(kNegInf);
    const int64_t proj_rows = ((m + nt - 1) / nt + 7) / 8 * 8;  // the team may be smaller than asked
    const int64_t pj0 = imin(tid * proj_rows, m), pj1 = imin(pj0 + proj_rows, m);
    for (int64_t t = 0; t < p.T; ++t) {
      const T* kv_prev = t == 0 ? kv_in : kv_all;
      const T* z_prev = t == 0 ? z_in : z_all;
      // Phase 0: the rows of position t (a frozen map's transform applied), transposed into X^T.
      for (int64_t it = tid; it < items; it += nt) {
        const int64_t b = it / p.Hk, hk = it % p.Hk, r0 = it * nr;
        if (per_item) {
          T* kr = xr + r0 * E;
          load_rows<T>(p.k, p.dtype, b, hk, t, 1, E, c, kr, E);
          affine_row(kr, k_mul ? k_mul + hk * E : nullptr, k_add ? k_add + hk * E : nullptr, E);
          for (int64_t h = 0; h < g; ++h) {
            T* qr = xr + (r0 + 1 + h) * E;
            load_rows<T>(p.q, p.dtype, b, hk * g + h, t, 1, E, c, qr, E);
            affine_row(qr, q_mul ? q_mul + (hk * g + h) * E : nullptr, static_cast<const T*>(nullptr), E);
          }
          half[it] = softmax && !normalized ? T(0.5) * dot(kr, kr, E) : T(0);
          if (k_post) affine_row(kr, static_cast<const T*>(nullptr), static_cast<const T*>(nullptr), E, k_post[hk]);
          continue;
        }
        load_rows<T>(p.k, p.dtype, b, hk, t, 1, E, c, row, E);
        affine_row(row, k_mul ? k_mul + hk * E : nullptr, k_add ? k_add + hk * E : nullptr, E);
        half[it] = softmax && !normalized ? T(0.5) * dot(row, row, E) : T(0);
        const T post = k_post ? k_post[hk] : T(1);
        for (int64_t e = 0; e < E; ++e) xt[e * Rpad + r0] = post * row[e];
        for (int64_t h = 0; h < g; ++h) {
          load_rows<T>(p.q, p.dtype, b, hk * g + h, t, 1, E, c, row, E);
          affine_row(row, q_mul ? q_mul + (hk * g + h) * E : nullptr, static_cast<const T*>(nullptr), E);
          for (int64_t e = 0; e < E; ++e) xt[e * Rpad + r0 + 1 + h] = row[e];
        }
      }
#pragma omp barrier
      // Phase A: this thread's feature rows, and their lane maxima.
      if (per_item) {
        for (int64_t it = 0; it < items; ++it)
          step_project_item(W + feature_set(it) * m * E, xr + it * nr * E, nr, P, E, Rpad, it * nr, pj0, pj1);
        for (int64_t j = pj0; j < pj1; ++j)  // the padding lanes
          for (int64_t r = R; r < Rpad; ++r) P[j * Rpad + r] = T(0);
      } else {
        step_project(W, xt, P, E, Rpad, pj0, pj1);
      }
      if (bias)
        for (int64_t it = 0; it < items; ++it) {
          const T* bj = bias + bias_set(it) * m;
          for (int64_t j = pj0; j < pj1; ++j)
            for (int64_t r = it * nr; r < (it + 1) * nr; ++r) P[j * Rpad + r] += bj[j];
        }
      T* mx = pmax + tid * Rpad;
#pragma omp simd
      for (int64_t r = 0; r < Rpad; ++r) mx[r] = T(kNegInf);
      for (int64_t j = pj0; j < pj1; ++j) {
        const T* pj = P + j * Rpad;
#pragma omp simd
        for (int64_t r = 0; r < Rpad; ++r) mx[r] = pj[r] > mx[r] ? pj[r] : mx[r];
      }
      if (normalized)  // this thread's share of sum_j exp(w_j - its lane max) for each key lane
        for (int64_t it = 0; it < items; ++it) {
          const int64_t r0 = it * nr;
          T sum = 0;
          for (int64_t j = pj0; j < pj1; ++j) sum += exp_fast(P[j * Rpad + r0] - mx[r0]);
          ksum[tid * items + it] = sum;
        }
#pragma omp barrier
      // Phase B: maxima, running maxima, shifts and gates (every thread, for every lane), then phi.
      for (int64_t r = 0; r < Rpad; ++r) {
        T x = T(kNegInf);
        for (int64_t i = 0; i < nt; ++i) x = fmax2(x, pmax[i * Rpad + r]);
        shift[r] = x;
        gate[r] = T(1);
      }
      for (int64_t it = 0; it < items; ++it) {
        const int64_t r0 = it * nr;
        const bool visible = !(mask && mask[(it / p.Hk) * p.T + t]);
        T hn = half[it];
        if (normalized) {  // the lse of the key's projections, from the threads' shares (every thread, own copy)
          T sum = 0;
          for (int64_t i = 0; i < nt; ++i)
            if (ksum[i * items + it] != T(0))  // NaN (a NaN key) propagates
              sum += ksum[i * items + it] * exp_fast(pmax[i * Rpad + r0] - shift[r0]);
          hn = shift[r0] + T(::log(double(sum)));
        }
        T rmax = T(kNegInf);
        if (visible) {
          rmax = softmax ? shift[r0] - hn : T(0);
          if (hn != hn) rmax = hn;  // a NaN key propagates, never pads
        }
        Mn[it] = fmax2(M[it], rmax);
        fac[it] = rescale(M[it], Mn[it]);
        const bool adds = visible && Mn[it] != T(kNegInf);
        gate[r0] = adds ? T(1) : T(0);
        shift[r0] = adds ? hn + Mn[it] : T(0);
        for (int64_t h = 0; h < g; ++h) shift[r0 + 1 + h] -= T(kQueryShiftSpan);
      }
      for (int64_t j = pj0; j < pj1; ++j) {
        T* pj = P + j * Rpad;
        if (softmax) {
#pragma omp simd
          for (int64_t r = 0; r < Rpad; ++r) pj[r] = gate[r] * exp_fast(pj[r] - shift[r]);
        } else {
#pragma omp simd
          for (int64_t r = 0; r < Rpad; ++r) pj[r] = gate[r] * ((pj[r] < T(0) ? T(0) : pj[r]) + T(kReluEps));
        }
      }
#pragma omp barrier
      // Phase C: the state and the heads' sums, per (item, part).
      for (int64_t u = tid; u < units; u += nt) {
        const int64_t it = u / parts, part = u % parts, b = it / p.Hk, hk = it % p.Hk;
        const int64_t j0 = imin(part * part_rows, m), j1 = imin(j0 + part_rows, m);
        load_rows<T>(p.v, p.dtype, b, hk, t, 1, Ev, T(1), vrow, Ev);
        T* r = res + u * g * (Ev + 2);
        step_unit<T>(P, Rpad, it * nr, it * nr + 1, g, j0, j1, fac[it], kv_prev ? kv_prev + it * m * Ev : nullptr,
                     z_prev ? z_prev + it * m : nullptr, kv_all + it * m * Ev, z_all + it * m, vrow, Ev, softmax, r, zz);
      }
      if (parts > 1) {
#pragma omp barrier
      }
      // Phase D: per item, the parts' sums, the output of position t.
      for (int64_t it = tid; it < items; it += nt) {
        const int64_t b = it / p.Hk, hk = it % p.Hk;
        for (int64_t h = 0; h < g; ++h) {
          T* nh = res + (it * parts * g + h) * (Ev + 2);
          for (int64_t i = 1; i < parts; ++i) {
            const T* other = res + ((it * parts + i) * g + h) * (Ev + 2);
            for (int64_t x = 0; x < Ev + 1; ++x) nh[x] += other[x];
            nh[Ev + 1] = fmax2(nh[Ev + 1], other[Ev + 1]);
          }
          const T best = nh[Ev + 1];
          const T sh = best > T(1) ? T(1) / best : T(1);  // phi_q = e * sh
          const T den = nh[Ev] * sh;
          const T mul = den >= kMinDen<T> ? sh / den : T(0);
          store_rows<T>(p.out, p.dtype, ((b * p.H + hk * g + h) * p.T + t) * Ev, 1, Ev, mul, nh, Ev);
        }
      }
      for (int64_t i = 0; i < items; ++i) M[i] = Mn[i];
    }
    if (tid == 0)
      for (int64_t i = 0; i < items; ++i) kmax_all[i] = M[i];
  }
}

// The items (b, hk0) .. (b, hk1 - 1) of p as a problem of their own: B = 1, Hk = hk1 - hk0.
static StepParams step_slice(const StepParams& p, int64_t b, int64_t hk0, int64_t hk1) {
  const int64_t es = p.dtype == DType::f64 ? 8 : p.dtype == DType::f32 ? 4 : 2;  // input element size
  const int64_t as = p.dtype == DType::f64 ? 8 : 4;                            // accumulation element size
  const int64_t g = p.H / p.Hk, item = b * p.Hk + hk0;
  auto at = [](const void* base, int64_t bytes) { return static_cast<char*>(const_cast<void*>(base)) + bytes; };
  StepParams s = p;
  s.B = 1;
  s.Hk = hk1 - hk0;
  s.H = s.Hk * g;
  s.q.data = at(p.q.data, (b * p.q.stride[0] + hk0 * g * p.q.stride[1]) * es);
  s.k.data = at(p.k.data, (b * p.k.stride[0] + hk0 * p.k.stride[1]) * es);
  s.v.data = at(p.v.data, (b * p.v.stride[0] + hk0 * p.v.stride[1]) * es);
  s.mask = p.mask ? p.mask + b * p.T : nullptr;
  const int64_t set0 = (p.Bf > 1 ? b : 0) * p.Hf + (p.Hf > 1 ? hk0 : 0);  // the slice's first feature set
  const int64_t bias0 = (p.bias_Bf > 1 ? b : 0) * p.bias_Hf + (p.bias_Hf > 1 ? hk0 : 0);  // and bias set
  s.features = at(p.features, set0 * p.m * p.E * as);
  s.bias = p.bias ? at(p.bias, bias0 * p.m * as) : nullptr;
  s.Bf = 1;
  s.Hf = p.Hf > 1 ? s.Hk : 1;
  s.bias_Bf = 1;
  s.bias_Hf = p.bias_Hf > 1 ? s.Hk : 1;
  s.k_post = p.k_post ? at(p.k_post, hk0 * as) : nullptr;
  s.q_mul = p.q_mul ? at(p.q_mul, hk0 * g * p.E * as) : nullptr;
  s.k_mul = p.k_mul ? at(p.k_mul, hk0 * p.E * as) : nullptr;
  s.k_add = p.k_add ? at(p.k_add, hk0 * p.E * as) : nullptr;
  if (p.kv_in) {
    s.kv_in = at(p.kv_in, item * p.m * p.Ev * as);
    s.normalizer_in = at(p.normalizer_in, item * p.m * as);
    s.key_max_in = at(p.key_max_in, item * as);
  }
  s.kv = at(p.kv, item * p.m * p.Ev * as);
  s.normalizer = at(p.normalizer, item * p.m * as);
  s.key_max = at(p.key_max, item * as);
  s.out = at(p.out, (b * p.H + hk0 * g) * p.T * p.Ev * es);
  s.num_threads = 1;
  return s;
}

// Items (b, hk) [i0, i1) in pieces of at most `cap` items within one batch entry each, one after another.
static void step_pieces(void (*run)(const StepParams&), const StepParams& p, int64_t i0, int64_t i1, int64_t cap) {
  for (int64_t i = i0; i < i1;) {
    const int64_t b = i / p.Hk, hk0 = i % p.Hk, hk1 = imin(imin(p.Hk, hk0 + (i1 - i)), hk0 + cap);
    run(step_slice(p, b, hk0, hk1));
    i += hk1 - hk0;
  }
}

// Many items go in pieces of at most 32 rows (P, m x 32 floats, stays in the L1 cache at m = 256;
// one piece of 64 rows ran 1.3x slower per item). With work enough (from 2^18 multiply-adds per
// position; a token at B=1, H=8, E=64, m=256 is 2^19) and at least two items, the threads each take
// a contiguous share of the items from start to finish: one team, no barrier, and each thread's part
// of the state stays in its core's cache from one token to the next. A single item with much work
// is split over the threads by features in favor_step_typed. Measured on a 2-core Xeon (Sapphire
// Rapids), one token, H=8, E=64, m=256, one thread / two: B=1 25 / 20-29 us, B=4 125 / 51, B=8 291 /
// 122-191 (before: a single piece, two threads split by features: B=8 223 us).
static void favor_step(const StepParams& p) {
  void (*run)(const StepParams&) = p.dtype == DType::f64 ? favor_step_typed<double> : favor_step_typed<float>;
  const int64_t items = p.B * p.Hk, g = p.H / p.Hk;
  const int64_t cap = imax(1, 32 / (1 + g));
  const double work = double(items) * double(p.m) * (double(1 + g) * double(p.E + p.Ev));
  const int64_t team = work < 262144.0 ? 1 : imin(p.num_threads, items);
  if (items == 1 || (team < 2 && items <= cap && p.B == 1)) {
    run(p);
  } else if (team < 2) {
    step_pieces(run, p, 0, items, cap);
  } else {
#pragma omp parallel num_threads(int(team))
    {
      const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
      step_pieces(run, p, items * tid / nt, items * (tid + 1) / nt, cap);
    }
  }
}

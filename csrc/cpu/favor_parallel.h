// FAVOR+ work distribution over OpenMP threads and the per-ISA entry points. Included after
// favor_kernel.h inside namespace performer::cpu::<isa>.
#pragma once

// Partial states of sequence segments: [S, z] (m * Ev + m values) and their reference maximum.
template <typename T>
struct Partials {
  Scratch<T> values, maxima;
  int64_t size;
  Partials(int64_t count, int64_t size_) : size(size_) { values.get(count * size); maxima.get(count); }
  T* state(int64_t i) { return values.p + i * size; }
};

// dst (relative to Md) += src (relative to Ms); Md becomes the larger reference.
template <typename T>
static void combine_states(T* dst, T& Md, const T* src, T Ms, int64_t size) {
  const T M = fmax2(Md, Ms), fd = rescale(Md, M), fs = rescale(Ms, M);
  for (int64_t i = 0; i < size; ++i) dst[i] = dst[i] * fd + src[i] * fs;
  Md = M;
}

// A sequence of `len` positions cut into `count` segments of whole chunks (the last ones may be
// short or empty).
struct Segments {
  int64_t len, count, step;
  Segments(int64_t len_, int64_t count_)
      : len(len_), count(count_), step(((len_ + count_ - 1) / count_ + kChunk - 1) / kChunk * kChunk) {}
  int64_t begin(int64_t j) const { return imin(j * step, len); }
  int64_t end(int64_t j) const { return imin((j + 1) * step, len); }
};

// Partial slot u = the key state [S, z] of positions begin..end alone, with its own reference maximum.
template <typename T>
static void store_segment_keys(Favor<T>& f, Partials<T>& part, int64_t u, int64_t b, int64_t hk, int64_t begin,
                               int64_t end) {
  T M = T(kNegInf);
  f.zero(f.S, part.size);
  f.accumulate_keys(b, hk, begin, end, M);
  Favor<T>::copy(part.state(u), f.S, part.size);
  part.maxima.p[u] = M;
}

// Replaces each of the segs partial states from part.state(first) on by the combination of the
// ones before it (the first gets zeros and -inf): the state each segment starts from.
template <typename T>
static void exclusive_prefix(Partials<T>& part, int64_t first, int64_t segs, T* acc, T* tmp) {
  T M = T(kNegInf);
  for (int64_t i = 0; i < part.size; ++i) acc[i] = T(0);
  for (int64_t j = 0; j < segs; ++j) {
    const int64_t u = first + j;
    const T Mj = part.maxima.p[u];
    Favor<T>::copy(tmp, part.state(u), part.size);
    Favor<T>::copy(part.state(u), acc, part.size);
    part.maxima.p[u] = M;
    combine_states(acc, M, tmp, Mj, part.size);
  }
}

// The forward pass split over `segs` segments of the sequence per (batch, kv head), for when
// there are fewer (batch, kv head) pairs than threads. Bidirectional: partial key states are
// reduced, then query segments run in parallel. Causal: a two-pass scan: each segment's own
// key state, a prefix combine, then every segment from its start state.
template <typename T>
static void forward_split(const FavorParams& p, int64_t segs) {
  const int64_t items = p.B * p.Hk, g = p.H / p.Hk;
  const Segments keys(p.S, segs), queries(p.L, segs);
  const int64_t state_size = p.m * p.Ev + p.m;
  Partials<T> part(items * segs, state_size);
#pragma omp parallel num_threads(p.num_threads)
  {
    Favor<T> f(p);
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < items * segs; ++u) {
      const int64_t it = u / segs, j = u % segs;
      store_segment_keys(f, part, u, it / p.Hk, it % p.Hk, keys.begin(j), keys.end(j));
    }
#pragma omp for
    for (int64_t it = 0; it < items; ++it) {  // exclusive prefix (causal) or total (bidirectional)
      if (p.causal) {
        exclusive_prefix(part, it * segs, segs, f.dS, f.S);
        continue;
      }
      T M = T(kNegInf);
      f.zero(f.S, state_size);
      for (int64_t j = 0; j < segs; ++j)
        combine_states(f.S, M, part.state(it * segs + j), part.maxima.p[it * segs + j], state_size);
      f.save_state(it / p.Hk, it % p.Hk);
      T* shift = f.shift_of(it / p.Hk, it % p.Hk);
      for (int64_t s = 0; s < p.S; ++s) shift[s] = M;
    }
    const int64_t units = p.causal ? items * segs : items * g * segs;
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t j = u % segs, t_begin = queries.begin(j), t_end = queries.end(j);
      if (p.causal) {
        const int64_t it = u / segs, b = it / p.Hk, hk = it % p.Hk;
        Favor<T>::copy(f.S, part.state(u), state_size);
        f.forward_causal(b, hk, t_begin, t_end, part.maxima.p[u]);
        if (t_end == p.L && t_begin < t_end) f.save_state(b, hk);
      } else {
        const int64_t bh = u / segs, b = bh / p.H, h = bh % p.H;
        f.load_state(b, h / g);
        f.output_rows(b, h, t_begin, t_end);
      }
    }
  }
}

// The bidirectional backward split the same way: query segments (of every head) in parallel,
// each adding its part of [dS, dz]; the parts reduced per (batch, kv head); then key segments.
template <typename T>
static void backward_bidirectional_split(const FavorParams& p, int64_t segs) {
  const int64_t items = p.B * p.Hk, g = p.H / p.Hk;
  const Segments keys(p.S, segs), queries(p.L, segs);
  const int64_t state_size = p.m * p.Ev + p.m, parts = g * segs;
  Partials<T> part(items * parts, state_size);
#pragma omp parallel num_threads(p.num_threads)
  {
    Favor<T> f(p);
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < items * parts; ++u) {
      const int64_t it = u / parts, h = (it % p.Hk) * g + (u % parts) / segs, j = u % segs;
      const int64_t b = it / p.Hk;
      f.load_state(b, it % p.Hk);
      f.zero(f.dS, state_size);
      f.query_grads(b, h, queries.begin(j), queries.end(j));
      Favor<T>::copy(part.state(u), f.dS, state_size);
    }
#pragma omp for
    for (int64_t it = 0; it < items; ++it) {
      T* total = part.state(it * parts);
      for (int64_t r = 1; r < parts; ++r)
        for (int64_t i = 0; i < state_size; ++i) total[i] += part.state(it * parts + r)[i];
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < items * segs; ++u) {
      const int64_t it = u / segs, j = u % segs;
      Favor<T>::copy(f.dS, part.state(it * parts), state_size);
      f.key_grads(it / p.Hk, it % p.Hk, keys.begin(j), keys.end(j));
    }
  }
}

// The causal backward split the same way, by two scans: the key states each segment starts from
// (exclusive prefix, as in the forward) for the dq sweep, and [P, p] at each segment's end (the
// queries of later segments, an exclusive suffix) for the dk, dv sweep.
template <typename T>
static void backward_causal_split(const FavorParams& p, int64_t segs) {
  const int64_t items = p.B * p.Hk;
  const Segments seq(p.L, segs);
  const int64_t state_size = p.m * p.Ev + p.m;
  Partials<T> keys(items * segs, state_size), queries(items * segs, state_size);
#pragma omp parallel num_threads(p.num_threads)
  {
    Favor<T> f(p);
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < items * segs; ++u) {
      const int64_t it = u / segs, j = u % segs, b = it / p.Hk, hk = it % p.Hk;
      store_segment_keys(f, keys, u, b, hk, seq.begin(j), seq.end(j));
      f.zero(f.dS, state_size);
      f.causal_query_part(b, hk, seq.begin(j), seq.end(j));
      Favor<T>::copy(queries.state(u), f.dS, state_size);
    }
#pragma omp for
    for (int64_t it = 0; it < items; ++it) {
      exclusive_prefix(keys, it * segs, segs, f.dS, f.S);
      // Suffix: P at the end of segment j = the part of segment j + 1 + P at its end, rescaled from
      // the running maximum at the end of segment j + 1 to that at the end of segment j.
      const T* shift = f.shift_of(it / p.Hk, it % p.Hk);
      auto end_max = [&](int64_t j) { return seq.end(j) > 0 ? shift[seq.end(j) - 1] : T(kNegInf); };
      T* acc = f.dS;
      f.zero(acc, state_size);
      for (int64_t j = segs - 1; j >= 0; --j) {
        T* part_j = queries.state(it * segs + j);
        Favor<T>::copy(f.S, part_j, state_size);
        Favor<T>::copy(part_j, acc, state_size);
        if (j > 0) {
          const T keep = rescale(end_max(j - 1), end_max(j));
          for (int64_t i = 0; i < state_size; ++i) acc[i] = f.S[i] + acc[i] * keep;
        }
      }
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < items * segs; ++u) {
      const int64_t it = u / segs, j = u % segs, b = it / p.Hk, hk = it % p.Hk;
      Favor<T>::copy(f.S, keys.state(u), state_size);
      f.causal_dq(b, hk, seq.begin(j), seq.end(j));
      Favor<T>::copy(f.dS, queries.state(u), state_size);
      f.causal_dkdv(b, hk, seq.begin(j), seq.end(j));
    }
  }
}

template <typename T>
static void run_items(const FavorParams& p, bool backward) {
  const int64_t items = p.B * p.Hk;
  const int64_t seq = p.causal ? p.L : imax(p.L, p.S);
  if (items < p.num_threads && seq >= 2 * kChunk) {
    const int64_t segs = imin(p.num_threads, seq / kChunk);
    if (!backward) {
      forward_split<T>(p, segs);
      return;
    }
    if (p.causal) backward_causal_split<T>(p, segs);
    else backward_bidirectional_split<T>(p, segs);
    return;
  }
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

// Block-sparse linear y = x W^T + bias, compiled once per ISA (included inside namespace
// performer::cpu::<isa>). W (N, K) is stored as kept (br x bc) blocks only, by block row ("panel":
// br output features): row_ptr[p] .. row_ptr[p + 1] index the panel's blocks, block_cols[b] is block
// b's column (of bc inputs), and values[b] holds it k-major, values[b][kk][r] = W[p br + r,
// block_cols[b] bc + kk], zero-padded past N and K (performer/ops/sparse/reference.py packs it).
//
// Per (panel, chunk of rows) job, a register tile of MR rows of x times CV vectors of the panel's
// outputs: for each kept block and each of its bc inputs, CV vector loads of the block and MR
// broadcasts of x feed MR x CV FMAs; the empty blocks cost nothing. Bias and store once per tile.
#pragma once

static constexpr int kSparseAcc = PERFORMER_VEC_BYTES == 64 ? 24 : 12;  // accumulator registers per tile

template <int MR, int CV>
static void sparse_tile(const SparseLinearParams& p, const float* x, int64_t i0, int64_t panel, int64_t c0,
                        float* y) {
  const int64_t br = p.br, bc = p.bc, K = p.K, N = p.N, rs = p.x_row_stride;
  const float* values = static_cast<const float*>(p.values);
  vreg acc[MR][CV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < CV; ++v) acc[i][v] = vzero();
  // A single row has only CV accumulator chains, too few to hide the FMA latency: odd inputs go to
  // a second set, added at the end.
  constexpr int kSplit = MR == 1 ? 2 : 1;
  vreg odd[kSplit == 2 ? CV : 1];
  for (int v = 0; v < (kSplit == 2 ? CV : 1); ++v) odd[v] = vzero();
  for (int64_t b = p.row_ptr[panel]; b < p.row_ptr[panel + 1]; ++b) {
    const int64_t k0 = int64_t(p.block_cols[b]) * bc, kc = imin(bc, K - k0);
    const float* w = values + b * bc * br + c0;
    const float* xr = x + i0 * rs + k0;
    int64_t kk = 0;
    if constexpr (kSplit == 2) {
      for (; kk + 2 <= kc; kk += 2) {
        const vreg x0 = vbroadcast(xr[kk]), x1 = vbroadcast(xr[kk + 1]);
        for (int v = 0; v < CV; ++v) {
          acc[0][v] = vfma(x0, vload(w + kk * br + v * kVecFloats), acc[0][v]);
          odd[v] = vfma(x1, vload(w + (kk + 1) * br + v * kVecFloats), odd[v]);
        }
      }
    }
    for (; kk < kc; ++kk) {
      vreg wv[CV];
      for (int v = 0; v < CV; ++v) wv[v] = vload(w + kk * br + v * kVecFloats);
      for (int i = 0; i < MR; ++i) {
        const vreg xv = vbroadcast(xr[i * rs + kk]);
        for (int v = 0; v < CV; ++v) acc[i][v] = vfma(xv, wv[v], acc[i][v]);
      }
    }
  }
  if constexpr (kSplit == 2)
    for (int v = 0; v < CV; ++v) acc[0][v] = vadd(acc[0][v], odd[v]);
  const int64_t n0 = panel * br + c0, valid = imin(CV * kVecFloats, N - n0);
  const float* bias = static_cast<const float*>(p.bias);
  alignas(64) float tail[CV * kVecFloats];
  for (int i = 0; i < MR; ++i) {
    float* out = y + (i0 + i) * N + n0;
    if (bias) {
      for (int v = 0; v < CV; ++v) {
        alignas(64) float bv[kVecFloats];
        for (int l = 0; l < kVecFloats; ++l) bv[l] = v * kVecFloats + l < valid ? bias[n0 + v * kVecFloats + l] : 0.f;
        acc[i][v] = vadd(acc[i][v], vload(bv));
      }
    }
    if (valid == CV * kVecFloats) {
      for (int v = 0; v < CV; ++v) vstore(out + v * kVecFloats, acc[i][v]);
    } else {
      for (int v = 0; v < CV; ++v) vstore(tail + v * kVecFloats, acc[i][v]);
      for (int64_t l = 0; l < valid; ++l) out[l] = tail[l];
    }
  }
}

// Rows [m0, m1) of one panel, in column chunks of CV vectors: tiles of MR rows, then single rows.
template <int CV>
static void sparse_panel_cv(const SparseLinearParams& p, const float* x, int64_t m0, int64_t m1, int64_t panel,
                            int64_t c0, float* y) {
  constexpr int MR = kSparseAcc / CV;
  int64_t i = m0;
  for (; i + MR <= m1; i += MR) sparse_tile<MR, CV>(p, x, i, panel, c0, y);
  for (; i < m1; ++i) sparse_tile<1, CV>(p, x, i, panel, c0, y);
}

static void sparse_panel_f32(const SparseLinearParams& p, int64_t m0, int64_t m1, int64_t panel) {
  const float* x = static_cast<const float*>(p.x);
  float* y = static_cast<float*>(p.y);
  const int64_t br = p.br, width = imin(br, p.N - panel * br);  // columns past N are padding
  int64_t c0 = 0;
  for (; c0 + 4 * kVecFloats <= br && c0 < width; c0 += 4 * kVecFloats) sparse_panel_cv<4>(p, x, m0, m1, panel, c0, y);
  for (; c0 + 2 * kVecFloats <= br && c0 < width; c0 += 2 * kVecFloats) sparse_panel_cv<2>(p, x, m0, m1, panel, c0, y);
  for (; c0 < width; c0 += kVecFloats) sparse_panel_cv<1>(p, x, m0, m1, panel, c0, y);
}

// float64: plain loops (the reference-precision path, gradcheck).
static void sparse_panel_f64(const SparseLinearParams& p, int64_t m0, int64_t m1, int64_t panel) {
  const double* x = static_cast<const double*>(p.x);
  const double* values = static_cast<const double*>(p.values);
  const double* bias = static_cast<const double*>(p.bias);
  double* y = static_cast<double*>(p.y);
  const int64_t br = p.br, bc = p.bc, n0 = panel * br, width = imin(br, p.N - n0);
  for (int64_t i = m0; i < m1; ++i) {
    double* out = y + i * p.N + n0;
    for (int64_t r = 0; r < width; ++r) out[r] = bias ? bias[n0 + r] : 0.0;
    const double* xr = x + i * p.x_row_stride;
    for (int64_t b = p.row_ptr[panel]; b < p.row_ptr[panel + 1]; ++b) {
      const int64_t k0 = int64_t(p.block_cols[b]) * bc, kc = imin(bc, p.K - k0);
      const double* w = values + b * bc * br;
      for (int64_t kk = 0; kk < kc; ++kk) {
        const double xv = xr[k0 + kk];
        for (int64_t r = 0; r < width; ++r) out[r] += xv * w[kk * br + r];
      }
    }
  }
}

// Jobs: (panel, chunk of at most kSparseRows rows), panel-major, so that a thread's consecutive
// jobs reuse the panel's blocks from its cache.
static constexpr int64_t kSparseRows = 96;

static void sparse_linear(const SparseLinearParams& p) {
  const int64_t panels = (p.N + p.br - 1) / p.br, chunks = (p.M + kSparseRows - 1) / kSparseRows;
  const int64_t jobs = panels * chunks;
  auto run = [&](int64_t job) {
    const int64_t panel = job / chunks, m0 = job % chunks * kSparseRows, m1 = imin(p.M, m0 + kSparseRows);
    if (p.dtype == DType::f64) sparse_panel_f64(p, m0, m1, panel);
    else sparse_panel_f32(p, m0, m1, panel);
  };
  if (p.num_threads <= 1 || jobs == 1) {
    for (int64_t job = 0; job < jobs; ++job) run(job);
    return;
  }
#pragma omp parallel for schedule(static) num_threads(p.num_threads)
  for (int64_t job = 0; job < jobs; ++job) run(job);
}

// Int8 block-sparse linear y = x (s_w Wq)^T + bias, compiled once per ISA (included inside namespace
// performer::cpu::<isa>). Wq (N, K) int8 with per-output scales s_w is kept as (br x bc) blocks in the
// CSR order of sparse_kernel.h, each block in groups of 4 inputs: values[b][g][r][j] = Wq[p br + r,
// block_cols[b] bc + 4 g + j], zero-padded past N and K (performer/ops/sparse/reference.py,
// pack_int8). Two modes:
//   - dynamic (col_sums given): each row of x is quantized at run time to uint8, x ~ s_x (xq - z_x)
//     with its own scale and zero point; y = s_x s_w (sum_k xq Wq - z_x col_sums) + bias, the integer
//     sums exact (u8 x s8 products, 32-bit accumulators);
//   - weight-only (col_sums null): x stays float; y = s_w (x Wq^T) + bias, the weights converted on
//     the fly (a quarter of float32's bytes: the small-batch, bandwidth-bound case).
// Per (panel, chunk of rows) job, a register tile of MR rows times CV vectors of outputs, as in
// sparse_kernel.h; a vector holds several lanes per output (the partial sums of different inputs),
// added once per tile.
#pragma once

// ---- Integer products: u8 x s8, four inputs per output and step ----------------------------------
// kIOuts outputs per vector and kILanes lanes each; idot adds the products of 4 inputs (x broadcast,
// w = 4 bytes per output) exactly into 32-bit lanes. The quantized rows of x are stored as xelem
// (values 0..255), in the width the products read.
#if defined(PERFORMER_ISA_AVX512_VNNI)
typedef __m512i ivec;
typedef uint8_t xelem;
static constexpr int kIOuts = 16, kILanes = 1, kIAcc = 24;
static inline ivec izero() { return _mm512_setzero_si512(); }
static inline ivec iload_w(const int8_t* w) { return _mm512_loadu_si512(w); }
static inline ivec ibroadcast_x(const xelem* x) {
  int32_t v;
  __builtin_memcpy(&v, x, 4);
  return _mm512_set1_epi32(v);
}
static inline ivec idot(ivec acc, ivec x, ivec w) { return _mm512_dpbusd_epi32(acc, x, w); }
static inline void istore(int32_t* p, ivec v) { _mm512_storeu_si512(p, v); }
#elif defined(PERFORMER_ISA_AVX512)
// Without VNNI: 16-bit products (vpmaddwd), as the AVX2 copy below, on 8 outputs x 4 inputs.
typedef __m512i ivec;
typedef int16_t xelem;
static constexpr int kIOuts = 8, kILanes = 2, kIAcc = 24;
static inline ivec izero() { return _mm512_setzero_si512(); }
static inline ivec iload_w(const int8_t* w) {
  // (the masked form: GCC 12 warns that the plain one reads an undefined vector)
  return _mm512_maskz_cvtepi8_epi16(~__mmask32(0), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
}
static inline ivec ibroadcast_x(const xelem* x) {
  long long v;
  __builtin_memcpy(&v, x, 8);
  return _mm512_set1_epi64(v);
}
static inline ivec idot(ivec acc, ivec x, ivec w) { return _mm512_add_epi32(acc, _mm512_madd_epi16(x, w)); }
static inline void istore(int32_t* p, ivec v) { _mm512_storeu_si512(p, v); }
#elif defined(PERFORMER_ISA_AVX2)
// 16-bit products (vpmaddwd): exact for the full uint8 range, where vpmaddubsw would saturate.
// A vector: 4 outputs x 4 inputs as int16; each output's pairs of inputs land in 2 lanes.
typedef __m256i ivec;
typedef int16_t xelem;
static constexpr int kIOuts = 4, kILanes = 2, kIAcc = 12;
static inline ivec izero() { return _mm256_setzero_si256(); }
static inline ivec iload_w(const int8_t* w) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
}
static inline ivec ibroadcast_x(const xelem* x) {
  long long v;
  __builtin_memcpy(&v, x, 8);
  return _mm256_set1_epi64x(v);
}
static inline ivec idot(ivec acc, ivec x, ivec w) { return _mm256_add_epi32(acc, _mm256_madd_epi16(x, w)); }
static inline void istore(int32_t* p, ivec v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
#else
// Plain vectors with the VNNI layout (one lane per output, 4 bytes each): the portable copy.
typedef int32_t ivec __attribute__((vector_size(16)));
typedef uint8_t xelem;
static constexpr int kIOuts = 4, kILanes = 1, kIAcc = 8;
static inline ivec izero() { return ivec{}; }
static inline ivec iload_w(const int8_t* w) { ivec v; __builtin_memcpy(&v, w, sizeof(v)); return v; }
static inline ivec ibroadcast_x(const xelem* x) {
  int32_t v;
  __builtin_memcpy(&v, x, 4);
  return ivec{} + v;
}
static inline ivec idot(ivec acc, ivec x, ivec w) {
  for (int j = 0; j < 4; ++j) acc += ((x >> (8 * j)) & 0xff) * ((w << (24 - 8 * j)) >> 24);
  return acc;
}
static inline void istore(int32_t* p, ivec v) { __builtin_memcpy(p, &v, sizeof(v)); }
#endif

// ---- Float products with int8 weights (weight-only) ----------------------------------------------
// A vector of floats holds kFOuts outputs x 4 inputs (the same bytes as the integer layout): the 4
// inputs broadcast, the weights converted; 4 lanes per output.
static constexpr int kFOuts = kVecFloats / 4, kFAcc = PERFORMER_VEC_BYTES == 64 ? 24 : 12;
#if defined(PERFORMER_ISA_AVX512)
static inline vreg vload_i8(const int8_t* p) {
  // (the masked forms: GCC 12 warns that the plain ones read an undefined vector)
  const __m512i i = _mm512_maskz_cvtepi8_epi32(0xffff, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_maskz_cvtepi32_ps(0xffff, i);
}
static inline vreg vbroadcast4(const float* p) { return _mm512_maskz_broadcast_f32x4(0xffff, _mm_loadu_ps(p)); }
#elif defined(PERFORMER_ISA_AVX2)
static inline vreg vload_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
static inline vreg vbroadcast4(const float* p) { return _mm256_broadcast_ps(reinterpret_cast<const __m128*>(p)); }
#else
typedef int8_t i8vec __attribute__((vector_size(PERFORMER_VEC_BYTES / 4)));
static inline vreg vload_i8(const int8_t* p) {
  i8vec v;
  __builtin_memcpy(&v, p, sizeof(v));
  return __builtin_convertvector(v, vreg);
}
static_assert(kVecFloats == 4, "the portable copy broadcasts 4 floats as one vector");
static inline vreg vbroadcast4(const float* p) { return vload(p); }
#endif

// ---- Tiles -----------------------------------------------------------------------------------------

// Rows [i0, i0 + MR) x outputs [c0, c0 + CV kIOuts) of one panel: exact integer sums over the kept
// blocks into sums[i][c]. xq: the quantized rows, ldx elements apart, zero-padded to whole blocks.
template <int MR, int CV>
static void w8a8_tile(const Int8LinearParams& p, const xelem* xq, int64_t ldx, int64_t i0, int64_t panel,
                      int64_t c0, int32_t (*sums)[CV * kIOuts]) {
  const int64_t br = p.br, groups = p.bc / 4;
  ivec acc[MR][CV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < CV; ++v) acc[i][v] = izero();
  for (int64_t b = p.row_ptr[panel]; b < p.row_ptr[panel + 1]; ++b) {
    const int8_t* w = p.values + (b * groups * br + c0) * 4;           // [g][r][4] from column c0
    const xelem* xr = xq + i0 * ldx + int64_t(p.block_cols[b]) * p.bc;
    for (int64_t g = 0; g < groups; ++g) {
      ivec wv[CV];
      for (int v = 0; v < CV; ++v) wv[v] = iload_w(w + (g * br + v * kIOuts) * 4);
      for (int i = 0; i < MR; ++i) {
        const ivec xv = ibroadcast_x(xr + i * ldx + 4 * g);
        for (int v = 0; v < CV; ++v) acc[i][v] = idot(acc[i][v], xv, wv[v]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < CV; ++v) {
      int32_t lanes[kIOuts * kILanes];
      istore(lanes, acc[i][v]);
      for (int o = 0; o < kIOuts; ++o) {
        int32_t s = 0;
        for (int l = 0; l < kILanes; ++l) s += lanes[o * kILanes + l];
        sums[i][v * kIOuts + o] = s;
      }
    }
}

// One group of 4 inputs of a weight-only tile: acc[i][v] += x4 row i (4 inputs, broadcast) times
// the converted weights. Always inlined: the accumulators must stay in registers.
template <int MR, int CV>
__attribute__((always_inline)) static inline void w8_group(vreg (&acc)[MR][CV], const int8_t* w, const float* x4,
                                                           int64_t x_stride) {
  if constexpr (MR == 1) {  // each converted vector used once: no registers held for it
    const vreg xv = vbroadcast4(x4);
    for (int v = 0; v < CV; ++v) acc[0][v] = vfma(xv, vload_i8(w + v * kFOuts * 4), acc[0][v]);
  } else {
    vreg wv[CV];
    for (int v = 0; v < CV; ++v) wv[v] = vload_i8(w + v * kFOuts * 4);
    for (int i = 0; i < MR; ++i) {
      const vreg xv = vbroadcast4(x4 + i * x_stride);
      for (int v = 0; v < CV; ++v) acc[i][v] = vfma(xv, wv[v], acc[i][v]);
    }
  }
}

// The same tile in float for the weight-only mode: x rows x_row_stride apart, the last group of a
// block that ends at K read through a zero-padded copy.
template <int MR, int CV>
__attribute__((always_inline)) static inline void w8_tile(const Int8LinearParams& p, int64_t i0, int64_t panel, int64_t c0,
                                                          float (*sums)[CV * kFOuts]) {
  const int64_t br = p.br, bc = p.bc, K = p.K, rs = p.x_row_stride;
  vreg acc[MR][CV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < CV; ++v) acc[i][v] = vzero();
  for (int64_t b = p.row_ptr[panel]; b < p.row_ptr[panel + 1]; ++b) {
    const int64_t k0 = int64_t(p.block_cols[b]) * bc, kc = imin(bc, K - k0);
    const int8_t* w = p.values + (b * (bc / 4) * br + c0) * 4;
    const float* xr = p.x + i0 * rs + k0;
    const int64_t whole = kc / 4, groups = (kc + 3) / 4;
    alignas(16) float pad[MR][4];
    if (groups > whole) {  // the block ends at K inside a group: its inputs through a zero-padded copy
      for (int i = 0; i < MR; ++i)
        for (int64_t j = 0; j < 4; ++j) pad[i][j] = 4 * whole + j < kc ? xr[i * rs + 4 * whole + j] : 0.f;
    }
    // One call site, so that the accumulators stay in registers through the loop.
    for (int64_t g = 0; g < groups; ++g) {
      const bool tail = g == whole;
      w8_group<MR, CV>(acc, w + g * br * 4, tail ? pad[0] : xr + 4 * g, tail ? 4 : rs);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < CV; ++v) {
      alignas(64) float lanes[kVecFloats];
      vstore(lanes, acc[i][v]);
      for (int o = 0; o < kFOuts; ++o)
        sums[i][v * kFOuts + o] = (lanes[4 * o] + lanes[4 * o + 1]) + (lanes[4 * o + 2] + lanes[4 * o + 3]);
    }
}

// y for rows [i0, i0 + rows) and outputs n0 + [0, width) of a tile: scales, zero points, bias.
template <bool Dynamic, typename S, int W>
static void int8_store(const Int8LinearParams& p, const S (*sums)[W], int64_t i0, int rows, int64_t n0,
                       int64_t width, const float* row_scale, const int32_t* row_zero) {
  for (int i = 0; i < rows; ++i) {
    float* out = p.y + (i0 + i) * p.N + n0;
    for (int64_t o = 0; o < width; ++o) {
      const int64_t n = n0 + o;
      float v;
      if constexpr (Dynamic)
        v = float(sums[i][o] - row_zero[i0 + i] * p.col_sums[n]) * (row_scale[i0 + i] * p.scales[n]);
      else
        v = sums[i][o] * p.scales[n];
      out[o] = p.bias ? v + p.bias[n] : v;
    }
  }
}

// Rows [m0, m1) of one panel's outputs [c0, c0 + W1): tiles of MR rows x CV vectors across the
// chunk, then single rows with the whole chunk in one tile, so that a row reads each block's bytes
// in one pass, in order (a small batch streams the weights from memory).
template <int W1>
static void w8a8_chunk(const Int8LinearParams& p, const xelem* xq, int64_t ldx, const float* row_scale,
                       const int32_t* row_zero, int64_t m0, int64_t m1, int64_t panel, int64_t c0) {
  constexpr int CV1 = W1 / kIOuts, CV = CV1 < 2 ? CV1 : 2, MR = kIAcc / CV, W = CV * kIOuts;
  int32_t sums[MR][W];
  int64_t i = m0;
  for (; i + MR <= m1; i += MR)
    for (int64_t c = c0; c < c0 + W1 && panel * p.br + c < p.N; c += W) {
      const int64_t n0 = panel * p.br + c;
      w8a8_tile<MR, CV>(p, xq, ldx, i, panel, c, sums);
      int8_store<true, int32_t, W>(p, sums, i, MR, n0, imin(W, p.N - n0), row_scale, row_zero);
    }
  int32_t sums1[1][W1];
  for (; i < m1; ++i) {
    const int64_t n0 = panel * p.br + c0;
    w8a8_tile<1, CV1>(p, xq, ldx, i, panel, c0, sums1);
    int8_store<true, int32_t, W1>(p, sums1, i, 1, n0, imin(W1, p.N - n0), row_scale, row_zero);
  }
}

template <int W1>
static void w8_chunk(const Int8LinearParams& p, int64_t m0, int64_t m1, int64_t panel, int64_t c0) {
  constexpr int CV1 = W1 / kFOuts, CV = CV1 < 2 ? CV1 : 2, MR = kFAcc / CV, W = CV * kFOuts;
  float sums[MR][W];
  int64_t i = m0;
  for (; i + MR <= m1; i += MR)
    for (int64_t c = c0; c < c0 + W1 && panel * p.br + c < p.N; c += W) {
      const int64_t n0 = panel * p.br + c;
      w8_tile<MR, CV>(p, i, panel, c, sums);
      int8_store<false, float, W>(p, sums, i, MR, n0, imin(W, p.N - n0), nullptr, nullptr);
    }
  float sums1[1][W1];
  for (; i < m1; ++i) {
    const int64_t n0 = panel * p.br + c0;
    w8_tile<1, CV1>(p, i, panel, c0, sums1);
    int8_store<false, float, W1>(p, sums1, i, 1, n0, imin(W1, p.N - n0), nullptr, nullptr);
  }
}

// Chunks of 32 outputs where br allows (16 otherwise). A single row's float tile holds 32 / kFOuts
// accumulators (16 on AVX2, a few spilled): one pass over the blocks beats two at 16 outputs
// (1.47x against 1.18x float32 at K = N = 4096, one row, weights from memory).
static constexpr int kW8Chunk = 16 * kFOuts < 32 ? 16 * kFOuts : 32;  // the portable copy: 16

static void int8_panel(const Int8LinearParams& p, const xelem* xq, int64_t ldx, const float* row_scale,
                       const int32_t* row_zero, int64_t m0, int64_t m1, int64_t panel) {
  const int64_t br = p.br, width = imin(br, p.N - panel * br);  // columns past N are padding
  if (p.col_sums) {
    if (br % 32 == 0)
      for (int64_t c0 = 0; c0 < width; c0 += 32) w8a8_chunk<32>(p, xq, ldx, row_scale, row_zero, m0, m1, panel, c0);
    else
      for (int64_t c0 = 0; c0 < width; c0 += 16) w8a8_chunk<16>(p, xq, ldx, row_scale, row_zero, m0, m1, panel, c0);
  } else {
    // Tiles of rows over chunks of 16 outputs (a chunk's int8 weights stay in L1 across the row
    // tiles: 0.49x -> 0.8x float32 at M = 256 against chunks of 32), then the single rows.
    constexpr int MR = kFAcc / (16 / kFOuts < 2 ? 16 / kFOuts : 2);
    const int64_t tiled = m0 + (m1 - m0) / MR * MR;
    for (int64_t c0 = 0; c0 < width; c0 += 16) w8_chunk<16>(p, m0, tiled, panel, c0);
    if (br % kW8Chunk == 0)
      for (int64_t c0 = 0; c0 < width; c0 += kW8Chunk) w8_chunk<kW8Chunk>(p, tiled, m1, panel, c0);
    else
      for (int64_t c0 = 0; c0 < width; c0 += 16) w8_chunk<16>(p, tiled, m1, panel, c0);
  }
}

// Per-row quantization of x for the dynamic mode: x ~ scale (q - zero), q in [0, 255], over the
// row's range widened to include 0 (so that 0 is exact); a constant-zero row gets scale 1, a row
// with an inf or NaN gets scale NaN (its outputs are NaN). Rounding to nearest even, in float32:
// performer/ops/sparse/reference.py (quantize_rows) computes the same.
static void quantize_row(const float* x, int64_t K, int64_t Kp, xelem* q, float* scale, int32_t* zero) {
  float lo = 0.f, hi = 0.f, probe = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    lo = x[k] < lo ? x[k] : lo;
    hi = x[k] > hi ? x[k] : hi;
    probe += x[k] * 0.f;
  }
  float s = (hi - lo) / 255.f;
  if (probe != 0.f) {  // NaN: the row held an inf or a NaN
    *scale = __builtin_nanf("");
    *zero = 0;
    for (int64_t k = 0; k < Kp; ++k) q[k] = 0;
    return;
  }
  if (s == 0.f) s = 1.f;
  const float inv = 1.f / s;
  float z = __builtin_nearbyintf(-lo * inv);
  z = z < 0.f ? 0.f : (z > 255.f ? 255.f : z);
  for (int64_t k = 0; k < K; ++k) {
    float v = __builtin_nearbyintf(x[k] * inv) + z;
    v = v < 0.f ? 0.f : (v > 255.f ? 255.f : v);
    q[k] = xelem(int32_t(v));
  }
  for (int64_t k = K; k < Kp; ++k) q[k] = 0;
  *scale = s;
  *zero = int32_t(z);
}

static constexpr int64_t kInt8Rows = 96;

static void int8_linear(const Int8LinearParams& p) {
  const int64_t panels = (p.N + p.br - 1) / p.br, chunks = (p.M + kInt8Rows - 1) / kInt8Rows;
  const int64_t jobs = panels * chunks;
  const bool parallel = p.num_threads > 1;
  // The dynamic mode's quantized rows, padded to whole blocks: a workspace kept by the calling
  // thread between calls.
  static thread_local Scratch<xelem> xq_ws;
  static thread_local Scratch<float> scale_ws;
  static thread_local Scratch<int32_t> zero_ws;
  xelem* xq = nullptr;
  float* row_scale = nullptr;
  int32_t* row_zero = nullptr;
  const int64_t ldx = (p.K + p.bc - 1) / p.bc * p.bc;
  if (p.col_sums) {
    xq = xq_ws.get(p.M * ldx);
    row_scale = scale_ws.get(p.M);
    row_zero = zero_ws.get(p.M);
    auto quantize = [&](int64_t m) {
      quantize_row(p.x + m * p.x_row_stride, p.K, ldx, xq + m * ldx, row_scale + m, row_zero + m);
    };
    if (!parallel || p.M == 1) {
      for (int64_t m = 0; m < p.M; ++m) quantize(m);
    } else {
#pragma omp parallel for schedule(static) num_threads(p.num_threads)
      for (int64_t m = 0; m < p.M; ++m) quantize(m);
    }
  }
  auto run = [&](int64_t job) {
    const int64_t panel = job / chunks, m0 = job % chunks * kInt8Rows, m1 = imin(p.M, m0 + kInt8Rows);
    int8_panel(p, xq, ldx, row_scale, row_zero, m0, m1, panel);
  };
  if (!parallel || jobs == 1) {
    for (int64_t job = 0; job < jobs; ++job) run(job);
    return;
  }
#pragma omp parallel for schedule(static) num_threads(p.num_threads)
  for (int64_t job = 0; job < jobs; ++job) run(job);
}

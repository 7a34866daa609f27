// FAVOR+ ops for the CUDA dispatch key: the same results, with the same meaning, as the CPU kernels
// (csrc/cpu/favor_kernel.h explains every quantity: w_s, the running maximum m_s, M, the query shift
// c_t with span 30, kMinDen, the relu eps, grouped-query heads).
//
// Plain SIMT arithmetic in the accumulation type A (float; double for float64 inputs) on shared-memory
// tiles: R rows of queries or keys (a chunk), FT features, VT value columns, ET input columns at a time
// (Tiles<A>). 256 threads as a 16 x 16 grid: thread (ti, tj) owns rows ti + 16 i and columns tj + 16 j of
// every tile product (mma), so accumulators stay in registers. The (rows x m) feature matrices never go
// to global memory: each feature tile is projected (u = W q', w = W k'), turned into features and used.
//
// Forward:
//   row_max     w_s's maximum over the features of each key (softmax; -inf for padding, relu: 0).
//   key_shift   -> key_shift: the running maximum m_s (causal) or M for every s (bidirectional).
//   key_state   [S, z] of each segment of keys relative to key_shift at the segment's end, per
//               (feature tile, value tile, segment, batch x kv head) block.
//   combine     bidirectional: the sum over segments -> state (all of them relative to M, known
//               beforehand, so no rescaling). Causal: the exclusive prefix with rescaling (each
//               segment's start state) and the total -> state.
//   forward_out per (query chunk, value tile, batch x head) (bidirectional), or per (segment, value
//               tile, batch x kv head) (causal: chunk after chunk, every query head of the kv head, the
//               intra-chunk product with weights e^{m_s - m_t} plus phi_q times the carried state, which
//               then advances). Query shifts are maxima over the features, taken tile by tile with the
//               accumulators rescaled when the shift grows (like flash-attention's running max).
// Backward, by recomputation:
//   grad_rows   1 / den_t and beta_t = (g_t . out_t) / den_t.
//   query_part  sum_t phi_q(t)^T [g_t / den_t, -beta_t] per segment of queries (times e^{R - m_t},
//               R = key_shift before the segment, when causal); combine: the sum (bidirectional [dS,
//               dz]) or the exclusive suffix (causal: [P, p] at the end of each segment).
//   backward_dq   bidirectional: per (query chunk, head) from the saved state. Causal: the forward
//                 sweep per (segment, batch x kv head) from the segment's key start state.
//   backward_dkdv bidirectional: per key chunk from [dS, dz]. Causal: the reverse sweep per segment
//                 from [P, p] at its end.
//   dq, dk, dv accumulate in the accumulation type (a buffer cast at the end for 16-bit inputs).
//   With features_grad, backward_dq and backward_dkdv also add c dx^T x (x the chunk's q or k rows, dx the
//   gradient with respect to its logits) and the column sums of dx to the gradients with respect to the
//   features and their bias, by atomic adds (every block of a feature set adds to it).
// Features may differ per batch element and key head ((Bf, Hf, m, E), feature_set) and carry a bias added
// to every logit: project() returns c W x + b.
// Segments (whole chunks) are chosen so that a pass has about two blocks per SM.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../favor_checks.h"
#include "favor_common.cuh"

namespace performer::cuda {
namespace {

constexpr int kWarps = kThreads / 32;
// Blocks per SM that each kernel's registers must allow: the sweeps (forward_out, backward_dq,
// backward_dkdv) hold ~100 KB of shared memory, so one; the small passes two.
constexpr int kBigBlocks = 1, kSmallBlocks = 2;

template <class A>
struct Tiles;
template <>
struct Tiles<float> {
  static constexpr int R = 64, FT = 32, VT = 64, ET = 32;
};
template <>
struct Tiles<double> {
  static constexpr int R = 32, FT = 32, VT = 32, ET = 16;
};



// Everything a kernel reads. Views are (B, heads, N, D) tensors by element strides.
struct Params {
  View q, k, v, grad_out, out_saved;
  const void* W;           // features (Bf, Hf, m, E), contiguous, acc: set f = (b if Bf > 1) Hf + (hk if Hf > 1)
  const void* bias;        // their bias (Bf, Hf, m), contiguous, acc; or null
  void* dW;                // backward with features_grad: (Bf, Hf, m, E) acc, zero-initialized; or null
  void* dbias;             // (Bf, Hf, m) acc, zero-initialized; or null
  int64_t Bf, Hf;
  const bool* mask;        // (B, S) contiguous, true = ignore; or null
  int64_t B, H, Hk, g, L, S, E, Ev, m;
  double c;                // sqrt(scale)
  bool softmax, causal;
  void* out;               // (B, H, L, Ev) contiguous, input dtype
  void* state;             // (B, Hk, m, Ev + 1) acc: written by the forward, read by the bidirectional backward
  void* den;               // (B, H, L) acc
  void* qshift;            // (B, H, L) acc
  void* kshift;            // (B, Hk, S) acc
  void* rowmax;            // (B, Hk, S) acc, softmax forward only
  void* inv_den;           // (B, H, L) acc, backward
  void* beta;              // (B, H, L) acc, backward
  void* dq;                // (B, H, L, E) acc, zero-initialized
  void* dk;                // (B, Hk, S, E) acc, zero-initialized
  void* dv;                // (B, Hk, S, Ev) acc, zero-initialized
  void* slots;             // (B Hk, segs, m, Wd) acc: key states per segment
  void* qslots;            // (B Hk, segs, m, Wd) acc: query parts per segment (backward)
  void* da;                // (B Hk, segs, g, R, R) acc: causal reverse sweep, per-head intra gradients
  // Segments of seg_chunks chunks of R rows; vtiles value tiles of VT columns (at least 1). A slot row
  // holds S (Ev columns) and one z column per value tile (Wd = Ev + vtiles), so that the blocks of
  // different value tiles never share a z they update.
  int64_t segs, seg_chunks, vtiles, Wd;
};


// ---- tiles ---------------------------------------------------------------------------------------

template <class A>
struct One {
  __device__ __forceinline__ A operator()(int) const { return A(1); }
};

// dst[r * LD + e] = row_scale(r) * src[r * rs + e * cs] for r < rows, e < cols; zero elsewhere of the
// ROWS x COLS tile. Consecutive threads read along e (coalesced when cs == 1).
template <int ROWS, int COLS, int LD, class T, class A, class Scale>
__device__ __forceinline__ void load_tile(A* dst, const T* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols,
                                          Scale row_scale) {
  for (int idx = threadIdx.x; idx < ROWS * COLS; idx += kThreads) {
    const int r = idx / COLS, e = idx % COLS;
    A x = A(0);
    if (r < rows && e < cols) x = row_scale(r) * A(widen(src[r * rs + e * cs]));
    dst[r * LD + e] = x;
  }
}

// The thread's micro tile of a (16 TM x 16 TN) product: f(row, col, value&).
template <int TM, int TN, class A, class F>
__device__ __forceinline__ void for_each(A (&acc)[TM][TN], F f) {
  const int ti = threadIdx.x / 16, tj = threadIdx.x % 16;
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) f(ti + 16 * i, tj + 16 * j, acc[i][j]);
}

template <int TM, int TN, class A>
__device__ __forceinline__ void zero(A (&acc)[TM][TN]) {
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = A(0);
}

// acc[i][j] += sum_{k < K} a(ti + 16 i, k) b(k, tj + 16 j) with a(r, k) = a[r * ars + k * acs],
// b(k, c) = b[k * brs + c * bcs] in shared memory.
template <int K, int TM, int TN, class A>
__device__ __forceinline__ void mma(A (&acc)[TM][TN], const A* a, int ars, int acs, const A* b, int brs, int bcs) {
  const int ti = threadIdx.x / 16, tj = threadIdx.x % 16;
#pragma unroll 4
  for (int k = 0; k < K; ++k) {
    A x[TM], y[TN];
#pragma unroll
    for (int i = 0; i < TM; ++i) x[i] = a[(ti + 16 * i) * ars + k * acs];
#pragma unroll
    for (int j = 0; j < TN; ++j) y[j] = b[k * brs + (tj + 16 * j) * bcs];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = fma(x[i], y[j], acc[i][j]);
  }
}

// Shared tiles of the projections, E in slices of ET: one or two row blocks and the features' slice.
template <class A>
struct ProjTiles {
  static constexpr int R = Tiles<A>::R, FT = Tiles<A>::FT, ET = Tiles<A>::ET;
  A x0[R][ET + 1], x1[R][ET + 1], w[FT][ET + 1];
};

// The feature set of batch b, key head hk: its features W (m, E) and bias (m, or null) at offsets
// set * m * E and set * m.
__device__ __forceinline__ int64_t feature_set(const Params& p, int64_t b, int64_t hk) {
  return (p.Bf > 1 ? b : 0) * p.Hf + (p.Hf > 1 ? hk : 0);
}

// acc0 = c X0 W_tile^T + b_tile (and acc1 likewise when x1 is given) for the n rows from x0 / x1 (row
// stride rs, column stride cs; zero rows from n) and features j0 .. j0 + FT of feature set `set` (zero
// past m): (R x FT) fragments of the logits before the softmax kernel's norm term. Starts with a
// barrier, so callers may still be reading the previous tiles.
template <class T, class A, int TM, int TN>
__device__ __forceinline__ void project(ProjTiles<A>& sm, const Params& p, int64_t set, const T* x0, int64_t rs0,
                                        int64_t cs0, const T* x1, int64_t rs1, int64_t cs1, int64_t n, int64_t j0,
                                        A (&acc0)[TM][TN], A (&acc1)[TM][TN]) {
  constexpr int R = Tiles<A>::R, FT = Tiles<A>::FT, ET = Tiles<A>::ET;
  const A* W = static_cast<const A*>(p.W) + set * p.m * p.E;
  zero(acc0);
  zero(acc1);
  if (p.E == 0) __syncthreads();  // the barrier callers rely on
  for (int64_t e0 = 0; e0 < p.E; e0 += ET) {
    __syncthreads();
    load_tile<R, ET, ET + 1>(&sm.x0[0][0], x0 + e0 * cs0, rs0, cs0, n, p.E - e0, One<A>());
    if (x1) load_tile<R, ET, ET + 1>(&sm.x1[0][0], x1 + e0 * cs1, rs1, cs1, n, p.E - e0, One<A>());
    load_tile<FT, ET, ET + 1>(&sm.w[0][0], W + j0 * p.E + e0, p.E, 1, p.m - j0, p.E - e0, One<A>());
    __syncthreads();
    mma<ET>(acc0, &sm.x0[0][0], ET + 1, 1, &sm.w[0][0], 1, ET + 1);
    if (x1) mma<ET>(acc1, &sm.x1[0][0], ET + 1, 1, &sm.w[0][0], 1, ET + 1);
  }
  const A c = A(p.c);
  const A* bias = p.bias ? static_cast<const A*>(p.bias) + set * p.m + j0 : nullptr;
  auto finish = [&](int, int j, A& v) { v = bias && j0 + j < p.m ? fma(c, v, bias[j]) : c * v; };
  for_each(acc0, finish);
  if (x1) for_each(acc1, finish);
}

// hn[r] = |c x_r|^2 / 2 for the n rows from x (zero past n); a warp per row.
template <int R, class T, class A>
__device__ __forceinline__ void half_norms(A* hn, const T* x, int64_t rs, int64_t cs, int64_t n, int64_t E, A c) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < R; r += kWarps) {
    A sum = A(0);
    if (r < n)
      for (int64_t e = lane; e < E; e += 32) {
        const A xe = A(widen(x[r * rs + e * cs]));
        sum = fma(xe, xe, sum);
      }
    sum = group_sum<32>(sum);
    if (lane == 0) hn[r] = A(0.5) * c * c * sum;
  }
}

// Rows [begin, end) of segment `seg` of a sequence of `len` positions.
struct Range {
  int64_t begin, end;
};
template <int R>
__device__ __forceinline__ Range segment(const Params& p, int64_t seg, int64_t len) {
  const int64_t begin = seg * p.seg_chunks * R;
  return {begin, imin(len, begin + p.seg_chunks * R)};
}

template <class T>
__device__ __forceinline__ const T* rows_of(const View& v, int64_t b, int64_t h, int64_t t) {
  return static_cast<const T*>(v.data) + b * v.s[0] + h * v.s[1] + t * v.s[2];
}

// ---- forward: key maxima and states ---------------------------------------------------------------

template <class A>
struct RowMaxTiles {
  static constexpr int R = Tiles<A>::R, FT = Tiles<A>::FT;
  ProjTiles<A> proj;
  A w[R][FT + 1];
  A hn[R], mx[R];
};

// rowmax[s] = max_j w_sj (NaN for a NaN key, which must propagate, never pad; -inf for padding).
// Grid: B Hk ceil(S / R) blocks of R keys.
template <class T>
__global__ void __launch_bounds__(kThreads, kSmallBlocks) row_max_kernel(Params p) {
  using A = acc_t<T>;
  constexpr int R = Tiles<A>::R, FT = Tiles<A>::FT, TR = R / 16, TF = FT / 16, TPR = kThreads / R;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  RowMaxTiles<A>& sm = *reinterpret_cast<RowMaxTiles<A>*>(smem_raw);
  const int tid = threadIdx.x, row = tid / TPR, sub = tid % TPR;
  const int64_t chunks = ceil_div(p.S, R), bhk = blockIdx.x / chunks, s0 = blockIdx.x % chunks * R;
  const int64_t b = bhk / p.Hk, hk = bhk % p.Hk, n = imin(R, p.S - s0), set = feature_set(p, b, hk);
  const A c = A(p.c);
  const T* kc = rows_of<T>(p.k, b, hk, s0);
  half_norms<R>(sm.hn, kc, p.k.s[2], p.k.s[3], n, p.E, c);
  if (tid < R) sm.mx[tid] = neg_inf<A>();
  for (int64_t j0 = 0; j0 < p.m; j0 += FT) {
    A aw[TR][TF], unused[TR][TF];
    project<T>(sm.proj, p, set, kc, p.k.s[2], p.k.s[3], static_cast<const T*>(nullptr), 0, 0, n, j0, aw, unused);
    for_each(aw, [&](int r, int j, A& x) { sm.w[r][j] = j0 + j < p.m ? x - sm.hn[r] : neg_inf<A>(); });
    __syncthreads();
    A best = neg_inf<A>();
    for (int j = sub; j < FT; j += TPR) best = fmax(best, sm.w[row][j]);
    best = group_max<TPR>(best);
    if (sub == 0) sm.mx[row] = fmax(sm.mx[row], best);
  }
  __syncthreads();
  if (tid < n) {
    const bool padded = p.mask && p.mask[b * p.S + s0 + tid];
    const A hn = sm.hn[tid];
    static_cast<A*>(p.rowmax)[bhk * p.S + s0 + tid] = padded ? neg_inf<A>() : hn != hn ? hn : sm.mx[tid];
  }
}

// key_shift = the running maximum of the key maxima (causal; a NaN key gets NaN, the others ignore
// it), or their maximum M at every position (bidirectional; NaN if any key is NaN). relu: the maximum
// of 0 (visible) and -inf (padding). Grid: B Hk blocks.
template <class A>
__global__ void __launch_bounds__(kThreads, kSmallBlocks) key_shift_kernel(Params p) {
  __shared__ A warp_max[kWarps];
  __shared__ int any_nan;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t bhk = blockIdx.x, b = bhk / p.Hk;
  const A* raw = p.softmax ? static_cast<const A*>(p.rowmax) + bhk * p.S : nullptr;
  A* out = static_cast<A*>(p.kshift) + bhk * p.S;
  auto key_max = [&](int64_t s) {
    if (p.mask && p.mask[b * p.S + s]) return neg_inf<A>();
    return raw ? raw[s] : A(0);
  };
  if (!p.causal) {
    A mx = neg_inf<A>();
    bool nan = false;
    for (int64_t s = tid; s < p.S; s += kThreads) {
      const A x = key_max(s);
      nan |= x != x;
      mx = fmax(mx, x);
    }
    mx = group_max<32>(mx);
    if (tid == 0) any_nan = 0;
    if (lane == 0) warp_max[warp] = mx;
    __syncthreads();
    if (nan) any_nan = 1;
    __syncthreads();
    A M = neg_inf<A>();
    for (int w = 0; w < kWarps; ++w) M = fmax(M, warp_max[w]);
    if (any_nan) M = A(NAN);
    for (int64_t s = tid; s < p.S; s += kThreads) out[s] = M;
    return;
  }
  A carry = neg_inf<A>();
  for (int64_t s0 = 0; s0 < p.S; s0 += kThreads) {
    const int64_t s = s0 + tid;
    const A x = s < p.S ? key_max(s) : neg_inf<A>();
    A y = x != x ? neg_inf<A>() : x;
#pragma unroll
    for (int o = 1; o < 32; o *= 2) {
      const A up = __shfl_up_sync(0xffffffffu, y, o);
      if (lane >= o) y = fmax(y, up);
    }
    if (lane == 31) warp_max[warp] = y;
    __syncthreads();
    A before = carry, total = carry;
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) before = fmax(before, warp_max[w]);
      total = fmax(total, warp_max[w]);
    }
    if (s < p.S) out[s] = x != x ? x : fmax(before, y);
    carry = total;
    __syncthreads();
  }
}

template <class A>
struct KeyStateTiles {
  static constexpr int R = Tiles<A>::R, FT = Tiles<A>::FT, VT = Tiles<A>::VT;
  ProjTiles<A> proj;
  A phik[R][FT + 1];
  A vv[R][VT];
  A hn[R], z[FT];
};

// The block of a slot pass (key_state, query_part): value tile vt (fastest), feature tile j0, segment,
// batch x kv head.
struct SlotBlock {
  int64_t vt, j0, seg, bhk;
};
template <int FT>
__device__ __forceinline__ SlotBlock slot_block(const Params& p) {
  int64_t x = blockIdx.x;
  const int64_t vt = x % p.vtiles;
  x /= p.vtiles;
  const int64_t ftiles = ceil_div(p.m, FT), j0 = x % ftiles * FT;
  x /= ftiles;
  return SlotBlock{vt, j0, x % p.segs, x / p.segs};
}

// Slot (segment) = [S, z] of the segment's keys alone, relative to key_shift at its last key:
// sum_s exp(w_s - ref) [v_s, 1]. Grid: B Hk segs (feature tiles) (value tiles) blocks, value tile
// fastest.
template <class T>
__global__ void __launch_bounds__(kThreads, kSmallBlocks) key_state_kernel(Params p) {
  using A = acc_t<T>;
  constexpr int R = Tiles<A>::R, FT = Tiles<A>::FT, VT = Tiles<A>::VT, TR = R / 16, TF = FT / 16, TV = VT / 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  KeyStateTiles<A>& sm = *reinterpret_cast<KeyStateTiles<A>*>(smem_raw);
  const int tid = threadIdx.x;
  const SlotBlock blk = slot_block<FT>(p);
  const int64_t vt = blk.vt, j0 = blk.j0, seg = blk.seg, bhk = blk.bhk, b = bhk / p.Hk, hk = bhk % p.Hk,
                e0 = vt * VT, set = feature_set(p, b, hk);
  const Range keys = segment<R>(p, seg, p.S);
  const A c = A(p.c), ref = static_cast<const A*>(p.kshift)[bhk * p.S + keys.end - 1];
  A st[TF][TV];
  zero(st);
  if (tid < FT) sm.z[tid] = A(0);
  for (int64_t s0 = keys.begin; s0 < keys.end; s0 += R) {
    const int64_t n = imin(R, keys.end - s0);
    const T* kc = rows_of<T>(p.k, b, hk, s0);
    if (p.softmax) half_norms<R>(sm.hn, kc, p.k.s[2], p.k.s[3], n, p.E, c);
    A aw[TR][TF], unused[TR][TF];
    project<T>(sm.proj, p, set, kc, p.k.s[2], p.k.s[3], static_cast<const T*>(nullptr), 0, 0, n, j0, aw, unused);
    for_each(aw, [&](int s, int j, A& w) {
      const bool visible = s < n && j0 + j < p.m && !(p.mask && p.mask[b * p.S + s0 + s]);
      sm.phik[s][j] = key_feature(w - (p.softmax ? sm.hn[s] : A(0)), ref, visible, p.softmax);
    });
    load_tile<R, VT, VT>(&sm.vv[0][0], rows_of<T>(p.v, b, hk, s0) + e0 * p.v.s[3], p.v.s[2], p.v.s[3], n,
                         p.Ev - e0, One<A>());
    __syncthreads();
    mma<R>(st, &sm.phik[0][0], 1, FT + 1, &sm.vv[0][0], VT, 1);
    if (tid < FT) {
      A sum = A(0);
      for (int s = 0; s < R; ++s) sum += sm.phik[s][tid];
      sm.z[tid] += sum;
    }
  }
  A* slot = static_cast<A*>(p.slots) + (bhk * p.segs + seg) * p.m * p.Wd;
  for_each(st, [&](int j, int e, A& v) {
    if (j0 + j < p.m && e0 + e < p.Ev) slot[(j0 + j) * p.Wd + e0 + e] = v;
  });
  if (tid < FT && j0 + tid < p.m) slot[(j0 + tid) * p.Wd + p.Ev + vt] = sm.z[tid];
}

enum class Combine : int { sum = 0, prefix = 1, suffix = 2 };

// Per element of the slots of a (batch, kv head), over its segments in order:
//   sum:    slot 0 = the total (bidirectional: all slots share one reference);
//   prefix: slot j = the combination of slots < j relative to key_shift before segment j (the state
//           segment j starts from), rescaling as the running maximum grows;
//   suffix: slot j = the combination of the query parts of the segments > j, relative to key_shift
//           at the end of segment j (the CPU's backward_causal_split).
// sum and prefix also write the total into `state` (B, Hk, m, Ev + 1) when given. Grid: B Hk
// ceil(m Wd / 256) blocks.
template <class A>
__global__ void __launch_bounds__(kThreads, kSmallBlocks)
    combine_kernel(Params p, A* slots, A* state, Combine mode, int R) {
  const int64_t per = p.m * p.Wd, blocks = ceil_div(per, kThreads);
  const int64_t bhk = blockIdx.x / blocks, i = blockIdx.x % blocks * kThreads + threadIdx.x;
  if (i >= per) return;
  A* x = slots + bhk * p.segs * per + i;
  const A* shift = static_cast<const A*>(p.kshift) + bhk * p.S;
  auto end_max = [&](int64_t j) { return shift[imin(p.S, (j + 1) * p.seg_chunks * R) - 1]; };
  A acc = A(0);
  if (mode == Combine::sum) {
    for (int64_t j = 0; j < p.segs; ++j) acc += x[j * per];
    x[0] = acc;
  } else if (mode == Combine::prefix) {
    A before = neg_inf<A>();
    for (int64_t j = 0; j < p.segs; ++j) {
      const A own = x[j * per], after = end_max(j);
      x[j * per] = acc;
      acc = acc * rescale(before, after) + own;
      before = after;
    }
  } else {
    for (int64_t j = p.segs - 1; j >= 0; --j) {
      const A own = x[j * per];
      x[j * per] = acc;
      if (j > 0) acc = own + acc * rescale(end_max(j - 1), end_max(j));
    }
    return;
  }
  const int64_t j = i / p.Wd, col = i % p.Wd;
  if (state && col <= p.Ev) state[(bhk * p.m + j) * (p.Ev + 1) + col] = acc;
}

// ---- forward: outputs ---------------------------------------------------------------------------

template <class A>
struct OutTiles {
  static constexpr int R = Tiles<A>::R, FT = Tiles<A>::FT, VT = Tiles<A>::VT;
  ProjTiles<A> proj;
  A u[R][FT + 1];   // u, then phi_q
  A w[R][FT + 1];   // w, then phi_k (causal)
  A st[FT][VT];     // the state's S tile
  A zt[FT], lz[FT]; // its z and log z
  A vv[R][VT];      // the chunk's values (causal)
  A a[R][R + 1];    // intra-chunk weights (causal)
  A ms[R], hn[R], ref[R], sc[R], qs[R], fac[R], den[R];
  bool visible[R];
};

// Bidirectional: block (batch x head, query chunk, value tile) from the final state. Causal: block
// (batch x kv head, segment, value tile), chunk after chunk from the segment's start state (its slot,
// advanced in place), every query head of the kv head per chunk.
template <class T>
__global__ void __launch_bounds__(kThreads, kBigBlocks) forward_out_kernel(Params p) {
  using A = acc_t<T>;
  constexpr int R = Tiles<A>::R, FT = Tiles<A>::FT, VT = Tiles<A>::VT;
  constexpr int TR = R / 16, TF = FT / 16, TV = VT / 16, TPR = kThreads / R;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  OutTiles<A>& sm = *reinterpret_cast<OutTiles<A>*>(smem_raw);
  const int tid = threadIdx.x, row = tid / TPR, sub = tid % TPR;
  const A c = A(p.c), ninf = neg_inf<A>(), lo = min_den<A>();

  int64_t x = blockIdx.x;
  const int64_t vt = x % p.vtiles, e0 = vt * VT;
  x /= p.vtiles;
  int64_t b, hk, h_begin, h_end, ld, zcol;
  Range span;
  A* state;
  if (p.causal) {
    const int64_t seg = x % p.segs, bhk = x / p.segs;
    b = bhk / p.Hk;
    hk = bhk % p.Hk;
    h_begin = hk * p.g;
    h_end = h_begin + p.g;
    span = segment<R>(p, seg, p.L);
    state = static_cast<A*>(p.slots) + (bhk * p.segs + seg) * p.m * p.Wd;
    ld = p.Wd;
    zcol = p.Ev + vt;
  } else {
    const int64_t chunks = ceil_div(p.L, R), bh = x / chunks;
    b = bh / p.H;
    h_begin = bh % p.H;
    h_end = h_begin + 1;
    hk = h_begin / p.g;
    span = {x % chunks * R, imin(p.L, x % chunks * R + R)};
    state = static_cast<A*>(p.state) + (b * p.Hk + hk) * p.m * (p.Ev + 1);
    ld = p.Ev + 1;
    zcol = p.Ev;
  }
  const int64_t set = feature_set(p, b, hk);
  const A* shift = static_cast<const A*>(p.kshift) + (b * p.Hk + hk) * p.S;
  A Mprev = p.causal && span.begin > 0 ? shift[span.begin - 1] : ninf;

  for (int64_t t0 = span.begin; t0 < span.end; t0 += R) {
    const int64_t n = imin(R, span.end - t0);
    const A Mend = p.causal ? shift[t0 + n - 1] : A(0), keep = p.causal ? rescale(Mprev, Mend) : A(1);
    const T* kc = rows_of<T>(p.k, b, hk, t0);
    __syncthreads();  // the previous chunk is done with the row data
    if (tid < R) {
      const A ms = p.causal && tid < n ? shift[t0 + tid] : Mend;
      sm.ms[tid] = ms;
      sm.visible[tid] = p.causal && tid < n && !(p.mask && p.mask[b * p.S + t0 + tid]);
      sm.ref[tid] = p.causal ? rescale(Mprev, ms) : A(1);
      sm.sc[tid] = tid < n ? rescale(ms, Mend) : A(0);
    }
    if (p.causal) {
      if (p.softmax) half_norms<R>(sm.hn, kc, p.k.s[2], p.k.s[3], n, p.E, c);
      load_tile<R, VT, VT>(&sm.vv[0][0], rows_of<T>(p.v, b, hk, t0) + e0 * p.v.s[3], p.v.s[2], p.v.s[3], n,
                           p.Ev - e0, One<A>());
    }
    for (int64_t h = h_begin; h < h_end; ++h) {
      const bool update = p.causal && h == h_end - 1;  // the state advances after the last head
      const T* qc = rows_of<T>(p.q, b, h, t0);
      if (tid < R) {
        sm.qs[tid] = p.softmax ? ninf : A(0);
        sm.fac[tid] = A(1);
        sm.den[tid] = A(0);
      }
      A num[TR][TV], aa[TR][TR];  // phi_q [S, z] so far; phi_q phi_k^T (causal)
      zero(num);
      zero(aa);
      for (int64_t j0 = 0; j0 < p.m; j0 += FT) {
        load_tile<FT, VT, VT>(&sm.st[0][0], state + j0 * ld + e0, ld, 1, p.m - j0, p.Ev - e0, One<A>());
        if (tid < FT) {
          const A z = j0 + tid < p.m ? state[(j0 + tid) * ld + zcol] : A(0);
          sm.zt[tid] = z;
          sm.lz[tid] = z > A(0) ? log_acc(z) : ninf;
        }
        A au[TR][TF], aw[TR][TF];
        project<T>(sm.proj, p, set, qc, p.q.s[2], p.q.s[3], p.causal ? kc : nullptr, p.k.s[2], p.k.s[3], n, j0, au, aw);
        for_each(au, [&](int r, int j, A& v) { sm.u[r][j] = v; });
        if (p.causal) for_each(aw, [&](int r, int j, A& v) { sm.w[r][j] = v - (p.softmax ? sm.hn[r] : A(0)); });
        __syncthreads();
        if (p.softmax) {
          // c_t = max_j max(u_tj + lam_tj, u_tj - span), lam_tj = log z_j (bidirectional) or
          // max(log z_j + Mprev - m_t, w_tj - m_t) (causal: the state before the chunk and key t itself).
          const A mt = sm.ms[row];
          const A off = !p.causal ? A(0) : (Mprev == ninf || mt == ninf) ? ninf : Mprev - mt;
          const bool own_key = p.causal && sm.visible[row] && mt != ninf;
          A best = ninf;
          for (int j = sub; j < FT && j0 + j < p.m; j += TPR) {
            const A ut = sm.u[row][j];
            A lam = sm.lz[j] + off;
            if (own_key) {
              const A from_key = sm.w[row][j] - mt;
              lam = lam > from_key ? lam : from_key;
            }
            best = fmax(best, fmax(ut + lam, ut - A(kQueryShiftSpan)));
          }
          best = group_max<TPR>(best);
          if (sub == 0) {
            const A before = sm.qs[row], now = fmax(before, best);
            sm.fac[row] = rescale(before, now);
            sm.qs[row] = now;
          }
        }
        __syncthreads();
        for (int idx = tid; idx < R * FT; idx += kThreads) {
          const int r = idx / FT, j = idx % FT;
          const bool valid = j0 + j < p.m;
          const A ut = sm.u[r][j];
          sm.u[r][j] = !valid ? A(0) : p.softmax ? exp_acc(ut - sm.qs[r]) : relu_feature(ut);
          if (p.causal) sm.w[r][j] = key_feature(sm.w[r][j], sm.ms[r], valid && sm.visible[r], p.softmax);
        }
        __syncthreads();
        for_each(num, [&](int r, int, A& v) { v *= sm.fac[r]; });
        mma<FT>(num, &sm.u[0][0], FT + 1, 1, &sm.st[0][0], VT, 1);
        if (p.causal) {
          for_each(aa, [&](int r, int, A& v) { v *= sm.fac[r]; });
          mma<FT>(aa, &sm.u[0][0], FT + 1, 1, &sm.w[0][0], 1, FT + 1);
        }
        {
          A sum = A(0);
          for (int j = sub; j < FT; j += TPR) sum += sm.u[row][j] * sm.zt[j];
          sum = group_sum<TPR>(sum);
          if (sub == 0) sm.den[row] = sm.den[row] * sm.fac[row] + sum;
        }
        if (update) {  // S <- S keep + (phi_k e^{m_s - Mend})^T V, z likewise
          __syncthreads();
          for (int idx = tid; idx < R * FT; idx += kThreads) sm.w[idx / FT][idx % FT] *= sm.sc[idx / FT];
          __syncthreads();
          A ns[TF][TV];
          zero(ns);
          mma<R>(ns, &sm.w[0][0], 1, FT + 1, &sm.vv[0][0], VT, 1);
          for_each(ns, [&](int j, int e, A& v) {
            if (j0 + j < p.m && e0 + e < p.Ev) state[(j0 + j) * ld + e0 + e] = sm.st[j][e] * keep + v;
          });
          if (tid < FT && j0 + tid < p.m) {
            A sum = A(0);
            for (int s = 0; s < R; ++s) sum += sm.w[s][tid];
            state[(j0 + tid) * ld + zcol] = sm.zt[tid] * keep + sum;
          }
        }
        __syncthreads();
      }
      if (p.causal) {  // + the masked intra-chunk product; the state's part moves to reference m_t
        for_each(aa, [&](int t, int s, A& v) {
          sm.a[t][s] = s <= t ? v * causal_weight(sm.ms[s], sm.ms[t]) : A(0);
        });
        for_each(num, [&](int r, int, A& v) { v *= sm.ref[r]; });
        __syncthreads();
        mma<R>(num, &sm.a[0][0], R + 1, 1, &sm.vv[0][0], VT, 1);
        A sum = A(0);
        for (int s = sub; s < R; s += TPR) sum += sm.a[row][s];
        sum = group_sum<TPR>(sum);
        if (sub == 0) sm.den[row] = sm.den[row] * sm.ref[row] + sum;
        __syncthreads();
      }
      const int64_t row0 = (b * p.H + h) * p.L + t0;
      T* out = static_cast<T*>(p.out) + row0 * p.Ev;
      for_each(num, [&](int t, int e, A& v) {
        const A d = sm.den[t];
        // As the CPU: times 0 where not visible, so that a NaN key still gives NaN. A division, not a
        // product with 1 / d: under --use_fast_math a reciprocal below 2^-126 flushes to zero.
        if (t < n && e0 + e < p.Ev) out[t * p.Ev + e0 + e] = narrow<T>(d >= lo ? v / d : v * A(0));
      });
      if (vt == 0 && tid < n) {
        const A d = sm.den[tid];
        static_cast<A*>(p.den)[row0 + tid] = d >= lo ? d : A(0);
        static_cast<A*>(p.qshift)[row0 + tid] = sm.qs[tid];
      }
      __syncthreads();
    }
    Mprev = Mend;
  }
}

// ---- backward ------------------------------------------------------------------------------------

// inv_den = 1 / den (0 where den == 0) and beta = (g . out) inv_den per query; a warp per query.
template <class T>
__global__ void __launch_bounds__(kThreads, kSmallBlocks) grad_rows_kernel(Params p) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % 32;
  const int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (r >= p.B * p.H * p.L) return;  // whole warps
  const int64_t t = r % p.L, bh = r / p.L, b = bh / p.H, h = bh % p.H;
  const T* g = rows_of<T>(p.grad_out, b, h, t);
  const T* o = rows_of<T>(p.out_saved, b, h, t);
  A sum = A(0);
  for (int64_t e = lane; e < p.Ev; e += 32)
    sum = fma(A(widen(g[e * p.grad_out.s[3]])), A(widen(o[e * p.out_saved.s[3]])), sum);
  sum = group_sum<32>(sum);
  if (lane == 0) {
    const A d = static_cast<const A*>(p.den)[r], inv = d > A(0) ? A(1) / d : A(0);
    static_cast<A*>(p.inv_den)[r] = inv;
    static_cast<A*>(p.beta)[r] = sum * inv;
  }
}

template <class A>
struct QueryPartTiles {
  static constexpr int R = Tiles<A>::R, FT = Tiles<A>::FT, VT = Tiles<A>::VT;
  ProjTiles<A> proj;
  A u[R][FT + 1];
  A gt[R][VT];
  A qs[R], gi[R], gb[R], p[FT];
};

// Query slot (segment) = sum over its queries t, every head of the kv head, of phi_q(t)^T [g_t / den_t,
// -beta_t] e^{R - m_t} with R = key_shift before the segment (causal; 1 bidirectional). Grid as
// key_state over query segments.
template <class T>
__global__ void __launch_bounds__(kThreads, kSmallBlocks) query_part_kernel(Params p) {
  using A = acc_t<T>;
  constexpr int R = Tiles<A>::R, FT = Tiles<A>::FT, VT = Tiles<A>::VT, TR = R / 16, TF = FT / 16, TV = VT / 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  QueryPartTiles<A>& sm = *reinterpret_cast<QueryPartTiles<A>*>(smem_raw);
  const int tid = threadIdx.x;
  const SlotBlock blk = slot_block<FT>(p);
  const int64_t vt = blk.vt, j0 = blk.j0, seg = blk.seg, bhk = blk.bhk, b = bhk / p.Hk, hk = bhk % p.Hk,
                e0 = vt * VT, set = feature_set(p, b, hk);
  const Range span = segment<R>(p, seg, p.L);
  const A* shift = static_cast<const A*>(p.kshift) + bhk * p.S;
  const A Rseg = p.causal && span.begin > 0 ? shift[span.begin - 1] : neg_inf<A>();
  A acc[TF][TV];
  zero(acc);
  if (tid < FT) sm.p[tid] = A(0);
  for (int64_t t0 = span.begin; t0 < span.end; t0 += R) {
    const int64_t n = imin(R, span.end - t0);
    for (int64_t h = hk * p.g; h < (hk + 1) * p.g; ++h) {
      const int64_t row0 = (b * p.H + h) * p.L + t0;
      __syncthreads();  // the previous head is done with the rows and tiles
      if (tid < R) {
        const A ref = tid >= n ? A(0) : p.causal ? rescale(Rseg, shift[t0 + tid]) : A(1);
        sm.qs[tid] = tid < n ? static_cast<const A*>(p.qshift)[row0 + tid] : A(0);
        sm.gi[tid] = tid < n ? static_cast<const A*>(p.inv_den)[row0 + tid] * ref : A(0);
        sm.gb[tid] = tid < n ? static_cast<const A*>(p.beta)[row0 + tid] * ref : A(0);
      }
      A au[TR][TF], unused[TR][TF];
      project<T>(sm.proj, p, set, rows_of<T>(p.q, b, h, t0), p.q.s[2], p.q.s[3], static_cast<const T*>(nullptr), 0, 0,
                 n, j0, au, unused);
      for_each(au, [&](int t, int j, A& v) {
        const A ut = v;
        sm.u[t][j] = j0 + j >= p.m ? A(0) : p.softmax ? exp_acc(ut - sm.qs[t]) : relu_feature(ut);
      });
      load_tile<R, VT, VT>(&sm.gt[0][0], rows_of<T>(p.grad_out, b, h, t0) + e0 * p.grad_out.s[3], p.grad_out.s[2],
                           p.grad_out.s[3], n, p.Ev - e0, [&](int t) { return sm.gi[t]; });
      __syncthreads();
      mma<R>(acc, &sm.u[0][0], 1, FT + 1, &sm.gt[0][0], VT, 1);
      if (tid < FT) {
        A sum = A(0);
        for (int t = 0; t < R; ++t) sum += sm.u[t][tid] * sm.gb[t];
        sm.p[tid] -= sum;
      }
    }
  }
  A* slot = static_cast<A*>(p.qslots) + (bhk * p.segs + seg) * p.m * p.Wd;
  for_each(acc, [&](int j, int e, A& v) {
    if (j0 + j < p.m && e0 + e < p.Ev) slot[(j0 + j) * p.Wd + e0 + e] = v;
  });
  if (tid < FT && j0 + tid < p.m) slot[(j0 + tid) * p.Wd + p.Ev + vt] = sm.p[tid];
}

template <class A>
struct BackTiles {
  static constexpr int R = Tiles<A>::R, FT = Tiles<A>::FT, VT = Tiles<A>::VT;
  ProjTiles<A> proj;
  A u[R][FT + 1];    // u, then phi_q
  A w[R][FT + 1];    // w, then phi_k
  A dphi[R][FT + 1]; // dphi/du (queries) or dphi/dw (keys)
  A dx[R][FT + 1];   // the gradient with respect to u or w
  A st[FT][VT];      // a tile of S or P
  A zt[FT], acc[FT]; // its z or p; the new p
  A vv[R][VT], gt[R][VT];
  A a[R][R + 1];
  A ms[R], hn[R], ref[R], sc[R], qs[R], ginv[R], gbeta[R], rsum[R];
  bool visible[R];
};

// rows[r][e] += c (dx W_j0)[r][e] for the n rows of a chunk: the gradient sm.dx with respect to u = c W q'
// (or w = c W k') over the feature tile at j0, taken back to the input rows (dq or dk, E columns).
template <class A>
__device__ __forceinline__ void add_back_projection(BackTiles<A>& sm, const Params& p, int64_t set, int64_t j0,
                                                    int64_t n, A c, A* rows) {
  constexpr int FT = Tiles<A>::FT, ET = Tiles<A>::ET, TR = Tiles<A>::R / 16, TE = ET / 16;
  for (int64_t e0 = 0; e0 < p.E; e0 += ET) {
    __syncthreads();
    load_tile<FT, ET, ET + 1>(&sm.proj.w[0][0], static_cast<const A*>(p.W) + (set * p.m + j0) * p.E + e0, p.E, 1,
                              p.m - j0, p.E - e0, One<A>());
    __syncthreads();
    A acc[TR][TE];
    zero(acc);
    mma<FT>(acc, &sm.dx[0][0], FT + 1, 1, &sm.proj.w[0][0], ET + 1, 1);
    for_each(acc, [&](int r, int e, A& v) {
      if (r < n && e0 + e < p.E) rows[r * p.E + e0 + e] += c * v;
    });
  }
}

// With features_grad: the gradient with respect to features j0 .. j0 + FT of set `set` and their bias
// from sm.dx, the gradient with respect to the logits of the n rows from x (zero past n): dW += c dx^T x,
// db += the column sums of dx. Atomic adds: the blocks of a set's heads, chunks and segments share it.
template <class T, class A>
__device__ __forceinline__ void add_feature_grads(BackTiles<A>& sm, const Params& p, int64_t set, int64_t j0,
                                                  int64_t n, A c, const T* x, int64_t rs, int64_t cs) {
  constexpr int R = Tiles<A>::R, FT = Tiles<A>::FT, ET = Tiles<A>::ET, TF = FT / 16, TE = ET / 16;
  A* dW = static_cast<A*>(p.dW) + (set * p.m + j0) * p.E;
  for (int64_t e0 = 0; e0 < p.E; e0 += ET) {
    __syncthreads();
    load_tile<R, ET, ET + 1>(&sm.proj.x0[0][0], x + e0 * cs, rs, cs, n, p.E - e0, One<A>());
    __syncthreads();
    A acc[TF][TE];
    zero(acc);
    mma<R>(acc, &sm.dx[0][0], 1, FT + 1, &sm.proj.x0[0][0], ET + 1, 1);
    for_each(acc, [&](int j, int e, A& v) {
      if (j0 + j < p.m && e0 + e < p.E) atomicAdd(dW + j * p.E + e0 + e, c * v);
    });
  }
  if (p.dbias && threadIdx.x < FT && j0 + threadIdx.x < p.m) {
    A sum = A(0);
    for (int r = 0; r < n; ++r) sum += sm.dx[r][threadIdx.x];
    atomicAdd(static_cast<A*>(p.dbias) + set * p.m + j0 + threadIdx.x, sum);
  }
}

// The per-head rows of a chunk: the saved query shifts, 1 / den and beta (zero past n).
template <class A>
__device__ __forceinline__ void load_grad_rows(BackTiles<A>& sm, const Params& p, int64_t row0, int64_t n) {
  const int t = threadIdx.x;
  if (t < Tiles<A>::R) {
    sm.qs[t] = t < n ? static_cast<const A*>(p.qshift)[row0 + t] : A(0);
    sm.ginv[t] = t < n ? static_cast<const A*>(p.inv_den)[row0 + t] : A(0);
    sm.gbeta[t] = t < n ? static_cast<const A*>(p.beta)[row0 + t] : A(0);
  }
}

// dq. Bidirectional: block (batch x head, query chunk), dphi_q = gq S^T - beta z with the saved
// state. Causal: block (batch x kv head, segment) sweeping its chunks from the segment's key start
// state (its slot, advanced in place): per head, da = causal weights * (gq V^T - beta), dphi_q =
// da phi_k + ref_t (gq S^T - beta z). dq = c (dphi_q * dphi_q/du) W.
template <class T>
__global__ void __launch_bounds__(kThreads, kBigBlocks) backward_dq_kernel(Params p) {
  using A = acc_t<T>;
  constexpr int R = Tiles<A>::R, FT = Tiles<A>::FT, VT = Tiles<A>::VT;
  constexpr int TR = R / 16, TF = FT / 16, TV = VT / 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  BackTiles<A>& sm = *reinterpret_cast<BackTiles<A>*>(smem_raw);
  const int tid = threadIdx.x;
  const A c = A(p.c), ninf = neg_inf<A>();
  int64_t b, hk, h_begin, h_end, ld;
  Range span;
  A* state;
  if (p.causal) {
    const int64_t seg = blockIdx.x % p.segs, bhk = blockIdx.x / p.segs;
    b = bhk / p.Hk;
    hk = bhk % p.Hk;
    h_begin = hk * p.g;
    h_end = h_begin + p.g;
    span = segment<R>(p, seg, p.L);
    state = static_cast<A*>(p.slots) + (bhk * p.segs + seg) * p.m * p.Wd;
    ld = p.Wd;
  } else {
    const int64_t chunks = ceil_div(p.L, R), bh = blockIdx.x / chunks, t0 = blockIdx.x % chunks * R;
    b = bh / p.H;
    h_begin = bh % p.H;
    h_end = h_begin + 1;
    hk = h_begin / p.g;
    span = {t0, imin(p.L, t0 + R)};
    state = static_cast<A*>(p.state) + (b * p.Hk + hk) * p.m * (p.Ev + 1);
    ld = p.Ev + 1;
  }
  const int64_t zcol = p.Ev, set = feature_set(p, b, hk);
  const A* shift = static_cast<const A*>(p.kshift) + (b * p.Hk + hk) * p.S;
  const T* vbase = rows_of<T>(p.v, b, hk, 0);
  A* dq = static_cast<A*>(p.dq);
  A Mprev = p.causal && span.begin > 0 ? shift[span.begin - 1] : ninf;

  for (int64_t t0 = span.begin; t0 < span.end; t0 += R) {
    const int64_t n = imin(R, span.end - t0);
    const A Mend = p.causal ? shift[t0 + n - 1] : A(0), keep = p.causal ? rescale(Mprev, Mend) : A(1);
    const T* kc = rows_of<T>(p.k, b, hk, t0);
    const T* vc = vbase + t0 * p.v.s[2];
    __syncthreads();
    if (tid < R) {
      const A ms = p.causal && tid < n ? shift[t0 + tid] : Mend;
      sm.ms[tid] = ms;
      sm.visible[tid] = p.causal && tid < n && !(p.mask && p.mask[b * p.S + t0 + tid]);
      sm.ref[tid] = p.causal ? rescale(Mprev, ms) : A(1);
      sm.sc[tid] = tid < n ? rescale(ms, Mend) : A(0);
    }
    if (p.causal && p.softmax) half_norms<R>(sm.hn, kc, p.k.s[2], p.k.s[3], n, p.E, c);
    for (int64_t h = h_begin; h < h_end; ++h) {
      const bool update = p.causal && h == h_end - 1;
      const int64_t row0 = (b * p.H + h) * p.L + t0;
      const T* qc = rows_of<T>(p.q, b, h, t0);
      const T* gc = rows_of<T>(p.grad_out, b, h, t0);
      __syncthreads();  // the previous head is done with the rows
      load_grad_rows(sm, p, row0, n);
      __syncthreads();
      if (p.causal) {
        A ad[TR][TR];
        zero(ad);
        for (int64_t ev0 = 0; ev0 < p.Ev; ev0 += VT) {
          __syncthreads();
          load_tile<R, VT, VT>(&sm.gt[0][0], gc + ev0 * p.grad_out.s[3], p.grad_out.s[2], p.grad_out.s[3], n,
                               p.Ev - ev0, [&](int t) { return sm.ginv[t]; });
          load_tile<R, VT, VT>(&sm.vv[0][0], vc + ev0 * p.v.s[3], p.v.s[2], p.v.s[3], n, p.Ev - ev0, One<A>());
          __syncthreads();
          mma<VT>(ad, &sm.gt[0][0], VT, 1, &sm.vv[0][0], 1, VT);
        }
        for_each(ad, [&](int t, int s, A& v) {
          sm.a[t][s] = s <= t ? (v - sm.gbeta[t]) * causal_weight(sm.ms[s], sm.ms[t]) : A(0);
        });
      }
      for (int64_t j0 = 0; j0 < p.m; j0 += FT) {
        if (tid < FT) sm.zt[tid] = j0 + tid < p.m ? state[(j0 + tid) * ld + zcol] : A(0);
        A au[TR][TF], aw[TR][TF];
        project<T>(sm.proj, p, set, qc, p.q.s[2], p.q.s[3], p.causal ? kc : nullptr, p.k.s[2], p.k.s[3], n, j0, au, aw);
        for_each(au, [&](int r, int j, A& v) { sm.u[r][j] = v; });
        if (p.causal) for_each(aw, [&](int r, int j, A& v) { sm.w[r][j] = v - (p.softmax ? sm.hn[r] : A(0)); });
        __syncthreads();
        for (int idx = tid; idx < R * FT; idx += kThreads) {
          const int r = idx / FT, j = idx % FT;
          const bool valid = j0 + j < p.m;
          const A ut = sm.u[r][j];
          const A phi = !valid ? A(0) : p.softmax ? exp_acc(ut - sm.qs[r]) : relu_feature(ut);
          sm.u[r][j] = phi;
          sm.dphi[r][j] = !valid ? A(0) : p.softmax ? phi : ut > A(0) ? A(1) : A(0);
          if (p.causal) sm.w[r][j] = key_feature(sm.w[r][j], sm.ms[r], valid && sm.visible[r], p.softmax);
        }
        __syncthreads();
        A dphi[TR][TF];
        zero(dphi);
        if (p.causal) mma<R>(dphi, &sm.a[0][0], R + 1, 1, &sm.w[0][0], FT + 1, 1);
        if (update) {  // phi_k e^{m_s - Mend} for the state update
          __syncthreads();
          for (int idx = tid; idx < R * FT; idx += kThreads) sm.w[idx / FT][idx % FT] *= sm.sc[idx / FT];
          __syncthreads();
        }
        for (int64_t ev0 = 0; ev0 < p.Ev; ev0 += VT) {
          __syncthreads();
          load_tile<FT, VT, VT>(&sm.st[0][0], state + j0 * ld + ev0, ld, 1, p.m - j0, p.Ev - ev0, One<A>());
          load_tile<R, VT, VT>(&sm.gt[0][0], gc + ev0 * p.grad_out.s[3], p.grad_out.s[2], p.grad_out.s[3], n,
                               p.Ev - ev0, [&](int t) { return sm.ginv[t] * sm.ref[t]; });
          if (update)
            load_tile<R, VT, VT>(&sm.vv[0][0], vc + ev0 * p.v.s[3], p.v.s[2], p.v.s[3], n, p.Ev - ev0, One<A>());
          __syncthreads();
          mma<VT>(dphi, &sm.gt[0][0], VT, 1, &sm.st[0][0], 1, VT);
          if (update) {
            A ns[TF][TV];
            zero(ns);
            mma<R>(ns, &sm.w[0][0], 1, FT + 1, &sm.vv[0][0], VT, 1);
            for_each(ns, [&](int j, int e, A& v) {
              if (j0 + j < p.m && ev0 + e < p.Ev) state[(j0 + j) * ld + ev0 + e] = sm.st[j][e] * keep + v;
            });
          }
        }
        for_each(dphi, [&](int t, int j, A& v) {
          sm.dx[t][j] = (v - sm.gbeta[t] * sm.ref[t] * sm.zt[j]) * sm.dphi[t][j];
        });
        if (update && tid < FT && j0 + tid < p.m) {
          A sum = A(0);
          for (int s = 0; s < R; ++s) sum += sm.w[s][tid];
          state[(j0 + tid) * ld + zcol] = sm.zt[tid] * keep + sum;
        }
        add_back_projection(sm, p, set, j0, n, c, dq + row0 * p.E);
        if (p.dW) add_feature_grads(sm, p, set, j0, n, c, qc, p.q.s[2], p.q.s[3]);
        __syncthreads();
      }
    }
    Mprev = Mend;
  }
}

// dk, dv. Bidirectional: block (batch x kv head, key chunk) from [P, p] = [dS, dz]. Causal: block
// (batch x kv head, segment) sweeping its chunks backwards from [P, p] at the segment's end (its
// query slot, updated in place: the later queries' phi_q^T [gq, -beta] e^{Mc - m_t}). Per chunk:
//   dphi_k = ref_s (V P^T + p) + sum_h da_h^T phi_q,h;  dv = ref_s phi_k P + sum_h a_h^T gq_h
// with ref_s = e^{m_s - Mc}, a_h and da_h the causally weighted intra-chunk products; then
// dk = c (dw W - k' sum_j dw_j) (relu: c dw W) with dw = dphi_k * dphi_k/dw.
template <class T>
__global__ void __launch_bounds__(kThreads, kBigBlocks) backward_dkdv_kernel(Params p) {
  using A = acc_t<T>;
  constexpr int R = Tiles<A>::R, FT = Tiles<A>::FT, VT = Tiles<A>::VT;
  constexpr int TR = R / 16, TF = FT / 16, TV = VT / 16, TPR = kThreads / R;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  BackTiles<A>& sm = *reinterpret_cast<BackTiles<A>*>(smem_raw);
  const int tid = threadIdx.x, row = tid / TPR, sub = tid % TPR;
  const A c = A(p.c), ninf = neg_inf<A>();
  int64_t bhk, seg;
  Range span;
  if (p.causal) {
    seg = blockIdx.x % p.segs;
    bhk = blockIdx.x / p.segs;
    span = segment<R>(p, seg, p.L);
  } else {
    const int64_t chunks = ceil_div(p.S, R), s0 = blockIdx.x % chunks * R;
    seg = 0;
    bhk = blockIdx.x / chunks;
    span = {s0, imin(p.S, s0 + R)};
  }
  const int64_t b = bhk / p.Hk, hk = bhk % p.Hk, ld = p.Wd, zcol = p.Ev, set = feature_set(p, b, hk);
  // The query heads of the kv head: only the causal sweep has queries in the chunk.
  const int64_t h_begin = hk * p.g, h_end = p.causal ? h_begin + p.g : h_begin;
  A* P = static_cast<A*>(p.qslots) + (bhk * p.segs + seg) * p.m * p.Wd;
  A* da = p.causal ? static_cast<A*>(p.da) + (bhk * p.segs + seg) * p.g * R * R : nullptr;
  const A* shift = static_cast<const A*>(p.kshift) + bhk * p.S;
  const T* vbase = rows_of<T>(p.v, b, hk, 0);
  A* dk = static_cast<A*>(p.dk);
  A* dv = static_cast<A*>(p.dv);

  for (int64_t t0 = span.end > span.begin ? span.begin + (span.end - 1 - span.begin) / R * R : span.begin - 1;
       t0 >= span.begin; t0 -= R) {
    const int64_t n = imin(R, span.end - t0), row0k = bhk * p.S + t0;
    const A Mc = shift[t0 + n - 1], Mprev = p.causal && t0 > 0 ? shift[t0 - 1] : ninf;
    const A keep = p.causal ? rescale(Mprev, Mc) : A(1);
    const T* kc = rows_of<T>(p.k, b, hk, t0);
    const T* vc = vbase + t0 * p.v.s[2];
    __syncthreads();
    if (tid < R) {
      const A ms = tid < n ? shift[t0 + tid] : Mc;
      sm.ms[tid] = ms;
      sm.visible[tid] = tid < n && !(p.mask && p.mask[b * p.S + t0 + tid]);
      sm.ref[tid] = !p.causal ? A(1) : tid < n ? rescale(ms, Mc) : A(0);  // keys: e^{m_s - Mc}
      sm.sc[tid] = p.causal ? rescale(Mprev, ms) : A(0);                  // queries: e^{Mprev - m_t}
      sm.rsum[tid] = A(0);
    }
    if (p.softmax) half_norms<R>(sm.hn, kc, p.k.s[2], p.k.s[3], n, p.E, c);

    // Per head: a = causal weights * phi_q phi_k^T -> dv += a^T gq; da = causal weights * (gq V^T - beta).
    for (int64_t h = h_begin; h < h_end; ++h) {
      const int64_t hi = h - h_begin, row0 = (b * p.H + h) * p.L + t0;
      const T* qc = rows_of<T>(p.q, b, h, t0);
      const T* gc = rows_of<T>(p.grad_out, b, h, t0);
      __syncthreads();
      load_grad_rows(sm, p, row0, n);
      A aa[TR][TR];
      zero(aa);
      for (int64_t j0 = 0; j0 < p.m; j0 += FT) {
        A au[TR][TF], aw[TR][TF];
        project<T>(sm.proj, p, set, qc, p.q.s[2], p.q.s[3], kc, p.k.s[2], p.k.s[3], n, j0, au, aw);
        for_each(au, [&](int r, int j, A& v) {
          const A ut = v;
          sm.u[r][j] = j0 + j >= p.m ? A(0) : p.softmax ? exp_acc(ut - sm.qs[r]) : relu_feature(ut);
        });
        for_each(aw, [&](int r, int j, A& v) {
          const A wt = v - (p.softmax ? sm.hn[r] : A(0));
          sm.w[r][j] = key_feature(wt, sm.ms[r], j0 + j < p.m && sm.visible[r], p.softmax);
        });
        __syncthreads();
        mma<FT>(aa, &sm.u[0][0], FT + 1, 1, &sm.w[0][0], 1, FT + 1);
      }
      __syncthreads();
      for_each(aa, [&](int t, int s, A& v) { sm.a[t][s] = s <= t ? v * causal_weight(sm.ms[s], sm.ms[t]) : A(0); });
      A ad[TR][TR];
      zero(ad);
      for (int64_t ev0 = 0; ev0 < p.Ev; ev0 += VT) {
        __syncthreads();
        load_tile<R, VT, VT>(&sm.gt[0][0], gc + ev0 * p.grad_out.s[3], p.grad_out.s[2], p.grad_out.s[3], n,
                             p.Ev - ev0, [&](int t) { return sm.ginv[t]; });
        load_tile<R, VT, VT>(&sm.vv[0][0], vc + ev0 * p.v.s[3], p.v.s[2], p.v.s[3], n, p.Ev - ev0, One<A>());
        __syncthreads();
        A adv[TR][TV];
        zero(adv);
        mma<R>(adv, &sm.a[0][0], 1, R + 1, &sm.gt[0][0], VT, 1);
        for_each(adv, [&](int s, int e, A& v) {
          if (s < n && ev0 + e < p.Ev) dv[(row0k + s) * p.Ev + ev0 + e] += v;
        });
        mma<VT>(ad, &sm.gt[0][0], VT, 1, &sm.vv[0][0], 1, VT);
      }
      __syncthreads();  // gbeta, ms visible with Ev == 0
      for_each(ad, [&](int t, int s, A& v) {
        da[(hi * R + t) * R + s] = s <= t ? (v - sm.gbeta[t]) * causal_weight(sm.ms[s], sm.ms[t]) : A(0);
      });
    }

    for (int64_t j0 = 0; j0 < p.m; j0 += FT) {
      if (tid < FT) {
        sm.zt[tid] = j0 + tid < p.m ? P[(j0 + tid) * ld + zcol] : A(0);
        sm.acc[tid] = A(0);
      }
      A aw[TR][TF], unused[TR][TF];
      project<T>(sm.proj, p, set, kc, p.k.s[2], p.k.s[3], static_cast<const T*>(nullptr), 0, 0, n, j0, aw, unused);
      for_each(aw, [&](int s, int j, A& v) {
        const A wt = v - (p.softmax ? sm.hn[s] : A(0));
        const bool ok = j0 + j < p.m && sm.visible[s] && sm.ms[s] != ninf;
        const A phi = key_feature(wt, sm.ms[s], ok, p.softmax);
        sm.w[s][j] = phi;
        sm.dphi[s][j] = !ok ? A(0) : p.softmax ? phi : wt > A(0) ? A(1) : A(0);
      });
      A adk[TR][TF];
      zero(adk);
      for (int64_t ev0 = 0; ev0 < p.Ev; ev0 += VT) {
        __syncthreads();
        load_tile<FT, VT, VT>(&sm.st[0][0], P + j0 * ld + ev0, ld, 1, p.m - j0, p.Ev - ev0, One<A>());
        load_tile<R, VT, VT>(&sm.vv[0][0], vc + ev0 * p.v.s[3], p.v.s[2], p.v.s[3], n, p.Ev - ev0, One<A>());
        __syncthreads();
        mma<VT>(adk, &sm.vv[0][0], VT, 1, &sm.st[0][0], 1, VT);
        A adv[TR][TV];
        zero(adv);
        mma<FT>(adv, &sm.w[0][0], FT + 1, 1, &sm.st[0][0], VT, 1);
        for_each(adv, [&](int s, int e, A& v) {
          if (s < n && ev0 + e < p.Ev) dv[(row0k + s) * p.Ev + ev0 + e] += sm.ref[s] * v;
        });
      }
      __syncthreads();  // zt visible with Ev == 0
      for_each(adk, [&](int s, int j, A& v) { v = (v + sm.zt[j]) * sm.ref[s]; });
      for (int64_t h = h_begin; h < h_end; ++h) {
        const int64_t hi = h - h_begin, row0 = (b * p.H + h) * p.L + t0;
        const T* gc = rows_of<T>(p.grad_out, b, h, t0);
        __syncthreads();
        load_grad_rows(sm, p, row0, n);
        load_tile<R, R, R + 1>(&sm.a[0][0], da + hi * R * R, R, 1, R, R, One<A>());
        A au[TR][TF], unused2[TR][TF];
        project<T>(sm.proj, p, set, rows_of<T>(p.q, b, h, t0), p.q.s[2], p.q.s[3], static_cast<const T*>(nullptr), 0,
                   0, n, j0, au, unused2);
        for_each(au, [&](int t, int j, A& v) {
          const A ut = v;
          sm.u[t][j] = j0 + j >= p.m ? A(0) : p.softmax ? exp_acc(ut - sm.qs[t]) : relu_feature(ut);
        });
        __syncthreads();
        mma<R>(adk, &sm.a[0][0], 1, R + 1, &sm.u[0][0], FT + 1, 1);
        for (int64_t ev0 = 0; ev0 < p.Ev; ev0 += VT) {  // P <- P keep + phi_q^T (gq e^{Mprev - m_t})
          __syncthreads();
          load_tile<R, VT, VT>(&sm.gt[0][0], gc + ev0 * p.grad_out.s[3], p.grad_out.s[2], p.grad_out.s[3], n,
                               p.Ev - ev0, [&](int t) { return sm.ginv[t] * sm.sc[t]; });
          __syncthreads();
          A ap[TF][TV];
          zero(ap);
          mma<R>(ap, &sm.u[0][0], 1, FT + 1, &sm.gt[0][0], VT, 1);
          for_each(ap, [&](int j, int e, A& v) {
            if (j0 + j < p.m && ev0 + e < p.Ev) {
              A& y = P[(j0 + j) * ld + ev0 + e];
              y = (hi == 0 ? y * keep : y) + v;
            }
          });
        }
        if (tid < FT) {
          A sum = A(0);
          for (int t = 0; t < R; ++t) sum += sm.u[t][tid] * sm.gbeta[t] * sm.sc[t];
          sm.acc[tid] -= sum;
        }
      }
      if (p.causal && tid < FT && j0 + tid < p.m) P[(j0 + tid) * ld + zcol] = sm.zt[tid] * keep + sm.acc[tid];
      for_each(adk, [&](int s, int j, A& v) { sm.dx[s][j] = v * sm.dphi[s][j]; });
      __syncthreads();
      {
        A sum = A(0);
        for (int j = sub; j < FT; j += TPR) sum += sm.dx[row][j];
        sum = group_sum<TPR>(sum);
        if (sub == 0) sm.rsum[row] += sum;
      }
      add_back_projection(sm, p, set, j0, n, c, dk + row0k * p.E);
      if (p.dW) add_feature_grads(sm, p, set, j0, n, c, kc, p.k.s[2], p.k.s[3]);
      __syncthreads();
    }
    if (p.softmax) {  // dk -= c k' sum_j dw_j = c^2 rsum k
      for (int64_t idx = tid; idx < R * p.E; idx += kThreads) {
        const int64_t s = idx / p.E, e = idx % p.E;
        if (s < n) dk[(row0k + s) * p.E + e] -= c * c * sm.rsum[s] * A(widen(kc[s * p.k.s[2] + e * p.k.s[3]]));
      }
    }
  }
}

// ---- driver -------------------------------------------------------------------------------------


// Segments of a sequence of `chunks` chunks for a pass with `units` blocks per segment: about two
// blocks per SM, whole chunks, none empty.
void set_segments(Params& p, int64_t chunks, int64_t units, int sms) {
  const int64_t wanted = std::clamp<int64_t>(ceil_div(2 * int64_t(sms), std::max<int64_t>(units, 1)), 1, std::max<int64_t>(chunks, 1));
  p.seg_chunks = std::max<int64_t>(1, ceil_div(chunks, wanted));
  p.segs = std::max<int64_t>(1, ceil_div(chunks, p.seg_chunks));
}


// Checks the inputs as the CPU op does (csrc/favor_checks.h) and fills the sizes and inputs; `in`
// keeps the features and mask that the kernels read.
Params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& features,
                   const std::optional<at::Tensor>& feature_bias, const std::optional<at::Tensor>& mask, double scale,
                   bool causal, std::string_view kernel, FavorInputs& in) {
  in = check_favor_inputs(q, k, v, features, feature_bias, mask, scale, causal, kernel);
  check_cuda_kernel(kernel);
  const FavorSizes& n = in.n;
  Params p{};
  p.q = view_of(q);
  p.k = view_of(k);
  p.v = view_of(v);
  p.B = n.B;
  p.H = n.H;
  p.Hk = n.Hk;
  p.g = n.H / n.Hk;
  p.L = n.L;
  p.S = n.S;
  p.E = n.E;
  p.Ev = n.Ev;
  p.m = n.m;
  p.c = std::sqrt(scale);
  p.softmax = kernel == "softmax";
  p.causal = causal;
  p.W = in.features.data_ptr();
  p.bias = in.bias.defined() ? in.bias.data_ptr() : nullptr;
  p.Bf = in.Bf;
  p.Hf = in.Hf;
  p.mask = in.mask.defined() ? in.mask.data_ptr<bool>() : nullptr;
  return p;
}

template <class A>
void set_tiles(Params& p) {
  p.vtiles = std::max<int64_t>(1, ceil_div(p.Ev, Tiles<A>::VT));
  p.Wd = p.Ev + p.vtiles;
}

template <class T>
void forward_impl(Params p, const at::Tensor& q, at::Tensor& state, cudaStream_t stream) {
  using A = acc_t<T>;
  constexpr int R = Tiles<A>::R;
  const auto acc = q.options().dtype(std::is_same_v<A, double> ? at::kDouble : at::kFloat);
  const int sms = sm_count(q);
  set_tiles<A>(p);
  const int64_t bhk = p.B * p.Hk, ftiles = ceil_div(p.m, Tiles<A>::FT);
  at::Tensor rowmax, slots;
  if (p.S > 0) {
    if (p.softmax) {
      rowmax = at::empty({bhk * p.S}, acc);
      p.rowmax = rowmax.data_ptr();
      launch(row_max_kernel<T>, bhk * ceil_div(p.S, R), sizeof(RowMaxTiles<A>), stream, p);
    }
    launch(key_shift_kernel<A>, bhk, 0, stream, p);
    set_segments(p, ceil_div(p.S, R), p.causal ? bhk * p.vtiles : bhk * ftiles * p.vtiles, sms);
    slots = at::empty({bhk * p.segs * p.m * p.Wd}, acc);
    p.slots = slots.data_ptr();
    launch(key_state_kernel<T>, bhk * p.segs * ftiles * p.vtiles, sizeof(KeyStateTiles<A>), stream, p);
    launch(combine_kernel<A>, bhk * ceil_div(p.m * p.Wd, kThreads), 0, stream, p, static_cast<A*>(p.slots),
           static_cast<A*>(p.state), p.causal ? Combine::prefix : Combine::sum, R);
  } else {
    state.zero_();
  }
  if (p.L > 0) {
    const int64_t blocks = p.causal ? bhk * p.segs * p.vtiles : p.B * p.H * ceil_div(p.L, R) * p.vtiles;
    launch(forward_out_kernel<T>, blocks, sizeof(OutTiles<A>), stream, p);
  }
}

template <class T>
void backward_impl(Params p, const at::Tensor& q, cudaStream_t stream) {
  using A = acc_t<T>;
  constexpr int R = Tiles<A>::R;
  const auto acc = q.options().dtype(std::is_same_v<A, double> ? at::kDouble : at::kFloat);
  const int sms = sm_count(q);
  set_tiles<A>(p);
  const int64_t bhk = p.B * p.Hk, ftiles = ceil_div(p.m, Tiles<A>::FT), parts = bhk * ftiles * p.vtiles;
  if (p.L == 0 || p.S == 0) return;  // dq, dk, dv stay zero (no key, or no query to take a gradient from)
  at::Tensor inv_den = at::empty({p.B * p.H * p.L}, acc), beta = at::empty({p.B * p.H * p.L}, acc);
  p.inv_den = inv_den.data_ptr();
  p.beta = beta.data_ptr();
  launch(grad_rows_kernel<T>, ceil_div(p.B * p.H * p.L, kWarps), 0, stream, p);
  at::Tensor slots, qslots, da;
  set_segments(p, ceil_div(p.L, R), p.causal ? bhk : parts, sms);
  qslots = at::empty({bhk * p.segs * p.m * p.Wd}, acc);
  p.qslots = qslots.data_ptr();
  launch(query_part_kernel<T>, bhk * p.segs * ftiles * p.vtiles, sizeof(QueryPartTiles<A>), stream, p);
  launch(combine_kernel<A>, bhk * ceil_div(p.m * p.Wd, kThreads), 0, stream, p, static_cast<A*>(p.qslots),
         static_cast<A*>(nullptr), p.causal ? Combine::suffix : Combine::sum, R);
  if (p.causal) {
    slots = at::empty({bhk * p.segs * p.m * p.Wd}, acc);
    p.slots = slots.data_ptr();
    launch(key_state_kernel<T>, bhk * p.segs * ftiles * p.vtiles, sizeof(KeyStateTiles<A>), stream, p);
    launch(combine_kernel<A>, bhk * ceil_div(p.m * p.Wd, kThreads), 0, stream, p, static_cast<A*>(p.slots),
           static_cast<A*>(nullptr), Combine::prefix, R);
    da = at::empty({bhk * p.segs * p.g * R * R}, acc);
    p.da = da.data_ptr();
    launch(backward_dq_kernel<T>, bhk * p.segs, sizeof(BackTiles<A>), stream, p);
    launch(backward_dkdv_kernel<T>, bhk * p.segs, sizeof(BackTiles<A>), stream, p);
  } else {
    launch(backward_dq_kernel<T>, p.B * p.H * ceil_div(p.L, R), sizeof(BackTiles<A>), stream, p);
    launch(backward_dkdv_kernel<T>, bhk * ceil_div(p.S, R), sizeof(BackTiles<A>), stream, p);
  }
}


std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> favor_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& features,
    const std::optional<at::Tensor>& feature_bias, const std::optional<at::Tensor>& key_padding_mask, double scale,
    bool causal, c10::string_view kernel) {
  FavorInputs in;
  Params p = make_params(q, k, v, features, feature_bias, key_padding_mask, scale, causal,
                         std::string_view(kernel.data(), kernel.size()), in);
  c10::cuda::CUDAGuard guard(q.device());
  const auto acc = q.options().dtype(favor_acc_dtype(q));
  at::Tensor out = at::empty({p.B, p.H, p.L, p.Ev}, q.options());
  at::Tensor state = at::empty({p.B, p.Hk, p.m, p.Ev + 1}, acc);
  at::Tensor den = at::empty({p.B, p.H, p.L}, acc);
  at::Tensor query_shift = at::empty({p.B, p.H, p.L}, acc);
  at::Tensor key_shift = at::empty({p.B, p.Hk, p.S}, acc);
  if (p.B == 0) return {out, state, den, query_shift, key_shift};
  p.out = out.data_ptr();
  p.state = state.data_ptr();
  p.den = den.data_ptr();
  p.qshift = query_shift.data_ptr();
  p.kshift = key_shift.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(q.scalar_type(), [&](auto t) { forward_impl<decltype(t)>(p, q, state, stream); });
  return {out, state, den, query_shift, key_shift};
}

// With features_grad, also the gradients with respect to the features and the bias (empty tensors
// otherwise, and for the bias when there is none).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> favor_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& features, const std::optional<at::Tensor>& feature_bias,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out, const at::Tensor& state,
    const at::Tensor& den, const at::Tensor& query_shift, const at::Tensor& key_shift, double scale, bool causal,
    c10::string_view kernel, bool features_grad) {
  FavorInputs in;
  Params p = make_params(q, k, v, features, feature_bias, key_padding_mask, scale, causal,
                         std::string_view(kernel.data(), kernel.size()), in);
  const std::vector<at::Tensor> saved = check_favor_saved(in.n, q, grad_out, out, state, den, query_shift, key_shift);
  c10::cuda::CUDAGuard guard(q.device());
  const auto acc_options = q.options().dtype(favor_acc_dtype(q));
  at::Tensor dq = at::zeros({p.B, p.H, p.L, p.E}, acc_options);
  at::Tensor dk = at::zeros({p.B, p.Hk, p.S, p.E}, acc_options);
  at::Tensor dv = at::zeros({p.B, p.Hk, p.S, p.Ev}, acc_options);
  FeatureGrads grads(in, features_grad);
  if (grads.features.defined()) p.dW = grads.features.data_ptr();
  if (grads.bias.defined()) p.dbias = grads.bias.data_ptr();
  if (p.B > 0) {
    p.grad_out = view_of(grad_out);
    p.out_saved = view_of(out);
    p.state = saved[0].data_ptr();
    p.den = saved[1].data_ptr();
    p.qshift = saved[2].data_ptr();
    p.kshift = saved[3].data_ptr();
    p.dq = dq.data_ptr();
    p.dk = dk.data_ptr();
    p.dv = dv.data_ptr();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch(q.scalar_type(), [&](auto t) { backward_impl<decltype(t)>(p, q, stream); });
  }
  const auto dtype = q.scalar_type();
  auto [dfeatures, dbias] = grads.result(features, feature_bias);
  return {dq.to(dtype), dk.to(dtype), dv.to(dtype), dfeatures, dbias};
}

}  // namespace
}  // namespace performer::cuda

TORCH_LIBRARY_IMPL(performer, CUDA, m) {
  m.impl("favor_forward", &performer::cuda::favor_forward_cuda);
  m.impl("favor_backward", &performer::cuda::favor_backward_cuda);
}

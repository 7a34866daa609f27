// The FAVOR+ decoding step (favor_step / favor_step_) for the CUDA dispatch key: the CPU op's
// results with its meaning (csrc/cpu/favor_step_kernel.h explains the recurrent state [S, z] relative
// to the running key maximum M, the rescaling f = exp(M - M'), and the query shift written without
// logarithms, phi_q = e / max(1, best)).
//
// One block per (batch, key head) item; the block walks the T new positions in order. Per position:
//   1. the key row and the item's g query rows, scaled by c = sqrt(scale), into shared memory, with
//      |k'|^2 / 2 and the value row;
//   2. the projections P = W [k', q'_1 .. q'_g]^T + b (a thread per feature; W and b the item's feature
//      set) into the block's slice of a global workspace ((1 + g + 1) x m: the rows' projections, then
//      max(f z, phi_k)), and their maxima over the features (block reductions);
//   3. the key's feature phi_k and the normalizer z' = f z + phi_k (a thread per feature), the
//      query features e_hj, each head's denominator sum_j e_hj z'_j and best = max_j e_hj max(f z_j,
//      phi_k,j);
//   4. the state S' = f S + phi_k v^T and each head's numerator sum_j e_hj S'_j: lanes along the value
//      columns (coalesced), warps over the features, a reduction over the warps; the output row.
// A thread always reads the state entries it writes (the same feature, the same column), so the
// state may be updated in place.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string_view>
#include <tuple>

#include "../favor_checks.h"
#include "favor_common.cuh"

namespace performer::cuda {
namespace {

constexpr int kStepWarps = kThreads / 32;
constexpr int kHeadGroup = 4;  // query heads whose numerators a thread accumulates at once

struct StepParams {
  View q, k, v;
  const void* W;          // features (Bf, Hf, m, E), contiguous, acc; Bf 1 or B, Hf 1 or Hk
  const void* bias;       // (Bf, Hf, m) contiguous, acc; or null
  int64_t Bf, Hf;
  const bool* mask;       // (B, T) contiguous, true = ignore; or null
  int64_t B, H, Hk, g, T, E, Ev, m;
  double c;               // sqrt(scale)
  bool softmax;
  const void* kv_in;      // (B, Hk, m, Ev) acc, the state before the step; null: empty
  const void* z_in;       // (B, Hk, m)
  const void* kmax_in;    // (B, Hk)
  void* kv;               // the state after it (may be kv_in)
  void* z;
  void* kmax;
  void* out;              // (B, H, T, Ev) contiguous, input dtype
  void* P;                // (B Hk, g + 2, m) acc workspace: projections, then features; max(f z, phi_k)
};

// max(a, b) as the CPU's fmax2: a NaN in b wins, a NaN in a loses.
template <class A>
__device__ __forceinline__ A max2(A a, A b) { return a > b ? a : b; }

// The block's sum or maximum of x (every thread gets it); `red` holds kStepWarps values.
template <bool MAX, class A>
__device__ __forceinline__ A block_reduce(A x, A* red) {
  x = MAX ? group_max<32>(x) : group_sum<32>(x);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // red may still be read by the previous reduction
  if (lane == 0) red[warp] = x;
  __syncthreads();
  A r = red[0];
  for (int w = 1; w < kStepWarps; ++w) r = MAX ? fmax(r, red[w]) : r + red[w];
  return r;
}

// Up to 128 registers a thread (two blocks of kThreads per SM): under __launch_bounds__(kThreads)
// alone, ptxas for sm_90a kept to 64 and spilled.
template <class T>
__global__ void __maxnreg__(128) favor_step_kernel(StepParams p) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t rows = 1 + p.g, E = p.E, Ev = p.Ev, m = p.m;
  A* xs = reinterpret_cast<A*>(smem_raw);  // (rows, E) scaled key and query rows
  A* vs = xs + rows * E;                     // (Ev) value row
  A* rmax = vs + Ev;                         // (rows) maxima of the projections over the features
  A* mul = rmax + rows;                      // (g) each head's output factor sh / den
  A* red = mul + p.g;                        // (kStepWarps) block reductions
  A* part = red + kStepWarps;                // (kStepWarps, kHeadGroup, 32) numerators per warp
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t item = blockIdx.x, b = item / p.Hk, hk = item % p.Hk;
  const A c = A(p.c);
  const int64_t set = (p.Bf > 1 ? b : 0) * p.Hf + (p.Hf > 1 ? hk : 0);  // the item's feature set
  const A* W = static_cast<const A*>(p.W) + set * m * E;
  const A* bias = p.bias ? static_cast<const A*>(p.bias) + set * m : nullptr;
  A* P = static_cast<A*>(p.P) + item * (rows + 1) * m;  // the block's slice: rows + 1 rows of m
  A* kv = static_cast<A*>(p.kv) + item * m * Ev;
  A* z = static_cast<A*>(p.z) + item * m;
  A M = p.kmax_in ? static_cast<const A*>(p.kmax_in)[item] : neg_inf<A>();
  for (int64_t t = 0; t < p.T; ++t) {
    const A* kv_prev = t > 0 ? kv : (p.kv_in ? static_cast<const A*>(p.kv_in) + item * m * Ev : nullptr);
    const A* z_prev = t > 0 ? z : (p.z_in ? static_cast<const A*>(p.z_in) + item * m : nullptr);
    // 1. rows and the value.
    for (int64_t idx = tid; idx < rows * E; idx += kThreads) {
      const int64_t r = idx / E, e = idx % E;
      const View& src = r == 0 ? p.k : p.q;
      const int64_t head = r == 0 ? hk : hk * p.g + r - 1;
      const T* x = static_cast<const T*>(src.data);
      xs[idx] = c * A(widen(x[b * src.s[0] + head * src.s[1] + t * src.s[2] + e * src.s[3]]));
    }
    for (int64_t x = tid; x < Ev; x += kThreads) {
      const T* v = static_cast<const T*>(p.v.data);
      vs[x] = A(widen(v[b * p.v.s[0] + hk * p.v.s[1] + t * p.v.s[2] + x * p.v.s[3]]));
    }
    __syncthreads();
    A sq = A(0);
    for (int64_t e = tid; e < E; e += kThreads) sq += xs[e] * xs[e];
    const A half = p.softmax ? A(0.5) * block_reduce<false>(sq, red) : A(0);
    // 2. projections and their maxima over the features (NaN ignored, as on the CPU).
    for (int64_t r = 0; r < rows; ++r) {
      A top = neg_inf<A>();
      for (int64_t j = tid; j < m; j += kThreads) {
        const A* w = W + j * E;
        const A* x = xs + r * E;
        A acc = bias ? bias[j] : A(0);
        for (int64_t e = 0; e < E; ++e) acc = fma(w[e], x[e], acc);
        P[r * m + j] = acc;
        top = max2(acc, top);
      }
      top = block_reduce<true>(top, red);
      if (tid == 0) rmax[r] = top;
    }
    __syncthreads();
    // The running maximum and the key's reference (every thread, the same values).
    const bool visible = !(p.mask && p.mask[b * p.T + t]);
    A r = neg_inf<A>();
    if (visible) {
      r = p.softmax ? rmax[0] - half : A(0);
      if (half != half) r = half;  // a NaN key propagates, never pads
    }
    const A Mn = max2(M, r), f = rescale(M, Mn);
    const bool adds = visible && Mn != neg_inf<A>();
    const A key_ref = half + Mn;
    // 3. phi_k and z' = f z + phi_k, a thread per feature; the workspace's last row keeps max(f z,
    // phi_k). Then per head the query features e_hj (over the projections), the denominator and best.
    // A thread handles the same features throughout, so it reads only the z and zz it wrote.
    A* zz = P + rows * m;
    for (int64_t j = tid; j < m; j += kThreads) {
      const A w = P[j];
      const A pk = !adds ? A(0) : p.softmax ? exp_acc(w - key_ref) : relu_feature(w);
      const A old = z_prev ? f * z_prev[j] : A(0);
      z[j] = old + pk;
      zz[j] = max2(old, pk);
      P[j] = pk;
    }
    for (int64_t h = 0; h < p.g; ++h) {
      A* u = P + (1 + h) * m;
      const A shift = rmax[1 + h] - A(kQueryShiftSpan);
      A d = A(0), top = A(0);
      for (int64_t j = tid; j < m; j += kThreads) {
        const A e = p.softmax ? exp_acc(u[j] - shift) : relu_feature(u[j]);
        u[j] = e;
        d += e * z[j];
        top = max2(top, e * zz[j]);
      }
      d = block_reduce<false>(d, red);
      top = block_reduce<true>(top, red);
      if (tid == 0) {
        const A sh = p.softmax && top > A(1) ? A(1) / top : A(1);  // phi_q = e * sh
        const A dd = d * sh;
        mul[h] = dd >= min_den<A>() ? sh / dd : A(0);
      }
    }
    __syncthreads();
    // 4. S' = f S + phi_k v^T and the numerators: lane = value column, warps over the features.
    T* out = static_cast<T*>(p.out);
    for (int64_t c0 = 0; c0 < Ev; c0 += 32) {
      const int64_t x = c0 + lane;
      const bool has = x < Ev;
      for (int64_t h0 = 0; h0 < p.g; h0 += kHeadGroup) {
        const int nh = int(imin(kHeadGroup, p.g - h0));
        A acc[kHeadGroup];
#pragma unroll
        for (int i = 0; i < kHeadGroup; ++i) acc[i] = A(0);
        if (has) {
          for (int64_t j = warp; j < m; j += kStepWarps) {
            A d;
            if (h0 == 0) {  // the first head group updates the state; the others read it back
              d = (kv_prev ? f * kv_prev[j * Ev + x] : A(0)) + P[j] * vs[x];
              kv[j * Ev + x] = d;
            } else {
              d = kv[j * Ev + x];
            }
#pragma unroll
            for (int i = 0; i < kHeadGroup; ++i)
              if (i < nh) acc[i] = fma(P[(1 + h0 + i) * m + j], d, acc[i]);
          }
        }
#pragma unroll
        for (int i = 0; i < kHeadGroup; ++i) part[(warp * kHeadGroup + i) * 32 + lane] = acc[i];
        __syncthreads();
        for (int idx = tid; idx < nh * 32; idx += kThreads) {
          const int i = idx / 32, l = idx % 32;
          const int64_t col = c0 + l, h = h0 + i;
          if (col >= Ev) continue;
          A sum = A(0);
          for (int w = 0; w < kStepWarps; ++w) sum += part[(w * kHeadGroup + i) * 32 + l];
          out[((b * p.H + hk * p.g + h) * p.T + t) * Ev + col] = narrow<T>(sum * mul[h]);
        }
        __syncthreads();
      }
    }
    M = Mn;
  }
  if (tid == 0) static_cast<A*>(p.kmax)[item] = M;
}

template <class T>
void step_impl(const StepParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t shared = (1 + p.g) * p.E + p.Ev + (1 + p.g) + p.g + kStepWarps + kStepWarps * kHeadGroup * 32;
  launch(favor_step_kernel<T>, p.B * p.Hk, size_t(shared) * sizeof(A), stream, p);
}

// Runs the step from `prev` (undefined: an empty state) into kv, normalizer, key_max; returns out.
at::Tensor run_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const FavorInputs& in,
                    const FavorStepState& prev, at::Tensor& kv, at::Tensor& normalizer, at::Tensor& key_max,
                    double scale, std::string_view kernel) {
  check_cuda_kernel(kernel);
  const FavorSizes& n = in.n;
  at::Tensor out = at::empty({n.B, n.H, n.L, n.Ev}, q.options());
  if (n.L == 0) {
    carry_favor_state(prev, kv, normalizer, key_max);
    return out;
  }
  if (n.B == 0 || n.Hk == 0) return out;
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor workspace = at::empty({n.B * n.Hk * (n.H / n.Hk + 2) * n.m}, kv.options());
  StepParams p{};
  p.q = view_of(q);
  p.k = view_of(k);
  p.v = view_of(v);
  p.W = in.features.data_ptr();
  p.bias = in.bias.defined() ? in.bias.data_ptr() : nullptr;
  p.Bf = in.Bf;
  p.Hf = in.Hf;
  p.mask = in.mask.defined() ? in.mask.data_ptr<bool>() : nullptr;
  p.B = n.B; p.H = n.H; p.Hk = n.Hk; p.g = n.H / n.Hk; p.T = n.L; p.E = n.E; p.Ev = n.Ev; p.m = n.m;
  p.c = std::sqrt(scale);
  p.softmax = kernel == "softmax";
  if (prev.kv.defined()) {
    p.kv_in = prev.kv.data_ptr();
    p.z_in = prev.normalizer.data_ptr();
    p.kmax_in = prev.key_max.data_ptr();
  }
  p.kv = kv.data_ptr();
  p.z = normalizer.data_ptr();
  p.kmax = key_max.data_ptr();
  p.out = out.data_ptr();
  p.P = workspace.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(q.scalar_type(), [&](auto t) { step_impl<decltype(t)>(p, stream); });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> favor_step_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& features,
    const std::optional<at::Tensor>& feature_bias, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& kv,
    const std::optional<at::Tensor>& normalizer, const std::optional<at::Tensor>& key_max, double scale,
    c10::string_view kernel) {
  const std::string_view kn(kernel.data(), kernel.size());
  const FavorInputs in = check_favor_inputs(q, k, v, features, feature_bias, key_padding_mask, scale, true, kn);
  const FavorStepState prev = check_favor_step_state(in.n, q, kv, normalizer, key_max, false);
  FavorStepState next = empty_favor_state(in.n, q);
  at::Tensor out = run_step(q, k, v, in, prev, next.kv, next.normalizer, next.key_max, scale, kn);
  return {out, next.kv, next.normalizer, next.key_max};
}

at::Tensor favor_step_inplace_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& features, const std::optional<at::Tensor>& feature_bias,
                                   const std::optional<at::Tensor>& key_padding_mask, at::Tensor& kv, at::Tensor& normalizer, at::Tensor& key_max, double scale,
                                   c10::string_view kernel) {
  const std::string_view kn(kernel.data(), kernel.size());
  const FavorInputs in = check_favor_inputs(q, k, v, features, feature_bias, key_padding_mask, scale, true, kn);
  const FavorStepState prev = check_favor_step_state(in.n, q, kv, normalizer, key_max, true);
  return run_step(q, k, v, in, prev, kv, normalizer, key_max, scale, kn);
}

}  // namespace
}  // namespace performer::cuda

TORCH_LIBRARY_IMPL(performer, CUDA, m) {
  m.impl("favor_step", &performer::cuda::favor_step_cuda);
  m.impl("favor_step_", &performer::cuda::favor_step_inplace_cuda);
}

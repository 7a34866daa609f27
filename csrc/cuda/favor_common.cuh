// What the CUDA FAVOR+ kernels share (favor.cu: the attention ops; favor_step.cu: the decoding
// step): element types and their accumulation type, strided views, the numerics that must match
// the CPU kernels (csrc/cpu/favor_kernel.h), and the launch helper. Included inside no namespace;
// everything is internal to each translation unit.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "../checks.h"

namespace performer::cuda {
namespace {

constexpr int kThreads = 256;
constexpr double kReluEps = 1e-3;        // keep in sync with csrc/cpu/favor_kernel.h
constexpr double kQueryShiftSpan = 30.0;  // likewise

template <class T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <class T>
using acc_t = typename AccOf<T>::type;

// Everything a kernel reads. Views are (B, heads, N, D) tensors by element strides.
struct View {
  const void* data;
  int64_t s[4];
};

// ---- numerics -----------------------------------------------------------------------------------

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T narrow(acc_t<T> x);
template <>
__device__ __forceinline__ float narrow<float>(float x) { return x; }
template <>
__device__ __forceinline__ double narrow<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half narrow<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <class A>
__device__ __forceinline__ A neg_inf() { return -A(INFINITY); }

template <class A>
__device__ __forceinline__ A min_den() {  // kMinDen
  if constexpr (sizeof(A) == 4) return A(1e-15);
  else return A(1e-200);
}

// exp for float as on the CPU (exp_fast: Cody-Waite reduction and a degree-6 polynomial, ~2 ulp,
// exactly 0 below -87.3): --use_fast_math's expf loses accuracy with |x|.
__device__ __forceinline__ float exp_acc(float x) {
  const float xc = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float n = rintf(xc * 1.44269504088896341f);
  const float r = fmaf(n, 2.12194440e-4f, fmaf(-n, 0.693359375f, xc));
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  p = fmaf(p * r, r, r + 1.0f);
  const int scale = static_cast<int>(static_cast<unsigned>(static_cast<int>(n)) << 23);
  const float out = __int_as_float(__float_as_int(p) + scale);
  return x < -87.3f ? 0.0f : out;
}
__device__ __forceinline__ double exp_acc(double x) { return ::exp(x); }
__device__ __forceinline__ float log_acc(float x) { return ::logf(x); }
__device__ __forceinline__ double log_acc(double x) { return ::log(x); }

// exp(a - b) for running maxima a <= b, where -inf (nothing visible yet) contributes nothing.
template <class A>
__device__ __forceinline__ A rescale(A a, A b) { return a == neg_inf<A>() ? A(0) : exp_acc(a - b); }

// The intra-chunk weight e^{m_s - m_t} of key s for query t >= s (exactly 1 for equal maxima).
template <class A>
__device__ __forceinline__ A causal_weight(A ms, A mt) { return ms == mt ? A(1) : rescale(ms, mt); }

template <class A>
__device__ __forceinline__ A relu_feature(A x) { return (x < A(0) ? A(0) : x) + A(kReluEps); }  // keeps NaN

// phi_k(s) = exp(w_s - ref_s) (relu: relu(w_s) + eps); zero for padding, a reference of -inf (no
// visible key) and features past m.
template <class A>
__device__ __forceinline__ A key_feature(A w, A ref, bool visible, bool softmax) {
  if (!visible || ref == neg_inf<A>()) return A(0);
  return softmax ? exp_acc(w - ref) : relu_feature(w);
}

// Reductions over the TPR consecutive lanes that share a row.
template <int TPR, class A>
__device__ __forceinline__ A group_sum(A x) {
#pragma unroll
  for (int o = TPR / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
template <int TPR, class A>
__device__ __forceinline__ A group_max(A x) {  // ignores NaN, like the CPU's row maxima
#pragma unroll
  for (int o = TPR / 2; o > 0; o /= 2) x = fmax(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- launches ----------------------------------------------------------------------------------

template <class K, class... Args>
void launch(K kernel, int64_t blocks, size_t smem, cudaStream_t stream, Args... args) {
  if (blocks == 0) return;
  PERFORMER_CHECK_VALUE(blocks <= INT_MAX, "q", "be small enough for one CUDA grid", "; got ", blocks, " blocks");
  if (smem > 48 * 1024) {
    int device = 0, max_smem = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    TORCH_CHECK_NOT_IMPLEMENTED(smem <= size_t(max_smem), "favor on CUDA needs ", smem,
                                " bytes of shared memory per block; this GPU offers ", max_smem);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  }
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int sm_count(const at::Tensor& t) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, t.get_device()));
  return count;
}

View view_of(const at::Tensor& t) {
  return View{t.data_ptr(), {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}};
}

// Calls f(T{}) with the CUDA element type of `dtype`.
template <class F>
void dispatch(at::ScalarType dtype, F f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kHalf: f(__half{}); break;
    default: f(__nv_bfloat16{}); break;
  }
}

}  // namespace
}  // namespace performer::cuda

// The interface between the torch-facing drivers and the per-ISA kernels.
// Plain structs only: the per-ISA translation units include no torch or STL headers (and their C
// headers come before the target pragma), so no inline function compiled for AVX-512 can be
// picked by the linker for a baseline caller.
#pragma once
#include <cstdint>

namespace performer::cpu {

enum class DType : int { f32 = 0, f64 = 1, bf16 = 2, f16 = 3 };
// softmax_normalized: the softmax kernel with each key's features divided by their mean over the
// features (the key's -|k'|^2/2 becomes -log sum_j exp(W k' + b)_j), see favor_kernel.h.
enum class Kernel : int { softmax = 0, relu = 1, softmax_normalized = 2 };

// A (B, H, N, D) tensor view with element strides, in the input dtype.
struct View {
  void* data;
  int64_t stride[4];
};

// Accumulation type is double for f64 inputs, float otherwise ("acc" below).
struct FavorParams {
  DType dtype;
  Kernel kernel;
  bool causal;
  double scale;
  int64_t B, H, Hk, L, S, E, Ev, m;
  View q, k, v;               // (B,H,L,E), (B,Hk,S,E), (B,Hk,S,Ev)
  // Features (Bf, Hf, m, E) contiguous in acc, Bf in {1, B} and Hf in {1, Hk}: batch b and key head
  // hk use features + feature_offset(b, hk). feature_bias (Bf, Hf, m) likewise, or null: added to
  // every projection (u = W q' + bias, w = W k' + bias - |k'|^2/2).
  const void* features;
  const void* feature_bias;
  int64_t Bf, Hf;
  const bool* mask;           // (B, S) contiguous, true = ignore that key; or null
  int num_threads;
  // Backward only, or null: the gradients with respect to features and feature_bias, their shapes,
  // contiguous in acc, accumulated into (zero them first).
  void* dfeatures;
  void* dfeature_bias;
  // Forward results (contiguous): out (B,H,L,Ev) in dtype; state (B,Hk,m,Ev+1), den and
  // query_shift (B,H,L), key_shift (B,Hk,S) in acc. Backward reads them (out/grad_out as views)
  // and writes dq, dk, dv (contiguous, dtype).
  View out, grad_out;
  void* state;
  void* den;
  void* query_shift;
  void* key_shift;
  void* dq;
  void* dk;
  void* dv;
};

// c (batch, M, N) contiguous = a (batch, M, K) @ b (batch, K, N), all in `dtype`, with element
// strides (a batch stride of 0 broadcasts). M, N, K and batch are >= 1.
struct MatmulParams {
  DType dtype;
  int64_t batch, M, N, K;
  const void* a;
  int64_t a_stride[3];
  const void* b;
  int64_t b_stride[3];
  void* c;
  int num_threads;
};

// One decoding step (favor_step): T new positions, q (B,H,T,E), k (B,Hk,T,E), v (B,Hk,T,Ev) as views,
// continuing the recurrent state kv (B,Hk,m,Ev), normalizer (B,Hk,m), key_max (B,Hk), contiguous, in
// acc (the *_in pointers are null for an empty state; they may equal the outputs: in place). Writes
// out (B,H,T,Ev) contiguous in dtype and the state after the T positions. T >= 1.
struct StepParams {
  DType dtype;
  Kernel kernel;
  double scale;
  int64_t B, H, Hk, T, E, Ev, m;
  View q, k, v;
  const void* features;       // (Bf, Hf, m, E) contiguous, acc; Bf 1 or B, Hf 1 or Hk
  const void* bias;           // (bias_Bf, bias_Hf, m) contiguous, acc; or null
  int64_t Bf, Hf;
  int64_t bias_Bf, bias_Hf;   // each 1 or B / Hk (the features' sets, or per key head with shared features)
  const bool* mask;           // (B, T) contiguous, true = ignore that key; or null
  // A frozen feature map's per-dimension transform of the rows, applied as they are loaded:
  // q' = c q * q_mul, k' = c k * k_mul + k_add (c = sqrt(scale)); once |k'|^2 / 2 is taken the key row
  // is multiplied by k_post (FAVOR++'s B, so that features W shared by the heads give B W k').
  // q_mul (H, E), k_mul and k_add (Hk, E), k_post (Hk), contiguous, acc; each may be null.
  const void* q_mul;
  const void* k_mul;
  const void* k_add;
  const void* k_post;
  const void* kv_in;
  const void* normalizer_in;
  const void* key_max_in;
  void* kv;
  void* normalizer;
  void* key_max;
  void* out;
  int num_threads;
};

// y (M, N) contiguous = x (M, K) W^T + bias, W block-sparse (csrc/cpu/sparse_kernel.h explains the
// format), float32 or float64 throughout; x rows have stride x_row_stride (unit column stride).
// bias (N) or null. M, N, K >= 1; br is a multiple of every ISA's vector of floats.
struct SparseLinearParams {
  DType dtype;
  int64_t M, N, K, br, bc;
  const void* x;
  int64_t x_row_stride;
  const void* values;        // (nnzb, bc, br)
  const int32_t* row_ptr;    // (ceil(N / br) + 1)
  const int32_t* block_cols; // (nnzb)
  const void* bias;
  void* y;
  int num_threads;
};

// y (M, N) float32 contiguous = x (M, K) (s_w Wq)^T + bias, Wq int8 block-sparse in groups of 4
// inputs (csrc/cpu/int8_kernel.h explains the format and the two modes): col_sums (N) = the sums of
// Wq's rows selects the dynamic mode (x quantized per row to uint8), null the weight-only mode.
// M, N, K >= 1; br is a multiple of 16, bc of 4; K * 255 * 127 < 2^31.
struct Int8LinearParams {
  int64_t M, N, K, br, bc;
  const float* x;
  int64_t x_row_stride;
  const int8_t* values;      // (nnzb, bc / 4, br, 4)
  const float* scales;       // (N)
  const int32_t* col_sums;   // (N) or null
  const int32_t* row_ptr;    // (ceil(N / br) + 1)
  const int32_t* block_cols; // (nnzb)
  const float* bias;         // (N) or null
  float* y;
  int num_threads;
};

struct KernelTable {
  const char* name;
  void (*favor_forward)(const FavorParams&);
  void (*favor_backward)(const FavorParams&);
  void (*favor_step)(const StepParams&);
  void (*matmul)(const MatmulParams&);
  void (*sparse_linear)(const SparseLinearParams&);
  void (*int8_linear)(const Int8LinearParams&);
  double (*fma_peak_gflops)(int threads, double seconds);  // measured, see fma_peak.h
};

namespace baseline { extern const KernelTable table; }
namespace avx2 { extern const KernelTable table; }
namespace avx512 { extern const KernelTable table; }
// AVX-512 VNNI (vpdpbusd) adds only an int8 product; its table is avx512's with that one replaced.
namespace avx512_vnni { void int8_linear(const Int8LinearParams&); }

// The best table this CPU runs, capped by PERFORMER_CPU_ISA=baseline|avx2|avx512|avx512_vnni when set
// (read once, like ATEN_CPU_CAPABILITY; used to test every copy on one machine).
const KernelTable& kernels();

}  // namespace performer::cpu

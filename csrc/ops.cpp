// Every op schema of the package, declared once. Kernels register per device under csrc/<device>/;
// fake kernels and autograd are registered from Python (performer/ops/*/cpp.py).
#include <torch/extension.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "cpu/favor_step.h"
#include "cpu/kernels.h"
#include "cpu/sparse_linear.h"

TORCH_LIBRARY(performer, m) {
  // FAVOR+ attention on canonical (B, H, L, E) / (B, Hk, S, E) / (B, Hk, S, Ev) inputs, H % Hk == 0.
  // Returns out (B, H, L, Ev) in the input dtype and, in the accumulation dtype (float64 for
  // float64 inputs, else float32), what the backward needs: state (B, Hk, m, Ev + 1) = the final
  // [phi_k^T V, phi_k^T 1]; den (B, H, L) = the normalizer of each query; query_shift (B, H, L) and
  // key_shift (B, Hk, S) = the stabilizing shifts applied to each query's and key's features.
  // features: (m, E), or (Bf, Hf, m, E) per batch (Bf = B) and key head (Hf = Hk), either of them 1
  // to share; feature_bias (features' shape without E) is added to every projection. The backward
  // returns dq, dk, dv and, with features_grad, the gradients with respect to features and
  // feature_bias (else two empty tensors).
  m.def("favor_forward(Tensor q, Tensor k, Tensor v, Tensor features, Tensor? feature_bias, "
        "Tensor? key_padding_mask, float scale, bool causal, str kernel) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("favor_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor features, Tensor? feature_bias, "
        "Tensor? key_padding_mask, Tensor out, Tensor state, Tensor den, Tensor query_shift, "
        "Tensor key_shift, float scale, bool causal, str kernel, bool features_grad) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // One causal decoding step: T >= 0 new positions q (B, H, T, E), k (B, Hk, T, E), v (B, Hk, T, Ev)
  // (causal among themselves; key_padding_mask (B, T); features and feature_bias as favor_forward's)
  // continuing the recurrent state kv (B, Hk, m, Ev), normalizer (B, Hk, m), key_max (B, Hk) in the
  // accumulation dtype (all three None: an empty state),
  // as performer.FavorState defines it. Returns out (B, H, T, Ev) in q's dtype and the state after
  // the new positions (new tensors: the given state is not modified). No autograd: the Python API
  // runs the differentiable plain-PyTorch step when a gradient is needed.
  m.def("favor_step(Tensor q, Tensor k, Tensor v, Tensor features, Tensor? feature_bias, Tensor? key_padding_mask, "
        "Tensor? kv, Tensor? normalizer, Tensor? key_max, float scale, str kernel) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // The same step updating a given state in place (contiguous tensors); returns out.
  m.def("favor_step_(Tensor q, Tensor k, Tensor v, Tensor features, Tensor? feature_bias, Tensor? key_padding_mask, "
        "Tensor(a!) kv, Tensor(b!) normalizer, Tensor(c!) key_max, float scale, str kernel) -> Tensor");
  // The per-dimension mean and mean square over dim 2 of x (B, G, N, E), each (B, G, E) in the
  // accumulation dtype (zeros for N = 0): the statistics of performer.FeatureMap in one read of x.
  m.def("moments(Tensor x) -> (Tensor, Tensor)");
  // Batched matrix product on canonical inputs a (B, M, K), b (B, K, N) of one dtype and device,
  // any strides (a batch stride of 0 broadcasts): returns a @ b, (B, M, N) contiguous in that
  // dtype; float16/bfloat16 accumulate in float32.
  m.def("blocked_matmul(Tensor a, Tensor b) -> Tensor");
  // Block-sparse linear: x (M, K) @ W^T + bias with W (N, K) kept as (br x bc) blocks, values (nnzb,
  // bc, br) k-major per block, block_cols (nnzb) int32 and row_ptr (ceil(N / br) + 1) int32 per block
  // row (performer/ops/sparse/reference.py packs and unpacks it); float32 or float64. Returns (M, N).
  m.def("block_sparse_linear(Tensor x, Tensor values, Tensor block_cols, Tensor row_ptr, Tensor? bias, "
        "int N) -> Tensor");
  // The same product with int8 weights: Wq (N, K) int8 times per-output scales (N) float32, its
  // blocks stored as values (nnzb, bc / 4, br, 4), groups of 4 inputs per output (pack_int8 in
  // reference.py). col_sums (N) int32 = Wq's row sums: x's rows are quantized to uint8 at run time
  // (integer products); None: x stays float32 (weight-only). Returns (M, N) float32.
  m.def("block_sparse_linear_int8(Tensor x, Tensor values, Tensor scales, Tensor? col_sums, Tensor block_cols, "
        "Tensor row_ptr, Tensor? bias, int N) -> Tensor");
  // The instruction set whose CPU kernels run here: "baseline", "avx2", "avx512" or "avx512_vnni".
  m.def("cpu_isa() -> str", [] { return std::string(performer::cpu::kernels().name); });
  // The measured float FMA throughput of those kernels' vectors on `threads` threads, in GFLOP/s:
  // the peak that the benchmarks compare with.
  m.def("cpu_fma_peak_gflops(int threads, float seconds) -> float", [](int64_t threads, double seconds) {
    return performer::cpu::kernels().fma_peak_gflops(int(threads), seconds);
  });
}

// Importing performer._C runs the registrations above. The module holds two functions called
// directly, without the dispatcher's and the Python autograd wrapper's microseconds per call, which
// are most of a small call's cost: the in-place decoding step (performer.favor_attention_step) and the
// block-sparse products (performer.nn.CompressedLinear and Int8Linear), in eager mode on CPU tensors that need no
// gradient (torch.compile and everything else go through torch.ops.performer.*).
PYBIND11_MODULE(_C, m) {
  m.def("favor_step_", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& features,
                          const std::optional<at::Tensor>& feature_bias,
                          const std::optional<at::Tensor>& key_padding_mask, at::Tensor& kv, at::Tensor& normalizer,
                          at::Tensor& key_max, double scale, const std::string& kernel,
                          const std::optional<at::Tensor>& q_mul, const std::optional<at::Tensor>& k_mul,
                          const std::optional<at::Tensor>& k_add, const std::optional<at::Tensor>& k_post,
                          const std::optional<at::Tensor>& head_bias) {
    TORCH_CHECK(q.device().is_cpu(), "performer._C.favor_step_ runs on CPU tensors; got ", q.device());
    pybind11::gil_scoped_release no_gil;
    return performer::cpu::favor_step_inplace(q, k, v, features, feature_bias, key_padding_mask, kv, normalizer,
                                              key_max, scale, c10::string_view(kernel.data(), kernel.size()),
                                              q_mul, k_mul, k_add, k_post, head_bias);
  }, pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("features"),
     pybind11::arg("feature_bias"), pybind11::arg("key_padding_mask"), pybind11::arg("kv"),
     pybind11::arg("normalizer"), pybind11::arg("key_max"), pybind11::arg("scale"), pybind11::arg("kernel"),
     pybind11::arg("q_mul") = pybind11::none(), pybind11::arg("k_mul") = pybind11::none(),
     pybind11::arg("k_add") = pybind11::none(), pybind11::arg("k_post") = pybind11::none(),
     pybind11::arg("head_bias") = pybind11::none());
  m.def("block_sparse_linear", [](const at::Tensor& x, const at::Tensor& values, const at::Tensor& block_cols,
                                  const at::Tensor& row_ptr, const std::optional<at::Tensor>& bias, int64_t N) {
    TORCH_CHECK(x.device().is_cpu(), "performer._C.block_sparse_linear runs on CPU tensors; got ", x.device());
    pybind11::gil_scoped_release no_gil;
    return performer::cpu::block_sparse_linear(x, values, block_cols, row_ptr, bias, N);
  });
  m.def("block_sparse_linear_int8", [](const at::Tensor& x, const at::Tensor& values, const at::Tensor& scales,
                                       const std::optional<at::Tensor>& col_sums, const at::Tensor& block_cols,
                                       const at::Tensor& row_ptr, const std::optional<at::Tensor>& bias, int64_t N) {
    TORCH_CHECK(x.device().is_cpu(), "performer._C.block_sparse_linear_int8 runs on CPU tensors; got ", x.device());
    pybind11::gil_scoped_release no_gil;
    return performer::cpu::block_sparse_linear_int8(x, values, scales, col_sums, block_cols, row_ptr, bias, N);
  });
}

// The FAVOR+ decoding step for the CPU dispatch key: checks, output allocation, and the call into the
// kernel of the best instruction set (csrc/cpu/favor_step_kernel.h, compiled per ISA).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "../favor_checks.h"
#include "dtypes.h"
#include "favor_step.h"
#include "kernels.h"

namespace performer::cpu {
namespace {

// A frozen feature map's transform of the rows (StepParams::q_mul, k_mul, k_add, k_post) and its
// bias per key head (Hk, m) for features shared by the heads.
struct RowTransform {
  const void* q_mul = nullptr;
  const void* k_mul = nullptr;
  const void* k_add = nullptr;
  const void* k_post = nullptr;
  const void* head_bias = nullptr;
};

View view_of(const at::Tensor& t) {
  return View{const_cast<void*>(t.data_ptr()), {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}};
}

// The data of one RowTransform tensor, checked to hold heads x n elements of the accumulation dtype
// (float64 for float64 inputs, else float32), contiguous on the CPU; null if absent.
const void* transform_data(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& q, int64_t heads,
                           int64_t n) {
  if (!t.has_value()) return nullptr;
  const at::ScalarType acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == acc && t->is_contiguous() && t->numel() == heads * n,
              name, " must be a contiguous CPU tensor of ", heads, " x ", n, " ", acc, " elements; got ", t->sizes(),
              " ", t->scalar_type(), " on ", t->device());
  return t->data_ptr();
}

// Runs the kernel from `prev` (undefined: an empty state) into kv, normalizer, key_max; returns out.
at::Tensor run_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const FavorInputs& in,
                    const FavorStepState& prev, at::Tensor& kv, at::Tensor& normalizer, at::Tensor& key_max,
                    double scale, std::string_view kernel, const RowTransform& transform = {}) {
  const FavorSizes& n = in.n;
  at::Tensor out = at::empty({n.B, n.H, n.L, n.Ev}, q.options());
  if (n.L == 0) {  // nothing new: the state carries over
    carry_favor_state(prev, kv, normalizer, key_max);
    return out;
  }
  StepParams p{};
  p.dtype = dtype_of(q, "q");
  p.kernel = kernel_of(kernel);
  p.scale = scale;
  p.B = n.B; p.H = n.H; p.Hk = n.Hk; p.T = n.L; p.E = n.E; p.Ev = n.Ev; p.m = n.m;
  p.q = view_of(q); p.k = view_of(k); p.v = view_of(v);
  p.features = in.features.data_ptr();
  p.bias = in.bias.defined() ? in.bias.data_ptr() : nullptr;
  p.Bf = in.Bf;
  p.Hf = in.Hf;
  p.mask = in.mask.defined() ? in.mask.data_ptr<bool>() : nullptr;
  p.bias_Bf = in.Bf;
  p.bias_Hf = in.Hf;
  if (transform.head_bias) {
    p.bias = transform.head_bias;
    p.bias_Bf = 1;
    p.bias_Hf = n.Hk;
  }
  p.q_mul = transform.q_mul;
  p.k_mul = transform.k_mul;
  p.k_add = transform.k_add;
  p.k_post = transform.k_post;
  if (prev.kv.defined()) {
    p.kv_in = prev.kv.data_ptr();
    p.normalizer_in = prev.normalizer.data_ptr();
    p.key_max_in = prev.key_max.data_ptr();
  }
  p.kv = kv.data_ptr();
  p.normalizer = normalizer.data_ptr();
  p.key_max = key_max.data_ptr();
  p.out = out.data_ptr();
  p.num_threads = at::get_num_threads();
  kernels().favor_step(p);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> favor_step(
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

}  // namespace

at::Tensor favor_step_inplace(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& features,
                              const std::optional<at::Tensor>& feature_bias,
                              const std::optional<at::Tensor>& key_padding_mask, at::Tensor& kv, at::Tensor& normalizer,
                              at::Tensor& key_max, double scale, c10::string_view kernel,
                              const std::optional<at::Tensor>& q_mul, const std::optional<at::Tensor>& k_mul,
                              const std::optional<at::Tensor>& k_add, const std::optional<at::Tensor>& k_post,
                              const std::optional<at::Tensor>& head_bias) {
  const std::string_view kn(kernel.data(), kernel.size());
  const FavorInputs in = check_favor_inputs(q, k, v, features, feature_bias, key_padding_mask, scale, true, kn);
  const FavorStepState prev = check_favor_step_state(in.n, q, kv, normalizer, key_max, true);
  TORCH_CHECK(!(head_bias.has_value() && feature_bias.has_value()),
              "head_bias replaces feature_bias: pass one of them, not both");
  const RowTransform transform{transform_data(q_mul, "q_mul", q, in.n.H, in.n.E),
                               transform_data(k_mul, "k_mul", q, in.n.Hk, in.n.E),
                               transform_data(k_add, "k_add", q, in.n.Hk, in.n.E),
                               transform_data(k_post, "k_post", q, in.n.Hk, 1),
                               transform_data(head_bias, "head_bias", q, in.n.Hk, in.n.m)};
  return run_step(q, k, v, in, prev, kv, normalizer, key_max, scale, kn, transform);
}

namespace {
at::Tensor favor_step_inplace_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& features, const std::optional<at::Tensor>& feature_bias,
                                 const std::optional<at::Tensor>& key_padding_mask, at::Tensor& kv,
                                 at::Tensor& normalizer, at::Tensor& key_max, double scale, c10::string_view kernel) {
  return favor_step_inplace(q, k, v, features, feature_bias, key_padding_mask, kv, normalizer, key_max, scale, kernel);
}
}  // namespace

TORCH_LIBRARY_IMPL(performer, CPU, m) {
  m.impl("favor_step", &favor_step);
  m.impl("favor_step_", &favor_step_inplace_op);
}

}  // namespace performer::cpu

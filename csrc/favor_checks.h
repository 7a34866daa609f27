// The argument checks of the FAVOR+ ops, shared by the CPU and CUDA registrations (csrc/cpu/favor.cpp,
// csrc/cuda/favor.cu): the same checks and messages on every device. Each returns what the kernels
// need besides the checked tensors.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string_view>
#include <utility>
#include <vector>

#include "checks.h"

namespace performer {

struct FavorSizes {
  int64_t B, H, Hk, L, S, E, Ev, m;
};

// What the kernels read besides q, k, v: the features as (Bf, Hf, m, E) and their bias (Bf, Hf, m)
// (undefined if none) in the accumulation dtype (float64 for float64 inputs, float32 otherwise), and
// the padding mask (undefined if none), all contiguous. Bf is 1 or B, Hf is 1 or Hk.
struct FavorInputs {
  FavorSizes n;
  at::Tensor features;
  at::Tensor bias;
  at::Tensor mask;
  int64_t Bf = 1, Hf = 1;
};

inline at::ScalarType favor_acc_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The CUDA kernels implement 'softmax' and 'relu' ('softmax_normalized' runs on the CPU kernels and the
// torch backend, which is the default on GPUs).
inline void check_cuda_kernel(std::string_view kernel) {
  PERFORMER_CHECK_VALUE(kernel == "softmax" || kernel == "relu", "kernel",
                        "be 'softmax' or 'relu' on CUDA tensors (use backend='torch' for 'softmax_normalized')", "; got ",
                        "'", kernel, "'");
}

// q (B, H, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev), features (m, E) or per batch and key head
// (Bf, Hf, m, E) with Bf in {1, B} and Hf in {1, Hk}, feature_bias of the features' shape without E,
// key_padding_mask (B, S) bool.
inline FavorInputs check_favor_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& features, const std::optional<at::Tensor>& feature_bias,
                                      const std::optional<at::Tensor>& mask, double scale, bool causal,
                                      std::string_view kernel) {
  check_dim(q, "q", 4, "(B, H, L, E)");
  check_dim(k, "k", 4, "(B, Hk, S, E)");
  check_dim(v, "v", 4, "(B, Hk, S, Ev)");
  check_like(k, "k", q, "q");
  check_like(v, "v", q, "q");
  const auto dtype = q.scalar_type();
  PERFORMER_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
                       "q", "have dtype float32, float64, bfloat16 or float16", "; got ", dtype);
  FavorSizes n{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3), (features.dim() == 2 || features.dim() == 4) ? features.size(-2) : 0};
  check_size(k, "k", 0, n.B, "(B, Hk, S, E)");
  check_size(k, "k", 3, n.E, "(B, Hk, S, E)");
  PERFORMER_CHECK_VALUE(n.Hk > 0 && n.H % n.Hk == 0, "k", "have a head count Hk dividing q's H=", n.H, "; got ",
                        "Hk=", n.Hk);
  check_size(v, "v", 0, n.B, "(B, Hk, S, Ev)");
  check_size(v, "v", 1, n.Hk, "(B, Hk, S, Ev)");
  check_size(v, "v", 2, n.S, "(B, Hk, S, Ev)");
  PERFORMER_CHECK_VALUE(!causal || n.L == n.S, "k", "have S == L for causal attention", "; got ", "L=", n.L,
                        ", S=", n.S);
  PERFORMER_CHECK_VALUE(features.dim() == 2 || features.dim() == 4, "features", "have shape (m, E) or (Bf, Hf, m, E)",
                        "; got ", "shape ", features.sizes());
  const int64_t Bf = features.dim() == 4 ? features.size(0) : 1, Hf = features.dim() == 4 ? features.size(1) : 1;
  PERFORMER_CHECK_VALUE(features.size(-1) == n.E && (Bf == 1 || Bf == n.B) && (Hf == 1 || Hf == n.Hk), "features",
                        "have shape (m, E) or (Bf, Hf, m, E) with E=", n.E, ", Bf 1 or B=", n.B, ", Hf 1 or Hk=", n.Hk,
                        "; got ", "shape ", features.sizes());
  PERFORMER_CHECK_VALUE(n.m > 0, "features", "have at least one row", "; got ", "shape ", features.sizes());
  PERFORMER_CHECK_TYPE(features.is_floating_point(), "features", "be floating point", "; got ",
                       features.scalar_type());
  PERFORMER_CHECK_VALUE(features.device() == q.device(), "features", "be on q's device", "; got ", features.device());
  PERFORMER_CHECK_VALUE(scale > 0 && std::isfinite(scale), "scale", "be positive and finite", "; got ", scale);
  PERFORMER_CHECK_VALUE(kernel == "softmax" || kernel == "relu" || kernel == "softmax_normalized", "kernel",
                        "be 'softmax', 'relu' or 'softmax_normalized'", "; got ", "'", kernel, "'");
  FavorInputs in{n, features.to(favor_acc_dtype(q)).contiguous().view({Bf, Hf, n.m, n.E}), at::Tensor(), at::Tensor(),
                 Bf, Hf};
  if (feature_bias.has_value()) {
    const at::Tensor& fb = *feature_bias;
    PERFORMER_CHECK_VALUE(fb.sizes() == features.sizes().slice(0, features.dim() - 1), "feature_bias",
                          "have the features' shape without E: ", features.sizes().slice(0, features.dim() - 1),
                          "; got ", "shape ", fb.sizes());
    PERFORMER_CHECK_TYPE(fb.is_floating_point(), "feature_bias", "be floating point", "; got ", fb.scalar_type());
    PERFORMER_CHECK_VALUE(fb.device() == q.device(), "feature_bias", "be on q's device", "; got ", fb.device());
    in.bias = fb.to(favor_acc_dtype(q)).contiguous().view({Bf, Hf, n.m});
  }
  if (mask.has_value()) {
    const at::Tensor& mk = *mask;
    PERFORMER_CHECK_TYPE(mk.scalar_type() == at::kBool, "key_padding_mask", "have dtype bool", "; got ",
                         mk.scalar_type());
    PERFORMER_CHECK_VALUE(mk.dim() == 2 && mk.size(0) == n.B && mk.size(1) == n.S, "key_padding_mask",
                          "have shape (B, S) = (", n.B, ", ", n.S, ")", "; got ", "shape ", mk.sizes());
    PERFORMER_CHECK_VALUE(mk.device() == q.device(), "key_padding_mask", "be on q's device", "; got ", mk.device());
    in.mask = mk.contiguous();
  }
  return in;
}

// The backward's gradients with respect to the features and their bias: with features_grad, zeroed
// buffers in the layout and accumulation dtype of in.features and in.bias (the bias's only when there
// is one) for the kernels to add to; result() gives them in the caller's shapes and dtypes, or empty
// tensors where they were not computed.
struct FeatureGrads {
  at::Tensor features, bias;

  FeatureGrads(const FavorInputs& in, bool features_grad) {
    if (!features_grad) return;
    features = at::zeros_like(in.features);
    if (in.bias.defined()) bias = at::zeros_like(in.bias);
  }

  std::pair<at::Tensor, at::Tensor> result(const at::Tensor& w, const std::optional<at::Tensor>& b) const {
    // Two distinct empty tensors: the op's outputs must not alias each other.
    return {features.defined() ? features.view(w.sizes()).to(w.scalar_type()) : at::empty({0}, w.options()),
            bias.defined() ? bias.view(b->sizes()).to(b->scalar_type()) : at::empty({0}, w.options())};
  }
};

// The backward's extra inputs: grad_out and out (B, H, L, Ev) like q, and the forward's saved
// statistics in the accumulation dtype. Returns the statistics contiguous: state, den, query_shift,
// key_shift.
inline std::vector<at::Tensor> check_favor_saved(const FavorSizes& n, const at::Tensor& q, const at::Tensor& grad_out,
                                                 const at::Tensor& out, const at::Tensor& state, const at::Tensor& den,
                                                 const at::Tensor& query_shift, const at::Tensor& key_shift) {
  for (auto [t, name] : {std::pair{&grad_out, "grad_out"}, std::pair{&out, "out"}}) {
    check_dim(*t, name, 4, "(B, H, L, Ev)");
    check_like(*t, name, q, "q");
    PERFORMER_CHECK_VALUE(t->sizes() == at::IntArrayRef({n.B, n.H, n.L, n.Ev}), name,
                          "have shape (B, H, L, Ev) = ", at::IntArrayRef({n.B, n.H, n.L, n.Ev}), "; got ",
                          "shape ", t->sizes());
  }
  const auto acc = favor_acc_dtype(q);
  const std::tuple<const at::Tensor*, const char*, std::vector<int64_t>> saved[] = {
      {&state, "state", {n.B, n.Hk, n.m, n.Ev + 1}}, {&den, "den", {n.B, n.H, n.L}},
      {&query_shift, "query_shift", {n.B, n.H, n.L}}, {&key_shift, "key_shift", {n.B, n.Hk, n.S}}};
  std::vector<at::Tensor> contiguous;
  for (const auto& [t, name, shape] : saved) {
    PERFORMER_CHECK_VALUE(t->sizes() == at::IntArrayRef(shape), name, "have shape ", at::IntArrayRef(shape), "; got ",
                          "shape ", t->sizes());
    PERFORMER_CHECK_TYPE(t->scalar_type() == acc, name, "have dtype ", acc, "; got ", t->scalar_type());
    PERFORMER_CHECK_VALUE(t->device() == q.device(), name, "be on q's device", "; got ", t->device());
    contiguous.push_back(t->contiguous());
  }
  return contiguous;
}

// The decoding step's state (favor_step, favor_step_): kv (B, Hk, m, Ev), normalizer (B, Hk, m), key_max
// (B, Hk) in the accumulation dtype, on q's device; all given or none (an empty state). In place, each
// must be contiguous (the step writes it); otherwise returns them contiguous.
struct FavorStepState {
  at::Tensor kv, normalizer, key_max;  // undefined for an empty state
};

inline FavorStepState check_favor_step_state(const FavorSizes& n, const at::Tensor& q,
                                             const std::optional<at::Tensor>& kv,
                                             const std::optional<at::Tensor>& normalizer,
                                             const std::optional<at::Tensor>& key_max, bool in_place) {
  const bool any = kv.has_value() || normalizer.has_value() || key_max.has_value();
  PERFORMER_CHECK_VALUE(!any || (kv.has_value() && normalizer.has_value() && key_max.has_value()), "kv",
                        "come with normalizer and key_max (all three, or none for an empty state)", "; got ",
                        kv.has_value() ? "kv" : "no kv", normalizer.has_value() ? ", normalizer" : ", no normalizer",
                        key_max.has_value() ? ", key_max" : ", no key_max");
  if (!any) return {};
  const auto acc = favor_acc_dtype(q);
  const std::tuple<const at::Tensor*, const char*, std::vector<int64_t>, const char*> parts[] = {
      {&*kv, "kv", {n.B, n.Hk, n.m, n.Ev}, "(B, Hk, m, Ev)"},
      {&*normalizer, "normalizer", {n.B, n.Hk, n.m}, "(B, Hk, m)"},
      {&*key_max, "key_max", {n.B, n.Hk}, "(B, Hk)"}};
  FavorStepState out;
  at::Tensor* dst[] = {&out.kv, &out.normalizer, &out.key_max};
  int i = 0;
  for (const auto& [t, name, shape, layout] : parts) {
    PERFORMER_CHECK_VALUE(t->sizes() == at::IntArrayRef(shape), name, "have shape ", layout, " = ",
                          at::IntArrayRef(shape), "; got ", "shape ", t->sizes());
    PERFORMER_CHECK_TYPE(t->scalar_type() == acc, name, "have dtype ", acc, " (the accumulation dtype of ",
                         q.scalar_type(), " inputs)", "; got ", t->scalar_type());
    PERFORMER_CHECK_VALUE(t->device() == q.device(), name, "be on q's device", "; got ", t->device());
    PERFORMER_CHECK_VALUE(!in_place || t->is_contiguous(), name, "be contiguous to be updated in place",
                          "; got ", "strides ", t->strides());
    *dst[i++] = t->contiguous();
  }
  return out;
}

// A new state for the step's result: kv (B, Hk, m, Ev), normalizer (B, Hk, m), key_max (B, Hk) in
// the accumulation dtype, on q's device, uninitialized.
inline FavorStepState empty_favor_state(const FavorSizes& n, const at::Tensor& q) {
  const auto acc = q.options().dtype(favor_acc_dtype(q));
  return {at::empty({n.B, n.Hk, n.m, n.Ev}, acc), at::empty({n.B, n.Hk, n.m}, acc), at::empty({n.B, n.Hk}, acc)};
}

// The state after a step with no new position: `prev` copied into kv, normalizer, key_max (unless
// they are it), or the empty state (zero sums, key_max -inf) when `prev` is undefined.
inline void carry_favor_state(const FavorStepState& prev, at::Tensor& kv, at::Tensor& normalizer, at::Tensor& key_max) {
  if (!prev.kv.defined()) {
    kv.zero_();
    normalizer.zero_();
    key_max.fill_(-std::numeric_limits<double>::infinity());
  } else if (!kv.is_same(prev.kv)) {
    kv.copy_(prev.kv);
    normalizer.copy_(prev.normalizer);
    key_max.copy_(prev.key_max);
  }
}

}  // namespace performer

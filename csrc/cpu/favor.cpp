// FAVOR+ ops for the CPU dispatch key: checks, output allocation, and the call into the kernels
// of the best instruction set (csrc/cpu/favor_kernel.h, compiled per ISA).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <string_view>
#include <tuple>

#include "../favor_checks.h"
#include "dtypes.h"
#include "kernels.h"

namespace performer::cpu {
namespace {

View view_of(const at::Tensor& t) {
  return View{const_cast<void*>(t.data_ptr()), {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}};
}

// Checks the inputs (csrc/favor_checks.h) and fills everything but the result pointers; `in` keeps
// the features and mask that the kernels read.
FavorParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& features,
                        const std::optional<at::Tensor>& feature_bias, const std::optional<at::Tensor>& mask,
                        double scale, bool causal, std::string_view kernel, FavorInputs& in) {
  in = check_favor_inputs(q, k, v, features, feature_bias, mask, scale, causal, kernel);
  FavorParams p{};
  p.dtype = dtype_of(q, "q");
  p.kernel = kernel_of(kernel);
  p.causal = causal;
  p.scale = scale;
  const FavorSizes& n = in.n;
  p.B = n.B; p.H = n.H; p.Hk = n.Hk; p.L = n.L; p.S = n.S; p.E = n.E; p.Ev = n.Ev; p.m = n.m;
  p.q = view_of(q); p.k = view_of(k); p.v = view_of(v);
  p.features = in.features.data_ptr();
  p.feature_bias = in.bias.defined() ? in.bias.data_ptr() : nullptr;
  p.Bf = in.Bf;
  p.Hf = in.Hf;
  p.mask = in.mask.defined() ? in.mask.data_ptr<bool>() : nullptr;
  p.num_threads = at::get_num_threads();
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> favor_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& features,
    const std::optional<at::Tensor>& feature_bias, const std::optional<at::Tensor>& key_padding_mask, double scale,
    bool causal, c10::string_view kernel) {
  FavorInputs in;
  FavorParams p = make_params(q, k, v, features, feature_bias, key_padding_mask, scale, causal,
                              std::string_view(kernel.data(), kernel.size()), in);
  const auto acc = q.options().dtype(favor_acc_dtype(q));
  at::Tensor out = at::empty({p.B, p.H, p.L, p.Ev}, q.options());
  at::Tensor state = at::empty({p.B, p.Hk, p.m, p.Ev + 1}, acc);
  at::Tensor den = at::empty({p.B, p.H, p.L}, acc);
  at::Tensor query_shift = at::empty({p.B, p.H, p.L}, acc);
  at::Tensor key_shift = at::empty({p.B, p.Hk, p.S}, acc);
  p.out = view_of(out);
  p.state = state.data_ptr();
  p.den = den.data_ptr();
  p.query_shift = query_shift.data_ptr();
  p.key_shift = key_shift.data_ptr();
  kernels().favor_forward(p);
  return {out, state, den, query_shift, key_shift};
}

// The gradients with respect to features and feature_bias (in their shapes and dtypes) are computed
// only with features_grad; otherwise both are empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> favor_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& features, const std::optional<at::Tensor>& feature_bias,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out, const at::Tensor& state,
    const at::Tensor& den, const at::Tensor& query_shift, const at::Tensor& key_shift, double scale, bool causal,
    c10::string_view kernel, bool features_grad) {
  FavorInputs in;
  FavorParams p = make_params(q, k, v, features, feature_bias, key_padding_mask, scale, causal,
                              std::string_view(kernel.data(), kernel.size()), in);
  const std::vector<at::Tensor> saved = check_favor_saved(in.n, q, grad_out, out, state, den, query_shift, key_shift);
  at::Tensor dq = at::empty({p.B, p.H, p.L, p.E}, q.options());
  at::Tensor dk = at::empty({p.B, p.Hk, p.S, p.E}, q.options());
  at::Tensor dv = at::empty({p.B, p.Hk, p.S, p.Ev}, q.options());
  p.out = view_of(out);
  p.grad_out = view_of(grad_out);
  p.state = saved[0].data_ptr();
  p.den = saved[1].data_ptr();
  p.query_shift = saved[2].data_ptr();
  p.key_shift = saved[3].data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  FeatureGrads grads(in, features_grad);
  if (grads.features.defined()) p.dfeatures = grads.features.data_ptr();
  if (grads.bias.defined()) p.dfeature_bias = grads.bias.data_ptr();
  kernels().favor_backward(p);
  auto [dfeatures, dbias] = grads.result(features, feature_bias);
  return {dq, dk, dv, dfeatures, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(performer, CPU, m) {
  m.impl("favor_forward", &favor_forward);
  m.impl("favor_backward", &favor_backward);
}

}  // namespace performer::cpu

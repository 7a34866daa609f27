// FAVOR+ ops for the CPU dispatch key: checks, output allocation, and the call into the kernels
// of the best instruction set (csrc/cpu/favor_kernel.h, compiled per ISA).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <string_view>
#include <tuple>

#include "../checks.h"
#include "dtypes.h"
#include "kernels.h"

namespace performer::cpu {
namespace {

View view_of(const at::Tensor& t) {
  return View{const_cast<void*>(t.data_ptr()), {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}};
}

Kernel kernel_of(std::string_view kernel) {
  if (kernel == "softmax") return Kernel::softmax;
  PERFORMER_CHECK_VALUE(kernel == "relu", "kernel", "be 'softmax' or 'relu'", "; got ", "'", kernel, "'");
  return Kernel::relu;
}

// Checks the canonical inputs and fills everything but the result pointers.
FavorParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& features,
                        const std::optional<at::Tensor>& mask, double scale, bool causal, std::string_view kernel,
                        at::Tensor& features_acc, at::Tensor& mask_c) {
  check_dim(q, "q", 4, "(B, H, L, E)");
  check_dim(k, "k", 4, "(B, Hk, S, E)");
  check_dim(v, "v", 4, "(B, Hk, S, Ev)");
  check_like(k, "k", q, "q");
  check_like(v, "v", q, "q");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), E = q.size(3);
  const int64_t Hk = k.size(1), S = k.size(2);
  check_size(k, "k", 0, B, "(B, Hk, S, E)");
  check_size(k, "k", 3, E, "(B, Hk, S, E)");
  PERFORMER_CHECK_VALUE(Hk > 0 && H % Hk == 0, "k", "have a head count Hk dividing q's H=", H, "; got ", "Hk=", Hk);
  check_size(v, "v", 0, B, "(B, Hk, S, Ev)");
  check_size(v, "v", 1, Hk, "(B, Hk, S, Ev)");
  check_size(v, "v", 2, S, "(B, Hk, S, Ev)");
  PERFORMER_CHECK_VALUE(!causal || L == S, "k", "have S == L for causal attention", "; got ", "L=", L, ", S=", S);
  check_dim(features, "features", 2, "(m, E)");
  check_size(features, "features", 1, E, "(m, E)");
  PERFORMER_CHECK_VALUE(features.size(0) > 0, "features", "have at least one row", "; got ", "shape ", features.sizes());
  PERFORMER_CHECK_TYPE(features.is_floating_point(), "features", "be floating point", "; got ", features.scalar_type());
  PERFORMER_CHECK_VALUE(features.device() == q.device(), "features", "be on q's device", "; got ", features.device());
  PERFORMER_CHECK_VALUE(scale > 0 && std::isfinite(scale), "scale", "be positive and finite", "; got ", scale);

  FavorParams p{};
  p.dtype = dtype_of(q, "q");
  p.kernel = kernel_of(kernel);
  p.causal = causal;
  p.scale = scale;
  p.B = B; p.H = H; p.Hk = Hk; p.L = L; p.S = S; p.E = E; p.Ev = v.size(3); p.m = features.size(0);
  p.q = view_of(q); p.k = view_of(k); p.v = view_of(v);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  features_acc = features.to(acc).contiguous();
  p.features = features_acc.data_ptr();
  p.mask = nullptr;
  if (mask.has_value()) {
    const at::Tensor& mk = *mask;
    PERFORMER_CHECK_TYPE(mk.scalar_type() == at::kBool, "key_padding_mask", "have dtype bool", "; got ", mk.scalar_type());
    PERFORMER_CHECK_VALUE(mk.dim() == 2 && mk.size(0) == B && mk.size(1) == S, "key_padding_mask",
                          "have shape (B, S) = (", B, ", ", S, ")", "; got ", "shape ", mk.sizes());
    PERFORMER_CHECK_VALUE(mk.device() == q.device(), "key_padding_mask", "be on q's device", "; got ", mk.device());
    mask_c = mk.contiguous();
    p.mask = mask_c.data_ptr<bool>();
  }
  p.num_threads = at::get_num_threads();
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> favor_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& features,
    const std::optional<at::Tensor>& key_padding_mask, double scale, bool causal, c10::string_view kernel) {
  at::Tensor features_acc, mask_c;
  FavorParams p = make_params(q, k, v, features, key_padding_mask, scale, causal,
                              std::string_view(kernel.data(), kernel.size()), features_acc, mask_c);
  const auto acc = q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> favor_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& features, const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out,
    const at::Tensor& state, const at::Tensor& den, const at::Tensor& query_shift, const at::Tensor& key_shift,
    double scale, bool causal,
    c10::string_view kernel) {
  at::Tensor features_acc, mask_c;
  FavorParams p = make_params(q, k, v, features, key_padding_mask, scale, causal,
                              std::string_view(kernel.data(), kernel.size()), features_acc, mask_c);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (auto [t, name] : {std::pair{&grad_out, "grad_out"}, std::pair{&out, "out"}}) {
    check_dim(*t, name, 4, "(B, H, L, Ev)");
    check_like(*t, name, q, "q");
    PERFORMER_CHECK_VALUE(t->sizes() == at::IntArrayRef({p.B, p.H, p.L, p.Ev}), name,
                          "have shape (B, H, L, Ev) = ", at::IntArrayRef({p.B, p.H, p.L, p.Ev}), "; got ",
                          "shape ", t->sizes());
  }
  const std::tuple<const at::Tensor*, const char*, std::vector<int64_t>> saved[] = {
      {&state, "state", {p.B, p.Hk, p.m, p.Ev + 1}}, {&den, "den", {p.B, p.H, p.L}},
      {&query_shift, "query_shift", {p.B, p.H, p.L}}, {&key_shift, "key_shift", {p.B, p.Hk, p.S}}};
  for (const auto& [t, name, shape] : saved) {
    PERFORMER_CHECK_VALUE(t->sizes() == at::IntArrayRef(shape), name, "have shape ", at::IntArrayRef(shape), "; got ",
                          "shape ", t->sizes());
    PERFORMER_CHECK_TYPE(t->scalar_type() == acc, name, "have dtype ", acc, "; got ", t->scalar_type());
    PERFORMER_CHECK_VALUE(t->device() == q.device(), name, "be on q's device", "; got ", t->device());
  }
  at::Tensor state_c = state.contiguous(), den_c = den.contiguous(), qshift_c = query_shift.contiguous(),
             shift_c = key_shift.contiguous();
  at::Tensor dq = at::empty({p.B, p.H, p.L, p.E}, q.options());
  at::Tensor dk = at::empty({p.B, p.Hk, p.S, p.E}, q.options());
  at::Tensor dv = at::empty({p.B, p.Hk, p.S, p.Ev}, q.options());
  p.out = view_of(out);
  p.grad_out = view_of(grad_out);
  p.state = state_c.data_ptr();
  p.den = den_c.data_ptr();
  p.query_shift = qshift_c.data_ptr();
  p.key_shift = shift_c.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  kernels().favor_backward(p);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(performer, CPU, m) {
  m.impl("favor_forward", &favor_forward);
  m.impl("favor_backward", &favor_backward);
}

}  // namespace performer::cpu

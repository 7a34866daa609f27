// The in-place FAVOR+ decoding step on CPU tensors (the kernel of performer::favor_step_), declared
// for the extension's direct eager binding in csrc/ops.cpp as well as the dispatcher.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace performer::cpu {

at::Tensor favor_step_inplace(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& features, const std::optional<at::Tensor>& feature_bias,
                              const std::optional<at::Tensor>& key_padding_mask,
                              at::Tensor& kv, at::Tensor& normalizer, at::Tensor& key_max, double scale,
                              c10::string_view kernel);

}  // namespace performer::cpu

// The in-place FAVOR+ decoding step on CPU tensors (the kernel of performer::favor_step_), declared
// for the extension's direct eager binding in csrc/ops.cpp as well as the dispatcher. The direct
// binding alone passes q_mul, k_mul, k_add, k_post: a frozen feature map's transform of the rows,
// applied in the kernel (q' = c q * q_mul, k' = c k * k_mul + k_add, c = sqrt(scale), and k' * k_post
// projected once |k'|^2 / 2 is taken; csrc/cpu/kernels.h, StepParams), and head_bias (Hk, m), the
// bias per key head in place of feature_bias when the heads share the features; all in the
// accumulation dtype (float64 for float64 inputs, else float32).
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace performer::cpu {

at::Tensor favor_step_inplace(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& features, const std::optional<at::Tensor>& feature_bias,
                              const std::optional<at::Tensor>& key_padding_mask,
                              at::Tensor& kv, at::Tensor& normalizer, at::Tensor& key_max, double scale,
                              c10::string_view kernel, const std::optional<at::Tensor>& q_mul = std::nullopt,
                              const std::optional<at::Tensor>& k_mul = std::nullopt,
                              const std::optional<at::Tensor>& k_add = std::nullopt,
                              const std::optional<at::Tensor>& k_post = std::nullopt,
                              const std::optional<at::Tensor>& head_bias = std::nullopt);

}  // namespace performer::cpu

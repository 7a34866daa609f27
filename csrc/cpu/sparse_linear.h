// The block-sparse linear products on CPU tensors (the kernels of performer::block_sparse_linear and
// block_sparse_linear_int8),
// declared for the extension's direct eager binding in csrc/ops.cpp as well as the dispatcher.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace performer::cpu {

at::Tensor block_sparse_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& block_cols,
                               const at::Tensor& row_ptr, const std::optional<at::Tensor>& bias, int64_t N);

at::Tensor block_sparse_linear_int8(const at::Tensor& x, const at::Tensor& values, const at::Tensor& scales,
                                    const std::optional<at::Tensor>& col_sums, const at::Tensor& block_cols,
                                    const at::Tensor& row_ptr, const std::optional<at::Tensor>& bias, int64_t N);

}  // namespace performer::cpu

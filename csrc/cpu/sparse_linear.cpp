// block_sparse_linear and block_sparse_linear_int8 for the CPU dispatch key: checks (shapes, dtypes and every index of the block
// format, so that a malformed format raises instead of reading out of bounds), the output, and the
// call into the kernels of the best instruction set (csrc/cpu/sparse_kernel.h and int8_kernel.h, compiled per ISA).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>

#include "../checks.h"
#include "kernels.h"
#include "sparse_linear.h"

namespace performer::cpu {

namespace {

// The indices of a block format, contiguous, after checking every one of them.
struct BlockFormat {
  at::Tensor block_cols, row_ptr;
};

BlockFormat check_block_format(const at::Tensor& block_cols_in, const at::Tensor& row_ptr_in, const at::Tensor& x,
                               int64_t nnzb, int64_t br, int64_t bc, int64_t N) {
  const int64_t K = x.size(1);
  const int64_t panels = (N + br - 1) / br, col_blocks = (K + bc - 1) / bc;
  for (auto [t, name] : {std::pair{&block_cols_in, "block_cols"}, std::pair{&row_ptr_in, "row_ptr"}}) {
    PERFORMER_CHECK_TYPE(t->scalar_type() == at::kInt, name, "have dtype int32", "; got ", t->scalar_type());
    PERFORMER_CHECK_VALUE(t->dim() == 1 && t->device() == x.device(), name, "be 1-D on x's device", "; got ",
                          "shape ", t->sizes(), " on ", t->device());
  }
  check_size(block_cols_in, "block_cols", 0, nnzb, "(nnzb)");
  check_size(row_ptr_in, "row_ptr", 0, panels + 1, "(ceil(N / br) + 1)");
  const at::Tensor row_ptr = row_ptr_in.contiguous(), block_cols = block_cols_in.contiguous();
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  const int32_t* cols = block_cols.data_ptr<int32_t>();
  PERFORMER_CHECK_VALUE(rp[0] == 0 && rp[panels] == nnzb, "row_ptr", "start at 0 and end at nnzb=", nnzb, "; got ",
                        rp[0], " and ", rp[panels]);
  for (int64_t i = 0; i < panels; ++i)
    PERFORMER_CHECK_VALUE(rp[i] <= rp[i + 1], "row_ptr", "be non-decreasing", "; got ", rp[i], " then ", rp[i + 1],
                          " at ", i);
  for (int64_t b = 0; b < nnzb; ++b)
    PERFORMER_CHECK_VALUE(cols[b] >= 0 && cols[b] < col_blocks, "block_cols", "be in [0, ceil(K / bc)=", col_blocks,
                          ")", "; got ", cols[b], " at ", b);
  return {block_cols, row_ptr};
}

at::Tensor checked_bias(const std::optional<at::Tensor>& bias_in, const at::Tensor& x, int64_t N) {
  if (!bias_in.has_value()) return {};
  check_like(*bias_in, "bias", x, "x");
  PERFORMER_CHECK_VALUE(bias_in->dim() == 1 && bias_in->size(0) == N, "bias", "have shape (N) = (", N, ")",
                        "; got ", "shape ", bias_in->sizes());
  return bias_in->contiguous();
}

}  // namespace

at::Tensor block_sparse_linear(const at::Tensor& x_in, const at::Tensor& values_in, const at::Tensor& block_cols_in,
                               const at::Tensor& row_ptr_in, const std::optional<at::Tensor>& bias_in, int64_t N) {
  check_dim(x_in, "x", 2, "(M, K)");
  check_dim(values_in, "values", 3, "(nnzb, bc, br)");
  check_like(values_in, "values", x_in, "x");
  PERFORMER_CHECK_TYPE(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble, "x",
                       "have dtype float32 or float64", "; got ", x_in.scalar_type());
  const int64_t M = x_in.size(0), K = x_in.size(1), nnzb = values_in.size(0), bc = values_in.size(1),
                br = values_in.size(2);
  PERFORMER_CHECK_VALUE(br > 0 && br % 16 == 0 && bc > 0, "values", "have blocks (bc, br) with br a multiple of 16",
                        "; got ", "shape ", values_in.sizes());
  PERFORMER_CHECK_VALUE(N >= 0, "N", "be >= 0", "; got ", N);
  const BlockFormat format = check_block_format(block_cols_in, row_ptr_in, x_in, nnzb, br, bc, N);
  const at::Tensor bias = checked_bias(bias_in, x_in, N);
  at::Tensor y = at::empty({M, N}, x_in.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return bias.defined() ? y.copy_(bias.expand({M, N})) : y.zero_();
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  SparseLinearParams p{};
  p.dtype = x.scalar_type() == at::kDouble ? DType::f64 : DType::f32;
  p.M = M; p.N = N; p.K = K; p.br = br; p.bc = bc;
  p.x = x.data_ptr();
  p.x_row_stride = x.stride(0);
  p.values = values.data_ptr();
  p.row_ptr = format.row_ptr.data_ptr<int32_t>();
  p.block_cols = format.block_cols.data_ptr<int32_t>();
  p.bias = bias.defined() ? bias.data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.num_threads = at::get_num_threads();
  kernels().sparse_linear(p);
  return y;
}

// The largest K whose integer sums (K products of at most 255 x 127) fit in 32 bits.
constexpr int64_t kInt8MaxK = ((int64_t(1) << 31) - 1) / (255 * 127);

at::Tensor block_sparse_linear_int8(const at::Tensor& x_in, const at::Tensor& values_in, const at::Tensor& scales_in,
                                    const std::optional<at::Tensor>& col_sums_in, const at::Tensor& block_cols_in,
                                    const at::Tensor& row_ptr_in, const std::optional<at::Tensor>& bias_in, int64_t N) {
  check_dim(x_in, "x", 2, "(M, K)");
  PERFORMER_CHECK_TYPE(x_in.scalar_type() == at::kFloat, "x", "have dtype float32", "; got ", x_in.scalar_type());
  check_dim(values_in, "values", 4, "(nnzb, bc / 4, br, 4)");
  PERFORMER_CHECK_TYPE(values_in.scalar_type() == at::kChar, "values", "have dtype int8", "; got ",
                       values_in.scalar_type());
  PERFORMER_CHECK_VALUE(values_in.device() == x_in.device(), "values", "be on x's device (", x_in.device(), ")",
                        "; got ", values_in.device());
  const int64_t M = x_in.size(0), K = x_in.size(1), nnzb = values_in.size(0), bc = values_in.size(1) * 4,
                br = values_in.size(2);
  PERFORMER_CHECK_VALUE(br > 0 && br % 16 == 0 && bc > 0 && values_in.size(3) == 4, "values",
                        "have shape (nnzb, bc / 4, br, 4) with br a multiple of 16", "; got ", "shape ",
                        values_in.sizes());
  PERFORMER_CHECK_VALUE(N >= 0, "N", "be >= 0", "; got ", N);
  check_like(scales_in, "scales", x_in, "x");
  PERFORMER_CHECK_VALUE(scales_in.dim() == 1 && scales_in.size(0) == N, "scales", "have shape (N) = (", N, ")",
                        "; got ", "shape ", scales_in.sizes());
  at::Tensor col_sums;
  if (col_sums_in.has_value()) {
    PERFORMER_CHECK_TYPE(col_sums_in->scalar_type() == at::kInt, "col_sums", "have dtype int32", "; got ",
                         col_sums_in->scalar_type());
    PERFORMER_CHECK_VALUE(col_sums_in->dim() == 1 && col_sums_in->size(0) == N && col_sums_in->device() == x_in.device(),
                          "col_sums", "have shape (N) = (", N, ") on x's device", "; got ", "shape ",
                          col_sums_in->sizes(), " on ", col_sums_in->device());
    PERFORMER_CHECK_VALUE(K <= kInt8MaxK, "x", "have at most ", kInt8MaxK,
                          " columns when its rows are quantized (32-bit integer sums)", "; got ", K);
    col_sums = col_sums_in->contiguous();
  }
  const BlockFormat format = check_block_format(block_cols_in, row_ptr_in, x_in, nnzb, br, bc, N);
  const at::Tensor bias = checked_bias(bias_in, x_in, N);
  at::Tensor y = at::empty({M, N}, x_in.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return bias.defined() ? y.copy_(bias.expand({M, N})) : y.zero_();
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const at::Tensor values = values_in.contiguous(), scales = scales_in.contiguous();
  Int8LinearParams p{};
  p.M = M; p.N = N; p.K = K; p.br = br; p.bc = bc;
  p.x = x.data_ptr<float>();
  p.x_row_stride = x.stride(0);
  p.values = values.data_ptr<int8_t>();
  p.scales = scales.data_ptr<float>();
  p.col_sums = col_sums.defined() ? col_sums.data_ptr<int32_t>() : nullptr;
  p.row_ptr = format.row_ptr.data_ptr<int32_t>();
  p.block_cols = format.block_cols.data_ptr<int32_t>();
  p.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  p.y = y.data_ptr<float>();
  p.num_threads = at::get_num_threads();
  kernels().int8_linear(p);
  return y;
}

TORCH_LIBRARY_IMPL(performer, CPU, m) {
  m.impl("block_sparse_linear", &block_sparse_linear);
  m.impl("block_sparse_linear_int8", &block_sparse_linear_int8);
}

}  // namespace performer::cpu

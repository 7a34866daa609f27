// The dtype and kernel mappings shared by the CPU drivers (torch side; the kernels see only DType and
// Kernel).
#pragma once
#include <ATen/core/Tensor.h>

#include <string_view>

#include "../checks.h"
#include "kernels.h"

namespace performer::cpu {

inline DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kDouble: return DType::f64;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default:
      PERFORMER_CHECK_TYPE(false, name, "have dtype float32, float64, bfloat16 or float16", "; got ", t.scalar_type());
  }
  return DType::f32;
}

// The kernel name, already checked by check_favor_inputs (csrc/favor_checks.h).
inline Kernel kernel_of(std::string_view kernel) {
  return kernel == "relu" ? Kernel::relu : kernel == "softmax_normalized" ? Kernel::softmax_normalized : Kernel::softmax;
}

}  // namespace performer::cpu

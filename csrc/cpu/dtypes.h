// The dtype mapping shared by the CPU drivers (torch side; the kernels see only DType).
#pragma once
#include <ATen/core/Tensor.h>

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

}  // namespace performer::cpu

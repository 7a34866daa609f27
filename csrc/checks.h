// Argument checks for the registered ops. The Python API validates first (performer/_validate.py);
// these guard direct calls of torch.ops.performer.* so that bad input raises, never crashes.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

// PERFORMER_CHECK_VALUE(cond, "name", "expectation", ..., "; got ", actual, ...): the message parts
// are concatenated like TORCH_CHECK's; ValueError / TypeError in Python.
#define PERFORMER_CHECK_VALUE(cond, name, ...) TORCH_CHECK_VALUE(cond, name, " must ", __VA_ARGS__)
#define PERFORMER_CHECK_TYPE(cond, name, ...) TORCH_CHECK_TYPE(cond, name, " must ", __VA_ARGS__)

namespace performer {

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim, const char* layout) {
  PERFORMER_CHECK_VALUE(t.dim() == dim, name, "have shape ", layout, "; got ", "shape ", t.sizes());
}

inline void check_size(const at::Tensor& t, const char* name, int64_t d, int64_t expected, const char* layout) {
  PERFORMER_CHECK_VALUE(t.size(d) == expected, name, "have shape ", layout, " with size ", expected
                       , " in dimension ", d, "; got ", "shape ", t.sizes());
}

inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  PERFORMER_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, "have the dtype of ", ref_name, " ("
                      , ref.scalar_type(), ")", "; got ", t.scalar_type());
  PERFORMER_CHECK_VALUE(t.device() == ref.device(), name, "be on the device of ", ref_name, " ("
                       , ref.device(), ")", "; got ", t.device());
}

}  // namespace performer

// blocked_matmul for the CPU dispatch key: checks, output allocation, and the call into the
// kernels of the best instruction set (csrc/cpu/matmul_kernel.h, compiled per ISA).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "dtypes.h"
#include "kernels.h"

namespace performer::cpu {
namespace {

at::Tensor blocked_matmul(const at::Tensor& a, const at::Tensor& b) {
  check_dim(a, "a", 3, "(B, M, K)");
  check_dim(b, "b", 3, "(B, K, N)");
  check_like(b, "b", a, "a");
  const DType dtype = dtype_of(a, "a");
  const int64_t batch = a.size(0), M = a.size(1), K = a.size(2), N = b.size(2);
  check_size(b, "b", 0, batch, "(B, K, N)");
  check_size(b, "b", 1, K, "(B, K, N)");
  at::Tensor c = at::empty({batch, M, N}, a.options());
  if (c.numel() == 0) return c;
  if (K == 0) return c.zero_();
  MatmulParams p{};
  p.dtype = dtype;
  p.batch = batch; p.M = M; p.N = N; p.K = K;
  p.a = a.data_ptr();
  p.b = b.data_ptr();
  for (int d = 0; d < 3; ++d) {
    p.a_stride[d] = a.stride(d);
    p.b_stride[d] = b.stride(d);
  }
  p.c = c.data_ptr();
  p.num_threads = at::get_num_threads();
  kernels().matmul(p);
  return c;
}

}  // namespace

TORCH_LIBRARY_IMPL(performer, CPU, m) { m.impl("blocked_matmul", &blocked_matmul); }

}  // namespace performer::cpu

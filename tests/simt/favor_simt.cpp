// csrc/cuda/favor.cu and favor_step.cu compiled for the CPU on the SIMT emulator (simt.h), as a Python
// module with the CUDA entry points (favor_forward_cuda, favor_backward_cuda, favor_step_cuda,
// favor_step_inplace_cuda) taking CPU tensors. The test writes the sources included here
// (favor_emulated.inc, favor_step_emulated.inc and favor_common.cuh, in its build directory): the
// CUDA sources with their CUDA-only spellings replaced, see tests/test_favor_cuda_simt.py.
#include <torch/extension.h>

#include "simt.h"
#include "favor_emulated.inc"
#include "favor_step_emulated.inc"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", [](at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor f, std::optional<at::Tensor> bias,
                      std::optional<at::Tensor> mask, double scale, bool causal, std::string kernel) {
    return performer::cuda::favor_forward_cuda(q, k, v, f, bias, mask, scale, causal, c10::string_view(kernel));
  });
  m.def("backward", [](at::Tensor g, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor f,
                       std::optional<at::Tensor> bias, std::optional<at::Tensor> mask, at::Tensor out,
                       at::Tensor state, at::Tensor den, at::Tensor qs, at::Tensor ks, double scale, bool causal,
                       std::string kernel, bool features_grad) {
    return performer::cuda::favor_backward_cuda(g, q, k, v, f, bias, mask, out, state, den, qs, ks, scale, causal,
                                                c10::string_view(kernel), features_grad);
  });
  m.def("step", [](at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor f, std::optional<at::Tensor> bias,
                   std::optional<at::Tensor> mask, std::optional<at::Tensor> kv, std::optional<at::Tensor> z,
                   std::optional<at::Tensor> kmax, double scale, std::string kernel) {
    return performer::cuda::favor_step_cuda(q, k, v, f, bias, mask, kv, z, kmax, scale, c10::string_view(kernel));
  });
  m.def("step_", [](at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor f, std::optional<at::Tensor> bias,
                    std::optional<at::Tensor> mask, at::Tensor kv, at::Tensor z, at::Tensor kmax, double scale,
                    std::string kernel) {
    return performer::cuda::favor_step_inplace_cuda(q, k, v, f, bias, mask, kv, z, kmax, scale,
                                                    c10::string_view(kernel));
  });
  m.def("seed", [](unsigned s) { simt::seed(s); }, "seeds the order in which threads run each phase");
  m.def("set_sms", [](int n) { simt::st().sms = n; }, "the multiprocessor count the launches plan for");
  m.def("barriers", [] { return simt::st().barriers; }, "phases run so far (barriers and shuffles)");
}

// csrc/cuda/favor.cu compiled for the CPU on the SIMT emulator (simt.h), as a Python module with the
// CUDA entry points favor_forward_cuda / favor_backward_cuda taking CPU tensors. The test writes the
// source included here (favor_emulated.inc, in its build directory): favor.cu with its two CUDA-only
// spellings replaced, see tests/test_favor_cuda_simt.py.
#include <torch/extension.h>

#include "simt.h"
#include "favor_emulated.inc"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", [](at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor f, std::optional<at::Tensor> mask,
                      double scale, bool causal, std::string kernel) {
    return performer::cuda::favor_forward_cuda(q, k, v, f, mask, scale, causal, c10::string_view(kernel));
  });
  m.def("backward", [](at::Tensor g, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor f,
                       std::optional<at::Tensor> mask, at::Tensor out, at::Tensor state, at::Tensor den,
                       at::Tensor qs, at::Tensor ks, double scale, bool causal, std::string kernel) {
    return performer::cuda::favor_backward_cuda(g, q, k, v, f, mask, out, state, den, qs, ks, scale, causal,
                                                c10::string_view(kernel));
  });
  m.def("seed", [](unsigned s) { simt::seed(s); }, "seeds the order in which threads run each phase");
  m.def("set_sms", [](int n) { simt::st().sms = n; }, "the multiprocessor count the launches plan for");
  m.def("barriers", [] { return simt::st().barriers; }, "phases run so far (barriers and shuffles)");
}

"""The compiled FAVOR+ ops (torch.ops.performer.favor_forward / favor_backward): their fake
kernels, their autograd (see opdef.py), and the backend entry point."""
from __future__ import annotations

import torch

from ..._C_loader import cuda_kernels_reason, unavailable_reason
from . import opdef

_CUDA_REASON = cuda_kernels_reason("performer::favor_forward")
_STEP_CUDA_REASON = cuda_kernels_reason("performer::favor_step")


def cuda_reason(kernel: str = "softmax"):
    """Why the compiled ops cannot run on CUDA tensors, or None."""
    return _CUDA_REASON or opdef.gpu_kernel_reason(kernel)


def step_cuda_reason(kernel: str = "softmax"):
    """Why the compiled decoding step cannot run on CUDA tensors, or None."""
    return _STEP_CUDA_REASON or opdef.gpu_kernel_reason(kernel)

if unavailable_reason() is None:
    torch.library.register_fake("performer::favor_forward")(opdef.forward_fake)
    torch.library.register_fake("performer::favor_backward")(opdef.backward_fake)
    opdef.register_autograd("performer::favor_forward", torch.ops.performer.favor_backward)
    torch.library.register_fake("performer::moments")(opdef.moments_fake)
    torch.library.register_fake("performer::favor_step")(opdef.step_fake)
    torch.library.register_fake("performer::favor_step_")(opdef.step_inplace_fake)


def favor_cpp(args) -> torch.Tensor:
    out, *_ = torch.ops.performer.favor_forward(
        args.q, args.k, args.v, args.features, args.feature_bias, args.key_padding_mask, args.scale, args.causal,
        args.kernel)
    return out

"""The compiled op torch.ops.performer.blocked_matmul: its fake kernel, its autograd (the backward
is two more blocked products, on transposed views), and the backend entry point."""
from __future__ import annotations

import torch

from ..._C_loader import cuda_kernels_reason, unavailable_reason

OP_NAME = "performer::blocked_matmul"


_CUDA_REASON = cuda_kernels_reason(OP_NAME)


def cuda_reason():
    """Why the compiled op cannot run on CUDA tensors, or None."""
    return _CUDA_REASON


if unavailable_reason() is None:
    @torch.library.register_fake(OP_NAME)
    def _(a, b):
        torch._check(a.dim() == 3 and b.dim() == 3, lambda: "blocked_matmul takes (B, M, K) and (B, K, N)")
        torch._check(a.shape[0] == b.shape[0] and a.shape[2] == b.shape[1],
                     lambda: f"blocked_matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} do not match")
        return a.new_empty(a.shape[0], a.shape[1], b.shape[2])

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.ops.performer.blocked_matmul(grad, b.transpose(1, 2))
        if ctx.needs_input_grad[1]:
            grad_b = torch.ops.performer.blocked_matmul(a.transpose(1, 2), grad)
        return grad_a, grad_b

    torch.library.register_autograd(OP_NAME, _backward, setup_context=_setup_context)


def matmul_cpp(args) -> torch.Tensor:
    return torch.ops.performer.blocked_matmul(args.a, args.b)

"""The compiled ops torch.ops.performer.block_sparse_linear and block_sparse_linear_int8: their fake
kernels and autograd.

The float backward keeps the weight's sparsity: grad_values holds only the kept blocks (each
block's x-columns times its panel's output gradient), and grad_x = grad_y @ W with W unpacked.
The int8 op's weights are constants: it has gradients for x (through the dequantized weight; the
dynamic mode's rounding of x is passed straight through) and bias."""
from __future__ import annotations

import torch

from ..._C_loader import unavailable_reason
from .reference import block_rows, unpack_blocks, unpack_int8

OP_NAME = "performer::block_sparse_linear"
INT8_OP_NAME = "performer::block_sparse_linear_int8"


def block_sparse_linear_cpp(x, values, block_cols, row_ptr, bias, N):
    return torch.ops.performer.block_sparse_linear(x, values, block_cols, row_ptr, bias, N)


def block_sparse_linear_int8_cpp(x, values, scales, col_sums, block_cols, row_ptr, bias, N):
    return torch.ops.performer.block_sparse_linear_int8(x, values, scales, col_sums, block_cols, row_ptr, bias, N)


def grad_values(x: torch.Tensor, grad: torch.Tensor, block_cols: torch.Tensor, row_ptr: torch.Tensor,
                block: tuple[int, int], nnzb: int) -> torch.Tensor:
    """(nnzb, bc, br): d loss / d values for y = x W^T, grad = d loss / d y."""
    br, bc = block
    M, K = x.shape
    N = grad.shape[1]
    xb = torch.nn.functional.pad(x, (0, -K % bc)).view(M, -1, bc)             # (M, C, bc)
    gb = torch.nn.functional.pad(grad, (0, -N % br)).view(M, -1, br)          # (M, P, br)
    cols, rows = block_cols.long(), block_rows(row_ptr, nnzb)
    return torch.einsum("mbk,mbr->bkr", xb[:, cols], gb[:, rows])


# ---- fake kernels and autograd, shared by the C++ ops and the Triton ones (triton.py) ------------

def fake_float(x, values, block_cols, row_ptr, bias, N):
    torch._check(x.dim() == 2 and values.dim() == 3, lambda: "block_sparse_linear takes x (M, K), values (nnzb, bc, br)")
    return x.new_empty(x.shape[0], N)


def _setup_float(ctx, inputs, output):
    x, values, block_cols, row_ptr, bias, N = inputs
    ctx.save_for_backward(x, values, block_cols, row_ptr)
    ctx.N, ctx.has_bias = N, bias is not None


def _backward_float(ctx, grad):
    x, values, block_cols, row_ptr = ctx.saved_tensors
    need_x, need_values, _, _, need_bias, _ = ctx.needs_input_grad
    grad_x = grad_v = grad_b = None
    if need_x:
        grad_x = grad @ unpack_blocks(values, block_cols, row_ptr, ctx.N, x.shape[1])
    if need_values:
        grad_v = grad_values(x, grad, block_cols, row_ptr, (values.shape[2], values.shape[1]), values.shape[0])
    if need_bias and ctx.has_bias:
        grad_b = grad.sum(0)
    return grad_x, grad_v, None, None, grad_b, None


def fake_int8(x, values, scales, col_sums, block_cols, row_ptr, bias, N):
    torch._check(x.dim() == 2 and values.dim() == 4,
                 lambda: "block_sparse_linear_int8 takes x (M, K), values (nnzb, bc / 4, br, 4)")
    return x.new_empty(x.shape[0], N)


def _setup_int8(ctx, inputs, output):
    x, values, scales, col_sums, block_cols, row_ptr, bias, N = inputs
    ctx.save_for_backward(values, scales, block_cols, row_ptr)
    ctx.N, ctx.K, ctx.has_bias = N, x.shape[1], bias is not None


def _backward_int8(ctx, grad):
    values, scales, block_cols, row_ptr = ctx.saved_tensors
    grad_x = grad_b = None
    if ctx.needs_input_grad[0]:
        weight = unpack_int8(values, block_cols, row_ptr, ctx.N, ctx.K).to(grad.dtype) * scales[:, None].to(grad.dtype)
        grad_x = grad @ weight
    if ctx.needs_input_grad[6] and ctx.has_bias:
        grad_b = grad.sum(0)
    return grad_x, None, None, None, None, None, grad_b, None


def register_float(op_name: str, fake: bool = True) -> None:
    """The fake kernel (unless the op derives its own) and the autograd of a float block-sparse op."""
    if fake:
        torch.library.register_fake(op_name)(fake_float)
    torch.library.register_autograd(op_name, _backward_float, setup_context=_setup_float)


def register_int8(op_name: str, fake: bool = True) -> None:
    if fake:
        torch.library.register_fake(op_name)(fake_int8)
    torch.library.register_autograd(op_name, _backward_int8, setup_context=_setup_int8)


if unavailable_reason() is None:
    register_float(OP_NAME)
    register_int8(INT8_OP_NAME)

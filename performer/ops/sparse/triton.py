"""Block-sparse linear products in Triton, float and int8: ``torch.ops.performer.triton_block_sparse_linear``
and ``triton_block_sparse_linear_int8``, with the schemas, formats and results of the C++ ops
(performer/ops/sparse/reference.py describes the formats).

One program computes a (BLOCK_M rows, br outputs) tile of y: for each kept block of its panel, the
x tile of the block's bc inputs times the block, accumulated in float32 (int32 for the dynamic int8
mode); the empty blocks cost nothing. Blocks of at least 16 inputs go through ``tl.dot`` (tensor
cores for 16-bit and int8 inputs; float32 with "ieee" precision, no TF32), narrower ones through an
explicit product and sum.

Int8, dynamic mode: the rows of x are quantized by the same ``quantize_rows`` as the reference
(torch ops, on the device), then shifted to int8 (q - 128) so that both operands of the integer
product are signed: y = s_x s_w (sum (q - 128) Wq + (128 - z_x) col_sums) + bias, exactly the
C++ kernels' integer sums. Weight-only mode: the int8 block is converted to x's dtype and scaled
per output after the sum.

Where it runs, and how it is registered (a triton_op compiled, an opaque custom_op under the
interpreter): as performer/ops/matmul/triton.py. Fake kernels and autograd are the C++ ops'
(performer/ops/sparse/cpp.py).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ..._triton import DEVICES, INTERPRET, REGISTERED as _REGISTERED, tl, triton, unavailable_reason, wrap_triton
from .cpp import register_float, register_int8
from .reference import quantize_rows

OP_NAME = "performer::triton_block_sparse_linear"
INT8_OP_NAME = "performer::triton_block_sparse_linear_int8"

# bfloat16 arithmetic is not emulated correctly by the interpreter, so it is offered only compiled.
SUPPORTED_DTYPES: tuple = ((torch.float16, torch.float32) if INTERPRET
                           else (torch.float16, torch.bfloat16, torch.float32))
BLOCK_M = 16 if INTERPRET else 64

if _REGISTERED:

    @triton.jit
    def _block_product(x, w, acc, BC: tl.constexpr, INT: tl.constexpr):
        """acc + x [BLOCK_M, BC] @ w [BC, BR]."""
        if BC >= 16:
            if INT:
                acc = tl.dot(x, w, acc, out_dtype=tl.int32)
            else:
                acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc += tl.sum(x[:, :, None].to(acc.dtype) * w[None, :, :].to(acc.dtype), axis=1)
        return acc

    @triton.jit
    def _sparse_kernel(
        x_ptr, values_ptr, block_cols_ptr, row_ptr_ptr, bias_ptr, y_ptr,
        scales_ptr, col_sums_ptr, row_scale_ptr, row_shift_ptr,
        M, N, K, stride_xm, stride_xk,
        MODE: tl.constexpr,        # 0 float, 1 int8 weight-only, 2 int8 dynamic (x: q - 128, int8)
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
    ):
        """Grid: (ceil(N / BR) panels, ceil(M / BLOCK_M))."""
        panel = tl.program_id(0)
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)     # [BLOCK_M]
        rr = tl.arange(0, BR)                                       # [BR]
        rk = tl.arange(0, BC)                                       # [BC]
        rn = panel * BR + rr                                        # [BR] outputs
        mask_m = rm < M
        mask_n = rn < N
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm       # [BLOCK_M, 1]
        if MODE == 0:
            # float: values (nnzb, BC, BR), k-major
            w_offsets = rk[:, None] * BR + rr[None, :]              # [BC, BR]
        else:
            # int8: values (nnzb, BC / 4, BR, 4)
            w_offsets = ((rk[:, None] // 4) * BR + rr[None, :]) * 4 + rk[:, None] % 4   # [BC, BR]
        if MODE == 2:
            acc = tl.zeros((BLOCK_M, BR), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BR), dtype=tl.float32)
        # 64-bit block indices: nnzb * BC * BR may pass 2**31 elements.
        start = tl.load(row_ptr_ptr + panel).to(tl.int64)
        end = tl.load(row_ptr_ptr + panel + 1).to(tl.int64)
        for b in range(start, end):
            k = tl.load(block_cols_ptr + b) * BC + rk                # [BC]
            x = tl.load(x_rows + k[None, :] * stride_xk, mask=mask_m[:, None] & (k[None, :] < K),
                        other=0)                                     # [BLOCK_M, BC]
            w = tl.load(values_ptr + b * (BC * BR) + w_offsets)   # [BC, BR]
            if MODE == 1:
                w = w.to(x.dtype)
            acc = _block_product(x, w, acc, BC, MODE == 2)
        if MODE == 0:
            y = acc
        else:
            scales = tl.load(scales_ptr + rn, mask=mask_n, other=0.0)             # [BR]
            if MODE == 1:
                y = acc * scales[None, :]
            else:
                col_sums = tl.load(col_sums_ptr + rn, mask=mask_n, other=0)          # [BR]
                shift = tl.load(row_shift_ptr + rm, mask=mask_m, other=0)          # [BLOCK_M] 128 - z
                sums = acc + shift[:, None] * col_sums[None, :]                     # exact, int32
                row_scale = tl.load(row_scale_ptr + rm, mask=mask_m, other=0.0)   # [BLOCK_M]
                y = sums.to(tl.float32) * (row_scale[:, None] * scales[None, :])
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])


def _launch(x, values, block_cols, row_ptr, bias, N, mode, scales=None, col_sums=None):
    M, K = x.shape
    br = values.shape[2]
    bc = values.shape[1] if mode == 0 else 4 * values.shape[1]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    row_scale = row_shift = None
    if mode == 2:
        q, row_scale, zero = quantize_rows(x)
        x = (q.to(torch.int16) - 128).to(torch.int8)
        row_shift = 128 - zero
    values, block_cols, row_ptr = values.contiguous(), block_cols.contiguous(), row_ptr.contiguous()
    kernel = _sparse_kernel if INTERPRET else wrap_triton(_sparse_kernel)
    grid = (triton.cdiv(N, br), triton.cdiv(M, BLOCK_M))
    dummy = y  # never read: the pointer of an absent optional tensor
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](x, values, block_cols, row_ptr, dummy if bias is None else bias, y,
                     dummy if scales is None else scales, dummy if col_sums is None else col_sums,
                     dummy if row_scale is None else row_scale, dummy if row_shift is None else row_shift,
                     M, N, K, x.stride(0), x.stride(1),
                     MODE=mode, HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BR=br, BC=bc)
    return y


def _float_impl(x, values, block_cols, row_ptr, bias, N):
    return _launch(x, values, block_cols, row_ptr, bias, N, 0)


def _int8_impl(x, values, scales, col_sums, block_cols, row_ptr, bias, N):
    return _launch(x, values, block_cols, row_ptr, bias, N, 1 if col_sums is None else 2, scales, col_sums)


if _REGISTERED:
    _define = ((lambda name: torch.library.custom_op(name, mutates_args=())) if INTERPRET
               else (lambda name: torch.library.triton_op(name, mutates_args=())))

    @_define(OP_NAME)
    def _triton_block_sparse_linear(x: torch.Tensor, values: torch.Tensor, block_cols: torch.Tensor,
                                    row_ptr: torch.Tensor, bias: Optional[torch.Tensor], N: int) -> torch.Tensor:
        return _float_impl(x, values, block_cols, row_ptr, bias, N)

    @_define(INT8_OP_NAME)
    def _triton_block_sparse_linear_int8(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor,
                                         col_sums: Optional[torch.Tensor], block_cols: torch.Tensor,
                                         row_ptr: torch.Tensor, bias: Optional[torch.Tensor], N: int) -> torch.Tensor:
        return _int8_impl(x, values, scales, col_sums, block_cols, row_ptr, bias, N)

    register_float(OP_NAME, fake=INTERPRET)
    register_int8(INT8_OP_NAME, fake=INTERPRET)


def block_sparse_linear_triton(x, values, block_cols, row_ptr, bias, N):
    return torch.ops.performer.triton_block_sparse_linear(x, values, block_cols, row_ptr, bias, N)


def block_sparse_linear_int8_triton(x, values, scales, col_sums, block_cols, row_ptr, bias, N):
    return torch.ops.performer.triton_block_sparse_linear_int8(x, values, scales, col_sums, block_cols, row_ptr,
                                                               bias, N)


__all__ = ["DEVICES", "SUPPORTED_DTYPES", "block_sparse_linear_int8_triton", "block_sparse_linear_triton",
           "unavailable_reason"]

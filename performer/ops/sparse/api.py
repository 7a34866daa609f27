"""performer.ops.sparse.block_sparse_linear and block_sparse_linear_int8: validate -> dispatch -> run."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ... import _dispatch
from ..._C_loader import unavailable_reason
from ..._validate import FLOAT_DTYPES, _dtype_name, check_same_device, check_same_dtype, check_tensor
from . import triton as triton_backend
from .cpp import block_sparse_linear_cpp, block_sparse_linear_int8_cpp
from .reference import block_sparse_linear_int8_reference, block_sparse_linear_reference

OP = "block_sparse_linear"
INT8_OP = "block_sparse_linear_int8"
CPP_DTYPES = (torch.float32, torch.float64)


class _OnX:
    """The device and dtype the dispatcher checks: x's."""

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype


@dataclass(frozen=True)
class SparseLinearArgs(_OnX):
    x: torch.Tensor           # (M, K)
    values: torch.Tensor      # (nnzb, bc, br)
    block_cols: torch.Tensor  # (nnzb,) int32
    row_ptr: torch.Tensor     # (P + 1,) int32
    bias: Optional[torch.Tensor]
    N: int

    def tensors(self):
        return self.x, self.values, self.block_cols, self.row_ptr, self.bias, self.N


def _cpp_check(args) -> Optional[str]:
    """Both formats: values (nnzb, bc, br) float or (nnzb, bc / 4, br, 4) int8."""
    if args.values.shape[2] % 16:
        return f"needs blocks of a multiple of 16 rows; got {args.values.shape[2]}"
    return None


_dispatch.register(OP, _dispatch.Backend(
    name="cpp", devices=("cpu",), dtypes=CPP_DTYPES, available=unavailable_reason, check=_cpp_check,
    run=lambda a: block_sparse_linear_cpp(*a.tensors())))


def _triton_check(args) -> Optional[str]:
    """Both formats: values (nnzb, bc, br) float or (nnzb, bc / 4, br, 4) int8."""
    br, bc = args.values.shape[2], args.values.shape[1] * (4 if args.values.dim() == 4 else 1)
    if br not in (16, 32, 64) or bc not in (4, 8, 16, 32, 64):
        return f"needs blocks of 16, 32 or 64 rows and 4 to 64 (a power of 2) columns; got ({br}, {bc})"
    return None


_dispatch.register(OP, _dispatch.Backend(
    name="triton", devices=triton_backend.DEVICES, dtypes=triton_backend.SUPPORTED_DTYPES,
    available=triton_backend.unavailable_reason, check=_triton_check,
    run=lambda a: triton_backend.block_sparse_linear_triton(*a.tensors())))
_dispatch.register(OP, _dispatch.Backend(
    name="torch", devices=("cpu", "cuda", "mps", "xpu"), dtypes=FLOAT_DTYPES,
    run=lambda a: block_sparse_linear_reference(*a.tensors(), dtype=None)))


def _check_x(x) -> torch.Tensor:
    x = check_tensor("x", x, min_dim=2)
    if x.dim() != 2:
        raise ValueError(f"x must have shape (M, K); got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must have a floating-point dtype; got {_dtype_name(x.dtype)}")
    return x


def _check_vector(name, t, x, n, layout, dtype=None):
    """t: (n,) on x's device, in ``dtype`` (default: x's); ``layout`` names n, e.g. "(N,)"."""
    check_tensor(name, t)
    if dtype is None:
        check_same_dtype(name, t, "x", x)
    elif t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {_dtype_name(dtype)}; got {_dtype_name(t.dtype)}")
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape {layout} = ({n},); got shape {tuple(t.shape)}")
    check_same_device(name, t, "x", x)


def _check_format(x, nnzb, block, block_cols, row_ptr, bias, N) -> None:
    br, bc = block
    if not isinstance(N, int) or N < 0:
        raise ValueError(f"N must be an int >= 0; got {N!r}")
    _check_vector("block_cols", block_cols, x, nnzb, "(nnzb,)", torch.int32)
    _check_vector("row_ptr", row_ptr, x, math.ceil(N / br) + 1, "(ceil(N / br) + 1,)", torch.int32)
    if bias is not None:
        _check_vector("bias", bias, x, N, "(N,)")


def validate_block_sparse_linear(x, values, block_cols, row_ptr, bias, N) -> SparseLinearArgs:
    x = _check_x(x)
    values = check_tensor("values", values)
    if values.dim() != 3:
        raise ValueError(f"values must have shape (nnzb, bc, br); got shape {tuple(values.shape)}")
    check_same_dtype("values", values, "x", x)
    check_same_device("values", values, "x", x)
    _check_format(x, values.shape[0], (values.shape[2], values.shape[1]), block_cols, row_ptr, bias, N)
    return SparseLinearArgs(x, values, block_cols, row_ptr, bias, N)


def block_sparse_linear(x: torch.Tensor, values: torch.Tensor, block_cols: torch.Tensor, row_ptr: torch.Tensor,
                        bias: Optional[torch.Tensor], N: int, *, backend: Optional[str] = None) -> torch.Tensor:
    """y = x W^T + bias with W (N, K) in the block-sparse format of performer/ops/sparse/reference.py.

    Args:
        x: (M, K), float32 or float64 for the "cpp" kernels (any float dtype for "torch").
        values, block_cols, row_ptr: the kept (br, bc) blocks (``pack_blocks``).
        bias: (N,) or None. N: output features.
        backend: None picks "cpp" on the CPU, "triton" on CUDA, "torch" (unpack, then a dense
            product) elsewhere.

    Returns (M, N) in x's dtype; differentiable in x, values and bias.
    """
    args = validate_block_sparse_linear(x, values, block_cols, row_ptr, bias, N)
    return _dispatch.select(OP, args, backend).run(args)


# ---- int8 ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Int8LinearArgs(_OnX):
    x: torch.Tensor            # (M, K) float
    values: torch.Tensor       # (nnzb, bc / 4, br, 4) int8
    scales: torch.Tensor       # (N,) float32
    col_sums: Optional[torch.Tensor]  # (N,) int32: dynamic mode; None: weight-only
    block_cols: torch.Tensor
    row_ptr: torch.Tensor
    bias: Optional[torch.Tensor]
    N: int

    def tensors(self):
        return self.x, self.values, self.scales, self.col_sums, self.block_cols, self.row_ptr, self.bias, self.N


# The integer sums of the dynamic mode are 32-bit: K products of at most 255 x 127 each.
INT8_MAX_K = (2 ** 31 - 1) // (255 * 127)


_dispatch.register(INT8_OP, _dispatch.Backend(
    name="cpp", devices=("cpu",), dtypes=(torch.float32,), available=unavailable_reason, check=_cpp_check,
    run=lambda a: block_sparse_linear_int8_cpp(*a.tensors())))
_dispatch.register(INT8_OP, _dispatch.Backend(
    name="triton", devices=triton_backend.DEVICES, dtypes=triton_backend.SUPPORTED_DTYPES,
    available=triton_backend.unavailable_reason, check=_triton_check,
    run=lambda a: triton_backend.block_sparse_linear_int8_triton(*a.tensors())))
_dispatch.register(INT8_OP, _dispatch.Backend(
    name="torch", devices=("cpu", "cuda", "mps", "xpu"), dtypes=FLOAT_DTYPES,
    run=lambda a: block_sparse_linear_int8_reference(*a.tensors())))


def validate_block_sparse_linear_int8(x, values, scales, col_sums, block_cols, row_ptr, bias, N) -> Int8LinearArgs:
    x = _check_x(x)
    values = check_tensor("values", values)
    if values.dtype != torch.int8:
        raise TypeError(f"values must have dtype int8; got {_dtype_name(values.dtype)}")
    if values.dim() != 4 or values.shape[3] != 4:
        raise ValueError(f"values must have shape (nnzb, bc / 4, br, 4); got shape {tuple(values.shape)}")
    check_same_device("values", values, "x", x)
    _check_vector("scales", scales, x, N, "(N,)", torch.float32)
    if col_sums is not None:
        _check_vector("col_sums", col_sums, x, N, "(N,)", torch.int32)
        if x.shape[1] > INT8_MAX_K:
            raise ValueError(f"x must have at most {INT8_MAX_K} columns when its rows are quantized (32-bit "
                             f"integer sums); got shape {tuple(x.shape)}")
    _check_format(x, values.shape[0], (values.shape[2], 4 * values.shape[1]), block_cols, row_ptr, bias, N)
    return Int8LinearArgs(x, values, scales, col_sums, block_cols, row_ptr, bias, N)


def block_sparse_linear_int8(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor,
                             col_sums: Optional[torch.Tensor], block_cols: torch.Tensor, row_ptr: torch.Tensor,
                             bias: Optional[torch.Tensor], N: int, *, backend: Optional[str] = None) -> torch.Tensor:
    """y = x (scales Wq)^T + bias with int8 Wq (N, K) in the block-sparse format of
    performer/ops/sparse/reference.py (``pack_int8``).

    Args:
        x: (M, K), float32 for the "cpp" kernels (any float dtype for "torch").
        values: (nnzb, bc / 4, br, 4) int8, the kept blocks in groups of 4 inputs.
        scales: (N,) float32, per output.
        col_sums: (N,) int32, the sums of Wq's rows: x's rows are then quantized to uint8 at run
            time (``quantize_rows``) and the products are integer; None: x stays float
            (weight-only).
        block_cols, row_ptr: the kept blocks' indices. bias: (N,) in x's dtype or None.
        backend: None picks "cpp" on the CPU, "triton" on CUDA, "torch" (the reference) elsewhere.

    Returns (M, N) in x's dtype; differentiable in x (through the dequantized weight) and bias.
    """
    args = validate_block_sparse_linear_int8(x, values, scales, col_sums, block_cols, row_ptr, bias, N)
    return _dispatch.select(INT8_OP, args, backend).run(args)

"""performer.ops.sparse.block_sparse_linear: validate -> dispatch -> run."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ... import _dispatch
from ..._C_loader import unavailable_reason
from ..._validate import FLOAT_DTYPES, _dtype_name, check_same_device, check_same_dtype, check_tensor
from .cpp import block_sparse_linear_cpp
from .reference import block_sparse_linear_reference

OP = "block_sparse_linear"
CPP_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class SparseLinearArgs:
    x: torch.Tensor           # (M, K)
    values: torch.Tensor      # (nnzb, bc, br)
    block_cols: torch.Tensor  # (nnzb,) int32
    row_ptr: torch.Tensor     # (P + 1,) int32
    bias: Optional[torch.Tensor]
    N: int

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    def tensors(self):
        return self.x, self.values, self.block_cols, self.row_ptr, self.bias, self.N


def _cpp_check(args: SparseLinearArgs) -> Optional[str]:
    if args.values.shape[2] % 16:
        return f"needs blocks of a multiple of 16 rows; got {args.values.shape[2]}"
    return None


_dispatch.register(OP, _dispatch.Backend(
    name="cpp", devices=("cpu",), dtypes=CPP_DTYPES, available=unavailable_reason, check=_cpp_check,
    run=lambda a: block_sparse_linear_cpp(*a.tensors())))
_dispatch.register(OP, _dispatch.Backend(
    name="torch", devices=("cpu", "cuda", "mps", "xpu"), dtypes=FLOAT_DTYPES,
    run=lambda a: block_sparse_linear_reference(*a.tensors(), dtype=None)))


def validate_block_sparse_linear(x, values, block_cols, row_ptr, bias, N) -> SparseLinearArgs:
    x = check_tensor("x", x, min_dim=2)
    values = check_tensor("values", values)
    if x.dim() != 2:
        raise ValueError(f"x must have shape (M, K); got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must have a floating-point dtype; got {_dtype_name(x.dtype)}")
    if values.dim() != 3:
        raise ValueError(f"values must have shape (nnzb, bc, br); got shape {tuple(values.shape)}")
    check_same_dtype("values", values, "x", x)
    check_same_device("values", values, "x", x)
    nnzb, bc, br = values.shape
    P, C = math.ceil(N / br), math.ceil(x.shape[1] / bc)
    for name, t, n in (("block_cols", block_cols, nnzb), ("row_ptr", row_ptr, P + 1)):
        check_tensor(name, t)
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must have dtype int32; got {_dtype_name(t.dtype)}")
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},); got shape {tuple(t.shape)}")
        check_same_device(name, t, "x", x)
    if bias is not None:
        check_tensor("bias", bias)
        check_same_dtype("bias", bias, "x", x)
        check_same_device("bias", bias, "x", x)
        if bias.shape != (N,):
            raise ValueError(f"bias must have shape (N,) = ({N},); got shape {tuple(bias.shape)}")
    return SparseLinearArgs(x, values, block_cols, row_ptr, bias, N)


def block_sparse_linear(x: torch.Tensor, values: torch.Tensor, block_cols: torch.Tensor, row_ptr: torch.Tensor,
                        bias: Optional[torch.Tensor], N: int, *, backend: Optional[str] = None) -> torch.Tensor:
    """y = x W^T + bias with W (N, K) in the block-sparse format of performer/ops/sparse/reference.py.

    Args:
        x: (M, K), float32 or float64 for the "cpp" kernels (any float dtype for "torch").
        values, block_cols, row_ptr: the kept (br, bc) blocks (``pack_blocks``).
        bias: (N,) or None. N: output features.
        backend: None picks "cpp" on the CPU, "torch" (unpack, then a dense product) elsewhere.

    Returns (M, N) in x's dtype; differentiable in x, values and bias.
    """
    args = validate_block_sparse_linear(x, values, block_cols, row_ptr, bias, N)
    return _dispatch.select(OP, args, backend).run(args)

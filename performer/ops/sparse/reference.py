"""The block-sparse weight format and the plain-PyTorch product the kernels are checked against.

A weight W (N, K) (nn.Linear's (out_features, in_features)) is cut into (br, bc) blocks: br output
features by bc inputs. Only the kept blocks are stored, by block row ("panel" p: outputs
p*br .. p*br + br - 1), in CSR order:

    values     (nnzb, bc, br)   block b, k-major: values[b, kk, r] = W[p*br + r, block_cols[b]*bc + kk]
    block_cols (nnzb,) int32    the block's column of bc inputs
    row_ptr    (P + 1,) int32   panel p's blocks are row_ptr[p] .. row_ptr[p + 1] - 1; P = ceil(N / br)

Edge blocks are zero-padded past N and K. k-major blocks let the micro-kernel load a vector of
br outputs per input (csrc/cpu/sparse_kernel.h).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


class BlockSparse(NamedTuple):
    values: torch.Tensor
    block_cols: torch.Tensor
    row_ptr: torch.Tensor


def block_grid(weight: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """(P, C, bc, br) view of the zero-padded (N, K) weight's blocks, k-major."""
    br, bc = block
    N, K = weight.shape
    P, C = math.ceil(N / br), math.ceil(K / bc)
    padded = F.pad(weight, (0, C * bc - K, 0, P * br - N))
    return padded.view(P, br, C, bc).permute(0, 2, 3, 1)


def pack_blocks(weight: torch.Tensor, block: tuple[int, int], keep: Optional[torch.Tensor] = None) -> BlockSparse:
    """The kept blocks of ``weight`` (N, K): those marked in ``keep`` (P, C) bool, or by default
    every block with a nonzero weight."""
    grid = block_grid(weight, block)
    if keep is None:
        keep = grid.ne(0).any(dim=3).any(dim=2)
    kept = keep.nonzero()                                   # (nnzb, 2), panel-major
    values = grid[kept[:, 0], kept[:, 1]].contiguous()      # (nnzb, bc, br)
    row_ptr = F.pad(keep.sum(dim=1).cumsum(0), (1, 0))
    return BlockSparse(values, kept[:, 1].to(torch.int32), row_ptr.to(torch.int32))


def block_rows(row_ptr: torch.Tensor, nnzb: int) -> torch.Tensor:
    """(nnzb,) int64: each block's panel."""
    panels = torch.arange(row_ptr.numel() - 1, device=row_ptr.device)
    return torch.repeat_interleave(panels, (row_ptr[1:] - row_ptr[:-1]).long(), output_size=nnzb)


def unpack_blocks(values: torch.Tensor, block_cols: torch.Tensor, row_ptr: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The dense (N, K) weight."""
    nnzb, bc, br = values.shape
    P, C = row_ptr.numel() - 1, math.ceil(K / bc)
    grid = values.new_zeros(P, C, bc, br)
    grid[block_rows(row_ptr, nnzb), block_cols.long()] = values
    return grid.permute(0, 3, 1, 2).reshape(P * br, C * bc)[:N, :K]


def block_sparse_linear_reference(x: torch.Tensor, values: torch.Tensor, block_cols: torch.Tensor,
                                  row_ptr: torch.Tensor, bias: Optional[torch.Tensor], N: int,
                                  dtype: Optional[torch.dtype] = torch.float64) -> torch.Tensor:
    """x (M, K) @ W^T + bias, computed in ``dtype`` (float64: the ground truth; None: x's dtype)
    and returned in it."""
    dtype = dtype or x.dtype
    weight = unpack_blocks(values.to(dtype), block_cols, row_ptr, N, x.shape[-1])
    return F.linear(x.to(dtype), weight, None if bias is None else bias.to(dtype))

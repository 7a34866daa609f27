"""The block-sparse weight format and the plain-PyTorch product the kernels are checked against.

A weight W (N, K) (nn.Linear's (out_features, in_features)) is cut into (br, bc) blocks: br output
features by bc inputs. Only the kept blocks are stored, by block row ("panel" p: outputs
p*br .. p*br + br - 1), in CSR order:

    values     (nnzb, bc, br)   block b, k-major: values[b, kk, r] = W[p*br + r, block_cols[b]*bc + kk]
    block_cols (nnzb,) int32    the block's column of bc inputs
    row_ptr    (P + 1,) int32   panel p's blocks are row_ptr[p] .. row_ptr[p + 1] - 1; P = ceil(N / br)

Edge blocks are zero-padded past N and K. k-major blocks let the micro-kernel load a vector of
br outputs per input (csrc/cpu/sparse_kernel.h).

Int8 weights (``quantize_weight``: W ~ scales[n] Wq[n, k], symmetric, per output) use the same
blocks and indices with each block in groups of 4 inputs, the layout of the u8 x s8 dot-product
instructions (csrc/cpu/int8_kernel.h):

    values     (nnzb, bc / 4, br, 4) int8   values[b, g, r, j] = Wq[p*br + r, block_cols[b]*bc + 4g + j]
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


# ---- int8 ----------------------------------------------------------------------------------------

def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output int8: (Wq (N, K) int8 in [-127, 127], scales (N,) float32) with
    W ~ scales[:, None] * Wq; a zero row gets scale 1."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1) / 127 if w.shape[1] else w.new_ones(w.shape[0])
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def to_groups_of_4(values: torch.Tensor) -> torch.Tensor:
    """k-major blocks (nnzb, bc, br) -> (nnzb, bc / 4, br, 4)."""
    nnzb, bc, br = values.shape
    return values.view(nnzb, bc // 4, 4, br).transpose(2, 3).contiguous()


def from_groups_of_4(values: torch.Tensor) -> torch.Tensor:
    """(nnzb, bc / 4, br, 4) -> k-major blocks (nnzb, bc, br)."""
    nnzb, groups, br, _ = values.shape
    return values.transpose(2, 3).reshape(nnzb, groups * 4, br)


def pack_int8(weight: torch.Tensor, block: tuple[int, int], keep: Optional[torch.Tensor] = None):
    """(BlockSparse with int8 values (nnzb, bc / 4, br, 4), scales (N,)) of ``weight`` (N, K)
    float: the blocks kept as in ``pack_blocks`` (by default those with a nonzero weight),
    quantized per output."""
    if block[1] % 4:
        raise ValueError(f"block must have a multiple of 4 columns for int8; got {tuple(block)}")
    if keep is None:
        keep = block_grid(weight, block).ne(0).any(dim=3).any(dim=2)
    q, scales = quantize_weight(weight)
    packed = pack_blocks(q, block, keep)
    return BlockSparse(to_groups_of_4(packed.values), packed.block_cols, packed.row_ptr), scales


def unpack_int8(values: torch.Tensor, block_cols: torch.Tensor, row_ptr: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The dense (N, K) int8 Wq."""
    return unpack_blocks(from_groups_of_4(values), block_cols, row_ptr, N, K)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dynamic mode's per-row quantization of x (M, K) float32: (q (M, K) uint8, scale (M,),
    zero (M,) int32) with x ~ scale (q - zero) over each row's range widened to include 0, rounded
    to nearest even in float32, as the kernels do; a zero row gets scale 1, a row holding an inf or
    a NaN scale NaN."""
    x = x.float()
    lo = x.amin(dim=1).clamp(max=0) if x.shape[1] else x.new_zeros(x.shape[0])
    hi = x.amax(dim=1).clamp(min=0) if x.shape[1] else x.new_zeros(x.shape[0])
    scale = (hi - lo) / 255
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    bad = ~torch.isfinite(x).all(dim=1)
    inv = 1 / scale
    zero = torch.round(-lo * inv).clamp(0, 255)
    q = (torch.round(x * inv[:, None]) + zero[:, None]).clamp(0, 255)
    q = torch.where(bad[:, None], torch.zeros_like(q), q)
    scale = torch.where(bad, torch.full_like(scale, float("nan")), scale)
    zero = torch.where(bad, torch.zeros_like(zero), zero)
    return q.to(torch.uint8), scale, zero.to(torch.int32)


def block_sparse_linear_int8_reference(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor,
                                       col_sums: Optional[torch.Tensor], block_cols: torch.Tensor,
                                       row_ptr: torch.Tensor, bias: Optional[torch.Tensor], N: int) -> torch.Tensor:
    """What block_sparse_linear_int8 computes, in x's dtype: with ``col_sums`` (dynamic mode) the
    exact integer sums of the rows quantized by ``quantize_rows`` and the float32 scaling the
    kernels apply; without (weight-only) x (scales Wq)^T in float64."""
    wq = unpack_int8(values, block_cols, row_ptr, N, x.shape[1]).double()
    if col_sums is None:
        y = F.linear(x.double(), wq * scales.double()[:, None])
    else:
        q, scale, zero = quantize_rows(x)
        sums = (q.double() @ wq.t()).long() - zero.long()[:, None] * col_sums.long()[None, :]   # exact
        y = sums.float() * (scale[:, None] * scales.float()[None, :])
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype)

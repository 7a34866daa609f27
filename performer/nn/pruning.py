"""Block-magnitude pruning of linear layers, on torch.nn.utils.prune's reparametrization.

A pruned layer holds ``weight_orig`` (the Parameter optimizers train) and the buffer
``weight_mask``; a forward pre-hook sets ``weight = weight_orig * weight_mask`` before every call,
exactly as ``torch.nn.utils.prune`` does. Masks remove whole (rows x cols) blocks of the
(out_features, in_features) weight, the unit the block-sparse kernels skip.

A block's score is the mean absolute value (criterion "l1") or the root mean square ("l2") of its
weights in the current masked weight, so already-pruned blocks score 0 and stay pruned when the
sparsity is raised step by step; edge blocks of shapes that the block does not divide are scored
by their own element count. ``sparsity`` is the fraction of blocks removed, rounded to whole
blocks. Scopes: "layer" removes that fraction from each layer; "global" ranks the blocks of all
layers together by their scores, as ``torch.nn.utils.prune.global_unstructured`` does (a layer
whose weights are smaller overall, e.g. one with a larger fan-in, can lose every block); "lamp"
ranks them together by layer-adaptive scores (LAMP, Lee et al. 2021: a block's squared score over
the sum of the squared scores of the blocks of its layer that score at least as high), which
compares layers of any weight scale and keeps each layer's strongest block.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

from .._validate import check_choice

CRITERIA = ("l1", "l2")
SCOPES = ("layer", "global", "lamp")


def check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a float in [0, 1); got {type(sparsity).__name__}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1) (the fraction of weight blocks removed); got {sparsity}")
    return float(sparsity)


def check_block(block, supported_rows: Iterable[int], supported_cols: Iterable[int]) -> tuple[int, int]:
    rows, cols = tuple(supported_rows), tuple(supported_cols)
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or any(isinstance(b, bool) or not isinstance(b, int) for b in block)):
        raise TypeError(f"block must be a (rows, cols) pair of ints; got {block!r}")
    if block[0] not in rows or block[1] not in cols:
        raise ValueError(f"block must be (rows, cols) with rows in {rows} and cols in {cols} (the shapes the "
                         f"block-sparse kernels run); got {tuple(block)}")
    return int(block[0]), int(block[1])


def effective_weight(linear: nn.Linear) -> torch.Tensor:
    """The weight the layer computes with: weight_orig * weight_mask when pruned."""
    if hasattr(linear, "weight_mask"):
        return linear.weight_orig.detach() * linear.weight_mask
    return linear.weight.detach()


def block_scores(weight: torch.Tensor, block: tuple[int, int], criterion: str) -> torch.Tensor:
    """(ceil(N / rows), ceil(K / cols)) scores of the blocks of an (N, K) weight."""
    rows, cols = block
    w = weight.detach().float()
    w = w.abs() if criterion == "l1" else w * w
    N, K = w.shape
    padded = F.pad(w, (0, -K % cols, 0, -N % rows))
    sums = padded.unflatten(0, (-1, rows)).unflatten(2, (-1, cols)).sum(dim=(1, 3))
    counts = F.pad(torch.ones_like(w), (0, -K % cols, 0, -N % rows)).unflatten(0, (-1, rows)) \
        .unflatten(2, (-1, cols)).sum(dim=(1, 3))
    mean = sums / counts
    return mean if criterion == "l1" else mean.sqrt()


def lamp_scores(scores: torch.Tensor) -> torch.Tensor:
    """LAMP scores of one layer's block scores: s_u^2 / sum of s_v^2 over the blocks v with s_v >=
    s_u (ties in position order); 0 for a zero block."""
    sq = scores.flatten().double().square()
    order = torch.argsort(sq, stable=True)
    ranked = sq[order]
    tail = ranked.flip(0).cumsum(0).flip(0)
    lamp = torch.empty_like(sq)
    lamp[order] = torch.where(tail > 0, ranked / tail.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    return lamp.view_as(scores)


def _element_mask(keep_blocks: torch.Tensor, block: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    rows, cols = block
    mask = keep_blocks.repeat_interleave(rows, dim=0).repeat_interleave(cols, dim=1)
    return mask[:shape[0], :shape[1]]


def _apply_mask(linear: nn.Linear, mask: torch.Tensor) -> None:
    weight = effective_weight(linear)
    mask = mask.to(device=weight.device, dtype=weight.dtype)
    if hasattr(linear, "weight_mask"):  # pruned before: one reparametrization, a new mask
        linear.weight_mask.copy_(mask)
        linear.weight = linear.weight_orig * linear.weight_mask
    else:
        torch_prune.custom_from_mask(linear, "weight", mask)


def prune_linears(layers: list[nn.Linear], sparsity: float, block: tuple[int, int], criterion: str,
                  scope: str) -> list[float]:
    """Mask the lowest-scoring blocks of each layer (scope "layer") or of all layers together
    ("global", "lamp"); returns each layer's fraction of blocks removed."""
    check_choice("criterion", criterion, CRITERIA)
    check_choice("scope", scope, SCOPES)
    scores = [block_scores(effective_weight(layer), block, criterion) for layer in layers]
    if scope == "lamp":
        scores = [lamp_scores(s) for s in scores]
    if scope in ("global", "lamp"):
        flat = torch.cat([s.flatten() for s in scores])
        cut = _cut(flat, sparsity)
        keeps = [c.view_as(s) for c, s in zip(torch.split(cut, [s.numel() for s in scores]), scores)]
    else:
        keeps = [_cut(s.flatten(), sparsity).view_as(s) for s in scores]
    removed = []
    for layer, keep in zip(layers, keeps):
        _apply_mask(layer, _element_mask(keep, block, effective_weight(layer).shape))
        layer.prune_block = block
        removed.append(1.0 - keep.float().mean().item())
    return removed


def _cut(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask removing the round(sparsity * n) lowest scores (ties broken by position)."""
    n_remove = int(round(sparsity * scores.numel()))
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_remove:
        keep[torch.argsort(scores, stable=True)[:n_remove]] = False
    return keep


def is_pruned(linear: nn.Module) -> bool:
    return hasattr(linear, "weight_mask") and hasattr(linear, "weight_orig")


def remove_reparametrization(linear: nn.Linear) -> None:
    """Make the masked weight the layer's plain ``weight`` Parameter again (torch_prune.remove)."""
    if is_pruned(linear):
        torch_prune.remove(linear, "weight")


def block_of(linear: nn.Module) -> Optional[tuple[int, int]]:
    return getattr(linear, "prune_block", None)


def density_of(linear: nn.Module) -> float:
    return float(linear.weight_mask.float().mean()) if is_pruned(linear) else 1.0

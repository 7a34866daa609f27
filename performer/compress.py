"""performer.prune and performer.compress: shrink every linear layer of a model."""
from __future__ import annotations

import logging
from typing import Sequence

from torch import nn

from .nn import pruning
from .nn.linear import DEFAULT_BLOCK, SUPPORTED_BLOCKS

log = logging.getLogger("performer")


def _linears(model: nn.Module, skip: Sequence[str]) -> list[tuple[str, nn.Linear]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
        raise TypeError(f"skip must be a sequence of module names; got {skip!r}")
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(name == s or name.startswith(s + ".") for s in skip)]


def prune(model: nn.Module, sparsity: float, *, block: tuple[int, int] = DEFAULT_BLOCK, criterion: str = "l1",
          scope: str = "global", skip: Sequence[str] = ()) -> nn.Module:
    """Block-magnitude pruning of every ``nn.Linear`` (``BlockedLinear`` included) in ``model``
    except those named in ``skip`` (and their children): the ``sparsity`` fraction of (rows, cols)
    weight blocks is masked, ranked across all layers (``scope="global"``, so that layers that
    matter less lose more) or within each layer (``"layer"``). Masks use torch.nn.utils.prune's
    ``weight_orig`` / ``weight_mask`` reparametrization, so training continues as before; see
    performer.nn.pruning. Returns the model."""
    sparsity = pruning.check_sparsity(sparsity)
    block = pruning.check_block(block, *SUPPORTED_BLOCKS)
    layers = _linears(model, skip)
    if not layers:
        raise ValueError(f"model has no nn.Linear layers to prune (skip={tuple(skip)!r})")
    removed = pruning.prune_linears([m for _, m in layers], sparsity, block, criterion, scope)
    log.info("performer.prune: %d linear layers, block %s, %s scope: %.1f%% of blocks removed (per layer %s)",
             len(layers), block, scope, 100 * sparsity,
             ", ".join(f"{name or '<model>'} {100 * r:.0f}%" for (name, _), r in zip(layers, removed)))
    return model

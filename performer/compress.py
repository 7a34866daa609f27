"""performer.prune and performer.compress: shrink every linear layer of a model."""
from __future__ import annotations

import logging
from typing import Optional, Sequence

from torch import nn

from .convert import replace_modules
from .nn import pruning
from .nn.compressed import DEFAULT_BLOCK, SUPPORTED_BLOCKS, CompressedLinear

log = logging.getLogger("performer")


def _linears(model: nn.Module, skip: Sequence[str]) -> list[tuple[str, nn.Linear]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
        raise TypeError(f"skip must be a sequence of module names; got {skip!r}")
    # nn.MultiheadAttention reads its out_proj's weight without calling the module, so neither the
    # pruning mask's pre-forward hook nor a compressed layer's kernel would run there.
    unused = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and id(m) not in unused
            and not any(name == s or name.startswith(s + ".") for s in skip)]


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


def compress(model: nn.Module, sparsity: Optional[float] = None, *, block: tuple[int, int] = DEFAULT_BLOCK,
             criterion: str = "l1", scope: str = "global", skip: Sequence[str] = ()) -> nn.Module:
    """Put a ``CompressedLinear`` (only the kept weight blocks, run by the block-sparse kernels) in
    place of every ``nn.Linear`` of ``model`` except those named in ``skip``. With ``sparsity``,
    prune first (``performer.prune`` with ``block``, ``criterion`` and ``scope``); without it every
    layer must have been pruned already. Logs each layer's density and the weight sizes before and
    after (logger ``performer``). Returns the model (or its replacement, when it is a linear layer)."""
    layers = _linears(model, skip)
    if not layers:
        raise ValueError(f"model has no nn.Linear layers to compress (skip={tuple(skip)!r})")
    if sparsity is not None:
        prune(model, sparsity, block=block, criterion=criterion, scope=scope, skip=skip)
    unpruned = [name or "<model>" for name, m in layers if not pruning.is_pruned(m)]
    if unpruned:
        raise ValueError(f"compress() needs pruned layers: pass sparsity= or call performer.prune first; not "
                         f"pruned: {', '.join(unpruned[:8])}{' ...' if len(unpruned) > 8 else ''}")
    wanted = {id(m) for _, m in layers}
    model, new = replace_modules(model, lambda m: id(m) in wanted,
                                 lambda m: CompressedLinear.from_linear(m, backend=getattr(m, "backend", None)))
    new_ids = {id(m) for m in new}
    report = [(name or "<model>", m) for name, m in model.named_modules() if id(m) in new_ids]
    dense = sum(m.in_features * m.out_features for m in new)
    kept = sum(m.values.numel() for m in new)
    log.info("performer.compress: %d linear layers as block-sparse: weights %.2f -> %.2f M values (%.1f%%); "
             "density per layer %s", len(new), dense / 1e6, kept / 1e6, 100 * kept / max(dense, 1),
             ", ".join(f"{name} {m.density:.2f}" for name, m in report))
    return model

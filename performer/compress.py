"""performer.prune and performer.compress: shrink every linear layer of a model."""
from __future__ import annotations

import logging
import warnings
from typing import Optional, Sequence

from torch import nn

from ._validate import check_choice
from .convert import replace_modules
from .nn import pruning
from .nn.compressed import DEFAULT_BLOCK, SUPPORTED_BLOCKS, CompressedLinear
from .nn.quantized import ACTIVATIONS, Int8Linear, check_int8_source

log = logging.getLogger("performer")


def _linears(model: nn.Module, skip: Sequence[str], compressed: bool = False) -> list[tuple[str, nn.Module]]:
    """The nn.Linear layers of ``model`` (and its CompressedLinear layers when ``compressed``) not
    named in ``skip``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
        raise TypeError(f"skip must be a sequence of module names; got {skip!r}")
    # nn.MultiheadAttention reads its out_proj's weight without calling the module, so neither the
    # pruning mask's pre-forward hook nor a compressed layer's kernel would run there.
    unused = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    return [(name, m) for name, m in model.named_modules()
            if (isinstance(m, nn.Linear) or (compressed and isinstance(m, CompressedLinear))) and id(m) not in unused
            and not any(name == s or name.startswith(s + ".") for s in skip)]


def _weight_bytes(layer: nn.Module) -> int:
    """The bytes of the weight a layer stores: the kept blocks of a compressed one."""
    if isinstance(layer, (CompressedLinear, Int8Linear)):
        return layer.values.numel() * layer.values.element_size()
    return layer.weight.numel() * layer.weight.element_size()


def prune(model: nn.Module, sparsity: float, *, block: tuple[int, int] = DEFAULT_BLOCK, criterion: str = "l1",
          scope: str = "global", skip: Sequence[str] = ()) -> nn.Module:
    """Block-magnitude pruning of every ``nn.Linear`` (``BlockedLinear`` included) in ``model``
    except those named in ``skip`` (and their children): the ``sparsity`` fraction of (rows, cols)
    weight blocks is masked, ranked across all layers by magnitude (``scope="global"``, so that
    layers that matter less lose more; a layer with smaller weights overall can lose all of them,
    which warns), across all layers by layer-adaptive (LAMP) scores that compare layers of any
    weight scale (``"lamp"``), or within each layer (``"layer"``). Masks use torch.nn.utils.prune's
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
    emptied = [name or "<model>" for (name, _), r in zip(layers, removed) if r == 1.0]
    if emptied and sparsity > 0:
        warnings.warn(f"performer.prune removed every block of {', '.join(emptied)} (its weights are smaller than "
                      f"the other layers'); scope='lamp' ranks layers of different weight scales", stacklevel=2)
    return model


def compress(model: nn.Module, sparsity: Optional[float] = None, *, quantize: Optional[str] = None,
             activations: Optional[str] = "dynamic", block: tuple[int, int] = DEFAULT_BLOCK, criterion: str = "l1",
             scope: str = "global", skip: Sequence[str] = ()) -> nn.Module:
    """Put a compressed layer in place of every ``nn.Linear`` of ``model`` except those named in
    ``skip``: a ``CompressedLinear`` (only the kept weight blocks, run by the block-sparse
    kernels), or with ``quantize="int8"`` an ``Int8Linear`` (int8 weights with per-output scales;
    ``activations="dynamic"`` quantizes each input row at run time, ``None`` keeps it float; the
    model's CompressedLinear layers are quantized too, keeping their blocks).

    With ``sparsity``, prune first (``performer.prune`` with ``block``, ``criterion`` and
    ``scope``). Without it, a float CompressedLinear needs layers pruned already; int8 quantizes
    pruned layers' kept blocks and dense layers whole. Logs each layer's density and the weight
    bytes before and after (logger ``performer``). Returns the model (or its replacement, when it
    is a linear layer)."""
    check_choice("quantize", quantize, (None, "int8"))
    check_choice("activations", activations, ACTIVATIONS)
    layers = _linears(model, skip, compressed=quantize is not None)
    if not layers:
        raise ValueError(f"model has no nn.Linear layers to compress (skip={tuple(skip)!r})")
    if quantize is not None:
        for name, m in layers:
            dtype = m.values.dtype if isinstance(m, CompressedLinear) else m.weight.dtype
            check_int8_source(f"layer {name or '<model>'}'s weight", dtype)
    if sparsity is not None and any(isinstance(m, CompressedLinear) for _, m in layers):
        raise ValueError("sparsity must be None for a model with CompressedLinear layers (they are pruned already)")
    if sparsity is not None:
        prune(model, sparsity, block=block, criterion=criterion, scope=scope, skip=skip)
    unpruned = [name or "<model>" for name, m in layers if isinstance(m, nn.Linear) and not pruning.is_pruned(m)]
    if unpruned and quantize is None:
        raise ValueError(f"compress() needs pruned layers: pass sparsity= or call performer.prune first; not "
                         f"pruned: {', '.join(unpruned[:8])}{' ...' if len(unpruned) > 8 else ''}")
    bytes_before = sum(_weight_bytes(m) for _, m in layers)
    if quantize is None:
        def make(m):
            return CompressedLinear.from_linear(m, backend=getattr(m, "backend", None))
    else:
        def make(m):
            if isinstance(m, CompressedLinear):
                return m.quantize(quantize, activations=activations)
            return Int8Linear.from_linear(m, activations=activations, block=None if pruning.is_pruned(m) else block,
                                          backend=getattr(m, "backend", None))
    wanted = {id(m) for _, m in layers}
    model, new = replace_modules(model, lambda m: id(m) in wanted, make)
    new_ids = {id(m) for m in new}
    report = [(name or "<model>", m) for name, m in model.named_modules() if id(m) in new_ids]
    bytes_after = sum(_weight_bytes(m) for m in new)
    log.info("performer.compress: %d linear layers as %s: weights %.2f -> %.2f MB (%.1f%%); density per layer %s",
             len(new), "block-sparse" if quantize is None else f"{quantize} ({activations or 'weight-only'})",
             bytes_before / 1e6, bytes_after / 1e6, 100 * bytes_after / max(bytes_before, 1),
             ", ".join(f"{name} {m.density:.2f}" for name, m in report))
    return model

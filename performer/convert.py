"""performer.convert: swap every nn.MultiheadAttention in a model for a PerformerAttention."""
from __future__ import annotations

import copy
import logging
import warnings
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from ._validate import validate_feature_options
from .feature_maps import FeatureMap
from .features import FeatureSampler
from .nn.attention import PerformerAttention

log = logging.getLogger("performer")

# Attention modules convert() does not replace, by the package that defines them: how to use FAVOR+ there.
_INTEGRATIONS = {
    "transformers": "Hugging Face models take FAVOR+ through performer.integrations.hf: call "
                    "performer.integrations.hf.register() once, then model.set_attn_implementation('favor') "
                    "(or attn_implementation='favor' in from_config/from_pretrained)",
    "timm": "timm models take FAVOR+ through performer.integrations.timm: call "
            "performer.integrations.timm.convert(model)",
}


def convert(model: nn.Module, *, num_features: int = 256, kernel: str = "softmax",
            generator: Optional[torch.Generator] = None, feature_redraw_interval: Optional[int] = None,
            inplace: bool = True, strict: bool = False, feature_map: Optional[FeatureMap] = None,
            feature_sampler: Optional[FeatureSampler] = None) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` in ``model`` (those inside nn.Transformer and its
    encoder/decoder layers included) by a ``PerformerAttention`` with the same configuration that
    shares its parameters (``PerformerAttention.from_multihead_attention``); returns the model.

    Args:
        model: any module; an nn.MultiheadAttention itself is returned converted.
        num_features, kernel, feature_redraw_interval, feature_sampler: for every new PerformerAttention
            (see performer.nn.RandomFeatures).
        generator: draws every module's initial features (and later redraws), in module order;
            None: each module seeds its own generator from the global RNG.
        inplace: False converts a deep copy and leaves ``model`` untouched.
        strict: raise a ValueError when nothing was replaced, instead of warning.
        feature_map: a ``performer.FeatureMap`` (FAVOR++, rescaling, key centering); each new module
            gets its own copy (their statistics differ). ``performer.calibrate`` adds one itself.

    Logs (logger "performer", level INFO) how many modules it replaced. When it replaced none, it
    warns (UserWarning), naming the attention classes it found in the model and which integration
    handles them (Hugging Face models: ``performer.integrations.hf``).

    A module shared by several parents stays shared. Encoder layers holding a PerformerAttention
    are kept off torch's fused inference path (see ``disable_fused_encoder_paths``). Attention
    weights are no longer available: the converted modules reject need_weights=True and masks
    other than key padding and the causal mask (see PerformerAttention).
    """
    model, options = prepare(model, num_features, kernel, feature_redraw_interval, generator, inplace, strict,
                             feature_sampler)
    if feature_map is not None and not isinstance(feature_map, FeatureMap):
        raise TypeError(f"feature_map must be a performer.FeatureMap or None; got {type(feature_map).__name__}")
    model, converted = replace_modules(
        model, lambda m: isinstance(m, nn.MultiheadAttention),
        lambda m: PerformerAttention.from_multihead_attention(
            m, **options, feature_map=copy.deepcopy(feature_map) if feature_map is not None else None))
    if not converted:
        message = _nothing_replaced(model)
        if strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
    else:
        log.info("performer.convert: replaced %d nn.MultiheadAttention module(s) with PerformerAttention",
                 len(converted))
    disable_fused_encoder_paths(model)
    return model


def prepare(model: nn.Module, num_features: int, kernel: str, feature_redraw_interval: Optional[int],
            generator: Optional[torch.Generator], inplace: bool, strict: bool,
            feature_sampler: Optional[FeatureSampler] = None) -> tuple[nn.Module, dict]:
    """The checks every convert function makes: (the model to convert, a deep copy unless
    ``inplace``; the feature options for each new module)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    validate_feature_options(num_features, kernel, feature_redraw_interval, generator, feature_sampler)
    for name, flag in (("inplace", inplace), ("strict", strict)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool; got {type(flag).__name__}")
    options = dict(num_features=num_features, kernel=kernel, feature_redraw_interval=feature_redraw_interval,
                   generator=generator, feature_sampler=feature_sampler)
    return (model if inplace else copy.deepcopy(model)), options


def replace_modules(model: nn.Module, wanted: Callable[[nn.Module], bool],
                    make: Callable[[nn.Module], nn.Module]) -> tuple[nn.Module, list[nn.Module]]:
    """Put ``make(m)`` in place of every module ``m`` of ``model`` with ``wanted(m)``, ``model``
    itself included, in module order (so a generator draws features in that order); a module shared
    by several parents stays shared. Returns (the model, or its replacement; the new modules)."""
    converted: dict[int, nn.Module] = {}

    def swap(module: nn.Module) -> nn.Module:
        if id(module) not in converted:
            converted[id(module)] = make(module)
        return converted[id(module)]

    if wanted(model):
        return swap(model), list(converted.values())
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):  # named_children() would skip a repeated child
            if child is not None and wanted(child):
                setattr(parent, name, swap(child))
    return model, list(converted.values())


def count_classes(classes: Iterable[type]) -> str:
    """'module.Class xN, ...' for ``classes`` (one entry per module), in order of first appearance."""
    names = [f"{c.__module__}.{c.__qualname__}" for c in classes]
    return ", ".join(f"{n} x{names.count(n)}" for n in dict.fromkeys(names))


def _nothing_replaced(model: nn.Module) -> str:
    """Why convert() replaced nothing: the attention-like classes found, and who handles them."""
    found: dict[str, list[nn.Module]] = {}
    for module in model.modules():
        if "attention" in type(module).__name__.lower() and not isinstance(module, PerformerAttention):
            found.setdefault(type(module).__module__.split(".")[0], []).append(module)
    if not found:
        return (f"performer.convert replaced nothing: {type(model).__name__} has no nn.MultiheadAttention "
                "(nor any other attention module)")
    lines = []
    for package, modules in found.items():
        counted = count_classes(type(m) for m in modules)
        hint = _INTEGRATIONS.get(package, "convert() replaces only nn.MultiheadAttention; use "
                                 "performer.nn.PerformerAttention or performer.favor_attention in their place")
        lines.append(f"{counted}: {hint}")
    return (f"performer.convert replaced nothing: {type(model).__name__} has no nn.MultiheadAttention; found "
            + "; ".join(lines))


def disable_fused_encoder_paths(model: nn.Module) -> nn.Module:
    """Keep encoder layers whose ``self_attn`` is a PerformerAttention on their module path.

    In eval mode without autograd, nn.TransformerEncoderLayer may skip ``self_attn.forward`` and
    run torch's fused kernel (exact softmax attention) on ``self_attn``'s weights, and
    nn.TransformerEncoder may turn padded batches into nested tensors for it. The layer takes that
    path only for a relu/gelu activation it recognized at construction (``activation_relu_or_gelu``),
    so clearing that flag keeps it on the module path (the activation itself is unchanged); the
    encoder's ``use_nested_tensor`` is cleared likewise. ``convert`` calls this; call it after
    placing PerformerAttention modules into encoder layers by hand. Returns the model.
    """
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and isinstance(module.self_attn, PerformerAttention):
            module.activation_relu_or_gelu = 0
        if isinstance(module, nn.TransformerEncoder) and any(
                isinstance(layer.self_attn, PerformerAttention) for layer in module.layers):
            module.use_nested_tensor = False
    return model

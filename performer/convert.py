"""performer.convert: swap every nn.MultiheadAttention in a model for a PerformerAttention."""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from ._validate import validate_feature_options
from .nn.attention import PerformerAttention


def convert(model: nn.Module, *, num_features: int = 256, kernel: str = "softmax",
            generator: Optional[torch.Generator] = None, feature_redraw_interval: Optional[int] = None,
            inplace: bool = True) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` in ``model`` (those inside nn.Transformer and its
    encoder/decoder layers included) by a ``PerformerAttention`` with the same configuration that
    shares its parameters (``PerformerAttention.from_multihead_attention``); returns the model.

    Args:
        model: any module; an nn.MultiheadAttention itself is returned converted.
        num_features, kernel, feature_redraw_interval: for every new PerformerAttention.
        generator: draws every module's initial features (and later redraws), in module order;
            None: each module seeds its own generator from the global RNG.
        inplace: False converts a deep copy and leaves ``model`` untouched.

    A module shared by several parents stays shared. Encoder layers holding a PerformerAttention
    are kept off torch's fused inference path (see ``disable_fused_encoder_paths``). Attention
    weights are no longer available: the converted modules reject need_weights=True and masks
    other than key padding and the causal mask (see PerformerAttention).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    validate_feature_options(num_features, kernel, feature_redraw_interval, generator)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool; got {type(inplace).__name__}")
    if not inplace:
        model = copy.deepcopy(model)

    options = dict(num_features=num_features, kernel=kernel, feature_redraw_interval=feature_redraw_interval,
                   generator=generator)
    if isinstance(model, nn.MultiheadAttention):
        return PerformerAttention.from_multihead_attention(model, **options)
    converted: dict[int, PerformerAttention] = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):  # named_children() would skip a repeated child
            if isinstance(child, nn.MultiheadAttention):
                if id(child) not in converted:
                    converted[id(child)] = PerformerAttention.from_multihead_attention(child, **options)
                setattr(parent, name, converted[id(child)])
    disable_fused_encoder_paths(model)
    return model


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

"""FAVOR+ attention in timm models.

    import timm
    import performer.integrations.timm as favor_timm
    model = timm.create_model("vit_small_patch16_224", pretrained=False)
    favor_timm.convert(model, num_features=256)     # every supported attention module, in place

``convert`` swaps each of timm's self-attention modules that share ``timm.layers.Attention``'s
layout (a q/k/v projection, optional q/k norms and rotary embeddings, SDPA, an optional output
norm and gate, ``proj``) for a FAVOR+ subclass of the same class: the new module holds the very
parameters, buffers and submodules of the old one, so every state_dict key stays and an optimizer
holding the parameters keeps training them. Supported: ``timm.layers.Attention`` (ViT, DeiT, ...),
``timm.layers.AttentionRope`` (grouped-query heads included) and ``timm.models.eva.EvaAttention``
(EVA, ...). Other attention classes (relative position biases, windows, 2-D attention) are left
as they are and named in a warning.

Each converted module adds the buffer ``features`` (see ``performer.nn.RandomFeatures``: drawn from
``generator``, redrawn with ``redraw_features``); a timm state_dict without it loads strictly and
keeps the features. ``attn_mask`` may be None, key padding (a bool or additive mask that hides
whole keys) or padding plus causal; other masks raise, since FAVOR+ never forms the attention
matrix they would apply to. Dropout (``attn_drop``) applies to the attention output in training.
"""
from __future__ import annotations

import copy
import logging
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

try:
    import timm
    from timm.layers import Attention, AttentionRope
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat
    from timm.models.eva import EvaAttention
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("performer.integrations.timm needs timm >= 1.0.20 (pip install timm; with a CPU-only torch, "
                      "install torchvision from the same CPU index as torch first, see the README)") from exc

from .._validate import validate_feature_options
from ..convert import count_classes, prepare, replace_modules
from ..features import FeatureSampler
from ..nn.features import RandomFeatures
from ..ops.favor import favor_attention
from ._masks import reduce_mask

__all__ = ["FavorAttention", "FavorAttentionRope", "FavorEvaAttention", "convert"]

log = logging.getLogger("performer")


class _FavorTimmAttention(RandomFeatures):
    """What the FAVOR+ subclasses of timm's attention classes share: the features, the attention
    core in place of SDPA, and the output path (norm, gate, proj) of timm's forward."""

    timm_class: type  # the timm attention class a subclass converts

    @classmethod
    def from_timm(cls, module: nn.Module, *, num_features: int = 256, kernel: str = "softmax",
                  feature_redraw_interval: Optional[int] = None,
                  generator: Optional[torch.Generator] = None,
                  feature_sampler: Optional[FeatureSampler] = None) -> "_FavorTimmAttention":
        """A FAVOR+ module holding ``module``'s parameters, buffers and submodules (the same
        objects), in its mode; ``module`` itself is left unchanged."""
        base = cls.timm_class
        if type(module) is not base:
            raise TypeError(f"module must be a {base.__module__}.{base.__qualname__}; got "
                            f"{type(module).__module__}.{type(module).__qualname__}")
        missing = [a for a in ("num_heads", "head_dim", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop")
                   if not hasattr(module, a)]
        if missing:
            raise TypeError(f"{base.__qualname__} of timm {timm.__version__} lacks {missing}; "
                            "performer.integrations.timm needs timm >= 1.0.20")
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        for registry in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
            setattr(new, registry, copy.copy(getattr(module, registry)))
        like = next(module.parameters())
        new._init_features(num_features, module.head_dim, kernel, feature_redraw_interval, generator,
                           like.device, like.dtype, feature_sampler=feature_sampler)
        return new

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                is_causal: bool) -> torch.Tensor:
        """FAVOR+ in place of timm's SDPA call: q (B, H, N, D), k and v (B, Hk, N, D) -> (B, H, N, D)."""
        B, _, N, _ = q.shape
        padding, causal = None, None
        if attn_mask is not None:
            if attn_mask.dim() > 4:
                raise ValueError(f"attn_mask must have at most 4 dims (batch, heads, N, N); got shape "
                                 f"{tuple(attn_mask.shape)}")
            mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))  # as SDPA broadcasts
            try:
                mask = mask.expand(mask.shape[0], mask.shape[1], N, N)
            except RuntimeError:
                raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (batch, heads, "
                                 f"N, N) with N={N}") from None
            padding, causal = reduce_mask(mask, B, N, N, name="attn_mask")
        out = favor_attention(q, k, v, is_causal=bool(is_causal or causal), scale=self.scale,
                              features=self._features_for_forward(), key_padding_mask=padding, kernel=self.kernel)
        return F.dropout(out, self.attn_drop.p, self.training)

    def _output(self, out: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
        B, _, N, _ = out.shape
        x = self.norm(out.transpose(1, 2).reshape(B, N, -1))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def _gate(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        gate = getattr(self, "gate", None)
        return gate(x).sigmoid() if gate is not None else None

    def _rope(self, q, k, v, rope):
        if rope is None:
            return q, k
        npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        return q, k

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + "features" in missing_keys:  # a timm state_dict: keep the features
            missing_keys.remove(prefix + "features")

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, num_features={self.num_features}, "
                f"kernel={self.kernel!r}, feature_redraw_interval={self.feature_redraw_interval}")


def _split_heads(t: torch.Tensor, B: int, N: int, heads: int) -> torch.Tensor:
    return t.reshape(B, N, heads, -1).transpose(1, 2)


class FavorAttention(_FavorTimmAttention, Attention):
    """``timm.layers.Attention`` computing FAVOR+ attention (ViT, DeiT and most timm transformers)."""
    timm_class = Attention

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self._gate(x)
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        return self._output(self._attend(q, k, v, attn_mask, is_causal), gate)


class FavorAttentionRope(_FavorTimmAttention, AttentionRope):
    """``timm.layers.AttentionRope`` computing FAVOR+ attention; grouped-query heads stay grouped
    (FAVOR+ takes fewer key/value heads as they are, with no repeat)."""
    timm_class = AttentionRope

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self._gate(x)
        if self.qkv is not None:
            q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = _split_heads(self.q_proj(x), B, N, self.num_heads)
            k = _split_heads(self.k_proj(x), B, N, self.num_kv_heads)
            v = _split_heads(self.v_proj(x), B, N, self.num_kv_heads)
        q, k = self._rope(self.q_norm(q), self.k_norm(k), v, rope)
        return self._output(self._attend(q, k, v, attn_mask, is_causal), gate)


class FavorEvaAttention(_FavorTimmAttention, EvaAttention):
    """``timm.models.eva.EvaAttention`` computing FAVOR+ attention (EVA and its relatives)."""
    timm_class = EvaAttention

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self._gate(x)
        if self.qkv is not None:
            if self.q_bias is None:
                qkv = self.qkv(x)
            else:
                bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
                qkv = self.qkv(x) + bias if self.qkv_bias_separate else F.linear(x, self.qkv.weight, bias)
            q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (_split_heads(p(x), B, N, self.num_heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self._rope(self.q_norm(q), self.k_norm(k), v, rope)
        return self._output(self._attend(q, k, v, attn_mask, is_causal), gate)


# timm class -> its FAVOR+ subclass; exact types only (a subclass of these may compute otherwise).
CONVERSIONS: dict[type, type] = {c.timm_class: c for c in (FavorAttention, FavorAttentionRope, FavorEvaAttention)}


def convert(model: nn.Module, *, num_features: int = 256, kernel: str = "softmax",
            generator: Optional[torch.Generator] = None, feature_redraw_interval: Optional[int] = None,
            inplace: bool = True, strict: bool = False, feature_sampler: Optional[FeatureSampler] = None) -> nn.Module:
    """Replace every supported timm attention module of ``model`` (see the module docstring) by
    its FAVOR+ subclass sharing its parameters; returns the model (the new module when ``model``
    is itself an attention module). Options as ``performer.convert``: ``num_features``, ``kernel``,
    ``feature_redraw_interval``, ``feature_sampler``, ``generator`` (draws every module's features
    in module order), ``inplace=False`` converts a deep copy.

    Logs (logger "performer", INFO) how many modules of each class it replaced; warns naming the
    attention classes it left unchanged (UserWarning), or raises a ValueError with ``strict=True``
    when it replaced nothing."""
    model, options = prepare(model, num_features, kernel, feature_redraw_interval, generator, inplace, strict,
                             feature_sampler)
    model, converted = replace_modules(model, lambda m: type(m) in CONVERSIONS,
                                       lambda m: CONVERSIONS[type(m)].from_timm(m, **options))
    left = count_classes(type(m) for m in model.modules()
                         if "attention" in type(m).__name__.lower() and not isinstance(m, _FavorTimmAttention))
    if not converted:
        message = (f"performer.integrations.timm.convert replaced nothing: {type(model).__name__} has no "
                   f"{', '.join(c.__qualname__ for c in CONVERSIONS)}" + (f"; found {left}" if left else ""))
        if strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
        return model
    log.info("performer.integrations.timm.convert: replaced %s with FAVOR+",
             count_classes(m.timm_class for m in converted))
    if left:
        warnings.warn(f"performer.integrations.timm.convert left attention modules it does not support unchanged "
                      f"(they still compute exact attention): {left}", stacklevel=2)
    return model


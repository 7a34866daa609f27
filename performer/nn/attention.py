"""FAVOR+ attention modules: FastAttention (the core on (B, H, N, D) tensors) and
PerformerAttention (a drop-in for nn.MultiheadAttention)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .._validate import validate_attention_config, validate_attention_inputs
from ..feature_maps import FeatureMap
from ..features import FeatureSampler
from ..ops.favor import FavorState, favor_attention_step
from .features import RandomFeatures


class FastAttention(RandomFeatures):
    """FAVOR+ attention on (B, H, N, D) query, key and value (any (..., N, D) layout that
    ``performer.favor_attention`` takes, grouped-query heads included), with its own random
    features of shape (num_features, dim_head); see RandomFeatures for the redraw options.

    ``forward(q, k, v, key_padding_mask=None)``: key_padding_mask bool (B, S), True = ignore that
    key; returns (B, H, N, Dv). Softmax temperature 1/sqrt(dim_head). ``feature_map``: see
    RandomFeatures.
    """

    def __init__(self, dim_head: int, num_features: int = 256, causal: bool = False, kernel: str = "softmax", *,
                 feature_redraw_interval: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 feature_map: Optional[FeatureMap] = None, feature_sampler: Optional[FeatureSampler] = None,
                 device=None, dtype=None):
        super().__init__()
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool; got {type(causal).__name__}")
        self.causal = causal
        self._init_features(num_features, dim_head, kernel, feature_redraw_interval, generator, device, dtype,
                            feature_map, feature_sampler)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._run_favor(q, k, v, self.causal, key_padding_mask)

    def extra_repr(self) -> str:
        return (f"dim_head={self.features.shape[1]}, num_features={self.num_features}, causal={self.causal}, "
                f"kernel={self.kernel!r}, feature_redraw_interval={self.feature_redraw_interval}")


@dataclass
class DecodingCache:
    """What one PerformerAttention has seen of a sequence being generated: pass the same cache
    (one per attention module) with each new piece of the sequence; the module updates ``state``.
    Its size does not grow with the sequence."""

    state: Optional[FavorState] = None

    def reset(self) -> None:
        self.state = None


class PerformerAttention(RandomFeatures):
    """A drop-in for ``nn.MultiheadAttention`` computing FAVOR+ attention, linear in the sequence
    length (Choromanski et al., "Rethinking Attention with Performers").

    The constructor and ``forward`` take nn.MultiheadAttention's arguments and the module has its
    parameters (``in_proj_weight``, or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when
    kdim or vdim differ from embed_dim, ``in_proj_bias``, ``out_proj``, ``bias_k``/``bias_v``), so an
    nn.MultiheadAttention state_dict loads unchanged (the features are then kept).
    ``from_multihead_attention`` converts a module. Keyword-only options:

    - num_features: random features per head (m); more features, closer to softmax attention.
    - kernel: "softmax" approximates softmax attention, "softmax_normalized" too with lower variance (each
      key's features divided by their sum; see performer.favor_attention); "relu" is generalized attention.
    - feature_redraw_interval, generator, feature_map, feature_sampler: see RandomFeatures.

    Differences from nn.MultiheadAttention, where FAVOR+ has no attention matrix:

    - need_weights defaults to False and True raises; forward returns ``(output, None)``.
    - attn_mask must be None or the causal mask (bool True or float -inf above the diagonal);
      it is then applied as is_causal=True. Other masks raise. key_padding_mask may be bool
      (True = ignore) or float with 0 and -inf, as nn.MultiheadAttention accepts.
    - dropout is applied to the attention output (per head, before out_proj) in training mode,
      not to attention weights.
    - add_bias_kv and add_zero_attn work for bidirectional attention only.

    Autoregressive decoding: ``forward(..., cache=DecodingCache())`` treats query, key and value as
    the next positions of one sequence (self-attention, L == S) and attends causally over everything
    the cache has seen; the cost per position does not depend on the sequence length so far.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None, *,
                 num_features: int = 256, kernel: str = "softmax", feature_redraw_interval: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, feature_map: Optional[FeatureMap] = None,
                 feature_sampler: Optional[FeatureSampler] = None):
        super().__init__()
        validate_attention_config(embed_dim, num_heads, dropout, kdim, vdim)
        factory = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout, self.batch_first, self.add_zero_attn = float(dropout), bool(batch_first), bool(add_zero_attn)

        # nn.MultiheadAttention's parameters, names and initialization.
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.register_parameter("in_proj_weight", None)
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()
        self._init_features(num_features, self.head_dim, kernel, feature_redraw_interval, generator, device, dtype,
                            feature_map, feature_sampler)

    def _reset_parameters(self) -> None:
        for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if w is not None:
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    @classmethod
    def from_multihead_attention(cls, mha: nn.MultiheadAttention, *, num_features: int = 256,
                                 kernel: str = "softmax", feature_redraw_interval: Optional[int] = None,
                                 generator: Optional[torch.Generator] = None,
                                 feature_map: Optional[FeatureMap] = None,
                                 feature_sampler: Optional[FeatureSampler] = None) -> "PerformerAttention":
        """A PerformerAttention with ``mha``'s configuration, sharing its parameters (the same
        Parameter objects, so an optimizer that holds them keeps training them), in its mode."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be a torch.nn.MultiheadAttention; got {type(mha).__name__}")
        weight = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, bias=mha.in_proj_bias is not None,
                  add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim, vdim=mha.vdim,
                  batch_first=mha.batch_first, device=weight.device, dtype=weight.dtype, num_features=num_features,
                  kernel=kernel, feature_redraw_interval=feature_redraw_interval, generator=generator,
                  feature_map=feature_map, feature_sampler=feature_sampler)
        for name, param in mha.named_parameters(recurse=False):
            setattr(new, name, param)
        new.out_proj = mha.out_proj
        return new.train(mha.training)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + "features" in missing_keys:  # an nn.MultiheadAttention state_dict: keep the features
            missing_keys.remove(prefix + "features")

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False, *, cache: Optional[DecodingCache] = None) -> tuple[torch.Tensor, None]:
        """Shapes as nn.MultiheadAttention: query (L, N, E), or (N, L, E) with batch_first, or
        (L, E) unbatched; key (S, N, kdim), value (S, N, vdim) likewise; key_padding_mask (N, S)
        ((S,) unbatched). Returns (output shaped like query, None). ``average_attn_weights`` has
        no effect (there are no weights). ``cache``: see the class docstring."""
        if cache is not None and not isinstance(cache, DecodingCache):
            raise TypeError(f"cache must be a performer.nn.DecodingCache or None; got {type(cache).__name__}")
        x = validate_attention_inputs(
            query, key, value, key_padding_mask, need_weights, attn_mask, is_causal, embed_dim=self.embed_dim,
            kdim=self.kdim, vdim=self.vdim, num_heads=self.num_heads, batch_first=self.batch_first,
            decoding=cache is not None, extra_keys=self.bias_k is not None or self.add_zero_attn)
        q, k, v = self._project(x.query, x.key, x.value)
        mask = x.key_padding_mask
        if self.bias_k is not None or self.add_zero_attn:
            k, v, mask = self._append_keys(k, v, mask)
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            out, cache.state = favor_attention_step(q, k, v, cache.state, features=self._features_for_forward(),
                                                    kernel=self.kernel, key_padding_mask=mask, inplace=True,
                                                    feature_map=self.feature_map)
        else:
            out = self._run_favor(q, k, v, x.causal, mask)
        out = F.dropout(out.transpose(1, 2).flatten(2), self.dropout, self.training)  # (N, L, E)
        return x.to_caller_layout(self.out_proj(out)), None

    def merge_masks(self, attn_mask, key_padding_mask, query):
        """nn.MultiheadAttention's helper, called here only by nn.TransformerEncoderLayer's fused
        inference path, which would run exact attention on this module's weights: refuse."""
        raise RuntimeError(
            "nn.TransformerEncoderLayer took its fused inference path, which computes exact softmax attention "
            "from self_attn's weights instead of calling PerformerAttention; call "
            "performer.disable_fused_encoder_paths(model) after placing PerformerAttention modules in encoder "
            "layers (performer.convert does)")

    def _project(self, query, key, value):
        """The input projections: (N, *, E_in) -> (N, *, embed_dim) each."""
        if self._qkv_same_embed_dim and query is key and key is value:  # self-attention: one product
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _append_keys(self, k, v, mask):
        """add_bias_kv appends the learned key/value, then add_zero_attn a zero one (nn.MultiheadAttention's
        order); every query sees them."""
        extra_k, extra_v = [], []
        if self.bias_k is not None:
            extra_k.append(self.bias_k.to(k.dtype).expand(k.shape[0], 1, -1))
            extra_v.append(self.bias_v.to(v.dtype).expand(v.shape[0], 1, -1))
        if self.add_zero_attn:
            extra_k.append(k.new_zeros(k.shape[0], 1, k.shape[2]))
            extra_v.append(v.new_zeros(v.shape[0], 1, v.shape[2]))
        if mask is not None:
            mask = F.pad(mask, (0, len(extra_k)), value=False)
        return torch.cat([k, *extra_k], dim=1), torch.cat([v, *extra_v], dim=1), mask

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_features={self.num_features}, "
                f"kernel={self.kernel!r}, batch_first={self.batch_first}, dropout={self.dropout}, "
                f"feature_redraw_interval={self.feature_redraw_interval}")

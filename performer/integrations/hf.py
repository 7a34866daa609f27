"""FAVOR+ attention in Hugging Face transformers models.

    import performer.integrations.hf as favor_hf
    favor_hf.register()                                   # once: attn_implementation="favor"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="favor")
    out = model.generate(ids, past_key_values=favor_hf.FavorCache(), max_new_tokens=32)

``register`` adds an attention function to ``transformers.AttentionInterface`` and a mask
function to ``transformers.AttentionMaskInterface`` under one name. Without the mask function,
transformers would build no mask at all for an unknown implementation and padding would be lost.

Masks. The mask function hands the attention function the 2-D padding mask (True = attend) of the
keys that call sees; causal comes from the attention module (``module.is_causal``, or the
``is_causal`` the model passes). A 4-D mask given by the caller (bool, or float with 0 and large
negative values) is reduced to padding and, where it is exactly that, causal; any other pattern
(sliding windows, packed sequences, additive biases) raises a ValueError, since FAVOR+ never forms
the attention matrix such a mask would apply to.

Features. Each attention module gets its own (num_features, head_dim) projection in the
non-persistent buffer ``favor_features``, drawn from a generator seeded with the seed and the
module's layer index (``module.layer_idx``, or its rank among the model's attention modules when
``prepare`` numbered them). The buffer is not in the state_dict: a saved model reloads with the
same features, because they are a function of (seed, layer index). The seed is the registered one,
unless the model's config has ``favor_seed``; ``redraw_features(model, seed)`` sets that field and
redraws every module, and ``save_pretrained`` keeps it with the config.

Calibration. ``performer.calibrate(model, batches)`` works on these models too: each attention
module then gets a ``performer.FeatureMap`` in the submodule ``favor_feature_map`` and trained
per-head features in the parameter ``favor_features`` (both in the state_dict from then on).

Generation. ``FavorCache`` is a transformers ``Cache`` that keeps, per layer, the fixed-size
``performer.FavorState`` instead of the keys and values: each new token costs the same whatever
the prefix. With transformers' own caches (DynamicCache), generation works too, with causal
attention over the cached keys (queries bottom-right aligned), at a cost that grows with the prefix.
"""
from __future__ import annotations

import warnings
import zlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

try:
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.masking_utils import AttentionMaskInterface, bidirectional_mask_function, causal_mask_function
    from transformers.configuration_utils import PreTrainedConfig
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("performer.integrations.hf needs Hugging Face transformers >= 5 "
                      "(pip install 'transformers>=5')") from exc

from .._validate import KERNELS, check_choice, check_feature_sampler, check_positive_int
from ..features import FeatureSampler, sample_features
from ..ops.favor import FavorState, favor_attention, favor_attention_step
from ._masks import reduce_mask

__all__ = ["FavorCache", "FavorCacheLayer", "prepare", "redraw_features", "register"]

FEATURES = "favor_features"     # the buffer each attention module gets (a parameter once calibrated)
FEATURE_MAP = "favor_feature_map"  # the FeatureMap submodule performer.calibrate gives it
_LAYER_KWARG = "favor_cache_layer"  # how a FavorCacheLayer reaches the attention function of its layer
# Keyword arguments of transformers' attention functions that FAVOR+ cannot honour when set.
_UNSUPPORTED = {
    "head_mask": "FAVOR+ has no attention weights to mask per head",
    "position_bias": "FAVOR+ cannot add a bias to attention logits it never forms",
    "softcap": "FAVOR+ cannot cap attention logits it never forms",
    "sliding_window": "FAVOR+ attends over the whole prefix; a sliding window needs a mask it cannot apply",
    "s_aux": "FAVOR+ has no softmax denominator to add attention sinks to",
}


def register(name: str = "favor", *, num_features: int = 256, kernel: str = "softmax", seed: int = 0,
             backend: Optional[str] = None, feature_sampler: Optional[FeatureSampler] = None) -> str:
    """Register FAVOR+ with transformers under ``name`` (an attention function and its mask
    function); returns ``name`` for ``attn_implementation=``. Registering a name again replaces
    its options. ``num_features``, ``kernel`` and ``backend`` are those of
    ``performer.favor_attention``; ``seed`` fixes every module's features (see the module docstring),
    which ``feature_sampler`` draws (see ``performer.nn.RandomFeatures``; default
    ``performer.orthogonal_features``)."""
    if not isinstance(name, str) or not name or name in ("eager", "sdpa") or name.startswith("flash"):
        raise ValueError(f"name must be a new attention implementation name (not eager, sdpa or flash*); got {name!r}")
    check_positive_int("num_features", num_features)
    check_choice("kernel", kernel, KERNELS)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int; got {seed!r}")
    if backend is not None:
        check_choice("backend", backend, ("cpp", "triton", "torch"))
    check_feature_sampler(feature_sampler)
    options = dict(num_features=num_features, kernel=kernel, seed=seed, backend=backend,
                   feature_sampler=feature_sampler)

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        return _favor_attention_forward(options, module, query, key, value, attention_mask, dropout, scaling,
                                        is_causal, **kwargs)

    attention.favor_options = options
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, _padding_mask)
    return name


def _options_of(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    name = getattr(config, "_attn_implementation", None)
    fn = AttentionInterface._global_mapping.get(name) if isinstance(name, str) else None
    if fn is None or not hasattr(fn, "favor_options"):
        raise ValueError(f"model must use an attention implementation registered by performer.integrations.hf.register; "
                         f"its config says {name!r}")
    return fn.favor_options


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that call transformers' attention function: those with a transformers config, an
    ``is_causal`` flag and a head size (every attention class of the library has them)."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "config", None), PreTrainedConfig) and hasattr(m, "is_causal")
            and _head_dim(m) is not None]


def prepare(model: nn.Module) -> nn.Module:
    """Give every attention module of ``model`` its features now (rather than at its first call),
    numbering the modules that have no ``layer_idx`` by their order in the model. Needed for models
    whose attention modules have no layer index (ViT, ...), and before ``torch.compile(fullgraph=True)``.
    Returns the model."""
    options = _options_of(model)
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"model has no transformers attention module (none with a config, is_causal and a head size); "
                         f"got {type(model).__name__}")
    for rank, module in enumerate(modules):
        if not isinstance(getattr(module, "layer_idx", None), int):
            module.favor_layer_index = rank
        _features(options, module, _head_dim(module), _param_of(module))
    return model


@torch.no_grad()
def redraw_features(model: nn.Module, seed: int) -> None:
    """Draw new features for every attention module of ``model`` from ``seed``, recorded as
    ``model.config.favor_seed`` (so that ``save_pretrained`` / ``from_pretrained`` reload them)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int; got {seed!r}")
    options = _options_of(model)
    model.config.favor_seed = seed
    for module in attention_modules(model):
        if FEATURES in module._buffers:
            module.config.favor_seed = seed  # sub-configs (encoder-decoder) too
            del module._buffers[FEATURES]
            _features(options, module, _head_dim(module), _param_of(module))


def _head_dim(module: nn.Module) -> Optional[int]:
    for attr in ("head_dim", "attention_head_size", "head_size"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return None


def _param_of(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())


def _layer_index(module: nn.Module) -> int:
    for attr in ("layer_idx", "favor_layer_index"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"{type(module).__name__} has no layer index to derive its FAVOR+ features from: call "
                     "performer.integrations.hf.prepare(model) once after building or loading the model")


def _features(options: dict, module: nn.Module, dim: int, like: torch.Tensor) -> torch.Tensor:
    """The module's (num_features, dim) features, drawn on first use (see the module docstring), or
    the trained ones ((Hk, num_features, dim) parameters) of a calibrated module."""
    trained = module._parameters.get(FEATURES)
    if trained is not None:
        return trained
    features = module._buffers.get(FEATURES)
    if features is not None and features.shape == (options["num_features"], dim):
        return features
    seed = getattr(module.config, "favor_seed", options["seed"])
    # One stream per (seed, layer, attention class): self- and cross-attention of a layer differ.
    stream = zlib.crc32(f"{seed}:{_layer_index(module)}:{type(module).__name__}".encode())
    w = sample_features(options["feature_sampler"], options["num_features"], dim,
                        generator=torch.Generator().manual_seed(stream), device="cpu", dtype=torch.float32)
    features = w.to(device=like.device, dtype=like.dtype if like.dtype.is_floating_point else torch.float32)
    module.register_buffer(FEATURES, features, persistent=False)
    return features


# ---- masks --------------------------------------------------------------------------------------

def _padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                  mask_function: Callable = causal_mask_function, attention_mask: Optional[torch.Tensor] = None,
                  **kwargs) -> Optional[torch.Tensor]:
    """transformers' mask function for FAVOR+: the (batch, kv_length) padding mask of the keys the
    attention call will see (True = attend), or None; causal is left to the attention function.
    Refuses patterns that are not plain causal or bidirectional attention."""
    if mask_function not in (causal_mask_function, bidirectional_mask_function):
        raise ValueError(
            f"this model asks for an attention mask pattern that FAVOR+ cannot apply ({getattr(mask_function, '__name__', mask_function)!r}: "
            "e.g. a sliding window, packed sequences or a block pattern); FAVOR+ supports key padding and causal masks")
    if attention_mask is None:
        return None
    return attention_mask[:, kv_offset:kv_offset + kv_length].to(torch.bool)


# ---- the attention function ---------------------------------------------------------------------

def _favor_attention_forward(options, module, query, key, value, attention_mask, dropout, scaling, is_causal,
                             **kwargs):
    """transformers' attention-function contract: query (B, H, L, D), key/value (B, Hk, S, D*) ->
    ((B, L, H, Dv), None)."""
    for arg, why in _UNSUPPORTED.items():
        if kwargs.get(arg) is not None:
            raise ValueError(f"{arg} is not supported by FAVOR+ attention: {why}")
    if kwargs.get("output_attentions", False):
        warnings.warn("FAVOR+ attention does not form attention weights: output_attentions=True returns None for "
                      "them; use attn_implementation='eager' to get them", stacklevel=3)
    B, _, L, _ = query.shape
    S = key.shape[-2]
    padding, causal = (None, None) if attention_mask is None else reduce_mask(attention_mask, B, L, S)
    if causal is None:
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    features = _features(options, module, query.shape[-1], query)
    feature_map = getattr(module, FEATURE_MAP, None)
    layer = kwargs.get(_LAYER_KWARG)
    if layer is not None:  # generation with a FavorCache: continue the layer's recurrent state
        if not causal:
            raise ValueError(f"FavorCache holds a causal state, but {type(module).__name__} attends bidirectionally "
                             "here; use it only with decoder (causal) attention")
        out, layer.state = favor_attention_step(query, key, value, layer.state, features=features, scale=scaling,
                                                kernel=options["kernel"], key_padding_mask=padding, inplace=True,
                                                feature_map=feature_map)
        layer.pending = False
    else:

        def run() -> torch.Tensor:
            return favor_attention(query, key, value, is_causal=causal and L > 0, scale=scaling, features=features,
                                   key_padding_mask=padding, kernel=options["kernel"], backend=options["backend"],
                                   feature_map=feature_map)

        hook = getattr(module, "_calibration", None)  # performer.calibrate's, while it runs
        out = run() if hook is None else hook(module, query, key, value, causal and L > 0, padding, run,
                                              scale=scaling)
    if dropout:
        out = F.dropout(out, p=dropout, training=True)
    return out.transpose(1, 2).contiguous(), None


# ---- generation ---------------------------------------------------------------------------------

class FavorCacheLayer(CacheLayerMixin):
    """One decoder layer's FAVOR+ state during generation: a ``performer.FavorState`` of fixed size
    (per batch row and key head: an (m, Ev) sum, an m-vector and a running maximum), in place of
    the keys and values. ``update`` hands the layer to the FAVOR+ attention function of the same
    call, which continues the state; the keys and values themselves are not kept."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, **kwargs):
        super().__init__()
        self.state: Optional[FavorState] = None
        self.seen = 0
        self.pending = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, kwargs: Optional[dict] = None,
               **unused) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pending:
            raise RuntimeError("FavorCache: the previous keys of this layer never reached a FAVOR+ attention function; "
                               "use the cache with attn_implementation set to a name registered by "
                               "performer.integrations.hf.register")
        if not isinstance(kwargs, dict):
            raise RuntimeError("FavorCache: this model's attention does not pass its keyword arguments to "
                               "cache.update(..., kwargs=kwargs), so the FAVOR+ state cannot reach the attention "
                               "function; generate with transformers' DynamicCache instead (linear-time attention, "
                               "but the keys are kept)")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        kwargs[_LAYER_KWARG] = self
        self.seen += key_states.shape[-2]
        self.pending = True
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The keys an attention call sees are the new ones only: kv_length = query_length, at offset seen."""
        return query_length, self.seen

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.seen, self.pending = None, 0, False

    def offload(self):
        if self.state is not None:
            self.state = FavorState(*(t.to("cpu", non_blocking=True) for t in self.state))

    def prefetch(self):
        if self.state is not None and self.state.kv.device != self.device:
            self.state = FavorState(*(t.to(self.device, non_blocking=True) for t in self.state))

    def _map_batch(self, fn) -> None:
        if self.state is not None:
            self.state = FavorState(*(fn(t) for t in self.state))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError("FavorCache cannot be cropped: its state sums over the whole prefix "
                             "(assisted generation and other rollbacks need transformers' DynamicCache)")


class FavorCache(Cache):
    """A transformers ``Cache`` for FAVOR+ attention: a ``FavorCacheLayer`` per decoder layer,
    created as the layers first run. Memory per layer is constant in the prefix length. Pass it as
    ``model.generate(..., past_key_values=FavorCache())`` (or to ``model(...)`` step by step)."""

    def __init__(self):
        super().__init__(layer_class_to_replicate=FavorCacheLayer)

"""performer.calibrate: fit the FAVOR modules of a converted model to the exact attention they
replaced, without touching the model's own weights (attention transfer)."""
from __future__ import annotations

import itertools
import logging
import sys
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._validate import SOFTMAX_KERNELS, check_positive_int, validate_favor
from .feature_maps import FeatureMap
from .nn.features import RandomFeatures

log = logging.getLogger("performer")


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                    key_padding_mask: Optional[torch.Tensor], scale: Optional[float] = None) -> torch.Tensor:
    """Softmax attention with favor_attention's conventions (any (..., N, D) layout it takes,
    grouped-query heads, bottom-right causal alignment, True = ignore in key_padding_mask; a query
    with no visible key gives zeros), in q's layout."""
    a = validate_favor(q, k, v, None, 0.0, causal, scale, q.new_zeros(1, q.shape[-1]), key_padding_mask, "softmax")
    q4 = a.q[..., a.query_pad:, :]
    groups = q4.shape[1] // a.k.shape[1]
    k4, v4 = a.k.repeat_interleave(groups, dim=1), a.v.repeat_interleave(groups, dim=1)
    L, S = q4.shape[2], k4.shape[2]
    allowed = torch.ones(L, S, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril(diagonal=S - L)
    allowed = allowed[None, None]
    if a.key_padding_mask is not None:
        allowed = allowed & ~a.key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=allowed, scale=a.scale)
    out = torch.where(allowed.any(-1, keepdim=True), out, torch.zeros_like(out))
    return out.reshape(a.out_shape)


def calibrate(model: nn.Module, batches: Iterable, *, steps: int = 500, lr: float = 3e-2,
              feature_map: bool = True, train_features: bool = True, per_head: bool = True) -> dict:
    """Fit the feature parameters of every FAVOR module in ``model`` (PerformerAttention,
    FastAttention, and the attention modules of a Hugging Face model running
    ``performer.integrations.hf``'s attention) so that its output matches the exact softmax
    attention of the same queries, keys and values; the model's own parameters are left untouched
    (their ``requires_grad`` is restored).

    Args:
        model: a model holding FAVOR modules, e.g. from ``performer.convert``, or a transformers
            model with ``attn_implementation`` registered by ``performer.integrations.hf.register``.
        batches: calibration inputs, cycled: each is passed as ``model(*batch)`` when a tuple or list,
            else ``model(batch)``. Keep the sequences short: the exact attention they are compared
            with costs O(L^2) (a few hundred tokens is plenty).
        steps: optimizer steps (Adam), one batch each.
        lr: Adam's learning rate.
        feature_map: give each module without one a ``FeatureMap()`` (FAVOR++ with rescaling and key
            centering); its statistics are frozen on the first batch and then trained.
        train_features: make each module's ``features`` an nn.Parameter and train it (its redraw
            schedule is switched off, so that no redraw undoes the training).
        per_head: with train_features, each key/value head gets its own copy of the features to
            train ((Hk, m, E) instead of (m, E)).

    During calibration the model runs in eval mode and each FAVOR module passes the exact attention
    on (teacher forcing), so every layer sees the inputs of the exact model; the loss is the mean
    over modules of ||favor - exact||^2 / ||exact||^2. Returns {"modules", "steps", "loss_first",
    "loss_last"} (the loss of the first and the last step) and logs them (logger "performer").
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    check_positive_int("steps", steps)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number; got {lr!r}")
    sites = _sites(model)
    if not sites:
        raise ValueError(f"calibrate found no FAVOR module in {type(model).__name__}: convert it first "
                         "(performer.convert, or PerformerAttention / FastAttention in place of attention)")
    if any(s.kernel not in SOFTMAX_KERNELS for s in sites):
        raise ValueError("calibrate fits softmax attention: every FAVOR module must have kernel 'softmax' or "
                         "'softmax_normalized'")
    modules = [s.module for s in sites]
    stream = itertools.cycle(batches)
    frozen = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in frozen:
            p.requires_grad_(False)
        model.eval()
        first = next(stream)
        heads = _freeze_maps(model, sites, first, feature_map)
        params = []
        for s in sites:
            if train_features:
                params.append(_make_trainable(s, heads[id(s.module)] if per_head else None))
            if s.map is not None:
                params += list(s.map.parameters())
        if not params:
            raise ValueError("calibrate has nothing to train: feature_map=False, train_features=False and no "
                             "trainable feature map")
        for p in params:  # features trained by an earlier calibrate were frozen with the rest above
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=lr)
        losses = []
        batch = first
        for step in range(steps):
            if step:
                batch = next(stream)
            terms: list[torch.Tensor] = []
            with _hooked(modules, _matching(terms)):
                _run(model, batch)
            if not terms:
                raise ValueError(f"calibration batch {step} reached no FAVOR module of the model")
            loss = torch.stack(terms).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.train(was_training)
    log.info("performer.calibrate: %d module(s), %d steps, loss %.4g -> %.4g", len(sites), steps, losses[0],
             losses[-1])
    return {"modules": len(sites), "steps": steps, "loss_first": losses[0], "loss_last": losses[-1]}


@dataclass
class _Site:
    """A module whose attention calibrate fits: where it keeps its features and feature map."""
    module: nn.Module
    features_name: str
    map_name: str
    kernel: str

    @property
    def features(self) -> torch.Tensor:
        return getattr(self.module, self.features_name)

    @property
    def map(self) -> Optional[FeatureMap]:
        return getattr(self.module, self.map_name, None)


def _sites(model: nn.Module) -> list[_Site]:
    from .nn.attention import FastAttention, PerformerAttention
    others = sorted({type(m).__qualname__ for m in model.modules()
                     if isinstance(m, RandomFeatures) and not isinstance(m, (FastAttention, PerformerAttention))})
    if others:
        raise ValueError(f"calibrate fits PerformerAttention, FastAttention and Hugging Face FAVOR attention; this "
                         f"model also holds {', '.join(others)} (timm's converted attention is not supported yet)")
    sites = [_Site(m, "features", "feature_map", m.kernel) for m in model.modules() if isinstance(m, RandomFeatures)]
    if "transformers" in sys.modules:  # a Hugging Face model can only come with transformers imported
        try:
            from .integrations import hf
        except ImportError:  # an older transformers: no FAVOR attention in it
            return sites
        try:
            options = hf._options_of(model)
        except ValueError:  # not a model with FAVOR attention
            return sites
        sites += [_Site(m, hf.FEATURES, hf.FEATURE_MAP, options["kernel"]) for m in hf.attention_modules(model)]
    return sites

def _run(model: nn.Module, batch) -> None:
    if isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


class _hooked:
    """Installs ``hook`` as every module's ``_calibration`` for the duration of a with block."""

    def __init__(self, modules, hook):
        self.modules, self.hook = modules, hook

    def __enter__(self):
        for m in self.modules:
            m._calibration = self.hook

    def __exit__(self, *exc):
        for m in self.modules:
            m._calibration = None


def _matching(terms: list):
    def hook(module, q, k, v, causal, key_padding_mask, run, scale=None):
        with torch.no_grad():
            exact = exact_attention(q, k, v, causal, key_padding_mask, scale)
        out = run()
        terms.append((out - exact).float().square().sum() / exact.float().square().sum().clamp_min(1e-30))
        return exact
    return hook


@torch.no_grad()
def _freeze_maps(model, sites: list[_Site], batch, feature_map: bool) -> dict:
    """Give each module a FeatureMap (if asked and it has none) with statistics frozen, as trainable
    parameters, on the queries and keys it sees in ``batch``; returns each module's key heads."""
    seen: dict[int, tuple] = {}

    def capture(module, q, k, v, causal, key_padding_mask, run, scale=None):
        seen.setdefault(id(module), (q.detach(), k.detach(), key_padding_mask, scale))
        return exact_attention(q, k, v, causal, key_padding_mask, scale)

    with _hooked([s.module for s in sites], capture):
        _run(model, batch)
    heads = {}
    for s in sites:
        m = s.module
        if id(m) not in seen:
            raise ValueError(f"calibrate: the first batch did not reach {type(m).__name__}; every FAVOR module must "
                             "run on each calibration batch")
        q, k, mask, scale = seen[id(m)]
        a = validate_favor(q, k, k[..., :1], None, 0.0, False, scale, s.features, mask, "softmax")
        heads[id(m)] = a.k.shape[1]
        if s.map is None and feature_map:
            setattr(m, s.map_name, FeatureMap().to(s.features.device))
        if s.map is not None and not s.map.is_identity:
            s.map.freeze(a.q, a.k, a.scale, key_padding_mask=a.key_padding_mask, trainable=True)
    return heads


def _make_trainable(site: _Site, heads: Optional[int]) -> nn.Parameter:
    """The site's features -> an nn.Parameter (returned); per key head ((heads, m, E)) when
    ``heads`` is given."""
    module, name = site.module, site.features_name
    features = site.features.detach()
    if heads is not None and features.dim() == 2:
        features = features.expand(heads, *features.shape)
    if isinstance(site.features, nn.Parameter) and features.shape == site.features.shape:
        return site.features
    module._buffers.pop(name, None)
    module._parameters.pop(name, None)
    setattr(module, name, nn.Parameter(features.clone()))
    if getattr(module, "feature_redraw_interval", None) is not None:
        log.info("performer.calibrate: feature_redraw_interval of %s switched off (a redraw would discard the "
                 "trained features)", type(module).__name__)
        module.feature_redraw_interval = None
    return site.features

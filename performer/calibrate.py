"""performer.calibrate: fit the FAVOR modules of a converted model to the exact attention they
replaced, without touching the model's own weights (attention transfer)."""
from __future__ import annotations

import itertools
import logging
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._validate import check_positive_int, validate_favor
from .feature_maps import FeatureMap
from .nn.features import RandomFeatures

log = logging.getLogger("performer")

def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                    key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Softmax attention with favor_attention's conventions (any (..., N, D) layout it takes,
    grouped-query heads, bottom-right causal alignment, True = ignore in key_padding_mask; a query
    with no visible key gives zeros), in q's layout."""
    a = validate_favor(q, k, v, None, 0.0, causal, None, q.new_zeros(1, q.shape[-1]), key_padding_mask, "softmax")
    q4 = a.q[..., a.query_pad:, :]
    groups = q4.shape[1] // a.k.shape[1]
    k4, v4 = a.k.repeat_interleave(groups, dim=1), a.v.repeat_interleave(groups, dim=1)
    L, S = q4.shape[2], k4.shape[2]
    allowed = torch.ones(L, S, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(diagonal=S - L)
    allowed = allowed[None, None]
    if a.key_padding_mask is not None:
        allowed = allowed & ~a.key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=allowed, scale=a.scale)
    out = torch.where(allowed.any(-1, keepdim=True), out, torch.zeros_like(out))
    return out.reshape(a.out_shape)


def calibrate(model: nn.Module, batches: Iterable, *, steps: int = 500, lr: float = 3e-2,
              feature_map: bool = True, train_features: bool = True, per_head: bool = True) -> dict:
    """Fit the feature parameters of every FAVOR module in ``model`` (PerformerAttention,
    FastAttention) so that its output matches the exact softmax attention of the same queries, keys
    and values; the model's own parameters are left untouched (their ``requires_grad`` is restored).

    Args:
        model: a model holding FAVOR modules, e.g. from ``performer.convert``.
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
    modules = [m for m in model.modules() if isinstance(m, RandomFeatures)]
    if not modules:
        raise ValueError(f"calibrate found no FAVOR module in {type(model).__name__}: convert it first "
                         "(performer.convert, or PerformerAttention / FastAttention in place of attention)")
    if any(m.kernel != "softmax" for m in modules):
        raise ValueError("calibrate fits softmax attention: every FAVOR module must have kernel='softmax'")
    stream = itertools.cycle(batches)
    frozen = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in frozen:
            p.requires_grad_(False)
        model.eval()
        first = next(stream)
        heads = _freeze_maps(model, modules, first, feature_map)
        params = []
        for m in modules:
            if train_features:
                _make_trainable(m, heads[id(m)] if per_head else None)
                params.append(m.features)
            if m.feature_map is not None:
                params += [p for p in m.feature_map.parameters()]
        if not params:
            raise ValueError("calibrate has nothing to train: feature_map=False, train_features=False and no "
                             "trainable feature map")
        optimizer = torch.optim.Adam(params, lr=lr)
        losses = []
        batch = first
        for step in range(steps):
            if step:
                batch = next(stream)
            terms: list[torch.Tensor] = []
            with _hooked(modules, _matching(terms)):
                _run(model, batch)
            loss = torch.stack(terms).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.train(was_training)
    log.info("performer.calibrate: %d module(s), %d steps, loss %.4g -> %.4g", len(modules), steps, losses[0],
             losses[-1])
    return {"modules": len(modules), "steps": steps, "loss_first": losses[0], "loss_last": losses[-1]}


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
    def hook(module, q, k, v, causal, key_padding_mask, run):
        with torch.no_grad():
            exact = exact_attention(q, k, v, causal, key_padding_mask)
        out = run()
        terms.append((out - exact).float().square().sum() / exact.float().square().sum().clamp_min(1e-30))
        return exact
    return hook


@torch.no_grad()
def _freeze_maps(model, modules, batch, feature_map: bool) -> dict:
    """Give each module a FeatureMap (if asked and it has none) with statistics frozen, as trainable
    parameters, on the queries and keys it sees in ``batch``; returns each module's key heads."""
    seen: dict[int, tuple] = {}

    def capture(module, q, k, v, causal, key_padding_mask, run):
        seen.setdefault(id(module), (q.detach(), k.detach(), key_padding_mask))
        return exact_attention(q, k, v, causal, key_padding_mask)

    with _hooked(modules, capture):
        _run(model, batch)
    heads = {}
    for m in modules:
        if id(m) not in seen:
            raise ValueError(f"calibrate: the first batch did not reach {type(m).__name__} {m}; every FAVOR "
                             "module must run on each calibration batch")
        q, k, mask = seen[id(m)]
        a = validate_favor(q, k, k[..., :1], None, 0.0, False, None, m.features, mask, "softmax")
        heads[id(m)] = a.k.shape[1]
        if m.feature_map is None and feature_map:
            m.feature_map = FeatureMap().to(m.features.device)
        if m.feature_map is not None and not m.feature_map.is_identity:
            m.feature_map.freeze(a.q, a.k, a.scale, key_padding_mask=a.key_padding_mask, trainable=True)
    return heads


def _make_trainable(module: RandomFeatures, heads: Optional[int]) -> None:
    """features -> an nn.Parameter; per key head ((heads, m, E)) when ``heads`` is given."""
    features = module.features.detach()
    if heads is not None and features.dim() == 2:
        features = features.expand(heads, *features.shape)
    if isinstance(module.features, nn.Parameter) and features.shape == module.features.shape:
        return
    module._buffers.pop("features", None)
    module._parameters.pop("features", None)
    module.features = nn.Parameter(features.clone())
    if module.feature_redraw_interval is not None:
        log.info("performer.calibrate: feature_redraw_interval of %s switched off (a redraw would discard the "
                 "trained features)", type(module).__name__)
        module.feature_redraw_interval = None

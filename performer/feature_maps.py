"""Lower-variance positive feature maps on top of FAVOR+: what they change, before the kernels run.

Every map here rewrites the inputs of ``favor_attention`` (query, key, features, feature_bias) and
leaves the kernels alone, so it runs on every backend (each takes per-head features and
feature_bias). With x = sqrt(scale) q and y = sqrt(scale) k, the softmax kernel exp(x.y) is
estimated by:

- key centering: y -> y - mean(y) over the visible keys of each (batch, key head). Exact for softmax
  attention (x.mean(y) is a constant per query and cancels in the normalization), and it shrinks
  |y|, which the estimator's variance grows with.
- rescaling (the diagonal transform of FAVOR#/SADERF, Likhosherstov et al. 2023): per dimension
  Psi = (sum y^2 / sum x^2)^(1/4), x -> Psi x, y -> y / Psi. x.y is unchanged; |x| and |y| are
  balanced per dimension, which is what anisotropic (trained) queries and keys need.
- FAVOR++ (optimal positive random features, Likhosherstov et al., NeurIPS 2022):
  phi(x) = D exp(A |w|^2 + B w.x - |x|^2 / 2) with B = sqrt(1 - 4A), D = (1 - 4A)^(d/4), unbiased
  for exp(x.y) for any A < 1/8; A is the closed-form minimizer of the estimator's second moment
  averaged over the pairs of x and y, A = (1 - 2 rho - sqrt((2 rho + 1)^2 + 8 rho)) / 16 with
  rho = mean |x + y|^2 / d. It becomes features B W and feature_bias A |w|^2 (D cancels).

The statistics (the key mean, Psi, A) come, per batch element and key head, from the call's own
queries and visible keys when attention is bidirectional; a causal call would see later positions
that way, so causal attention needs them frozen (``FeatureMap.freeze`` on representative data, or
``performer.calibrate``), and refuses otherwise. Frozen statistics are per key head and are used
for every batch element. They carry no gradient unless made trainable (``FeatureMap.freeze(...,
trainable=True)``): the estimator stays unbiased for any choice of them.

Every map combines with ``kernel="softmax_normalized"`` (a kernel of favor_attention, not a map:
C++ CPU and torch backends), which divides each key's features by their sum over the m features:
phi(y) = softmax(W y + b) replaces exp(W y + b - |y|^2 / 2) / sqrt(m) (FAVOR++'s D and the
|y|^2 / 2 cancel). The positive estimator's mean over the features, (1/m) sum_j phi_j(y), is 1 only
on average; its deviation per key is noise common to every query, which the ratio removes. A ratio
estimator: biased by O(1/m), consistent, with lower variance (FAVOR+ at m = 256: 0.441 -> 0.349 at
scale 0.5, 0.054 -> 0.028 at scale 0.25, accuracy benchmark). Each key's features are at most 1,
so no key overflows however long it is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ._C_loader import unavailable_reason
from ._validate import SOFTMAX_KERNELS

MAPS = ("favor+", "favor++")
STATISTICS = ("key_mean", "log_psi", "coef_a")
MAX_TRAINED_COEF_A = 0.1  # a trainable FAVOR++ coefficient is clamped here (the estimator needs A < 1/8)


@dataclass(frozen=True)
class StepTransform:
    """The same map in the form of performer._C.favor_step_'s transform arguments (csrc/cpu/
    favor_step.h), all in the kernel's accumulation dtype: FAVOR++'s B moves from per-head features
    onto the rows (q_mul, k_post), so that features shared by the heads stay shared (one (m, E) set
    read for every head instead of Hk), with the bias per key head (head_bias)."""

    features: torch.Tensor
    q_mul: torch.Tensor                # (H, E) as (1, H, 1, E)
    k_mul: torch.Tensor                # (Hk, E) as (1, Hk, 1, E)
    k_add: torch.Tensor
    k_post: Optional[torch.Tensor]     # (Hk,)
    head_bias: Optional[torch.Tensor]  # (Hk, m) as (1, Hk, m)
    feature_bias: Optional[torch.Tensor]


@dataclass(frozen=True)
class Derived:
    """What a frozen map derives from its statistics and the features, for inputs of one dtype and
    head count: query -> query * query_mul, key -> key * key_mul + key_add (sqrt(scale) included),
    and the features and feature_bias favor_attention takes; ``step`` the same for the fused
    decoding step (float32 and float64 inputs, else None)."""

    query_mul: torch.Tensor
    key_mul: torch.Tensor
    key_add: torch.Tensor
    features: torch.Tensor
    feature_bias: Optional[torch.Tensor]
    step: Optional[StepTransform] = None

    def prepared(self, query: torch.Tensor, key: torch.Tensor) -> Prepared:
        """query and key through the map (two elementwise passes), with the features and bias."""
        return Prepared(query * self.query_mul, torch.addcmul(self.key_add, key, self.key_mul), self.features,
                        self.feature_bias)


@dataclass(frozen=True)
class Prepared:
    """What favor_attention takes after a feature map: query and key (the canonical (B, H, L, E)
    and (B, Hk, S, E), already multiplied by sqrt(scale): pass scale=1), features and feature_bias."""

    query: torch.Tensor
    key: torch.Tensor
    features: torch.Tensor
    feature_bias: Optional[torch.Tensor]


def favor_pp_coefficient(rho: torch.Tensor) -> torch.Tensor:
    """FAVOR++'s A for rho = mean |x + y|^2 / d (>= 0): the minimizer of the averaged log second
    moment d log(1 - 4A) - d/2 log(1 - 8A) + 2 d rho (1 - 4A) / (1 - 8A); negative for rho > 0."""
    return (1 - 2 * rho - torch.sqrt((2 * rho + 1) ** 2 + 8 * rho)) / 16


class FeatureMap(nn.Module):
    """The choice of positive random features for the FAVOR modules: ``kind`` "favor+" (the
    Performer's) or "favor++", optionally with ``rescale`` (per-dimension Psi) and ``center_keys``.
    The default ``FeatureMap()`` is FAVOR++ with both; ``FeatureMap("favor+", rescale=False,
    center_keys=False)`` is plain FAVOR+ and changes nothing. See the module docstring for the math.

    Frozen statistics (buffers, or parameters when trainable; saved in the state_dict): ``key_mean``
    (Hk, E), ``log_psi`` (Hk, E) and ``coef_a`` (Hk,), set by ``freeze``; until then the statistics
    come from each call (bidirectional only).
    """

    def __init__(self, kind: str = "favor++", *, rescale: bool = True, center_keys: bool = True):
        super().__init__()
        if kind not in MAPS:
            raise ValueError(f"kind must be one of {', '.join(repr(m) for m in MAPS)}; got {kind!r}")
        for name, flag in (("rescale", rescale), ("center_keys", center_keys)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool; got {type(flag).__name__}")
        self.kind, self.rescale, self.center_keys = kind, rescale, center_keys
        for name in STATISTICS:
            self.register_buffer(name, None)

    @property
    def is_identity(self) -> bool:
        return self.kind == "favor+" and not self.rescale and not self.center_keys

    @property
    def frozen(self) -> bool:
        return self.coef_a is not None

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, rescale={self.rescale}, center_keys={self.center_keys}, frozen={self.frozen}"

    # ---- statistics ---------------------------------------------------------------------------

    def statistics(self, query: torch.Tensor, key: torch.Tensor, scale: float,
                   key_padding_mask: Optional[torch.Tensor]):
        """(key mean (B, Hk, E), log Psi (B, Hk, E), A (B, Hk)) of the scaled queries
        x = sqrt(scale) query (B, H, L, E) and keys y = sqrt(scale) key (B, Hk, S, E), the keys over
        the visible ones, without gradient; identities for the parts this map does not use. All of
        them follow from the per-dimension first and second moments of x and y (on the CPU one read of
        each, no copy of the inputs without a padding mask)."""
        query, key = query.detach(), key.detach()
        B, H, L, E = query.shape
        Hk, S = key.shape[1], key.shape[2]
        acc = _acc(query)
        c2 = scale
        x_mean, x_sq = _moments(query.reshape(B, Hk, (H // Hk) * L, E), acc)
        if key_padding_mask is None:
            y_mean, y_sq = _moments(key, acc)
        else:
            k_acc = key.to(acc)
            visible = (~key_padding_mask).to(acc)[:, None, None, :]                   # (B, 1, 1, S)
            count = visible.sum(-1).clamp_min(1)                                      # (B, 1, 1)
            y_mean = (visible @ k_acc).squeeze(2) / count
            y_sq = (visible @ k_acc.square()).squeeze(2) / count
        x_mean, x_sq = x_mean * c2 ** 0.5, x_sq * c2                                  # moments of x = c q
        y_mean, y_sq = y_mean * c2 ** 0.5, y_sq * c2
        if self.center_keys:
            mean, y_sq, y_mean = y_mean, (y_sq - y_mean * y_mean).clamp_min(0), torch.zeros_like(y_mean)
        else:
            mean = torch.zeros_like(y_mean)
        if self.rescale:
            ok = (y_sq > 0) & (x_sq > 0)
            log_psi = torch.where(ok, 0.25 * (torch.log(torch.where(ok, y_sq, 1.0)) - torch.log(torch.where(ok, x_sq, 1.0))),
                                  torch.zeros_like(y_sq))
        else:
            log_psi = torch.zeros_like(y_sq)
        if self.kind == "favor++":
            psi2 = torch.exp(2 * log_psi)
            # mean |x + y|^2 over the pairs, after rescaling: sum_e (E[x_e^2] psi_e^2 + E[y_e^2] / psi_e^2
            # + 2 E[x_e] E[y_e])
            rho = ((x_sq * psi2 + y_sq / psi2 + 2 * x_mean * y_mean).sum(-1) / E).clamp_min(0)
            a = favor_pp_coefficient(rho)
        else:
            a = y_sq.new_zeros(B, Hk)
        return mean, log_psi, a

    @torch.no_grad()
    def freeze(self, query: torch.Tensor, key: torch.Tensor, scale: Optional[float] = None, *,
               key_padding_mask: Optional[torch.Tensor] = None, trainable: bool = False) -> "FeatureMap":
        """Fix the statistics to those of ``query`` (B, H, L, E) and ``key`` (B, Hk, S, E) averaged
        over the batch (representative data, e.g. a calibration batch or a prompt), per key head;
        ``scale`` as for favor_attention. ``trainable=True`` makes them nn.Parameters (for
        ``performer.calibrate``). Returns self."""
        mean, log_psi, a = self.statistics(query, key, _check_scale(query, scale), key_padding_mask)
        values = dict(key_mean=mean.mean(0), log_psi=log_psi.mean(0), coef_a=a.mean(0))
        for name, value in values.items():
            self._parameters.pop(name, None)
            self._buffers.pop(name, None)
            if trainable:
                self.register_parameter(name, nn.Parameter(value.clone()))
            else:
                self.register_buffer(name, value.clone())
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A frozen map's statistics load into an unfrozen one (buffers of the saved shape).
        for name in STATISTICS:
            if prefix + name in state_dict and getattr(self, name) is None:
                self._buffers[name] = torch.empty_like(state_dict[prefix + name])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ---- the transform --------------------------------------------------------------------------

    def forward(self, query: torch.Tensor, key: torch.Tensor, features: torch.Tensor, scale: float, causal: bool,
                key_padding_mask: Optional[torch.Tensor] = None) -> Prepared:
        """query (B, H, L, E), key (B, Hk, S, E), features (m, E), per key head (Hk, m, E) or per
        batch and key head (B, Hk, m, E) (either may be 1) -> what favor_attention takes (scale 1)."""
        if query.dim() != 4 or key.dim() != 4:
            raise ValueError(f"query and key must have shape (B, H, L, E) and (B, Hk, S, E) for a feature map; "
                             f"got {tuple(query.shape)} and {tuple(key.shape)}")
        lead = tuple(features.shape[:-2])
        B, Hk = key.shape[0], key.shape[1]
        if features.dim() > 4 or (lead and lead[-1] not in (1, Hk)) or (len(lead) == 2 and lead[0] not in (1, B)):
            raise ValueError(f"features must have shape (m, E), (Hk, m, E) or (B, Hk, m, E) with Hk={Hk} and B={B} "
                             f"(or 1) for a feature map; got shape {tuple(features.shape)}")
        scale = _check_scale(query, scale)
        c = math.sqrt(scale)
        if self.is_identity:
            return Prepared(query * c, key * c, features, None)
        E, acc = key.shape[3], _acc(query)
        key_of_call = self._reuse_key(query, key, features, scale)
        derived = self._from_memo(key_of_call)
        if derived is not None:
            return derived.prepared(query, key)
        if self.frozen:
            mean, log_psi, a = (t.to(acc) for t in (self.key_mean, self.log_psi, self.coef_a))
            if mean.shape != (Hk, E):
                raise ValueError(f"this FeatureMap was frozen for {mean.shape[0]} key heads of size {mean.shape[1]}; "
                                 f"got key of shape {tuple(key.shape)} (Hk={Hk}, E={E})")
            if isinstance(self.coef_a, nn.Parameter):  # trained: kept inside the allowed range
                a = a.clamp(max=MAX_TRAINED_COEF_A)
            elif not bool(torch.all(a < 0.125)):
                raise ValueError(f"coef_a must be below 1/8 (the estimator's variance is infinite beyond); got "
                                 f"max {a.max().item():.4g}")
            mean, log_psi, a = mean[None], log_psi[None], a[None]
        elif causal:
            raise ValueError(f"a {self.kind} FeatureMap with rescale={self.rescale}, center_keys={self.center_keys} "
                             "needs frozen statistics in causal attention (from the whole sequence they would let "
                             "each position see later ones): call feature_map.freeze(query, key) on representative "
                             "data, or performer.calibrate(model, ...)")
        else:
            mean, log_psi, a = self.statistics(query, key, scale, key_padding_mask)
        # One pass over each input: x = c psi q, y = (c k - mean) / psi, in the inputs' dtype.
        psi = torch.exp(log_psi)[:, :, None, :]                                       # (Bs, Hk, 1, E)
        dt = query.dtype
        qmul = (c * psi).repeat_interleave(query.shape[1] // Hk, dim=1).to(dt)
        kmul, kadd = (c / psi).to(dt), (-(mean[:, :, None, :] / psi)).to(dt)
        step, memo = None, key_of_call is not None and dt == acc   # the fused step's form: memoized calls only
        if self.kind == "favor+":
            w, bias = features, None
            if memo:
                step = StepTransform(w, qmul, kmul, kadd, None, None, None)
        else:
            w0 = features.to(acc)
            w0 = w0 if w0.dim() in (2, 4) else w0[None]                              # (m, E) or (Bf, Hf, m, E)
            a = a.to(acc)
            bias = a[..., None] * (w0 * w0).sum(-1)                                  # (Bs, Hk, m)
            b_coef = torch.sqrt(1 - 4 * a)                                           # (Bs, Hk)
            w = b_coef[..., None, None] * w0                                         # (Bs, Hk, m, E): B W
            if memo and w0.dim() == 2:   # (memoized: frozen, so Bs = 1)
                g = query.shape[1] // Hk
                step = StepTransform(w0.contiguous(), qmul * b_coef.repeat_interleave(g, dim=1)[:, :, None, None],
                                     kmul, kadd, b_coef[0].contiguous(), bias, None)
            elif memo:
                step = StepTransform(w, qmul, kmul, kadd, None, None, bias)
        derived = Derived(qmul, kmul, kadd, w, bias, step)
        if key_of_call is not None:
            self.__dict__["_derived"] = (key_of_call, derived)
        return derived.prepared(query, key)

    def derived(self, query: torch.Tensor, key: torch.Tensor, features: torch.Tensor,
                scale: float) -> Optional[Derived]:
        """The multipliers, features and bias that ``self(query, key, features, scale, True)`` uses,
        as an earlier call with the same features, statistics, scale and input dtype and heads built
        them; None where there are none (nothing is checked or computed then). A decoder's step
        passes them to the fused kernel, which applies the multipliers as it loads the rows."""
        return self._from_memo(self._reuse_key(query, key, features, scale))

    def _from_memo(self, key_of_call) -> Optional[Derived]:
        memo = self.__dict__.get("_derived")
        if key_of_call is None or memo is None or not _same_key(memo[0], key_of_call):
            return None
        return memo[1]

    def _statistics_tensors(self) -> tuple:
        """(key_mean, log_psi, coef_a), buffers or parameters (None before freeze), read from the
        module's dicts: nn.Module.__getattr__ costs about 2 us a name, and a decoder's step counts."""
        b, p = self._buffers, self._parameters
        return (b["key_mean"] if "key_mean" in b else p.get("key_mean"),
                b["log_psi"] if "log_psi" in b else p.get("log_psi"),
                b["coef_a"] if "coef_a" in b else p.get("coef_a"))

    def _reuse_key(self, query: torch.Tensor, key: torch.Tensor, features: torch.Tensor, scale: float):
        """What a frozen map's derived tensors (the per-dimension multipliers of query and key, the
        features and bias) depend on, or None where they must be computed afresh (statistics from the
        call, a gradient through them, torch.compile). A decoder's every step then costs two
        elementwise passes over its new query and key (none in the fused C++ step) instead of
        rebuilding (Hk, m, E) features. The tensors are compared by identity and version (an in-place
        change, load_state_dict or .to() invalidates them); the memo is not state: it is never saved
        and a copy recomputes it."""
        if torch.compiler.is_compiling():
            return None
        mean, log_psi, a = self._statistics_tensors()
        if a is None:  # not frozen
            return None
        if torch.is_grad_enabled() and (features.requires_grad or mean.requires_grad or log_psi.requires_grad
                                        or a.requires_grad):
            return None
        qs, ks = query.shape, key.shape
        return ((features, mean, log_psi, a), (features._version, mean._version, log_psi._version, a._version),
                (scale, query.dtype, query.device, qs[1], ks[1], qs[-1], ks[-1]))

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_derived", None)
        return state


def _same_key(a: tuple, b: tuple) -> bool:
    """FeatureMap._reuse_key equality: the tensors by identity, their versions and the rest by value."""
    ta, tb = a[0], b[0]
    return (ta[0] is tb[0] and ta[1] is tb[1] and ta[2] is tb[2] and ta[3] is tb[3] and a[1] == b[1]
            and a[2] == b[2])


def prepare(feature_map, query: torch.Tensor, key: torch.Tensor, features: torch.Tensor,
            feature_bias: Optional[torch.Tensor], scale: float, causal: bool, kernel: str,
            key_padding_mask: Optional[torch.Tensor]) -> Optional[Prepared]:
    """What favor_attention and favor_attention_step run with ``feature_map`` on their validated
    canonical arguments, or None where the map changes nothing; the checks they share."""
    if not isinstance(feature_map, FeatureMap):
        raise TypeError(f"feature_map must be a performer.FeatureMap or None; got {type(feature_map).__name__}")
    if kernel not in SOFTMAX_KERNELS:
        raise ValueError(f"feature_map applies to the softmax kernels only ({', '.join(SOFTMAX_KERNELS)}); got "
                         f"kernel={kernel!r}")
    if feature_bias is not None:
        raise ValueError("feature_map builds feature_bias itself: pass one or the other")
    if feature_map.is_identity:
        return None
    return feature_map(query, key, features, scale, causal, key_padding_mask)


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _moments(t: torch.Tensor, acc: torch.dtype):
    """Per-dimension mean and mean square over dim 2 of (B, Hk, N, E) in acc (zeros if N = 0). On the
    CPU the compiled ``performer::moments`` reads the input once (the strided reductions of torch
    over dim 2 take two slow passes and a full-size temporary); elsewhere, and under torch.compile
    (which fuses them), the same in torch."""
    if t.shape[2] == 0:
        zero = t.new_zeros(t.shape[0], t.shape[1], t.shape[3], dtype=acc)
        return zero, zero
    if _COMPILED_MOMENTS and t.is_cpu and not torch.compiler.is_compiling():
        return torch.ops.performer.moments(t)
    x, n = t.to(acc), t.shape[2]
    return x.sum(2) / n, x.square().sum(2) / n


_COMPILED_MOMENTS = unavailable_reason() is None


def _check_scale(query: torch.Tensor, scale: Optional[float]) -> float:
    if scale is None:
        return 1.0 / math.sqrt(query.shape[-1])
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be positive and finite; got {scale!r}")
    return float(scale)

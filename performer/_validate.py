"""The one validation layer: every public entry point checks its arguments here.

Errors name the argument, what was expected and what was given. Type problems raise
TypeError, everything else ValueError.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
KERNELS = ("softmax", "relu", "softmax_normalized")
SOFTMAX_KERNELS = ("softmax", "softmax_normalized")  # positive features: FeatureMap, calibration


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_tensor(name: str, value, *, min_dim: int = 0) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if value.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimensions; got shape {tuple(value.shape)}")
    return value


def check_float_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        expected = ", ".join(_dtype_name(d) for d in FLOAT_DTYPES)
        raise TypeError(f"{name} must have dtype {expected}; got {_dtype_name(t.dtype)}")


def check_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the same dtype as {ref_name} ({_dtype_name(ref.dtype)}); "
                        f"got {_dtype_name(t.dtype)}")


def check_same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}); got {t.device}")


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1; got {value}")
    return value


@dataclass(frozen=True)
class FavorArgs:
    """Validated FAVOR+ arguments in the canonical layout.

    q: (B, H, L, E), k: (B, Hk, S, E), v: (B, Hk, S, Ev) with H a multiple of Hk
    (query head h reads key/value head h // (H // Hk)); features: (m, E), or (Bf, Hf, m, E) with
    Bf in {1, B} and Hf in {1, Hk} (per batch element and key head); feature_bias: None or the
    features' shape without E; key_padding_mask: None or bool (B, S), True = ignore that key.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    features: torch.Tensor
    key_padding_mask: Optional[torch.Tensor]
    scale: float
    causal: bool
    kernel: str
    out_shape: tuple
    # Causal with L < S: q is preceded by this many zero rows (so that L == S) and the outputs of
    # those rows are dropped (favor_attention does both).
    query_pad: int = 0
    feature_bias: Optional[torch.Tensor] = None

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype


def _to_canonical(name: str, t: torch.Tensor) -> torch.Tensor:
    """(..., N, D) -> (B, H, N, D): B is the first dimension (1 if none), H the product of the rest."""
    if t.dim() == 2:
        return t.unsqueeze(0).unsqueeze(0)
    if t.dim() == 3:
        return t.unsqueeze(1)
    if t.dim() == 4:
        return t
    return t.reshape(t.shape[0], math.prod(t.shape[1:-2]), t.shape[-2], t.shape[-1])


def _canonical_features(f: torch.Tensor, bias, B: int, Hk: int, E: int):
    """features (m, E), (Hk, m, E) or (B, Hk, m, E) (B and Hk may be 1) and their bias (the features'
    shape without E) -> (m, E) unchanged, or (Bf, Hf, m, E) and (Bf, Hf, m)."""
    if f.dim() not in (2, 3, 4) or f.shape[-1] != E or f.shape[-2] < 1:
        raise ValueError(f"features must have shape (num_features, E) = (m, {E}) with m >= 1, or per key head "
                         f"(Hk, m, {E}) or per batch and key head (B, Hk, m, {E}); got shape {tuple(f.shape)}")
    lead = (1,) * (4 - f.dim()) + tuple(f.shape[:-2]) if f.dim() > 2 else (1, 1)
    if lead[0] not in (1, B) or lead[1] not in (1, Hk):
        raise ValueError(f"features of shape {tuple(f.shape)} must have their key-head dimension 1 or Hk={Hk} and "
                         f"their batch dimension 1 or B={B} (of the canonical (B, Hk, S, E) key)")
    if bias is not None:
        bias = check_tensor("feature_bias", bias)
        check_same_device("feature_bias", bias, "features", f)
        if not bias.dtype.is_floating_point:
            raise TypeError(f"feature_bias must be a floating-point tensor; got {_dtype_name(bias.dtype)}")
        if tuple(bias.shape) != tuple(f.shape[:-1]):
            raise ValueError(f"feature_bias must have the features' shape without E, {tuple(f.shape[:-1])}; "
                             f"got shape {tuple(bias.shape)}")
    if f.dim() == 2:
        return f, bias
    return f.reshape(*lead, *f.shape[-2:]), (bias.reshape(*lead, f.shape[-2]) if bias is not None else None)


def validate_favor(query, key, value, attn_mask, dropout_p, is_causal, scale, features,
                   key_padding_mask, kernel, feature_bias=None) -> FavorArgs:
    q = check_tensor("query", query, min_dim=2)
    k = check_tensor("key", key, min_dim=2)
    v = check_tensor("value", value, min_dim=2)
    f = check_tensor("features", features)

    if attn_mask is not None:
        raise ValueError(
            "attn_mask is not supported: FAVOR+ never forms the (L, S) attention matrix, so an arbitrary "
            "mask cannot be applied; use is_causal=True for causal masking or key_padding_mask=(batch, S) "
            "bool tensor (True = ignore) to drop keys")
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or dropout_p != 0.0:
        raise ValueError(
            f"dropout_p must be 0.0; got {dropout_p!r}: FAVOR+ has no attention matrix to drop entries from; "
            "apply dropout to the attention output (or to its inputs) instead")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool; got {type(is_causal).__name__}")
    check_choice("kernel", kernel, KERNELS)

    check_float_dtype("query", q)
    check_same_dtype("key", k, "query", q)
    check_same_dtype("value", v, "query", q)
    check_same_device("key", k, "query", q)
    check_same_device("value", v, "query", q)
    check_same_device("features", f, "query", q)
    if not f.dtype.is_floating_point:
        raise TypeError(f"features must be a floating-point tensor; got {_dtype_name(f.dtype)}")

    if q.dim() != k.dim() or q.dim() != v.dim():
        raise ValueError("query, key and value must have the same number of dimensions; got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}")
    E, L, S = q.shape[-1], q.shape[-2], k.shape[-2]
    if k.shape[-1] != E:
        raise ValueError(f"key must have the query's last dimension E={E}: shape (..., S, {E}); "
                         f"got shape {tuple(k.shape)}")
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"value must have shape (..., S, Ev) with the key's leading dimensions "
                         f"{tuple(k.shape[:-1])}; got shape {tuple(v.shape)}")
    if q.dim() == 3 and q.shape[0] != k.shape[0]:
        raise ValueError(f"key must have the query's batch size {q.shape[0]} (dimension 0 of (N, S, E)); "
                         f"got shape {tuple(k.shape)} for query shape {tuple(q.shape)}")
    if q.dim() >= 4:
        if q.shape[:-3] != k.shape[:-3]:
            raise ValueError(f"key must have the query's batch dimensions {tuple(q.shape[:-3])}; "
                             f"got shape {tuple(k.shape)} for query shape {tuple(q.shape)}")
        hq, hk = q.shape[-3], k.shape[-3]
        if hk == 0 or hq % hk != 0:
            raise ValueError(f"key/value heads (dim -3) must divide the query heads for grouped-query "
                             f"attention: query has {hq}, key has {hk}")
    if is_causal and L > S:
        raise ValueError(f"is_causal=True needs at most as many queries as keys (L <= S, the queries being the "
                         f"last L positions); got L={L}, S={S}")

    if scale is None:  # the default needs no check (and E may be symbolic under torch.compile)
        scale = 1.0 / math.sqrt(E) if E > 0 else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None; got {type(scale).__name__}")
    elif not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be positive and finite (FAVOR+ applies sqrt(scale) to query and key); "
                         f"got {scale}")

    q4, k4, v4 = _to_canonical("query", q), _to_canonical("key", k), _to_canonical("value", v)
    f, bias = _canonical_features(f, feature_bias, k4.shape[0], k4.shape[1], E)
    mask = None
    if key_padding_mask is not None:
        mask = check_tensor("key_padding_mask", key_padding_mask)
        check_same_device("key_padding_mask", mask, "query", q)
        if mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must have dtype bool (True = ignore that key); "
                            f"got {_dtype_name(mask.dtype)}")
        expected = (S,) if q.dim() == 2 else (q.shape[0], S)
        if tuple(mask.shape) != expected:
            raise ValueError(f"key_padding_mask must have shape (batch, S) = {expected}; got {tuple(mask.shape)}")
        mask = mask.reshape(q4.shape[0], S)

    out_shape = tuple(q.shape[:-1]) + (v.shape[-1],)
    query_pad = 0
    if is_causal and L < S:
        # Bottom-right aligned (query t is position S - L + t): a single query sees every key, more
        # queries run the causal kernels behind S - L zero rows whose outputs are dropped.
        if L <= 1:
            is_causal = False
        else:
            query_pad = S - L
            q4 = torch.cat([q4.new_zeros(*q4.shape[:2], query_pad, E), q4], dim=-2)
    return FavorArgs(q4, k4, v4, f, mask, float(scale), is_causal, kernel, out_shape, query_pad, bias)


@dataclass(frozen=True)
class MatmulArgs:
    """Validated blocked_matmul arguments in the canonical layout: a (B, M, K), b (B, K, N), one
    dtype and device, any strides (a broadcast batch has stride 0). ``out_shape`` is what
    torch.matmul would return for the original operands."""

    a: torch.Tensor
    b: torch.Tensor
    out_shape: tuple

    @property
    def device(self) -> torch.device:
        return self.a.device

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype


def validate_matmul(a, b) -> MatmulArgs:
    a = check_tensor("a", a, min_dim=1)
    b = check_tensor("b", b, min_dim=1)
    for name, t in (("a", a), ("b", b)):
        if t.dtype not in FLOAT_DTYPES:
            expected = ", ".join(_dtype_name(d) for d in FLOAT_DTYPES)
            raise TypeError(f"{name} must have a floating-point dtype ({expected}); got {_dtype_name(t.dtype)}")
    check_same_dtype("b", b, "a", a)
    check_same_device("b", b, "a", a)

    # torch.matmul's 1-D rules: a vector a is a row (removed from the result), a vector b a column.
    a2 = a.unsqueeze(0) if a.dim() == 1 else a
    b2 = b.unsqueeze(-1) if b.dim() == 1 else b
    M, K, N = a2.shape[-2], a2.shape[-1], b2.shape[-1]
    if b2.shape[-2] != K:
        expected = f"({K},)" if b.dim() == 1 else f"(..., {K}, N)"
        raise ValueError(f"b must have as many rows as a has columns (a: (..., M, K={K})): shape {expected}; "
                         f"got a of shape {tuple(a.shape)} and b of shape {tuple(b.shape)}")
    batch = _broadcast_shapes(tuple(a2.shape[:-2]), tuple(b2.shape[:-2]))
    if batch is None:
        raise ValueError(f"a and b must have broadcastable batch dimensions (all but the last two); got "
                         f"{tuple(a.shape[:-2])} for a of shape {tuple(a.shape)} and {tuple(b.shape[:-2])} "
                         f"for b of shape {tuple(b.shape)}")

    out_shape = batch + ((M,) if a.dim() > 1 else ()) + ((N,) if b.dim() > 1 else ())
    if b2.dim() == 2 and a2.dim() > 2:
        # A shared b: fold a's batch into its rows (one large product) when that is a view.
        try:
            return MatmulArgs(a2.view(math.prod(a2.shape[:-1]), K).unsqueeze(0), b2.unsqueeze(0), out_shape)
        except RuntimeError:
            pass
    count = math.prod(batch)

    def canonical(t, rows, cols):  # (*batch, rows, cols) as (count, rows, cols), a view where possible
        if t.dim() == 3 and t.shape[0] == count and len(batch) == 1:
            return t
        if t.dim() == 2 and not batch:
            return t.unsqueeze(0)
        return t.expand(batch + (rows, cols)).reshape(count, rows, cols)

    return MatmulArgs(canonical(a2, M, K), canonical(b2, K, N), out_shape)


def _broadcast_shapes(x: tuple, y: tuple) -> Optional[tuple]:
    """torch's broadcasting of two batch shapes (None when they do not broadcast), without the
    cost of torch.broadcast_shapes on every call."""
    out = []
    for i in range(1, max(len(x), len(y)) + 1):
        dx = x[-i] if i <= len(x) else 1
        dy = y[-i] if i <= len(y) else 1
        if dx != dy and dx != 1 and dy != 1:
            return None
        out.append(dx if dy == 1 else dy)
    return tuple(reversed(out))


# ---- incremental decoding (favor_attention_step) -------------------------------------------------

class FavorStepArgs(NamedTuple):
    """Validated favor_attention_step arguments: FavorArgs' canonical q (B, H, T, E), k (B, Hk, T, E),
    v (B, Hk, T, Ev), features ((m, E) or (Bf, Hf, m, E)), key_padding_mask (None or bool (B, T)),
    scale and kernel; ``state`` None or the (kv, normalizer, key_max) tuple checked against them;
    ``out_shape`` the output's shape in the caller's layout (None: already (B, H, T, Ev));
    ``inplace``: the caller lets the step update ``state``'s tensors; ``plain``: no tensor is a
    subclass (FakeTensor, ...); ``feature_bias`` None or of the features' shape without E."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    features: torch.Tensor
    key_padding_mask: Optional[torch.Tensor]
    scale: float
    kernel: str
    out_shape: Optional[tuple]
    state: Optional[tuple]
    inplace: bool
    plain: bool = False   # every tensor is a plain torch.Tensor (no subclass), as the fast path checks
    feature_bias: Optional[torch.Tensor] = None

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    def needs_grad(self) -> bool:
        """A gradient is recorded for q, k, v, the state, the features or their bias."""
        if not torch.is_grad_enabled():
            return False
        state = self.state or ()
        bias = () if self.feature_bias is None else (self.feature_bias,)
        return any(t.requires_grad for t in (self.q, self.k, self.v, self.features, *bias, *state))

    def memo_key(self) -> tuple:
        """What favor_attention_step's backends decide on (performer._dispatch.select)."""
        return (self.q.device.type, self.q.dtype, self.needs_grad())


_TENSOR = torch.Tensor
# Features and a feature bias may also be nn.Parameters (a calibrated module's): a plain subclass
# with no __torch_function__, which the extension takes as it is.
PLAIN_FEATURE_TYPES = (torch.Tensor, torch.nn.Parameter)
_STEP_DTYPES = frozenset(FLOAT_DTYPES)


def _fast_step_args(q, k, v, state, f, scale, kernel, mask, inplace) -> Optional[FavorStepArgs]:
    """The common case, (B, H, T, E) inputs that pass every check, in a few microseconds; None for
    anything else (validate_favor_step then runs the full checks, which name what is wrong)."""
    if not (type(q) is _TENSOR and type(k) is _TENSOR and type(v) is _TENSOR and type(f) in PLAIN_FEATURE_TYPES
            and type(inplace) is bool):
        return None
    dtype = q.dtype
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or f.dim() != 2 or dtype not in _STEP_DTYPES \
            or k.dtype != dtype or v.dtype != dtype or not f.dtype.is_floating_point or kernel not in KERNELS:
        return None
    device = q.device
    if k.device != device or v.device != device or f.device != device:
        return None
    B, H, T, E = q.shape
    Bk, Hk, Tk, Ek = k.shape
    Bv, Hv, Tv, Ev = v.shape
    m, Ef = f.shape
    if not (Bk == Bv == B and Hv == Hk and Tk == Tv == T and Ek == Ef == E and m >= 1 and Hk > 0
            and H % Hk == 0):
        return None
    if scale is None:
        scale = 1.0 / math.sqrt(E) if E > 0 else 1.0
    elif type(scale) is not float or not (scale > 0 and math.isfinite(scale)):
        return None
    if mask is not None and (type(mask) is not _TENSOR or mask.dtype != torch.bool or mask.device != device
                             or mask.shape != (B, T)):
        return None
    if state is not None:
        if not isinstance(state, tuple) or len(state) != 3:
            return None
        kv, z, key_max = state
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        if not (type(kv) is _TENSOR and type(z) is _TENSOR and type(key_max) is _TENSOR
                and kv.shape == (B, Hk, m, Ev) and z.shape == (B, Hk, m) and key_max.shape == (B, Hk)
                and kv.dtype == acc and z.dtype == acc and key_max.dtype == acc
                and kv.device == device and z.device == device and key_max.device == device):
            return None
        state = (kv, z, key_max)
    return FavorStepArgs(q, k, v, f, mask, scale, kernel, None, state, inplace, True)


def validate_favor_step(query, key, value, state, features, scale, kernel, key_padding_mask,
                        inplace: bool = False, feature_bias=None) -> FavorStepArgs:
    """favor_attention's checks for the new positions (causal, one key per query), then the state's
    shapes against them."""
    if feature_bias is None:
        fast = _fast_step_args(query, key, value, state, features, scale, kernel, key_padding_mask, inplace)
        if fast is not None:
            return fast
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool; got {type(inplace).__name__}")
    q = check_tensor("query", query, min_dim=2)
    k = check_tensor("key", key, min_dim=2)
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(f"key must hold one new position per query position (dim -2): query has {q.shape[-2]}, "
                         f"key has {k.shape[-2]}")
    args = validate_favor(query, key, value, None, 0.0, True, scale, features, key_padding_mask, kernel,
                          feature_bias)
    out_shape = args.out_shape if q.dim() != 4 else None
    if state is None:
        return FavorStepArgs(args.q, args.k, args.v, args.features, args.key_padding_mask, args.scale, args.kernel,
                             out_shape, None, inplace, feature_bias=args.feature_bias)
    if not isinstance(state, tuple) or len(state) != 3:
        raise TypeError(f"state must be the FavorState (kv, normalizer, key_max) returned by favor_attention_step "
                        f"or None; got {type(state).__name__}")
    B, Hk, m, Ev = args.k.shape[0], args.k.shape[1], args.features.shape[-2], args.v.shape[3]
    acc = torch.float64 if args.dtype == torch.float64 else torch.float32
    expected = (("kv", (B, Hk, m, Ev), "(B, Hk, m, Ev)"), ("normalizer", (B, Hk, m), "(B, Hk, m)"),
                ("key_max", (B, Hk), "(B, Hk)"))
    for (name, shape, layout), t in zip(expected, state):
        t = check_tensor(f"state.{name}", t)
        if tuple(t.shape) != shape:
            raise ValueError(f"state.{name} must have shape {layout} = {shape} to continue these inputs (batch B, "
                             f"key heads Hk, features m, value size Ev); got {tuple(t.shape)}: a state from "
                             f"inputs of another shape")
        if t.dtype != acc:
            raise TypeError(f"state.{name} must have dtype {_dtype_name(acc)} (the accumulation dtype for "
                            f"{_dtype_name(args.dtype)} inputs); got {_dtype_name(t.dtype)}")
        check_same_device(f"state.{name}", t, "query", q)
    return FavorStepArgs(args.q, args.k, args.v, args.features, args.key_padding_mask, args.scale, args.kernel,
                         out_shape, tuple(state), inplace, feature_bias=args.feature_bias)


# ---- modules (performer.nn) ------------------------------------------------------------------------

def check_probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float; got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1]; got {value}")
    return float(value)


def check_generator(name: str, value) -> None:
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None; got {type(value).__name__}")


def validate_feature_options(num_features, kernel, feature_redraw_interval, generator, feature_sampler=None) -> None:
    check_positive_int("num_features", num_features)
    check_choice("kernel", kernel, KERNELS)
    if feature_redraw_interval is not None:
        check_positive_int("feature_redraw_interval", feature_redraw_interval)
    check_generator("generator", generator)
    check_feature_sampler(feature_sampler)


def check_feature_sampler(value) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"feature_sampler must be a callable (num_features, dim, *, generator, device, dtype) -> "
                        f"features, or None; got {type(value).__name__}")


def validate_attention_config(embed_dim, num_heads, dropout, kdim, vdim) -> None:
    check_positive_int("embed_dim", embed_dim)
    check_positive_int("num_heads", num_heads)
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim must be divisible by num_heads (each head gets embed_dim // num_heads "
                         f"channels); got embed_dim={embed_dim}, num_heads={num_heads}")
    check_probability("dropout", dropout)
    for name, dim in (("kdim", kdim), ("vdim", vdim)):
        if dim is not None:
            check_positive_int(name, dim)


@dataclass(frozen=True)
class AttentionInputs:
    """Validated nn.MultiheadAttention-style inputs, batch first: query (N, L, E), key (N, S, kdim),
    value (N, S, vdim); key_padding_mask None or bool (N, S), True = ignore that key."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    key_padding_mask: Optional[torch.Tensor]
    causal: bool
    unbatched: bool
    batch_first: bool

    def to_caller_layout(self, out: torch.Tensor) -> torch.Tensor:
        """(N, L, E) -> the layout the query came in."""
        if self.unbatched:
            return out.squeeze(0)
        return out if self.batch_first else out.transpose(0, 1)


def check_mask_dtype(name: str, mask: torch.Tensor) -> None:
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"{name} must have dtype bool (True = ignore) or a floating dtype (-inf = ignore, "
                        f"0 = attend); got {_dtype_name(mask.dtype)}")


def _blocked_positions(name: str, mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as given, or the -inf entries of a float one (the form nn.MultiheadAttention turns
    a bool mask into); other float values would be additive biases, which FAVOR+ cannot apply."""
    check_mask_dtype(name, mask)
    if mask.dtype == torch.bool:
        return mask
    blocked = mask == float("-inf")
    if not torch.compiler.is_compiling() and not bool((blocked | (mask == 0)).all()):
        raise ValueError(f"{name} as a float mask must hold only 0 (attend) and -inf (ignore): other values are "
                         f"additive attention biases, and FAVOR+ never forms the attention logits to add them "
                         f"to; pass a bool mask (True = ignore)")
    return blocked


def _is_causal_mask(blocked: torch.Tensor) -> bool:
    L, S = blocked.shape[-2:]
    above_diagonal = torch.ones(L, S, dtype=torch.bool, device=blocked.device).triu(1)
    return L == S and bool((blocked == above_diagonal).all())


def validate_attention_inputs(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal, *,
                              embed_dim: int, kdim: int, vdim: int, num_heads: int, batch_first: bool,
                              decoding: bool, extra_keys: bool) -> AttentionInputs:
    """PerformerAttention.forward's arguments, with nn.MultiheadAttention's layouts and mask forms.
    ``decoding``: a DecodingCache was given; ``extra_keys``: add_bias_kv or add_zero_attn is set."""
    if need_weights:
        raise ValueError("need_weights=True is not supported: FAVOR+ never forms the (L, S) attention matrix, so "
                         "there are no attention weights to return; pass need_weights=False (the nn.Transformer "
                         "layers already do) and compute exact attention separately where the weights are needed")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool; got {type(is_causal).__name__}")
    q = check_tensor("query", query)
    k = check_tensor("key", key)
    v = check_tensor("value", value)
    batch = "(N, {}, {})" if batch_first else "({}, N, {})"
    if q.dim() not in (2, 3):
        raise ValueError(f"query must have shape {batch.format('L', 'embed_dim')} or (L, embed_dim) unbatched; "
                         f"got shape {tuple(q.shape)}")
    for name, t in (("key", k), ("value", v)):
        if t.dim() != q.dim():
            raise ValueError(f"{name} must have as many dimensions as query ({q.dim()}: "
                             f"{'unbatched' if q.dim() == 2 else 'batched'}); got shape {tuple(t.shape)}")
    check_float_dtype("query", q)
    check_same_dtype("key", k, "query", q)
    check_same_dtype("value", v, "query", q)
    for name, t, size, attr, n in (("query", q, embed_dim, "embed_dim", "L"), ("key", k, kdim, "kdim", "S"),
                                   ("value", v, vdim, "vdim", "S")):
        if t.shape[-1] != size:
            layout = batch.format(n, f"{attr}={size}") if t.dim() == 3 else f"({n}, {attr}={size})"
            raise ValueError(f"{name} must have shape {layout}; got shape {tuple(t.shape)}")

    unbatched = q.dim() == 2
    if unbatched or not batch_first:
        # (N, L, E) views that keep `query is key is value` (PerformerAttention then projects them at once)
        def layout(t):
            return t.unsqueeze(0) if unbatched else t.transpose(0, 1)
        q_new = layout(q)
        k_new = q_new if k is q else layout(k)
        v_new = k_new if v is k else layout(v)
        q, k, v = q_new, k_new, v_new
    N, L, S = q.shape[0], q.shape[1], k.shape[1]
    if k.shape[0] != N or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"query, key and value must have the same batch size N, and key and value the same "
                         f"length S; got shapes {tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)} "
                         f"(batch_first={batch_first})")

    mask = None
    if key_padding_mask is not None:
        mask = check_tensor("key_padding_mask", key_padding_mask)
        check_same_device("key_padding_mask", mask, "query", q)
        expected = (S,) if unbatched else (N, S)
        if tuple(mask.shape) != expected:
            raise ValueError(f"key_padding_mask must have shape {'(S,)' if unbatched else '(N, S)'} = {expected}; "
                             f"got {tuple(mask.shape)}")
        mask = _blocked_positions("key_padding_mask", mask).reshape(N, S)

    causal = is_causal
    if attn_mask is not None:
        m = check_tensor("attn_mask", attn_mask)
        check_same_device("attn_mask", m, "query", q)
        check_mask_dtype("attn_mask", m)
        if m.dim() not in (2, 3) or m.shape[-2:] != (L, S) or (m.dim() == 3 and m.shape[0] != N * num_heads):
            raise ValueError(f"attn_mask must have shape (L, S) = ({L}, {S}) or (N * num_heads, L, S) = "
                             f"({N * num_heads}, {L}, {S}); got {tuple(m.shape)}")
        # is_causal=True with a mask is nn.MultiheadAttention's hint that the mask is the causal one.
        if not is_causal:
            if not _is_causal_mask(_blocked_positions("attn_mask", m)):
                raise ValueError(
                    "attn_mask is only supported as the causal mask (True or -inf above the diagonal): FAVOR+ "
                    "never forms the (L, S) attention matrix, so an arbitrary mask cannot be applied; use "
                    "is_causal=True for causal attention and key_padding_mask to ignore keys")
            causal = True
    if (causal or decoding) and L != S:
        raise ValueError(f"causal attention and decoding need as many queries as keys (L == S); got L={L}, S={S}")
    if extra_keys and (causal or decoding):
        raise ValueError("add_bias_kv and add_zero_attn append a key that every query sees, which causal "
                         "attention and decoding cannot express; construct the module without them")
    return AttentionInputs(q, k, v, mask, causal, unbatched, batch_first)

"""performer.favor_attention_step: causal FAVOR+ one or more positions at a time, carrying a
fixed-size recurrent state, so each new token costs the same whatever the prefix length."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from ... import _C_loader, _dispatch
from ..._C_loader import unavailable_reason
from ..._validate import FLOAT_DTYPES, PLAIN_FEATURE_TYPES, SOFTMAX_KERNELS, validate_favor_step
from ...feature_maps import FeatureMap, prepare
from .cpp import step_cuda_reason
from .reference import favor_torch

_C = getattr(_C_loader, "_C", None)

OP = "favor_attention_step"


class FavorState(NamedTuple):
    """The keys and values seen so far, per (batch, key head), in float32 (float64 for float64 inputs).

    With w_s = W k'_s - |k'_s|^2 / 2 the softmax-kernel logits of key s (k'_s = sqrt(scale) k_s) and
    M = ``key_max`` the largest logit seen so far (-inf before the first visible key):

    - kv: (B, Hk, m, Ev) = sum_s exp(w_s - M) v_s^T
    - normalizer: (B, Hk, m) = sum_s exp(w_s - M)
    - key_max: (B, Hk) = M

    Every sum is kept relative to M, so the state stays finite however large the logits grow;
    when a new key raises M, kv and normalizer are rescaled by exp(M_old - M_new). For the relu
    kernel phi(k_s) = relu(W k'_s) + 1e-3 takes the place of exp(w_s - M) and M is 0 once a key
    was seen. B and Hk are the key's leading dimensions as favor_attention reads them: (N, ..., Hk)
    gives B = N and Hk the product of the rest; (N, S, E) gives B = N, Hk = 1; (S, E) gives 1, 1.
    """

    kv: torch.Tensor
    normalizer: torch.Tensor
    key_max: torch.Tensor


def _cpp_check(args) -> Optional[str]:
    if args.needs_grad():
        return ("has no gradient (a gradient is recorded for query, key, value, the state or the features); the "
                "torch backend has")
    return step_cuda_reason(args.kernel) if args.device.type == "cuda" else None


def _direct(a) -> bool:
    """Whether the in-place step may call the extension directly (performer._C.favor_step_, the same
    kernel as torch.ops.performer.favor_step_ without the dispatcher's microseconds): eager mode on
    plain CPU tensors, with no torch.compile tracing and no dispatch mode (FakeTensorMode,
    FlopCounterMode, ...) that must see the op."""
    # is_compiling first: dynamo cannot trace _len_torch_dispatch_stack (it returns an int).
    return not torch.compiler.is_compiling() and a.plain and a.q.is_cpu and not torch._C._len_torch_dispatch_stack()


_TENSOR = torch.Tensor


def _direct_scale(q: torch.Tensor, scale) -> Optional[float]:
    """The direct paths' scale: favor_attention's default 1/sqrt(E) for None, a float as given (the
    extension checks it), None for anything else (the full path reports it)."""
    if scale is None:
        E = q.shape[3]
        return 1.0 / math.sqrt(E) if E > 0 else 1.0
    return scale if type(scale) is float else None


def _step_in_place_direct(q, k, v, state, features, bias, scale, kernel, mask,
                          transform=()) -> Optional[torch.Tensor]:
    """A decoder's per-token call (favor_attention_step(..., state, inplace=True) on plain 4-D CPU
    tensors needing no gradient, eager mode) straight to performer._C.favor_step_, in about a
    microsecond of Python: the extension checks every argument as the op does, before it writes
    anything. None where the full path must run: other inputs, or whatever the extension refused
    (the full checks then name what is wrong, or run the case it does not take, such as a
    non-contiguous state). ``transform``: a frozen map's (q_mul, k_mul, k_add, k_post, head_bias)
    (FeatureMap.derived(...).step), applied by the kernel as it loads the rows, or empty."""
    if torch.compiler.is_compiling() or _C is None or type(state) not in (FavorState, tuple) or len(state) != 3:
        return None
    kv, z, key_max = state
    if not (type(q) is _TENSOR and type(k) is _TENSOR and type(v) is _TENSOR and type(features) in PLAIN_FEATURE_TYPES
            and type(kv) is _TENSOR and type(z) is _TENSOR and type(key_max) is _TENSOR
            and (mask is None or type(mask) is _TENSOR) and (bias is None or type(bias) in PLAIN_FEATURE_TYPES)
            and q.is_cpu and q.dim() == 4 and features.dim() in (2, 4)):
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or kv.requires_grad
                                    or z.requires_grad or key_max.requires_grad or features.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return None
    if torch._C._len_torch_dispatch_stack():
        return None
    scale = _direct_scale(q, scale)
    if scale is None:
        return None
    try:
        return _C.favor_step_(q, k, v, features, bias, mask, kv, z, key_max, scale, kernel, *transform)
    except Exception:  # noqa: BLE001: refused before any write; the full path below reports it
        return None


def _map_step_in_place_direct(q, k, v, state, features, bias, scale, kernel, mask, feature_map):
    """The direct in-place step with a frozen feature map whose derived features, bias and
    multipliers an earlier step built for these features, statistics and scale (FeatureMap.derived):
    a decoder's every token after its first. For float32 and float64 inputs the kernel transforms
    the rows as it loads them; other dtypes get the map's two elementwise passes first. None where
    the full path must run."""
    if (bias is not None or kernel not in SOFTMAX_KERNELS or type(feature_map) is not FeatureMap or type(q) is not _TENSOR
            or type(k) is not _TENSOR or type(features) not in PLAIN_FEATURE_TYPES or q.dim() != 4 or k.dim() != 4
            or not q.is_cpu):
        return None
    scale = _direct_scale(q, scale)
    if scale is None:
        return None
    d = feature_map.derived(q, k, features, scale)
    if d is None:
        return None
    t = d.step
    if t is not None:
        return _step_in_place_direct(q, k, v, state, t.features, t.feature_bias, 1.0, kernel, mask,
                                     (t.q_mul, t.k_mul, t.k_add, t.k_post, t.head_bias))
    p = d.prepared(q, k)
    return _step_in_place_direct(p.query, p.key, v, state, p.features, p.feature_bias, 1.0, kernel, mask)


def _step_cpp(a) -> tuple[torch.Tensor, FavorState]:
    """torch.ops.performer.favor_step, or favor_step_ where the caller lets the state be updated in place."""
    state = a.state
    if state is None:
        out, kv, z, key_max = torch.ops.performer.favor_step(a.q, a.k, a.v, a.features, a.feature_bias,
                                                             a.key_padding_mask, None, None, None, a.scale, a.kernel)
        return out, FavorState(kv, z, key_max)
    if a.inplace and all(t.is_contiguous() for t in state):
        if _direct(a):
            out = _C.favor_step_(a.q, a.k, a.v, a.features, a.feature_bias, a.key_padding_mask, *state, a.scale,
                                 a.kernel)
            return out, FavorState(*state)
        out = torch.ops.performer.favor_step_(a.q, a.k, a.v, a.features, a.feature_bias, a.key_padding_mask,
                                              *state, a.scale, a.kernel)
        return out, FavorState(*state)
    out, kv, z, key_max = torch.ops.performer.favor_step(a.q, a.k, a.v, a.features, a.feature_bias,
                                                         a.key_padding_mask, *state, a.scale, a.kernel)
    return out, FavorState(kv, z, key_max)


def _step_torch(a) -> tuple[torch.Tensor, FavorState]:
    out, final = favor_torch(a.q, a.k, a.v, a.features, a.key_padding_mask, a.scale, True, a.kernel,
                             initial_state=a.state, return_state=True, feature_bias=a.feature_bias)
    return out, FavorState(*final)


# The compiled step (csrc/cpu/favor_step_kernel.h, csrc/cuda/favor_step.cu) has no autograd: it
# declines when a gradient is needed, and the plain-PyTorch recurrent form, differentiable, runs.
# On CUDA tensors it runs only when asked for (backend="cpp"), like favor_attention's kernels.
_dispatch.register(OP, _dispatch.Backend(
    name="cpp", devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES, run=_step_cpp, available=unavailable_reason,
    check=_cpp_check, default=("cpu",)))
_dispatch.register(OP, _dispatch.Backend(
    name="torch", devices=("cpu", "cuda", "mps", "xpu"), dtypes=FLOAT_DTYPES, run=_step_torch))


def favor_attention_step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         state: Optional[FavorState] = None, *, features: torch.Tensor,
                         scale: Optional[float] = None, kernel: str = "softmax",
                         key_padding_mask: Optional[torch.Tensor] = None, backend: Optional[str] = None,
                         inplace: bool = False, feature_bias: Optional[torch.Tensor] = None,
                         feature_map: Optional[FeatureMap] = None) -> tuple[torch.Tensor, FavorState]:
    """Causal FAVOR+ attention for new positions, continuing from ``state``.

    Stepping through a sequence in pieces of any sizes gives what
    ``favor_attention(q, k, v, is_causal=True, ...)`` gives on the whole sequence (up to float
    rounding): new position t attends to every earlier position and to the new ones up to t. The
    work per call is proportional to the number of new positions, never to the prefix length.

    Args:
        query: (..., T, E), the T new positions, in favor_attention's layout.
        key: (..., T, E), the same new positions; heads (dim -3) may divide the query's (GQA).
        value: (..., T, Ev).
        state: None to start a sequence, else the FavorState returned for the previous positions
            (same batch, key heads, features and value size).
        features, scale, kernel, feature_bias: as for favor_attention; keep them the same for a
            whole sequence.
        feature_map: None or a frozen ``performer.FeatureMap`` (its statistics fixed by ``freeze``
            or ``performer.calibrate``), as for causal favor_attention: the steps then give what
            favor_attention(..., is_causal=True, feature_map=feature_map) gives on the whole
            sequence.
        key_padding_mask: bool (N, T) ((T,) for 2-D inputs); True ignores that new key for this
            and all later positions.
        backend: None picks the first that fits: "cpp" (the fused C++ step, one call; on the CPU,
            and on CUDA tensors when asked for; every kind of features, a bias and a frozen feature
            map) unless a gradient is needed, else "torch" (the recurrent form in plain PyTorch,
            differentiable, any device, every kind of features). A name forces one.
        inplace: False (default) leaves ``state``'s tensors untouched and returns new ones. True
            lets the step update them in place and return them (the "cpp" backend does so for
            contiguous states, saving a state-sized allocation and copy per call; "torch" returns
            new tensors): for a caller that owns the state, like performer.nn.DecodingCache.

    Returns:
        (output (..., T, Ev) in the query's dtype, the FavorState after the new positions).
    """
    if inplace is True and state is not None and (backend is None or backend == "cpp"):
        if feature_map is None:
            out = _step_in_place_direct(query, key, value, state, features, feature_bias, scale, kernel,
                                        key_padding_mask)
        else:
            out = _map_step_in_place_direct(query, key, value, state, features, feature_bias, scale, kernel,
                                            key_padding_mask, feature_map)
        if out is not None:
            return out, state
    args = validate_favor_step(query, key, value, state, features, scale, kernel, key_padding_mask, inplace,
                               feature_bias)
    if feature_map is not None:
        args = _apply(feature_map, args, features)
    impl = _dispatch.select(OP, args, backend)
    out, final = impl.run(args)
    return (out if args.out_shape is None else out.reshape(args.out_shape)), final


def _apply(feature_map: FeatureMap, args, features: torch.Tensor):
    """The validated step arguments with the (frozen) feature map's query, key, features and bias."""
    p = prepare(feature_map, args.q, args.k, features, args.feature_bias, args.scale, True, args.kernel,
                args.key_padding_mask)
    if p is None:
        return args
    plain = (args.plain and type(p.query) is _TENSOR and type(p.key) is _TENSOR
             and all(type(t) in PLAIN_FEATURE_TYPES for t in (p.features, p.feature_bias) if t is not None))
    return args._replace(q=p.query, k=p.key, features=p.features, feature_bias=p.feature_bias, scale=1.0,
                         plain=plain)

"""performer.favor_attention: validate -> dispatch -> run."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ... import _dispatch
from ..._C_loader import unavailable_reason
from ..._validate import FLOAT_DTYPES, validate_favor
from ...feature_maps import FeatureMap, prepare
from . import triton as triton_backend
from .cpp import cuda_reason, favor_cpp
from .reference import favor_torch

OP = "favor_attention"


def _cpp_check(args):
    return cuda_reason(args.kernel) if args.device.type == "cuda" else None


# On CUDA tensors the compiled ops run csrc/cuda/favor.cu: tested on the CPU through an emulator of
# the GPU's threads (tests/test_favor_cuda_simt.py) but not yet measured on a GPU, so there they run
# only when asked for (backend="cpp").
_dispatch.register(OP, _dispatch.Backend(
    name="cpp", devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES, run=favor_cpp, available=unavailable_reason,
    check=_cpp_check, default=("cpu",)))
_dispatch.register(OP, _dispatch.Backend(
    name="triton", devices=triton_backend.DEVICES, dtypes=triton_backend.SUPPORTED_DTYPES, default=False,
    run=triton_backend.favor_triton, available=triton_backend.unavailable_reason,
    check=triton_backend.decline_reason))
_dispatch.register(OP, _dispatch.Backend(
    name="torch", devices=("cpu", "cuda", "mps", "xpu"), dtypes=FLOAT_DTYPES, default=("cuda", "mps", "xpu"),
    run=lambda a: favor_torch(a.q, a.k, a.v, a.features, a.key_padding_mask, a.scale, a.causal, a.kernel,
                              feature_bias=a.feature_bias)))


def favor_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None,
                    dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None, *,
                    features: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                    kernel: str = "softmax", backend: Optional[str] = None,
                    feature_bias: Optional[torch.Tensor] = None,
                    feature_map: Optional[FeatureMap] = None) -> torch.Tensor:
    """FAVOR+ attention: a linear-time, linear-memory approximation of
    ``torch.nn.functional.scaled_dot_product_attention`` (softmax(scale * Q K^T) V).

    Args:
        query: (..., L, E). Leading dimensions are (N, ..., H); N is the batch.
        key: (..., S, E), the query's leading dimensions except that its head dimension (-3) may
            divide the query's (grouped-query attention: query head h uses key head h // (H // Hk)).
        value: (..., S, Ev), the key's leading dimensions.
        attn_mask, dropout_p: accepted for signature compatibility; only None and 0.0 (FAVOR+ has
            no attention matrix to mask or drop from; use ``is_causal`` or ``key_padding_mask``).
        is_causal: query t attends to keys 0..t only. With fewer queries than keys (L < S, e.g. new
            tokens after a cached prefix) the queries are the last L positions (bottom-right
            aligned, as in ``flash-attention``): query t sees keys 0..S - L + t.
        scale: softmax temperature, default 1/sqrt(E); applied as sqrt(scale) to query and key.
        features: (m, E) random projection, e.g. ``performer.orthogonal_features(m, E)``, or one per
            key/value head (Hk, m, E), or per batch element and key head (N, Hk, m, E) (Hk: the key's
            heads, the product of its dimensions between the batch and S). More rows, better
            approximation. Differentiable: a gradient flows to features that require one (the
            projection can be trained, see ``performer.calibrate``).
        feature_bias: None, or a bias added to every projection, of the features' shape without E
            ((m,), (Hk, m) or (N, Hk, m)): phi(x) = exp(W x + b - |x|^2 / 2). FAVOR++ and the
            feature maps of ``performer.feature_maps`` use it; differentiable like the features.
        feature_map: None (FAVOR+) or a ``performer.FeatureMap`` (FAVOR++, per-dimension rescaling,
            key centering): lower-variance features built from ``features`` (then (m, E)) and the
            statistics of query and key; softmax kernels only.
        key_padding_mask: bool (N, S) ((S,) for 2-D inputs); True ignores that key, exactly as if
            it were removed. A query with no visible key returns zeros.
        kernel: "softmax" (positive random features, approximates softmax attention),
            "softmax_normalized" (the same with each key's features divided by their sum over the
            features, phi(k) = softmax(W k' + b) instead of exp(W k' + b - |k'|^2 / 2) / sqrt(m): a
            consistent estimator of softmax attention with lower variance, 1.3-1.9x lower error at
            m = 256 in the accuracy benchmark; C++ CPU and torch backends) or "relu" (generalized
            attention with features relu(W x) + 1e-3).
        backend: None picks the first backend that supports the inputs: "cpp" on the CPU,
            "torch" on GPUs. "cpp" (C++ kernels on the CPU, CUDA kernels on NVIDIA GPUs when the
            extension was built with them; opt-in there), "triton" (Triton kernels, opt-in: float32,
            float16 and bfloat16, head and feature sizes limited, see ``ops/favor/triton.py``) or
            "torch" (plain PyTorch, any device) forces one. Every backend takes per-head features,
            feature_bias and gradients with respect to the features.

    Returns:
        (..., L, Ev) in the query's dtype. Internally float32 accumulation (float64 for float64).
    """
    args = validate_favor(query, key, value, attn_mask, dropout_p, is_causal, scale, features,
                          key_padding_mask, kernel, feature_bias)
    if feature_map is not None:
        args = _apply(feature_map, args, features)
    impl = _dispatch.select(OP, args, backend)
    out = impl.run(args)
    if args.query_pad:
        out = out[..., args.query_pad:, :]
    return out.reshape(args.out_shape)


def _apply(feature_map: FeatureMap, args, features: torch.Tensor):
    """The validated arguments with the feature map's query, key, features and bias (scale 1)."""
    p = prepare(feature_map, args.q, args.k, features, args.feature_bias, args.scale, args.causal, args.kernel,
                args.key_padding_mask)
    if p is None:
        return args
    return dataclasses.replace(args, q=p.query, k=p.key, features=p.features, feature_bias=p.feature_bias, scale=1.0)

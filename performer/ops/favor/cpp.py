"""The compiled FAVOR+ ops (torch.ops.performer.favor_forward / favor_backward): their fake
kernels, their autograd, and the backend entry point."""
from __future__ import annotations

import torch

from ..._C_loader import unavailable_reason


def _acc(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


if unavailable_reason() is None:
    @torch.library.register_fake("performer::favor_forward")
    def _(q, k, v, features, key_padding_mask, scale, causal, kernel):
        B, H, L, _ = q.shape
        Hk, S, Ev = k.shape[1], k.shape[2], v.shape[3]
        m = features.shape[0]
        acc = _acc(q)
        return (q.new_empty(B, H, L, Ev), q.new_empty(B, Hk, m, Ev + 1, dtype=acc),
                q.new_empty(B, H, L, dtype=acc), q.new_empty(B, H, L, dtype=acc), q.new_empty(B, Hk, S, dtype=acc))

    @torch.library.register_fake("performer::favor_backward")
    def _(grad_out, q, k, v, features, key_padding_mask, out, state, den, query_shift, key_shift, scale, causal,
          kernel):
        return torch.empty_like(q, memory_format=torch.contiguous_format), \
            torch.empty_like(k, memory_format=torch.contiguous_format), \
            torch.empty_like(v, memory_format=torch.contiguous_format)

    def _setup_context(ctx, inputs, output):
        q, k, v, features, key_padding_mask, scale, causal, kernel = inputs
        out, *stats = output  # state, den, query_shift, key_shift
        ctx.save_for_backward(q, k, v, features, key_padding_mask, out, *stats)
        ctx.params = (scale, causal, kernel)
        ctx.mark_non_differentiable(*stats)

    def _backward(ctx, grad_out, *_unused):
        dq, dk, dv = torch.ops.performer.favor_backward(grad_out, *ctx.saved_tensors, *ctx.params)
        return dq, dk, dv, None, None, None, None, None

    torch.library.register_autograd("performer::favor_forward", _backward, setup_context=_setup_context)


def favor_cpp(args) -> torch.Tensor:
    out, *_ = torch.ops.performer.favor_forward(
        args.q, args.k, args.v, args.features, args.key_padding_mask, args.scale, args.causal, args.kernel)
    return out

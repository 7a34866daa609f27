"""performer.favor_attention_step: causal FAVOR+ one or more positions at a time, carrying a
fixed-size recurrent state, so each new token costs the same whatever the prefix length."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..._validate import validate_favor_step
from .reference import favor_torch


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


def favor_attention_step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         state: Optional[FavorState] = None, *, features: torch.Tensor,
                         scale: Optional[float] = None, kernel: str = "softmax",
                         key_padding_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, FavorState]:
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
            (same batch, key heads, features and value size; its tensors are not modified).
        features, scale, kernel: as for favor_attention; keep them the same for a whole sequence.
        key_padding_mask: bool (N, T) ((T,) for 2-D inputs); True ignores that new key for this
            and all later positions.

    Returns:
        (output (..., T, Ev) in the query's dtype, the FavorState after the new positions).

    Runs the recurrent form of the "torch" backend (reference.favor_torch), on any device.
    """
    args, initial = validate_favor_step(query, key, value, state, features, scale, kernel, key_padding_mask)
    out, final = favor_torch(args.q, args.k, args.v, args.features, args.key_padding_mask, args.scale, True,
                             args.kernel, initial_state=initial, return_state=True)
    return out.reshape(args.out_shape), FavorState(*final)

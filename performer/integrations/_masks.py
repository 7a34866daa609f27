"""Attention masks reduced to what FAVOR+ applies: key padding and causal (shared by the integrations)."""
from __future__ import annotations

from typing import Optional

import torch


def reduce_mask(mask: torch.Tensor, batch: int, L: int, S: int,
                name: str = "attention_mask") -> tuple[Optional[torch.Tensor], Optional[bool]]:
    """(key_padding_mask with True = ignore, causal or None) from a 2-D (batch, S) mask with True =
    attend, or from a 4-D (batch | 1, heads | 1, L, S) one that is exactly padding or padding plus
    causal (bottom-right aligned); None for causal means "as the module says". Errors call the
    mask ``name``."""
    if mask.dim() == 2:
        if tuple(mask.shape) != (batch, S) or mask.dtype != torch.bool:
            raise ValueError(f"{name} (2-D) must be bool (batch, S) = ({batch}, {S}); got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        return ~mask, None
    if mask.dim() != 4 or mask.shape[-2:] != (L, S) or mask.shape[0] not in (1, batch):
        raise ValueError(f"{name} must be 2-D (batch, S) or 4-D (batch, heads, L, S) with L={L}, S={S}; "
                         f"got shape {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        keep = mask
    else:
        keep = mask == 0
        if not (keep | (mask <= torch.finfo(mask.dtype).min / 2)).all():
            raise ValueError(f"{name} holds additive biases (values other than 0 and large negatives); "
                             "FAVOR+ can only ignore keys (padding) or apply causal masking")
    if not (keep == keep[:, :1]).all():
        raise ValueError(f"{name} differs between heads; FAVOR+ applies one padding and causal pattern to all")
    keep = keep[:, 0].expand(batch, L, S)
    visible = keep.any(dim=1)                                             # (batch, S)
    if (keep == visible[:, None, :]).all():
        return ~visible, False
    tril = torch.ones(L, S, dtype=torch.bool, device=mask.device).tril(S - L)
    if (keep == (visible[:, None, :] & tril)).all():
        return ~visible, True
    raise ValueError(f"{name} is neither key padding nor key padding plus a causal mask; FAVOR+ never forms "
                     "the attention matrix an arbitrary mask would apply to")

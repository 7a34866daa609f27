"""The plain-PyTorch matrix product the blocked kernels are checked against.

``matmul_reference`` is the ground truth: the canonical (B, M, K) @ (B, K, N) product computed in
float64 (or in ``dtype`` when given, to measure the rounding error of a plain product in that
dtype). The "torch" backend is torch.matmul itself.
"""
from __future__ import annotations

from typing import Optional

import torch


def matmul_reference(a: torch.Tensor, b: torch.Tensor, dtype: Optional[torch.dtype] = torch.float64) -> torch.Tensor:
    return torch.matmul(a.to(dtype), b.to(dtype))

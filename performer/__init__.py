"""performer: fast efficient-transformer kernels for PyTorch.

    import performer
    w = performer.orthogonal_features(256, 64, generator=torch.Generator().manual_seed(0))
    out = performer.favor_attention(q, k, v, is_causal=True, features=w)
    c = performer.blocked_matmul(a, b)            # torch.matmul semantics
    layer = performer.nn.BlockedLinear(512, 256)  # nn.Linear drop-in
"""
from . import nn
from .features import orthogonal_features
from .ops.favor import favor_attention
from .ops.matmul import blocked_matmul

__all__ = ["blocked_matmul", "favor_attention", "nn", "orthogonal_features"]
__version__ = "0.1.0"

"""performer: fast efficient-transformer kernels for PyTorch.

    import performer
    w = performer.orthogonal_features(256, 64, generator=torch.Generator().manual_seed(0))
    out = performer.favor_attention(q, k, v, is_causal=True, features=w)
"""
from .features import orthogonal_features
from .ops.favor import favor_attention

__all__ = ["favor_attention", "orthogonal_features"]
__version__ = "0.1.0"

"""Drop-in modules built on the package's kernels."""
from .attention import DecodingCache, FastAttention, PerformerAttention
from .features import RandomFeatures
from .linear import BlockedLinear

__all__ = ["BlockedLinear", "DecodingCache", "FastAttention", "PerformerAttention", "RandomFeatures"]

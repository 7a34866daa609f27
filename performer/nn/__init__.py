"""Drop-in modules built on the package's kernels."""
from .attention import DecodingCache, FastAttention, PerformerAttention
from .features import RandomFeatures
from .compressed import CompressedLinear
from .linear import BlockedLinear

__all__ = ["BlockedLinear", "CompressedLinear", "DecodingCache", "FastAttention", "PerformerAttention", "RandomFeatures"]

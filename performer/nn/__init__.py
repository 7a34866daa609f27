"""Drop-in modules built on the package's kernels."""
from .attention import DecodingCache, FastAttention, PerformerAttention
from .features import RandomFeatures
from .compressed import CompressedLinear
from .linear import BlockedLinear
from .quantized import Int8Linear

__all__ = ["BlockedLinear", "CompressedLinear", "DecodingCache", "FastAttention", "Int8Linear", "PerformerAttention", "RandomFeatures"]

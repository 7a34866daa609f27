"""Drop-in modules built on the package's kernels."""
from .linear import BlockedLinear

__all__ = ["BlockedLinear"]

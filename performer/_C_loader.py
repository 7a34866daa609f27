"""Loads the compiled extension, whose import registers the torch.ops.performer.* kernels."""
from __future__ import annotations

from typing import Optional

try:
    from . import _C  # noqa: F401
    LOAD_ERROR: Optional[str] = None
except ImportError as exc:  # a source checkout that was not built
    LOAD_ERROR = f"the compiled extension performer._C is not available ({exc}); build it with " \
                 "`pip install --no-build-isolation .`"


def unavailable_reason() -> Optional[str]:
    return LOAD_ERROR

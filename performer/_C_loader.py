"""Loads the compiled extension, whose import registers the torch.ops.performer.* kernels."""
from __future__ import annotations

from typing import Optional

import torch

try:
    from . import _C  # noqa: F401
    LOAD_ERROR: Optional[str] = None
except ImportError as exc:  # a source checkout that was not built
    LOAD_ERROR = f"the compiled extension performer._C is not available ({exc}); build it with " \
                 "`pip install --no-build-isolation .`"


def unavailable_reason() -> Optional[str]:
    return LOAD_ERROR


def cuda_kernels_reason(op_name: str) -> Optional[str]:
    """Why the compiled op `op_name` ("performer::...") cannot run on CUDA tensors, or None.
    Callers ask once, at import, and keep the answer: a constant torch.compile reads without tracing."""
    if LOAD_ERROR:
        return LOAD_ERROR
    if torch._C._dispatch_has_kernel_for_dispatch_key(op_name, "CUDA"):
        return None
    return "the extension was built without CUDA kernels"

"""Triton in this package: whether it can run here, and how.

Compiled Triton kernels need a GPU build of PyTorch (CUDA or ROCm) and a device. On the CPU they run
only under the Triton interpreter, selected by ``TRITON_INTERPRET=1`` in the environment *before
performer is imported*: Triton reads the variable when a kernel is defined, and this module reads
it once, at import. With neither a GPU build nor the interpreter, triton is not even imported and
the Triton ops are not registered. Every Triton backend of the package (performer.ops.*/triton.py)
takes these facts from here.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

# torch.library.triton_op / wrap_triton: PyTorch 2.6+ (the interpreter path needs neither).
wrap_triton = getattr(torch.library, "wrap_triton", None)

# torch built with CUDA or ROCm (a fork-safe check: no device query at import).
_GPU_BUILD = torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None
# Triton's own reading of TRITON_INTERPRET accepts these (case-insensitive).
_INTERPRET_ENV = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")

triton = tl = None
_IMPORT_ERROR: Optional[str] = None
if _GPU_BUILD or _INTERPRET_ENV:
    try:
        import triton
        import triton.language as tl
    except Exception as exc:  # ImportError, or an installed triton that fails to initialise
        triton = tl = None
        _IMPORT_ERROR = f"triton is not importable ({type(exc).__name__}: {exc})"


def _interpret_knob() -> bool:
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # a triton without knobs
        return _INTERPRET_ENV


# Fixed at import, as Triton fixes it when the kernels are defined.
INTERPRET: bool = triton is not None and _interpret_knob()
_TORCH_TOO_OLD = not INTERPRET and not hasattr(torch.library, "triton_op")
# Whether the Triton kernels and ops are defined in this process.
REGISTERED: bool = triton is not None and (INTERPRET or _GPU_BUILD) and not _TORCH_TOO_OLD

# The interpreter works on host copies of any tensor; compiled kernels need CUDA (ROCm builds of
# torch also report their GPUs as "cuda").
DEVICES: tuple = ("cpu", "cuda") if INTERPRET else ("cuda",)

_INTERPRETER_HINT = "set TRITON_INTERPRET=1 before performer is imported to run it in the Triton interpreter"


def unavailable_reason() -> Optional[str]:
    """None if Triton kernels can run here, else why not."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if _TORCH_TOO_OLD:
        return f"PyTorch {torch.__version__} has no torch.library.triton_op (needs 2.6 or later)"
    if not INTERPRET:
        if not _GPU_BUILD:
            return f"PyTorch is built without CUDA ({_INTERPRETER_HINT})"
        if not torch.cuda.is_available():
            return f"no CUDA device ({_INTERPRETER_HINT})"
    return None

"""performer.blocked_matmul: validate -> dispatch -> run."""
from __future__ import annotations

from typing import Optional

import torch

from ... import _dispatch
from ..._C_loader import unavailable_reason
from ..._validate import FLOAT_DTYPES, validate_matmul
from . import triton as triton_backend
from .cpp import cuda_reason, matmul_cpp

OP = "blocked_matmul"


def _cpp_check(args) -> Optional[str]:
    return cuda_reason() if args.device.type == "cuda" else None


_dispatch.register(OP, _dispatch.Backend(
    name="cpp", devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES, run=matmul_cpp, available=unavailable_reason,
    check=_cpp_check))
_dispatch.register(OP, _dispatch.Backend(
    name="triton", devices=triton_backend.DEVICES, dtypes=triton_backend.SUPPORTED_DTYPES,
    run=lambda a: triton_backend.matmul_triton(a.a, a.b), available=triton_backend.unavailable_reason))
_dispatch.register(OP, _dispatch.Backend(
    name="torch", devices=("cpu", "cuda", "mps", "xpu"), dtypes=FLOAT_DTYPES, default=False,
    run=lambda a: torch.matmul(a.a, a.b)))


def blocked_matmul(a: torch.Tensor, b: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Matrix product with the semantics of ``torch.matmul``, on the package's blocked kernels.

    Args:
        a: (..., M, K), or (K,) for a vector-matrix product.
        b: (..., K, N), or (K,) for a matrix-vector product. The batch dimensions (all but the
            last two) broadcast against a's. Same dtype and device as a: float32, float64,
            bfloat16 or float16 (the half types accumulate in float32). Any strides: transposed
            operands are read in place.
        backend: None picks the first backend that supports the inputs ("cpp" on the CPU and, when
            the extension has CUDA kernels, on CUDA; then "triton"); "cpp", "triton" or "torch"
            (torch.matmul) forces one.

    Returns:
        (*batch, M, N) in the inputs' dtype, as torch.matmul would. Differentiable in a and b.
    """
    args = validate_matmul(a, b)
    impl = _dispatch.select(OP, args, backend)
    return impl.run(args).reshape(args.out_shape)

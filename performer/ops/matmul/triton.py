"""Batched matmul in Triton: ``torch.ops.performer.triton_matmul(a, b)``.

    a: (B, M, K), b: (B, K, N), any strides (a batch stride of 0 broadcasts one matrix over the
    batch; transposed views are read in place) -> c: (B, M, N), contiguous, in the inputs' dtype.

Products are accumulated in float32 (float64 for float64 inputs) and rounded once to the output
dtype. float32 inputs use ``input_precision="ieee"``: true float32 products, as torch.matmul gives
with its default ``torch.backends.cuda.matmul.allow_tf32 = False``. TF32 would be several times
faster on tensor cores but keeps only 10 mantissa bits of each input (relative error ~1e-3), which
a float32 caller does not expect from a drop-in matmul.

Where it runs: see performer/_triton.py (a GPU, or the Triton interpreter with TRITON_INTERPRET=1
set before performer is imported). ``unavailable_reason()`` says why it cannot run; ``DEVICES`` and
``SUPPORTED_DTYPES`` say what it accepts.

Registration. Compiled Triton: a ``torch.library.triton_op`` whose launch goes through
``torch.library.wrap_triton``; eager calls launch the autotuned kernel directly, and under
``torch.compile`` AOTAutograd traces through the op, so Inductor sees the user kernel and emits
(and autotunes) it in its own generated code. Interpreter: ``wrap_triton`` hands back the bare
interpreted kernel (it cannot be traced), so a ``triton_op`` would run it on fake tensors when
computing output metadata (opcheck fails: "set the storage of a tensor on device meta"), and
under ``torch.compile`` on the tensors being traced, leaving the launch out of the graph. There
the op is a plain opaque ``torch.library.custom_op`` with a fake (meta) kernel:
``torch.compile`` keeps it as one extern call, and opcheck / autograd behave the same. Both
variants share the schema ``(Tensor a, Tensor b) -> Tensor`` and the autograd formula
(grad_a = grad @ b^T, grad_b = a^T @ grad), which calls the op again on transposed views.
"""
from __future__ import annotations

import contextlib

import torch

from ..._triton import DEVICES, INTERPRET, REGISTERED as _REGISTERED, tl, triton, unavailable_reason, wrap_triton

OP_NAME = "performer::triton_matmul"

# bfloat16 arithmetic is not emulated correctly by the interpreter, so it is offered only compiled.
SUPPORTED_DTYPES: tuple = ((torch.float16, torch.float32, torch.float64) if INTERPRET
                           else (torch.float16, torch.bfloat16, torch.float32, torch.float64))

# Largest element offset that 32-bit index arithmetic may reach inside one batch entry; beyond it
# the kernel is specialised to 64-bit offsets (INDEX_64). The batch offset is always 64-bit.
_INDEX32_LIMIT = 2 ** 31 - 1
# Largest tile edge of any config: offsets of masked-off rows/columns past the edge are formed too.
_MAX_BLOCK = 256

if _REGISTERED:

    @triton.jit
    def _matmul_kernel(
        a_ptr, b_ptr, c_ptr,
        M, N, K,
        stride_ab, stride_am, stride_ak,
        stride_bb, stride_bk, stride_bn,
        stride_cb, stride_cm, stride_cn,
        ACC_FP64: tl.constexpr,    # accumulate in float64 (float64 inputs) instead of float32
        INDEX_64: tl.constexpr,    # 64-bit element offsets within a batch entry
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """One program computes one (BLOCK_M, BLOCK_N) tile of c[batch].

        Grid: (B * cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),), batch-major, so that one batch entry's
        tiles run together. (Axis 0 allows 2**31 - 1 programs, more than any output that fits
        in memory needs.)
        """
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        tiles = num_pid_m * num_pid_n
        pid_b = pid // tiles
        tile = pid % tiles

        # Grouped ordering: consecutive programs walk GROUP_M row-tiles down one column of tiles
        # before moving right, so the A rows and B columns in flight are shared through L2
        # instead of sweeping a whole row of B per row-tile.
        group_size = GROUP_M * num_pid_n
        first_pid_m = (tile // group_size) * GROUP_M
        group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + (tile % group_size) % group_rows
        pid_n = (tile % group_size) // group_rows

        # Batch offsets are 64-bit: B * batch stride routinely exceeds 2**31 elements.
        batch = pid_b.to(tl.int64)
        a_ptr += batch * stride_ab
        b_ptr += batch * stride_bb
        c_ptr += batch * stride_cb

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # [BLOCK_M] rows of a and c
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)   # [BLOCK_N] columns of b and c
        rk = tl.arange(0, BLOCK_K)                     # [BLOCK_K]
        if INDEX_64:
            rm = rm.to(tl.int64)
            rn = rn.to(tl.int64)
            rk = rk.to(tl.int64)
        mask_m = rm < M                                # [BLOCK_M]
        mask_n = rn < N                                # [BLOCK_N]
        a_rows = rm[:, None] * stride_am               # [BLOCK_M, 1]
        b_cols = rn[None, :] * stride_bn               # [1, BLOCK_N]

        if ACC_FP64:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)   # [BLOCK_M, BLOCK_N]
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)   # [BLOCK_M, BLOCK_N]
        for k0 in range(0, K, BLOCK_K):
            k = k0 + rk                                # [BLOCK_K]
            mask_k = k < K
            a = tl.load(a_ptr + a_rows + k[None, :] * stride_ak,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)   # [BLOCK_M, BLOCK_K]
            b = tl.load(b_ptr + k[:, None] * stride_bk + b_cols,
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)   # [BLOCK_K, BLOCK_N]
            # "ieee": exact float32 products for float32 inputs (no TF32); no effect on 16-bit
            # inputs (tensor cores, exact products) or float64.
            if ACC_FP64:
                acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float64)
            else:
                acc = tl.dot(a, b, acc, input_precision="ieee")              # [BLOCK_M, BLOCK_N]

        c = acc.to(c_ptr.dtype.element_ty)                                   # [BLOCK_M, BLOCK_N]
        tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, c,
                 mask=mask_m[:, None] & mask_n[None, :])

    def _config(bm, bn, bk, stages, warps, group_m=8):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                             num_stages=stages, num_warps=warps)

    if INTERPRET:
        # One small config: autotuning would only time the Python interpreter. Small tiles keep
        # the edge masks and the grouped ordering exercised on small test shapes.
        _CONFIGS_16 = _CONFIGS_32 = _CONFIGS_64 = [_config(16, 16, 16, 1, 1, group_m=2)]
    else:
        # 16-bit inputs (tensor cores). Tuned for H100-class GPUs (up to 227 KiB shared memory
        # per block): 128x256x64 in 3 stages needs (128 + 256) * 64 * 2 B * 3 = 144 KiB. Configs
        # that do not fit a smaller GPU fail to compile and are skipped by the autotuner.
        _CONFIGS_16 = [
            _config(128, 256, 64, 3, 8),
            _config(256, 128, 64, 3, 8),
            _config(128, 128, 64, 4, 8),
            _config(128, 128, 64, 3, 4),
            _config(64, 256, 32, 4, 4),
            _config(128, 64, 64, 4, 4),
            _config(64, 128, 64, 4, 4),
            _config(128, 32, 32, 4, 4),
            _config(64, 64, 64, 5, 4),
            _config(64, 32, 32, 5, 2),
            _config(32, 64, 32, 5, 2),
        ]
        # float32 ("ieee": CUDA-core FMAs, no tensor cores): 4-byte elements, register-bound.
        _CONFIGS_32 = [
            _config(128, 128, 32, 3, 8),
            _config(128, 128, 16, 3, 8),
            _config(128, 64, 32, 3, 4),
            _config(64, 128, 32, 3, 4),
            _config(64, 64, 32, 4, 4),
            _config(64, 32, 32, 4, 2),
            _config(32, 64, 32, 4, 2),
            _config(32, 32, 32, 4, 2),
        ]
        # float64 (DMMA tensor cores on sm80+): an 8-byte accumulator doubles the registers per
        # tile; these fit without spilling at 8 (4) warps.
        _CONFIGS_64 = [
            _config(128, 128, 16, 3, 8),
            _config(128, 64, 32, 3, 8),
            _config(128, 64, 16, 3, 8),
            _config(64, 128, 16, 3, 8),
            _config(64, 64, 32, 4, 4),
            _config(64, 64, 16, 4, 4),
            _config(64, 32, 16, 4, 2),
            _config(32, 32, 32, 4, 2),
        ]

    # One autotuner per element size over the same kernel, so that each dtype only times configs
    # that suit it. Keyed on the problem size; Triton adds the tensors' dtypes to the key itself.
    # (Module-level names: torch.library.triton_op finds the kernels behind wrap_triton(kernel)
    # by reading _matmul_impl's source, to key torch.compile's caches on their code.)
    _matmul_16 = triton.autotune(configs=_CONFIGS_16, key=["M", "N", "K"])(_matmul_kernel)
    _matmul_32 = triton.autotune(configs=_CONFIGS_32, key=["M", "N", "K"])(_matmul_kernel)
    _matmul_64 = triton.autotune(configs=_CONFIGS_64, key=["M", "N", "K"])(_matmul_kernel)


def _check_inputs(a: torch.Tensor, b: torch.Tensor) -> None:
    torch._check(a.dim() == 3 and b.dim() == 3,
                 lambda: f"triton_matmul: expected 3-D a (B, M, K) and b (B, K, N), got {a.dim()}-D and {b.dim()}-D")
    torch._check(a.shape[0] == b.shape[0],
                 lambda: f"triton_matmul: batch sizes differ ({a.shape[0]} vs {b.shape[0]})")
    torch._check(a.shape[2] == b.shape[1],
                 lambda: f"triton_matmul: a is (B, M, {a.shape[2]}) but b is (B, {b.shape[1]}, N)")
    torch._check(a.dtype == b.dtype, lambda: f"triton_matmul: dtypes differ ({a.dtype} vs {b.dtype})")
    torch._check(a.device == b.device, lambda: f"triton_matmul: devices differ ({a.device} vs {b.device})")
    torch._check(a.dtype in SUPPORTED_DTYPES, lambda: f"triton_matmul: unsupported dtype {a.dtype}"
                 f"{' under the Triton interpreter' if INTERPRET else ''}")


def _max_offset(t: torch.Tensor, dims) -> int:
    """Largest element offset (within one batch entry) the kernel forms for ``t``, masked-off
    rows and columns of the last tiles included."""
    return sum((t.shape[d] + _MAX_BLOCK) * t.stride(d) for d in dims)


def _matmul_impl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The op's body: allocate c, launch (through wrap_triton when compiled)."""
    _check_inputs(a, b)
    B, M, K = a.shape
    N = b.shape[2]
    c = torch.empty((B, M, N), dtype=a.dtype, device=a.device)
    if c.numel() == 0:
        return c
    if K == 0:
        return c.zero_()
    index_64 = max(_max_offset(a, (1, 2)), _max_offset(b, (1, 2)), _max_offset(c, (1, 2))) > _INDEX32_LIMIT
    if a.element_size() == 2:
        kernel = _matmul_16
    elif a.element_size() == 4:
        kernel = _matmul_32
    else:
        kernel = _matmul_64
    if not INTERPRET:
        kernel = wrap_triton(kernel)

    def grid(meta):
        return (B * triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    # Triton launches on the current device: make it the inputs' one.
    with torch.cuda.device(a.device) if a.device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](a, b, c, M, N, K,
                     a.stride(0), a.stride(1), a.stride(2),
                     b.stride(0), b.stride(1), b.stride(2),
                     c.stride(0), c.stride(1), c.stride(2),
                     ACC_FP64=a.dtype == torch.float64, INDEX_64=index_64)
    return c


def _setup_context(ctx, inputs, output):
    a, b = inputs
    # Each gradient needs only the other operand.
    ctx.save_for_backward(a if ctx.needs_input_grad[1] else None, b if ctx.needs_input_grad[0] else None)


def _backward(ctx, grad):
    a, b = ctx.saved_tensors
    op = torch.ops.performer.triton_matmul.default
    # Transposed views, read in place by the kernel's strides: (B, M, N) @ (B, N, K), (B, K, M) @ (B, M, N).
    grad_a = op(grad, b.transpose(1, 2)) if ctx.needs_input_grad[0] else None
    grad_b = op(a.transpose(1, 2), grad) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b


if _REGISTERED:
    if INTERPRET:
        @torch.library.custom_op(OP_NAME, mutates_args=())
        def _triton_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return _matmul_impl(a, b)

        @_triton_matmul.register_fake
        def _(a, b):
            _check_inputs(a, b)
            return a.new_empty((a.shape[0], a.shape[1], b.shape[2]))
    else:
        @torch.library.triton_op(OP_NAME, mutates_args=())
        def _triton_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return _matmul_impl(a, b)

    _triton_matmul.register_autograd(_backward, setup_context=_setup_context)


def matmul_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c[i] = a[i] @ b[i] with the Triton kernel.

    Args:
        a: (B, M, K), b: (B, K, N); same dtype (one of ``SUPPORTED_DTYPES``) and device (one of
            ``DEVICES``); any strides, including 0 (broadcast) and transposed views.

    Returns:
        (B, M, N), contiguous, in the inputs' dtype; differentiable in both inputs.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"triton_matmul is unavailable: {reason}")
    if a.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton_matmul does not support dtype {a.dtype}")
    if a.device.type not in DEVICES:
        raise ValueError(f"triton_matmul runs on {'/'.join(DEVICES)}, not {a.device.type}")
    return torch.ops.performer.triton_matmul(a, b)

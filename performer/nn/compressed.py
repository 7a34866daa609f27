"""CompressedLinear: an nn.Linear whose weight keeps only its nonzero (rows x cols) blocks.

It holds the block-sparse format of performer/ops/sparse/reference.py: ``values`` (the kept
blocks, a Parameter: fine-tuning or distillation after compression trains them and keeps the
sparsity), ``block_cols`` and ``row_ptr`` (int32 buffers), ``bias`` and ``format_version``. The
state_dict has only these plain tensors (``torch.load(weights_only=True)`` reads it); loading a
state_dict with a dense ``weight`` instead (an nn.Linear's) compresses it on load.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import _C_loader
from .._validate import _dtype_name, check_choice, check_tensor
from ..ops.sparse import block_sparse_linear, pack_blocks, unpack_blocks
from . import pruning

DEFAULT_BLOCK = (32, 32)
SUPPORTED_BLOCKS = ((16, 32, 64), (4, 8, 16, 32, 64))  # (rows, cols) the block-sparse kernels run
FORMAT_VERSION = 1

_C = getattr(_C_loader, "_C", None)
_TENSOR = torch.Tensor


def check_format_version(state_dict, prefix: str) -> None:
    version = state_dict.get(prefix + "format_version")
    if version is not None and int(version) != FORMAT_VERSION:
        raise ValueError(f"{prefix}format_version must be {FORMAT_VERSION} (this performer's block-sparse "
                         f"format); got {int(version)}")


def check_input(input, in_features: int, dtype: torch.dtype, why: str) -> torch.Tensor:
    """A compressed layer's input: (*, in_features) in ``dtype``."""
    x = check_tensor("input", input, min_dim=1)
    if x.shape[-1] != in_features:
        raise ValueError(f"input must have shape (*, in_features={in_features}); got shape {tuple(x.shape)}")
    if x.dtype != dtype:
        raise TypeError(f"input must have {why} {_dtype_name(dtype)}; got {_dtype_name(x.dtype)}")
    return x


def direct_call(layer: nn.Module, x, dtype: torch.dtype, params: tuple, kernel: str, *args):
    """Inference in eager mode on plain CPU tensors in ``dtype``: ``performer._C.<kernel>(x2d, *args)``
    (the kernel the op runs, whose checks are the op's), without the dispatcher's and the autograd
    wrapper's tens of microseconds. None where the layer's full path must run: compiling, a dispatch
    mode, a gradient to record (x or one of ``params``), other inputs, another backend, or whatever
    the extension refused (the full path then names what is wrong)."""
    if torch.compiler.is_compiling() or _C is None or type(x) is not _TENSOR or not x.is_cpu or x.dim() < 1:
        return None
    K = layer.in_features
    if x.shape[-1] != K or x.dtype != dtype or layer.backend not in (None, "cpp"):
        return None
    if torch.is_grad_enabled():
        if x.requires_grad:
            return None
        for p in params:
            if p is not None and p.requires_grad:
                return None
    if torch._C._len_torch_dispatch_stack():
        return None
    try:
        y = getattr(_C, kernel)(x if x.dim() == 2 else x.reshape(-1, K), *args)
    except Exception:  # noqa: BLE001: the full path reports it
        return None
    return y if x.dim() == 2 else y.view(x.shape[:-1] + (layer.out_features,))


class CompressedLinear(nn.Module):
    """y = x W^T + b with W (out_features, in_features) stored as its kept (rows, cols) blocks.

    Build one with ``CompressedLinear.from_linear(linear)`` (keeps the blocks with a nonzero
    weight; a pruned layer's block by default), ``BlockedLinear.compress()`` or
    ``performer.compress(model, sparsity=...)``. Input (*, in_features) in the layer's dtype ->
    output (*, out_features). ``backend`` picks the kernel (None: the dispatcher's choice).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, block=DEFAULT_BLOCK,
                 device=None, dtype=None, backend=None):
        super().__init__()
        br, bc = pruning.check_block(block, *SUPPORTED_BLOCKS)
        self.in_features, self.out_features, self.block, self.backend = in_features, out_features, (br, bc), backend
        factory = dict(device=device, dtype=dtype or torch.get_default_dtype())
        self.values = nn.Parameter(torch.empty(0, bc, br, **factory))   # no block kept: a zero weight
        self.register_buffer("block_cols", torch.empty(0, dtype=torch.int32, device=device))
        self.register_buffer("row_ptr", torch.zeros(math.ceil(out_features / br) + 1, dtype=torch.int32, device=device))
        self.register_buffer("format_version", torch.tensor(FORMAT_VERSION, dtype=torch.int64, device=device))
        self.register_parameter("bias", nn.Parameter(torch.zeros(out_features, **factory)) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, block=None, backend=None) -> "CompressedLinear":
        """The blocks of ``linear``'s weight (weight_orig * weight_mask when pruned) that hold a
        nonzero, in the block it was pruned with (``block`` overrides; default (32, 32))."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear; got {type(linear).__name__}")
        weight = pruning.effective_weight(linear)
        new = cls(linear.in_features, linear.out_features, linear.bias is not None,
                  block=block or pruning.block_of(linear) or DEFAULT_BLOCK, device=weight.device,
                  dtype=weight.dtype, backend=backend)
        new._set_weight(weight)
        if linear.bias is not None:
            new.bias.data.copy_(linear.bias.detach())
        new.train(linear.training)
        return new

    def _set_weight(self, weight: torch.Tensor) -> None:
        packed = pack_blocks(weight.detach(), self.block)
        self.values = nn.Parameter(packed.values.to(self.values.dtype), self.values.requires_grad)
        self.block_cols, self.row_ptr = packed.block_cols, packed.row_ptr

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out_features, in_features) weight (a new tensor, not a parameter)."""
        return unpack_blocks(self.values.detach(), self.block_cols, self.row_ptr, self.out_features, self.in_features)

    @property
    def density(self) -> float:
        """The fraction of blocks kept."""
        br, bc = self.block
        return self.values.shape[0] / (math.ceil(self.out_features / br) * math.ceil(self.in_features / bc))

    def to_linear(self) -> nn.Linear:
        """An nn.Linear with the same (dense) weight and bias."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                           device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def quantize(self, dtype: str = "int8", *, activations: Optional[str] = "dynamic"):
        """This layer's kept blocks with int8 weights (per-output scales), as a new
        ``performer.nn.Int8Linear``: ``activations="dynamic"`` quantizes each input row at run
        time (integer products), ``None`` keeps the input float (weight-only)."""
        from .quantized import Int8Linear, check_int8_source
        check_choice("dtype", dtype, ("int8",))
        check_int8_source("the layer's dtype", self.values.dtype)
        new = Int8Linear(self.in_features, self.out_features, self.bias is not None, block=self.block,
                         activations=activations, device=self.values.device, backend=self.backend)
        new._set_weight(self.weight.float(), sparse=True)
        if self.bias is not None:
            new.bias.data.copy_(self.bias.detach())
        new.train(self.training)
        return new

    def _direct(self, x: torch.Tensor):
        """Eager inference straight to performer._C.block_sparse_linear (see direct_call)."""
        # Parameters and buffers read once from their dicts: each nn.Module attribute lookup costs
        # about a microsecond.
        values, bias, buffers = self._parameters["values"], self._parameters["bias"], self._buffers
        return direct_call(self, x, values.dtype, (values, bias), "block_sparse_linear", values,
                           buffers["block_cols"], buffers["row_ptr"], bias, self.out_features)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        y = self._direct(input)
        if y is not None:
            return y
        x = check_input(input, self.in_features, self.values.dtype, "the layer's dtype")
        y = block_sparse_linear(x.reshape(-1, self.in_features), self.values, self.block_cols, self.row_ptr,
                                self.bias, self.out_features, backend=self.backend)
        return y.view(*x.shape[:-1], self.out_features)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        dense = state_dict.get(prefix + "weight")
        if dense is not None:  # an nn.Linear's state_dict: compress it
            state_dict = dict(state_dict)
            self._set_weight(state_dict.pop(prefix + "weight").to(self.values.device, self.values.dtype))
            state_dict[prefix + "values"] = self.values.detach()
            state_dict[prefix + "block_cols"], state_dict[prefix + "row_ptr"] = self.block_cols, self.row_ptr
            state_dict[prefix + "format_version"] = self.format_version
        else:
            check_format_version(state_dict, prefix)
            values = state_dict.get(prefix + "values")
            if values is not None:  # the number of kept blocks is the checkpoint's
                if values.dim() != 3 or tuple(values.shape[1:]) != tuple(self.values.shape[1:]):
                    raise ValueError(f"{prefix}values must have shape (nnzb, {self.block[1]}, {self.block[0]}) "
                                     f"(blocks of {self.block}); got shape {tuple(values.shape)}")
                self.values = nn.Parameter(self.values.new_empty(values.shape), self.values.requires_grad)
                cols = state_dict.get(prefix + "block_cols")
                if cols is not None:
                    self.block_cols = self.block_cols.new_empty(cols.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block={self.block}, density={self.density:.3f}")

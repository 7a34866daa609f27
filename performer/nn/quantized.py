"""Int8Linear: an nn.Linear with int8 weights, dense or block-sparse.

The weight W (out_features, in_features) is stored as W ~ scales[:, None] * Wq: int8 Wq, symmetric,
with one float32 scale per output, in the block format of performer/ops/sparse/reference.py
(``pack_int8``: the kept blocks in groups of 4 inputs; a dense layer keeps every block). Two ways to
run it (``activations``):

- ``"dynamic"``: each input row is quantized to uint8 at run time with its own scale and zero
  point, and the products are integer (u8 x s8, exact 32-bit sums; the zero points are corrected
  with the precomputed row sums of Wq): the compute-bound case, like torch.ao's dynamic int8 Linear;
- ``None``: weight-only; the input stays float32 and the int8 weights are converted in the kernel:
  a quarter of float32's weight bytes, for the small-batch, bandwidth-bound case.

The state_dict holds plain tensors (values, block_cols, row_ptr, scales, format_version, bias),
readable with ``torch.load(weights_only=True)``; a dense ``weight`` (an nn.Linear's) is quantized
on load.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .._validate import _dtype_name, check_choice
from ..ops.sparse import block_sparse_linear_int8, pack_int8, unpack_int8
from . import pruning
from .compressed import DEFAULT_BLOCK, FORMAT_VERSION, SUPPORTED_BLOCKS, check_format_version, check_input, direct_call

ACTIVATIONS = ("dynamic", None)



def check_int8_source(name: str, dtype: torch.dtype) -> None:
    """Int8 layers compute in float32: a float64 layer would silently lose its precision."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} must be float32, float16 or bfloat16 to quantize to int8 (the layer then runs in "
                         f"float32); got {_dtype_name(dtype)}")


class Int8Linear(nn.Module):
    """y = x (scales Wq)^T + b with int8 Wq, kept as (rows, cols) blocks (all of them when dense).

    Build one with ``Int8Linear.from_linear(linear)`` (a pruned layer keeps only its kept blocks),
    ``CompressedLinear.quantize()``, ``BlockedLinear.quantize()`` or ``performer.compress(model,
    quantize="int8")``. Input (*, in_features) float32 -> output (*, out_features) float32.
    ``activations``: "dynamic" (integer products) or None (weight-only). ``backend`` picks the
    kernel (None: the dispatcher's choice).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, block=DEFAULT_BLOCK,
                 activations: Optional[str] = "dynamic", device=None, backend=None):
        super().__init__()
        br, bc = pruning.check_block(block, *SUPPORTED_BLOCKS)  # every supported bc is a multiple of 4
        check_choice("activations", activations, ACTIVATIONS)
        self.in_features, self.out_features, self.block = in_features, out_features, (br, bc)
        self.activations, self.backend = activations, backend
        self.register_buffer("values", torch.empty(0, bc // 4, br, 4, dtype=torch.int8, device=device))
        self.register_buffer("block_cols", torch.empty(0, dtype=torch.int32, device=device))
        self.register_buffer("row_ptr", torch.zeros(math.ceil(out_features / br) + 1, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("format_version", torch.tensor(FORMAT_VERSION, dtype=torch.int64, device=device))
        # Wq's row sums, for the dynamic mode's zero points: derived, so not saved.
        self.register_buffer("col_sums", torch.zeros(out_features, dtype=torch.int32, device=device), persistent=False)
        self.register_parameter("bias", nn.Parameter(torch.zeros(out_features, device=device)) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, activations: Optional[str] = "dynamic", block=None,
                    backend=None) -> "Int8Linear":
        """``linear``'s weight (weight_orig * weight_mask when pruned: only the kept blocks, in
        the block it was pruned with) quantized per output. A dense layer keeps every block of
        ``block`` (default (32, 32))."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear; got {type(linear).__name__}")
        weight = pruning.effective_weight(linear)
        check_int8_source("linear's weight", weight.dtype)
        pruned = pruning.is_pruned(linear)
        new = cls(linear.in_features, linear.out_features, linear.bias is not None,
                  block=block or pruning.block_of(linear) or DEFAULT_BLOCK, activations=activations,
                  device=weight.device, backend=backend)
        new._set_weight(weight, sparse=pruned)
        if linear.bias is not None:
            new.bias.data.copy_(linear.bias.detach())
        new.train(linear.training)
        return new

    def _set_weight(self, weight: torch.Tensor, sparse: bool) -> None:
        """Quantize ``weight``, keeping its nonzero blocks when ``sparse``, every block otherwise."""
        br, bc = self.block
        keep = None if sparse else torch.ones(math.ceil(weight.shape[0] / br), math.ceil(weight.shape[1] / bc),
                                              dtype=torch.bool, device=weight.device)
        packed, scales = pack_int8(weight.detach(), self.block, keep)
        self.values, self.block_cols, self.row_ptr = packed
        self.scales = scales
        self._update_col_sums()

    def _update_col_sums(self) -> None:
        self.col_sums = self.weight_int8.sum(dim=1, dtype=torch.int32)

    @property
    def weight_int8(self) -> torch.Tensor:
        """The dense (out_features, in_features) int8 Wq."""
        return unpack_int8(self.values, self.block_cols, self.row_ptr, self.out_features, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized dense (out_features, in_features) float32 weight (a new tensor)."""
        return self.weight_int8.float() * self.scales[:, None]

    @property
    def density(self) -> float:
        """The fraction of blocks kept."""
        br, bc = self.block
        return self.values.shape[0] / (math.ceil(self.out_features / br) * math.ceil(self.in_features / bc))

    def to_linear(self) -> nn.Linear:
        """An nn.Linear (float32) with the dequantized weight and the bias."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.values.device)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def _direct(self, x: torch.Tensor):
        """Eager inference straight to performer._C.block_sparse_linear_int8 (see
        performer.nn.compressed.direct_call)."""
        bias, b = self._parameters["bias"], self._buffers
        return direct_call(self, x, torch.float32, (bias,), "block_sparse_linear_int8", b["values"], b["scales"],
                           b["col_sums"] if self.activations == "dynamic" else None, b["block_cols"], b["row_ptr"],
                           bias, self.out_features)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        y = self._direct(input)
        if y is not None:
            return y
        x = check_input(input, self.in_features, torch.float32, "the int8 layer's dtype")
        y = block_sparse_linear_int8(x.reshape(-1, self.in_features), self.values, self.scales,
                                     self.col_sums if self.activations == "dynamic" else None, self.block_cols,
                                     self.row_ptr, self.bias, self.out_features, backend=self.backend)
        return y.view(*x.shape[:-1], self.out_features)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict = dict(state_dict)
        dense = state_dict.pop(prefix + "weight", None)
        if dense is not None:  # an nn.Linear's state_dict: quantize it, every block kept
            check_int8_source(prefix + "weight", dense.dtype)
            self._set_weight(dense.to(self.values.device, torch.float32), sparse=False)
            for name in ("values", "block_cols", "row_ptr", "scales", "format_version"):
                state_dict[prefix + name] = getattr(self, name)
        else:
            check_format_version(state_dict, prefix)
            values = state_dict.get(prefix + "values")
            if values is not None:  # the number of kept blocks is the checkpoint's
                expected = tuple(self.values.shape[1:])
                if values.dim() != 4 or tuple(values.shape[1:]) != expected or values.dtype != torch.int8:
                    raise ValueError(f"{prefix}values must be int8 of shape (nnzb, {', '.join(map(str, expected))}) "
                                     f"(blocks of {self.block}); got {_dtype_name(values.dtype)} of shape "
                                     f"{tuple(values.shape)}")
                self.values = self.values.new_empty(values.shape)
                cols = state_dict.get(prefix + "block_cols")
                if cols is not None:
                    self.block_cols = self.block_cols.new_empty(cols.shape)
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if len(error_msgs) == errors:
            self._update_col_sums()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block={self.block}, density={self.density:.3f}, activations={self.activations!r}")


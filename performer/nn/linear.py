"""BlockedLinear: nn.Linear on the package's blocked matmul."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._validate import check_choice, check_tensor
from ..ops.matmul import blocked_matmul
from . import pruning
from .compressed import DEFAULT_BLOCK, SUPPORTED_BLOCKS, CompressedLinear


class BlockedLinear(nn.Linear):
    """A drop-in for ``nn.Linear`` (a subclass: same parameters ``weight`` (out, in) and ``bias``
    (out,), same initialization, same ``state_dict`` keys) whose product runs on
    ``performer.blocked_matmul``. Input (*, in_features) -> output (*, out_features).

    ``backend`` picks the matmul backend (None: the dispatcher's choice); it is not saved in the
    state_dict.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 *, backend=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.backend = backend

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, share: bool = True, backend=None) -> "BlockedLinear":
        """A BlockedLinear with ``linear``'s weights: the same Parameter objects when ``share``,
        else copies (on the same device, in the same dtype)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear; got {type(linear).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features, new.backend = linear.in_features, linear.out_features, backend
        copy = (lambda p: p) if share else (lambda p: nn.Parameter(p.detach().clone(), p.requires_grad))
        new.weight = copy(linear.weight)
        new.bias = None if linear.bias is None else copy(linear.bias)
        new.train(linear.training)
        return new

    def prune(self, sparsity: float, *, block: tuple[int, int] = DEFAULT_BLOCK, criterion: str = "l1",
              scope: str = "layer") -> "BlockedLinear":
        """Mask the ``sparsity`` fraction of (rows, cols) weight blocks with the lowest magnitude
        (see performer.nn.pruning): ``weight_orig`` stays the trained Parameter, ``weight_mask``
        a buffer, and ``weight = weight_orig * weight_mask`` before every forward, as
        ``torch.nn.utils.prune`` does. Pruning again at a higher sparsity keeps pruned blocks
        pruned. ``scope`` is accepted for symmetry with ``performer.prune`` (one layer: the same).
        ``compress()`` then stores only the kept blocks. Returns self."""
        sparsity = pruning.check_sparsity(sparsity)
        block = pruning.check_block(block, *SUPPORTED_BLOCKS)
        pruning.prune_linears([self], sparsity, block, criterion, scope)
        return self

    def compress(self) -> CompressedLinear:
        """The pruned layer as a ``CompressedLinear`` holding only its kept blocks (a new module;
        its forward skips the removed blocks). Raises when the layer was not pruned."""
        if not pruning.is_pruned(self):
            raise ValueError("compress() needs a pruned layer: call prune(sparsity) first (or "
                             "performer.compress(model, sparsity=...))")
        return CompressedLinear.from_linear(self, backend=self.backend)

    def quantize(self, dtype: str = "int8", *, activations: Optional[str] = "dynamic", block=None):
        """The layer with int8 weights (per-output scales) as a new ``performer.nn.Int8Linear``:
        a pruned layer keeps only its kept blocks, a dense one every block of ``block`` (default
        (32, 32)). ``activations="dynamic"`` quantizes each input row at run time (integer
        products), ``None`` keeps the input float (weight-only)."""
        from .quantized import Int8Linear
        check_choice("dtype", dtype, ("int8",))
        return Int8Linear.from_linear(self, activations=activations, block=block, backend=self.backend)

    def __getstate__(self):
        # A pruned layer's ``weight`` is recomputed from weight_orig * weight_mask before every
        # forward; the last one is part of an autograd graph, which deepcopy and pickle refuse.
        state = super().__getstate__()
        if pruning.is_pruned(self) and isinstance(state.get("weight"), torch.Tensor):
            state["weight"] = state["weight"].detach()
        return state

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = check_tensor("input", input, min_dim=1)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input must have shape (*, in_features={self.in_features}); got shape {tuple(x.shape)}")
        out = blocked_matmul(x, self.weight.t(), backend=self.backend)
        return out if self.bias is None else out + self.bias

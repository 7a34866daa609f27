"""BlockedLinear: nn.Linear on the package's blocked matmul."""
from __future__ import annotations

import torch
from torch import nn

from .._validate import check_tensor
from ..ops.matmul import blocked_matmul


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

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = check_tensor("input", input, min_dim=1)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input must have shape (*, in_features={self.in_features}); got shape {tuple(x.shape)}")
        out = blocked_matmul(x, self.weight.t(), backend=self.backend)
        return out if self.bias is None else out + self.bias

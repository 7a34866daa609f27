"""RandomFeatures: the random projection shared by the FAVOR+ modules, and its redraw schedule."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._validate import check_generator, validate_feature_options
from ..features import orthogonal_features


def _broadcast_from_rank0(t: torch.Tensor) -> None:
    """Make every rank hold rank 0's ``t`` when a torch.distributed process group is up."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(t, src=0)


class RandomFeatures(nn.Module):
    """Base of the FAVOR+ modules: the (num_features, dim) projection in the buffer ``features``
    (saved in the state_dict, moved by ``.to()``), redrawn by ``redraw_features`` and, with
    ``feature_redraw_interval=k``, before every k-th training-mode forward after the last draw
    (never in eval mode).

    Randomness comes from ``generator`` when given (the module keeps it and draws from it again at
    each redraw, on its device), else from a generator of the module's own, seeded from the global
    RNG at construction as parameter initialization is, and re-seeded from itself onto the
    features' device when they move (so that a redraw on a GPU stays on the GPU); never from the
    global RNG in ``forward``.

    In a torch.distributed job every redraw is followed by a broadcast from rank 0, so all ranks
    use the same features at all times; as in DDP training, every rank must redraw together.
    """

    features: torch.Tensor

    def _init_features(self, num_features: int, dim: int, kernel: str, feature_redraw_interval: Optional[int],
                       generator: Optional[torch.Generator], device, dtype) -> None:
        """Called by subclasses after their parameters, so that those see the global RNG as the
        torch module they replace would."""
        validate_feature_options(num_features, kernel, feature_redraw_interval, generator)
        self.num_features, self.kernel = num_features, kernel
        self.feature_redraw_interval = feature_redraw_interval
        self._own_generator = generator is None
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(2 ** 62, ())))
        self.generator = generator
        self._forwards_since_draw = 0
        features = orthogonal_features(num_features, dim, generator=generator, device=generator.device,
                                       dtype=dtype if dtype is not None else torch.get_default_dtype())
        self.register_buffer("features", features.to(torch.empty(0, device=device).device))  # as parameters resolve it

    @torch.no_grad()
    def redraw_features(self, generator: Optional[torch.Generator] = None) -> None:
        """Draw new features in place (same shape, dtype and device) from ``generator``, or from the
        module's generator when None; in a distributed job rank 0's draw is broadcast."""
        check_generator("generator", generator)
        if generator is None:
            if self._own_generator and self.generator.device != self.features.device:
                seed = int(torch.randint(2 ** 62, (), generator=self.generator))  # on the host: no device sync
                self.generator = torch.Generator(self.features.device).manual_seed(seed)
            generator = self.generator
        m, dim = self.features.shape
        self.features.copy_(orthogonal_features(m, dim, generator=generator, device=generator.device,
                                                dtype=self.features.dtype))
        _broadcast_from_rank0(self.features)
        self._forwards_since_draw = 0

    @torch.compiler.disable(reason="feature_redraw_interval counts training forwards in Python and draws with "
                                   "a torch.Generator, which torch.compile cannot trace; with fullgraph=True leave "
                                   "feature_redraw_interval=None and call redraw_features() between compiled calls")
    def _count_training_forward(self) -> None:
        if self._forwards_since_draw >= self.feature_redraw_interval:
            self.redraw_features()
        self._forwards_since_draw += 1

    def _features_for_forward(self) -> torch.Tensor:
        if self.training and self.feature_redraw_interval is not None:
            self._count_training_forward()
        return self.features

"""RandomFeatures: the random projection shared by the FAVOR+ modules, and its redraw schedule."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._validate import SOFTMAX_KERNELS, check_generator, validate_feature_options
from ..feature_maps import FeatureMap
from ..features import FeatureSampler, sample_features
from ..ops.favor import favor_attention


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

    ``feature_sampler``: draws the features, ``sampler(num_features, dim, generator=, device=,
    dtype=)``; None is ``performer.orthogonal_features``. E.g. ``functools.partial(
    performer.orthogonal_features, scaling="sqrt_d", antithetic=True)`` (fixed-norm antithetic
    rows, the lowest error in the accuracy benchmark).

    ``feature_map``: None (FAVOR+) or a ``performer.FeatureMap`` (FAVOR++, rescaling, key centering;
    the module keeps it as the submodule ``feature_map``, with its frozen statistics). Causal
    attention with a map needs its statistics frozen (``FeatureMap.freeze``, ``performer.calibrate``).
    ``performer.calibrate`` may also make ``features`` a trainable nn.Parameter (same state_dict key).
    """

    features: torch.Tensor

    def _init_features(self, num_features: int, dim: int, kernel: str, feature_redraw_interval: Optional[int],
                       generator: Optional[torch.Generator], device, dtype,
                       feature_map: Optional[FeatureMap] = None,
                       feature_sampler: Optional[FeatureSampler] = None) -> None:
        """Called by subclasses after their parameters, so that those see the global RNG as the
        torch module they replace would."""
        validate_feature_options(num_features, kernel, feature_redraw_interval, generator, feature_sampler)
        if feature_map is not None and not isinstance(feature_map, FeatureMap):
            raise TypeError(f"feature_map must be a performer.FeatureMap or None; got {type(feature_map).__name__}")
        if feature_map is not None and kernel not in SOFTMAX_KERNELS:
            raise ValueError(f"feature_map applies to the softmax kernels only ({', '.join(SOFTMAX_KERNELS)}); got "
                             f"kernel={kernel!r}")
        self.feature_map = feature_map
        self.num_features, self.kernel = num_features, kernel
        self.feature_redraw_interval = feature_redraw_interval
        self.feature_sampler = feature_sampler
        self._own_generator = generator is None
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(2 ** 62, ())))
        self.generator = generator
        self._forwards_since_draw = 0
        features = sample_features(feature_sampler, num_features, dim, generator=generator, device=generator.device,
                                   dtype=dtype if dtype is not None else torch.get_default_dtype())
        self.register_buffer("features", features.to(torch.empty(0, device=device).device))  # as parameters resolve it

    @torch.no_grad()
    def redraw_features(self, generator: Optional[torch.Generator] = None) -> None:
        """Draw new features in place (same shape, dtype and device; per-head features (H, m, E), as
        ``performer.calibrate`` may leave them, one draw per head) from ``generator``, or from the
        module's generator when None; in a distributed job rank 0's draw is broadcast."""
        check_generator("generator", generator)
        if generator is None:
            if self._own_generator and self.generator.device != self.features.device:
                seed = int(torch.randint(2 ** 62, (), generator=self.generator))  # on the host: no device sync
                self.generator = torch.Generator(self.features.device).manual_seed(seed)
            generator = self.generator
        *heads, m, dim = self.features.shape
        draws = [sample_features(self.feature_sampler, m, dim, generator=generator, device=generator.device,
                                 dtype=self.features.dtype) for _ in range(heads[0] if heads else 1)]
        self.features.copy_(torch.stack(draws) if heads else draws[0])
        _broadcast_from_rank0(self.features)
        self._forwards_since_draw = 0

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Per-head features of the same size (a calibrated module's, (H, m, E)) replace shared ones.
        saved = state_dict.get(prefix + "features")
        own = self.features
        if saved is not None and saved.shape != own.shape and saved.shape[-2:] == own.shape[-2:]:
            resized = own.new_empty(saved.shape)
            if isinstance(own, nn.Parameter):
                self.features = nn.Parameter(resized, requires_grad=own.requires_grad)
            else:
                self._buffers["features"] = resized
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

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

    def _run_favor(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """favor_attention with this module's features and feature map; while ``performer.calibrate``
        runs, its hook (``_calibration``) gets the inputs and the computation, and decides the output."""
        def run() -> torch.Tensor:
            return favor_attention(q, k, v, is_causal=causal, features=self._features_for_forward(),
                                   key_padding_mask=key_padding_mask, kernel=self.kernel, feature_map=self.feature_map)

        hook = getattr(self, "_calibration", None)
        return run() if hook is None else hook(self, q, k, v, causal, key_padding_mask, run)

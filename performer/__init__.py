"""performer: fast efficient-transformer kernels for PyTorch.

    import performer
    w = performer.orthogonal_features(256, 64, generator=torch.Generator().manual_seed(0))
    out = performer.favor_attention(q, k, v, is_causal=True, features=w)
    out, state = performer.favor_attention_step(q_t, k_t, v_t, state, features=w)  # decoding
    attn = performer.PerformerAttention(512, 8, batch_first=True)  # nn.MultiheadAttention drop-in
    model = performer.convert(model)              # every nn.MultiheadAttention -> PerformerAttention
    c = performer.blocked_matmul(a, b)            # torch.matmul semantics
    layer = performer.nn.BlockedLinear(512, 256)  # nn.Linear drop-in
    model = performer.compress(model, sparsity=0.9)  # every nn.Linear -> block-sparse CompressedLinear
    model = performer.compress(model, sparsity=0.9, quantize="int8")  # ... -> block-sparse Int8Linear
"""
from . import nn
from .calibrate import calibrate
from .compress import compress, prune
from .convert import convert, disable_fused_encoder_paths
from .feature_maps import FeatureMap
from .features import orthogonal_features, simplex_features
from .nn import DecodingCache, FastAttention, PerformerAttention
from .ops.favor import FavorState, favor_attention, favor_attention_step
from .ops.matmul import blocked_matmul

__all__ = ["DecodingCache", "FastAttention", "FavorState", "FeatureMap", "PerformerAttention", "blocked_matmul", "calibrate",
           "compress", "convert",
           "disable_fused_encoder_paths", "favor_attention", "favor_attention_step", "nn", "orthogonal_features", "prune", "simplex_features"]
__version__ = "0.1.0"

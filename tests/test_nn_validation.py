"""Bad arguments to the modules and to convert raise ValueError/TypeError naming the argument, the
expectation and what was given."""
import re

import pytest
import torch
from torch import nn

import performer

E, HEADS, N, L, S = 16, 4, 3, 7, 9


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)


def _check(call, exc, fragments):
    with pytest.raises(exc, match=re.escape(fragments[0])) as info:
        call()
    for fragment in fragments[1:]:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


BAD_CONSTRUCTIONS = [
    ("heads_do_not_divide", dict(embed_dim=10, num_heads=3), ValueError,
     ["embed_dim must be divisible by num_heads", "got embed_dim=10, num_heads=3"]),
    ("embed_dim_zero", dict(embed_dim=0), ValueError, ["embed_dim must be at least 1", "got 0"]),
    ("num_heads_float", dict(num_heads=2.0), TypeError, ["num_heads must be an int", "got float"]),
    ("kdim_zero", dict(kdim=0), ValueError, ["kdim must be at least 1", "got 0"]),
    ("vdim_str", dict(vdim="8"), TypeError, ["vdim must be an int", "got str"]),
    ("dropout_range", dict(dropout=1.5), ValueError, ["dropout must be in [0, 1]", "got 1.5"]),
    ("num_features_zero", dict(num_features=0), ValueError, ["num_features must be at least 1", "got 0"]),
    ("kernel", dict(kernel="gelu"), ValueError, ["kernel must be one of 'softmax', 'relu'", "got 'gelu'"]),
    ("redraw_interval", dict(feature_redraw_interval=0), ValueError,
     ["feature_redraw_interval must be at least 1", "got 0"]),
    ("generator", dict(generator=0), TypeError, ["generator must be a torch.Generator or None", "got int"]),
    ("feature_sampler", dict(feature_sampler="sqrt_d"), TypeError,
     ["feature_sampler must be a callable (num_features, dim, *, generator, device, dtype)", "got str"]),
]


@pytest.mark.parametrize("changes,exc,fragments", [pytest.param(*c[1:], id=c[0]) for c in BAD_CONSTRUCTIONS])
def test_bad_construction_message(changes, exc, fragments):
    kwargs = dict(embed_dim=E, num_heads=HEADS)
    kwargs.update(changes)
    _check(lambda: performer.PerformerAttention(**kwargs), exc, fragments)


def test_fast_attention_bad_construction_messages():
    _check(lambda: performer.FastAttention(8, causal=1), TypeError, ["causal must be a bool", "got int"])
    _check(lambda: performer.FastAttention(8, num_features=-1), ValueError, ["num_features must be at least 1"])
    _check(lambda: performer.FastAttention(8, kernel="exp"), ValueError, ["kernel must be one of"])


def _valid():  # seq-first (L, N, E) cross-attention, kdim=5, vdim=6
    return dict(query=_randn(L, N, E), key=_randn(S, N, 5), value=_randn(S, N, 6))


_float_padding = torch.zeros(N, S)
_float_padding[0, 0] = -1e9
_causal = torch.ones(L, L, dtype=torch.bool).triu(1)

BAD_CALLS = [  # (id, changed arguments, exception, fragments)
    ("query_rank4", dict(query=_randn(1, L, N, E)), ValueError,
     ["query must have shape (L, N, embed_dim) or (L, embed_dim) unbatched", f"got shape (1, {L}, {N}, {E})"]),
    ("key_rank", dict(key=_randn(S, 5)), ValueError,
     ["key must have as many dimensions as query (3: batched)", f"got shape ({S}, 5)"]),
    ("query_embed_dim", dict(query=_randn(L, N, 8)), ValueError,
     [f"query must have shape (L, N, embed_dim={E})", f"got shape ({L}, {N}, 8)"]),
    ("key_kdim", dict(key=_randn(S, N, E)), ValueError,
     ["key must have shape (S, N, kdim=5)", f"got shape ({S}, {N}, {E})"]),
    ("value_vdim", dict(value=_randn(S, N, 5)), ValueError, ["value must have shape (S, N, vdim=6)", "got shape"]),
    ("batch_mismatch", dict(key=_randn(S, 2, 5)), ValueError,
     ["query, key and value must have the same batch size N", f"({S}, 2, 5)", "batch_first=False"]),
    ("length_mismatch", dict(value=_randn(S - 1, N, 6)), ValueError, ["key and value the same length S"]),
    ("dtype_mix", dict(key=_randn(S, N, 5, dtype=torch.float64)), TypeError,
     ["key must have the same dtype as query (float32)", "got float64"]),
    ("integer_query", dict(query=torch.ones(L, N, E, dtype=torch.int64)), TypeError,
     ["query must have dtype float32, float64, bfloat16, float16", "got int64"]),
    ("query_list", dict(query=[[0.0] * E]), TypeError, ["query must be a torch.Tensor", "got list"]),
    ("padding_shape", dict(key_padding_mask=torch.zeros(N, S - 1, dtype=torch.bool)), ValueError,
     [f"key_padding_mask must have shape (N, S) = ({N}, {S})", f"got ({N}, {S - 1})"]),
    ("padding_transposed", dict(key_padding_mask=torch.zeros(S, N, dtype=torch.bool)), ValueError,
     ["key_padding_mask must have shape (N, S)", f"got ({S}, {N})"]),
    ("padding_int", dict(key_padding_mask=torch.zeros(N, S, dtype=torch.int64)), TypeError,
     ["key_padding_mask must have dtype bool (True = ignore) or a floating dtype", "got int64"]),
    ("padding_bias", dict(key_padding_mask=_float_padding), ValueError,
     ["key_padding_mask as a float mask must hold only 0 (attend) and -inf (ignore)", "pass a bool mask"]),
    ("need_weights", dict(need_weights=True), ValueError,
     ["need_weights=True is not supported", "no attention weights", "pass need_weights=False"]),
    ("attn_mask_general", dict(attn_mask=torch.zeros(L, S, dtype=torch.bool)), ValueError,
     ["attn_mask is only supported as the causal mask", "is_causal=True", "key_padding_mask"]),
    ("attn_mask_shape", dict(attn_mask=torch.zeros(L, L, dtype=torch.bool)), ValueError,
     [f"attn_mask must have shape (L, S) = ({L}, {S}) or (N * num_heads, L, S) = ({N * HEADS}, {L}, {S})",
      f"got ({L}, {L})"]),
    ("attn_mask_int", dict(attn_mask=torch.zeros(L, S, dtype=torch.int32)), TypeError,
     ["attn_mask must have dtype bool", "got int32"]),
    ("is_causal_cross", dict(is_causal=True), ValueError,
     ["causal attention and decoding need as many queries as keys (L == S)", f"got L={L}, S={S}"]),
    ("is_causal_int", dict(is_causal=1), TypeError, ["is_causal must be a bool", "got int"]),
    ("cache_type", dict(cache=object()), TypeError, ["cache must be a performer.nn.DecodingCache", "got object"]),
]


@pytest.mark.parametrize("changes,exc,fragments", [pytest.param(*c[1:], id=c[0]) for c in BAD_CALLS])
def test_bad_forward_message(changes, exc, fragments):
    pa = performer.PerformerAttention(E, HEADS, kdim=5, vdim=6, num_features=8)
    kwargs = _valid()
    kwargs.update(changes)
    _check(lambda: pa(**kwargs), exc, fragments)


def test_valid_call_passes():
    pa = performer.PerformerAttention(E, HEADS, kdim=5, vdim=6, num_features=8)
    assert pa(**_valid())[0].shape == (L, N, E)


def test_self_attention_mask_messages():
    pa = performer.PerformerAttention(E, HEADS, batch_first=True, num_features=8)
    x = _randn(N, L, E)
    _check(lambda: pa(x, x, x, attn_mask=_causal.T), ValueError, ["attn_mask is only supported as the causal mask"])
    bias = torch.zeros(L, L).masked_fill(_causal, float("-inf"))
    bias[3, 0] = -2.0
    _check(lambda: pa(x, x, x, attn_mask=bias), ValueError,
           ["attn_mask as a float mask must hold only 0 (attend) and -inf (ignore)"])
    _check(lambda: pa(x[0], x[0], x[0], key_padding_mask=torch.zeros(1, L, dtype=torch.bool)), ValueError,
           [f"key_padding_mask must have shape (S,) = ({L},)", f"got (1, {L})"])
    _check(lambda: pa(x, x, x, attn_mask=torch.ones(N, L, L, dtype=torch.bool).triu(1)), ValueError,
           [f"(N * num_heads, L, S) = ({N * HEADS}, {L}, {L})", f"got ({N}, {L}, {L})"])


def test_extra_keys_with_causal_or_decoding_message():
    pa = performer.PerformerAttention(E, HEADS, add_bias_kv=True, num_features=8)
    x = _randn(L, N, E)
    for kwargs in (dict(is_causal=True), dict(attn_mask=_causal), dict(cache=performer.DecodingCache())):
        _check(lambda: pa(x, x, x, **kwargs), ValueError,
               ["add_bias_kv and add_zero_attn append a key that every query sees", "construct the module without"])


def test_decoding_messages():
    pa = performer.PerformerAttention(E, HEADS, batch_first=True, num_features=8)
    cache = performer.DecodingCache()
    x = _randn(N, L, E)
    pa(x, x, x, cache=cache)
    _check(lambda: pa(x[:2], x[:2], x[:2], cache=cache), ValueError,
           [f"state.kv must have shape (B, Hk, m, Ev) = (2, {HEADS}, 8, {E // HEADS})",
            f"got ({N}, {HEADS}, 8, {E // HEADS})"])
    _check(lambda: pa(x[:, :1], x, x, cache=cache), ValueError,
           ["causal attention and decoding need as many queries as keys (L == S)", f"got L=1, S={L}"])


def test_convert_messages():
    _check(lambda: performer.convert("model"), TypeError, ["model must be a torch.nn.Module", "got str"])
    model = nn.TransformerEncoderLayer(E, HEADS)
    _check(lambda: performer.convert(model, num_features=0), ValueError, ["num_features must be at least 1"])
    _check(lambda: performer.convert(model, kernel="cos"), ValueError, ["kernel must be one of"])
    _check(lambda: performer.convert(model, generator=1), TypeError, ["generator must be a torch.Generator"])
    _check(lambda: performer.convert(model, inplace=None), TypeError, ["inplace must be a bool", "got NoneType"])
    _check(lambda: performer.convert(model, feature_sampler=1), TypeError, ["feature_sampler must be a callable"])
    _check(lambda: performer.PerformerAttention.from_multihead_attention(nn.Linear(2, 2)), TypeError,
           ["mha must be a torch.nn.MultiheadAttention", "got Linear"])
    assert isinstance(model.self_attn, nn.MultiheadAttention)  # failed conversions leave the model alone

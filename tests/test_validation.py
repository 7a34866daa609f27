"""Bad arguments raise ValueError/TypeError naming the argument, the expectation and what was given:
in the Python validation layer (favor_attention) and in the C++ ops' own checks."""
import re

import numpy as np
import pytest
import torch

import performer

B, H, HK, L, E, EV, M = 2, 4, 2, 6, 8, 5, 12


def _valid():
    g = torch.Generator().manual_seed(0)
    return dict(query=torch.randn(B, H, L, E, generator=g), key=torch.randn(B, HK, L, E, generator=g),
                value=torch.randn(B, HK, L, EV, generator=g),
                features=performer.orthogonal_features(M, E, generator=g))


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)


# (id, changed arguments, exception, fragments that must all appear in the message)
BAD_ARGUMENTS = [
    ("query_rank1", dict(query=_randn(E)), ValueError,
     ["query must have at least 2 dimensions", f"got shape ({E},)"]),
    ("key_rank_differs", dict(key=_randn(B, L, E), value=_randn(B, L, EV)), ValueError,
     ["query, key and value must have the same number of dimensions", f"({B}, {L}, {E})"]),
    ("key_batch", dict(key=_randn(3, HK, L, E), value=_randn(3, HK, L, EV)), ValueError,
     [f"key must have the query's batch dimensions ({B},)", f"got shape (3, {HK}, {L}, {E})"]),
    ("key_head_dim", dict(key=_randn(B, HK, L, 7)), ValueError,
     [f"key must have the query's last dimension E={E}", f"got shape ({B}, {HK}, {L}, 7)"]),
    ("value_length", dict(value=_randn(B, HK, L - 1, EV)), ValueError,
     [f"value must have shape (..., S, Ev) with the key's leading dimensions ({B}, {HK}, {L})",
      f"got shape ({B}, {HK}, {L - 1}, {EV})"]),
    ("value_heads", dict(value=_randn(B, 1, L, EV)), ValueError,
     ["value must have shape (..., S, Ev)", f"got shape ({B}, 1, {L}, {EV})"]),
    ("gqa_not_divisible", dict(key=_randn(B, 3, L, E), value=_randn(B, 3, L, EV)), ValueError,
     ["must divide the query heads", f"query has {H}, key has 3"]),
    ("rank3_batch", dict(query=_randn(4, L, E), key=_randn(2, L, E), value=_randn(2, L, EV)), ValueError,
     ["key", "batch", "4", "2"]),
    ("causal_L_gt_S", dict(key=_randn(B, HK, L - 1, E), value=_randn(B, HK, L - 1, EV), is_causal=True),
     ValueError, ["is_causal=True needs at most as many queries as keys (L <= S", f"got L={L}, S={L - 1}"]),
    ("key_dtype_mix", dict(key=_randn(B, HK, L, E, dtype=torch.float64)), TypeError,
     ["key must have the same dtype as query (float32)", "got float64"]),
    ("value_dtype_mix", dict(value=_randn(B, HK, L, EV, dtype=torch.float16)), TypeError,
     ["value must have the same dtype as query (float32)", "got float16"]),
    ("integer_dtype", dict(query=torch.ones(B, H, L, E, dtype=torch.int64), key=torch.ones(B, HK, L, E, dtype=torch.int64),
                           value=torch.ones(B, HK, L, EV, dtype=torch.int64)), TypeError,
     ["query must have dtype float32, float64, bfloat16, float16", "got int64"]),
    ("features_width", dict(features=_randn(M, E - 1)), ValueError,
     [f"features must have shape (num_features, E) = (m, {E})", f"got shape ({M}, {E - 1})"]),
    ("features_rank1", dict(features=_randn(E)), ValueError, ["features must have shape", f"got shape ({E},)"]),
    ("features_empty", dict(features=_randn(0, E)), ValueError, ["m >= 1", f"got shape (0, {E})"]),
    ("features_integer", dict(features=torch.ones(M, E, dtype=torch.int32)), TypeError,
     ["features must be a floating-point tensor", "got int32"]),
    ("mask_shape", dict(key_padding_mask=torch.zeros(B, L - 1, dtype=torch.bool)), ValueError,
     [f"key_padding_mask must have shape (batch, S) = ({B}, {L})", f"got ({B}, {L - 1})"]),
    ("mask_float", dict(key_padding_mask=torch.zeros(B, L)), TypeError,
     ["key_padding_mask must have dtype bool", "got float32"]),
    ("mask_uint8", dict(key_padding_mask=torch.zeros(B, L, dtype=torch.uint8)), TypeError,
     ["key_padding_mask must have dtype bool", "got uint8"]),
    ("attn_mask", dict(attn_mask=torch.zeros(L, L, dtype=torch.bool)), ValueError,
     ["attn_mask is not supported", "is_causal", "key_padding_mask"]),
    ("dropout", dict(dropout_p=0.1), ValueError, ["dropout_p must be 0.0", "got 0.1"]),
    ("scale_zero", dict(scale=0.0), ValueError, ["scale must be positive and finite", "got 0.0"]),
    ("scale_negative", dict(scale=-1.0), ValueError, ["scale must be positive and finite", "got -1.0"]),
    ("scale_nan", dict(scale=float("nan")), ValueError, ["scale must be positive and finite", "got nan"]),
    ("scale_inf", dict(scale=float("inf")), ValueError, ["scale must be positive and finite", "got inf"]),
    ("scale_str", dict(scale="0.5"), TypeError, ["scale must be a float or None", "got str"]),
    ("is_causal_int", dict(is_causal=1), TypeError, ["is_causal must be a bool", "got int"]),
    ("kernel", dict(kernel="gelu"), ValueError, ["kernel must be one of 'softmax', 'relu'", "got 'gelu'"]),
    ("backend", dict(backend="cuda"), ValueError, ["backend must be one of 'cpp', 'triton', 'torch'", "got 'cuda'"]),
    ("query_list", dict(query=[[1.0] * E] * L), TypeError, ["query must be a torch.Tensor", "got list"]),
    ("key_numpy", dict(key=np.zeros((B, HK, L, E), dtype=np.float32)), TypeError,
     ["key must be a torch.Tensor", "got ndarray"]),
    ("value_none", dict(value=None), TypeError, ["value must be a torch.Tensor", "got NoneType"]),
    ("features_none", dict(features=None), TypeError, ["features must be a torch.Tensor", "got NoneType"]),
    ("mask_list", dict(key_padding_mask=[[False] * L] * B), TypeError,
     ["key_padding_mask must be a torch.Tensor", "got list"]),
]


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("changes,exc,fragments", [pytest.param(*c[1:], id=c[0]) for c in BAD_ARGUMENTS])
def test_bad_argument_message(changes, exc, fragments, backend):
    kwargs = dict(_valid(), backend=backend)
    kwargs.update(changes)
    with pytest.raises(exc, match=re.escape(fragments[0])) as info:
        performer.favor_attention(**kwargs)
    for fragment in fragments[1:]:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


def test_valid_arguments_pass():
    assert performer.favor_attention(**_valid()).shape == (B, H, L, EV)


# ---- the C++ ops' own checks (direct calls bypass the Python layer) ----------------------------

def _op_args():
    g = torch.Generator().manual_seed(2)
    return dict(q=torch.randn(B, H, L, E, generator=g), k=torch.randn(B, HK, L, E, generator=g),
                v=torch.randn(B, HK, L, EV, generator=g), features=torch.randn(M, E, generator=g),
                feature_bias=None, key_padding_mask=torch.zeros(B, L, dtype=torch.bool), scale=0.5, causal=False, kernel="softmax")


BAD_OP_ARGUMENTS = [
    ("q_rank3", dict(q=_randn(H, L, E)), ValueError, ["q must have shape (B, H, L, E)", f"got shape [{H}, {L}, {E}]"]),
    ("k_batch", dict(k=_randn(3, HK, L, E)), ValueError, ["k must have shape (B, Hk, S, E)", "got shape [3,"]),
    ("k_head_dim", dict(k=_randn(B, HK, L, 7)), ValueError, [f"with size {E} in dimension 3", "got shape"]),
    ("k_heads", dict(k=_randn(B, 3, L, E), v=_randn(B, 3, L, EV)), ValueError,
     [f"k must have a head count Hk dividing q's H={H}", "got Hk=3"]),
    ("v_length", dict(v=_randn(B, HK, L - 1, EV)), ValueError,
     ["v must have shape (B, Hk, S, Ev)", f"with size {L} in dimension 2"]),
    ("causal_L_ne_S", dict(k=_randn(B, HK, L + 1, E), v=_randn(B, HK, L + 1, EV), causal=True), ValueError,
     ["k must have S == L for causal attention", f"got L={L}, S={L + 1}"]),
    ("k_dtype", dict(k=_randn(B, HK, L, E, dtype=torch.float64)), TypeError, ["k must have the dtype of q", "Double"]),
    ("integer", dict(q=torch.ones(B, H, L, E, dtype=torch.int64), k=torch.ones(B, HK, L, E, dtype=torch.int64),
                     v=torch.ones(B, HK, L, EV, dtype=torch.int64)), TypeError,
     ["q must have dtype float32, float64, bfloat16 or float16", "got Long"]),
    ("features_width", dict(features=_randn(M, E - 1)), ValueError, ["features must have shape (m, E)", "got shape"]),
    ("features_empty", dict(features=_randn(0, E)), ValueError, ["features must have at least one row"]),
    ("features_integer", dict(features=torch.ones(M, E, dtype=torch.int64)), TypeError,
     ["features must be floating point", "got Long"]),
    ("mask_shape", dict(key_padding_mask=torch.zeros(B, L - 1, dtype=torch.bool)), ValueError,
     [f"key_padding_mask must have shape (B, S) = ({B}, {L})", f"got shape [{B}, {L - 1}]"]),
    ("mask_float", dict(key_padding_mask=torch.zeros(B, L)), TypeError, ["key_padding_mask must have dtype bool"]),
    ("scale", dict(scale=0.0), ValueError, ["scale must be positive", "got 0"]),
    ("kernel", dict(kernel="gelu"), ValueError, ["kernel must be 'softmax', 'relu' or 'softmax_normalized'", "got 'gelu'"]),
]


@pytest.mark.parametrize("changes,exc,fragments", [pytest.param(*c[1:], id=c[0]) for c in BAD_OP_ARGUMENTS])
def test_forward_op_checks(changes, exc, fragments):
    args = _op_args()
    args.update(changes)
    with pytest.raises(exc, match=re.escape(fragments[0])) as info:
        torch.ops.performer.favor_forward(*args.values())
    for fragment in fragments[1:]:
        assert fragment in str(info.value)


@pytest.mark.parametrize("name,bad,exc,fragment", [
    ("grad_out", lambda t: t[:, :, :3], ValueError, "grad_out must have shape (B, H, L, Ev)"),
    ("grad_out", lambda t: t.double(), TypeError, "grad_out must have the dtype of q"),
    ("out", lambda t: t[0], ValueError, "out must have shape (B, H, L, Ev)"),
    ("state", lambda t: t[:, :, :3], ValueError, "state must have shape"),
    ("state", lambda t: t.double(), TypeError, "state must have dtype"),
    ("den", lambda t: t[..., 1:], ValueError, "den must have shape"),
    ("query_shift", lambda t: t[..., 1:], ValueError, "query_shift must have shape"),
    ("key_shift", lambda t: t[:, :1], ValueError, "key_shift must have shape"),
])
def test_backward_op_checks(name, bad, exc, fragment):
    args = _op_args()
    out, state, den, query_shift, key_shift = torch.ops.performer.favor_forward(*args.values())
    saved = dict(grad_out=torch.ones_like(out), out=out, state=state, den=den, query_shift=query_shift,
                 key_shift=key_shift)
    saved[name] = bad(saved[name])
    with pytest.raises(exc, match=re.escape(fragment)):
        torch.ops.performer.favor_backward(
            saved["grad_out"], args["q"], args["k"], args["v"], args["features"], args["feature_bias"],
            args["key_padding_mask"], saved["out"], saved["state"], saved["den"], saved["query_shift"],
            saved["key_shift"], args["scale"], args["causal"], args["kernel"], False)

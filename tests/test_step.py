"""favor_attention_step: stepping through a sequence reproduces the full causal output of every
backend, the state stays finite, the cost per step does not depend on the prefix, bad states fail."""
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import performer
from performer.ops.favor.reference import favor_dense
from conftest import BACKENDS, KERNELS, SPECS, assert_close, dtype_id, make_case

CAUSAL_SPECS = [s for s in SPECS if s.causal_ok]


def run_in_pieces(case, sizes, kernel="softmax"):
    """favor_attention_step over the case's sequence in pieces of the given sizes (the last piece
    takes the rest); returns the concatenated output and the final state."""
    L = case.q.shape[-2]
    bounds = [0]
    for size in sizes:
        bounds.append(min(L, bounds[-1] + size))
    bounds.append(L)
    outs, state = [], None
    for t0, t1 in zip(bounds[:-1], bounds[1:]):
        if t1 == t0 and t1 < L:
            continue
        mask = None if case.key_padding_mask is None else case.key_padding_mask[..., t0:t1]
        out, state = performer.favor_attention_step(
            case.q[..., t0:t1, :], case.k[..., t0:t1, :], case.v[..., t0:t1, :], state, features=case.features,
            scale=case.spec.scale, kernel=kernel, key_padding_mask=mask)
        outs.append(out)
    return torch.cat(outs, dim=-2), state


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("spec", CAUSAL_SPECS, ids=lambda s: s.id)
def test_token_by_token_matches_full_causal_output(spec, masked, kernel, dtype):
    """One token at a time equals favor_attention(is_causal=True) at every position, on every backend."""
    case = make_case(spec, dtype, masked=masked)
    stepped, _ = run_in_pieces(case, [1] * spec.L, kernel)
    assert stepped.dtype == dtype
    assert_close(stepped, case.reference(True, kernel), case.reference(True, kernel, dtype=dtype))
    for backend in BACKENDS:
        full = case.run(True, backend, kernel)
        if dtype == torch.bfloat16:  # both round a float32 result to bfloat16: at most one ulp apart
            torch.testing.assert_close(stepped, full, atol=2 ** -7, rtol=2 ** -7)
        else:
            tol = 1e-12 if dtype == torch.float64 else 2e-5
            torch.testing.assert_close(stepped, full, atol=tol, rtol=tol, msg=lambda m: f"{backend}: {m}")


@pytest.mark.parametrize("sizes", [[5, 0, 17], [64, 64], [200]], ids=["uneven", "chunk_sized", "whole"])
def test_pieces_of_any_size_give_the_same_output(sizes):
    case = make_case(SPECS[1], torch.float64, masked=True)  # L = 130: crosses the 128-row chunks
    stepped, state = run_in_pieces(case, sizes)
    torch.testing.assert_close(stepped, case.run(True, "cpp"), atol=1e-12, rtol=1e-12)
    _, state_by_token = run_in_pieces(case, [1] * SPECS[1].L)
    for a, b in zip(state, state_by_token):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_state_stays_finite_as_key_logits_grow():
    """Keys growing along feature directions push the logits w past 88, where exp overflows
    float32; the running max in the state keeps every sum finite, matching the full computation."""
    g = torch.Generator().manual_seed(3)
    B, H, L, E, m = 2, 2, 40, 16, 32
    w = 5 * performer.orthogonal_features(m, E, generator=g)   # |w_j|^2 / 2 ~ 200: the largest logit
    ramp = torch.linspace(0.1, 1.0, L)[:, None]
    k = (w[torch.arange(L) % m] * ramp + 0.1 * torch.randn(L, E, generator=g)).expand(B, H, L, E) * E ** 0.25
    q = torch.randn(B, H, L, E, generator=g)
    v = torch.randn(B, H, L, E, generator=g)
    outs, state = [], None
    for t in range(L):
        o, state = performer.favor_attention_step(q[..., t:t + 1, :], k[..., t:t + 1, :], v[..., t:t + 1, :],
                                                  state, features=w)
        assert all(torch.isfinite(s).all() for s in state), f"state not finite after {t + 1} tokens"
        outs.append(o)
    assert state.key_max.min() > 100
    scale = E ** -0.5
    ref64, ref32 = (favor_dense(q.to(d), k.to(d), v.to(d), w.to(d), None, scale, True, "softmax")
                    for d in (torch.float64, torch.float32))
    assert_close(torch.cat(outs, dim=-2), ref64, ref32, "stepped")
    for backend in BACKENDS:  # the full computation is just as (ill-)conditioned
        assert_close(performer.favor_attention(q, k, v, is_causal=True, features=w, backend=backend), ref64, ref32,
                     backend)


def test_cost_per_token_does_not_depend_on_prefix_length():
    """The state has the same size after any prefix, and a step costs the same floating-point work
    (counted on the plain-PyTorch step: the fused step is one opaque op to the counter)."""
    g = torch.Generator().manual_seed(4)
    B, H, E, m = 1, 4, 32, 64
    w = performer.orthogonal_features(m, E, generator=g)
    token = [torch.randn(B, H, 1, E, generator=g) for _ in range(3)]
    flops, shapes = {}, {}
    for prefix in (16, 1024):
        pre = [torch.randn(B, H, prefix, E, generator=g) for _ in range(3)]
        _, state = performer.favor_attention_step(*pre, features=w)
        shapes[prefix] = [tuple(t.shape) for t in state]
        with FlopCounterMode(display=False) as counter:
            performer.favor_attention_step(*token, state, features=w, backend="torch")
        flops[prefix] = counter.get_total_flops()
    assert shapes[16] == shapes[1024] == [(B, H, m, E), (B, H, m), (B, H)]
    assert flops[16] == flops[1024] > 0


def test_empty_step_keeps_the_state():
    case = make_case(SPECS[0], torch.float32)
    _, state = run_in_pieces(case, [10])
    out, same = performer.favor_attention_step(case.q[..., :0, :], case.k[..., :0, :], case.v[..., :0, :], state,
                                               features=case.features)
    assert out.shape == case.q.shape[:-2] + (0, SPECS[0].Ev)
    assert all(torch.equal(a, b) for a, b in zip(same, state))


def test_state_is_not_modified_and_is_a_named_tuple():
    case = make_case(SPECS[0], torch.float32)
    _, state = run_in_pieces(case, [10])
    assert isinstance(state, performer.FavorState) and state._fields == ("kv", "normalizer", "key_max")
    before = [t.clone() for t in state]
    performer.favor_attention_step(case.q[..., 10:11, :], case.k[..., 10:11, :], case.v[..., 10:11, :], state,
                                   features=case.features)
    assert all(torch.equal(a, b) for a, b in zip(state, before))


def _state_for(B=2, Hk=2, m=20, Ev=9, dtype=torch.float32):
    return performer.FavorState(torch.zeros(B, Hk, m, Ev, dtype=dtype), torch.zeros(B, Hk, m, dtype=dtype),
                                torch.full((B, Hk), float("-inf"), dtype=dtype))


BAD_STATES = [  # SPECS[0]: B=2, H=4, Hk=2, E=16, Ev=9, m=20
    ("other_batch", _state_for(B=3), ValueError,
     ["state.kv must have shape (B, Hk, m, Ev) = (2, 2, 20, 9)", "got (3, 2, 20, 9)", "inputs of another shape"]),
    ("other_value_size", _state_for(Ev=8), ValueError, ["state.kv must have shape", "got (2, 2, 20, 8)"]),
    ("other_features", _state_for(m=16), ValueError, ["state.kv must have shape", "got (2, 2, 16, 9)"]),
    ("query_heads", _state_for(Hk=4), ValueError, ["state.kv must have shape", "got (2, 4, 20, 9)"]),
    ("normalizer", _state_for()._replace(normalizer=torch.zeros(2, 2, 19)), ValueError,
     ["state.normalizer must have shape (B, Hk, m) = (2, 2, 20)", "got (2, 2, 19)"]),
    ("key_max", _state_for()._replace(key_max=torch.zeros(2)), ValueError,
     ["state.key_max must have shape (B, Hk) = (2, 2)", "got (2,)"]),
    ("dtype", _state_for(dtype=torch.float64), TypeError,
     ["state.kv must have dtype float32 (the accumulation dtype for float32 inputs)", "got float64"]),
    ("not_a_state", torch.zeros(3), TypeError, ["state must be the FavorState", "got Tensor"]),
    ("two_fields", (torch.zeros(1), torch.zeros(1)), TypeError, ["state must be the FavorState", "got tuple"]),
    ("field_not_tensor", _state_for()._replace(key_max=None), TypeError,
     ["state.key_max must be a torch.Tensor", "got NoneType"]),
]


@pytest.mark.parametrize("state,exc,fragments", [pytest.param(*c[1:], id=c[0]) for c in BAD_STATES])
def test_bad_state_message(state, exc, fragments):
    case = make_case(SPECS[0], torch.float32)
    with pytest.raises(exc, match=re.escape(fragments[0])) as info:
        performer.favor_attention_step(case.q[..., :1, :], case.k[..., :1, :], case.v[..., :1, :], state,
                                       features=case.features)
    for fragment in fragments[1:]:
        assert fragment in str(info.value)


def test_mismatched_new_positions_message():
    case = make_case(SPECS[0], torch.float32)
    with pytest.raises(ValueError, match=re.escape("key must hold one new position per query position (dim -2): "
                                                   "query has 1, key has 2")):
        performer.favor_attention_step(case.q[..., :1, :], case.k[..., :2, :], case.v[..., :2, :],
                                       features=case.features)

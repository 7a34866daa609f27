"""The fused C++ decoding step (favor_attention_step's "cpp" backend) against the plain-PyTorch
step: every spec, dtype and kernel, pieces of several sizes, in place, non-contiguous inputs and
states, the multi-thread split of one head, every ISA copy, opcheck and torch.compile."""
import dataclasses
import re

import pytest
import torch
from torch import nn

import performer
from conftest import ISAS, KERNELS, SPECS, dtype_id, feature_sets, make_case, run_on_isa

CAUSAL_SPECS = [s for s in SPECS if s.causal_ok]
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2 ** -7, torch.float16: 2e-3}


def step_both(case, bounds, kernel="softmax", inplace=False, layout="shared"):
    """Runs the case's sequence through both backends in the pieces given by ``bounds``, with the
    case's features in ``layout`` (conftest.feature_sets; 4-D specs); returns [(out_cpp, out_torch,
    state_cpp, state_torch)] per piece."""
    spec = case.spec
    features, bias = feature_sets(case.features, layout, spec.B, spec.Hk)
    results, states = [], {"cpp": None, "torch": None}
    for t0, t1 in zip(bounds[:-1], bounds[1:]):
        mask = None if case.key_padding_mask is None else case.key_padding_mask[..., t0:t1]
        piece = [t[..., t0:t1, :] for t in (case.q, case.k, case.v)]
        got = {}
        for backend in ("cpp", "torch"):
            got[backend] = performer.favor_attention_step(
                *piece, states[backend], features=features, scale=case.spec.scale, kernel=kernel,
                key_padding_mask=mask, backend=backend, inplace=inplace and backend == "cpp", feature_bias=bias)
            states[backend] = got[backend][1]
        results.append((got["cpp"][0], got["torch"][0], tuple(t.clone() for t in got["cpp"][1]), got["torch"][1]))
    return results


def assert_step_close(results, dtype):
    tol = TOL[dtype]
    for i, (oc, ot, sc, st) in enumerate(results):
        assert oc.dtype == ot.dtype == dtype and oc.shape == ot.shape
        torch.testing.assert_close(oc, ot, atol=tol, rtol=tol, msg=lambda m: f"piece {i} output: {m}")
        state_tol = 1e-12 if dtype == torch.float64 else 2e-5
        for name, a, b in zip(performer.FavorState._fields, sc, st):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            torch.testing.assert_close(a, b, atol=state_tol, rtol=state_tol, msg=lambda m: f"piece {i} {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("spec", CAUSAL_SPECS, ids=lambda s: s.id)
def test_cpp_step_matches_torch_step(spec, masked, kernel, dtype):
    """Token by token, then pieces of 3 and the rest: output and state equal the plain-PyTorch step."""
    case = make_case(spec, dtype, masked=masked, seed=1)
    L = spec.L
    bounds = sorted({0, *range(1, min(L, 6)), min(L, 9), L})
    assert_step_close(step_both(case, bounds, kernel), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("layout", ["per_head", "per_batch_head"])
@pytest.mark.parametrize("spec", [s for s in CAUSAL_SPECS if s.layout in ("4d", "transposed")], ids=lambda s: s.id)
def test_feature_sets_and_bias(spec, layout, kernel, dtype):
    """Features per key head or per batch entry and key head, with a bias (calibrated and FAVOR++
    maps): each item projects with its own set, in pieces and token by token, in place too."""
    case = make_case(spec, dtype, masked=spec.B > 1, seed=8)
    bounds = sorted({0, 1, 2, 3, min(spec.L, 8), spec.L})
    assert_step_close(step_both(case, bounds, kernel, layout=layout), dtype)
    assert_step_close(step_both(case, bounds[:4], kernel, inplace=True, layout=layout), dtype)


@pytest.mark.parametrize("spec", CAUSAL_SPECS[:2], ids=lambda s: s.id)
def test_inplace_step_updates_the_given_state(spec):
    case = make_case(spec, torch.float32, masked=True, seed=2)
    bounds = sorted({0, 1, 2, 7, spec.L})
    assert_step_close(step_both(case, bounds, inplace=True), torch.float32)
    _, state = performer.favor_attention_step(case.q[..., :3, :], case.k[..., :3, :], case.v[..., :3, :],
                                              features=case.features)
    ptrs = [t.data_ptr() for t in state]
    _, after = performer.favor_attention_step(case.q[..., 3:4, :], case.k[..., 3:4, :], case.v[..., 3:4, :], state,
                                              features=case.features, inplace=True)
    assert [t.data_ptr() for t in after] == ptrs


def test_non_contiguous_inputs_and_state():
    """Strided query/key/value and a transposed-storage state (updated out of place even with inplace=True)."""
    spec = SPECS[0]
    case = make_case(spec, torch.float32, seed=3)
    q, k, v = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (case.q, case.k, case.v))
    _, state = performer.favor_attention_step(q[..., :5, :], k[..., :5, :], v[..., :5, :], features=case.features)
    strided = performer.FavorState(state.kv.transpose(-1, -2).contiguous().transpose(-1, -2),
                                   torch.stack([state.normalizer] * 2, -1)[..., 0],
                                   state.key_max.clone())
    assert not strided.kv.is_contiguous() and not strided.normalizer.is_contiguous()
    piece = [t[..., 5:6, :] for t in (q, k, v)]
    want, want_state = performer.favor_attention_step(*piece, state, features=case.features, backend="torch")
    got, got_state = performer.favor_attention_step(*piece, strided, features=case.features, backend="cpp",
                                                    inplace=True)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    for a, b in zip(got_state, want_state):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_one_head_split_across_threads(kernel):
    """B = Hk = 1 with work enough for a second thread (m = 1024, Ev = 256: about 3 million
    multiply-adds per position): the kernel splits the features over the threads (softmax_normalized
    combines the threads' shares of each key's log-sum-exp)."""
    g = torch.Generator().manual_seed(4)
    E, m, Ev = 64, 1024, 256
    w = performer.orthogonal_features(m, E, generator=g)
    q, k, v = (torch.randn(1, 8, 40, d, generator=g) for d in (E, E, Ev))
    k, v = k[:, :1], v[:, :1]   # GQA: eight query heads on one key head
    threads = torch.get_num_threads()
    try:
        for n in sorted({1, 2, threads}):
            torch.set_num_threads(n)
            case = dataclasses.replace(make_case(SPECS[0], torch.float32), q=q, k=k, v=v, features=w,
                                       key_padding_mask=None)
            assert_step_close(step_both(case, [0, 1, 2, 3, 17, 40], kernel), torch.float32)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("layout", ["shared", "per_batch_head"])
@pytest.mark.parametrize("B,H,Hk,dtype", [(5, 1, 1, torch.float32), (2, 6, 3, torch.float32), (3, 4, 2, torch.bfloat16),
                                        (2, 2, 2, torch.float64), (1, 20, 20, torch.float32)])
def test_items_split_across_threads(B, H, Hk, dtype, layout):
    """Enough work per position (over 2^18 multiply-adds) and at least two (batch, key head) items:
    each thread takes a contiguous share of the items, in pieces cut at batch boundaries (shares of
    5 items over 2 threads cross them) and at 32 rows (20 key heads of one query head each: pieces
    of 16), with strided inputs; each piece reads its items' own features and bias."""
    g = torch.Generator().manual_seed(6)
    E, m, Ev = 64, 256, 72
    w = performer.orthogonal_features(m, E, generator=g, dtype=torch.float64).to(dtype)
    q = torch.randn(B, 12, H, E, generator=g).to(dtype).transpose(1, 2)  # (B, H, L, E) over (B, L, H, E)
    k = torch.randn(B, 12, Hk, E, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(B, 12, Hk, Ev, generator=g).to(dtype).transpose(1, 2)
    mask = torch.rand(B, 12, generator=g) < 0.2
    threads = torch.get_num_threads()
    try:
        for n in sorted({1, 2, threads}):
            torch.set_num_threads(n)
            spec = dataclasses.replace(SPECS[0], B=B, H=H, Hk=Hk)
            case = dataclasses.replace(make_case(SPECS[0], dtype), spec=spec, q=q, k=k, v=v, features=w,
                                       key_padding_mask=mask)
            assert_step_close(step_both(case, [0, 1, 5, 12], layout=layout), dtype)
    finally:
        torch.set_num_threads(threads)


class _CountingExtension:
    """performer._C with its favor_step_ calls counted."""

    def __init__(self, ext):
        self.ext, self.calls, self.transformed = ext, 0, 0

    def favor_step_(self, *args):
        self.calls += 1
        self.transformed += len(args) > 11   # a frozen map's row transform
        return self.ext.favor_step_(*args)


@pytest.mark.parametrize("layout", ["shared", "per_batch_head"])
def test_in_place_decoding_calls_the_extension_directly(monkeypatch, layout):
    """A decoder's in-place call goes straight to performer._C.favor_step_ (one call per token, the
    op's results), with per-head features and a bias too; a gradient, a subclass or torch.compile
    take the full path."""
    from performer.ops.favor import step as step_module
    case = make_case(SPECS[0], torch.float32, masked=True, seed=8)
    w, bias = feature_sets(case.features, layout, case.spec.B, case.spec.Hk)
    counting = _CountingExtension(step_module._C)
    monkeypatch.setattr(step_module, "_C", counting)
    _, state = performer.favor_attention_step(case.q[..., :3, :], case.k[..., :3, :], case.v[..., :3, :],
                                              features=w, feature_bias=bias,
                                              key_padding_mask=case.key_padding_mask[:, :3])
    reference = tuple(t.clone() for t in state)
    for t in range(3, 7):
        piece = [x[..., t:t + 1, :] for x in (case.q, case.k, case.v)]
        mask = case.key_padding_mask[:, t:t + 1]
        want, reference = performer.favor_attention_step(*piece, reference, features=w, feature_bias=bias,
                                                         key_padding_mask=mask)
        got, after = performer.favor_attention_step(*piece, state, features=w, feature_bias=bias,
                                                    key_padding_mask=mask, inplace=True)
        assert after is state
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        for a, b in zip(state, reference):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert counting.calls == 4
    q = case.q[..., 7:8, :].clone().requires_grad_()
    out, new = performer.favor_attention_step(q, case.k[..., 7:8, :], case.v[..., 7:8, :], state,
                                              features=w, feature_bias=bias, inplace=True)
    assert out.requires_grad and counting.calls == 4 and new is not state
    compiled = torch.compile(lambda q, k, v, s: performer.favor_attention_step(q, k, v, s, features=w,
                                                                              feature_bias=bias, inplace=True),
                             fullgraph=True, backend="eager")
    compiled(*(x[..., 7:8, :] for x in (case.q, case.k, case.v)), state)
    assert counting.calls == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("kind,layout,kernel", [("favor++", "shared", "softmax"), ("favor++", "per_head", "softmax"),
                                               ("favor+", "shared", "softmax"),
                                               ("favor++", "shared", "softmax_normalized")])
def test_in_place_decoding_with_a_frozen_map_skips_the_full_checks(monkeypatch, dtype, kind, layout, kernel):
    """With a frozen FeatureMap, a decoder's tokens after the first reuse the map's derived features
    and go straight to the extension (the full checks run once), which applies the map's transform
    of the rows itself for float32 and float64 inputs; the outputs and state equal the out-of-place
    steps' to rounding."""
    from performer.ops.favor import step as step_module
    case = make_case(SPECS[0], dtype, seed=9)
    features = case.features if layout == "shared" else feature_sets(case.features, "per_batch_head", 1,
                                                                     case.spec.Hk)[0][0]
    fmap = performer.FeatureMap(kind).freeze(case.q, case.k)
    calls = []
    full_checks = step_module.validate_favor_step
    monkeypatch.setattr(step_module, "validate_favor_step", lambda *a, **kw: calls.append(1) or full_checks(*a, **kw))
    counting = _CountingExtension(step_module._C)
    monkeypatch.setattr(step_module, "_C", counting)
    state = reference = None
    for t in range(6):
        piece = [x[..., t:t + 1, :] for x in (case.q, case.k, case.v)]
        want, reference = performer.favor_attention_step(*piece, reference, features=features, feature_map=fmap,
                                                         kernel=kernel)
        n = len(calls)
        got, state = performer.favor_attention_step(*piece, state, features=features, feature_map=fmap,
                                                    inplace=True, kernel=kernel)
        assert len(calls) == n + (t == 0), t   # the first step (no state yet) takes the full path
        torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])
        state_tol = 1e-12 if dtype == torch.float64 else 2e-5
        for a, b in zip(state, reference):
            torch.testing.assert_close(a, b, atol=state_tol, rtol=state_tol)
    fused = dtype in (torch.float32, torch.float64)
    assert counting.calls == 5 and counting.transformed == (5 if fused else 0)
    if fused:  # FAVOR++'s coefficient on the rows: heads that share the features read one matrix
        step = fmap.derived(*piece[:2], features, case.spec.E ** -0.5 if case.spec.scale is None
                            else case.spec.scale).step
        shared = layout == "shared"
        assert (step.features.dim() == 2) == shared and (step.k_post is not None) == (shared and kind == "favor++")


def _fused_transform_case(B, H, Hk, E, m, dtype, seed=0, kernel="softmax"):
    """performer._C.favor_step_ with a row transform (q_mul, k_mul, k_add, k_post, head_bias) on
    random values, and the plain-PyTorch step on the inputs and features it stands for: query
    q * q_mul / k_post (the kernel projects W (q * q_mul), and the torch step multiplies by its
    head's features k_post W), key k * k_mul + k_add, features k_post W per key head, bias head_bias.
    Returns (out, state) of each, after a prefix of 3 tokens and one more."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    q, k, v = r(B, H, 4, E), r(B, Hk, 4, E), r(B, Hk, 4, E)
    w = performer.orthogonal_features(m, E, generator=g, dtype=dtype)
    q_mul, k_mul, k_add = 1 + 0.3 * r(1, H, 1, E), 1 + 0.3 * r(1, Hk, 1, E), 0.2 * r(1, Hk, 1, E)
    k_post, head_bias = 0.8 + 0.2 * torch.rand(Hk, generator=g, dtype=dtype), 0.1 * r(1, Hk, m)
    post_q = k_post.repeat_interleave(H // Hk)[None, :, None, None]
    ref = dict(features=k_post[:, None, None] * w, feature_bias=head_bias[0], scale=1.0, backend="torch",
               kernel=kernel)
    q_ref, k_ref = q * q_mul / post_q, k * k_mul + k_add
    _, prefix = performer.favor_attention_step(q_ref[..., :3, :], k_ref[..., :3, :], v[..., :3, :], **ref)
    want, want_state = performer.favor_attention_step(q_ref[..., 3:, :], k_ref[..., 3:, :], v[..., 3:, :],
                                                      prefix, **ref)
    state = [t.clone() for t in prefix]
    got = performer._C.favor_step_(q[..., 3:, :], k[..., 3:, :], v[..., 3:, :], w, None, None, *state, 1.0,
                                   kernel, q_mul, k_mul, k_add, k_post, head_bias)
    return (got, tuple(state)), (want, tuple(want_state))


@pytest.mark.parametrize("kernel", ["softmax", "softmax_normalized"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("B,H,Hk,E,m", [(1, 8, 8, 64, 256), (2, 4, 2, 16, 20), (3, 2, 1, 5, 7), (4, 8, 8, 64, 256)])
def test_fused_row_transform_of_the_step(B, H, Hk, E, m, dtype, kernel):
    """The kernel's row transform (a frozen map's rescaling, centering and FAVOR++ coefficient with
    features shared by the heads) equals the plain-PyTorch step on the transformed inputs, one head or
    several, grouped heads, items split across threads; for both exponential kernels."""
    (got, state), (want, want_state) = _fused_transform_case(B, H, Hk, E, m, dtype, kernel=kernel)
    torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])
    for a, b in zip(state, want_state):
        torch.testing.assert_close(a, b, atol=TOL[dtype], rtol=TOL[dtype])


def test_fused_row_transform_bad_arguments():
    """Each transform tensor is checked (size, dtype) by name, and head_bias excludes feature_bias."""
    q, k, v, w, _, state, _ = _step_samples()
    H, Hk, E, m = q.shape[1], k.shape[1], q.shape[-1], w.shape[0]
    ok = dict(q_mul=torch.ones(H, E), k_mul=torch.ones(Hk, E), k_add=torch.zeros(Hk, E), k_post=torch.ones(Hk),
              head_bias=torch.zeros(Hk, m))
    for name, bad, fragment in (("q_mul", torch.ones(Hk, E), "q_mul must be a contiguous CPU tensor of"),
                                ("k_add", torch.zeros(Hk, E, dtype=torch.float64), "k_add must be"),
                                ("k_post", torch.ones(Hk + 1), "k_post must be"),
                                ("head_bias", torch.zeros(m, Hk).t(), "head_bias must be")):
        with pytest.raises(RuntimeError, match=fragment):
            performer._C.favor_step_(q, k, v, w, None, None, *(t.clone() for t in state), 1.0, "softmax",
                                     **{**ok, name: bad})
    with pytest.raises(RuntimeError, match="head_bias replaces feature_bias"):
        performer._C.favor_step_(q, k, v, w, torch.zeros(m), None, *(t.clone() for t in state), 1.0, "softmax",
                                 **ok)


@pytest.mark.parametrize("name", ["other_batch", "normalizer", "dtype", "field_not_tensor"])
def test_in_place_bad_state_same_error(name):
    """A state the extension refuses with inplace=True gets the full checks' error, the one without
    inplace, and is left as it was."""
    from test_step import BAD_STATES
    _, state, exc, fragments = next(c for c in BAD_STATES if c[0] == name)
    case = make_case(SPECS[0], torch.float32)
    before = [t.clone() if isinstance(t, torch.Tensor) else t for t in state]
    piece = [x[..., :1, :] for x in (case.q, case.k, case.v)]
    for inplace in (False, True):
        with pytest.raises(exc, match=re.escape(fragments[0])):
            performer.favor_attention_step(*piece, state, features=case.features, inplace=inplace)
    for a, b in zip(state, before):
        assert a is b is None or torch.equal(a, b)


def test_gradient_falls_back_to_torch():
    case = make_case(SPECS[0], torch.float64, requires_grad=True, seed=5)
    with pytest.raises(ValueError, match="has no gradient"):
        performer.favor_attention_step(case.q[..., :2, :], case.k[..., :2, :], case.v[..., :2, :],
                                       features=case.features, backend="cpp")
    out, state = performer.favor_attention_step(case.q[..., :2, :], case.k[..., :2, :], case.v[..., :2, :],
                                                features=case.features)
    assert out.requires_grad and state.kv.requires_grad
    x = [t.detach()[..., :3, :].clone().requires_grad_() for t in (case.q, case.k, case.v)]
    assert torch.autograd.gradcheck(
        lambda q, k, v: performer.favor_attention_step(q, k, v, features=case.features)[0], x)


@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace"])
@pytest.mark.parametrize("layout", ["shared", "per_batch_head"])
def test_feature_gradient_takes_the_differentiable_step(inplace, layout):
    """Features (an nn.Parameter, as a calibrated module's) or a bias that need a gradient make the
    step run the plain-PyTorch recurrent form, in place or not: the fused step has no gradient, and
    the direct in-place path must not drop it."""
    case = make_case(SPECS[0], torch.float64, seed=4)
    w, bias = feature_sets(case.features, layout, case.spec.B, case.spec.Hk)
    with torch.no_grad():
        _, state = performer.favor_attention_step(case.q[..., :3, :], case.k[..., :3, :], case.v[..., :3, :],
                                                  features=w, feature_bias=bias)
    piece = [x[..., 3:4, :] for x in (case.q, case.k, case.v)]

    def step(w, bias=bias):
        s = performer.FavorState(*(t.clone() for t in state))
        return performer.favor_attention_step(*piece, s, features=w, feature_bias=bias, inplace=inplace)[0]

    param = nn.Parameter(w.clone())
    assert step(param).grad_fn is not None
    assert torch.autograd.gradcheck(step, (param,))
    if bias is not None:
        assert torch.autograd.gradcheck(lambda b: step(w, b), (bias.clone().requires_grad_(),))


def _step_samples(dtype=torch.float32):
    case = make_case(SPECS[0], dtype, masked=True, seed=6)
    _, state = performer.favor_attention_step(case.q[..., :4, :], case.k[..., :4, :], case.v[..., :4, :],
                                              features=case.features)
    q, k, v = (t[..., 4:6, :].contiguous() for t in (case.q, case.k, case.v))
    scale = case.q.shape[-1] ** -0.5
    return q, k, v, case.features, case.key_padding_mask[..., 4:6].contiguous(), state, scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_opcheck_step_ops(dtype):
    q, k, v, w, mask, state, scale = _step_samples(dtype)
    op, op_ = torch.ops.performer.favor_step.default, torch.ops.performer.favor_step_.default
    torch.library.opcheck(op, (q, k, v, w, None, mask, *state, scale, "softmax"))
    torch.library.opcheck(op, (q, k, v, w, None, None, None, None, None, scale, "relu"))
    torch.library.opcheck(op_, (q, k, v, w, None, mask, *(t.clone() for t in state), scale, "softmax"))
    ws, bias = feature_sets(w, "per_batch_head", q.shape[0], k.shape[1])
    torch.library.opcheck(op, (q, k, v, ws, bias, mask, *state, scale, "softmax"))
    torch.library.opcheck(op_, (q, k, v, ws[:1], bias[:1], mask, *(t.clone() for t in state), scale, "relu"))
    torch.library.opcheck(op, (q, k, v, ws, bias, mask, *state, scale, "softmax_normalized"))
    torch.library.opcheck(op_, (q, k, v, w, None, mask, *(t.clone() for t in state), scale, "softmax_normalized"))


@pytest.mark.parametrize("layout", ["shared", "per_head"])
def test_compiled_decoding_loop(layout):
    q, k, v, w, mask, state, scale = _step_samples()
    w, bias = feature_sets(w, layout, q.shape[0], k.shape[1])

    def step(q, k, v, state):
        out, new = performer.favor_attention_step(q, k, v, state, features=w, feature_bias=bias)
        return out, new

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    want, want_state = step(q, k, v, state)
    got, got_state = compiled(q, k, v, state)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_state, want_state):
        torch.testing.assert_close(a, b)


STEP_ISA_SCRIPT = """
import json, torch, performer
from conftest import Spec, make_case
from test_step_cpp import _fused_transform_case, assert_step_close, step_both
checked = 0
for spec in (Spec("isa", 2, 4, 2, 21, 21, 16, 9, 20), Spec("isa_wide", 1, 8, 1, 9, 9, 64, 64, 256)):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for kernel in ("softmax", "relu", "softmax_normalized"):
            for layout in ("shared", "per_batch_head"):
                case = make_case(spec, dtype, masked=spec.B > 1, seed=7)
                assert_step_close(step_both(case, [0, 1, 2, 5, spec.L], kernel, layout=layout), dtype)
                checked += 1
for dtype, tol in ((torch.float32, 2e-5), (torch.float64, 1e-12)):
    for sizes in ((1, 8, 8, 64, 256), (2, 4, 2, 16, 20)):
        for got, want in zip(*_fused_transform_case(*sizes, dtype)):
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        checked += 1
print(json.dumps({"isa": torch.ops.performer.cpu_isa(), "checked": checked}))
"""


@pytest.mark.parametrize("isa", ISAS)
def test_every_isa_copy_of_the_step(isa):
    assert run_on_isa(isa, STEP_ISA_SCRIPT) == {"isa": isa, "checked": 40}

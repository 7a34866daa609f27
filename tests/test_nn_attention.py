"""PerformerAttention and FastAttention: nn.MultiheadAttention's interface, parameters and layouts;
random features in a buffer with their redraw schedule; dropout; decoding with a cache."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import performer
import performer.nn.features as features_module

E, HEADS, N, L, S = 16, 4, 3, 7, 9
DOUBLE = dict(dtype=torch.float64)


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def exact_attention(q, k, v, *, is_causal, features, key_padding_mask, kernel, feature_map=None):
    """favor_attention's signature, softmax attention's values: makes PerformerAttention compute
    what nn.MultiheadAttention computes, so that everything around the core can be compared exactly."""
    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        mask = causal if mask is None else mask & causal
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def module_pair(**options):
    """An nn.MultiheadAttention and a PerformerAttention loaded from its state_dict (float64); the
    same weights in every run, whatever the tests before it drew from the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mha = nn.MultiheadAttention(E, HEADS, **options, **DOUBLE)
    with torch.no_grad():  # nonzero biases, so that a misplaced bias shows
        for p in mha.parameters():
            p.add_(0.1 * randn(*p.shape, seed=p.numel()))
    pa = performer.PerformerAttention(E, HEADS, **options, **DOUBLE, generator=torch.Generator().manual_seed(0))
    pa.load_state_dict(mha.state_dict())
    return mha, pa


def inputs(batch_first, kdim=E, vdim=E, unbatched=False):
    def shaped(n, e, seed):
        if unbatched:
            return randn(n, e, seed=seed)
        return randn(N, n, e, seed=seed) if batch_first else randn(n, N, e, seed=seed)
    return shaped(L, E, 1), shaped(S, kdim, 2), shaped(S, vdim, 3)


PADDING = torch.tensor([[False] * S, [False] * (S - 3) + [True] * 3, [True, False] * 4 + [False]])


# ---- everything around the FAVOR+ core, against nn.MultiheadAttention ---------------------------

@pytest.mark.parametrize("mask_form", [None, "bool", "float"])
@pytest.mark.parametrize("options", [{}, dict(kdim=5, vdim=6), dict(add_bias_kv=True, add_zero_attn=True),
                                     dict(bias=False), dict(add_zero_attn=True, kdim=5, vdim=6)],
                         ids=["packed", "kdim_vdim", "bias_kv_zero_attn", "no_bias", "zero_attn_kdim"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_cross_attention_matches_mha_around_the_core(monkeypatch, batch_first, options, mask_form):
    monkeypatch.setattr(features_module, "favor_attention", exact_attention)
    mha, pa = module_pair(batch_first=batch_first, **options)
    q, k, v = inputs(batch_first, options.get("kdim", E), options.get("vdim", E))
    mask = {None: None, "bool": PADDING, "float": torch.zeros(N, S, **DOUBLE).masked_fill(PADDING, float("-inf"))}
    expected, _ = mha(q, k, v, key_padding_mask=mask[mask_form], need_weights=False)
    got, weights = pa(q, k, v, key_padding_mask=mask[mask_form])
    assert weights is None
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


CAUSAL_FORMS = {
    "is_causal": lambda: dict(is_causal=True),
    "float_mask": lambda: dict(attn_mask=nn.Transformer.generate_square_subsequent_mask(L, **DOUBLE)),
    "bool_mask": lambda: dict(attn_mask=torch.ones(L, L, dtype=torch.bool).triu(1)),
    "mask_3d": lambda: dict(attn_mask=torch.ones(N * HEADS, L, L, dtype=torch.bool).triu(1)),
    "hint_and_mask": lambda: dict(attn_mask=nn.Transformer.generate_square_subsequent_mask(L, **DOUBLE),
                                  is_causal=True),
}


@pytest.mark.parametrize("form", CAUSAL_FORMS)
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_causal_self_attention_matches_mha_around_the_core(monkeypatch, batch_first, form):
    monkeypatch.setattr(features_module, "favor_attention", exact_attention)
    mha, pa = module_pair(batch_first=batch_first)
    x = inputs(batch_first)[0]
    causal_mask = torch.ones(L, L, dtype=torch.bool).triu(1)
    expected, _ = mha(x, x, x, attn_mask=causal_mask, need_weights=False)
    got, _ = pa(x, x, x, **CAUSAL_FORMS[form]())
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_unbatched_input_matches_mha_around_the_core(monkeypatch, causal):
    monkeypatch.setattr(features_module, "favor_attention", exact_attention)
    mha, pa = module_pair(batch_first=True)
    if causal:
        x = inputs(True, unbatched=True)[0]
        q, k, v, mask = x, x, x, torch.ones(L, L, dtype=torch.bool).triu(1)
    else:
        (q, k, v), mask = inputs(True, unbatched=True), None
    padding = PADDING[1, :k.shape[0]]
    expected, _ = mha(q, k, v, key_padding_mask=padding, attn_mask=mask, need_weights=False)
    got, _ = pa(q, k, v, key_padding_mask=padding, attn_mask=mask)
    assert got.shape == (L, E)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


def test_self_attention_projects_once_with_the_same_result():
    """query is key is value takes one packed product; separate equal tensors take three."""
    _, pa = module_pair(batch_first=True)
    x = inputs(True)[0]
    torch.testing.assert_close(pa(x, x, x)[0], pa(x, x.clone(), x.clone())[0], atol=1e-12, rtol=1e-12)


# ---- the FAVOR+ core itself -----------------------------------------------------------------------

def test_output_is_favor_attention_on_the_projected_heads():
    _, pa = module_pair(batch_first=True)
    q, k, v = inputs(True)
    w_q, w_k, w_v = pa.in_proj_weight.chunk(3)
    b_q, b_k, b_v = pa.in_proj_bias.chunk(3)
    heads = (lambda t: t.unflatten(-1, (HEADS, E // HEADS)).transpose(1, 2))
    core = performer.favor_attention(heads(q @ w_q.T + b_q), heads(k @ w_k.T + b_k), heads(v @ w_v.T + b_v),
                                     features=pa.features, key_padding_mask=PADDING)
    expected = pa.out_proj(core.transpose(1, 2).flatten(2))
    torch.testing.assert_close(pa(q, k, v, key_padding_mask=PADDING)[0], expected, atol=1e-12, rtol=1e-12)


def test_error_against_mha_falls_as_features_grow():
    mha, _ = module_pair(batch_first=True)
    x = inputs(True)[0]
    expected, _ = mha(x, x, x, need_weights=False)
    errors = []
    for m in (4, 64, 2048):
        pa = performer.PerformerAttention(E, HEADS, batch_first=True, num_features=m, **DOUBLE,
                                          generator=torch.Generator().manual_seed(1))
        pa.load_state_dict(mha.state_dict())
        errors.append((pa(x, x, x)[0] - expected).pow(2).mean().sqrt().item())
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.2 * errors[0], errors


def test_normalized_kernel_through_the_module_is_closer_to_mha():
    """kernel="softmax_normalized" on the module: the same weights and features as the softmax module,
    a smaller error to nn.MultiheadAttention."""
    mha, pa = module_pair(batch_first=True)
    x = inputs(True)[0]
    expected, _ = mha(x, x, x, need_weights=False)
    normalized = performer.PerformerAttention(E, HEADS, batch_first=True, kernel="softmax_normalized", **DOUBLE)
    normalized.load_state_dict(pa.state_dict())
    assert normalized.kernel == "softmax_normalized"
    error = {name: (module(x, x, x)[0] - expected).norm().item() for name, module in (("softmax", pa),
                                                                                         ("normalized", normalized))}
    assert error["normalized"] < 0.9 * error["softmax"], error


@pytest.mark.parametrize("kernel", ["relu", "softmax_normalized"])
def test_other_kernels_run_through_the_module(kernel):
    _, pa = module_pair(batch_first=True)
    other = performer.PerformerAttention(E, HEADS, batch_first=True, kernel=kernel, **DOUBLE)
    other.load_state_dict(pa.state_dict())  # the same weights and features
    x = inputs(True)[0]
    out, _ = other(x, x, x, is_causal=True)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, pa(x, x, x, is_causal=True)[0])


def test_fast_attention_is_favor_attention_with_its_features():
    fa = performer.FastAttention(8, num_features=32, causal=True, generator=torch.Generator().manual_seed(0))
    q, k, v = (randn(2, 4, 10, 8, seed=s, dtype=torch.float32) for s in range(3))
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[1, -2:] = True
    expected = performer.favor_attention(q, k, v, is_causal=True, features=fa.features, key_padding_mask=mask)
    torch.testing.assert_close(fa(q, k, v, key_padding_mask=mask), expected, atol=0, rtol=0)
    assert fa.features.shape == (32, 8)
    assert "causal=True" in repr(fa)


# ---- state_dict and parameters --------------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, dict(kdim=5, vdim=6), dict(add_bias_kv=True, bias=False)],
                         ids=["packed", "kdim_vdim", "bias_kv_no_bias"])
def test_mha_state_dict_loads_strictly_with_the_same_names_and_shapes(options):
    mha = nn.MultiheadAttention(E, HEADS, **options)
    pa = performer.PerformerAttention(E, HEADS, **options, num_features=8)
    features = pa.features.clone()
    expected = {name: tuple(t.shape) for name, t in mha.state_dict().items()}
    got = {name: tuple(t.shape) for name, t in pa.state_dict().items() if name != "features"}
    assert got == expected
    assert type(pa.out_proj) is type(mha.out_proj)
    result = pa.load_state_dict(mha.state_dict())  # strict
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(pa.features, features)
    for name, t in mha.state_dict().items():
        assert torch.equal(pa.state_dict()[name], t), name


def test_same_global_seed_gives_mha_weights():
    torch.manual_seed(5)
    mha = nn.MultiheadAttention(E, HEADS, add_bias_kv=True)
    torch.manual_seed(5)
    pa = performer.PerformerAttention(E, HEADS, add_bias_kv=True)
    for name, t in mha.state_dict().items():
        assert torch.equal(pa.state_dict()[name], t), name


def test_from_multihead_attention_shares_parameters():
    mha = nn.MultiheadAttention(E, HEADS, kdim=5, vdim=6, batch_first=True, dropout=0.25).eval()
    pa = performer.PerformerAttention.from_multihead_attention(mha, num_features=8, kernel="relu")
    assert not pa.training and pa.batch_first and pa.dropout == 0.25 and pa.kernel == "relu"
    assert pa.q_proj_weight is mha.q_proj_weight and pa.out_proj is mha.out_proj
    assert pa.features.shape == (8, E // HEADS)


def test_features_are_a_buffer_that_follows_the_module():
    pa = performer.PerformerAttention(E, HEADS, num_features=8)
    assert "features" in dict(pa.named_buffers()) and "features" in pa.state_dict()
    assert pa.features.dtype == torch.float32
    assert pa.double().features.dtype == torch.float64
    fresh = performer.PerformerAttention(E, HEADS, num_features=8)
    fresh.load_state_dict(pa.state_dict())
    assert torch.equal(fresh.features, pa.features.float())


# ---- random features: generator, redraws --------------------------------------------------------

def test_generator_makes_features_reproducible_and_global_rng_is_untouched_in_forward():
    make = lambda: performer.PerformerAttention(E, HEADS, num_features=8, generator=torch.Generator().manual_seed(7))
    a, b = make(), make()
    assert torch.equal(a.features, b.features)
    a.redraw_features()
    b.redraw_features()
    assert torch.equal(a.features, b.features)
    a.redraw_features(torch.Generator().manual_seed(1))
    expected = performer.orthogonal_features(8, E // HEADS, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.features, expected)

    pa = performer.PerformerAttention(E, HEADS, num_features=8, feature_redraw_interval=1).train()
    x = torch.randn(L, N, E)
    state = torch.get_rng_state()
    for _ in range(3):
        pa(x, x, x)  # redraws each time, never from the global RNG
    assert torch.equal(torch.get_rng_state(), state)


def test_redraw_schedule_counts_training_forwards_only():
    pa = performer.PerformerAttention(E, HEADS, num_features=8, feature_redraw_interval=2)
    x = torch.randn(L, N, E)
    seen = []
    for mode in ["train"] * 5 + ["eval"] * 3 + ["train"] * 2:
        pa.train(mode == "train")
        pa(x, x, x)
        seen.append(pa.features.clone())
    changed = [not torch.equal(a, b) for a, b in zip(seen, seen[1:])]
    # draws before training forwards 3 and 5 (every 2nd after the last draw); none in eval mode;
    # the count resumes after eval (forward 6 is the 2nd since the draw before forward 5, forward 7 redraws)
    assert changed == [False, True, False, True, False, False, False, False, True]
    assert torch.equal(seen[4], seen[7])


FIXED_NORM = functools.partial(performer.orthogonal_features, scaling="sqrt_d", antithetic=True)


def assert_fixed_norm_antithetic(w):
    m, d = w.shape[-2:]
    torch.testing.assert_close(w.norm(dim=-1), torch.full(w.shape[:-1], d ** 0.5))
    assert torch.equal(w[..., m // 2:, :], -w[..., :m // 2, :])


@pytest.mark.parametrize("make", [
    lambda: performer.PerformerAttention(E, HEADS, num_features=8, feature_sampler=FIXED_NORM),
    lambda: performer.PerformerAttention.from_multihead_attention(nn.MultiheadAttention(E, HEADS), num_features=8,
                                                                   feature_sampler=FIXED_NORM),
    lambda: performer.FastAttention(E // HEADS, num_features=8, feature_sampler=FIXED_NORM),
    lambda: performer.convert(nn.TransformerEncoderLayer(E, HEADS), num_features=8,
                              feature_sampler=FIXED_NORM).self_attn,
], ids=["PerformerAttention", "from_multihead_attention", "FastAttention", "convert"])
def test_feature_sampler_draws_the_first_and_every_later_draw(make):
    module = make()
    assert_fixed_norm_antithetic(module.features)
    before = module.features.clone()
    module.redraw_features()
    assert not torch.equal(module.features, before)
    assert_fixed_norm_antithetic(module.features)
    # the default sampler draws chi norms
    norms = performer.PerformerAttention(E, HEADS, num_features=8).features.norm(dim=-1)
    assert norms.std() > 0.1


def test_feature_sampler_output_is_checked():
    def wrong(m, d, *, generator, device, dtype):
        return torch.zeros(m, d + 1, dtype=dtype, device=device)
    with pytest.raises(ValueError, match=r"feature_sampler must return a \(8, 4\) tensor of dtype torch.float32; "
                                         r"got shape \(8, 5\), dtype torch.float32"):
        performer.PerformerAttention(E, HEADS, num_features=8, feature_sampler=wrong)


def test_no_redraws_without_interval():
    pa = performer.PerformerAttention(E, HEADS, num_features=8).train()
    features = pa.features.clone()
    x = torch.randn(L, N, E)
    for _ in range(3):
        pa(x, x, x)
    assert torch.equal(pa.features, features)


# ---- dropout ---------------------------------------------------------------------------------------

def test_dropout_applies_to_the_attention_output_in_training_only():
    _, pa = module_pair(batch_first=True)
    full_dropout = performer.PerformerAttention(E, HEADS, dropout=1.0, batch_first=True, **DOUBLE)
    full_dropout.load_state_dict(pa.state_dict())
    x = inputs(True)[0]
    out, _ = full_dropout.train()(x, x, x)  # every attention output dropped: only out_proj's bias is left
    torch.testing.assert_close(out, full_dropout.out_proj.bias.expand_as(out))
    torch.testing.assert_close(full_dropout.eval()(x, x, x)[0], pa(x, x, x)[0], atol=0, rtol=0)


# ---- decoding with a cache -----------------------------------------------------------------------

@pytest.mark.parametrize("kernel", ["softmax", "relu", "softmax_normalized"])
@pytest.mark.parametrize("layout", ["seq_first", "batch_first", "unbatched"])
def test_decoding_with_cache_matches_the_causal_forward(layout, kernel):
    pa = performer.PerformerAttention(E, HEADS, batch_first=layout == "batch_first", kernel=kernel, **DOUBLE,
                                      num_features=16).eval()
    x = inputs(layout == "batch_first", unbatched=layout == "unbatched")[0]
    dim = 1 if layout == "batch_first" else 0
    full, _ = pa(x, x, x, is_causal=True)
    cache = performer.DecodingCache()
    pieces = []
    for t0, t1 in ((0, 1), (1, 4), (4, 5), (5, L)):
        piece = x.narrow(dim, t0, t1 - t0)
        pieces.append(pa(piece, piece, piece, cache=cache)[0])
    torch.testing.assert_close(torch.cat(pieces, dim=dim), full, atol=1e-12, rtol=1e-12)
    assert cache.state.kv.shape == (1 if layout == "unbatched" else N, HEADS, 16, E // HEADS)
    cache.reset()
    assert cache.state is None


def test_decoding_with_padding_matches_the_masked_causal_forward():
    pa = performer.PerformerAttention(E, HEADS, batch_first=True, **DOUBLE, num_features=16)
    x = inputs(True)[0]
    padding = torch.zeros(N, L, dtype=torch.bool)
    padding[1, :2] = True  # a left-padded prompt
    full, _ = pa(x, x, x, is_causal=True, key_padding_mask=padding)
    cache = performer.DecodingCache()
    steps = [pa(x[:, t:t + 1], x[:, t:t + 1], x[:, t:t + 1], key_padding_mask=padding[:, t:t + 1], cache=cache)[0]
             for t in range(L)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-12, rtol=1e-12)

"""Feature maps in the FAVOR modules, and performer.calibrate: fitting converted attention to the
exact attention it replaced without touching the model's weights."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import performer
from performer import FeatureMap
from performer.calibrate import exact_attention


def _encoder(seed=0, dim=32, heads=4, layers=2):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False).eval()


def _batches(n=4, size=8, length=24, dim=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, length, dim, generator=g) for _ in range(n)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_exact_attention_matches_sdpa(causal, masked):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 10, 8, generator=g)
    k, v = torch.randn(2, 2, 10, 8, generator=g), torch.randn(2, 2, 10, 5, generator=g)
    mask = torch.rand(2, 10, generator=g) < 0.3 if masked else None
    mask = mask if mask is None else mask.index_fill(1, torch.tensor([0]), False)  # every query sees a key
    allowed = torch.ones(10, 10, dtype=torch.bool).tril() if causal else torch.ones(10, 10, dtype=torch.bool)
    allowed = allowed[None, None] & (~mask[:, None, None, :] if masked else True)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                              attn_mask=allowed)
    torch.testing.assert_close(exact_attention(q, k, v, causal, mask), expected)


def test_modules_apply_their_feature_map():
    g = torch.Generator().manual_seed(0)
    q, k, v = (0.5 * torch.randn(2, 4, 30, 16, generator=g) for _ in range(3))
    fast = performer.FastAttention(16, 32, feature_map=FeatureMap(),
                                   generator=torch.Generator().manual_seed(1))
    expected = performer.favor_attention(q, k, v, features=fast.features, feature_map=fast.feature_map)
    torch.testing.assert_close(fast(q, k, v), expected)
    assert not torch.allclose(expected, performer.favor_attention(q, k, v, features=fast.features))


def test_causal_module_and_its_decoding_need_a_frozen_map():
    attn = performer.PerformerAttention(16, 2, batch_first=True, num_features=8, feature_map=FeatureMap())
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="needs frozen statistics in causal attention"):
        attn(x, x, x, is_causal=True, attn_mask=nn.Transformer.generate_square_subsequent_mask(5))
    with pytest.raises(ValueError, match="needs frozen statistics in causal attention"):
        attn(x, x, x, cache=performer.nn.DecodingCache())
    with pytest.raises(ValueError, match="feature_map applies to the softmax kernels only"):
        performer.FastAttention(16, 8, kernel="relu", feature_map=FeatureMap())
    with pytest.raises(TypeError, match="feature_map must be a performer.FeatureMap or None; got str"):
        performer.FastAttention(16, 8, feature_map="favor++")


def test_convert_gives_each_module_its_own_map():
    model = performer.convert(_encoder(), num_features=16, feature_map=FeatureMap())
    maps = [m.feature_map for m in model.modules() if isinstance(m, performer.PerformerAttention)]
    assert len(maps) == 2 and maps[0] is not maps[1]


@pytest.mark.parametrize("kernel", ["softmax", "softmax_normalized"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_calibrate_lowers_the_error_and_leaves_the_weights(causal, kernel):
    exact_model = _encoder()
    model = performer.convert(copy.deepcopy(exact_model), num_features=16, kernel=kernel,
                              generator=torch.Generator().manual_seed(2))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    batches = _batches()
    run = (lambda m, x: m(x, mask=nn.Transformer.generate_square_subsequent_mask(x.shape[1]), is_causal=True)) \
        if causal else (lambda m, x: m(x))

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return run(self.inner, x)

    def error():
        with torch.no_grad():
            x = batches[0]
            return ((run(model, x) - run(exact_model, x)).norm() / run(exact_model, x).norm()).item()

    before = error()
    result = performer.calibrate(Wrapped(model), batches, steps=40, lr=2e-2)
    after = error()
    # Normalized keys start closer and end closer, so calibration has less to remove: loss 0.102 -> 0.049
    # against 0.199 -> 0.063 and error 0.054 -> 0.038 against 0.081 -> 0.043 (bidirectional; causal:
    # 0.050 -> 0.026 against 0.101 -> 0.032, 0.063 -> 0.045 against 0.098 -> 0.050).
    loss_drop, error_drop = (0.5, 0.6) if kernel == "softmax" else (0.6, 0.8)
    assert result["modules"] == 2 and result["loss_last"] < loss_drop * result["loss_first"], result
    assert after < error_drop * before, (before, after)
    for n, p in model.named_parameters():
        if n.endswith("features") or ".feature_map." in n:
            continue
        assert torch.equal(p, weights[n]), f"{n} changed"
        assert p.requires_grad == flags[n], f"{n}: requires_grad not restored"
    attn = next(m for m in model.modules() if isinstance(m, performer.PerformerAttention))
    assert isinstance(attn.features, nn.Parameter) and attn.feature_map.frozen
    # the calibrated state loads into a model converted the same way
    fresh = performer.convert(copy.deepcopy(exact_model), num_features=16, kernel=kernel, feature_map=FeatureMap())
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(run(fresh, batches[1]), run(model, batches[1]))


def test_calibrate_errors():
    with pytest.raises(ValueError, match="calibrate found no FAVOR module in TransformerEncoder"):
        performer.calibrate(_encoder(), _batches())
    model = performer.convert(_encoder(), num_features=8)
    with pytest.raises(ValueError, match="steps must be at least 1; got 0"):
        performer.calibrate(model, _batches(), steps=0)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        performer.calibrate(model, _batches(), lr=-1.0)
    with pytest.raises(ValueError, match="calibrate has nothing to train"):
        performer.calibrate(model, _batches(), feature_map=False, train_features=False)


def test_calibrating_twice_goes_on_training():
    model = performer.convert(_encoder(), num_features=8, generator=torch.Generator().manual_seed(0))
    first = performer.calibrate(model, _batches(), steps=20)
    second = performer.calibrate(model, _batches(), steps=20)
    assert second["loss_last"] < first["loss_first"]
    attn = next(m for m in model.modules() if isinstance(m, performer.PerformerAttention))
    assert attn.features.requires_grad and attn.features.shape == (4, 8, 8)


def test_calibrated_module_decodes_through_the_fused_step(monkeypatch):
    """A calibrated module (per-head features, a frozen map) decodes each token after the first
    through the extension directly, the map's derived features reused: the full checks run once, and
    the tokens give what the causal forward gives."""
    from performer.ops.favor import step as step_module
    attn = performer.PerformerAttention(32, 4, batch_first=True, num_features=16,
                                        generator=torch.Generator().manual_seed(3))

    class Causal(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
            return self.inner(x, x, x, attn_mask=mask, is_causal=True)[0]

    performer.calibrate(Causal(attn), _batches(n=2, size=2, length=12), steps=2)
    assert isinstance(attn.features, nn.Parameter) and attn.features.dim() == 3 and attn.feature_map.frozen
    x = _batches(n=1, size=2, length=6, seed=5)[0]
    calls = []
    full_checks = step_module.validate_favor_step
    monkeypatch.setattr(step_module, "validate_favor_step", lambda *a, **kw: calls.append(1) or full_checks(*a, **kw))
    with torch.no_grad():
        expected = Causal(attn)(x)
        cache = performer.nn.DecodingCache()
        steps = [attn(x[:, t:t + 1], x[:, t:t + 1], x[:, t:t + 1], cache=cache)[0] for t in range(6)]
    assert len(calls) == 1
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=2e-5, rtol=2e-5)

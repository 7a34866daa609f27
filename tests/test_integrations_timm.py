"""performer.integrations.timm: timm's attention modules converted to FAVOR+ (models built with
pretrained=False: nothing is downloaded). scripts/test.sh runs this file in .venv-timm, where
PERFORMER_REQUIRE_TIMM=1 turns a missing timm into a failure instead of a skip."""
import copy
import functools
import logging
import os

import pytest
import torch
import torch.nn.functional as F

if os.environ.get("PERFORMER_REQUIRE_TIMM") == "1":
    import timm
else:
    timm = pytest.importorskip("timm", minversion="1.0.20")

import performer  # noqa: E402
import performer.integrations.timm as favor_timm  # noqa: E402
from performer.ops.favor.reference import favor_dense  # noqa: E402
from timm.layers import Attention, AttentionRope  # noqa: E402
from timm.models.eva import EvaAttention  # noqa: E402

DIM, HEADS, N = 48, 4, 11


def exact_attend(q, k, v, attn_mask, is_causal):
    """What timm's modules compute where FAVOR+ stands: SDPA, key/value heads repeated for GQA."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def rope_embedding(n, head_dim, seed=0):
    """A rotary embedding as timm's RotaryEmbeddingCat returns it: (n, 2 * head_dim) = [sin, cos]."""
    angles = torch.rand(n, head_dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 6
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def make(cls, seed=0, **kwargs):
    torch.manual_seed(seed)
    module = cls(DIM, num_heads=HEADS, norm_layer=torch.nn.LayerNorm, **kwargs).double().eval()
    for p in module.parameters():  # the norms start at identity; move them so a slip in their order shows
        torch.nn.init.normal_(p, std=0.3)
    return module


def inputs(B=2, seed=1):
    return torch.randn(B, N, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# (class, constructor options, takes rope): every layout of q/k/v, norm, gate and rope timm has
LAYOUTS = [
    (Attention, {}, False),
    (Attention, dict(qkv_bias=True, qk_norm=True), False),
    (Attention, dict(gated=True, scale_norm=True, attn_head_dim=8), False),
    (AttentionRope, {}, True),
    (AttentionRope, dict(qkv_fused=False, num_kv_heads=2, qk_norm=True, rotate_half=True), True),
    (AttentionRope, dict(gated=True, scale_norm=True, num_prefix_tokens=0), True),
    (EvaAttention, {}, True),
    (EvaAttention, dict(qkv_bias_separate=True), True),
    (EvaAttention, dict(qkv_fused=False, qk_norm=True, rotate_half=True, gated=True), True),
    (EvaAttention, dict(qkv_bias=False, scale_norm=False), False),
]
IDS = [f"{cls.__name__}-{'-'.join(k for k in kw) or 'default'}" for cls, kw, _ in LAYOUTS]


def call(module, x, rope, **kwargs):
    return module(x, rope=rope, **kwargs) if rope is not None else module(x, **kwargs)


@pytest.mark.parametrize("cls,kwargs,takes_rope", LAYOUTS, ids=IDS)
def test_converted_module_is_the_timm_module_with_favor_in_place_of_sdpa(cls, kwargs, takes_rope, monkeypatch):
    """Everything around the attention core (projections, biases, norms, rope, gate, proj) is
    timm's: with SDPA put back in the core the converted module gives the timm module's output."""
    module = make(cls, **kwargs)
    x = inputs()
    rope = rope_embedding(N - module.num_prefix_tokens, module.head_dim) if takes_rope else None
    expected = call(module, x, rope)
    converted = favor_timm.convert(module, num_features=64, generator=torch.Generator().manual_seed(0))
    assert type(converted) is favor_timm.CONVERSIONS[cls] and isinstance(converted, cls)
    monkeypatch.setattr(converted, "_attend", exact_attend)
    torch.testing.assert_close(call(converted, x, rope), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls,kwargs,takes_rope", LAYOUTS, ids=IDS)
def test_core_is_favor_attention_of_the_module_features(cls, kwargs, takes_rope, monkeypatch):
    """The core computes the plain-PyTorch FAVOR+ ground truth (the dense weight matrix) on the
    module's features and scale."""
    module = make(cls, **kwargs)
    x = inputs()
    rope = rope_embedding(N - module.num_prefix_tokens, module.head_dim) if takes_rope else None
    converted = favor_timm.convert(module, num_features=64, generator=torch.Generator().manual_seed(0))
    favor_out = call(converted, x, rope)

    def reference_attend(q, k, v, attn_mask, is_causal):
        return favor_dense(q, k, v, converted.features, None, converted.scale, is_causal, "softmax")

    monkeypatch.setattr(converted, "_attend", reference_attend)
    torch.testing.assert_close(favor_out, call(converted, x, rope), rtol=1e-10, atol=1e-10)


def test_approaches_exact_attention_as_features_grow():
    module = make(Attention)
    with torch.no_grad():
        module.qkv.weight.mul_(0.3)  # small logits, where FAVOR+ is accurate
    x = inputs()
    exact = module(x)
    errors = []
    for m in (16, 65536):
        converted = favor_timm.convert(copy.deepcopy(module), num_features=m, generator=torch.Generator().manual_seed(0))
        errors.append(((converted(x) - exact).norm() / exact.norm()).item())
    assert errors[1] < 0.05 and errors[1] < errors[0] / 8, errors


def test_parameters_are_shared_and_the_timm_module_is_left_as_it_was():
    module = make(Attention, qkv_bias=True)
    before = module(inputs())
    converted = favor_timm.FavorAttention.from_timm(module, num_features=32)
    assert all(a is b for a, b in zip(module.parameters(), converted.parameters(), strict=True))
    assert "features" not in dict(module.named_buffers()) and type(module) is Attention
    torch.testing.assert_close(module(inputs()), before, rtol=0, atol=0)
    with pytest.raises(TypeError, match="timm.layers.attention.Attention"):
        favor_timm.FavorAttention.from_timm(make(EvaAttention))


def vit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, **kwargs).eval()


def test_vit_converts_every_block_keeping_its_state_dict(caplog, tmp_path):
    model = vit()
    original = copy.deepcopy(model.state_dict())
    params = {name: p for name, p in model.named_parameters()}
    with caplog.at_level(logging.INFO, logger="performer"):
        assert favor_timm.convert(model, num_features=64) is model
    assert "timm.layers.attention.Attention x12" in caplog.text
    assert all(type(b.attn) is favor_timm.FavorAttention for b in model.blocks)
    assert all(p is params[name] for name, p in model.named_parameters())  # an optimizer keeps training them
    state = model.state_dict()
    assert set(state) - set(original) == {f"blocks.{i}.attn.features" for i in range(12)}
    features = [b.attn.features.clone() for b in model.blocks]
    model.load_state_dict(original)  # a timm checkpoint loads strictly and keeps the features
    assert all(torch.equal(f, b.attn.features) for f, b in zip(features, model.blocks))

    images = torch.randn(2, 3, 64, 64)
    out = model(images)
    torch.save(model.state_dict(), tmp_path / "favor.pt")
    again = favor_timm.convert(vit(), num_features=64)
    again.load_state_dict(torch.load(tmp_path / "favor.pt", weights_only=True))
    torch.testing.assert_close(again(images), out, rtol=0, atol=0)  # saved features reload identically


def test_vit_training_step_gives_finite_gradients():
    model = favor_timm.convert(vit(), num_features=32).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    qkv = model.blocks[3].attn.qkv.weight
    before = qkv.detach().clone()
    loss = model(torch.randn(2, 3, 64, 64)).logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    optimizer.step()
    assert not torch.equal(qkv, before)


def test_eva_model_with_rope_converts_and_runs():
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=56).eval()
    classes = {type(b.attn) for b in model.blocks}
    favor_timm.convert(model, num_features=32)
    assert {type(b.attn) for b in model.blocks} == {favor_timm.CONVERSIONS[c] for c in classes}
    out = model(torch.randn(2, 3, 56, 56))
    assert out.shape == (2, model.num_features) and torch.isfinite(out).all()  # a headless model: its features


def test_key_padding_mask_equals_each_row_alone():
    converted = favor_timm.convert(make(Attention, qkv_bias=True), num_features=64)
    x = inputs(B=3)
    lengths = [N, 7, 4]
    keep = torch.arange(N)[None, :] < torch.tensor(lengths)[:, None]         # (B, N), True = attend
    for mask in (keep[:, None, None, :], torch.zeros(3, 1, 1, N, dtype=torch.float64).masked_fill(
            ~keep[:, None, None, :], float("-inf"))):
        out = converted(x, attn_mask=mask)
        for b, n in enumerate(lengths):
            torch.testing.assert_close(out[b, :n], converted(x[b:b + 1, :n])[0], rtol=1e-10, atol=1e-10)


def test_causal_by_flag_or_mask_and_nothing_leaks():
    converted = favor_timm.convert(make(AttentionRope), num_features=64)
    x = inputs()
    causal = converted(x, is_causal=True)
    tril = torch.ones(N, N, dtype=torch.bool).tril()
    torch.testing.assert_close(converted(x, attn_mask=tril), causal, rtol=1e-12, atol=1e-12)
    later = x.clone()
    later[:, 6:] += torch.randn_like(later[:, 6:])
    changed = converted(later, is_causal=True)
    torch.testing.assert_close(changed[:, :6], causal[:, :6], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(changed[:, 6:], causal[:, 6:])


@pytest.mark.parametrize("mask,match", [
    (torch.randn(N, N, dtype=torch.float64), "additive biases"),
    (torch.ones(N, N, dtype=torch.bool).triu(), "neither key padding"),
    (torch.ones(2, 1, 1, N + 1, dtype=torch.bool), "does not broadcast"),
    (torch.ones(1, 2, 1, 1, N, dtype=torch.bool), "at most 4 dims"),
])
def test_other_masks_raise(mask, match):
    converted = favor_timm.convert(make(Attention), num_features=16)
    with pytest.raises(ValueError, match=match):
        converted(inputs(), attn_mask=mask)


def test_dropout_applies_to_the_attention_output_in_training():
    converted = favor_timm.convert(make(Attention, attn_drop=0.5), num_features=16)
    x = inputs()
    eval_out = converted(x)
    converted.train()
    torch.manual_seed(3)
    a = converted(x)
    torch.manual_seed(3)
    torch.testing.assert_close(converted(x), a, rtol=0, atol=0)
    assert not torch.allclose(a, eval_out)


def test_torch_compile_fullgraph():
    converted = favor_timm.convert(make(EvaAttention).float(), num_features=32)
    x, rope = inputs().float(), rope_embedding(N - 1, converted.head_dim).float()
    compiled = torch.compile(converted, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, rope=rope), converted(x, rope=rope), rtol=1e-5, atol=1e-5)


def test_convert_reports_what_it_left_and_what_it_did(caplog):
    from timm.models.swin_transformer import WindowAttention
    model = torch.nn.Sequential(make(Attention), WindowAttention(DIM, num_heads=HEADS, window_size=(2, 2)))
    with pytest.warns(UserWarning, match=r"left attention modules it does not support.*WindowAttention x1"):
        favor_timm.convert(model, num_features=16)
    assert type(model[0]) is favor_timm.FavorAttention and type(model[1]) is WindowAttention

    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.warns(UserWarning, match="replaced nothing"):
        favor_timm.convert(plain)
    with pytest.raises(ValueError, match="replaced nothing"):
        favor_timm.convert(plain, strict=True)
    with pytest.raises(TypeError, match="inplace must be a bool"):
        favor_timm.convert(plain, inplace=1)


def test_inplace_false_converts_a_copy():
    model = vit()
    copied = favor_timm.convert(model, num_features=16, inplace=False)
    assert type(model.blocks[0].attn) is Attention and type(copied.blocks[0].attn) is favor_timm.FavorAttention
    assert copied.blocks[0].attn.qkv.weight is not model.blocks[0].attn.qkv.weight


def test_performer_convert_points_timm_models_to_the_integration():
    with pytest.warns(UserWarning, match=r"performer\.integrations\.timm\.convert\(model\)"):
        performer.convert(vit())


def test_redraw_and_generator_make_features_reproducible():
    a = favor_timm.convert(vit(), num_features=16, generator=torch.Generator().manual_seed(5))
    b = favor_timm.convert(vit(), num_features=16, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(x.attn.features, y.attn.features) for x, y in zip(a.blocks, b.blocks))
    assert not torch.equal(a.blocks[0].attn.features, a.blocks[1].attn.features)
    before = a.blocks[0].attn.features.clone()
    a.blocks[0].attn.redraw_features(torch.Generator().manual_seed(9))
    assert not torch.equal(before, a.blocks[0].attn.features)


def test_feature_sampler_draws_every_module_features():
    sampler = functools.partial(performer.orthogonal_features, scaling="sqrt_d", antithetic=True)
    model = favor_timm.convert(vit(), num_features=16, feature_sampler=sampler)
    for block in model.blocks:
        w = block.attn.features
        torch.testing.assert_close(w.norm(dim=-1), torch.full((16,), w.shape[-1] ** 0.5, dtype=w.dtype))
        assert torch.equal(w[8:], -w[:8])
    block.attn.redraw_features()
    assert torch.equal(block.attn.features[8:], -block.attn.features[:8])


def test_calibrate_refuses_timm_attention_by_name():
    converted = favor_timm.convert(make(Attention), num_features=8)
    with pytest.raises(ValueError, match="timm's converted attention is not supported yet"):
        performer.calibrate(converted, [inputs()])

"""performer.integrations.hf: FAVOR+ in Hugging Face transformers models built from configs with
random weights (no downloads): masks, features, generation with FavorCache, training, compile."""
import copy
import functools
import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

import performer  # noqa: E402
import performer.integrations.hf as favor_hf  # noqa: E402
from transformers import (BertConfig, BertModel, DynamicCache, GPT2Config, GPT2LMHeadModel,  # noqa: E402
                          LlamaConfig, LlamaForCausalLM, ViTConfig, ViTModel)

NAME = favor_hf.register("favor", num_features=64, seed=3)
VOCAB = 97


def bert(attn="favor", dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = BertConfig(**{**dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0), **overrides})
    return BertModel._from_config(cfg, attn_implementation=attn, dtype=dtype).eval()


def gpt2(attn="favor", dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = GPT2Config(**{**dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, attn_pdrop=0.0,
                               resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0), **overrides})
    return GPT2LMHeadModel._from_config(cfg, attn_implementation=attn, dtype=dtype).eval()


def tokens(*shape, seed=0):
    return torch.randint(1, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def test_padded_batch_equals_each_row_alone():
    """The 2-D padding mask reaches FAVOR+ as key_padding_mask (without the mask function
    transformers would drop it): a padded row gives what it gives unpadded."""
    model = bert()
    ids = tokens(3, 11)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).last_hidden_state
        unmasked = model(ids).last_hidden_state
        for row in range(3):
            n = int(mask[row].sum())
            alone = model(ids[row:row + 1, :n]).last_hidden_state
            torch.testing.assert_close(batch[row, :n], alone[0], atol=1e-10, rtol=1e-10)
    assert (batch[1, :7] - unmasked[1, :7]).abs().max() > 1e-3  # the mask matters


def test_approaches_exact_attention_as_features_grow():
    """Same weights, exact SDPA against FAVOR+ with more and more features."""
    exact = bert("sdpa")
    ids = tokens(2, 16)
    with torch.no_grad():
        want = exact(ids).last_hidden_state
        errors = []
        for m in (16, 256, 4096):
            favor_hf.register("favor_m", num_features=m, seed=0)
            model = bert("favor_m")
            errors.append(((model(ids).last_hidden_state - want).norm() / want.norm()).item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.02, errors


def test_features_are_per_layer_derived_and_not_saved(tmp_path):
    model = bert()
    ids = tokens(2, 9)
    with torch.no_grad():
        out = model(ids).last_hidden_state
    names = [n for n, _ in model.named_buffers() if n.endswith(favor_hf.FEATURES)]
    assert len(names) == 2
    buffers = dict(model.named_buffers())
    assert not torch.equal(buffers[names[0]], buffers[names[1]])
    assert not any(k.endswith(favor_hf.FEATURES) for k in model.state_dict())
    model.save_pretrained(tmp_path)
    again = BertModel.from_pretrained(tmp_path, attn_implementation=NAME, dtype=torch.float64).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).last_hidden_state, out, atol=0, rtol=0)
    # another seed, kept in the config: outputs change, and a reload reproduces them
    favor_hf.redraw_features(model, seed=11)
    with torch.no_grad():
        redrawn = model(ids).last_hidden_state
    assert (redrawn - out).abs().max() > 1e-4
    model.save_pretrained(tmp_path / "redrawn")
    again = BertModel.from_pretrained(tmp_path / "redrawn", attn_implementation=NAME, dtype=torch.float64).eval()
    assert again.config.favor_seed == 11
    with torch.no_grad():
        torch.testing.assert_close(again(ids).last_hidden_state, redrawn, atol=0, rtol=0)


def test_feature_sampler_draws_every_module_features():
    name = favor_hf.register("favor_fixed_norm", num_features=16, seed=3, feature_sampler=functools.partial(
        performer.orthogonal_features, scaling="sqrt_d", antithetic=True))
    model = favor_hf.prepare(bert(name))
    feats = [b for n, b in model.named_buffers() if n.endswith(favor_hf.FEATURES)]
    assert len(feats) == 2
    for w in feats:
        torch.testing.assert_close(w.norm(dim=-1), torch.full((16,), math.sqrt(w.shape[-1]), dtype=w.dtype))
        assert torch.equal(w[8:], -w[:8])


def test_set_attn_implementation_switches_a_model():
    model = bert("sdpa")
    ids = tokens(1, 8)
    with torch.no_grad():
        exact = model(ids).last_hidden_state
        model.set_attn_implementation(NAME)
        favor = model(ids).last_hidden_state
    assert model.config._attn_implementation == NAME
    assert any(n.endswith(favor_hf.FEATURES) for n, _ in model.named_buffers())
    assert 0 < (favor - exact).abs().max() < 1.0


def _generate(model, ids, cache, n=10, **kw):
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, output_logits=True,
                         return_dict_in_generate=True, **({"cache": cache} if cache is not None else
                                                          {"use_cache": False}), **kw)
    return out.sequences, torch.stack(out.logits, dim=1)


def test_generate_with_favor_cache_equals_the_full_causal_op():
    """FavorCache (O(1) per token) and DynamicCache (causal over the cached keys, L < S) give the
    logits of recomputing the whole causal sequence at every step."""
    model = gpt2()
    ids = tokens(2, 7)
    full_seq, full = _generate(model, ids, None)
    favor_seq, favor = _generate(model, ids, favor_hf.FavorCache())
    dyn_seq, dyn = _generate(model, ids, DynamicCache())
    torch.testing.assert_close(favor, full, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(dyn, full, atol=1e-9, rtol=1e-9)
    assert torch.equal(favor_seq, full_seq) and torch.equal(dyn_seq, full_seq)


def test_favor_cache_memory_is_constant_in_the_prefix():
    model = gpt2()
    cache = favor_hf.FavorCache()
    with torch.no_grad():
        out = model(tokens(1, 5), cache=cache)
        sizes = [[t.numel() for t in layer.state] for layer in cache.layers]
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(40):
            out = model(nxt, cache=out.past_key_values)
            nxt = out.logits[:, -1:].argmax(-1)
    assert len(cache.layers) == 2 and cache.get_seq_length() == 45
    assert [[t.numel() for t in layer.state] for layer in cache.layers] == sizes
    m, heads, dim = 64, 4, 8
    assert sizes[0] == [heads * m * dim, heads * m, heads]


def test_left_padding_gives_the_unpadded_tokens():
    model = gpt2()
    ids = tokens(2, 9, seed=1)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    seq, logits = _generate(model, ids, favor_hf.FavorCache(), attention_mask=mask)
    alone_seq, alone = _generate(model, ids[1:, 4:], favor_hf.FavorCache())
    torch.testing.assert_close(logits[1], alone[0], atol=1e-9, rtol=1e-9)
    assert torch.equal(seq[1, 4:], alone_seq[0])


def test_grouped_query_heads_in_llama():
    """Llama with fewer key/value heads than query heads: FAVOR+ reads them as grouped-query
    attention; cached generation equals recomputation."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation=NAME, dtype=torch.float64).eval()
    ids = tokens(1, 6)
    _, full = _generate(model, ids, None, n=6)
    _, cached = _generate(model, ids, favor_hf.FavorCache(), n=6)
    torch.testing.assert_close(cached, full, atol=1e-9, rtol=1e-9)


def test_training_step_gives_finite_gradients():
    model = gpt2(dtype=torch.float32, attn_pdrop=0.1).train()
    ids = tokens(2, 12)
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert math.isfinite(loss.item())


def test_dropout_applies_to_the_attention_output_in_training():
    model = bert(dtype=torch.float32, attention_probs_dropout_prob=0.5)
    ids = tokens(1, 8)
    with torch.no_grad():
        evaluated = [model(ids).last_hidden_state for _ in range(2)]
        model.train()
        trained = [model(ids).last_hidden_state for _ in range(2)]
    torch.testing.assert_close(evaluated[0], evaluated[1], atol=0, rtol=0)
    assert (trained[0] - trained[1]).abs().max() > 1e-3


def test_vit_needs_prepare_then_runs():
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64)
    model = ViTModel._from_config(cfg, attn_implementation=NAME).eval()
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"ViT\w*Attention has no layer index.*performer.integrations.hf.prepare"):
        model(pixels)
    favor_hf.prepare(model)
    with torch.no_grad():
        out = model(pixels).last_hidden_state
    assert out.shape == (2, 17, 32) and torch.isfinite(out).all()
    feats = [b for n, b in model.named_buffers() if n.endswith(favor_hf.FEATURES)]
    assert len(feats) == 2 and not torch.equal(feats[0], feats[1])


@pytest.mark.parametrize("build", [bert, gpt2], ids=["bert", "gpt2"])
def test_torch_compile_fullgraph_of_the_model(build):
    """After prepare (features attached), the whole model compiles as one graph, padding mask included."""
    model = build(dtype=torch.float32)
    favor_hf.prepare(model)
    ids = tokens(2, 10)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        eager = model(ids, attention_mask=mask)[0]
        compiled = torch.compile(model, fullgraph=True)(ids, attention_mask=mask)[0]
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


# ---- masks and unsupported options --------------------------------------------------------------

def _attention_call(mask, L=5, S=5, is_causal=False, **kwargs):
    model = bert()
    module = model.encoder.layer[0].attention.self
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, L, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 4, S, 8, generator=g, dtype=torch.float64) for _ in range(2))
    fn = transformers.AttentionInterface._global_mapping[NAME]
    out, weights = fn(module, q, k, v, mask, is_causal=is_causal, **kwargs)
    assert weights is None
    return out, (q, k, v, module.favor_features)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("L", [5, 3])
def test_4d_padding_plus_causal_mask_is_reduced(dtype, L):
    S = 5
    keep = torch.ones(2, S, dtype=torch.bool)
    keep[1, 0] = False
    pattern = keep[:, None, None, :] & torch.ones(L, S, dtype=torch.bool).tril(S - L)
    mask = pattern if dtype == torch.bool else torch.zeros(pattern.shape).masked_fill(~pattern, torch.finfo(dtype).min)
    out, (q, k, v, w) = _attention_call(mask, L=L, S=S)
    want = performer.favor_attention(q, k, v, is_causal=True, features=w, key_padding_mask=~keep).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    bidir, _ = _attention_call(keep[:, None, None, :].expand(2, 1, L, S).to(dtype) if dtype == torch.bool else
                               torch.zeros(2, 1, L, S).masked_fill(~keep[:, None, None, :], -math.inf), L=L, S=S)
    want = performer.favor_attention(q, k, v, features=w, key_padding_mask=~keep).transpose(1, 2)
    torch.testing.assert_close(bidir, want, atol=0, rtol=0)


@pytest.mark.parametrize("mask,match", [
    (torch.eye(5, dtype=torch.bool)[None, None].expand(2, 1, 5, 5), "neither key padding nor key padding plus a causal"),
    (torch.randn(2, 1, 5, 5), "additive biases"),
    (torch.ones(2, 4, 5, 5, dtype=torch.bool).index_fill(1, torch.tensor([2]), False), "differs between heads"),
    (torch.ones(2, 7, dtype=torch.bool), r"bool \(batch, S\) = \(2, 5\); got torch.bool \(2, 7\)"),
    (torch.ones(2, 5, 5, dtype=torch.bool), r"2-D \(batch, S\) or 4-D .* got shape \(2, 5, 5\)"),
])
def test_other_masks_raise(mask, match):
    with pytest.raises(ValueError, match=match):
        _attention_call(mask)


@pytest.mark.parametrize("arg", ["head_mask", "position_bias", "softcap", "sliding_window"])
def test_unsupported_arguments_raise(arg):
    with pytest.raises(ValueError, match=f"{arg} is not supported by FAVOR\\+ attention"):
        _attention_call(None, **{arg: torch.ones(1)})


def test_output_attentions_warns_and_returns_no_weights():
    with pytest.warns(UserWarning, match="output_attentions=True returns None"):
        _attention_call(None, output_attentions=True)


def test_sliding_window_model_is_refused():
    from transformers import MistralConfig, MistralForCausalLM
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    model = MistralForCausalLM._from_config(cfg, attn_implementation=NAME).eval()
    with pytest.raises(ValueError, match="mask pattern that FAVOR\\+ cannot apply"):
        model(tokens(1, 8))


def test_favor_cache_with_another_attention_raises():
    model = gpt2("sdpa")
    cache = favor_hf.FavorCache()
    with torch.no_grad():
        out = model(tokens(1, 4), cache=cache)
        with pytest.raises(RuntimeError, match="never reached a FAVOR\\+ attention function"):
            model(out.logits[:, -1:].argmax(-1), cache=cache)


def test_favor_cache_refuses_crop():
    model = gpt2()
    cache = favor_hf.FavorCache()
    with torch.no_grad():
        model(tokens(1, 4), cache=cache)
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(-1)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(name="sdpa"), ValueError, "name must be a new attention implementation name"),
    (dict(num_features=0), ValueError, "num_features must be at least 1"),
    (dict(kernel="exp"), ValueError, "kernel must be one of"),
    (dict(seed=-1), ValueError, "seed must be a non-negative int"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(feature_sampler="sqrt_d"), TypeError, "feature_sampler must be a callable"),
])
def test_register_validates(kwargs, error, match):
    with pytest.raises(error, match=match):
        favor_hf.register(**kwargs)


def test_prepare_needs_a_registered_implementation():
    with pytest.raises(ValueError, match="registered by performer.integrations.hf.register; its config says 'sdpa'"):
        favor_hf.prepare(bert("sdpa"))


def test_favor_cache_with_bidirectional_attention_raises():
    model = bert()
    cache = favor_hf.FavorCache()
    with torch.no_grad(), pytest.raises(ValueError, match="FavorCache holds a causal state, but BertSelfAttention"):
        model(tokens(1, 4), cache=cache)


@pytest.mark.parametrize("build", [bert, gpt2], ids=["bert", "gpt2"])
def test_convert_points_hf_models_to_the_integration(build):
    model = build("sdpa")
    with pytest.warns(UserWarning, match=r"found transformers\.models\.\w+\.modeling_\w+\.\w+Attention x2.*"
                                         r"performer\.integrations\.hf\.register\(\)"):
        performer.convert(model)
    with pytest.raises(ValueError, match="set_attn_implementation"):
        performer.convert(model, strict=True)


@pytest.mark.parametrize("build", ["llama", "gpt2"])
def test_calibrate_lowers_the_last_layer_error(build):
    """performer.calibrate on a model built from a config (random weights): the last hidden state's
    error to the same model with exact attention drops >= 3x (measured with m=64, 150 steps: Llama
    with GQA 0.0210 -> 0.0015, GPT-2 0.0018 -> 0.0001), no weight of the model changes, and cached
    generation keeps the calibrated attention."""
    if build == "llama":
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
        exact = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).eval()
    else:
        exact = gpt2(attn="sdpa", dtype=torch.float32)
    model = copy.deepcopy(exact)
    model.set_attn_implementation(NAME)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = [tokens(8, 48, seed=10 + i) for i in range(8)]
    test = tokens(8, 48, seed=99)

    def error():
        with torch.no_grad():
            a = model(test, output_hidden_states=True).hidden_states[-1]
            b = exact(test, output_hidden_states=True).hidden_states[-1]
        return ((a - b).norm() / b.norm()).item()

    before = error()
    result = performer.calibrate(model, batches, steps=150)
    after = error()
    assert result["modules"] == 2
    assert after < before / 3, (before, after)
    for name, p in model.named_parameters():
        if name.endswith(favor_hf.FEATURES) or favor_hf.FEATURE_MAP in name:
            continue
        assert torch.equal(p, weights[name]), name
    # generation with a FavorCache runs the calibrated maps and features too: the logits of
    # recomputing the whole sequence at every step
    ids = tokens(2, 6, seed=5)
    _, full = _generate(model, ids, None, n=4)
    _, cached = _generate(model, ids, favor_hf.FavorCache(), n=4)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)

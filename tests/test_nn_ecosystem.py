"""The modules with torch.compile, autocast, copy.deepcopy, torch.save/torch.load and state_dict."""
import copy
import io

import pytest
import torch
from torch import nn

import performer
from conftest import assert_close

# torch's own compile internals warn about their use of torch.jit.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

D, HEADS, N, L = 16, 4, 2, 10


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles Tiny.forward anew: without a reset the recompilations add up to dynamo's limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Tiny(nn.Module):
    """A PerformerAttention block followed by a causal FastAttention over its heads."""

    def __init__(self, **attention_options):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.attn = performer.PerformerAttention(D, HEADS, batch_first=True, num_features=8, generator=g,
                                                 **attention_options)
        self.core = performer.FastAttention(D // HEADS, num_features=8, causal=True, generator=g)
        self.norm = nn.LayerNorm(D)

    def forward(self, x, padding=None, attn_mask=None, is_causal=False):
        h = self.norm(x + self.attn(x, x, x, key_padding_mask=padding, attn_mask=attn_mask, is_causal=is_causal)[0])
        heads = h.unflatten(-1, (HEADS, D // HEADS)).transpose(1, 2)
        return h + self.core(heads, heads, heads).transpose(1, 2).flatten(2)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, L, D, generator=g, requires_grad=True)
    padding = torch.zeros(N, L).masked_fill(torch.arange(L) >= L - 3, float("-inf"))
    padding[0] = 0.0
    return x, padding


def compiled_matches_eager(model, backend, *args, modes=("eval", "train"), **kwargs):
    x = args[0]
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    for mode in modes:
        model.train(mode == "train")
        results = []
        for fn in (compiled, model):
            out = fn(*args, **kwargs)
            results.append((out, *torch.autograd.grad(out.square().sum(), (x, model.attn.in_proj_weight))))
        for name, c, e in zip(("out", "dx", "dw"), *results):
            torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-5, msg=lambda m: f"{mode} {name}: {m}")


def test_torch_compile_fullgraph_inductor_matches_eager():
    """Training mode, forward and backward, with torch.compile's default backend (its first C++
    kernel costs ~15 s on a small machine: the other compile tests stop before code generation)."""
    torch.manual_seed(0)
    x, padding = inputs()
    compiled_matches_eager(Tiny(), "inductor", x, padding, modes=("train",))


@pytest.mark.parametrize("call", ["float_padding", "hint_and_mask", "bool_padding", "dropout"])
def test_torch_compile_fullgraph_captures_variants(call):
    """Whole-graph capture (dynamo + AOTAutograd), in eval and training mode."""
    torch.manual_seed(0)
    x, padding = inputs()
    if call == "float_padding":
        compiled_matches_eager(Tiny(), "aot_eager", x, padding)
    elif call == "hint_and_mask":
        compiled_matches_eager(Tiny(), "aot_eager", x, attn_mask=nn.Transformer.generate_square_subsequent_mask(L),
                               is_causal=True)
    elif call == "bool_padding":
        compiled_matches_eager(Tiny(), "aot_eager", x, padding.isinf())
    else:  # dropout draws from the global RNG, like nn.MultiheadAttention's; eval mode only
        model = Tiny(dropout=0.5).eval()
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="aot_eager")(x, padding),
                                   model(x, padding))


def test_torch_compile_decoding_with_cache():
    torch.manual_seed(0)
    attn = performer.PerformerAttention(D, HEADS, batch_first=True, num_features=8).eval()
    x, _ = inputs()
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    outs = {}
    for name, fn in (("compiled", compiled), ("eager", attn)):
        cache = performer.DecodingCache()
        outs[name] = torch.cat([fn(x[:, t:t + 1], x[:, t:t + 1], x[:, t:t + 1], cache=cache)[0] for t in range(3)], 1)
    torch.testing.assert_close(outs["compiled"], outs["eager"])


def test_torch_compile_with_redraw_interval():
    """Redraws count forwards in Python: a graph break that fullgraph=True refuses, naming the fix."""
    x, padding = inputs()
    model = Tiny(feature_redraw_interval=1).train()
    before = model.attn.features.clone()
    with pytest.raises(Exception, match="leave feature_redraw_interval=None and call redraw_features"):
        torch.compile(model, fullgraph=True, backend="aot_eager")(x, padding)
    compiled = torch.compile(model, backend="aot_eager")  # a graph break at the redraw schedule
    compiled(x, padding)
    out = compiled(x, padding)  # redraws at the latest here
    assert not torch.equal(model.attn.features, before)
    torch.testing.assert_close(out, model.eval()(x, padding))


@pytest.mark.parametrize("is_causal", [False, True], ids=["bidir", "causal"])
def test_autocast_bfloat16_keeps_the_numerics(is_causal):
    """Under CPU autocast the output is bfloat16, and its error against the float64 module is
    within a multiple of the error of the same module run entirely in bfloat16."""
    torch.manual_seed(0)
    model = performer.PerformerAttention(32, 4, batch_first=True, num_features=64,
                                         generator=torch.Generator().manual_seed(0)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 50, 32, generator=g, requires_grad=True)
    padding = torch.zeros(N, 50, dtype=torch.bool)
    padding[1, -7:] = True

    def run(module, inp):
        out, _ = module(inp, inp, inp, key_padding_mask=padding, is_causal=is_causal)
        return out, torch.autograd.grad(out.float().square().sum(), inp)[0]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, dx = run(model, x)
    assert out.dtype == torch.bfloat16 and dx.dtype == torch.float32
    ref64 = run(copy.deepcopy(model).double(), x.detach().double().requires_grad_())
    ref16 = run(copy.deepcopy(model).bfloat16(), x.detach().bfloat16().requires_grad_())
    assert_close(out, ref64[0], ref16[0], "output")
    assert_close(dx.bfloat16(), ref64[1], ref16[1], "input gradient")


def test_deepcopy_is_independent_and_equal():
    model = Tiny(feature_redraw_interval=2).train()
    x, padding = inputs()
    model(x, padding)
    clone = copy.deepcopy(model)
    for a, b in zip(model.state_dict().values(), clone.state_dict().values()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    torch.testing.assert_close(clone(x, padding), model(x, padding), atol=0, rtol=0)
    clone.attn.redraw_features()  # the copied generator continues the same stream
    model.attn.redraw_features()
    assert torch.equal(clone.attn.features, model.attn.features)
    clone.attn.redraw_features()
    assert not torch.equal(clone.attn.features, model.attn.features)


def test_save_and_load_round_trip():
    model = Tiny().eval()
    model.attn.redraw_features(torch.Generator().manual_seed(9))
    x, padding = inputs()
    expected = model(x, padding)

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = Tiny().eval()
    assert not torch.equal(fresh.attn.features, model.attn.features)
    fresh.load_state_dict(torch.load(buffer))  # weights_only: tensors only
    torch.testing.assert_close(fresh(x, padding), expected, atol=0, rtol=0)

    buffer = io.BytesIO()
    torch.save(model, buffer)  # the whole module, generators included
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x, padding), expected, atol=0, rtol=0)

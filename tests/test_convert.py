"""performer.convert: every nn.MultiheadAttention replaced, weights shared, outputs approaching the
original's as the number of features grows, and the fused encoder path kept away."""
import pytest
import torch
from torch import nn

import performer

D, HEADS = 16, 4

# The original (exact) encoders take torch's nested-tensor path on padded batches in eval mode.
pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def transformer(seed=0):
    torch.manual_seed(seed)
    return nn.Transformer(D, HEADS, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32, dropout=0.0,
                          batch_first=True).eval()


class Custom(nn.Module):
    """Attention in a ModuleList, in a Sequential, shared by two attributes, and cross-attention with kdim/vdim."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.blocks = nn.ModuleList([nn.MultiheadAttention(D, HEADS, batch_first=True) for _ in range(2)])
        self.shared = nn.MultiheadAttention(D, 2)
        self.again = self.shared
        self.cross = nn.Sequential(nn.MultiheadAttention(D, 2, kdim=8, vdim=8, batch_first=True))
        self.norm = nn.LayerNorm(D)

    def forward(self, x, memory):
        for block in self.blocks:
            x = self.norm(x + block(x, x, x, need_weights=False)[0])
        y = x.transpose(0, 1)  # the shared module is sequence-first
        y = self.shared(y, y, y, need_weights=False)[0]
        y = self.again(y, y, y, need_weights=False)[0]
        x = x + y.transpose(0, 1)
        return x + self.cross[0](x, memory, memory, need_weights=False)[0]


def count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


def rms(a, b):
    return (a - b).pow(2).mean().sqrt().item()


def test_transformer_is_fully_converted_with_shared_weights():
    model = transformer()
    params = {name: p for name, p in model.named_parameters()}
    assert count(model, nn.MultiheadAttention) == 6
    converted = performer.convert(model, num_features=8, generator=torch.Generator().manual_seed(0))
    assert converted is model
    assert count(model, nn.MultiheadAttention) == 0 and count(model, performer.PerformerAttention) == 6
    assert {name: p for name, p in model.named_parameters()} == params  # the same Parameter objects
    assert all(m.num_features == 8 for m in model.modules() if isinstance(m, performer.PerformerAttention))
    assert not any(m.training for m in model.modules())


def test_converted_transformer_approaches_the_original_as_features_grow():
    src, tgt = randn(2, 12, D, seed=1), randn(2, 9, D, seed=2)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(9)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[1, -4:] = True
    run = (lambda model: model(src, tgt, tgt_mask=tgt_mask, src_key_padding_mask=padding,
                               memory_key_padding_mask=padding))
    with torch.no_grad():
        expected = run(transformer())
        errors = []
        for m in (4, 64, 1024):
            converted = performer.convert(transformer(), num_features=m, generator=torch.Generator().manual_seed(0))
            out = run(converted)
            assert out.shape == expected.shape
            errors.append(rms(out, expected))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.25 * errors[0], errors


def test_custom_model_conversion_keeps_shapes_sharing_and_approaches_original():
    x, memory = randn(2, 6, D, seed=3), randn(2, 5, 8, seed=4)
    model = Custom()
    with torch.no_grad():
        expected = model(x, memory)
    errors = []
    for m in (4, 1024):
        converted = performer.convert(model, num_features=m, inplace=False, generator=torch.Generator().manual_seed(0))
        assert converted.again is converted.shared
        assert isinstance(converted.cross[0], performer.PerformerAttention) and converted.cross[0].kdim == 8
        with torch.no_grad():
            out = converted(x, memory)
        assert out.shape == expected.shape
        errors.append(rms(out, expected))
    assert isinstance(model.shared, nn.MultiheadAttention)  # inplace=False left the original alone
    assert errors[1] < 0.5 * errors[0], errors


def test_converting_a_multihead_attention_returns_a_performer_attention():
    mha = nn.MultiheadAttention(D, HEADS)
    converted = performer.convert(mha, num_features=8, kernel="relu", feature_redraw_interval=3)
    assert isinstance(converted, performer.PerformerAttention) and converted.in_proj_weight is mha.in_proj_weight
    assert converted.kernel == "relu" and converted.feature_redraw_interval == 3


def test_generator_makes_conversion_reproducible():
    a = performer.convert(transformer(), num_features=8, generator=torch.Generator().manual_seed(5))
    b = performer.convert(transformer(), num_features=8, generator=torch.Generator().manual_seed(5))
    for (name, t), u in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(t, u), name


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_fused_path_is_not_taken_after_conversion(norm_first):
    """In eval mode without autograd, a padded batch would send nn.TransformerEncoder through nested
    tensors and torch's fused layer kernel (exact attention on self_attn's weights). After conversion
    the output is the module path's: the same as in training mode (no dropout), unlike the original."""
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(D, HEADS, dim_feedforward=32, dropout=0.0, batch_first=True,
                                       norm_first=norm_first)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=not norm_first).eval()
    x = randn(2, 10, D, seed=5)
    padding = torch.zeros(2, 10, dtype=torch.bool)
    padding[0, -3:] = True
    with torch.no_grad():
        exact = encoder(x, src_key_padding_mask=padding)
        performer.convert(encoder, num_features=16, generator=torch.Generator().manual_seed(0))
        eval_out = encoder(x, src_key_padding_mask=padding)
        train_out = encoder.train()(x, src_key_padding_mask=padding)
    torch.testing.assert_close(eval_out, train_out, atol=0, rtol=0)
    assert not torch.allclose(eval_out[1], exact[1], atol=1e-3)


def test_placing_performer_attention_by_hand_needs_disable_fused_encoder_paths():
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(D, HEADS, dim_feedforward=32, dropout=0.0, batch_first=True).eval()
    layer.self_attn = performer.PerformerAttention.from_multihead_attention(layer.self_attn, num_features=8)
    x = randn(2, 5, D, seed=6)
    with torch.no_grad(), pytest.raises(RuntimeError, match="performer.disable_fused_encoder_paths"):
        layer(x)
    performer.disable_fused_encoder_paths(layer)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.train()(x), atol=0, rtol=0)


def test_converted_model_loads_a_checkpoint_of_the_original():
    """Strict loading of the exact model's state_dict: every key matches, the features are kept."""
    original = transformer(seed=0)
    converted = performer.convert(transformer(seed=1), num_features=8, generator=torch.Generator().manual_seed(0))
    features = {name: t.clone() for name, t in converted.state_dict().items() if name.endswith("features")}
    assert len(features) == 6
    result = converted.load_state_dict(original.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    for name, t in original.state_dict().items():
        assert torch.equal(converted.state_dict()[name], t), name
    for name, t in features.items():
        assert torch.equal(converted.state_dict()[name], t), name


class TinyAttention(nn.Module):  # an attention convert() does not know
    def forward(self, x):
        return x


def test_convert_logs_how_many_modules_it_replaced(caplog):
    with caplog.at_level("INFO", logger="performer"):
        performer.convert(transformer(), num_features=8)
    assert "replaced 6 nn.MultiheadAttention module(s) with PerformerAttention" in caplog.text


def test_convert_warns_naming_the_attention_classes_it_did_not_replace():
    model = nn.Sequential(nn.Linear(4, 4), TinyAttention(), TinyAttention())
    with pytest.warns(UserWarning, match="replaced nothing: Sequential has no nn.MultiheadAttention; found "
                                         r"test_convert.TinyAttention x2: convert\(\) replaces only"):
        assert performer.convert(model) is model
    with pytest.raises(ValueError, match="test_convert.TinyAttention x2"):
        performer.convert(model, strict=True)
    with pytest.warns(UserWarning, match="Linear has no nn.MultiheadAttention \\(nor any other attention module\\)"):
        performer.convert(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="strict must be a bool; got str"):
        performer.convert(model, strict="yes")

"""Block-sparse linear: the packed format, the op on every backend against the float64 reference
(odd sizes, every supported block, 0 to 100% of blocks kept, strided inputs, bias), gradients,
gradcheck, opcheck, torch.compile, every ISA copy, malformed formats; CompressedLinear and
performer.compress (prune -> compress, state_dict, dense weights loaded, to_linear, deepcopy)."""
import copy
import io
import logging

import pytest
import torch
from torch import nn

import performer
from performer.nn import BlockedLinear, CompressedLinear
from performer.ops.sparse import block_sparse_linear, pack_blocks, unpack_blocks
from performer.ops.sparse.reference import block_grid, block_sparse_linear_reference
from conftest import ISAS, assert_close, dtype_id, run_on_isa

SPARSE_DTYPES = (torch.float32, torch.float64)
BLOCKS = ((16, 4), (16, 64), (32, 32), (64, 8))


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def sparse_weight(N, K, block, density, dtype=torch.float32, seed=0):
    """(N, K) weight whose (br, bc) blocks are kept with probability ``density`` (every kept block
    fully nonzero), and the keep mask."""
    br, bc = block
    g = torch.Generator().manual_seed(seed + 1)
    keep = torch.rand(-(-N // br), -(-K // bc), generator=g) < density
    mask = keep.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:N, :K]
    return randn(N, K, dtype=dtype, seed=seed) * mask, keep


def check_linear(x, w, bias, block, backend="cpp", keep=None):
    packed = pack_blocks(w, block, keep)
    got = block_sparse_linear(x, *packed, bias, w.shape[0], backend=backend)
    assert got.dtype == x.dtype and got.shape == (x.shape[0], w.shape[0])
    ref64 = block_sparse_linear_reference(x, *packed, bias, w.shape[0])
    assert_close(got, ref64, block_sparse_linear_reference(x, *packed, bias, w.shape[0], dtype=x.dtype))
    return got


# ---- the format -------------------------------------------------------------------------------

@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("N,K", [(1, 1), (16, 4), (50, 70), (130, 257)])
def test_pack_unpack_round_trip(N, K, block):
    w, keep = sparse_weight(N, K, block, 0.4, dtype=torch.float64)
    packed = pack_blocks(w, block)
    assert packed.values.shape[1:] == (block[1], block[0])
    assert packed.block_cols.dtype == packed.row_ptr.dtype == torch.int32
    assert packed.values.shape[0] == int(keep.sum()) == int(packed.row_ptr[-1])
    assert torch.equal(unpack_blocks(*packed, N, K), w)
    # k-major blocks: values[b, kk, r] = W[p*br + r, col*bc + kk]
    if packed.values.shape[0]:
        p = int(torch.searchsorted(packed.row_ptr, torch.tensor(0, dtype=torch.int32), right=True)) - 1
        c = int(packed.block_cols[0])
        grid = block_grid(w, block)
        assert torch.equal(packed.values[0], grid[p, c])


def test_pack_keeps_zero_blocks_when_asked():
    w, keep = sparse_weight(40, 40, (16, 8), 0.5)
    keep_all = torch.ones_like(keep)
    packed = pack_blocks(w, (16, 8), keep_all)
    assert packed.values.shape[0] == keep.numel()
    assert torch.equal(unpack_blocks(*packed, 40, 40), w)


# ---- values against the reference -------------------------------------------------------------

@pytest.mark.parametrize("backend", ("cpp", "torch"))
@pytest.mark.parametrize("dtype", SPARSE_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("M,N,K", [(1, 50, 70), (5, 16, 4), (33, 130, 257), (200, 97, 64)])
def test_values(M, N, K, block, dtype, backend):
    w, _ = sparse_weight(N, K, block, 0.5, dtype, seed=M + N)
    check_linear(randn(M, K, dtype=dtype, seed=3), w, randn(N, dtype=dtype, seed=4), block, backend)


@pytest.mark.parametrize("dtype", SPARSE_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("density", (0.0, 0.05, 0.3, 1.0))
def test_densities(density, dtype):
    """No block kept (the output is the bias), a few, most, all; with and without bias."""
    w, _ = sparse_weight(96, 200, (32, 16), density, dtype, seed=5)
    x = randn(37, 200, dtype=dtype, seed=6)
    got = check_linear(x, w, randn(96, dtype=dtype, seed=7), (32, 16))
    if density == 0.0:
        torch.testing.assert_close(got, randn(96, dtype=dtype, seed=7).expand(37, 96))
    check_linear(x, w, None, (32, 16))


def test_empty_block_rows_and_columns():
    """Panels with no block at all and a K column with no block between kept ones."""
    w, _ = sparse_weight(128, 96, (32, 32), 1.0, seed=8)
    w[32:96] = 0
    w[:, 32:64] = 0
    keep = pack_blocks(w, (32, 32))
    assert keep.row_ptr.tolist() == [0, 2, 2, 2, 4]
    check_linear(randn(50, 96, seed=9), w, randn(128, seed=10), (32, 32))


@pytest.mark.parametrize("layout", ("row_slice", "transposed", "column_slice"))
def test_strided_inputs(layout):
    w, _ = sparse_weight(64, 70, (16, 8), 0.5, seed=11)
    base = {"row_slice": lambda: randn(90, 70, seed=12)[::3],
            "transposed": lambda: randn(70, 30, seed=12).t(),
            "column_slice": lambda: randn(30, 140, seed=12)[:, ::2]}[layout]()
    assert not base.is_contiguous()
    check_linear(base, w, None, (16, 8))


@pytest.mark.parametrize("threads", (1, 2, 3))
def test_thread_counts_agree(threads):
    w, _ = sparse_weight(200, 300, (32, 16), 0.4, seed=13)
    x, packed = randn(250, 300, seed=14), pack_blocks(w, (32, 16))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = block_sparse_linear(x, *packed, None, 200)
        torch.set_num_threads(threads)
        got = block_sparse_linear(x, *packed, None, 200)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, want)


def test_empty_sizes():
    w, _ = sparse_weight(48, 20, (16, 4), 0.5)
    packed = pack_blocks(w, (16, 4))
    assert block_sparse_linear(torch.empty(0, 20), *packed, None, 48).shape == (0, 48)
    bias = randn(48, seed=2)
    packed0 = pack_blocks(torch.zeros(48, 0), (16, 4))
    torch.testing.assert_close(block_sparse_linear(torch.empty(3, 0), *packed0, bias, 48), bias.expand(3, 48))


# ---- gradients ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ("cpp", "torch"))
@pytest.mark.parametrize("block", BLOCKS)
def test_gradients(block, backend):
    w, _ = sparse_weight(70, 45, block, 0.5, torch.float32, seed=15)
    packed = pack_blocks(w, block)
    x = randn(9, 45, seed=16).requires_grad_()
    values = packed.values.clone().requires_grad_()
    bias = randn(70, seed=17).requires_grad_()
    y = block_sparse_linear(x, values, packed.block_cols, packed.row_ptr, bias, 70, backend=backend)
    g = randn(*y.shape, seed=18)
    y.backward(g)
    x64, v64, b64 = (t.detach().double().requires_grad_() for t in (x, values, bias))
    block_sparse_linear_reference(x64, v64, packed.block_cols, packed.row_ptr, b64, 70).backward(g.double())
    for name, got, want in (("x", x.grad, x64.grad), ("values", values.grad, v64.grad), ("bias", bias.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=f"grad {name}")


def test_gradcheck():
    w, _ = sparse_weight(40, 37, (16, 8), 0.5, torch.float64, seed=19)
    packed = pack_blocks(w, (16, 8))
    x = randn(5, 37, dtype=torch.float64, seed=20).requires_grad_()
    values = packed.values.clone().requires_grad_()
    bias = randn(40, dtype=torch.float64, seed=21).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, v, b: block_sparse_linear(x, v, packed.block_cols, packed.row_ptr, b, 40), (x, values, bias))


@pytest.mark.parametrize("dtype", SPARSE_DTYPES, ids=dtype_id)
def test_opcheck(dtype):
    w, _ = sparse_weight(50, 70, (16, 8), 0.5, dtype, seed=22)
    packed = pack_blocks(w, (16, 8))
    x, bias = randn(6, 70, dtype=dtype, seed=23), randn(50, dtype=dtype, seed=24)
    op = torch.ops.performer.block_sparse_linear.default
    torch.library.opcheck(op, (x, packed.values, packed.block_cols, packed.row_ptr, bias, 50))
    torch.library.opcheck(op, (x.requires_grad_(), packed.values.requires_grad_(), packed.block_cols,
                               packed.row_ptr, None, 50))


# ---- every ISA copy ----------------------------------------------------------------------------

ISA_SCRIPT = """
import json, torch, performer
from test_sparse import BLOCKS, check_linear, randn, sparse_weight
checked = 0
for dtype in (torch.float32, torch.float64):
    for block in BLOCKS:
        for M, N, K, density in ((1, 50, 70, 0.5), (13, 130, 257, 0.3), (97, 64, 64, 1.0), (7, 33, 9, 0.0)):
            w, _ = sparse_weight(N, K, block, density, dtype, seed=M)
            check_linear(randn(M, K, dtype=dtype, seed=2), w, randn(N, dtype=dtype, seed=3), block)
            checked += 1
print(json.dumps({"isa": torch.ops.performer.cpu_isa(), "checked": checked}))
"""


@pytest.mark.parametrize("isa", ISAS)
def test_every_isa_copy(isa):
    assert run_on_isa(isa, ISA_SCRIPT) == {"isa": isa, "checked": 32}


# ---- bad input ---------------------------------------------------------------------------------

def _packed(dtype=torch.float32):
    w, _ = sparse_weight(64, 40, (32, 8), 0.5, dtype, seed=25)
    return pack_blocks(w, (32, 8))


@pytest.mark.parametrize("mutate,match", [
    (lambda v, c, r: (v, c, torch.tensor([0, 5, 3], dtype=torch.int32)), "row_ptr"),
    (lambda v, c, r: (v, c.clone().fill_(5), r), r"block_cols must be in \[0, ceil\(K / bc\)=5\)"),
    (lambda v, c, r: (v, c.clone().fill_(-1), r), "block_cols"),
    (lambda v, c, r: (v, c[:-1], r), "block_cols must have shape"),
    (lambda v, c, r: (v, c, r[:-1]), "row_ptr must have shape"),
    (lambda v, c, r: (v, c.long(), r), "block_cols must have dtype int32"),
])
@pytest.mark.parametrize("direct", (False, True), ids=("api", "op"))
def test_malformed_format_raises(mutate, match, direct):
    values, cols, rows = mutate(*_packed())
    x = randn(3, 40)
    call = torch.ops.performer.block_sparse_linear if direct else block_sparse_linear
    if direct and "must have shape" in match:
        match = match.split(" must")[0]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call(x, values, cols, rows, None, 64)


def test_bad_inputs_raise():
    values, cols, rows = _packed()
    with pytest.raises(ValueError, match=r"bias must have shape \(N,\) = \(64,\)"):
        block_sparse_linear(randn(3, 40), values, cols, rows, torch.zeros(63), 64)
    with pytest.raises(TypeError, match=r"values must have the same dtype as x \(float64\); got float32"):
        block_sparse_linear(randn(3, 40, dtype=torch.float64), values, cols, rows, None, 64)
    with pytest.raises(ValueError, match=r"x must have shape \(M, K\)"):
        block_sparse_linear(randn(2, 3, 40), values, cols, rows, None, 64)
    with pytest.raises(ValueError, match="backend='cpp' cannot run block_sparse_linear here: does not support "
                                         "dtype float16"):
        block_sparse_linear(randn(3, 40, dtype=torch.float16), values.half(), cols, rows, None, 64, backend="cpp")


# ---- CompressedLinear and performer.compress --------------------------------------------------

def pruned_layer(n_in=70, n_out=50, sparsity=0.6, block=(16, 8), seed=0, bias=True):
    torch.manual_seed(seed)
    return BlockedLinear(n_in, n_out, bias=bias).prune(sparsity, block=block)


@pytest.mark.parametrize("bias", (True, False))
def test_compress_matches_the_pruned_layer(bias):
    layer = pruned_layer(bias=bias)
    small = layer.compress()
    assert isinstance(small, CompressedLinear) and small.block == (16, 8)
    assert abs(small.density - 0.4) < 0.05
    x = randn(4, 6, 70, seed=26)
    torch.testing.assert_close(small(x), layer(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(small.weight, layer.weight.detach())
    linear = small.to_linear()
    assert type(linear) is nn.Linear
    torch.testing.assert_close(linear(x), layer(x), rtol=1e-5, atol=1e-5)


def test_state_dict_is_plain_tensors_and_reloads():
    small = pruned_layer().compress()
    buf = io.BytesIO()
    torch.save(small.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert set(state) == {"values", "block_cols", "row_ptr", "format_version", "bias"}
    fresh = CompressedLinear(70, 50, block=(16, 8))
    assert fresh.values.shape[0] == 0
    fresh.load_state_dict(state)
    x = randn(5, 70, seed=27)
    torch.testing.assert_close(fresh(x), small(x))
    assert fresh.values.shape == small.values.shape


def test_dense_state_dict_compresses_on_load():
    layer = pruned_layer()
    dense = nn.Linear(70, 50)
    dense.load_state_dict({"weight": layer.weight.detach(), "bias": layer.bias.detach()})
    fresh = CompressedLinear(70, 50, block=(16, 8))
    fresh.load_state_dict(dense.state_dict())
    torch.testing.assert_close(fresh.values, layer.compress().values)
    x = randn(3, 70, seed=28)
    torch.testing.assert_close(fresh(x), dense(x), rtol=1e-5, atol=1e-5)


def test_other_format_version_raises():
    state = pruned_layer().compress().state_dict()
    state["format_version"] = torch.tensor(7)
    with pytest.raises(ValueError, match="format_version must be 1"):
        CompressedLinear(70, 50, block=(16, 8)).load_state_dict(state)
    state = pruned_layer().compress().state_dict()
    with pytest.raises(ValueError, match=r"values must have shape \(nnzb, 4, 32\)"):
        CompressedLinear(70, 50, block=(32, 4)).load_state_dict(state)


def test_deepcopy_pickle_and_training_keep_sparsity():
    small = pruned_layer().compress()
    twin = copy.deepcopy(small)
    buf = io.BytesIO()
    torch.save(small, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = randn(3, 70, seed=29)
    for other in (twin, loaded):
        torch.testing.assert_close(other(x), small(x))
    zero_before = small.weight == 0
    opt = torch.optim.SGD(small.parameters(), lr=0.1)
    small(x).square().sum().backward()
    opt.step()
    assert (small.weight[zero_before] == 0).all()
    assert not torch.equal(small(x), twin(x))


def test_compile_fullgraph():
    small = pruned_layer().compress()
    x = randn(8, 70, seed=30)
    compiled = torch.compile(small, fullgraph=True)
    torch.testing.assert_close(compiled(x), small(x))


def test_performer_compress_model(caplog):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Sequential(BlockedLinear(128, 96)), nn.Linear(96, 10))
    x = randn(4, 64, seed=31)
    with caplog.at_level(logging.INFO, logger="performer"):
        out = performer.compress(model, 0.75, block=(16, 16), skip=("3",))
    assert out is model
    assert isinstance(model[0], CompressedLinear) and isinstance(model[2][0], CompressedLinear)
    assert type(model[3]) is nn.Linear
    assert "performer.compress: 2 linear layers" in caplog.text and "2.0 density" not in caplog.text
    assert model(x).shape == (4, 10)
    kept = model[0].values.numel() + model[2][0].values.numel()
    assert abs(kept / (64 * 128 + 128 * 96) - 0.25) < 0.01


def test_compress_before_prune_raises():
    with pytest.raises(ValueError, match="compress\\(\\) needs a pruned layer: call prune"):
        BlockedLinear(32, 32).compress()
    with pytest.raises(ValueError, match="compress\\(\\) needs pruned layers: pass sparsity= .* not pruned: 0"):
        performer.compress(nn.Sequential(nn.Linear(32, 32)))
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        performer.compress(nn.Sequential(nn.Linear(32, 32)), 1.0)
    with pytest.raises(ValueError, match="block must be"):
        CompressedLinear(32, 32, block=(8, 8))


def test_layer_input_checks():
    small = pruned_layer().compress()
    with pytest.raises(ValueError, match=r"input must have shape \(\*, in_features=70\)"):
        small(torch.zeros(3, 69))
    with pytest.raises(TypeError, match="input must have the layer's dtype float32; got float64"):
        small(torch.zeros(3, 70, dtype=torch.float64))


def test_inference_calls_the_extension_directly():
    """Eager inference goes straight to performer._C (no graph); a gradient to record, or a format
    the extension refuses, takes the op path, which records the graph or names what is wrong."""
    small = pruned_layer().compress()
    x = randn(2, 3, 70, seed=32)
    with torch.no_grad():
        direct = small(x)
    assert direct.grad_fn is None
    recorded = small(x)
    assert recorded.grad_fn is not None
    torch.testing.assert_close(direct, recorded, rtol=0, atol=0)
    small.row_ptr[1] = small.row_ptr[-1] + 1
    with torch.no_grad(), pytest.raises((ValueError, RuntimeError), match="row_ptr must be non-decreasing"):
        small(x)


def test_multihead_attention_out_proj_is_left_alone():
    """nn.MultiheadAttention never calls its out_proj: prune and compress skip it (after
    performer.convert, PerformerAttention calls it and it is compressed like any other layer)."""
    torch.manual_seed(2)
    model = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.0, batch_first=True)
    performer.compress(model, 0.5, block=(16, 16))
    assert type(model.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert not hasattr(model.self_attn.out_proj, "weight_mask")
    assert isinstance(model.linear1, CompressedLinear) and isinstance(model.linear2, CompressedLinear)
    x = randn(2, 5, 64, seed=33)
    model(x).sum().backward()
    assert model.linear1.values.grad is not None
    converted = performer.convert(nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.0,
                                                             batch_first=True))
    performer.compress(converted, 0.5, block=(16, 16))
    assert isinstance(converted.self_attn.out_proj, CompressedLinear)
    assert converted(x).shape == x.shape

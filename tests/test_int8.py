"""Int8 block-sparse linear: the int8 format and the quantizers, the op in both modes (dynamic: rows
quantized at run time, integer products; weight-only) on every backend against the reference (odd
sizes, blocks, 0 to 100% of blocks kept, strided inputs, bias, inf/NaN rows, threads), its accuracy
against the float product, gradients, opcheck, every ISA copy, bad input; Int8Linear,
CompressedLinear.quantize, BlockedLinear.quantize and performer.compress(quantize="int8")."""
import copy
import io
import logging
import math

import pytest
import torch
from torch import nn

import performer
from performer.nn import BlockedLinear, Int8Linear
from performer.ops.sparse import block_sparse_linear_int8, pack_int8, unpack_int8
from performer.ops.sparse.api import INT8_MAX_K
from performer.ops.sparse.reference import block_sparse_linear_int8_reference, quantize_rows, quantize_weight
from conftest import INT8_ISAS, run_on_isa
from test_sparse import randn, sparse_weight

BLOCKS = ((16, 4), (16, 64), (32, 32), (64, 8))
MODES = ("dynamic", "weight_only")


def packed_int8(N, K, block, density, seed=0):
    """(packed, scales, col_sums, W) for a random (N, K) weight with blocks kept at ``density``."""
    w, keep = sparse_weight(N, K, block, density, seed=seed)
    packed, scales = pack_int8(w, block, keep)
    col_sums = unpack_int8(*packed, N, K).sum(dim=1, dtype=torch.int32)
    return packed, scales, col_sums, w


def check_int8(x, N, K, block, density, mode, bias=None, backend="cpp", seed=0):
    """The op against the reference: the same integer sums and scaling (dynamic; rtol 1e-5 of the
    largest output for the float32 scaling's rounding), or the float64 product of the dequantized
    weight (weight-only; a float32 sum's error). Returns the output."""
    packed, scales, col_sums, _ = packed_int8(N, K, block, density, seed)
    cs = col_sums if mode == "dynamic" else None
    got = block_sparse_linear_int8(x, packed.values, scales, cs, packed.block_cols, packed.row_ptr, bias, N,
                                   backend=backend)
    assert got.dtype == x.dtype and got.shape == (x.shape[0], N)
    ref = block_sparse_linear_int8_reference(x.double(), packed.values, scales, cs, packed.block_cols,
                                             packed.row_ptr, None if bias is None else bias.double(), N)
    if got.numel():
        scale = ref.abs().max().item() + 1e-30
        tol = 1e-5 if mode == "dynamic" else 4 * K * 2.0 ** -24
        err = (got.double() - ref).abs().max().item() / scale
        assert err <= tol, f"{mode}: relative error {err:.3g} > {tol:.3g}"
    return got


# ---- the format and the quantizers ----------------------------------------------------------------

@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("N,K", [(1, 4), (16, 4), (50, 70), (130, 257)])
def test_pack_unpack_int8(N, K, block):
    w, keep = sparse_weight(N, K, block, 0.5)
    packed, scales = pack_int8(w, block, keep)
    br, bc = block
    assert packed.values.dtype == torch.int8 and packed.values.shape[1:] == (bc // 4, br, 4)
    wq = unpack_int8(*packed, N, K)
    q, s = quantize_weight(w)
    assert torch.equal(s, scales)
    assert torch.equal(wq, q)                        # pruned blocks are zero in both
    # groups of 4 inputs: values[b, g, r, j] = Wq[p*br + r, col*bc + 4g + j]
    if packed.values.shape[0]:
        p = int(torch.searchsorted(packed.row_ptr, torch.tensor(0, dtype=torch.int32), right=True)) - 1
        c = int(packed.block_cols[0])
        for g, r, j in ((0, 0, 0), (0, 1, 3), (bc // 4 - 1, br - 1, 2)):
            n, k = p * br + r, c * bc + 4 * g + j
            expected = int(q[n, k]) if n < N and k < K else 0
            assert int(packed.values[0, g, r, j]) == expected


def test_quantize_weight_is_symmetric_per_output():
    w = randn(20, 33) * torch.linspace(0.01, 10, 20)[:, None]
    w[3] = 0
    q, scales = quantize_weight(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert scales[3] == 1 and (q[3] == 0).all()
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-7).all()


def test_quantize_rows():
    x = randn(6, 50) * 4
    x[1] = 0                                          # a zero row: scale 1, exact
    x[2] = x[2].abs() + 1                             # all positive: the range is widened to 0
    x[3, 7] = float("inf")
    x[4, 0] = float("nan")
    q, scale, zero = quantize_rows(x)
    assert q.dtype == torch.uint8 and zero.dtype == torch.int32
    ok = [0, 1, 2, 5]
    back = scale[ok, None] * (q[ok].float() - zero[ok, None].float())
    assert ((back - x[ok]).abs() <= scale[ok, None] * 0.5001).all()
    assert scale[1] == 1 and zero[1] == 0 and (q[1] == 0).all()
    assert zero[2] == 0
    assert torch.isnan(scale[3]) and torch.isnan(scale[4])


# ---- the op ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ("cpp", "torch"))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("M,N,K", [(1, 50, 70), (5, 16, 4), (33, 130, 257), (200, 97, 64), (3, 40, 6)])
def test_values(M, N, K, block, mode, backend):
    check_int8(randn(M, K, seed=1) * 3, N, K, block, 0.6, mode, randn(N, seed=2), backend)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("density", (0.0, 0.05, 0.3, 1.0))
def test_densities(density, mode):
    y = check_int8(randn(37, 300, seed=3), 90, 300, (32, 16), density, mode, randn(90, seed=4))
    if density == 0.0:
        torch.testing.assert_close(y, randn(90, seed=4).expand(37, 90))


@pytest.mark.parametrize("mode", MODES)
def test_matches_the_float_product(mode):
    """Int8 keeps the product's accuracy: within 2% of the float32 layer on random data (weights
    quantized per output; dynamic mode also rounds each input row to 256 levels)."""
    packed, scales, col_sums, w = packed_int8(96, 512, (32, 32), 1.0, seed=5)
    x = randn(64, 512, seed=6)
    y = block_sparse_linear_int8(x, packed.values, scales, col_sums if mode == "dynamic" else None,
                                 packed.block_cols, packed.row_ptr, None, 96)
    exact = x @ w.t()
    rel = ((y - exact).norm() / exact.norm()).item()
    assert rel < (0.02 if mode == "dynamic" else 0.01), rel


@pytest.mark.parametrize("layout", ("row_slice", "transposed", "column_slice"))
@pytest.mark.parametrize("mode", MODES)
def test_strided_inputs(layout, mode):
    base = randn(40, 150, seed=7)
    x = {"row_slice": base[::2], "transposed": base.t().contiguous().t(), "column_slice": base[:, 3:133]}[layout]
    check_int8(x, 48, x.shape[1], (16, 8), 0.5, mode, randn(48, seed=8))


@pytest.mark.parametrize("threads", (1, 2, 3))
def test_thread_counts_agree(threads):
    packed, scales, col_sums, _ = packed_int8(130, 257, (32, 32), 0.5, seed=9)
    x = randn(200, 257, seed=10)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = block_sparse_linear_int8(x, packed.values, scales, col_sums, packed.block_cols, packed.row_ptr, None, 130)
        torch.set_num_threads(threads)
        many = block_sparse_linear_int8(x, packed.values, scales, col_sums, packed.block_cols, packed.row_ptr, None, 130)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


@pytest.mark.parametrize("mode", MODES)
def test_inf_and_nan_rows_give_nan_rows(mode):
    packed, scales, col_sums, _ = packed_int8(32, 40, (16, 8), 1.0, seed=11)
    x = randn(4, 40, seed=12)
    x[1, 5], x[2, 0] = float("inf"), float("nan")
    y = block_sparse_linear_int8(x, packed.values, scales, col_sums if mode == "dynamic" else None,
                                 packed.block_cols, packed.row_ptr, None, 32)
    assert torch.isnan(y[1:3]).all() if mode == "dynamic" else (~torch.isfinite(y[1:3])).all()
    assert torch.isfinite(y[[0, 3]]).all()


def test_empty_sizes():
    packed, scales, col_sums, _ = packed_int8(32, 40, (16, 8), 1.0)
    bias = randn(32, seed=13)
    for x in (randn(0, 40), randn(3, 40)):
        y = block_sparse_linear_int8(x, packed.values, scales, col_sums, packed.block_cols, packed.row_ptr, bias, 32)
        assert y.shape == (x.shape[0], 32)
    packed0, scales0, cs0, _ = packed_int8(32, 0, (16, 8), 1.0)
    y = block_sparse_linear_int8(randn(3, 0), packed0.values, scales0, cs0, packed0.block_cols, packed0.row_ptr,
                                 bias, 32)
    torch.testing.assert_close(y, bias.expand(3, 32))


@pytest.mark.parametrize("mode", MODES)
def test_gradients(mode):
    """x's gradient goes through the dequantized weight (the rounding of x passed straight
    through); bias's is the output gradient's sum."""
    packed, scales, col_sums, _ = packed_int8(50, 70, (16, 8), 0.5, seed=14)
    x = randn(6, 70, seed=15).requires_grad_()
    bias = randn(50, seed=16).requires_grad_()
    g = randn(6, 50, seed=17)
    y = block_sparse_linear_int8(x, packed.values, scales, col_sums if mode == "dynamic" else None,
                                 packed.block_cols, packed.row_ptr, bias, 50)
    y.backward(g)
    weight = unpack_int8(*packed, 50, 70).float() * scales[:, None]
    torch.testing.assert_close(x.grad, g @ weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, g.sum(0))


def test_gradcheck_weight_only():
    packed, scales, _, _ = packed_int8(40, 37, (16, 8), 0.5, seed=18)
    x = randn(5, 37, dtype=torch.float64, seed=19).requires_grad_()
    bias = randn(40, dtype=torch.float64, seed=20).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, b: block_sparse_linear_int8(x, packed.values, scales, None, packed.block_cols, packed.row_ptr,
                                              b, 40, backend="torch"), (x, bias))


@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode):
    packed, scales, col_sums, _ = packed_int8(50, 70, (16, 8), 0.5, seed=21)
    x, bias = randn(6, 70, seed=22), randn(50, seed=23)
    cs = col_sums if mode == "dynamic" else None
    op = torch.ops.performer.block_sparse_linear_int8.default
    torch.library.opcheck(op, (x, packed.values, scales, cs, packed.block_cols, packed.row_ptr, bias, 50))
    torch.library.opcheck(op, (x.requires_grad_(), packed.values, scales, cs, packed.block_cols, packed.row_ptr,
                               None, 50))


# ---- every ISA copy ----------------------------------------------------------------------------

ISA_SCRIPT = """
import json, torch, performer
from test_int8 import BLOCKS, MODES, check_int8
from test_sparse import randn
checked = 0
for mode in MODES:
    for block in BLOCKS:
        for M, N, K, density in ((1, 50, 70, 0.5), (13, 130, 257, 0.3), (97, 64, 64, 1.0), (7, 33, 9, 0.0)):
            check_int8(randn(M, K, seed=2) * 3, N, K, block, density, mode, randn(N, seed=3), seed=M)
            checked += 1
print(json.dumps({"isa": torch.ops.performer.cpu_isa(), "checked": checked}))
"""


@pytest.mark.parametrize("isa", INT8_ISAS)
def test_every_isa_copy(isa):
    assert run_on_isa(isa, ISA_SCRIPT) == {"isa": isa, "checked": 32}


# ---- bad input ---------------------------------------------------------------------------------

def test_bad_inputs_raise():
    packed, scales, col_sums, _ = packed_int8(64, 40, (32, 8), 0.5, seed=24)
    v, c, r = packed
    x = randn(3, 40)
    with pytest.raises(TypeError, match="values must have dtype int8; got float32"):
        block_sparse_linear_int8(x, v.float(), scales, col_sums, c, r, None, 64)
    with pytest.raises(ValueError, match=r"values must have shape \(nnzb, bc / 4, br, 4\)"):
        block_sparse_linear_int8(x, v.reshape(v.shape[0], -1), scales, col_sums, c, r, None, 64)
    with pytest.raises(ValueError, match=r"scales must have shape \(N,\) = \(64,\)"):
        block_sparse_linear_int8(x, v, scales[:-1], col_sums, c, r, None, 64)
    with pytest.raises(TypeError, match="col_sums must have dtype int32; got int64"):
        block_sparse_linear_int8(x, v, scales, col_sums.long(), c, r, None, 64)
    with pytest.raises(ValueError, match="block_cols must have shape"):
        block_sparse_linear_int8(x, v, scales, col_sums, c[:-1], r, None, 64)
    with pytest.raises(ValueError, match=f"x must have at most {INT8_MAX_K} columns when its rows are quantized"):
        block_sparse_linear_int8(randn(1, INT8_MAX_K + 1), v, scales, col_sums, c, r, None, 64)
    with pytest.raises(ValueError, match="backend='cpp' cannot run block_sparse_linear_int8 here: does not support "
                                         "dtype float64"):
        block_sparse_linear_int8(x.double(), v, scales, col_sums, c, r, None, 64, backend="cpp")
    # the op itself checks what it reads
    op = torch.ops.performer.block_sparse_linear_int8
    with pytest.raises((ValueError, RuntimeError), match="block_cols must be in"):
        op(x, v, scales, col_sums, c.clone().fill_(9), r, None, 64)
    with pytest.raises((ValueError, RuntimeError), match="x must have at most"):
        op(randn(1, INT8_MAX_K + 1), v, scales, col_sums, c, r, None, 64)
    with pytest.raises((TypeError, RuntimeError), match="x must have dtype float32"):
        op(x.double(), v, scales, col_sums, c, r, None, 64)


# ---- Int8Linear --------------------------------------------------------------------------------

def pruned_layer(n_in=70, n_out=50, sparsity=0.6, block=(16, 8), seed=0, bias=True):
    torch.manual_seed(seed)
    return BlockedLinear(n_in, n_out, bias=bias).prune(sparsity, block=block)


@pytest.mark.parametrize("activations", ("dynamic", None))
@pytest.mark.parametrize("pruned", (True, False))
def test_int8_linear_matches_the_float_layer(pruned, activations):
    torch.manual_seed(3)
    layer = pruned_layer() if pruned else BlockedLinear(70, 50)
    q = layer.quantize("int8", activations=activations)
    assert isinstance(q, Int8Linear) and q.activations == activations
    assert q.block == (16, 8) if pruned else q.block == (32, 32)
    assert abs(q.density - (0.4 if pruned else 1.0)) < 0.05
    x = randn(4, 6, 70, seed=25)
    exact = layer(x)
    y = q(x)
    assert y.shape == exact.shape
    assert ((y - exact).norm() / exact.norm()).item() < 0.02
    torch.testing.assert_close(q.weight, q.to_linear().weight)
    assert (q.weight[layer.weight.detach() == 0] == 0).all()
    torch.testing.assert_close(q.to_linear()(x), x @ q.weight.t() + q.bias, rtol=1e-5, atol=1e-5)


def test_compressed_linear_quantize_keeps_its_blocks():
    small = pruned_layer().compress()
    q = small.quantize(activations=None)
    assert q.values.shape[:1] == small.values.shape[:1] and torch.equal(q.block_cols, small.block_cols)
    x = randn(5, 70, seed=26)
    assert ((q(x) - small(x)).norm() / small(x).norm()).item() < 0.01


def test_state_dict_is_plain_tensors_and_reloads():
    q = pruned_layer().quantize()
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert set(state) == {"values", "block_cols", "row_ptr", "scales", "format_version", "bias"}
    fresh = Int8Linear(70, 50, block=(16, 8))
    fresh.load_state_dict(state)
    x = randn(5, 70, seed=27)
    torch.testing.assert_close(fresh(x), q(x), rtol=0, atol=0)
    assert torch.equal(fresh.col_sums, q.col_sums)


def test_dense_state_dict_quantizes_on_load():
    dense = nn.Linear(70, 50)
    fresh = Int8Linear(70, 50, block=(16, 8))
    fresh.load_state_dict(dense.state_dict())
    assert fresh.density == 1.0
    x = randn(3, 70, seed=28)
    assert ((fresh(x) - dense(x)).norm() / dense(x).norm()).item() < 0.02
    with pytest.raises(ValueError, match="weight must be float32, float16 or bfloat16 to quantize to int8"):
        Int8Linear(70, 50).load_state_dict(nn.Linear(70, 50, dtype=torch.float64).state_dict())


def test_other_format_version_or_block_raises():
    state = pruned_layer().quantize().state_dict()
    state["format_version"] = torch.tensor(7)
    with pytest.raises(ValueError, match="format_version must be 1"):
        Int8Linear(70, 50, block=(16, 8)).load_state_dict(state)
    state = pruned_layer().quantize().state_dict()
    with pytest.raises(ValueError, match=r"values must be int8 of shape \(nnzb, 1, 32, 4\)"):
        Int8Linear(70, 50, block=(32, 4)).load_state_dict(state)


def test_deepcopy_pickle_and_compile():
    q = pruned_layer().quantize()
    x = randn(8, 70, seed=29)
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    for other in (copy.deepcopy(q), torch.load(buf, weights_only=False)):
        torch.testing.assert_close(other(x), q(x), rtol=0, atol=0)
    compiled = torch.compile(q, fullgraph=True)
    torch.testing.assert_close(compiled(x), q(x), rtol=0, atol=0)


def test_inference_calls_the_extension_directly():
    q = pruned_layer().quantize()
    x = randn(2, 3, 70, seed=30)
    with torch.no_grad():
        direct = q(x)
    assert direct.grad_fn is None
    recorded = q(x.requires_grad_())
    assert recorded.grad_fn is not None
    torch.testing.assert_close(direct, recorded, rtol=0, atol=0)


def test_performer_compress_quantize(caplog):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Sequential(BlockedLinear(128, 96)), nn.Linear(96, 10))
    x = randn(4, 64, seed=31)
    exact = model(x)
    with caplog.at_level(logging.INFO, logger="performer"):
        performer.compress(model, quantize="int8", skip=("3",))
    assert isinstance(model[0], Int8Linear) and isinstance(model[2][0], Int8Linear) and type(model[3]) is nn.Linear
    assert model[0].density == 1.0 and model[0].activations == "dynamic"
    assert "2 linear layers as int8 (dynamic)" in caplog.text
    assert ((model(x) - exact).norm() / exact.norm()).item() < 0.03
    sparse = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    performer.compress(sparse, 0.75, quantize="int8", activations=None, block=(16, 16))
    assert all(isinstance(m, Int8Linear) and m.activations is None for m in (sparse[0], sparse[2]))
    blocks = sparse[0].values.shape[0] + sparse[2].values.shape[0]
    assert blocks == round(0.25 * (8 * 4 + 1 * 8))      # global ranking over the (16, 16) blocks


def test_bad_quantize_arguments_raise():
    with pytest.raises(ValueError, match="layer 0's weight must be float32, float16 or bfloat16 to quantize"):
        performer.compress(nn.Sequential(nn.Linear(8, 8, dtype=torch.float64)), quantize="int8")
    with pytest.raises(ValueError, match="the layer's dtype must be float32, float16 or bfloat16"):
        pruned_layer().double().compress().quantize()
    with pytest.raises(ValueError, match="quantize must be one of None, 'int8'; got 'int4'"):
        performer.compress(nn.Sequential(nn.Linear(8, 8)), quantize="int4")
    with pytest.raises(ValueError, match="dtype must be one of 'int8'; got 'int4'"):
        BlockedLinear(8, 8).quantize("int4")
    with pytest.raises(ValueError, match="activations must be one of 'dynamic', None; got 'static'"):
        BlockedLinear(8, 8).quantize(activations="static")
    with pytest.raises(ValueError, match="block must have a multiple of 4 columns for int8"):
        pack_int8(randn(16, 12), (16, 6))
    q = pruned_layer().quantize()
    with pytest.raises(ValueError, match=r"input must have shape \(\*, in_features=70\)"):
        q(torch.zeros(3, 69))
    with pytest.raises(TypeError, match="input must have the int8 layer.s dtype float32; got float64"):
        q(torch.zeros(3, 70, dtype=torch.float64))
    assert math.isfinite(q.density)


def test_performer_compress_quantizes_compressed_layers(caplog):
    """performer.compress(quantize="int8") on a compressed model keeps each layer's blocks."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    performer.compress(model, 0.5, block=(16, 16))
    blocks = [m.values.shape[0] for m in (model[0], model[2])]
    x = randn(6, 64, seed=32)
    before = model(x)
    with caplog.at_level(logging.INFO, logger="performer"):
        performer.compress(model, quantize="int8")
    assert [m.values.shape[0] for m in (model[0], model[2])] == blocks
    assert all(isinstance(m, Int8Linear) and m.block == (16, 16) for m in (model[0], model[2]))
    assert ((model(x) - before).norm() / before.norm()).item() < 0.02
    assert "weights 0.02 -> 0.01 MB" in caplog.text   # float32 kept blocks -> int8
    with pytest.raises(ValueError, match="sparsity must be None for a model with CompressedLinear layers"):
        performer.compress(nn.Sequential(pruned_layer().compress()), 0.5, quantize="int8")

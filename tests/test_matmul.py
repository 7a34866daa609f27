"""blocked_matmul and BlockedLinear against the float64 reference: values (every dtype, odd sizes in
every dimension, transposed and broadcast operands, torch.matmul's 1-D rules), gradients,
gradcheck, opcheck, torch.compile, thread counts, empty sizes and bad input."""
import itertools
import re

import pytest
import torch
from torch import nn

import performer
from performer import _dispatch
from performer.nn import BlockedLinear
from performer.ops.matmul.api import OP
from performer.ops.matmul.reference import matmul_reference
from conftest import DTYPES, assert_close, dtype_id

SIZES = (1, 7, 33, 257)
CPU_BACKENDS = ("cpp", "torch")


def randn(*shape, dtype=torch.float32, seed=0):
    """Standard normal values drawn in float64 (the same values in every dtype), then cast."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def check_product(a, b, backend="cpp", multiple=4.0):
    got = performer.blocked_matmul(a, b, backend=backend)
    assert got.dtype == a.dtype
    assert_close(got, matmul_reference(a, b), matmul_reference(a, b, a.dtype), multiple=multiple)
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("M,K,N", [s for s in itertools.product(SIZES, repeat=3) if max(s) < 257 or s.count(257) == 1])
def test_odd_sizes(M, K, N, dtype):
    check_product(randn(M, K, dtype=dtype, seed=1), randn(K, N, dtype=dtype, seed=2))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("M,K,N", [(300, 600, 1100), (97, 1030, 65), (1030, 70, 300)])
def test_multiple_blocks(M, K, N, dtype):
    """Several K slices (256), row blocks and 1024-wide column blocks, with partial edges."""
    check_product(randn(M, K, dtype=dtype, seed=3), randn(K, N, dtype=dtype, seed=4))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout_a,layout_b", list(itertools.product(("row", "col", "strided"), repeat=2)))
def test_strided_operands(layout_a, layout_b, dtype):
    def make(rows, cols, layout, seed):
        if layout == "row":
            return randn(3, rows, cols, dtype=dtype, seed=seed)
        if layout == "col":
            return randn(3, cols, rows, dtype=dtype, seed=seed).transpose(1, 2)
        return randn(3, rows * 2, cols * 3, dtype=dtype, seed=seed)[:, ::2, ::3]
    a, b = make(45, 70, layout_a, 5), make(70, 37, layout_b, 6)
    check_product(a, b)


def test_transposed_operands_are_not_copied():
    a = randn(64, 300).t()  # column-major (300, 64)
    b = randn(40, 64).t()   # column-major (64, 40)
    args = performer._validate.validate_matmul(a, b)
    assert args.a.data_ptr() == a.data_ptr() and args.b.data_ptr() == b.data_ptr()
    check_product(a, b)


@pytest.mark.parametrize("shape_a,shape_b", [
    ((2, 3, 5, 7), (7, 4)),          # shared b: batch folded into rows
    ((5, 7), (2, 3, 7, 4)),          # shared a: batch stride 0
    ((2, 1, 5, 7), (1, 3, 7, 4)),    # both broadcast
    ((4, 5, 7), (4, 7, 4)),
    ((7,), (7, 4)), ((5, 7), (7,)), ((7,), (7,)), ((3, 7), (2, 7, 4)[1:]), ((2, 5, 7), (7,)), ((7,), (2, 7, 4)),
])
def test_matmul_shape_rules(shape_a, shape_b):
    a, b = randn(*shape_a, seed=7), randn(*shape_b, seed=8)
    got = check_product(a, b)
    assert got.shape == torch.matmul(a, b).shape


def test_folded_batch_of_a_noncontiguous():
    a = randn(3, 4, 9, 6).transpose(1, 2)  # (3, 9, 4, 6): batch cannot be folded as a view
    check_product(a, randn(6, 5, seed=9))


@pytest.mark.parametrize("shape_a,shape_b,expected", [
    ((0, 5), (5, 3), (0, 3)), ((4, 0), (0, 3), (4, 3)), ((4, 5), (5, 0), (4, 0)), ((0, 4, 5), (0, 5, 3), (0, 4, 3)),
])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_sizes(shape_a, shape_b, expected, backend):
    got = performer.blocked_matmul(torch.ones(shape_a), torch.ones(shape_b), backend=backend)
    assert got.shape == expected
    assert torch.equal(got, torch.zeros(expected))  # K = 0 gives zeros, like torch.matmul


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_thread_counts(threads, dtype):
    """Every job split (columns, rows, batch) gives the one-thread result exactly."""
    shapes = [((1, 600, 300), (1, 300, 1100)), ((1, 2000, 64), (1, 64, 40)), ((3, 50, 300), (3, 300, 70)),
              ((1, 5, 300), (1, 300, 2000))]
    prev = torch.get_num_threads()
    try:
        for sa, sb in shapes:
            a, b = randn(*sa, dtype=dtype, seed=10), randn(*sb, dtype=dtype, seed=11)
            torch.set_num_threads(1)
            one = performer.blocked_matmul(a, b)
            torch.set_num_threads(threads)
            assert torch.equal(performer.blocked_matmul(a, b), one), (sa, sb)
    finally:
        torch.set_num_threads(prev)


# ---- gradients ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape_a,shape_b", [((33, 70), (70, 9)), ((2, 3, 17, 40), (40, 5)), ((17, 40), (2, 40, 5)),
                                             ((2, 1, 9, 30), (3, 30, 11))])
def test_gradients(shape_a, shape_b, dtype):
    a = randn(*shape_a, dtype=dtype, seed=12).requires_grad_()
    b = randn(*shape_b, dtype=dtype, seed=13).requires_grad_()
    out = performer.blocked_matmul(a, b)
    go = randn(*out.shape, seed=14)
    grads = torch.autograd.grad(out, (a, b), go.to(dtype))
    a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
    ref = torch.autograd.grad(torch.matmul(a64, b64), (a64, b64), go)
    a_dt, b_dt = (t.detach().requires_grad_() for t in (a, b))
    ref_dt = torch.autograd.grad(torch.matmul(a_dt, b_dt), (a_dt, b_dt), go.to(dtype))
    for name, g, r, rd in zip(("grad_a", "grad_b"), grads, ref, ref_dt):
        assert_close(g, r, rd, name)


def test_gradcheck_float64():
    a = randn(2, 6, 9, dtype=torch.float64, seed=15).requires_grad_()
    b = randn(9, 5, dtype=torch.float64, seed=16).transpose(0, 1).contiguous().t().requires_grad_()
    assert torch.autograd.gradcheck(performer.blocked_matmul, (a, b))
    assert torch.autograd.gradgradcheck(performer.blocked_matmul, (a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
def test_opcheck(dtype):
    samples = [(randn(2, 7, 33, dtype=dtype), randn(2, 33, 5, dtype=dtype, seed=1)),
               (randn(1, 40, 9, dtype=dtype).transpose(1, 2), randn(3, 40, dtype=dtype, seed=1).t().unsqueeze(0)),
               (randn(7, 33, dtype=dtype).expand(3, 7, 33), randn(3, 33, 6, dtype=dtype, seed=2))]
    for a, b in samples:
        torch.library.opcheck(torch.ops.performer.blocked_matmul, (a.requires_grad_(), b.requires_grad_()))


def test_compile_fullgraph():
    a, b = randn(4, 30, 20).requires_grad_(), randn(20, 10, seed=1).requires_grad_()
    fn = torch.compile(lambda x, y: performer.blocked_matmul(x, y).relu().sum(), fullgraph=True, backend="inductor")
    loss = fn(a, b)
    ga, gb = torch.autograd.grad(loss, (a, b))
    a2, b2 = (t.detach().requires_grad_() for t in (a, b))
    ref = performer.blocked_matmul(a2, b2).relu().sum()
    ra, rb = torch.autograd.grad(ref, (a2, b2))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(ga, ra)
    torch.testing.assert_close(gb, rb)


# ---- dispatch and bad input -----------------------------------------------------------------------

def test_default_backend_on_cpu_is_cpp():
    args = performer._validate.validate_matmul(randn(3, 4), randn(4, 2))
    assert _dispatch.select(OP, args).name == "cpp"
    assert [b.name for b in _dispatch.backends(OP)] == ["cpp", "triton", "torch"]


@pytest.mark.parametrize("a,b,exc,message", [
    (torch.ones(3, 4), torch.ones(5, 2), ValueError, "b must have as many rows as a has columns (a: (..., M, K=4))"),
    (torch.ones(2, 3, 4), torch.ones(3, 4, 2), ValueError, "a and b must have broadcastable batch dimensions"),
    (torch.ones(3, 4), torch.ones(4, 2, dtype=torch.float64), TypeError,
     "b must have the same dtype as a (float32); got float64"),
    (torch.ones(3, 4, dtype=torch.int64), torch.ones(4, 2, dtype=torch.int64), TypeError,
     "a must have a floating-point dtype"),
    (torch.ones(3, 4, dtype=torch.complex64), torch.ones(4, 2, dtype=torch.complex64), TypeError,
     "a must have a floating-point dtype"),
    (torch.ones(3, 4), torch.ones(4, 2, device="meta"), ValueError, "b must be on the same device as a (cpu)"),
    (torch.ones(()), torch.ones(4, 2), ValueError, "a must have at least 1 dimensions"),
    ([[1.0]], torch.ones(1, 2), TypeError, "a must be a torch.Tensor; got list"),
])
def test_bad_input(a, b, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        performer.blocked_matmul(a, b)


@pytest.mark.parametrize("a,b,exc,message", [
    (torch.ones(3, 4), torch.ones(1, 4, 2), ValueError, "a must have shape (B, M, K); got shape [3, 4]"),
    (torch.ones(2, 3, 4), torch.ones(1, 4, 2), ValueError, "b must have shape (B, K, N) with size 2 in dimension 0"),
    (torch.ones(1, 3, 4), torch.ones(1, 5, 2), ValueError, "b must have shape (B, K, N) with size 4 in dimension 1"),
    (torch.ones(1, 3, 4), torch.ones(1, 4, 2, dtype=torch.float64), TypeError, "b must have the dtype of a"),
    (torch.ones(1, 3, 4, dtype=torch.int32), torch.ones(1, 4, 2, dtype=torch.int32), TypeError,
     "a must have dtype float32, float64, bfloat16 or float16"),
])
def test_op_checks(a, b, exc, message):
    """Direct calls of the registered op are checked too (never a crash)."""
    with pytest.raises(exc, match=re.escape(message)):
        torch.ops.performer.blocked_matmul(a, b)


# ---- BlockedLinear ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bias", [True, False])
def test_blocked_linear_matches_linear(dtype, bias):
    torch.manual_seed(0)
    ref = nn.Linear(37, 19, bias=bias, dtype=dtype)
    torch.manual_seed(0)
    layer = BlockedLinear(37, 19, bias=bias, dtype=dtype)
    assert isinstance(layer, nn.Linear)
    assert layer.state_dict().keys() == ref.state_dict().keys()
    for k in ref.state_dict():  # same initialization from the same seed
        assert torch.equal(layer.state_dict()[k], ref.state_dict()[k])
    x = randn(4, 5, 37, dtype=dtype, seed=17).requires_grad_()
    out = layer(x)
    x64 = x.detach().double().requires_grad_()
    lin64 = nn.Linear(37, 19, bias=bias, dtype=torch.float64)
    lin64.load_state_dict({k: v.double() for k, v in ref.state_dict().items()})
    out64 = lin64(x64)
    assert_close(out, out64, ref(x), "output")
    go = randn(*out.shape, seed=18)
    got = torch.autograd.grad(out, [x] + list(layer.parameters()), go.to(dtype))
    want = torch.autograd.grad(out64, [x64] + list(lin64.parameters()), go)
    xr = x.detach().requires_grad_()
    want_dt = torch.autograd.grad(ref(xr), [xr] + list(ref.parameters()), go.to(dtype))
    for g, w, wd in zip(got, want, want_dt):
        assert_close(g, w, wd, "gradient")


def test_from_linear_shares_or_copies():
    lin = nn.Linear(8, 3)
    shared = BlockedLinear.from_linear(lin)
    copied = BlockedLinear.from_linear(lin, share=False)
    assert shared.weight is lin.weight and shared.bias is lin.bias
    assert copied.weight is not lin.weight and torch.equal(copied.weight, lin.weight)
    x = randn(5, 8)
    torch.testing.assert_close(shared(x), lin(x))
    torch.testing.assert_close(copied(x), lin(x))
    nobias = BlockedLinear.from_linear(nn.Linear(8, 3, bias=False))
    assert nobias.bias is None
    loaded = BlockedLinear(8, 3)
    loaded.load_state_dict(lin.state_dict())
    torch.testing.assert_close(loaded(x), lin(x))


def test_blocked_linear_bad_input():
    with pytest.raises(ValueError, match=re.escape("input must have shape (*, in_features=8); got shape (5, 7)")):
        BlockedLinear(8, 3)(torch.ones(5, 7))
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear"):
        BlockedLinear.from_linear(nn.Conv1d(1, 1, 1))

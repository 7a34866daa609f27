"""The Triton matmul op (performer.ops.matmul.triton): values, layouts, gradients, opcheck, compile.

Without a CUDA device the kernel runs under the Triton interpreter on the CPU. TRITON_INTERPRET
must be set before the module defines its kernel, i.e. before ``import performer``; conftest has
imported performer already, so when this process cannot run the kernel, the only test collected
here reruns this file in a subprocess with TRITON_INTERPRET=1 (which also keeps the interpreter
out of the rest of the suite). Interpreted runs are slow: the shapes stay small, and
the interpreter uses 16x16x16 tiles so that they still span several tiles, partial edge tiles
and partial GROUP_M groups.
"""
import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from performer.ops.matmul import triton as mt  # noqa: E402

from conftest import TRITON_CHILD_ENV, assert_close, dtype_id, run_in_triton_interpreter  # noqa: E402

# This process cannot run the kernel, but the interpreter in a fresh one can.
RUN_IN_CHILD = (mt.unavailable_reason() is not None and not mt.INTERPRET and not torch.cuda.is_available()
                and not os.environ.get(TRITON_CHILD_ENV))
if mt.unavailable_reason() is not None and not RUN_IN_CHILD:
    pytest.skip(f"triton matmul cannot run here: {mt.unavailable_reason()}", allow_module_level=True)

# torch's own opcheck/compile internals warn about their use of torch.jit.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def test_in_triton_interpreter_subprocess():
    run_in_triton_interpreter(__file__)


DEVICE = "cpu" if mt.INTERPRET else "cuda"
# bfloat16 is only checked compiled: the interpreter does not emulate its arithmetic.
DTYPES = [d for d in (torch.float32, torch.float16, torch.float64, torch.bfloat16) if d in mt.SUPPORTED_DTYPES]
SHAPES = [(1, 1, 1, 1), (2, 7, 33, 5), (3, 33, 17, 65), (1, 64, 64, 64)]   # (B, M, K, N)
# Gradients of 16-bit inputs are rounded to 16 bits twice (output, then each matmul); as in the
# FAVOR+ gradient tests, allow more than the forward's multiple of the reference's own error.
GRAD_MULTIPLE = 10.0


def _randn(*shape, seed, dtype=torch.float32):
    """Standard normal values drawn in float64 (the same values whatever the dtype), then cast."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)


def _operands(B, M, K, N, dtype, layout="contiguous", seed=0):
    """a (B, M, K) and b (B, K, N) in ``layout``: "contiguous"; "a_t" / "b_t" / "both_t": the
    transpose of a contiguous (B, K, M) / (B, N, K) tensor; "a_bcast" / "b_bcast": one matrix
    expanded over the batch (batch stride 0); "strided": every-other-element views (no unit
    stride anywhere)."""
    if layout in ("contiguous", "a_bcast", "b_bcast"):
        a = _randn(1 if layout == "a_bcast" else B, M, K, seed=seed, dtype=dtype).expand(B, M, K)
        b = _randn(1 if layout == "b_bcast" else B, K, N, seed=seed + 1, dtype=dtype).expand(B, K, N)
    elif layout in ("a_t", "b_t", "both_t"):
        a = _randn(B, K, M, seed=seed, dtype=dtype).transpose(1, 2) if layout != "b_t" \
            else _randn(B, M, K, seed=seed, dtype=dtype)
        b = _randn(B, N, K, seed=seed + 1, dtype=dtype).transpose(1, 2) if layout != "a_t" \
            else _randn(B, K, N, seed=seed + 1, dtype=dtype)
    elif layout == "strided":
        a = _randn(B, 2 * M, 2 * K, seed=seed, dtype=dtype)[:, ::2, 1::2]
        b = _randn(B, 2 * K, 3 * N, seed=seed + 1, dtype=dtype)[:, 1::2, ::3]
    else:
        raise ValueError(layout)
    assert a.shape == (B, M, K) and b.shape == (B, K, N)
    return a, b


def _check_values(a, b):
    got = mt.matmul_triton(a, b)
    B, M, _ = a.shape
    assert got.shape == (B, M, b.shape[2]) and got.dtype == a.dtype and got.is_contiguous()
    ref64 = torch.matmul(a.cpu().double(), b.cpu().double())
    ref_same = torch.matmul(a.cpu(), b.cpu())        # the error torch.matmul makes in a.dtype
    assert_close(got.cpu(), ref64, ref_same)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_values_match_float64(shape, dtype):
    _check_values(*_operands(*shape, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("layout", ["a_t", "b_t", "both_t", "a_bcast", "b_bcast", "strided"])
def test_layouts_read_in_place(layout, dtype):
    a, b = _operands(3, 33, 17, 20, dtype, layout)
    if layout in ("a_bcast", "b_bcast"):
        assert (a if layout == "a_bcast" else b).stride(0) == 0
    _check_values(a, b)


def test_64bit_offsets(monkeypatch):
    """The INDEX_64 specialisation (taken for > 2**31-element operands), forced on small ones."""
    monkeypatch.setattr(mt, "_INDEX32_LIMIT", 0)
    _check_values(*_operands(2, 7, 33, 5, torch.float32, "both_t"))


@pytest.mark.parametrize("shape", [(2, 0, 5, 3), (2, 4, 5, 0), (0, 4, 5, 3)], ids=["M0", "N0", "B0"])
def test_empty_output(shape):
    a, b = _operands(*shape, torch.float32)
    out = mt.matmul_triton(a, b)
    assert out.shape == (shape[0], shape[1], shape[3]) and out.numel() == 0


def test_k0_gives_zeros():
    a, b = _operands(2, 4, 0, 3, torch.float32)
    out = mt.matmul_triton(a, b)
    assert out.shape == (2, 4, 3) and (out == 0).all()


@pytest.mark.parametrize("layout", ["contiguous", "both_t", "a_bcast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_grads_match_float64(dtype, layout):
    B, M, K, N = 2, 7, 33, 5
    a, b = (t.detach().requires_grad_() for t in _operands(B, M, K, N, dtype, layout))
    grad_out = _randn(B, M, N, seed=7, dtype=torch.float64)

    got = torch.autograd.grad(mt.matmul_triton(a, b), (a, b), grad_out.to(dtype))
    x64 = [t.detach().cpu().double().requires_grad_() for t in (a, b)]
    ref64 = torch.autograd.grad(torch.matmul(*x64), x64, grad_out.cpu())
    xd = [t.detach().cpu().requires_grad_() for t in (a, b)]
    ref_same = torch.autograd.grad(torch.matmul(*xd), xd, grad_out.cpu().to(dtype))
    for name, x, g, r64, r in zip(("da", "db"), (a, b), got, ref64, ref_same):
        assert g.shape == x.shape and g.dtype == dtype, f"{name}: {g.dtype} {tuple(g.shape)}"
        assert_close(g.cpu(), r64, r, what=name, multiple=GRAD_MULTIPLE)


def test_double_backward():
    """The backward is the op itself, so it is differentiable again (as torch.matmul's is)."""
    def second_order(mm, a, b):
        a, b = (t.detach().requires_grad_() for t in (a, b))
        da, db = torch.autograd.grad(mm(a, b), (a, b), grad_out, create_graph=True)
        return torch.autograd.grad((da * wa).sum() + (db * wb).sum(), (a, b))

    a, b = _operands(2, 5, 4, 3, torch.float64)
    grad_out, wa, wb = _randn(2, 5, 3, seed=5), _randn(2, 5, 4, seed=6), _randn(2, 4, 3, seed=7)
    grad_out, wa, wb = (t.double() for t in (grad_out, wa, wb))
    for got, ref in zip(second_order(mt.matmul_triton, a, b), second_order(torch.matmul, a, b)):
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)


def test_only_needed_gradients():
    a, b = _operands(2, 7, 6, 5, torch.float32)
    b.requires_grad_()
    (db,) = torch.autograd.grad(mt.matmul_triton(a, b).sum(), (b,))
    assert_close(db.cpu(), a.cpu().double().transpose(1, 2).sum(2, keepdim=True).expand(2, 6, 5),
                 a.cpu().transpose(1, 2).sum(2, keepdim=True).expand(2, 6, 5), what="db")


@pytest.mark.parametrize("layout", ["contiguous", "both_t", "b_bcast"])
def test_opcheck(layout):
    a, b = (t.requires_grad_() for t in _operands(2, 7, 9, 5, torch.float32, layout))
    torch.library.opcheck(torch.ops.performer.triton_matmul.default, (a, b))


def test_torch_compile_fullgraph_matches_eager():
    a, b = (t.requires_grad_() for t in _operands(2, 7, 9, 5, torch.float32, "a_t"))
    grad_out = _randn(2, 7, 5, seed=3)

    def f(a, b):
        # Only the op: an elementwise epilogue would cost a C++ compile on the CPU (~20 s).
        return mt.matmul_triton(a, b)

    def run(fn):
        out = fn(a, b)
        return (out, *torch.autograd.grad(out, (a, b), grad_out))

    compiled = run(torch.compile(f, fullgraph=True))
    eager = run(f)
    for name, c, e in zip(("out", "da", "db"), compiled, eager):
        # Compiled, Inductor autotunes its own copy of the kernel: another tile shape may sum
        # in another order.
        torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_rejects_bad_inputs():
    a, b = _operands(2, 3, 4, 5, torch.float32)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        mt.matmul_triton(a, b.double())
    with pytest.raises(RuntimeError, match="batch sizes differ"):
        mt.matmul_triton(a, b[:1])
    with pytest.raises(RuntimeError, match=r"\(B, M, 4\) but b is \(B, 3, N\)"):
        mt.matmul_triton(a, b[:, :3])
    with pytest.raises(RuntimeError, match="3-D"):
        mt.matmul_triton(a[0], b[0])
    with pytest.raises(TypeError, match="does not support dtype"):
        mt.matmul_triton(a.to(torch.int32), b.to(torch.int32))
    if torch.bfloat16 not in mt.SUPPORTED_DTYPES:   # the op itself refuses it too
        with pytest.raises(RuntimeError, match="unsupported dtype"):
            torch.ops.performer.triton_matmul(a.bfloat16(), b.bfloat16())


def test_reports_availability():
    assert mt.unavailable_reason() is None
    assert set(mt.SUPPORTED_DTYPES) >= {torch.float16, torch.float32}
    assert DEVICE in mt.DEVICES


# A process runs either the subprocess test above or every other test, never both.
for _name in [n for n in globals() if n.startswith("test_")]:
    if (_name == "test_in_triton_interpreter_subprocess") != RUN_IN_CHILD:
        del globals()[_name]

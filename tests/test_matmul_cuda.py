"""The CUDA kernels of blocked_matmul (csrc/cuda/matmul.cu) against the float64 reference: every
dtype, odd sizes in every dimension (edge tiles), operands that are not 16-byte aligned, transposed,
strided and broadcast layouts, several tiles and pipeline stages along K, gradients, opcheck and
torch.compile. Runs only where CUDA is available and the extension was built with CUDA kernels."""
import itertools

import pytest
import torch

import performer
from performer.ops.matmul.cpp import cuda_reason
from performer.ops.matmul.reference import matmul_reference
from conftest import DTYPES, assert_close, dtype_id

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available", allow_module_level=True)
if cuda_reason() is not None:
    pytest.skip(f"no CUDA kernels: {cuda_reason()}", allow_module_level=True)

SIZES = (1, 7, 33, 130)


def randn(*shape, dtype=torch.float32, seed=0):
    """Standard normal values drawn in float64 on the CPU (the same in every dtype), cast, on CUDA."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).cuda()


def check_product(a, b, multiple=4.0):
    got = performer.blocked_matmul(a, b, backend="cpp")
    assert got.device.type == "cuda" and got.dtype == a.dtype
    torch.cuda.synchronize()
    # Reference on the CPU: a float64 product there has no TF32 or reduced-precision path.
    a_cpu, b_cpu = a.cpu(), b.cpu()
    assert_close(got.cpu(), matmul_reference(a_cpu, b_cpu), matmul_reference(a_cpu, b_cpu, a.dtype),
                 multiple=multiple)
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("M,K,N", list(itertools.product(SIZES, repeat=3)))
def test_odd_sizes(M, K, N, dtype):
    check_product(randn(M, K, dtype=dtype, seed=1), randn(K, N, dtype=dtype, seed=2))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("B,M,K,N", [(1, 256, 512, 384), (2, 300, 600, 1100), (1, 97, 1030, 65), (3, 1030, 70, 300),
                                     (1, 1024, 1024, 1024)])
def test_multiple_tiles(B, M, K, N, dtype):
    """Several 128x128 output tiles, K longer than the pipeline's stages, partial edges."""
    check_product(randn(B, M, K, dtype=dtype, seed=3), randn(B, K, N, dtype=dtype, seed=4))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout_a,layout_b", list(itertools.product(("row", "col", "strided", "offset"), repeat=2)))
def test_layouts(layout_a, layout_b, dtype):
    """Row- and column-major operands read in place; strided ones and ones whose start is not
    16-byte aligned (a view one element in) take the kernels' other paths."""
    def make(rows, cols, layout, seed):
        if layout == "row":
            return randn(3, rows, cols, dtype=dtype, seed=seed)
        if layout == "col":
            return randn(3, cols, rows, dtype=dtype, seed=seed).transpose(1, 2)
        if layout == "offset":
            return randn(3, rows, cols + 1, dtype=dtype, seed=seed)[:, :, 1:]
        return randn(3, rows * 2, cols * 3, dtype=dtype, seed=seed)[:, ::2, ::3]
    check_product(make(145, 70, layout_a, 5), make(70, 137, layout_b, 6))


@pytest.mark.parametrize("shape_a,shape_b", [((2, 3, 5, 40), (40, 4)), ((5, 40), (2, 3, 40, 4)),
                                             ((2, 1, 5, 40), (1, 3, 40, 4)), ((40,), (40, 9)), ((9, 40), (40,))])
def test_broadcast_and_vectors(shape_a, shape_b):
    a, b = randn(*shape_a, seed=7), randn(*shape_b, seed=8)
    assert check_product(a, b).shape == torch.matmul(a, b).shape


@pytest.mark.parametrize("shape_a,shape_b,expected", [((0, 5), (5, 3), (0, 3)), ((4, 0), (0, 3), (4, 3)),
                                                      ((4, 5), (5, 0), (4, 0))])
def test_empty_sizes(shape_a, shape_b, expected):
    got = performer.blocked_matmul(torch.ones(shape_a, device="cuda"), torch.ones(shape_b, device="cuda"))
    assert got.shape == expected and (got == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gradients(dtype):
    a = randn(2, 33, 70, dtype=dtype, seed=12).requires_grad_()
    b = randn(70, 9, dtype=dtype, seed=13).requires_grad_()
    out = performer.blocked_matmul(a, b)
    go = randn(*out.shape, seed=14, dtype=torch.float64)
    grads = torch.autograd.grad(out, (a, b), go.to(dtype))
    a64, b64 = (t.detach().cpu().double().requires_grad_() for t in (a, b))
    ref = torch.autograd.grad(torch.matmul(a64, b64), (a64, b64), go.cpu())
    a_dt, b_dt = (t.detach().cpu().requires_grad_() for t in (a, b))
    ref_dt = torch.autograd.grad(torch.matmul(a_dt, b_dt), (a_dt, b_dt), go.cpu().to(dtype))
    for name, g, r, rd in zip(("grad_a", "grad_b"), grads, ref, ref_dt):
        assert_close(g.cpu(), r, rd, name, multiple=10.0)


def test_gradcheck_float64():
    a = randn(2, 6, 9, dtype=torch.float64, seed=15).requires_grad_()
    b = randn(9, 5, dtype=torch.float64, seed=16).requires_grad_()
    assert torch.autograd.gradcheck(performer.blocked_matmul, (a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_opcheck(dtype):
    samples = [(randn(2, 7, 33, dtype=dtype), randn(2, 33, 5, dtype=dtype, seed=1)),
               (randn(1, 40, 9, dtype=dtype).transpose(1, 2), randn(3, 40, dtype=dtype, seed=1).t().unsqueeze(0))]
    for a, b in samples:
        torch.library.opcheck(torch.ops.performer.blocked_matmul, (a.requires_grad_(), b.requires_grad_()))


def test_compile_fullgraph():
    a, b = randn(4, 30, 20).requires_grad_(), randn(20, 10, seed=1).requires_grad_()
    fn = torch.compile(lambda x, y: performer.blocked_matmul(x, y).relu().sum(), fullgraph=True)
    loss = fn(a, b)
    ga, gb = torch.autograd.grad(loss, (a, b))
    a2, b2 = (t.detach().requires_grad_() for t in (a, b))
    ref = performer.blocked_matmul(a2, b2).relu().sum()
    torch.testing.assert_close(loss, ref)
    for g, r in zip((ga, gb), torch.autograd.grad(ref, (a2, b2))):
        torch.testing.assert_close(g, r)


def test_cpu_and_cuda_operands_are_refused():
    with pytest.raises(ValueError, match="b must be on the same device as a"):
        performer.blocked_matmul(randn(3, 4), torch.ones(4, 2))

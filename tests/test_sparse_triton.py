"""The Triton block-sparse ops (performer.ops.sparse.triton), float and int8 in both modes, against
the references and the C++ ops: values (blocks narrower than 16 inputs and wider, odd sizes, empty
block rows, strided inputs, bias), gradients, opcheck, torch.compile.

Without a CUDA device the kernels run under the Triton interpreter, in a subprocess (see
tests/test_matmul_triton.py): the only test collected in this process reruns the file there."""
import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from performer.ops.sparse import block_sparse_linear, block_sparse_linear_int8, pack_blocks  # noqa: E402
from performer.ops.sparse import triton as st  # noqa: E402
from performer.ops.sparse.reference import (block_sparse_linear_int8_reference,  # noqa: E402
                                            block_sparse_linear_reference)

from conftest import TRITON_CHILD_ENV, assert_close, dtype_id, run_in_triton_interpreter  # noqa: E402
from test_int8 import packed_int8  # noqa: E402
from test_sparse import randn, sparse_weight  # noqa: E402

RUN_IN_CHILD = (st.unavailable_reason() is not None and not st.INTERPRET and not torch.cuda.is_available()
                and not os.environ.get(TRITON_CHILD_ENV))
if st.unavailable_reason() is not None and not RUN_IN_CHILD:
    pytest.skip(f"triton block-sparse ops cannot run here: {st.unavailable_reason()}", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def test_in_triton_interpreter_subprocess():
    run_in_triton_interpreter(__file__)


DEVICE = "cpu" if st.INTERPRET else "cuda"
DTYPES = [d for d in (torch.float32, torch.float16, torch.bfloat16) if d in st.SUPPORTED_DTYPES]
BLOCKS = ((16, 4), (32, 16), (16, 32), (64, 8))
SHAPES = ((1, 50, 70), (19, 40, 33), (40, 96, 130))   # (M, N, K)


def _dev(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_float_values(M, N, K, block, dtype):
    w, _ = sparse_weight(N, K, block, 0.5, dtype, seed=M)
    packed = pack_blocks(w, block)
    x, bias = randn(M, K, dtype=dtype, seed=1), randn(N, dtype=dtype, seed=2)
    got = block_sparse_linear(*_dev(x, *packed, bias), N, backend="triton")
    assert got.dtype == dtype and got.device.type == DEVICE
    ref64 = block_sparse_linear_reference(x, *packed, bias, N)
    assert_close(got.cpu(), ref64, block_sparse_linear_reference(x, *packed, bias, N, dtype=dtype))


@pytest.mark.parametrize("mode", ("dynamic", "weight_only"))
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_int8_values(M, N, K, block, mode):
    """Dynamic: the same integer sums as the C++ kernels (rtol 1e-5 for the float32 scaling);
    weight-only: the float64 product within float32's error."""
    packed, scales, col_sums, _ = packed_int8(N, K, block, 0.5, seed=M)
    cs = col_sums if mode == "dynamic" else None
    x, bias = randn(M, K, seed=3) * 3, randn(N, seed=4)
    got = block_sparse_linear_int8(*_dev(x, packed.values, scales, cs, packed.block_cols, packed.row_ptr, bias), N,
                                   backend="triton").cpu()
    ref = block_sparse_linear_int8_reference(x.double(), packed.values, scales, cs, packed.block_cols,
                                             packed.row_ptr, bias.double(), N)
    err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
    assert err <= (1e-5 if mode == "dynamic" else 4 * K * 2.0 ** -24), err


@pytest.mark.parametrize("mode", ("dynamic", "weight_only"))
def test_int8_half_input(mode):
    packed, scales, col_sums, _ = packed_int8(32, 48, (16, 16), 1.0, seed=5)
    x = randn(7, 48, seed=6)
    got = block_sparse_linear_int8(*_dev(x.half(), packed.values, scales, col_sums if mode == "dynamic" else None,
                                         packed.block_cols, packed.row_ptr, None), 32, backend="triton")
    assert got.dtype == torch.float16
    ref = block_sparse_linear_int8_reference(x.half().float(), packed.values, scales,
                                             col_sums if mode == "dynamic" else None, packed.block_cols,
                                             packed.row_ptr, None, 32)
    torch.testing.assert_close(got.cpu().float(), ref, rtol=2e-3, atol=2e-3 * ref.abs().max().item())


def test_empty_panels_strided_input_and_no_blocks():
    block = (16, 8)
    w, keep = sparse_weight(64, 40, block, 0.5, seed=7)
    w[16:32] = 0                                                   # a panel without blocks
    packed = pack_blocks(w, block)
    base = randn(30, 80, seed=8)
    x = base[::2, ::2]                                             # (15, 40), strides (160, 2)
    got = block_sparse_linear(*_dev(x, *packed, None), 64, backend="triton").cpu()
    torch.testing.assert_close(got, x @ w.t(), rtol=1e-5, atol=1e-5)
    assert (got[:, 16:32] == 0).all()
    empty = pack_blocks(torch.zeros(64, 40), block)
    bias = randn(64, seed=9)
    got = block_sparse_linear(*_dev(x, *empty, bias), 64, backend="triton").cpu()
    torch.testing.assert_close(got, bias.expand(15, 64))


def test_gradients():
    block = (16, 8)
    w, _ = sparse_weight(40, 37, block, 0.5, seed=10)
    packed = pack_blocks(w, block)
    x, bias, g = randn(6, 37, seed=11), randn(40, seed=12), randn(6, 40, seed=13)
    grads = []
    for backend in ("triton", "torch"):
        xv, vv, bv = (t.to(DEVICE).requires_grad_() for t in (x, packed.values, bias))
        y = block_sparse_linear(xv, vv, *_dev(packed.block_cols, packed.row_ptr), bv, 40, backend=backend)
        y.backward(g.to(DEVICE))
        grads.append([t.grad.cpu() for t in (xv, vv, bv)])
    for got, ref in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_opcheck_and_compile():
    packed = pack_blocks(sparse_weight(48, 40, (16, 8), 0.5, seed=14)[0], (16, 8))
    x, bias = randn(5, 40, seed=15).to(DEVICE), randn(48, seed=16).to(DEVICE)
    values, cols, rows = _dev(*packed)
    torch.library.opcheck(torch.ops.performer.triton_block_sparse_linear.default, (x, values, cols, rows, bias, 48))
    pi, scales, col_sums, _ = packed_int8(48, 40, (16, 8), 0.5, seed=17)
    args = _dev(x, pi.values, scales, col_sums, pi.block_cols, pi.row_ptr, bias)
    torch.library.opcheck(torch.ops.performer.triton_block_sparse_linear_int8.default, (*args, 48))

    def f(x):
        return block_sparse_linear(x, values, cols, rows, bias, 48, backend="triton").relu()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


# Here: only the subprocess test when this process cannot run the kernels; only the others when
# it can (the child, or a GPU).
for _name in [n for n in list(globals()) if n.startswith("test_")]:
    if (_name == "test_in_triton_interpreter_subprocess") != RUN_IN_CHILD:
        del globals()[_name]

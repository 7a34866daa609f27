"""The registered ops: opcheck, torch.compile, every CPU ISA copy and the thread count."""

import pytest
import torch

import performer
from conftest import ISAS, KERNELS, SPECS, Spec, assert_close, case_params, dtype_id, make_case, run_on_isa

# torch's own opcheck/compile internals warn about their use of torch.jit.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

OPCHECK_CASES = [p for p in case_params() if p.values[0].id in ("gqa_odd", "transposed", "cross_gqa")]


def _op_args(case, causal, kernel="softmax"):
    scale = case.spec.scale if case.spec.scale is not None else case.spec.E ** -0.5
    return (case.q, case.k, case.v, case.features, None, case.key_padding_mask, scale, causal, kernel)


@pytest.mark.parametrize("kernel", ["softmax", "softmax_normalized"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("spec,masked,causal", OPCHECK_CASES)
def test_opcheck(spec, masked, causal, dtype, kernel):
    case = make_case(spec, dtype, masked=masked, requires_grad=True)
    args = _op_args(case, causal, kernel)
    torch.library.opcheck(torch.ops.performer.favor_forward, args)

    with torch.no_grad():
        out, *stats = torch.ops.performer.favor_forward(*args)  # state, den, query_shift, key_shift
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    q, k, v = (t.detach() for t in case.inputs)
    torch.library.opcheck(torch.ops.performer.favor_backward,
                          (grad_out, q, k, v, *args[3:6], out, *stats, *args[6:], False))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_torch_compile_fullgraph_matches_eager(causal, kernel):
    case = make_case(SPECS[0], torch.float32, masked=True, requires_grad=True)
    grad_out = torch.randn(case.out_shape, generator=torch.Generator().manual_seed(1))

    def run(fn):
        out = fn(*case.inputs, is_causal=causal, features=case.features,
                 key_padding_mask=case.key_padding_mask, kernel=kernel)
        return (out, *torch.autograd.grad(out, case.inputs, grad_out))

    compiled = run(torch.compile(performer.favor_attention, fullgraph=True))
    eager = run(performer.favor_attention)
    for name, c, e in zip(("out", "dq", "dk", "dv"), compiled, eager):
        torch.testing.assert_close(c, e, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")


def test_results_do_not_depend_on_thread_count():
    """Each (batch, key head) item is computed by one thread: results are bitwise identical."""
    case = make_case(SPECS[0], torch.float32, masked=True, requires_grad=True)
    grad_out = torch.randn(case.out_shape, generator=torch.Generator().manual_seed(1))
    results = {}
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            for causal in (False, True):
                out = case.run(causal, "cpp")
                results[n, causal] = (out, *torch.autograd.grad(out, case.inputs, grad_out))
    finally:
        torch.set_num_threads(threads)
    for (n, causal), tensors in results.items():
        for a, b in zip(tensors, results[1, causal]):
            assert torch.equal(a, b), f"{n} threads, causal={causal}"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_sequence_split_when_fewer_items_than_threads(causal, masked, dtype, kernel):
    """One (batch, key head) pair and two threads: the forward splits the sequence (partial
    states reduced, or a two-pass scan when causal). Same result as one thread and as the
    reference, and the saved statistics drive a correct backward."""
    spec = Spec("split", 1, 2, 1, 300, 300 if causal else 230, 16, 9, 20)
    case = make_case(spec, dtype, masked=masked, requires_grad=True)
    grad_out = torch.randn(case.out_shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    threads = torch.get_num_threads()
    try:
        results = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            out = case.run(causal, "cpp", kernel)
            results[n] = (out, *torch.autograd.grad(out, case.inputs, grad_out))
    finally:
        torch.set_num_threads(threads)
    ref = case.reference(causal, kernel)
    ref_grads = torch.autograd.grad(ref, case.inputs, grad_out.double())
    ref_same = case.reference(causal, kernel, dtype=dtype)
    ref_same_grads = torch.autograd.grad(ref_same, case.inputs, grad_out)
    for n, (out, *grads) in results.items():
        assert_close(out, ref, ref_same, f"output, {n} threads")
        for name, g, r, rs in zip(("dq", "dk", "dv"), grads, ref_grads, ref_same_grads):
            assert_close(g, r, rs, f"{name}, {n} threads")


# ---- every ISA copy of the kernels --------------------------------------------------------------

# Forward and backward of a fixed case (crossing the 64-row chunks, GQA, padding with a fully
# masked row) in every mode, and blocked_matmul in every dtype and layout, checked against the float64
# references inside the subprocess.
ISA_SCRIPT = """
import json, torch
from conftest import Spec, assert_close, make_case
spec = Spec("isa", 2, 4, 2, 70, 70, 16, 9, 20)
checked = 0
for dtype in (torch.float32, torch.float64, torch.bfloat16):
    for causal in (False, True):
        for kernel in ("softmax", "relu", "softmax_normalized"):
            case = make_case(spec, dtype, masked=True, requires_grad=True, seed=5)
            go = torch.randn(case.out_shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
            out = case.run(causal, "cpp", kernel)
            got = (out, *torch.autograd.grad(out, case.inputs, go.to(dtype)))
            x64 = [t.detach().double().requires_grad_() for t in case.inputs]
            r64 = case.reference(causal, kernel, q=x64[0], k=x64[1], v=x64[2])
            ref64 = (r64, *torch.autograd.grad(r64, x64, go))
            rdt = case.reference(causal, kernel, dtype=dtype)
            refdt = (rdt, *torch.autograd.grad(rdt, case.inputs, go.to(dtype)))
            for name, a, b, r in zip(("out", "dq", "dk", "dv"), got, ref64, refdt):
                multiple = 10 if dtype == torch.bfloat16 and name != "out" else 4
                assert_close(a, b, r, what=f"{name} {dtype} causal={causal} {kernel}", multiple=multiple)
                checked += 1
import itertools, performer
from performer.ops.matmul.reference import matmul_reference
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    for (M, K, N), ta, tb in itertools.product(((1, 1, 1), (37, 300, 70), (300, 65, 1030)), (False, True), (False, True)):
        g = torch.Generator().manual_seed(M + K + N)
        a = torch.randn(2, K, M, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2) if ta else \
            torch.randn(2, M, K, generator=g, dtype=torch.float64).to(dtype)
        b = torch.randn(2, N, K, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2) if tb else \
            torch.randn(2, K, N, generator=g, dtype=torch.float64).to(dtype)
        assert_close(performer.blocked_matmul(a, b), matmul_reference(a, b), matmul_reference(a, b, dtype),
                     what=f"matmul {dtype} {(M, K, N)} {ta} {tb}")
        checked += 1
print(json.dumps({"isa": torch.ops.performer.cpu_isa(), "checked": checked}))
"""


@pytest.mark.parametrize("isa", ISAS)
def test_every_isa_copy_matches_reference(isa):
    result = run_on_isa(isa, ISA_SCRIPT, OMP_NUM_THREADS="1")
    assert result["isa"] == isa
    assert result["checked"] == 3 * 2 * 3 * 4 + 4 * 3 * 4

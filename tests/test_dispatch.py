"""Backend selection: the default, forcing one, and the error that lists every backend's reason."""
import re

import pytest
import torch

import performer
from performer import _dispatch
from performer._validate import validate_favor
from performer.ops.favor.api import OP
from performer.ops.favor.reference import favor_torch
from conftest import sample_inputs


def _args(device="cpu", dtype=torch.float32, **kwargs):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 4, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    w = torch.randn(6, 4, generator=g).to(device=device, dtype=dtype)
    return validate_favor(q, k, v, None, 0.0, kwargs.get("causal", False), None, w, None,
                          kwargs.get("kernel", "softmax"))


def test_registered_backends_in_order():
    assert [b.name for b in _dispatch.backends(OP)] == ["cpp", "triton", "torch"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_default_is_cpp_on_cpu(dtype):
    assert _dispatch.select(OP, _args(dtype=dtype)).name == "cpp"


@pytest.mark.parametrize("causal", [False, True])
def test_default_runs_cpp(causal):
    for case in sample_inputs(torch.float32, causal=causal):
        assert torch.equal(case.run(causal), case.run(causal, "cpp")), case.id


@pytest.mark.parametrize("causal", [False, True])
def test_forced_torch_backend_runs_favor_torch(causal):
    args = _args(causal=causal)
    assert _dispatch.select(OP, args, "torch").name == "torch"
    q, k, v = args.q, args.k, args.v
    out = performer.favor_attention(q, k, v, is_causal=causal, features=args.features, backend="torch")
    expected = favor_torch(q, k, v, args.features, None, args.scale, causal, "softmax")
    assert torch.equal(out, expected)


def test_no_backend_fits_lists_every_backend():
    with pytest.raises(ValueError, match="no backend of favor_attention supports these inputs") as info:
        _dispatch.select(OP, _args("meta"))
    message = str(info.value)
    assert "(meta, float32)" in message
    # Backends for other devices say so, whether they are defaults or opt-in.
    assert "cpp: runs on cpu/cuda, not meta" in message
    assert "torch: runs on cpu/cuda/mps/xpu, not meta" in message
    assert "triton: " in message


def test_torch_backend_is_the_default_on_gpus():
    """The Triton kernels are opt-in: the plain-PyTorch backend serves GPUs by default, never the
    CPU (where a missing extension must not fall back silently)."""
    class GpuArgs:
        device, dtype = torch.device("cuda"), torch.float32
    assert _dispatch.select(OP, GpuArgs()).name == "torch"
    torch_backend = next(b for b in _dispatch.backends(OP) if b.name == "torch")
    assert not torch_backend.is_default_for("cpu")


def test_gpu_kernels_decline_the_normalized_kernel():
    """The CUDA and Triton kernels implement softmax and relu: with kernel="softmax_normalized" the
    Triton backend declines and names why, and so does the compiled ops' check on CUDA tensors (the
    same gpu_kernel_reason, behind cpp.cuda_reason; the CUDA op itself refuses the kernel too, see
    the SIMT test); the torch backend, the default on GPUs, runs it."""
    from performer.ops.favor import opdef, triton
    reason = "kernel 'softmax_normalized' has no GPU kernel (the torch backend runs it)"
    assert triton.decline_reason(_args(kernel="softmax_normalized")) == reason
    assert triton.decline_reason(_args()) is None
    assert opdef.gpu_kernel_reason("softmax_normalized") == reason
    assert opdef.gpu_kernel_reason("softmax") is None and opdef.gpu_kernel_reason("relu") is None


def test_favor_attention_on_meta_reports_backends():
    args = _args("meta")
    with pytest.raises(ValueError, match=re.escape("cpp: runs on cpu/cuda, not meta")):
        performer.favor_attention(args.q, args.k, args.v, features=args.features)


@pytest.mark.parametrize("backend,reason", [("cpp", "runs on cpu/cuda, not meta"),
                                            ("torch", "runs on cpu/cuda/mps/xpu, not meta")])
def test_forced_backend_applies_the_same_checks(backend, reason):
    with pytest.raises(ValueError, match=re.escape(f"backend={backend!r} cannot run favor_attention here: {reason}")):
        _dispatch.select(OP, _args("meta"), backend)


def test_every_decline_reason_is_reported(monkeypatch):
    """A fake registry: unavailable, wrong device, wrong dtype, declined by its own check, opt-in."""
    def backend(name, **kw):
        return _dispatch.Backend(name=name, devices=kw.pop("devices", ("cpu",)),
                                 dtypes=kw.pop("dtypes", (torch.float32,)), run=lambda a: None, **kw)
    monkeypatch.setitem(_dispatch._REGISTRY, "fake_op", [
        backend("missing", available=lambda: "not built"),
        backend("gpu_only", devices=("cuda",)),
        backend("f64_only", dtypes=(torch.float64,)),
        backend("picky", check=lambda a: "head dim 4 is too small"),
        backend("opt_in", default=False),
        backend("gpu_default", default=("cuda",)),
        backend("gpu_opt_in", devices=("cuda",), default=False),
    ])
    with pytest.raises(ValueError) as info:
        _dispatch.select("fake_op", _args())
    assert str(info.value).splitlines()[1:] == [
        "  missing: not built",
        "  gpu_only: runs on cuda, not cpu",
        "  f64_only: does not support dtype float32",
        "  picky: head dim 4 is too small",
        "  opt_in: only when asked for with backend='opt_in'",
        "  gpu_default: only when asked for with backend='gpu_default' (by default on cuda)",
        "  gpu_opt_in: runs on cuda, not cpu",
    ]
    assert _dispatch.select("fake_op", _args(), "opt_in").name == "opt_in"
    with pytest.raises(ValueError, match=re.escape("backend='picky' cannot run fake_op here: head dim 4 is too small")):
        _dispatch.select("fake_op", _args(), "picky")

"""The Triton FAVOR+ backend (performer/ops/favor/triton.py) against the float64 dense reference:
values and gradients for every sample spec (GQA, odd sizes, chunk boundaries, masks, layouts),
both kernels and both modes; no causal leak; finite results for huge logits; fully masked rows;
its statistics against the C++ op's; opcheck; torch.compile; dispatch.

Without a CUDA device the kernels run under the Triton interpreter on the CPU (float32 and
float16; small shapes, 16-row chunks so that they still cross chunk boundaries). As in
test_matmul_triton.py, TRITON_INTERPRET must be set before performer is imported, so where this
process cannot run the kernels the only test collected reruns this file in a subprocess with it set.
"""
import os

import pytest
import torch

import performer
from performer import _dispatch
from performer.ops.favor import triton as ft
from performer.ops.favor.api import OP
from conftest import (ERROR_MULTIPLE, GPU_KERNELS, SPECS, TRITON_CHILD_ENV, Spec, assert_close, case_params, dtype_id,
                      make_case, run_in_triton_interpreter)

RUN_IN_CHILD = (ft.unavailable_reason() is not None and not ft.INTERPRET and not torch.cuda.is_available()
                and not os.environ.get(TRITON_CHILD_ENV))
if ft.unavailable_reason() is not None and not RUN_IN_CHILD:
    pytest.skip(f"triton FAVOR+ cannot run here: {ft.unavailable_reason()}", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed")

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def test_in_triton_interpreter_subprocess():
    run_in_triton_interpreter(__file__)


DEVICE = "cpu" if ft.INTERPRET else "cuda"
DTYPES = [d for d in (torch.float32, torch.float16, torch.bfloat16) if d in ft.SUPPORTED_DTYPES]
# As in test_favor_grads.py: the backward reads the output as saved in the 16-bit dtype.
GRAD_MULTIPLE = {torch.float16: 10.0, torch.bfloat16: 10.0}


def _to_device(*tensors):
    """Copies on DEVICE with the same strides (transposed layouts stay transposed)."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        d = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=DEVICE)
        d.copy_(t.detach())
        out.append(d.requires_grad_(t.requires_grad))
    return out


def _run(case, causal, kernel, inputs=None):
    q, k, v, w, mask = _to_device(*(inputs or case.inputs), case.features, case.key_padding_mask)
    out = performer.favor_attention(q, k, v, is_causal=causal, scale=case.spec.scale, features=w,
                                    key_padding_mask=mask, kernel=kernel, backend="triton")
    assert out.device.type == DEVICE
    return out, (q, k, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kernel", GPU_KERNELS)
@pytest.mark.parametrize("spec,masked,causal", case_params())
def test_values_and_grads_match_dense_reference(spec, masked, causal, kernel, dtype):
    case = make_case(spec, dtype, masked=masked, requires_grad=True)
    reason = ft.decline_reason(performer._validate.validate_favor(*case.inputs, None, 0.0, causal, spec.scale,
                                                                  case.features, case.key_padding_mask, kernel))
    if reason:
        pytest.skip(f"declined by the backend: {reason}")
    out, inputs = _run(case, causal, kernel)
    assert out.dtype == dtype and out.shape == case.out_shape
    x64 = [t.detach().double().requires_grad_() for t in case.inputs]
    ref64 = case.reference(causal, kernel, q=x64[0], k=x64[1], v=x64[2])
    ref_dtype = case.reference(causal, kernel, dtype=dtype)
    assert_close(out.cpu(), ref64, ref_dtype)

    grad_out = torch.randn(case.out_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad(out, inputs, grad_out.to(dtype).to(DEVICE))
    want64 = torch.autograd.grad(ref64, x64, grad_out)
    want_dtype = torch.autograd.grad(ref_dtype, case.inputs, grad_out.to(dtype))
    for name, x, a, b, r in zip("qkv", case.inputs, got, want64, want_dtype):
        assert a.dtype == dtype and a.shape == x.shape, f"d{name}: {a.dtype} {tuple(a.shape)}"
        assert_close(a.cpu(), b, r, what=f"d{name}", multiple=GRAD_MULTIPLE.get(dtype, ERROR_MULTIPLE))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kernel", GPU_KERNELS)
def test_statistics_match_the_cpp_op(causal, kernel):
    """The forward's saved statistics mean the same as the C++ op's: out, the final state, the key
    shifts, and each query's normalizer up to its own shift (den * e^shift: the shift itself depends
    on the chunk size in causal mode)."""
    if performer._C_loader.unavailable_reason() is not None:
        pytest.skip("the C++ extension is not built")
    spec = next(s for s in SPECS if s.id == "gqa_odd")
    case = make_case(spec, torch.float32, masked=True)
    args = (case.q, case.k, case.v, case.features, case.key_padding_mask, spec.E ** -0.5, causal, kernel)
    out, state, den, qshift, kshift = torch.ops.performer.favor_forward(*args[:4], None, *args[4:])
    got = [t.cpu() for t in torch.ops.performer.triton_favor_forward(*_to_device(*args[:4]), None,
                                                                     *_to_device(args[4]), *args[5:])]
    assert torch.equal(got[2] > 0, den > 0), "den: zero in other places"
    log_den = [torch.where(d > 0, d.clamp_min(1e-30).log() + s, 0.0) for d, s in ((got[2], got[3]), (den, qshift))]
    for name, g, w in (("out", got[0], out), ("state", got[1], state), ("log den + query_shift", *log_den),
                       ("key_shift", got[4], kshift)):
        finite = torch.isfinite(w)
        assert torch.equal(torch.isfinite(g), finite), f"{name}: infinite in other places"
        torch.testing.assert_close(g[finite], w[finite], rtol=2e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kernel", GPU_KERNELS)
def test_no_causal_leak(kernel):
    """Huge changes after position t leave outputs and gradients up to t as they were (to rounding)."""
    spec = Spec("leak", 1, 2, 1, 50, 50, 8, 8, 16)
    case = make_case(spec, torch.float32)
    t = 21
    bumped = [x.clone() for x in case.inputs]
    for x in bumped:
        x[:, :, t + 1:] = 30.0 * torch.randn(x[:, :, t + 1:].shape, generator=torch.Generator().manual_seed(5))
    base, _ = _run(case, True, kernel)
    moved, _ = _run(case, True, kernel, bumped)
    err = (moved[:, :, :t + 1] - base[:, :, :t + 1]).abs().max().item()
    assert err <= 1e-6 * max(1.0, base.abs().max().item()), f"outputs up to t={t} moved by {err:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_huge_logits_stay_finite(causal, dtype):
    """Logits scale * q.k up to about 1e4: finite outputs and gradients."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 40, 16, generator=g) for _ in range(3))
    q, k = q * 50.0, k * 50.0
    w = performer.orthogonal_features(32, 16, generator=g)
    q, k, v, w = (x.to(dtype) for x in (q, k, v, w))
    q, k, v, w = _to_device(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), w)
    out = performer.favor_attention(q, k, v, is_causal=causal, features=w, backend="triton")
    assert torch.isfinite(out).all()
    for name, grad in zip("qkv", torch.autograd.grad(out, (q, k, v), torch.ones_like(out))):
        assert torch.isfinite(grad).all(), f"d{name} not finite"


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_huge_logits_with_a_feature_map_stay_finite(causal):
    """FAVOR++ with rescaling and centering (frozen for causal) at logits up to about 1e4: finite
    outputs and gradients, including those of the per-head features and bias."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 40, 16, generator=g) for _ in range(3))
    q, k = q * 50.0, k * 50.0
    w = performer.orthogonal_features(32, 16, generator=g)
    fmap = performer.FeatureMap().freeze(q, k)
    p = fmap(q, k, w, 16 ** -0.5, causal)
    x = _to_device(p.query.requires_grad_(), p.key.requires_grad_(), v.requires_grad_(),
                   p.features.detach().requires_grad_(), p.feature_bias.detach().requires_grad_())
    out = performer.favor_attention(*x[:3], is_causal=causal, scale=1.0, features=x[3], feature_bias=x[4],
                                    backend="triton")
    assert torch.isfinite(out).all()
    grads = torch.autograd.grad(out, x, torch.ones_like(out))
    for name, grad in zip(("dq", "dk", "dv", "dfeatures", "dbias"), grads):
        assert torch.isfinite(grad).all(), f"{name} not finite"


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_fully_masked_rows_are_zero_with_finite_grads(causal):
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(3, 2, 40, 8, generator=g) for _ in range(3))
    mask = torch.zeros(3, 40, dtype=torch.bool)
    mask[0] = True
    mask[2, :35] = True
    q, k, v, w, mask = _to_device(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(),
                                  performer.orthogonal_features(16, 8, generator=g), mask)
    out = performer.favor_attention(q, k, v, is_causal=causal, features=w, key_padding_mask=mask, backend="triton")
    assert (out[0] == 0).all()
    if causal:
        assert (out[2, :, :35] == 0).all() and (out[2, :, 35:] != 0).any()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert all(torch.isfinite(x).all() for x in (dq, dk, dv))
    assert (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()


def test_causal_backward_finite_past_the_last_chunk():
    """A key logit of 105 (a key along a long feature) in a sequence that ends inside a 16-row
    chunk: the rows past the end must not turn the gradients into NaN (e^105 overflows float32)."""
    g = torch.Generator().manual_seed(12)
    E, m, L = 16, 16, 17
    scale = E ** -0.5
    w = performer.orthogonal_features(m, E, generator=g)
    w[0] *= 14.5 / w[0].norm()                       # |W_0|^2 / 2 = 105
    q, k, v = (torch.randn(1, 2, L, E, generator=g) for _ in range(3))
    k[:, :, 3] = w[0] / scale ** 0.5                 # its logit: |W_0|^2 / 2
    x = _to_device(q.requires_grad_(), k.requires_grad_(), v.requires_grad_())
    out = performer.favor_attention(*x, is_causal=True, scale=scale, features=_to_device(w)[0], backend="triton")
    x64 = [t.detach().double().requires_grad_() for t in x]
    ref = performer.favor_attention(*x64, is_causal=True, scale=scale, features=_to_device(w.double())[0],
                                    backend="torch")
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEVICE)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *torch.autograd.grad(out, x, go.float())),
                          (ref, *torch.autograd.grad(ref, x64, go))):
        assert torch.isfinite(a).all(), f"{name} not finite"
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err < 1e-4, f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_strided_key_padding_mask(causal):
    """A (batch, S) mask that is a transposed (S, batch) tensor means what its values say."""
    case = make_case(next(s for s in SPECS if s.id == "gqa_odd"), torch.float32, masked=True)
    strided = case.key_padding_mask.t().contiguous().t()
    assert not strided.is_contiguous()
    q, k, v, w, mask, strided = _to_device(case.q, case.k, case.v, case.features, case.key_padding_mask, strided)
    outs = [performer.favor_attention(q, k, v, is_causal=causal, features=w, key_padding_mask=m_, backend="triton")
            for m_ in (mask, strided)]
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


@pytest.mark.parametrize("biased", [False, True], ids=["plain", "per_head_bias"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_opcheck(causal, biased):
    case = make_case(next(s for s in SPECS if s.id == "gqa_odd"), torch.float32, masked=True)
    w, bias = case.features, None
    if biased:  # per key head, trainable, with a bias
        g = torch.Generator().manual_seed(3)
        w = torch.randn(case.k.shape[1], *w.shape, generator=g).requires_grad_()
        bias = (0.3 * torch.randn(w.shape[:-1], generator=g)).requires_grad_()
    q, k, v, w, bias, mask = _to_device(case.q.requires_grad_(), case.k.requires_grad_(), case.v.requires_grad_(),
                                        w, bias, case.key_padding_mask)
    args = (q, k, v, w, bias, mask, 0.3, causal, "softmax")
    torch.library.opcheck(torch.ops.performer.triton_favor_forward.default, args)
    out, *stats = (t.detach() for t in torch.ops.performer.triton_favor_forward(*args))
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    detached = [t.detach() if t is not None else None for t in (q, k, v, w, bias)]
    torch.library.opcheck(torch.ops.performer.triton_favor_backward.default,
                          (grad_out, *detached, mask, out, *stats, 0.3, causal, "softmax", biased))


# (layout of the features, kernel): per batch element and key head with the softmax kernel, per
# key head with relu (both with a bias); GQA, odd sizes, 37 rows (three 16-row chunks), 20 features
# (two 16-feature blocks under the interpreter), a padding mask.
FEATURE_SETS = [("per_batch_head", "softmax"), ("per_head", "relu")]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("layout,kernel", FEATURE_SETS, ids=[f"{a}-{b}" for a, b in FEATURE_SETS])
def test_per_head_features_bias_and_their_grads(layout, kernel, causal, dtype):
    """Outputs and the gradients with respect to q, k, v, the features and the bias against the
    float64 dense reference (relative error of each whole tensor)."""
    from performer.ops.favor.reference import favor_dense
    g = torch.Generator().manual_seed(7)
    B, H, Hk, L, E, Ev, m = 2, 4, 2, 37, 7, 5, 20
    lead = (B, Hk) if layout == "per_batch_head" else (Hk,)
    q = torch.randn(B, H, L, E, generator=g, dtype=torch.float64)
    k, v = torch.randn(B, Hk, L, E, generator=g, dtype=torch.float64), torch.randn(B, Hk, L, Ev, generator=g,
                                                                                  dtype=torch.float64)
    w = torch.randn(*lead, m, E, generator=g, dtype=torch.float64)
    bias = 0.3 * torch.randn(*lead, m, generator=g, dtype=torch.float64)
    mask = torch.rand(B, L, generator=g) < 0.2
    x = [t.to(dtype).to(DEVICE).requires_grad_() for t in (q, k, v)] + \
        [t.float().to(DEVICE).requires_grad_() for t in (w, bias)]
    out = performer.favor_attention(*x[:3], is_causal=causal, features=x[3], feature_bias=x[4],
                                    key_padding_mask=mask.to(DEVICE), kernel=kernel, backend="triton")
    x64 = [t.detach().cpu().double().requires_grad_() for t in x]
    w4 = x64[3] if layout == "per_batch_head" else x64[3][None]
    b3 = x64[4] if layout == "per_batch_head" else x64[4][None]
    ref = favor_dense(*x64[:3], w4, mask, E ** -0.5, causal, kernel, b3)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, x, go.to(dtype).to(DEVICE))
    want = torch.autograd.grad(ref, x64, go)
    tol = TOLERANCE[dtype] * (1 if dtype == torch.float32 else 3)
    for name, a, b in [("out", out, ref)] + list(zip(("dq", "dk", "dv", "dfeatures", "dbias"), got, want)):
        err = ((a.detach().cpu().double() - b).norm() / b.norm()).item()
        assert err < tol, f"{name}: relative error {err:.3g} >= {tol}"


def test_feature_map_runs_on_triton():
    """A FAVOR++ feature map (rescaling, centered keys; bidirectional statistics and frozen causal
    ones) gives the torch backend's result."""
    g = torch.Generator().manual_seed(8)
    q, k, v = (0.5 * torch.randn(2, 2, 40, 16, generator=g) for _ in range(3))
    w = performer.orthogonal_features(32, 16, generator=g)
    fmap = performer.FeatureMap()
    frozen = performer.FeatureMap().freeze(q, k)
    for causal, m in ((False, fmap), (True, frozen)):
        want = performer.favor_attention(q, k, v, is_causal=causal, features=w, feature_map=m, backend="torch")
        got = performer.favor_attention(*_to_device(q, k, v), is_causal=causal, features=w.to(DEVICE),
                                        feature_map=m.to(DEVICE), backend="triton")
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)


def test_compile_fullgraph_matches_eager():
    case = make_case(next(s for s in SPECS if s.id == "gqa_odd"), torch.float32, requires_grad=True)
    q, k, v, w = _to_device(*case.inputs, case.features)

    def f(q, k, v):
        return performer.favor_attention(q, k, v, is_causal=True, features=w, backend="triton")

    def run(fn):
        out = fn(q, k, v)
        return (out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))

    for name, c, e in zip(("out", "dq", "dk", "dv"), run(torch.compile(f, fullgraph=True)), run(f)):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_dispatch():
    case = make_case(SPECS[0], torch.float32)
    q, k, v, w = _to_device(*case.inputs, case.features)
    args = performer._validate.validate_favor(q, k, v, None, 0.0, False, None, w, None, "softmax")
    # Only when asked for: "cpp" on the CPU, "torch" on GPUs by default.
    assert _dispatch.select(OP, args).name == ("torch" if DEVICE == "cuda" else "cpp")
    wide = performer._validate.validate_favor(*_to_device(torch.ones(1, 1, 4, 300), torch.ones(1, 1, 4, 300),
                                                          torch.ones(1, 1, 4, 8)),
                                              None, 0.0, False, None, _to_device(torch.ones(8, 300))[0], None,
                                              "softmax")
    with pytest.raises(ValueError, match="head sizes up to 256"):
        _dispatch.select(OP, wide, "triton")


def _against_torch_backend(E, m, causal, dtype, L, tol):
    """Values and gradients against the plain-PyTorch backend in float64, relative error below tol."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 4, L, E, generator=g, dtype=torch.float64) for _ in range(3))
    w = performer.orthogonal_features(m, E, generator=g, dtype=torch.float64)
    x = [t.to(dtype).to(DEVICE).requires_grad_() for t in (q, k, v)]
    out = performer.favor_attention(*x, is_causal=causal, features=w.to(dtype).to(DEVICE), backend="triton")
    x64 = [t.detach().double().requires_grad_() for t in x]
    ref = performer.favor_attention(*x64, is_causal=causal, features=w.to(dtype).double().to(DEVICE), backend="torch")
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEVICE)
    pairs = [("out", out, ref)] + list(zip(("dq", "dk", "dv"), torch.autograd.grad(out, x, go.to(dtype)),
                                           torch.autograd.grad(ref, x64, go)))
    for name, a, b in pairs:
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err < tol, f"{name}: relative error {err:.3g} >= {tol}"


TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("E,m,causal", [(E, m, c) for E, m in ((64, 128), (64, 64), (32, 128), (16, 128))
                                        for c in (False, True)]
                         + [(E, m, c) for E, m in ((64, 256), (128, 256), (256, 256), (96, 200))
                            for c in (False, True)])
def test_full_size_tiles_match_torch_backend(E, m, causal, dtype):
    """Compiled tiles at the sizes of the benchmarks and the largest heads (several feature blocks)
    over many chunks and sequence segments."""
    _against_torch_backend(E, m, causal, dtype, 1000, TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_wide_heads(causal, dtype):
    """Heads over 64 (E = Ev = 80) over several feature blocks."""
    _against_torch_backend(80, 40, causal, dtype, 20, TOLERANCE[dtype])


# A process runs either the subprocess test above or every other test, never both; full-size tiles
# only compiled (far too slow in the interpreter).
for _name in [n for n in globals() if n.startswith("test_")]:
    if (_name == "test_in_triton_interpreter_subprocess") != RUN_IN_CHILD or (
            _name == "test_full_size_tiles_match_torch_backend" and DEVICE != "cuda"):
        del globals()[_name]

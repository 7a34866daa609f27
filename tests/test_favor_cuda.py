"""The CUDA kernels of torch.ops.performer.favor_forward / favor_backward (csrc/cuda/favor.cu): values
against the float64 dense reference, the saved statistics against the CPU kernels, gradients through
the registered autograd, gradcheck, causality, extreme logits, padding, strides, empty sizes and opcheck.
Runs only where CUDA is available and the extension was built with CUDA kernels.

The ops are called directly on canonical (B, H, L, E) views of the shared sample cases (conftest.py),
so these tests do not depend on which backend favor_attention picks on a GPU."""
import math

import pytest
import torch

import performer
from conftest import (DTYPES, EMPTY_CASES, ERROR_MULTIPLE, EXTREMES, GPU_KERNELS, SPECS, Spec, assert_close,
                      assert_future_invisible, canonical, case_params, dtype_id, feature_sets, make_case,
                      perturb_future)


def _has_cuda_kernels() -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("performer::favor_forward", "CUDA")
    except RuntimeError:  # the extension is not built: the op does not exist
        return False


if not torch.cuda.is_available():
    pytest.skip("CUDA is not available", allow_module_level=True)
if not _has_cuda_kernels():
    pytest.skip("no CUDA kernels: performer._C was built without them", allow_module_level=True)

# torch's own opcheck internals warn about their use of torch.jit.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

DEVICE = "cuda"

# As in test_favor_grads.py: the backward reads the output as saved in the 16-bit input dtype.
GRAD_MULTIPLE = {torch.float16: 10.0, torch.bfloat16: 10.0}


def _scale(spec: Spec) -> float:
    return spec.scale if spec.scale is not None else 1.0 / math.sqrt(spec.E)


def _on_device(case, requires_grad=False):
    """The case's q, k, v on the GPU, strides kept (the "transposed" spec stays non-contiguous)."""
    return [t.detach().to(DEVICE).requires_grad_(requires_grad) for t in case.inputs]


def _op_args(case, causal, kernel, q=None, k=None, v=None, device="cpu"):
    """favor_forward's arguments: the case's tensors (or q, k, v in the case's layout) as canonical
    (B, H, N, D) views on `device`."""
    q, k, v = (case.q if q is None else q), (case.k if k is None else k), (case.v if v is None else v)
    q4, k4, v4 = (canonical(t, case.spec.layout).to(device) for t in (q, k, v))
    mask = case.key_padding_mask
    if mask is not None:
        mask = mask.reshape(q4.shape[0], k4.shape[2]).to(device)
    return q4, k4, v4, case.features.to(device), None, mask, _scale(case.spec), causal, kernel


def _favor(case, causal, kernel, q, k, v):
    """The op's output for q, k, v (on the GPU, in the case's layout), through the op's autograd."""
    out, *_ = torch.ops.performer.favor_forward(*_op_args(case, causal, kernel, q, k, v, device=q.device))
    return out.reshape(case.out_shape)


# ---- values -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kernel", GPU_KERNELS)
@pytest.mark.parametrize("spec,masked,causal", case_params())
def test_forward_matches_dense_reference(spec, masked, causal, kernel, dtype):
    case = make_case(spec, dtype, masked=masked)
    out = _favor(case, causal, kernel, *_on_device(case))
    assert out.device.type == torch.device(DEVICE).type and out.dtype == dtype and out.shape == case.out_shape
    assert_close(out.cpu(), case.reference(causal, kernel), case.reference(causal, kernel, dtype=dtype))


def _assert_stat(got, expected, name, tol):
    assert got.dtype == expected.dtype and got.shape == expected.shape, \
        f"{name}: {got.dtype} {tuple(got.shape)} != CPU's {expected.dtype} {tuple(expected.shape)}"
    finite = expected[torch.isfinite(expected)]  # key_shift is -inf before the first visible key
    size = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * size, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kernel", GPU_KERNELS)
@pytest.mark.parametrize("spec,masked,causal", case_params())
def test_saved_statistics_match_cpu(spec, masked, causal, kernel, dtype):
    """state, den, query_shift and key_shift mean what the CPU kernels' do (the backward depends on
    it), up to the accumulation dtype's rounding. Causal query shifts take the state before each
    chunk into account, and the chunk height differs between the devices (64 rows here, 32 for
    float64; 56, 60 or 64 on the CPU by instruction set): there den e^{query_shift}, the normalizer
    without its shift, is compared, as log(den) + query_shift."""
    case = make_case(spec, dtype, masked=masked)
    args = _op_args(case, causal, kernel)
    out_cpu, *cpu = torch.ops.performer.favor_forward(*args)
    out_gpu, *gpu = (t.cpu() for t in torch.ops.performer.favor_forward(*_op_args(case, causal, kernel,
                                                                                   device=DEVICE)))
    state, den, query_shift, key_shift = gpu
    tol = 1e-11 if dtype == torch.float64 else 1e-5
    assert out_gpu.dtype == dtype
    _assert_stat(state, cpu[0], "state", tol)
    _assert_stat(key_shift, cpu[3], "key_shift", tol)
    if not causal or kernel == "relu":  # relu: no query shift, nothing depends on the chunks
        _assert_stat(den, cpu[1], "den", tol)
        _assert_stat(query_shift, cpu[2], "query_shift", tol)
        return
    assert torch.equal(den > 0, cpu[1] > 0), "den: a different set of queries sees no key"
    visible = cpu[1] > 0
    _assert_stat(den.log()[visible] + query_shift[visible], cpu[1].log()[visible] + cpu[2][visible],
                 "log(den) + query_shift", tol)


GQA_CASES = [p for p in case_params() if p.values[0].layout == "4d" and p.values[0].Hk < p.values[0].H]


@pytest.mark.parametrize("kernel", GPU_KERNELS)
@pytest.mark.parametrize("spec,masked,causal", GQA_CASES)
def test_grouped_query_equals_repeated_key_heads(spec, masked, causal, kernel):
    case = make_case(spec, torch.float64, masked=masked)
    q, k, v = _on_device(case)
    groups = spec.H // spec.Hk
    grouped = _favor(case, causal, kernel, q, k, v)
    repeated = _favor(case, causal, kernel, q, *(t.repeat_interleave(groups, dim=1) for t in (k, v)))
    torch.testing.assert_close(grouped, repeated, atol=1e-12, rtol=1e-12)


TILE_SPECS = (
    Spec("split", 1, 2, 1, 300, 300, 16, 9, 20),          # few (batch, head) pairs: the sequence is split
    Spec("value_tiles", 1, 3, 1, 100, 100, 8, 130, 33),   # Ev over several value tiles, m over feature tiles
    Spec("wide", 1, 2, 1, 70, 70, 260, 7, 300),           # E over several input slices
    Spec("long_keys", 2, 2, 2, 5, 300, 8, 70, 40),        # L != S, keys split
)


@pytest.mark.parametrize("kernel", GPU_KERNELS)
@pytest.mark.parametrize("spec,causal", [
    pytest.param(spec, causal, id=f"{spec.id}-{'causal' if causal else 'bidir'}")
    for spec in TILE_SPECS for causal in (False, True) if spec.causal_ok or not causal])
def test_tiles_and_segments(spec, causal, kernel):
    """Sizes that cross every tile of the kernels and split sequences into segments: values and
    gradients against the reference, and the same output as the CPU kernels."""
    case = make_case(spec, torch.float32, masked=True, requires_grad=True)
    grad_out = torch.randn(case.out_shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = _on_device(case, requires_grad=True)
    out = _favor(case, causal, kernel, *x)
    got = torch.autograd.grad(out, x, grad_out.float().to(DEVICE))
    x64 = [t.detach().double().requires_grad_() for t in case.inputs]
    ref64 = case.reference(causal, kernel, q=x64[0], k=x64[1], v=x64[2])
    ref32 = case.reference(causal, kernel, dtype=torch.float32)
    assert_close(out.cpu(), ref64, ref32)
    cpu_out, *_ = torch.ops.performer.favor_forward(*_op_args(case, causal, kernel))
    assert_close(out.cpu(), ref64, cpu_out.reshape(case.out_shape), what="output against the CPU kernels")
    for name, a, b, r in zip("qkv", got, torch.autograd.grad(ref64, x64, grad_out),
                             torch.autograd.grad(ref32, case.inputs, grad_out.float())):
        assert_close(a.cpu(), b, r, what=f"d{name}")


@pytest.mark.parametrize("sizes,causal", EMPTY_CASES)
def test_empty_sizes(sizes, causal):
    """Zero-sized dimensions give empty results (no invalid launch); queries with no key give zeros;
    the statistics agree with the CPU kernels'."""
    B, H, Hk, L, S, E, Ev = sizes
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g) for shape in ((B, H, L, E), (B, Hk, S, E), (B, Hk, S, Ev)))
    w = torch.randn(12, E, generator=g)
    cpu = torch.ops.performer.favor_forward(q, k, v, w, None, None, 0.5, causal, "softmax")
    x = [t.to(DEVICE).requires_grad_() for t in (q, k, v)]
    gpu = torch.ops.performer.favor_forward(*x, w.to(DEVICE), None, None, 0.5, causal, "softmax")
    for name, a, b in zip(("out", "state", "den", "query_shift", "key_shift"), gpu, cpu):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{name}: {tuple(a.shape)} {a.dtype}"
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    out = gpu[0]
    assert (out == 0).all() if S == 0 else torch.isfinite(out).all()
    grads = torch.autograd.grad(out, x, torch.ones_like(out))
    assert [tuple(t.shape) for t in grads] == [tuple(q.shape), tuple(k.shape), tuple(v.shape)]
    assert all(torch.isfinite(t).all() for t in grads)


# ---- gradients ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kernel", GPU_KERNELS)
@pytest.mark.parametrize("spec,masked,causal", case_params())
def test_grads_match_dense_reference(spec, masked, causal, kernel, dtype):
    case = make_case(spec, dtype, masked=masked, requires_grad=True)
    grad_out = torch.randn(case.out_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = _on_device(case, requires_grad=True)
    got = torch.autograd.grad(_favor(case, causal, kernel, *x), x, grad_out.to(dtype).to(DEVICE))
    x64 = [t.detach().double().requires_grad_() for t in case.inputs]
    ref64 = torch.autograd.grad(case.reference(causal, kernel, q=x64[0], k=x64[1], v=x64[2]), x64, grad_out)
    ref_dtype = torch.autograd.grad(case.reference(causal, kernel, dtype=dtype), case.inputs, grad_out.to(dtype))
    for name, xi, a, b, r in zip("qkv", x, got, ref64, ref_dtype):
        assert a.dtype == dtype and a.shape == xi.shape, f"d{name}: {a.dtype} {tuple(a.shape)}"
        assert_close(a.cpu(), b, r, what=f"d{name}", multiple=GRAD_MULTIPLE.get(dtype, ERROR_MULTIPLE))


TINY = Spec("tiny", 2, 2, 1, 5, 5, 3, 2, 4)
CHUNKS = Spec("chunks", 1, 2, 1, 70, 70, 3, 2, 5)  # crosses the 64- (float64: 32-) row chunks


@pytest.mark.parametrize("kernel", GPU_KERNELS)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("spec", [TINY, CHUNKS], ids=lambda s: s.id)
def test_gradcheck(spec, causal, masked, kernel):
    case = make_case(spec, torch.float64, masked=masked, seed=3)

    def f(q, k, v):
        return _favor(case, causal, kernel, q, k, v)

    assert torch.autograd.gradcheck(f, _on_device(case, requires_grad=True), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=spec is CHUNKS)


# ---- robustness ---------------------------------------------------------------------------------

def _attend(q, k, v, w, *, causal=False, mask=None, scale=None, kernel="softmax"):
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out, *_ = torch.ops.performer.favor_forward(q, k, v, w, None, mask, scale, causal, kernel)
    return out


@pytest.mark.parametrize("kind", ["noise", "scaled", "dominant"])
@pytest.mark.parametrize("t", [0, 63, 64, 100])
@pytest.mark.parametrize("kernel", GPU_KERNELS)
def test_causal_output_ignores_the_future(kernel, t, kind):
    """Outputs and gradients at positions <= t do not see q, k, v at positions > t (earlier keys of
    norm ~24 underflow with a key shift shared with "dominant" later keys)."""
    g = torch.Generator().manual_seed(10)
    B, H, L, E = 2, 2, 150, 16
    q, k, v = (torch.randn(B, H, L, E, generator=g) for _ in range(3))
    if kind == "dominant":
        k = k * 6
    w = performer.orthogonal_features(32, E, generator=g)
    perturbed = [perturb_future(kind, x, w, g, t).to(DEVICE) for x in (q, k, v)]
    w = w.to(DEVICE)
    assert_future_invisible(lambda *x: _attend(*x, w, causal=True, kernel=kernel),
                            [x.to(DEVICE) for x in (q, k, v)], perturbed, t, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kernel", GPU_KERNELS)
@pytest.mark.parametrize("extreme", list(EXTREMES))
def test_extreme_logits_stay_finite(extreme, kernel, causal, dtype):
    B, H, L, E, norm = EXTREMES[extreme]
    g = torch.Generator().manual_seed(11)
    q, k = (torch.nn.functional.normalize(torch.randn(B, H, L, E, generator=g, dtype=torch.float64), dim=-1) * norm
            for _ in range(2))
    v = torch.randn(B, H, L, E, generator=g, dtype=torch.float64)
    q, k, v = (x.to(dtype).to(DEVICE).requires_grad_() for x in (q, k, v))
    w = performer.orthogonal_features(32, E, generator=g, dtype=dtype).to(DEVICE)
    mask = torch.rand(B, L, generator=g) < 0.2
    mask[1] = True
    out = _attend(q, k, v, w, causal=causal, mask=mask.to(DEVICE), scale=1.0, kernel=kernel)
    assert torch.isfinite(out).all(), f"non-finite outputs at {(~torch.isfinite(out)).nonzero()[:4].tolist()}"
    assert (out[1] == 0).all()
    grads = torch.autograd.grad(out, (q, k, v), torch.randn(out.shape, generator=g).to(dtype).to(DEVICE))
    for name, grad in zip(("dq", "dk", "dv"), grads):
        assert torch.isfinite(grad).all(), f"{name} not finite"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kernel", GPU_KERNELS)
def test_fully_masked_rows_are_zero_with_finite_grads(kernel, causal, dtype):
    g = torch.Generator().manual_seed(9)
    B, H, L, E = 3, 2, 70, 8
    q, k, v = (torch.randn(B, H, L, E, generator=g).to(dtype).to(DEVICE).requires_grad_() for _ in range(3))
    w = performer.orthogonal_features(16, E, generator=g, dtype=dtype).to(DEVICE)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0] = True                # every key of row 0 ignored
    mask[2, :66] = True           # causal: queries 0..65 of row 2 see nothing
    out = _attend(q, k, v, w, causal=causal, mask=mask.to(DEVICE), kernel=kernel)
    assert (out[0] == 0).all()
    if causal:
        assert (out[2, :, :66] == 0).all()
        assert (out[2, :, 66:] != 0).any()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn(out.shape, generator=g).to(dtype).to(DEVICE))
    for name, grad in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(grad).all(), f"{name} not finite"
    ignored = mask.to(DEVICE)[:, None].expand_as(dk[..., 0])
    assert (dk[ignored] == 0).all() and (dv[ignored] == 0).all(), "an ignored key has a gradient"
    assert (dq[0] == 0).all()
    if causal:
        assert (dq[2, :, :66] == 0).all()


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kernel", GPU_KERNELS)
def test_nan_key_propagates(kernel, causal):
    """A NaN in a key is not mistaken for padding: every output that can see it is NaN."""
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 2, 10, 8, generator=g) for _ in range(3))
    k[0, 0, 0, 3] = float("nan")
    w = performer.orthogonal_features(16, 8, generator=g)
    out = _attend(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), w.to(DEVICE), causal=causal, kernel=kernel)
    assert torch.isnan(out[0, 0]).all()
    assert torch.isfinite(out[0, 1]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kernel", GPU_KERNELS)
def test_strided_inputs_give_the_contiguous_results(kernel, causal, dtype):
    """Inputs are read by their strides: a transposed q, a k with every other element, a v stored
    (B, Hk, Ev, S), a transposed grad_out give exactly the results of contiguous copies."""
    g = torch.Generator().manual_seed(13)
    B, H, Hk, L, E, Ev = 2, 4, 2, 70, 16, 9
    q = torch.randn(B, L, H, E, generator=g).to(dtype).to(DEVICE).transpose(1, 2)
    k = torch.randn(B, Hk, L, 2 * E, generator=g).to(dtype).to(DEVICE)[..., ::2]
    v = torch.randn(B, Hk, Ev, L, generator=g).to(dtype).to(DEVICE).transpose(2, 3)
    grad_out = torch.randn(B, H, Ev, L, generator=g).to(dtype).to(DEVICE).transpose(2, 3)
    w = performer.orthogonal_features(20, E, generator=g).to(DEVICE)
    mask = (torch.rand(B, L, generator=g) < 0.3).to(DEVICE)
    assert not any(t.is_contiguous() for t in (q, k, v, grad_out))

    def run(q, k, v, grad_out):
        x = [t.detach().requires_grad_() for t in (q, k, v)]
        out, *stats = torch.ops.performer.favor_forward(*x, w, None, mask, 0.25, causal, kernel)
        return (out, *stats, *torch.autograd.grad(out, x, grad_out))

    strided = run(q, k, v, grad_out)
    contiguous = run(*(t.contiguous() for t in (q, k, v, grad_out)))
    names = ("out", "state", "den", "query_shift", "key_shift", "dq", "dk", "dv")
    for name, a, b in zip(names, strided, contiguous):
        assert torch.equal(a, b), f"{name} depends on the input strides"


# ---- registration -------------------------------------------------------------------------------

OPCHECK_CASES = [p for p in case_params() if p.values[0].id in ("gqa_odd", "transposed", "cross_gqa")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("spec,masked,causal", OPCHECK_CASES)
def test_opcheck(spec, masked, causal, dtype):
    case = make_case(spec, dtype, masked=masked)
    q, k, v, *rest = _op_args(case, causal, "softmax", device=DEVICE)
    args = (*(t.requires_grad_() for t in (q, k, v)), *rest)
    torch.library.opcheck(torch.ops.performer.favor_forward, args)

    with torch.no_grad():
        out, *stats = torch.ops.performer.favor_forward(*args)  # state, den, query_shift, key_shift
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype).to(DEVICE)
    q, k, v = (t.detach() for t in args[:3])
    torch.library.opcheck(torch.ops.performer.favor_backward,
                          (grad_out, q, k, v, *args[3:6], out, *stats, *args[6:], False))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_cpp_backend_runs_the_cuda_kernels(causal):
    """favor_attention(backend="cpp") on CUDA tensors runs these kernels: the op's own output."""
    case = make_case(SPECS[0], torch.float32, masked=True)
    q, k, v = _on_device(case)
    out = performer.favor_attention(q, k, v, is_causal=causal, features=case.features.to(DEVICE),
                                    key_padding_mask=case.key_padding_mask.to(DEVICE), backend="cpp")
    torch.testing.assert_close(out, _favor(case, causal, "softmax", q, k, v), atol=0, rtol=0)


# ---- the decoding step (csrc/cuda/favor_step.cu) ------------------------------------------------

STEP_SHAPES = [(1, 8, 8, 1, 64, 64, 256), (2, 6, 2, 3, 16, 40, 300), (1, 9, 1, 2, 8, 33, 20)]  # B H Hk T E Ev m
STEP_TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _step_case(shape, dtype, masked, seed=0, layout="shared"):
    B, H, Hk, T, E, Ev, m = shape
    g = torch.Generator().manual_seed(seed)
    prefix = [torch.randn(B, n, 6, d, generator=g, dtype=torch.float64).to(dtype) for n, d in ((H, E), (Hk, E), (Hk, Ev))]
    new = [torch.randn(B, n, T, d, generator=g, dtype=torch.float64).to(dtype) for n, d in ((H, E), (Hk, E), (Hk, Ev))]
    features = performer.orthogonal_features(m, E, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.rand(B, T, generator=g) < 0.3 if masked else None
    return prefix, new, *feature_sets(features, layout, B, Hk), mask


@pytest.mark.parametrize("layout", ["shared", "per_batch_head"])
@pytest.mark.parametrize("kernel", GPU_KERNELS)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", STEP_SHAPES, ids=str)
def test_step_matches_cpu_op(shape, dtype, masked, kernel, layout):
    prefix, new, features, bias, mask = _step_case(shape, dtype, masked, layout=layout)
    scale = shape[4] ** -0.5
    _, *state = torch.ops.performer.favor_step(*prefix, features, bias, None, None, None, None, scale, kernel)
    cpu = torch.ops.performer.favor_step(*new, features, bias, mask, *state, scale, kernel)
    gpu = torch.ops.performer.favor_step(*(t.to(DEVICE) for t in new), features.to(DEVICE),
                                         None if bias is None else bias.to(DEVICE),
                                         None if mask is None else mask.to(DEVICE),
                                         *(t.to(DEVICE) for t in state), scale, kernel)
    for name, got, expected in zip(("out", "kv", "normalizer", "key_max"), gpu, cpu):
        top = max(1.0, expected.abs().max().item())
        err = ((got.cpu().double() - expected.double()).abs().max() / top).item()
        assert err <= STEP_TOL[dtype], f"{name}: {err}"


def test_step_in_place_and_through_favor_attention_step():
    prefix, new, features, _, mask = _step_case(STEP_SHAPES[1], torch.float32, True)
    features = features.to(DEVICE)
    _, state = performer.favor_attention_step(*(t.to(DEVICE) for t in prefix), features=features, backend="torch")
    q, k, v = (t.to(DEVICE) for t in new)
    expected, after = performer.favor_attention_step(q, k, v, state, features=features, backend="torch")
    out, fused = performer.favor_attention_step(q, k, v, performer.FavorState(*(t.clone() for t in state)),
                                                features=features, backend="cpp", inplace=True)
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)
    for got, want in zip(fused, after):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_step_opcheck():
    prefix, new, features, bias, mask = _step_case(STEP_SHAPES[1], torch.float32, True, layout="per_head")
    args = [t.to(DEVICE) for t in new] + [features.to(DEVICE), bias.to(DEVICE), mask.to(DEVICE)]
    _, *state = torch.ops.performer.favor_step(*args[:5], None, None, None, None, 0.25, "softmax")
    torch.library.opcheck(torch.ops.performer.favor_step, (*args, *state, 0.25, "softmax"))
    torch.library.opcheck(torch.ops.performer.favor_step_, (*args, *(t.clone() for t in state), 0.25, "softmax"))

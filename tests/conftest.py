"""Shared sample inputs, the float64 reference and dtype-aware tolerances for the FAVOR+ tests.

Every case is drawn from its own seeded ``torch.Generator`` (never the global RNG), so each test
sees the same tensors whatever runs before it.
"""
from __future__ import annotations

import math
import os
import tempfile
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional

import pytest

# A fresh torch.compile cache per test run: a cache from an earlier build can hold graphs traced
# against an older op schema.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="performer-inductor-"))

import torch  # noqa: E402

import performer  # noqa: E402
from performer.ops.favor.reference import favor_dense

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
BACKENDS = ("cpp", "torch")
KERNELS = ("softmax", "relu", "softmax_normalized")
GPU_KERNELS = ("softmax", "relu")  # what the CUDA and Triton kernels implement

# One intra-op thread: the kernels' OpenMP teams spin-wait, and on a small shared machine a
# busy core makes every tiny call wait a scheduler slice (10x-100x slower suites). Results do
# not depend on the thread count; test_favor_ops.py checks that with two threads.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded_global_rng(request):
    """Seed the global RNG per test from its id: this torch seeds it afresh in every process, and the
    module and layer initializations some tests rely on draw from it."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


# Error allowed on top of the multiple of the reference's own error, relative to max(1, max|ref|):
# a couple of ulps of the output dtype, so that a case where the reference happens to round
# exactly does not demand exactness from the kernel.
ATOL = {torch.float64: 1e-10, torch.float32: 2e-6, torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9}
ERROR_MULTIPLE = 4.0


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---- sample inputs ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """Sizes of one sample case. ``layout`` is how the tensors are passed to favor_attention:
    "4d" (B, H, L, E); "transposed": a (B, L, H, E) tensor transposed to (B, H, L, E);
    "3d" (B, L, E) (H = Hk = 1); "2d" (L, E) (B = H = Hk = 1); "5d" (B, X, H, L, E).
    ``scale`` None means favor_attention's default, 1/sqrt(E)."""

    id: str
    B: int
    H: int
    Hk: int
    L: int
    S: int
    E: int
    Ev: int
    m: int
    layout: str = "4d"
    X: int = 1
    scale: Optional[float] = None

    @property
    def causal_ok(self) -> bool:
        return self.L == self.S


SPECS = (
    Spec("gqa_odd", 2, 4, 2, 37, 37, 16, 9, 20),
    Spec("chunk_boundary", 1, 2, 1, 130, 130, 64, 64, 256),   # crosses the kernels' 64-row chunks
    Spec("single_token", 1, 1, 1, 1, 1, 3, 5, 7),
    Spec("ev1_tiny_m", 3, 2, 2, 65, 65, 5, 1, 3),
    Spec("transposed", 2, 3, 3, 40, 40, 8, 7, 16, layout="transposed", scale=0.3),
    Spec("rank3", 3, 1, 1, 33, 33, 8, 8, 16, layout="3d"),
    Spec("rank2", 1, 1, 1, 23, 23, 8, 4, 10, layout="2d"),
    Spec("rank5_gqa", 2, 4, 2, 19, 19, 8, 6, 12, layout="5d", X=2),
    Spec("cross_gqa", 2, 2, 1, 7, 12, 8, 8, 16),             # L != S: bidirectional only
)


@dataclass
class Case:
    """One sample: the tensors as passed to favor_attention, and the dense reference on them."""

    id: str
    spec: Spec
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    features: torch.Tensor
    key_padding_mask: Optional[torch.Tensor]

    @property
    def out_shape(self) -> tuple:
        return tuple(self.q.shape[:-1]) + (self.v.shape[-1],)

    @property
    def inputs(self) -> tuple:
        return self.q, self.k, self.v

    def run(self, causal: bool, backend: Optional[str] = None, kernel: str = "softmax",
            q=None, k=None, v=None) -> torch.Tensor:
        return performer.favor_attention(
            self.q if q is None else q, self.k if k is None else k, self.v if v is None else v,
            is_causal=causal, scale=self.spec.scale, features=self.features,
            key_padding_mask=self.key_padding_mask, kernel=kernel, backend=backend)

    def reference(self, causal: bool, kernel: str = "softmax", dtype: torch.dtype = torch.float64,
                  q=None, k=None, v=None) -> torch.Tensor:
        """favor_dense on the same values cast to ``dtype``, in the caller's layout (differentiable)."""
        q, k, v = (self.q if q is None else q), (self.k if k is None else k), (self.v if v is None else v)
        q4, k4, v4 = (canonical(t, self.spec.layout).to(dtype) for t in (q, k, v))
        mask = self.key_padding_mask
        if mask is not None:
            mask = mask.reshape(q4.shape[0], k4.shape[2])
        scale = self.spec.scale if self.spec.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        out = favor_dense(q4, k4, v4, self.features.to(dtype), mask, scale, causal, kernel)
        return out.reshape(self.out_shape)


def canonical(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The test's own (B, H, N, D) view of a tensor in ``layout``, independent of the package's."""
    if layout == "2d":
        return t[None, None]
    if layout == "3d":
        return t[:, None]
    if layout == "5d":
        return t.flatten(1, 2)
    return t


def _draw(spec: Spec, heads: int, n: int, d: int, g: torch.Generator, dtype) -> torch.Tensor:
    """Standard normal values drawn in float64 (the same values whatever the dtype), then cast."""
    if spec.layout == "transposed":
        return torch.randn(spec.B, n, heads, d, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
    shape = {"4d": (spec.B, heads, n, d), "3d": (spec.B, n, d), "2d": (n, d),
             "5d": (spec.B, spec.X, heads, n, d)}[spec.layout]
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def padding_mask(spec: Spec, g: torch.Generator) -> torch.Tensor:
    """About a quarter of the keys ignored; with several batch rows, row 0 ignores every key."""
    mask = torch.rand(spec.B, spec.S, generator=g) < 0.25
    if spec.B > 1:
        mask[0] = True
    return mask[0] if spec.layout == "2d" else mask


def make_case(spec: Spec, dtype: torch.dtype = torch.float32, *, masked: bool = False,
              requires_grad: bool = False, seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    q = _draw(spec, spec.H, spec.L, spec.E, g, dtype)
    k = _draw(spec, spec.Hk, spec.S, spec.E, g, dtype)
    v = _draw(spec, spec.Hk, spec.S, spec.Ev, g, dtype)
    features = performer.orthogonal_features(spec.m, spec.E, generator=g, dtype=dtype)
    mask = padding_mask(spec, g) if masked else None
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return Case(f"{spec.id}-{'mask' if masked else 'nomask'}", spec, q, k, v, features, mask)


def feature_sets(features, layout, B, Hk, seed=3):
    """features (m, E) -> per key head (1, Hk, m, E) or per batch element and key head (B, Hk, m, E)
    (each set the shared matrix with its own rows scaled and permuted), with a bias of that shape
    without E; layout "shared" keeps the matrix and adds no bias."""
    if layout == "shared":
        return features, None
    g = torch.Generator().manual_seed(seed)
    sets = (B, Hk) if layout == "per_batch_head" else (1, Hk)
    m, E = features.shape
    perm = torch.stack([torch.randperm(m, generator=g) for _ in range(sets[0] * sets[1])]).view(*sets, m)
    scale = (0.7 + 0.6 * torch.rand(*sets, m, 1, generator=g, dtype=torch.float64)).to(features.dtype)
    w = features[perm] * scale
    bias = (0.3 * torch.randn(*sets, m, generator=g, dtype=torch.float64)).to(features.dtype)
    return w, bias


def sample_inputs(dtype: torch.dtype = torch.float32, *, requires_grad: bool = False,
                  causal: Optional[bool] = None, seed: int = 0) -> Iterator[Case]:
    """Every spec with and without a padding mask (only L == S specs when ``causal``)."""
    for spec in SPECS:
        if causal and not spec.causal_ok:
            continue
        for masked in (False, True):
            yield make_case(spec, dtype, masked=masked, requires_grad=requires_grad, seed=seed)


def case_params():
    """pytest params (spec, masked, causal) for every valid combination, with readable ids."""
    return [pytest.param(spec, masked, causal, id=f"{spec.id}-{m}-{'causal' if causal else 'bidir'}")
            for spec in SPECS for masked, m in ((False, "nomask"), (True, "mask"))
            for causal in (False, True) if spec.causal_ok or not causal]


# ---- comparisons --------------------------------------------------------------------------------

def error_bound(ref64: torch.Tensor, ref_same_dtype: torch.Tensor, dtype: torch.dtype,
                multiple: float = ERROR_MULTIPLE) -> float:
    """``multiple`` x the error favor_dense makes in ``dtype``, plus a few ulps of ``dtype``."""
    ref64 = ref64.detach().double()
    own = (ref_same_dtype.detach().double() - ref64).abs().max().item() if ref64.numel() else 0.0
    size = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    return multiple * own + ATOL[dtype] * size


def assert_close(got: torch.Tensor, ref64: torch.Tensor, ref_same_dtype: torch.Tensor, what: str = "output",
                 multiple: float = ERROR_MULTIPLE):
    """|got - ref64| <= multiple * |ref_same_dtype - ref64| + ATOL (flash-attention style)."""
    assert got.shape == ref64.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got.detach().double() - ref64.detach().double()).abs().max().item() if got.numel() else 0.0
    bound = error_bound(ref64, ref_same_dtype, got.dtype, multiple)
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g} ({dtype_id(got.dtype)})"


# ---- every ISA copy of the CPU kernels -----------------------------------------------------------

ISAS = ("baseline", "avx2", "avx512")
INT8_ISAS = ISAS + ("avx512_vnni",)   # VNNI adds only the int8 product (tests/test_int8.py)
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)


def _run_capped(isa: Optional[str], code: str, **env_vars: str) -> dict:
    import json
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, TESTS_DIR, os.environ.get("PYTHONPATH", "")]),
               **env_vars)
    env.pop("PERFORMER_CPU_ISA", None)
    if isa is not None:
        env["PERFORMER_CPU_ISA"] = isa
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=TESTS_DIR, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"PERFORMER_CPU_ISA={isa}:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


_DETECTED: list = []


def run_on_isa(isa: str, script: str, **env_vars: str) -> dict:
    """Runs ``script`` in a fresh process whose CPU kernels are capped at ``isa``
    (PERFORMER_CPU_ISA; tests/ on the path), skipping where this CPU lacks it, and returns the JSON
    its last line prints."""
    if not _DETECTED:
        _DETECTED.append(_run_capped(None, "import json, torch, performer; "
                                           "print(json.dumps(torch.ops.performer.cpu_isa()))"))
    if INT8_ISAS.index(isa) > INT8_ISAS.index(_DETECTED[0]):
        pytest.skip(f"this CPU runs at most {_DETECTED[0]}")
    return _run_capped(isa, script, **env_vars)


# ---- Triton under the interpreter ----------------------------------------------------------------

TRITON_CHILD_ENV = "PERFORMER_TRITON_TEST_CHILD"


def run_in_triton_interpreter(test_file: str) -> None:
    """Reruns ``test_file`` in a fresh process with TRITON_INTERPRET=1 (which must be set before
    performer is imported) and requires every test there to pass, none skipped."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1", TRITON_CHILD_ENV: "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(test_file), "-q", "-p", "no:cacheprovider"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, f"TRITON_INTERPRET=1 run failed:\n{run.stdout[-8000:]}\n{run.stderr[-4000:]}"
    summary = run.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, run.stdout[-4000:]


# Zero-sized cases: (B, H, Hk, L, S, E, Ev), each bidirectional and, where L == S, causal.
EMPTY = {
    "no_keys": (2, 4, 2, 6, 0, 8, 5),
    "no_queries": (2, 4, 2, 0, 6, 8, 5),
    "empty_sequence": (2, 4, 2, 0, 0, 8, 5),
    "no_batch": (0, 4, 2, 6, 6, 8, 5),
    "no_value_dim": (2, 4, 2, 6, 6, 8, 0),
}
EMPTY_CASES = [pytest.param(sizes, causal, id=f"{name}-{'causal' if causal else 'bidir'}")
               for name, sizes in EMPTY.items() for causal in (False, True) if sizes[3] == sizes[4] or not causal]


def perturb_future(kind: str, x: torch.Tensor, w: torch.Tensor, g: torch.Generator, t: int) -> torch.Tensor:
    """x (q, k or v, (B, H, N, D)) with positions > t changed by a large amount, for causality tests:
    "noise" adds 1e3-scale noise, "scaled" multiplies by 1e3 (relu features of these keys dominate),
    "dominant" puts k' = c k on the longest feature row of w (the largest softmax exponent)."""
    x = x.clone()
    tail = x[:, :, t + 1:]
    if kind == "noise":
        tail += 1e3 * torch.randn(tail.shape, generator=g)
    elif kind == "scaled":
        tail *= 1e3
    elif kind == "dominant":
        tail.copy_(w[w.norm(dim=1).argmax()] * x.shape[-1] ** 0.25)
    return x


def assert_future_invisible(run, inputs, perturbed, t: int, g: torch.Generator) -> None:
    """run(q, k, v) -> causal output (B, H, L, Ev). Outputs at positions <= t must not move when q, k
    and v change after t (`perturbed`, e.g. by perturb_future), and the gradients must be finite up
    to t and exactly zero after it."""
    out = run(*inputs)[:, :, :t + 1]
    moved = [x.requires_grad_() for x in perturbed]
    out2 = run(*moved)[:, :, :t + 1]
    err, size = (out2 - out).abs().max().item(), out.abs().max().item()
    assert err <= 1e-6 * size, f"outputs at positions <= t={t} moved by {err:.3g} (max |out| {size:.3g})"
    grads = torch.autograd.grad(out2, moved, torch.randn(out2.shape, generator=g).to(out2.device))
    for name, grad in zip(("dq", "dk", "dv"), grads):
        assert torch.isfinite(grad[:, :, :t + 1]).all(), f"{name} at positions <= t not finite"
        assert (grad[:, :, t + 1:] == 0).all(), f"{name} nonzero at positions > t={t}"


# (B, H, L, E, query/key norm) for the extreme-logit tests: with scale=1 the logits q.k reach +-norm^2.
EXTREMES = {
    "logits_1e4": (2, 2, 70, 16, 100.0),
    "logits_1e4_single_token": (2, 2, 1, 16, 100.0),
    "logits_1e2": (2, 2, 70, 16, 10.0),
}

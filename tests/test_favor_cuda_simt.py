"""The CUDA kernels of FAVOR+ (csrc/cuda/favor.cu, and the decoding step of favor_step.cu), run on the
CPU by a SIMT emulator (tests/simt/).

No GPU is needed: the sources are compiled as C++ against tests/simt/simt.h, which runs every thread of
a block as a fiber, phase by phase between barriers, in a random order per phase, with shared
memory filled with NaNs. The results are compared with the CPU op (itself tested against the float64
reference in test_favor_values.py and test_favor_grads.py) on every output, saved statistic and
gradient, for shapes that cross every tile boundary of the kernels (float32: 64-row chunks,
32-feature and 32-column tiles, 64-column value tiles; float64: 32, 32, 16 and 32), with one to many
sequence segments, grouped-query heads, padding masks, strided inputs and every dtype. Two thread
orders must give identical results (no race); a read of unwritten shared memory shows as a NaN.

What the emulator cannot check (timing, the GPU's memory model, shared-memory bank conflicts,
speed) is left to tests/test_favor_cuda.py on a GPU. The two CUDA-only spellings of the sources (the
`<<<...>>>` launch in favor_common.cuh and the `extern __shared__` declarations) are replaced when the
test writes the sources it compiles; each must be found as often as expected, so a change of
spelling fails here. The step is compared with the CPU step op (tested against the plain-PyTorch
step in test_step_cpp.py) on its output and state.
"""
from __future__ import annotations

import hashlib
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

import performer
from conftest import feature_sets
from performer._C_loader import unavailable_reason

ROOT = Path(__file__).resolve().parents[1]
SIMT = ROOT / "tests" / "simt"
CUDA = ROOT / "csrc" / "cuda"

if shutil.which("c++") is None and shutil.which("g++") is None:
    pytest.skip("no C++ compiler to build the SIMT emulator", allow_module_level=True)
if unavailable_reason() is not None:
    pytest.skip(f"the CPU op to compare with is missing: {unavailable_reason()}", allow_module_level=True)

# The CUDA-only spellings of each source and their emulated forms (simt.h), each expected exactly
# `count` times; each source is written, so changed, under the name the emulator includes.
LAUNCH = ("kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(args...);",
          "simt::launch(kernel, static_cast<unsigned>(blocks), kThreads, smem, args...);")
SHARED = ("extern __shared__ __align__(16) unsigned char smem_raw[];",
          "unsigned char* smem_raw = simt::shared_memory();")
SOURCES = {  # source -> (the name it is written as, [(cuda, emulated, count)])
    "favor_common.cuh": ("favor_common.cuh", [(*LAUNCH, 1)]),
    "favor.cu": ("favor_emulated.inc", [(*SHARED, 6)]),
    "favor_step.cu": ("favor_step_emulated.inc", [(*SHARED, 1)]),
}
# The CUDA registrations go: the emulated entry points are called directly, on CPU tensors.
REGISTRATION = "TORCH_LIBRARY_IMPL(performer, CUDA, m)"


def _emulated_source(name: str) -> str:
    path = CUDA / name
    text = path.read_text()
    for cuda, emulated, count in SOURCES[name][1]:
        found = text.count(cuda)
        assert found == count, f"{name}: expected {count} x {cuda!r} to replace for the emulator, found {found}"
        text = text.replace(cuda, emulated)
    if name.endswith(".cu"):
        assert text.count(REGISTRATION) == 1, f"{name}: expected one {REGISTRATION}"
        text = text[:text.index(REGISTRATION)]
    return text


@pytest.fixture(scope="module")
def simt():
    """The emulated kernels as a module: forward / backward / step / step_ with the CUDA entry
    points' arguments."""
    from torch.utils import cpp_extension
    build = ROOT / "build" / "simt"
    build.mkdir(parents=True, exist_ok=True)
    texts = []
    for name, (written, _) in SOURCES.items():
        text = _emulated_source(name)
        texts.append(text)
        target = build / written
        if not target.exists() or target.read_text() != text:  # unchanged: ninja keeps the last build
            target.write_text(text)
    # The module name follows the emulator's sources, so an edited emulator is never shadowed by an
    # older build already loaded under the same name.
    digest = hashlib.sha1(("".join(texts) + (SIMT / "simt.h").read_text() + (SIMT / "favor_simt.cpp").read_text())
                          .encode()).hexdigest()[:10]
    return cpp_extension.load(
        name=f"favor_simt_{digest}", sources=[str(SIMT / "favor_simt.cpp")],
        extra_include_paths=[str(SIMT / "include"), str(SIMT), str(build), str(CUDA)],
        extra_cflags=["-O2", "-std=c++20"],
        build_directory=str(build), verbose=False)


# (B, H, Hk, L, S, E, Ev, m): float32 tiles are 64 rows, 32 features, 32 input and 64 value columns;
# float64's 32, 32, 16 and 32.
SHAPES = {
    "tiny": (1, 1, 1, 1, 1, 3, 5, 7),
    "gqa_odd": (2, 4, 2, 37, 37, 16, 9, 20),
    "tiles": (1, 2, 1, 130, 130, 40, 70, 40),
    "cross": (2, 2, 1, 7, 12, 8, 8, 16),
    "long_keys": (1, 2, 2, 5, 150, 8, 70, 40),
}
TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
# The backward of 16-bit inputs reads the output saved in that dtype: it may round either way.
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.bfloat16: 0.3, torch.float16: 0.06}


def _inputs(shape, dtype, masked, transposed=False, seed=0, scale=1.0):
    B, H, Hk, L, S, E, Ev, m = shape
    g = torch.Generator().manual_seed(seed)

    def draw(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64)

    q, k, v = draw(B, H, L, E) * scale, draw(B, Hk, S, E) * scale, draw(B, Hk, S, Ev)
    features = performer.orthogonal_features(m, E, generator=g, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.rand(B, S, generator=g) < 0.25
        if B > 1:
            mask[0] = True  # a batch entry with every key padded: zero outputs
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if transposed:  # (B, L, H, E) storage seen as (B, H, L, E): strided heads and rows
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    return q, k, v, features.to(dtype), mask


def _error(got, expected) -> float:
    """Largest difference relative to max(1, max|expected|); NaN where only one side is NaN."""
    got, expected = got.double(), expected.double()
    if expected.numel() == 0:
        return 0.0
    same = (got == expected) | (got.isnan() & expected.isnan())
    diff = torch.where(same, torch.zeros_like(got), (got - expected).abs()).nan_to_num(nan=math.inf)
    return (diff.max() / max(1.0, expected.abs().nan_to_num(0).max().item())).item()


def _log_den(den, shift):
    """log(den) + shift: the causal statistics are compared as this (the split is the kernel's choice)."""
    return torch.where(den > 0, den.double().log() + shift.double(), torch.zeros_like(shift, dtype=torch.float64))


def _compare(simt, shape, dtype, masked, causal, kernel, transposed=False, scale=1.0, dominant=None,
             layout="shared"):
    q, k, v, features, mask = _inputs(shape, dtype, masked, transposed, scale=scale)
    sc = shape[5] ** -0.5
    if dominant is not None:  # one key along a feature: the largest feature value of all keys
        k[:, :, dominant] = (features[0] / math.sqrt(sc)).to(dtype)
    features, bias = feature_sets(features, layout, shape[0], shape[2])
    features_grad = layout != "shared"
    cpu = torch.ops.performer.favor_forward(q, k, v, features, bias, mask, sc, causal, kernel)
    emu = simt.forward(q, k, v, features, bias, mask, sc, causal, kernel)
    for name, got, expected in zip(("out", "state", "den", "query_shift", "key_shift"), emu, cpu):
        assert got.dtype == expected.dtype and got.shape == expected.shape, \
            f"{name}: {got.dtype} {tuple(got.shape)}, CPU {expected.dtype} {tuple(expected.shape)}"
    errors = {"out": _error(emu[0], cpu[0]), "state": _error(emu[1], cpu[1]), "key_shift": _error(emu[4], cpu[4])}
    if causal:
        errors["log_den"] = _error(_log_den(emu[2], emu[3]), _log_den(cpu[2], cpu[3]))
        assert torch.equal(emu[2] > 0, cpu[2] > 0), "rows with a visible key differ"
    else:
        errors["den"], errors["query_shift"] = _error(emu[2], cpu[2]), _error(emu[3], cpu[3])
    grad = torch.randn(cpu[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    cpu_grads = torch.ops.performer.favor_backward(grad, q, k, v, features, bias, mask, cpu[0], *cpu[1:], sc, causal,
                                                   kernel, features_grad)
    emu_grads = simt.backward(grad, q, k, v, features, bias, mask, emu[0], *emu[1:], sc, causal, kernel,
                              features_grad)
    for name, got, expected in zip(("dq", "dk", "dv", "dfeatures", "dbias"), emu_grads, cpu_grads):
        assert got.dtype == expected.dtype and got.shape == expected.shape, f"{name}: {got.dtype} {tuple(got.shape)}"
        errors[name] = _error(got, expected)
    bad = {n: e for n, e in errors.items() if not e <= (GRAD_TOL if n.startswith("d") else TOL)[dtype]}
    assert not bad, f"emulated CUDA kernels differ from the CPU op: {bad} (all: {errors})"
    return emu, emu_grads[:3]


# Causal attention needs L == S.
SHAPE_MODES = [pytest.param(name, causal, id=f"{name}-{'causal' if causal else 'bidir'}")
               for name, shape in SHAPES.items() for causal in (False, True) if not causal or shape[3] == shape[4]]


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape,causal", SHAPE_MODES)
def test_matches_cpu_op(simt, shape, causal, dtype, masked, kernel):
    _compare(simt, SHAPES[shape], dtype, masked, causal, kernel)


def test_cuda_ops_refuse_the_normalized_kernel(simt):
    """softmax_normalized has no CUDA kernel: the ops refuse it by name instead of running another
    kernel."""
    q, k, v, features, _ = _inputs(SHAPES["gqa_odd"], torch.float32, False, False)
    message = "kernel must be 'softmax' or 'relu' on CUDA tensors"
    with pytest.raises(ValueError, match=re.escape(message)):
        simt.forward(q, k, v, features, None, None, 0.25, False, "softmax_normalized")
    with pytest.raises(ValueError, match=re.escape(message)):
        simt.step(q, k, v, features, None, None, None, None, None, 0.25, "softmax_normalized")


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("shape", ["gqa_odd", "tiles"])
def test_half_types_match_cpu_op(simt, shape, dtype, causal):
    _compare(simt, SHAPES[shape], dtype, True, causal, "softmax")


FEATURE_SET_CASES = [pytest.param(name, causal, id=f"{name}-{'causal' if causal else 'bidir'}")
                     for name, causal in (("gqa_odd", False), ("gqa_odd", True), ("tiles", False), ("tiles", True),
                                          ("long_keys", False), ("cross", False))]


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("layout", ["per_head", "per_batch_head"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape,causal", FEATURE_SET_CASES)
def test_feature_sets_bias_and_feature_grads_match_cpu_op(simt, shape, causal, dtype, layout, kernel):
    """Features per key head or per batch element and key head, with a bias: outputs, statistics and
    the gradients with respect to q, k, v, the features and the bias."""
    _compare(simt, SHAPES[shape], dtype, True, causal, kernel, layout=layout)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_feature_sets_in_half_types(simt, dtype, causal):
    _compare(simt, SHAPES["gqa_odd"], dtype, True, causal, "softmax", layout="per_batch_head")


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_strided_inputs(simt, causal):
    _compare(simt, SHAPES["gqa_odd"], torch.float32, True, causal, "softmax", transposed=True)


@pytest.mark.parametrize("layout", ["shared", "per_batch_head"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_large_logits_stay_finite(simt, causal, layout):
    emu, grads = _compare(simt, SHAPES["tiles"], torch.float32, False, causal, "softmax", scale=8.0, layout=layout)
    for t in (emu[0], *grads):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("position", [0, 31, 32, 63, 64, 129])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_dominant_key(simt, causal, position):
    """One key dominates the maxima at a warp's or a chunk's edge: the running maxima (a warp scan
    per 32 keys, carried across warps and chunks) must pick it up where the CPU op does."""
    _compare(simt, SHAPES["tiles"], torch.float32, False, causal, "softmax", dominant=position)


@pytest.mark.parametrize("sms", [1, 132])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_segment_counts(simt, causal, sms):
    """The launches split sequences into segments by SM count (about two blocks per SM); a single
    segment and many must agree with the CPU op alike."""
    simt.set_sms(sms)
    try:
        _compare(simt, SHAPES["tiles"], torch.float32, True, causal, "softmax")
    finally:
        simt.set_sms(2)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_thread_order_does_not_change_results(simt, causal):
    """Two random orders of the threads within each phase: identical bits, or a race."""
    results = []
    for seed in (1, 2):
        simt.seed(seed)
        q, k, v, features, mask = _inputs(SHAPES["gqa_odd"], torch.float32, True)
        out = simt.forward(q, k, v, features, None, mask, 0.25, causal, "softmax")
        grads = simt.backward(torch.ones_like(out[0]), q, k, v, features, None, mask, out[0], *out[1:], 0.25, causal,
                              "softmax", False)
        results.append([*out, *grads])
    for a, b in zip(*results):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


# ---- the decoding step (csrc/cuda/favor_step.cu) ------------------------------------------------
# (B, H, Hk, T, E, Ev, m): a block per (batch, key head), 256 threads over the features, lanes over
# 32 value columns, query heads in groups of 4: shapes below and across each.
STEP_SHAPES = {
    "tiny": (1, 1, 1, 1, 3, 5, 7),
    "decode": (2, 8, 8, 1, 64, 64, 256),
    "gqa_wide": (2, 6, 2, 3, 16, 40, 300),
    "many_heads": (1, 9, 1, 2, 8, 33, 20),
    "long_block": (1, 2, 1, 5, 40, 70, 600),
}
STEP_TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _step_inputs(shape, dtype, masked, prefix, transposed=False, scale=1.0, seed=0, layout="shared"):
    """New positions and, when `prefix`, the state after `prefix` earlier ones (from the CPU op);
    features in `layout` (conftest.feature_sets) and their bias."""
    B, H, Hk, T, E, Ev, m = shape
    g = torch.Generator().manual_seed(seed)

    def draw(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64)

    features = performer.orthogonal_features(m, E, generator=g, dtype=torch.float64).to(dtype)
    features, bias = feature_sets(features, layout, B, Hk)
    q, k, v = draw(B, H, T, E) * scale, draw(B, Hk, T, E) * scale, draw(B, Hk, T, Ev)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if transposed:
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    mask = torch.rand(B, T, generator=g) < 0.3 if masked else None
    state = (None, None, None)
    if prefix:
        pq, pk, pv = draw(B, H, prefix, E) * scale, draw(B, Hk, prefix, E) * scale, draw(B, Hk, prefix, Ev)
        _, *state = torch.ops.performer.favor_step(pq.to(dtype), pk.to(dtype), pv.to(dtype), features, bias,
                                                   None, None, None, None, E ** -0.5, "softmax")
    return q, k, v, features, bias, mask, tuple(state)


def _compare_step(simt, shape, dtype, masked=False, prefix=0, kernel="softmax", **kw):
    q, k, v, features, bias, mask, state = _step_inputs(shape, dtype, masked, prefix, **kw)
    if kernel == "relu" and prefix:  # a softmax prefix's state is not a relu one: draw the prefix with relu
        state = (None, None, None)
    sc = shape[4] ** -0.5
    cpu = torch.ops.performer.favor_step(q, k, v, features, bias, mask, *state, sc, kernel)
    emu = simt.step(q, k, v, features, bias, mask, *state, sc, kernel)
    errors = {}
    for name, got, expected in zip(("out", "kv", "normalizer", "key_max"), emu, cpu):
        assert got.dtype == expected.dtype and got.shape == expected.shape, \
            f"{name}: {got.dtype} {tuple(got.shape)}, CPU {expected.dtype} {tuple(expected.shape)}"
        # The state's sums grow with the prefix: compare relative to their own scale.
        errors[name] = _error(got, expected) if name in ("out", "key_max") else \
            _error(got / max(1.0, expected.abs().max().item()), expected / max(1.0, expected.abs().max().item()))
    bad = {n: e for n, e in errors.items() if not e <= STEP_TOL[dtype]}
    assert not bad, f"emulated CUDA step differs from the CPU op: {bad} (all: {errors})"
    return q, k, v, features, bias, mask, state, emu


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", list(STEP_SHAPES))
def test_step_matches_cpu_op(simt, shape, dtype, masked, kernel):
    _compare_step(simt, STEP_SHAPES[shape], dtype, masked, prefix=0 if kernel == "relu" else 7, kernel=kernel)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("shape", ["decode", "gqa_wide"])
def test_step_half_types_match_cpu_op(simt, shape, dtype):
    _compare_step(simt, STEP_SHAPES[shape], dtype, masked=True, prefix=5)


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("layout", ["per_head", "per_batch_head"])
@pytest.mark.parametrize("shape", ["decode", "gqa_wide", "many_heads"])
def test_step_feature_sets_and_bias_match_cpu_op(simt, shape, layout, dtype, kernel):
    """Each (batch, key head) block reads its own feature set and bias."""
    _compare_step(simt, STEP_SHAPES[shape], dtype, masked=True, prefix=0 if kernel == "relu" else 4, kernel=kernel,
                  layout=layout)


def test_step_from_an_empty_state_and_strided_inputs(simt):
    _compare_step(simt, STEP_SHAPES["gqa_wide"], torch.float32, masked=True, prefix=0, transposed=True)


def test_step_large_logits_stay_finite(simt):
    *_, emu = _compare_step(simt, STEP_SHAPES["long_block"], torch.float32, prefix=4, scale=8.0,
                            layout="per_batch_head")
    assert all(torch.isfinite(t).all() for t in emu)


def test_step_in_place_equals_the_new_state(simt):
    q, k, v, features, bias, mask, state, emu = _compare_step(simt, STEP_SHAPES["gqa_wide"], torch.float32, True, 6,
                                                              layout="per_head")
    kv, z, kmax = (t.clone() for t in state)
    out = simt.step_(q, k, v, features, bias, mask, kv, z, kmax, STEP_SHAPES["gqa_wide"][4] ** -0.5, "softmax")
    for got, expected in zip((out, kv, z, kmax), emu):
        assert torch.equal(got, expected)


def test_step_with_no_new_position_carries_the_state(simt):
    q, k, v, features, _, _, state = _step_inputs(STEP_SHAPES["gqa_wide"], torch.float32, False, 4)
    q, k, v = q[:, :, :0], k[:, :, :0], v[:, :, :0]
    out, *after = simt.step(q, k, v, features, None, None, *state, 0.25, "softmax")
    assert out.shape[2] == 0 and all(torch.equal(a, b) for a, b in zip(after, state))
    out, kv, z, kmax = simt.step(q, k, v, features, None, None, None, None, None, 0.25, "softmax")
    assert not kv.any() and not z.any() and (kmax == -math.inf).all()


def test_step_thread_order_does_not_change_results(simt):
    results = []
    for seed in (1, 2):
        simt.seed(seed)
        q, k, v, features, bias, mask, state = _step_inputs(STEP_SHAPES["many_heads"], torch.float32, True, 3,
                                                            layout="per_batch_head")
        results.append(simt.step(q, k, v, features, bias, mask, *state, 0.3, "softmax"))
    for a, b in zip(*results):
        assert torch.equal(a, b)

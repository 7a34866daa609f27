"""The benchmarks as data: for each suite, its shapes, sizes, dtypes and the implementations it
compares. cases.py turns an entry into measurements, runner.py runs them, and the
pytest-benchmark files in bench/ read the same entries.

An implementation is either measured (the subject: what this package provides) or a baseline;
the tables give every subject's speed-up over every baseline measured in the same run.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import performer


@dataclass(frozen=True)
class Sizes:
    full: tuple[int, ...]
    quick: tuple[int, ...]

    def pick(self, quick: bool) -> tuple[int, ...]:
        return self.quick if quick else self.full


@dataclass(frozen=True)
class Impl:
    name: str                            # key in the JSON
    short: str                           # in table headers
    label: str                           # in legends
    fn: Callable
    baseline: bool = False
    max_size: Optional[int] = None       # longest sequence it is run at
    devices: tuple[str, ...] = ("cpu", "cuda")
    sparse: bool = False                 # compress: runs on the pruned weight, at every density
    vs: tuple[str, ...] = ()             # a subject's baselines in the speed-up columns (empty: all)


@dataclass(frozen=True)
class Budget:
    """Repeats per measurement: until `seconds` have passed and at least 3 were taken, at most `max_repeats`."""
    seconds: float
    max_repeats: int


FULL_BUDGET = Budget(seconds=1.0, max_repeats=30)
QUICK_BUDGET = Budget(seconds=0.15, max_repeats=10)


def _favor(backend: str, kernel: str = "softmax") -> Callable:
    def run(q, k, v, causal, features):
        return performer.favor_attention(q, k, v, is_causal=causal, features=features, backend=backend,
                                         kernel=kernel)
    return run


def _favor_mapped(**map_options):
    """FAVOR with a FeatureMap on the C++ kernels: bidirectional calls take the statistics of their
    inputs; causal ones a map frozen once per input shape (as a calibrated model has)."""
    frozen = {}

    def run(q, k, v, causal, features):
        feature_map = performer.FeatureMap(**map_options)
        if causal:
            key = (tuple(q.shape), tuple(k.shape), q.dtype)
            if key not in frozen:
                frozen[key] = feature_map.freeze(q.detach(), k.detach())
            feature_map = frozen[key]
        return performer.favor_attention(q, k, v, is_causal=causal, features=features, feature_map=feature_map,
                                         backend="cpp")
    return run


def _sdpa(q, k, v, causal, features):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


@dataclass(frozen=True)
class AttentionSuite:
    batch: int
    heads: int
    dim: int
    num_features: int
    lengths: Sizes
    dtypes: tuple[str, ...]
    impls: tuple[Impl, ...]          # fn(q, k, v, causal, features) -> output
    modes: tuple[str, ...] = ("forward", "forward+backward")
    causal: tuple[bool, ...] = (False, True)


_TORCH_FAVOR = Impl("torch", "plain PyTorch", "FAVOR+ plain PyTorch", _favor("torch"), baseline=True, max_size=16384)

# The shape the performance targets are stated for: B=1, H=8, E=Ev=64, m=256. Exact attention and
# the plain-PyTorch FAVOR+ stop at L = 16384, where one forward+backward already takes them 13 s
# and 18 s on 2 cores; the C++ kernels go on to 65536.
ATTENTION = AttentionSuite(
    batch=1, heads=8, dim=64, num_features=256,
    lengths=Sizes(full=(512, 1024, 2048, 4096, 8192, 16384, 32768, 65536), quick=(512, 1024, 2048, 4096)),
    dtypes=("float32",),
    impls=(Impl("cpp", "performer", "FAVOR+ performer (C++)", _favor("cpp")),
           Impl("cpp++", "FAVOR++", "FAVOR++ rescaled, keys centered, performer (C++)", _favor_mapped(),
                vs=("cpp", "sdpa")),
           Impl("cpp-nk", "normalized", "FAVOR+ normalized keys (kernel='softmax_normalized'), performer (C++)",
                _favor("cpp", "softmax_normalized"), vs=("cpp", "sdpa")),
           Impl("sdpa", "SDPA", "torch SDPA (exact)", _sdpa, baseline=True, max_size=16384),
           _TORCH_FAVOR))


# On CUDA GPUs: B=4, H=16, E=64 (--dim 128 for the other shape the targets name), m=256, bfloat16,
# the Triton and the CUDA C++ kernels against SDPA (its flash backend) and the plain-PyTorch FAVOR+.
ATTENTION_GPU = AttentionSuite(
    batch=4, heads=16, dim=64, num_features=256,
    lengths=Sizes(full=(1024, 2048, 4096, 8192, 16384, 32768, 65536), quick=(1024, 4096, 16384)),
    dtypes=("bfloat16",),
    impls=(Impl("triton", "Triton", "FAVOR+ performer (Triton)", _favor("triton"), devices=("cuda",)),
           Impl("cpp", "CUDA C++", "FAVOR+ performer (CUDA C++)", _favor("cpp"), devices=("cuda",)),
           Impl("sdpa", "SDPA", "torch SDPA (exact)", _sdpa, baseline=True),
           _TORCH_FAVOR))


def attention_suite(device: str) -> AttentionSuite:
    return ATTENTION_GPU if device == "cuda" else ATTENTION


def favor_flops(spec: AttentionSuite, L: int, causal: bool, mode: str, chunk: int = 64) -> float:
    """Floating-point operations of one FAVOR+ call as the kernels run it (a multiply-add is 2), for
    L = S and E = Ev = dim: per (batch, head) and row, four products of m x dim (the feature
    projections of q and k, the key state, the output) forward; the backward recomputes the
    projections and takes 8 more bidirectionally, 11 causally (each sweep recomputes them). Causal
    mode adds the intra-chunk products, chunk x (m + dim) per row (1 forward, 3 backward). The
    normalizer column (m per row) is left out."""
    m, d = spec.num_features, spec.dim
    products = {"forward": 4, "forward+backward": 15 if causal else 12}[mode]
    intra = (1 if mode == "forward" else 4) * min(chunk, L) * (m + d) if causal else 0
    per_row = products * m * d + intra
    return 2.0 * spec.batch * spec.heads * L * per_row


# The FMA peak the CPU attention and matmul tables compare with: the best of 5 measurements of 0.1 s.
PEAK_TRIES = (5, 0.1)


@dataclass(frozen=True)
class MatmulShape:
    name: str
    batch: int
    M: int
    K: int
    N: int
    a_transposed: bool = False       # a is read as a transposed view, as FAVOR+ reads phi(K)^T

    @property
    def flops(self) -> float:
        return 2.0 * self.batch * self.M * self.K * self.N


@dataclass(frozen=True)
class MatmulSuite:
    square: Sizes
    favor_shapes: tuple[MatmulShape, ...]
    dtypes: tuple[str, ...]
    impls: tuple[Impl, ...]          # fn(a, b) -> a @ b


def _blocked(backend: str) -> Callable:
    return lambda a, b: performer.blocked_matmul(a, b, backend=backend)


# The FAVOR+ products of B=1, H=8, L=8192, E=64, m=256: the feature projection (8 heads x 8192
# rows) x W^T, the key state phi(K)^T V per head, and the output phi(Q) S.
MATMUL = MatmulSuite(
    square=Sizes(full=(256, 512, 1024, 2048, 4096), quick=(256, 512, 1024)),
    favor_shapes=(MatmulShape("favor projection", 1, 8 * 8192, 64, 256),
                  MatmulShape("favor state", 8, 256, 8192, 64, a_transposed=True),
                  MatmulShape("favor output", 1, 8192, 256, 64)),
    dtypes=("float32", "bfloat16"),
    impls=(Impl("cpp", "performer", "performer.blocked_matmul (C++)", _blocked("cpp")),
           Impl("triton", "Triton", "performer.blocked_matmul (Triton)", _blocked("triton"), devices=("cuda",)),
           Impl("torch", "torch.matmul", "torch.matmul", torch.matmul, baseline=True)))


@dataclass(frozen=True)
class AccuracyInputs:
    """q and k are temperature * N(0, 1) (v is N(0, 1)), then optionally made anisotropic (per
    dimension, q scaled by e^N(0, 1) and k by its inverse, as in trained attention) or given a
    shared key offset (N(0, 1) per head, added to every key)."""
    name: str
    temperature: float
    anisotropic: bool = False
    offset: bool = False


def _estimator(sampler: str = "orthogonal", antithetic: bool = False, scaling: str = "chi", kernel: str = "softmax",
               **feature_map):
    """fn(m, dim, generator, dtype) -> favor_attention's features, feature_map and kernel arguments,
    for the accuracy suite."""
    def make(m, dim, generator, dtype):
        draw = performer.simplex_features if sampler == "simplex" else performer.orthogonal_features
        features = draw(m, dim, generator=generator, dtype=dtype, antithetic=antithetic, scaling=scaling)
        return dict(features=features, kernel=kernel, feature_map=performer.FeatureMap(
            **dict(dict(kind="favor+", rescale=False, center_keys=False), **feature_map)))
    return make


@dataclass(frozen=True)
class AccuracySuite:
    length: int
    heads: int
    dim: int
    inputs: tuple[AccuracyInputs, ...]
    num_features: Sizes
    draws: Sizes                     # independent feature draws per point
    dtype: str
    impls: tuple[Impl, ...]          # the estimators: fn(m, dim, generator, dtype) -> (features, FeatureMap)


# A property of the approximation, not of a device: computed on the CPU in float64.
ACCURACY = AccuracySuite(
    length=1024, heads=4, dim=64,
    inputs=(AccuracyInputs("isotropic", 0.25), AccuracyInputs("isotropic", 0.5),
            AccuracyInputs("anisotropic", 0.25, anisotropic=True), AccuracyInputs("anisotropic", 0.5, anisotropic=True),
            AccuracyInputs("key offset", 0.5, offset=True)),
    num_features=Sizes(full=(16, 64, 256, 1024, 4096), quick=(256,)),
    draws=Sizes(full=(10,), quick=(3,)), dtype="float64",
    impls=(Impl("favor+", "FAVOR+", "FAVOR+ (orthogonal features)", _estimator(), baseline=True),
           Impl("simplex", "simplex", "FAVOR+, simplex features", _estimator("simplex")),
           Impl("favor++", "FAVOR++", "FAVOR++", _estimator(kind="favor++")),
           Impl("favor++ antithetic", "FAVOR++ anti", "FAVOR++, antithetic orthogonal features",
                _estimator(antithetic=True, kind="favor++")),
           Impl("rescale+center", "rescale+center", "FAVOR+, rescaled, keys centered",
                _estimator(rescale=True, center_keys=True)),
           Impl("all", "all", "FAVOR++, antithetic, rescaled, keys centered",
                _estimator(antithetic=True, kind="favor++", rescale=True, center_keys=True)),
           Impl("fixed norm", "fixed norm", "FAVOR+, antithetic orthogonal features of norm sqrt(d), rescaled, "
                "keys centered", _estimator(antithetic=True, scaling="sqrt_d", rescale=True, center_keys=True)),
           Impl("normalized", "normalized", "FAVOR+, normalized keys (kernel='softmax_normalized')",
                _estimator(kernel="softmax_normalized")),
           Impl("fixed norm normalized", "fixed norm + nk", "fixed norm with normalized keys",
                _estimator(antithetic=True, scaling="sqrt_d", rescale=True, center_keys=True,
                           kernel="softmax_normalized"))))


@dataclass(frozen=True)
class DecodeSuite:
    batches: tuple[int, ...]         # B = 1: one sequence; more: batched decoding
    heads: int
    dim: int
    num_features: int
    prefixes: Sizes
    max_tokens: int                  # largest batch x prefix run (SDPA's cache holds 2 x that x H x E floats)
    dtypes: tuple[str, ...]
    impls: tuple[Impl, ...]          # fn(prefix_k, prefix_v, features) -> step(q, k, v) for one token


def _favor_step_with(**options):
    def make(prefix_k, prefix_v, features):
        step = getattr(performer, "favor_attention_step", None)
        if step is None:
            raise NotImplementedError("performer.favor_attention_step is not in this version of performer")
        _, state = step(prefix_k, prefix_k, prefix_v, None, features=features, **options)  # the prefix's state
        # A decoder owns its state (performer.nn.DecodingCache, the Hugging Face FavorCache): updated in place.
        return lambda q, k, v: step(q, k, v, state, features=features, inplace=True, **options)
    return make


def _favor_step_with_map(prefix_k, prefix_v, features):
    """The fused step with a FeatureMap (FAVOR++, rescaling, key centering) frozen on the prefix:
    what a converted and calibrated model decodes with."""
    if getattr(performer, "FeatureMap", None) is None:
        raise NotImplementedError("performer.FeatureMap is not in this version of performer")
    fmap = performer.FeatureMap().freeze(prefix_k, prefix_k)
    return _favor_step_with(backend="cpp", feature_map=fmap)(prefix_k, prefix_v, features)


def _sdpa_kv_cache(prefix_k, prefix_v, features):
    """Exact attention with a preallocated key/value cache: write the new token, attend to all."""
    n = prefix_k.shape[-2]
    cache_k = torch.cat([prefix_k, prefix_k[..., :1, :]], dim=-2)
    cache_v = torch.cat([prefix_v, prefix_v[..., :1, :]], dim=-2)

    def step(q, k, v):
        cache_k[..., n:, :] = k
        cache_v[..., n:, :] = v
        return F.scaled_dot_product_attention(q, cache_k, cache_v)
    return step


DECODE = DecodeSuite(
    batches=(1, 16), heads=8, dim=64, num_features=256,
    prefixes=Sizes(full=(128, 512, 2048, 8192, 16384, 65536), quick=(128, 1024, 8192)), max_tokens=65536 * 4,
    dtypes=("float32",),
    impls=(Impl("step", "performer", "FAVOR+ performer.favor_attention_step, fused step (C++ on the CPU, the CUDA "
                "kernel on a GPU)", _favor_step_with(backend="cpp")),
           Impl("step_fmap", "performer FAVOR++", "the fused step with a frozen performer.FeatureMap (FAVOR++, "
                "rescaling, key centering: a converted model)", _favor_step_with_map),
           Impl("step_torch", "torch step", "FAVOR+ step in plain PyTorch (backend='torch')",
                _favor_step_with(backend="torch"), baseline=True),
           Impl("sdpa", "SDPA", "torch SDPA with a KV cache (exact)", _sdpa_kv_cache, baseline=True)))


@dataclass(frozen=True)
class CompressSuite:
    """A linear layer y = x W^T without bias, x (M, K) float32 and W (N, K) with N = K, pruned to
    `densities` of its `block`s and compressed, against dense products of the same (M, K, threads).
    A layer's speed-up over dense float32 can reach 1 / density; `target` x that is the aim."""
    rows: Sizes                      # M: one token, a few, a long prefill
    features: Sizes                  # K = N
    densities: Sizes                 # fraction of the blocks kept
    threads: Sizes                   # each measured at each (the run's --threads replaces them)
    block: tuple[int, int]
    dense: str                       # the baseline every speed-up x density is against
    target: float
    impls: tuple[Impl, ...]          # fn(layer, x) -> call; layer: the pruned and compressed
                                     # performer.nn.CompressedLinear for a sparse impl, else the dense nn.Linear


def _compressed(layer, x):
    return lambda: layer(x)


def _int8_compressed(activations):
    def make(layer, x):
        q = layer.quantize("int8", activations=activations)
        return lambda: q(x)
    return make


def _dense(layer, x):
    w = layer.weight.detach()
    return lambda: F.linear(x, w)


def _bfloat16(layer, x):
    xb, wb = x.bfloat16(), layer.weight.detach().bfloat16()
    return lambda: F.linear(xb, wb)


def _int8_dynamic(layer, x):
    with warnings.catch_warnings():  # torch.ao.quantization says it is deprecated, and still runs
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(nn.Sequential(layer), {nn.Linear}, dtype=torch.qint8)
    if not isinstance(q[0], torch.ao.nn.quantized.dynamic.Linear):
        raise RuntimeError(f"quantize_dynamic left the layer a {type(q[0]).__name__}")
    return lambda: q(x)


def _bsr(layer, x):
    """torch's own block-sparse product, on the blocks the subject keeps."""
    with warnings.catch_warnings():  # "Sparse BSR tensor support is in beta state"
        warnings.simplefilter("ignore")
        w = layer.weight.to_sparse_bsr(layer.block)
    return lambda: F.linear(x, w)


# Square layers of transformer widths at one token (decoding), a few tokens and a prefill, on 1 and
# 2 threads (the machine's cores), dense (density 1: every block kept) to 5% of the blocks; the
# block-sparse layer in float32 and in int8 (dynamic and weight-only). CPU only. torch's BSR product is the slow one: about 0.7 s at
# M = 256, K = 2048, density 0.5 on one thread.
COMPRESS = CompressSuite(
    rows=Sizes(full=(1, 16, 256), quick=(1, 256)), features=Sizes(full=(2048, 4096), quick=(2048,)),
    densities=Sizes(full=(1.0, 0.5, 0.25, 0.1, 0.05), quick=(1.0, 0.1)), threads=Sizes(full=(1, 2), quick=(1, 2)),
    block=(32, 32), dense="dense", target=0.75,
    impls=(Impl("compressed", "performer", "performer.nn.CompressedLinear (block-sparse)", _compressed, sparse=True),
           Impl("int8_dynamic", "performer int8", "performer.nn.Int8Linear (block-sparse, dynamic int8)",
                _int8_compressed("dynamic"), sparse=True, vs=("dense", "int8")),
           Impl("int8_weight_only", "performer w8", "performer.nn.Int8Linear (block-sparse, int8 weight-only)",
                _int8_compressed(None), sparse=True, vs=("dense", "int8")),
           Impl("dense", "fp32", "torch F.linear, float32 (dense)", _dense, baseline=True),
           Impl("bf16", "bf16", "torch F.linear, bfloat16 (dense)", _bfloat16, baseline=True),
           Impl("int8", "int8 dynamic", "torch dynamic int8 quantized Linear", _int8_dynamic, baseline=True),
           Impl("bsr", "torch BSR", "torch F.linear with a BSR weight (the same blocks)", _bsr, baseline=True,
                sparse=True)))


SUITES = {"attention": ATTENTION, "matmul": MATMUL, "accuracy": ACCURACY, "decode": DECODE, "compress": COMPRESS}


def on_device(impls: tuple[Impl, ...], device: str) -> list[Impl]:
    return [impl for impl in impls if device in impl.devices]


def impls(suite: str) -> dict[str, Impl]:
    """Every implementation a suite compares, on any device (first definition of a name wins)."""
    specs = (ATTENTION, ATTENTION_GPU) if suite == "attention" else (SUITES[suite],)
    found: dict[str, Impl] = {}
    for spec in specs:
        for impl in getattr(spec, "impls", ()):
            found.setdefault(impl.name, impl)
    return found

"""Turns the registry's suites into cases: one measurement each, with its inputs made on demand.

A timed case's `setup()` allocates the inputs and returns the call to time; a computed case
(accuracy, the FMA peak) has `evaluate()` instead, which returns its metrics.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import performer
from performer.bench import registry
from performer.bench.registry import Impl
from performer.nn import BlockedLinear


@dataclass
class Case:
    suite: str
    impl: str
    params: dict                          # what distinguishes it in its suite; the key in the JSON
    setup: Optional[Callable[[], Callable[[], object]]] = None
    evaluate: Optional[Callable[[], dict]] = None
    flops: Optional[float] = None         # per call, for GFLOP/s (setup may set it: the kept blocks' work)
    threads: Optional[int] = None         # torch's threads while it runs (restored after); None: the run's
    info: dict = field(default_factory=dict)  # what setup found (the kept density), added to the metrics

    def describe(self) -> str:
        return f"{self.suite} {self.impl} " + " ".join(f"{k}={v}" for k, v in self.params.items())


@dataclass
class Plan:
    """A suite's cases, what it ran with, and the implementations it had to leave out and why."""
    suite: str
    settings: dict
    cases: list[Case] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)   # impl -> reason
    unavailable: Optional[str] = None                        # why the whole suite cannot run


DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _randn(shape, generator, dtype, device) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def attention_inputs(spec: registry.AttentionSuite, L: int, dtype: torch.dtype, device: str = "cpu",
                     requires_grad: bool = False, seed: int = 0):
    """q, k, v of shape (B, H, L, E) and the (m, E) features, the same for every implementation."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (_randn((spec.batch, spec.heads, L, spec.dim), g, dtype, device).requires_grad_(requires_grad)
               for _ in range(3))
    return q, k, v, performer.orthogonal_features(spec.num_features, spec.dim, generator=g).to(device)


def attention_call(impl: Impl, q, k, v, causal: bool, features, mode: str) -> Callable[[], object]:
    if mode == "forward":
        def run():
            with torch.no_grad():
                return impl.fn(q, k, v, causal, features)
        return run
    grad_out = torch.ones_like(v)

    def run_with_backward():
        return torch.autograd.grad(impl.fn(q, k, v, causal, features), (q, k, v), grad_out)
    return run_with_backward


def matmul_inputs(shape: registry.MatmulShape, dtype: torch.dtype, device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    a = (_randn((shape.batch, shape.K, shape.M), g, dtype, device).transpose(1, 2) if shape.a_transposed else
         _randn((shape.batch, shape.M, shape.K), g, dtype, device))
    return a, _randn((shape.batch, shape.K, shape.N), g, dtype, device)


def decode_inputs(spec: registry.DecodeSuite, batch: int, prefix: int, dtype: torch.dtype, device: str = "cpu"):
    """The prefix's keys and values, one new token's q, k, v, and the features."""
    g = torch.Generator().manual_seed(0)
    shape = (batch, spec.heads, prefix, spec.dim)
    prefix_k, prefix_v = _randn(shape, g, dtype, device), _randn(shape, g, dtype, device)
    q, k, v = (_randn((batch, spec.heads, 1, spec.dim), g, dtype, device) for _ in range(3))
    return prefix_k, prefix_v, (q, k, v), performer.orthogonal_features(spec.num_features, spec.dim, generator=g).to(device)


def decode_call(impl: Impl, prefix_k, prefix_v, token, features) -> Callable[[], object]:
    step = impl.fn(prefix_k, prefix_v, features)
    return lambda: step(*token)


def _shape(spec) -> dict:
    return {"batch": spec.batch, "heads": spec.heads, "dim": spec.dim, "num_features": spec.num_features}


def _attention_case(spec, impl, L, causal, mode, dtype, device) -> Optional[Case]:
    if impl.max_size is not None and L > impl.max_size:
        return None

    def setup():
        q, k, v, w = attention_inputs(spec, L, DTYPES[dtype], device, requires_grad=mode != "forward")
        return attention_call(impl, q, k, v, causal, w, mode)
    flops = registry.favor_flops(spec, L, causal, mode) if not impl.baseline else None  # the kernels' work
    return Case("attention", impl.name, {"L": L, "causal": causal, "mode": mode, "dtype": dtype}, setup, flops=flops)


def _matmul_case(impl, shape, dtype, device) -> Case:
    def setup():
        a, b = matmul_inputs(shape, DTYPES[dtype], device)
        return lambda: impl.fn(a, b)
    params = {"shape": shape.name, "batch": shape.batch, "M": shape.M, "K": shape.K, "N": shape.N, "dtype": dtype}
    return Case("matmul", impl.name, params, setup, flops=shape.flops)


def _decode_case(spec, impl, batch, prefix, dtype, device) -> Case:
    def setup():
        prefix_k, prefix_v, token, w = decode_inputs(spec, batch, prefix, DTYPES[dtype], device)
        return decode_call(impl, prefix_k, prefix_v, token, w)
    return Case("decode", impl.name, {"batch": batch, "prefix": prefix, "dtype": dtype}, setup)


def _unavailable(probe: Case) -> Optional[str]:
    """Why an implementation cannot run here, found by running a tiny case; None when it can."""
    try:
        probe.setup()()
    except (ValueError, RuntimeError, NotImplementedError) as e:
        return str(e).splitlines()[0]
    return None


def _plan(suite: str, settings: dict, impls, make_case, grid: list[dict], tiny: dict, device: str) -> Plan:
    """make_case(impl, **point) for every point of the grid and every impl meant for the device that
    runs here (tried on make_case(impl, **tiny) first); make_case returns None where the impl does
    not run."""
    plan = Plan(suite, settings)
    runnable = []
    for impl in registry.on_device(impls, device):
        reason = _unavailable(make_case(impl, **tiny))
        if reason is None:
            runnable.append(impl)
        else:
            plan.skipped[impl.name] = reason
    if all(impl.baseline for impl in runnable):
        plan.unavailable = "; ".join(f"{name}: {why}" for name, why in plan.skipped.items())
        return plan
    plan.cases = [case for point in grid for impl in runnable if (case := make_case(impl, **point)) is not None]
    return plan


def plan_attention(spec: registry.AttentionSuite, lengths, dtypes, device: str) -> Plan:
    def make(impl, **point):
        return _attention_case(spec, impl, device=device, **point)
    grid = [dict(L=L, causal=c, mode=mode, dtype=dt)
            for dt in dtypes for c in spec.causal for mode in spec.modes for L in lengths]
    plan = _plan("attention", _shape(spec), spec.impls, make, grid, dict(grid[0], L=16), device)
    if device == "cpu" and not plan.unavailable:
        plan.cases.insert(0, peak_case("attention"))
    return plan


def plan_matmul(spec: registry.MatmulSuite, square, dtypes, device: str, with_favor_shapes: bool) -> Plan:
    shapes = [registry.MatmulShape(f"square {n}", 1, n, n, n) for n in square]
    shapes += list(spec.favor_shapes) if with_favor_shapes else []

    def make(impl, **point):
        return _matmul_case(impl, device=device, **point)
    grid = [dict(shape=s, dtype=dt) for dt in dtypes for s in shapes]
    tiny = dict(grid[0], shape=registry.MatmulShape("tiny", 1, 8, 8, 8))
    plan = _plan("matmul", {"threads": torch.get_num_threads()}, spec.impls, make, grid, tiny, device)
    if device == "cpu" and not plan.unavailable:
        plan.cases.insert(0, peak_case("matmul"))
    return plan


def peak_case(suite: str, threads: Optional[int] = None) -> Case:
    """The CPU's measured float32 FMA peak on `threads` (default: torch's thread count): the best of
    registry.PEAK_TRIES (the first may find the cores cold)."""
    threads = threads or torch.get_num_threads()
    count, seconds = registry.PEAK_TRIES
    return Case(suite, "peak", {"dtype": "float32", "threads": threads}, threads=threads, evaluate=lambda: {
        "gflops": max(torch.ops.performer.cpu_fma_peak_gflops(threads, seconds) for _ in range(count))})


def plan_decode(spec: registry.DecodeSuite, prefixes, dtypes, device: str) -> Plan:
    def make(impl, **point):
        return _decode_case(spec, impl, device=device, **point)
    grid = [dict(batch=b, prefix=n, dtype=dt) for dt in dtypes for b in spec.batches for n in prefixes
            if b * n <= spec.max_tokens]
    settings = {"batches": spec.batches, "heads": spec.heads, "dim": spec.dim, "num_features": spec.num_features}
    return _plan("decode", settings, spec.impls, make, grid, dict(grid[0], batch=1, prefix=4), device)


def compress_layer(spec: registry.CompressSuite, K: int, density: Optional[float]) -> nn.Module:
    """The (K, K) layer without bias from torch.manual_seed(0), the same initial weight for every
    implementation: pruned to `density` of its blocks by block magnitude and compressed (a
    performer.nn.CompressedLinear), or, with density None, dense (a plain nn.Linear, which
    quantize_dynamic converts; it leaves subclasses alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if density is None:
            return nn.Linear(K, K, bias=False)
        return BlockedLinear(K, K, bias=False).prune(1 - density, block=spec.block).compress()


def compress_call(impl: Impl, layer: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    run = impl.fn(layer, x)

    def call():
        with torch.no_grad():
            return run()
    return call


def _compress_case(spec, impl, M, K, threads, density) -> Case:
    def setup():
        layer = compress_layer(spec, K, density)
        if density is not None:  # whole blocks are kept: the density is that of a whole number of them
            case.info["density"] = layer.density
            case.flops = None if impl.baseline else 2.0 * M * K * K * layer.density
        return compress_call(impl, layer, torch.randn(M, K, generator=torch.Generator().manual_seed(1)))
    params = {"M": M, "K": K, "N": K, "threads": threads} | ({} if density is None else {"density": density})
    case = Case("compress", impl.name, params, setup, threads=threads)  # setup fills in its density and flops
    return case


def plan_compress(spec: registry.CompressSuite, rows, features, densities, threads, device: str) -> Plan:
    """Every impl at every (K, threads, M); the sparse ones at every density too, the dense ones once
    (at the first density's point); and the FMA peak at each thread count."""
    settings = {"block": list(spec.block), "dtype": "float32", "target": spec.target}
    if device != "cpu":
        return Plan("compress", settings, unavailable="CPU only (the block-sparse kernels run on the CPU)")

    def make(impl, density, **point):
        if not impl.sparse and density != densities[0]:
            return None
        return _compress_case(spec, impl, density=density if impl.sparse else None, **point)
    grid = [dict(K=K, threads=t, M=M, density=d) for K in features for t in threads for M in rows for d in densities]
    plan = _plan("compress", settings, spec.impls, make, grid, dict(grid[0], K=64, M=2), device)
    if not plan.unavailable:
        plan.cases[:0] = [peak_case("compress", t) for t in threads]
    return plan


def accuracy_inputs(spec: registry.AccuracySuite, inputs: registry.AccuracyInputs):
    """q, k, v (1, H, L, E) of an accuracy case (the same for every estimator and m)."""
    dtype = DTYPES[spec.dtype]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, spec.heads, spec.length, spec.dim, generator=g, dtype=dtype) for _ in range(3))
    q, k = q * inputs.temperature, k * inputs.temperature
    if inputs.anisotropic:
        s = torch.exp(torch.randn(1, spec.heads, 1, spec.dim, generator=g, dtype=dtype))
        q, k = q * s, k / s
    if inputs.offset:
        k = k + torch.randn(1, spec.heads, 1, spec.dim, generator=g, dtype=dtype)
    return q, k, v


def accuracy_errors(spec: registry.AccuracySuite, inputs: registry.AccuracyInputs, impl: Impl, m: int,
                    draws: int) -> dict:
    """Relative error ||estimate - exact|| / ||exact|| over independent feature draws (median and
    spread), and that of the uniform average of the values (the error of ignoring the queries)."""
    q, k, v = accuracy_inputs(spec, inputs)
    exact = F.scaled_dot_product_attention(q, k, v)
    norm = exact.norm()
    errors = []
    for draw in range(draws):
        estimator = impl.fn(m, spec.dim, torch.Generator().manual_seed(100 + draw), q.dtype)
        out = performer.favor_attention(q, k, v, **estimator)
        errors.append(((out - exact).norm() / norm).item())
    uniform = (v.mean(dim=-2, keepdim=True).expand_as(exact) - exact).norm() / norm
    return {"rel_error": statistics.median(errors), "rel_error_spread": max(errors) - min(errors),
            "draws": draws, "uniform_rel_error": uniform.item()}


def plan_accuracy(spec: registry.AccuracySuite, num_features, draws: int) -> Plan:
    plan = Plan("accuracy", {"L": spec.length, "heads": spec.heads, "dim": spec.dim, "dtype": spec.dtype,
                             "draws": draws, "device": "cpu"})
    for inputs in spec.inputs:
        for m in num_features:
            for impl in spec.impls:
                plan.cases.append(Case("accuracy", impl.name,
                                       {"inputs": inputs.name, "temperature": inputs.temperature, "num_features": m},
                                       evaluate=lambda i=inputs, x=impl, m=m: accuracy_errors(spec, i, x, m, draws)))
    return plan

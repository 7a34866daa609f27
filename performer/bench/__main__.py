"""Microbenchmarks of FAVOR+ against exact attention and of blocked_matmul against torch.matmul,
measured in one run.

    python -m performer.bench                  # every suite, full sizes
    python -m performer.bench --quick          # the short demo (about two minutes)
    python -m performer.bench attention --lengths 1024 4096 --threads 2
    python -m performer.bench matmul

Every ratio in a table is against a baseline measured in the same run on the same machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

import performer
from performer.bench.timing import machine_info, peak_extra_memory_mb, time_fn, write_json

# The attention benchmark shape (the performance targets are stated for it): B=1, H=8, E=Ev=64, m=256.
SHAPE = dict(batch=1, heads=8, dim=64, num_features=256)
LENGTHS = [512, 1024, 2048, 4096, 8192, 16384]
QUICK_LENGTHS = [512, 1024, 2048, 4096]
# name -> (label, function(q, k, v, causal, features)); the first two are the baselines.
IMPLS = {
    "sdpa": ("torch SDPA (exact)", lambda q, k, v, c, w: F.scaled_dot_product_attention(q, k, v, is_causal=c)),
    "torch": ("FAVOR+ plain PyTorch",
              lambda q, k, v, c, w: performer.favor_attention(q, k, v, is_causal=c, features=w, backend="torch")),
    "cpp": ("FAVOR+ performer (C++)",
            lambda q, k, v, c, w: performer.favor_attention(q, k, v, is_causal=c, features=w, backend="cpp")),
}
MEMORY_LENGTH = 65536
SUITES = ("attention", "accuracy", "memory", "matmul", "all")

# Matrix products: (name, batch, M, K, N, a transposed?). The FAVOR+ shapes are those of B=1, H=8,
# L=8192, E=64, m=256: feature projection (8 heads x 8192 rows) x W^T, the key state phi(K)^T V
# per head (phi(K)^T read as a transposed view), and the output phi(Q) S.
MATMUL_SQUARE = [256, 512, 1024, 2048, 4096]
QUICK_MATMUL_SQUARE = [256, 512, 1024]
MATMUL_FAVOR = [("favor projection (8*8192 x 64) x (64 x 256)", 1, 8 * 8192, 64, 256, False),
                ("favor state 8 x (256 x 8192) x (8192 x 64)", 8, 256, 8192, 64, True),
                ("favor output (8192 x 256) x (256 x 64)", 1, 8192, 256, 64, False)]
MATMUL_IMPLS = {"torch": ("torch.matmul", torch.matmul),
                "cpp": ("performer.blocked_matmul (C++)", lambda a, b: performer.blocked_matmul(a, b, backend="cpp"))}


def make_inputs(L: int, dtype: torch.dtype, seed: int = 0, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    B, H, E, m = SHAPE["batch"], SHAPE["heads"], SHAPE["dim"], SHAPE["num_features"]
    q, k, v = (torch.randn(B, H, L, E, generator=g, dtype=dtype).requires_grad_(requires_grad) for _ in range(3))
    return q, k, v, performer.orthogonal_features(m, E, generator=g)


def attention_suite(lengths, dtype, budget_s) -> list[dict]:
    rows = []
    for causal in (False, True):
        for L in lengths:
            q, k, v, w = make_inputs(L, dtype, requires_grad=True)
            for mode in ("forward", "forward+backward"):
                row = {"L": L, "causal": causal, "mode": mode}
                for name, (_, fn) in IMPLS.items():
                    if mode == "forward":
                        def run():
                            with torch.no_grad():
                                fn(q, k, v, causal, w)
                    else:
                        def run():
                            fn(q, k, v, causal, w).sum().backward()
                    t = time_fn(run, budget_s=budget_s, max_repeats=10)
                    row[name] = {"median_ms": t.median_ms, "spread_ms": t.spread_ms, "repeats": t.repeats,
                                 "noisy": t.noisy}
                rows.append(row)
                print_progress(row)
    return rows


def print_progress(row):
    cells = "  ".join(f"{n} {row[n]['median_ms']:8.1f} ms" for n in IMPLS)
    print(f"  L={row['L']:6d} {'causal' if row['causal'] else 'bidir '} {row['mode']:17s} {cells}", flush=True)


def memory_suite(threads: int) -> dict:
    """Peak extra memory of FAVOR+ (C++) forward+backward at L = 65536, causal and bidirectional."""
    out = {}
    for causal in (False, True):
        code = f"""
import torch, performer
from performer.bench.__main__ import make_inputs
def setup():
    global q, k, v, w, go
    q, k, v, w = make_inputs({MEMORY_LENGTH}, torch.float32, requires_grad=True)
    go = torch.ones_like(v)
def run():
    performer.favor_attention(q, k, v, is_causal={causal}, features=w).backward(go)
"""
        B, H, E = SHAPE["batch"], SHAPE["heads"], SHAPE["dim"]
        tensor_mb = B * H * MEMORY_LENGTH * E * 4 / 2**20
        out["causal" if causal else "bidirectional"] = {
            "L": MEMORY_LENGTH, "peak_extra_mb": peak_extra_memory_mb(code, threads),
            # q, k, v, the output and their gradients: 8 tensors of (B, H, L, E) float32
            "inputs_outputs_grads_mb": 8 * tensor_mb}
    return out


def accuracy_suite(features_list, L: int = 1024, draws: int = 3) -> list[dict]:
    """Relative error of FAVOR+ to exact softmax attention as the number of features grows."""
    rows = []
    for temperature in (0.25, 0.5):
        g = torch.Generator().manual_seed(1)
        B, H, E = 1, 4, SHAPE["dim"]
        q, k, v = (torch.randn(B, H, L, E, generator=g, dtype=torch.float64) for _ in range(3))
        q, k = q * temperature, k * temperature
        exact = F.scaled_dot_product_attention(q, k, v)
        norm = exact.norm()
        uniform = (v.mean(dim=-2, keepdim=True).expand_as(exact) - exact).norm() / norm
        for m in features_list:
            errs = []
            for d in range(draws):
                w = performer.orthogonal_features(m, E, generator=torch.Generator().manual_seed(100 + d),
                                                  dtype=torch.float64)
                errs.append(((performer.favor_attention(q, k, v, features=w) - exact).norm() / norm).item())
            rows.append({"temperature": temperature, "num_features": m, "rel_error": sum(errs) / draws,
                         "uniform_rel_error": uniform.item()})
    return rows


def matmul_suite(square, dtypes, budget_s, threads) -> dict:
    """GFLOP/s of blocked_matmul and torch.matmul, and the measured FMA peak, in one run."""
    shapes = [(f"square {n}", 1, n, n, n, False) for n in square] + MATMUL_FAVOR
    peak = torch.ops.performer.cpu_fma_peak_gflops(threads, 0.5)
    print(f"  measured float32 FMA peak: {peak:.0f} GFLOP/s on {threads} threads")
    rows = []
    for dtype in dtypes:
        for name, batch, M, K, N, transposed in shapes:
            g = torch.Generator().manual_seed(0)
            a = (torch.randn(batch, K, M, generator=g).transpose(1, 2) if transposed else
                 torch.randn(batch, M, K, generator=g)).to(dtype)
            b = torch.randn(batch, K, N, generator=g).to(dtype)
            flops = 2.0 * batch * M * K * N
            row = {"shape": name, "batch": batch, "M": M, "K": K, "N": N, "dtype": str(dtype).replace("torch.", "")}
            for impl, (_, fn) in MATMUL_IMPLS.items():
                t = time_fn(lambda: fn(a, b), budget_s=budget_s, max_repeats=20, warmup=2)
                row[impl] = {"median_ms": t.median_ms, "spread_ms": t.spread_ms, "repeats": t.repeats,
                             "noisy": t.noisy, "gflops": flops / t.median_ms * 1e-6}
            rows.append(row)
            print(f"  {row['dtype']:8s} {name:45s} " + "  ".join(
                f"{impl} {row[impl]['gflops']:6.0f} GFLOP/s" for impl in MATMUL_IMPLS), flush=True)
    return {"peak_gflops": peak, "rows": rows}


def format_matmul(result) -> str:
    peak = result["peak_gflops"]
    lines = [f"Measured FMA peak: {peak:.0f} GFLOP/s (float32).", "",
             "| shape | dtype | torch.matmul GFLOP/s | performer GFLOP/s | vs torch.matmul | % of peak |",
             "|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        t, c = r["torch"]["gflops"], r["cpp"]["gflops"]
        flag = " (noisy)" if r["torch"]["noisy"] or r["cpp"]["noisy"] else ""
        lines.append(f"| {r['shape']} | {r['dtype']} | {t:.0f} | {c:.0f}{flag} | {c / t:.2f}x | {100 * c / peak:.0f}% |")
    return "\n".join(lines)


def format_attention(rows) -> str:
    lines = ["| L | mode | causal | SDPA ms | plain PyTorch ms | performer ms | vs SDPA | vs plain PyTorch |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        s, t, c = (r[n]["median_ms"] for n in ("sdpa", "torch", "cpp"))
        flag = " (noisy)" if any(r[n]["noisy"] for n in IMPLS) else ""
        lines.append(f"| {r['L']} | {r['mode']} | {'yes' if r['causal'] else 'no'} | {s:.1f} | {t:.1f} | "
                     f"{c:.1f}{flag} | {s / c:.2f}x | {t / c:.2f}x |")
    return "\n".join(lines)


def format_accuracy(rows) -> str:
    lines = ["| input scale | m | relative error vs exact | uniform-average error |", "|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['temperature']} | {r['num_features']} | {r['rel_error']:.4f} | "
                     f"{r['uniform_rel_error']:.4f} |")
    return "\n".join(lines)


def format_memory(mem) -> str:
    lines = ["| mode | L | peak extra MiB | q,k,v,out and grads MiB |", "|---|---:|---:|---:|"]
    for mode, r in mem.items():
        lines.append(f"| {mode} | {r['L']} | {r['peak_extra_mb']:.0f} | {r['inputs_outputs_grads_mb']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m performer.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suites", nargs="*", metavar="SUITE",
                        help=f"one or more of {', '.join(SUITES)} (default: all; with --quick: attention accuracy matmul)")
    parser.add_argument("--quick", action="store_true", help="short lengths and budgets (the demo)")
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths L = S")
    parser.add_argument("--sizes", type=int, nargs="+", help="square matmul sizes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--out", default=None, help="directory for the JSON and markdown results")
    args = parser.parse_args(argv)
    unknown = [x for x in args.suites if x not in SUITES]
    if unknown:
        parser.error(f"unknown suite {unknown[0]!r}; choose from {', '.join(SUITES)}")
    suites = set(args.suites or (["attention", "accuracy", "matmul"] if args.quick else ["all"]))
    if "all" in suites:
        suites = {"attention", "accuracy", "memory", "matmul"}
    torch.set_num_threads(args.threads)
    info = machine_info()
    B, H, E, m = SHAPE["batch"], SHAPE["heads"], SHAPE["dim"], SHAPE["num_features"]
    header = (f"{info['cpu']}, {info['threads']} threads, torch {info['torch']}, kernels {info.get('cpu_isa')}, "
              f"{info['date']}")
    print(f"performer benchmarks: {header}")
    report = [f"Machine: {header}", ""]
    payload = {"machine": info, "shape": SHAPE}
    if "attention" in suites:
        lengths = args.lengths or (QUICK_LENGTHS if args.quick else LENGTHS)
        print(f"attention: B={B} H={H} E=Ev={E} m={m} float32")
        rows = attention_suite(lengths, torch.float32, budget_s=0.5 if args.quick else 2.0)
        payload["attention"] = rows
        report += [f"### Attention time, B={B} H={H} E=Ev={E} m={m}, float32 (median of repeats)", "",
                   format_attention(rows), ""]
    if "accuracy" in suites:
        print("accuracy: FAVOR+ vs exact softmax attention, L=1024, E=64, float64")
        rows = accuracy_suite([64, 256, 1024] if args.quick else [16, 64, 256, 1024, 4096])
        payload["accuracy"] = rows
        report += ["### Accuracy: relative error to exact attention (mean of 3 feature draws)", "",
                   format_accuracy(rows), ""]
    if "memory" in suites:
        print(f"memory: forward+backward at L={MEMORY_LENGTH}")
        mem = memory_suite(args.threads)
        payload["memory"] = mem
        report += [f"### Peak extra memory, forward+backward, L={MEMORY_LENGTH}", "", format_memory(mem), ""]
    if "matmul" in suites:
        print(f"matmul: blocked_matmul vs torch.matmul, {args.threads} threads")
        result = matmul_suite(args.sizes or (QUICK_MATMUL_SQUARE if args.quick else MATMUL_SQUARE),
                              [torch.float32, torch.bfloat16], budget_s=0.3 if args.quick else 1.0,
                              threads=args.threads)
        payload["matmul"] = result
        report += [f"### Matrix multiply, {args.threads} threads (median of repeats)", "", format_matmul(result), ""]
    text = "\n".join(report)
    print("\n" + text)
    if args.out:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        write_json(os.path.join(args.out, f"bench-cpu-{stamp}.json"), payload)
        with open(os.path.join(args.out, f"bench-cpu-{stamp}.md"), "w") as f:
            f.write(text)
        print(f"results written to {args.out}/bench-cpu-{stamp}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Microbenchmarks of FAVOR+ attention, blocked_matmul and compressed linear layers against exact
attention, torch.matmul and torch's dense and quantized layers, measured in one run, with tables,
JSON and PNG plots.

    python -m performer.bench --quick            # every suite at short sizes (the demo, about 2 minutes)
    python -m performer.bench                    # every suite at full sizes
    python -m performer.bench attention --lengths 1024 4096 --threads 2
    python -m performer.bench matmul --dtype bfloat16 --compare bench/results/bench-cpu-....json
    python -m performer.bench compress --quick   # block-sparse float32 and int8 layers vs torch's

Suites: attention (FAVOR+ bidirectional and causal vs SDPA and the plain-PyTorch FAVOR+, forward
and forward+backward, time and peak memory vs sequence length), matmul (GFLOP/s vs torch.matmul
and the measured FMA peak), accuracy (FAVOR+ error vs exact attention as the number of features
grows), decode (cost of one token vs prefix length), compress (a block-pruned
performer.nn.CompressedLinear and its int8 forms, performer.nn.Int8Linear dynamic and weight-only,
vs torch's dense float32, bfloat16, dynamic int8 and BSR products, time vs density from 1 (dense)
down, at 1 and 2 threads), all.

Each measurement: a first call (the peak memory it adds is recorded), a warm-up call unless the
first took over 50 ms, then repeats until the time budget has passed (at least 3), reported as
median and interquartile range; a range above 10% of the median is flagged noisy. Threads are
fixed for the run (compress sets each case's own, then restores them); on CUDA, times come from
CUDA events after synchronization. Every ratio is against a baseline measured in the same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch

from performer.bench import cases, registry, report, runner
from performer.bench.timing import CpuCounters, machine_info, others_cpu_share

SUITES = ("attention", "matmul", "accuracy", "decode", "compress")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m performer.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suites", nargs="*", metavar="SUITE", help=f"any of {', '.join(SUITES)}, all (default: all)")
    parser.add_argument("--quick", action="store_true", help="short sizes and time budgets (the demo)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where attention, matmul and decode run (cuda: timed with CUDA events); accuracy is "
                             "computed on the CPU in float64")
    parser.add_argument("--dtype", nargs="+", choices=tuple(cases.DTYPES), metavar="DTYPE",
                        help=f"dtypes of attention, matmul and decode, of {', '.join(cases.DTYPES)} "
                             "(default: float32; matmul float32 and bfloat16; compress: float32 always)")
    parser.add_argument("--lengths", type=int, nargs="+", metavar="L",
                        help="sequence lengths of attention and prefix lengths of decode")
    parser.add_argument("--dim", type=int, metavar="E", help="attention head size (default: 64)")
    parser.add_argument("--sizes", type=int, nargs="+", metavar="N",
                        help="square matmul sizes (replace the default square and FAVOR+ shapes), and compress's "
                             "K = N (multiples of its block, 32)")
    parser.add_argument("--threads", type=int,
                        help=f"CPU threads, fixed for the run (default here: {torch.get_num_threads()}); compress "
                             "runs at each of 1 and 2 unless it is given")
    parser.add_argument("--budget", type=float, metavar="SECONDS",
                        help="time spent repeating each measurement (default 1.0; --quick 0.15)")
    parser.add_argument("--out", default=os.path.join("bench", "results"),
                        help="directory for the JSON, markdown and PNG results (default: bench/results)")
    parser.add_argument("--compare", metavar="FILE", help="print the change against an earlier JSON result")
    args = parser.parse_args(argv)
    unknown = [s for s in args.suites if s not in SUITES + ("all",)]
    if unknown:
        parser.error(f"unknown suite {unknown[0]!r}; choose from {', '.join(SUITES)}, all")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: CUDA is not available to this torch ({torch.__version__})")
    if args.dim is not None and args.dim < 1:
        parser.error("--dim must be a positive integer")
    for name in ("lengths", "sizes"):
        if any(n < 1 for n in getattr(args, name) or ()):
            parser.error(f"--{name} must be positive integers")
    if (args.threads is not None and args.threads < 1) or (args.budget is not None and args.budget < 0):
        parser.error("--threads must be at least 1 and --budget at least 0")
    args.suites = [s for s in SUITES if s in args.suites or "all" in args.suites or not args.suites]
    block = registry.COMPRESS.block
    if "compress" in args.suites and any(n % math.lcm(*block) for n in args.sizes or ()):
        parser.error(f"--sizes must be multiples of {math.lcm(*block)} for compress (its {block[0]}x{block[1]} "
                     "blocks: torch's BSR product takes whole ones)")
    args.compress_threads = (args.threads,) if args.threads else None
    args.threads = args.threads or torch.get_num_threads()
    if args.compare:
        try:
            args.compare_with = report.load_results(args.compare)
        except report.ResultsError as e:
            parser.error(f"--compare: {e}")
    return args


def plan(args) -> list[cases.Plan]:
    quick = args.quick
    plans = []
    for suite in args.suites:
        if suite == "attention":
            spec = registry.attention_suite(args.device)
            if args.dim:
                spec = dataclasses.replace(spec, dim=args.dim)
            plans.append(cases.plan_attention(spec, args.lengths or spec.lengths.pick(quick), args.dtype or spec.dtypes,
                                              args.device))
        elif suite == "matmul":
            spec = registry.MATMUL
            plans.append(cases.plan_matmul(spec, args.sizes or spec.square.pick(quick), args.dtype or spec.dtypes,
                                           args.device, with_favor_shapes=not args.sizes))
        elif suite == "accuracy":
            spec = registry.ACCURACY
            plans.append(cases.plan_accuracy(spec, spec.num_features.pick(quick), spec.draws.pick(quick)[0]))
        elif suite == "decode":
            spec = registry.DECODE
            plans.append(cases.plan_decode(spec, args.lengths or spec.prefixes.pick(quick), args.dtype or spec.dtypes,
                                           args.device))
        elif suite == "compress":
            spec = registry.COMPRESS
            plans.append(cases.plan_compress(spec, spec.rows.pick(quick), args.sizes or spec.features.pick(quick),
                                             spec.densities.pick(quick),
                                             args.compress_threads or spec.threads.pick(quick), args.device))
    return plans


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    budget = registry.QUICK_BUDGET if args.quick else registry.FULL_BUDGET
    if args.budget is not None:
        budget = registry.Budget(args.budget, budget.max_repeats)
    started = time.perf_counter()
    payload = {"schema": report.SCHEMA, "machine": machine_info(args.device),
               "run": {"device": args.device, "quick": args.quick, "budget_s": budget.seconds,
                       "max_repeats": budget.max_repeats, "argv": sys.argv[1:] if argv is None else list(argv),
                       "others_cpu_share_before": others_cpu_share()}}
    print(f"performer benchmarks: {report.machine_line(payload)}", flush=True)
    busy = payload["run"]["others_cpu_share_before"]
    if busy is not None and busy > 0.2:
        print(f"note: other processes are using {busy:.0%} of the CPUs; times will be longer and noisier", flush=True)
    counters = CpuCounters.read()
    plans = plan(args)
    for p in plans:
        if p.unavailable:
            print(f"{p.suite}: not run: {p.unavailable}", flush=True)
        for impl, why in p.skipped.items():
            print(f"{p.suite}: {impl} left out: {why}", flush=True)
    payload["records"] = runner.run(plans, args.device, budget)
    payload["run"]["wall_s"] = round(time.perf_counter() - started, 1)
    payload["run"]["others_cpu_share"] = None if counters is None else CpuCounters.read().others_share_since(counters)
    payload["suites"] = {p.suite: {"settings": p.settings, "skipped": p.skipped, "unavailable": p.unavailable}
                         for p in plans}
    if "attention" in payload["suites"]:
        payload["suites"]["attention"]["crossover"] = report.attention_crossovers(payload["records"])
    text = report.report(payload)
    print("\n" + text)
    if args.compare:
        print("\n" + report.compare(args.compare_with, payload))
    save(payload, text, args)
    return 0


def save(payload: dict, text: str, args) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    prefix = os.path.join(args.out, f"bench-{args.device}{'-quick' if args.quick else ''}-{stamp}")
    os.makedirs(args.out, exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump(payload, f, indent=1)
    with open(prefix + ".md", "w") as f:
        f.write(text + "\n")
    print(f"\nresults: {prefix}.json, {prefix}.md")
    try:
        from performer.bench.plots import write_plots
    except ImportError as e:
        print(f"no plots: {e} (pip install matplotlib)")
        return
    for path in write_plots(payload, prefix):
        print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())

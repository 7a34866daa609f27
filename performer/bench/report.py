"""Markdown tables of a run's records, the attention crossover with SDPA, and the change against
an earlier run (--compare)."""
from __future__ import annotations

import json
import math
from typing import Optional

from performer.bench import registry
from performer.bench.timing import NOISY_SPREAD

SCHEMA = "performer-bench/2"
NOISY_NOTE = (f"\\* noisy: the interquartile range of the repeats is above {NOISY_SPREAD:.0%} of the median "
              "(the machine was busy or the clock is coarse).")


def pivot(records: list[dict], suite: str, keys: tuple[str, ...]) -> dict[tuple, dict[str, dict]]:
    """{(case[k] for k in keys): {impl: metrics}} for the suite's records that have those keys, in
    the order measured."""
    rows: dict[tuple, dict[str, dict]] = {}
    for r in records:
        if r["suite"] == suite and all(k in r["case"] for k in keys):
            rows.setdefault(tuple(r["case"][k] for k in keys), {})[r["impl"]] = r["metrics"]
    return rows


def present_impls(records: list[dict], suite: str) -> list[registry.Impl]:
    names = {r["impl"] for r in records if r["suite"] == suite}
    return [impl for name, impl in registry.impls(suite).items() if name in names]


def md_table(headers: list[str], rows: list[list[str]], left: int = 1) -> str:
    """A markdown table; the first `left` columns are left-aligned, the rest (numbers) right-aligned."""
    align = ["---"] * left + ["---:"] * (len(headers) - left)
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [headers, align, *rows])


def fmt_ms(metrics: Optional[dict]) -> str:
    """The median time, marked when noisy; a dash where the implementation did not run."""
    if metrics is None:
        return "—"
    ms = metrics["median_ms"]
    return (f"{ms:.1f}" if ms >= 1 else f"{ms:.3f}") + ("\\*" if metrics["noisy"] else "")


def fmt_gflops(metrics: Optional[dict]) -> str:
    return "—" if metrics is None else f"{metrics['gflops']:.0f}" + ("\\*" if metrics["noisy"] else "")


def fmt_mb(metrics: Optional[dict]) -> str:
    return "—" if metrics is None or metrics.get("peak_mb") is None else f"{metrics['peak_mb']:.0f}"


def speedup(by_impl: dict, subject: str, baseline: str) -> str:
    """How many times faster the subject is than the baseline (baseline time / subject time)."""
    s, b = by_impl.get(subject), by_impl.get(baseline)
    return "—" if s is None or b is None else f"{b['median_ms'] / s['median_ms']:.2f}x"


def _roles(impls: list[registry.Impl]):
    return [i for i in impls if not i.baseline], [i for i in impls if i.baseline]


def _pairs(impls: list[registry.Impl]) -> list[tuple[registry.Impl, registry.Impl]]:
    """(subject, reference) for the speed-up columns: each subject against the impls its ``vs``
    names, or against every baseline."""
    subjects, baselines = _roles(impls)
    return [(s, b) for s in subjects for b in ([i for i in impls if i.name in s.vs] if s.vs else baselines)]


def crossover(points: list[tuple[int, float, float]]) -> dict:
    """Where FAVOR+ becomes faster than SDPA, from (L, favor_ms, sdpa_ms) sorted by L: the L where
    the time ratio crosses 1, interpolated on log-log axes between the two lengths around it."""
    logs = [(math.log(L), math.log(f / s)) for L, f, s in points]
    if logs[-1][1] >= 0:
        return {"L": None, "note": f"slower than SDPA up to L = {points[-1][0]}"}
    last_slower = max((i for i, (_, r) in enumerate(logs) if r >= 0), default=None)
    if last_slower is None:
        return {"L": None, "note": f"faster than SDPA from L = {points[0][0]}"}
    (x0, r0), (x1, r1) = logs[last_slower], logs[last_slower + 1]
    return {"L": round(math.exp(x0 + r0 * (x1 - x0) / (r0 - r1))), "note": "interpolated"}


def group_name(dtype: str, causal: bool, mode: str) -> str:
    return f"{'causal' if causal else 'bidirectional'} {mode}, {dtype}"


def attention_crossovers(records: list[dict]) -> dict[str, dict]:
    """{group_name(...): crossover} of the package's kernels ("cpp" on the CPU, "triton" on GPUs)
    with exact attention ("sdpa"), for the groups where both ran at some length."""
    present = present_impls(records, "attention")
    subject = next((name for name in ("cpp", "triton") if name in present), "cpp")
    out = {}
    for group, rows in _attention_groups(records).items():
        points = [(L, by[subject]["median_ms"], by["sdpa"]["median_ms"])
                  for L, by in sorted(rows.items()) if subject in by and "sdpa" in by]
        if points:
            out[group_name(*group)] = crossover(points)
    return out


def _attention_groups(records) -> dict[tuple, dict[int, dict]]:
    groups: dict[tuple, dict[int, dict]] = {}
    for (dtype, causal, mode, L), by in pivot(records, "attention", ("dtype", "causal", "mode", "L")).items():
        groups.setdefault((dtype, causal, mode), {})[L] = by
    return groups


def attention_section(records: list[dict], settings: dict) -> str:
    impls = present_impls(records, "attention")
    subjects, _ = _roles(impls)
    pairs = _pairs(impls)
    rows = pivot(records, "attention", ("dtype", "causal", "mode", "L"))
    shape = "B={batch} H={heads} E=Ev={dim} m={num_features}".format(**settings)
    out = []
    peak = measured_peak(records, "attention")
    for dtype in dict.fromkeys(key[0] for key in rows):
        keyed = [(key, by) for key, by in rows.items() if key[0] == dtype]
        time_rows = [[str(L), "yes" if causal else "no", mode, *(fmt_ms(by.get(i.name)) for i in impls),
                      *(speedup(by, s.name, b.name) for s, b in pairs),
                      *(fmt_gflops(by.get(s.name)) for s in subjects),
                      *(percent_of_peak(by.get(s.name), peak) for s in subjects if peak)]
                     for (_, causal, mode, L), by in keyed]
        out += [f"### Attention time, {shape}, {dtype} (ms per call, median of repeats)", "",
                md_table(["L", "causal", "mode", *(f"{i.short} ms" for i in impls),
                          *(f"{s.short} vs {b.short}" for s, b in pairs),
                          *(f"{s.short} GFLOP/s" for s in subjects),
                          *(f"{s.short} % of peak" for s in subjects if peak)], time_rows, left=3),
                "", NOISY_NOTE, "", FLOPS_NOTE + (peak_line(peak, records, "attention") if peak else ""), ""]
        memory_rows = [[str(L), "yes" if causal else "no", mode, *(fmt_mb(by.get(i.name)) for i in impls)]
                       for (_, causal, mode, L), by in keyed]
        out += [f"### Attention peak memory, {shape}, {dtype} (MiB added by one call)", "",
                md_table(["L", "causal", "mode", *(f"{i.short} MiB" for i in impls)], memory_rows, left=3), ""]
    crossings = [[name, f"L ≈ {c['L']}" if c["L"] else c["note"]] for name, c in attention_crossovers(records).items()]
    if crossings:
        out += ["### Crossover with SDPA: the length from which the C++ kernels are faster", "",
                md_table(["case", "crossover"], crossings, left=2), ""]
    return "\n".join(out)


FLOPS_NOTE = ("GFLOP/s: the FAVOR+ kernels' floating-point operations per call "
              "(performer.bench.registry.favor_flops) over the median time.")


def measured_peak(records: list[dict], suite: str, threads: Optional[int] = None) -> Optional[float]:
    """The FMA peak in GFLOP/s measured with the suite (CPU runs only), on `threads` if given."""
    return next((r["metrics"]["gflops"] for r in records if r["suite"] == suite and r["impl"] == "peak"
                 and threads in (None, r["case"]["threads"])), None)


def peak_line(peak: float, records: list[dict], suite: str, threads: Optional[int] = None) -> str:
    threads = threads or next(r["case"]["threads"] for r in records if r["suite"] == suite and r["impl"] == "peak")
    return f" Measured FMA peak: {peak:.0f} GFLOP/s (float32, {threads} thread{'s' if threads > 1 else ''})."


def percent_of_peak(metrics: Optional[dict], peak: float) -> str:
    return "—" if metrics is None or "gflops" not in metrics else f"{100 * metrics['gflops'] / peak:.0f}%"


def matmul_section(records: list[dict], settings: dict) -> str:
    impls = present_impls(records, "matmul")
    subjects, baselines = _roles(impls)
    peak = measured_peak(records, "matmul")
    rows = []
    for (name, batch, M, K, N, dtype), by in pivot(records, "matmul", ("shape", "batch", "M", "K", "N", "dtype")).items():
        size = f"{batch} x " if batch > 1 else ""
        rows.append([name, f"{size}{M}x{K} @ {K}x{N}", dtype,
                     *(fmt_gflops(by.get(i.name)) for i in impls),
                     *(speedup(by, s.name, b.name) for s in subjects for b in baselines),
                     *(percent_of_peak(by.get(s.name), peak) for s in subjects if peak)])
    headers = ["shape", "M x K @ K x N", "dtype", *(f"{i.short} GFLOP/s" for i in impls),
               *(f"{s.short} vs {b.short}" for s in subjects for b in baselines),
               *(f"{s.short} % of peak" for s in subjects if peak)]
    head = peak_line(peak, records, "matmul").strip() if peak else "No FMA peak measured on this device."
    return "\n".join(["### Matrix multiply, GFLOP/s (median of repeats)", "", head, "",
                      md_table(headers, rows, left=3), "", NOISY_NOTE, ""])


def accuracy_section(records: list[dict], settings: dict) -> str:
    impls = present_impls(records, "accuracy")
    rows = []
    for (name, t, m), by in pivot(records, "accuracy", ("inputs", "temperature", "num_features")).items():
        base = by.get("favor+", {}).get("rel_error")
        uniform = next(iter(by.values()))["uniform_rel_error"]
        best = min((x["rel_error"], n) for n, x in by.items())
        rows.append([name, f"{t}", str(m), *(f"{by[i.name]['rel_error']:.4f}" if i.name in by else "-" for i in impls),
                     f"{uniform:.4f}", best[1], f"{best[0] / base:.3f}" if base else "-",
                     "yes" if best[0] < uniform else "no"])
    headers = ["inputs", "scale", "m", *(i.short for i in impls), "uniform average", "best", "best / FAVOR+",
               "best beats uniform"]
    return "\n".join([
        "### Accuracy: relative error to exact attention, L={L} E={dim} H={heads}, {dtype}".format(**settings),
        "", f"Median over {settings['draws']} feature draws of ||estimate - exact|| / ||exact||. The uniform average "
        "of the values is the error to beat. Estimators: " + "; ".join(f"{i.short}: {i.label}" for i in impls) + ".",
        "", md_table(headers, rows, left=3), ""])


def decode_section(records: list[dict], settings: dict) -> str:
    impls = present_impls(records, "decode")
    subjects, baselines = _roles(impls)
    rows = [[str(b), str(n), dtype, *(fmt_ms(by.get(i.name)) for i in impls),
             *(speedup(by, s.name, base.name) for s in subjects for base in baselines)]
            for (b, n, dtype), by in pivot(records, "decode", ("batch", "prefix", "dtype")).items()]
    headers = ["B", "prefix", "dtype", *(f"{i.short} ms/token" for i in impls),
               *(f"{s.short} vs {b.short}" for s in subjects for b in baselines)]
    return "\n".join(["### Decoding: cost of one token after a prefix, H={heads} E={dim} m={num_features}"
                      .format(**settings), "", md_table(headers, rows, left=3), "", NOISY_NOTE, ""])


def compress_rows(records: list[dict]) -> dict[tuple, dict[str, dict]]:
    """{(K, threads, M, density): {impl: metrics}}, the dense baselines (measured once per (K, threads,
    M)) in every density's row."""
    dense = pivot([r for r in records if "density" not in r["case"]], "compress", ("K", "threads", "M"))
    return {key: {**dense.get(key[:3], {}), **by}
            for key, by in pivot(records, "compress", ("K", "threads", "M", "density")).items()}


def compress_speedup(by: dict, subject: str) -> Optional[float]:
    """The subject's speed-up over dense float32."""
    s, d = by.get(subject), by.get(registry.COMPRESS.dense)
    return None if s is None or d is None else d["median_ms"] / s["median_ms"]


def _times_density(by: dict, subject: str, target: float) -> str:
    ratio = compress_speedup(by, subject)
    if ratio is None:
        return "—"
    value = ratio * by[subject]["density"]
    return f"{value:.2f}" + (" ✓" if value >= target else "")


COMPRESS_NOTE = ("density: the fraction of blocks kept. x density: the speed-up over the dense float32 product "
                 "times the density, 1 where the time is proportional to the blocks kept (the target: {target} or "
                 "more, marked ✓). % of peak: the kept multiply-adds (2 M K N x density) per second over the "
                 "measured float32 FMA peak (int8 products can pass 100%). performer int8: the input rows quantized "
                 "at run time, integer products; performer w8: int8 weights, float32 input and products.")


def compress_section(records: list[dict], settings: dict) -> str:
    impls = present_impls(records, "compress")
    subjects, _ = _roles(impls)
    pairs = _pairs(impls)
    rows = compress_rows(records)
    dense = registry.impls("compress")[registry.COMPRESS.dense].short
    out = []
    for K, threads in dict.fromkeys(key[:2] for key in rows):
        peak = measured_peak(records, "compress", threads)
        table = [[str(M), f"{next((m['density'] for m in by.values() if 'density' in m), density):.3f}",
                  *(fmt_ms(by.get(i.name)) for i in impls),
                  *(speedup(by, s.name, b.name) for s, b in pairs),
                  *(_times_density(by, s.name, settings["target"]) for s in subjects),
                  *(percent_of_peak(by.get(s.name), peak) for s in subjects if peak)]
                 for (k, t, M, density), by in rows.items() if (k, t) == (K, threads)]
        headers = ["M", "density", *(f"{i.short} ms" for i in impls),
                   *(f"{s.short} vs {b.short}" for s, b in pairs),
                   *(f"{s.short} vs {dense} x density" for s in subjects),
                   *(f"{s.short} % of peak" for s in subjects if peak)]
        out += [f"### Compressed linear layer y = x W^T, K = N = {K}, {threads} thread{'s' if threads > 1 else ''}, "
                "{dtype}, blocks of {block[0]}x{block[1]} (ms per call, median of repeats)".format(**settings), "",
                md_table(headers, table, left=2), "", NOISY_NOTE, "",
                COMPRESS_NOTE.format(**settings) + (peak_line(peak, records, "compress", threads) if peak else ""), ""]
    return "\n".join(out)


SECTIONS = {"attention": attention_section, "matmul": matmul_section, "accuracy": accuracy_section,
            "decode": decode_section, "compress": compress_section}


def unavailable_section(suite: str, reason: str) -> str:
    return f"### {suite}: not run\n\n{reason}\n"


def report(payload: dict) -> str:
    """The markdown of a whole run: the machine, then each suite's tables."""
    run, records = payload["run"], payload["records"]
    out = [f"Machine: {machine_line(payload)}", ""]
    for suite, info in payload["suites"].items():
        out.append(unavailable_section(suite, info["unavailable"]) if info.get("unavailable") else
                   SECTIONS[suite](records, info["settings"]))
        for impl, why in info.get("skipped", {}).items():
            out.append(f"({suite}: {impl} left out: {why})\n")
    noisy = [r for r in records if r["metrics"].get("noisy")]
    timed = [r for r in records if "median_ms" in r["metrics"]]
    if timed:
        share = run.get("others_cpu_share")
        others = "" if share is None else f"; other processes used {share:.0%} of the CPUs during the run"
        out.append(f"{len(noisy)} of {len(timed)} timings noisy{others}; {run['wall_s']:.0f} s in all.")
    return "\n".join(out)


def machine_line(payload: dict) -> str:
    m, run = payload["machine"], payload["run"]
    device = f"{m['gpu']} (CUDA {m['cuda']}), " if run["device"] == "cuda" else ""
    threads = f"{m['threads']} thread{'s' if m['threads'] > 1 else ''}"
    return (f"{device}{m['cpu']}, {threads}, torch {m['torch']}, kernels {m.get('cpu_isa')}, "
            f"{m['date']}{', --quick' if run['quick'] else ''}")


# --compare ------------------------------------------------------------------------------------

class ResultsError(ValueError):
    pass


def load_results(path: str) -> dict:
    """A saved run in the current schema; the older favor-cpu-*.json (attention, accuracy and memory
    tables, before this schema) has its attention times converted, and nothing else."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ResultsError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ResultsError(f"{path} is not a benchmark result (a JSON object was expected)")
    if data.get("schema") == SCHEMA:
        return data
    if "schema" not in data and isinstance(data.get("attention"), list) and "shape" in data:
        return _from_older_schema(data, path)
    raise ResultsError(f"{path} is not a result of this benchmark: schema {data.get('schema')!r}, "
                       f"expected {SCHEMA!r} (or the older favor-cpu-*.json)")


def _from_older_schema(data: dict, path: str) -> dict:
    records = [{"suite": "attention", "impl": impl,
                "case": {"L": row["L"], "causal": row["causal"], "mode": row["mode"], "dtype": "float32"},
                "metrics": row[impl]}
               for row in data["attention"] for impl in ("cpp", "sdpa", "torch") if impl in row]
    return {"schema": "favor-cpu (older)", "machine": data.get("machine", {}), "records": records,
            "suites": {"attention": {"settings": data["shape"]}},
            "note": f"{path} has the older schema: only its attention times are compared"}


def _key(r: dict) -> tuple:
    return (r["suite"], r["impl"], tuple(sorted(r["case"].items())))


def _metric(metrics: dict) -> Optional[str]:
    return next((m for m in ("median_ms", "rel_error", "gflops") if m in metrics), None)


def compare(old: dict, new: dict) -> str:
    """The change of every measurement the two runs share, and its geometric mean per suite and
    implementation; a time change within the two runs' interquartile ranges is marked as noise."""
    lines = ["### Change against an earlier run", ""]
    if old.get("note"):
        lines.append(old["note"] + ".")
    for field in ("cpu", "threads", "torch"):
        if old.get("machine", {}).get(field) != new["machine"].get(field):
            lines.append(f"Warning: {field} differs: {old.get('machine', {}).get(field)} before, "
                         f"{new['machine'].get(field)} now.")
    for suite, info in new["suites"].items():
        before = old.get("suites", {}).get(suite, {}).get("settings")
        if before is not None and before != info.get("settings"):
            lines.append(f"Warning: the {suite} settings differ: {before} before, {info.get('settings')} now.")
    earlier = {_key(r): r["metrics"] for r in old["records"]}
    rows, ratios = [], {}
    for r in new["records"]:
        b, a = earlier.get(_key(r)), r["metrics"]
        metric = _metric(a)
        if b is None or metric is None or metric not in b or not b[metric]:
            continue
        ratio = a[metric] / b[metric]
        ratios.setdefault((r["suite"], r["impl"], metric), []).append(ratio)
        noise = (metric == "median_ms" and abs(a[metric] - b[metric]) <= a["spread_ms"] + b.get("spread_ms", 0))
        rows.append([r["suite"], r["impl"], " ".join(f"{k}={v}" for k, v in r["case"].items()), metric,
                     f"{b[metric]:.4g}", f"{a[metric]:.4g}", f"{100 * (ratio - 1):+.1f}%", "within noise" if noise else ""])
    if not rows:
        return "\n".join(lines + ["No measurement of this run is in the earlier one (different suites or sizes).", ""])
    lines += ["", md_table(["suite", "impl", "case", "metric", "before", "after", "change", ""], rows, left=4), "",
              "Geometric mean of after / before: " + "; ".join(
                  f"{suite} {impl} {metric}: {math.exp(sum(map(math.log, rs)) / len(rs)):.3f}"
                  for (suite, impl, metric), rs in ratios.items()) + " (below 1: smaller now).", ""]
    return "\n".join(lines)

"""PNG plots of a run: attention time and memory vs sequence length, matmul GFLOP/s vs size with
the FMA peak, FAVOR+ error vs number of features, decoding cost vs prefix length, a compressed
layer's speed-up vs density."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from performer.bench.report import (_attention_groups, attention_crossovers, compress_rows,  # noqa: E402
                                    compress_speedup, group_name, machine_line, measured_peak, pivot,
                                    present_impls)

STYLE = {"cpp": dict(color="tab:blue", marker="o"), "sdpa": dict(color="tab:red", marker="s"),
         "torch": dict(color="tab:green", marker="^"), "triton": dict(color="tab:purple", marker="D"),
         "cpp++": dict(color="tab:cyan", marker="v"), "cpp-nk": dict(color="tab:olive", marker="P"),
         "step": dict(color="tab:blue", marker="o"), "step_torch": dict(color="tab:green", marker="^"),
         "step_fmap": dict(color="tab:cyan", marker="v")}
DTYPE_LINES = ("-", "--", ":", "-.")
DTYPE_HATCHES = (None, "//", "..", "xx")


def _save(fig, payload: dict, path: str, title: str, legend_from=None) -> str:
    """Writes the figure with its title, the machine line at the bottom and, when the panels share
    their series, one legend for all of them (taken from the axes `legend_from`) above that line."""
    inch = 1 / fig.get_figheight()
    fig.suptitle(title)
    bottom = 0.03
    if legend_from is not None:
        handles, labels = legend_from.get_legend_handles_labels()
        columns = max(1, min(3, len(labels), int(fig.get_figwidth() // 3.4)))  # labels are up to ~3.3 in wide
        rows = -(-len(labels) // columns)
        height = 0.3 * rows * inch
        fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8, bbox_to_anchor=(0.5, bottom))
        bottom += height
    fig.text(0.5, 0.005, machine_line(payload), ha="center", va="bottom", fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _log_x(ax, xs) -> None:
    """A log2 x axis labelled at the measured sizes, as plain numbers."""
    xs = sorted(set(xs))
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.xaxis.set_minor_formatter(NullFormatter())


def _log_axes(ax, xs, xlabel: str, ylabel: str, title: str) -> None:
    _log_x(ax, xs)
    ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)


def _errorbar(ax, xs, metrics, label, style) -> None:
    """Medians with bars of half the interquartile range either side."""
    ax.errorbar(xs, [m["median_ms"] for m in metrics], yerr=[m["spread_ms"] / 2 for m in metrics], capsize=2,
                label=label, **style)


def _panels(groups, row_key, column_key, panel_size=(5.5, 4.0)):
    """A grid of panels with a row per row_key(group) and a column per column_key(group); returns
    the figure, group -> its panel, and the grid."""
    rows = list(dict.fromkeys(map(row_key, groups)))
    columns = list(dict.fromkeys(map(column_key, groups)))
    fig, axes = plt.subplots(len(rows), len(columns), squeeze=False,
                             figsize=(panel_size[0] * len(columns), panel_size[1] * len(rows) + 1.2))
    return fig, lambda g: axes[rows.index(row_key(g)), columns.index(column_key(g))], axes


def attention_time(payload: dict, path: str) -> str:
    records = payload["records"]
    groups = _attention_groups(records)
    crossings = attention_crossovers(records)
    impls = present_impls(records, "attention")
    fig, panel, axes = _panels(groups, row_key=lambda g: g[:2], column_key=lambda g: g[2])
    for group, rows in groups.items():
        ax = panel(group)
        for impl in impls:
            pts = [(L, by[impl.name]) for L, by in sorted(rows.items()) if impl.name in by]
            _errorbar(ax, [L for L, _ in pts], [m for _, m in pts], impl.label, STYLE[impl.name])
        cross = crossings.get(group_name(*group))
        if cross:
            text = f"crossover with SDPA\nL ≈ {cross['L']}" if cross["L"] else cross["note"]
            if cross["L"]:
                ax.axvline(cross["L"], color="0.3", linestyle=":")
            ax.annotate(text, (cross["L"] or min(rows), 0.03), xycoords=("data", "axes fraction"),
                        xytext=(4, 0), textcoords="offset points", va="bottom", fontsize=8)
        _log_axes(ax, rows, "sequence length L (tokens)", "time per call (ms)", group_name(*group))
    s = payload["suites"]["attention"]["settings"]
    title = ("FAVOR+ vs exact attention: time per call, lower is better\n(B={batch}, H={heads}, E={dim}, "
             "m={num_features}; bars: ± half the interquartile range)".format(**s))
    return _save(fig, payload, path, title, legend_from=axes[0, 0])


def attention_memory(payload: dict, path: str) -> str:
    records = payload["records"]
    impls = present_impls(records, "attention")
    groups = _attention_groups(records)
    fig, panel, axes = _panels(groups, row_key=lambda g: g[0], column_key=lambda g: g[1], panel_size=(6, 4.5))
    for impl in impls:  # impl-major, so that the legend's columns are the implementations
        for (dtype, causal, mode), rows in groups.items():
            pts = [(L, by[impl.name]["peak_mb"]) for L, by in sorted(rows.items())
                   if impl.name in by and by[impl.name].get("peak_mb")]
            if pts:
                panel((dtype, causal, mode)).plot(*zip(*pts), linestyle="-" if mode == "forward+backward" else "--",
                                                  label=f"{impl.label}, {mode}", **STYLE[impl.name])
    for (dtype, causal, mode), rows in groups.items():
        _log_axes(panel((dtype, causal, mode)), rows, "sequence length L (tokens)",
                  "peak memory added by one call (MiB)", f"{'causal' if causal else 'bidirectional'}, {dtype}")
    s = payload["suites"]["attention"]["settings"]
    title = ("Attention: peak memory one call adds to the inputs, lower is better\n"
             "(B={batch}, H={heads}, E={dim}, m={num_features}; solid: forward+backward, dashed: forward)".format(**s))
    return _save(fig, payload, path, title, legend_from=axes[0, 0])


def matmul(payload: dict, path: str) -> str:
    records = [r for r in payload["records"] if r["suite"] == "matmul"]
    impls = present_impls(records, "matmul")
    peak = measured_peak(records, "matmul")
    rows = pivot(records, "matmul", ("shape", "dtype"))
    case_of = {r["case"]["shape"]: r["case"] for r in records if r["impl"] != "peak"}
    dtypes = list(dict.fromkeys(dtype for _, dtype in rows))
    square = sorted((c["M"], name) for name, c in case_of.items() if c["M"] == c["K"] == c["N"])
    named = [name for name, c in case_of.items() if not c["M"] == c["K"] == c["N"]]
    fig, axes = plt.subplots(1, 2 if named else 1, figsize=(13 if named else 7, 5.2), squeeze=False)
    ax = axes[0, 0]
    for dtype, linestyle in zip(dtypes, DTYPE_LINES):
        for impl in impls:
            pts = [(n, rows[name, dtype][impl.name]["gflops"]) for n, name in square if impl.name in rows.get((name, dtype), {})]
            if pts:
                ax.plot(*zip(*pts), linestyle=linestyle, label=f"{impl.label}, {dtype}", **STYLE[impl.name])
    _log_x(ax, [n for n, _ in square])
    ax.set(xlabel="matrix size n (n x n times n x n)", ylabel="GFLOP/s (higher is better)", title="square products")
    for ax in axes.flat:
        if peak:
            ax.axhline(peak, color="black", linewidth=1, label=f"measured FMA peak, float32: {peak:.0f} GFLOP/s")
        ax.set_ylim(0, 1.12 * max([peak or 0] + [m["gflops"] for by in rows.values() for m in by.values() if "gflops" in m]))
        ax.grid(True, axis="y", alpha=0.3)
    if named:
        ax = axes[0, 1]
        series = [(impl, dtype) for dtype in dtypes for impl in impls]
        width = 0.8 / len(series)
        for i, (impl, dtype) in enumerate(series):
            ax.bar([j + i * width for j in range(len(named))],
                   [rows.get((name, dtype), {}).get(impl.name, {}).get("gflops", 0) for name in named], width=width,
                   color=STYLE[impl.name]["color"], hatch=DTYPE_HATCHES[dtypes.index(dtype) % 4], edgecolor="white",
                   label=f"{impl.label}, {dtype}")
        labels = ["{shape}\n{batch} x {M}x{K} @ {K}x{N}".format(**case_of[name]).replace("\n1 x ", "\n") for name in named]
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(named))], labels, fontsize=8)
        ax.set(ylabel="GFLOP/s (higher is better)", title="the products inside FAVOR+ (L = 8192, H = 8, m = 256)")
    return _save(fig, payload, path, "Matrix multiply throughput, higher is better", legend_from=axes[0, 0])


def accuracy(payload: dict, path: str) -> str:
    rows = pivot(payload["records"], "accuracy", ("inputs", "temperature", "num_features"))
    panels = list(dict.fromkeys((name, t) for name, t, _ in rows))
    impls = present_impls(payload["records"], "accuracy")
    cols = min(3, len(panels))
    fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, figsize=(5 * cols, 4.2 * ((len(panels) + cols - 1)
                                                                                             // cols)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, t) in zip(axes.flat, panels):
        for impl, color in zip(impls, colors):
            pts = sorted((m, by[impl.name]) for (n, tt, m), by in rows.items() if (n, tt) == (name, t) and impl.name in by)
            ax.errorbar([m for m, _ in pts], [x["rel_error"] for _, x in pts],
                        yerr=[x["rel_error_spread"] / 2 for _, x in pts], marker="o", capsize=3, color=color,
                        label=impl.label)
        first = next(by for (n, tt, _), by in rows.items() if (n, tt) == (name, t))
        ax.axhline(next(iter(first.values()))["uniform_rel_error"], color="gray", linestyle="--",
                   label="uniform average of v (the line to beat)")
        _log_axes(ax, [m for n, tt, m in rows if (n, tt) == (name, t)], "number of random features m",
                  "relative error to exact", f"{name}, scale {t}")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    title = ("Error vs exact softmax attention, lower is better\n(L={L}, E={dim}, H={heads}, {dtype}; median and spread "
             "of {draws} feature draws)".format(**payload["suites"]["accuracy"]["settings"]))
    return _save(fig, payload, path, title, legend_from=axes[0, 0])


def decode(payload: dict, path: str) -> str:
    records = payload["records"]
    rows = pivot(records, "decode", ("batch", "prefix", "dtype"))
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for impl in present_impls(records, "decode"):
        for (batch, dtype), linestyle in zip(dict.fromkeys((b, dt) for b, _, dt in rows), DTYPE_LINES):
            pts = sorted((n, by[impl.name]) for (b, n, dt), by in rows.items()
                         if (b, dt) == (batch, dtype) and impl.name in by)
            _errorbar(ax, [n for n, _ in pts], [m for _, m in pts], f"{impl.label}, B={batch}, {dtype}",
                      dict(STYLE[impl.name], linestyle=linestyle))
    _log_axes(ax, [n for _, n, _ in rows], "prefix length (tokens)", "time per decoded token (ms)", "")
    title = ("Decoding: time of one token after a prefix, lower is better\n(H={heads}, E={dim}, m={num_features}; "
             "bars: ± half the interquartile range)".format(**payload["suites"]["decode"]["settings"]))
    return _save(fig, payload, path, title, legend_from=ax)


def compress(payload: dict, path: str) -> str:
    """Speed-up over dense float32 vs density on the fewest threads measured (1 by default) at the
    smallest K: a color per M, a line style per subject (float32 and int8 layers), against the ideal
    1 / density and the target."""
    rows = compress_rows(payload["records"])
    settings = payload["suites"]["compress"]["settings"]
    subjects = [i for i in present_impls(payload["records"], "compress") if not i.baseline]
    threads = min(t for _, t, _, _ in rows)
    K = min(k for k, t, _, _ in rows if t == threads)
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, M in enumerate(sorted({m for k, t, m, _ in rows if (k, t) == (K, threads)})):
        for subject, linestyle in zip(subjects, ("-", "--", ":")):
            pts = sorted((d, s) for (k, t, m, d), by in rows.items()
                         if (k, t, m) == (K, threads, M) and (s := compress_speedup(by, subject.name)) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", color=colors[n % len(colors)], linestyle=linestyle,
                        label=f"{subject.short}, M={M}")
    densities = sorted({d for *_, d in rows})
    ax.plot(densities, [1 / d for d in densities], color="black", label="ideal: 1 / density")
    ax.plot(densities, [settings["target"] / d for d in densities], color="black", linestyle="-.",
            label=f"target: {settings['target']} / density")
    ax.axhline(1, color="0.5", linewidth=0.8)
    _log_axes(ax, densities, "density (fraction of blocks kept)", "speed-up over dense float32 F.linear", "")
    title = (f"Compressed linear layer: speed-up over dense float32, higher is better\n(y = x W^T, K = N = {K}, "
             f"blocks of {settings['block'][0]}x{settings['block'][1]}, {threads} thread{'s' if threads > 1 else ''})")
    return _save(fig, payload, path, title, legend_from=ax)


PLOTS = {"attention": [("attention-time", attention_time), ("attention-memory", attention_memory)],
         "matmul": [("matmul", matmul)], "accuracy": [("accuracy", accuracy)], "decode": [("decode", decode)],
         "compress": [("compress", compress)]}


def write_plots(payload: dict, prefix: str) -> list[str]:
    """Every plot of the suites that ran, as PREFIX-<name>.png; returns the paths."""
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    return [plot(payload, f"{prefix}-{name}.png")
            for suite, info in payload["suites"].items() if not info.get("unavailable")
            for name, plot in PLOTS[suite]]

"""The benchmark CLI runs end to end on tiny inputs and writes valid JSON, markdown and PNG files;
--compare reads its own results and the older favor-cpu-*.json; the progress bar and the
crossover are right on small cases."""
import io
import json
import os
import subprocess
import sys

import pytest
import torch

import performer
from performer.bench import __main__ as cli, report
from performer.bench.runner import Progress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--lengths", "32", "64", "--sizes", "32", "--threads", "1", "--budget", "0"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Every suite, as the README's demo command runs them (--quick), at tiny sizes, in a fresh process."""
    out = tmp_path_factory.mktemp("results")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "performer.bench", "--quick", *TINY, "--out", str(out)], cwd=out,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    files = os.listdir(out)
    (result,) = [f for f in files if f.endswith(".json")]
    return proc, out, files, json.load(open(out / result))


@pytest.fixture
def in_process(capsys):
    """Runs the CLI in this process and restores the thread count it sets."""
    threads = torch.get_num_threads()

    def run(*argv):
        code = cli.main(list(argv))
        return code, capsys.readouterr()
    yield run
    torch.set_num_threads(threads)


def test_json_has_machine_settings_and_every_median_and_spread(quick_run):
    _, _, _, data = quick_run
    assert data["schema"] == report.SCHEMA
    assert {"cpu", "threads", "torch", "date", "cpu_isa"} <= set(data["machine"]) and data["machine"]["threads"] == 1
    assert data["run"]["quick"] and data["run"]["device"] == "cpu"
    assert set(data["suites"]) == {"attention", "matmul", "accuracy", "decode", "compress"}
    timed = [r for r in data["records"] if "median_ms" in r["metrics"]]
    assert {r["suite"] for r in timed} >= {"attention", "matmul"}
    for r in timed:
        m = r["metrics"]
        assert m["median_ms"] > 0 and m["spread_ms"] >= 0 and m["repeats"] >= 3 and isinstance(m["noisy"], bool)
    attention = [r for r in data["records"] if r["suite"] == "attention" and r["impl"] != "peak"]
    assert {(r["impl"], r["case"]["L"], r["case"]["mode"], r["case"]["causal"]) for r in attention} == {
        (impl, L, mode, causal) for impl in ("cpp", "cpp++", "cpp-nk", "sdpa", "torch") for L in (32, 64)
        for mode in ("forward", "forward+backward") for causal in (False, True)}
    if sys.platform == "linux":
        assert all(r["metrics"]["peak_mb"] >= 0 for r in attention)
    assert {r["suite"] for r in data["records"] if r["impl"] == "peak" and r["metrics"]["gflops"] > 0} == {
        "attention", "matmul", "compress"}
    # The package's kernels get a FLOP rate from the FAVOR+ operation count; the baselines do not.
    assert all(("gflops" in r["metrics"]) == (r["impl"] in ("cpp", "cpp++", "cpp-nk")) for r in attention)
    assert set(data["suites"]["attention"]["crossover"]) == {
        f"{c} {mode}, float32" for c in ("bidirectional", "causal") for mode in ("forward", "forward+backward")}


def test_tables_give_ratios_to_each_baseline(quick_run):
    proc, out, files, _ = quick_run
    text = proc.stdout
    assert "| 32 | no | forward |" in text and "| performer vs SDPA | performer vs plain PyTorch |" in text
    assert ("| performer GFLOP/s | FAVOR++ GFLOP/s | normalized GFLOP/s | performer % of peak | FAVOR++ % of peak | "
            "normalized % of peak |") in text
    assert "Measured FMA peak" in text
    assert "| square 32 | 32x32 @ 32x32 | float32 |" in text and "performer vs torch.matmul" in text
    assert "performer % of peak" in text and "| uniform average | best | best / FAVOR+ |" in text
    assert "| FAVOR++ vs performer | FAVOR++ vs SDPA | normalized vs performer | normalized vs SDPA |" in text
    (md,) = [f for f in files if f.endswith(".md")]
    assert open(out / md).read().strip() in text


def test_every_plot_is_a_png(quick_run):
    _, out, files, data = quick_run
    names = ["attention-time", "attention-memory", "matmul", "accuracy", "compress"]
    names += [] if data["suites"]["decode"]["unavailable"] else ["decode"]
    (result,) = [f for f in files if f.endswith(".json")]
    expected = {f"{result[:-len('.json')]}-{name}.png" for name in names}
    assert {f for f in files if f.endswith(".png")} == expected
    for name in expected:
        with open(out / name, "rb") as f:
            assert f.read(8) == PNG_SIGNATURE, name
        assert os.path.getsize(out / name) > 10_000, name


def test_decode_suite(quick_run):
    proc, _, _, data = quick_run
    decode = [r for r in data["records"] if r["suite"] == "decode"]
    if hasattr(performer, "favor_attention_step"):
        assert {(r["impl"], r["case"]["batch"], r["case"]["prefix"]) for r in decode} == \
            {(i, b, n) for i in ("step", "step_fmap", "step_torch", "sdpa") for b in (1, 16) for n in (32, 64)}
        assert "### Decoding" in proc.stdout
    else:
        assert not decode and "decode: not run: step: performer.favor_attention_step is not" in proc.stdout


def test_compress_suite(tmp_path, in_process):
    """Every impl at every (K, threads, M), the block-sparse ones at each density and the dense ones
    once; the FMA peak per thread count; the run's threads restored; a table per (K, threads)."""
    threads = torch.get_num_threads()
    code, io_ = in_process("compress", "--quick", "--sizes", "128", "--budget", "0", "--out", str(tmp_path))
    assert code == 0 and torch.get_num_threads() == threads
    (result,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    data = json.load(open(tmp_path / result))
    records = [r for r in data["records"] if r["suite"] == "compress"]
    ran, skipped = {r["impl"] for r in records} - {"peak"}, set(data["suites"]["compress"]["skipped"])
    sparse = {"compressed", "int8_dynamic", "int8_weight_only", "bsr"}
    assert ran | skipped == sparse | {"dense", "bf16", "int8"}
    assert {"compressed", "int8_dynamic", "int8_weight_only", "dense"} <= ran
    points = {(r["impl"], r["case"].get("M"), r["case"]["threads"], r["case"].get("density")) for r in records}
    assert points == {("peak", None, t, None) for t in (1, 2)} | {
        (i, M, t, d) for i in ran for M in (1, 256) for t in (1, 2) for d in ((1.0, 0.1) if i in sparse else (None,))}
    # 16 blocks of 32 x 32: a density of 0.1 keeps 2 of them
    for impl in ("compressed", "int8_dynamic"):
        assert {r["metrics"]["density"] for r in records if r["impl"] == impl} == {1.0, 0.125}
    assert all(r["metrics"]["gflops"] > 0 for r in records if r["impl"] in ("compressed", "int8_dynamic", "peak"))
    for t in ("1 thread", "2 threads"):
        assert f"### Compressed linear layer y = x W^T, K = N = 128, {t}, float32, blocks of 32x32" in io_.out
    assert "| M | density | performer ms | performer int8 ms | performer w8 ms | fp32 ms |" in io_.out and "| performer vs fp32 x density |" in io_.out
    assert "| 256 | 0.125 |" in io_.out and "Measured FMA peak" in io_.out
    assert "| performer int8 vs int8 dynamic |" in io_.out and "| performer w8 vs fp32 x density |" in io_.out
    assert "| performer int8 vs bf16 |" not in io_.out
    (png,) = [f for f in os.listdir(tmp_path) if f.endswith(".png")]
    assert png.endswith("-compress.png") and open(tmp_path / png, "rb").read(8) == PNG_SIGNATURE


def test_compare_against_an_earlier_run(quick_run, tmp_path, in_process):
    _, out, files, _ = quick_run
    (earlier,) = [out / f for f in files if f.endswith(".json")]
    code, io_ = in_process("attention", "--lengths", "32", "--threads", "1", "--budget", "0", "--out", str(tmp_path),
                           "--compare", str(earlier))
    assert code == 0
    assert "### Change against an earlier run" in io_.out and "| attention | cpp | L=32 causal=False mode=forward" in io_.out
    assert "Geometric mean of after / before: " in io_.out and "; attention cpp median_ms: " in io_.out


def test_compare_reads_the_older_schema(tmp_path, in_process):
    row = {"L": 32, "causal": False, "mode": "forward",
           **{impl: {"median_ms": 1.0, "spread_ms": 0.1, "repeats": 10, "noisy": False} for impl in ("sdpa", "torch", "cpp")}}
    older = tmp_path / "favor-cpu-older.json"
    older.write_text(json.dumps({"machine": {"cpu": "x", "threads": 1}, "attention": [row], "accuracy": [],
                                 "shape": {"batch": 1, "heads": 8, "dim": 64, "num_features": 256}}))
    code, io_ = in_process("attention", "--lengths", "32", "--threads", "1", "--budget", "0", "--out", str(tmp_path),
                           "--compare", str(older))
    assert code == 0 and "older schema: only its attention times are compared" in io_.out
    assert io_.out.count("| attention | ") == 3  # the forward L=32 bidirectional row of each implementation


def test_the_committed_older_results_convert():
    path = os.path.join(REPO, "bench", "results", "favor-cpu-20261122-170249.json")
    if not os.path.exists(path):
        pytest.skip("no older results in bench/results")
    records = report.load_results(path)["records"]
    assert len(records) == 72 and {r["impl"] for r in records} == {"cpp", "sdpa", "torch"}


@pytest.mark.parametrize("argv, message", [
    (["nonsense"], "unknown suite 'nonsense'"),
    (["ATTENTION"], "unknown suite 'ATTENTION'"),
    (["--lengths", "0"], "--lengths must be positive integers"),
    (["compress", "--sizes", "48"], "--sizes must be multiples of 32 for compress"),
    (["--compare", "/nonexistent/result.json"], "--compare: cannot read /nonexistent/result.json"),
])
def test_bad_arguments_are_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_compare_rejects_other_json(tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text('{"schema": "something else"}')
    with pytest.raises(SystemExit):
        cli.parse_args(["--compare", str(other)])
    assert "is not a result of this benchmark" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_an_error(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_redraws_on_a_terminal_and_writes_tenths_to_a_log():
    terminal, log = _Terminal(), io.StringIO()
    for stream in (terminal, log):
        bar = Progress(40, stream)
        for i in range(40):
            bar.show(f"case {i}")
            bar.advance()
        bar.close()
    assert terminal.getvalue().count("\r") == 41 and "40/40" in terminal.getvalue().splitlines()[-1]
    lines = log.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in log.getvalue() and lines[0].startswith("[" + "." * 24 + "] 0/40")


def test_crossover_is_interpolated_on_log_axes():
    # ratio favor/sdpa = 2 at L = 512 and 1/2 at L = 2048: crosses 1 half way on a log axis, at 1024
    assert report.crossover([(512, 2.0, 1.0), (2048, 1.0, 2.0)])["L"] == 1024
    assert report.crossover([(512, 1.0, 2.0), (1024, 1.0, 3.0)]) == {"L": None, "note": "faster than SDPA from L = 512"}
    assert report.crossover([(512, 2.0, 1.0), (1024, 3.0, 1.0)])["note"] == "slower than SDPA up to L = 1024"

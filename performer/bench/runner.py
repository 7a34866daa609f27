"""The one runner: measures every case of the planned suites, behind one progress bar."""
from __future__ import annotations

import contextlib
import shutil
import sys
import time
from typing import Optional, TextIO

import torch

from performer.bench.cases import Case, Plan
from performer.bench.registry import Budget
from performer.bench.timing import first_call_memory_mb, time_fn


class Progress:
    """A one-line progress bar on stderr: redrawn in place on a terminal; elsewhere (a log, a
    pipe) a plain line at each tenth of the run."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, width: int = 24):
        self.total, self.stream, self.width = total, stream, width
        self.done = 0
        self.start = time.perf_counter()
        self.tty = stream.isatty()
        self.last_tenth = -1

    def _line(self, text: str) -> str:
        filled = self.width * self.done // max(self.total, 1)
        elapsed = int(time.perf_counter() - self.start)
        return (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{elapsed // 60}:{elapsed % 60:02d} {text}")

    def show(self, text: str) -> None:
        """Shows what runs now; call advance() when it is done."""
        if self.tty:
            columns = shutil.get_terminal_size().columns  # a wrapped line could not be redrawn
            self.stream.write("\r\033[K" + self._line(text)[:columns - 1])
            self.stream.flush()
        elif 10 * self.done // max(self.total, 1) != self.last_tenth:
            self.last_tenth = 10 * self.done // max(self.total, 1)
            self.stream.write(self._line(text) + "\n")
            self.stream.flush()

    def advance(self) -> None:
        self.done += 1

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self._line("done") + "\n")
            self.stream.flush()


WARM_AFTER_S = 0.05


@contextlib.contextmanager
def threads(n: Optional[int]):
    """torch's intra-op threads set to n (None: left as they are), and restored after."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure(case: Case, device: str, budget: Budget) -> dict:
    """The record of one case: what it is and its metrics (times in ms, memory in MiB)."""
    with threads(case.threads):
        return _measure(case, device, budget)


def _measure(case: Case, device: str, budget: Budget) -> dict:
    record = {"suite": case.suite, "impl": case.impl, "case": case.params}
    if case.evaluate is not None:
        record["metrics"] = case.evaluate()
        return record
    fn = case.setup()
    start = time.perf_counter()
    peak_mb = first_call_memory_mb(fn, device)
    # A first CPU call this long has done its one-time work and left nothing for a warm-up to do.
    warm = device == "cpu" and time.perf_counter() - start > WARM_AFTER_S
    t = time_fn(fn, device, budget_s=budget.seconds, max_repeats=budget.max_repeats, warm=warm)
    metrics = {"median_ms": t.median_ms, "spread_ms": t.spread_ms, "repeats": t.repeats,
               "calls_per_repeat": t.calls_per_repeat, "noisy": t.noisy, "peak_mb": peak_mb}
    if case.flops is not None:
        metrics["gflops"] = case.flops / t.median_ms * 1e-6
    record["metrics"] = metrics | case.info
    return record


def run(plans: list[Plan], device: str, budget: Budget, stream: TextIO = sys.stderr) -> list[dict]:
    progress = Progress(sum(len(p.cases) for p in plans), stream)
    records = []
    for plan in plans:
        for case in plan.cases:
            progress.show(case.describe())
            records.append(measure(case, device, budget))
            progress.advance()
    progress.close()
    return records

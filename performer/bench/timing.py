"""Measurement: wall time per call (CPU clock, or CUDA events with synchronization), the peak
memory one call adds, and the facts about the machine that a result needs beside it."""
from __future__ import annotations

import ctypes
import functools
import math
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

NOISY_SPREAD = 0.10  # a timing is flagged noisy when its interquartile range exceeds 10% of its median


@dataclass
class Timing:
    median_ms: float
    spread_ms: float          # interquartile range of the repeats
    repeats: int
    calls_per_repeat: int     # short calls are timed in batches, each repeat at least MIN_REPEAT_MS

    @property
    def noisy(self) -> bool:
        return self.spread_ms > NOISY_SPREAD * self.median_ms


MIN_REPEAT_MS = 2.0


def _elapsed_ms(fn: Callable, calls: int, device: str) -> float:
    """Wall time of `calls` calls of fn, divided by `calls`."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) * 1e3 / calls


def time_fn(fn: Callable, device: str = "cpu", *, budget_s: float = 1.0, max_repeats: int = 30,
            min_repeats: int = 3, warm: bool = False) -> Timing:
    """Median time of fn() over repeats taken until `budget_s` has passed (at least `min_repeats`,
    at most `max_repeats`), after a warm-up call whose time sets how many calls each repeat batches.
    warm=True skips the warm-up for a call already made that took long enough to be timed alone."""
    warm_ms = MIN_REPEAT_MS if warm else _elapsed_ms(fn, 1, device)
    calls = max(1, math.ceil(MIN_REPEAT_MS / max(warm_ms, 1e-3)))
    times = []
    start = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start < budget_s):
        times.append(_elapsed_ms(fn, calls, device))
    quartiles = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return Timing(statistics.median(times), quartiles[2] - quartiles[0], len(times), calls)


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


@functools.cache
def cpu_peak_memory_supported() -> bool:
    """Peak RSS can be reset per call on Linux (/proc/self/clear_refs) with glibc (malloc_trim)."""
    try:
        _status_kib("VmHWM")
        return _LIBC is not None and hasattr(_LIBC, "malloc_trim") and os.access("/proc/self/clear_refs", os.W_OK)
    except (OSError, KeyError):
        return False


def first_call_memory_mb(fn: Callable, device: str) -> Optional[float]:
    """Runs fn() for the first time and returns the peak memory it added, in MiB.

    CUDA: the allocator's peak above what was allocated before the call. CPU: the process's peak
    resident memory above its resident memory before the call, after returning freed heap memory
    to the system so that the call's allocations are counted; None where that cannot be measured.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not cpu_peak_memory_supported():
        fn()
        return None
    _LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set size, to the current one
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) / 1024


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class CpuCounters:
    """Where the machine's CPU time went, to tell how much other processes took during a run."""
    wall_s: float
    busy_s: float   # all CPUs, all processes (Linux /proc/stat)
    own_s: float    # this process and its children

    @staticmethod
    def read() -> Optional["CpuCounters"]:
        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        idle = ticks[3] + ticks[4]  # idle, iowait
        own = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        return CpuCounters(time.monotonic(), (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK"),
                           sum(r.ru_utime + r.ru_stime for r in own))

    def others_share_since(self, start: "CpuCounters") -> float:
        """The share of all CPUs that other processes used between `start` and now (0 to 1)."""
        other = (self.busy_s - start.busy_s) - (self.own_s - start.own_s)
        return round(max(0.0, other) / (max(self.wall_s - start.wall_s, 1e-9) * (os.cpu_count() or 1)), 3)


def others_cpu_share(seconds: float = 0.5) -> Optional[float]:
    """The share of all CPUs other processes use now, sampled over `seconds` while this one waits."""
    start = CpuCounters.read()
    if start is None:
        return None
    time.sleep(seconds)
    return CpuCounters.read().others_share_since(start)


def machine_info(device: str) -> dict:
    info = {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    try:
        info["cpu_isa"] = torch.ops.performer.cpu_isa()
    except (AttributeError, RuntimeError):
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info

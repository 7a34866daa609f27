"""pytest-benchmark microbenchmarks of every op and backend, on the CPU, grouped by op and shape
so that `--benchmark-compare` lines up runs:

    pytest bench/ --benchmark-only [--benchmark-save=NAME] [--benchmark-compare]

The shapes and implementations come from performer.bench.registry, as for
`python -m performer.bench`. Kept out of the test run (tests/ is the test path). Threads: torch's
default unless PERFORMER_BENCH_THREADS is set.
"""
import os

import torch

if "PERFORMER_BENCH_THREADS" in os.environ:
    torch.set_num_threads(int(os.environ["PERFORMER_BENCH_THREADS"]))


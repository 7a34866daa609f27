"""Microbenchmarks: `python -m performer.bench --help`."""

#!/usr/bin/env bash
# Sets up the environment (scripts/env.sh) and runs the benchmarks: by default the quick demo
# (every suite at short sizes, about 3 minutes on 2 cores), writing JSON, markdown and PNG plots to
# bench/results/. Arguments go to `python -m performer.bench` instead (e.g. `all` for the full run).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ "$#" -eq 0 ]; then set -- --quick; fi
exec "$PY" -m performer.bench "$@"

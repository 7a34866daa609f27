#!/usr/bin/env bash
# Sets up the environment (scripts/env.sh) and runs the benchmark demo: FAVOR+ against exact
# attention (time and accuracy). Arguments go to `python -m performer.bench` (default --quick).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ "$#" -eq 0 ]; then set -- --quick; fi
exec "$PY" -m performer.bench "$@"

#!/usr/bin/env bash
# Sets up the environment (scripts/env.sh) and runs the test suite. Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$PY" -m pytest tests -q "$@"

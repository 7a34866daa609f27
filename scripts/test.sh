#!/usr/bin/env bash
# Sets up the environment (scripts/env.sh) and runs the test suite; then the timm integration's
# tests in their own environment (scripts/timm_env.sh: timm needs a torchvision that does not
# import beside .venv's torch). Extra arguments go to the first pytest run; TIMM=0 skips the second.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$PY" -m pytest tests -q "$@"
if [ "${TIMM:-1}" != "0" ]; then
  source "$ROOT/scripts/timm_env.sh"
  # From inside .venv-timm, so that `import performer` finds the build installed there.
  cd "$ROOT/.venv-timm"
  PERFORMER_REQUIRE_TIMM=1 ./bin/python -m pytest "$ROOT/tests/test_integrations_timm.py" -q -p no:cacheprovider
fi

#!/usr/bin/env bash
# Set up .venv (with every library the tests write fixtures with) and run the test suite.
# Runs ruff and mypy, then pytest. Extra arguments go to pytest (and skip the linters),
# e.g. scripts/test.sh -k resume -x
set -euo pipefail
SHARDCONV_EXTRAS=test
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$ROOT"
export TF_CPP_MIN_LOG_LEVEL=3 TF_ENABLE_ONEDNN_OPTS=0
# Lint and types first (seconds): the style and layering rules are part of the suite.
if [ "$#" -eq 0 ]; then
    ruff check shardconv tests bench scripts
    mypy
fi
# The slowest tests are listed at the end: CI must stay under 30 minutes.
exec python -m pytest -q --durations=15 "$@"

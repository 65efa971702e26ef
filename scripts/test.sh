#!/usr/bin/env bash
# Set up .venv (with every library the tests write fixtures with) and run the test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k resume -x
set -euo pipefail
SHARDCONV_EXTRAS=test
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$ROOT"
export TF_CPP_MIN_LOG_LEVEL=3 TF_ENABLE_ONEDNN_OPTS=0
exec python -m pytest -q "$@"

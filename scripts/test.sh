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
# The suite writes its fixtures under the temp directory: under 1 GiB at a time, since a passing
# test's files go when it ends (pyproject.toml). Say so up front when the disk is nearly full.
python - <<'PY'
import shutil, sys, tempfile
free = shutil.disk_usage(tempfile.gettempdir()).free
if free < 2 << 30:
    print(f"warning: {free / 2**30:.1f} GiB free in {tempfile.gettempdir()}; the tests need about 1 GiB", file=sys.stderr)
PY
# The slowest tests are listed at the end: CI must stay under 30 minutes.
exec python -m pytest -q --durations=15 "$@"

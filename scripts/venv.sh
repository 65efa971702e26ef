# Sourced by demo.sh and test.sh: create .venv and install shardconv with the
# extras given in $SHARDCONV_EXTRAS, reinstalling only when pyproject.toml changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SHARDCONV_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV" >&2
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
fi
STAMP="$VENV/.shardconv-installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)-${SHARDCONV_EXTRAS//,/-}"
if [ ! -f "$STAMP" ]; then
    echo "installing shardconv[$SHARDCONV_EXTRAS] into $VENV (first run takes a few minutes)" >&2
    "$VENV/bin/python" -m pip install -q -e "$ROOT[$SHARDCONV_EXTRAS]" >&2
    rm -f "$VENV"/.shardconv-installed-*
    touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"

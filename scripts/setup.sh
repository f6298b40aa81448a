#!/usr/bin/env bash
# Creates .venv (once) and installs mmqdiff with its pinned dependencies, plus the extras named in $1 (e.g.
# "dev,diffusers" for the tests). Called by main.sh (no extras) and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.mmqdiff-installed${extras:+-${extras//,/-}}
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
  touch "$stamp"
fi

#!/usr/bin/env bash
# Set up, then run the test suite. Default: the fast suite. Extra arguments go to pytest (e.g. -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,diffusers  # the extras: pytest, and diffusers so the conversion tests run
# the fast suite on two workers (the tests run one torch thread each), a test file per worker
if [ $# -eq 0 ]; then set -- -m "not slow" -n 2 --dist loadfile; fi
exec .venv/bin/python -m pytest -q "$@"

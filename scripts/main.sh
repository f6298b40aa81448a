#!/usr/bin/env bash
# Set up, then run the main job on the embedded default; the last line printed is the path of report.json.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m mmqdiff.pipeline --config "${1:-configs/embedded/main.yaml}"

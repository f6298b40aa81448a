#!/usr/bin/env bash
# The segment-scope map (docs/results.md, "Where one model per segment pays"): setup, the main job (its calibration
# data, FP samples and W4A8 seed-1234 runs are reused), then one pipeline per setting, each resumable and skipping
# stages whose outputs match, then the paired table and the figure over the settings' reports. Hours of CPU.
#   bash scripts/experiments/scope_map.sh [SETTING ...]   (default: w4a6 w8a4 w4a8 w4a4, in that order)
set -euo pipefail
cd "$(dirname "$0")/../.."
settings=("${@:-w4a6 w8a4 w4a8 w4a4}")
read -r -a settings <<< "${settings[*]}"
bash scripts/setup.sh
.venv/bin/python -m mmqdiff.pipeline --config configs/embedded/main.yaml
reports=()
for s in "${settings[@]}"; do
  .venv/bin/python -m mmqdiff.pipeline --config "configs/experiments/segment_scope_${s}.yaml"
  reports+=("outputs/embedded/report_scope_${s}/report.json")
done
.venv/bin/python scripts/experiments/scope_map.py "${reports[@]}" --out docs/segment_scope_map.png

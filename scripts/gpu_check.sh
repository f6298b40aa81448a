#!/usr/bin/env bash
# The GPU checks, one short script for a CUDA machine (none of them runs in CI, which has no GPU):
#   1. tests/test_cuda.py: the integer runtime's CUDA backend exact to fake-quant, as the CPU tests check onednn;
#   2. benchmarks/bench_sampling.py --device cuda: FP vs fake-quant vs integer sampling, K=1 and K=4;
#   3. benchmarks/bench_cuda_graphs.py: the same models with each forward replayed from a CUDA graph;
#   4. benchmarks/bench_int_kernels.py --device cuda: the 3x3 conv candidates of the CUDA backend;
#   5. calibration data, a short K=4 calibration and FP + K=4 integer sampling through cli.py on the GPU (into
#      outputs/embedded, which must not exist yet: the stages refuse to overwrite a finished file, and resume a run).
# Each step's log goes to $OUT (or outputs/gpu_check); a step that fails does not stop the next. On a machine without
# this project's environment, put jsonargparse, docstring_parser, typeshed_client and torch_fidelity on PYTHONPATH.
#   bash scripts/gpu_check.sh [python]
set -uo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3}
out=${OUT:-outputs/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME COMMAND...: run, log to $out/NAME.log, print its status and the log's end
  local name=$1 start=$SECONDS rc
  shift
  "$@" >"$out/$name.log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s: $*"
  tail -n "${TAIL:-25}" "$out/$name.log"
}

env_report() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c 'import torch, lightning; print("torch", torch.__version__, "cuda", torch.version.cuda, "lightning",
    lightning.__version__, torch.cuda.get_device_name())'
}

cli_run() {
  local gpu=(--trainer.accelerator gpu --trainer.devices 1)
  "$py" cli.py predict --config configs/embedded/gen_calib.yaml "${gpu[@]}" &&
  "$py" cli.py fit --config configs/embedded/calibrate_k1.yaml --config configs/embedded/calibrate_k4.yaml "${gpu[@]}" --trainer.strategy auto \
    --model.init_args.recon.cali_iters 40 --model.init_args.recon.cali_iters_a 10 &&
  "$py" cli.py predict --config configs/embedded/sample.yaml "${gpu[@]}" --data.init_args.num_images 256 &&
  for runtime in auto int; do  # auto: fake-quant on a GPU
    "$py" cli.py predict --config configs/embedded/sample.yaml "${gpu[@]}" --data.init_args.num_images 256 \
      --model.init_args.calibration_run outputs/embedded/calib_k4 --model.init_args.runtime $runtime \
      --model.init_args.fp_samples outputs/embedded/samples_fp --data.init_args.output_dir outputs/embedded/k4_$runtime \
      --trainer.default_root_dir outputs/embedded/k4_$runtime || return
  done
  for run in samples_fp k4_auto k4_int; do
    echo "$run:" && "$py" -c 'import json, sys; m = json.load(open(sys.argv[1])); print({k: m.get(k) for k in (
      "runtime", "sampling_seconds_per_image", "fid", "fid_std", "psnr_vs_fp")})' "outputs/embedded/$run/metrics.json"
  done
}

step env env_report
step tests "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py
step sampling "$py" benchmarks/bench_sampling.py --device cuda --embedded-batch 256 --steps 50 \
  --cifar-batches 8 64 --cifar-steps 10 --repeats 2
step graphs "$py" benchmarks/bench_cuda_graphs.py --embedded-batch 256 --cifar-batches 64 256
[ -n "${SKIP_KERNELS:-}" ] || step kernels "$py" benchmarks/bench_int_kernels.py --device cuda --repeats 20
step cli cli_run

"""What keeping freed memory (``mmqdiff.quant.allocator``, on in every ``cli.py`` process) gains a user: the sampling
command itself, FP and a calibrated run on the integer runtime, with and without ``MMQDIFF_MALLOC_TUNING=0``, the
settings alternated so that both see the same machine. Reports each run's ``sampling_seconds_per_image`` (predict
steps only, from its metrics.json) and the ratio tuned / glibc defaults.

    .venv/bin/python benchmarks/bench_malloc.py [--run outputs/embedded/calib_k4] [--images 256] [--threads 1]
        [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"freed memory kept": "1", "glibc defaults": "0"}


def sample_seconds(out: Path, run: str | None, images: int, threads: int, tuning: str) -> float:
    args = [sys.executable, str(ROOT / "cli.py"), "predict", "--config", str(ROOT / "configs/embedded/sample.yaml"),
            "--data.init_args.output_dir", str(out), "--trainer.default_root_dir", str(out),
            "--data.init_args.num_images", str(images), "--trainer.accelerator", "cpu",
            "--model.init_args.num_real", "500"]
    if run is not None:
        args += ["--model.init_args.calibration_run", run]
    env = {**os.environ, "MMQDIFF_MALLOC_TUNING": tuning, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(args, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())["sampling_seconds_per_image"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="outputs/embedded/calib_k4", help="a finished calibration run (int runtime)")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    best: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for label, run in (("FP", None), (f"{args.run} (int)", args.run)):
                for setting, tuning in SETTINGS.items():
                    out = Path(tmp) / f"{rep}_{run is None}_{tuning}"
                    sec = sample_seconds(out, run, args.images, args.threads, tuning)
                    best[label, setting] = min(best.get((label, setting), float("inf")), sec)
                    print(f"repeat {rep}: {label}, {setting}: {sec:.4f} s/image", flush=True)
    print(f"\n{args.images} images, {args.threads} torch thread(s), 1 process, best of {args.repeats} alternated\n")
    print("| run | s/image, freed memory kept | s/image, glibc defaults | kept / defaults |")
    print("|---|---|---|---|")
    for label in dict.fromkeys(k[0] for k in best):
        kept, default = best[label, "freed memory kept"], best[label, "glibc defaults"]
        print(f"| {label} | {kept:.4f} | {default:.4f} | {kept / default:.2f} |")


if __name__ == "__main__":
    main()

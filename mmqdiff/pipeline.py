"""The main job: calibration data -> K=1 and K>1 calibration -> FP and K-model sampling -> one report.

    python -m mmqdiff.pipeline --config configs/embedded/main.yaml

Each stage is the same ``cli.py`` fit / predict a user would run by hand, in its own process (so a stage that
launches several processes, like segment-parallel calibration, re-launches that command and not this one), and
each is skipped when its finished artefact exists, so rerunning after an interruption continues where it stopped
(calibration resumes from its last unit checkpoint). The last line printed is the path of report.json.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console

from .diffusion import build_model
from .evaluation.heldout import damage_boundaries, heldout_error_of_run
from .io import atomic_write_text
from .segments.run_folder import calibration_compute, damaged_segments, read_manifest, reexport_segments
from .evaluation.report import write_report

console = Console(width=160)
# per-run metrics.json entries copied into report.json as they are: spreads, per-chunk scores, held-out error, speed
PASSED_THROUGH = ("fid_std", "fid_chunks", "kid_chunks", "kid_chunk_std", "is_chunks", "is_chunk_std", "chunks",
                  "chunk_size", "psnr_std", "psnr_chunks", "heldout_mse", "heldout_x_mse", "heldout_quarters",
                  "heldout_per_step", "sampling_seconds_per_image", "runtime")
CLI_COMMAND = [sys.executable, "-m", "mmqdiff.cli"]  # the installed package's CLI, wherever the pipeline runs


class StageFailed(RuntimeError):
    """A stage's process failed; the message ends with that process's own error message."""


def child_error(stderr_tail: list[str]) -> str:
    """The error message a failed Python process printed last: what follows the frames of its last traceback
    (the exception line(s)), else its last non-empty lines."""
    lines = [line.rstrip("\n") for line in stderr_tail]
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if starts:
        rest = lines[starts[-1] + 1:]
        rest = rest[next((i for i, line in enumerate(rest) if not re.match(r"\s", line)), len(rest)):]
        if any(line.strip() for line in rest):
            return "\n".join(line for line in rest if line.strip())
    return "\n".join([line for line in lines if line.strip()][-5:])


def _stage(name: str, args: list[str], timings: dict[str, float]) -> None:
    """Run one ``mmqdiff.cli`` command as its own process and record its wall time under ``name``. Its stderr is shown
    as it comes and its tail kept, so a failure ends with the child's own error message (``StageFailed``)."""
    console.rule(f"[bold]{name}")
    start = time.perf_counter()
    tail: deque[str] = deque(maxlen=200)
    with subprocess.Popen([*CLI_COMMAND, *args], stderr=subprocess.PIPE, text=True,
                          errors="replace") as proc:
        for line in proc.stderr:
            sys.stderr.write(line)
            tail.append(line)
    if proc.returncode != 0:
        raise StageFailed(f"stage '{name}' failed (exit code {proc.returncode}):\n{child_error(list(tail))}")
    timings[name] = time.perf_counter() - start
    console.print(f"[green]{name}: {timings[name]:.1f} s")


def generate_calibration(cfg: dict[str, Any], timings: dict[str, float]) -> None:
    data = cfg["calibration_data"]
    if Path(data["path"]).is_file():
        console.print(f"calibration data present: {data['path']}")
        return
    _stage("calibration data", ["predict", "--config", data["config"], "--trainer.callbacks.init_args.path",
                                data["path"], *data.get("args", [])], timings)


def segment_count(run: dict[str, Any]) -> int:
    """K of a calibration entry: ``--data.init_args.k`` in its args, else its config's ``data.init_args.k``."""
    args = [str(a) for a in run.get("args", [])]
    if "--data.init_args.k" in args:
        return int(args[args.index("--data.init_args.k") + 1])
    return int(yaml.safe_load(Path(run["config"]).read_text())["data"]["init_args"].get("k", 1))


def data_driven_boundaries(run: dict[str, Any], runs: list[dict[str, Any]], calibration_data: str) -> list[str]:
    """``--data.init_args.boundaries`` for an entry with ``boundaries_from: <name of an earlier run>``: the cut
    points that give each segment an equal share of that run's sample-space damage
    (``evaluation.damage_boundaries``); none without the key."""
    source = run.get("boundaries_from")
    if source is None:
        return []
    earlier = {r["name"]: r for r in runs[:runs.index(run)]}
    if source not in earlier:
        raise ValueError(f"{run['name']}: boundaries_from names {source!r}, which is not a calibration listed before "
                         f"it ({list(earlier)})")
    cuts = damage_boundaries(earlier[source]["run_dir"], calibration_data, segment_count(run))
    console.print(f"{run['name']}: segment boundaries {cuts} (equal shares of {source}'s sample-space damage)")
    return ["--data.init_args.boundaries", json.dumps(cuts)]


def calibrate(run: dict[str, Any], calibration_data: str, timings: dict[str, float],
              runs: list[dict[str, Any]] | None = None) -> None:
    """Done when every file the run's manifest lists is intact; damaged segments are re-exported from the run's
    checkpoint (only those); an unfinished run is resumed; otherwise the calibration runs. ``runs``: the whole
    list, for an entry whose boundaries come from an earlier run (``boundaries_from``)."""
    run_dir = Path(run["run_dir"])
    if (run_dir / "manifest.json").is_file():
        damaged = damaged_segments(run_dir)
        for problems in damaged.values():
            for problem in problems:
                console.print(f"{run['name']}: {problem}", style="yellow", markup=False, soft_wrap=True)
        if damaged:
            reexport_segments(run_dir, sorted(damaged))
            console.print(f"{run['name']}: re-exported segment(s) {sorted(damaged)} from the run's checkpoint",
                          soft_wrap=True)
        console.print(f"{run['name']}: calibration present in {run_dir}")
        return
    args = ["fit", "--config", run["config"], "--trainer.default_root_dir", str(run_dir),
            "--data.init_args.path", calibration_data, *run.get("args", []),
            *data_driven_boundaries(run, runs or [run], calibration_data)]
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        args += ["--ckpt_path", "last"]
    _stage(f"calibrate {run['name']}", args, timings)


def check_equal_compute(runs: list[dict[str, Any]]) -> None:
    """A run with ``equal_compute_to: <name>`` must have spent exactly that run's calibration iterations; a config
    edit that breaks the pairing fails here, before any sampling."""
    by_name = {r["name"]: r for r in runs}
    for run in runs:
        other = run.get("equal_compute_to")
        if other is None:
            continue
        if other not in by_name:
            raise ValueError(f"{run['name']}: equal_compute_to names {other!r}, which is not among {list(by_name)}")
        mine, theirs = (calibration_compute(read_manifest(r["run_dir"])) for r in (run, by_name[other]))
        if mine != theirs:
            raise ValueError(f"{run['name']} spent {mine} (weight, act) iterations per unit, {other} {theirs}: "
                             "they are not an equal-compute pair; fix the iterations in the main config")
        console.print(f"{run['name']}: same calibration compute as {other} ({mine[0]}/{mine[1]} iterations per unit)")


def cpu_parallel_args(processes: int) -> list[str]:
    """Trainer flags that sample on the CPU in ``processes`` data-parallel processes (one torch thread each, as
    Lightning sets them) when no GPU is present; none otherwise. On the 2-core CPU two 1-thread processes sample
    faster than one 2-thread process, FP and integer runtime alike (docs/benchmarks.md)."""
    if not (isinstance(processes, int) and processes >= 1):
        raise ValueError(f"sampling.cpu_processes must be an integer >= 1, got {processes!r}")
    if processes == 1 or torch.cuda.is_available():
        return []
    return ["--trainer.accelerator", "cpu", "--trainer.devices", str(processes), "--trainer.strategy", "ddp"]


def sample(name: str, sampling: dict[str, Any], out_dir: Path, timings: dict[str, float],
           calibration_run: str | None = None, fp_samples: Path | None = None) -> dict[str, Any]:
    if not (out_dir / "metrics.json").is_file():
        args = ["predict", "--config", sampling["config"], "--data.init_args.output_dir", str(out_dir),
                "--trainer.default_root_dir", str(out_dir), "--data.init_args.num_images", str(sampling["num_images"])]
        if calibration_run is not None:
            args += ["--model.init_args.calibration_run", calibration_run]
        if fp_samples is not None:
            args += ["--model.init_args.fp_samples", str(fp_samples)]
        args += sampling.get("args", []) + cpu_parallel_args(sampling.get("cpu_processes", 1))
        _stage(f"sample {name}", args, timings)
    return json.loads((out_dir / "metrics.json").read_text())


def heldout(run: dict[str, Any], cfg: dict[str, Any], out_dir: Path, timings: dict[str, float]) -> dict[str, Any]:
    """The run's held-out per-step error against FP (``evaluation.heldout_error_of_run``), kept in
    ``out_dir/heldout.json`` so a rerun does not recompute it."""
    path = out_dir / "heldout.json"
    if not path.is_file():
        start = time.perf_counter()
        result = heldout_error_of_run(run["run_dir"], cfg["calibration_data"]["path"],
                                      range(*cfg["heldout_trajectories"]))
        atomic_write_text(path, json.dumps(result))
        timings[f"held-out error {run['name']}"] = time.perf_counter() - start
    return json.loads(path.read_text())


def fp_model_bytes(model_config: str) -> int:
    """fp32 bytes of the FP parameters: what the FP row of the table stores."""
    return sum(p.numel() * p.element_size() for p in build_model(model_config).parameters())


def run_entry(name: str, metrics: dict[str, Any], manifest: dict[str, Any] | None, model_config: str,
              out_dir: Path) -> dict[str, Any]:
    entry = {"name": name, "fid": metrics.get("fid"), "is": metrics.get("is_mean"), "is_std": metrics.get("is_std"),
             "kid": metrics.get("kid_mean"), "kid_std": metrics.get("kid_std"), "psnr_vs_fp": metrics.get("psnr_vs_fp"),
             "per_step_mse": metrics.get("per_step_mse"), "sample_grid": str(out_dir / "grid.png"),
             "num_images": metrics.get("num_images"),
             **{k: metrics[k] for k in PASSED_THROUGH if k in metrics}}
    if manifest is None:
        entry.update(segments=None, weight_bits=None, act_bits=None, model_bytes=fp_model_bytes(model_config),
                     calib_seconds=None, peak_mem_bytes=None, calib_iters=None)
    else:
        segs = manifest["segments"]
        recon = manifest["reconstruction"]
        entry.update(segments=len(segs), weight_bits=manifest["weight_bits"], act_bits=manifest["act_bits"],
                     model_bytes=sum(s["model_bytes"] for s in segs),
                     calib_seconds=manifest.get("wall_seconds", sum(s["wall_seconds"] for s in segs)),
                     peak_mem_bytes=max(s["peak_mem_bytes"] for s in segs),
                     calib_iters=[recon["cali_iters"], recon["cali_iters_a"]],
                     calib_iters_total=calibration_compute(manifest),
                     segment_steps=[s["steps"] for s in segs])
    return entry


def main(argv: list[str] | None = None) -> Path:
    """Stages of the config: ``calibration_data``, ``calibrations`` and ``sampling``; each may add ``args``
    (extra ``cli.py`` flags, e.g. the user's checkpoint path) to its commands. The report goes to ``report_dir``
    (default ``<output_dir>/report``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/embedded/main.yaml")
    args = parser.parse_args(argv)
    cfg = yaml.safe_load(Path(args.config).read_text())
    out = Path(cfg["output_dir"])
    report_dir = Path(cfg.get("report_dir", out / "report"))
    report_dir.mkdir(parents=True, exist_ok=True)  # the config beside its report: configs may share an output_dir
    atomic_write_text(report_dir / "pipeline_config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    timings: dict[str, float] = {}
    start = time.perf_counter()

    generate_calibration(cfg, timings)
    for run in cfg["calibrations"]:
        calibrate(run, cfg["calibration_data"]["path"], timings, cfg["calibrations"])

    check_equal_compute(cfg["calibrations"])

    sampling = cfg["sampling"]
    fp_dir = out / "samples_fp"
    runs = [run_entry("FP", sample("FP", sampling, fp_dir, timings), None, sampling["model_config"], fp_dir)]
    for run in cfg["calibrations"]:
        run_out = out / f"samples_{Path(run['run_dir']).name}"
        metrics = sample(run["name"], sampling, run_out, timings, run["run_dir"], fp_dir)
        if "heldout_trajectories" in cfg:
            metrics.update(heldout(run, cfg, run_out, timings))
        runs.append(run_entry(run["name"], metrics, read_manifest(run["run_dir"]), sampling["model_config"], run_out))

    report = write_report(runs, report_dir, console=console)
    timings["total"] = time.perf_counter() - start
    (report_dir / "timings.json").write_text(json.dumps(timings, indent=1))
    for stage, seconds in timings.items():
        console.print(f"{stage:>28}: {seconds:7.1f} s")
    print(report.resolve())
    return report


if __name__ == "__main__":
    try:
        main()
    except StageFailed as e:
        print(f"pipeline stopped: {e}", file=sys.stderr)  # plain: the child's message may contain [brackets]
        sys.exit(1)

"""The stages: each runs its ``cli.py`` command as a child process (or, for held-out error, in process) unless the
artefact it would make is already there and was made from what the config asks for now (:mod:`.identity`).

A finished calibration made from other inputs is refused (naming the differing keys): calibrations are costly and
never replaced on the pipeline's own. Sampling and held-out error are redone when what they consumed changed (a
recalibrated run, another FP reference, more images), resuming where the images are still valid.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from rich.console import Console

from ..data import timestep_segments
from ..diffusion import build_model, load_config
from ..evaluation.heldout import damage_boundaries, heldout_error_of_run
from ..io import atomic_write_text
from ..segments.run_folder import (LAST_CKPT, MANIFEST_NAME, calibration_compute, damaged_segments, model_bytes,
                                   read_manifest, reexport_segments, run_identity, segment_scope)
from .config import Calibration
from .identity import (Inputs, StageRefused, calibration_settings, describe, differences, digest, read_record,
                       run_settings, write_record)
from .plan import Command, Plan

console = Console(width=160)
CLI_COMMAND = [sys.executable, "-m", "mmqdiff.cli"]  # the installed package's CLI, wherever the pipeline runs
# per-run metrics.json entries copied into report.json as they are: spreads, per-chunk scores, held-out error, speed
PASSED_THROUGH = ("fid_std", "fid_chunks", "kid_chunks", "kid_chunk_std", "is_chunks", "is_chunk_std", "chunks",
                  "chunk_size", "psnr_std", "psnr_chunks", "heldout_mse", "heldout_x_mse", "heldout_quarters",
                  "heldout_per_step", "sampling_seconds_per_image", "runtime")
# sampler settings that only score the images (changing them rescores; every other setting makes other images)
SCORE_KEYS = ("real_source", "feature_extractor", "inception_weights", "num_real", "kid_subset_size", "score_chunks",
              "fp_samples")
# what a sampling run measured while it sampled: kept in the stage record, since a run that finds every image made
# already (a repaired metrics.json) cannot measure it again
MEASURED = ("runtime", "sampling_seconds_per_image")
STOP_GRACE_S = 60.0  # how long a stage asked to stop may take to save and exit before it is killed


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
        try:
            for line in proc.stderr:
                sys.stderr.write(line)
                tail.append(line)
        except BaseException:
            _stop(proc)
            raise
    if proc.returncode != 0:
        raise StageFailed(f"stage '{name}' failed (exit code {proc.returncode}):\n{child_error(list(tail))}")
    timings[name] = time.perf_counter() - start
    console.print(f"[green]{name}: {timings[name]:.1f} s")


def _stop(proc: subprocess.Popen) -> None:
    """The pipeline is stopping (Ctrl-C, SIGTERM): the stage stops too, rather than go on unobserved. It gets
    Ctrl-C's signal, on which Lightning ends fit and predict alike and calibration keeps its last finished work item
    (checkpoints are atomic, so a rerun resumes there); one that has not exited after ``STOP_GRACE_S`` is killed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        _, rest = proc.communicate(timeout=STOP_GRACE_S)
        sys.stderr.write(rest or "")
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def generate_calibration(plan: Plan, timings: dict[str, float]) -> None:
    """The calibration file, unless it exists (``Plan.check_calibration_data`` compared it with the request)."""
    path = plan.cfg.calibration_data.path
    if Path(path).is_file():
        console.print(f"calibration data present: {path}")
        return
    _stage(plan.generate.name, list(plan.generate.args), timings)


# ------------------------------------------------------------------------------------------------ calibration
def _segments(plan: Plan, run: Calibration, inputs: Inputs,
              record: dict[str, Any] | None) -> tuple[list[list[int]], dict[str, Any] | None]:
    """(the run's segment steps, the record of cuts computed from data): an entry with ``boundaries_from`` cuts
    where each segment gets an equal share of that earlier run's sample-space damage (``damage_boundaries``),
    recomputed only when that run or the calibration data changed since the record."""
    data = plan.command(run).init_args("data")
    if run.boundaries_from is None:
        return [[r.start, r.stop] for r in timestep_segments(data["num_steps"], data["k"], data["boundaries"])], None
    source = plan.entry(run.boundaries_from)
    key = {"source": run_identity(read_manifest(source.run_dir)),
           "calibration_data": inputs.calibration_sha256(data["path"]), "k": data["k"]}
    cached = (record or {}).get("boundaries") or {}

    def measure() -> list[int]:
        found = damage_boundaries(source.run_dir, data["path"], data["k"])
        console.print(f"{run.name}: segment boundaries {found} (equal shares of {source.name}'s sample-space damage)")
        return found

    cuts = cached["cuts"] if cached.get("key") == key else inputs.memo(("cuts", digest(key)), measure)
    segments = timestep_segments(data["num_steps"], data["k"], cuts)
    return [[r.start, r.stop] for r in segments], {"key": key, "cuts": cuts}


def wanted_run(plan: Plan, run: Calibration, inputs: Inputs,
               record: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(what the entry's calibration must be made from, keyed as ``run_settings``; its data-driven cuts, if any)."""
    command = plan.command(run)
    model = command.init_args("model")
    segments, cuts = _segments(plan, run, inputs, record)
    base = None if model["init_from"] is None else read_manifest(model["init_from"])
    base_state = None if base is None else base["segments"][0]["sha256"]["quant_state"]
    return calibration_settings(model, command.init_args("data"), inputs, segments, base_state), cuts


def verify_run(plan: Plan, run: Calibration, inputs: Inputs, wanted: dict[str, Any]) -> dict[str, Any]:
    """The run's manifest, if the run was made from ``wanted``; else ``StageRefused`` naming what differs."""
    manifest = read_manifest(run.run_dir)
    have = run_settings(manifest)
    recorded, data = have["calibration_data"], plan.command(run).init_args("data")["path"]
    if recorded != wanted["calibration_data"] and recorded == inputs.file_sha256(data):
        have["calibration_data"] = wanted["calibration_data"]  # a manifest from when files counted by their bytes
    keys = differences(have, wanted)
    if keys:
        raise StageRefused(f"{plan.where(run)}: {run.run_dir} holds a calibration made from other inputs than the "
                           f"entry asks for: {describe(keys, have, wanted, 'run')}. Delete the run folder to "
                           "calibrate it again, give the entry another run_dir, or restore its settings")
    return manifest


def repair(name: str, run_dir: str | Path) -> dict[str, Any]:
    """The finished run's manifest after re-exporting, from the run's checkpoint, the segments whose files went
    missing or changed (only those; ``reexport_segments`` checks they come back as calibrated)."""
    damaged = damaged_segments(run_dir)
    for problems in damaged.values():
        for problem in problems:
            console.print(f"{name}: {problem}", style="yellow", markup=False, soft_wrap=True)
    if damaged:
        reexport_segments(run_dir, sorted(damaged))
        console.print(f"{name}: re-exported segment(s) {sorted(damaged)} from the run's checkpoint", soft_wrap=True)
    return read_manifest(run_dir)


def check_finished_runs(plan: Plan, inputs: Inputs) -> None:
    """Refuse, before any stage runs, every finished run whose inputs differ from its entry's; runs whose
    calibration data, warm-start base or cut source is still to be made are checked when their turn comes."""
    if not Path(plan.cfg.calibration_data.path).is_file():
        return
    pending: set[str] = set()
    for run in plan.cfg.calibrations:
        if not (Path(run.run_dir) / MANIFEST_NAME).is_file():
            pending.add(run.name)
            continue
        depends = [plan.base_run(run), plan.entry(run.boundaries_from) if run.boundaries_from else None]
        if not any(d is not None and d.name in pending for d in depends):
            verify_run(plan, run, inputs, wanted_run(plan, run, inputs, read_record(run.run_dir))[0])


def calibrate(plan: Plan, run: Calibration, inputs: Inputs, timings: dict[str, float]) -> dict[str, Any]:
    """The entry's finished run (its manifest): present and made from what the entry asks (damaged segment files
    re-exported from the run's checkpoint, only those), resumed if unfinished, else calibrated. Records what it
    consumed in the run folder."""
    run_dir, command = Path(run.run_dir), plan.command(run)
    record = read_record(run_dir)
    wanted, cuts = wanted_run(plan, run, inputs, record)
    args = list(command.args)
    if (run_dir / MANIFEST_NAME).is_file():
        verify_run(plan, run, inputs, wanted)
        manifest = repair(run.name, run_dir)
        console.print(f"{run.name}: calibration present in {run_dir}")
    else:
        if cuts is not None:
            args += ["--data.init_args.boundaries", json.dumps(cuts["cuts"])]
        if (run_dir / LAST_CKPT).is_file():
            args += ["--ckpt_path", "last"]
        _stage(command.name, args, timings)
        manifest = verify_run(plan, run, inputs, wanted)
    write_record(run_dir, {"stage": command.name, "command": args, "config": command.config, "identity": wanted,
                           "boundaries": cuts, "output": run_identity(manifest)})
    return manifest


# ------------------------------------------------------------------------------------------------ sampling
def sampling_identity(plan: Plan, command: Command, inputs: Inputs, calibration: list[dict[str, Any]] | None,
                      fp_reference: str | None) -> dict[str, Any]:
    """What a sampling stage's images (``images``) and scores (``scores``) are made from: the sampler's resolved
    settings with the FP weights, the calibration run (``run_identity``) and the FP reference folder (its stage
    identity's digest) by content, and the runtime resolved for the device."""
    model, data = dict(command.init_args("model")), command.init_args("data")
    model.pop("metric_cache")  # where reference features are cached: the same features wherever
    model.update(checkpoint=inputs.weights_sha256(model["config"], model["checkpoint"]),
                 config=load_config(model["config"]), calibration_run=calibration, fp_samples=fp_reference,
                 runtime="fp" if calibration is None else plan.runtime(command))
    if calibration is None:
        model.pop("pack")  # FP runs ignore it
    for key in ("feature_extractor", "inception_weights"):
        if model[key] is not None:
            model[key] = inputs.file_sha256(model[key])
    images = {k: v for k, v in model.items() if k not in SCORE_KEYS}
    if model["runtime"] == "fake":  # fake-quant images depend on the batch they were sampled in (predict_step)
        images["batch_size"] = data["batch_size"]
    return {"images": images, "scores": {**{k: model[k] for k in SCORE_KEYS}, "num_images": data["num_images"]}}


def sample(command: Command, out_dir: Path, identity: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    """The folder's metrics (with the runtime and seconds per image its sampling measured), sampling first unless
    its record matches ``identity``: images made from other settings are sampled again (``overwrite``), valid ones
    are kept and the missing ones made (a raised ``num_images``, an interrupted run), then everything is rescored."""
    record, metrics = read_record(out_dir), out_dir / "metrics.json"
    if record is not None and record.get("identity") == identity and record.get("complete") and metrics.is_file():
        console.print(f"{command.name}: samples present in {out_dir}")
        return {**json.loads(metrics.read_text()), **record.get("outputs", {})}
    same_images = record is not None and (record.get("identity") or {}).get("images") == identity["images"]
    args = list(command.args)
    if any((out_dir / "images").glob("*.png")) and not same_images:
        why = ("no record of how they were made" if record is None else
               describe(differences(record["identity"]["images"], identity["images"]), record["identity"]["images"],
                        identity["images"], "folder"))
        console.print(f"{command.name}: {out_dir} holds images made from other settings ({why}); sampling again",
                      style="yellow", markup=False, soft_wrap=True)
        args += ["--data.init_args.overwrite", "true"]
    outputs = record.get("outputs", {}) if same_images else {}
    stage = {"stage": command.name, "command": args, "config": command.config, "identity": identity}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_record(out_dir, {**stage, "complete": False, "outputs": outputs})
    _stage(command.name, args, timings)
    result = json.loads(metrics.read_text())
    if result.get("sampling_seconds_per_image") is not None:  # this run sampled images: it measured them
        outputs = {k: result.get(k) for k in MEASURED}
    write_record(out_dir, {**stage, "complete": True, "outputs": outputs})
    return {**result, **outputs}


def heldout(plan: Plan, run: Calibration, manifest: dict[str, Any], out_dir: Path, inputs: Inputs,
            timings: dict[str, float]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the run's held-out per-step error against FP, ``evaluation.heldout_error_of_run``; what it was computed
    from), kept in ``out_dir/heldout.json`` and recomputed when the run, the calibration data or the trajectories
    change."""
    data = plan.cfg.calibration_data.path
    identity = {"calibration_run": run_identity(manifest), "fp_model": manifest["fp_model"]["sha256"],
                "calibration_data": inputs.calibration_sha256(data),
                "trajectories": list(plan.cfg.heldout_trajectories)}
    path = out_dir / "heldout.json"
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = None
    if not isinstance(stored, dict) or stored.get("identity") != identity:
        name, start = f"held-out error {run.name}", time.perf_counter()
        stored = {"identity": identity,
                  "result": heldout_error_of_run(run.run_dir, data, range(*plan.cfg.heldout_trajectories))}
        atomic_write_text(path, json.dumps(stored))
        timings[name] = time.perf_counter() - start
    return stored["result"], identity


# ------------------------------------------------------------------------------------------------ report
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
                     segment_scope=segment_scope(manifest), model_bytes=model_bytes(manifest),
                     calib_seconds=manifest.get("wall_seconds", sum(s["wall_seconds"] for s in segs)),
                     peak_mem_bytes=max(s["peak_mem_bytes"] for s in segs),
                     calib_iters=[recon["cali_iters"], recon["cali_iters_a"]],
                     calib_iters_total=calibration_compute(manifest),
                     segment_steps=[s["steps"] for s in segs])
    return entry

"""The record of one calibration run: ``manifest.json`` in the run folder, beside
``segment_XX/{quant_state,packed}.pt``.

The manifest says what was run (segments, step and t ranges, bits, quant and reconstruction settings, FP model and
calibration file with their SHA-256) and what it cost (wall time, peak memory, packed model bytes per segment).
:func:`load_segment_models` turns a run folder back into K frozen quantized models for the K-model sampler.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .data.segments import segment_of_step
from .diffusion import build_model, file_sha256
from .io import atomic_write_text
from .quant import QuantizedUNet, config_from_state, load_packed, quantize_model

FORMAT = "mmqdiff.calibration-run/1"
MANIFEST_NAME = "manifest.json"
REQUIRED = ("format", "k", "num_steps", "skip_type", "segments", "weight_bits", "act_bits", "quant_config",
            "reconstruction", "fp_model", "calibration", "wall_seconds", "peak_mem_kind")
SEGMENT_REQUIRED = ("index", "steps", "t_range", "pairs", "quant_state", "packed", "sha256", "model_bytes",
                    "wall_seconds", "peak_mem_bytes")


def segment_dir(run_dir: str | Path, segment: int) -> Path:
    return Path(run_dir) / f"segment_{segment:02d}"


def _validate(manifest: Any, where: str) -> dict[str, Any]:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{where}: not a calibration manifest (format {got!r}, expected {FORMAT!r})")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")
    segments = manifest["segments"]
    if not isinstance(segments, list) or len(segments) != manifest["k"]:
        raise ValueError(f"{where}: 'segments' must list k={manifest['k']} entries")
    for i, seg in enumerate(segments):
        missing = [k for k in SEGMENT_REQUIRED if k not in seg]
        if missing or seg["index"] != i:
            raise ValueError(f"{where}: segment entry {i} is malformed (missing {missing}, index {seg.get('index')})")
    steps = [range(*seg["steps"]) for seg in segments]
    if len(segment_of_step(steps)) != manifest["num_steps"]:
        raise ValueError(f"{where}: segments {steps} do not cover the {manifest['num_steps']} sampling steps")
    return manifest


def write_manifest(run_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Validate and write ``run_dir/manifest.json`` atomically (temporary file, then rename)."""
    path = Path(run_dir) / MANIFEST_NAME
    _validate({"format": FORMAT, **manifest}, str(path))
    return atomic_write_text(path, json.dumps({"format": FORMAT, **manifest}, indent=2) + "\n")


def read_manifest(run_dir_or_path: str | Path) -> dict[str, Any]:
    """The validated manifest of a run folder (or of the manifest file itself); errors name the file."""
    path = Path(run_dir_or_path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no calibration manifest at {path} (an unfinished run has none; resume it with "
                                "`python cli.py fit --config ... --ckpt_path last`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return _validate(manifest, str(path))


def _load_export(run_dir: Path, seg: dict[str, Any]) -> dict[str, Any]:
    path = run_dir / seg["packed"]
    if not path.is_file():
        raise FileNotFoundError(f"segment {seg['index']}: packed model {path} is missing")
    digest = file_sha256(path)
    if digest != seg["sha256"]["packed"]:
        raise ValueError(f"{path}: SHA-256 {digest} differs from the manifest's {seg['sha256']['packed']} "
                         "(file replaced or corrupted)")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_segment_models(run_dir: str | Path, fp_model: torch.nn.Module | None = None,
                        device: str | torch.device = "cpu") -> tuple[list[range], list[QuantizedUNet]]:
    """(step ranges, models): segment k's quantized model, frozen and in eval mode on ``device``, for steps
    ``ranges[k]``. Models are rebuilt from the packed exports alone (hash-checked against the manifest);
    ``fp_model`` only supplies the architecture (default: built from the config recorded in the manifest)."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    arch = fp_model if fp_model is not None else build_model(manifest["fp_model"]["config_dict"])
    ranges, models = [], []
    for seg in manifest["segments"]:
        export = _load_export(run_dir, seg)
        q = quantize_model(arch, config_from_state(export)).to(device)
        models.append(load_packed(q, export).eval())
        ranges.append(range(*seg["steps"]))
    return ranges, models

"""Stage identity: what a stage consumed, recorded beside what it made, compared with what the config asks for now.

A stage is skipped only when the two are equal. Inputs count by content: the FP model by its state-dict hash, a
calibration run by its manifest (:func:`run_settings`; its segment models by ``run_identity``), files by SHA-256.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

from ..data.calibration import calibration_sha256
from ..diffusion import build_model, file_sha256, load_checkpoint, load_config, state_dict_sha256
from ..io import atomic_write_text, shipped_path
from ..quant import QuantConfig
from ..quant.reconstruction import ReconSettings, WarmStart
from ..segments.run_folder import segment_scope, warm_settings

RECORD_NAME = "pipeline_stage.json"
FORMAT = "mmqdiff.pipeline-stage/1"
# reconstruction settings that do not change a calibration's result (the calibration's resume signature leaves them
# out too): where the cached block inputs live
RESULT_FREE_RECON = ("cache_device",)
_ABSENT = object()


class StageRefused(RuntimeError):
    """A finished artefact was made from other inputs than the config asks for, and the pipeline does not replace
    finished artefacts on its own; the message names the differing keys and what to do."""


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys (lists stay whole)."""
    if not isinstance(value, Mapping):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def differences(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """The dotted keys whose values differ (or exist on one side only)."""
    a, b = flatten(recorded), flatten(wanted)
    return sorted(k for k in set(a) | set(b) if a.get(k, _ABSENT) != b.get(k, _ABSENT))


def _short(value: Any) -> str:
    text = "(none)" if value is _ABSENT else json.dumps(value, default=str)
    return text if len(text) <= 70 else text[:67] + "..."


def describe(keys: list[str], recorded: Mapping[str, Any], wanted: Mapping[str, Any], theirs: str,
             ours: str = "config") -> str:
    """``key: <theirs> value, <ours> value`` for each differing key."""
    a, b = flatten(recorded), flatten(wanted)
    return "; ".join(f"{k}: {theirs} {_short(a.get(k, _ABSENT))}, {ours} {_short(b.get(k, _ABSENT))}" for k in keys)


def digest(value: Any) -> str:
    """SHA-256 of a JSON value (keys sorted): one string that changes whenever the identity does."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """The stage record in ``folder``; None when there is none or it cannot be read (the stage then runs again)."""
    path = Path(folder) / RECORD_NAME
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def write_record(folder: str | Path, record: dict[str, Any]) -> Path:
    return atomic_write_text(Path(folder) / RECORD_NAME,
                             json.dumps({"format": FORMAT, **record}, indent=1, default=str) + "\n")


class Inputs:
    """Content hashes of the files the stages consume, each computed once per pipeline run."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, ...], Any] = {}

    def _once(self, key: tuple[str, ...], compute) -> Any:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def file_sha256(self, path: str | Path) -> str:
        path = shipped_path(path)
        return self._once(("file", str(path.resolve())), lambda: file_sha256(path))

    def calibration_sha256(self, path: str | Path) -> str:
        """A calibration file's identity by its data (``data.calibration.calibration_sha256``), as manifests keep it."""
        return self._once(("calibration", str(Path(path).resolve())), lambda: calibration_sha256(path))

    def weights_sha256(self, model_config: str, checkpoint: str) -> str:
        """The FP model's identity by its weights (``state_dict_sha256``), as manifests and sampling records keep it."""
        return self._once(("weights", str(model_config), str(shipped_path(checkpoint).resolve())),
                          lambda: state_dict_sha256(load_checkpoint(build_model(model_config), checkpoint)))

    def memo(self, key: tuple[str, ...], compute) -> Any:
        """Any other derived input (e.g. segment cuts computed from a run), by a key naming what it depends on."""
        return self._once(("memo", *key), compute)


def run_settings(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What a finished calibration run was made from, by content, keyed as :func:`calibration_settings` keys the
    config's request (settings a manifest written before they existed had take their defaults)."""
    calibration, warm = manifest["calibration"], manifest.get("init_from")
    recon = {**asdict(ReconSettings()), **manifest["reconstruction"]}
    return {"fp_model": manifest["fp_model"]["sha256"], "model_config": manifest["fp_model"].get("config_dict"),
            "calibration_data": calibration["sha256"], "cali_st": calibration["cali_st"],
            "cali_n": calibration["cali_n"], "overlap": calibration.get("overlap", 0),
            "num_steps": manifest["num_steps"], "skip_type": manifest["skip_type"], "k": manifest["k"],
            "segments": [list(s["steps"]) for s in manifest["segments"]],
            "quant": {**asdict(QuantConfig()), **manifest["quant_config"]},
            "recon": {k: v for k, v in recon.items() if k not in RESULT_FREE_RECON},
            "seed": manifest.get("seed"), "segment_scale": manifest.get("segment_scale"),
            "segment_scope": segment_scope(manifest),
            "init_from": None if not warm else {"quant_state": warm["quant_state_sha256"],
                                                "warm": None if warm.get("warm", {}) is None else
                                                {**asdict(WarmStart()), **warm.get("warm", {})}}}


def calibration_settings(model: Mapping[str, Any], data: Mapping[str, Any], inputs: Inputs,
                         segments: list[list[int]], base_quant_state: str | None) -> dict[str, Any]:
    """What a calibration stage asks for, keyed as :func:`run_settings`: from its resolved ``model`` / ``data``
    init args, the segment steps it will cut and the quant state file hash of its warm-start base run."""
    recon = {k: v for k, v in model["recon"].items() if k not in RESULT_FREE_RECON}
    scale = model["segment_scale"]
    return {"fp_model": inputs.weights_sha256(model["model_config"], model["checkpoint"]),
            "model_config": load_config(model["model_config"]),
            "calibration_data": inputs.calibration_sha256(data["path"]),
            "cali_st": data["cali_st"], "cali_n": data["cali_n"], "overlap": data["overlap"],
            "num_steps": data["num_steps"], "skip_type": data["skip_type"], "k": data["k"], "segments": segments,
            "quant": dict(model["quant"]), "recon": recon, "seed": model["seed"],
            "segment_scale": None if scale is None else [float(f) for f in scale],
            "segment_scope": model["segment_scope"],
            "init_from": None if model["init_from"] is None else {
                "quant_state": base_quant_state, "warm": warm_settings(WarmStart(**model["warm"]),
                                                                       model["segment_scope"])}}

"""The record of one calibration run: ``manifest.json`` in the run folder, beside
``segment_XX/{quant_state,packed}.pt``.

The manifest says what was run (segments, step and t ranges, bits, quant and reconstruction settings, FP model and
calibration file with their SHA-256) and what it cost (wall time, peak memory, packed model bytes per segment).
A run of ``segment_scope`` "activations" (recorded in the manifest; absent means "full") keeps one weight rounding
for every segment: its weights, scales, FP params and switches are stored once, in ``shared/{quant_state,packed}.pt``
(the manifest's ``shared`` entry), and each segment's files hold only its activation quantizers; loading joins them.
:func:`load_segment_models` turns a run folder back into K frozen quantized models for the K-model sampler;
:func:`damaged_segments` and :func:`reexport_segments` find and rewrite segment files that went missing or changed.
"""
from __future__ import annotations

import json
import resource
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..diffusion import build_model, file_sha256, load_checkpoint, load_config, state_dict_sha256, timesteps
from ..io import atomic_save, atomic_write_text, brief_error
from ..quant import (QuantConfig, QuantizedUNet, ReconSettings, WarmStart, config_from_state, export_packed,
                    load_packed, load_quant_state, packed_nbytes, quant_state_dict, quantize_model)
from ..quant.calibration import SEGMENT_SCOPES, calibration_items
from ..quant.export import split_activations
from ..quant.model import with_config_defaults

FORMAT = "mmqdiff.calibration-run/1"
MANIFEST_NAME = "manifest.json"
LAST_CKPT = Path("checkpoints") / "last.ckpt"  # the run's Lightning checkpoint: every segment's quant state
CKPT_KEY = "mmqdiff_calibration"  # where SegmentCalibration keeps its state inside that checkpoint
SEGMENT_FILES = ("quant_state", "packed")
SHARED_DIR = "shared"  # segment_scope "activations": the weights every segment shares, stored once
REQUIRED = ("format", "k", "num_steps", "skip_type", "segments", "weight_bits", "act_bits", "quant_config",
            "reconstruction", "fp_model", "calibration", "wall_seconds", "peak_mem_kind")
SEGMENT_REQUIRED = ("index", "steps", "t_range", "pairs", "quant_state", "packed", "sha256", "model_bytes",
                    "wall_seconds", "peak_mem_bytes")
UNIT_KEYS = ("unit", "phase", "rec_first", "rec_last", "item_seconds")  # per work item, in a segment's entry


def segment_dir(run_dir: str | Path, segment: int) -> Path:
    return Path(run_dir) / f"segment_{segment:02d}"


def cpu_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def model_states(qmodel: QuantizedUNet, quant_act: bool) -> dict[str, dict[str, Any]]:
    """A calibrated model's ``quant_state`` and ``packed`` export (on the CPU), as its run folder files hold them."""
    qmodel.set_quant_state(True, quant_act)
    return {"quant_state": cpu_state(quant_state_dict(qmodel)), "packed": cpu_state(export_packed(qmodel))}


def _equal(a: Any, b: Any) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else \
        type(a) is type(b) and a == b


def write_segment_files(run_dir: str | Path, segment: int, qmodel: QuantizedUNet, quant_act: bool,
                        shared: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a calibrated segment model's ``quant_state.pt`` and ``packed.pt`` (atomically); their manifest entries:
    paths relative to the run folder, file and content SHA-256 (the content hash survives a re-save), packed bytes.

    ``shared`` (segment_scope "activations"): the quant state whose weight rounding every segment keeps (the base
    run's); the segment's own must equal it outside the activation quantizers, and only those are written."""
    run_dir = Path(run_dir)
    states = model_states(qmodel, quant_act)
    if shared is not None:
        kept, _ = split_activations(qmodel, with_config_defaults(shared))
        mine, states["quant_state"] = split_activations(qmodel, states["quant_state"])
        changed = sorted(k for k in kept.keys() | mine.keys()
                         if k not in kept or k not in mine or not _equal(kept[k], mine[k]))
        if changed:
            raise RuntimeError(f"segment {segment}: its weight state differs from the shared one in {changed[:3]} "
                               f"({len(changed)} keys); segment_scope 'activations' stores the weights once")
        states["packed"] = split_activations(qmodel, states["packed"])[1]
    return _write_files(run_dir, segment_dir(run_dir, segment), states)


def write_shared_files(run_dir: str | Path, qmodel: QuantizedUNet, quant_act: bool) -> dict[str, Any]:
    """The manifest's ``shared`` entry of a segment_scope "activations" run: ``shared/{quant_state,packed}.pt``
    written from any of its segment models without their activation quantizers (what the segments share)."""
    states = {kind: split_activations(qmodel, state)[0] for kind, state in model_states(qmodel, quant_act).items()}
    return _write_files(Path(run_dir), Path(run_dir) / SHARED_DIR, states)


def _write_files(run_dir: Path, folder: Path, states: dict[str, dict[str, Any]]) -> dict[str, Any]:
    files = {"quant_state": folder / "quant_state.pt", "packed": folder / "packed.pt"}
    for kind, path in files.items():
        atomic_save(states[kind], path)
    return {**{k: str(p.relative_to(run_dir)) for k, p in files.items()},
            "sha256": {k: file_sha256(p) for k, p in files.items()},
            "content_sha256": {k: state_dict_sha256(v) for k, v in states.items()},
            "model_bytes": packed_nbytes(states["packed"])}


def peak_mem_kind(device: torch.device) -> str:
    """What ``peak_mem_bytes`` measures on ``device`` (recorded in the manifest beside the numbers)."""
    return ("cuda_max_memory_allocated" if device.type == "cuda"
            else "process_peak_rss (shared by the segments of one process)")


def peak_mem_bytes(device: torch.device) -> int:
    """Peak memory as :func:`peak_mem_kind` names it: on a GPU since the last ``reset_peak_memory_stats``."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def new_segment_stats() -> dict[str, Any]:
    """A segment's running cost record, filled by :func:`add_item_stats` (plain values: it travels in checkpoints)."""
    return {"wall_seconds": 0.0, "peak_mem_bytes": 0, "units": []}


def add_item_stats(seg_stats: dict[str, Any], unit: str, phase: str, stats: dict[str, float], peak: int) -> None:
    """Count one finished work item (``ItemDone.stats``, the peak memory while it ran) into ``seg_stats``."""
    seg_stats["wall_seconds"] += stats["item_seconds"]
    seg_stats["peak_mem_bytes"] = max(seg_stats["peak_mem_bytes"], int(peak))
    seg_stats["units"].append({"unit": unit, "phase": phase, **stats})


def segment_record(index: int, steps: range, window: range, t_of_step: Sequence[int], recon: ReconSettings,
                   calib_ts: torch.Tensor, seg_stats: dict[str, Any], rank: int = 0,
                   scope: str = "full") -> dict[str, Any]:
    """Segment ``index``'s manifest entry apart from its files: its steps (and their t), the calibration window and
    pairs (``calib_ts``, the selected timesteps), the iterations it spent (no weight phase in ``scope``
    "activations") and what it cost."""
    iters = [recon.cali_iters if scope == "full" else 0, recon.cali_iters_a]
    return {"index": index, "steps": [steps.start, steps.stop], "iters": iters,
            "t_range": [t_of_step[steps.start], t_of_step[steps.stop - 1]], "window": [window.start, window.stop],
            "pairs": len(calib_ts), "calib_t_range": [int(calib_ts.max()), int(calib_ts.min())],
            "wall_seconds": seg_stats["wall_seconds"], "peak_mem_bytes": seg_stats["peak_mem_bytes"], "rank": rank,
            "units": [{k: u[k] for k in UNIT_KEYS} for u in seg_stats["units"]]}


def write_segment(run_dir: str | Path, record: dict[str, Any], qmodel: QuantizedUNet, quant_act: bool,
                  shared: dict[str, Any] | None = None) -> dict[str, Any]:
    """The segment's files (:func:`write_segment_files`; ``shared`` for segment_scope "activations") written; its
    full manifest entry returned."""
    return {**record, **write_segment_files(run_dir, record["index"], qmodel, quant_act, shared)}


def fp_model_record(config: str | Path | Mapping[str, Any] | None, checkpoint: str | Path | None,
                    sha256: str) -> dict[str, Any]:
    """The manifest's ``fp_model``: where the FP model came from (config and weights file, None where unknown) and
    its state-dict SHA-256 (the identity every consumer checks)."""
    return {"config": None if config is None or isinstance(config, Mapping) else str(config),
            "config_dict": None if config is None else load_config(config),
            "checkpoint": None if checkpoint is None else str(checkpoint), "sha256": sha256,
            "file_sha256": None if checkpoint is None else file_sha256(checkpoint)}


def calibration_record(path: str | Path, sha256: str, cali_st: int, cali_n: int, overlap: int,
                       meta: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest's ``calibration``: the file (path, SHA-256, meta) and the selection rule applied to it."""
    return {"path": str(path), "sha256": sha256, "cali_st": cali_st, "cali_n": cali_n, "overlap": overlap,
            "meta": meta}


def run_record(*, num_steps: int, skip_type: str, quant: QuantConfig, recon: ReconSettings, seed: int,
               segment_scale: list[float] | None, init_from: dict[str, Any] | None, units: list[str],
               fp_model: dict[str, Any], calibration: dict[str, Any], wall_seconds: float, device: torch.device,
               world_size: int = 1, segment_scope: str = "full") -> dict[str, Any]:
    """The manifest apart from its segment entries: what was run and on what (``init_from``: the warm start's
    record with its ``warm`` settings, None without one; ``segment_scope`` only where it is not "full", so the
    manifests of full runs stay as they were)."""
    scope = {} if segment_scope == "full" else {"segment_scope": segment_scope}
    return {**scope, "num_steps": num_steps, "skip_type": skip_type, "weight_bits": quant.weight_bits,
            "act_bits": quant.act_bits if quant.quant_act else 32, "quant_config": asdict(quant),
            "reconstruction": asdict(recon), "seed": seed, "segment_scale": segment_scale, "init_from": init_from,
            "units": units, "fp_model": fp_model, "calibration": calibration, "wall_seconds": wall_seconds,
            "peak_mem_kind": peak_mem_kind(device), "world_size": world_size, "device": str(device),
            "torch_threads": torch.get_num_threads()}


def warm_settings(warm: WarmStart, scope: str) -> dict[str, Any] | None:
    """The warm start's fine-tune switches as ``init_from.warm`` records them; None under segment_scope
    "activations", which uses none (no weight phase; activation ranges initialised again)."""
    return asdict(warm) if scope == "full" else None


def build_manifest(run: dict[str, Any], segments: list[dict[str, Any]],
                   shared: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of a finished run (for :func:`write_manifest`): ``run`` (:func:`run_record`), the K segment
    entries (:func:`write_segment`), the ``shared`` entry of segment_scope "activations"
    (:func:`write_shared_files`) and their totals."""
    manifest = {"k": len(segments), **run, "segments": segments,
                "peak_mem_bytes": max(seg["peak_mem_bytes"] for seg in segments)}
    if shared is not None:
        manifest["shared"] = shared
    return {**manifest, "model_bytes": model_bytes(manifest)}


def segment_scope(manifest: dict[str, Any]) -> str:
    """The run's segment_scope ("full" for manifests that do not record one)."""
    return manifest.get("segment_scope", "full")


def model_bytes(manifest: dict[str, Any]) -> int:
    """Packed bytes of the run's models: every segment's, plus the shared weights stored once."""
    shared = manifest.get("shared") or {}
    return sum(seg["model_bytes"] for seg in manifest["segments"]) + shared.get("model_bytes", 0)


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
    _check_segments(manifest, where)
    _check_shared(manifest, where)
    return manifest


def _check_shared(manifest: dict[str, Any], where: str) -> None:
    """A segment_scope "activations" run lists its shared weight files, inside ``shared/``; a full run lists none."""
    scope, shared = segment_scope(manifest), manifest.get("shared")
    if scope not in SEGMENT_SCOPES:
        raise ValueError(f"{where}: segment_scope {scope!r} is not one of {SEGMENT_SCOPES}")
    if (scope == "activations") != (shared is not None):
        raise ValueError(f"{where}: segment_scope {scope!r} " + ("needs a 'shared' entry (the weights its segments "
                         "share)" if shared is None else "has no shared weights, but the manifest lists 'shared'"))
    if shared is None:
        return
    missing = [k for k in ("quant_state", "packed", "sha256", "model_bytes") if k not in shared]
    if missing:
        raise ValueError(f"{where}: the 'shared' entry is malformed (missing {missing})")
    for kind in SEGMENT_FILES:
        name = Path(shared[kind])
        if name.is_absolute() or name.parts[:1] != (SHARED_DIR,) or ".." in name.parts:
            raise ValueError(f"{where}: the shared {kind} is {shared[kind]!r}; it must be a file in the run folder's "
                             f"{SHARED_DIR}/")


def _check_segments(manifest: dict[str, Any], where: str) -> None:
    """Each segment entry must describe its own place in the schedule: contiguous steps covering 0..num_steps-1 in
    order, the t of its first and last step (``t_range``), a calibration window around its steps whose selected
    timesteps (``calib_t_range``) it holds, and files inside its own ``segment_XX`` folder. A cut moved, or entries
    or files swapped, by hand then no longer pass unless every one of these is edited to match."""
    n = manifest["num_steps"]
    diffusion = (manifest["fp_model"].get("config_dict") or {}).get("diffusion", {})
    try:
        t_of_step = list(reversed(timesteps(n, manifest["skip_type"], diffusion.get("num_diffusion_timesteps", 1000))))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    overlap = (manifest["calibration"] or {}).get("overlap")
    stop = 0
    for i, seg in enumerate(manifest["segments"]):
        steps = seg["steps"]
        if not (isinstance(steps, list) and len(steps) == 2 and steps[0] == stop and stop < steps[1] <= n):
            raise ValueError(f"{where}: segment {i} has steps {steps}, but the segments must cover steps 0..{n - 1} "
                             f"in order (segment {i} starts at step {stop})")
        stop = steps[1]
        t_range = [t_of_step[steps[0]], t_of_step[steps[1] - 1]]
        if seg["t_range"] != t_range:
            raise ValueError(f"{where}: segment {i} has t_range {seg['t_range']}, but its steps {steps} of "
                             f"{n} {manifest['skip_type']} steps run over t {t_range}")
        window = seg.get("window")
        if window is not None:
            want = None if overlap is None else [max(0, steps[0] - overlap), min(n, steps[1] + overlap)]
            inside = 0 <= window[0] <= steps[0] and steps[1] <= window[1] <= n
            if not inside or (want is not None and window != want):
                raise ValueError(f"{where}: segment {i} has calibration window {window}, which is not its steps "
                                 f"{steps} widened by the overlap {overlap}")
            if "calib_t_range" in seg:
                high, low = t_of_step[window[0]], t_of_step[window[1] - 1]
                if not high >= seg["calib_t_range"][0] >= seg["calib_t_range"][1] >= low:
                    raise ValueError(f"{where}: segment {i} was calibrated on t {seg['calib_t_range']}, outside its "
                                     f"window's t {[high, low]}")
        for kind in SEGMENT_FILES:
            name = Path(seg[kind])
            if name.is_absolute() or name.parts[:1] != (segment_dir("", i).name,) or ".." in name.parts:
                raise ValueError(f"{where}: segment {i}'s {kind} is {seg[kind]!r}; it must be a file in the run "
                                 f"folder's {segment_dir('', i).name}/")
    if stop != n:
        raise ValueError(f"{where}: the segments end at step {stop}, but the schedule has {n} steps")


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


def _owner(seg: dict[str, Any]) -> str:
    """How messages name a manifest file entry: a segment's, or the ``shared`` one (which has no index)."""
    return f"segment {seg['index']}" if "index" in seg else "the shared weights"


def _segment_file(run_dir: Path, seg: dict[str, Any], kind: str) -> Path:
    """The path of segment file ``kind`` of manifest entry ``seg``, refused where it leads out of the run folder
    (a symlinked folder: the manifest's own paths are checked when it is read)."""
    path = run_dir / seg[kind]
    if not path.resolve().is_relative_to(run_dir.resolve()):
        raise ValueError(f"{run_dir / MANIFEST_NAME}: {_owner(seg)}'s {kind} {path} leads outside the run "
                         f"folder (to {path.resolve()})")
    return path


def _load_segment_file(run_dir: Path, seg: dict[str, Any], kind: str) -> tuple[dict[str, Any], str]:
    """(contents, file SHA-256) of segment file ``kind`` ("packed" / "quant_state") of manifest entry ``seg``,
    checked against the file and content hashes the manifest recorded and loaded with ``weights_only`` (a dict);
    errors name the file and the manifest."""
    what = {"packed": "packed export", "quant_state": "quant state"}[kind]
    manifest = run_dir / MANIFEST_NAME
    path = _segment_file(run_dir, seg, kind)
    if not path.is_file():
        raise FileNotFoundError(f"{_owner(seg)}: {what} {path} is missing (listed in {manifest})")
    digest = file_sha256(path)
    if digest != seg["sha256"][kind]:
        raise ValueError(f"{path}: SHA-256 {digest} differs from the manifest's {seg['sha256'][kind]} "
                         f"({manifest}; file replaced or corrupted)")
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a file that matches its recorded hash yet does not load: written so, or hash edited
        raise ValueError(f"{path}: cannot be read as a {what} ({brief_error(e)})") from e
    if not isinstance(contents, dict):
        raise ValueError(f"{path}: not a {what} (a {type(contents).__name__})")
    recorded = seg.get("content_sha256", {}).get(kind)
    content = None if recorded is None else state_dict_sha256(contents)
    if content != recorded:
        raise ValueError(f"{path}: its contents are not {_owner(seg)}'s {what} that {manifest} records "
                         f"(content SHA-256 {content}, recorded {recorded}): the file or the manifest was changed")
    return contents, digest


def _packed_hash(entry: dict[str, Any]) -> str:
    return entry.get("content_sha256", {}).get("packed", entry["sha256"]["packed"])


def run_identity(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """What a calibration run's segment models are, for records that must notice another run: each segment's steps
    and its packed export's content hash (its file hash in manifests written before content hashes), with the
    shared weights' content hash where the segments share them (segment_scope "activations")."""
    shared = manifest.get("shared")
    return [{"steps": seg["steps"], "packed": _packed_hash(seg), **({} if shared is None else
                                                                     {"shared": _packed_hash(shared)})}
            for seg in manifest["segments"]]


def calibration_compute(manifest: dict[str, Any]) -> list[int]:
    """[weight, activation] reconstruction iterations per unit summed over the run's segments (as each spent
    them: none in the weight phase under segment_scope "activations"), plus those of the run it was warm-started
    from (``init_from.compute``): the compute that equal-compute comparisons hold fixed (every unit costs the same
    per iteration in every segment)."""
    iters = [seg.get("iters") or [manifest["reconstruction"]["cali_iters"], manifest["reconstruction"]["cali_iters_a"]]
             for seg in manifest["segments"]]
    base = (manifest.get("init_from") or {}).get("compute", [0, 0])
    return [base[0] + sum(i[0] for i in iters), base[1] + sum(i[1] for i in iters)]


def warm_start_state(run_dir: str | Path, model_sha256: str,
                     quant_config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(record, quant state) of a warm start from the finished K=1 calibration run in ``run_dir``: its model's quant
    state (hash-checked against the run's manifest), which must come from the FP weights with state-dict SHA-256
    ``model_sha256`` and the quantization ``quant_config`` (``asdict(QuantConfig)``). The record (run folder, the
    state's SHA-256, the run's total compute and iterations) is what a warm-started run's manifest and resume
    signature keep."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    where = run_dir / MANIFEST_NAME
    if manifest["k"] != 1:
        raise ValueError(f"{where}: k is {manifest['k']}; a warm start begins from a K=1 run (one model for every "
                         "step)")
    if segment_scope(manifest) != "full":
        raise ValueError(f"{where}: segment_scope is {segment_scope(manifest)!r}; a warm start begins from a run of "
                         "segment_scope 'full' (its whole quant state in one segment)")
    if manifest["fp_model"]["sha256"] != model_sha256:
        raise ValueError(f"{where}: calibrated from FP weights with SHA-256 {manifest['fp_model']['sha256']}, not "
                         f"this model's {model_sha256}")
    if manifest["quant_config"] != quant_config:
        diff = sorted(k for k in set(quant_config) | set(manifest["quant_config"])
                      if manifest["quant_config"].get(k) != quant_config.get(k))
        raise ValueError(f"{where}: quant_config differs from this run's in {diff} (e.g. {diff[0]}: "
                         f"{manifest['quant_config'].get(diff[0])!r} there, {quant_config.get(diff[0])!r} here)")
    state, digest = _load_segment_file(run_dir, manifest["segments"][0], "quant_state")
    record = {"path": str(run_dir), "quant_state_sha256": digest, "compute": calibration_compute(manifest),
              "iters": [manifest["reconstruction"]["cali_iters"], manifest["reconstruction"]["cali_iters_a"]]}
    return record, state


def load_segment_models(run_dir: str | Path, fp_model: torch.nn.Module | None = None,
                        device: str | torch.device = "cpu") -> tuple[list[range], list[QuantizedUNet]]:
    """(step ranges, models): segment k's quantized model, frozen and in eval mode on ``device``, for steps
    ``ranges[k]``. Models are rebuilt from the packed exports alone (hash-checked against the manifest; a
    segment_scope "activations" segment's joined with the shared weights); ``fp_model`` only supplies the
    architecture (default: built from the config recorded in the manifest)."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    arch = fp_model if fp_model is not None else build_model(manifest["fp_model"]["config_dict"])
    shared = {} if manifest.get("shared") is None else _load_segment_file(run_dir, manifest["shared"], "packed")[0]
    ranges, models = [], []
    for seg in manifest["segments"]:
        export = {**shared, **_load_segment_file(run_dir, seg, "packed")[0]}
        q = quantize_model(arch, config_from_state(export)).to(device)
        models.append(load_packed(q, export).eval())
        ranges.append(range(*seg["steps"]))
    return ranges, models


def damaged_segments(run_dir: str | Path, manifest: dict[str, Any] | None = None) -> dict[int, list[str]]:
    """``{segment: [problem, ...]}`` for every segment file the manifest lists that is missing or whose SHA-256
    differs from the recorded one (a damaged shared weight file: for every segment, all of them load it); empty when
    the run's artefacts are all intact."""
    run_dir = Path(run_dir)
    manifest = manifest or read_manifest(run_dir)
    shared = [] if manifest.get("shared") is None else _file_problems(run_dir, manifest["shared"])
    damaged: dict[int, list[str]] = {}
    for seg in manifest["segments"]:
        problems = _file_problems(run_dir, seg) + shared
        if problems:
            damaged[seg["index"]] = problems
    return damaged


def _file_problems(run_dir: Path, entry: dict[str, Any]) -> list[str]:
    problems = []
    for kind in SEGMENT_FILES:
        path = _segment_file(run_dir, entry, kind)
        problem = ("is missing" if not path.is_file() else
                   "differs from its recorded SHA-256" if file_sha256(path) != entry["sha256"][kind] else None)
        if problem:
            problems.append(f"{path} {problem}")
    return problems


def reexport_segments(run_dir: str | Path, segments: list[int]) -> None:
    """Rewrite the files of ``segments`` (and damaged shared weight files) from the run's ``checkpoints/last.ckpt``
    (it holds every segment's final quant state) and the FP checkpoint the manifest names, then record their new file
    hashes in the manifest.

    The rewritten contents must hash to the recorded content SHA-256 (where the manifest has one), so a repaired
    segment is the calibrated one, not an approximation; errors say what blocks the repair."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    ckpt_path = run_dir / LAST_CKPT
    try:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)[CKPT_KEY]
    except Exception as e:
        raise ValueError(f"cannot re-export segment(s) {segments}: {ckpt_path} is unreadable ({brief_error(e)}); "
                         "recalibrate the run (--model.init_args.overwrite true)") from e
    signature, quant = state["signature"], QuantConfig(**manifest["quant_config"])
    same_run = all(signature[a] == manifest[b] for a, b in (("quant", "quant_config"), ("seed", "seed"),
                                                              ("units", "units"), ("k", "k")))
    scope = segment_scope(manifest)
    finished = state["next_item"] >= len(calibration_items(len(manifest["units"]), quant.quant_act, scope))
    if not (same_run and finished):
        raise ValueError(f"cannot re-export segment(s) {segments}: {ckpt_path} is not the finished run the manifest "
                         "describes; recalibrate the run (--model.init_args.overwrite true)")
    fp_info = manifest["fp_model"]
    fp = load_checkpoint(build_model(fp_info["config_dict"]), fp_info["checkpoint"]).eval()
    if state_dict_sha256(fp) != fp_info["sha256"]:
        raise ValueError(f"cannot re-export segment(s) {segments}: the FP weights in {fp_info['checkpoint']} are "
                         "not the ones this run was calibrated from")
    for s in segments:
        qmodel = QuantizedUNet(fp, quant).eval()
        own = state["segments"][s]["quant_state"]
        load_quant_state(qmodel, own)
        entries = [(manifest["segments"][s], f"segment {s}",
                    write_segment_files(run_dir, s, qmodel, quant.quant_act, None if scope == "full" else own))]
        if manifest.get("shared") is not None and _file_problems(run_dir, manifest["shared"]):
            entries.append((manifest["shared"], "the shared weights",
                            write_shared_files(run_dir, qmodel, quant.quant_act)))
        for seg, owner, entry in entries:
            if seg.get("content_sha256", entry["content_sha256"]) != entry["content_sha256"]:
                raise ValueError(f"{owner}: re-exported from {ckpt_path}, its contents differ from the recorded ones; "
                                 "recalibrate the run (--model.init_args.overwrite true)")
            seg.update(entry)
    write_manifest(run_dir, {k: v for k, v in manifest.items() if k != "format"})

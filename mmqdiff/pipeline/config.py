"""The main job's config, typed and checked before any stage runs.

A pipeline config is a YAML mapping of these keys (anything else, e.g. a misspelt ``arg:`` for ``args:``, is an
error naming the key and the file)::

    output_dir: outputs/embedded        # sampling folders: <output_dir>/samples_fp, <output_dir>/samples_<run folder>
    report_dir: ...                     # optional, default <output_dir>/report: report.json and the pipeline's record
    checkpoint: /data/model.ckpt        # optional: the FP checkpoint of every stage (--model.init_args.checkpoint)
    calibration_data:                   # generated with `config` unless `path` exists
      {config, path, args}
    calibrations:                       # in the order they run
      - {name, config (one file or a list, later files override earlier ones), run_dir, args, devices,
         equal_compute_to (another entry's name), boundaries_from (an earlier entry's name)}
    heldout_trajectories: [start, stop] # optional: held-out error on these calibration-file trajectories
    sampling:
      {config, num_images, args, cpu_processes (CPU only), devices, model_config (optional, checked)}

``args`` are extra ``cli.py`` flags of that stage. ``--set KEY=VALUE`` on the command line overrides any key (a
dotted path, list items by index, the value read as YAML), e.g. ``--set checkpoint=/data/model-790000.ckpt`` or
``--set calibrations.1.devices=8``.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A pipeline config that cannot run as written; the message names the file and the key."""


@dataclass(frozen=True)
class CalibrationData:
    config: str
    path: str
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Calibration:
    name: str
    config: tuple[str, ...]
    run_dir: str
    args: tuple[str, ...] = ()
    devices: int | None = None
    equal_compute_to: str | None = None
    boundaries_from: str | None = None


@dataclass(frozen=True)
class Sampling:
    config: str
    num_images: int
    args: tuple[str, ...] = ()
    cpu_processes: int = 1
    devices: int | None = None
    model_config: str | None = None


@dataclass(frozen=True)
class PipelineConfig:
    output_dir: str
    calibration_data: CalibrationData
    sampling: Sampling
    calibrations: tuple[Calibration, ...] = ()
    heldout_trajectories: tuple[int, int] | None = None
    report_dir: str | None = None
    checkpoint: str | None = None
    source: str = ""  # the config file (with any --set overrides), for messages; not a YAML key

    @property
    def report_path(self) -> Path:
        return Path(self.report_dir) if self.report_dir is not None else Path(self.output_dir) / "report"

    @property
    def fp_samples(self) -> Path:
        return Path(self.output_dir) / "samples_fp"

    def samples_of(self, run: Calibration) -> Path:
        """The sampling folder of a calibration entry: named after its run folder's path below ``output_dir``
        (``samples_calib_k1``; ``samples_seed1__calib_k1`` for ``<output_dir>/seed1/calib_k1``; the full path for
        a run folder elsewhere), so no two run folders share one."""
        run_dir, out = Path(os.path.abspath(run.run_dir)), Path(os.path.abspath(self.output_dir))
        parts = run_dir.relative_to(out).parts if run_dir.is_relative_to(out) else run_dir.parts[1:]
        return Path(self.output_dir) / ("samples_" + "__".join(parts))


# ------------------------------------------------------------------------------------------------ typed parsing
def _fail(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}")


def _mapping(value: Any, where: str, cls: type, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """``value`` as a mapping whose keys are ``cls``'s fields: unknown keys (with the closest known one) and missing
    required keys are errors."""
    if not isinstance(value, dict):
        raise _fail(where, f"expected a mapping, got {type(value).__name__}")
    known = [f.name for f in fields(cls) if f.name not in ignore]
    for key in value:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise _fail(where, f"unknown key '{key}'{hint}; expected keys: {', '.join(sorted(known))}")
    required = [f.name for f in fields(cls) if f.name not in ignore and f.default is MISSING]
    missing = [k for k in required if k not in value]
    if missing:
        raise _fail(where, f"missing key(s) {missing}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(where, f"expected a non-empty string, got {value!r}")
    return value


def _int(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(where, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _args(value: Any, where: str) -> tuple[str, ...]:
    """A stage's extra ``cli.py`` flags: a list of strings (numbers and booleans are written as the CLI reads them)."""
    if not isinstance(value, list):
        raise _fail(where, f"expected a list of command-line arguments, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, bool):
            out.append(str(item).lower())
        elif isinstance(item, (str, int, float)):
            out.append(str(item))
        else:
            raise _fail(f"{where}[{i}]", f"expected a string, got {type(item).__name__} {item!r}")
    return tuple(out)


def _optional(value: Any, convert, where: str, *extra: Any) -> Any:
    return None if value is None else convert(value, where, *extra)


def _calibration_data(value: Any, where: str) -> CalibrationData:
    d = _mapping(value, where, CalibrationData)
    return CalibrationData(config=_str(d["config"], f"{where}.config"), path=_str(d["path"], f"{where}.path"),
                           args=_args(d.get("args", []), f"{where}.args"))


def _configs(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (_str(value, where),)
    if isinstance(value, list) and value:
        return tuple(_str(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise _fail(where, f"expected a config file or a non-empty list of them, got {value!r}")


def _calibration(value: Any, where: str) -> Calibration:
    name = value.get("name") if isinstance(value, dict) else None
    where = f"{where} ({name!r})" if isinstance(name, str) else where
    d = _mapping(value, where, Calibration)
    return Calibration(name=_str(d["name"], f"{where}.name"), config=_configs(d["config"], f"{where}.config"),
                       run_dir=_str(d["run_dir"], f"{where}.run_dir"), args=_args(d.get("args", []), f"{where}.args"),
                       devices=_optional(d.get("devices"), _int, f"{where}.devices", 1),
                       equal_compute_to=_optional(d.get("equal_compute_to"), _str, f"{where}.equal_compute_to"),
                       boundaries_from=_optional(d.get("boundaries_from"), _str, f"{where}.boundaries_from"))


def _sampling(value: Any, where: str) -> Sampling:
    d = _mapping(value, where, Sampling)
    sampling = Sampling(config=_str(d["config"], f"{where}.config"),
                        num_images=_int(d["num_images"], f"{where}.num_images", 1),
                        args=_args(d.get("args", []), f"{where}.args"),
                        cpu_processes=_int(d.get("cpu_processes", 1), f"{where}.cpu_processes", 1),
                        devices=_optional(d.get("devices"), _int, f"{where}.devices", 1),
                        model_config=_optional(d.get("model_config"), _str, f"{where}.model_config"))
    if sampling.devices is not None and sampling.cpu_processes != 1:
        raise _fail(where, "set devices (every machine) or cpu_processes (machines without a GPU), not both")
    return sampling


def _heldout(value: Any, where: str) -> tuple[int, int]:
    if (not isinstance(value, list) or len(value) != 2 or any(isinstance(v, bool) or not isinstance(v, int)
                                                              for v in value) or not 0 <= value[0] < value[1]):
        raise _fail(where, f"expected [start, stop] trajectory indices with 0 <= start < stop, got {value!r}")
    return value[0], value[1]


def parse_config(raw: Any, source: str) -> PipelineConfig:
    """The typed config of the YAML mapping ``raw`` (read from ``source``), with every name reference checked."""
    d = _mapping(raw, source, PipelineConfig, ignore=("source",))
    runs = d.get("calibrations") or []
    if not isinstance(runs, list):
        raise _fail(f"{source}: calibrations", f"expected a list of entries, got {type(runs).__name__}")
    cfg = PipelineConfig(
        output_dir=_str(d["output_dir"], f"{source}: output_dir"),
        calibration_data=_calibration_data(d["calibration_data"], f"{source}: calibration_data"),
        sampling=_sampling(d["sampling"], f"{source}: sampling"),
        calibrations=tuple(_calibration(r, f"{source}: calibrations[{i}]") for i, r in enumerate(runs)),
        heldout_trajectories=_optional(d.get("heldout_trajectories"), _heldout, f"{source}: heldout_trajectories"),
        report_dir=_optional(d.get("report_dir"), _str, f"{source}: report_dir"),
        checkpoint=_optional(d.get("checkpoint"), _str, f"{source}: checkpoint"), source=source)
    check_references(cfg)
    return cfg


def check_references(cfg: PipelineConfig) -> None:
    """Entry names and run folders are unique, sampling folders distinct, and ``equal_compute_to`` /
    ``boundaries_from`` name entries (``boundaries_from`` one listed before: its run must exist first)."""
    names: dict[str, int] = {}
    folders = {os.path.abspath(cfg.fp_samples): "FP"}
    run_dirs: dict[str, str] = {}
    for i, run in enumerate(cfg.calibrations):
        where = f"{cfg.source}: calibrations[{i}] ({run.name!r})"
        if run.name in names:
            raise _fail(where, f"name also used by calibrations[{names[run.name]}]; entry names must be unique")
        names[run.name] = i
        run_dir = os.path.abspath(run.run_dir)
        if run_dir in run_dirs:
            raise _fail(where, f"run_dir {run.run_dir} is also {run_dirs[run_dir]!r}'s; two entries cannot share "
                               "a run folder (each would report the other's run)")
        run_dirs[run_dir] = run.name
        samples = os.path.abspath(cfg.samples_of(run))
        if samples in folders:
            raise _fail(where, f"its sampling folder {cfg.samples_of(run)} is also {folders[samples]!r}'s; rename "
                               "one run folder")
        folders[samples] = run.name
        if run.boundaries_from is not None and run.boundaries_from not in names:
            raise _fail(where, f"boundaries_from names {run.boundaries_from!r}, which is not a calibration listed "
                               f"before it ({list(names)[:-1]})")
    for i, run in enumerate(cfg.calibrations):
        other = run.equal_compute_to
        if other is not None and (other not in names or other == run.name):
            raise _fail(f"{cfg.source}: calibrations[{i}] ({run.name!r})",
                        f"equal_compute_to names {other!r}, which is not among the other calibrations "
                        f"({[n for n in names if n != run.name]})")


# ------------------------------------------------------------------------------------------------ loading
def apply_overrides(raw: Any, overrides: list[str], source: str) -> Any:
    """``raw`` with each ``KEY=VALUE`` of ``overrides`` set (KEY a dotted path, list items by index; VALUE as YAML)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. checkpoint=/data/model-790000.ckpt")
        node, parts = raw, key.split(".")
        try:
            for part in parts[:-1]:
                node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
            if isinstance(node, list):
                node[int(parts[-1])] = yaml.safe_load(text)
            elif isinstance(node, dict):
                node[parts[-1]] = yaml.safe_load(text)
            else:
                raise TypeError(f"{'.'.join(parts[:-1])} is a {type(node).__name__}")
        except (ValueError, IndexError, TypeError, AttributeError, yaml.YAMLError) as e:
            raise ConfigError(f"--set {item!r}: no such key in {source} ({type(e).__name__}: {e})") from e
    return raw


def read_config(path: str | Path, overrides: list[str] | None = None) -> tuple[dict[str, Any], str]:
    """(the YAML mapping of ``path`` with the ``--set`` ``overrides`` applied, the name messages give it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    source = str(path) + (f" (with --set {' '.join(overrides)})" if overrides else "")
    return apply_overrides(raw, list(overrides or []), source), source

"""Every stage's ``cli.py`` command, resolved the way its child process will resolve it, and the checks that run
before the first stage: references, input files, held-out trajectories, equal-compute pairs.

Settings such as K, cali_n or the FP checkpoint are read from one place, each stage's resolved command (the project's
LightningCLI parser over the stage's config files and flags, without building anything); finished runs are compared
with it through their manifests.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningCLI

from ..cli import PARSER_OPTIONS, shipped_configs
from ..data import CalibrationFile
from ..diffusion import load_config
from ..io import shipped_path
from ..quant.reconstruction import ReconSettings
from ..quant.runtime import resolve_runtime
from ..segments.run_folder import calibration_compute, read_manifest
from .config import Calibration, ConfigError, PipelineConfig
from .identity import Inputs, StageRefused, describe, differences


class _ParserOnly(LightningCLI):
    """The project's CLI as far as its argument parser: nothing is parsed, seeded, built or run."""

    def parse_arguments(self, parser: Any, args: Any) -> None:
        self.config = {"subcommand": None}

    def _set_seed(self) -> None:
        """Seeding belongs to the child process."""

    def instantiate_classes(self) -> None:
        """Nothing is built."""


@functools.lru_cache(maxsize=1)
def _parser() -> Any:
    """``cli.py``'s parser, built once per process (building it costs several times a parse)."""
    return _ParserOnly(**PARSER_OPTIONS, args=[], save_config_callback=None).parser


@dataclass(frozen=True)
class Command:
    """One stage's child command: ``cli.py`` arguments and the config they resolve to (the subcommand's section)."""

    name: str
    args: tuple[str, ...]
    config: dict[str, Any]

    def init_args(self, section: str) -> dict[str, Any]:
        return self.config[section]["init_args"]


def resolve(name: str, args: list[str], source: str) -> Command:
    """``args`` parsed as ``cli.py`` parses them (config files merged in order, then the flags); a command that does
    not parse is an error naming the stage and the parser's own message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            namespace = _parser().parse_args(shipped_configs(args))
    except SystemExit:
        lines = err.getvalue().splitlines()
        start = max((i for i, line in enumerate(lines) if line.startswith("error:")), default=0)
        raise ConfigError(f"{source}: stage '{name}': its command does not parse: "
                          + "\n".join(lines[start:start + 12]).strip()) from None
    config = namespace[namespace.subcommand].as_dict()
    config.pop("config", None)  # the config files themselves: the command names them
    return Command(name, tuple(args), config)


# flags the pipeline sets itself in each stage, with the key of the pipeline config they come from
OWNED = {"calibration_data": {"--trainer.default_root_dir": "report_dir", "--trainer.callbacks.init_args.path": "path"},
         "calibrations": {"--trainer.default_root_dir": "run_dir", "--data.init_args.path": "calibration_data.path",
                          "--ckpt_path": "(resumed by the pipeline)"},
         "sampling": {"--data.init_args.output_dir": "output_dir", "--trainer.default_root_dir": "output_dir",
                      "--data.init_args.num_images": "num_images", "--model.init_args.calibration_run": "run_dir",
                      "--model.init_args.fp_samples": "output_dir", "--data.init_args.overwrite": "(the stage record)"}}


def _check_owned(args: tuple[str, ...], owned: dict[str, str], where: str) -> None:
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in owned:
            raise ConfigError(f"{where}.args: {flag} is set by the pipeline (from {owned[flag]}); remove it")


def cpu_parallel_args(processes: int) -> list[str]:
    """Trainer flags that sample on the CPU in ``processes`` data-parallel processes (one torch thread each, as
    Lightning sets them) when no GPU is present; none otherwise. On the 2-core CPU two 1-thread processes sample
    faster than one 2-thread process, FP and integer runtime alike (docs/benchmarks.md)."""
    if processes == 1 or torch.cuda.is_available():
        return []
    return ["--trainer.accelerator", "cpu", "--trainer.devices", str(processes), "--trainer.strategy", "ddp"]


def _devices(devices: int | None, strategy: str) -> list[str]:
    if devices is None:
        return []
    return ["--trainer.devices", str(devices), "--trainer.strategy", strategy if devices > 1 else "auto"]


class Plan:
    """The stages of a pipeline config as commands, resolved and checked; built before any stage runs."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        src = cfg.source
        checkpoint = [] if cfg.checkpoint is None else ["--model.init_args.checkpoint", cfg.checkpoint]
        self._check_args()
        data = cfg.calibration_data
        self.generate = resolve("calibration data", [
            "predict", "--config", data.config, "--trainer.default_root_dir", str(cfg.report_path / "calibration_data"),
            "--trainer.callbacks.init_args.path", data.path, *checkpoint, *data.args], src)
        self.calibrations = [resolve(f"calibrate {run.name}", [
            "fit", *(a for c in run.config for a in ("--config", c)), "--trainer.default_root_dir", run.run_dir,
            "--data.init_args.path", data.path, *checkpoint, *_devices(run.devices, "segment_parallel"), *run.args],
            src) for run in cfg.calibrations]
        self.fp_sampling = self._sampling("FP", cfg.fp_samples, [], checkpoint)
        self.sampling = [self._sampling(run.name, cfg.samples_of(run), [
            "--model.init_args.calibration_run", run.run_dir, "--model.init_args.fp_samples", str(cfg.fp_samples)],
            checkpoint) for run in cfg.calibrations]

    def _sampling(self, name: str, out_dir: Path, extra: list[str], checkpoint: list[str]) -> Command:
        s = self.cfg.sampling
        devices = _devices(s.devices, "ddp") if s.devices is not None else cpu_parallel_args(s.cpu_processes)
        return resolve(f"sample {name}", [
            "predict", "--config", s.config, "--data.init_args.output_dir", str(out_dir),
            "--trainer.default_root_dir", str(out_dir), "--data.init_args.num_images", str(s.num_images),
            *checkpoint, *extra, *s.args, *devices], self.cfg.source)

    def _check_args(self) -> None:
        """Stage args must not set what the pipeline sets from its own keys (folders, checkpoint, devices, cuts)."""
        cfg = self.cfg
        common = {"--model.init_args.checkpoint": "checkpoint"} if cfg.checkpoint is not None else {}
        devices = {"--trainer.devices": "devices", "--trainer.strategy": "devices"}
        _check_owned(cfg.calibration_data.args, {**OWNED["calibration_data"], **common},
                     f"{cfg.source}: calibration_data")
        _check_owned(cfg.sampling.args, {**OWNED["sampling"], **common, **(devices if cfg.sampling.devices else {})},
                     f"{cfg.source}: sampling")
        for run in cfg.calibrations:
            cuts = {"--data.init_args.boundaries": "boundaries_from"} if run.boundaries_from is not None else {}
            _check_owned(run.args, {**OWNED["calibrations"], **common, **(devices if run.devices else {}), **cuts},
                         self.where(run))

    # ------------------------------------------------------------------------------------------------ lookups
    def command(self, run: Calibration) -> Command:
        return self.calibrations[self.cfg.calibrations.index(run)]

    def entry(self, name: str) -> Calibration:
        return next(r for r in self.cfg.calibrations if r.name == name)

    def entry_at(self, run_dir: str | Path) -> Calibration | None:
        """The calibration entry whose run folder is ``run_dir``, if any."""
        return next((r for r in self.cfg.calibrations if os.path.abspath(r.run_dir) == os.path.abspath(run_dir)),
                    None)

    def where(self, run: Calibration) -> str:
        return f"{self.cfg.source}: calibrations[{self.cfg.calibrations.index(run)}] ({run.name!r})"

    def runtime(self, command: Command) -> str:
        """The runtime a quantized sampling stage's images come from ("int" or "fake"), "auto" resolved for the
        device its trainer will use."""
        accelerator = command.config["trainer"]["accelerator"]
        device = "cuda" if accelerator != "cpu" and torch.cuda.is_available() else "cpu"
        return resolve_runtime(command.init_args("model")["runtime"], device)

    # ------------------------------------------------------------------------------------------------ checks
    def check(self, inputs: Inputs) -> None:
        """Everything later stages need, before the first one runs."""
        self.check_files()
        trajectories = self.check_calibration_data(inputs)
        model = self.fp_sampling.init_args("model")
        for run, command in zip(self.cfg.calibrations, self.calibrations):
            data, where = command.init_args("data"), self.where(run)
            if data["cali_n"] > trajectories[0]:
                raise ConfigError(f"{where}: data.init_args.cali_n={data['cali_n']}, but {trajectories[1]} holds "
                                  f"{trajectories[0]} trajectories")
            for key in ("num_steps", "skip_type"):
                if data[key] != model[key]:
                    raise ConfigError(f"{where}: calibrates for {key}={data[key]!r} (data.init_args), but sampling "
                                      f"runs {key}={model[key]!r} (model.init_args of {self.cfg.sampling.config})")
            self.base_run(run)
        self.check_heldout(*trajectories)
        for run in self.cfg.calibrations:
            if run.equal_compute_to is not None:
                mine, theirs = self.planned_compute(run), self.planned_compute(self.entry(run.equal_compute_to))
                if mine != theirs:
                    raise ConfigError(f"{self.where(run)}: spends {mine} (weight, act) reconstruction iterations per "
                                      f"unit, {run.equal_compute_to} {theirs}: they are not an equal-compute pair "
                                      "(equal_compute_to); fix the iterations")

    def check_files(self) -> None:
        """FP checkpoints, model configs and scoring inputs exist."""
        generate = not Path(self.cfg.calibration_data.path).is_file()
        commands = [*([self.generate] if generate else []), *self.calibrations, self.fp_sampling]
        hint = "the top-level checkpoint" if self.cfg.checkpoint else "model.init_args.checkpoint"
        for command in commands:
            model = command.init_args("model")
            path = model["checkpoint"]
            if not shipped_path(path).is_file():
                raise ConfigError(f"{self.cfg.source}: stage '{command.name}': FP checkpoint {path} not found "
                                  f"({hint}; set it once for every stage with `checkpoint: PATH` or "
                                  "--set checkpoint=PATH)")
            try:
                load_config(model.get("model_config") or model["config"])
            except (OSError, ValueError) as e:
                raise ConfigError(f"{self.cfg.source}: stage '{command.name}': {e}") from e
        model = self.fp_sampling.init_args("model")
        given = self.cfg.sampling.model_config
        if given is not None and load_config(given) != load_config(model["config"]):
            raise ConfigError(f"{self.cfg.source}: sampling.model_config {given} is not the model sampling "
                              f"builds ({model['config']}, model.init_args.config of {self.cfg.sampling.config})")
        source = model["real_source"]
        files = {"model.init_args.feature_extractor": model["feature_extractor"],
                 "model.init_args.inception_weights": model["inception_weights"],
                 "model.init_args.real_source": None if source in (None, "synthetic") else source}
        for key, path in files.items():
            if path is not None and not shipped_path(path).exists():
                raise ConfigError(f"{self.cfg.source}: sampling: {key} {path} not found (scoring reads it after "
                                  "every image is sampled)")

    def check_calibration_data(self, inputs: Inputs) -> tuple[int, str]:
        """(trajectories the calibration file holds or will hold, what says so). An existing file generated with
        other settings than ``calibration_data`` asks for is refused (a file without a generation record, such as
        Q-Diffusion's released one, is taken as the user's)."""
        path = Path(self.cfg.calibration_data.path)
        model, data = self.generate.init_args("model"), self.generate.init_args("data")
        if not path.is_file():
            return data["num_trajectories"], (f"the calibration data that calibration_data generates "
                                              f"(data.init_args.num_trajectories of {self.cfg.calibration_data.config}"
                                              " and calibration_data.args)")
        try:
            calib = CalibrationFile(path)
        except ValueError as e:
            raise ConfigError(f"{self.cfg.source}: calibration_data.path: {e}") from e
        if calib.meta is not None:
            wanted = {"num_steps": model["num_steps"], "skip_type": model["skip_type"], "eta": model["eta"],
                      "seed": model["seed"], "num_trajectories": data["num_trajectories"]}
            if shipped_path(model["checkpoint"]).is_file():
                wanted["model_sha256"] = inputs.weights_sha256(model["config"], model["checkpoint"])
            made = {k: calib.meta[k] for k in wanted if k in calib.meta}
            keys = differences(made, {k: wanted[k] for k in made})
            if keys:
                raise StageRefused(f"calibration data {path} was generated with other settings than calibration_data "
                                   f"asks for ({describe(keys, made, wanted, 'file')}); delete it to generate it "
                                   "again, or set calibration_data.path to another file")
        return calib.num_trajectories, f"calibration file {path}"

    def check_heldout(self, trajectories: int, what: str) -> None:
        """Held-out trajectories lie inside the calibration file and beyond every calibration's ``cali_n``."""
        if self.cfg.heldout_trajectories is None:
            return
        start, stop = self.cfg.heldout_trajectories
        if stop > trajectories:
            raise ConfigError(f"{self.cfg.source}: heldout_trajectories [{start}, {stop}] needs {stop} calibration "
                              f"trajectories, but {what} has {trajectories}; lower heldout_trajectories or generate "
                              "more trajectories")
        for run, command in zip(self.cfg.calibrations, self.calibrations):
            cali_n = command.init_args("data")["cali_n"]
            if start < cali_n:
                raise ConfigError(f"{self.cfg.source}: heldout_trajectories [{start}, {stop}] overlap the first "
                                  f"cali_n={cali_n} trajectories that {run.name!r} calibrates on "
                                  "(data.init_args.cali_n); start them at or after cali_n")

    def base_run(self, run: Calibration) -> Calibration | None:
        """The entry ``run`` warm-starts from (``model.init_args.init_from``), which must be listed before it; None
        for no warm start or a finished run folder outside this config (whose manifest must then read)."""
        init_from = self.command(run).init_args("model")["init_from"]
        if init_from is None:
            return None
        base = self.entry_at(init_from)
        if base is None:
            try:
                read_manifest(init_from)
            except (OSError, ValueError) as e:
                raise ConfigError(f"{self.where(run)}: model.init_args.init_from: {e}") from e
        elif self.cfg.calibrations.index(base) >= self.cfg.calibrations.index(run):
            raise ConfigError(f"{self.where(run)}: warm-starts from {init_from}, the run of {base.name!r}, which is "
                              "listed after it; list the base run first")
        return base

    def planned_compute(self, run: Calibration) -> list[int]:
        """[weight, activation] iterations per unit the run will spend over its segments (no weight iterations
        under segment_scope "activations"), plus those of its warm-start base (what ``calibration_compute`` reads
        from the finished run's manifest)."""
        model, data = self.command(run).init_args("model"), self.command(run).init_args("data")
        recon, scale = ReconSettings(**model["recon"]), model["segment_scale"]
        if scale is not None and len(scale) != data["k"]:
            raise ConfigError(f"{self.where(run)}: model.init_args.segment_scale has {len(scale)} factors for "
                              f"k={data['k']} segments")
        segments = [recon] * data["k"] if scale is None else [recon.scaled(f) for f in scale]
        weight_phase = model["segment_scope"] == "full"  # "activations": the base's rounding, no weight phase
        base = self.base_run(run)
        init_from = model["init_from"]
        total = ([0, 0] if init_from is None else self.planned_compute(base) if base is not None
                 else calibration_compute(read_manifest(init_from)))
        return [total[0] + weight_phase * sum(s.cali_iters for s in segments),
                total[1] + sum(s.cali_iters_a for s in segments)]

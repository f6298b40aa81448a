"""The main job: calibration data -> calibrations -> FP and K-model sampling -> held-out error -> one report.

    python -m mmqdiff.pipeline --config configs/embedded/main.yaml [--set KEY=VALUE ...]

The config (:mod:`.config`) is typed and checked, with every stage's command resolved and every input file the
stages need found, before the first stage runs (:mod:`.plan`). Each stage is the same ``cli.py`` fit / predict a
user would run by hand, in its own process (so a stage that launches several processes, like segment-parallel
calibration, re-launches that command and not this one). A stage is skipped only when its artefact exists and was
made from what the config asks for now (:mod:`.identity`, :mod:`.stages`), so rerunning after an interruption
continues where it stopped and rerunning after an edit redoes what the edit changed. The report, the config as run
and the record of what each row consumed go to ``report_dir``; the last line printed is the path of report.json.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import yaml

from ..evaluation.report import write_report
from ..io import atomic_write_text
from ..segments.run_folder import run_identity
from .config import ConfigError, parse_config, read_config
from .identity import Inputs, StageRefused, digest
from .plan import Plan
from .stages import (StageFailed, calibrate, check_finished_runs, console, generate_calibration, heldout, run_entry,
                     sample, sampling_identity)

RECORD_NAME = "pipeline_record.json"  # beside report.json: what each row of the report consumed


def main(argv: list[str] | None = None) -> Path:
    """Run the pipeline config's stages (see :mod:`mmqdiff.pipeline.config` for its keys) and write the report;
    returns the path of report.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/embedded/main.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted path, list items by index, value as YAML), e.g. "
                             "--set checkpoint=/data/model-790000.ckpt; repeatable")
    args = parser.parse_args(argv)
    raw, source = read_config(args.config, args.set)
    cfg = parse_config(raw, source)
    plan, inputs = Plan(cfg), Inputs()
    plan.check(inputs)
    check_finished_runs(plan, inputs)

    report_dir = cfg.report_path
    report_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report_dir / "pipeline_config.yaml", yaml.safe_dump(raw, sort_keys=False))
    timings: dict[str, float] = {}
    start = time.perf_counter()

    generate_calibration(plan, timings)
    manifests = [calibrate(plan, run, inputs, timings) for run in cfg.calibrations]

    model_config = plan.fp_sampling.init_args("model")["config"]
    fp_identity = sampling_identity(plan, plan.fp_sampling, inputs, None, None)
    runs = [run_entry("FP", sample(plan.fp_sampling, cfg.fp_samples, fp_identity, timings), None, model_config,
                      cfg.fp_samples)]
    rows = [{"name": "FP", "samples": str(cfg.fp_samples), "sampling": digest(fp_identity)}]
    for run, command, manifest in zip(cfg.calibrations, plan.sampling, manifests):
        out = cfg.samples_of(run)
        identity = sampling_identity(plan, command, inputs, run_identity(manifest), digest(fp_identity))
        metrics = sample(command, out, identity, timings)
        row = {"name": run.name, "samples": str(out), "sampling": digest(identity), "run_dir": run.run_dir,
               "calibration": run_identity(manifest)}
        if cfg.heldout_trajectories is not None:
            result, used = heldout(plan, run, manifest, out, inputs, timings)
            metrics.update(result)
            row["heldout"] = digest(used)
        runs.append(run_entry(run.name, metrics, manifest, model_config, out))
        rows.append(row)

    report = write_report(runs, report_dir, console=console)
    atomic_write_text(report_dir / RECORD_NAME, json.dumps({"config": source, "rows": rows}, indent=1) + "\n")
    timings["total"] = time.perf_counter() - start
    atomic_write_text(report_dir / "timings.json", json.dumps(timings, indent=1))
    for stage, seconds in timings.items():
        console.print(f"{stage:>28}: {seconds:7.1f} s")
    print(report.resolve())
    return report


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def stop_on_sigterm() -> None:
    """SIGTERM (``kill``, a scheduler's stop) ends the pipeline like Ctrl-C, the running stage included
    (``stages._stop``), with exit status 143, instead of leaving that stage running on its own."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)


def cli_main() -> None:
    """``python -m mmqdiff.pipeline``: a refused config or stage ends with its message and exit status 1 or 2;
    SIGTERM with 143 (``stop_on_sigterm``)."""
    stop_on_sigterm()
    try:
        main()
    except ConfigError as e:
        print(f"pipeline config: {e}", file=sys.stderr)
        sys.exit(2)
    except (StageFailed, StageRefused) as e:
        print(f"pipeline stopped: {e}", file=sys.stderr)  # plain: the child's message may contain [brackets]
        sys.exit(1)

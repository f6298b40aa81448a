"""The pipeline config: typed keys, references, stage commands and input files, all checked before any stage runs."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

from mmqdiff import pipeline
from mmqdiff.data.calibration import save_calibration
from mmqdiff.pipeline.config import ConfigError, parse_config, read_config
from mmqdiff.pipeline.identity import Inputs, StageRefused
from mmqdiff.pipeline.plan import Plan

from .conftest import ROOT
from .test_pipeline import CALIB, K1, children, main_config, run_pipeline  # noqa: F401 (children: a fixture)

# the experiment records resolve dozens of stage commands each (seconds apiece): checked in the slow suite
EXPERIMENT_CONFIGS = sorted((ROOT / "configs/experiments").glob("*.yaml"))
PIPELINE_CONFIGS = [ROOT / "configs/embedded/main.yaml",
                    *(pytest.param(p, marks=pytest.mark.slow) for p in EXPERIMENT_CONFIGS)]


def plan_of(cfg: dict, source: str = "main.yaml") -> Plan:
    return Plan(parse_config(copy.deepcopy(cfg), source))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["calibrations"][1].update(arg=c["calibrations"][1].pop("args")),
     r"main.yaml: calibrations\[1\] \('W4A8 K=2'\): unknown key 'arg' \(did you mean 'args'\?\); expected keys: args, "
     r"boundaries_from, config, devices, equal_compute_to, name, run_dir"),
    (lambda c: c.update(sampeling=c.pop("sampling")),
     r"main.yaml: unknown key 'sampeling' \(did you mean 'sampling'\?\)"),
    (lambda c: c.pop("sampling"), r"main.yaml: missing key\(s\) \['sampling'\]"),
    (lambda c: c["sampling"].update(num_images="4"),
     r"main.yaml: sampling.num_images: must be an integer >= 1, got '4'"),
    (lambda c: c["sampling"].update(cpu_processes=0), r"sampling.cpu_processes: must be an integer >= 1, got 0"),
    (lambda c: c["calibrations"][0].update(args=[["--x"]]), r"calibrations\[0\] \('W4A8 K=1'\).args\[0\]: expected a "
                                                             r"string, got list"),
    (lambda c: c["calibrations"][1].update(equal_compute_to="K=8"),
     r"\('W4A8 K=2'\): equal_compute_to names 'K=8', which is not among the other calibrations \(\['W4A8 K=1'\]\)"),
    (lambda c: c["calibrations"][0].update(boundaries_from="W4A8 K=2"),
     r"\('W4A8 K=1'\): boundaries_from names 'W4A8 K=2', which is not a calibration listed before it"),
    (lambda c: c["calibrations"][1].update(run_dir=c["calibrations"][0]["run_dir"]),
     r"\('W4A8 K=2'\): run_dir .*calib_k1 is also 'W4A8 K=1''s; two entries cannot share a run folder"),
    (lambda c: c["calibrations"][1].update(name="W4A8 K=1"), r"calibrations\[1\] \('W4A8 K=1'\): name also used by "
                                                              r"calibrations\[0\]"),
    (lambda c: c["calibrations"][1].update(run_dir=str(Path(c["output_dir"]) / "fp")),
     r"its sampling folder .*samples_fp is also 'FP''s"),
    (lambda c: c.update(heldout_trajectories=[8, 4]), r"heldout_trajectories: expected \[start, stop\]"),
    (lambda c: c["sampling"].update(devices=2, cpu_processes=2), r"sampling: set devices .* or cpu_processes"),
])
def test_config_mistakes_are_named_before_any_stage(tmp_path, children, edit, message):
    cfg = main_config(tmp_path)
    edit(cfg)
    with pytest.raises(ConfigError, match=message):
        run_pipeline(tmp_path, cfg)
    assert children.calls == []


@pytest.mark.parametrize("where, args, message", [
    ("sampling", ["--data.init_args.output_dir", "x"], r"sampling.args: --data.init_args.output_dir is set by the "
                                                        r"pipeline \(from output_dir\); remove it"),
    ("calibration", ["--trainer.default_root_dir=x"], r"\('W4A8 K=1'\).args: --trainer.default_root_dir is set by "
                                                      r"the pipeline \(from run_dir\)"),
    ("calibration", ["--trainer.devicez", "2"], r"stage 'calibrate W4A8 K=1': its command does not parse: error: "
                                               r"unrecognized arguments: --trainer.devicez 2"),
])
def test_stage_args_are_checked(tmp_path, where, args, message):
    cfg = main_config(tmp_path)
    (cfg["sampling"] if where == "sampling" else cfg["calibrations"][0])["args"] += args
    with pytest.raises(ConfigError, match=message):
        plan_of(cfg)


def test_the_checkpoint_is_given_once_and_checked_first(tmp_path, children):
    """The top-level checkpoint reaches every stage (and may not also be set in one), and a missing one is named
    with how to set it before anything runs."""
    cfg = main_config(tmp_path)
    cfg["checkpoint"] = str(tmp_path / "model.ckpt")
    with pytest.raises(ConfigError, match=r"stage 'calibration data': FP checkpoint .*model.ckpt not found \(the "
                                          r"top-level checkpoint; .* --set checkpoint=PATH\)"):
        run_pipeline(tmp_path, cfg)
    assert children.calls == []
    cfg["checkpoint"] = str(ROOT / "checkpoints/embedded_unet.pt")
    plan = plan_of(cfg)
    for command in (plan.generate, *plan.calibrations, plan.fp_sampling, *plan.sampling):
        assert command.init_args("model")["checkpoint"] == cfg["checkpoint"]
    cfg["sampling"]["args"] = ["--model.init_args.checkpoint", "other.pt"]
    with pytest.raises(ConfigError, match=r"--model.init_args.checkpoint is set by the pipeline \(from checkpoint\)"):
        plan_of(cfg)


def test_cifar10_inputs_are_checked_before_any_stage(tmp_path, monkeypatch, children):
    """The CIFAR-10 recipe's files (FP checkpoint, Inception weights, CIFAR-10 folder) are found or named before
    the first stage, not after every image is sampled."""
    monkeypatch.chdir(tmp_path)
    config = str(ROOT / "configs/cifar10/main.yaml")
    checkpoint = f"checkpoint={ROOT / 'checkpoints/embedded_unet.pt'}"
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"weights")
    for sets, message in [([], r"FP checkpoint /data/model-790000.ckpt not found .*--set checkpoint=PATH"),
                          (["--set", checkpoint], r"sampling: model.init_args.inception_weights /data/weights-inception"
                                                  r"-2015-12-05-6726825d.pth not found"),
                          (["--set", checkpoint, "--set", f"sampling.args=[--model.init_args.inception_weights, "
                                                          f"{weights}, --model.init_args.real_source, /data/cifar]"],
                           r"sampling: model.init_args.real_source /data/cifar not found")]:
        with pytest.raises(ConfigError, match=message):
            pipeline.main(["--config", config, *sets])
    assert children.calls == [] and not (tmp_path / "outputs").exists()


def test_devices_are_settings(tmp_path):
    """configs/cifar10/main.yaml: the K=4 run's devices and the sampling devices are keys, overridable by --set."""
    raw, source = read_config(ROOT / "configs/cifar10/main.yaml",
                              ["sampling.devices=8", "calibrations.1.devices=2", "checkpoint=/data/x.ckpt"])
    plan = Plan(parse_config(raw, source))
    k4 = plan.calibrations[1].config
    assert (str(k4["trainer"]["devices"]), k4["trainer"]["strategy"], k4["data"]["init_args"]["k"]) == \
        ("2", "segment_parallel", 4)
    assert all((str(c.config["trainer"]["devices"]), c.config["trainer"]["strategy"]) == ("8", "ddp")
               for c in (plan.fp_sampling, *plan.sampling))
    assert plan.calibrations[0].config["trainer"]["devices"] == 1
    assert plan.generate.init_args("model")["checkpoint"] == "/data/x.ckpt"
    with pytest.raises(ConfigError, match=r"--set 'checkpoint': expected KEY=VALUE"):
        read_config(ROOT / "configs/cifar10/main.yaml", ["checkpoint"])
    with pytest.raises(ConfigError, match=r"--set 'calibrations.7.devices=2': no such key"):
        read_config(ROOT / "configs/cifar10/main.yaml", ["calibrations.7.devices=2"])


def test_heldout_trajectories_need_a_file_that_holds_them(tmp_path):
    """Held-out trajectories beyond the calibration file, or inside calibration's cali_n, are refused naming both
    settings, whether the file is still to be generated or already there."""
    cfg = main_config(tmp_path)
    cfg["heldout_trajectories"] = [4, 16]
    with pytest.raises(ConfigError, match=r"heldout_trajectories \[4, 16\] needs 16 calibration trajectories, but the "
                                          r"calibration data that calibration_data generates \(data.init_args."
                                          r"num_trajectories of .*gen_calib.yaml and calibration_data.args\) has 8"):
        plan_of(cfg).check(Inputs())
    path = Path(cfg["calibration_data"]["path"])
    path.parent.mkdir(parents=True)
    save_calibration(path, torch.zeros(7, 12, 3, 16, 16), torch.tensor([[float(t)] * 12 for t in range(6)]))
    with pytest.raises(ConfigError, match=r"needs 16 calibration trajectories, but calibration file .*calib.pt has 12"):
        plan_of(cfg).check(Inputs())
    cfg["heldout_trajectories"] = [2, 12]
    with pytest.raises(ConfigError, match=r"heldout_trajectories \[2, 12\] overlap the first cali_n=4 trajectories "
                                          r"that 'W4A8 K=1' calibrates on \(data.init_args.cali_n\)"):
        plan_of(cfg).check(Inputs())


def test_calibration_data_made_with_other_settings_is_refused(tmp_path, children):
    cfg = main_config(tmp_path)
    run_pipeline(tmp_path, cfg)
    cfg["calibration_data"]["args"] = ["--model.init_args.num_steps", "6", "--data.init_args.num_trajectories", "16"]
    with pytest.raises(StageRefused, match=r"calibration data .*calib.pt was generated with other settings than "
                                           r"calibration_data asks for \(num_trajectories: file 8, config 16\)"):
        plan_of(cfg).check(Inputs())


def test_equal_compute_pairs_are_checked_from_the_settings(tmp_path, children):
    """equal_compute_to compares the iterations the runs will spend (segment budgets and a warm start's base
    included) before any stage runs, not the manifests after every calibration."""
    cfg = main_config(tmp_path)
    cfg["calibrations"][1]["args"] += ["--model.init_args.segment_scale", "[1.5, 0.5]"]
    cfg["calibrations"].append({"name": "K=1 eq", "config": K1, "run_dir": str(tmp_path / "out/eq"),
                                "equal_compute_to": "W4A8 K=2", "args": [*CALIB, "--model.init_args.recon.cali_iters",
                                                                         "6", "--model.init_args.recon.cali_iters_a",
                                                                         "5"]})
    with pytest.raises(ConfigError, match=r"\('K=1 eq'\): spends \[6, 5\] .* W4A8 K=2 \[6, 6\]: they are not an "
                                          r"equal-compute pair"):
        run_pipeline(tmp_path, cfg)
    assert children.calls == []
    cfg["calibrations"][2]["args"][-1] = "6"  # K=1's 2/2, then 2 x 2/2 scaled by 1.5 and 0.5: 3+1 / 3+1
    plan_of(cfg).check(Inputs())


def test_warm_start_base_is_listed_first(tmp_path):
    cfg = main_config(tmp_path)
    cfg["calibrations"].reverse()
    with pytest.raises(ConfigError, match=r"\('W4A8 K=2'\): warm-starts from .*calib_k1, the run of 'W4A8 K=1', which "
                                          r"is listed after it"):
        plan_of(cfg).check(Inputs())


def test_sampling_model_config_must_be_the_sampled_model(tmp_path):
    cfg = main_config(tmp_path)
    cfg["sampling"]["model_config"] = "configs/cifar10.yaml"
    with pytest.raises(ConfigError, match=r"sampling.model_config configs/cifar10.yaml is not the model sampling "
                                          r"builds \(configs/embedded.yaml"):
        plan_of(cfg).check(Inputs())


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    plan = Plan(parse_config(*read_config(path)))
    plan.check_files()
    for run in plan.cfg.calibrations:
        if run.equal_compute_to is not None:
            assert plan.planned_compute(run) == plan.planned_compute(plan.entry(run.equal_compute_to))


def test_main_job_settings_are_kept():
    """configs/embedded/main.yaml runs the same commands as before configs were split: K=4 is calibrate_k1.yaml's
    settings with k 4 on two segment-parallel processes, and the main job's numbers are unchanged."""
    plan = Plan(parse_config(*read_config(ROOT / "configs/embedded/main.yaml")))
    k1, k4, eq = (c.config for c in plan.calibrations)
    assert [run.config for run in plan.cfg.calibrations] == [("configs/embedded/calibrate_k1.yaml",),
                                                             ("configs/embedded/calibrate_k1.yaml",
                                                              "configs/embedded/calibrate_k4.yaml"),
                                                             ("configs/embedded/calibrate_k1.yaml",)]
    assert (k4["trainer"]["devices"], k4["trainer"]["strategy"], k4["data"]["init_args"]["k"]) == \
        (2, "segment_parallel", 4)
    assert {**k4["model"]["init_args"], "recon": {**k4["model"]["init_args"]["recon"], "cali_iters": 160,
                                                  "cali_iters_a": 50}, "segment_scale": None, "init_from": None} == \
        k1["model"]["init_args"]
    assert k4["model"]["init_args"]["segment_scale"] == [2, 1, 0.5, 0.5]
    assert (k4["model"]["init_args"]["recon"]["cali_iters"], k4["model"]["init_args"]["recon"]["cali_iters_a"]) == \
        (120, 38)
    assert plan.planned_compute(plan.cfg.calibrations[1]) == plan.planned_compute(plan.cfg.calibrations[2]) == \
        [640, 202]
    assert (k1["model"]["init_args"]["recon"]["lr_w"], k1["data"]["init_args"]["cali_n"]) == (0.05, 32)
    assert plan.cfg.heldout_trajectories == (192, 256) and plan.cfg.sampling.num_images == 1024
    assert plan.cfg.sampling.cpu_processes == 2
    assert [str(plan.cfg.samples_of(r)) for r in plan.cfg.calibrations] == [
        f"outputs/embedded/samples_{name}" for name in ("calib_k1", "calib_k4", "calib_k1_eq")]


def test_experiment_configs_name_their_docs_section():
    """Each one-off experiment record names the docs/results.md section it produces, and that section exists."""
    sections = re.findall(r"^## (.+)$", (ROOT / "docs/results.md").read_text(), flags=re.M)
    for path in EXPERIMENT_CONFIGS:
        first = path.read_text().splitlines()[0]
        match = re.match(r"# Produces docs/results.md: (.+?)(?: \(.*\))?\.?$", first)
        assert match and match[1] in sections, f"{path}: {first!r} names no section of {sections}"

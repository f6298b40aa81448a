"""The main job: which stages run, are skipped or are refused after an edit (fast, with the child processes stood in
for by :class:`Children`), and end to end on a shrunken embedded default (slow)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mmqdiff import pipeline
from mmqdiff.data import timestep_segments
from mmqdiff.data.calibration import calibration_sha256, save_calibration
from mmqdiff.diffusion import build_model, file_sha256, load_checkpoint, load_config, state_dict_sha256, timesteps
from mmqdiff.evaluation.heldout import damage_boundaries
from mmqdiff.evaluation.report import REQUIRED_KEYS
from mmqdiff.pipeline import plan as plan_module
from mmqdiff.pipeline import stages
from mmqdiff.pipeline.identity import StageRefused, digest
from mmqdiff.quant.reconstruction import ReconSettings
from mmqdiff.segments.run_folder import calibration_compute, read_manifest, run_identity, write_manifest

from .conftest import ROOT

GEN, SAMPLE = str(ROOT / "configs/embedded/gen_calib.yaml"), str(ROOT / "configs/embedded/sample.yaml")
K1, K4 = str(ROOT / "configs/embedded/calibrate_k1.yaml"), str(ROOT / "configs/embedded/calibrate_k4.yaml")
STEPS = ["--model.init_args.num_steps", "6"]
CALIB = ["--data.init_args.num_steps", "6", "--data.init_args.cali_st", "2", "--data.init_args.cali_n", "4",
         "--model.init_args.recon.cali_iters", "2", "--model.init_args.recon.cali_iters_a", "2",
         "--trainer.devices", "1", "--trainer.strategy", "auto"]
CHECKPOINT = ROOT / "checkpoints/embedded_unet.pt"
_resolved: dict[tuple, plan_module.Command] = {}
_real_resolve = plan_module.resolve


def resolve_once(name: str, args: list[str], source: str) -> plan_module.Command:
    """``plan.resolve`` memoised over the test run (the stage config files do not change under the tests)."""
    key = (name, tuple(args), source)
    if key not in _resolved:
        _resolved[key] = _real_resolve(name, args, source)
    return _resolved[key]


def pseudo_fid(calibration, num_images: int) -> float:
    """The stand-in FID of a run's images: a function of which models made how many images."""
    return int(digest([calibration, num_images])[:6], 16) / 2**24 * 10


class Children:
    """Stands in for the stages' child processes (``stages._stage``), held-out error and data-driven cuts: each
    command writes what its real process would, from the settings it resolves to (the same settings give the same
    segment models, as a real calibration does), so the pipeline's bookkeeping runs for real and no model runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.calls: list[tuple[str, list[str]]] = []
        self.heldout_calls: list[tuple[str, list[int]]] = []
        self.cut_calls: list[tuple[str, int]] = []
        self.weights = state_dict_sha256(load_checkpoint(build_model("configs/embedded.yaml"), CHECKPOINT))
        monkeypatch.setattr(stages, "_stage", self.run)
        monkeypatch.setattr(stages, "heldout_error_of_run", self.heldout)
        monkeypatch.setattr(stages, "damage_boundaries", self.cuts)
        monkeypatch.setattr(plan_module, "resolve", resolve_once)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def args(self, name: str) -> list[str]:
        return next(args for n, args in self.calls if n == name)

    def reset(self) -> None:
        self.calls.clear(), self.heldout_calls.clear(), self.cut_calls.clear()

    def run(self, name: str, args: list[str], timings: dict[str, float]) -> None:
        self.calls.append((name, list(args)))
        command = resolve_once(name, list(args), "child")
        if name == "calibration data":
            self.generate(command)
        elif args[0] == "fit":
            self.calibrate(command)
        else:
            self.sample(command)
        timings[name] = 0.0

    def generate(self, command: plan_module.Command) -> None:
        model, data = command.init_args("model"), command.init_args("data")
        seq, n = timesteps(model["num_steps"], model["skip_type"]), data["num_trajectories"]
        xs = torch.randn(len(seq) + 1, n, 3, 16, 16, generator=torch.Generator().manual_seed(model["seed"])) / 2
        ts = torch.tensor([[float(t)] * n for t in reversed(seq)])
        meta = {"model_sha256": self.weights, "num_steps": model["num_steps"], "skip_type": model["skip_type"],
                "eta": model["eta"], "seed": model["seed"], "num_trajectories": n, "image_shape": [3, 16, 16]}
        save_calibration(command.config["trainer"]["callbacks"][-1]["init_args"]["path"], xs, ts, meta)

    def calibrate(self, command: plan_module.Command) -> None:
        model, data = command.init_args("model"), command.init_args("data")
        run_dir = Path(command.config["trainer"]["default_root_dir"])
        n, k = data["num_steps"], data["k"]
        t_of_step = list(reversed(timesteps(n, data["skip_type"])))
        recon, scale = ReconSettings(**model["recon"]), model["segment_scale"] or [1.0] * k
        token = digest({"model": model, "data": {**data, "path": calibration_sha256(data["path"])}})
        segments = []
        for s, steps in enumerate(timestep_segments(n, k, data["boundaries"])):
            entry = {"index": s, "steps": [steps.start, steps.stop], "iters": [recon.scaled(scale[s]).cali_iters,
                                                                               recon.scaled(scale[s]).cali_iters_a],
                     "t_range": [t_of_step[steps.start], t_of_step[steps.stop - 1]],
                     "window": [steps.start, steps.stop], "pairs": 4,
                     "calib_t_range": [t_of_step[steps.start], t_of_step[steps.stop - 1]], "sha256": {},
                     "content_sha256": {}, "model_bytes": 1000, "wall_seconds": 1.0, "peak_mem_bytes": 1, "rank": 0,
                     "units": []}
            for kind in ("quant_state", "packed"):
                state = {"token": torch.tensor(list(bytes.fromhex(token[:16]))), "segment": torch.tensor(s)}
                path = run_dir / f"segment_{s:02d}" / f"{kind}.pt"
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(state, path)
                entry[kind] = str(path.relative_to(run_dir))
                entry["sha256"][kind], entry["content_sha256"][kind] = file_sha256(path), state_dict_sha256(state)
            segments.append(entry)
        init_from = None
        if model["init_from"] is not None:
            base = read_manifest(model["init_from"])
            init_from = {"path": model["init_from"], "quant_state_sha256": base["segments"][0]["sha256"]["quant_state"],
                         "compute": calibration_compute(base), "iters": [recon.cali_iters, recon.cali_iters_a],
                         "warm": model["warm"]}
        quant = model["quant"]
        write_manifest(run_dir, {
            "k": k, "num_steps": n, "skip_type": data["skip_type"], "segments": segments,
            "weight_bits": quant["weight_bits"], "act_bits": quant["act_bits"], "quant_config": quant,
            "reconstruction": model["recon"], "seed": model["seed"], "segment_scale": model["segment_scale"],
            "init_from": init_from, "units": [],
            "fp_model": {"config": model["model_config"], "config_dict": load_config(model["model_config"]),
                         "checkpoint": model["checkpoint"], "sha256": self.weights,
                         "file_sha256": file_sha256(CHECKPOINT)},
            "calibration": {"path": data["path"], "sha256": calibration_sha256(data["path"]),
                            "cali_st": data["cali_st"], "cali_n": data["cali_n"], "overlap": data["overlap"],
                            "meta": None},
            "wall_seconds": 1.0, "peak_mem_kind": "test", "peak_mem_bytes": 1, "model_bytes": 1000 * k})

    def sample(self, command: plan_module.Command) -> None:
        """Makes the missing images; like the sampler before its runtime was resolved in the record, a run that
        finds every image made reports the runtime it was given and no time per image."""
        model, data = command.init_args("model"), command.init_args("data")
        out, n = Path(data["output_dir"]), data["num_images"]
        if data["overwrite"]:
            shutil.rmtree(out / "images", ignore_errors=True)
        (out / "images").mkdir(parents=True, exist_ok=True)
        new = [j for j in range(n) if not (out / "images" / f"{j:06d}.png").exists()]
        for j in new:
            (out / "images" / f"{j:06d}.png").write_bytes(b"png")
        run = model["calibration_run"]
        calibration = None if run is None else run_identity(read_manifest(run))
        metrics = {"num_images": n, "fid": pseudo_fid(calibration, n), "is_mean": 5.0, "kid_mean": 0.1,
                   "psnr_vs_fp": None if run is None else 20.0,
                   "runtime": "fp" if run is None else ("int" if new else model["runtime"]),
                   "sampling_seconds_per_image": 0.05 if new else None}
        (out / "metrics.json").write_text(json.dumps(metrics))

    def heldout(self, run_dir, calibration, trajectories) -> dict:
        self.heldout_calls.append((str(run_dir), [trajectories.start, trajectories.stop]))
        return {"heldout_mse": 1.0, "heldout_x_mse": 2.0, "heldout_quarters": [1.0] * 4,
                "heldout_per_step": [1.0] * 6, "heldout_trajectories": [trajectories.start, trajectories.stop]}

    def cuts(self, run_dir, calibration, k: int) -> list[int]:
        self.cut_calls.append((str(run_dir), k))
        return [4, 5][:k - 1]


@pytest.fixture
def children(monkeypatch) -> Children:
    return Children(monkeypatch)


def main_config(tmp_path: Path) -> dict:
    """A main job in ``tmp_path``: K=1 and K=2 warm-started from it, held-out error, 4 images of 6 steps."""
    out = tmp_path / "out"
    return {"output_dir": str(out),
            "calibration_data": {"config": GEN, "path": str(out / "calib.pt"),
                                 "args": [*STEPS, "--data.init_args.num_trajectories", "8"]},
            "calibrations": [
                {"name": "W4A8 K=1", "config": K1, "run_dir": str(out / "calib_k1"), "args": [*CALIB]},
                {"name": "W4A8 K=2", "config": [K1, K4], "run_dir": str(out / "calib_k2"),
                 "args": [*CALIB, "--data.init_args.k", "2", "--model.init_args.init_from", str(out / "calib_k1")]}],
            "heldout_trajectories": [4, 8],
            "sampling": {"config": SAMPLE, "num_images": 4, "args": [*STEPS]}}


def run_pipeline(tmp_path: Path, cfg: dict, *extra: str) -> dict:
    """Run the pipeline on ``cfg``; the report's rows by name."""
    (tmp_path / "main.yaml").write_text(yaml.safe_dump(cfg))
    report = pipeline.main(["--config", str(tmp_path / "main.yaml"), *extra])
    return {row["name"]: row for row in json.loads(report.read_text())["runs"]}


def test_runs_sharing_a_folder_name_are_sampled_apart(tmp_path, children):
    """Two run folders with one basename get their own sampling folders, and each report row is its own run's."""
    cfg = main_config(tmp_path)
    out = Path(cfg["output_dir"])
    cfg["calibrations"] = [{"name": f"seed {seed}", "config": K1, "run_dir": str(out / f"seed{seed}" / "calib_k1"),
                            "args": [*CALIB, "--model.init_args.seed", str(seed)]} for seed in (1, 2)]
    rows = run_pipeline(tmp_path, cfg)
    for seed in (1, 2):
        folder = out / f"samples_seed{seed}__calib_k1"
        args = children.args(f"sample seed {seed}")
        assert args[args.index("--data.init_args.output_dir") + 1] == str(folder)
        identity = run_identity(read_manifest(out / f"seed{seed}" / "calib_k1"))
        assert rows[f"seed {seed}"]["fid"] == pseudo_fid(identity, 4)
        assert rows[f"seed {seed}"]["sample_grid"] == str(folder / "grid.png")
    assert rows["seed 1"]["fid"] != rows["seed 2"]["fid"]


def test_a_recalibrated_run_is_sampled_and_scored_again(tmp_path, children):
    """Deleting a finished run and changing its iterations recalibrates it and redoes its samples (into a cleared
    folder) and held-out error; the runs it does not touch are skipped."""
    cfg = main_config(tmp_path)
    out = Path(cfg["output_dir"])
    before = run_pipeline(tmp_path, cfg)
    assert children.names() == ["calibration data", "calibrate W4A8 K=1", "calibrate W4A8 K=2", "sample FP",
                                "sample W4A8 K=1", "sample W4A8 K=2"]
    children.reset()
    assert run_pipeline(tmp_path, cfg) == before and children.calls == [] and children.heldout_calls == []

    shutil.rmtree(out / "calib_k2")
    cfg["calibrations"][1]["args"] += ["--model.init_args.recon.cali_iters", "3"]
    after = run_pipeline(tmp_path, cfg)
    assert children.names() == ["calibrate W4A8 K=2", "sample W4A8 K=2"]
    assert children.args("sample W4A8 K=2")[-2:] == ["--data.init_args.overwrite", "true"]
    assert children.heldout_calls == [(str(out / "calib_k2"), [4, 8])]
    assert after["W4A8 K=2"]["fid"] == pseudo_fid(run_identity(read_manifest(out / "calib_k2")), 4)
    assert after["W4A8 K=2"]["fid"] != before["W4A8 K=2"]["fid"]
    assert after["W4A8 K=2"]["calib_iters_total"] == [2 + 2 * 3, 2 + 2 * 2]  # warm start: K=1 + 2 segments
    assert {n: after[n] for n in ("FP", "W4A8 K=1")} == {n: before[n] for n in ("FP", "W4A8 K=1")}


def test_a_finished_run_made_from_other_settings_is_refused(tmp_path, children):
    """Editing a finished entry's settings (8-bit weights) and renaming it is refused before any stage runs,
    naming what differs, instead of reporting the old run under the new name."""
    cfg = main_config(tmp_path)
    run_pipeline(tmp_path, cfg)
    children.reset()
    cfg["calibrations"][0].update(name="W8A8 K=1", args=[*CALIB, "--model.init_args.quant.weight_bits", "8"])
    with pytest.raises(StageRefused, match=r"calibrations\[0\] \('W8A8 K=1'\): .*calib_k1 holds a calibration made "
                                           r"from other inputs than the entry asks for: quant.weight_bits: run 4, "
                                           r"config 8\. Delete the run folder"):
        run_pipeline(tmp_path, cfg)
    assert children.calls == []


def test_a_run_calibrated_on_another_file_is_refused(tmp_path, children):
    """Pointing the config at other calibration data does not report runs calibrated on the old file as present."""
    cfg = main_config(tmp_path)
    run_pipeline(tmp_path, cfg)
    children.reset()
    other = tmp_path / "released.pt"  # a file without a generation record: the user's, taken as it is
    data = torch.load(cfg["calibration_data"]["path"], weights_only=True)
    save_calibration(other, data["xs"] * 0.9, data["ts"])
    cfg["calibration_data"]["path"] = str(other)
    with pytest.raises(StageRefused, match=r"\('W4A8 K=1'\): .* calibration_data: run \"[0-9a-f]{16}"):
        run_pipeline(tmp_path, cfg)
    assert children.calls == []


def test_more_images_resume_and_rescore_every_run(tmp_path, children):
    """Raising num_images resamples every folder without clearing it (the images made stay valid) and rescores;
    held-out error, which does not depend on the images, is kept."""
    cfg = main_config(tmp_path)
    run_pipeline(tmp_path, cfg)
    children.reset()
    cfg["sampling"]["num_images"] = 6
    rows = run_pipeline(tmp_path, cfg)
    assert children.names() == ["sample FP", "sample W4A8 K=1", "sample W4A8 K=2"]
    assert all("--data.init_args.overwrite" not in args for _, args in children.calls)
    assert children.heldout_calls == []
    assert [row["num_images"] for row in rows.values()] == [6, 6, 6]


def test_changed_heldout_trajectories_recompute_only_heldout_error(tmp_path, children):
    cfg = main_config(tmp_path)
    run_pipeline(tmp_path, cfg)
    children.reset()
    cfg["heldout_trajectories"] = [6, 8]
    rows = run_pipeline(tmp_path, cfg)
    assert children.calls == []
    out = cfg["output_dir"]
    assert children.heldout_calls == [(f"{out}/calib_k1", [6, 8]), (f"{out}/calib_k2", [6, 8])]
    assert rows["W4A8 K=1"]["heldout_x_mse"] == 2.0


def test_a_repaired_metrics_file_keeps_what_sampling_measured(tmp_path, children):
    """A deleted metrics.json is made again from the images already there; the runtime and seconds per image the
    first sampling measured stay in the report (the repairing run samples nothing, so measures nothing)."""
    cfg = main_config(tmp_path)
    before = run_pipeline(tmp_path, cfg)
    children.reset()
    (Path(cfg["output_dir"]) / "samples_calib_k1" / "metrics.json").unlink()
    after = run_pipeline(tmp_path, cfg)
    assert children.names() == ["sample W4A8 K=1"]
    assert (after["W4A8 K=1"]["runtime"], after["W4A8 K=1"]["sampling_seconds_per_image"]) == ("int", 0.05)
    assert after == before


def test_the_records_go_beside_the_report(tmp_path, children, monkeypatch):
    """The calibration data stage writes its config record under report_dir, not into the shared folder its
    config names; report_dir holds the config as run and what each row consumed."""
    monkeypatch.chdir(tmp_path)
    cfg = main_config(tmp_path)
    run_pipeline(tmp_path, cfg, "--set", "sampling.num_images=3")
    report = Path(cfg["output_dir"]) / "report"
    args = children.args("calibration data")
    assert args[args.index("--trainer.default_root_dir") + 1] == str(report / "calibration_data")
    assert yaml.safe_load((report / "pipeline_config.yaml").read_text())["sampling"]["num_images"] == 3
    record = json.loads((report / "pipeline_record.json").read_text())
    assert [row["name"] for row in record["rows"]] == ["FP", "W4A8 K=1", "W4A8 K=2"]
    stage = json.loads((Path(cfg["output_dir"]) / "samples_calib_k1" / "pipeline_stage.json").read_text())
    assert record["rows"][1]["sampling"] == digest(stage["identity"])
    assert stage["identity"]["scores"]["num_images"] == 3 and stage["identity"]["images"]["runtime"] == "int"
    assert record["rows"][1]["calibration"] == run_identity(read_manifest(Path(cfg["output_dir"]) / "calib_k1"))


def test_boundaries_from_an_earlier_run(tmp_path, children):
    """Cuts from data use K from the entry's resolved command (its second config file and args) and the source run;
    they are recorded with the run, not recomputed on a rerun."""
    cfg = main_config(tmp_path)
    cfg["calibrations"][1]["boundaries_from"] = "W4A8 K=1"
    rows = run_pipeline(tmp_path, cfg)
    out = cfg["output_dir"]
    assert children.cut_calls == [(f"{out}/calib_k1", 2)]
    args = children.args("calibrate W4A8 K=2")
    assert args[-2:] == ["--data.init_args.boundaries", "[4]"]
    assert rows["W4A8 K=2"]["segment_steps"] == [[0, 4], [4, 6]]
    children.reset()
    run_pipeline(tmp_path, cfg)
    assert children.calls == [] and children.cut_calls == []


def test_failed_stage_ends_with_the_childs_own_error(tmp_path, monkeypatch, capsys):
    child = tmp_path / "cli.py"
    child.write_text("import sys\n"
                     "print('progress line', flush=True)\n"
                     "sys.stderr.write('a warning\\n')\n"
                     "try:\n    open('/nonexistent/x')\nexcept OSError as e:\n"
                     "    raise ValueError('outputs/calib_k4/segment_01/packed.pt is missing\\nrerun with [brackets]') "
                     "from e\n")
    monkeypatch.setattr(stages, "CLI_COMMAND", [sys.executable, str(child)])
    timings = {}
    with pytest.raises(RuntimeError) as failure:
        stages._stage("sample K=4", ["predict"], timings)
    assert str(failure.value) == ("stage 'sample K=4' failed (exit code 1):\n"
                                  "ValueError: outputs/calib_k4/segment_01/packed.pt is missing\n"
                                  "rerun with [brackets]")
    assert timings == {} and "a warning" in capsys.readouterr().err  # stderr still shown as it came


# a stage's process: writes its pid, says it is running, then waits; Ctrl-C's signal makes it record that it was
# asked to stop and exit (as Lightning saves and exits), or, given "stubborn", it ignores that signal
STAGE_CHILD = """import os, signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
def stop(signum, frame):
    (out / "stopped").write_text(signal.Signals(signum).name)
    sys.exit(1)
signal.signal(signal.SIGINT, signal.SIG_IGN if sys.argv[2] == "stubborn" else stop)
(out / "pid").write_text(str(os.getpid()))
sys.stderr.write("running\\n")
sys.stderr.flush()
time.sleep(60)
"""
# the pipeline process around one stage, with the pipeline's own SIGTERM handling
STAGE_PARENT = """import sys
from mmqdiff import pipeline
from mmqdiff.pipeline import stages
stages.CLI_COMMAND = [sys.executable, sys.argv[1], sys.argv[2]]
stages.STOP_GRACE_S = 2.0
pipeline.stop_on_sigterm()
stages._stage("calibrate W4A8 K=4", [sys.argv[3]], {})
"""


def _sigterm_during_stage(tmp_path: Path, behaviour: str) -> tuple[int, str]:
    """(the pipeline's exit status, its stderr) after a SIGTERM while a stage runs; the stage's process is gone."""
    (tmp_path / "child.py").write_text(STAGE_CHILD)
    (tmp_path / "parent.py").write_text(STAGE_PARENT)
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py"), str(tmp_path / "child.py"),
                               str(tmp_path), behaviour], stderr=subprocess.PIPE, text=True)
    assert "running\n" in iter(parent.stderr.readline, "")  # past any warnings the imports print
    parent.send_signal(signal.SIGTERM)
    _, err = parent.communicate(timeout=30)
    with pytest.raises(ProcessLookupError):  # no stage left running on its own
        os.kill(int((tmp_path / "pid").read_text()), 0)
    return parent.returncode, err


def test_sigterm_stops_the_running_stage_like_ctrl_c(tmp_path):
    status, _ = _sigterm_during_stage(tmp_path, "obedient")
    assert status == 128 + signal.SIGTERM
    assert (tmp_path / "stopped").read_text() == "SIGINT"  # the stage was asked, and saved and exited itself


def test_a_stage_that_does_not_stop_is_killed_after_the_grace_period(tmp_path):
    status, _ = _sigterm_during_stage(tmp_path, "stubborn")
    assert status == 128 + signal.SIGTERM and not (tmp_path / "stopped").exists()


def test_child_error_without_traceback_is_its_last_lines():
    assert stages.child_error(["noise\n", "usage: cli.py ...\n", "error: unrecognized arguments: --x\n", "\n"]) == \
        "noise\nusage: cli.py ...\nerror: unrecognized arguments: --x"


def test_cpu_sampling_processes(monkeypatch):
    """sampling.cpu_processes: DDP flags on a CPU-only machine, none with a GPU or for one process."""
    monkeypatch.setattr(plan_module.torch.cuda, "is_available", lambda: False)
    assert plan_module.cpu_parallel_args(1) == []
    assert plan_module.cpu_parallel_args(2) == ["--trainer.accelerator", "cpu", "--trainer.devices", "2",
                                                "--trainer.strategy", "ddp"]
    monkeypatch.setattr(plan_module.torch.cuda, "is_available", lambda: True)
    assert plan_module.cpu_parallel_args(2) == []


@pytest.mark.slow
def test_main_job_writes_report_with_fp_k1_k2(tmp_path, capsys):
    out = tmp_path / "out"
    cfg = {
        "output_dir": str(out),
        "calibration_data": {"config": GEN, "path": str(out / "calib.pt"),
                             "args": [*STEPS, "--data.init_args.num_trajectories", "8"]},
        "calibrations": [
            {"name": "W4A8 K=1", "config": K1, "run_dir": str(out / "calib_k1"), "args": CALIB},
            {"name": "W4A8 K=2", "config": [K1, K4], "run_dir": str(out / "calib_k2"),
             "args": [*CALIB, "--data.init_args.k", "2"], "boundaries_from": "W4A8 K=1"},
            {"name": "W4A8 K=1, K=2's compute", "config": K1, "run_dir": str(out / "calib_k1_eq"),
             "equal_compute_to": "W4A8 K=2",
             "args": [*CALIB, "--model.init_args.recon.cali_iters", "4", "--model.init_args.recon.cali_iters_a", "4"]},
        ],
        "heldout_trajectories": [4, 8],
        "sampling": {"config": SAMPLE, "num_images": 6,
                     "args": [*STEPS, "--model.init_args.num_real", "64", "--model.init_args.kid_subset_size", "3",
                              "--model.init_args.score_chunks", "2", "--data.init_args.batch_size", "3"]},
    }
    (tmp_path / "main.yaml").write_text(yaml.safe_dump(cfg))
    report = pipeline.main(["--config", str(tmp_path / "main.yaml")])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(report.resolve())
    runs = json.loads(report.read_text())["runs"]
    assert [r["name"] for r in runs] == ["FP", "W4A8 K=1", "W4A8 K=2", "W4A8 K=1, K=2's compute"]
    for run in runs:
        assert set(REQUIRED_KEYS) <= set(run)
        assert len(run["fid_chunks"]) == 2 and run["fid_std"] >= 0
    fp, k1, k2, k1_eq = runs
    assert k1_eq["calib_iters_total"] == k2["calib_iters_total"] == [4, 4] and k1["calib_iters_total"] == [2, 2]
    assert all(r["heldout_x_mse"] > 0 and len(r["heldout_per_step"]) == 6 for r in (k1, k2, k1_eq))
    assert len(k1["psnr_chunks"]) == 2
    assert fp["segments"] is None and fp["psnr_vs_fp"] is None
    assert (k1["segments"], k2["segments"]) == (1, 2) and k1["weight_bits"] == 4 and k1["act_bits"] == 8
    assert k2["model_bytes"] == 2 * k1["model_bytes"] < fp["model_bytes"]
    cut = damage_boundaries(out / "calib_k1", out / "calib.pt", 2)  # from data, on K=1's calibration trajectories
    assert k2["segment_steps"] == [[0, cut[0]], [cut[0], 6]]
    assert all(r["fid"] is not None and r["psnr_vs_fp"] > 0 for r in (k1, k2))
    assert len(k1["per_step_mse"]) == 6 and (out / "report/per_step_mse.png").is_file()
    assert yaml.safe_load((out / "report/pipeline_config.yaml").read_text()) == cfg  # the config beside its report
    assert (out / "report/calibration_data/config.yaml").is_file()  # the data stage's record, beside the report
    # a rerun finds every artefact made from what the config asks and only rewrites the report
    before = (out / "samples_calib_k2/metrics.json").stat().st_mtime_ns
    pipeline.main(["--config", str(tmp_path / "main.yaml")])
    assert (out / "samples_calib_k2/metrics.json").stat().st_mtime_ns == before

"""SegmentCalibration end to end through the CLI on the embedded model (23 units) with a small calibration file of its
own trajectories: outputs and manifest, logs, equality with ``mmqdiff.quant.calibrate``, bad inputs, and (slow)
kill/resume bit-identity and 2-process parallel == sequential."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

import cli
from mmqdiff.pipeline.stages import repair
from mmqdiff.data import (CalibrationFile, equal_share_boundaries, load_calibration, record_trajectories,
                          save_calibration, select_steps)
from mmqdiff.data.calibration import calibration_sha256
from mmqdiff.diffusion import (build_model, eps_sensitivity, file_sha256, linear_betas, load_checkpoint, load_config,
                               state_dict_sha256, timesteps)
from mmqdiff.evaluation.heldout import damage_boundaries, heldout_error_of_run, heldout_step_error
from mmqdiff.io import check_writable
from mmqdiff.lightning.calibrate import SegmentCalibration
from mmqdiff.lightning.predict import MultiModelSampler, SampleIndices, SampleWriter
from mmqdiff.segments.run_folder import (CKPT_KEY, calibration_compute, damaged_segments, load_segment_models,
                                        read_manifest, warm_start_state)
from mmqdiff.quant import QuantConfig, ReconSettings, WarmStart, calibrate, packed_nbytes, quant_state_dict
from mmqdiff.quant.reconstruction import NonFiniteLossError

from .conftest import foreign_lock

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/embedded/calibrate_k1.yaml"  # K comes from args()
NUM_STEPS, UNITS = 10, 23


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The shipped embedded model and a calibration file of 8 of its DDIM trajectories over 10 quad steps."""
    d = tmp_path_factory.mktemp("world")
    config, checkpoint = ROOT / "configs/embedded.yaml", ROOT / "checkpoints/embedded_unet.pt"
    model = load_checkpoint(build_model(config), checkpoint).eval()
    with torch.no_grad():
        xs, ts = record_trajectories(model, range(8), 0, timesteps(NUM_STEPS, "quad"), linear_betas(), 0.0,
                                     (3, 16, 16))
    meta = {"num_steps": NUM_STEPS, "skip_type": "quad"}
    save_calibration(d / "calib.pt", xs, ts, meta)
    return {"config": config, "checkpoint": checkpoint, "calibration": d / "calib.pt", "xs": xs, "ts": ts,
            "meta": meta, "model": model}


def args(world, run_dir, k=2, iters=4, iters_a=3, calibration=None, extra=()):
    """The shipped embedded config, pointed at the tiny world."""
    return ["fit", "--config", str(CONFIG), "--trainer.default_root_dir", str(run_dir),
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
            "--model.init_args.model_config", str(world["config"]),
            "--model.init_args.checkpoint", str(world["checkpoint"]),
            "--data.init_args.path", str(calibration or world["calibration"]),
            "--data.init_args.num_steps", str(NUM_STEPS), "--data.init_args.k", str(k),
            "--data.init_args.cali_st", "2", "--data.init_args.cali_n", "6",
            "--model.init_args.recon.cali_iters", str(iters), "--model.init_args.recon.cali_iters_a", str(iters_a),
            *extra]


def fit(*a, **kw):
    return cli.main(args(*a, **kw))


def tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k]
                                        for k, v in a.items())


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    """A finished K=2 run, given a relative run folder (as the shipped configs do)."""
    parent, cwd = tmp_path_factory.mktemp("run"), os.getcwd()
    os.chdir(parent)
    try:
        module = fit(world, "k2").model
    finally:
        os.chdir(cwd)
    return parent / "k2", module


def test_manifest_describes_the_run(world, finished):
    run_dir, module = finished
    m = read_manifest(run_dir)
    assert m["k"] == 2 and m["num_steps"] == NUM_STEPS and (m["weight_bits"], m["act_bits"]) == (4, 8)
    assert [s["steps"] for s in m["segments"]] == [[0, 5], [5, 10]]
    seq = timesteps(NUM_STEPS, "quad")
    assert m["segments"][0]["t_range"] == [seq[-1], seq[5]] and m["segments"][1]["t_range"] == [seq[4], seq[0]]
    assert m["fp_model"]["sha256"] == state_dict_sha256(world["model"])
    assert m["fp_model"]["file_sha256"] == file_sha256(world["checkpoint"])
    assert m["fp_model"]["config_dict"] == load_config(world["config"])
    assert m["calibration"]["sha256"] == calibration_sha256(world["calibration"])
    assert m["calibration"]["meta"] == world["meta"]
    assert m["quant_config"]["split_shortcut"] and m["quant_config"]["unit_order"] == "forward"
    assert m["reconstruction"]["cali_iters"] == 4 and m["reconstruction"]["eval_mode"] is True
    assert m["peak_mem_kind"].startswith("process_peak_rss") and m["wall_seconds"] > 0
    assert m["units"] == module.units and len(m["units"]) == UNITS
    for seg in m["segments"]:
        assert seg["pairs"] == len(select_steps(range(*seg["steps"]), 2)) * 6
        assert seg["peak_mem_bytes"] > 0 and seg["wall_seconds"] > 0
        for kind in ("quant_state", "packed"):
            assert file_sha256(run_dir / seg[kind]) == seg["sha256"][kind]
        assert seg["model_bytes"] == packed_nbytes(torch.load(run_dir / seg["packed"], weights_only=True))
        assert [(u["unit"], u["phase"]) for u in seg["units"]] == \
            [(n, p) for p in ("weight", "act") for n in m["units"]]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "lightning_logs" / "version_0" / "config.yaml").is_file()  # beside the logs of its run


def test_losses_are_logged_per_item_and_segment(finished):
    """The default logger (CSV without TensorBoard) holds, at step = work item, each segment's first and last
    reconstruction loss (the manifest's values) and the weight phase's rounding loss."""
    run_dir, module = finished
    with open(run_dir / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(2 * UNITS))
    for seg in read_manifest(run_dir)["segments"]:
        prefix = f"segment_{seg['index']:02d}/"
        for row, unit in zip(rows, seg["units"]):
            phase = unit["phase"]
            assert float(row[f"{prefix}{phase}_loss_start"]) == pytest.approx(unit["rec_first"], rel=1e-6)
            assert float(row[f"{prefix}{phase}_loss_end"]) == pytest.approx(unit["rec_last"], rel=1e-6)
            assert (row[f"{prefix}round_loss"] != "") == (phase == "weight")
        assert all(float(r[f"{prefix}round_loss"]) > 0 for r in rows[:UNITS])


def test_python_api_reproduces_a_segment_of_the_run(world, finished):
    """``mmqdiff.quant.calibrate`` with the run's seed and segment index gives that segment's model bit for bit."""
    _, module = finished
    model = load_checkpoint(build_model(world["config"]), world["checkpoint"]).eval()
    xs, ts = load_calibration(world["calibration"], cali_st=2, cali_n=6, steps=range(5, 10))
    assert (module.recon.cali_iters, module.recon.cali_iters_a) == (4, 3)  # the config's lr, the test's iterations
    q = calibrate(model, QuantConfig(), xs, ts, module.recon, seed=1234, segment=1)
    assert tensors_equal(quant_state_dict(q), quant_state_dict(module.nets.segments[1].qmodel))


def test_segment_scale_gives_each_segment_its_share_of_the_iterations(world, tmp_path):
    module = fit(world, tmp_path / "scaled", iters=3, iters_a=2,
                 extra=["--model.init_args.segment_scale", "[1.5, 0.5]"]).model
    m = read_manifest(tmp_path / "scaled")
    assert [seg["iters"] for seg in m["segments"]] == [[4, 3], [2, 1]] and m["segment_scale"] == [1.5, 0.5]
    assert calibration_compute(m) == [6, 4]
    assert module.data.segment_costs == [1.5, 0.5]  # what segment_parallel balances the ranks by
    model = load_checkpoint(build_model(world["config"]), world["checkpoint"]).eval()
    xs, ts = load_calibration(world["calibration"], cali_st=2, cali_n=6, steps=range(0, 5))
    q = calibrate(model, QuantConfig(), xs, ts, module.segment_recon(0), seed=1234, segment=0)
    assert tensors_equal(quant_state_dict(q), quant_state_dict(module.nets.segments[0].qmodel))
    with pytest.raises(ValueError, match="segment_scale has 3 factors for k=2 segments"):
        fit(world, tmp_path / "bad", extra=["--model.init_args.segment_scale", "[1, 1, 1]"])
    with pytest.raises(ValueError, match="iteration scale must be > 0"):
        ReconSettings().scaled(0)


def test_loaded_segment_models_reproduce_the_calibrated_ones(world, finished):
    run_dir, module = finished
    ranges, models = load_segment_models(run_dir)
    assert ranges == [range(0, 5), range(5, 10)]
    x, t = world["xs"][3, :4], world["ts"][3, :4]
    for s, q in enumerate(models):
        assert not q.training
        with torch.no_grad():
            assert torch.equal(q(x, t), module.nets.segments[s].qmodel.eval()(x, t))


def test_heldout_error_of_a_run_uses_its_segment_models_on_unused_trajectories(world, finished):
    run_dir, module = finished
    fp = load_checkpoint(build_model(world["config"]), world["checkpoint"]).eval()
    out = heldout_error_of_run(run_dir, world["calibration"], range(6, 8))
    direct = heldout_step_error(lambda i: module.nets.segments[i // 5].qmodel.eval(), fp,
                                CalibrationFile(world["calibration"]), [6, 7])
    assert out["heldout_per_step"] == pytest.approx(direct, rel=1e-6)
    assert out["heldout_mse"] == pytest.approx(sum(direct) / NUM_STEPS, rel=1e-6)
    assert out["heldout_x_mse"] > 0 and len(out["heldout_quarters"]) == 4
    with pytest.raises(ValueError, match="overlap the first cali_n=6 trajectories"):
        heldout_error_of_run(run_dir, world["calibration"], range(5, 8))


def test_damage_boundaries_share_the_runs_calibration_error_equally(world, finished):
    run_dir, module = finished
    fp = load_checkpoint(build_model(world["config"]), world["checkpoint"]).eval()
    per_step = heldout_step_error(lambda i: module.nets.segments[i // 5].qmodel.eval(), fp,
                                  CalibrationFile(world["calibration"]), range(6))  # cali_n=6: calibration's own
    sensitivity = eps_sensitivity(timesteps(NUM_STEPS, "quad"), linear_betas())
    damage = [s * s * e for s, e in zip(sensitivity, per_step)]
    assert damage_boundaries(run_dir, world["calibration"], 3) == equal_share_boundaries(damage, 3)


def test_tampered_outputs_are_refused(finished, tmp_path):
    run_dir, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    packed = copy / "segment_01" / "packed.pt"
    packed.write_bytes(packed.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"segment_01/packed.pt: SHA-256 .* differs from the manifest"):
        load_segment_models(copy)
    (copy / "manifest.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a calibration manifest"):
        read_manifest(copy)


def test_existing_run_is_not_overwritten(world, finished):
    run_dir, _ = finished
    before = (run_dir / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError, match="holds a previous run"):
        fit(world, run_dir)
    assert (run_dir / "manifest.json").read_bytes() == before


def test_default_autocast_is_left_out_of_the_resume_signature(finished):
    """Checkpoints written before ``recon.autocast`` existed must still resume: at its default it is not recorded."""
    run_dir, _ = finished
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)[CKPT_KEY]
    recon = state["signature"]["recon"]
    assert "lr_w" in recon and "autocast" not in recon


def test_resume_with_other_settings_is_refused(world, finished):
    run_dir, _ = finished
    before = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(ValueError, match=r"cannot resume: checkpoint was made with different \['recon'\]"):
        fit(world, run_dir, iters=5, extra=["--ckpt_path", "last"])
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == before


def test_calibration_file_for_another_model_is_refused(world, tmp_path):
    other = tmp_path / "other.pt"
    save_calibration(other, world["xs"], world["ts"], {**world["meta"], "model_sha256": "0" * 64})
    with pytest.raises(ValueError, match="calibration data were made for another setup .*model_sha256"):
        fit(world, tmp_path / "run", calibration=other)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_run_without_unit_checkpoint_is_refused(world, tmp_path):
    with pytest.raises(ValueError, match="trainer.callbacks must include .*UnitCheckpoint"):
        fit(world, tmp_path / "run", extra=["--trainer.callbacks", "[]"])


def test_segment_without_steps_is_refused(world, tmp_path):
    with pytest.raises(ValueError, match="k=11 exceeds the number of sampling steps 10"):
        fit(world, tmp_path / "run", k=11)


def test_unwritable_output_folder_is_refused(world, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=str(blocker)):  # from the first writer (the CLI's config.yaml, or our probe)
        fit(world, blocker / "run")
    with pytest.raises(PermissionError, match="output folder .* is not writable"):  # the module's own check
        check_writable(blocker / "run")


def test_non_finite_loss_stops_at_the_unit_and_keeps_the_last_good_checkpoint(world, tmp_path):
    sd = {k: v.clone() for k, v in world["model"].state_dict().items()}
    sd["conv_out.weight"] *= 1e36  # finite weights whose outputs overflow float32 in the reconstruction loss
    torch.save(sd, tmp_path / "huge.pt")
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"unit (\S+): weight-phase loss is") as err:
        fit(world, run_dir, extra=["--model.init_args.checkpoint", str(tmp_path / "huge.pt")])
    unit = err.value.args[0].split()[1].rstrip(":")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["mmqdiff_calibration"]
    assert ckpt["signature"]["units"].index(unit) == ckpt["next_item"] > 0  # every earlier unit is saved
    assert not (run_dir / "manifest.json").exists()


# --- reliability: identity, schedule, locks, damaged artefacts ----------------------------------------------------

def copy_run(finished, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(finished[0], run_dir)
    return run_dir


def test_same_weights_saved_another_way_are_the_same_model(world, tmp_path):
    """Model identity is the loaded weights: a calibration file made for the shipped checkpoint is accepted with the
    same weights re-saved as a Lightning checkpoint."""
    resaved = tmp_path / "resaved.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in world["model"].state_dict().items()}}, resaved)
    calib = save_calibration(tmp_path / "calib.pt", world["xs"], world["ts"],
                             {**world["meta"], "model_sha256": state_dict_sha256(world["model"])})
    # cali_n above the file's 8 trajectories fails only after the file's meta was accepted
    with pytest.raises(ValueError, match="cali_n=9 but the file holds 8 trajectories"):
        fit(world, tmp_path / "run", calibration=calib,
            extra=["--model.init_args.checkpoint", str(resaved), "--data.init_args.cali_n", "9"])


def test_calibration_data_off_the_schedule_is_refused(world, tmp_path):
    zeros = save_calibration(tmp_path / "zeros.pt", world["xs"], torch.zeros_like(world["ts"]), world["meta"])
    with pytest.raises(ValueError, match=rf"zeros.pt: 'ts' does not follow the sampling schedule: first difference "
                                         rf"at step index 0 \(trajectory 0\): the file has t=0, the schedule expects "
                                         rf"t={timesteps(NUM_STEPS, 'quad')[-1]}"):
        fit(world, tmp_path / "run", calibration=zeros)


def test_model_on_another_diffusion_schedule_is_refused(world, tmp_path):
    cfg = load_config(world["config"])
    cfg["diffusion"]["num_diffusion_timesteps"] = 500
    other = tmp_path / "model.yaml"
    other.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=f"{other} diffuses over 500 timesteps but "
                                         "data.init_args.num_diffusion_timesteps is 1000"):
        fit(world, tmp_path / "run", extra=["--model.init_args.model_config", str(other)])


def test_missing_calibration_file_is_named_by_the_project_check(world, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"calibration file not found: {tmp_path / 'nope.pt'}"):
        fit(world, tmp_path / "run", calibration=tmp_path / "nope.pt")


def test_locked_run_folder_is_refused_and_left_alone(world, finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with foreign_lock(run_dir / "mmqdiff.lock"):
        with pytest.raises(RuntimeError, match=f"calibration run folder {run_dir} is in use by pid 4242 on host "
                                               "elsewhere"):
            fit(world, run_dir, extra=["--model.init_args.overwrite", "true"])
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != "mmqdiff.lock"} == before


def test_sampling_a_calibration_run_into_an_fp_folder_is_refused(world, finished, tmp_path):
    out = tmp_path / "samples"

    def sample(calibration_run):
        sampler = MultiModelSampler(str(world["config"]), str(world["checkpoint"]), calibration_run=calibration_run,
                                    num_steps=NUM_STEPS, fp_error_images=0, real_source=None)
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            callbacks=[SampleWriter()], default_root_dir=out)
        trainer.predict(sampler, datamodule=SampleIndices(1, 1, str(out)), return_predictions=False)

    sample(None)
    fp_image = (out / "images" / "000000.png").read_bytes()
    with pytest.raises(ValueError, match=r"holds images sampled with other settings: \['calibration_run', 'runtime'\] "
                                         r"differ \(calibration_run: folder null, now \[\{"):
        sample(str(finished[0]))
    assert (out / "images" / "000000.png").read_bytes() == fp_image


@pytest.mark.parametrize("damage", ["delete packed", "change quant_state"])
def test_pipeline_redoes_only_the_damaged_segment(world, finished, tmp_path, capsys, damage):
    run_dir = copy_run(finished, tmp_path)
    kind = damage.split()[1]
    path = run_dir / "segment_01" / f"{kind}.pt"
    path.unlink() if damage.startswith("delete") else path.write_bytes(path.read_bytes()[:-1] + b"x")
    untouched = {p: p.read_bytes() for p in (run_dir / "segment_00").iterdir()}
    repair("K=2", run_dir)  # re-exports from the run's checkpoint; no calibration process is started
    problem = "is missing" if damage.startswith("delete") else "differs from its recorded SHA-256"
    assert f"K=2: {path} {problem}" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in (run_dir / "segment_00").iterdir()} == untouched
    for name in ("quant_state.pt", "packed.pt"):
        assert tensors_equal(torch.load(run_dir / "segment_01" / name, weights_only=True),
                             torch.load(finished[0] / "segment_01" / name, weights_only=True))
    assert damaged_segments(run_dir) == {}
    load_segment_models(run_dir)  # hash-checked against the updated manifest


def test_unreadable_packed_export_names_the_file(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    packed = run_dir / "segment_01" / "packed.pt"
    packed.write_bytes(b"PK\x03\x04 not a torch file")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["segments"][1]["sha256"]["packed"] = file_sha256(packed)  # hash updated with it: only loading can tell
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"{packed}: cannot be read as a packed export"):
        load_segment_models(run_dir)


class Payload:
    def __reduce__(self):
        return print, ("payload ran",)


def test_damaged_last_checkpoint_is_named_and_the_previous_one_resumes(world, finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    last, previous = run_dir / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "previous.ckpt"
    assert torch.load(previous, weights_only=True)["mmqdiff_calibration"]["next_item"] == 2 * UNITS - 1
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{last}: cannot be read as a calibration checkpoint \(.*\); the previous "
                                         rf"checkpoint is kept: resume from it with --ckpt_path {previous}"):
        fit(world, run_dir, extra=["--ckpt_path", "last"])
    fit(world, run_dir, extra=["--ckpt_path", str(previous)])  # the advice: redoes the last work item only
    for a, b in zip(artefacts(run_dir, 2), artefacts(finished[0], 2)):
        assert tensors_equal(a, b)
    torch.save({"x": Payload()}, last)  # tampered: refused by weights-only loading, never run
    with pytest.raises(ValueError, match=rf"{last}: cannot be read as a calibration checkpoint \(UnpicklingError: "
                                         r"weights-only loading refused it: Unsupported global: GLOBAL print"):
        fit(world, run_dir, extra=["--ckpt_path", "last"])
    previous.unlink()
    last.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=rf"{last}: cannot be read .* no earlier checkpoint is kept, so the run must "
                                         r"start over \(--model.init_args.overwrite true\)"):
        fit(world, run_dir, extra=["--ckpt_path", "last"])


# --- slow: real processes -----------------------------------------------------------------------------------------

def run_cli(cli_args, env_extra=None, **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}  # DDP ranks get 1 thread: so does the baseline
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *cli_args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(proc, timeout=170):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def artefacts(run_dir, k):
    """Every segment's quant state and packed export (torch.save files differ byte-wise run to run by a random
    serialization id, so contents are compared, not file hashes)."""
    return [torch.load(run_dir / f"segment_{s:02d}" / name, weights_only=True)
            for s in range(k) for name in ("quant_state.pt", "packed.pt")]


SLOW_K, SLOW_ITERS = 3, 40


@pytest.fixture(scope="module")
def sequential(world, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("seq") / "run"
    finish(run_cli(args(world, run_dir, k=SLOW_K, iters=SLOW_ITERS, iters_a=20)))
    return run_dir


@pytest.mark.slow
def test_killed_run_resumes_bit_identical(world, sequential, tmp_path):
    run_dir = tmp_path / "run"
    cli_args = args(world, run_dir, k=SLOW_K, iters=SLOW_ITERS, iters_a=20)
    proc = run_cli(cli_args)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 150
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    state = torch.load(ckpt, weights_only=False)["mmqdiff_calibration"]
    assert 0 < state["next_item"] < 2 * UNITS and not (run_dir / "manifest.json").exists()  # killed mid-way
    item = state["next_item"]
    assert (state["next_unit"], state["next_phase"]) == (item % UNITS, "weight" if item < UNITS else "act")
    finish(run_cli([*cli_args, "--ckpt_path", "last"]))
    for a, b in zip(artefacts(run_dir, SLOW_K), artefacts(sequential, SLOW_K)):
        assert tensors_equal(a, b)


@pytest.mark.slow
def test_two_runs_started_together_on_one_folder_one_is_refused(world, sequential, tmp_path):
    run_dir = tmp_path / "run"
    procs = [run_cli(args(world, run_dir, k=SLOW_K, iters=SLOW_ITERS, iters_a=20)) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes[0] == 0 and codes[1] != 0, [o[-1500:] for o in outs]
    winner, loser = (0, 1) if procs[0].returncode == 0 else (1, 0)
    assert f"calibration run folder {run_dir} is in use by pid {procs[winner].pid}" in outs[loser], outs[loser][-2000:]
    for a, b in zip(artefacts(run_dir, SLOW_K), artefacts(sequential, SLOW_K)):
        assert tensors_equal(a, b)
    assert not (run_dir / "mmqdiff.lock").exists()


@pytest.mark.slow
def test_two_processes_equal_sequential(world, sequential, tmp_path):
    run_dir = tmp_path / "run"
    out = finish(run_cli(args(world, run_dir, k=SLOW_K, iters=SLOW_ITERS, iters_a=20,
                              extra=["--trainer.devices", "2", "--trainer.strategy", "segment_parallel"])))
    manifest = read_manifest(run_dir)
    assert manifest["world_size"] == 2 and [s["rank"] for s in manifest["segments"]] == [0, 1, 0], out[-2000:]
    for a, b in zip(artefacts(run_dir, SLOW_K), artefacts(sequential, SLOW_K)):
        assert tensors_equal(a, b)
    seq = read_manifest(sequential)
    assert [s["model_bytes"] for s in manifest["segments"]] == [s["model_bytes"] for s in seq["segments"]]


@pytest.fixture(scope="module")
def base_k1(world, tmp_path_factory):
    """A finished K=1 run: the base of the warm-start tests."""
    run_dir = tmp_path_factory.mktemp("base") / "k1"
    fit(world, run_dir, k=1, iters=3, iters_a=2)
    return run_dir


def test_warm_started_run_fine_tunes_the_k1_model_and_counts_its_compute(world, base_k1, tmp_path):
    """Every segment starts from the K=1 model (the Python API with ``init_state`` gives the same bits), the
    manifest records the base, and the equal-compute count includes the base's iterations."""
    module = fit(world, tmp_path / "warm", iters=2, iters_a=1,
                 extra=["--model.init_args.init_from", str(base_k1), "--model.init_args.warm.soft_margin", "0.3"]).model
    m, base = read_manifest(tmp_path / "warm"), read_manifest(base_k1)
    state_file = base_k1 / base["segments"][0]["quant_state"]
    assert m["init_from"] == {"path": str(base_k1), "quant_state_sha256": file_sha256(state_file),
                              "compute": [3, 2], "iters": [3, 2], "warm": {"soft_margin": 0.3, "act_init": False}}
    assert calibration_compute(m) == [3 + 2 * 2, 2 + 2 * 1]
    assert module.signature()["init_from"] == {k: v for k, v in m["init_from"].items() if k != "path"}
    model = load_checkpoint(build_model(world["config"]), world["checkpoint"]).eval()
    xs, ts = load_calibration(world["calibration"], cali_st=2, cali_n=6, steps=range(5, 10))
    q = calibrate(model, QuantConfig(), xs, ts, module.recon, seed=1234, segment=1,
                  init_state=torch.load(state_file, weights_only=True), warm=WarmStart(soft_margin=0.3))
    assert tensors_equal(quant_state_dict(q), quant_state_dict(module.nets.segments[1].qmodel))
    with pytest.raises(ValueError, match=r"cannot resume: checkpoint was made with different \['init_from'\]"):
        fit(world, tmp_path / "warm", iters=2, iters_a=1, extra=["--ckpt_path", "last"])


def test_bad_warm_start_base_is_refused(world, finished, base_k1, tmp_path):
    k2_dir, _ = finished
    with pytest.raises(FileNotFoundError, match=f"no calibration manifest at {tmp_path}/none "):
        fit(world, tmp_path / "a", extra=["--model.init_args.init_from", str(tmp_path / "none")])
    with pytest.raises(ValueError, match=f"{k2_dir}/manifest.json: k is 2; a warm start begins from a K=1 run"):
        fit(world, tmp_path / "b", extra=["--model.init_args.init_from", str(k2_dir)])
    with pytest.raises(ValueError, match=r"manifest.json: quant_config differs from this run's in \['weight_bits'\] "
                                         r"\(e.g. weight_bits: 4 there, 8 here\)"):
        fit(world, tmp_path / "c", extra=["--model.init_args.init_from", str(base_k1),
                                          "--model.init_args.quant.weight_bits", "8"])
    with pytest.raises(ValueError, match="calibrated from FP weights with SHA-256 .*, not this model's 0000"):
        warm_start_state(base_k1, "0" * 64, asdict(QuantConfig()))
    copy = tmp_path / "copy"
    shutil.copytree(base_k1, copy)
    with open(copy / "segment_00/quant_state.pt", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="segment_00/quant_state.pt: SHA-256 .* differs from the manifest's"):
        warm_start_state(copy, state_dict_sha256(world["model"]), asdict(QuantConfig()))
    (copy / "segment_00/quant_state.pt").unlink()
    with pytest.raises(FileNotFoundError, match=f"segment 0: quant state {copy}/segment_00/quant_state.pt is missing"):
        warm_start_state(copy, state_dict_sha256(world["model"]), asdict(QuantConfig()))

"""Hostile inputs: each either gives the right result or stops with a message naming the file, key or value and what
was expected; none ends with exit status 0 and a wrong result. Small models (``conftest.TINY``, 4 quad steps), so
every case takes seconds.

The cases of the earlier bad-input harness are tested beside their modules: sampling-folder identity, overwrite,
FP reference, damaged PNGs, locks and re-saved weights in ``test_sampling``; ascending / foreign ``ts``, diverging
trajectories, unwritable and locked targets, a missing calibration file in ``test_calibration_data``; NaN weights in
``test_diffusion``; damaged segment files, truncated or tampered ``last.ckpt`` and a calibration run sampled into an
FP folder in ``test_calibrate``; pipeline stage failures in ``test_pipeline``; bad settings (weight bits, learning
rates, cache device) in ``test_cli`` and ``test_reconstruction``; stale locks in ``test_io``; the W16 export in
``test_export``.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

import cli
from mmqdiff.data import load_calibration, record_trajectories, save_calibration
from mmqdiff.data.calibration import calibration_sha256
from mmqdiff.diffusion import Model, build_model, ddim_sample, file_sha256, linear_betas, timesteps
from mmqdiff.evaluation.fidelity import paired_psnr
from mmqdiff.evaluation.sample_folder import images_problem, sample_problem
from mmqdiff.io import atomic_save, atomic_write_text, write_png
from mmqdiff.lightning.calibrate import SegmentCalibration
from mmqdiff.lightning.generate import CalibrationGenerator
from mmqdiff.lightning.predict import MultiModelSampler, SampleIndices, finalize_samples, load_samples
from mmqdiff.segments.run_folder import load_segment_models, read_manifest

from .conftest import ROOT, TINY
from .test_sampling import _sample, _write_tiny

STEPS = 4


@pytest.fixture
def tiny_files(tmp_path, tiny_model):
    _write_tiny(tmp_path, tiny_model)
    return str(tmp_path / "tiny.yaml"), str(tmp_path / "tiny.pt")


def fit_args(files, run_dir, calibration, *extra):
    """The shipped calibration config pointed at the tiny model: K=2 over 4 steps, a few iterations."""
    return ["fit", "--config", str(ROOT / "configs/embedded/calibrate_k1.yaml"), "--trainer.default_root_dir",
            str(run_dir), "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
            "--model.init_args.model_config", files[0], "--model.init_args.checkpoint", files[1],
            "--data.init_args.path", str(calibration), "--data.init_args.num_steps", str(STEPS),
            "--data.init_args.k", "2", "--data.init_args.cali_st", "2", "--data.init_args.cali_n", "4",
            "--model.init_args.recon.cali_iters", "2", "--model.init_args.recon.cali_iters_a", "2",
            "--model.init_args.recon.batch_size", "4", *extra]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny model, a calibration file of 8 of its trajectories and a finished K=2 calibration run."""
    d = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    model = Model(**TINY).eval()
    _write_tiny(d, model)
    files = str(d / "tiny.yaml"), str(d / "tiny.pt")
    xs, ts = record_trajectories(model, range(8), 0, timesteps(STEPS, "quad"), linear_betas(), 0.0, (3, 8, 8))
    calib = save_calibration(d / "calib.pt", xs, ts, {"num_steps": STEPS, "skip_type": "quad"})
    cli.main(fit_args(files, d / "run", calib))
    return {"dir": d, "files": files, "calib": calib, "run": d / "run", "model": model}


def copy_run(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    return run


def sampler_args(world, out, *extra):
    return ["predict", "--config", str(ROOT / "configs/embedded/sample.yaml"), "--trainer.accelerator", "cpu",
            "--model.init_args.config", world["files"][0], "--model.init_args.checkpoint", world["files"][1],
            "--model.init_args.num_steps", str(STEPS), "--model.init_args.real_source", "null",
            "--model.init_args.fp_error_images", "0", "--data.init_args.output_dir", str(out),
            "--trainer.default_root_dir", str(out), *extra]


def sample_run(world, out, num_images, batch_size, runtime, *extra):
    cli.main(sampler_args(world, out, "--model.init_args.calibration_run", str(world["run"]),
                          "--model.init_args.runtime", runtime, "--data.init_args.num_images", str(num_images),
                          "--data.init_args.batch_size", str(batch_size), *extra))
    return load_samples(out)


# --- sampling and schedules ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("eta", [2, -0.5, 1.0001])
def test_eta_outside_zero_one_is_refused_where_sampling_takes_it(tiny_files, tiny_model, eta):
    """eta 2 made every image NaN, written as black PNGs with exit status 0; a negative eta is no DDIM setting."""
    message = rf"eta must be in \[0, 1\] \(0: deterministic DDIM, 1: DDPM-like\), got {eta}"
    with pytest.raises(ValueError, match=message):
        MultiModelSampler(*tiny_files, num_steps=STEPS, eta=eta, real_source=None)
    with pytest.raises(ValueError, match=message):
        CalibrationGenerator(*tiny_files, num_steps=STEPS, eta=eta)
    with pytest.raises(ValueError, match=message):
        ddim_sample(lambda i: tiny_model, torch.randn(1, 3, 8, 8), timesteps(STEPS, "quad"), linear_betas(), eta,
                    generator=torch.Generator())


def test_uniform_steps_that_do_not_divide_the_schedule_are_refused_up_front(tiny_files):
    """range(0, 1000, 1000 // 3) has 4 entries: sampling ran 4 steps and failed with an IndexError later, the
    generator wrote 4 steps under meta num_steps=3."""
    message = r"skip_type 'uniform' needs num_steps to divide num_diffusion_timesteps=1000, got num_steps=3"
    with pytest.raises(ValueError, match=message):
        MultiModelSampler(*tiny_files, num_steps=3, skip_type="uniform", real_source=None)
    with pytest.raises(ValueError, match=message):
        CalibrationGenerator(*tiny_files, num_steps=3, skip_type="uniform")


def test_diverging_fp_weights_stop_sampling_naming_the_folder(tmp_path, tiny_model):
    """A finite 1e38 factor passes the checkpoint's non-finite check; the images it gives must not be written."""
    _write_tiny(tmp_path, tiny_model)
    sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    sd["conv_out.weight"] *= 1e38
    torch.save(sd, tmp_path / "huge.pt")
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match=rf"{out}: sampling stopped, this batch not written: image 0 (holds "
                                           rf"non-finite values|reaches \|x\|).*the FP model of {tmp_path / 'huge.pt'} "
                                           "diverges or has collapsed"):
        _sample(tmp_path, out, 2, checkpoint="huge.pt")
    assert not list((out / "images").glob("*.png"))


def test_collapsed_samples_are_named():
    x = torch.rand(3, 3, 4, 4) * 2 - 1
    u8 = ((x + 1) * 127.5).to(torch.uint8)
    assert sample_problem(x, u8, [5, 6, 7]) is None
    flat = u8.clone()
    flat[1] = 0
    assert sample_problem(x, flat, [5, 6, 7]) is None  # one dark sample among three: a weak model, scored by FID
    flat[2] = 0
    assert sample_problem(x, flat, [5, 6, 7]) == "2 of 3 images are a single colour (first: image 6, every value 0)"
    same = u8[:1].expand(3, -1, -1, -1)
    assert images_problem(same, [5, 6, 7]) == "all 3 images (5..7) are identical"
    big = x.clone()
    big[2, 0, 0, 0] = 1e6
    assert sample_problem(big, u8, [5, 6, 7]) == "image 7 reaches |x| = 1e+06, where images lie in [-1, 1] (bound 100)"
    nan = x.clone()
    nan[0, 1, 2, 3] = float("nan")
    assert sample_problem(nan, u8, [5, 6, 7]) == "image 5 holds non-finite values (NaN/inf)"


def test_a_folder_of_identical_images_is_not_gathered(tmp_path):
    """Batch size 1 sees one image at a time: the folder-wide check catches a model that samples one image."""
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for j in range(3):
        write_png(tmp_path / "images" / f"{j:06d}.png", image)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'images'}: all 3 images \(0..2\) are identical: the model "
                                         "that sampled them has collapsed"):
        finalize_samples(tmp_path, 3)
    assert not (tmp_path / "samples.npz").exists()


# --- calibration data ---------------------------------------------------------------------------------------------

def states(num_steps=4, n=4):
    """Plausible DDIM states (unit-variance noise) and the quad schedule's ts, indexed by step."""
    xs = torch.randn(num_steps + 1, n, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    ts = torch.tensor(timesteps(num_steps, "quad")[::-1], dtype=torch.float32)[:, None].expand(-1, n).clone()
    return xs, ts


def test_integer_xs_are_refused(tmp_path):
    xs, ts = states()
    path = tmp_path / "int.pt"
    torch.save({"xs": xs.round().long(), "ts": ts}, path)
    with pytest.raises(ValueError, match=rf"{path}: 'xs' holds torch.int64 values; the model inputs x_t must be "
                                         r"floating point"):
        load_calibration(path, cali_st=4, cali_n=2)


def test_implausibly_large_states_are_refused_naming_step_and_trajectory(tmp_path):
    xs, ts = states()
    xs[2, 1] *= 1e6  # one trajectory at one step
    one = save_calibration(tmp_path / "one.pt", xs, ts)
    with pytest.raises(ValueError, match=rf"{one}: 'xs' at step index 2, trajectory 1 reaches \|x\| = \S+e\+0[56], "
                                         r"beyond the 100 that DDIM states stay within; the file does not hold DDIM "
                                         r"states of a working model"):
        load_calibration(one, cali_st=4, cali_n=2)
    assert load_calibration(one, cali_st=4, cali_n=1)[0].abs().max() < 10  # trajectory 1 not selected: fine
    every = save_calibration(tmp_path / "every.pt", states()[0] * 1e4, ts)
    with pytest.raises(ValueError, match=rf"{every}: 'xs' at step index 0, trajectory 0 reaches"):
        load_calibration(every, cali_st=4, cali_n=2)


def test_calibration_data_are_identified_by_content(tmp_path):
    """The same data under another name (torch's archive records the name: other bytes), as a list of steps or
    with other meta are the same calibration data; one changed value is not."""
    xs, ts = states()
    a = save_calibration(tmp_path / "a.pt", xs, ts, {"seed": 1})
    renamed = tmp_path / "renamed_copy.pt"
    torch.save(torch.load(a, weights_only=True), renamed)
    assert file_sha256(renamed) != file_sha256(a)
    listed = save_calibration(tmp_path / "listed.pt", list(xs), list(ts), {"seed": 2})
    digest = calibration_sha256(a)
    assert calibration_sha256(renamed) == calibration_sha256(listed) == digest
    xs[1, 0, 0, 0, 0] += 1e-3
    assert calibration_sha256(save_calibration(tmp_path / "b.pt", xs, ts, {"seed": 1})) != digest


# --- sampling folders and scoring ---------------------------------------------------------------------------------

def test_a_stray_png_is_ignored_with_a_warning(tmp_path, tiny_model, caplog):
    """macOS copies leave ``._000001.png`` beside the images; finalisation crashed on it on every rerun."""
    _write_tiny(tmp_path, tiny_model)
    out = tmp_path / "out"
    _sample(tmp_path, out, 2)
    stray = out / "images" / "._000001.png"
    stray.write_bytes(b"\x00\x05\x16\x07 resource fork")
    with caplog.at_level(logging.WARNING, logger="mmqdiff.evaluation.sample_folder"):
        _sample(tmp_path, out, 2)
    assert f"{stray}: ignored: not an image of this folder" in caplog.text
    assert load_samples(out)[1].tolist() == [0, 1] and stray.exists()


def test_absurd_num_images_is_refused_before_anything_is_listed():
    with pytest.raises(ValueError, match=r"num_images=1,000,000,000,000 is above max_images=1,000,000 .* raise "
                                         r"data.init_args.max_images"):
        SampleIndices(num_images=10**12)
    assert SampleIndices(num_images=2_000_000, max_images=2_000_000).num_images == 2_000_000


def test_images_that_do_not_fit_on_disk_are_refused(tmp_path, tiny_model, monkeypatch):
    _write_tiny(tmp_path, tiny_model)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "out"
    with pytest.raises(OSError, match=rf"{out}: num_images=8 \(8 still to sample\) need about 0.0 GiB for the PNGs "
                                      r"and samples.npz, but 0.0 GiB are free"):
        _sample(tmp_path, out, 8)
    assert not list((out / "images").glob("*.png"))


def test_psnr_against_an_fp_folder_with_fewer_images_is_refused():
    images = torch.zeros(3, 3, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"fp holds 2 images but q holds 3: no FP image for 1 of them \(indices "
                                         r"\[2\]\); sample the FP folder with at least as many images \(num_images=3\)"):
        paired_psnr(images, torch.arange(3), images[:2], torch.arange(2), "q", "fp")
    ref = torch.full((2, 3, 2, 2), 255, dtype=torch.uint8)
    assert paired_psnr(images[:2], torch.tensor([1, 0]), ref, torch.tensor([0, 1]), "q", "fp").tolist() == [0.0, 0.0]


def test_runtime_is_part_of_a_folder_identity(world, tmp_path):
    """int8 and fake-quant images must not share a folder: resuming one with the other was accepted."""
    out = tmp_path / "q"
    sample_run(world, out, 1, 1, "int")
    with pytest.raises(ValueError, match=rf"{out} holds images sampled with other settings: \['batch_size', 'runtime'\] "
                                         r'differ \(batch_size: folder null, now 1; runtime: folder "int", now "fake"\)'):
        sample_run(world, out, 2, 1, "fake")
    assert load_samples(out)[1].tolist() == [0]


def test_a_record_without_runtime_is_refused_for_quantized_images_only(world, tmp_path):
    out = tmp_path / "q"
    sample_run(world, out, 1, 1, "int")
    record = json.loads((out / "sampling.json").read_text())
    del record["identity"]["runtime"]
    (out / "sampling.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=rf"{out / 'sampling.json'} was written before sampling records named the "
                                         r"runtime, so its images may be int8 or fake-quant ones .*\(--data.init_args"
                                         r".overwrite true\)"):
        sample_run(world, out, 2, 1, "int")
    fp = tmp_path / "fp"
    cli.main(sampler_args(world, fp, "--data.init_args.num_images", "1"))
    record = json.loads((fp / "sampling.json").read_text())
    del record["identity"]["runtime"]
    (fp / "sampling.json").write_text(json.dumps(record))
    cli.main(sampler_args(world, fp, "--data.init_args.num_images", "2"))  # FP: unambiguous, resumed
    assert load_samples(fp)[1].tolist() == [0, 1]


def test_fake_quant_images_depend_on_the_batch_size_only(world, tmp_path):
    """Fake-quant bits depend on the size of the batch an image was sampled in: a partial last batch is padded to
    the batch size, so an image is the same wherever an interrupted run resumed; another batch size is refused."""
    whole, _ = sample_run(world, tmp_path / "whole", 4, 2, "fake")
    part = tmp_path / "part"
    sample_run(world, part, 1, 2, "fake")
    resumed, _ = sample_run(world, part, 3, 2, "fake")  # image 0 alone, then images 1, 2: batches [0], [1, 2]
    assert torch.equal(resumed, whole[:3])
    with pytest.raises(ValueError, match=r"\['batch_size'\] differ \(batch_size: folder 2, now 3\)"):
        sample_run(world, part, 4, 3, "fake")


def test_sampling_with_another_fp_checkpoint_than_the_calibrated_one_is_refused(world, tmp_path):
    torch.manual_seed(1)
    torch.save(Model(**TINY).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match=rf"{world['run']}: calibrated from the FP weights of {world['files'][1]} "
                                         rf"\(state-dict SHA-256 \w{{16}}...\), but checkpoint {tmp_path / 'other.pt'} "
                                         r"holds other weights"):
        MultiModelSampler(world["files"][0], str(tmp_path / "other.pt"), calibration_run=str(world["run"]),
                          num_steps=STEPS, real_source=None)


# --- run folders --------------------------------------------------------------------------------------------------

def edit_manifest(run, change):
    path = run / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    return path


def test_swapped_segment_files_are_refused_by_content(world, tmp_path):
    """Files swapped and their file hashes updated to match: the content hashes still tell."""
    run = copy_run(world, tmp_path)
    a, b = run / "segment_00/packed.pt", run / "segment_01/packed.pt"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)

    def rehash(m):
        for seg in m["segments"]:
            seg["sha256"]["packed"] = file_sha256(run / seg["packed"])

    manifest = edit_manifest(run, rehash)
    with pytest.raises(ValueError, match=rf"{a}: its contents are not segment 0's packed export that {manifest} "
                                         r"records \(content SHA-256 \w+, recorded \w+\): the file or the manifest "
                                         "was changed"):
        load_segment_models(run)


@pytest.mark.parametrize("where", ["../outside/packed.pt", "/tmp/packed.pt", "segment_01/packed.pt"])
def test_segment_paths_outside_their_folder_are_refused(world, tmp_path, where):
    run = copy_run(world, tmp_path)
    manifest = edit_manifest(run, lambda m: m["segments"][0].update(packed=where))
    with pytest.raises(ValueError, match=rf"{manifest}: segment 0's packed is '{where}'; it must be a file in the run "
                                         r"folder's segment_00/"):
        read_manifest(run)


def test_a_symlinked_segment_folder_leading_out_is_refused(world, tmp_path):
    run = copy_run(world, tmp_path)
    shutil.move(run / "segment_00", tmp_path / "elsewhere")
    (run / "segment_00").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=rf"{run / 'manifest.json'}: segment 0's packed {run}/segment_00/packed.pt "
                                         rf"leads outside the run folder \(to {tmp_path}/elsewhere/packed.pt\)"):
        load_segment_models(run)


@pytest.mark.parametrize("edit, message", [
    (lambda m: (m["segments"][0].update(steps=[0, 1]), m["segments"][1].update(steps=[1, 4])),
     r"segment 0 has t_range \[\d+, \d+\], but its steps \[0, 1\] of 4 quad steps run over t"),
    (lambda m: (m["segments"][0].update(steps=[2, 4]), m["segments"][1].update(steps=[0, 2])),
     r"segment 0 has steps \[2, 4\], but the segments must cover steps 0..3 in order \(segment 0 starts at step 0\)"),
    (lambda m: m["segments"][1].update(window=[1, 4]),
     r"segment 1 has calibration window \[1, 4\], which is not its steps \[2, 4\] widened by the overlap 0"),
])
def test_moved_cuts_and_swapped_entries_are_refused_naming_the_manifest(world, tmp_path, edit, message):
    run = copy_run(world, tmp_path)
    manifest = edit_manifest(run, edit)
    with pytest.raises(ValueError, match=f"{manifest}: {message}"):
        read_manifest(run)


# --- calibration runs ---------------------------------------------------------------------------------------------

def test_a_fit_stopped_early_fails_and_resumes(world, tmp_path, monkeypatch):
    """A stopped fit used to exit 0 without a manifest. The trainer stops it after the first item here, as
    trainer.max_time does when it runs out."""
    run, step = tmp_path / "run", SegmentCalibration.training_step

    def one_item(self, *args):
        step(self, *args)
        self.trainer.should_stop = True

    with monkeypatch.context() as patch:
        patch.setattr(SegmentCalibration, "training_step", one_item)
        with pytest.raises(RuntimeError, match=rf"{run}: calibration stopped by the trainer after 1/\d+ work items \(a "
                                               r"limit such as trainer.max_time, .*\), so no manifest was written; its "
                                               rf"state is saved in {run}/checkpoints/last.ckpt: continue with "
                                               "--ckpt_path last"):
            cli.main(fit_args(world["files"], run, world["calib"]))
    assert not (run / "manifest.json").exists()
    cli.main(fit_args(world["files"], run, world["calib"], "--ckpt_path", "last"))
    assert read_manifest(run)["k"] == 2


def test_a_fit_with_no_time_left_fails(world, tmp_path):
    """max_time already used up when the loop starts skips it (and on_train_end) altogether."""
    with pytest.raises(RuntimeError, match=r"after 0/\d+ work items .* no work item finished, so nothing was saved"):
        cli.main(fit_args(world["files"], tmp_path / "run", world["calib"], "--trainer.max_time", "00:00:00:00"))


def test_max_steps_is_refused_and_leaves_nothing(world, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"trainer.max_steps=3 cannot stop a calibration \(its work items are no "
                                         r"optimizer steps"):
        cli.main(fit_args(world["files"], run, world["calib"], "--trainer.max_steps", "3"))
    assert not run.exists() or not list(run.iterdir())


def test_an_explicit_damaged_checkpoint_is_named(world, tmp_path):
    run = copy_run(world, tmp_path)
    previous = run / "checkpoints" / "previous.ckpt"
    previous.write_bytes(b"PK\x03\x04 damaged")
    with pytest.raises(ValueError, match=rf"{previous}: cannot be read as a calibration checkpoint \(RuntimeError: "
                                         r"PytorchStreamReader failed .*\); the last checkpoint is kept: resume from "
                                         rf"it with --ckpt_path {run}/checkpoints/last.ckpt"):
        cli.main(fit_args(world["files"], run, world["calib"], "--ckpt_path", str(previous)))


def test_a_refused_resume_leaves_nothing_behind(world, tmp_path):
    run = copy_run(world, tmp_path)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with pytest.raises(ValueError, match=rf"{run}/checkpoints/last.ckpt: cannot resume: checkpoint was made with "
                                         r"different \['seed'\]"):
        cli.main(fit_args(world["files"], run, world["calib"], "--ckpt_path", "last", "--model.init_args.seed", "5"))
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_the_same_calibration_data_under_another_name_resume(world, tmp_path):
    """Also from a checkpoint that identified its calibration data by the file's bytes, as runs once did."""
    run = copy_run(world, tmp_path)
    renamed = tmp_path / "renamed.pt"
    torch.save(torch.load(world["calib"], weights_only=True), renamed)
    cli.main(fit_args(world["files"], run, renamed, "--ckpt_path", "last"))
    assert read_manifest(run)["calibration"]["sha256"] == calibration_sha256(world["calib"])
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["mmqdiff_calibration"]["signature"]["calibration_sha256"] = file_sha256(renamed)
    torch.save(ckpt, last)
    cli.main(fit_args(world["files"], run, renamed, "--ckpt_path", "last"))


# --- files --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("write", [lambda p: atomic_save({"a": torch.zeros(10000)}, p),
                                   lambda p: atomic_write_text(p, "x" * 10000)])
def test_a_full_disk_is_named(tmp_path, write):
    """torch.save onto a full disk said "[enforce fail ...] unexpected pos"; /dev/full fails every write with
    ENOSPC, as a full disk does."""
    target = tmp_path / "out.pt"
    (tmp_path / f".out.pt.tmp{os.getpid()}").symlink_to("/dev/full")
    with pytest.raises(OSError, match=rf"no space left on device: {target} \(No space left on device\)") as e:
        write(target)
    assert e.value.errno == errno.ENOSPC and not target.exists()


def test_temporaries_of_killed_writers_are_removed_by_the_next_write(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale, live = tmp_path / f".model.pt.tmp{int(dead.stdout)}", tmp_path / f".model.pt.tmp{os.getppid()}"
    stale.write_bytes(b"half a checkpoint")
    live.write_bytes(b"being written")
    with caplog.at_level(logging.WARNING, logger="mmqdiff.io"):
        atomic_save({"a": torch.zeros(2)}, tmp_path / "model.pt")
    assert not stale.exists() and live.exists()
    assert f"{stale}: removed a temporary file left by process {int(dead.stdout)}, which no longer runs" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "model.pt"]


def test_calibration_data_generation_refuses_implausible_trajectories(tiny_files, tmp_path):
    """Finite weights whose trajectories leave any plausible range: the file is not written."""
    sd = torch.load(tiny_files[1], weights_only=True)
    sd["conv_out.weight"] *= 1e12
    torch.save(sd, tmp_path / "big.pt")
    path = tmp_path / "gen.pt"
    with pytest.raises(ValueError, match=rf"{path}: not written: trajectory 0 (reaches \|x\| = \S+, beyond the 100 "
                                         r"that DDIM states stay within|holds non-finite values) \(first at step index "
                                         r"[1-3]\); the FP model diverges"):
        cli.main(["predict", "--config", str(ROOT / "configs/embedded/gen_calib.yaml"), "--trainer.accelerator", "cpu",
                  "--trainer.devices", "1", "--model.init_args.config", tiny_files[0],
                  "--model.init_args.checkpoint", str(tmp_path / "big.pt"), "--model.init_args.num_steps", str(STEPS),
                  "--data.init_args.num_trajectories", "2", "--trainer.default_root_dir", str(tmp_path),
                  "--trainer.callbacks.init_args.path", str(path)])
    assert not path.exists()

"""K-model switching in the sampler, and the resumable sampling predict."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import lightning as L
import pytest
import torch
import yaml

from mmqdiff.data import timestep_segments
from mmqdiff.diffusion import Model, ddim_sample, linear_betas, timesteps
from mmqdiff.io import write_png
from mmqdiff.lightning.predict import MultiModelSampler, SampleIndices, SampleWriter, load_samples
from mmqdiff.segments import SegmentedModel

from .conftest import ROOT, TINY, foreign_lock


class Recorder(torch.nn.Module):
    """Returns zeros and records the timesteps it was called with."""

    def __init__(self):
        super().__init__()
        self.calls: list[float] = []

    def forward(self, x, t):
        self.calls.append(float(t[0]))
        return torch.zeros_like(x)


def test_each_step_uses_the_model_of_its_segment():
    seq = timesteps(10, "quad")
    segments = timestep_segments(10, 3)
    models = [Recorder() for _ in segments]
    ddim_sample(SegmentedModel(segments, models, seq).model_for_step, torch.randn(1, 3, 8, 8), seq, linear_betas())
    t_by_step = list(reversed(seq))
    for model, seg in zip(models, segments):
        assert model.calls == [float(t_by_step[i]) for i in seg]


def test_switch_rejects_model_count_mismatch():
    with pytest.raises(ValueError, match="2 models for 3 segments"):
        SegmentedModel(timestep_segments(3, 3), [Recorder(), Recorder()], timesteps(3, "quad"))


def _write_tiny(tmp_path, tiny_model):
    torch.save(tiny_model.state_dict(), tmp_path / "tiny.pt")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({"model": TINY}))


def _sample(tmp_path, out, num_images, batch_size=1, checkpoint="tiny.pt", overwrite=False, **settings):
    sampler = MultiModelSampler(str(tmp_path / "tiny.yaml"), str(tmp_path / checkpoint),
                                **{"num_steps": 4, **settings}, real_source=None)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        callbacks=[SampleWriter()], default_root_dir=out)
    data = SampleIndices(num_images, batch_size, str(out), **({"overwrite": True} if overwrite else {}))
    trainer.predict(sampler, datamodule=data, return_predictions=False)


def test_interrupted_sampling_resumes_without_duplicates(tmp_path, tiny_model):
    _write_tiny(tmp_path, tiny_model)
    _sample(tmp_path, tmp_path / "full", 5)
    # an "interrupted" run: only some images written, one of them from the middle
    _sample(tmp_path, tmp_path / "part", 3)
    (tmp_path / "part/images/000001.png").unlink()
    written_before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "part/images").glob("*.png")}
    _sample(tmp_path, tmp_path / "part", 5)
    after = sorted(p.name for p in (tmp_path / "part/images").glob("*.png"))
    assert after == [f"{j:06d}.png" for j in range(5)]
    for name, mtime in written_before.items():  # existing images were not sampled again
        assert (tmp_path / "part/images" / name).stat().st_mtime_ns == mtime
    full, full_idx = load_samples(tmp_path / "full")
    part, part_idx = load_samples(tmp_path / "part")
    # noise depends only on (seed, index); batch size 1 keeps the arithmetic identical too
    assert torch.equal(full_idx, part_idx) and torch.equal(full, part)
    assert (tmp_path / "full/grid.png").is_file()


def _pngs(folder):
    return {p.name: p.read_bytes() for p in sorted((folder / "images").glob("*.png"))}


@pytest.mark.parametrize("change, key, shown", [
    ({"seed": 7}, "seed", "folder 1234, now 7"), ({"eta": 0.5}, "eta", "folder 0.0, now 0.5"),
    ({"num_steps": 3}, "num_steps", "folder 4, now 3"), ({"skip_type": "uniform"}, "skip_type", 'folder "quad"'),
    ({"checkpoint": "other.pt"}, "fp_model", "folder \"[0-9a-f]{20}"),
])
def test_resume_with_other_settings_is_refused_naming_them(tmp_path, tiny_model, change, key, shown):
    _write_tiny(tmp_path, tiny_model)
    torch.manual_seed(1)
    torch.save(Model(**TINY).state_dict(), tmp_path / "other.pt")  # other weights
    out = tmp_path / "out"
    _sample(tmp_path, out, 2)
    before = _pngs(out)
    with pytest.raises(ValueError, match=rf"{out} holds images sampled with other settings: \['{key}'\] "
                                                   rf"differ \({key}: {shown}.*--data.init_args.overwrite true"):
        _sample(tmp_path, out, 3, **change)
    assert _pngs(out) == before  # nothing added, nothing relabelled
    assert json.loads((out / "sampling.json").read_text())["identity"]["seed"] == 1234


def test_same_weights_in_another_file_format_resume(tmp_path, tiny_model):
    _write_tiny(tmp_path, tiny_model)
    torch.save({"state_dict": {f"model.{k}": v for k, v in tiny_model.state_dict().items()}}, tmp_path / "tiny.ckpt")
    _sample(tmp_path, tmp_path / "full", 3)
    _sample(tmp_path, tmp_path / "part", 2)
    _sample(tmp_path, tmp_path / "part", 3, checkpoint="tiny.ckpt")
    assert torch.equal(load_samples(tmp_path / "part")[0], load_samples(tmp_path / "full")[0])


def test_overwrite_deletes_images_of_other_settings_and_samples_anew(tmp_path, tiny_model):
    _write_tiny(tmp_path, tiny_model)
    _sample(tmp_path, tmp_path / "fresh", 2, seed=7)
    out = tmp_path / "out"
    _sample(tmp_path, out, 3)
    _sample(tmp_path, out, 2, seed=7, overwrite=True)
    assert _pngs(out) == _pngs(tmp_path / "fresh")  # image 2 of the old settings is gone too
    assert json.loads((out / "sampling.json").read_text())["identity"]["seed"] == 7


def test_images_without_a_record_are_refused(tmp_path, tiny_model):
    _write_tiny(tmp_path, tiny_model)
    out = tmp_path / "out"
    write_png(out / "images" / "000000.png", torch.zeros(3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="holds images but no sampling.json"):
        _sample(tmp_path, out, 2)


def test_damaged_images_are_sampled_again(tmp_path, tiny_model, caplog):
    _write_tiny(tmp_path, tiny_model)
    _sample(tmp_path, tmp_path / "full", 4)
    out = tmp_path / "part"
    _sample(tmp_path, out, 4)
    images = out / "images"
    (images / "000000.png").write_bytes(b"")
    (images / "000001.png").write_bytes((images / "000001.png").read_bytes()[:60])
    write_png(images / "000002.png", torch.zeros(3, 4, 4, dtype=torch.uint8))  # wrong size
    kept = (images / "000003.png").stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="mmqdiff.evaluation.sample_folder"):
        _sample(tmp_path, out, 4)
    for j, why in ((0, "not a readable image"), (1, "not a readable image"), (2, "PNG RGB 4x4, expected PNG RGB 8x8")):
        assert f"{images / f'00000{j}.png'}: {why}" in caplog.text
    assert (images / "000003.png").stat().st_mtime_ns == kept
    assert torch.equal(load_samples(out)[0], load_samples(tmp_path / "full")[0])


def test_fp_reference_from_other_noise_is_refused(tmp_path, tiny_model):
    _write_tiny(tmp_path, tiny_model)
    _sample(tmp_path, tmp_path / "fp", 2)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'fp'} cannot be the FP reference for PSNR: \['seed'\] differ "
                                         r"\(seed: FP folder 1234, here 7\)"):
        _sample(tmp_path, tmp_path / "other", 2, seed=7, fp_samples=str(tmp_path / "fp"))
    assert not (tmp_path / "other" / "images").exists()
    _sample(tmp_path, tmp_path / "other", 2, fp_samples=str(tmp_path / "fp"))  # same noise; no image to protect
    assert torch.equal(load_samples(tmp_path / "other")[0], load_samples(tmp_path / "fp")[0])


def test_locked_output_folder_is_refused(tmp_path, tiny_model):
    _write_tiny(tmp_path, tiny_model)
    out = tmp_path / "out"
    with foreign_lock(out / "mmqdiff.lock"):
        with pytest.raises(RuntimeError, match=f"sampling output folder {out} is in use by pid 4242 on host "
                                               "elsewhere"):
            _sample(tmp_path, out, 2)
    assert not (out / "images").exists()
    _sample(tmp_path, out, 2)  # the refused run took nothing with it
    assert len(_pngs(out)) == 2 and not (out / "mmqdiff.lock").exists()


@pytest.mark.slow
def test_two_processes_write_every_index_once(tmp_path, tiny_model):
    """DDP predict on 2 CPU processes: indices split by rank, none padded, duplicated or dropped."""
    _write_tiny(tmp_path, tiny_model)
    _sample(tmp_path, tmp_path / "one", 5)
    out = tmp_path / "two"
    subprocess.run([sys.executable, str(ROOT / "cli.py"), "predict", "--config", str(ROOT / "configs/embedded/sample.yaml"),
                    "--model.init_args.config", str(tmp_path / "tiny.yaml"),
                    "--model.init_args.checkpoint", str(tmp_path / "tiny.pt"), "--model.init_args.num_steps", "4",
                    "--model.init_args.real_source", "null", "--data.init_args.num_images", "5",
                    "--data.init_args.batch_size", "1", "--data.init_args.output_dir", str(out),
                    "--trainer.default_root_dir", str(out), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                    "--trainer.strategy", "ddp"], check=True, cwd=ROOT)
    assert sorted(p.name for p in (out / "images").glob("*.png")) == [f"{j:06d}.png" for j in range(5)]
    one, _ = load_samples(tmp_path / "one")
    two, indices = load_samples(out)
    assert indices.tolist() == list(range(5)) and torch.equal(one, two)


@pytest.mark.slow
def test_two_processes_sample_and_score(tmp_path):
    """Scoring after 2-process sampling: rank 0 scores every image alone (the metrics must not wait for rank 1,
    which once crashed the run in torchmetrics' cross-process sync)."""
    out = tmp_path / "two"
    subprocess.run([sys.executable, str(ROOT / "cli.py"), "predict", "--config", str(ROOT / "configs/embedded/sample.yaml"),
                    "--model.init_args.num_steps", "4", "--model.init_args.num_real", "64",
                    "--model.init_args.kid_subset_size", "8", "--model.init_args.score_chunks", "2",
                    "--model.init_args.fp_error_images", "0", "--model.init_args.metric_cache", str(tmp_path / "cache"),
                    "--data.init_args.num_images", "16", "--data.init_args.batch_size", "4",
                    "--data.init_args.output_dir", str(out), "--trainer.default_root_dir", str(out),
                    "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"],
                   check=True, cwd=ROOT)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 16 and len(metrics["fid_chunks"]) == 2 and metrics["fid"] > 0

"""K-model switching in the sampler, and the resumable sampling predict."""
from __future__ import annotations

import subprocess
import sys

import lightning as L
import pytest
import torch
import yaml

from mmqdiff.data import segment_of_step, timestep_segments
from mmqdiff.diffusion import ddim_sample, linear_betas, segment_switch, timesteps
from mmqdiff.lightning.predict import MultiModelSampler, SampleIndices, SampleWriter, load_samples

from .conftest import ROOT, TINY


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
    ddim_sample(segment_switch(models, segment_of_step(segments)), torch.randn(1, 3, 8, 8), seq, linear_betas())
    t_by_step = list(reversed(seq))
    for model, seg in zip(models, segments):
        assert model.calls == [float(t_by_step[i]) for i in seg]


def test_switch_rejects_model_count_mismatch():
    with pytest.raises(ValueError, match="2 models for 3 segments"):
        segment_switch([Recorder(), Recorder()], [0, 1, 2])


def _write_tiny(tmp_path, tiny_model):
    torch.save(tiny_model.state_dict(), tmp_path / "tiny.pt")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({"model": TINY}))


def _sample(tmp_path, out, num_images, batch_size=1):
    sampler = MultiModelSampler(str(tmp_path / "tiny.yaml"), str(tmp_path / "tiny.pt"), num_steps=4,
                                real_source=None)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        callbacks=[SampleWriter()], default_root_dir=out)
    trainer.predict(sampler, datamodule=SampleIndices(num_images, batch_size, str(out)), return_predictions=False)


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

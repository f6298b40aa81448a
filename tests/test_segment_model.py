"""SegmentedModel: switching by timestep, calibration in plain Python equal to ``cli.py fit`` bit for bit, save/load,
``cli.py predict`` on a folder saved from Python, the runtime policy, and run folders written before it existed."""
from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from torch import nn

import cli
from mmqdiff.data import record_trajectories, save_calibration, timestep_segments
from mmqdiff.diffusion import IndexedNoise, Model, ddim_sample, linear_betas, timesteps
from mmqdiff.evaluation.real_images import to_uint8
from mmqdiff.lightning.predict import load_samples
from mmqdiff.quant import QuantConfig, ReconSettings, quantize_model, to_integer
from mmqdiff.quant.runtime import resolve_runtime
from mmqdiff.segments import SegmentedModel
from mmqdiff.segments.run_folder import read_manifest

from .conftest import ROOT
from .test_calibrate import NUM_STEPS, fit
from .test_integer import needs_onednn

LEGACY = ROOT / "tests/data/run_folder_0fd39a2"
MICRO = dict(ch=32, out_ch=3, ch_mult=[1], num_res_blocks=0, attn_resolutions=[], dropout=0.0, in_channels=3,
             resolution=4, resamp_with_conv=True)  # 8 units (attention and a split shortcut among them)


class Const(nn.Module):
    """Answers ``value`` everywhere: shows which segment a row went to."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, self.value)


def test_forward_sends_each_row_to_the_segment_of_its_timestep():
    seq = timesteps(10, "quad")
    model = SegmentedModel(timestep_segments(10, 3), [Const(s) for s in range(3)], seq)
    assert model.k == 3 and model.segments == [range(0, 4), range(4, 7), range(7, 10)]
    t = torch.tensor([float(v) for v in reversed(seq)])[[9, 0, 5, 3, 7]]  # steps 9, 0, 5, 3, 7
    assert model(torch.zeros(5, 1, 2, 2), t)[:, 0, 0, 0].tolist() == [2, 0, 1, 0, 2]
    assert [model.model_for_step(i).value for i in range(10)] == [0] * 4 + [1] * 3 + [2] * 3


def test_switching_by_timestep_equals_the_per_step_model(tiny_model):
    seq = timesteps(10, "quad")
    models = [quantize_model(tiny_model, QuantConfig(weight_bits=b)).eval() for b in (2, 4, 8)]
    model = SegmentedModel(timestep_segments(10, 3), models, seq)
    assert model.runtime == "fake"
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    by_step = ddim_sample(model.model_for_step, x_T, seq, linear_betas())
    by_t = ddim_sample(lambda i: model, x_T, seq, linear_betas())
    assert torch.equal(by_step, by_t)
    assert not torch.equal(by_step, ddim_sample(lambda i: models[1], x_T, seq, linear_betas()))


def test_timesteps_and_steps_outside_the_schedule_are_refused():
    model = SegmentedModel(timestep_segments(10, 2), [Const(0), Const(1)], timesteps(10, "quad"))
    x = torch.zeros(2, 1, 2, 2)
    for bad in (123.0, 800.5):
        with pytest.raises(ValueError, match=rf"timestep {bad:g} is not in the sampling schedule \(10 steps, t from "
                                             r"800 down to 0\)"):
            model(x, torch.tensor([800.0, bad]))
    with pytest.raises(ValueError, match=r"t must hold one timestep per row of x \(2 rows\), got shape \(1,\)"):
        model(x, torch.tensor([800.0]))
    for i in (10, -1):
        with pytest.raises(IndexError, match=rf"step index {i} outside \[0, 9\] \(10 sampling steps\)"):
            model.model_for_step(i)
    with pytest.raises(ValueError, match="2 models for 3 segments"):
        SegmentedModel(timestep_segments(10, 3), [Const(0), Const(1)], timesteps(10, "quad"))
    # 100 quad steps sample t=0 at several steps; a cut between them leaves only the step index to decide
    seq = timesteps(100, "quad")
    zeros = [i for i, t in enumerate(reversed(seq)) if t == 0]
    model = SegmentedModel(timestep_segments(100, 2, [zeros[-1]]), [Const(0), Const(1)], seq)
    with pytest.raises(ValueError, match=rf"timestep 0 is sampled at steps {re.escape(str(zeros))}, which lie in segments \[0, 1\]: "
                                         r"pick the model by step index with model_for_step\(i\)"):
        model(x, torch.zeros(2))


def test_runtime_policy():
    assert resolve_runtime("auto", "cpu") == "int" and resolve_runtime("auto", torch.device("cuda", 0)) == "fake"
    assert resolve_runtime("int", "cuda") == "int" and resolve_runtime("fake", "cpu") == "fake"
    with pytest.raises(ValueError, match=r"runtime must be one of \('auto', 'int', 'fake'\), got 'int4'"):
        resolve_runtime("int4", "cpu")


def test_for_device_falls_back_to_fake_quant_and_says_why(tiny_model):
    weights_only = quantize_model(tiny_model, QuantConfig(quant_act=False)).eval()
    model = SegmentedModel([range(4)], [weights_only], timesteps(4))
    assert model.for_device("cpu", "fake") is model
    with pytest.warns(UserWarning, match="runtime 'fake' instead of 'int': .*activation quantization"):
        assert model.for_device("cpu", "auto") is model
    fp = SegmentedModel([range(4)], [tiny_model], timesteps(4))
    assert fp.runtime == "fp" and fp.for_device("cpu") is fp
    with pytest.raises(TypeError, match="to_integer converts fake-quant segment models; these are on the 'fp'"):
        fp.to_integer()


# -- calibration in Python against cli.py fit ------------------------------------------------------------------------

ITERS = ["2", "1"]  # weight / activation iterations per unit


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A micro UNet and a calibration file of 8 of its DDIM trajectories over 10 quad steps (``test_calibrate``'s
    world, small enough that a K=2 calibration takes a second)."""
    d = tmp_path_factory.mktemp("micro")
    torch.manual_seed(0)
    model = Model(**MICRO).eval()
    torch.save(model.state_dict(), d / "micro.pt")
    (d / "micro.yaml").write_text(yaml.safe_dump({"model": MICRO}))
    with torch.no_grad():
        xs, ts = record_trajectories(model, range(8), 0, timesteps(NUM_STEPS, "quad"), linear_betas(), 0.0, (3, 4, 4))
    meta = {"num_steps": NUM_STEPS, "skip_type": "quad"}
    save_calibration(d / "calib.pt", xs, ts, meta)
    return {"config": d / "micro.yaml", "checkpoint": d / "micro.pt", "calibration": d / "calib.pt", "xs": xs,
            "ts": ts, "meta": meta, "model": model}


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    """A K=1 base calibrated and saved from Python, then a warm-started K=2 run with per-segment budgets twice: by
    ``cli.py fit`` and by ``SegmentedModel.calibrate`` with the module's settings."""
    d = tmp_path_factory.mktemp("segment_model")
    fp = world["model"]
    base = SegmentedModel.calibrate(fp, QuantConfig(), world["calibration"], ReconSettings(cali_iters=1, cali_iters_a=1),
                                    cali_st=2, cali_n=6, model_config=world["config"], checkpoint=world["checkpoint"])
    base.save(d / "base")
    extra = ["--model.init_args.init_from", str(d / "base"), "--model.init_args.segment_scale", "[1.5, 0.5]"]
    module = fit(world, d / "cli", iters=ITERS[0], iters_a=ITERS[1], extra=extra).model
    model = SegmentedModel.calibrate(fp, module.quant, world["calibration"], module.recon, cali_st=2, cali_n=6, k=2,
                                     segment_scale=[1.5, 0.5], init_from=d / "base", warm=module.warm,
                                     model_config=world["config"], checkpoint=world["checkpoint"])
    model.save(d / "python")
    return {"dir": d, "model": model}


def test_python_calibration_saves_the_cli_runs_folder_bit_for_bit(runs):
    cli_m, py_m = read_manifest(runs["dir"] / "cli"), read_manifest(runs["dir"] / "python")
    legacy = json.loads((LEGACY / "manifest.json").read_text())
    assert set(py_m) == set(cli_m) == set(legacy)
    assert [set(s) for s in py_m["segments"]] == [set(s) for s in cli_m["segments"]] == \
        [set(s) for s in legacy["segments"]]
    for key in ("k", "num_steps", "skip_type", "weight_bits", "act_bits", "quant_config", "reconstruction", "seed",
                "segment_scale", "init_from", "units", "fp_model", "calibration", "model_bytes", "world_size"):
        assert py_m[key] == cli_m[key], key
    assert py_m["init_from"]["path"] == str(runs["dir"] / "base") and py_m["segment_scale"] == [1.5, 0.5]
    for a, b in zip(py_m["segments"], cli_m["segments"]):
        for key in ("index", "steps", "iters", "t_range", "window", "pairs", "calib_t_range", "content_sha256",
                    "model_bytes", "quant_state", "packed"):
            assert a[key] == b[key], key
        assert [(u["unit"], u["phase"]) for u in a["units"]] == [(u["unit"], u["phase"]) for u in b["units"]]
    assert [s["iters"] for s in py_m["segments"]] == [[3, 2], [1, 1]]


def test_save_load_round_trip_is_bit_identical(world, runs, tmp_path):
    model, folder = runs["model"], runs["dir"] / "python"
    loaded = SegmentedModel.load(folder, world["model"])
    assert loaded.segments == model.segments and loaded.seq == model.seq == timesteps(NUM_STEPS, "quad")
    assert loaded.manifest == read_manifest(folder) and loaded.runtime == "fake"
    x = world["xs"][3, :4]
    with torch.no_grad():
        for t in reversed(model.seq):
            t = torch.full((4,), float(t))
            assert torch.equal(loaded(x, t), model(x, t))
        assert torch.equal(SegmentedModel.load(folder)(x, t), model(x, t))  # architecture from the manifest
    with pytest.raises(ValueError, match="was loaded from a run folder, which is its saved form"):
        loaded.save(tmp_path / "again")
    with pytest.raises(FileExistsError, match=f"{folder} holds a previous run"):
        model.save(folder)


@needs_onednn
def test_to_integer_equals_the_integer_runtime_of_each_segment(world, runs):
    model = runs["model"]
    integer = model.to_integer()
    assert integer.runtime == "int" and integer.segments == model.segments and model.runtime == "fake"
    assert model.for_device("cpu").runtime == "int"  # auto on a CPU
    x = world["xs"][3, :4]
    with torch.inference_mode():
        for step in (0, 9, 4, 5):
            t = torch.full((4,), float(model.seq[-1 - step]))
            assert torch.equal(integer(x, t), to_integer(model.model_for_step(step))(x, t))
    with pytest.raises(ValueError, match="is on the 'int' runtime"):
        integer.save(runs["dir"] / "int")


def test_cli_predict_samples_a_folder_saved_from_python(world, runs, tmp_path):
    out = tmp_path / "samples"
    cli.main(["predict", "--config", str(ROOT / "configs/embedded/sample.yaml"),
              "--model.init_args.calibration_run", str(runs["dir"] / "python"),
              "--model.init_args.config", str(world["config"]), "--model.init_args.checkpoint", str(world["checkpoint"]),
              "--model.init_args.num_steps", str(NUM_STEPS), "--model.init_args.real_source", "null",
              "--model.init_args.fp_error_images", "0", "--data.init_args.num_images", "2",
              "--data.init_args.batch_size", "2", "--data.init_args.output_dir", str(out),
              "--trainer.default_root_dir", str(out), "--trainer.accelerator", "cpu"])
    model = runs["model"].for_device("cpu")  # the runtime the CLI's "auto" picks here
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["runtime"] == model.runtime and metrics["num_images"] == 2
    with torch.inference_mode():
        x = ddim_sample(model.model_for_step, IndexedNoise(1234, [0, 1], (3, 4, 4))(), model.seq, linear_betas())
    assert torch.equal(load_samples(out)[0], to_uint8(x))


def test_run_folder_written_before_the_segment_model_still_loads():
    """``LEGACY``: ``cli.py fit`` at commit 0fd39a2 (K=2, 6 quad steps) on a micro UNet (ch 32, ch_mult [1], no
    res blocks, 4x4), its packed exports and manifest (the quant states, which loading never reads, left out for
    size), plus that commit's ``load_segment_models`` outputs on a fixed input."""
    expected = torch.load(LEGACY / "expected.pt", weights_only=True)
    model = SegmentedModel.load(LEGACY)
    assert model.segments == [range(0, 3), range(3, 6)] and model.seq == timesteps(6, "quad")
    assert model.manifest["k"] == 2 and model.runtime == "fake"
    with torch.no_grad():
        for s in range(2):
            assert torch.equal(model.models[s](expected["x"], expected["t"]), expected["outputs"][s])
        by_t = model(expected["x"], expected["t"])  # t = 800 (segment 0), 0 (segment 1), one row each
    assert torch.allclose(by_t, torch.stack([expected["outputs"][0][0], expected["outputs"][1][1]]), atol=1e-6)

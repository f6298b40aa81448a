"""segment_scope "activations": every segment keeps a finished K=1 run's weight rounding bit for bit and calibrates
only its activation step sizes on its own pairs. The Python API and ``cli.py fit`` give the same bits (also after an
interruption), the run folder stores the shared weights once, the integer runtime holds one weight code set, ``cli.py
predict`` samples the folder, and the compute accounting counts the K=1 run plus K activation phases."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

import cli
from mmqdiff.data import load_calibration, timestep_segments
from mmqdiff.diffusion import IndexedNoise, ddim_sample, linear_betas
from mmqdiff.evaluation.real_images import to_uint8
from mmqdiff.lightning.calibrate import SegmentCalibration
from mmqdiff.lightning.predict import load_samples
from mmqdiff.pipeline.identity import Inputs
from mmqdiff.pipeline.config import ConfigError
from mmqdiff.quant import (IntegerSegments, QuantConfig, ReconSettings, WarmStart, act_quantizers, calibrate,
                           load_quant_state, quant_layers, quant_state_dict, quantize_model, to_integer)
from mmqdiff.quant.export import split_activations
from mmqdiff.quant.reconstruction import calibrate_item, item_seed
from mmqdiff.segments import SegmentedModel
from mmqdiff.segments.run_folder import (calibration_compute, damaged_segments, load_segment_models, read_manifest,
                                         reexport_segments, run_identity, warm_start_state)

from .conftest import ROOT
from .test_calibrate import NUM_STEPS, fit, tensors_equal
from .test_integer import (check_divergence_only_at_rounding_ties, embedded, embedded_quantized,  # noqa: F401
                           inputs, needs_onednn, trajectories)
from .test_pipeline import CALIB, main_config
from .test_pipeline_config import plan_of
from .test_segment_model import world  # noqa: F401 (fixture: a micro UNet and its calibration file)

SCALE = [1.5, 0.5]
ACTIVATIONS = ["--model.init_args.segment_scope", "activations", "--model.init_args.segment_scale", str(SCALE)]


def files(run_dir) -> dict:
    """Every ``.pt`` file of a run folder (contents: torch.save files differ byte-wise run to run)."""
    return {p.relative_to(run_dir).as_posix(): torch.load(p, weights_only=True) for p in sorted(run_dir.rglob("*.pt"))
            if p.parts[-2] != "checkpoints"}


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):  # noqa: F811
    """A K=1 base saved from Python, then K=2 activations-only runs started from it: by ``cli.py fit`` and by
    ``SegmentedModel.calibrate`` with the fit's settings (``recon`` 3/2 iterations: the weight ones are unused)."""
    d = tmp_path_factory.mktemp("scope")
    fp = world["model"]
    base = SegmentedModel.calibrate(fp, QuantConfig(), world["calibration"],
                                    ReconSettings(cali_iters=2, cali_iters_a=1), cali_st=2, cali_n=6,
                                    model_config=world["config"], checkpoint=world["checkpoint"])
    base.save(d / "base")
    module = fit(world, d / "cli", iters=3, iters_a=2,
                 extra=["--model.init_args.init_from", str(d / "base"), *ACTIVATIONS]).model
    model = SegmentedModel.calibrate(fp, module.quant, world["calibration"], module.recon, cali_st=2, cali_n=6, k=2,
                                     segment_scale=SCALE, init_from=d / "base", segment_scope="activations",
                                     model_config=world["config"], checkpoint=world["checkpoint"])
    model.save(d / "python")
    return {"dir": d, "base": base, "model": model, "module": module}


def test_every_segment_keeps_the_k1_weights_bit_for_bit(runs):
    base = runs["base"].models[0]
    base_state = quant_state_dict(base)
    for q in runs["model"].models:
        mine, theirs = split_activations(q, quant_state_dict(q))[0], split_activations(q, base_state)[0]
        assert tensors_equal(mine, theirs)
        for layer, base_layer in zip(quant_layers(q), quant_layers(base)):
            assert torch.equal(layer.quant_weight(), base_layer.quant_weight())


def test_activation_steps_are_each_segments_own_and_equal_a_direct_computation(world, runs):  # noqa: F811
    """Per segment: the K=1 quant state, then every unit's activation phase on the segment's pairs (the first with
    the activation init), seeded as any calibration item; the step sizes differ between segments and from K=1's."""
    module, model = runs["module"], runs["model"]
    base_state = quant_state_dict(runs["base"].models[0])
    deltas = []
    for s, steps in enumerate(model.segments):
        direct = quantize_model(world["model"], module.quant).eval()
        load_quant_state(direct, base_state)
        xs, ts = load_calibration(world["calibration"], cali_st=2, cali_n=6, steps=steps)
        recon = module.segment_recon(s)
        for u in range(len(direct.unit_names)):
            calibrate_item(direct, world["model"], xs, ts, u, "act", recon, item_seed(1234, s, u, "act"))
        assert tensors_equal(quant_state_dict(direct), quant_state_dict(model.models[s]))
        deltas.append(torch.stack([q.delta.detach() for q in act_quantizers(model.models[s])]))
    base_deltas = torch.stack([q.delta.detach() for q in act_quantizers(runs["base"].models[0])])
    assert not torch.equal(deltas[0], deltas[1]) and not torch.equal(deltas[0], base_deltas)
    assert (deltas[0] != deltas[1]).float().mean() > 0.5  # most quantizers, not a stray one


def test_manifest_records_the_scope_and_counts_the_k1_run_plus_the_activation_phases(runs):
    m, base = read_manifest(runs["dir"] / "python"), read_manifest(runs["dir"] / "base")
    assert m["segment_scope"] == "activations" and "segment_scope" not in base
    assert [s["iters"] for s in m["segments"]] == [[0, 3], [0, 1]]  # cali_iters_a 2 scaled by [1.5, 0.5]
    assert m["init_from"]["warm"] is None and m["init_from"]["compute"] == calibration_compute(base) == [2, 1]
    assert calibration_compute(m) == [2, 1 + 3 + 1]
    assert [(u["unit"], u["phase"]) for u in m["segments"][0]["units"]] == [(n, "act") for n in m["units"]]


def test_python_api_and_lightning_fit_give_the_same_bits(runs):
    py, cl = read_manifest(runs["dir"] / "python"), read_manifest(runs["dir"] / "cli")
    for key in ("k", "segment_scope", "quant_config", "reconstruction", "seed", "segment_scale", "init_from",
                "units", "calibration", "model_bytes", "shared"):
        want = {k: v for k, v in py[key].items() if k != "sha256"} if key == "shared" else py[key]
        have = {k: v for k, v in cl[key].items() if k != "sha256"} if key == "shared" else cl[key]
        assert (have if key != "init_from" else {**have, "path": None}) == \
            (want if key != "init_from" else {**want, "path": None}), key
    assert [s["iters"] for s in py["segments"]] == [s["iters"] for s in cl["segments"]]
    assert [s["content_sha256"] for s in py["segments"]] == [s["content_sha256"] for s in cl["segments"]]
    a, b = files(runs["dir"] / "python"), files(runs["dir"] / "cli")
    assert a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    assert run_identity(py) == run_identity(cl)


def test_the_shared_weights_are_stored_once(world, runs):  # noqa: F811
    """``shared/`` holds the K=1 export without its activation quantizers; each segment's files hold only those."""
    folder, base_dir = runs["dir"] / "python", runs["dir"] / "base"
    m, base = read_manifest(folder), read_manifest(base_dir)
    q = runs["model"].models[0]
    stored = files(folder)
    assert sorted(stored) == ["segment_00/packed.pt", "segment_00/quant_state.pt", "segment_01/packed.pt",
                              "segment_01/quant_state.pt", "shared/packed.pt", "shared/quant_state.pt"]
    base_packed = torch.load(base_dir / base["segments"][0]["packed"], weights_only=True)
    weights, activations = split_activations(q, base_packed)
    assert tensors_equal(stored["shared/packed.pt"], weights)
    for s in range(2):
        own = stored[f"segment_{s:02d}/packed.pt"]
        assert own.keys() == activations.keys() == stored[f"segment_{s:02d}/quant_state.pt"].keys()
        assert not split_activations(q, own)[0]  # nothing but activation quantizers
    act_bytes = m["segments"][0]["model_bytes"]
    assert m["shared"]["model_bytes"] + act_bytes == base["model_bytes"]
    assert m["model_bytes"] == base["model_bytes"] + act_bytes  # K=2: one model plus a second activation set
    assert act_bytes < 0.01 * m["shared"]["model_bytes"]


def test_save_load_round_trip_and_damaged_shared_weights(world, runs, tmp_path):  # noqa: F811
    model, folder = runs["model"], runs["dir"] / "python"
    loaded = SegmentedModel.load(folder, world["model"])
    assert loaded.segments == model.segments and loaded.manifest["segment_scope"] == "activations"
    x = world["xs"][3, :4]
    with torch.no_grad():
        for t in reversed(model.seq):
            t = torch.full((4,), float(t))
            assert torch.equal(loaded(x, t), model(x, t))
    copy_dir = tmp_path / "copy"
    shutil.copytree(folder, copy_dir)
    shared = copy_dir / "shared" / "packed.pt"
    shared.write_bytes(shared.read_bytes()[:-10])
    assert sorted(damaged_segments(copy_dir)) == [0, 1]  # every segment loads the shared weights
    with pytest.raises(ValueError, match=r"shared/packed.pt: SHA-256 .* differs from the manifest"):
        load_segment_models(copy_dir)
    shared.unlink()
    with pytest.raises(FileNotFoundError, match=r"the shared weights: packed export .*shared/packed.pt is missing"):
        load_segment_models(copy_dir)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shared"]["packed"] = "segment_00/packed.pt"
    (copy_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"the shared packed is 'segment_00/packed.pt'; it must be a file in the run "
                                         r"folder's shared/"):
        read_manifest(copy_dir)
    del manifest["shared"]
    (copy_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"segment_scope 'activations' needs a 'shared' entry"):
        read_manifest(copy_dir)


def test_damaged_files_are_re_exported_from_the_runs_checkpoint(runs, tmp_path):
    """The shared weights and a segment's activations come back from ``checkpoints/last.ckpt`` as calibrated."""
    run_dir = tmp_path / "copy"
    shutil.copytree(runs["dir"] / "cli", run_dir)
    (run_dir / "shared" / "packed.pt").unlink()
    (run_dir / "segment_01" / "quant_state.pt").write_bytes(b"damaged")
    damaged = damaged_segments(run_dir)
    assert sorted(damaged) == [0, 1] and len(damaged[1]) == 2
    reexport_segments(run_dir, sorted(damaged))
    assert damaged_segments(run_dir) == {}
    a, b = files(run_dir), files(runs["dir"] / "cli")
    assert a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)


class Interrupted(RuntimeError):
    """Stands in for a process killed in the middle of a work item."""


def test_interrupted_fit_resumes_with_the_same_bits(world, runs, tmp_path, monkeypatch):  # noqa: F811
    run_dir = tmp_path / "run"
    extra = ["--model.init_args.init_from", str(runs["dir"] / "base"), *ACTIVATIONS]
    original = SegmentCalibration._run_item

    def stop_at_item_3(self, s, xs, ts):
        if self.next_item == 3:
            raise Interrupted
        return original(self, s, xs, ts)

    monkeypatch.setattr(SegmentCalibration, "_run_item", stop_at_item_3)
    with pytest.raises(Interrupted):
        fit(world, run_dir, iters=3, iters_a=2, extra=extra)
    monkeypatch.setattr(SegmentCalibration, "_run_item", original)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["mmqdiff_calibration"]
    assert state["next_item"] == 3 and state["signature"]["segment_scope"] == "activations"
    assert not (run_dir / "manifest.json").exists()
    with pytest.raises(ValueError, match=r"cannot resume: checkpoint was made with different \['init_from', "
                                         r"'segment_scope'\]"):
        fit(world, run_dir, iters=3, iters_a=2,
            extra=["--model.init_args.init_from", str(runs["dir"] / "base"), "--model.init_args.segment_scale",
                   str(SCALE), "--ckpt_path", "last"])
    fit(world, run_dir, iters=3, iters_a=2, extra=[*extra, "--ckpt_path", "last"])
    a, b = files(run_dir), files(runs["dir"] / "cli")
    assert a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)


@needs_onednn
def test_integer_runtime_holds_one_weight_set_and_equals_each_segment(world, runs):  # noqa: F811
    model = SegmentedModel.load(runs["dir"] / "python", world["model"])
    integer = model.to_integer()
    segments = integer.models
    assert not segments.codes  # no code set to re-pack from: the segments hand one packed weight set on
    x = world["xs"][3, :4]
    for backend in ("onednn", "int_mm"):
        handed = model.to_integer(backend)
        assert not handed.models.codes
        with torch.inference_mode():
            for step in (0, 9, 4, 5):  # segments 0, 1, 0, 1: the weights handed on at each switch
                t = torch.full((4,), float(model.seq[-1 - step]))
                assert torch.equal(handed(x, t), to_integer(model.model_for_step(step), backend)(x, t))
    for q in model.models:  # and each segment's integer runtime equals its fake-quant model up to rounding ties
        check_divergence_only_at_rounding_ties(q)
    # resident: one model's weights and two activation sets; a K=2 full run adds the code set it re-packs from (an
    # int8 base and a rounding bit per weight and segment)
    full = copy.deepcopy(runs["model"].models[1])
    for layer in quant_layers(full):  # another rounding, as a K=2 full run's second segment has
        layer.unfreeze()
        for w in layer.weight_quantizers():
            w.alpha.data.neg_()
    full.freeze()
    two = SegmentedModel(model.segments, [runs["model"].models[0], full], model.seq).to_integer().models
    k1 = SegmentedModel.load(runs["dir"] / "base", world["model"]).to_integer().models
    codes = sum(b.numel() * b.element_size() for c in two.codes for b in c.buffers())
    assert all(c.bits is not None for c in two.codes) and two.sampling_nbytes() - segments.sampling_nbytes() == codes
    assert 0 < segments.sampling_nbytes() - k1.sampling_nbytes() < 0.02 * k1.sampling_nbytes()


@needs_onednn
@pytest.mark.parametrize("weight_bits", [4, 8])
def test_segments_of_equal_weight_codes_hand_one_packed_set_on_exactly(embedded, trajectories,  # noqa: F811
                                                                        weight_bits):
    """The embedded UNet's K=3 segment models with one rounding and their own activation ranges (as segment_scope
    activations gives them; W8 with weight offsets): no code set is kept, and after any switch each segment's output
    equals its own integer runtime, packed with its own activation scale, on both backends."""
    fakes = [embedded_quantized(embedded, trajectories, weight_bits, steps) for steps in timestep_segments(100, 3)]
    x, t = inputs(fakes[0], 2, seed=5)
    for backend in ("onednn", "int_mm"):
        segments, alone = IntegerSegments(fakes, backend), [to_integer(q, backend) for q in fakes]
        assert not segments.codes
        with torch.inference_mode():
            for k in (2, 0, 1, 1, 0):
                assert torch.equal(segments[k](x, t), alone[k](x, t))


def test_cli_predict_samples_an_activations_only_folder(world, runs, tmp_path):  # noqa: F811
    out = tmp_path / "samples"
    cli.main(["predict", "--config", str(ROOT / "configs/embedded/sample.yaml"),
              "--model.init_args.calibration_run", str(runs["dir"] / "cli"),
              "--model.init_args.config", str(world["config"]),
              "--model.init_args.checkpoint", str(world["checkpoint"]),
              "--model.init_args.num_steps", str(NUM_STEPS), "--model.init_args.real_source", "null",
              "--model.init_args.fp_error_images", "0", "--data.init_args.num_images", "2",
              "--data.init_args.batch_size", "2", "--data.init_args.output_dir", str(out),
              "--trainer.default_root_dir", str(out), "--trainer.accelerator", "cpu"])
    model = runs["model"].for_device("cpu")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["runtime"] == model.runtime and metrics["num_images"] == 2
    with torch.inference_mode():
        x = ddim_sample(model.model_for_step, IndexedNoise(1234, [0, 1], (3, 4, 4))(), model.seq, linear_betas())
    assert torch.equal(load_samples(out)[0], to_uint8(x))


def test_settings_that_cannot_mean_activations_only_are_refused(world, runs, tmp_path):  # noqa: F811
    fp, calib, base_dir = world["model"], world["calibration"], runs["dir"] / "base"
    recon = ReconSettings(cali_iters=1, cali_iters_a=1)
    with pytest.raises(ValueError, match="segment_scope 'activations' keeps the weight rounding of a finished K=1 "
                                         "run: pass init_from"):
        SegmentedModel.calibrate(fp, QuantConfig(), calib, recon, cali_st=2, cali_n=6, k=2, segment_scope="activations")
    with pytest.raises(ValueError, match=r"segment_scope must be one of \('full', 'activations'\), got 'weights'"):
        SegmentedModel.calibrate(fp, QuantConfig(), calib, recon, cali_st=2, cali_n=6, segment_scope="weights")
    with pytest.raises(ValueError, match=r"warm WarmStart\(soft_margin=0.3, act_init=False\) fine-tunes a weight "
                                         r"phase .* leave warm at its default"):
        SegmentedModel.calibrate(fp, QuantConfig(), calib, recon, cali_st=2, cali_n=6, init_from=base_dir,
                                 warm=WarmStart(soft_margin=0.3), segment_scope="activations")
    xs, ts = world["xs"][0], world["ts"][0]
    with pytest.raises(ValueError, match="quant_act is false"):
        calibrate(fp, QuantConfig(quant_act=False), xs, ts, recon, init_state={}, scope="activations")
    with pytest.raises(ValueError, match="set model.init_args.init_from"):
        fit(world, tmp_path / "a", extra=["--model.init_args.segment_scope", "activations"])
    k1 = SegmentedModel.calibrate(fp, QuantConfig(), calib, recon, cali_st=2, cali_n=6, init_from=base_dir,
                                  segment_scope="activations")
    k1.save(tmp_path / "k1_activations")
    with pytest.raises(ValueError, match=r"manifest.json: segment_scope is 'activations'; a warm start begins from a "
                                         r"run of segment_scope 'full'"):
        warm_start_state(tmp_path / "k1_activations", "", {})


def test_pipeline_plans_the_compute_of_the_k1_run_plus_the_activation_phases(tmp_path):
    """An activations-only K=2 entry spends the K=1 base's iterations plus its segments' activation phases; a K=1
    entry at that compute is an equal-compute pair, one at the full K=2's is not."""
    cfg = main_config(tmp_path)  # K=1 at 2/2, K=2 full warm-started from it at 2/2 per segment
    out = cfg["output_dir"]
    cfg["calibrations"] += [
        {"name": "W4A8 K=2 activations", "config": cfg["calibrations"][1]["config"], "run_dir": f"{out}/calib_k2_act",
         "args": [*cfg["calibrations"][1]["args"], "--model.init_args.segment_scope", "activations"]},
        {"name": "W4A8 K=1, K=2 activations' compute", "config": cfg["calibrations"][0]["config"],
         "run_dir": f"{out}/calib_k1_eq", "equal_compute_to": "W4A8 K=2 activations",
         "args": [*CALIB, "--model.init_args.recon.cali_iters_a", "6"]}]
    plan = plan_of(cfg)
    assert [plan.planned_compute(run) for run in plan.cfg.calibrations] == [[2, 2], [6, 6], [2, 6], [2, 6]]
    plan.check(Inputs())
    cfg["calibrations"][3]["equal_compute_to"] = "W4A8 K=2"
    with pytest.raises(ConfigError, match=r"spends \[2, 6\] \(weight, act\) reconstruction iterations per unit, "
                                          r"W4A8 K=2 \[6, 6\]"):
        plan_of(cfg).check(Inputs())

"""``mmqdiff.quant.calibrate`` and ``init_activation_ranges`` without Lightning, on the tiny model: the returned
state, resume bit-identity, the per-item callback, activation ranges from data, and bad input."""
from __future__ import annotations

import io
from dataclasses import asdict, replace

import pytest
import torch

from mmqdiff.quant import (QuantConfig, ReconSettings, ResumePoint, SegmentCalibrator, WarmStart, act_quantizers,
                           adaround_quantizers, calibrate, export_packed, init_activation_ranges, quant_state_dict,
                           quantize_model)
from mmqdiff.diffusion import Model
from mmqdiff.quant.model import registration_units

from .conftest import TINY

SETTINGS = ReconSettings(cali_iters=3, cali_iters_a=2, batch_size=4, act_init_samples=8)


def pairs(n=12):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g).float()


def tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k]
                                        for k, v in a.items())


def same_state(a, b) -> bool:
    return tensors_equal(quant_state_dict(a), quant_state_dict(b))


@pytest.fixture(scope="module")
def calibrated():
    """An uninterrupted calibration (seed 5) of the tiny model, the items its callback saw, and the FP weights."""
    torch.manual_seed(0)
    fp = Model(**TINY).eval()
    before = {k: v.clone() for k, v in fp.state_dict().items()}
    seen = []
    q = calibrate(fp, QuantConfig(), *pairs(), SETTINGS, seed=5, callback=seen.append)
    return fp, before, q, seen


def test_calibrate_returns_a_calibrated_model_and_leaves_the_fp_model(calibrated):
    tiny_model, before, q, seen = calibrated
    xs, ts = pairs()
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())
    n = len(registration_units(tiny_model))
    assert [(d.item, d.phase) for d in seen] == [(i, "weight" if i < n else "act") for i in range(2 * n)]
    assert {d.num_items for d in seen} == {2 * n} and [d.unit for d in seen[:n]] == list(range(n))
    assert all(d.stats["round_loss"] >= 0 for d in seen[:n]) and all("round_loss" not in d.stats for d in seen[n:])
    assert not q.training
    assert all(layer.use_weight_quant and layer.use_act_quant for layer in q.modules() if hasattr(layer, "quant_act"))
    assert all(qz.inited for qz in act_quantizers(q))
    assert all(w.mode == "hard" for w in q.modules() if hasattr(w, "alpha"))
    with torch.no_grad():
        out = q(xs[:2], ts[:2])
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()
    assert not same_state(q, calibrate(tiny_model, QuantConfig(), xs, ts, SETTINGS, seed=5, segment=1))


def test_stopped_calibration_resumes_bit_identical(calibrated):
    tiny_model, _, full, _ = calibrated
    xs, ts = pairs()
    saved = io.BytesIO()

    class Stop(Exception):
        pass

    def checkpoint_then_stop(item):
        if item.item == 4:  # a checkpoint after item 4, then the process "dies"
            torch.save(asdict(item.resume_point()), saved)
            raise Stop

    with pytest.raises(Stop):
        calibrate(tiny_model, QuantConfig(), xs, ts, SETTINGS, seed=5, callback=checkpoint_then_stop)
    saved.seek(0)
    point = ResumePoint(**torch.load(saved, weights_only=True))
    assert point.next_item == 5
    done = []
    resumed = calibrate(tiny_model, QuantConfig(), xs, ts, SETTINGS, seed=5, resume=point, callback=done.append)
    assert done[0].item == 5 and same_state(resumed, full)


def test_bad_resume_point_and_pairs_are_refused(tiny_model):
    xs, ts = pairs()
    state = quant_state_dict(quantize_model(tiny_model))
    with pytest.raises(ValueError, match=r"next_item 99 outside \[0, \d+\]"):
        calibrate(tiny_model, QuantConfig(), xs, ts, SETTINGS, resume=ResumePoint(99, state))
    with pytest.raises(ValueError, match="key 'config.weight_bits' is 4 but this model has 8"):
        calibrate(tiny_model, QuantConfig(weight_bits=8), xs, ts, SETTINGS, resume=ResumePoint(0, state))
    with pytest.raises(ValueError, match=r"xs \[N, C, H, W\] and ts \[N\] .* got xs \(12, 3, 8, 8\) and ts \(11,\)"):
        calibrate(tiny_model, QuantConfig(), xs, ts[:11], SETTINGS)


def test_activation_ranges_from_data(tiny_model):
    """After quantize_model activations are FP and unranged; init_activation_ranges gives every activation quantizer
    the range of one quantized forward over the seeded sample (checked by hand on the network input)."""
    xs, ts = pairs(40)
    q = quantize_model(tiny_model, QuantConfig(act_bits=8, act_symmetric=True))
    assert not any(qz.inited for qz in act_quantizers(q))
    assert not any(m.use_act_quant for m in q.modules() if hasattr(m, "quant_act"))
    with torch.no_grad():  # weights quantized, activations FP
        assert not torch.equal(q(xs[:2], ts[:2]), tiny_model(xs[:2], ts[:2]))
        assert init_activation_ranges(q, xs, ts, samples=16, seed=3) is q
    assert all(qz.inited for qz in act_quantizers(q))
    assert all(m.use_act_quant for m in q.modules() if hasattr(m, "quant_act") and m.quant_act)
    idx = torch.randperm(40, generator=torch.Generator().manual_seed(3))[:16]
    conv_in = q.model.conv_in.act_quantizer  # sees the raw network input
    assert conv_in.delta.item() == pytest.approx(xs[idx].abs().max().item() / 127, rel=1e-6)
    other = init_activation_ranges(quantize_model(tiny_model), xs, ts, samples=16, seed=4)
    assert other.model.conv_in.act_quantizer.delta.item() != conv_in.delta.item()
    with pytest.raises(ValueError, match="samples must be >= 1"):
        init_activation_ranges(q, xs, ts, samples=0)


def test_warm_start_loads_the_base_state_exactly(calibrated):
    tiny_model, _, base, _ = calibrated
    state = quant_state_dict(base)
    calibrator = SegmentCalibrator(tiny_model, QuantConfig(), SETTINGS, seed=5, init_state=state)
    assert same_state(calibrator.qmodel, base) and calibrator.next_item == 0
    with pytest.raises(ValueError, match="key 'config.weight_bits' is 4 but this model has 8"):
        SegmentCalibrator(tiny_model, QuantConfig(weight_bits=8), SETTINGS, seed=5, init_state=state)


@pytest.mark.parametrize("warm", [WarmStart(), WarmStart(soft_margin=None)])
def test_warm_start_without_iterations_is_the_base_model(calibrated, warm):
    """0 fine-tune iterations: the segment computes exactly what the base computes (same hard rounding, same step
    sizes; the packed export is identical); keeping the loaded alphas keeps the whole state."""
    tiny_model, _, base, _ = calibrated
    xs, ts = pairs()
    q = calibrate(tiny_model, QuantConfig(), xs, ts, replace(SETTINGS, cali_iters=0, cali_iters_a=0), seed=6,
                  segment=2, init_state=quant_state_dict(base), warm=warm)
    assert tensors_equal(export_packed(q), export_packed(base))
    with torch.no_grad():
        assert torch.equal(q(xs, ts), base(xs, ts))
    assert same_state(q, base) == (warm.soft_margin is None)


def test_warm_start_fine_tunes_from_the_base(calibrated):
    """With iterations, a warm start moves off the base, differs from a cold start with the same seeds, and resumes
    bit-identically; keeping the loaded alphas leaves every saturated one where it was (zero gradient)."""
    tiny_model, _, base, _ = calibrated
    xs, ts, state = *pairs(), quant_state_dict(base)
    warm = calibrate(tiny_model, QuantConfig(), xs, ts, SETTINGS, seed=6, init_state=state)
    assert not same_state(warm, base)
    assert not same_state(warm, calibrate(tiny_model, QuantConfig(), xs, ts, SETTINGS, seed=6))
    points = []
    calibrate(tiny_model, QuantConfig(), xs, ts, SETTINGS, seed=6, init_state=state,
              callback=lambda item: points.append(item.resume_point()) if item.item == 3 else None)
    resumed = calibrate(tiny_model, QuantConfig(), xs, ts, SETTINGS, seed=6, init_state=state, resume=points[0])
    assert same_state(resumed, warm)
    kept = calibrate(tiny_model, QuantConfig(), xs, ts, SETTINGS, seed=6, init_state=state,
                     warm=WarmStart(soft_margin=None))
    saturated = 0
    for after, before in zip(adaround_quantizers(kept), adaround_quantizers(base)):
        flat = (before.h() == 0) | (before.h() == 1)
        saturated += int(flat.sum())
        assert torch.equal(after.alpha[flat], before.alpha[flat])
    assert saturated > 0


def test_bad_warm_start_settings_are_refused():
    with pytest.raises(ValueError, match=r"WarmStart.soft_margin must be in \(0, 0.5\) or None, got 0.6"):
        WarmStart(soft_margin=0.6)
    with pytest.raises(ValueError, match="cali_iters must be >= 0, got -1"):
        ReconSettings(cali_iters=-1)
    scaled = ReconSettings(cali_iters=0, cali_iters_a=4).scaled(0.1)  # 0 stays 0, a positive count stays >= 1
    assert (scaled.cali_iters, scaled.cali_iters_a) == (0, 1)

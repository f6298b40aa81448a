"""Reconstruction engine: loss, unit caching, AdaRound and activation phases, work items, determinism."""
import math

import pytest
import torch

from mmqdiff.diffusion import build_model, load_checkpoint
from mmqdiff.quant import QuantConfig, adaround_quantizers, quantize_model
from mmqdiff.quant.reconstruction import (NonFiniteLossError, ReconSettings, UnitCache, cache_unit_io, calibrate_item,
                                          init_act_quantizers, item_seed, lp_loss, reconstruct_activations,
                                          reconstruct_weights, work_items)


@pytest.fixture(scope="module")
def fp():
    return load_checkpoint(build_model("configs/embedded.yaml"), "checkpoints/embedded_unet.pt").eval()


@pytest.fixture(scope="module")
def data():
    """Noisy inputs at high t (what the first segment sees): enough for the reconstruction to matter."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(48, 3, 16, 16, generator=g), torch.randint(500, 800, (48,), generator=g).float()


def unit_error(unit, cache):
    with torch.no_grad():
        return lp_loss(unit(*cache.inputs), cache.target).item()


def test_lp_loss_by_hand():
    pred = torch.tensor([[[1.0, 2.0]], [[0.0, 0.0]]]).permute(0, 2, 1)  # [batch 2, channels 2, space 1]
    tgt = torch.zeros_like(pred)
    # sample 0: |1|^p + |2|^p summed over channels; sample 1: 0; mean over batch and space
    assert lp_loss(pred, tgt, 2.0).item() == pytest.approx((1 + 4) / 2)
    assert lp_loss(pred, tgt, 2.4).item() == pytest.approx((1 + 2 ** 2.4) / 2)


def test_cache_captures_exactly_the_units_io(fp, data):
    xs, ts = data
    q = quantize_model(fp, QuantConfig())
    name = "down.1.block.0"
    seen = {}
    hook = fp.get_submodule(name).register_forward_hook(lambda m, args, out: seen.update(args=args, out=out))
    with torch.no_grad():
        fp(xs, ts)
    hook.remove()
    fp_cache = cache_unit_io(q, fp, name, xs, ts, asym=False, batch_size=20)  # batches that do not divide 48
    assert len(fp_cache.inputs) == 2 and len(fp_cache) == 48  # (x, temb) of a ResnetBlock
    for got, want in zip(fp_cache.inputs, seen["args"]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(fp_cache.target, seen["out"], rtol=0, atol=1e-6)

    qseen = {}
    qhook = q.model.get_submodule(name).register_forward_pre_hook(lambda m, args: qseen.update(args=args))
    with torch.no_grad():
        q(xs, ts)  # weight-quantized, activations off: what the weight phase reads (asym)
    qhook.remove()
    q_cache = cache_unit_io(q, fp, name, xs, ts, asym=True, batch_size=20)
    torch.testing.assert_close(q_cache.target, fp_cache.target, rtol=0, atol=0)
    for got, want in zip(q_cache.inputs, qseen["args"]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.equal(q_cache.inputs[0], fp_cache.inputs[0])  # inputs really come from the quantized network

    half = cache_unit_io(q, fp, name, xs, ts, asym=False, store_dtype=torch.float16)
    assert half.target.dtype == torch.float16 and half.nbytes * 2 == fp_cache.nbytes
    inputs, target = half.batch(torch.arange(4), torch.device("cpu"))
    assert target.dtype == torch.float32 and inputs[0].shape == (4, *fp_cache.inputs[0].shape[1:])


@pytest.mark.parametrize("name", ["temb.dense.1", "down.0.block.0", "down.1.attn.0"])
def test_weight_phase_beats_nearest_rounding(fp, data, name):
    xs, ts = data
    q = quantize_model(fp, QuantConfig())
    unit = q.model.get_submodule(name)
    cache = cache_unit_io(q, fp, name, xs, ts, asym=True)
    nearest = unit_error(unit, cache)
    stats = reconstruct_weights(unit, cache, iters=80, generator=torch.Generator().manual_seed(0), name=name)
    assert all(a.mode == "hard" for a in adaround_quantizers(unit))
    assert unit_error(unit, cache) < nearest
    assert stats["iters"] == 80 and stats["rec_last"] >= 0


def test_bfloat16_autocast_runs_the_unit_in_bfloat16_and_still_beats_nearest_rounding(fp, data):
    xs, ts = data
    name = "down.0.block.0"
    dtypes = []
    for autocast in ("none", "bfloat16"):
        q = quantize_model(fp, QuantConfig())
        unit = q.model.get_submodule(name)
        cache = cache_unit_io(q, fp, name, xs, ts, asym=True)
        nearest = unit_error(unit, cache)
        hook = unit.conv1.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        stats = reconstruct_weights(unit, cache, iters=40, generator=torch.Generator().manual_seed(0), name=name,
                                    autocast=autocast)
        hook.remove()
        assert unit_error(unit, cache) < nearest and math.isfinite(stats["rec_last"])  # scored in float32
    assert dtypes[:40] == [torch.float32] * 40 and dtypes[40:] == [torch.bfloat16] * 40


def test_activation_phase_learns_step_sizes_only(fp, data):
    xs, ts = data
    q = quantize_model(fp, QuantConfig())
    init_act_quantizers(q, xs, ts, samples=16, generator=torch.Generator().manual_seed(0))
    name = "down.1.block.0"
    unit = q.model.get_submodule(name)
    before = {k: v.clone() for k, v in unit.state_dict().items() if isinstance(v, torch.Tensor)}
    cache = cache_unit_io(q, fp, name, xs, ts, asym=False)
    reconstruct_activations(unit, cache, iters=10, generator=torch.Generator().manual_seed(0), name=name)
    changed = {k for k, v in before.items() if not torch.equal(v, unit.state_dict()[k])}
    assert changed and all(k.endswith("delta") and "act_quantizer" in k for k in changed)
    assert all(p.requires_grad for p in unit.parameters())  # flags restored after the phase


def test_uninitialised_activation_quantizers_are_refused(fp, data):
    q = quantize_model(fp, QuantConfig())
    cache = cache_unit_io(q, fp, "conv_in", *data, asym=False)
    with pytest.raises(RuntimeError, match="conv_in: activation quantizers are not initialised"):
        reconstruct_activations(q.model.conv_in, cache, iters=2, generator=torch.Generator(), name="conv_in")


def test_non_finite_loss_names_the_unit(fp, data):
    q = quantize_model(fp, QuantConfig())
    cache = cache_unit_io(q, fp, "conv_in", *data, asym=True)
    bad = UnitCache(cache.inputs, torch.full_like(cache.target, float("inf")))
    with pytest.raises(NonFiniteLossError, match=r"unit conv_in: weight-phase loss is (nan|inf) at iteration 1/"):
        reconstruct_weights(q.model.conv_in, bad, iters=5, generator=torch.Generator(), name="conv_in")


def test_items_are_deterministic_and_independent_of_global_rng(fp, data):
    xs, ts = data
    settings = ReconSettings(cali_iters=6, cali_iters_a=4, eval_mode=False)  # train mode: dropout draws too
    results = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        q = quantize_model(fp, QuantConfig())
        for unit, phase in [(0, "weight"), (3, "weight"), (0, "act"), (3, "act")]:
            calibrate_item(q, fp, xs, ts, unit, phase, settings, item_seed(7, 2, unit, phase))
        results.append(q.state_dict())
    assert all(torch.equal(v, results[1][k]) for k, v in results[0].items() if isinstance(v, torch.Tensor))


def test_work_items_and_seeds():
    assert work_items(2, True) == [(0, "weight"), (1, "weight"), (0, "act"), (1, "act")]
    assert work_items(2, False) == [(0, "weight"), (1, "weight")]
    seeds = {item_seed(0, s, u, p) for s in range(3) for u in range(3) for p in ("weight", "act")}
    assert len(seeds) == 18 and item_seed(0, 1, 2, "act") == item_seed(0, 1, 2, "act")


def test_settings_are_validated():
    with pytest.raises(ValueError, match="cache_dtype"):
        ReconSettings(cache_dtype="int8")
    with pytest.raises(ValueError, match="cali_iters"):
        ReconSettings(cali_iters=-1)
    with pytest.raises(ValueError, match="autocast must be 'none' or 'bfloat16', got 'float16'"):
        ReconSettings(autocast="float16")


@pytest.mark.parametrize("kwargs, key", [({"lr_w": 0.0}, "lr_w"), ({"lr_w": -1e-3}, "lr_w"), ({"lr_a": 0}, "lr_a"),
                                         ({"lr_a": float("nan")}, "lr_a"), ({"lr_w": float("inf")}, "lr_w"),
                                         ({"cache_device": "gpu"}, "cache_device"),
                                         ({"cache_device": "cuda:x"}, "cache_device")])
def test_learning_rates_and_cache_device_are_validated_by_key(kwargs, key):
    with pytest.raises(ValueError, match=rf"ReconSettings\.{key} .* got {kwargs[key]!r}"):
        ReconSettings(**kwargs)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "meta"])
def test_valid_cache_devices_pass(device):
    assert ReconSettings(cache_device=device).cache_device == device  # parsed, not allocated: no GPU needed

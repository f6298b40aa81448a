"""The ddim UNet, checkpoint loading, step sequences and the DDIM update."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmqdiff.diffusion import (Model, build_model, ddim_sample, ddim_step, eps_sensitivity, file_sha256, linear_betas,
                               load_checkpoint, state_dict_sha256, step_pairs, timesteps)
from mmqdiff.lightning.train import export_state_dict

from .conftest import ROOT, TINY


def test_cifar10_state_dict_matches_official_names_and_shapes():
    ref = json.loads((ROOT / "tests/data/ddim_cifar10_state_dict.json").read_text())
    model = build_model("configs/cifar10.yaml")
    sd = model.state_dict()
    assert list(sd) == list(ref["state_dict"])
    assert {k: list(v.shape) for k, v in sd.items()} == ref["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"] == 35_746_307


def test_build_model_by_name_and_dict():
    assert sum(p.numel() for p in build_model("embedded").parameters()) == 1_113_955
    with pytest.raises(FileNotFoundError, match="nope"):
        build_model("configs/nope.yaml")
    with pytest.raises(ValueError, match="lacks"):
        build_model({"model": {"ch": 32}})


def test_strict_load_round_trip(tiny_model, tmp_path):
    path = tmp_path / "m.pt"
    torch.save(tiny_model.state_dict(), path)
    other = Model(**TINY).eval()
    load_checkpoint(other, path)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 700.0])
    assert torch.equal(other(x, t), tiny_model(x, t))


def test_load_accepts_lightning_checkpoint_ema_weights(tiny_model, tmp_path):
    sd = tiny_model.state_dict()
    ckpt = {"state_dict": {**{f"model.{k}": torch.zeros_like(v) for k, v in sd.items()},
                           **{f"ema_model.{k}": v for k, v in sd.items()}}}
    torch.save(ckpt, tmp_path / "l.ckpt")
    loaded = load_checkpoint(Model(**TINY), tmp_path / "l.ckpt")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())


@pytest.mark.parametrize("mutate, message", [
    (lambda sd: sd.pop("conv_in.weight"), "1 missing, e.g. \\['conv_in.weight'\\]"),
    (lambda sd: sd.__setitem__("extra.weight", torch.zeros(1)), "1 unexpected, e.g. \\['extra.weight'\\]"),
    (lambda sd: sd.__setitem__("conv_out.bias", torch.zeros(4)), "conv_out.bias: file \\(4,\\) vs model \\(3,\\)"),
])
def test_load_errors_name_file_and_keys(tiny_model, tmp_path, mutate, message):
    sd = dict(tiny_model.state_dict())
    mutate(sd)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=message) as e:
        load_checkpoint(Model(**TINY), path)
    assert str(path) in str(e.value)


def test_load_errors_missing_truncated_and_not_a_state_dict(tmp_path):
    with pytest.raises(FileNotFoundError, match="model-790000.ckpt"):
        load_checkpoint(Model(**TINY), tmp_path / "model-790000.ckpt")
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(ValueError, match="trunc.pt: cannot be read"):
        load_checkpoint(Model(**TINY), tmp_path / "trunc.pt")
    torch.save({"a": 1}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match="dict.pt: not a model state_dict"):
        load_checkpoint(Model(**TINY), tmp_path / "dict.pt")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_file_and_tensor(tiny_model, tmp_path, value):
    sd = dict(tiny_model.state_dict())
    sd["mid.block_1.conv1.weight"] = sd["mid.block_1.conv1.weight"].clone()
    sd["mid.block_1.conv1.weight"].view(-1)[[5, 9]] = value
    path = tmp_path / "nan.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=rf"nan.pt: tensor 'mid.block_1.conv1.weight' holds 2 non-finite value\(s\) "
                                         rf"of \d+ \(first: {value} at flat index 5\)"):
        load_checkpoint(Model(**TINY), path)


def test_state_dict_sha256_identifies_weights_not_file_bytes(tiny_model, tmp_path):
    sd = tiny_model.state_dict()
    digest = state_dict_sha256(tiny_model)
    # the same weights as a plain state_dict, a Lightning checkpoint and an ermongroup list load to the same identity
    torch.save(sd, tmp_path / "plain.pt")
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "l.ckpt")
    torch.save([{}, {}, 0, 0, dict(sd)], tmp_path / "ermon.pth")
    files = [tmp_path / n for n in ("plain.pt", "l.ckpt", "ermon.pth")]
    assert len({file_sha256(f) for f in files}) == 3
    assert {state_dict_sha256(load_checkpoint(Model(**TINY), f)) for f in files} == {digest}
    assert state_dict_sha256(dict(reversed(list(sd.items())))) == digest  # order of entries does not matter
    # any value, dtype or name change is another model
    changed = {k: v.clone() for k, v in sd.items()}
    changed["conv_out.bias"][0] = torch.nextafter(changed["conv_out.bias"][0], torch.tensor(1.0))
    assert state_dict_sha256(changed) != digest
    assert state_dict_sha256({**sd, "conv_out.bias": sd["conv_out.bias"].double()}) != digest
    renamed = dict(sd)
    renamed["conv_out.bias2"] = renamed.pop("conv_out.bias")
    assert state_dict_sha256(renamed) != digest


def test_timestep_sequences_match_reference_rule():
    quad = timesteps(100, "quad")
    assert len(quad) == 100 and len(set(quad)) == 96 and max(quad) == 800
    assert quad[:12] == [0, 0, 0, 0, 1, 2, 2, 3, 5, 6, 8, 9]
    assert quad[-5:] == [736, 752, 768, 783, 800]
    assert timesteps(10, "quad") == [0, 9, 39, 88, 158, 246, 355, 483, 632, 800]
    assert timesteps(100, "uniform") == list(range(0, 1000, 10))
    assert timesteps(50, "uniform") == list(range(0, 1000, 20)) and timesteps(1000, "uniform") == list(range(1000))
    # 1000 // 3 = 333: the reference rule gives 4 entries for 3 steps, which sampling and calibration data then
    # counted differently (an IndexError, a file whose meta disagrees with its content)
    with pytest.raises(ValueError, match=r"skip_type 'uniform' needs num_steps to divide num_diffusion_timesteps=1000, "
                                         r"got num_steps=3 \(the reference rule would give 4 steps\); use a divisor "
                                         r"such as 2 or 4, or skip_type 'quad'"):
        timesteps(3, "uniform")
    with pytest.raises(ValueError, match="got num_steps=30 .* such as 25 or 40"):
        timesteps(30, "uniform")
    with pytest.raises(ValueError, match="skip_type"):
        timesteps(10, "cosine")


def test_step_pairs_run_from_noisiest():
    assert step_pairs([0, 10, 20]) == [(20, 10), (10, 0), (0, -1)]


def _ddim_float64(x, eps, t, t_next, eta, noise):
    b = np.linspace(1e-4, 0.02, 1000, dtype=np.float64).astype(np.float32).astype(np.float64)
    ab = np.cumprod(1 - np.concatenate([[0.0], b]))
    a_t, a_n = ab[t + 1], ab[t_next + 1]
    x, eps, noise = (v.double().numpy() for v in (x, eps, noise))
    x0 = (x - eps * np.sqrt(1 - a_t)) / np.sqrt(a_t)
    c1 = eta * np.sqrt((1 - a_t / a_n) * (1 - a_n) / (1 - a_t))
    c2 = np.sqrt(1 - a_n - c1 ** 2)
    return np.sqrt(a_n) * x0 + c1 * noise + c2 * eps


def test_eps_sensitivity_is_the_float64_derivative_of_the_ddim_step():
    seq = timesteps(100, "quad")
    sens = eps_sensitivity(seq, linear_betas())
    x = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    for i, (t, t_next) in enumerate(step_pairs(seq)):
        slope = _ddim_float64(x, x + 1, t, t_next, 0.0, x) - _ddim_float64(x, x, t, t_next, 0.0, x)  # linear in eps
        assert sens[i] == pytest.approx(float(slope.item()), rel=1e-6, abs=1e-12)
    assert abs(sens[0]) > 0.1 and abs(sens[-1]) < 0.02
    assert sens[-2] == 0.0  # t == t_next (quad repeats t=0): the step is the identity, eps cancels exactly


@pytest.mark.parametrize("t, t_next, eta", [(800, 783, 0.0), (10, 0, 0.0), (0, -1, 0.0), (500, 400, 1.0), (40, 30, 0.5)])
def test_ddim_step_matches_float64(t, t_next, eta):
    g = torch.Generator().manual_seed(t)
    x, eps, noise = (torch.randn(4, 3, 8, 8, generator=g) for _ in range(3))
    out = ddim_step(x, eps, t, t_next, linear_betas(), eta, noise if eta else None)
    ref = _ddim_float64(x, eps, t, t_next, eta, noise if eta else torch.zeros_like(x))
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=0, atol=5e-5 * np.abs(ref).max())


def test_eta_adds_noise_and_eta0_is_deterministic(tiny_model):
    seq = timesteps(5, "quad")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    run = lambda eta, seed: ddim_sample(lambda i: tiny_model, x, seq, linear_betas(), eta,
                                        torch.Generator().manual_seed(seed))
    assert torch.equal(run(0.0, 0), run(0.0, 1))
    assert torch.equal(run(1.0, 3), run(1.0, 3))
    assert not torch.allclose(run(1.0, 3), run(1.0, 4))
    with pytest.raises(ValueError, match="noise"):
        ddim_step(x, x, 10, 0, linear_betas(), eta=1.0)


def test_sampler_asks_model_for_every_step_index(tiny_model):
    seen, inputs = [], []
    def model_for_step(i):
        seen.append(i)
        return tiny_model
    seq = timesteps(6, "quad")
    ddim_sample(model_for_step, torch.randn(1, 3, 8, 8), seq, linear_betas(),
                callback=lambda i, t, x, e: inputs.append((i, t)))
    assert seen == list(range(6))
    assert inputs == list(enumerate(reversed(seq)))


def test_export_state_dict_writes_loadable_file_and_digest(tiny_model, tmp_path):
    digest = export_state_dict(tiny_model, tmp_path / "m.pt")
    assert (tmp_path / "m.pt.sha256").read_text().split()[0] == digest == file_sha256(tmp_path / "m.pt")
    load_checkpoint(Model(**TINY), tmp_path / "m.pt")


def test_shipped_unet_matches_its_digest_and_loads():
    path = ROOT / "checkpoints/embedded_unet.pt"
    assert file_sha256(path) == (ROOT / "checkpoints/embedded_unet.pt.sha256").read_text().split()[0]
    model = load_checkpoint(build_model("configs/embedded.yaml"), path).eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = model(x, torch.full((4,), 999.0))
    # at t=999 the input is almost pure noise, so a trained model predicts it back
    assert torch.nn.functional.mse_loss(eps, x) < 0.05

"""Checkpoints as users have them: ``.safetensors`` files and diffusers ``UNet2DModel`` weights (the layout of
``google/ddpm-cifar10-32``) converted into the ddim ``Model``, compared output for output against diffusers itself.
The diffusers/safetensors tests skip when the ``mmqdiff[diffusers]`` extra is not installed."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from mmqdiff.diffusion import (Model, build_model, ddim_config_from_diffusers, diffusers_to_ddim_state_dict,
                               from_diffusers, load_checkpoint, load_config, load_diffusers)
from mmqdiff.diffusion.unet import timestep_embedding

from .conftest import ROOT, TINY

# google/ddpm-cifar10-32's published config.json (the UNet2DModel keys that shape the network)
PUBLISHED = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                 block_out_channels=(128, 256, 256, 256),
                 down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
                 act_fn="silu", center_input_sample=False, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                 mid_block_scale_factor=1, norm_eps=1e-6, norm_num_groups=32, time_embedding_type="positional",
                 resnet_time_scale_shift="default")
# the same block types, small: two levels (attention at the lower one) and 8x8 images
SMALL = {**PUBLISHED, "sample_size": 8, "layers_per_block": 1, "block_out_channels": (32, 64),
         "down_block_types": ("DownBlock2D", "AttnDownBlock2D"), "up_block_types": ("AttnUpBlock2D", "UpBlock2D")}


def random_unet(config: dict):
    """A diffusers UNet2DModel with seeded random values in every parameter (norm scales and biases included, so
    that swapped norms or biases show); outputs have a standard deviation of about 0.4."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return unet


def max_diff(unet, model: Model, resolution: int) -> float:
    x = torch.randn(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(1))
    worst = 0.0
    with torch.no_grad():
        for t in ([0.0, 999.0], [417.0, 3.0]):
            t = torch.tensor(t)
            worst = max(worst, (unet(x, t).sample - model.eval()(x, t)).abs().max().item())
    return worst


def shared_embedding(unet, monkeypatch) -> None:
    """Let diffusers use the ddim timestep embedding (same function, float32 ops in another order: see
    test_timestep_embedding_conventions), so the comparison sees only the converted network."""
    channels = unet.config.block_out_channels[0]
    monkeypatch.setattr(unet.time_proj, "forward", lambda t: timestep_embedding(t, channels))


def test_timestep_embedding_conventions():
    """ddim's embedding is diffusers' get_timestep_embedding with flip_sin_to_cos=False, downscale_freq_shift=1: over
    t = 0..999 they agree to float32 rounding (each within 6e-5 of the float64 value; measured 3.1e-5 apart), while
    the other conventions differ by O(1)."""
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    t = torch.arange(1000.0)
    ours = timestep_embedding(t, 128)
    freqs = torch.exp(torch.arange(64, dtype=torch.float64) * -(math.log(10000) / 63))
    exact = torch.cat([torch.sin(t.double()[:, None] * freqs), torch.cos(t.double()[:, None] * freqs)], dim=1)
    theirs = embeddings.get_timestep_embedding(t, 128, flip_sin_to_cos=False, downscale_freq_shift=1)
    assert (ours - exact).abs().max() < 6e-5 and (theirs.double() - exact).abs().max() < 6e-5
    assert (ours - theirs).abs().max() < 6e-5
    for flip, shift in ((True, 1), (False, 0)):
        other = embeddings.get_timestep_embedding(t, 128, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        assert (ours - other).abs().max() > 0.5


def test_published_ddpm_cifar10_config_converts_exactly(monkeypatch):
    unet = random_unet(PUBLISHED)
    model = from_diffusers(unet)
    ref = json.loads((ROOT / "tests/data/ddim_cifar10_state_dict.json").read_text())["state_dict"]
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ref  # the official ddim layout
    expected = dict(load_config("configs/cifar10.yaml")["model"], in_channels=3, resolution=32)
    assert ddim_config_from_diffusers(PUBLISHED) == {**expected, "dropout": 0.0}  # only dropout (inactive) differs
    assert max_diff(unet, model, 32) <= 1e-5  # each library with its own embedding
    shared_embedding(unet, monkeypatch)
    assert max_diff(unet, model, 32) <= 1e-5


def test_small_config_converts_exactly_and_loads_from_files(tmp_path, monkeypatch):
    unet = random_unet(SMALL)
    model = from_diffusers(unet)
    unet.save_pretrained(tmp_path / "st")  # config.json + diffusion_pytorch_model.safetensors
    unet.save_pretrained(tmp_path / "bin", safe_serialization=False)  # ... + diffusion_pytorch_model.bin
    shared_embedding(unet, monkeypatch)
    assert max_diff(unet, model, 8) <= 1e-5
    swapped = from_diffusers(unet)  # the comparison notices a mapping error: q and k exchanged in one block
    q, k = swapped.down[1].attn[0].q.weight, swapped.down[1].attn[0].k.weight
    with torch.no_grad():
        q.data, k.data = k.data.clone(), q.data.clone()
    assert max_diff(unet, swapped, 8) > 1e-4
    for folder in ("st", "bin"):
        loaded = load_diffusers(tmp_path / folder).state_dict()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.items())
    arch = Model(**ddim_config_from_diffusers(SMALL))
    load_checkpoint(arch, tmp_path / "st" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in arch.state_dict().items())


def test_legacy_attention_names_convert_the_same():
    """diffusers' older files (google/ddpm-cifar10-32's .bin among them) name attention query/key/value/proj_attn."""
    unet = random_unet(SMALL)
    legacy = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value").replace("to_out.0",
              "proj_attn"): v for k, v in unet.state_dict().items()}
    assert legacy.keys() != unet.state_dict().keys()
    new, old = diffusers_to_ddim_state_dict(unet.state_dict()), diffusers_to_ddim_state_dict(legacy)
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new)


@pytest.mark.parametrize("change, match", [
    ({"flip_sin_to_cos": True}, "flip_sin_to_cos is True; the ddim Model computes flip_sin_to_cos=False"),
    ({"freq_shift": 0}, "freq_shift is 0"),
    ({"norm_eps": 1e-5}, "norm_eps is 1e-05"),
    ({"attention_head_dim": 8}, "attention_head_dim 8 splits attention into several heads"),
    ({"up_block_types": ("UpBlock2D", "AttnUpBlock2D")}, "are not DownBlock2D / AttnDownBlock2D levels mirrored"),
])
def test_configs_the_ddim_model_cannot_compute_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        ddim_config_from_diffusers({**SMALL, **change})


def test_config_defaults_are_diffusers_defaults():
    """A config.json that leaves a key out means diffusers' default, which for these keys is not the ddim value."""
    sparse = {k: v for k, v in SMALL.items() if k != "freq_shift"}
    with pytest.raises(ValueError, match="freq_shift is 0"):
        ddim_config_from_diffusers(sparse)


def test_unknown_diffusers_key_is_named(tmp_path):
    sd = {"time_embedding.linear_1.weight": torch.zeros(1), "down_blocks.0.resnets.0.norm1.weight": torch.zeros(1),
          "down_blocks.0.resnets.0.spatial_norm.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="'down_blocks.0.resnets.0.spatial_norm.weight' is not part of a UNet2DModel"):
        diffusers_to_ddim_state_dict(sd)


def test_safetensors_checkpoint_in_ddim_layout(tmp_path, tiny_model):
    safetensors = pytest.importorskip("safetensors.torch")
    path = tmp_path / "m.safetensors"
    safetensors.save_file(tiny_model.state_dict(), path)
    loaded = load_checkpoint(Model(**TINY), path)
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in loaded.state_dict().items())
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors: cannot be read as a safetensors file"):
        load_checkpoint(Model(**TINY), tmp_path / "bad.safetensors")


def test_missing_extra_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"\0")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r"m.safetensors: reading .safetensors files needs the safetensors package: "
                                          r"pip install 'mmqdiff\[diffusers\]'"):
        load_checkpoint(build_model(TINY_CONFIG), path)


TINY_CONFIG = {"model": {k: v for k, v in TINY.items()}}

"""diffusers ``UNet2DModel`` weights (e.g. ``google/ddpm-cifar10-32``) in the ddim ``Model`` layout.

Both are the DDPM UNet of Ho et al.; diffusers renames the modules and stores attention projections as Linear
layers. The conversion renames keys and reshapes the attention weights [C, C] -> [C, C, 1, 1] (1x1 convs), nothing
else, so it is exact; it needs neither diffusers nor torch beyond plain tensors. The config check refuses every
diffusers option the ddim ``Model`` does not compute the same way (timestep embedding order and shift, norm groups
and eps, downsample padding, multi-head attention, ...), naming the key.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from .unet import Model

# diffusers UNet2DModel defaults, for config keys a (possibly older) config.json leaves out
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default", "norm_num_groups": 32, "norm_eps": 1e-5, "downsample_padding": 1,
    "center_input_sample": False, "mid_block_scale_factor": 1, "add_attention": True, "downsample_type": "conv",
    "upsample_type": "conv", "class_embed_type": None, "num_class_embeds": None, "attn_norm_num_groups": None,
    "attention_head_dim": 8, "dropout": 0.0, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
}
# what the ddim Model computes: sin-then-cos embedding with frequencies exp(-log(1e4) i / (half - 1)), GroupNorm(32,
# eps 1e-6), swish, stride-2 convs after a right/bottom pad, single-head attention, residuals added unscaled
REQUIRED: dict[str, Any] = {
    "act_fn": "silu", "flip_sin_to_cos": False, "freq_shift": 1, "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default", "norm_num_groups": 32, "norm_eps": 1e-6, "downsample_padding": 0,
    "center_input_sample": False, "mid_block_scale_factor": 1, "add_attention": True, "downsample_type": "conv",
    "upsample_type": "conv", "class_embed_type": None, "num_class_embeds": None,
}
RESNET = {"norm1": "norm1", "conv1": "conv1", "time_emb_proj": "temb_proj", "norm2": "norm2", "conv2": "conv2",
          "conv_shortcut": "nin_shortcut"}
ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
             "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # current and legacy diffusers names
BLOCK_KEY = re.compile(r"(?P<side>down|up)_blocks\.(?P<level>\d+)\.(?P<kind>resnets|attentions|downsamplers|upsamplers)"
                       r"\.(?P<index>\d+)\.(?P<rest>.+)")
MID_KEY = re.compile(r"mid_block\.(?P<kind>resnets|attentions)\.(?P<index>\d+)\.(?P<rest>.+)")


def is_diffusers_state_dict(sd: Mapping[str, Any]) -> bool:
    return "time_embedding.linear_1.weight" in sd


def ddim_config_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """``Model`` keyword arguments equivalent to a diffusers ``UNet2DModel`` config; ValueError naming the first
    setting the ddim ``Model`` cannot reproduce."""
    cfg = {**DIFFUSERS_DEFAULTS, **config}
    for key, want in REQUIRED.items():
        if cfg[key] != want:
            raise ValueError(f"diffusers config: {key} is {cfg[key]!r}; the ddim Model computes {key}={want!r}")
    channels = list(cfg["block_out_channels"])
    ch = channels[0]
    if any(c % ch for c in channels):
        raise ValueError(f"diffusers config: block_out_channels {channels} are not multiples of {ch}")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    mirror = [{"DownBlock2D": "UpBlock2D", "AttnDownBlock2D": "AttnUpBlock2D"}.get(t) for t in reversed(down)]
    if None in mirror or up != mirror or len(down) != len(channels):
        raise ValueError(f"diffusers config: down_block_types {down} / up_block_types {up} are not DownBlock2D / "
                         f"AttnDownBlock2D levels mirrored by UpBlock2D / AttnUpBlock2D, one per block_out_channels")
    size = cfg["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"diffusers config: sample_size {size} is not square")
        size = size[0]
    attn_levels = [i for i, t in enumerate(down) if t == "AttnDownBlock2D"]
    head_dim = cfg["attention_head_dim"]
    if head_dim is not None and any(head_dim != channels[i] for i in attn_levels + [len(channels) - 1]):
        raise ValueError(f"diffusers config: attention_head_dim {head_dim} splits attention into several heads; the "
                         "ddim Model has one head per attention block (attention_head_dim null)")
    if cfg["attn_norm_num_groups"] not in (None, cfg["norm_num_groups"]):
        raise ValueError(f"diffusers config: attn_norm_num_groups {cfg['attn_norm_num_groups']} differs from "
                         f"norm_num_groups {cfg['norm_num_groups']}")
    return {"ch": ch, "out_ch": cfg["out_channels"], "ch_mult": [c // ch for c in channels],
            "num_res_blocks": cfg["layers_per_block"], "attn_resolutions": [size // 2 ** i for i in attn_levels],
            "dropout": cfg["dropout"], "in_channels": cfg["in_channels"], "resolution": size,
            "resamp_with_conv": True}


def _rename(key: str, num_levels: int) -> str:
    """ddim name of one diffusers parameter name; ValueError for a name outside the UNet2DModel layout."""
    top = {"time_embedding.linear_1": "temb.dense.0", "time_embedding.linear_2": "temb.dense.1",
           "conv_in": "conv_in", "conv_norm_out": "norm_out", "conv_out": "conv_out"}
    module, _, param = key.rpartition(".")
    if module in top:
        return f"{top[module]}.{param}"
    if m := BLOCK_KEY.fullmatch(key):
        level = int(m["level"]) if m["side"] == "down" else num_levels - 1 - int(m["level"])
        prefix = f"{m['side']}.{level}"
        if m["kind"] in ("downsamplers", "upsamplers") and m["index"] == "0" and m["rest"].startswith("conv."):
            return f"{prefix}.{m['side']}sample.{m['rest']}"
        inner = _inner(m["kind"], m["rest"], key)
        return f"{prefix}.{'block' if m['kind'] == 'resnets' else 'attn'}.{m['index']}.{inner}"
    if m := MID_KEY.fullmatch(key):
        name = {("resnets", "0"): "block_1", ("resnets", "1"): "block_2", ("attentions", "0"): "attn_1"}.get(
            (m["kind"], m["index"]))
        if name is not None:
            return f"mid.{name}.{_inner(m['kind'], m['rest'], key)}"
    raise ValueError(f"diffusers weights: {key!r} is not part of a UNet2DModel the ddim Model can represent")


def _inner(kind: str, rest: str, key: str) -> str:
    module, _, param = rest.rpartition(".")
    names = RESNET if kind == "resnets" else ATTENTION
    if module not in names:
        raise ValueError(f"diffusers weights: {key!r} is not part of a UNet2DModel the ddim Model can represent")
    return f"{names[module]}.{param}"


def diffusers_to_ddim_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DModel`` state_dict under ddim ``Model`` names; attention projection weights become 1x1
    conv weights. Values are not copied or changed."""
    num_levels = 1 + max(int(m["level"]) for k in sd if (m := BLOCK_KEY.fullmatch(k)) and m["side"] == "down")
    out = {}
    for key, value in sd.items():
        name = _rename(key, num_levels)
        attn_weight = re.search(r"attn(_1|\.\d+)\.(q|k|v|proj_out)\.weight$", name) and value.dim() == 2
        out[name] = value[:, :, None, None] if attn_weight else value
    return out


def from_diffusers(unet: torch.nn.Module) -> torch.nn.Module:
    """The ddim ``Model`` computing what a diffusers ``UNet2DModel`` computes, with its weights (float32, CPU)."""
    model = Model(**ddim_config_from_diffusers(dict(unet.config)))
    sd = diffusers_to_ddim_state_dict({k: v.detach().float().cpu() for k, v in unet.state_dict().items()})
    model.load_state_dict(sd, strict=True)
    return model

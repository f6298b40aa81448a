"""Checkpoint I/O for the ddim ``Model``: strict loading from torch or safetensors files in the ddim or diffusers
layout, a diffusers model folder, and the hashes that identify weights by content."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..io import brief_error, shipped_path
from .convert import ddim_config_from_diffusers, diffusers_to_ddim_state_dict, is_diffusers_state_dict
from .unet import Model


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes; a shipped ``checkpoints/...`` path resolves as in ``load_checkpoint``."""
    h = hashlib.sha256()
    with open(shipped_path(path), "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_dict_sha256(state: nn.Module | Mapping[str, Any]) -> str:
    """Identity of a model by what it computes with: SHA-256 over every state_dict entry's name, dtype, shape and
    values, in name order (non-tensor entries, as in a packed export, by their repr). The same weights saved as a
    plain state_dict, an ermongroup list or a Lightning checkpoint give the same hash; the file bytes do not."""
    if isinstance(state, nn.Module):
        state = state.state_dict()
    h = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        h.update(f"{name}\0".encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}\0".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"{type(value).__name__}:{value!r}\0".encode())
    return h.hexdigest()


def _first_non_finite(sd: Mapping[str, torch.Tensor]) -> str | None:
    """Description of the first floating tensor (in file order) holding NaN or inf, or None."""
    for name, t in sd.items():
        if t.is_floating_point() or t.is_complex():
            bad = ~torch.isfinite(t.reshape(-1))
            if bad.any():
                first = int(bad.nonzero()[0])
                return (f"{name!r} holds {int(bad.sum())} non-finite value(s) of {t.numel()} (first: "
                        f"{t.reshape(-1)[first].item()} at flat index {first})")
    return None


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Accept a plain state_dict, the ermongroup ``[state, optim, ..., ema]`` list, or a Lightning checkpoint."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        sd = obj["state_dict"]
        for prefix in ("ema_model.", "model."):  # the training module's EMA copy wins over the raw weights
            if any(k.startswith(prefix) for k in sd):
                return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        return dict(sd)
    if isinstance(obj, (list, tuple)) and obj and isinstance(obj[-1], Mapping):
        obj = obj[-1]  # ermongroup saves [model, optimizer, epoch, step, ema]; EMA is last
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = dict(obj)
        if all(k.startswith("module.") for k in sd):
            sd = {k[len("module."):]: v for k, v in sd.items()}
        return sd
    raise ValueError(f"{path}: not a model state_dict (got {type(obj).__name__}); expected a mapping of tensors, "
                     "an ermongroup checkpoint list, or a Lightning checkpoint with 'state_dict'")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise ImportError(f"{path}: reading .safetensors files needs the safetensors package: "
                          "pip install 'mmqdiff[diffusers]' (or pip install safetensors)") from e
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # truncated or not a safetensors file
        raise ValueError(f"{path}: cannot be read as a safetensors file ({type(e).__name__}: {e})") from e


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Strictly load weights from a local file; errors name the file and the first offending keys or non-finite
    tensor.

    Formats: a torch file (read weights-only: a plain state_dict, ermongroup's checkpoint list, a Lightning
    checkpoint) or ``.safetensors``; either in the ddim layout or in diffusers ``UNet2DModel`` layout (e.g.
    ``google/ddpm-cifar10-32``'s ``diffusion_pytorch_model.safetensors``/``.bin``), which is converted exactly
    (:mod:`mmqdiff.diffusion.convert`). A relative ``checkpoints/<name>`` missing from the working directory is the
    file shipped with the package (``mmqdiff.io.shipped_path``).
    """
    path = shipped_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}. Download it yourself and pass its local path "
                                "(nothing is fetched at run time).")
    if path.suffix == ".safetensors":
        obj: Any = _read_safetensors(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, not a torch file, or pickled code
            raise ValueError(f"{path}: cannot be read as a weights-only torch checkpoint ({brief_error(e)})") from e
    sd = _extract_state_dict(obj, path)
    if is_diffusers_state_dict(sd):
        try:
            sd = diffusers_to_ddim_state_dict(sd)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise ValueError(f"{path}: keys do not match the model ({len(missing)} missing, e.g. {missing[:5]}; "
                         f"{len(unexpected)} unexpected, e.g. {unexpected[:5]}). Check the model config.")
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
             if tuple(sd[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"{path}: {len(wrong)} parameter shapes differ from the model, e.g. {wrong[:3]}")
    bad = _first_non_finite(sd)
    if bad is not None:
        raise ValueError(f"{path}: tensor {bad}; the checkpoint is damaged (NaN/inf weights give black images)")
    model.load_state_dict(sd, strict=True)
    return model


def load_diffusers(folder: str | Path) -> torch.nn.Module:
    """A diffusers model folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` or ``.bin``, e.g. a local
    copy of ``google/ddpm-cifar10-32``) as a ddim ``Model``; diffusers itself is not needed."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: expected a diffusers UNet2DModel folder")
    config = json.loads(config_path.read_text())
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"{config_path}: _class_name is {config['_class_name']!r}, expected 'UNet2DModel'")
    weights = [p for p in (folder / "diffusion_pytorch_model.safetensors", folder / "diffusion_pytorch_model.bin")
               if p.is_file()]
    if not weights:
        raise FileNotFoundError(f"{folder}: no diffusion_pytorch_model.safetensors or .bin")
    return load_checkpoint(Model(**ddim_config_from_diffusers(config)), weights[0])

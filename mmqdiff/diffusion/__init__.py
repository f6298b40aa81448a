"""Plain diffusion: the ddim UNet, its schedule and the DDIM sampler. Knows nothing of quantization."""
from .checkpoint import file_sha256, load_checkpoint, load_diffusers, state_dict_sha256
from .convert import ddim_config_from_diffusers, diffusers_to_ddim_state_dict, from_diffusers
from .sampler import IndexedNoise, ddim_sample, ddim_step, eps_sensitivity, step_pairs, trajectory_generator
from .schedule import alpha_bar, betas_from_config, linear_betas, timesteps
from .unet import Model, build_model, load_config

__all__ = ["Model", "build_model", "load_checkpoint", "load_config", "file_sha256", "state_dict_sha256", "timesteps",
           "linear_betas", "alpha_bar", "betas_from_config", "ddim_sample", "ddim_step", "eps_sensitivity",
           "step_pairs", "IndexedNoise", "trajectory_generator", "from_diffusers", "load_diffusers",
           "ddim_config_from_diffusers", "diffusers_to_ddim_state_dict"]

"""Denoising networks."""

from diffusion_jax.models.unet import UNet, UNetConfig, timestep_embedding

__all__ = ["UNet", "UNetConfig", "timestep_embedding"]

"""diffusion_jax: denoising diffusion probabilistic models in JAX/Flax."""

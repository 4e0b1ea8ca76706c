"""Improved DDPM on CIFAR-10 (Nichol & Dhariwal 2021, "L_hybrid, cosine").

The paper's CIFAR-10 run (their sec. 3 and App. A; improved-diffusion's
README): T = 4000 (their CIFAR-10 models; 1000 for ImageNet 64), the cosine
schedule (eq. 17), learned variances Sigma = exp(v log beta + (1 - v) log
tilde-beta) (eq. 15) trained by the hybrid loss L_simple + 0.001 L_vlb with
uniform timesteps, Adam lr 1e-4 with no warmup, no gradient clipping and no
decay, batch 128, EMA 0.9999, dropout 0.3, 500k steps; the UNet with 3
residual blocks per resolution, 4 attention heads at 16x16 and 8x8, and
scale-shift (adaptive group) norm.

Two differences from improved-diffusion's code, kept on purpose: random
horizontal flips stay on (from cifar10.py; improved-diffusion's CIFAR-10
loader does not flip: set data.random_flip=False for their exact data), and
the UNet is called with the timestep indices 0..3999 themselves, where
improved-diffusion rescales them to 0..1000 by default (rescale_timesteps);
the sinusoidal embedding takes either. Their checkpoints do not load into this
UNet as they are: besides that rescaling, their timestep embedding is
[cos, sin] with frequencies exp(-log(10000) i / half) (ours, DDPM's, is
[sin, cos] with i / (half - 1)), their attention's qkv channels are laid out
per head, and their GroupNorm epsilon is 1e-5 (ours 1e-6, DDPM's).

Sampling uses 100 respaced steps (their sec. 4: learned variances keep
quality with few steps). The whole-split NLL at T = 4000 costs 4000 model
evaluations per image: run --mode=evaluate on an accelerator.
"""
from configs import cifar10


def get_config():
    config = cifar10.get_config()
    config.num_train_steps = 500_000

    config.model.num_res_blocks = 3
    config.model.attn_resolutions = (16, 8)
    config.model.num_heads = 4
    config.model.scale_shift_norm = True
    config.model.dropout = 0.3

    config.diffusion.num_timesteps = 4000
    config.diffusion.schedule = "cosine"
    config.diffusion.variance = "learned_range"
    config.diffusion.loss = "hybrid"
    config.diffusion.vlb_weight = 0.001

    config.optim.learning_rate = 1e-4
    config.optim.warmup_steps = 0
    config.optim.grad_clip = 0.0

    config.sample.sampler = "ddpm"
    config.sample.num_steps = 100
    return config

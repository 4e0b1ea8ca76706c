"""Throughput of Hugging Face diffusers (`UNet2DModel` + its schedulers).

The peer a PyTorch user would reach for first. `ddpm_cifar10` is the UNet of
the converted DDPM CIFAR-10 checkpoint (google/ddpm-cifar10-32; Ho et al.
2020), built from its published config with random weights (nothing is
downloaded) and checked at startup to have the paper's 35.7M parameters.
`tiny` and `adm_64` use the closest `UNet2DModel` configuration; see
`unet2d_config`.

Training step: `DDPMScheduler.add_noise` at uniform t, epsilon-prediction MSE
(Ho et al. 2020, eq. 14), backward, AdamW(lr 2e-4).
Sampling: the scheduler's `set_timesteps` / `step` loop, as `DDPMPipeline`
runs it: `DDPMScheduler` (ancestral, 1000 steps), `DDIMScheduler` (Song et al.
2021, eta 0), `DPMSolverMultistepScheduler` (DPM-Solver++(2M), Lu et al. 2022).

  python benchmarks/peers/diffusers_bench.py --workload ddpm_cifar10 --task train --batch 32
  python benchmarks/peers/diffusers_bench.py --workload tiny --task sample --sampler ddim --num-steps 50 --batch 64
"""

from __future__ import annotations

import sys
from typing import Any

import _torch_harness as harness
import _report  # noqa: E402  (on sys.path through _torch_harness)

import diffusers  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UNet2DModel,
)

IMPL = "diffusers"

# UNet2DModel config of google/ddpm-cifar10-32 (the converted DDPM CIFAR-10
# model). The hub config leaves dropout at its default 0.0 because it was
# written for inference; the paper trained with 0.1, as our workload does.
GOOGLE_DDPM_CIFAR10_UNET = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "freq_shift": 1,
    "flip_sin_to_cos": False,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (128, 256, 256, 256),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 0,
    "act_fn": "silu",
    "attention_head_dim": None,
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "dropout": 0.1,
}
# The google/ddpm-cifar10-32 scheduler config (fixed_large = sigma_t^2 = beta_t,
# the variance Ho et al. used on CIFAR-10).
GOOGLE_DDPM_CIFAR10_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "variance_type": "fixed_large",
    "clip_sample": True,
    "prediction_type": "epsilon",
}
DDPM_CIFAR10_PARAMS_M = 35.7  # Ho et al. 2020, Table 1 / Appendix B


def unet2d_config(w: harness.Workload) -> dict[str, Any]:
    """The `UNet2DModel` kwargs closest to workload `w`.

    Levels whose resolution is in `w.attn_resolutions` become Attn*Block2D.
    DDPM-family workloads take the DDPM conventions of the google config
    (sin-first timestep embedding with shift 1, asymmetric downsample padding,
    GroupNorm eps 1e-6); ADM-family ones take ADM's (cos-first embedding,
    scale-shift norm, residual up/downsampling blocks, 64-channel heads).
    """
    if w.name == "ddpm_cifar10":
        return dict(GOOGLE_DDPM_CIFAR10_UNET)
    attn = [r in w.attn_resolutions for r in w.level_resolutions()]
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    cfg: dict[str, Any] = {
        "sample_size": w.image_size,
        "in_channels": w.channels,
        "out_channels": w.channels,
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": tuple(w.level_channels()),
        "layers_per_block": w.num_res_blocks,
        "attention_head_dim": w.num_head_channels,
        "norm_num_groups": 32,
        "dropout": w.dropout,
        "act_fn": "silu",
    }
    if w.family == "ddpm":
        cfg.update(freq_shift=1, flip_sin_to_cos=False, downsample_padding=0, norm_eps=1e-6)
    else:
        cfg.update(freq_shift=0, flip_sin_to_cos=True, norm_eps=1e-5)
    if w.scale_shift_norm:
        cfg["resnet_time_scale_shift"] = "scale_shift"
    if w.resblock_updown:
        cfg.update(downsample_type="resnet", upsample_type="resnet")
    return cfg


def scheduler_config(w: harness.Workload) -> dict[str, Any]:
    cfg = dict(GOOGLE_DDPM_CIFAR10_SCHEDULER)
    cfg.update(num_train_timesteps=w.timesteps, beta_start=w.beta_start, beta_end=w.beta_end)
    return cfg


def build_unet(w: harness.Workload) -> UNet2DModel:
    unet = UNet2DModel(**unet2d_config(w))
    if w.name == "ddpm_cifar10":
        millions = round(harness.count_params(unet) / 1e6, 1)
        if millions != DDPM_CIFAR10_PARAMS_M:
            raise RuntimeError(
                f"UNet2DModel built from the google/ddpm-cifar10-32 config has {millions}M params, "
                f"expected {DDPM_CIFAR10_PARAMS_M}M: the config or diffusers changed")
    return unet


def sampling_scheduler(sampler: str, w: harness.Workload):
    cfg = scheduler_config(w)
    if sampler == "ddpm":
        return DDPMScheduler(**cfg)
    if sampler == "ddim":
        return DDIMScheduler.from_config(DDPMScheduler(**cfg).config)
    return DPMSolverMultistepScheduler.from_config(DDPMScheduler(**cfg).config)


def main(argv: list[str] | None = None) -> None:
    args = harness.parse_args(IMPL, argv)
    device = harness.setup_torch(args)
    w = args.workload_spec
    unet = build_unet(w).to(device)
    params = harness.count_params(unet)
    print(f"{IMPL} UNet2DModel for {w.name}: {params:,} params", file=sys.stderr)
    net = harness.maybe_compile(unet, args)
    shape = (args.batch, w.channels, w.image_size, w.image_size)
    notes = ["fixed synthetic batch on device", "network compiled with torch.compile"
             if args.compile else "eager"]

    if args.task == "train":
        unet.train()
        noise_scheduler = DDPMScheduler(**scheduler_config(w))
        optimizer = torch.optim.AdamW(unet.parameters(), lr=harness.LEARNING_RATE)
        x0 = torch.rand(shape, device=device) * 2 - 1

        def train_step():
            noise = torch.randn_like(x0)
            t = torch.randint(0, w.timesteps, (args.batch,), device=device)
            x_t = noise_scheduler.add_noise(x0, noise, t)
            with harness.autocast(args):
                eps = net(x_t, t).sample
            loss = F.mse_loss(eps.float(), noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss

        timing = harness.time_train(train_step, args, device)
    else:
        unet.eval()
        scheduler = sampling_scheduler(args.sampler, w)
        notes.append(f"{type(scheduler).__name__} set_timesteps({args.num_steps})/step loop")
        x_warm = torch.randn(shape, device=device)

        @torch.inference_mode()
        def warm_network():
            # A few distinct timesteps so a compiled graph sees t as data.
            for t in (w.timesteps - 1, w.timesteps // 2):
                with harness.autocast(args):
                    net(x_warm, torch.tensor(t, device=device)).sample

        @torch.inference_mode()
        def sample_run():
            scheduler.set_timesteps(args.num_steps, device=device)
            x = torch.randn(shape, device=device)
            for t in scheduler.timesteps:
                with harness.autocast(args):
                    eps = net(x, t).sample
                x = scheduler.step(eps.to(x.dtype), t, x).prev_sample
            return x

        timing = harness.time_sample(sample_run, warm_network, args, device)

    rec = harness.record(IMPL, args, device, params=params,
                         versions={"diffusers": diffusers.__version__}, timing=timing, notes=notes)
    harness.emit(rec)


if __name__ == "__main__":
    _report.run_script(main)

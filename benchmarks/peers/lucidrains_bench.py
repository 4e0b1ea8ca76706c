"""Throughput of lucidrains' denoising-diffusion-pytorch (`Unet` + `GaussianDiffusion`).

The most used stand-alone PyTorch DDPM. Its `Unet` has a fixed layout that
cannot express our workloads exactly, so `unet_kwargs` builds the closest one:

* two ResNet blocks per level on the way down and up (ours: `num_res_blocks`
  down, `num_res_blocks + 1` up);
* attention at every level: full softmax attention where the workload has
  attention, linear attention (Katharopoulos et al. 2020) elsewhere;
* RMSNorm instead of GroupNorm, a 7x7 input conv, pixel-unshuffle downsampling,
  and always scale-shift time conditioning.
Every record lists these in `notes` and prints its parameter count.

Training step: `GaussianDiffusion.forward` (uniform t, q_sample, epsilon
prediction MSE; Ho et al. 2020 eq. 14) on a batch in [0, 1], backward,
AdamW(lr 2e-4). Sampling: `GaussianDiffusion.sample`, i.e. `p_sample_loop`
(ancestral, all T steps) or `ddim_sample` (Song et al. 2021, eta 0). This peer
has no DPM-Solver; `--sampler dpmpp` exits with status 3.

torchvision: denoising_diffusion_pytorch imports `torchvision.transforms` and
`torchvision.utils` at module level for its Trainer and Dataset only. Where no
torchvision matching the installed torch imports (PyPI has only CUDA builds,
which fail to import against a CPU torch), `import_denoising_diffusion_pytorch`
puts a stub in its place; the record says which was used.

  python benchmarks/peers/lucidrains_bench.py --workload tiny --task train
  python benchmarks/peers/lucidrains_bench.py --workload tiny --task sample --sampler ddim --num-steps 50 --batch 64
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from typing import Any

import _torch_harness as harness
import _report  # noqa: E402  (on sys.path through _torch_harness)

import torch  # noqa: E402

IMPL = "lucidrains"
EXIT_UNSUPPORTED = 3
LAYOUT_NOTES = [
    "lucidrains Unet: 2 res blocks per level (fixed), linear attention at levels without "
    "full attention, RMSNorm, 7x7 init conv, scale-shift time conditioning",
]


def _torchvision_stub(reason: str) -> types.ModuleType:
    """A `torchvision` whose `transforms`/`utils` raise on first use, naming `reason`."""

    def submodule(name: str) -> types.ModuleType:
        mod = types.ModuleType(f"torchvision.{name}")
        mod.__spec__ = importlib.machinery.ModuleSpec(mod.__name__, None)

        def missing(attr: str):
            if attr.startswith("__"):
                raise AttributeError(attr)
            raise ImportError(
                f"torchvision.{name}.{attr} is a stub installed by lucidrains_bench.py "
                f"because torchvision could not be imported ({reason}); the benchmark "
                "only uses Unet and GaussianDiffusion, which never touch it")

        mod.__getattr__ = missing
        return mod

    stub = types.ModuleType("torchvision")
    stub.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    stub.__path__ = []
    stub.__version__ = "0+stub"
    for name in ("transforms", "utils"):
        sub = submodule(name)
        setattr(stub, name, sub)
        sys.modules[sub.__name__] = sub
    return stub


def import_denoising_diffusion_pytorch() -> tuple[types.ModuleType, str]:
    """Imports denoising_diffusion_pytorch; returns it and how torchvision was provided."""
    try:
        import torchvision

        how = f"torchvision {torchvision.__version__}"
    except Exception as e:  # ImportError, or RuntimeError from a CUDA build over a CPU torch
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = _torchvision_stub(reason)
        how = f"stub ({reason})"
    import denoising_diffusion_pytorch

    return denoising_diffusion_pytorch, how


def ddp_version() -> str:
    """The installed denoising-diffusion-pytorch version (the package has no __version__)."""
    from denoising_diffusion_pytorch.version import __version__

    return __version__


def unet_kwargs(w: harness.Workload) -> dict[str, Any]:
    """`Unet(**kwargs)` closest to workload `w` (see the module docstring).

    Levels with attention get full attention with one head over all channels
    (DDPM) or `channels // num_head_channels` heads (ADM). Other levels keep the
    library's default linear attention (4 heads of 32), except the innermost
    level, whose head settings the library also gives the middle block's full
    attention, so they are set to what our middle attention uses.
    """
    full = [r in w.attn_resolutions for r in w.level_resolutions()]

    def heads_and_dim(channels: int) -> tuple[int, int]:
        if w.num_head_channels is None:
            return 1, channels
        return channels // w.num_head_channels, w.num_head_channels

    heads, dim_head = [], []
    n = len(w.ch_mult)
    for i, (attn, channels) in enumerate(zip(full, w.level_channels())):
        h, d = heads_and_dim(channels) if attn or i == n - 1 else (4, 32)
        heads.append(h)
        dim_head.append(d)
    return {
        "dim": w.ch,
        "dim_mults": tuple(w.ch_mult),
        "channels": w.channels,
        "dropout": w.dropout,
        "full_attn": tuple(full),
        "attn_heads": tuple(heads),
        "attn_dim_head": tuple(dim_head),
        "flash_attn": False,  # Attend's flash path is torch SDPA; off by default in the library
    }


def main(argv: list[str] | None = None) -> None:
    args = harness.parse_args(IMPL, argv)
    if args.task == "sample" and args.sampler == "dpmpp":
        print("denoising-diffusion-pytorch has no DPM-Solver(++) sampler; "
              "use --sampler ddpm or ddim", file=sys.stderr)
        sys.exit(EXIT_UNSUPPORTED)
    ddp, torchvision_how = import_denoising_diffusion_pytorch()
    device = harness.setup_torch(args)
    w = args.workload_spec
    if args.task == "sample" and args.sampler == "ddpm" and args.num_steps != w.timesteps:
        print(f"denoising-diffusion-pytorch's ancestral sampler always runs all {w.timesteps} "
              f"steps; got --num-steps {args.num_steps}", file=sys.stderr)
        sys.exit(EXIT_UNSUPPORTED)

    if args.task == "sample" and args.sampler == "ddim" and args.num_steps >= w.timesteps:
        print(f"denoising-diffusion-pytorch runs DDIM only with fewer steps than T={w.timesteps} "
              f"(at T it runs the ancestral loop); got --num-steps {args.num_steps}", file=sys.stderr)
        sys.exit(EXIT_UNSUPPORTED)

    unet = ddp.Unet(**unet_kwargs(w))
    params = harness.count_params(unet)
    print(f"{IMPL} Unet for {w.name}: {params:,} params", file=sys.stderr)
    diffusion = ddp.GaussianDiffusion(
        unet, image_size=w.image_size, timesteps=w.timesteps,
        sampling_timesteps=args.num_steps if args.task == "sample" else None,
        objective="pred_noise", beta_schedule="linear",
    ).to(device)
    # GaussianDiffusion only calls self.model(...), so the compiled network slots in.
    diffusion.model = harness.maybe_compile(unet, args)
    shape = (args.batch, w.channels, w.image_size, w.image_size)
    notes = ["fixed synthetic batch on device",
             "network compiled with torch.compile" if args.compile else "eager",
             *LAYOUT_NOTES]

    if args.task == "train":
        diffusion.train()
        optimizer = torch.optim.AdamW(diffusion.parameters(), lr=harness.LEARNING_RATE)
        images = torch.rand(shape, device=device)  # the library normalizes [0, 1] -> [-1, 1]

        def train_step():
            with harness.autocast(args):
                loss = diffusion(images)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss

        timing = harness.time_train(train_step, args, device)
    else:
        diffusion.eval()
        notes.append("GaussianDiffusion.sample -> "
                     + ("ddim_sample (eta 0)" if diffusion.is_ddim_sampling else "p_sample_loop"))
        x_warm = torch.randn(shape, device=device)

        @torch.inference_mode()
        def warm_network():
            for t in (w.timesteps - 1, w.timesteps // 2):
                with harness.autocast(args):
                    diffusion.model(x_warm, torch.full((args.batch,), t, device=device, dtype=torch.long))

        @torch.inference_mode()
        def sample_run():
            with harness.autocast(args):
                return diffusion.sample(batch_size=args.batch)

        timing = harness.time_sample(sample_run, warm_network, args, device)

    rec = harness.record(
        IMPL, args, device, params=params,
        versions={"denoising_diffusion_pytorch": ddp_version(), "torchvision": torchvision_how},
        timing=timing, notes=notes)
    harness.emit(rec)


if __name__ == "__main__":
    _report.run_script(main)

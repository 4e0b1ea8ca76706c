"""The benchmark workloads of diffusion_jax's own scripts.

The same three architectures as the PyTorch peers (`benchmarks/peers/
_torch_harness.py`, `WORKLOADS`), written as our `UNetConfig` so that
`train_throughput.py` and `sample_throughput.py` build exactly the network the
peers time. `tests/test_benchmarks.py` checks field by field that the two
tables agree.

* `tiny`: a two-level UNet at 16x16x1 (ch 32, attention at 8x8), CPU-sized.
* `ddpm_cifar10`: the DDPM CIFAR-10 UNet (Ho et al. 2020, App. B), 35,746,307
  parameters at 32x32x3, attention at 16x16, dropout 0.1.
* `adm_64`: an ADM-style UNet at 64x64x3 (Dhariwal & Nichol 2021, sec. 3 and
  Table 10's 64x64 settings): ch 128, ch_mult (1, 2, 3, 4), 3 residual blocks,
  attention at 32, 16 and 8 with 64-channel heads, scale-shift norm, residual
  up/downsampling.

Every workload trains with the DDPM recipe: T = 1000, betas linear from 1e-4 to
0.02, epsilon prediction, the simple loss (Ho et al. 2020 eq. 14), Adam(W) at
lr 2e-4.
"""

from __future__ import annotations

import dataclasses

from diffusion_jax.models import UNetConfig

LEARNING_RATE = 2e-4


@dataclasses.dataclass(frozen=True)
class Workload:
    """One benchmark architecture and its data shape.

    Attributes:
      name: the workload's name on the command line.
      image_size: side of the square images.
      channels: image channels.
      unet: the network, float32; a script replaces `dtype` for a bfloat16 run.
      batch_cpu, batch_gpu: default batch per step / per sampling run.
      timesteps, beta_start, beta_end: the linear schedule of Ho et al. 2020.
    """

    name: str
    image_size: int
    channels: int
    unet: UNetConfig
    batch_cpu: int
    batch_gpu: int
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)``: our layout is NHWC (the peers' is NCHW)."""
        return (self.image_size, self.image_size, self.channels)

    def unet_config(self, dtype: str = "float32", attention_impl: str | None = None) -> UNetConfig:
        """The workload's UNetConfig with compute `dtype` and `attention_impl`."""
        return dataclasses.replace(self.unet, dtype=dtype, attention_impl=attention_impl)


WORKLOADS: dict[str, Workload] = {
    "tiny": Workload(
        name="tiny", image_size=16, channels=1,
        unet=UNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0),
        batch_cpu=32, batch_gpu=32,
    ),
    "ddpm_cifar10": Workload(
        name="ddpm_cifar10", image_size=32, channels=3,
        unet=UNetConfig(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                        dropout=0.1),
        batch_cpu=32, batch_gpu=128,
    ),
    "adm_64": Workload(
        name="adm_64", image_size=64, channels=3,
        unet=UNetConfig(ch=128, ch_mult=(1, 2, 3, 4), num_res_blocks=3, attn_resolutions=(32, 16, 8),
                        dropout=0.1, num_head_channels=64, scale_shift_norm=True, resblock_updown=True),
        batch_cpu=16, batch_gpu=64,
    ),
}


def get_workload(name: str) -> Workload:
    """The workload called `name`; raises ValueError naming the choices otherwise."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}")
    return WORKLOADS[name]

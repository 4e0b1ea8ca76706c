"""Class-conditional DDPM on CIFAR-10 with classifier-free guidance (Ho & Salimans 2022).

The DDPM CIFAR-10 recipe (cifar10.py) with a learned class embedding added to
the timestep embedding (10 classes, label 10 = "no class"). During training
each label is replaced by the null class with probability 0.1 (the paper's
p_uncond; its ImageNet 64x64 study, Table 1, compares 0.1, 0.2 and 0.5), so
one network learns both the conditional and the unconditional model. Samples
use the guided prediction (1 + w) eps(x, c) - w eps(x) (eq. 6) with w = 0.3
(the paper has no CIFAR-10 run: its best FID is at w = 0.1 on ImageNet 64x64
and at w = 0.3 on 128x128, Table 2; larger w trades diversity for fidelity),
one image per class in turn. The paper samples with its ancestral sampler
in 128-1024 steps (256 in most tables); this config uses 100 DDIM steps to
keep the samples drawn during training cheap (--mode=sample --sampler=ddpm
--num_steps=256 for the paper's).
"""
from configs import cifar10


def get_config():
    config = cifar10.get_config()
    config.model.num_classes = 10
    config.cond_drop_rate = 0.1
    config.sample.guidance_scale = 0.3
    config.sample.sampler = "ddim"
    config.sample.num_steps = 100
    return config

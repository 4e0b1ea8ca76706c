"""Class-conditional DDPM on CIFAR-10 with classifier-free guidance (Ho & Salimans 2022).

The DDPM CIFAR-10 recipe (cifar10.py) with a learned class embedding added to
the timestep embedding (10 classes, label 10 = "no class"). During training
each label is replaced by the null class with probability 0.1 (the paper's
p_uncond, its Table 1 uses 0.1 and 0.2), so one network learns both the
conditional and the unconditional model. Samples use the guided prediction
(1 + w) eps(x, c) - w eps(x) (eq. 6) with w = 0.3 (their best FID on
ImageNet 64x64), one image per class in turn, with 100 DDIM steps.
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

"""DDPM on CIFAR-10, exactly as Ho et al. 2020 (sec. 4 and App. B).

T = 1000, betas linear from 1e-4 to 0.02, eps prediction, the simple loss
(eq. 14), reverse variance sigma_t^2 = beta_t ("fixed_large", the setting of
their CIFAR-10 samples), Adam with lr 2e-4 after a 5000-step linear warmup,
gradients clipped to global norm 1, batch 128, EMA 0.9999, dropout 0.1,
random horizontal flips, 800k steps; the 35.7M-parameter UNet: ch 128,
ch_mult (1, 2, 2, 2), 2 residual blocks per resolution, attention at 16x16.

`default.py` already holds this recipe; the values are restated here so this
file reads as the paper's table (and tests check them against it).

Needs CIFAR-10 prepared as array_record in data.data_dir (see the README):
    python train.py --config=configs/cifar10.py --workdir=/path/to/run \
        --config.data.data_dir=/path/to/tensorflow_datasets
"""
from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "cifar10"
    config.data.image_size = 32
    config.data.random_flip = True

    config.num_train_steps = 800_000
    config.batch_size = 128
    config.ema_decay = 0.9999

    config.model.ch = 128
    config.model.ch_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.1

    config.diffusion.num_timesteps = 1000
    config.diffusion.schedule = "linear"
    config.diffusion.prediction = "eps"
    config.diffusion.variance = "fixed_large"
    config.diffusion.loss = "simple"

    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 5000
    config.optim.grad_clip = 1.0
    config.optim.weight_decay = 0.0
    config.optim.decay = "constant"
    return config

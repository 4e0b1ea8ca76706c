"""A tiny training config for tests/test_reliability.py (a train.py --config file).

    python train.py --config=tests/_reliability_helpers.py --workdir=/tmp/run \
        --config.data.data_dir=/tmp/tfds

A one-level UNet on 8x8 digits with T=100, so that a child process running
train.py spends a few seconds, most of them importing and compiling.
"""
from configs import digits


def get_config():
    config = digits.get_config()
    config.num_train_steps = 20
    config.batch_size = 16
    config.log_every_steps = 5
    config.checkpoint_every_steps = 10
    config.eval_every_steps = 0
    config.ema_decay = 0.9
    config.max_consecutive_nonfinite = 5

    config.model.ch = 32
    config.model.ch_mult = (1,)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = ()

    config.diffusion.num_timesteps = 100
    # Written out (the linear defaults, scaled by 1000/T) so that tests can override them.
    config.diffusion.schedule_kwargs.beta_start = 1e-4
    config.diffusion.schedule_kwargs.beta_end = 0.02

    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 5

    config.sample.sampler = "ddim"
    config.sample.num_steps = 5
    config.sample.num_images = 0  # no grids while training
    config.eval.batch_size = 104  # 297 test images: 3 batches, the last padded
    config.eval.nll_at_end = False
    config.checkpoint.max_to_keep = 10
    return config

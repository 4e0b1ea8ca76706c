"""diffusion_jax: denoising diffusion probabilistic models in JAX/Flax.

The math is pure functions of arrays and a :class:`DiffusionSchedule` pytree;
jit, vmap and device mapping are the caller's (see ``diffusion_jax.training``).
"""

from diffusion_jax._checks import PREDICTIONS, VARIANCES
from diffusion_jax.diffusion import (
    PMeanVariance,
    eps_from_prediction,
    eps_from_v,
    eps_from_x0,
    p_mean_variance,
    prediction_target,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
    v_from_x0_eps,
    x0_from_eps,
    x0_from_prediction,
    x0_from_v,
)
from diffusion_jax.learned_schedule import LearnedSchedule
from diffusion_jax.losses import (
    LOSSES,
    LossHistory,
    TrainingLosses,
    discretized_gaussian_log_likelihood,
    init_loss_history,
    min_snr_weight,
    normal_kl,
    prior_bpd,
    sample_timesteps,
    timestep_probs,
    training_losses,
    update_loss_history,
    vlb_term,
)
from diffusion_jax.nll import NLL, nll_bpd
from diffusion_jax.sampling import SAMPLERS, SPACINGS, classifier_free_guidance, sample
from diffusion_jax.schedules import (
    SCHEDULE_NAMES,
    DiffusionSchedule,
    evenly_spaced_timesteps,
    log_snr_spaced_timesteps,
    make_schedule,
    respace,
    schedule_from_alphas_cumprod,
    schedule_from_betas,
    schedule_from_log_snr,
)

__version__ = "0.1.0"

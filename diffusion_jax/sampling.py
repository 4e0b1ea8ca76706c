"""Reverse-process samplers, each one ``lax.scan`` over the timesteps.

``sample`` is jittable as a whole (``model_fn``, ``shape`` and the keyword
options static; with ``num_steps``, log-SNR spacing, the default of
dpm_solver++, chooses its rows from the schedule's values, so the schedule
must then be concrete: closed over, not a traced argument, or use
``spacing="time"``). Its compile time does not grow with the number of steps
because the step is traced once.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import _checks
from diffusion_jax.diffusion import (
    eps_from_x0,
    p_mean_variance,
    split_model_output,
    x0_from_prediction,
)
from diffusion_jax.losses import ModelFn
from diffusion_jax.schedules import DiffusionSchedule, evenly_spaced_timesteps, log_snr_spaced_timesteps, respace

SAMPLERS = ("ddpm", "ddim", "dpm_solver++")
SPACINGS = ("time", "log_snr")


def _row_batch(row: jax.Array, batch: int) -> jax.Array:
    return jnp.full((batch,), row, jnp.int32)


def _predicted_x0(model_fn, schedule, x, t, prediction, variance, clip_denoised):
    """x0_hat from one model call, in x's dtype (the scan carry's), clipped to [-1, 1] if asked."""
    output = model_fn(x, schedule.timesteps[t])
    _checks.check_model_output(output, x, variance)
    pred, _ = split_model_output(output, variance)
    x0 = x0_from_prediction(schedule, prediction, x, t, pred).astype(x.dtype)
    return jnp.clip(x0, -1.0, 1.0) if clip_denoised else x0


def _step_noise(key, row, x):
    """z for the step at ``row``: drawn in float32 whatever x's dtype, so a float64 run sees the same noise."""
    return jax.random.normal(jax.random.fold_in(key, row), x.shape, jnp.float32).astype(x.dtype)


def _ddpm_step(model_fn, schedule, key, prediction, variance, clip_denoised):
    """Ancestral sampling, Ho et al. 2020 Algorithm 2: x_{t-1} = mu_theta + sigma_t z, z = 0 at the last step."""

    def step(carry, row):
        x = carry
        t = _row_batch(row, x.shape[0])
        out = p_mean_variance(
            schedule,
            model_fn(x, schedule.timesteps[t]),
            x,
            t,
            prediction=prediction,
            variance=variance,
            clip_denoised=clip_denoised,
        )
        noise = _step_noise(key, row, x)
        x = (out.mean + jnp.where(row > 0, jnp.exp(0.5 * out.log_variance), 0.0) * noise).astype(x.dtype)
        return x, x

    return step


def _ddim_step(model_fn, schedule, key, prediction, variance, clip_denoised, eta):
    """DDIM, Song et al. 2021 eq. 12 with sigma_t(eta) of their eq. 16.

    x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1} - sigma_t^2) eps_hat + sigma_t z,
    sigma_t = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1}).
    eps_hat is recomputed from the (possibly clipped) x0_hat, as improved DDPM does.
    """

    def step(carry, row):
        x = carry
        t = _row_batch(row, x.shape[0])
        x0 = _predicted_x0(model_fn, schedule, x, t, prediction, variance, clip_denoised)
        eps = eps_from_x0(schedule, x, t, x0)
        beta, one_minus = schedule.betas[row], schedule.one_minus_alphas_cumprod[row]
        # At row 0, 1 - abar_{-1} = 0 and both coefficients below are 0; they are computed
        # from a stand-in 1 there so that no sqrt(0) puts inf * 0 into a schedule's gradient.
        last = row == 0
        one_minus_prev = jnp.where(last, 1.0, schedule.one_minus_alphas_cumprod[jnp.maximum(row - 1, 0)])
        sigma = jnp.where(last, 0.0, eta * jnp.sqrt(one_minus_prev * beta / one_minus))
        # 1 - abar_{t-1} - sigma^2 rewritten without cancellation (it nears 0 where beta -> 1):
        # (1 - abar_{t-1}) (alpha_t (1 - abar_{t-1}) + (1 - eta^2) beta_t) / (1 - abar_t).
        eps_coef = jnp.sqrt(one_minus_prev * ((1.0 - beta) * one_minus_prev + (1.0 - eta**2) * beta) / one_minus)
        eps_coef = jnp.where(last, 0.0, eps_coef)
        mean = jnp.sqrt(schedule.alphas_cumprod_prev[row]) * x0 + eps_coef * eps
        noise = _step_noise(key, row, x)
        x = (mean + sigma * noise).astype(x.dtype)
        return x, x

    return step


def _dpm_solver_pp_2m_step(model_fn, schedule, prediction, variance, clip_denoised):
    """DPM-Solver++(2M), Lu et al. 2022 Algorithm 2 (multistep, data prediction).

    With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t)
    and h_i = lambda_{t_i} - lambda_{t_{i-1}}:
      x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i,
      D_i = (1 + 1/(2 r_i)) x0_hat(t_{i-1}) - 1/(2 r_i) x0_hat(t_{i-2}),  r_i = h_{i-1} / h_i,
    with D_i = x0_hat(t_{i-1}) at the first step (DPM-Solver++(1) = DDIM). The
    last model evaluation, at row 0, returns its x0_hat: the step to sigma = 0.
    """
    log_alpha = 0.5 * jnp.log(schedule.alphas_cumprod)
    log_sigma = 0.5 * jnp.log(schedule.one_minus_alphas_cumprod)
    lam = log_alpha - log_sigma

    def step(carry, row):
        x, x0_prev, h_prev, first = carry
        t = _row_batch(row, x.shape[0])
        x0 = _predicted_x0(model_fn, schedule, x, t, prediction, variance, clip_denoised)
        nxt = jnp.maximum(row - 1, 0)
        h = lam[nxt] - lam[row]
        # h = 0 at row 0, where x0_hat is returned: a stand-in keeps r finite for gradients.
        r = h_prev / jnp.where(row > 0, h, 1.0)
        d = jnp.where(first, x0, (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev)
        x_next = jnp.exp(log_sigma[nxt] - log_sigma[row]) * x - jnp.exp(log_alpha[nxt]) * jnp.expm1(-h) * d
        x_next = jnp.where(row > 0, x_next, x0).astype(x.dtype)
        return (x_next, x0, h, jnp.zeros_like(first)), x_next

    return step


def sample(
    model_fn: ModelFn,
    schedule: DiffusionSchedule,
    shape: Sequence[int],
    key: jax.Array,
    *,
    sampler: str = "ddpm",
    num_steps: int | None = None,
    spacing: str | None = None,
    eta: float = 0.0,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = True,
    x_T: jax.Array | None = None,
    return_trajectory: bool = False,
) -> jax.Array:
    """Draws samples from the reverse process p_theta.

    Samplers:
      - ``"ddpm"``: ancestral sampling (Ho et al. 2020 Algorithm 2) with the
        ``variance`` of :func:`p_mean_variance`, on the full or respaced schedule.
      - ``"ddim"``: Song et al. 2021 eq. 12 with ``eta`` in [0, 1] (0: the
        deterministic DDIM, 1: DDPM-like noise).
      - ``"dpm_solver++"``: DPM-Solver++(2M) (Lu et al. 2022), for 10-25 steps.

    With ``num_steps`` the schedule is first respaced to that many steps,
    always keeping the first and last rows; without it the schedule's own rows
    are used, so a schedule from :func:`respace` can be passed directly.
    ``spacing`` picks the kept rows: ``"time"`` evenly in t (Nichol & Dhariwal
    2021; the default for ddpm and ddim) or ``"log_snr"`` evenly in log-SNR
    (Lu et al. 2022 sec. 3.3; the default for dpm_solver++, and the better
    choice for few-step DDIM on low-resolution data).
    The model is always called with the original training timesteps.
    The sampler's state is float32, or float64 for a float64 ``x_T`` (with
    ``jax_enable_x64``); model outputs of other dtypes (bfloat16, float64) are
    cast to it at every step.

    Args:
      model_fn: ``model_fn(x_t, timesteps) -> output`` with int32 ``[B]``
        timesteps; close over parameters and conditioning (see
        :func:`classifier_free_guidance`).
      schedule: the diffusion schedule the model was trained on, or a respacing of it.
      shape: the sample batch shape ``[B, ...]``.
      key: PRNG key. x_T comes from one half, the per-step noise from
        ``fold_in(other half, row)``.
      sampler: ``"ddpm"``, ``"ddim"`` or ``"dpm_solver++"``.
      num_steps: respace to this many steps, or None.
      spacing: ``"time"``, ``"log_snr"`` or None for the sampler's default;
        only with ``num_steps``.
      eta: DDIM's stochasticity, in [0, 1]; only ``"ddim"`` takes a nonzero
        one (or a traced one, whose range cannot be checked: outside [0, 1]
        the samples are NaN).
      prediction: the model's prediction type, ``"eps"``, ``"x0"`` or ``"v"``.
      variance: ``"fixed_small"``, ``"fixed_large"`` or ``"learned_range"`` (the
        last means the model outputs 2C channels; DDIM and DPM-Solver++ use
        only the prediction channels).
      clip_denoised: clip the predicted x_0 to [-1, 1] at every step.
      x_T: starting noise of ``shape``, or None to draw it.
      return_trajectory: also return every intermediate x.

    Returns:
      Samples ``shape``; with ``return_trajectory``, ``(samples, trajectory)``
      where ``trajectory`` is ``[num_steps + 1, *shape]``, x_T first.
    """
    _checks.check_choice("sampler", sampler, SAMPLERS)
    _checks.check_choice("prediction", prediction, _checks.PREDICTIONS)
    _checks.check_choice("variance", variance, _checks.VARIANCES)
    try:
        shape = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints, got {shape!r}") from None
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be [B, ...] with rank >= 2 and positive sizes, got {shape}")
    if not isinstance(eta, jax.core.Tracer):
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        if sampler != "ddim" and float(eta) != 0.0:
            raise ValueError(f"eta={eta} applies to sampler='ddim' only; {sampler!r} has no eta")
    elif sampler != "ddim":  # it would be ignored, whatever its value
        raise ValueError(f"a traced eta applies to sampler='ddim' only; {sampler!r} has no eta (pass eta=0.0)")
    dtype = jnp.float32
    if x_T is not None:
        _checks.check_batch("x_T", x_T)
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
        dtype = jnp.promote_types(x_T.dtype, jnp.float32)
    if spacing is not None and num_steps is None:
        raise ValueError(f"spacing={spacing!r} chooses the rows kept by num_steps; give num_steps too")
    if spacing is None:
        spacing = "log_snr" if sampler == "dpm_solver++" else "time"
    _checks.check_choice("spacing", spacing, SPACINGS)
    if num_steps is not None:
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
            raise TypeError(f"num_steps must be an int or None, got {num_steps!r}")
        if num_steps != schedule.num_timesteps:
            if spacing == "time":
                rows = evenly_spaced_timesteps(schedule.num_timesteps, num_steps)
            else:
                rows = log_snr_spaced_timesteps(schedule, num_steps)
            schedule = respace(schedule, rows)

    key_x_T, key_steps = jax.random.split(key)
    x = jax.random.normal(key_x_T, shape, dtype) if x_T is None else jnp.asarray(x_T, dtype)
    rows = jnp.arange(schedule.num_timesteps - 1, -1, -1, dtype=jnp.int32)

    if sampler == "ddpm":
        step = _ddpm_step(model_fn, schedule, key_steps, prediction, variance, clip_denoised)
        init = x
    elif sampler == "ddim":
        step = _ddim_step(model_fn, schedule, key_steps, prediction, variance, clip_denoised, eta)
        init = x
    else:
        step = _dpm_solver_pp_2m_step(model_fn, schedule, prediction, variance, clip_denoised)
        init = (x, jnp.zeros_like(x), jnp.ones((), jnp.float32), jnp.ones((), bool))

    if return_trajectory:
        final, xs = jax.lax.scan(step, init, rows)
    else:
        final, xs = jax.lax.scan(lambda c, r: (step(c, r)[0], None), init, rows)
    samples = final if sampler != "dpm_solver++" else final[0]
    if return_trajectory:
        return samples, jnp.concatenate([x[None], xs], axis=0)
    return samples


def classifier_free_guidance(
    model_fn,
    labels: jax.Array,
    *,
    guidance_scale: float,
    null_label: int,
    variance: str = "fixed_small",
) -> ModelFn:
    """Turns a conditional ``model_fn(x, t, y)`` into a guided ``model_fn(x, t)`` (Ho & Salimans 2022 eq. 6).

    output = (1 + w) model(x, t, y) - w model(x, t, null), with w =
    ``guidance_scale``. The conditional and unconditional halves run as one
    batch of 2B; a concrete w = 0 is plain conditional sampling and runs the
    conditional model alone. With learned variance the combination applies to
    the prediction channels; the variance channels are the conditional ones.

    Args:
      model_fn: ``model_fn(x, t, y) -> output``.
      labels: int ``[B]`` class labels, one per sample.
      guidance_scale: w >= 0.
      null_label: the label id the model was trained with for "no class"
        (our UNet's is ``num_classes``), an int >= 0.
      variance: the model's variance type, to find its prediction channels.

    Returns:
      ``guided(x, t) -> output``.
    """
    _checks.check_choice("variance", variance, _checks.VARIANCES)
    if not isinstance(guidance_scale, jax.core.Tracer) and guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    null_label = _checks.as_nonnegative_int("null_label", null_label)
    labels = jnp.asarray(labels)
    if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be an int [B] array, got shape {labels.shape} dtype {labels.dtype}")
    unguided = not isinstance(guidance_scale, jax.core.Tracer) and guidance_scale == 0

    def guided(x: jax.Array, t: jax.Array) -> jax.Array:
        if x.shape[0] != labels.shape[0]:
            raise ValueError(f"batch of x ({x.shape[0]}) must match the number of labels ({labels.shape[0]})")
        if unguided:
            return model_fn(x, t, labels)
        y = jnp.concatenate([labels, jnp.full_like(labels, null_label)])
        out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), y)
        cond, uncond = jnp.split(out, 2)
        pred_c, var_c = split_model_output(cond, variance)
        pred_u, _ = split_model_output(uncond, variance)
        pred = pred_c + guidance_scale * (pred_c - pred_u)
        return pred if var_c is None else jnp.concatenate([pred, var_c], axis=-1)

    return guided

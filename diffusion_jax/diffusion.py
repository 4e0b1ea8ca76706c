"""The forward process, its posterior, and the reverse-process Gaussian.

All functions take a :class:`~diffusion_jax.schedules.DiffusionSchedule`, a
batch ``[B, ...]`` and row indices ``t`` of shape ``[B]``, and return arrays of
the batch's shape. They know nothing of devices or training state.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from diffusion_jax import _checks
from diffusion_jax.schedules import DiffusionSchedule


def extract(table: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """``table[t]`` shaped ``[B, 1, ..., 1]`` to broadcast against a rank-``ndim`` batch."""
    return table[t].reshape(t.shape + (1,) * (ndim - 1))


def _check(schedule: DiffusionSchedule, x: jax.Array, t: jax.Array, name: str = "x") -> None:
    _checks.check_batch(name, x)
    _checks.check_timesteps(t, x.shape[0], schedule.num_timesteps)


def q_sample(schedule: DiffusionSchedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(alphabar_t) x_0 + sqrt(1 - alphabar_t) eps, a draw of q(x_t | x_0) (Ho et al. 2020 eq. 4).

    Args:
      schedule: the diffusion schedule.
      x0: clean data ``[B, ...]``.
      t: int ``[B]`` row indices.
      noise: eps ~ N(0, I), shaped like ``x0``.

    Returns:
      x_t, shaped like ``x0``.
    """
    _check(schedule, x0, t, "x0")
    _checks.check_same_shape(x0=x0, noise=noise)
    a = extract(jnp.sqrt(schedule.alphas_cumprod), t, x0.ndim)
    s = extract(jnp.sqrt(schedule.one_minus_alphas_cumprod), t, x0.ndim)
    return a * x0 + s * noise


def q_mean_variance(schedule: DiffusionSchedule, x0: jax.Array, t: jax.Array):
    """Mean sqrt(alphabar_t) x_0, variance and log variance 1 - alphabar_t of q(x_t | x_0) (Ho et al. eq. 4)."""
    _check(schedule, x0, t, "x0")
    mean = extract(jnp.sqrt(schedule.alphas_cumprod), t, x0.ndim) * x0
    var = jnp.broadcast_to(extract(schedule.one_minus_alphas_cumprod, t, x0.ndim), x0.shape)
    return mean, var, jnp.log(var)


def q_posterior_mean_variance(schedule: DiffusionSchedule, x0: jax.Array, x_t: jax.Array, t: jax.Array):
    """The forward-process posterior q(x_{t-1} | x_t, x_0) = N(tilde-mu_t, tilde-beta_t I) (Ho et al. eqs. 6-7).

    tilde-mu_t = sqrt(alphabar_{t-1}) beta_t / (1 - alphabar_t) x_0
               + sqrt(alpha_t) (1 - alphabar_{t-1}) / (1 - alphabar_t) x_t,
    tilde-beta_t = (1 - alphabar_{t-1}) / (1 - alphabar_t) beta_t.

    Returns:
      ``(mean, variance, log_variance)``, each shaped like ``x_t``; the log
      variance is clipped at t = 0 to the t = 1 value, as in the original code,
      because tilde-beta_0 = 0.
    """
    _check(schedule, x_t, t, "x_t")
    _checks.check_same_shape(x0=x0, x_t=x_t)
    nd = x_t.ndim
    mean = extract(schedule.posterior_mean_coef1, t, nd) * x0 + extract(schedule.posterior_mean_coef2, t, nd) * x_t
    var = jnp.broadcast_to(extract(schedule.posterior_variance, t, nd), x_t.shape)
    log_var = jnp.broadcast_to(extract(schedule.posterior_log_variance_clipped, t, nd), x_t.shape)
    return mean, var, log_var


# --- Prediction types ---------------------------------------------------------
# With a_t = sqrt(alphabar_t), s_t = sqrt(1 - alphabar_t) and x_t = a_t x_0 + s_t eps,
# v = a_t eps - s_t x_0 (Salimans & Ho 2022, sec. 4 and App. D). Each pair of
# (x_t, one prediction) determines the other two.


def _coefs(schedule: DiffusionSchedule, x: jax.Array, t: jax.Array, name: str, **same_shape):
    """(sqrt(alphabar_t), sqrt(1 - alphabar_t)) shaped to broadcast against ``x``.

    Checks t, and that the arrays in ``same_shape`` have ``x``'s shape (no silent broadcasting).
    """
    _check(schedule, x, t, name)
    _checks.check_same_shape(**{name: x}, **same_shape)
    return (
        extract(jnp.sqrt(schedule.alphas_cumprod), t, x.ndim),
        extract(jnp.sqrt(schedule.one_minus_alphas_cumprod), t, x.ndim),
    )


def x0_from_eps(schedule: DiffusionSchedule, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """x_0 = (x_t - sqrt(1 - alphabar_t) eps) / sqrt(alphabar_t) (Ho et al. eq. 4 solved for x_0)."""
    a, s = _coefs(schedule, x_t, t, "x_t", eps=eps)
    return (x_t - s * eps) / a


def eps_from_x0(schedule: DiffusionSchedule, x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
    """eps = (x_t - sqrt(alphabar_t) x_0) / sqrt(1 - alphabar_t) (Ho et al. eq. 4 solved for eps)."""
    a, s = _coefs(schedule, x_t, t, "x_t", x0=x0)
    return (x_t - a * x0) / s


def x0_from_v(schedule: DiffusionSchedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """x_0 = sqrt(alphabar_t) x_t - sqrt(1 - alphabar_t) v (Salimans & Ho 2022)."""
    a, s = _coefs(schedule, x_t, t, "x_t", v=v)
    return a * x_t - s * v


def eps_from_v(schedule: DiffusionSchedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """eps = sqrt(1 - alphabar_t) x_t + sqrt(alphabar_t) v (Salimans & Ho 2022)."""
    a, s = _coefs(schedule, x_t, t, "x_t", v=v)
    return s * x_t + a * v


def v_from_x0_eps(schedule: DiffusionSchedule, x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """v = sqrt(alphabar_t) eps - sqrt(1 - alphabar_t) x_0 (Salimans & Ho 2022, sec. 4)."""
    a, s = _coefs(schedule, x0, t, "x0", eps=eps)
    return a * eps - s * x0


def x0_from_prediction(schedule: DiffusionSchedule, prediction: str, x_t, t, pred) -> jax.Array:
    """x_0 implied by a model prediction of type ``"eps"``, ``"x0"`` or ``"v"``."""
    _checks.check_choice("prediction", prediction, _checks.PREDICTIONS)
    if prediction == "eps":
        return x0_from_eps(schedule, x_t, t, pred)
    if prediction == "v":
        return x0_from_v(schedule, x_t, t, pred)
    _checks.check_same_shape(x_t=x_t, pred=pred)
    return pred


def eps_from_prediction(schedule: DiffusionSchedule, prediction: str, x_t, t, pred) -> jax.Array:
    """eps implied by a model prediction of type ``"eps"``, ``"x0"`` or ``"v"``."""
    _checks.check_choice("prediction", prediction, _checks.PREDICTIONS)
    if prediction == "eps":
        _checks.check_same_shape(x_t=x_t, pred=pred)
        return pred
    if prediction == "v":
        return eps_from_v(schedule, x_t, t, pred)
    return eps_from_x0(schedule, x_t, t, pred)


def prediction_target(schedule: DiffusionSchedule, prediction: str, x0, noise, t) -> jax.Array:
    """What a model of the given prediction type is trained to output, shaped like ``x0``.

    ``"eps"``: the noise (Ho et al. eq. 14); ``"x0"``: the data; ``"v"``:
    sqrt(alphabar_t) eps - sqrt(1 - alphabar_t) x_0 (Salimans & Ho 2022 sec. 4).
    """
    _checks.check_choice("prediction", prediction, _checks.PREDICTIONS)
    _checks.check_same_shape(x0=x0, noise=noise)
    if prediction == "eps":
        return noise
    if prediction == "v":
        return v_from_x0_eps(schedule, x0, noise, t)
    return x0


# --- The reverse process --------------------------------------------------------


@flax.struct.dataclass
class PMeanVariance:
    """p_theta(x_{t-1} | x_t) = N(mean, exp(log_variance)) and the x_0 it implies.

    Every field has the shape of x_t.
    """

    mean: jax.Array
    variance: jax.Array
    log_variance: jax.Array
    pred_x0: jax.Array


def split_model_output(model_output: jax.Array, variance: str):
    """``(prediction, v_or_None)``: with learned variance the last axis holds [prediction, v]."""
    if variance == "learned_range":
        c = model_output.shape[-1] // 2
        return model_output[..., :c], model_output[..., c:]
    return model_output, None


def p_mean_variance(
    schedule: DiffusionSchedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = True,
) -> PMeanVariance:
    """The reverse-process Gaussian p_theta(x_{t-1} | x_t) from a model output.

    The mean is the posterior mean tilde-mu_t(x_t, hat-x_0) with hat-x_0 implied
    by the prediction (Ho et al. 2020 eqs. 7, 11; clipped to [-1, 1] when
    ``clip_denoised``). The variance is

    - ``"fixed_small"``: tilde-beta_t, the posterior variance (log clipped at t=0);
    - ``"fixed_large"``: beta_t, with the t = 0 entry set to tilde-beta_1 as in
      the original code (Ho et al. sec. 3.2: both are optimal in limiting cases);
    - ``"learned_range"``: the model output carries 2C channels, the prediction
      then v, and log Sigma = u log beta_t + (1 - u) log tilde-beta_t with
      u = (v + 1) / 2 (Nichol & Dhariwal 2021 eq. 15).

    Args:
      schedule: the diffusion schedule.
      model_output: ``[B, ..., C]`` (or ``[B, ..., 2C]`` with learned variance).
      x_t: ``[B, ..., C]``.
      t: int ``[B]`` row indices.
      prediction: ``"eps"``, ``"x0"`` or ``"v"``.
      variance: ``"fixed_small"``, ``"fixed_large"`` or ``"learned_range"``.
      clip_denoised: clip hat-x_0 to [-1, 1] (image data).

    Returns:
      A :class:`PMeanVariance`.
    """
    _checks.check_choice("prediction", prediction, _checks.PREDICTIONS)
    _checks.check_choice("variance", variance, _checks.VARIANCES)
    _check(schedule, x_t, t, "x_t")
    _checks.check_model_output(model_output, x_t, variance)
    nd = x_t.ndim
    pred, v = split_model_output(model_output, variance)

    min_log = extract(schedule.posterior_log_variance_clipped, t, nd)
    if variance == "fixed_small":
        log_var = jnp.broadcast_to(min_log, x_t.shape)
    elif variance == "fixed_large":
        first = schedule.posterior_variance[1:2] if schedule.num_timesteps > 1 else schedule.betas[:1]
        log_table = jnp.log(jnp.concatenate([first, schedule.betas[1:]]))
        log_var = jnp.broadcast_to(extract(log_table, t, nd), x_t.shape)
    else:
        max_log = extract(jnp.log(schedule.betas), t, nd)
        frac = (v.astype(jnp.float32) + 1.0) / 2.0
        log_var = frac * max_log + (1.0 - frac) * min_log

    pred_x0 = x0_from_prediction(schedule, prediction, x_t, t, pred)
    if clip_denoised:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    mean, _, _ = q_posterior_mean_variance(schedule, pred_x0, x_t, t)
    return PMeanVariance(mean=mean, variance=jnp.exp(log_var), log_variance=log_var, pred_x0=pred_x0)

"""Variational-bound terms, training losses and timestep sampling.

Every loss returns one value per example (``[B]``); the caller averages,
weights or reduces across devices.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr

from diffusion_jax import _checks
from diffusion_jax.diffusion import (
    extract,
    p_mean_variance,
    prediction_target,
    q_posterior_mean_variance,
    q_sample,
    split_model_output,
)
from diffusion_jax.schedules import DiffusionSchedule

LOSSES = ("simple", "vlb", "hybrid")
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def mean_over_nonbatch(x: jax.Array) -> jax.Array:
    """Mean over every axis but the first: ``[B, ...] -> [B]``."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats.

    = 1/2 (-1 + logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^(-logvar2)).
    """
    # (logvar2 - logvar1) first, so KL(p || p) is exactly 0 rather than an ulp of 1 + |logvar|.
    return 0.5 * (-1.0 + (logvar2 - logvar1) + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _log_ndtr_diff(hi: jax.Array, lo: jax.Array) -> jax.Array:
    """log(Phi(hi) - Phi(lo)) for hi > lo, without cancellation in either tail.

    Where both are positive, use Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi).
    """
    flip = lo > 0
    a = jnp.where(flip, -lo, hi)
    b = jnp.where(flip, -hi, lo)
    la, lb = log_ndtr(a), log_ndtr(b)
    return la + _log1mexp(jnp.minimum(lb - la, -1e-30))


def _log1mexp(d: jax.Array) -> jax.Array:
    """log(1 - e^d) for d < 0, accurate at both ends (Maechler 2012, "Accurately
    computing log(1 - exp(-|a|))"): log(-expm1(d)) for d > -ln 2, log1p(-e^d) below.

    Each branch gets an input it is finite at, so the unused one cannot put a
    NaN into the gradient.
    """
    near_zero = d > -math.log(2.0)
    return jnp.where(
        near_zero,
        jnp.log(-jnp.expm1(jnp.where(near_zero, d, -1.0))),
        jnp.log1p(-jnp.exp(jnp.where(near_zero, -1.0, d))),
    )


def discretized_gaussian_log_likelihood(x: jax.Array, *, means: jax.Array, log_scales: jax.Array) -> jax.Array:
    """log p(x) of 8-bit data under a Gaussian discretized to 256 bins (Ho et al. 2020 eq. 13).

    Data scaled to [-1, 1] has bin centres x = 2k/255 - 1 and bin edges
    x +- 1/255; the first and last bins extend to -inf and +inf, so the 256
    probabilities sum to 1.

    Args:
      x: data on the 8-bit grid in [-1, 1], any shape.
      means: Gaussian means, broadcastable to ``x``.
      log_scales: log standard deviations, broadcastable to ``x``.

    ``x`` in a dtype narrower than float32 is first put back on the grid, in
    float32: bfloat16 holds 2k/255 - 1 only to within ~0.24 of a bin, and the
    bins would shift with it.

    Returns:
      Elementwise log-likelihoods in nats, shaped like ``x``.
    """
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).nmant < 23:
        x = jnp.round((x.astype(jnp.float32) + 1.0) * 127.5) / 127.5 - 1.0
    inv_std = jnp.exp(-log_scales)
    centered = x - means
    hi = inv_std * (centered + 1.0 / 255.0)
    lo = inv_std * (centered - 1.0 / 255.0)
    return jnp.where(
        x < -0.999,
        log_ndtr(hi),  # log Phi(hi): the lowest bin reaches -inf
        jnp.where(x > 0.999, log_ndtr(-lo), _log_ndtr_diff(hi, lo)),  # log(1 - Phi(lo)) for the highest
    )


def vlb_term(
    schedule: DiffusionSchedule,
    model_output: jax.Array,
    x0: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = True,
) -> jax.Array:
    """One term of the variational bound, in bits per dimension (Ho et al. 2020 eq. 5).

    For t > 0 (1-based t > 1): L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)).
    For t = 0: L_0 = -log p_theta(x_0 | x_1) under the discretized Gaussian
    decoder of eq. 13. Both are averaged over dimensions and divided by log 2.

    Args:
      schedule: the diffusion schedule.
      model_output: the model's output at (x_t, timesteps[t]).
      x0: data ``[B, ...]`` in [-1, 1] (on the 8-bit grid for the t = 0 term).
      x_t: a draw of q(x_t | x_0).
      t: int ``[B]`` row indices.
      prediction, variance, clip_denoised: as in :func:`p_mean_variance`.

    Returns:
      ``[B]`` bits per dimension.
    """
    true_mean, _, true_log_var = q_posterior_mean_variance(schedule, x0, x_t, t)
    out = p_mean_variance(
        schedule, model_output, x_t, t, prediction=prediction, variance=variance, clip_denoised=clip_denoised
    )
    kl = mean_over_nonbatch(normal_kl(true_mean, true_log_var, out.mean, out.log_variance)) / math.log(2.0)
    decoder_nll = -mean_over_nonbatch(
        discretized_gaussian_log_likelihood(x0, means=out.mean, log_scales=0.5 * out.log_variance)
    ) / math.log(2.0)
    return jnp.where(t == 0, decoder_nll, kl)


def prior_bpd(schedule: DiffusionSchedule, x0: jax.Array) -> jax.Array:
    """KL(q(x_T | x_0) || N(0, I)) in bits per dimension, ``[B]`` (the L_T term of Ho et al. eq. 5)."""
    _checks.check_batch("x0", x0)
    t = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, jnp.int32)
    mean = extract(jnp.sqrt(schedule.alphas_cumprod), t, x0.ndim) * x0
    log_var = extract(jnp.log(schedule.one_minus_alphas_cumprod), t, x0.ndim)
    return mean_over_nonbatch(normal_kl(mean, log_var, 0.0, 0.0)) / math.log(2.0)


def min_snr_weight(schedule: DiffusionSchedule, t: jax.Array, *, gamma: float, prediction: str) -> jax.Array:
    """Min-SNR-gamma loss weights (Hang et al. 2023), ``[B]``.

    The weight on the x_0 error is min(SNR_t, gamma); expressed on the error of
    the model's own target that is min(SNR, gamma) / SNR for eps,
    min(SNR, gamma) for x_0 and min(SNR, gamma) / (SNR + 1) for v.
    """
    _checks.check_choice("prediction", prediction, _checks.PREDICTIONS)
    if getattr(t, "ndim", None) != 1:
        raise ValueError(f"min_snr_weight: t must be an int array [B], got shape {np.shape(t)}")
    _checks.check_timesteps(t, t.shape[0], schedule.num_timesteps)
    if not isinstance(gamma, jax.core.Tracer) and not float(gamma) > 0:
        raise ValueError(f"min_snr_weight: gamma must be positive, got {gamma}")
    snr = schedule.alphas_cumprod[t] / schedule.one_minus_alphas_cumprod[t]
    clipped = jnp.minimum(snr, gamma)
    return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1.0)}[prediction]


@flax.struct.dataclass
class TrainingLosses:
    """Per-example training losses, each ``[B]``.

    Attributes:
      loss: what to minimise: ``mse`` for ``"simple"``, ``vlb + L_T`` for
        ``"vlb"``, ``mse + vlb_weight * (vlb + L_T)`` for ``"hybrid"``.
      mse: the simple loss, mean over dimensions of (target - prediction)^2
        (weighted by min-SNR when configured); zero for ``loss="vlb"``.
      vlb: the variational-bound term times T in bits/dim (an unbiased estimate
        of the full bound's L_0 + ... + L_{T-1} part); zero for ``loss="simple"``.
      prior: the part of ``loss`` that is the prior term L_T (``"vlb"``: L_T in
        bits/dim, ``"hybrid"``: ``vlb_weight * L_T``, ``"simple"``: zero). It
        does not depend on t, so timestep importance sampling weighs and records
        ``loss - prior`` only.
    """

    loss: jax.Array
    mse: jax.Array
    vlb: jax.Array
    prior: jax.Array


def training_losses(
    model_fn: ModelFn,
    schedule: DiffusionSchedule,
    x0: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    *,
    loss: str = "simple",
    prediction: str = "eps",
    variance: str = "fixed_small",
    min_snr_gamma: float | None = None,
    vlb_weight: float = 0.001,
) -> TrainingLosses:
    """The DDPM training losses at one sampled timestep per example.

    - ``"simple"``: ||target - model||^2 averaged over dimensions (Ho et al. 2020
      eq. 14 with target eps; x_0 or v targets likewise), optionally weighted
      by min-SNR-gamma (Hang et al. 2023).
    - ``"vlb"``: T * L_t + L_T in bits/dim, an unbiased one-sample estimate of
      the variational bound L_T + sum_t L_t (Ho et al. eq. 5).
    - ``"hybrid"``: simple + ``vlb_weight`` * (T * L_t + L_T) with the mean's
      gradient stopped in the VLB part, so the bound trains only the variance
      (Nichol & Dhariwal 2021 sec. 3.1, lambda = 0.001).

    L_T = KL(q(x_T | x_0) || N(0, I)) is a constant for a fixed schedule, and
    implementations that only train fixed schedules leave it out. A learned
    schedule (Kingma et al. 2021) moves it: without L_T the rest of the bound
    keeps falling as the last step's SNR rises, so minimising it alone drives
    q(x_T | x_0) away from the N(0, I) that sampling starts from.

    Args:
      model_fn: ``model_fn(x_t, timesteps) -> output``, called with the original
        timestep indices ``schedule.timesteps[t]``.
      schedule: the diffusion schedule (may be traced, e.g. learned).
      x0: data ``[B, ...]``.
      t: int ``[B]`` row indices.
      noise: eps ~ N(0, I), shaped like ``x0``.
      loss: ``"simple"``, ``"vlb"`` or ``"hybrid"``.
      prediction: ``"eps"``, ``"x0"`` or ``"v"``.
      variance: ``"fixed_small"``, ``"fixed_large"`` or ``"learned_range"``
        (the model then outputs 2C channels; ``"simple"`` alone does not train
        them, so use ``"hybrid"`` or ``"vlb"``).
      min_snr_gamma: gamma for min-SNR weighting of the simple loss (``"simple"``
        or ``"hybrid"``), or None.
      vlb_weight: lambda of the hybrid loss.

    Returns:
      :class:`TrainingLosses` of ``[B]`` arrays.
    """
    _checks.check_choice("loss", loss, LOSSES)
    _checks.check_choice("prediction", prediction, _checks.PREDICTIONS)
    _checks.check_choice("variance", variance, _checks.VARIANCES)
    if min_snr_gamma is not None and not isinstance(min_snr_gamma, jax.core.Tracer) and not min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be positive or None, got {min_snr_gamma}")
    if min_snr_gamma is not None and loss == "vlb":
        raise ValueError("min_snr_gamma weights the simple loss, which loss='vlb' does not have: "
                         "use loss='simple' or 'hybrid', or min_snr_gamma=None")
    x_t = q_sample(schedule, x0, t, noise)
    output = model_fn(x_t, schedule.timesteps[t])
    _checks.check_model_output(output, x_t, variance)
    pred, var_part = split_model_output(output, variance)
    zeros = jnp.zeros(x0.shape[:1], jnp.float32)

    mse = zeros
    if loss in ("simple", "hybrid"):
        target = prediction_target(schedule, prediction, x0, noise, t)
        mse = mean_over_nonbatch((target - pred.astype(jnp.float32)) ** 2)
        if min_snr_gamma is not None:
            mse = mse * min_snr_weight(schedule, t, gamma=min_snr_gamma, prediction=prediction)

    vlb = zeros
    if loss in ("vlb", "hybrid"):
        vlb_output = output
        if loss == "hybrid":
            # 1. the bound sees the mean through a stop-gradient (Nichol & Dhariwal sec. 3.1).
            frozen = jax.lax.stop_gradient(pred)
            vlb_output = frozen if var_part is None else jnp.concatenate([frozen, var_part], axis=-1)
        # 2. T * L_t estimates sum_t L_t with t uniform (before importance weights).
        vlb = schedule.num_timesteps * vlb_term(
            schedule, vlb_output, x0, x_t, t, prediction=prediction, variance=variance, clip_denoised=False
        )

    # 3. L_T, the bound's one term that does not depend on t.
    prior = zeros
    if loss == "vlb":
        prior = prior_bpd(schedule, x0)
    elif loss == "hybrid":
        prior = vlb_weight * prior_bpd(schedule, x0)
    total = {"simple": mse, "vlb": vlb + prior, "hybrid": mse + vlb_weight * vlb + prior}[loss]
    return TrainingLosses(loss=total, mse=mse, vlb=vlb, prior=prior)


# --- Timestep sampling -----------------------------------------------------------


@flax.struct.dataclass
class LossHistory:
    """The last K losses seen at each timestep, for importance sampling (Nichol & Dhariwal 2021 sec. 3.3).

    Attributes:
      losses: float32 ``[T, K]``, a ring buffer per timestep.
      counts: int32 ``[T]``, how many losses each row has seen in all.
    """

    losses: jax.Array
    counts: jax.Array

    @property
    def history_per_term(self) -> int:
        return self.losses.shape[1]


def init_loss_history(num_timesteps: int, history_per_term: int = 10) -> LossHistory:
    """An empty :class:`LossHistory` for T timesteps and K = ``history_per_term`` losses each."""
    if num_timesteps < 1 or history_per_term < 1:
        raise ValueError(f"need num_timesteps >= 1 and history_per_term >= 1, got {num_timesteps}, {history_per_term}")
    return LossHistory(
        losses=jnp.zeros((num_timesteps, history_per_term), jnp.float32),
        counts=jnp.zeros((num_timesteps,), jnp.int32),
    )


def update_loss_history(history: LossHistory, t: jax.Array, losses: jax.Array) -> LossHistory:
    """Records ``losses[i]`` at timestep ``t[i]``, in order, each row keeping its last K values.

    Call it with the losses of the whole global batch (all-gathered across
    devices) so every replica holds the same history.
    """
    if t.shape != losses.shape or t.ndim != 1:
        raise ValueError(f"t and losses must both be [B], got {t.shape} and {losses.shape}")
    _checks.check_timesteps(t, t.shape[0], history.losses.shape[0])
    k = history.history_per_term

    def record(h: LossHistory, tl):
        ti, li = tl
        slot = h.counts[ti] % k
        return LossHistory(losses=h.losses.at[ti, slot].set(li), counts=h.counts.at[ti].add(1)), None

    history, _ = jax.lax.scan(record, history, (t, jax.lax.stop_gradient(losses).astype(jnp.float32)))
    return history


def timestep_probs(history: LossHistory, *, uniform_prob: float = 0.001) -> jax.Array:
    """p_t proportional to sqrt(E[L_t^2]) once every row has K losses, uniform before (Nichol & Dhariwal eq. 18).

    A fraction ``uniform_prob`` of the mass stays uniform so no timestep is starved.
    """
    num_timesteps = history.losses.shape[0]
    uniform = jnp.full((num_timesteps,), 1.0 / num_timesteps)
    rms = jnp.sqrt(jnp.mean(history.losses**2, axis=1))
    p = rms / jnp.maximum(jnp.sum(rms), 1e-30)
    p = p * (1.0 - uniform_prob) + uniform_prob / num_timesteps
    warm = jnp.all(history.counts >= history.history_per_term)
    return jnp.where(warm, p, uniform)


def sample_timesteps(
    key: jax.Array,
    batch_size: int,
    num_timesteps: int,
    history: LossHistory | None = None,
    *,
    uniform_prob: float = 0.001,
):
    """Draws t ~ p(t) for a batch and the weights 1 / (T p_t) that keep the loss unbiased.

    Uniform when ``history`` is None; otherwise importance sampling from
    :func:`timestep_probs` (Nichol & Dhariwal 2021 sec. 3.3).

    Returns:
      ``(t, weights)``: int32 ``[B]`` row indices and float32 ``[B]`` weights
      (all ones for uniform sampling).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be an int >= 1, got {num_timesteps!r}")
    if history is None:
        t = jax.random.randint(key, (batch_size,), 0, num_timesteps, dtype=jnp.int32)
        return t, jnp.ones((batch_size,), jnp.float32)
    if history.losses.shape[0] != num_timesteps:
        raise ValueError(f"history has {history.losses.shape[0]} timesteps, expected {num_timesteps}")
    p = timestep_probs(history, uniform_prob=uniform_prob)
    t = jax.random.choice(key, num_timesteps, (batch_size,), p=p).astype(jnp.int32)
    return t, (1.0 / (num_timesteps * p[t])).astype(jnp.float32)

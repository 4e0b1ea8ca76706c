"""The full variational bound on -log p(x_0), in bits per dimension."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import _checks
from diffusion_jax.diffusion import q_sample
from diffusion_jax.losses import ModelFn, prior_bpd, vlb_term
from diffusion_jax.schedules import DiffusionSchedule


@flax.struct.dataclass
class NLL:
    """The variational bound of Ho et al. 2020 eq. 5, per example, in bits/dim.

    Attributes:
      total: ``[B]`` prior + sum of terms: an upper bound on -log2 p(x_0) / D.
      prior: ``[B]`` L_T = KL(q(x_T | x_0) || N(0, I)).
      terms: ``[B, T]``; ``terms[:, 0]`` is the decoder term L_0 and
        ``terms[:, t]`` for t >= 1 is L_t = KL(q(x_t | x_{t+1}, x_0) || p(x_t | x_{t+1}))
        in this module's 0-based indexing.
    """

    total: jax.Array
    prior: jax.Array
    terms: jax.Array


def _check_on_8bit_grid(x0) -> None:
    """Concrete data must be 8-bit values scaled to [-1, 1] (the decoder's bins assume it):
    data left in [0, 1] or [0, 255] would give a plausible-looking but meaningless bound."""
    values = np.asarray(x0, np.float64)
    if values.size == 0:
        return
    lo, hi = values.min(), values.max()
    if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
        raise ValueError(f"nll_bpd: x0 must be 8-bit data scaled to [-1, 1], got values in [{lo:.4g}, {hi:.4g}]")
    # float32 and wider hold the grid to well under a bin; narrower data (bfloat16: up to
    # ~0.24 bins off) the decoder snaps back to it (losses.discretized_gaussian_log_likelihood).
    if jnp.finfo(x0.dtype).nmant >= 23:
        levels = (values + 1.0) * 127.5
        off = np.abs(levels - np.round(levels)).max()
        if off > 1e-2:
            raise ValueError("nll_bpd: x0 must lie on the 8-bit grid k / 127.5 - 1 (k = 0..255), as the "
                             f"discretized decoder assumes; a value is {off:.3g} bins off it "
                             "(data in [0, 1] not rescaled to [-1, 1]?)")


def nll_bpd(
    model_fn: ModelFn,
    schedule: DiffusionSchedule,
    x0: jax.Array,
    key: jax.Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = True,
) -> NLL:
    """The variational bound -log p(x_0) <= L_T + sum_{t>1} L_{t-1} + L_0 in bits/dim (Ho et al. 2020 eq. 5).

    Every term is evaluated at one draw x_t ~ q(x_t | x_0) with noise from
    ``fold_in(key, t)``, in a single ``lax.scan`` over all T rows of the
    schedule (as improved DDPM's ``calc_bpd_loop``), so compile time does not
    grow with T. On a respaced schedule it is the bound of the respaced
    (shorter) chain.

    Args:
      model_fn: ``model_fn(x_t, timesteps) -> output``, called with the original
        timestep indices ``schedule.timesteps[t]``.
      schedule: the diffusion schedule.
      x0: data ``[B, ...]`` on the 8-bit grid in [-1, 1].
      key: PRNG key.
      prediction, variance, clip_denoised: as in :func:`p_mean_variance`.

    Returns:
      An :class:`NLL`.
    """
    _checks.check_batch("x0", x0)
    _checks.check_choice("prediction", prediction, _checks.PREDICTIONS)
    _checks.check_choice("variance", variance, _checks.VARIANCES)
    if not isinstance(x0, jax.core.Tracer):
        _check_on_8bit_grid(x0)
    batch = x0.shape[0]

    def term_at(_, row):
        t = jnp.full((batch,), row, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, row), x0.shape, x0.dtype)
        x_t = q_sample(schedule, x0, t, noise)
        output = model_fn(x_t, schedule.timesteps[t])
        term = vlb_term(
            schedule, output, x0, x_t, t, prediction=prediction, variance=variance, clip_denoised=clip_denoised
        )
        return None, term

    _, terms = jax.lax.scan(term_at, None, jnp.arange(schedule.num_timesteps, dtype=jnp.int32))
    terms = terms.T  # [T, B] -> [B, T]
    prior = prior_bpd(schedule, x0)
    return NLL(total=prior + jnp.sum(terms, axis=1), prior=prior, terms=terms)

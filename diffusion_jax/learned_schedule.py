"""A learned variance schedule: a monotone network for the log-SNR (Kingma et al. 2021).

The seed's "beta can be learned": the module below has its own parameters and
returns an ordinary :class:`~diffusion_jax.schedules.DiffusionSchedule`, built
inside ``jit`` with :func:`~diffusion_jax.schedules.schedule_from_log_snr`, so
every function of the library works unchanged and gradients of the bound
(``training_losses(loss="vlb")`` or :func:`~diffusion_jax.nll.nll_bpd`) reach the
schedule's parameters.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.schedules import DiffusionSchedule, schedule_from_log_snr


class MonotoneDense(nn.Module):
    """A dense layer with non-negative weights |W|, so it is non-decreasing in every input (VDM's DenseMonotone)."""

    features: int
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(1.0)
    bias_init: nn.initializers.Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        y = x @ jnp.abs(kernel)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,))
        return y


class LearnedSchedule(nn.Module):
    """Monotone learned log-SNR lambda(t), t in (0, 1], after Kingma et al. 2021 sec. 4 and App. H.

    gamma(t) = l1(t) + l3(phi(l2(t))) / width with monotone dense layers l1,
    l2, l3 and phi = 2 (sigmoid - 1/2) is non-decreasing; a term 1e-3 t
    added to l1(t) keeps it strictly increasing if l1's weight reaches 0. It is
    normalised to [0, 1] over t in [0, 1] and mapped onto
    lambda(t) = lambda_max - (lambda_max - lambda_min) * gamma_norm(t),
    with lambda_max and the range lambda_max - lambda_min = softplus(.) > 0
    learned, so lambda is strictly decreasing. Row i of the schedule sits at
    t = (i + 1) / T.

    Calling the module returns the :class:`DiffusionSchedule`:
    ``schedule = LearnedSchedule(T).apply({"params": params})``.

    Attributes:
      num_timesteps: T.
      hidden_features: width of the monotone network (VDM uses 1024).
      log_snr_max_init: initial lambda at t = 0.
      log_snr_min_init: initial lambda at t = 1.
    """

    num_timesteps: int
    hidden_features: int = 1024
    log_snr_max_init: float = 10.0
    log_snr_min_init: float = -10.0

    def setup(self):
        if self.num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {self.num_timesteps}")
        if not self.log_snr_max_init > self.log_snr_min_init:
            raise ValueError(
                f"log_snr_max_init ({self.log_snr_max_init}) must exceed log_snr_min_init ({self.log_snr_min_init})"
            )
        self.l1 = MonotoneDense(1, kernel_init=nn.initializers.ones)
        self.l2 = MonotoneDense(self.hidden_features)
        self.l3 = MonotoneDense(1, use_bias=False)
        self.log_snr_max = self.param("log_snr_max", nn.initializers.constant(self.log_snr_max_init), ())
        span = self.log_snr_max_init - self.log_snr_min_init
        inv_softplus = float(np.log(np.expm1(span)))
        self.log_snr_span = self.param("log_snr_span", nn.initializers.constant(inv_softplus), ())

    def _gamma(self, t: jax.Array) -> jax.Array:
        t = t[:, None]
        h = self.l1(t) + 1e-3 * t  # strictly increasing even if l1's weight reaches 0
        phi = 2.0 * (jax.nn.sigmoid(self.l2(2.0 * (t - 0.5))) - 0.5)
        return (h + self.l3(phi) / self.hidden_features)[:, 0]

    def log_snr(self, t: jax.Array) -> jax.Array:
        """lambda(t) for t in [0, 1], strictly decreasing."""
        g = self._gamma(jnp.concatenate([jnp.array([0.0, 1.0]), t.astype(jnp.float32)]))
        g_norm = (g[2:] - g[0]) / (g[1] - g[0])
        return self.log_snr_max - jax.nn.softplus(self.log_snr_span) * g_norm

    def __call__(self) -> DiffusionSchedule:
        t = jnp.arange(1, self.num_timesteps + 1, dtype=jnp.float32) / self.num_timesteps
        return schedule_from_log_snr(self.log_snr(t))

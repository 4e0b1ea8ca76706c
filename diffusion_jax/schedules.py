"""Variance schedules beta_t and the tables the DDPM formulas read.

A :class:`DiffusionSchedule` is a pytree of ``[T]`` tables, so it can be passed
through ``jit``, ``vmap`` and ``shard_map`` like any array argument, and built
inside a traced function from learned parameters
(:mod:`diffusion_jax.learned_schedule`).

Index convention: ``t`` is a 0-based index into the tables. ``t = 0`` is the
first noising step (x_1 in Ho et al. 2020) and ``t = T - 1`` gives x_T.
``timesteps[t]`` is the original (training) timestep index of row ``t``; it is
``arange(T)`` for a fresh schedule and the kept steps after :func:`respace`.
Models are always called with ``timesteps[t]``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

MAX_BETA = 0.999  # Nichol & Dhariwal 2021 sec. 3.2: prevents singularities near t = T.


@flax.struct.dataclass
class DiffusionSchedule:
    """The tables of a discrete Gaussian diffusion, each float32 ``[T]``.

    With alpha_t = 1 - beta_t and alphabar_t = prod_{s<=t} alpha_s
    (Ho et al. 2020, eq. 4 and the text around eqs. 6-7):

    Attributes:
      betas: beta_t, the variance of q(x_t | x_{t-1}).
      alphas_cumprod: alphabar_t.
      one_minus_alphas_cumprod: 1 - alphabar_t, kept separately because it is
        computed more accurately than by subtraction in float32.
      alphas_cumprod_prev: alphabar_{t-1}, with alphabar_{-1} = 1.
      posterior_variance: tilde-beta_t = beta_t (1 - alphabar_{t-1}) /
        (1 - alphabar_t) (eq. 7).
      posterior_log_variance_clipped: log tilde-beta_t with the t = 0 entry
        replaced by the t = 1 entry, since tilde-beta_0 = 0 (as in the
        original code).
      posterior_mean_coef1: sqrt(alphabar_{t-1}) beta_t / (1 - alphabar_t),
        the coefficient of x_0 in tilde-mu_t (eq. 7).
      posterior_mean_coef2: sqrt(alpha_t) (1 - alphabar_{t-1}) /
        (1 - alphabar_t), the coefficient of x_t in tilde-mu_t.
      timesteps: int32, the original timestep index of each row.
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    one_minus_alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    timesteps: jax.Array

    @property
    def num_timesteps(self) -> int:
        """T, the number of rows (static: it is a shape)."""
        return self.betas.shape[0]

    @property
    def log_snr(self) -> jax.Array:
        """lambda_t = log(alphabar_t / (1 - alphabar_t)) (Kingma et al. 2021)."""
        return jnp.log(self.alphas_cumprod) - jnp.log(self.one_minus_alphas_cumprod)


def _is_concrete(*arrays) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def schedule_from_alphas_cumprod(
    alphas_cumprod,
    *,
    one_minus_alphas_cumprod=None,
    betas=None,
    timesteps=None,
) -> DiffusionSchedule:
    """Builds every table from alphabar_t (and, optionally, more exact inputs).

    beta_t = 1 - alphabar_t / alphabar_{t-1} unless ``betas`` is given.
    Concrete inputs are processed in float64 with NumPy and cast to float32;
    traced inputs (a learned schedule inside ``jit``) stay in JAX, float32, so
    gradients flow to whatever produced them.

    Args:
      alphas_cumprod: ``[T]`` alphabar_t, strictly decreasing in (0, 1), with
        1 - alphabar_t > 0 (alphabar_0 = 1 would make beta_0 = 0 and the
        t = 0 posterior 0/0).
      one_minus_alphas_cumprod: ``[T]`` 1 - alphabar_t if known more precisely.
      betas: ``[T]`` beta_t if known more precisely than the ratio.
      timesteps: ``[T]`` int original indices; defaults to ``arange(T)``.

    Returns:
      A :class:`DiffusionSchedule`.
    """
    concrete = _is_concrete(alphas_cumprod, one_minus_alphas_cumprod, betas)
    xp = np if concrete else jnp
    dtype = np.float64 if concrete else jnp.float32

    def as_array(x):
        return None if x is None else xp.asarray(x, dtype=dtype)

    abar = as_array(alphas_cumprod)
    if abar.ndim != 1 or abar.shape[0] < 1:
        raise ValueError(f"alphas_cumprod must be a non-empty [T] vector, got shape {abar.shape}")
    one_minus_abar = as_array(one_minus_alphas_cumprod)
    if one_minus_abar is None:
        one_minus_abar = 1.0 - abar
    if concrete:
        if not np.all((abar > 0) & (abar <= 1) & (one_minus_abar > 0)):
            raise ValueError(f"alphas_cumprod must lie in (0, 1) (every 1 - alphabar_t > 0: alphabar_0 = 1 "
                             f"leaves no noise at t = 0), got values in [{abar.min()}, {abar.max()}]")
        if abar.shape[0] > 1 and not np.all(np.diff(abar) < 0):
            raise ValueError("alphas_cumprod must be strictly decreasing in t (every beta_t > 0)")
    abar_prev = xp.concatenate([xp.ones((1,), dtype), abar[:-1]])
    # 1 - alphabar_{t-1} from the accurate table, not by subtraction (float32 near t = 0).
    one_minus_abar_prev = xp.concatenate([xp.zeros((1,), dtype), one_minus_abar[:-1]])
    betas = as_array(betas)
    if betas is None:  # beta_0 = 1 - alphabar_0 from the accurate table
        betas = xp.concatenate([one_minus_abar[:1], 1.0 - abar[1:] / abar[:-1]])
    # alpha_t as the ratio, not 1 - beta_t: a beta_t near 1 (the last row of a respaced cosine
    # schedule) would leave alpha_t few digits in float32.
    alphas = abar / abar_prev

    posterior_variance = betas * one_minus_abar_prev / one_minus_abar
    # tilde-beta_0 = 0; the t = 0 row of the reverse process is the decoder, and
    # the original code uses tilde-beta_1 there so the log stays finite.
    first = posterior_variance[1:2] if abar.shape[0] > 1 else betas[:1]
    posterior_log_variance_clipped = xp.log(xp.concatenate([first, posterior_variance[1:]]))

    if timesteps is None:
        timesteps = np.arange(abar.shape[0], dtype=np.int32)
    _check_original_timesteps(timesteps, abar.shape[0])
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return DiffusionSchedule(
        betas=f32(betas),
        alphas_cumprod=f32(abar),
        one_minus_alphas_cumprod=f32(one_minus_abar),
        alphas_cumprod_prev=f32(abar_prev),
        posterior_variance=f32(posterior_variance),
        posterior_log_variance_clipped=f32(posterior_log_variance_clipped),
        posterior_mean_coef1=f32(betas * xp.sqrt(abar_prev) / one_minus_abar),
        posterior_mean_coef2=f32(xp.sqrt(alphas) * one_minus_abar_prev / one_minus_abar),
        timesteps=jnp.asarray(timesteps, jnp.int32),
    )


def _check_original_timesteps(timesteps, num_rows: int) -> None:
    """``timesteps`` is an int ``[T]`` vector; when concrete, >= 0 and strictly increasing."""
    dtype = timesteps.dtype if hasattr(timesteps, "dtype") else np.asarray(timesteps).dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"timesteps must be integers (original timestep indices), got dtype {dtype}")
    shape = tuple(np.shape(timesteps))
    if shape != (num_rows,):
        raise ValueError(f"timesteps must have shape [T] = ({num_rows},), got {shape}")
    if _is_concrete(timesteps):
        values = np.asarray(timesteps)
        if values.min() < 0 or np.any(np.diff(values) <= 0):
            raise ValueError(f"timesteps must be >= 0 and strictly increasing, got {values.tolist()}")


def schedule_from_betas(betas, *, timesteps=None) -> DiffusionSchedule:
    """Builds the tables from beta_t: alphabar_t = prod_{s<=t} (1 - beta_s) (Ho et al. eq. 4)."""
    concrete = _is_concrete(betas)
    xp = np if concrete else jnp
    betas = xp.asarray(betas, dtype=np.float64 if concrete else jnp.float32)
    if betas.ndim != 1 or betas.shape[0] < 1:
        raise ValueError(f"betas must be a non-empty [T] vector, got shape {betas.shape}")
    if concrete and not np.all((betas > 0) & (betas < 1)):
        raise ValueError(f"betas must lie in (0, 1); got min {betas.min()}, max {betas.max()}")
    log_abar = xp.cumsum(xp.log1p(-betas))
    return schedule_from_alphas_cumprod(
        xp.exp(log_abar), one_minus_alphas_cumprod=-xp.expm1(log_abar), betas=betas, timesteps=timesteps
    )


def schedule_from_log_snr(log_snr, *, timesteps=None) -> DiffusionSchedule:
    """Builds the tables from a strictly decreasing log-SNR lambda_t.

    alphabar_t = sigmoid(lambda_t), 1 - alphabar_t = sigmoid(-lambda_t) and
    beta_t = 1 - alphabar_t / alphabar_{t-1}
           = -expm1(log sigmoid(lambda_t) - log sigmoid(lambda_{t-1}))
    (Kingma et al. 2021, sec. 3), each in its numerically stable form. Works on
    traced values, so gradients reach a learned lambda.
    """
    concrete = _is_concrete(log_snr)
    xp = np if concrete else jnp
    lam = xp.asarray(log_snr, dtype=np.float64 if concrete else jnp.float32)
    if lam.ndim != 1 or lam.shape[0] < 1:
        raise ValueError(f"log_snr must be a non-empty [T] vector, got shape {lam.shape}")
    if concrete and not np.all(np.isfinite(lam)):
        bad = int(np.flatnonzero(~np.isfinite(lam))[0])
        raise ValueError(f"log_snr must be finite (lambda = +inf is alphabar = 1, no noise), got {lam[bad]} "
                         f"at t = {bad}")
    if concrete and lam.shape[0] > 1 and not np.all(np.diff(lam) < 0):
        raise ValueError("log_snr must be strictly decreasing in t")
    log_sigmoid = lambda x: -xp.logaddexp(0.0, -x)  # noqa: E731
    log_abar = log_sigmoid(lam)
    log_abar_prev = xp.concatenate([xp.zeros((1,), lam.dtype), log_abar[:-1]])
    betas = -xp.expm1(log_abar - log_abar_prev)
    return schedule_from_alphas_cumprod(
        xp.exp(log_abar),
        one_minus_alphas_cumprod=xp.exp(log_sigmoid(-lam)),
        betas=betas,
        timesteps=timesteps,
    )


# --- Named schedules ---------------------------------------------------------


def linear_betas(num_timesteps: int, *, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Ho et al. 2020 sec. 4: beta linear from 1e-4 to 0.02 at T = 1000.

    For other T both ends are scaled by 1000 / T (Nichol & Dhariwal 2021,
    improved-diffusion's ``get_named_beta_schedule``) so the total noise stays
    about the same.
    """
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def _betas_from_alphabar_fn(alphabar: Callable[[np.ndarray], np.ndarray], num_timesteps: int, max_beta: float):
    """beta_t = min(1 - abar((t+1)/T) / abar(t/T), max_beta) for t = 0..T-1."""
    grid = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    a = alphabar(grid)
    return np.minimum(1.0 - a[1:] / a[:-1], max_beta)


def cosine_betas(num_timesteps: int, *, s: float = 0.008, max_beta: float = MAX_BETA) -> np.ndarray:
    """Nichol & Dhariwal 2021 eq. 17: alphabar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2).

    Betas are capped at ``max_beta`` = 0.999 (their sec. 3.2).
    """
    f = lambda u: np.cos((u + s) / (1.0 + s) * math.pi / 2) ** 2  # noqa: E731
    return _betas_from_alphabar_fn(lambda u: f(u) / f(0.0), num_timesteps, max_beta)


def sigmoid_betas(
    num_timesteps: int,
    *,
    start: float = -3.0,
    end: float = 3.0,
    tau: float = 1.0,
    max_beta: float = MAX_BETA,
) -> np.ndarray:
    """The sigmoid schedule of Jabri et al. 2022 (RIN, Algorithm "sigmoid_schedule").

    alphabar(u) = (sigmoid(end/tau) - sigmoid((u (end - start) + start)/tau)) /
                  (sigmoid(end/tau) - sigmoid(start/tau)),  u in [0, 1],
    so alphabar(0) = 1 and alphabar(1) = 0; betas capped at 0.999.
    """
    if not end > start:
        raise ValueError(f"sigmoid schedule needs end > start, got start={start}, end={end}")
    if not tau > 0:
        raise ValueError(f"sigmoid schedule needs tau > 0, got {tau}")
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    v_start, v_end = sig(start / tau), sig(end / tau)
    alphabar = lambda u: (v_end - sig((u * (end - start) + start) / tau)) / (v_end - v_start)  # noqa: E731
    return _betas_from_alphabar_fn(alphabar, num_timesteps, max_beta)


def log_snr_linear(num_timesteps: int, *, log_snr_max: float = 10.0, log_snr_min: float = -10.0) -> np.ndarray:
    """lambda_t falling linearly from ``log_snr_max`` (t = 0) to ``log_snr_min`` (t = T-1).

    The SNR alphabar_t / (1 - alphabar_t) is then a geometric sequence: each
    step divides it by the same factor. The defaults bracket the linear DDPM
    schedule at T = 1000 (its lambda runs from 9.2 to -10.1).
    """
    if not log_snr_max > log_snr_min:
        raise ValueError(f"log_snr_linear needs log_snr_max > log_snr_min, got {log_snr_max} <= {log_snr_min}")
    if num_timesteps == 1:
        return np.array([log_snr_min], np.float64)
    return np.linspace(log_snr_max, log_snr_min, num_timesteps, dtype=np.float64)


_NAMED: dict[str, tuple[Callable[..., np.ndarray], Callable[..., DiffusionSchedule]]] = {
    "linear": (linear_betas, schedule_from_betas),
    "cosine": (cosine_betas, schedule_from_betas),
    "sigmoid": (sigmoid_betas, schedule_from_betas),
    "log_snr_linear": (log_snr_linear, schedule_from_log_snr),
}
SCHEDULE_NAMES: tuple[str, ...] = tuple(_NAMED)


def make_schedule(name: str, num_timesteps: int, **kwargs: Any) -> DiffusionSchedule:
    """Builds a named schedule with ``num_timesteps`` steps.

    Args:
      name: ``"linear"`` (Ho et al. 2020), ``"cosine"`` (Nichol & Dhariwal 2021
        eq. 17), ``"sigmoid"`` (Jabri et al. 2022) or ``"log_snr_linear"``
        (log-SNR linear in t, i.e. a geometric SNR sequence).
      num_timesteps: T >= 1.
      **kwargs: the named schedule's own parameters (e.g. ``s`` for cosine,
        ``beta_start``/``beta_end`` for linear).

    Returns:
      A :class:`DiffusionSchedule` whose tables were computed in float64 and
      cast to float32.
    """
    if name not in _NAMED:
        raise ValueError(f"unknown schedule {name!r}; expected one of {SCHEDULE_NAMES}")
    try:  # Python and NumPy ints, and concrete 0-d JAX integer arrays
        steps = None if isinstance(num_timesteps, bool) else operator.index(num_timesteps)
    except TypeError:
        steps = None
    if steps is None or steps < 1:
        raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")
    num_timesteps = steps
    make_values, build = _NAMED[name]
    try:
        values = make_values(int(num_timesteps), **kwargs)
    except TypeError as e:
        raise TypeError(f"bad arguments for schedule {name!r}: {e}") from None
    if name == "linear" and not (0 < values[0] and values[-1] < 1):
        raise ValueError(
            f"linear schedule betas must lie in (0, 1); got {values[0]:.4g}..{values[-1]:.4g} "
            f"(beta_start/beta_end are scaled by 1000/T = {1000.0 / num_timesteps:.4g})"
        )
    return build(values)


def evenly_spaced_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """``num_steps`` increasing indices spread evenly over 0..T-1, always keeping T-1.

    Keeping the last index means a respaced sampler starts from the same
    x_T ~ N(0, I) as the full chain.
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    if num_steps == 1:
        return np.array([num_timesteps - 1], np.int64)
    return np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int64)


def log_snr_spaced_timesteps(
    schedule: DiffusionSchedule, num_steps: int, *, log_snr_floor: float = -10.0
) -> np.ndarray:
    """``num_steps`` distinct rows whose log-SNR lambda_t is as close to evenly spaced as the grid allows.

    Uniform steps in lambda are what DPM-Solver recommends for low-resolution
    pixel models (Lu et al. 2022, sec. 3.3, "logSNR" skip type): each step then
    covers the same change of lambda, h, so the multistep ratio r = 1. Each
    target lambda is rounded to its nearest row; where rows would repeat
    (lambda moves faster than one row per step near t = 0) they are pushed
    apart, so exactly ``num_steps`` rows are returned, always including 0 and
    T - 1. Needs a concrete schedule.

    The targets start from max(lambda_{T-1}, ``log_snr_floor``): below about
    -10 the data is invisible and the prediction barely changes, so steps
    there are wasted. This is DPM-Solver's truncation of the cosine schedule
    at t = 0.9946 (log-SNR about -9.6), whose 0.999 beta cap otherwise sends
    lambda from -10 to -20 over its last few rows; the linear DDPM schedule
    ends at -10.1 and is unaffected. The chain still starts at row T - 1.
    """
    num_timesteps = schedule.num_timesteps
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    if num_steps == 1:
        return np.array([num_timesteps - 1], np.int64)
    if not _is_concrete(schedule.alphas_cumprod, schedule.one_minus_alphas_cumprod):
        raise ValueError(
            "log-SNR spacing needs a concrete schedule (it decides which rows are kept); "
            "respace outside jit, or use spacing='time'"
        )
    lam = np.log(np.asarray(schedule.alphas_cumprod, np.float64)) - np.log(
        np.asarray(schedule.one_minus_alphas_cumprod, np.float64)
    )
    lam = np.maximum(lam, log_snr_floor)  # non-increasing in the row
    targets = np.linspace(lam[-1], lam[0], num_steps)[::-1]  # increasing rows
    idx = np.searchsorted(-lam, -targets)  # first row with lambda <= target
    idx = np.clip(idx, 0, num_timesteps - 1)
    lower = np.clip(idx - 1, 0, num_timesteps - 1)
    idx = np.where(np.abs(lam[lower] - targets) < np.abs(lam[idx] - targets), lower, idx)
    idx[0], idx[-1] = 0, num_timesteps - 1
    for i in range(1, num_steps):  # push repeats up ...
        idx[i] = max(idx[i], idx[i - 1] + 1)
    idx[-1] = min(idx[-1], num_timesteps - 1)
    for i in range(num_steps - 2, -1, -1):  # ... and back under T - 1
        idx[i] = min(idx[i], idx[i + 1] - 1)
    return idx.astype(np.int64)


def respace(schedule: DiffusionSchedule, timesteps: Sequence[int] | np.ndarray) -> DiffusionSchedule:
    """A schedule over an increasing subset of ``schedule``'s rows (Nichol & Dhariwal 2021 sec. 4).

    The kept rows keep their alphabar_t; the new betas are
    beta'_i = 1 - alphabar_{k_i} / alphabar_{k_{i-1}} = 1 - prod_{k_{i-1} < j <= k_i} (1 - beta_j),
    computed in log space from the original betas, so the respaced forward
    process has exactly the same marginals q(x_{k_i} | x_0). ``timesteps`` of
    the result maps each new row back to the original training index, so a
    model is always called with the timesteps it was trained on.

    Args:
      schedule: the schedule to respace (itself possibly respaced or learned).
      timesteps: strictly increasing row indices into ``schedule``, concrete
        (they decide the shape).

    Returns:
      The respaced :class:`DiffusionSchedule`.
    """
    idx = np.asarray(timesteps)
    if idx.ndim != 1 or idx.size == 0:
        raise ValueError(f"respace needs a non-empty 1-D list of timesteps, got shape {idx.shape}")
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"respace timesteps must be integers, got dtype {idx.dtype}")
    if np.any(np.diff(idx) <= 0):
        raise ValueError("respace timesteps must be strictly increasing")
    if idx[0] < 0 or idx[-1] >= schedule.num_timesteps:
        raise ValueError(f"respace timesteps must lie in [0, {schedule.num_timesteps - 1}], got {idx[0]}..{idx[-1]}")
    # The kept rows keep their stored alphabar and 1 - alphabar. The new betas come
    # from log-space sums of the original betas: 1 - alphabar_t keeps only a few
    # digits in float32 near t = 0, so dividing stored alphabars would not do.
    betas, timesteps = schedule.betas, schedule.timesteps
    xp = np if _is_concrete(betas, timesteps) else jnp
    if xp is np:
        betas, timesteps = np.asarray(betas, np.float64), np.asarray(timesteps)
    log_abar_all = xp.concatenate([xp.zeros((1,), betas.dtype), xp.cumsum(xp.log1p(-betas))])
    log_abar = log_abar_all[idx + 1]  # used only in the ratio below
    log_abar_prev = log_abar_all[np.concatenate([[0], idx[:-1] + 1])]
    abar, one_minus = schedule.alphas_cumprod, schedule.one_minus_alphas_cumprod
    if xp is np:
        abar, one_minus = np.asarray(abar, np.float64), np.asarray(one_minus, np.float64)
    return schedule_from_alphas_cumprod(
        abar[idx],
        one_minus_alphas_cumprod=one_minus[idx],
        betas=-xp.expm1(log_abar - log_abar_prev),
        timesteps=timesteps[idx],
    )

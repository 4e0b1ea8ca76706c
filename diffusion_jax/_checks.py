"""Argument checks shared by the public functions (the math, checkpoints, metric writers).

For the math, shapes and dtypes are static under ``jit``, so these run at trace
time and cost nothing in the compiled program. Values (``t`` in range) can only be checked
when they are concrete; under ``jit`` JAX clamps out-of-range gathers instead.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def check_choice(what: str, value: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {allowed}")


def check_batch(name: str, x, *, min_rank: int = 2) -> None:
    """``x`` is a float array ``[B, ...]`` of rank >= ``min_rank``."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim < min_rank:
        raise ValueError(f"{name} must have shape [B, ...] with rank >= {min_rank}, got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")


def check_same_shape(**arrays) -> None:
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shapes must match: {shapes}")


def check_timesteps(t, batch_size: int, num_timesteps: int) -> None:
    """``t`` is an int ``[B]`` array of row indices in [0, T)."""
    if not hasattr(t, "shape") or not hasattr(t, "dtype"):
        raise TypeError(f"t must be an integer array of shape [{batch_size}], got {type(t).__name__}")
    if tuple(t.shape) != (batch_size,):
        raise ValueError(f"t must have shape [B] = ({batch_size},), got {tuple(t.shape)}")
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise TypeError(f"t must be an integer array, got dtype {t.dtype}")
    if not isinstance(t, jax.core.Tracer):
        t_np = np.asarray(t)
        if t_np.size and (t_np.min() < 0 or t_np.max() >= num_timesteps):
            raise ValueError(f"t must lie in [0, {num_timesteps - 1}], got values in [{t_np.min()}, {t_np.max()}]")


def check_model_output(model_output, x_t, variance: str) -> None:
    """The model output is an array of x_t's shape, or 2C channels with learned variance."""
    if not hasattr(model_output, "shape") or not hasattr(model_output, "dtype"):
        hint = (" (a Flax apply(..., mutable=...) returns (output, state): return the output alone)"
                if isinstance(model_output, tuple) else "")
        raise TypeError(f"model_fn must return an array, got {type(model_output).__name__}{hint}")
    expected = tuple(x_t.shape)
    if variance == "learned_range":
        expected = expected[:-1] + (2 * x_t.shape[-1],)
    if tuple(model_output.shape) != expected:
        extra = " (prediction and variance channels on the last axis)" if variance == "learned_range" else ""
        raise ValueError(
            f"model output must have shape {expected} for variance={variance!r}{extra}, got {tuple(model_output.shape)}"
        )


def as_step(step) -> int:
    """A training step number: an int (``operator.index``; not a bool), >= 0."""
    return as_nonnegative_int("step", step)


def as_nonnegative_int(name: str, value) -> int:
    """``value`` as an int (``operator.index``: Python, NumPy and concrete 0-d JAX ints; not a
    bool), >= 0; the errors name ``name``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}.")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}.") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}.")
    return value

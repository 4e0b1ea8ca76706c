"""The training state and the optimizer that updates it.

One :class:`TrainState` pytree holds everything that must survive a restart;
the training step maps it to a new one, evaluation and sampling read its EMA
parameters, and the checkpoint saves it whole. The learning-rate schedule lives
inside the optax optimizer state, so restoring the state restores it too.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

DECAYS = ("constant", "cosine")


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from one step to the next.

    Attributes:
      step: int32 scalar, training steps taken (including skipped ones); the
        per-step random keys and the data position are derived from it.
      params: the model's parameters.
      ema_params: exponential moving average of ``params``, used for
        evaluation and sampling (Ho et al. 2020 App. B).
      opt_state: optax state over ``(params, schedule_params)``.
      schedule_params: parameters of a learned noise schedule
        (``dj.LearnedSchedule``), or None.
      loss_history: ``dj.LossHistory`` of recent losses per timestep for
        importance sampling (Nichol & Dhariwal 2021 sec. 3.3), or None.
      nonfinite_count: int32 scalar, updates skipped in all because the loss or
        the gradient norm was NaN or Inf.
      consecutive_nonfinite: int32 scalar, updates skipped since the last good one.
      ema_schedule_params: exponential moving average of ``schedule_params``
        (None without a learned schedule): evaluation and sampling pair the
        EMA model with the EMA schedule, one consistent model (as VDM averages
        its whole model, the schedule included; Kingma et al. 2021).
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    schedule_params: Any = None
    loss_history: Any = None
    nonfinite_count: jax.Array = dataclasses.field(default_factory=lambda: jnp.zeros((), jnp.int32))
    consecutive_nonfinite: jax.Array = dataclasses.field(default_factory=lambda: jnp.zeros((), jnp.int32))
    ema_schedule_params: Any = None

    @property
    def trainable(self) -> tuple[Any, Any]:
        """What the optimizer updates: ``(params, schedule_params)``."""
        return (self.params, self.schedule_params)

    @property
    def eval_params(self) -> tuple[Any, Any]:
        """What evaluation and sampling use: ``(ema_params, EMA schedule params)``; the latest
        schedule parameters where the state has no average of them (one built by hand)."""
        schedule = self.schedule_params if self.ema_schedule_params is None else self.ema_schedule_params
        return (self.ema_params, schedule)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Adam(W) with global-norm clipping and a warmup (+ optional decay) schedule.

    Attributes:
      learning_rate: peak learning rate.
      warmup_steps: linear warmup from 0 to ``learning_rate`` over this many
        updates (Ho et al. 2020 App. B: 5000).
      grad_clip: clip gradients to this global norm; 0 or None disables.
      weight_decay: decoupled weight decay (Loshchilov & Hutter 2019); 0 is Adam.
      b1, b2, eps: Adam's moment decays and epsilon.
      decay: ``"constant"`` after warmup, or ``"cosine"`` to 0 at ``total_steps``.
      total_steps: the length of the run, for the cosine decay (which needs
        ``total_steps > warmup_steps``).
    """

    learning_rate: float = 2e-4
    warmup_steps: int = 5000
    grad_clip: float | None = 1.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    decay: str = "constant"
    total_steps: int = 1

    def __post_init__(self):
        if self.decay not in DECAYS:
            raise ValueError(f"unknown learning-rate decay {self.decay!r}; expected one of {DECAYS}")
        # `not x > 0` and `not 0 <= x` also reject NaN; infinities are rejected by name.
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.grad_clip is not None and not (0 <= self.grad_clip and math.isfinite(self.grad_clip)):
            raise ValueError(f"grad_clip must be a finite number >= 0, or None, got {self.grad_clip}")
        if not (0 <= self.weight_decay and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps}")
        if self.decay == "cosine" and not self.total_steps > self.warmup_steps:
            raise ValueError(f"decay='cosine' decays to 0 at total_steps, which must exceed warmup_steps "
                             f"(got total_steps={self.total_steps}, warmup_steps={self.warmup_steps}; "
                             "set total_steps to the length of the run)")


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    """lr(n) = peak * min(n / warmup, 1), then constant or cosine to 0 at ``total_steps``.

    ``n`` counts applied updates (skipped non-finite steps do not advance it).
    """
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
    if cfg.decay == "constant":
        after = optax.constant_schedule(cfg.learning_rate)
    else:
        after = optax.cosine_decay_schedule(
            cfg.learning_rate, max(cfg.total_steps - cfg.warmup_steps, 1))
    if cfg.warmup_steps == 0:
        return after
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def make_optimizer(cfg: OptimConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns ``(tx, lr_schedule)``: clip_by_global_norm -> adamw(lr_schedule).

    Without clipping the first link is ``optax.identity()``, so the optimizer
    state has the same structure either way and a run can resume with
    clipping switched on or off. The schedule is returned too, so the training
    step can report the learning rate it used.
    """
    lr = learning_rate_schedule(cfg)
    clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity()
    adam = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return optax.chain(clip, adam), lr


def create_train_state(
    params: Any,
    tx: optax.GradientTransformation,
    *,
    schedule_params: Any = None,
    loss_history: Any = None,
) -> TrainState:
    """A fresh state at step 0; the EMAs start at the initial parameters."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init((params, schedule_params)),
        schedule_params=schedule_params,
        loss_history=loss_history,
        nonfinite_count=jnp.zeros((), jnp.int32),
        consecutive_nonfinite=jnp.zeros((), jnp.int32),
        ema_schedule_params=None if schedule_params is None else jax.tree.map(jnp.copy, schedule_params),
    )


def ema_update(ema: Any, new: Any, decay: float | jax.Array) -> Any:
    """ema' = decay * ema + (1 - decay) * new, leaf by leaf."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, new)


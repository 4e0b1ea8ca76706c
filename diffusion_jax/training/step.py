"""The training step, written for one device of a data-parallel mesh.

:func:`make_train_step` returns a pure function ``(state, batch, base_key) ->
(new_state, metrics)`` that sees this device's block of the global batch and
averages over devices with collectives on the mesh axis ``"data"``. The
trainer maps it with :func:`diffusion_jax.parallel.data_parallel` (state
replicated and donated, batch split); nothing here knows how many devices
there are.

Randomness is derived, never carried: at step ``n`` the step key is
``fold_in(base_key, n)``, split into an examples key and a dropout key.
Timestep, noise and label dropout of example ``i`` of the *global* batch come
from ``fold_in(examples_key, i)``, so a resumed run draws the same numbers as
an uninterrupted one, and the same global batch gives the same update on 1
device or on 8. Dropout is the exception: its key is folded with the device
index (``lax.axis_index``), because the model draws the dropout masks of its
whole per-device batch at once.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

import diffusion_jax as dj
from diffusion_jax import parallel
from diffusion_jax.parallel import DATA_AXIS
from diffusion_jax.training.state import TrainState, ema_update

TIMESTEP_SAMPLERS = ("uniform", "importance")
NUM_T_BINS = 4  # the loss is also reported by quarter of the timestep range

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """How the step turns a batch into a loss (see ``dj.training_losses``).

    Attributes:
      loss: ``"simple"``, ``"vlb"`` or ``"hybrid"``.
      prediction: ``"eps"``, ``"x0"`` or ``"v"``.
      variance: ``"fixed_small"``, ``"fixed_large"`` or ``"learned_range"``.
      min_snr_gamma: min-SNR-gamma weighting of the simple loss, or None.
      vlb_weight: lambda of the hybrid loss.
      timestep_sampler: ``"uniform"``, or ``"importance"`` (Nichol & Dhariwal
        2021 sec. 3.3; needs ``state.loss_history``).
      num_classes: classes of a conditional model, or None.
      cond_drop_rate: probability of replacing a label by the null class
        ``num_classes`` (Ho & Salimans 2022, classifier-free guidance).
    """

    loss: str = "simple"
    prediction: str = "eps"
    variance: str = "fixed_small"
    min_snr_gamma: float | None = None
    vlb_weight: float = 0.001
    timestep_sampler: str = "uniform"
    num_classes: int | None = None
    cond_drop_rate: float = 0.0

    def __post_init__(self):
        if self.timestep_sampler not in TIMESTEP_SAMPLERS:
            raise ValueError(f"unknown timestep_sampler {self.timestep_sampler!r}; "
                             f"expected one of {TIMESTEP_SAMPLERS}")
        if not 0.0 <= self.cond_drop_rate < 1.0:
            raise ValueError(f"cond_drop_rate must lie in [0, 1), got {self.cond_drop_rate}")
        if self.cond_drop_rate > 0 and self.num_classes is None:
            raise ValueError("cond_drop_rate > 0 needs a class-conditional model (num_classes)")


def _all_gather_invariant(x: jax.Array) -> jax.Array:
    """Concatenates every device's ``x`` along axis 0, the same on all devices.

    A ``psum`` of zero-padded blocks: exact (each slot has one non-zero
    summand), and its result is typed as replicated on every JAX version,
    which ``all_gather`` (whose result type changed across versions) is not.
    """
    num_devices = lax.psum(1, DATA_AXIS)
    blocks = jnp.zeros((num_devices,) + x.shape, x.dtype).at[lax.axis_index(DATA_AXIS)].set(x)
    return lax.psum(blocks, DATA_AXIS).reshape((-1,) + x.shape[1:])


def _global_mean(x: jax.Array) -> jax.Array:
    """Mean over the global batch of a per-example ``[b]`` array."""
    return lax.pmean(jnp.mean(x), DATA_AXIS)


def _loss_by_quarter(t: jax.Array, losses: jax.Array, num_timesteps: int) -> Metrics:
    """Mean loss over the global batch within each quarter of [0, T); NaN if a quarter drew no t."""
    bins = (t * NUM_T_BINS) // num_timesteps
    metrics = {}
    for q in range(NUM_T_BINS):
        mask = (bins == q).astype(jnp.float32)
        total = lax.psum(jnp.sum(losses * mask), DATA_AXIS)
        count = lax.psum(jnp.sum(mask), DATA_AXIS)
        metrics[f"loss_q{q}"] = jnp.where(count > 0, total / jnp.maximum(count, 1.0), jnp.nan)
    return metrics


def make_train_step(
    model: nn.Module,
    schedule: dj.DiffusionSchedule | nn.Module,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    *,
    ema_decay: float,
    loss_config: LossConfig,
    num_microbatches: int = 1,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """Builds the per-device training step.

    Args:
      model: ``model.apply({"params": p}, x_t, t, y, train=True)``, e.g. the UNet.
      schedule: a fixed ``dj.DiffusionSchedule``, or a ``dj.LearnedSchedule``
        module whose parameters are ``state.schedule_params``.
      tx: the optimizer over ``(params, schedule_params)``.
      lr_schedule: the learning rate ``tx`` applies after n updates (reported).
      ema_decay: EMA decay of the parameters, in [0, 1].
      loss_config: the loss and its options.
      num_microbatches: gradient accumulation: each device's block of the
        batch is split into this many equal micro-batches, whose gradients a
        ``lax.scan`` sums before the one update, so the activations held at
        once are those of one micro-batch. The update is that of the whole
        batch (the same timesteps, noise and labels, which are drawn per
        example; equal to float32 rounding), except that dropout masks are
        drawn per micro-batch.

    Returns:
      ``train_step(state, batch, base_key) -> (new_state, metrics)`` for one
      device: ``batch["image"]`` float ``[b, H, W, C]`` in [-1, 1] and
      ``batch["label"]`` int ``[b]`` are this device's block of the global
      batch (an unconditional model needs no ``"label"``); ``base_key`` is
      the run's key. The step must run with a mesh axis named ``"data"``
      (``parallel.DATA_AXIS``) bound, as ``parallel.data_parallel`` maps it.
      Metrics are scalars, equal on all devices: ``loss`` (unweighted mean of
      the per-example loss), ``mse`` (min-SNR weighted where set; not with
      ``loss="vlb"``), ``vlb`` (T L_t; not with ``loss="simple"``),
      ``loss_q0..3``, ``grad_norm`` (before clipping), ``lr``, ``nonfinite``
      (1.0 if this update was skipped), ``nonfinite_count`` and
      ``consecutive_nonfinite``.

    Raises:
      ValueError: ``ema_decay`` outside [0, 1], ``num_microbatches`` not an int
        >= 1; when the step is traced, a device's batch that
        ``num_microbatches`` does not divide, a
        ``state.loss_history`` that ``loss_config.timestep_sampler`` does not
        match (importance sampling needs one, uniform sampling takes none), a
        conditional model's batch without ``"label"``, or no ``"data"`` axis.
    """
    cfg = loss_config
    learned = isinstance(schedule, nn.Module)
    num_timesteps = schedule.num_timesteps
    if isinstance(ema_decay, bool) or not 0.0 <= ema_decay <= 1.0:  # also NaN
        raise ValueError(f"ema_decay must lie in [0, 1], got {ema_decay!r}")
    if isinstance(num_microbatches, bool) or not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"num_microbatches must be an int >= 1, got {num_microbatches!r}")

    def train_step(state: TrainState, batch: Batch, base_key: jax.Array):
        if (cfg.timestep_sampler == "importance") != (state.loss_history is not None):
            raise ValueError(
                f"loss_config.timestep_sampler={cfg.timestep_sampler!r} but the state "
                f"{'has no' if state.loss_history is None else 'has a'} loss_history: importance "
                "sampling needs one (create_train_state(..., loss_history=dj.init_loss_history(T))) "
                "and uniform sampling takes none")
        if cfg.num_classes is not None and "label" not in batch:
            raise ValueError(f"a class-conditional model (num_classes={cfg.num_classes}) needs batch['label']")
        try:
            lax.axis_index(DATA_AXIS)
        except NameError:
            raise ValueError(f"the training step needs a mesh axis named {DATA_AXIS!r} (parallel.DATA_AXIS): "
                             "map it with parallel.data_parallel, or shard_map over such an axis") from None
        x0, labels = batch["image"], batch.get("label")
        local_batch = x0.shape[0]
        if local_batch % num_microbatches:
            raise ValueError(f"num_microbatches={num_microbatches} does not divide this device's "
                             f"batch of {local_batch} examples")

        # 1. Keys: per step, then per example of the global batch.
        examples_key, dropout_key = jax.random.split(jax.random.fold_in(base_key, state.step))
        first = lax.axis_index(DATA_AXIS) * local_batch
        example_keys = jax.vmap(lambda i: jax.random.fold_in(examples_key, i))(
            first + jnp.arange(local_batch))
        k_t, k_noise, k_label = (
            jax.vmap(lambda k, j=j: jax.random.fold_in(k, j))(example_keys) for j in range(3))
        dropout_key = jax.random.fold_in(dropout_key, lax.axis_index(DATA_AXIS))

        # 2. Timesteps (uniform, or importance-sampled from the shared history),
        #    noise and, for classifier-free guidance, dropped labels.
        t, weights = jax.vmap(
            lambda k: dj.sample_timesteps(k, 1, num_timesteps, state.loss_history))(k_t)
        t, weights = t[:, 0], weights[:, 0]
        noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], x0.dtype))(k_noise)
        y = None
        if cfg.num_classes is not None:
            drop = jax.vmap(lambda k: jax.random.bernoulli(k, cfg.cond_drop_rate))(k_label)
            y = jnp.where(drop, cfg.num_classes, labels)

        # 3. Loss and gradients: this device's mean loss and gradient (summed
        #    over its micro-batches), then the mean over devices (equal shards,
        #    so it is the global-batch mean).
        def loss_fn(trainable, x0, t, noise, weights, y, dropout_key):
            params, schedule_params = trainable
            sched = schedule.apply({"params": schedule_params}) if learned else schedule

            def model_fn(x_t, t_model):
                return model.apply({"params": params}, x_t, t_model, y, train=True,
                                   rngs={"dropout": dropout_key})

            losses = dj.training_losses(
                model_fn, sched, x0, t, noise, loss=cfg.loss, prediction=cfg.prediction,
                variance=cfg.variance, min_snr_gamma=cfg.min_snr_gamma, vlb_weight=cfg.vlb_weight)
            # Importance weights apply to the part that depends on t; L_T does not.
            return jnp.mean((losses.loss - losses.prior) * weights + losses.prior), losses

        trainable = parallel.vary_over_data(state.trainable)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if num_microbatches == 1:
            (_, losses), grads = grad_fn(trainable, x0, t, noise, weights, y, dropout_key)
        else:
            def micro_step(grads_sum, micro):
                index, *inputs = micro
                (_, micro_losses), micro_grads = grad_fn(
                    trainable, *inputs, jax.random.fold_in(dropout_key, index))
                return jax.tree.map(jnp.add, grads_sum, micro_grads), micro_losses

            def split(x):  # [b, ...] -> [num_microbatches, b / num_microbatches, ...]
                return None if x is None else x.reshape((num_microbatches, -1) + x.shape[1:])

            zeros = jax.tree.map(jnp.zeros_like, trainable)
            grads, losses = lax.scan(micro_step, zeros, (
                jnp.arange(num_microbatches), *map(split, (x0, t, noise, weights, y))))
            grads = jax.tree.map(lambda g: g / num_microbatches, grads)
            losses = jax.tree.map(lambda x: x.reshape((local_batch,) + x.shape[2:]), losses)
        grads = lax.pmean(grads, DATA_AXIS)
        grad_norm = optax.tree.norm(grads)
        loss = _global_mean(losses.loss)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        # 4. Update; a non-finite loss, gradient or update keeps the old values
        #    (no host sync: the choice is made on device and only counted). A
        #    finite gradient can still give an update that overflows (a learning
        #    rate far too large); its norm is checked too, so NaN/Inf parameters
        #    are never accepted, and never checkpointed.
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        finite = finite & jnp.isfinite(optax.tree.norm(updates))
        params, schedule_params = optax.apply_updates(state.trainable, updates)
        ema_params = ema_update(state.ema_params, params, ema_decay)
        ema_schedule_params = state.ema_schedule_params
        if ema_schedule_params is not None:
            ema_schedule_params = ema_update(ema_schedule_params, schedule_params, ema_decay)
        loss_history = state.loss_history
        if loss_history is not None:
            loss_history = dj.update_loss_history(
                loss_history, _all_gather_invariant(t), _all_gather_invariant(losses.loss - losses.prior))

        def keep_if_finite(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        skipped = (~finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1,
            params=keep_if_finite(params, state.params),
            ema_params=keep_if_finite(ema_params, state.ema_params),
            opt_state=keep_if_finite(opt_state, state.opt_state),
            schedule_params=keep_if_finite(schedule_params, state.schedule_params),
            ema_schedule_params=keep_if_finite(ema_schedule_params, state.ema_schedule_params),
            loss_history=keep_if_finite(loss_history, state.loss_history),
            nonfinite_count=state.nonfinite_count + skipped,
            consecutive_nonfinite=(state.consecutive_nonfinite + 1) * skipped,
        )

        # 5. Metrics: scalars, equal on every device.
        metrics = {
            "loss": loss,
            **({} if cfg.loss == "vlb" else {"mse": _global_mean(losses.mse)}),
            **({} if cfg.loss == "simple" else {"vlb": _global_mean(losses.vlb)}),
            **_loss_by_quarter(t, losses.loss, num_timesteps),
            "grad_norm": grad_norm,
            # The optimizer's step count is the number of applied updates.
            "lr": lr_schedule(state.step - state.nonfinite_count),
            "nonfinite": skipped.astype(jnp.float32),
            "nonfinite_count": new_state.nonfinite_count,
            "consecutive_nonfinite": new_state.consecutive_nonfinite,
        }
        return new_state, metrics

    return train_step


def make_multi_step(
    train_step: Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]],
    num_steps: int,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """``num_steps`` training steps in one call: fewer dispatches from the host.

    ``multi_step(state, batches, base_key) -> (state, metrics)`` runs
    ``train_step`` once per batch of ``batches``, whose leaves carry a leading
    axis of ``num_steps`` (this device's block of each step's batch behind it),
    as a ``lax.scan`` with the state as its carry; every metric comes back
    with a leading axis of ``num_steps``, one entry per step. Step ``n`` draws
    its randomness from ``fold_in(base_key, n)`` as a single step does, so the
    result is that of ``num_steps`` calls of ``train_step`` (up to how XLA
    compiles the loop body: float32 rounding).

    Raises:
      ValueError: if ``num_steps`` is not an int >= 1.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")

    def multi_step(state: TrainState, batches: Batch, base_key: jax.Array):
        leading = {x.shape[0] for x in jax.tree.leaves(batches)}
        if leading != {num_steps}:
            raise ValueError(f"multi_step runs {num_steps} steps: every batch leaf needs a leading "
                             f"axis of {num_steps}, got leading sizes {sorted(leading)}")
        return lax.scan(lambda s, batch: train_step(s, batch, base_key), state, batches)

    return multi_step

"""Training, evaluation and sampling jobs, assembled from the library's parts.

``train.py`` calls one of the three entry points at the bottom of this file:

* :func:`train_and_evaluate` — train (resuming from the workdir's latest
  checkpoint), with progress, TensorBoard scalars, periodic NLL and sample
  grids, checkpoints, and a clean stop on SIGTERM/SIGINT;
* :func:`evaluate` — the variational bound in bits/dim over the whole test
  split, spread over all devices, to ``workdir/nll.json``;
* :func:`sample` — images from the latest checkpoint's EMA parameters, to a
  PNG grid and an ``.npz`` in ``workdir/samples/``.

The file reads top to bottom:

1. Config -> typed settings, and :func:`validate_config`.
2. Building blocks: model, schedule, optimizer, the initial state.
3. Device programs: the NLL and the sampler, per device.
4. Host-side helpers: metric summaries, signals, output files.
5. The three jobs.

Data flow: config -> (``input_pipeline``, ``models``, ``training.state``,
``training.step``, ``parallel``, ``checkpointing``, ``metric_writers``). Only
``parallel`` builds meshes and shardings, only ``checkpointing`` talks to
Orbax, only ``input_pipeline`` to TFDS/grain, only ``metric_writers`` writes
logs and images. Only process 0 writes files other than checkpoints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

import diffusion_jax as dj
from diffusion_jax import _files
from diffusion_jax import checkpointing
from diffusion_jax import input_pipeline
from diffusion_jax import metric_writers
from diffusion_jax import parallel
from diffusion_jax.losses import LOSSES
from diffusion_jax.models import UNet, UNetConfig
from diffusion_jax.training.state import DECAYS, OptimConfig, TrainState, create_train_state, make_optimizer
from diffusion_jax.training.step import TIMESTEP_SAMPLERS, LossConfig, make_multi_step, make_train_step

logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
TENSORBOARD_SUBDIR = "tensorboard"
SAMPLES_SUBDIR = "samples"
NLL_FILENAME = "nll.json"
COMPUTE_DTYPES = ("float32", "bfloat16")


# =============================================================================
# 1. Config -> typed settings, and validation
# =============================================================================
# Each module receives a small typed dataclass built from its part of the
# config, never the whole ConfigDict.


# Fields of config.data that say how to read the data, not which: the train iterator's arguments.
_DATA_READING_FIELDS = ("worker_count",)


def _data_config(config) -> input_pipeline.DataConfig:
    return input_pipeline.DataConfig(**{k: v for k, v in config.data.to_dict().items()
                                        if k not in _DATA_READING_FIELDS})


def _unet_config(config, image_channels: int) -> UNetConfig:
    """The UNet's settings; its output has 2C channels when it also predicts variances."""
    out_channels = image_channels * (2 if config.diffusion.variance == "learned_range" else 1)
    return UNetConfig(**config.model.to_dict(), out_channels=out_channels, dtype=config.compute_dtype)


def _optim_config(config) -> OptimConfig:
    return OptimConfig(**config.optim.to_dict(), total_steps=config.num_train_steps)


def _loss_config(config) -> LossConfig:
    d = config.diffusion
    return LossConfig(
        loss=d.loss, prediction=d.prediction, variance=d.variance, min_snr_gamma=d.min_snr_gamma,
        vlb_weight=d.vlb_weight, timestep_sampler=d.timestep_sampler,
        num_classes=config.model.num_classes, cond_drop_rate=config.cond_drop_rate)


def _fail(field: str, problem: str, error: type[Exception] = ValueError):
    raise error(f"config.{field}: {problem}")


def _check_int(config, field: str, *, minimum: int) -> int:
    value = _get(config, field)
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(field, f"must be an int, got {value!r}", TypeError)
    if value < minimum:
        _fail(field, f"must be >= {minimum}, got {value}")
    return value


def _check_choice(config, field: str, allowed) -> None:
    value = _get(config, field)
    if value not in allowed:
        _fail(field, f"unknown value {value!r}; expected one of {tuple(allowed)}")


def _check_range(config, field: str, low: float, high: float, *, high_open: bool = False) -> None:
    """``low <= value <= high`` (``< high`` with ``high_open``), finite (NaN fails the comparisons)."""
    value = _get(config, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(field, f"must be a number, got {value!r}", TypeError)
    if not (low <= value < high if high_open else low <= value <= high) or not math.isfinite(value):
        _fail(field, f"must be a finite number in [{low}, {high}{')' if high_open else ']'}, got {value}")


def _dataclass_fields(cls, derived: tuple[str, ...] = ()) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in derived)


# Every field a config may have, by section ("" the top level): configs/default.py
# sets them all (tests/test_configs.py checks the two agree). A misspelled field in
# a config file (config.diffusion.predicton = "v") would otherwise be ignored.
_SCHEMA = {
    "": ("num_train_steps", "batch_size", "seed", "log_every_steps", "checkpoint_every_steps",
         "eval_every_steps", "ema_decay", "max_consecutive_nonfinite", "cond_drop_rate", "distributed",
         "compute_dtype", "steps_per_dispatch", "num_microbatches", "data", "model", "diffusion", "optim",
         "sample", "eval", "checkpoint"),
    "data": _dataclass_fields(input_pipeline.DataConfig) + _DATA_READING_FIELDS,
    "model": _dataclass_fields(UNetConfig, derived=("out_channels", "dtype")),
    "diffusion": ("num_timesteps", "schedule", "schedule_kwargs", "learned_schedule", "prediction", "variance",
                  "loss", "min_snr_gamma", "vlb_weight", "timestep_sampler"),
    "optim": _dataclass_fields(OptimConfig, derived=("total_steps",)),
    "sample": ("sampler", "num_steps", "spacing", "eta", "num_images", "guidance_scale", "clip_denoised"),
    "eval": ("batch_size", "num_batches_during_training", "nll_at_end", "clip_denoised"),
    "checkpoint": ("max_to_keep", "async_save"),
}


def _check_known_fields(config) -> None:
    """Every section is a section and every field one of ``_SCHEMA``'s, naming the first that is not."""
    for section, known in _SCHEMA.items():
        node = _get(config, section) if section else config
        if not isinstance(node, (ml_collections.ConfigDict, dict)):
            _fail(section, f"must be a section (a ConfigDict), got {node!r}", TypeError)
        for name in node:
            if name not in known:
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                _fail(f"{section}.{name}" if section else str(name),
                      f"is not a config field{hint}; configs/default.py lists them all")


def _get(config, field: str):
    value = config
    for part in field.split("."):
        if part not in value:
            _fail(field, "is missing (start from configs/default.py)", KeyError)
        value = value[part]
    return value


def _reraise_as_field(field: str, build: Callable[[], Any]) -> Any:
    """Builds a typed config, naming the config section in any error."""
    try:
        return build()
    except (ValueError, TypeError) as e:
        raise type(e)(f"config.{field}: {e}") from e


def _check_workdir(workdir: str) -> None:
    """The workdir exists or can be created, and a file can be written in it (local or a bucket)."""
    if not isinstance(workdir, (str, os.PathLike)) or not str(workdir).strip():
        raise ValueError(f"workdir must be a non-empty path, got {workdir!r}")
    try:
        _files.check_writable(workdir)
    except OSError as e:
        raise ValueError(f"workdir {workdir!r} is not writable: {e}") from e


def validate_config(
    config: ml_collections.ConfigDict,
    *,
    device_count: int,
    process_count: int = 1,
    workdir: str | None = None,
    training: bool = True,
) -> None:
    """Checks every field of ``config``; raises a ValueError/TypeError naming the field.

    Runs before anything compiles or reads data. What needs the data itself
    (the dataset exists, its channels and classes) is checked right after,
    by ``input_pipeline.dataset_info`` in :func:`train_and_evaluate`.

    Args:
      config: a config built from ``configs/default.py``.
      device_count: devices of the whole job (the global batch is split over them).
      process_count: processes of the job (each reads its share of the batch).
      workdir: if given, must be writable (created if missing).
      training: whether the config will train; if not (evaluation, sampling), how
        ``batch_size`` and ``num_microbatches`` split over this job's devices is
        not checked (a run trained on one GPU evaluates on eight).
    """
    _check_known_fields(config)
    # Top-level fields.
    for field, minimum in (("num_train_steps", 1), ("batch_size", 1), ("seed", 0),
                           ("log_every_steps", 1), ("checkpoint_every_steps", 1),
                           ("eval_every_steps", 0), ("max_consecutive_nonfinite", 1),
                           ("steps_per_dispatch", 1), ("num_microbatches", 1)):
        _check_int(config, field, minimum=minimum)
    if config.seed >= 2**32:  # PRNGKey(seed) keeps 32 bits: 2**32 would train as seed 0
        _fail("seed", f"must be < 2**32, got {config.seed}")
    for field in ("log_every_steps", "checkpoint_every_steps", "eval_every_steps"):
        if _get(config, field) % config.steps_per_dispatch:
            _fail(field, f"{_get(config, field)} is not a multiple of steps_per_dispatch="
                  f"{config.steps_per_dispatch}: logs, checkpoints and evaluations happen between calls")
    for count, what in ((device_count, "devices"), (process_count, "processes")):
        if training and config.batch_size % count:
            _fail("batch_size", f"{config.batch_size} is not divisible by the {count} {what} of this job")
    if training and config.batch_size % (device_count * config.num_microbatches):
        _fail("num_microbatches", f"{config.num_microbatches} does not divide each device's "
              f"{config.batch_size // device_count} examples (batch_size={config.batch_size} over "
              f"{device_count} devices)")
    data_dir = config.data.data_dir
    if data_dir is not None and (not isinstance(data_dir, str) or data_dir.strip() in ("", "None")):
        # `--config.data.data_dir=None` arrives as the string 'None' (a folder of that name), '' as the cwd.
        _fail("data.data_dir", f"must be a path or None (unset it to use the default), got {data_dir!r}")
    _check_range(config, "ema_decay", 0.0, 1.0)
    if config.ema_decay == 1.0:
        _fail("ema_decay", "1.0 would keep the EMA at the initial weights, which evaluation and sampling use; "
              "it must be < 1")
    _check_range(config, "cond_drop_rate", 0.0, 1.0, high_open=True)
    _reraise_as_field("distributed", lambda: parallel.distributed_setting(config.distributed))
    _check_choice(config, "compute_dtype", COMPUTE_DTYPES)

    # Data and model: the typed configs check their own fields.
    data = _reraise_as_field("data", lambda: _data_config(config))
    _check_int(config, "data.worker_count", minimum=0)
    unet = _reraise_as_field("model", lambda: _unet_config(config, image_channels=1))
    downsamplings = len(unet.ch_mult) - 1
    if data.image_size % 2**downsamplings:
        _fail("data.image_size", f"{data.image_size} is not divisible by 2**{downsamplings} = "
              f"{2**downsamplings}, the downsampling of model.ch_mult={unet.ch_mult}")
    resolutions = [data.image_size >> level for level in range(len(unet.ch_mult))]
    unused = sorted(set(unet.attn_resolutions) - set(resolutions))
    if unused:
        _fail("model.attn_resolutions", f"{unused} match no feature-map size of this model "
              f"(sizes {resolutions} for image_size {data.image_size})")
    for level, size in enumerate(resolutions):
        if size in unet.attn_resolutions or level == len(resolutions) - 1:
            _reraise_as_field("model", lambda mult=unet.ch_mult[level]: unet.num_attention_heads(unet.ch * mult))
    if unet.attention_impl == "cudnn" and config.compute_dtype != "bfloat16":
        _fail("model.attention_impl", f"'cudnn' (a fused GPU kernel) needs compute_dtype='bfloat16', "
              f"got {config.compute_dtype!r}")
    if config.cond_drop_rate > 0 and config.model.num_classes is None:
        _fail("cond_drop_rate", "> 0 needs a class-conditional model (set model.num_classes)")

    # Diffusion.
    d = "diffusion"
    num_timesteps = _check_int(config, f"{d}.num_timesteps", minimum=1)
    _check_choice(config, f"{d}.schedule", dj.SCHEDULE_NAMES)
    _check_choice(config, f"{d}.prediction", dj.PREDICTIONS)
    _check_choice(config, f"{d}.variance", dj.VARIANCES)
    _check_choice(config, f"{d}.loss", LOSSES)
    _check_choice(config, f"{d}.timestep_sampler", TIMESTEP_SAMPLERS)
    if not isinstance(config.diffusion.learned_schedule, bool):
        _fail(f"{d}.learned_schedule", f"must be a bool, got {config.diffusion.learned_schedule!r}", TypeError)
    if config.diffusion.learned_schedule:
        if config.diffusion.loss != "vlb":
            _fail(f"{d}.learned_schedule", "needs diffusion.loss='vlb': only the bound gives the schedule "
                  f"a meaningful gradient (got loss={config.diffusion.loss!r})")
        if config.optim.weight_decay:
            _fail(f"{d}.learned_schedule", "needs optim.weight_decay=0: weight decay would pull the schedule's "
                  "parameters (its log-SNR endpoints) towards 0 as well, narrowing the noise levels it covers "
                  f"(got weight_decay={config.optim.weight_decay!r})")
    else:
        # Builds the tables (NumPy, no compilation): checks the kwargs and the beta range.
        _reraise_as_field(f"{d}.schedule", lambda: dj.make_schedule(
            config.diffusion.schedule, num_timesteps, **config.diffusion.schedule_kwargs.to_dict()))
    if config.diffusion.variance == "learned_range" and config.diffusion.loss == "simple":
        _fail(f"{d}.variance", "'learned_range' needs loss='hybrid' or 'vlb': the simple loss does not "
              "train the variance channels")
    gamma = config.diffusion.min_snr_gamma
    if gamma is not None and (isinstance(gamma, bool) or not isinstance(gamma, (int, float))
                              or not 0 < gamma < math.inf):
        _fail(f"{d}.min_snr_gamma", f"must be a finite positive number or None, got {gamma!r}")
    if gamma is not None and config.diffusion.loss == "vlb":
        _fail(f"{d}.min_snr_gamma", "weights the simple loss, which loss='vlb' does not have: "
              "use loss='simple' or 'hybrid', or min_snr_gamma=None")
    _check_range(config, f"{d}.vlb_weight", 0.0, math.inf)

    # Optimizer.
    _check_choice(config, "optim.decay", DECAYS)
    lengths = (config.num_train_steps, config.optim.warmup_steps)
    if (config.optim.decay == "cosine" and all(isinstance(n, int) and not isinstance(n, bool) for n in lengths)
            and not lengths[0] > lengths[1]):
        _fail("optim.decay", f"'cosine' decays to 0 at num_train_steps, which must exceed optim.warmup_steps "
              f"(got num_train_steps={config.num_train_steps}, warmup_steps={config.optim.warmup_steps})")
    _reraise_as_field("optim", lambda: _optim_config(config))

    # Sampling.
    _check_choice(config, "sample.sampler", dj.SAMPLERS)
    if config.sample.num_steps is not None:
        steps = _check_int(config, "sample.num_steps", minimum=1)
        if steps > num_timesteps:
            _fail("sample.num_steps", f"{steps} exceeds diffusion.num_timesteps={num_timesteps}")
    if config.sample.spacing is not None:
        _check_choice(config, "sample.spacing", dj.SPACINGS)
        if config.sample.num_steps is None:
            _fail("sample.spacing", f"{config.sample.spacing!r} chooses the rows sample.num_steps keeps; "
                  "set sample.num_steps too (or spacing None)")
        if (config.sample.spacing == "log_snr" and config.diffusion.learned_schedule
                and config.sample.num_steps not in (None, num_timesteps)):
            _fail("sample.spacing", "'log_snr' needs a fixed schedule: a learned schedule's rows cannot be "
                  "chosen inside the compiled sampler; use 'time' (or None)")
    _check_range(config, "sample.eta", 0.0, 1.0)
    if config.sample.eta != 0 and config.sample.sampler != "ddim":
        _fail("sample.eta", f"{config.sample.eta} applies to sample.sampler='ddim' only, "
              f"got sampler={config.sample.sampler!r}")
    _check_int(config, "sample.num_images", minimum=0)
    _check_range(config, "sample.guidance_scale", 0.0, math.inf)
    if config.sample.guidance_scale > 0 and config.model.num_classes is None:
        _fail("sample.guidance_scale", "> 0 needs a class-conditional model (set model.num_classes)")
    if config.sample.guidance_scale > 0 and config.cond_drop_rate == 0:
        _fail("sample.guidance_scale", "> 0 needs cond_drop_rate > 0: guidance extrapolates away from the "
              "null class, which no training example has with cond_drop_rate=0 (the paper's is 0.1)")
    if not isinstance(config.sample.clip_denoised, bool):
        _fail("sample.clip_denoised", f"must be a bool, got {config.sample.clip_denoised!r}", TypeError)

    # Evaluation.
    _check_int(config, "eval.batch_size", minimum=1)
    _check_int(config, "eval.num_batches_during_training", minimum=0)
    for field in ("eval.nll_at_end", "eval.clip_denoised", "checkpoint.async_save"):
        if not isinstance(_get(config, field), bool):
            _fail(field, f"must be a bool, got {_get(config, field)!r}", TypeError)

    # Checkpoints and workdir.
    _check_int(config, "checkpoint.max_to_keep", minimum=1)
    if workdir is not None:
        _check_workdir(workdir)


# Fields a run may change when it resumes without changing what it trains: how
# long (unless the learning rate decays to the end), how often it logs, saves and
# evaluates, how it samples, where the data lives, how it is run.
# The model's two speed-only choices (the same values either way) are free too, also at
# inference: a run trained with cuDNN attention on a GPU samples on a CPU.
_SPEED_ONLY_MODEL_FIELDS = ("model.attention_impl", "model.conv_weight_grad")
_OPERATIONAL_FIELDS = ("num_train_steps", "log_every_steps", "checkpoint_every_steps", "eval_every_steps",
                       "max_consecutive_nonfinite", "steps_per_dispatch", "num_microbatches", "distributed",
                       "data.data_dir", "data.worker_count") + _SPEED_ONLY_MODEL_FIELDS
_OPERATIONAL_SECTIONS = ("eval.", "sample.", "checkpoint.")
# Fields that define what a checkpoint's parameters compute: the diffusion, the network
# and the image size. Evaluating or sampling under other values gives wrong numbers, and
# training on under them silently changes what the saved parameters mean (while
# checkpoint.max_to_keep rotates out the steps trained under the old values), so both are
# refused. Not among them: dropout (off at inference), the speed-only fields, and what
# only says how the parameters are trained (the loss and its options).
_MODEL_SECTIONS = ("diffusion.", "model.")
_MODEL_FIELDS_FREE_AT_INFERENCE = ("model.dropout",) + _SPEED_ONLY_MODEL_FIELDS
# (Not the timestep sampler: importance sampling's loss history is part of the saved state.)
_TRAINING_OBJECTIVE_FIELDS = ("diffusion.loss", "diffusion.min_snr_gamma", "diffusion.vlb_weight")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):  # an empty one adds nothing: {} and absent keys say the same
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_ABSENT = "(absent)"


def _config_changes(saved: dict, config) -> list[tuple[str, Any, Any]]:
    """``(field, saved value, current value)`` for every field that differs, as JSON values
    (``"(absent)"`` where one side lacks the field)."""
    current = _flatten(json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else config)))
    saved = _flatten(saved)
    return [(field, saved.get(field, _ABSENT), current.get(field, _ABSENT))
            for field in sorted(set(saved) | set(current))
            if saved.get(field, _ABSENT) != current.get(field, _ABSENT)]


def _describe(changes) -> str:
    return ", ".join(f"{field} {old!r} -> {new!r}" for field, old, new in changes)


def _defines_model(field: str) -> bool:
    if field == "data.image_size":
        return True
    return (field.startswith(_MODEL_SECTIONS) and field not in _MODEL_FIELDS_FREE_AT_INFERENCE
            and field not in _TRAINING_OBJECTIVE_FIELDS)


def _model_changes_message(changes, step: int, directory) -> str:
    return (f"The config differs from the one checkpoint step {step} in {directory} was trained with, in "
            f"fields that define the model: {_describe(changes)}. Run with the training run's config and "
            "overrides (the checkpoint's copy is in its config/metadata file)")


def _check_resumed_config(config, saved: dict | None, step: int, directory, *, allow_model_changes: bool) -> None:
    """Refuses fields that define the model changed since the checkpoint (unless allowed);
    logs the other fields that differ and change the training."""
    if saved is None:
        return
    model_changes = [c for c in _config_changes(saved, config) if _defines_model(c[0])]
    if model_changes and not allow_model_changes:
        raise ValueError(
            _model_changes_message(model_changes, step, directory) + ". Training on under the new values "
            "would change what the saved parameters mean, and the steps trained under the old ones would "
            "be deleted as newer ones are saved (checkpoint.max_to_keep). To fine-tune them under the new "
            "values on purpose, pass allow_model_changes=True (train.py --allow_model_changes), best in a "
            "copy of the workdir.")
    cosine = config.optim.decay == "cosine"

    def changes_training(field):
        if field == "num_train_steps":
            return cosine  # the cosine decay's end moves: the learning rate jumps
        if field == "data.data_dir" and config.data.name == "folder":
            return True  # where the images are is which images: another folder is other data
        return field not in _OPERATIONAL_FIELDS and not field.startswith(_OPERATIONAL_SECTIONS)

    changes = [c for c in _config_changes(saved, config) if changes_training(c[0])]
    if changes:
        logger.warning("Resuming from step %d with a config that differs from the checkpoint's in fields that "
                       "change the training: %s. The run goes on with the new values.", step, _describe(changes))


def _check_inference_config(config, saved: dict | None, step: int, directory) -> None:
    """Evaluating or sampling needs the diffusion, model and image size the checkpoint was
    trained with. A model trained without label dropout (cond_drop_rate 0) has an untrained
    null class: evaluating it with cond_drop_rate > 0 (the NLL of p(x), through the null
    class) is refused too. The other way is fine: a model trained with label dropout
    evaluated with cond_drop_rate 0 gives its conditional NLL p(x | label)."""
    if saved is None:
        return
    changes = _config_changes(saved, config)
    refused = [c for c in changes if _defines_model(c[0])]
    refused += [(field, old, new) for field, old, new in changes
                if field == "cond_drop_rate" and old == 0 and isinstance(new, (int, float)) and new > 0]
    if refused:
        raise ValueError(_model_changes_message(refused, step, directory) + ".")


def _check_data_matches(config, info: input_pipeline.DatasetInfo) -> None:
    """What only the data can tell: its classes fit the model's."""
    num_classes = config.model.num_classes
    if num_classes is not None and info.num_classes is not None and num_classes != info.num_classes:
        _fail("model.num_classes", f"{num_classes} differs from the {info.num_classes} classes of dataset "
              f"{config.data.name!r}")
    if num_classes is not None and info.num_classes is None:
        _fail("model.num_classes", f"is set but dataset {config.data.name!r} has no labels")


# =============================================================================
# 2. Building blocks: model, schedule, optimizer, initial state
# =============================================================================


def _make_schedule(config) -> dj.DiffusionSchedule | dj.LearnedSchedule:
    """A fixed schedule pytree, or the learned-schedule module (params in the state)."""
    d = config.diffusion
    if d.learned_schedule:
        return dj.LearnedSchedule(num_timesteps=d.num_timesteps)
    return dj.make_schedule(d.schedule, d.num_timesteps, **d.schedule_kwargs.to_dict())


class _Job:
    """What every mode builds from the config: mesh, model, schedule, optimizer, state shape."""

    def __init__(self, config, image_shape: tuple[int, int, int]):
        self.config = config
        self.image_shape = tuple(image_shape)
        self.mesh = parallel.make_mesh()
        self.model = UNet(_unet_config(config, image_shape[-1]))
        self.schedule = _make_schedule(config)
        self.learned_schedule = isinstance(self.schedule, dj.LearnedSchedule)
        self.tx, self.lr_schedule = make_optimizer(_optim_config(config))
        root = jax.random.PRNGKey(config.seed)
        self.init_key, self.train_key, self.eval_key, self.sample_key = jax.random.split(root, 4)

    def init_state(self, key: jax.Array) -> TrainState:
        """The step-0 state (pure, for eval_shape and jit)."""
        h, w, c = self.image_shape
        x = jnp.zeros((1, h, w, c), jnp.float32)
        t = jnp.zeros((1,), jnp.int32)
        y = None if self.config.model.num_classes is None else jnp.zeros((1,), jnp.int32)
        model_key, schedule_key = jax.random.split(key)
        params = self.model.init({"params": model_key}, x, t, y, train=False)["params"]
        schedule_params = (self.schedule.init(schedule_key)["params"] if self.learned_schedule else None)
        history = (dj.init_loss_history(self.config.diffusion.num_timesteps)
                   if self.config.diffusion.timestep_sampler == "importance" else None)
        return create_train_state(params, self.tx, schedule_params=schedule_params, loss_history=history)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and (replicated) shardings of the state, without computing it."""
        sharding = parallel.replicated_sharding(self.mesh)
        shapes = jax.eval_shape(self.init_state, self.init_key)
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)

    def create_state(self) -> TrainState:
        """The step-0 state, computed directly on every device (replicated)."""
        init = jax.jit(self.init_state, out_shardings=parallel.replicated_sharding(self.mesh))
        return init(self.init_key)

    def checkpointer(self, workdir: str, *, read_only: bool = False) -> checkpointing.Checkpointer:
        c = self.config
        return checkpointing.Checkpointer(
            os.path.join(workdir, CHECKPOINT_SUBDIR), max_to_keep=c.checkpoint.max_to_keep,
            save_interval_steps=c.checkpoint_every_steps, async_save=c.checkpoint.async_save,
            config=None if read_only else c.to_dict(), read_only=read_only)

    def schedule_from(self, schedule_params) -> dj.DiffusionSchedule:
        if self.learned_schedule:
            return self.schedule.apply({"params": schedule_params})
        return self.schedule

    # =========================================================================
    # 3. Device programs (per device; mapped over the mesh by parallel)
    # =========================================================================

    def nll_program(self) -> Callable[[Any, Any, dict, jax.Array], jax.Array]:
        """``(params, schedule_params, batch, key) -> bpd [global batch]`` (Ho et al. eq. 5).

        Class-conditional models trained with ``cond_drop_rate > 0`` are
        evaluated with the null label, i.e. as the unconditional model p(x)
        that classifier-free guidance trains; with ``cond_drop_rate = 0`` the
        null class is untrained, and the bound is that of p(x | label), with
        each image's own label.
        """
        cfg = self.config
        null_label = cfg.model.num_classes
        unconditional = cfg.cond_drop_rate > 0

        def per_device(params, schedule_params, batch, key):
            images = batch["image"]
            y = None
            if null_label is not None:
                y = (jnp.full(images.shape[:1], null_label, jnp.int32) if unconditional
                     else batch["label"].astype(jnp.int32))

            def model_fn(x, t):
                return self.model.apply({"params": params}, x, t, y, train=False)

            key = jax.random.fold_in(key, lax.axis_index(parallel.DATA_AXIS))
            nll = dj.nll_bpd(model_fn, self.schedule_from(schedule_params), images, key,
                             prediction=cfg.diffusion.prediction, variance=cfg.diffusion.variance,
                             clip_denoised=cfg.eval.clip_denoised)
            return nll.total

        return parallel.data_parallel(per_device, self.mesh, in_specs=(P(), P(), P(parallel.DATA_AXIS), P()),
                                      out_specs=P(parallel.DATA_AXIS))

    def sample_program(self, num_images: int, *, sampler: str, num_steps: int | None):
        """``(params, schedule_params, key) -> images [n, H, W, C]``, n >= num_images.

        In [-1, 1] with ``sample.clip_denoised`` (the last step returns the
        clipped x0 estimate); unclipped otherwise. ``n`` is ``num_images``
        rounded up to a multiple of the device count; each device draws its
        share with its own key. Conditional models draw image ``i`` of class
        ``i % num_classes``, guided with ``sample.guidance_scale`` (Ho &
        Salimans 2022 eq. 6). ``num_steps`` keeps the rows that
        ``sample.spacing`` says; with a learned schedule, traced here, the
        default is "time".
        """
        cfg = self.config
        num_devices = self.mesh.size
        spacing = None
        if num_steps is not None and num_steps != cfg.diffusion.num_timesteps:
            spacing = cfg.sample.spacing or ("time" if self.learned_schedule else None)
        per_device_images = -(-num_images // num_devices)
        num_classes = cfg.model.num_classes

        def per_device(params, schedule_params, key):
            index = lax.axis_index(parallel.DATA_AXIS)
            key = jax.random.fold_in(key, index)

            def conditional(x, t, y):
                return self.model.apply({"params": params}, x, t, y, train=False)

            if num_classes is None:
                model_fn = lambda x, t: conditional(x, t, None)  # noqa: E731
            else:
                labels = (index * per_device_images + jnp.arange(per_device_images)) % num_classes
                model_fn = dj.classifier_free_guidance(
                    conditional, labels.astype(jnp.int32), guidance_scale=cfg.sample.guidance_scale,
                    null_label=num_classes, variance=cfg.diffusion.variance)
            return dj.sample(model_fn, self.schedule_from(schedule_params),
                             (per_device_images,) + self.image_shape, key, sampler=sampler,
                             num_steps=num_steps, spacing=spacing, eta=cfg.sample.eta,
                             prediction=cfg.diffusion.prediction,
                             variance=cfg.diffusion.variance, clip_denoised=cfg.sample.clip_denoised)

        return parallel.data_parallel(per_device, self.mesh, in_specs=(P(), P(), P()),
                                      out_specs=P(parallel.DATA_AXIS))

    def nll_over_split(self, nll_fn, state: TrainState, key: jax.Array, *,
                       max_batches: int | None = None) -> dict[str, float]:
        """Mean bits/dim over the eval split (or its first ``max_batches`` batches)."""
        cfg = self.config
        # Rounded up to a multiple of the device count; the padding is masked out.
        per_device = -(-cfg.eval.batch_size // self.mesh.size)
        iterator = input_pipeline.create_eval_iterator(
            _data_config(cfg), batch_size=per_device * self.mesh.size // jax.process_count(),
            process_index=jax.process_index(), process_count=jax.process_count(), max_batches=max_batches)
        total, count = 0.0, 0.0
        for i, batch in enumerate(iterator):
            mask = parallel.to_host(parallel.shard_batch(batch["mask"], self.mesh))
            batch = parallel.shard_batch({"image": batch["image"], "label": batch["label"]}, self.mesh)
            bpd = parallel.to_host(nll_fn(*state.eval_params, batch,
                                          jax.random.fold_in(key, i)))
            total += float(np.sum(bpd * mask))
            count += float(np.sum(mask))
        return {"nll_bpd": total / max(count, 1.0), "num_examples": int(count)}


# =============================================================================
# 4. Host-side helpers: metric summaries, signals, output files
# =============================================================================


def _summarize(metrics: list[dict[str, jax.Array]]) -> dict[str, float]:
    """Means over the steps since the last log, skipped (non-finite) steps left out.

    Each entry of ``metrics`` holds one step's scalars, or several steps' (one
    call of K steps: arrays of K). The one host sync of the training loop (at
    log steps only).
    """
    stacked = {k: np.concatenate([np.atleast_1d(np.asarray(m[k])) for m in metrics]) for k in metrics[0]}
    good = stacked["nonfinite"] == 0
    summary = {}
    for name, values in stacked.items():
        if name in ("lr", "nonfinite_count", "consecutive_nonfinite"):
            summary[name] = float(values[-1])
        elif name == "nonfinite":
            summary["nonfinite_steps"] = float(values.sum())
        else:  # loss_q* may be NaN where a quarter drew no timestep
            kept = values[good]
            kept = kept[np.isfinite(kept)]
            summary[name] = float(kept.mean()) if kept.size else math.nan
    return summary


@contextlib.contextmanager
def _saves_finished_on_error(ckpt: checkpointing.Checkpointer):
    """On an error in the loop (an unreadable image mid-epoch, out of memory, a second
    Ctrl-C), the checkpoint being written in the background is finished before the
    error goes on: otherwise the process exits with the step half-written (only its
    ``.orbax-checkpoint-tmp`` folder) and the run resumes from the one before,
    losing up to two checkpoint intervals. One process only: in a multi-process job
    the commit waits for every process, and the others may be stuck elsewhere."""
    try:
        yield
    except BaseException:
        if jax.process_count() == 1:
            try:
                ckpt.close()  # waits for the save in flight
            except Exception:  # the original error matters more
                logger.exception("Could not finish the checkpoint being written when training failed.")
        raise


class _StopSignals:
    """SIGTERM/SIGINT ask the loop to stop after the call (one or `steps_per_dispatch` steps) in flight.

    A second SIGINT stops at once (KeyboardInterrupt), except while a
    checkpoint is written (``finishing``: the loop's, and the final one): a
    signal then waits for it, so that it is not cut short. In a multi-process job
    no handler is installed: a flag set in one process would make it leave
    the loop while the others wait for it in a collective. There SIGTERM is
    handled by JAX's preemption service (see
    ``parallel.reached_preemption_sync_point``), which makes all processes
    stop at the same step, and SIGINT keeps its default (KeyboardInterrupt).
    """

    def __init__(self):
        self.requested = False
        self.finishing = False
        self._previous = {}

    def _handle(self, signum, frame):
        del frame
        name = signal.Signals(signum).name
        if self.finishing:
            logger.warning("Received %s while a checkpoint is written: finishing it first.", name)
            self.requested = True
            return
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("Received %s: stopping after this step, with a checkpoint.", name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _save_samples(workdir: str, name: str, images: np.ndarray, writer, step: int,
                  *, with_npz: bool = False, tag: str = "samples") -> str | None:
    """Writes a PNG grid (and optionally the raw samples) on process 0, and the grid to
    TensorBoard under ``tag``; returns the PNG path."""
    if not np.all(np.isfinite(images)):
        logger.warning("Samples %s contain NaN/Inf (the model diverged?); not writing them.", name)
        return None
    grid = metric_writers.image_grid(images)
    writer.write_images(step, {tag: grid})
    if jax.process_index() != 0:
        return None
    path = os.path.join(workdir, SAMPLES_SUBDIR, f"{name}.png")
    metric_writers.save_png(path, grid)
    if with_npz:
        buffer = io.BytesIO()
        np.savez(buffer, images=images.astype(np.float32))
        _files.write_file(os.path.join(workdir, SAMPLES_SUBDIR, f"{name}.npz"), buffer.getvalue())
    return path


def _write_json(path: str, payload: dict) -> None:
    if jax.process_index() != 0:
        return
    _files.write_file(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _setup(config, workdir: str, *, trained: bool = False) -> tuple[input_pipeline.DatasetInfo, _Job]:
    """Validation, devices and data checks shared by every mode (nothing compiled yet).

    With ``trained`` (evaluate, sample) the workdir must already hold checkpoints: a
    mistyped workdir is reported before anything is created.
    """
    if trained and not _files.as_path(workdir).joinpath(CHECKPOINT_SUBDIR).exists():
        raise FileNotFoundError(_no_checkpoint_message(workdir))
    parallel.maybe_initialize_distributed(config.distributed)
    validate_config(config, device_count=jax.device_count(), process_count=jax.process_count(),
                    training=not trained)
    # Data errors name the config section too (the pipeline names the dataset and file).
    info = _reraise_as_field("data", lambda: input_pipeline.dataset_info(_data_config(config)))
    _check_data_matches(config, info)
    _check_workdir(workdir)  # last: it creates a new workdir, which a config or data error leaves uncreated
    return info, _Job(config, info.image_shape)


def _no_checkpoint_message(workdir: str) -> str:
    return (f"No checkpoint in {os.path.join(workdir, CHECKPOINT_SUBDIR)}: train first "
            "(--mode=train) or pass the workdir of a trained run.")


# TrainState fields a checkpoint written before they existed lacks (restored as None).
_FIELDS_ADDED_LATER = ("ema_schedule_params",)


def _only_damaged_steps_message(ckpt: checkpointing.Checkpointer) -> str:
    return (f"{ckpt.directory} holds no intact checkpoint, only steps found damaged and moved aside "
            f"earlier: {', '.join(ckpt.damaged_steps())}")


def _restore(job: _Job, ckpt: checkpointing.Checkpointer, **kwargs) -> TrainState:
    """The newest intact step (see ``Checkpointer.restore``); a template the checkpoint does not
    match is reported with the fields where the config differs from the newest step's."""
    try:
        return ckpt.restore(job.abstract_state(), optional_fields=_FIELDS_ADDED_LATER, **kwargs)
    except ValueError as e:
        try:
            saved_config = ckpt.saved_config()
        except ValueError:  # its own problem; the restore's error comes first
            saved_config = None
        changes = _config_changes(saved_config, job.config) if saved_config is not None else []
        if not changes:
            raise
        raise ValueError(f"{e}\nThe config differs from the checkpoint's in: {_describe(changes)}.") from e


def _restore_for_inference(job: _Job, workdir: str) -> TrainState:
    """The newest intact step's state (read only), once its config is checked to be the model's.

    Restored first, then checked: the config compared is that of the step restored (a
    damaged newer one is skipped); reading a checkpoint compiles nothing.
    """
    ckpt = job.checkpointer(workdir, read_only=True)
    try:
        if ckpt.latest_step() is None:
            if ckpt.damaged_steps():
                raise checkpointing.CheckpointNotFoundError(_only_damaged_steps_message(ckpt) + ".")
            raise FileNotFoundError(_no_checkpoint_message(workdir))
        state = _restore(job, ckpt)
        step = int(state.step)
        _check_inference_config(job.config, ckpt.saved_config(step), step, ckpt.directory)
        return state
    finally:
        ckpt.close()


# =============================================================================
# 5. The jobs
# =============================================================================


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_model_changes: bool = False) -> TrainState:
    """Trains (resuming from ``workdir`` if it holds a checkpoint) and evaluates.

    Resuming under a config whose model-defining fields (``model.*`` but
    dropout and the speed-only fields, ``diffusion.*`` but the loss and its
    weights, ``data.image_size``) differ from the checkpoint's is refused,
    naming them, unless ``allow_model_changes`` (fine-tuning under new values
    on purpose); other changes are logged.

    Leaves in ``workdir``: ``checkpoints/`` (with the config), ``config.json``,
    ``tensorboard/`` event files, ``samples/step_*.png`` grids and, with
    ``eval.nll_at_end``, ``nll.json``.

    Stops cleanly (checkpoint, return) on SIGTERM/SIGINT after the call in
    flight (one step, or ``steps_per_dispatch``). Raises FloatingPointError
    when ``max_consecutive_nonfinite`` updates in a row were skipped; that is
    checked at log steps, where the metrics come to the host anyway, so the
    loop never waits on the device for it; the last checkpoint is kept as it
    was.

    Returns:
      The final TrainState.
    """
    # --- 1. Config, devices, data --------------------------------------------
    info, job = _setup(config, workdir)
    is_chief = jax.process_index() == 0
    train_iter = input_pipeline.create_train_iterator(
        _data_config(config), global_batch_size=config.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        worker_count=config.data.worker_count)
    logger.info("Dataset %s: %s images, %d train / %d eval; %d devices in %d processes.",
                config.data.name, info.image_shape, info.num_train, info.num_eval,
                jax.device_count(), jax.process_count())

    # --- 2. State: fresh, or restored from the latest checkpoint ----------------
    ckpt = job.checkpointer(workdir)  # every checkpoint also stores the config it was saved with
    if ckpt.latest_step() is not None:
        try:
            state = _restore(job, ckpt, data_iterator=train_iter)
            # Compared with the step restored: a damaged newest step is moved aside and an older one used.
            _check_resumed_config(config, ckpt.saved_config(int(state.step)), int(state.step), ckpt.directory,
                                  allow_model_changes=allow_model_changes)
        except Exception:
            ckpt.close()
            raise
        if state.schedule_params is not None and state.ema_schedule_params is None:
            logger.warning("The checkpoint predates the learned schedule's moving average: it starts "
                           "from the schedule's parameters at step %d.", int(state.step))
            state = state.replace(ema_schedule_params=jax.tree.map(jnp.copy, state.schedule_params))
        logger.info("Resumed from step %d in %s.", int(state.step), ckpt.directory)
    elif ckpt.damaged_steps():
        # An earlier start found every step damaged and moved them aside (and failed): starting
        # over here would bury that run under a new one (an automatic restart would do just that).
        raise checkpointing.CheckpointNotFoundError(
            _only_damaged_steps_message(ckpt) + ". Not starting over from step 0 beside them: inspect or "
            "repair them, or move them out of the folder (or use a new workdir) to start afresh.")
    else:
        state = job.create_state()
    checkpointing.save_config(workdir, config.to_dict())  # the config this run goes on with
    start_step = int(state.step)
    if start_step >= config.num_train_steps:
        logger.warning("The checkpoint is at step %d, at or past num_train_steps=%d: nothing to train; "
                       "the final samples%s are made again from it.", start_step, config.num_train_steps,
                       " and NLL" if config.eval.nll_at_end else "")

    # --- 3. Programs --------------------------------------------------------------
    # One step per call, and with steps_per_dispatch = K > 1 also K steps per call
    # (the single step then runs only to reach a multiple of K after resuming,
    # and for the last num_train_steps % K steps).
    one_step = make_train_step(job.model, job.schedule, job.tx, job.lr_schedule, ema_decay=config.ema_decay,
                               loss_config=_loss_config(config), num_microbatches=config.num_microbatches)
    per_call = config.steps_per_dispatch
    if config.num_microbatches > 1 and jax.default_backend() == "cpu":
        logger.warning(
            "num_microbatches=%d on the CPU backend: XLA:CPU (jaxlib 0.10) runs the forward and backward "
            "passes inside the loop over micro-batches several times slower (BENCHMARKS.md); it saves "
            "activation memory, which a CPU rarely lacks.", config.num_microbatches)
    if per_call > 1 and jax.default_backend() == "cpu":
        logger.warning(
            "steps_per_dispatch=%d on the CPU backend: XLA:CPU (jaxlib 0.10) compiles the convolutions' "
            "gradients inside the loop of several steps to a slow generic form, and the steps run "
            "several times slower than one per call (BENCHMARKS.md); use steps_per_dispatch=1 on CPU.",
            per_call)
    train_steps = {
        k: parallel.data_parallel(
            one_step if k == 1 else make_multi_step(one_step, k), job.mesh,
            in_specs=(P(), parallel.batch_sharding(job.mesh, stacked=k > 1).spec, P()),
            out_specs=(P(), P()), donate_argnums=(0,))
        for k in sorted({1, per_call})}
    nll_fn = job.nll_program()
    sample_fn = job.sample_program(config.sample.num_images, sampler=config.sample.sampler,
                                   num_steps=config.sample.num_steps)
    train_key = parallel.replicate(job.train_key, job.mesh)

    def write_samples(step: int) -> None:
        if not config.sample.num_images:
            return
        images = parallel.to_host(sample_fn(*state.eval_params,
                                            jax.random.fold_in(job.sample_key, step)))
        path = _save_samples(workdir, f"step_{step:08d}", images[:config.sample.num_images], writer, step)
        if path:
            logger.info("Samples at step %d: %s", step, path)

    # --- 4. Loop ---------------------------------------------------------------------
    writer = metric_writers.MetricWriter(os.path.join(workdir, TENSORBOARD_SUBDIR), enabled=is_chief)
    progress = metric_writers.ProgressLogger(config.num_train_steps, batch_size=config.batch_size,
                                             every_steps=config.log_every_steps, enabled=is_chief)
    pending_metrics: list[dict[str, jax.Array]] = []
    last_log = (start_step, time.monotonic())
    # Seconds since the last log not spent training (evaluations, samples, compiling a program
    # first used after the first call): left out of the logged rates.
    not_training = 0.0
    compiled = set()
    stopped_early = False
    step = start_step
    calls = 0  # the preemption sync point counts calls: the same on every process
    with _StopSignals() as stop, _saves_finished_on_error(ckpt):
        while step < config.num_train_steps:
            k = per_call if step % per_call == 0 and step + per_call <= config.num_train_steps else 1
            if k == 1:
                batch = parallel.shard_batch(next(train_iter), job.mesh)
            else:
                local = [next(train_iter) for _ in range(k)]
                batch = parallel.shard_batch(jax.tree.map(lambda *xs: np.stack(xs), *local), job.mesh,
                                             stacked=True)
            dispatched = time.monotonic()
            state, metrics = train_steps[k](state, batch, train_key)
            if k not in compiled:  # this call compiled the program (jit compiles before dispatching)
                compiled.add(k)
                spent = time.monotonic() - dispatched
                not_training += spent
                progress.exclude(spent)
            pending_metrics.append(metrics)
            step += k
            calls += 1
            if calls == 1 and step % config.log_every_steps:
                # Rates start after the first call, which compiled the step (as the console's).
                last_log, not_training = (step, time.monotonic()), 0.0

            if step % config.log_every_steps == 0 or step == config.num_train_steps:
                since_log, pending_metrics = pending_metrics, []
                summary = _summarize(since_log)
                now = time.monotonic()
                steps_per_sec = (step - last_log[0]) / max(now - last_log[1] - not_training, 1e-9)
                last_log, not_training = (step, now), 0.0
                summary.update(steps_per_sec=steps_per_sec, images_per_sec=steps_per_sec * config.batch_size)
                writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
                progress.update(step, {"loss": summary["loss"], "grad_norm": summary["grad_norm"]})
                if summary["consecutive_nonfinite"] >= config.max_consecutive_nonfinite:
                    ckpt.wait_until_finished()
                    ckpt.close()
                    writer.close()
                    last = {k: float(np.atleast_1d(np.asarray(since_log[-1][k]))[-1]) for k in ("loss", "grad_norm")}
                    kept = (f"The last good checkpoint, step {ckpt.latest_step()}, is kept in {ckpt.directory}."
                            if ckpt.latest_step() is not None else "No checkpoint had been written yet.")
                    raise FloatingPointError(
                        f"Stopping at step {step}: the last {int(summary['consecutive_nonfinite'])} updates "
                        f"were skipped because the loss, the gradient or the update was NaN/Inf "
                        f"(config.max_consecutive_nonfinite={config.max_consecutive_nonfinite}; the last "
                        f"step's loss {last['loss']:.4g}, gradient norm {last['grad_norm']:.4g}: if both are "
                        f"finite, the update overflowed). {kept} Try a lower learning rate, gradient "
                        "clipping, or float32 compute.")
            else:
                progress.update(step, {})

            if config.eval_every_steps and step % config.eval_every_steps == 0 and step < config.num_train_steps:
                evaluating = time.monotonic()
                if config.eval.num_batches_during_training:
                    result = job.nll_over_split(nll_fn, state, job.eval_key,
                                                max_batches=config.eval.num_batches_during_training)
                    writer.write_scalars(step, {"eval/nll_bpd": result["nll_bpd"]})
                    logger.info("Step %d: NLL %.4f bits/dim on %d test images.", step,
                                result["nll_bpd"], result["num_examples"])
                write_samples(step)
                spent = time.monotonic() - evaluating
                not_training += spent
                progress.exclude(spent)

            stop.finishing = True  # a signal while a checkpoint is written waits for it
            ckpt.save(step, state, data_iterator=train_iter)
            stop.finishing = False
            if stop.requested or parallel.reached_preemption_sync_point(calls):
                stopped_early = True
                break

        # --- 5. Final checkpoint (under the handlers: a second SIGTERM or Ctrl-C
        #        waits for it), then samples and NLL ----------------------------------
        stop.finishing = True
        if ckpt.latest_step() != step:
            ckpt.save(step, state, data_iterator=train_iter, force=True)
        ckpt.wait_until_finished()
        stopped_early = stopped_early or stop.requested  # a signal during it skips the samples and NLL
    if stopped_early:
        logger.warning("Stopped at step %d on a signal; checkpoint saved in %s.", step, ckpt.directory)
    else:
        write_samples(step)
        if config.eval.nll_at_end:
            result = job.nll_over_split(nll_fn, state, job.eval_key)
            result.update(step=step, split=config.data.eval_split, dataset=config.data.name)
            writer.write_scalars(step, {"eval/nll_bpd": result["nll_bpd"]})
            _write_json(os.path.join(workdir, NLL_FILENAME), result)
            logger.info("Test NLL at step %d: %.4f bits/dim over %d images.", step, result["nll_bpd"],
                        result["num_examples"])
    ckpt.close()
    writer.close()
    return state


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """NLL in bits/dim over the whole eval split, with the latest checkpoint's EMA parameters.

    The split is spread over all devices of all processes. Writes
    ``workdir/nll.json`` and the TensorBoard scalar ``eval/nll_bpd``.

    Returns:
      ``{"nll_bpd", "num_examples", "step", "split", "dataset"}``.
    """
    _, job = _setup(config, workdir, trained=True)
    state = _restore_for_inference(job, workdir)
    step = int(state.step)
    result = job.nll_over_split(job.nll_program(), state, job.eval_key)
    result.update(step=step, split=config.data.eval_split, dataset=config.data.name)
    _write_json(os.path.join(workdir, NLL_FILENAME), result)
    with metric_writers.MetricWriter(os.path.join(workdir, TENSORBOARD_SUBDIR)) as writer:
        writer.write_scalars(step, {"eval/nll_bpd": result["nll_bpd"]})
    logger.info("Test NLL at step %d: %.4f bits/dim over %d images.", step, result["nll_bpd"],
                result["num_examples"])
    return result


def sample(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    num_images: int | None = None,
    sampler: str | None = None,
    num_steps: int | None = None,
) -> np.ndarray:
    """Draws images with the latest checkpoint's EMA parameters.

    Writes ``workdir/samples/sample_step<S>_<sampler><steps>.png`` (a grid)
    and ``.npz`` (``images``: float32 ``[N, H, W, C]``, in [-1, 1] with
    ``sample.clip_denoised``), and the grid
    to TensorBoard under ``samples/<sampler><steps>`` at step S (dpm_solver++
    as dpm_solverpp: TensorBoard tags take no "+").

    Args:
      config: the run's config; ``sample.*`` gives the defaults.
      workdir: the run's workdir.
      num_images, sampler, num_steps: override ``config.sample``.

    Returns:
      The images, float32 ``[num_images, H, W, C]`` (in [-1, 1] with
      ``sample.clip_denoised``).
    """
    config = config.copy_and_resolve_references()
    with config.unlocked():
        if num_images is not None:
            config.sample.num_images = num_images
        if sampler is not None:
            config.sample.sampler = sampler
        if num_steps is not None:
            config.sample.num_steps = num_steps
    if config.sample.num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {config.sample.num_images}")
    _, job = _setup(config, workdir, trained=True)
    state = _restore_for_inference(job, workdir)
    step = int(state.step)
    s = config.sample
    program = job.sample_program(s.num_images, sampler=s.sampler, num_steps=s.num_steps)
    images = parallel.to_host(program(*state.eval_params,
                                      jax.random.fold_in(job.sample_key, step)))[:s.num_images]
    steps = s.num_steps or config.diffusion.num_timesteps
    with metric_writers.MetricWriter(os.path.join(workdir, TENSORBOARD_SUBDIR)) as writer:
        # Their own TensorBoard tag: training's grid of the same step is under "samples".
        path = _save_samples(workdir, f"sample_step{step}_{s.sampler}{steps}", images, writer, step,
                             with_npz=True, tag=f"samples/{s.sampler.replace('+', 'p')}{steps}")
    if path:
        logger.info("Wrote %d samples to %s.", s.num_images, path)
    return images

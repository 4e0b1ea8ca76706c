"""Trains, evaluates or samples a diffusion model; see configs/ for the settings.

    python train.py --config=configs/digits.py --workdir=runs/digits
    python train.py --config=configs/digits.py --workdir=runs/digits --mode=evaluate
    python train.py --config=configs/digits.py --workdir=runs/digits --mode=sample \
        --num_images=100 --sampler=ddim --num_steps=50

Any config field can be overridden: --config.batch_size=64 --config.model.ch=64;
--config.FIELD=None sets a field to None, and
--config.diffusion.schedule_kwargs.KEY=VALUE sets one of the schedule's arguments
(diffusion_jax/training/overrides.py).
"""
import logging
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from diffusion_jax import allocator, parallel, xla_cpu
from diffusion_jax.training import overrides, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and the NLL.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate", "sample"], "What to run.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", None, "--mode=sample: images to draw (default: config.sample).")
_SAMPLER = flags.DEFINE_string("sampler", None, "--mode=sample: ddpm, ddim or dpm_solver++ (default: config.sample).")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "--mode=sample: sampling steps (default: config.sample).")
_ALLOW_MODEL_CHANGES = flags.DEFINE_boolean(
    "allow_model_changes", False,
    "--mode=train: resume although fields that define the model (model.* but dropout, diffusion.* but the "
    "loss and its weights, data.image_size) differ from the checkpoint's config, to fine-tune its parameters "
    "under the new values on purpose; without it such a resume is refused.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None,
    "On the CPU backend, split each process's CPU into this many data-parallel XLA devices "
    "(default: one per core, as many as divide config.batch_size; 1 in a multi-process job). "
    "Ignored, with a warning, when XLA_FLAGS already sets --xla_force_host_platform_device_count; "
    "no effect on GPU/TPU devices.",
    lower_bound=1)
_CPU_CONVOLUTIONS = flags.DEFINE_enum(
    "cpu_convolutions", "auto", list(xla_cpu.LIBRARIES),
    "On the CPU backend, the library XLA runs every convolution with: ynnpack (XLA's default), eigen, "
    "or auto (eigen when config.model.ch >= 128, where it is faster, JAX runs on the CPU and jaxlib is "
    "a version whose XLA defaults were checked; diffusion_jax/xla_cpu.py). Ignored, with a warning, when "
    "XLA_FLAGS already set --xla_cpu_experimental_ynn_fusion_type; no effect on GPU/TPU devices.")
_JEMALLOC = flags.DEFINE_boolean(
    "jemalloc", True,
    "Re-run this command under jemalloc, keeping freed pages for reuse, where jemalloc is installed "
    "(libjemalloc2) and JAX will run on the CPU: XLA:CPU steps of large models are faster "
    "(diffusion_jax/allocator.py). "
    "--nojemalloc keeps the system allocator.")
flags.mark_flags_as_required(["config", "workdir"])


def _default_cpu_devices(batch_size) -> int:
    """One CPU device per core, as many as split the batch.

    1 for a multi-process job (whose processes may share a host's cores, and
    whose process count a cluster may not state in the environment), and 1
    where the batch size is bad: the config validation that runs next reports
    that, naming the field.
    """
    if parallel.launched_as_multi_process():
        return 1
    try:
        return parallel.cpu_devices_for(batch_size, parallel.usable_cpu_cores())
    except ValueError:
        return 1


def _cpu_convolutions(library: str, ch) -> str:
    """``--cpu_convolutions`` resolved for the model (``xla_cpu.choose``); "ynnpack" where
    ``config.model.ch`` is bad: the config validation that runs next reports that, naming the field."""
    try:
        return xla_cpu.choose(library, ch)
    except ValueError:
        return "ynnpack"


def _wants_jemalloc(argv) -> bool:
    """``--jemalloc``'s value read from the raw command line (absl's syntax; the last one wins),
    before absl parses it: the relaunch has to come before anything else runs."""
    wants = _JEMALLOC.default
    for arg in argv[1:]:
        if arg == "--":
            break
        if arg in ("--jemalloc", "-jemalloc"):
            wants = True
        elif arg in ("--nojemalloc", "-nojemalloc"):
            wants = False
        elif arg.lstrip("-").startswith("jemalloc=") and arg.startswith("-"):
            wants = arg.split("=", 1)[1].lower() in ("true", "t", "1")
    return wants


def _expanded(argv: list[str]) -> list[str]:
    """``argv`` with its ``--flagfile``s expanded (as absl will); as given where one cannot be
    read (the parse then reports it)."""
    try:
        return flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
    except Exception:  # noqa: BLE001  (absl's own error comes at the parse)
        return argv


def _usage_error(message: str) -> None:
    """Exits as absl does on a bad flag: one line, no traceback."""
    sys.stderr.write(f"FATAL Flags parsing error: {message}\n"
                     "Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, plus the ``--config.`` overrides ml_collections cannot take
    (``FIELD=None``, ``diffusion.schedule_kwargs.KEY=VALUE``) and a one-line error for
    a misspelled field (diffusion_jax/training/overrides.py)."""
    argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
    argv, late = overrides.split_late_overrides(argv)
    sys.argv = argv  # ml_collections reads the config overrides from sys.argv
    try:
        rest = app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        message = overrides.unknown_field_message(e, argv)
        if message is None:
            raise
        _usage_error(message)
    try:
        overrides.apply_late_overrides(_CONFIG.value, late)
    except overrides.OverrideError as e:
        _usage_error(str(e))
    return rest


_FLAGS_OF_MODE = {"sample": ("num_images", "sampler", "num_steps"), "train": ("allow_model_changes",)}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    for mode, names in _FLAGS_OF_MODE.items():
        given = [f"--{name}" for name in names if flags.FLAGS[name].present]
        if given and _MODE.value != mode:
            raise app.UsageError(f"{', '.join(given)} only apply with --mode={mode}, not --mode={_MODE.value}")
    # Our progress and results at INFO; other libraries (Orbax) at WARNING
    # unless --verbosity is given.
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("diffusion_jax").setLevel(logging.INFO)
    settings = allocator.jemalloc_decay_settings()
    logging.getLogger("diffusion_jax").info(
        "host allocator: %s", f"jemalloc ({settings})" if settings else "system malloc")
    # Before anything starts a JAX backend: how many devices the CPU backend shows, and which
    # library runs its convolutions.
    requested = _CPU_DEVICES.value or _default_cpu_devices(_CONFIG.value.batch_size)
    if not parallel.request_cpu_devices(requested) and _CPU_DEVICES.value is not None:
        logging.getLogger("diffusion_jax").warning(
            "--cpu_devices=%d is ignored: XLA_FLAGS already sets --xla_force_host_platform_device_count "
            "(or JAX_NUM_CPU_DEVICES a count)",
            _CPU_DEVICES.value)
    library = _cpu_convolutions(_CPU_CONVOLUTIONS.value, _CONFIG.value.model.ch)
    xla_cpu.request(library)
    on_ynnpack = xla_cpu.convolutions_on_ynnpack()
    if _CPU_CONVOLUTIONS.value != "auto" and (library == "ynnpack") != on_ynnpack:
        logging.getLogger("diffusion_jax").warning(
            "--cpu_convolutions=%s is ignored: XLA_FLAGS already sets %s", _CPU_CONVOLUTIONS.value, xla_cpu.FLAG)
    if allocator.jax_runs_on_cpu():
        logging.getLogger("diffusion_jax").info("XLA:CPU convolutions: %s", "YNNPACK" if on_ynnpack else "Eigen")
    if _MODE.value == "train":
        trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value, allow_model_changes=_ALLOW_MODEL_CHANGES.value)
    elif _MODE.value == "evaluate":
        trainer.evaluate(_CONFIG.value, _WORKDIR.value)
    else:
        trainer.sample(_CONFIG.value, _WORKDIR.value, num_images=_NUM_IMAGES.value,
                       sampler=_SAMPLER.value, num_steps=_NUM_STEPS.value)


if __name__ == "__main__":
    if _wants_jemalloc(_expanded(sys.argv)):
        allocator.relaunch_under_jemalloc()  # returns only where it does not apply
    app.run(main, flags_parser=_parse_flags)

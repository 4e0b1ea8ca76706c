"""Every config in configs/ loads and validates; bad fields give errors naming them."""
import importlib
import math
import os
import pathlib

import ml_collections
import pytest

from configs import default
from diffusion_jax import parallel
from diffusion_jax.training import trainer

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIG_NAMES = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem != "__init__")


def _load(name):
    return importlib.import_module(f"configs.{name}").get_config()


def test_the_expected_configs_exist():
    assert {"default", "digits", "cifar10", "cifar10_improved", "cifar10_cond"} <= set(CONFIG_NAMES)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_loads_and_validates(name, tmp_path):
    config = _load(name)
    trainer.validate_config(config, device_count=1, workdir=str(tmp_path))
    trainer.validate_config(config, device_count=8, process_count=2)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_configs_only_override_fields_of_the_default(name):
    """A typo in a config file would add a field that nothing reads."""
    def keys(d, prefix=""):
        out = set()
        for k, v in d.items():
            out.add(prefix + k)
            if isinstance(v, dict) and k != "schedule_kwargs":
                out |= keys(v, prefix + k + ".")
        return out
    assert keys(_load(name).to_dict()) == keys(default.get_config().to_dict())


def test_cifar10_is_the_ddpm_paper_recipe():
    """Ho et al. 2020, sec. 4 and App. B."""
    c = _load("cifar10")
    assert c.data.name == "cifar10" and c.data.image_size == 32 and c.data.random_flip is True
    assert c.diffusion.num_timesteps == 1000
    assert c.diffusion.schedule == "linear" and c.diffusion.schedule_kwargs.to_dict() == {}
    assert (c.diffusion.prediction, c.diffusion.variance, c.diffusion.loss) == ("eps", "fixed_large", "simple")
    assert c.diffusion.learned_schedule is False and c.diffusion.timestep_sampler == "uniform"
    assert c.diffusion.min_snr_gamma is None
    assert c.optim.learning_rate == 2e-4 and c.optim.warmup_steps == 5000
    assert c.optim.grad_clip == 1.0 and c.optim.weight_decay == 0.0 and c.optim.decay == "constant"
    assert (c.optim.b1, c.optim.b2) == (0.9, 0.999)
    assert c.batch_size == 128 and c.ema_decay == 0.9999 and c.num_train_steps == 800_000
    assert c.model.ch == 128 and tuple(c.model.ch_mult) == (1, 2, 2, 2)
    assert c.model.num_res_blocks == 2 and tuple(c.model.attn_resolutions) == (16,)
    assert c.model.dropout == 0.1 and c.model.num_classes is None
    assert c.model.scale_shift_norm is False and c.model.resblock_updown is False
    assert c.cond_drop_rate == 0.0 and c.compute_dtype == "float32"
    # The linear schedule's ends: beta_1 = 1e-4, beta_T = 0.02.
    import diffusion_jax as dj
    betas = dj.make_schedule(c.diffusion.schedule, c.diffusion.num_timesteps).betas
    assert abs(float(betas[0]) - 1e-4) < 1e-9 and abs(float(betas[-1]) - 0.02) < 1e-7


def test_improved_and_conditional_variants():
    imp = _load("cifar10_improved")
    assert (imp.diffusion.schedule, imp.diffusion.loss, imp.diffusion.variance) == (
        "cosine", "hybrid", "learned_range")
    assert imp.optim.learning_rate == 1e-4 and imp.model.dropout == 0.3
    assert imp.diffusion.num_timesteps == 4000
    cond = _load("cifar10_cond")
    assert cond.model.num_classes == 10 and cond.cond_drop_rate == 0.1
    assert cond.sample.guidance_scale > 0


def _bad(mutate, match, error=ValueError, *, device_count=1, **kwargs):
    config = _load("cifar10")
    mutate(config)
    with pytest.raises(error, match=match):
        trainer.validate_config(config, device_count=device_count, **kwargs)


def test_image_size_must_fit_the_downsamplings():
    def mutate(c):
        c.data.image_size = 36  # 3 downsamplings need a multiple of 8
    _bad(mutate, r"config\.data\.image_size.*36.*2\*\*3")


def test_batch_must_divide_over_devices_and_processes():
    def mutate(c):
        c.batch_size = 12
    _bad(mutate, r"config\.batch_size.*12.*8 devices", device_count=8)
    _bad(mutate, r"config\.batch_size.*12.*5 processes", device_count=1, process_count=5)


@pytest.mark.parametrize("field", ["log_every_steps", "checkpoint_every_steps", "eval_every_steps"])
def test_intervals_must_be_whole_calls_of_steps_per_dispatch(field):
    def mutate(c):
        c.log_every_steps, c.checkpoint_every_steps, c.eval_every_steps = 100, 5000, 20000
        c.steps_per_dispatch = 4
        c[field] = 10  # not a multiple of 4; the other two are
    _bad(mutate, rf"config\.{field}.*10 is not a multiple of steps_per_dispatch=4")


def test_steps_per_dispatch_is_a_positive_int():
    def mutate(c):
        c.steps_per_dispatch = 0
    _bad(mutate, r"config\.steps_per_dispatch.*>= 1")

    config = _load("cifar10")
    config.steps_per_dispatch, config.eval_every_steps = 4, 0  # 4 divides 100 and 5000; 0 is never
    trainer.validate_config(config, device_count=8)


def test_num_microbatches_must_divide_each_devices_batch():
    def mutate(c):
        c.num_microbatches = 0
    _bad(mutate, r"config\.num_microbatches.*>= 1")

    def mutate(c):
        c.batch_size, c.num_microbatches = 128, 3
    _bad(mutate, r"config\.num_microbatches: 3 does not divide each device's 16 examples "
                 r"\(batch_size=128 over 8 devices\)", device_count=8)
    config = _load("cifar10")
    config.num_microbatches = 16  # 128 / 8 devices = 16 each: micro-batches of one example
    trainer.validate_config(config, device_count=8)
    # Evaluating or sampling does not split the training batch: a run trained on fewer
    # devices evaluates on 64.
    config.num_microbatches, config.batch_size = 32, 96
    with pytest.raises(ValueError, match=r"config\.batch_size"):
        trainer.validate_config(config, device_count=64)
    trainer.validate_config(config, device_count=64, training=False)


def test_zero_timesteps():
    def mutate(c):
        c.diffusion.num_timesteps = 0
    _bad(mutate, r"config\.diffusion\.num_timesteps.*>= 1")


def test_beta_range():
    def mutate(c):
        c.diffusion.schedule_kwargs.beta_end = 2.0
    _bad(mutate, r"config\.diffusion\.schedule.*\(0, 1\)")


@pytest.mark.parametrize("field,value", [
    ("diffusion.schedule", "quadratic"),
    ("diffusion.loss", "l1"),
    ("diffusion.prediction", "score"),
    ("diffusion.variance", "learned"),
    ("diffusion.timestep_sampler", "loss_aware"),
    ("sample.sampler", "euler"),
    ("optim.decay", "step"),
    ("compute_dtype", "float16"),
])
def test_unknown_names(field, value):
    def mutate(c):
        section, _, leaf = field.rpartition(".")
        (c[section] if section else c)[leaf] = value
    _bad(mutate, rf"config\.{field}.*{value!r}")


@pytest.mark.parametrize("field,value,match", [
    ("ema_decay", 1.5, r"config\.ema_decay"),
    ("sample.num_steps", 2000, r"config\.sample\.num_steps.*2000"),
    ("model.ch", 48, r"config\.model.*ch"),
    ("model.attn_resolutions", (64,), r"config\.model\.attn_resolutions.*64"),
    ("sample.guidance_scale", 1.0, r"config\.sample\.guidance_scale.*num_classes"),
    ("cond_drop_rate", 0.1, r"config\.cond_drop_rate.*num_classes"),
    # The default sampler is ddpm, which has no eta (sample() would refuse it after training).
    ("sample.eta", 0.5, r"config\.sample\.eta.*ddim.*'ddpm'"),
    ("ema_decay", 1.0, r"config\.ema_decay.*initial weights.*< 1"),
    ("data.data_dir", "None", r"config\.data\.data_dir.*path or None.*'None'"),
    ("data.data_dir", "", r"config\.data\.data_dir.*path or None.*''"),
    ("data.worker_count", -1, r"config\.data\.worker_count: must be >= 0, got -1"),
])
def test_bad_values(field, value, match):
    def mutate(c):
        section, _, leaf = field.rpartition(".")
        (c[section] if section else c)[leaf] = value
    _bad(mutate, match, device_count=8)


@pytest.mark.parametrize("field,value", [
    ("optim.grad_clip", math.nan), ("optim.grad_clip", math.inf),
    ("optim.weight_decay", math.nan), ("optim.weight_decay", math.inf),
    ("optim.eps", math.inf), ("optim.learning_rate", math.inf), ("optim.learning_rate", math.nan),
    ("diffusion.vlb_weight", math.inf), ("diffusion.vlb_weight", math.nan),
    ("diffusion.min_snr_gamma", math.nan), ("diffusion.min_snr_gamma", math.inf),
    ("ema_decay", math.nan), ("sample.guidance_scale", math.inf),
])
def test_non_finite_numbers_are_rejected(field, value):
    """NaN and infinity pass `x >= 0`-style checks one way or the other; each is named."""
    def mutate(c):
        section, _, leaf = field.rpartition(".")
        (c[section] if section else c)[leaf] = value
    section, _, leaf = field.rpartition(".")
    # The optimizer's own checks name the section and the field.
    _bad(mutate, rf"config\.{section}.*{leaf}.*finite" if section == "optim" else rf"config\.{field}.*finite")


def test_min_snr_gamma_needs_the_simple_loss_in_the_objective():
    def mutate(c):
        c.diffusion.loss, c.diffusion.min_snr_gamma = "vlb", 5.0
    _bad(mutate, r"config\.diffusion\.min_snr_gamma.*loss='vlb' does not have")
    config = _load("cifar10")
    config.diffusion.loss, config.diffusion.variance, config.diffusion.min_snr_gamma = "hybrid", "learned_range", 5.0
    trainer.validate_config(config, device_count=1)


def test_seed_must_fit_the_prng_key():
    def mutate(c):
        c.seed = 2**32  # jax.random.PRNGKey(2**32) equals PRNGKey(0)
    _bad(mutate, r"config\.seed.*2\*\*32")
    config = _load("cifar10")
    config.seed = 2**32 - 1
    trainer.validate_config(config, device_count=1)


@pytest.mark.parametrize("value,expected", [
    (True, True), (False, False), ("auto", "auto"), ("false", False), ("False", False), ("TRUE", True),
])
def test_distributed_accepts_booleans_and_their_strings(value, expected):
    config = _load("cifar10")
    with config.unlocked():
        del config["distributed"]
        config.distributed = value  # a fresh field: a bool is allowed where a config file sets one
    trainer.validate_config(config, device_count=1)
    assert parallel.distributed_setting(value) == expected


def test_distributed_from_the_command_line():
    """ml_collections keeps the field's type (str): `--config.distributed=false` arrives as 'false'."""
    config = _load("cifar10")
    config.distributed = "false"
    trainer.validate_config(config, device_count=1)
    assert parallel.maybe_initialize_distributed(config.distributed) is False
    _bad(lambda c: setattr(c, "distributed", "maybe"), r"config\.distributed.*'maybe'")


@pytest.mark.parametrize("env,expected", [
    ({}, False),
    ({"SLURM_NTASKS": "1"}, False),  # srun inside any allocation sets it
    ({"SLURM_NTASKS": "4"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, False),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({"JAX_NUM_PROCESSES": "2"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.1"}, False),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2"}, True),
])
def test_auto_distributed_needs_more_than_one_process(monkeypatch, env, expected):
    for name in ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS",
                 "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert parallel.launched_as_multi_process() is expected


def test_learned_variance_needs_a_loss_that_trains_it():
    def mutate(c):
        c.diffusion.variance = "learned_range"
    _bad(mutate, r"config\.diffusion\.variance.*hybrid")


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    _bad(lambda c: None, r"workdir .*a_file.* not writable", workdir=str(blocker / "run"))


def test_unknown_dataset_is_reported_before_compiling(tmp_path):
    config = _load("digits")
    config.data.name = "no_such_dataset_xyz"
    with pytest.raises(ValueError, match="no_such_dataset_xyz"):
        trainer.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize("workdir", ["", "   "])
def test_empty_workdir_is_refused(workdir):
    # An empty --workdir= would put the run's checkpoints and logs in the current directory.
    _bad(lambda c: None, r"workdir must be a non-empty path", workdir=workdir)


def test_the_trainers_field_list_is_configs_default():
    """trainer._SCHEMA is what validate_config accepts; configs/default.py is what users read."""
    schema = default.get_config().to_dict()
    assert set(trainer._SCHEMA[""]) == set(schema)
    for section, known in trainer._SCHEMA.items():
        if section in ("data", "model", "optim"):  # dataclasses: configs/default.py sets the usual fields
            assert set(schema[section]) <= set(known), section
        elif section:
            assert set(known) == set(schema[section]), section


@pytest.mark.parametrize("field, value, meant", [
    ("diffusion.predicton", "v", "prediction"),  # would train eps silently
    ("sample.num_imags", 0, "num_images"),
    ("eval_every_step", 1, "eval_every_steps"),
    ("optim.learning_rat", 1.0, "learning_rate"),
    ("model.chh", 64, "ch"),
    ("data.imagesize", 16, "image_size"),
    ("checkpoint.max_keep", 1, "max_to_keep"),
    ("eval.zzz", 1, None),  # nothing close: no suggestion
])
def test_a_field_the_config_does_not_have_is_named(field, value, meant):
    config = default.get_config()
    *parents, name = field.split(".")
    section = config
    for parent in parents:
        section = section[parent]
    section[name] = value
    hint = f' \\(did you mean "{meant}"\\?\\)' if meant else ""
    with pytest.raises(ValueError, match=rf"^config\.{field}: is not a config field{hint}; configs/default\.py"):
        trainer.validate_config(config, device_count=1)


def test_a_section_set_to_a_value_is_named():
    as_dict = default.get_config().to_dict()
    as_dict["eval"] = 3  # (ml_collections refuses the assignment itself)
    config = ml_collections.ConfigDict(as_dict)
    with pytest.raises(TypeError, match=r"^config\.eval: must be a section"):
        trainer.validate_config(config, device_count=1)


def test_guidance_needs_a_trained_null_class():
    def mutate(c):
        c.model.num_classes, c.sample.guidance_scale, c.cond_drop_rate = 10, 0.3, 0.0
    _bad(mutate, r"config\.sample\.guidance_scale: > 0 needs cond_drop_rate > 0")
    trainer.validate_config(_load("cifar10_cond"), device_count=1)  # 0.1, as the paper


@pytest.mark.parametrize("spacing, learned, num_steps, match", [
    ("linear", False, 10, r"config\.sample\.spacing.*'linear'"),
    ("log_snr", True, 10, r"config\.sample\.spacing: 'log_snr' needs a fixed schedule"),
    ("time", False, None, r"config\.sample\.spacing: 'time' chooses the rows sample\.num_steps keeps"),
])
def test_bad_sample_spacing(spacing, learned, num_steps, match):
    def mutate(c):
        c.sample.spacing, c.sample.num_steps = spacing, num_steps
        if learned:
            c.diffusion.learned_schedule, c.diffusion.loss = True, "vlb"
    _bad(mutate, match)


@pytest.mark.parametrize("spacing, learned, num_steps", [
    ("log_snr", False, 10), ("time", True, 10), ("log_snr", True, 1000), (None, True, 10)])
def test_good_sample_spacing(spacing, learned, num_steps):
    config = _load("cifar10")
    config.sample.spacing, config.sample.num_steps = spacing, num_steps
    if learned:
        config.diffusion.learned_schedule, config.diffusion.loss = True, "vlb"
    trainer.validate_config(config, device_count=1)


def test_a_learned_schedule_takes_no_weight_decay():
    def mutate(c):
        c.diffusion.learned_schedule, c.diffusion.loss, c.optim.weight_decay = True, "vlb", 0.01
    _bad(mutate, r"config\.diffusion\.learned_schedule: needs optim\.weight_decay=0")


def test_attention_and_kernel_gradient_choices_are_config_fields():
    _bad(lambda c: c.model.update(attention_impl="cudnn"), r"config\.model\.attention_impl: 'cudnn'.*bfloat16")
    _bad(lambda c: c.model.update(attention_impl="flash"), r"config\.model.*attention_impl")
    _bad(lambda c: c.model.update(conv_weight_grad="fast"), r"config\.model.*conv_weight_grad")
    config = _load("cifar10")
    config.compute_dtype, config.model.attention_impl, config.model.conv_weight_grad = "bfloat16", "cudnn", "taps"
    trainer.validate_config(config, device_count=1)
    assert trainer._unet_config(config, 3).attention_impl == "cudnn"


def test_cosine_decay_names_the_run_length_fields():
    def mutate(c):
        c.optim.decay, c.num_train_steps, c.optim.warmup_steps = "cosine", 3000, 5000
    _bad(mutate, r"config\.optim\.decay: 'cosine' decays to 0 at num_train_steps, which must exceed "
         r"optim\.warmup_steps \(got num_train_steps=3000, warmup_steps=5000\)")

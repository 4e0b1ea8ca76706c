"""train.py's --config overrides beyond ml_collections: FIELD=None, schedule_kwargs.KEY=VALUE,
and a one-line error for a misspelled field (diffusion_jax/training/overrides.py)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from configs import default as default_config
from diffusion_jax.training import overrides

REPO = pathlib.Path(__file__).resolve().parents[1]


# --- Taking the late overrides out of the command line, in order ---------------------


@pytest.mark.parametrize("argv, kept, late", [
    # Neither kind: all kept.
    (["--config.model.ch=64", "--mode=train"], ["--config.model.ch=64", "--mode=train"], {}),
    # None anywhere, and schedule_kwargs keys, are taken out.
    (["--config.model.num_classes=None", "--config.diffusion.schedule_kwargs.beta_end=0.03"],
     [], {"model.num_classes": "None", "diffusion.schedule_kwargs.beta_end": "0.03"}),
    # A single dash is an override too (absl's syntax).
    (["-config.sample.num_steps=None"], [], {"sample.num_steps": "None"}),
    # A later ordinary override of the same field wins: the None is dropped.
    (["--config.sample.num_steps=None", "--config.sample.num_steps=7"], ["--config.sample.num_steps=7"], {}),
    # ... also in the space form.
    (["--config.sample.num_steps=None", "--config.sample.num_steps", "7"],
     ["--config.sample.num_steps", "7"], {}),
    # A later None wins over an earlier value: applied after the parse.
    (["--config.sample.num_steps=7", "--config.sample.num_steps=None"],
     ["--config.sample.num_steps=7"], {"sample.num_steps": "None"}),
    # A whole-dict override replaces keys given before it, not those after it.
    (["--config.diffusion.schedule_kwargs.s=0.01", "--config.diffusion.schedule_kwargs={'beta_end': 0.03}",
      "--config.diffusion.schedule_kwargs.beta_start=0.001"],
     ["--config.diffusion.schedule_kwargs={'beta_end': 0.03}"], {"diffusion.schedule_kwargs.beta_start": "0.001"}),
    # Repeats: the last position and value.
    (["--config.diffusion.schedule_kwargs.s=0.01", "--config.model.ch=None", "--config.diffusion.schedule_kwargs.s=0.02"],
     [], {"model.ch": "None", "diffusion.schedule_kwargs.s": "0.02"}),
    # The space form of both kinds; the next word is taken as the value only for these.
    (["--config.model.num_classes", "None", "--config.diffusion.schedule_kwargs.beta_end", "0.03",
      "--config.model.ch", "64", "--config.diffusion.schedule_kwargs.s", "-0.5"],
     ["--config.model.ch", "64"],
     {"model.num_classes": "None", "diffusion.schedule_kwargs.beta_end": "0.03", "diffusion.schedule_kwargs.s": "-0.5"}),
    # A later space-form override of the same field wins over an earlier None.
    (["--config.sample.num_steps", "None", "--config.sample.num_steps", "7"], ["--config.sample.num_steps", "7"], {}),
    # Not flags after "--"; "None" as a value of another flag is left alone.
    (["--sampler=None", "--", "--config.model.ch=None"], ["--sampler=None", "--", "--config.model.ch=None"], {}),
])
def test_split_late_overrides(argv, kept, late):
    got_kept, got_late = overrides.split_late_overrides(["train.py", *argv])
    assert got_kept == ["train.py", *kept]
    assert list(got_late.items()) == list(late.items())


# --- Applying them to a parsed config ----------------------------------------------------


def _locked_default():
    config = default_config.get_config()
    config.lock()
    return config


def test_none_sets_typed_placeholders_and_string_fields():
    config = _locked_default()
    config.model.num_classes = 10
    config.sample.num_steps = 50
    config.data.data_dir = "/data"
    overrides.apply_late_overrides(config, {"model.num_classes": "None", "sample.num_steps": "None",
                                            "data.data_dir": "None"})
    assert config.model.num_classes is None and config.sample.num_steps is None
    assert config.data.data_dir is None  # not the string "None"
    config.model.num_classes = 3  # still the typed field it was
    with pytest.raises(TypeError):
        config.model.num_classes = "three"


def test_schedule_kwargs_keys_are_set_as_literals_and_dropped_with_none():
    config = _locked_default()
    overrides.apply_late_overrides(config, {"diffusion.schedule_kwargs.beta_end": "0.03",
                                            "diffusion.schedule_kwargs.beta_start": "1e-4",
                                            "diffusion.schedule_kwargs.name": "hello"})
    assert config.diffusion.schedule_kwargs.to_dict() == {"beta_end": 0.03, "beta_start": 0.0001, "name": "hello"}
    overrides.apply_late_overrides(config, {"diffusion.schedule_kwargs.name": "None",
                                            "diffusion.schedule_kwargs.missing": "None"})
    assert config.diffusion.schedule_kwargs.to_dict() == {"beta_end": 0.03, "beta_start": 0.0001}
    # Still locked for everything else.
    with pytest.raises(AttributeError):
        config.diffusion.new_field = 1


@pytest.mark.parametrize("late, message", [
    ({"model.chh": "None"}, r"--config\.model\.chh: config\.model has no field 'chh' \(did you mean \"ch\"\?\)"),
    ({"modle.ch": "None"}, r"--config\.modle\.ch: the config has no field 'modle' \(did you mean \"model\"\?\)"),
    ({"model": "None"}, r"--config\.model: config\.model is a section"),
    ({"seed.x": "None"}, r"--config\.seed\.x: config\.seed is a value, not a section"),
    ({"diffusion.schedule_kwargs.a.b": "1"}, r"diffusion\.schedule_kwargs takes KEY=VALUE, one level below it"),
])
def test_overrides_naming_no_field_are_errors(late, message):
    config = _locked_default()
    before = config.to_dict()
    with pytest.raises(overrides.OverrideError, match=message):
        overrides.apply_late_overrides(config, late)
    assert config.to_dict() == before


# --- Through train.py's flag parsing -------------------------------------------------------

_DUMP = """
import json, sys
import train
train._parse_flags(sys.argv)
print("CONFIG=" + json.dumps(train._CONFIG.value.to_dict(), default=str))
"""


def _parse(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    argv = ["train.py", "--config=configs/digits.py", "--workdir=/nonexistent/run", *args]
    return subprocess.run([sys.executable, "-c", _DUMP, *argv[1:]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_train_py_takes_none_and_schedule_kwargs_keys():
    proc = _parse("--config.model.num_classes=None", "--config.sample.num_steps", "None",
                  "--config.diffusion.schedule_kwargs.beta_end", "0.03", "--config.model.ch=64",
                  "--config.model.attention_impl=xla")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads(proc.stdout.split("CONFIG=", 1)[1])
    assert config["sample"]["num_steps"] is None  # configs/digits.py sets 25
    assert config["model"]["num_classes"] is None
    assert config["diffusion"]["schedule_kwargs"] == {"beta_end": 0.03}
    assert config["model"]["ch"] == 64  # the ordinary overrides still apply
    assert config["model"]["attention_impl"] == "xla"  # a typed placeholder in configs/default.py


@pytest.mark.parametrize("arg, message", [
    ("--config.model.chh=64", "--config.model.chh: config.model has no field 'chh' (Did you mean \"ch\""),
    ("--config.modle.ch=64", "--config.modle.ch: the config has no field 'modle' (Did you mean \"model\""),
    ("--config.modle.ch=None", "--config.modle.ch: the config has no field 'modle' (did you mean \"model\"?)"),
    ("--config.model.chh 64", "--config.model.chh: config.model has no field 'chh' (Did you mean \"ch\""),
])
def test_train_py_reports_a_misspelled_field_in_one_line(arg, message):
    proc = _parse(*arg.split(" "))  # "FIELD VALUE": the space form, two words
    assert proc.returncode == 1
    assert f"FATAL Flags parsing error: {message}" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--mode=evaluate", "--num_steps=5", "--sampler=ddim"],
     "--sampler, --num_steps only apply with --mode=sample, not --mode=evaluate"),
    (["--num_images=4"], "--num_images only apply with --mode=sample, not --mode=train"),
    (["--mode=sample", "--allow_model_changes"],
     "--allow_model_changes only apply with --mode=train, not --mode=sample"),
])
def test_train_py_refuses_a_flag_of_another_mode(tmp_path, args, message):
    """They were silently ignored (an evaluation given --sampler=bogus ran as if not given)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", "--config=configs/digits.py", f"--workdir={workdir}",
                           "--nojemalloc", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-3000:]
    assert not workdir.exists()

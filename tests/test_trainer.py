"""End to end: train_and_evaluate, evaluate and sample on real (digits) and mock (cifar10) data.

Tiny models and few steps; each test compiles a few programs on the 8
simulated CPU devices, so they are marked slow.
"""
import glob
import json
import os
import shutil
import signal
import struct
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorboardX.proto import event_pb2

from configs import cifar10 as cifar10_config
from configs import digits as digits_config
import diffusion_jax as dj
from diffusion_jax import checkpointing, input_pipeline, parallel
from diffusion_jax.training import trainer

pytestmark = pytest.mark.slow


def _read_summaries(logdir):
    """(step, summary value) of every event in the TensorBoard event files in ``logdir``.

    Event files are TFRecords: uint64 length, uint32 crc, payload, uint32 crc.
    """
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                yield event.step, value


def _read_scalars(logdir):
    """{tag: [(step, value)]} of the scalars in ``logdir``'s event files."""
    scalars = {}
    for step, value in _read_summaries(logdir):
        if value.HasField("simple_value"):
            scalars.setdefault(value.tag, []).append((step, value.simple_value))
    return scalars


def _read_image_steps(logdir):
    """{tag: [step]} of the images in ``logdir``'s event files."""
    images = {}
    for step, value in _read_summaries(logdir):
        if value.HasField("image"):
            images.setdefault(value.tag, []).append(step)
    return images


def _tiny_digits_config(num_train_steps):
    config = digits_config.get_config()
    config.num_train_steps = num_train_steps
    config.batch_size = 32
    config.log_every_steps = 10
    config.checkpoint_every_steps = 30
    config.eval_every_steps = 30
    config.checkpoint.max_to_keep = 5
    config.checkpoint.async_save = False
    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = ()
    config.diffusion.num_timesteps = 50
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 5
    config.ema_decay = 0.9
    config.sample.sampler = "ddim"
    config.sample.num_steps = 5
    config.sample.num_images = 8
    config.eval.batch_size = 152  # 297 test images: 2 batches, the second padded
    config.eval.num_batches_during_training = 1
    config.eval.nll_at_end = True
    return config


def _training_only(config, **fields):
    """A copy of ``config`` that only trains (no evaluation or sampling: they do
    not change the state), with ``fields`` set."""
    config = config.copy_and_resolve_references()
    config.eval_every_steps = 0
    config.eval.nll_at_end = False
    config.sample.num_images = 0
    for name, value in fields.items():
        config[name] = value
    return config


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("digits"))
    config = _tiny_digits_config(num_train_steps=60)
    state = trainer.train_and_evaluate(config, workdir)
    return config, workdir, state


def test_digits_run_writes_everything_and_its_loss_falls(digits_run):
    config, workdir, state = digits_run
    assert int(state.step) == 60 and int(state.nonfinite_count) == 0

    scalars = _read_scalars(os.path.join(workdir, trainer.TENSORBOARD_SUBDIR))
    losses = [v for _, v in sorted(scalars["train/loss"])]
    assert [s for s, _ in sorted(scalars["train/loss"])] == [10, 20, 30, 40, 50, 60]
    assert losses[-1] < 0.7 * losses[0], losses
    for tag in ("train/loss_q0", "train/loss_q3", "train/grad_norm", "train/lr", "train/steps_per_sec",
                "train/images_per_sec", "eval/nll_bpd"):
        assert tag in scalars, tag

    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    assert ckpt.all_steps() == [30, 60]
    ckpt.close()
    assert checkpointing.load_config(workdir)["batch_size"] == 32
    assert os.path.exists(os.path.join(workdir, "samples", "step_00000030.png"))
    assert os.path.exists(os.path.join(workdir, "samples", "step_00000060.png"))

    nll = json.load(open(os.path.join(workdir, "nll.json")))
    assert nll["num_examples"] == 297 and nll["step"] == 60
    # A bound in bits/dim on 8-bit data: positive and, after a little training,
    # well below the 8 bits of a uniform distribution.
    assert 0 < nll["nll_bpd"] < 8


def test_evaluate_and_sample_modes_from_the_checkpoint(digits_run):
    config, workdir, state = digits_run
    from_training = json.load(open(os.path.join(workdir, "nll.json")))
    os.remove(os.path.join(workdir, "nll.json"))
    result = trainer.evaluate(config, workdir)
    assert json.load(open(os.path.join(workdir, "nll.json"))) == pytest.approx(result)
    # Same EMA parameters, batches and keys as the end of training: the same bound.
    assert result == pytest.approx(from_training)

    images = trainer.sample(config, workdir, num_images=5, sampler="dpm_solver++", num_steps=4)
    assert images.shape == (5, 8, 8, 1) and np.all(np.abs(images) <= 1.0)
    saved = np.load(os.path.join(workdir, "samples", "sample_step60_dpm_solver++4.npz"))
    np.testing.assert_array_equal(saved["images"], images)
    assert os.path.exists(os.path.join(workdir, "samples", "sample_step60_dpm_solver++4.png"))
    # In TensorBoard beside training's grids (at 30 and 60), under its own tag.
    images = _read_image_steps(os.path.join(workdir, "tensorboard"))
    assert images["samples/dpm_solverpp4"] == [60]
    assert images["samples"] == [30, 60]


def test_sigterm_checkpoints_and_the_resumed_run_matches_an_uninterrupted_one(digits_run, tmp_path, monkeypatch,
                                                                             caplog):
    """SIGTERM mid-run: the step in flight finishes, a checkpoint is written and
    train_and_evaluate returns; restarting continues to the same params, EMA and
    optimizer state (bitwise) as the uninterrupted 60-step run of the fixture.
    A Ctrl-C while that last checkpoint is written waits for it (it used to
    raise KeyboardInterrupt there and cut the save short)."""
    config, _, straight = digits_run
    finish = checkpointing.Checkpointer.wait_until_finished

    def interrupted_while_finishing(self):
        os.kill(os.getpid(), signal.SIGINT)  # the second signal, during the final save
        finish(self)
    monkeypatch.setattr(checkpointing.Checkpointer, "wait_until_finished", interrupted_while_finishing)
    config = _training_only(config, checkpoint_every_steps=10)
    workdir = str(tmp_path)
    first_checkpoint = os.path.join(workdir, "checkpoints", "10")

    def send_sigterm_once_training():
        # The step-10 checkpoint exists only once the loop (and its handler) runs.
        deadline = time.monotonic() + 300
        while not os.path.isdir(first_checkpoint) and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    handler_before = signal.getsignal(signal.SIGTERM)
    killer = threading.Thread(target=send_sigterm_once_training, daemon=True)
    killer.start()
    with caplog.at_level("WARNING", logger=trainer.logger.name):
        stopped = trainer.train_and_evaluate(config, workdir)
    killer.join()
    assert "Received SIGINT while a checkpoint is written: finishing it first." in caplog.text
    assert signal.getsignal(signal.SIGTERM) is handler_before
    stopped_at = int(stopped.step)
    assert 10 <= stopped_at < 60
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    assert ckpt.latest_step() == stopped_at
    ckpt.close()
    monkeypatch.undo()

    resumed = trainer.train_and_evaluate(config, workdir)
    assert int(resumed.step) == 60
    for name in ("params", "ema_params", "opt_state"):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                     getattr(straight, name), getattr(resumed, name))


def test_signals_while_a_checkpoint_is_written_wait_for_it(tmp_path, monkeypatch, caplog):
    """SIGTERM and then Ctrl-C arriving while the loop writes the step-10 checkpoint: the
    checkpoint is finished and the run stops there (the Ctrl-C, a second signal, raised
    KeyboardInterrupt in the middle of the save, and step 10 was lost with a synchronous save)."""
    config = _training_only(_tiny_digits_config(num_train_steps=20), checkpoint_every_steps=10)
    save = checkpointing.Checkpointer.save

    def signalled_while_saving(self, step, *args, **kwargs):
        if step == 10 and not kwargs.get("force"):
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
        return save(self, step, *args, **kwargs)
    monkeypatch.setattr(checkpointing.Checkpointer, "save", signalled_while_saving)
    with caplog.at_level("WARNING", logger=trainer.logger.name):
        stopped = trainer.train_and_evaluate(config, str(tmp_path))
    assert int(stopped.step) == 10
    assert "Received SIGINT while a checkpoint is written: finishing it first." in caplog.text
    monkeypatch.undo()
    ckpt = checkpointing.Checkpointer(os.path.join(tmp_path, "checkpoints"), read_only=True)
    assert ckpt.all_steps() == [10]
    ckpt.close()


def test_several_steps_per_call_resume_between_calls_and_match_one_step_per_call(digits_run, tmp_path, caplog):
    """steps_per_dispatch=5: a run to step 33 (calls of 5 to 30, then 3 single
    steps) resumed to 60 (single steps to 35, then calls of 5) logs and
    checkpoints at the steps of the one-step run, logs its losses, and ends at
    its network, to float32 rounding (a scanned step compiles apart from a
    single one). The resumed half also accumulates gradients over two
    micro-batches per device (num_microbatches may change on resume): the
    same updates.

    The network, not every parameter: in this tiny UNet a bias feeding a
    GroupNorm of one channel per group (ch=32, 32 groups) has an exactly zero
    gradient, so Adam turns float32 rounding in that gradient into steps of
    the full learning rate, different in two compilations; such parameters
    do not change what the network computes."""
    config, _, straight = digits_run
    config = _training_only(config, steps_per_dispatch=5)
    workdir = str(tmp_path)

    config.num_train_steps = 33
    with caplog.at_level("WARNING", logger=trainer.logger.name):
        assert int(trainer.train_and_evaluate(config, workdir).step) == 33
    assert "steps_per_dispatch=5 on the CPU backend" in caplog.text  # slow there: a warning
    config.num_train_steps = 60
    config.num_microbatches = 2  # 32 examples over 8 devices: two micro-batches of 2 on each
    with caplog.at_level("WARNING", logger=trainer.logger.name):
        resumed = trainer.train_and_evaluate(config, workdir)
    assert "num_microbatches=2 on the CPU backend" in caplog.text  # slow there too: a warning
    assert int(resumed.step) == 60 and int(resumed.nonfinite_count) == 0

    scalars = _read_scalars(os.path.join(workdir, trainer.TENSORBOARD_SUBDIR))
    assert sorted(s for s, _ in scalars["train/loss"]) == [10, 20, 30, 33, 40, 50, 60]
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    assert ckpt.all_steps() == [30, 33, 60]
    ckpt.close()
    straight_losses = dict(_read_scalars(os.path.join(digits_run[1], trainer.TENSORBOARD_SUBDIR))["train/loss"])
    losses = dict(scalars["train/loss"])
    for step in (10, 20, 30, 50, 60):  # 40 averages other steps here (34-40: the run resumed at 33)
        assert losses[step] == pytest.approx(straight_losses[step], rel=1e-4), step

    model = trainer._Job(config, (8, 8, 1)).model
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 8, 8, 1)).astype(np.float32)
    t = rng.integers(0, config.diffusion.num_timesteps, 16)
    for name in ("params", "ema_params"):
        want = model.apply({"params": getattr(straight, name)}, x, t, train=False)
        got = model.apply({"params": getattr(resumed, name)}, x, t, train=False)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-4, err_msg=name)


def test_evaluating_under_another_model_or_diffusion_config_is_an_error(digits_run, monkeypatch):
    """The bound and the samples are only right under the settings the parameters were
    trained with; the error names each differing field, before anything compiles."""
    config, workdir, _ = digits_run
    config = config.copy_and_resolve_references()
    config.diffusion.num_timesteps = 40
    config.model.ch_mult = (1, 1)
    monkeypatch.setattr(trainer._Job, "nll_program", lambda *a, **k: pytest.fail("compiled"))
    with pytest.raises(ValueError, match=r"diffusion\.num_timesteps 50 -> 40.*model\.ch_mult \[1, 2\] -> \[1, 1\]"):
        trainer.evaluate(config, workdir)
    with pytest.raises(ValueError, match=r"diffusion\.num_timesteps 50 -> 40"):
        trainer.sample(config, workdir, num_images=2)
    # A schedule argument given where the checkpoint's config had none is named alone
    # (not also as schedule_kwargs {} -> absent).
    config = digits_run[0].copy_and_resolve_references()
    config.diffusion.schedule_kwargs.beta_end = 0.03
    with pytest.raises(ValueError, match=r"define the model: diffusion\.schedule_kwargs\.beta_end "
                                         r"'\(absent\)' -> 0\.03\. Run"):
        trainer.evaluate(config, workdir)
    # Importance sampling's loss history is part of the saved state: the sampler is named.
    config = digits_run[0].copy_and_resolve_references()
    config.diffusion.timestep_sampler = "importance"
    with pytest.raises(ValueError, match=r"diffusion\.timestep_sampler 'uniform' -> 'importance'"):
        trainer.evaluate(config, workdir)
    # The image size is the model's input: digits at 16x16 would be another bound (it was
    # computed silently), and samples of another size.
    config = digits_run[0].copy_and_resolve_references()
    config.data.image_size = 16
    with pytest.raises(ValueError, match=r"define the model: data\.image_size 8 -> 16\. Run"):
        trainer.evaluate(config, workdir)
    with pytest.raises(ValueError, match=r"data\.image_size 8 -> 16"):
        trainer.sample(config, workdir, num_images=2)


@pytest.mark.parametrize("saved_rate, rate, refused", [(0.0, 0.1, True), (0.1, 0.0, False), (0.1, 0.2, False)])
def test_inference_needs_a_trained_null_class_for_the_unconditional_nll(saved_rate, rate, refused):
    """cond_drop_rate > 0 evaluates p(x) through the null class, untrained in a model trained
    without label dropout: refused. A model trained with it evaluated with cond_drop_rate 0
    gives its conditional NLL p(x | label), which it also learned."""
    config = _tiny_digits_config(10)
    config.model.num_classes, config.cond_drop_rate = 10, rate
    saved = json.loads(json.dumps(config.to_dict()))  # as saved: tuples become lists
    saved["cond_drop_rate"] = saved_rate
    if refused:
        with pytest.raises(ValueError, match=rf"define the model: cond_drop_rate {saved_rate} -> {rate}\."):
            trainer._check_inference_config(config, saved, 5, "ckpts")
    else:
        trainer._check_inference_config(config, saved, 5, "ckpts")


def test_resuming_with_changed_fields_warns_naming_them_and_records_the_new_config(digits_run, tmp_path, caplog):
    config, workdir, _ = digits_run
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    config = _training_only(config, num_train_steps=61, batch_size=16, log_every_steps=1)
    config.optim.learning_rate = 1e-3

    # A change that makes the checkpoint unreadable names the fields too.
    wider = config.copy_and_resolve_references()
    wider.model.ch = 64
    with pytest.raises(ValueError, match=r"differs from the checkpoint's in: .*model\.ch 32 -> 64"):
        trainer.train_and_evaluate(wider, copy)

    # A change the checkpoint's arrays fit but that changes what they compute (a v-prediction
    # network resumed from an eps-prediction one, say a forgotten override) is refused before
    # anything is written: it used to train on with a warning, and checkpoint.max_to_keep then
    # deleted the steps trained under the old values.
    config.diffusion.prediction = "v"
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    with pytest.raises(ValueError, match=r"checkpoint step 60 .* define the model: diffusion\.prediction 'eps' -> "
                                         r"'v'\..*allow_model_changes=True"):
        trainer.train_and_evaluate(config, copy)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")} == before

    # On purpose (fine-tuning under new values), with allow_model_changes: logged with the rest.
    with caplog.at_level("WARNING", logger=trainer.logger.name):
        assert int(trainer.train_and_evaluate(config, copy, allow_model_changes=True).step) == 61
    warning = next(r.getMessage() for r in caplog.records if "differs from the checkpoint's" in r.getMessage())
    assert "batch_size 32 -> 16" in warning and "optim.learning_rate 0.002 -> 0.001" in warning
    assert "diffusion.prediction 'eps' -> 'v'" in warning
    # Operational fields (how long, how often) are not reported; the decay is constant here.
    assert "num_train_steps" not in warning and "log_every_steps" not in warning
    assert checkpointing.load_config(copy)["batch_size"] == 16


def test_worker_processes_train_exactly_as_threads(tmp_path, monkeypatch):
    """config.data.worker_count reaches the train iterator, whose batches do not depend on it."""
    asked, create = [], input_pipeline.create_train_iterator

    def spy(*args, **kwargs):
        asked.append(kwargs.get("worker_count"))
        return create(*args, **kwargs)

    monkeypatch.setattr(input_pipeline, "create_train_iterator", spy)
    states = []
    for workers in (0, 2):
        config = _training_only(_tiny_digits_config(num_train_steps=4), log_every_steps=2)
        config.data.worker_count = workers
        config.checkpoint_every_steps = 4
        states.append(trainer.train_and_evaluate(config, str(tmp_path / f"workers{workers}")))
    for a, b in zip(jax.tree.leaves(states[0].params), jax.tree.leaves(states[1].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert asked == [0, 2]
    assert checkpointing.load_config(str(tmp_path / "workers2"))["data"]["worker_count"] == 2


def test_a_workdir_whose_every_checkpoint_was_damaged_does_not_start_over(digits_run, tmp_path):
    """The first start moves the damaged steps aside and fails; the next (an automatic
    restart) must not then train from step 0 beside them."""
    config, workdir, _ = digits_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    steps = sorted(p for p in (copy / "checkpoints").iterdir() if p.name.isdigit())
    assert [p.name for p in steps] == ["30", "60"]
    for step in steps:
        (step / "checksums.json").unlink()  # unverifiable: taken as damaged
    config = _training_only(config, num_train_steps=90)
    with pytest.raises(checkpointing.CheckpointNotFoundError, match="No intact checkpoint"):
        trainer.train_and_evaluate(config, str(copy))
    for _ in range(2):
        with pytest.raises(checkpointing.CheckpointNotFoundError,
                           match=r"only steps found damaged and moved aside earlier: 30\.corrupt-0, 60\.corrupt-0"):
            trainer.train_and_evaluate(config, str(copy))
    assert sorted(p.name for p in (copy / "checkpoints").iterdir() if "corrupt" in p.name or p.name.isdigit()) == [
        "30.corrupt-0", "60.corrupt-0"]
    # Evaluating and sampling say the same (they said "No checkpoint ...: train first").
    with pytest.raises(checkpointing.CheckpointNotFoundError, match=r"only steps found damaged and moved aside"):
        trainer.evaluate(config, str(copy))


@pytest.mark.parametrize("name, warns", [("folder", True), ("digits", False)])
def test_another_data_dir_warns_on_resume_where_it_is_the_dataset(name, warns, caplog):
    """For a folder dataset the folder is the data; for TFDS, data_dir is where the same data lives."""
    config = _tiny_digits_config(10)
    config.data.name = name
    config.data.data_dir = "/data/new"
    saved = json.loads(json.dumps(config.to_dict()))  # as saved: tuples become lists
    saved["data"]["data_dir"] = "/data/old"
    with caplog.at_level("WARNING", logger=trainer.logger.name):
        trainer._check_resumed_config(config, saved, 5, "ckpts", allow_model_changes=False)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert ("data.data_dir '/data/old' -> '/data/new'" in said) == warns, said


def test_config_changes_are_judged_against_the_step_restored_not_a_damaged_newer_one(digits_run, tmp_path, caplog):
    """Step 60 was (as if) written after a resume with lr 0.001 and a 40-step diffusion, then damaged:
    step 30 is restored, so the changes to report are those against step 30's config."""
    config, workdir, _ = digits_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    step_dir = copy / "checkpoints" / "60"
    config_file = step_dir / checkpointing._CONFIG / "metadata"
    newer = json.loads(config_file.read_text())
    newer["optim"]["learning_rate"] = 1e-3
    newer["diffusion"]["num_timesteps"] = 40
    config_file.write_text(json.dumps(newer))
    victim = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))

    # Evaluating under step 60's settings: they match the newest step's config, not step 30's,
    # whose parameters are the ones loaded (read-only: the damaged step is skipped, not moved).
    forty = config.copy_and_resolve_references()
    forty.diffusion.num_timesteps = 40
    with pytest.raises(ValueError, match=r"checkpoint step 30 .*diffusion\.num_timesteps 50 -> 40"):
        trainer.evaluate(forty, str(copy))

    resumed = _training_only(config, num_train_steps=31)
    resumed.optim.learning_rate = 1e-3
    with caplog.at_level("WARNING", logger=trainer.logger.name):
        assert int(trainer.train_and_evaluate(resumed, str(copy)).step) == 31
    warning = next(r.getMessage() for r in caplog.records if "differs from the checkpoint's" in r.getMessage())
    assert "Resuming from step 30" in warning and "optim.learning_rate 0.002 -> 0.001" in warning


def test_evaluate_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        trainer.evaluate(_tiny_digits_config(10), str(tmp_path))


def test_a_mistyped_workdir_is_reported_without_creating_it(tmp_path):
    mistyped = tmp_path / "runs" / "digts"
    for run in (trainer.evaluate, lambda c, w: trainer.sample(c, w, num_images=2)):
        with pytest.raises(FileNotFoundError, match=r"No checkpoint in .*digts"):
            run(_tiny_digits_config(10), str(mistyped))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("data", [
    {"name": "folder", "data_dir": "MISSING"},  # no such image folder
    {"name": "digits", "train_split": "validation"},  # no such split
])
def test_a_data_error_in_a_new_run_creates_no_workdir(tmp_path, data):
    config = _tiny_digits_config(10)
    with config.unlocked():
        config.data.update({k: str(tmp_path / "nowhere") if v == "MISSING" else v for k, v in data.items()})
    with pytest.raises((ValueError, FileNotFoundError), match=r"config\.data"):
        trainer.train_and_evaluate(config, str(tmp_path / "runs" / "new"))
    assert not (tmp_path / "runs").exists()


def test_resuming_at_or_past_the_last_step_says_there_is_nothing_to_train(digits_run, tmp_path, caplog):
    config, workdir, _ = digits_run
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    with caplog.at_level("WARNING", logger=trainer.logger.name):
        state = trainer.train_and_evaluate(_training_only(config, num_train_steps=30), copy)
    assert int(state.step) == 60  # nothing trained, nothing undone
    assert any("at step 60, at or past num_train_steps=30: nothing to train" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_one_cifar10_training_step_on_mock_data(tmp_path):
    config = cifar10_config.get_config()
    config.data.data_dir = str(tmp_path / "tfds")
    config.num_train_steps = 1
    config.batch_size = 8
    config.log_every_steps = 1
    config.eval_every_steps = 0
    config.checkpoint.async_save = False
    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = ()
    config.sample.num_images = 0  # no sample grid: one step is all this test is about
    config.eval.batch_size = 8
    workdir = str(tmp_path / "run")
    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        state = trainer.train_and_evaluate(config, workdir)
    assert int(state.step) == 1 and int(state.nonfinite_count) == 0
    loss = _read_scalars(os.path.join(workdir, trainer.TENSORBOARD_SUBDIR))["train/loss"]
    assert len(loss) == 1 and np.isfinite(loss[0][1])
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "1"))
    assert not os.path.exists(os.path.join(workdir, "samples"))


def test_a_learned_schedule_trains_evaluates_and_samples_with_dpm_solver(tmp_path, monkeypatch, caplog):
    """A learned schedule is traced inside the sampling program: DPM-Solver++'s default log-SNR
    spacing cannot choose rows there, so the trainer keeps "time" rows for it (sampling failed)."""
    config = _tiny_digits_config(num_train_steps=4)
    config.log_every_steps = 2
    config.checkpoint_every_steps = 4
    config.eval_every_steps = 2
    config.diffusion.learned_schedule, config.diffusion.loss = True, "vlb"
    config.sample.sampler, config.sample.num_steps = "dpm_solver++", 4
    workdir = str(tmp_path / "learned")
    state = trainer.train_and_evaluate(config, workdir)
    assert int(state.step) == 4 and int(state.nonfinite_count) == 0
    initial = trainer._Job(config, (8, 8, 1)).create_state().schedule_params
    moved = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(state.schedule_params), jax.tree.leaves(initial))]
    assert max(moved) > 0, "the schedule's parameters did not train"
    assert os.path.exists(os.path.join(workdir, "samples", "step_00000002.png"))
    assert os.path.exists(os.path.join(workdir, "samples", "step_00000004.png"))
    nll = json.load(open(os.path.join(workdir, "nll.json")))  # written after the final samples
    assert nll["step"] == 4 and 0 < nll["nll_bpd"] < 50  # 4 steps: a bound, not yet a good one
    images = trainer.sample(config, workdir, num_images=3, num_steps=3)
    assert images.shape == (3, 8, 8, 1) and np.all(np.isfinite(images))
    # The schedule is averaged like the model (ema_decay 0.9 here: the average lags).
    assert not np.allclose(np.asarray(state.ema_schedule_params["log_snr_max"]),
                           np.asarray(state.schedule_params["log_snr_max"]))

    # A checkpoint written before the schedule had an average resumes, the average starting
    # from the schedule restored.
    restore = checkpointing.Checkpointer.restore
    monkeypatch.setattr(checkpointing.Checkpointer, "restore",
                        lambda self, *a, **k: restore(self, *a, **k).replace(ema_schedule_params=None))
    config.num_train_steps, config.eval.nll_at_end, config.sample.num_images = 5, False, 0
    resumed = trainer.train_and_evaluate(config, workdir)
    assert "predates the learned schedule's moving average" in caplog.text
    assert int(resumed.step) == 5 and resumed.ema_schedule_params is not None


def test_a_conditional_model_trained_without_dropped_labels_is_scored_with_its_labels(tmp_path):
    """With cond_drop_rate=0 the null class is never trained: the NLL is that of p(x | label)."""
    config = _training_only(_tiny_digits_config(num_train_steps=1))
    config.model.num_classes = 10
    _, job = trainer._setup(config, str(tmp_path / "run"))
    # Initial parameters end in a zero convolution (the output ignores the label): perturb them all.
    leaves, treedef = jax.tree.flatten(job.create_state().ema_params)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    state = trainer.TrainState(step=None, params=None, opt_state=None, ema_params=jax.tree.unflatten(
        treedef, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]))
    batch = next(iter(input_pipeline.create_eval_iterator(
        trainer._data_config(config), batch_size=16, max_batches=1)))
    batch = {"image": batch["image"], "label": batch["label"]}
    assert len(set(batch["label"].tolist())) > 1
    key = jax.random.PRNGKey(3)
    got = np.asarray(job.nll_program()(state.ema_params, None, parallel.shard_batch(batch, job.mesh), key))
    devices = job.mesh.size

    @jax.jit
    def block_nll(x, y, block_key):
        model_fn = lambda x_t, t: job.model.apply({"params": state.ema_params}, x_t, t, y, train=False)  # noqa: E731
        return dj.nll_bpd(model_fn, job.schedule, x, block_key, variance=config.diffusion.variance).total

    def expected(labels):
        """Each device's block of the batch, with its key fold_in(key, device index), as the program."""
        return np.concatenate([
            np.asarray(block_nll(x, y, jax.random.fold_in(key, i)))
            for i, (x, y) in enumerate(zip(np.split(batch["image"], devices), np.split(labels, devices)))])

    np.testing.assert_allclose(got, expected(batch["label"].astype(np.int32)), rtol=1e-4)
    assert not np.allclose(got, expected(np.full((16,), 10, np.int32)), rtol=1e-4)


def test_speed_only_model_fields_are_free_and_may_be_absent_from_an_older_checkpoint(caplog):
    """A checkpoint's config from before model.attention_impl/conv_weight_grad existed, or with
    other values of them (cuDNN attention on the GPU that trained it), samples and resumes."""
    config = _tiny_digits_config(num_train_steps=4)
    saved = json.loads(json.dumps(config.to_dict()))  # as stored beside a checkpoint
    del saved["model"]["attention_impl"], saved["model"]["conv_weight_grad"]
    config.model.conv_weight_grad = "xla"
    trainer._check_inference_config(config, saved, 4, "checkpoints")  # no error
    trainer._check_resumed_config(config, saved, 4, "checkpoints", allow_model_changes=False)  # no error
    assert "differs" not in caplog.text
    config.model.ch = 64  # a field that defines the model still does
    with pytest.raises(ValueError, match=r"fields that define the model: model\.ch 32 -> 64"):
        trainer._check_inference_config(config, saved, 4, "checkpoints")
    with pytest.raises(ValueError, match=r"fields that define the model: model\.ch 32 -> 64"):
        trainer._check_resumed_config(config, saved, 4, "checkpoints", allow_model_changes=False)

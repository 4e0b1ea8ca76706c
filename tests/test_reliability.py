"""Reliability of training runs (issue 5), end to end through train.py.

The tests run the real entry point in child processes (the trainer in this
process for safe loading) on a tiny config, ``tests/_reliability_helpers.py``
(a one-level UNet on 8x8 digits, T=100, batch 16, a checkpoint every N=10
steps, 2N=20 steps), and check what a user would see:

1. exact resume after SIGKILL ........ test_sigkill_after_a_checkpoint_then_restart_is_bitwise_the_straight_run
2. SIGTERM / SIGINT .................. test_signal_stops_after_the_step_in_flight_with_a_checkpoint_and_resumes
3. crash during a save, damage ....... test_kill_during_a_save_keeps_the_previous_checkpoint_and_resumes_from_it,
                                       test_damaged_newest_checkpoint_is_reported_moved_aside_and_skipped
4. non-finite updates ................ test_nonfinite_updates_are_skipped_counted_and_stop_the_run,
                                       test_training_loop_reads_nothing_from_the_device_between_log_steps
5. bad input, early .................. test_bad_input_fails_fast_naming_the_field_and_touches_nothing
6. multi-host ........................ test_processes_read_their_rows_of_the_one_process_global_batch,
                                       test_two_processes_of_two_devices_train_like_one_process_of_four
7. determinism ....................... test_same_config_and_seed_give_bitwise_the_same_params_and_samples
8. safe loading ...................... test_restore_evaluate_and_sample_with_pickle_disabled,
                                       test_configs_and_data_positions_beside_checkpoints_are_plain_json

Every run is compared with the straight, uninterrupted 2N-step run of the
``straight`` fixture. Checkpoints are read back with Orbax directly, leaf by
leaf into host memory (not through the trainer's restore path), and compared
bitwise. "Same data order" is checked twice over: the grain iterator position
saved with each step (a resumed run whose iterator was not restored would end
at position N, not 2N), and the parameters, which differ if any batch does.

Child processes see 2 simulated CPU devices (4 for the multi-host reference)
and share a persistent XLA compilation cache, so each program compiles once.
"""
from __future__ import annotations

import _pickle
import collections
import hashlib
import json
import os
import pathlib
import pickle
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import _reliability_helpers
import jax
import numpy as np
import orbax.checkpoint as ocp
import PIL.Image
import pytest
from tensorboardX.proto import event_pb2

from diffusion_jax import input_pipeline, parallel, xla_cpu
from diffusion_jax.training import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILE = "tests/_reliability_helpers.py"
N = 10  # the checkpoint interval of the tiny config; runs go to 2N steps
TIMEOUT_S = 900  # generous: CI machines are slow; a hung child must not hang CI forever
_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


# =============================================================================
# Running train.py and reading what it leaves
# =============================================================================


def _position_after(step: int) -> dict:
    """The train iterator's saved position after ``step`` steps of the tiny config: the
    examples consumed by the whole job (batch 16, seed 0, digits' 1500 training images)."""
    config = _reliability_helpers.get_config()
    assert (config.batch_size, config.seed, config.data.train_split) == (16, 0, "train")
    return {"next_example": 16 * step, "global_batch_size": 16, "seed": 0, "split_length": 1500}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The child processes' environment: 2 CPU devices, one shared XLA cache."""
    cache = tmp_path_factory.mktemp("xla_cache")
    base = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED_ENV}
    base.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONUNBUFFERED="1",
    )
    return base


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A TFDS data_dir with the digits prepared (once, here, not racing in children)."""
    path = str(tmp_path_factory.mktemp("tfds"))
    input_pipeline.dataset_info(input_pipeline.DataConfig("digits", data_dir=path))
    return path


def _train_py(workdir, data_dir, overrides=None, *, flags=()):
    overrides = {"data.data_dir": data_dir, **(overrides or {})}
    return [sys.executable, "train.py", f"--config={CONFIG_FILE}", f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in overrides.items()), *flags]


def _run(cmd, env):
    return subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def _start(cmd, env, log_path):
    """Starts a child whose stdout and stderr go to ``log_path`` (no pipe to fill up)."""
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(proc, log_path) -> str:
    try:
        proc.wait(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    return pathlib.Path(log_path).read_text()


def _ok(returncode, output):
    assert returncode == 0, output[-5000:]


def _wait_until(condition, proc, log_path, what):
    """Polls every 2 ms until ``condition()``; fails if the child exits first."""
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"train.py exited ({proc.returncode}) before {what}:\n"
                        + pathlib.Path(log_path).read_text()[-5000:])
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


def _checkpoint_dir(workdir) -> pathlib.Path:
    return pathlib.Path(workdir, trainer.CHECKPOINT_SUBDIR)


def _committed_steps(workdir) -> list[int]:
    """Finalized steps: Orbax renames ``<step>.orbax-checkpoint-tmp`` to ``<step>`` on commit."""
    return sorted(int(p.name) for p in _checkpoint_dir(workdir).iterdir() if p.name.isdigit())


def _saved(workdir, step):
    """``({leaf path: numpy array}, {file: iterator state})`` of a committed step.

    Read with Orbax directly, into the structure recorded in the checkpoint's
    own metadata, independently of the trainer's restore and its template.
    """
    step_dir = _checkpoint_dir(workdir) / str(step)
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as reader:
        metadata = reader.metadata(step_dir / "state").item_metadata
        metadata = getattr(metadata, "tree", metadata)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=host), metadata)
        tree = reader.restore(step_dir / "state", target)
    leaves = {jax.tree_util.keystr(path): np.asarray(leaf)
              for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
    data = {p.name: json.loads(p.read_text()) for p in sorted((step_dir / "data").glob("process_*.json"))}
    return leaves, data


def _assert_same_bits(got, want):
    """Every leaf (step, params, EMA params, optimizer state, counters) and the data position."""
    (got_leaves, got_data), (want_leaves, want_data) = got, want
    for part in ("['params']", "['ema_params']", "['opt_state']", "['step']"):
        assert any(k.startswith(part) for k in want_leaves), part
    assert got_leaves.keys() == want_leaves.keys()
    differ = [k for k, w in want_leaves.items()
              if got_leaves[k].dtype != w.dtype or got_leaves[k].shape != w.shape
              or got_leaves[k].tobytes() != w.tobytes()]
    assert not differ, f"{len(differ)} of {len(want_leaves)} leaves differ, e.g. {differ[:4]}"
    assert got_data == want_data


def _file_hashes(root) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root`` (directories as "dir")."""
    root = pathlib.Path(root)
    hashes = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        hashes[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def _scalars(logdir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from TensorBoard event files (TFRecords: len, crc, event, crc)."""
    scalars = collections.defaultdict(dict)
    for path in sorted(pathlib.Path(logdir).glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars[value.tag][event.step] = value.simple_value
    return scalars


def _copy_run(workdir, tmp_path, name="run") -> pathlib.Path:
    target = tmp_path / name
    shutil.copytree(workdir, target)
    return target


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir, env):
    """The reference: 2N steps without interruption (checkpoints at N and 2N)."""
    workdir = tmp_path_factory.mktemp("straight") / "run"
    proc = _run(_train_py(workdir, data_dir), env)
    _ok(proc.returncode, proc.stderr)
    assert _committed_steps(workdir) == [N, 2 * N]
    return workdir


# =============================================================================
# 1. Exact resume after SIGKILL
# =============================================================================


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_restart_is_bitwise_the_straight_run(straight, data_dir, env, tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "killed.log"
    # Synchronous saves: once step N is committed the child trains steps N+1..,
    # so the kill throws away trained steps (the kill during a save is test 3).
    cmd = _train_py(workdir, data_dir, {"checkpoint.async_save": False})
    proc = _start(cmd, env, log)
    _wait_until(lambda: (_checkpoint_dir(workdir) / str(N)).is_dir(), proc, log, f"checkpoint {N}")
    proc.send_signal(signal.SIGKILL)
    _finish(proc, log)
    assert proc.returncode == -signal.SIGKILL
    assert _committed_steps(workdir) == [N], "the child outran the kill; it must die between checkpoints"

    restart = _run(cmd, env)
    _ok(restart.returncode, restart.stderr)
    assert f"Resumed from step {N} " in restart.stderr
    _assert_same_bits(_saved(workdir, 2 * N), _saved(straight, 2 * N))


# =============================================================================
# 2. Preemption: SIGTERM and SIGINT
# =============================================================================


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_after_the_step_in_flight_with_a_checkpoint_and_resumes(
        signum, straight, data_dir, env, tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "signalled.log"
    # No periodic checkpoints: the only ones are the signal's and the end's.
    cmd = _train_py(workdir, data_dir, {"checkpoint_every_steps": 1000})
    proc = _start(cmd, env, log)
    # The progress line of step 5 is printed from inside the training loop.
    _wait_until(lambda: "step 5/20" in log.read_text(), proc, log, "training step 5")
    proc.send_signal(signum)
    output = _finish(proc, log)
    _ok(proc.returncode, output)

    match = re.search(r"Stopped at step (\d+) on a signal", output)
    assert match, output[-3000:]
    stopped = int(match.group(1))
    assert 5 <= stopped < 2 * N
    assert _committed_steps(workdir) == [stopped]
    # A consistent state: `stopped` whole steps taken, `stopped` batches consumed.
    leaves, data = _saved(workdir, stopped)
    assert int(leaves["['step']"]) == stopped
    assert data == {"process_0-of-1.json": _position_after(stopped)}

    restart = _run(cmd, env)
    _ok(restart.returncode, restart.stderr)
    assert f"Resumed from step {stopped} " in restart.stderr
    _assert_same_bits(_saved(workdir, 2 * N), _saved(straight, 2 * N))


# =============================================================================
# 3. Crash during a save; damaged checkpoints
# =============================================================================


@pytest.mark.slow
def test_kill_during_a_save_keeps_the_previous_checkpoint_and_resumes_from_it(straight, data_dir, env, tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "killed.log"
    cmd = _train_py(workdir, data_dir)  # asynchronous saves, the default
    in_progress = f"{2 * N}.orbax-checkpoint-tmp"

    def saving_last_step():
        directory = _checkpoint_dir(workdir)
        return directory.is_dir() and any(p.startswith(in_progress) for p in os.listdir(directory))

    proc = _start(cmd, env, log)
    _wait_until(saving_last_step, proc, log, f"the save of step {2 * N} to start")
    proc.send_signal(signal.SIGKILL)
    _finish(proc, log)
    assert proc.returncode == -signal.SIGKILL
    assert saving_last_step() and _committed_steps(workdir) == [N], "not killed mid-save"
    previous = _file_hashes(_checkpoint_dir(workdir) / str(N))

    restart = _run(cmd, env)
    _ok(restart.returncode, restart.stderr)
    assert f"Resumed from step {N} " in restart.stderr
    assert not saving_last_step()  # the half-written folder is cleaned up, never read
    assert _file_hashes(_checkpoint_dir(workdir) / str(N)) == previous
    _assert_same_bits(_saved(workdir, 2 * N), _saved(straight, 2 * N))


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_reported_moved_aside_and_skipped(straight, data_dir, env, tmp_path):
    """A committed step with one flipped bit in its array data: damage that Orbax
    itself restores silently (a half-written step is test_kill_during_a_save_...;
    each kind of damage is in tests/test_checkpointing.py)."""
    workdir = _copy_run(straight, tmp_path)
    step_dir = _checkpoint_dir(workdir) / str(2 * N)
    victim = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))

    proc = _run(_train_py(workdir, data_dir), env)
    _ok(proc.returncode, proc.stderr)
    assert re.search(rf"Checkpoint {re.escape(str(step_dir))} is damaged", proc.stderr), proc.stderr[-3000:]
    assert f"Resumed from step {N} " in proc.stderr
    # Kept as found for inspection, never loaded nor overwritten ...
    aside = _checkpoint_dir(workdir) / f"{2 * N}.corrupt-0"
    assert (aside / victim.relative_to(step_dir)).read_bytes() == bytes(data)
    # ... and the steps after N trained again, to the same state.
    _assert_same_bits(_saved(workdir, 2 * N), _saved(straight, 2 * N))


# =============================================================================
# 4. Non-finite values
# =============================================================================


@pytest.mark.slow
def test_nonfinite_updates_are_skipped_counted_and_stop_the_run(straight, data_dir, env, tmp_path):
    """A learning rate of 1e30 from step 2N+1 on: Adam's update, about lr * m / sqrt(v),
    overflows (its norm is Inf), so every update is skipped; after K in a row the
    run stops with an error, and the checkpoints are as they were."""
    workdir = _copy_run(straight, tmp_path)
    before = _file_hashes(_checkpoint_dir(workdir))
    k = 4
    proc = _run(_train_py(workdir, data_dir, {
        "num_train_steps": 4 * N, "optim.learning_rate": 1e30, "max_consecutive_nonfinite": k,
        "log_every_steps": 1}), env)
    assert proc.returncode != 0
    assert "FloatingPointError" in proc.stderr
    assert (f"Stopping at step {2 * N + k}: the last {k} updates were skipped because the loss, the "
            "gradient or the update was NaN/Inf" in proc.stderr
            and f"max_consecutive_nonfinite={k}" in proc.stderr), proc.stderr[-3000:]
    # The loss and gradient were finite: the message shows them, so the update is to blame.
    match = re.search(r"the last step's loss (\S+), gradient norm (\S+): if both are finite", proc.stderr)
    assert match and all(np.isfinite(float(v)) for v in match.groups()), proc.stderr[-3000:]
    assert f"The last good checkpoint, step {2 * N}, is kept" in proc.stderr

    # Counted in the metrics at every log step.
    scalars = _scalars(pathlib.Path(workdir, trainer.TENSORBOARD_SUBDIR))
    new = range(2 * N + 1, 2 * N + k + 1)
    assert {s: scalars["train/nonfinite_steps"][s] for s in new} == {s: 1.0 for s in new}
    assert {s: scalars["train/nonfinite_count"][s] for s in new} == {s: s - 2 * N for s in new}
    assert {s: scalars["train/consecutive_nonfinite"][s] for s in new} == {s: s - 2 * N for s in new}
    assert max(s for s in scalars["train/loss"]) == 2 * N + k
    # Nothing was saved, deleted or changed.
    assert _file_hashes(_checkpoint_dir(workdir)) == before

    # From the first step, before any checkpoint: the message says there is none.
    fresh = tmp_path / "fresh"
    proc = _run(_train_py(fresh, data_dir, {
        "num_train_steps": 4 * N, "optim.learning_rate": 1e30, "max_consecutive_nonfinite": 2,
        "log_every_steps": 1, "optim.warmup_steps": 0}), env)
    assert proc.returncode != 0
    assert "Stopping at step 2: the last 2 updates were skipped" in proc.stderr, proc.stderr[-3000:]
    assert "No checkpoint had been written yet." in proc.stderr


# The training loop, instrumented: `_value` is the property through which every
# host read of a jax.Array goes (float(), int(), bool(), np.asarray(),
# jax.device_get()); `parallel.shard_batch` is called once at the top of each
# training step. Prints {step: host reads on the main thread during that step}.
_COUNT_HOST_READS = r"""
import collections, json, sys, threading
import jax.numpy as jnp
from diffusion_jax import parallel
from diffusion_jax.training import trainer
sys.path.insert(0, "tests")
import _reliability_helpers

config = _reliability_helpers.get_config()
config.data.data_dir, workdir = sys.argv[1], sys.argv[2]
config.num_train_steps, config.log_every_steps, config.checkpoint_every_steps = 12, 4, 6

array_type = type(jnp.zeros(()))
host_value = array_type._value
reads, step = collections.Counter(), [0]

def counted_host_value(self):
    if threading.current_thread() is threading.main_thread():
        reads[step[0]] += 1
    return host_value.fget(self)

array_type._value = property(counted_host_value)
shard_batch = parallel.shard_batch

def shard_batch_and_count_step(batch, mesh):
    step[0] += 1
    return shard_batch(batch, mesh)

parallel.shard_batch = shard_batch_and_count_step
trainer.train_and_evaluate(config, workdir)
print("READS " + json.dumps(reads))
"""


@pytest.mark.slow
def test_training_loop_reads_nothing_from_the_device_between_log_steps(data_dir, env, tmp_path):
    """The non-finite check costs no host sync per step, by design: the step decides
    on device (``jnp.where``) and counts into the TrainState; the trainer reads the
    counters with the other metrics, at log steps only (and saves copy the state at
    checkpoint steps). Any per-step ``float(loss)`` or ``int(counter)`` fails this."""
    proc = _run([sys.executable, "-c", _COUNT_HOST_READS, data_dir, str(tmp_path / "run")], env)
    _ok(proc.returncode, proc.stderr)
    reads = {int(k): v for k, v in json.loads(proc.stdout.split("READS ")[-1]).items()}
    # Step 1 is left out: its first call traces and compiles the step, which reads
    # the schedule's tables once to embed them as constants.
    quiet = [s for s in range(2, 13) if s % 4 and s % 6]
    assert {s: reads.get(s, 0) for s in quiet} == {s: 0 for s in quiet}
    assert all(reads.get(s, 0) > 0 for s in (4, 8)), reads  # the count sees the log steps' reads


# =============================================================================
# 5. Bad input, early
# =============================================================================


def _png(path, size, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path)


def _images_with_a_bad_one(folder, *, truncated: bool):
    """40 random 12x12 PNGs and bad.png: not an image at all, or a real PNG cut short
    (its header is valid: found only when decoded)."""
    folder.mkdir()
    for i in range(40):
        _png(folder / f"ok_{i:02d}.png", 12, i)
    _png(folder / "bad.png", 12, 99)
    content = (folder / "bad.png").read_bytes()
    (folder / "bad.png").write_bytes(content[:-80] if truncated else b"not an image")
    return folder


# name -> (config overrides, regex the error must match). Each runs against a
# copy of a workdir that already holds checkpoints.
_BAD_INPUT = {
    "image_size_vs_downsamplings": ({"data.image_size": 6, "model.ch_mult": "(1,2,2)"},
                                    r"config\.data\.image_size: 6 is not divisible by 2\*\*2"),
    "batch_vs_devices": ({"batch_size": 15}, r"config\.batch_size: 15 is not divisible by the 2 devices"),
    "zero_timesteps": ({"diffusion.num_timesteps": 0}, r"config\.diffusion\.num_timesteps: must be >= 1"),
    "beta_range": ({"diffusion.schedule_kwargs.beta_end": 1.5}, r"config\.diffusion\.schedule: .*beta"),
    "schedule_name": ({"diffusion.schedule": "cosinus"}, r"config\.diffusion\.schedule: unknown value 'cosinus'"),
    "sampler_name": ({"sample.sampler": "euler"}, r"config\.sample\.sampler: unknown value 'euler'"),
    "loss_name": ({"diffusion.loss": "l1"}, r"config\.diffusion\.loss: unknown value 'l1'"),
    "dataset_name": ({"data.name": "no_such_dataset"}, r"config\.data: Unknown dataset 'no_such_dataset'"),
    "unwritable_workdir": ({}, r"workdir '.*a_file/run' is not writable"),
    "undecodable_image": ({"data.name": "folder"}, r"config\.data: folder dataset: cannot read image file .*bad\.png"),
    # Its header is valid: found only when decoded, mid-training, after compiling.
    "truncated_image": ({"data.name": "folder"}, r"cannot read image file .*bad\.png"),
}


@pytest.fixture(scope="module")
def bad_input_runs(straight, data_dir, env, tmp_path_factory):
    """Runs every case of _BAD_INPUT at once; returns {name: (returncode, output, hashes before, after)}."""
    root = tmp_path_factory.mktemp("bad_input")
    runs = {}
    for name, (overrides, _) in _BAD_INPUT.items():
        case = root / name
        case.mkdir()
        overrides = dict(overrides)
        if name == "unwritable_workdir":
            (case / "a_file").write_text("a file, not a directory")
            workdir, watched = case / "a_file" / "run", case
        elif name == "truncated_image":  # a new run (the digits checkpoints do not fit RGB images)
            workdir = watched = case / "run"
        else:
            workdir = watched = _copy_run(straight, case)
        if name.endswith("_image"):
            images = _images_with_a_bad_one(case / "images", truncated=name == "truncated_image")
            overrides["data.data_dir"] = str(images)
        before = _file_hashes(watched)
        log = root / f"{name}.log"
        proc = _start(_train_py(workdir, data_dir, overrides), dict(env, JAX_LOG_COMPILES="1"), log)
        runs[name] = (proc, log, watched, before)
    results = {}
    for name, (proc, log, watched, before) in runs.items():
        output = _finish(proc, log)
        results[name] = (proc.returncode, output, before, _file_hashes(watched))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(_BAD_INPUT))
def test_bad_input_fails_fast_naming_the_field_and_touches_nothing(name, bad_input_runs):
    returncode, output, before, after = bad_input_runs[name]
    assert returncode != 0, output[-3000:]
    assert re.search(_BAD_INPUT[name][1], output), output[-3000:]
    compiled = set(re.findall(r"Compiling (jit\(\w+\))", output))
    if name == "truncated_image":
        # The control: this one fails only after compiling, and the log shows it.
        assert "jit(init_state)" in compiled, sorted(compiled)
    else:
        # Failed before building the model: no model program was compiled.
        assert not compiled & {"jit(init_state)", "jit(train_step)"}, sorted(compiled)
        # Nothing already saved is lost: the workdir (checkpoints, config, logs) is as it was.
        assert after == before


@pytest.mark.slow
def test_a_crash_mid_run_finishes_the_checkpoint_in_flight(data_dir, env, tmp_path):
    """An image that fails only when decoded stops the run mid-epoch; the step saved just
    before (in the background) is committed before the process exits, not left as a
    ``.orbax-checkpoint-tmp`` folder that the next start would skip."""
    images = _images_with_a_bad_one(tmp_path / "images", truncated=True)
    workdir = tmp_path / "run"
    proc = _run(_train_py(workdir, data_dir, {
        "data.name": "folder", "data.data_dir": str(images), "batch_size": 2, "num_train_steps": 40,
        "log_every_steps": 1, "checkpoint_every_steps": 1, "checkpoint.max_to_keep": 100}), env)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and re.search(r"cannot read image file .*bad\.png", output), output[-3000:]
    done = max(int(n) for n in re.findall(r"step (\d+)/40", output))  # the last step trained
    assert 2 <= done < 40, output[-3000:]  # seed 0 puts the bad image past the first batch
    # Every step trained was saved and committed; nothing is left half-written.
    assert _committed_steps(workdir) == list(range(1, done + 1))
    assert not [p.name for p in _checkpoint_dir(workdir).iterdir() if "tmp" in p.name]


# =============================================================================
# 6. Multi-host
# =============================================================================


def test_mesh_order_gives_each_process_one_block_of_devices():
    """shard_batch puts a process's rows on its own devices: they must be one block of the
    mesh. Stand-ins for devices listed interleaved, as no JAX promise rules out."""
    Device = collections.namedtuple("Device", "id process_index")
    listed = [Device(0, 0), Device(1, 1), Device(2, 0), Device(3, 1), Device(4, 2), Device(5, 0)]
    ordered = parallel.process_contiguous(listed)
    assert [(d.process_index, d.id) for d in ordered] == [(0, 0), (0, 2), (0, 5), (1, 1), (1, 3), (2, 4)]
    devices = jax.devices()  # one process here: already in order, and left as listed
    assert parallel.process_contiguous(devices) == list(devices)
    assert list(parallel.make_mesh().devices) == list(devices)


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_read_their_rows_of_the_one_process_global_batch(data_dir, process_count):
    """Concatenated in process order, the processes' batches are the one-process
    batch, example for example (flips included), across an epoch boundary."""
    config = input_pipeline.DataConfig("digits", data_dir=data_dir, image_size=8, random_flip=True)
    one = input_pipeline.create_train_iterator(config, global_batch_size=48, seed=3)
    parts = [input_pipeline.create_train_iterator(config, global_batch_size=48, seed=3, process_index=p,
                                                  process_count=process_count) for p in range(process_count)]
    for _ in range(35):  # 35 * 48 > 1500 training images
        want, got = next(one), [next(part) for part in parts]
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(workdir, data_dir, env, tmp_path, overrides, tag) -> list[str]:
    """train.py as two processes of one job, joined through JAX_* environment variables."""
    port = _free_port()
    procs, logs = [], []
    for pid in (0, 1):
        log = tmp_path / f"{tag}_process_{pid}.log"
        child_env = dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                         JAX_PROCESS_ID=str(pid))
        procs.append(_start(_train_py(workdir, data_dir, overrides), child_env, log))
        logs.append(log)
    try:
        outputs = [_finish(proc, log) for proc, log in zip(procs, logs)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, output in zip(procs, outputs):
        _ok(proc.returncode, output)
    return outputs


@pytest.mark.slow
def test_two_processes_of_two_devices_train_like_one_process_of_four(data_dir, env, tmp_path):
    """The same 4 devices and global batches, so the same state up to rounding.

    Rounding differs (the cross-process sums go through gloo, in another order),
    and with Adam's default eps=1e-8 that is visible: parameters that the loss
    does not depend on (conv biases followed by a GroupNorm) get gradients that
    are pure rounding noise, which Adam turns into steps of +-lr. With eps=1e-3
    such noise moves nothing and the states agree to float32 rounding (~1e-7).
    """
    m = 4  # a checkpoint every m steps, 2m in all: multi-process steps are slow on CPU
    overrides = {"optim.eps": 1e-3, "checkpoint_every_steps": m, "num_train_steps": 2 * m}
    reference = tmp_path / "one_process"
    proc = _run(_train_py(reference, data_dir, overrides),
                dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    _ok(proc.returncode, proc.stderr)

    job = tmp_path / "two_processes"
    first = _run_two_processes(job, data_dir, env, tmp_path, {**overrides, "num_train_steps": m}, "first")
    assert all("4 devices in 2 processes" in output for output in first)
    resumed = _run_two_processes(job, data_dir, env, tmp_path, overrides, "resumed")
    assert all(f"Resumed from step {m} " in output for output in resumed)  # both restore it

    # One checkpoint per step for the job, holding each process's data position.
    assert sorted(os.listdir(_checkpoint_dir(job))) == [str(m), str(2 * m)]
    for step in (m, 2 * m):
        leaves, data = _saved(job, step)
        assert data == {f"process_{p}-of-2.json": _position_after(step) for p in (0, 1)}
        want, _ = _saved(reference, step)
        assert leaves.keys() == want.keys()
        for name, value in want.items():
            np.testing.assert_allclose(leaves[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


_HOST_VALUES_SCRIPT = """
import jax, numpy as np
from diffusion_jax import parallel
assert parallel.maybe_initialize_distributed("auto")
mesh = parallel.make_mesh()
pid = jax.process_index()
g = parallel.shard_batch({"x": np.arange(4, dtype=np.float32) + 10 * pid}, mesh)["x"]
out = parallel.to_host({"g": g, "host": np.array([7.0])})
key = parallel.replicate(jax.random.key(3), mesh)
print("RESULT", out["g"].tolist(), out["host"].tolist(), jax.random.key_data(key).tolist(), flush=True)
"""


@pytest.mark.slow
def test_to_host_and_replicate_across_two_processes(env, tmp_path):
    """Global arrays come back whole; a host value each process holds comes back once (it was
    concatenated from both); a typed key is replicated (it had no NumPy form)."""
    script = tmp_path / "host_values.py"
    script.write_text(_HOST_VALUES_SCRIPT)
    port = _free_port()
    procs, logs = [], []
    for pid in (0, 1):
        logs.append(tmp_path / f"host_values_{pid}.log")
        procs.append(_start([sys.executable, str(script)], dict(
            env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid)),
            logs[-1]))
    outputs = [_finish(proc, log) for proc, log in zip(procs, logs)]
    want = [[0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0], [7.0], np.asarray(jax.random.key_data(jax.random.key(3))).tolist()]
    for proc, output in zip(procs, outputs):
        _ok(proc.returncode, output)
        line = next(line for line in output.splitlines() if line.startswith("RESULT"))
        assert line == "RESULT " + " ".join(str(w) for w in want), line


# =============================================================================
# 7. Determinism
# =============================================================================


@pytest.mark.slow
def test_same_config_and_seed_give_bitwise_the_same_params_and_samples(straight, data_dir, env, tmp_path):
    again = tmp_path / "again"
    proc = _run(_train_py(again, data_dir), env)
    _ok(proc.returncode, proc.stderr)
    _assert_same_bits(_saved(again, 2 * N), _saved(straight, 2 * N))

    first = _copy_run(straight, tmp_path, "first")
    flags = ("--mode=sample", "--num_images=4")
    procs = [_start(_train_py(w, data_dir, flags=flags), env, tmp_path / f"sample_{w.name}.log") for w in (first, again)]
    images = []
    for w, proc in zip((first, again), procs):
        _ok(proc.wait(timeout=TIMEOUT_S), (tmp_path / f"sample_{w.name}.log").read_text())
        images.append(np.load(w / trainer.SAMPLES_SUBDIR / f"sample_step{2 * N}_ddim5.npz")["images"])
    assert images[0].shape == (4, 8, 8, 1) and np.all(np.isfinite(images[0]))
    assert images[0].tobytes() == images[1].tobytes()


# =============================================================================
# 8. Safe loading
# =============================================================================


@pytest.mark.slow
def test_restore_evaluate_and_sample_with_pickle_disabled(straight, data_dir, tmp_path, monkeypatch):
    """Restoring a checkpoint (state, data position, config) and evaluating or
    sampling from it never unpickles: every way into pickle raises here."""
    workdir = _copy_run(straight, tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used")

    for module in (pickle, _pickle):
        for name in ("load", "loads", "Unpickler"):
            monkeypatch.setattr(module, name, refuse)
    config = _reliability_helpers.get_config()
    config.data.data_dir = data_dir
    config.eval.batch_size = 304  # all 297 test images in one batch (8 devices here)

    images = trainer.sample(config, str(workdir), num_images=3)
    assert images.shape == (3, 8, 8, 1) and np.all(np.isfinite(images))
    result = trainer.evaluate(config, str(workdir))
    # A bound in bits/dim: positive and finite (20 steps of training make no good model).
    assert result["step"] == 2 * N and result["num_examples"] == 297 and 0 < result["nll_bpd"] < np.inf


@pytest.mark.slow
def test_configs_and_data_positions_beside_checkpoints_are_plain_json(straight, data_dir):
    config = _reliability_helpers.get_config()
    config.data.data_dir = data_dir
    expected = json.loads(json.dumps(config.to_dict()))  # tuples become lists
    assert json.loads(pathlib.Path(straight, "config.json").read_text()) == expected
    for step in (N, 2 * N):
        step_dir = _checkpoint_dir(straight) / str(step)
        assert json.loads((step_dir / "config" / "metadata").read_text()) == expected
        assert json.loads((step_dir / "data" / "process_0-of-1.json").read_text()) == _position_after(step)


# =============================================================================
# The CPU split into data-parallel devices (train.py --cpu_devices)
# =============================================================================


def _devices_in_log(stderr: str) -> int:
    found = re.findall(r"(\d+) devices in (\d+) processes", stderr)
    assert found, f"no device count in train.py's log:\n{stderr[-3000:]}"
    return int(found[-1][0])


@pytest.mark.parametrize("xla_flags,flag,extra_env,want", [
    ("", "--cpu_devices=4", {}, 4),                                       # asked for
    ("", None, {}, "auto"),                                               # one per core, dividing the batch of 16
    ("", None, {"JAX_NUM_PROCESSES": "2"}, 1),                            # a multi-process launcher: no split
    ("", None, {"SLURM_NTASKS": "1"}, "auto"),                            # one task: a single-process job
    ("--xla_force_host_platform_device_count=1", "--cpu_devices=4", {}, 1),  # XLA_FLAGS wins, with a warning
])
def test_train_py_splits_the_cpu_into_devices(data_dir, env, tmp_path, xla_flags, flag, extra_env, want):
    if want == "auto":
        cores = len(os.sched_getaffinity(0))
        if cores < 2:
            pytest.skip("one core: the default split is no split")
        want = max(d for d in range(1, cores + 1) if 16 % d == 0)
    overrides = {"num_train_steps": 2}
    if "JAX_NUM_PROCESSES" in extra_env:  # the launcher's variable alone, without a job to join
        overrides["distributed"] = "false"
    proc = _run(_train_py(tmp_path / "run", data_dir, overrides, flags=[flag] if flag else []),
                dict(env, XLA_FLAGS=xla_flags, **extra_env))
    _ok(proc.returncode, proc.stderr)
    assert _devices_in_log(proc.stderr) == want
    assert ("--cpu_devices=4 is ignored" in proc.stderr) == bool(xla_flags)


def test_train_py_rejects_a_bad_cpu_device_count(data_dir, env, tmp_path):
    proc = _run(_train_py(tmp_path / "run", data_dir, flags=["--cpu_devices=0"]), dict(env, XLA_FLAGS=""))
    assert proc.returncode != 0 and "cpu_devices" in proc.stderr
    assert not (tmp_path / "run").exists()  # rejected before any work


@pytest.mark.parametrize("batch,cores,processes,want", [
    (64, 2, 1, 2), (99, 2, 1, 1), (1, 8, 1, 1), (12, 8, 1, 6), (64, 8, 2, 8), (10, 8, 3, 1), (30, 8, 3, 5),
])
def test_cpu_devices_for_by_hand(batch, cores, processes, want):
    # The most devices d <= cores with batch divisible by d * processes (1 if none).
    assert parallel.cpu_devices_for(batch, cores, processes) == want


def test_cpu_device_requests_name_what_is_wrong(monkeypatch):
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="batch_size"):
            parallel.cpu_devices_for(bad, 2)
        with pytest.raises(ValueError, match="count"):
            parallel.request_cpu_devices(bad)
    # The user's XLA_FLAGS setting is kept as it is.
    other = "--xla_cpu_enable_fast_math=false"  # a real flag: XLA aborts on unknown ones
    monkeypatch.setenv("XLA_FLAGS", f"{other} --xla_force_host_platform_device_count=3")
    assert parallel.request_cpu_devices(2) is False
    assert os.environ["XLA_FLAGS"] == f"{other} --xla_force_host_platform_device_count=3"
    # This test process's backend has started: a late request would be ignored, so it raises.
    jax.devices()
    monkeypatch.setenv("XLA_FLAGS", other)
    with pytest.raises(RuntimeError, match="already started"):
        parallel.request_cpu_devices(2)
    assert os.environ["XLA_FLAGS"] == other


def test_xla_flags_naming_a_file_are_read_and_kept(tmp_path, monkeypatch):
    """XLA reads a value not starting with "-" as a flag file; appending to it broke the name."""
    from diffusion_jax import xla_cpu

    flagfile = tmp_path / "xla.flags"
    flagfile.write_text("--xla_cpu_enable_fast_math=false\n--xla_force_host_platform_device_count=3\n")
    monkeypatch.setenv("XLA_FLAGS", str(flagfile))
    assert parallel.request_cpu_devices(2) is False  # the file already says how many
    assert os.environ["XLA_FLAGS"] == str(flagfile)
    assert xla_cpu.convolutions_on_ynnpack() is True  # the file sets no convolution library
    flagfile.write_text("--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce\n")
    assert xla_cpu.convolutions_on_ynnpack() is False  # read from the file
    flagfile.write_text("--xla_cpu_enable_fast_math=false\n")
    xla_cpu.add_xla_flag("--xla_force_host_platform_device_count=2")  # the file's flags come inline
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=2"
    monkeypatch.setenv("XLA_FLAGS", str(tmp_path / "missing.flags"))
    with pytest.raises(ValueError, match=r"XLA_FLAGS names a file XLA cannot read"):
        xla_cpu.add_xla_flag("--xla_force_host_platform_device_count=2")


def test_a_jax_cpu_device_count_setting_wins():
    """JAX's jax_num_cpu_devices (JAX_NUM_CPU_DEVICES) takes precedence over the XLA flag: the
    request says it did nothing (train.py then warns that --cpu_devices is ignored)."""
    code = ("from diffusion_jax import parallel; print(parallel.request_cpu_devices(2)); "
            "import jax; print(jax.device_count())")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "JAX_NUM_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu"},
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.stdout.split() == ["False", "1"], out.stderr[-2000:]


# =============================================================================
# XLA:CPU's convolution library (train.py --cpu_convolutions)
# =============================================================================

_USER_YNNPACK = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution,reduce"


@pytest.mark.parametrize("xla_flags,overrides,flag,want", [
    ("", {}, None, "YNNPACK"),                                              # auto, ch 32
    ("", {"model.ch": 128}, None, "auto"),                                  # auto, ch 128
    ("", {"model.ch": 128}, "--cpu_convolutions=ynnpack", "YNNPACK"),       # forced
    ("", {}, "--cpu_convolutions=eigen", "Eigen"),                          # forced
    (_USER_YNNPACK, {}, "--cpu_convolutions=eigen", "YNNPACK"),             # XLA_FLAGS win, with a warning
])
def test_train_py_chooses_the_cpu_convolutions(data_dir, env, tmp_path, xla_flags, overrides, flag, want):
    if want == "auto":  # Eigen where xla_cpu checked the flag's default set
        want = "Eigen" if xla_cpu._jaxlib_version() in xla_cpu.CHECKED_JAXLIB else "YNNPACK"
    proc = _run(_train_py(tmp_path / "run", data_dir, {"num_train_steps": 2, **overrides},
                          flags=[flag] if flag else []), dict(env, XLA_FLAGS=xla_flags))
    _ok(proc.returncode, proc.stderr)
    found = re.findall(r"XLA:CPU convolutions: (\w+)", proc.stderr)
    assert found == [want], proc.stderr[-3000:]
    assert ("--cpu_convolutions=eigen is ignored" in proc.stderr) == bool(xla_flags)


def test_train_py_rejects_an_unknown_convolution_library(data_dir, env, tmp_path):
    proc = _run(_train_py(tmp_path / "run", data_dir, flags=["--cpu_convolutions=onednn"]), dict(env, XLA_FLAGS=""))
    assert proc.returncode != 0 and "cpu_convolutions" in proc.stderr
    assert not (tmp_path / "run").exists()  # rejected before any work

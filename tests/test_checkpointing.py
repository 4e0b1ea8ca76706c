"""Tests for diffusion_jax.checkpointing: round trips, policies, crashes, damage."""

import ast
import json
import logging
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import textwrap

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax import checkpointing
from diffusion_jax.checkpointing import CheckpointNotFoundError, Checkpointer

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@flax.struct.dataclass
class _TrainState:
    step: jax.Array
    params: dict
    ema_params: dict
    opt_state: optax.OptState
    rng: jax.Array
    key: jax.Array


def _make_state(seed: int) -> _TrainState:
    """A TrainState-like pytree with adam's namedtuple state and mixed dtypes."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params = {
        "conv": {
            # Large enough (18 KiB) to be stored as its own zarr chunk rather
            # than inline in an OCDBT node.
            "kernel": jax.random.normal(k1, (3, 3, 16, 32), jnp.float32),
            "bias": jnp.arange(4, dtype=jnp.bfloat16) * seed,
        },
        "embed": jax.random.normal(k2, (5, 3), jnp.float16),
    }
    opt = optax.adam(1e-3)
    opt_state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = opt.update(grads, opt_state, params)  # non-trivial mu, nu, count
    return _TrainState(
        step=jnp.int32(seed),
        params=params,
        ema_params=jax.tree.map(lambda p: p * 0.5, params),
        opt_state=opt_state,
        rng=jax.random.key_data(k3),  # uint32 [2]
        key=jax.random.fold_in(k3, 1),  # a typed key array (key<fry>)
    )


def _assert_bitwise_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        if jax.dtypes.issubdtype(getattr(e, "dtype", None), jax.dtypes.prng_key):
            assert a.dtype == e.dtype
            a, e = jax.random.key_data(a), jax.random.key_data(e)
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype and a.shape == e.shape
        assert a.tobytes() == e.tobytes()


def _batches(n_skip=0):
    ds = grain.MapDataset.range(100).shuffle(seed=0).batch(4).to_iter_dataset()
    it = iter(ds)
    for _ in range(n_skip):
        next(it)
    return it


def _largest_file(folder: pathlib.Path) -> pathlib.Path:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def test_round_trip_is_bitwise_with_namedtuples_and_dtypes(tmp_path):
    state = _make_state(seed=3)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(7, state)
        ckpt.wait_until_finished()
        restored = ckpt.restore(jax.eval_shape(lambda: state))
    _assert_bitwise_equal(restored, state)
    assert isinstance(restored, _TrainState)
    assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)
    assert restored.params["conv"]["bias"].dtype == jnp.bfloat16
    # A concrete template (other values) works too, and a new instance sees it.
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 7
        _assert_bitwise_equal(ckpt.restore(_make_state(seed=1)), state)


def test_restore_uses_the_template_shardings(tmp_path):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {
        "w": jax.device_put(jnp.arange(64.0).reshape(8, 8), spec),
        "b": jax.device_put(jnp.ones(3), replicated),
    }
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
        # Orbax copies to host before save() returns, so donating (deleting) the
        # device buffers right away must not change what is written.
        expected = jax.tree.map(np.asarray, state)
        jax.tree.map(lambda x: x.delete(), state)
        ckpt.wait_until_finished()
        # Restore the 'w' leaf with a different sharding than it was saved with.
        other = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("b", None))
        template = {
            "w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=other),
            "b": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=replicated),
        }
        restored = ckpt.restore(template)
    assert restored["w"].sharding == other
    assert restored["b"].sharding == replicated
    _assert_bitwise_equal(jax.tree.map(np.asarray, restored), expected)


def test_save_interval_keep_n_and_latest_step(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=3) as ckpt:
        saved = [s for s in range(1, 11) if ckpt.save(s, {"x": jnp.float32(s)})]
        assert saved == [3, 6, 9]
        assert ckpt.save(10, {"x": jnp.float32(10)}, force=True)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [9, 10]
        assert ckpt.latest_step() == 10
    assert sorted(os.listdir(tmp_path)) == ["10", "9"]
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        assert ckpt.latest_step() == 10
        template = {"x": jax.ShapeDtypeStruct((), jnp.float32)}
        assert float(ckpt.restore(template)["x"]) == 10.0
        assert float(ckpt.restore(template, step=9)["x"]) == 9.0


def test_saving_never_reports_to_the_preemption_service(tmp_path, monkeypatch):
    """JAX's preemption service stops every process at (the highest number reported) + 1,
    exactly, so one caller must feed it one sequence: the trainer, with its count of
    calls. Orbax's manager would report each saved step there as well."""
    from jax.experimental import multihost_utils

    reported = []

    def record(step):
        reported.append(step)
        return False

    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", record)
    with Checkpointer(tmp_path, save_interval_steps=2) as ckpt:
        saved = [s for s in range(1, 6) if ckpt.save(s, {"x": jnp.float32(s)})]
        assert ckpt.save(7, {"x": jnp.float32(7)}, force=True)
        ckpt.wait_until_finished()
    assert saved == [2, 4]
    assert reported == []


def test_existing_or_older_steps_are_never_overwritten(tmp_path, caplog):
    with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        ckpt.save(4, {"x": jnp.float32(4)})
        ckpt.wait_until_finished()
        with caplog.at_level(logging.WARNING):
            assert not ckpt.save(4, {"x": jnp.float32(-1)}, force=True)
            assert not ckpt.save(2, {"x": jnp.float32(-1)}, force=True)
        assert "never overwritten" in caplog.text  # the older step: a warning
        template = {"x": jax.ShapeDtypeStruct((), jnp.float32)}
        assert float(ckpt.restore(template)["x"]) == 4.0
        assert ckpt.all_steps() == [4]


def test_sync_save_is_committed_on_return(tmp_path):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, {"x": jnp.ones(3)})
        assert (tmp_path / "1" / checkpointing.CHECKSUMS_FILENAME).exists()


def test_data_iterator_position_round_trip(tmp_path):
    reference = list(_batches())  # the whole epoch, independently
    it = _batches()
    for _ in range(5):
        next(it)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, {"x": jnp.zeros(())}, data_iterator=it)
        # The position was taken in save(); moving on before the write ends is fine.
        for _ in range(3):
            next(it)
        ckpt.wait_until_finished()
        fresh = _batches()
        ckpt.restore({"x": jnp.zeros(())}, data_iterator=fresh)
    for expected in reference[5:9]:
        np.testing.assert_array_equal(next(fresh), expected)


def test_data_iterator_requested_but_not_saved_raises(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"x": jnp.zeros(())})
        with pytest.raises(ValueError, match="no data iterator state"):
            ckpt.restore({"x": jnp.zeros(())}, data_iterator=_batches())


def test_config_json_round_trip(tmp_path):
    config = {"lr": 2e-4, "model": {"ch_mult": (1, 2, 2), "dropout": 0.1}, "name": "cifar10", "ema": None}
    checkpointing.save_config(tmp_path, config)
    loaded = checkpointing.load_config(tmp_path)
    assert loaded == {"lr": 2e-4, "model": {"ch_mult": [1, 2, 2], "dropout": 0.1}, "name": "cifar10", "ema": None}
    assert json.loads((tmp_path / "config.json").read_text()) == loaded
    # Each step also stores the run config as plain JSON.
    with Checkpointer(tmp_path / "ckpt", config=config) as ckpt:
        ckpt.save(1, {"x": jnp.zeros(())})
    assert json.loads((tmp_path / "ckpt" / "1" / "config" / "metadata").read_text()) == loaded
    with Checkpointer(tmp_path / "ckpt", read_only=True) as ckpt:
        assert ckpt.saved_config(1) == loaded
        (tmp_path / "ckpt" / "1" / "config" / "metadata").write_text('{"lr": 2e-4, "mod')  # cut short
        with pytest.raises(ValueError, match=r"config saved with checkpoint step 1, .*1/config/metadata, is not "
                                             r"JSON"):
            ckpt.saved_config(1)
    with pytest.raises(TypeError, match="JSON"):
        checkpointing.save_config(tmp_path, {"bad": object()})
    with pytest.raises(FileNotFoundError):
        checkpointing.load_config(tmp_path / "nowhere")


def _write_two_steps(directory, *, data_iterator=None):
    """Steps 1 and 2; the iterator (if any) is one batch further at each."""
    with Checkpointer(directory, max_to_keep=None) as ckpt:
        for step in (1, 2):
            if data_iterator is not None:
                next(data_iterator)
            ckpt.save(step, _make_state(seed=step), data_iterator=data_iterator)
    return jax.eval_shape(lambda: _make_state(seed=0))


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


_DAMAGE = {
    "delete_largest_state_file": lambda step: _largest_file(step / "state").unlink(),
    "truncate_largest_state_file": lambda step: os.truncate(
        _largest_file(step / "state"), _largest_file(step / "state").stat().st_size // 2
    ),
    # Orbax alone restores a flipped byte in a zstd chunk silently, wrongly.
    "flip_byte_in_largest_state_file": lambda step: _flip_a_byte(_largest_file(step / "state")),
    "delete_state_metadata": lambda step: (step / "state" / "_METADATA").unlink(),
    "empty_data_iterator_json": lambda step: (step / "data" / "process_0-of-1.json").write_text(""),
    "delete_checksums": lambda step: (step / checkpointing.CHECKSUMS_FILENAME).unlink(),
}


@pytest.mark.parametrize("damage", sorted(_DAMAGE))
def test_damaged_newest_step_is_reported_moved_aside_and_skipped(tmp_path, caplog, damage):
    template = _write_two_steps(tmp_path, data_iterator=_batches(2))  # at batch 3, then 4
    _DAMAGE[damage](tmp_path / "2")
    with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        fresh = _batches()
        with caplog.at_level(logging.WARNING, logger="diffusion_jax.checkpointing"):
            restored = ckpt.restore(template, data_iterator=fresh)
        _assert_bitwise_equal(restored, _make_state(seed=1))
        np.testing.assert_array_equal(next(fresh), list(_batches())[3])  # step 1's position
        warning = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()][0]
        assert str(tmp_path / "2") in warning
        assert sorted(os.listdir(tmp_path)) == ["1", "2.corrupt-0"]
        assert ckpt.latest_step() == 1
        # Saving step 2 again writes a fresh folder; the damaged one is kept.
        assert ckpt.save(2, _make_state(seed=22), force=True)
        ckpt.wait_until_finished()
        _assert_bitwise_equal(ckpt.restore(template), _make_state(seed=22))
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "2.corrupt-0"]


def test_a_file_missing_for_a_moment_is_not_taken_for_damage(tmp_path, monkeypatch):
    """A network file system's stale listing: the newest step's largest file is gone at the
    first look and back at the second (the pause between them puts it back)."""
    template = _write_two_steps(tmp_path)
    victim = _largest_file(tmp_path / "2" / "state")
    hidden = tmp_path / "hidden"
    victim.rename(hidden)
    pauses = []
    monkeypatch.setattr(checkpointing.time, "sleep", lambda s: (pauses.append(s), hidden.rename(victim)))
    with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        _assert_bitwise_equal(ckpt.restore(template), _make_state(seed=2))
    assert pauses == [checkpointing._RECHECK_AFTER_S]
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_second_damage_of_same_step_gets_next_corrupt_index(tmp_path):
    template = _write_two_steps(tmp_path)
    for expected_index in (0, 1):
        _largest_file(tmp_path / "2" / "state").unlink()
        with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
            _assert_bitwise_equal(ckpt.restore(template), _make_state(seed=1))
            ckpt.save(2, _make_state(seed=2), force=True)
        assert (tmp_path / f"2.corrupt-{expected_index}").is_dir()


def test_read_only_skips_damage_without_moving_it(tmp_path, caplog):
    template = _write_two_steps(tmp_path)
    _flip_a_byte(_largest_file(tmp_path / "2" / "state"))
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        with caplog.at_level(logging.WARNING):
            _assert_bitwise_equal(ckpt.restore(template), _make_state(seed=1))
    assert "sha256" in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_no_intact_checkpoint_raises_clear_errors(tmp_path):
    template = {"x": jax.ShapeDtypeStruct((), jnp.float32)}
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointNotFoundError, match="No checkpoint in"):
            ckpt.restore(template)
        ckpt.save(1, {"x": jnp.float32(1)})
        ckpt.save(2, {"x": jnp.float32(2)})
        ckpt.wait_until_finished()
        with pytest.raises(CheckpointNotFoundError, match="step 5"):
            ckpt.restore(template, step=5)
    for step in ("1", "2"):
        (tmp_path / step / "state" / "_METADATA").unlink()
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        # An explicit step never falls back to another one.
        with pytest.raises(CheckpointNotFoundError, match="No intact checkpoint"):
            ckpt.restore(template, step=2)
        with pytest.raises(CheckpointNotFoundError, match=r"1: file state/_METADATA is missing"):
            ckpt.restore(template)


@pytest.mark.parametrize(
    "template, message",
    [
        ({"x": jax.ShapeDtypeStruct((3,), jnp.float32)}, r"x: shape \(2,\) saved, \(3,\) wanted"),
        ({"x": jax.ShapeDtypeStruct((2,), jnp.bfloat16)}, "x: dtype float32 saved, bfloat16 wanted"),
        ({"x": jax.ShapeDtypeStruct((2,), jnp.float32), "y": jnp.zeros(())}, "y: not in the checkpoint"),
        ({"z": jax.ShapeDtypeStruct((2,), jnp.float32)}, "x: not in the template"),
    ],
)
def test_template_mismatch_raises_and_is_not_taken_for_damage(tmp_path, template, message):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"x": jnp.array([1.0, 2.0])})
        with pytest.raises(ValueError, match=message):
            ckpt.restore(template)
        restored = ckpt.restore({"x": jax.ShapeDtypeStruct((2,), jnp.float32)})
    np.testing.assert_array_equal(restored["x"], [1.0, 2.0])
    assert os.listdir(tmp_path) == ["1"]


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(tmp_path, max_to_keep=0)
    with pytest.raises(ValueError, match="save_interval_steps"):
        Checkpointer(tmp_path, save_interval_steps=0)
    with pytest.raises(TypeError, match="config"):
        Checkpointer(tmp_path, config=[1, 2])
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match=">= 0"):
            ckpt.save(-1, {"x": jnp.zeros(())})
        with pytest.raises(TypeError, match="step must be an int"):
            ckpt.save(1.5, {"x": jnp.zeros(())})
        with pytest.raises(TypeError, match="get_state"):
            ckpt.save(1, {"x": jnp.zeros(())}, data_iterator=[1, 2])
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        with pytest.raises(ValueError, match="read-only"):
            ckpt.save(1, {"x": jnp.zeros(())})


def test_module_and_restore_never_use_pickle(tmp_path, monkeypatch):
    source = pathlib.Path(checkpointing.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert not imported & {"pickle", "cloudpickle", "dill", "joblib", "shelve"}
    state = _make_state(seed=4)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, data_iterator=_batches(1))
    for path in tmp_path.rglob("*"):
        if path.is_file():  # pickle protocols 2-5 start with b"\x80" + version
            assert path.read_bytes()[:2] not in {b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"}

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while restoring")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        _assert_bitwise_equal(ckpt.restore(jax.eval_shape(lambda: state), data_iterator=_batches()), state)


_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import jax, jax.numpy as jnp
    from diffusion_jax.checkpointing import Checkpointer
    ckpt = Checkpointer(sys.argv[1])
    ckpt.save(1, {"w": jnp.full((4,), 1.0), "big": jnp.zeros((1 << 24,))})
    ckpt.wait_until_finished()
    big = jax.random.normal(jax.random.key(0), (1 << 24,))  # 64 MiB, incompressible
    ckpt.save(2, {"w": jnp.full((4,), 2.0), "big": big})
    os.kill(os.getpid(), signal.SIGKILL)  # while the background write runs
""")


def test_process_killed_mid_save_leaves_previous_step_restorable(tmp_path):
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], env=env, capture_output=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    # The kill hit the write: only Orbax's tmp folder exists for step 2.
    assert sorted(os.listdir(tmp_path)) == ["1", "2.orbax-checkpoint-tmp"]
    template = {"w": jax.ShapeDtypeStruct((4,), jnp.float32), "big": jax.ShapeDtypeStruct((1 << 24,), jnp.float32)}
    with Checkpointer(tmp_path, read_only=True) as ckpt:  # an evaluator: ignores it
        assert ckpt.all_steps() == [1]
        np.testing.assert_array_equal(ckpt.restore(template)["w"], np.ones(4))
    assert (tmp_path / "2.orbax-checkpoint-tmp").is_dir()
    with Checkpointer(tmp_path) as ckpt:  # the resumed trainer
        assert ckpt.latest_step() == 1
        restored = ckpt.restore(template)
        np.testing.assert_array_equal(restored["w"], np.ones(4))
        assert ckpt.save(2, {"w": jnp.full((4,), 3.0), "big": restored["big"]}, force=True)
        ckpt.wait_until_finished()
        np.testing.assert_array_equal(ckpt.restore(template)["w"], np.full(4, 3.0))
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


_PROCESS = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax
    try:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # newer jax: gloo is the default
      pass
    pid, directory, port = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    import grain, numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from diffusion_jax.checkpointing import Checkpointer

    mesh = Mesh(np.array(jax.devices()), ("d",))
    full = np.arange(24, dtype=np.float32).reshape(8, 3)
    def state_at(step):
      sharded = NamedSharding(mesh, P("d"))
      x = jax.make_array_from_callback((8, 3), sharded, lambda i: full[i] * step)
      return {"x": x}
    template = {"x": jax.ShapeDtypeStruct((8, 3), np.float32, sharding=NamedSharding(mesh, P("d")))}
    def batches():  # each process reads its own shuffle
      return iter(grain.MapDataset.range(100).shuffle(seed=pid).batch(2).to_iter_dataset())
    it = batches()
    out = {}
    with Checkpointer(directory, max_to_keep=None) as ckpt:
      for step in (1, 2):
        next(it); next(it)
        ckpt.save(step, state_at(step), data_iterator=it)
      ckpt.wait_until_finished()
      fresh = batches()
      restored = ckpt.restore(template, data_iterator=fresh)
      out["shards"] = {str(s.index): np.asarray(s.data).tolist() for s in restored["x"].addressable_shards}
      out["next_batch"] = next(fresh).tolist()
    multihost_utils.sync_global_devices("saved")
    if pid == 0:  # damage step 2 as seen by everyone (shared folder)
      os.remove(os.path.join(directory, "2", "data", "process_1-of-2.json"))
    multihost_utils.sync_global_devices("damaged")
    with Checkpointer(directory, max_to_keep=None) as ckpt:
      restored = ckpt.restore(template, data_iterator=batches())
      out["after_damage"] = {str(s.index): np.asarray(s.data).tolist() for s in restored["x"].addressable_shards}
      out["latest"] = ckpt.latest_step()
    print("RESULT" + json.dumps(out), flush=True)
""")


@pytest.mark.slow
def test_two_processes_share_one_checkpoint_directory(tmp_path):
    import socket  # pylint: disable=g-import-not-at-top

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PROCESS, str(pid), str(tmp_path), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for pid in (0, 1)
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr.decode()[-3000:]
        line = [l for l in stdout.decode().splitlines() if l.startswith("RESULT")][0]
        results.append(json.loads(line[len("RESULT") :]))
    full = np.arange(24, dtype=np.float32).reshape(8, 3)
    for pid, result in enumerate(results):
        # Both processes wrote their own iterator position (2 steps x 2 batches).
        expected_batches = list(grain.MapDataset.range(100).shuffle(seed=pid).batch(2))
        assert result["next_batch"] == expected_batches[4].tolist()
        rows = np.concatenate([np.asarray(v) for _, v in sorted(result["shards"].items())])
        np.testing.assert_array_equal(rows, full[4 * pid : 4 * pid + 4] * 2)
        # Step 2 lost process 1's file: both processes agree to fall back to step 1.
        rows = np.concatenate([np.asarray(v) for _, v in sorted(result["after_damage"].items())])
        np.testing.assert_array_equal(rows, full[4 * pid : 4 * pid + 4] * 1)
        assert result["latest"] == 1
    assert sorted(os.listdir(tmp_path)) == ["1", "2.corrupt-0"]
    assert sorted(os.listdir(tmp_path / "1" / "data")) == [
        "commit_success.txt",
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]

    # Resumed by one process: the data positions were saved per process by two.
    template = {"x": jax.ShapeDtypeStruct((8, 3), np.float32)}
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        # A per-process position (grain's own iterator) cannot be carried over ...
        with pytest.raises(ValueError, match=r"another number of processes.*process_0-of-2.*process_0-of-1"):
            ckpt.restore(template, data_iterator=_batches())
        # ... a global one (the same on every process, e.g. the train iterator's) can.
        position = _GlobalPosition()
        restored = ckpt.restore(template, data_iterator=position)
    np.testing.assert_array_equal(np.asarray(restored["x"]), full)
    assert position.state == json.loads((tmp_path / "1" / "data" / "process_0-of-2.json").read_text())


class _GlobalPosition:
    """A data iterator whose position is the same on every process; records what it is set to."""

    state_is_global = True

    def __init__(self):
        self.state = None

    def get_state(self):
        return self.state

    def set_state(self, state):
        self.state = state


@flax.struct.dataclass
class _StateWithLaterFields(_TrainState):
    """_TrainState with two fields added after its checkpoints were written."""
    unused: object = None
    average: object = None


def test_fields_added_after_a_checkpoint_was_written_restore_as_none(tmp_path, caplog):
    saved = _make_state(3)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, saved, force=True)
    newer = _StateWithLaterFields(**{f: getattr(saved, f) for f in ("step", "params", "ema_params", "opt_state",
                                                                      "rng", "key")})
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        # A None field of the template is restored as None; so is a field named optional.
        restored = ckpt.restore(newer.replace(average=newer.params), optional_fields=("average",))
        assert isinstance(restored, _StateWithLaterFields)
        assert restored.unused is None and restored.average is None
        _assert_bitwise_equal(restored.params, saved.params)
        _assert_bitwise_equal(restored.opt_state, saved.opt_state)
        assert "has no unused, average (written before they existed)" in caplog.text
        # A field the template expects (not None, not optional) is still a mismatch, named.
        with pytest.raises(ValueError, match=r"average\.conv\.kernel: not in the checkpoint"):
            ckpt.restore(newer.replace(average=newer.params))

"""Tests for diffusion_jax.input_pipeline and the digits TFDS builder.

Expected values come from outside the pipeline: scikit-learn's own digits
array, TFDS's own data source under `tfds.testing.mock_data`, jax.image.resize
as a second resizer, and images with known pixels written here.
"""

import collections
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import time

import grain
import jax
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from sklearn import datasets as sk_datasets

from diffusion_jax import input_pipeline as ip
from diffusion_jax.datasets import digits as digits_lib

NUM_DIGITS = 1797
NUM_DIGITS_TRAIN = 1500


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """A TFDS data_dir into which the pipeline prepares digits on first use."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def sklearn_digits():
    """(uint8 images [1797, 8, 8] by the documented scaling, labels), from sklearn."""
    digits = sk_datasets.load_digits()
    images = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)
    return images, digits.target


def _digits(digits_dir, **kw):
    return ip.DataConfig("digits", data_dir=digits_dir, **kw)


def _keys(batch):
    """(uint8 image bytes, label) per example of an image_size=8 digits batch.

    At image_size 8 nothing is resized, so x = u / 127.5 - 1 inverts exactly to u.
    """
    pixels = np.round((batch["image"] + 1.0) * 127.5).astype(np.uint8)
    return [(p[:, :, 0].tobytes(), int(l)) for p, l in zip(pixels, batch["label"])]


def _counter(images, labels):
    return collections.Counter((im.tobytes(), int(l)) for im, l in zip(images, labels))


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _flat_keys(batches):
    return [k for b in batches for k in _keys(b)]


# ---------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------


def test_digits_prepares_offline_with_documented_split(digits_dir, sklearn_digits):
    info = ip.dataset_info(_digits(digits_dir, image_size=16))
    assert info == ip.DatasetInfo(
        image_shape=(16, 16, 1), num_classes=10, num_train=1500, num_eval=297
    )
    assert info.num_train + info.num_eval == len(sklearn_digits[0]) == NUM_DIGITS
    prepared = os.listdir(os.path.join(digits_dir, "digits", "1.0.0"))
    assert any(".array_record" in f for f in prepared), prepared
    # The records are exactly sklearn's, split at 1500 (read back with TFDS's own
    # reader, by name, from the prepared files).
    images, labels = sklearn_digits
    test = tfds.data_source("digits", split="test", data_dir=digits_dir, download=False)
    got = collections.Counter(
        (test[i]["image"][:, :, 0].tobytes(), int(test[i]["label"])) for i in range(len(test))
    )
    assert got == _counter(images[NUM_DIGITS_TRAIN:], labels[NUM_DIGITS_TRAIN:])
    assert all(NUM_DIGITS_TRAIN <= test[i]["index"] < NUM_DIGITS for i in range(0, 297, 37))


@pytest.mark.parametrize("image_size", [8, 16, 32])
def test_digits_images_match_sklearn_after_scaling_and_resize(
    digits_dir, sklearn_digits, image_size
):
    images, labels = sklearn_digits
    # The eval pass is ordered, so its k-th example is record k of TFDS's source,
    # whose "index" names the row of sklearn's array.
    source = tfds.data_source("digits", split="test", data_dir=digits_dir, download=False)
    batch = next(ip.create_eval_iterator(_digits(digits_dir, image_size=image_size), batch_size=4))
    assert batch["image"].shape == (4, image_size, image_size, 1)
    assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
    for k in range(4):
        row = int(source[k]["index"])
        assert batch["label"][k] == labels[row]
        expected = jax.image.resize(
            images[row].astype(np.float32), (image_size, image_size), "linear", antialias=True
        )
        expected = np.asarray(expected) / 127.5 - 1.0
        if image_size == 8:
            np.testing.assert_array_equal(batch["image"][k, :, :, 0], expected.astype(np.float32))
        else:  # PIL rounds to uint8: within one gray level of jax's float resize.
            np.testing.assert_allclose(
                batch["image"][k, :, :, 0], expected, atol=1.0 / 127.5 + 1e-6
            )
    # The documented scaling maps sklearn's 0 and 16 to -1 and 1.
    assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0


# Run in two processes: each generates the data into its own temporary folder,
# then waits for the other before renaming it into data_dir, so the second
# rename certainly finds the destination there (what a race does by chance).
_PREPARE_AT_ONCE = textwrap.dedent(
    """
    import json, os, sys, time
    import numpy as np
    from diffusion_jax import input_pipeline as ip
    from diffusion_jax.datasets import digits as digits_lib

    data_dir, barrier = sys.argv[1], sys.argv[2]
    generate = digits_lib.Digits._download_and_prepare

    def generate_then_wait(self, *args, **kwargs):
        result = generate(self, *args, **kwargs)
        open(os.path.join(barrier, str(os.getpid())), "w").close()
        deadline = time.monotonic() + 120
        while len(os.listdir(barrier)) < 2:
            if time.monotonic() > deadline:
                raise TimeoutError("the other process never finished generating")
            time.sleep(0.01)
        return result

    digits_lib.Digits._download_and_prepare = generate_then_wait
    config = ip.DataConfig("digits", data_dir=data_dir, image_size=8)
    info = ip.dataset_info(config)
    examples = []
    for batch in ip.create_eval_iterator(config, batch_size=100):
        pixels = np.round((batch["image"] + 1.0) * 127.5).astype(np.uint8)
        examples += [
            (int(l), p.tobytes().hex())
            for p, l, m in zip(pixels, batch["label"], batch["mask"]) if m == 1
        ]
    print(json.dumps({"info": [info.num_train, info.num_eval], "test": sorted(examples)}))
    """
)


def test_two_processes_preparing_digits_at_once_both_succeed(tmp_path, sklearn_digits):
    data_dir, barrier = tmp_path / "tfds", tmp_path / "barrier"
    barrier.mkdir()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, *sys.path]))
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _PREPARE_AT_ONCE, str(data_dir), str(barrier)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for _ in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=300) for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    assert len(os.listdir(barrier)) == 2  # both generated, so both renamed
    # Both read sklearn's test digits.
    images, labels = sklearn_digits
    expected = sorted(
        (int(l), im.tobytes().hex())
        for im, l in zip(images[NUM_DIGITS_TRAIN:], labels[NUM_DIGITS_TRAIN:])
    )
    for out, _ in outputs:
        result = json.loads(out.strip().splitlines()[-1])
        assert result["info"] == [NUM_DIGITS_TRAIN, NUM_DIGITS - NUM_DIGITS_TRAIN]
        assert [tuple(e) for e in result["test"]] == expected
    # The loser's temporary folder is gone: only the prepared version is left.
    assert os.listdir(data_dir / "digits") == ["1.0.0"]


def test_digits_preparation_failure_is_not_swallowed(tmp_path, monkeypatch):
    def fail(self, *args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(digits_lib.Digits, "_download_and_prepare", fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        ip.dataset_info(_digits(str(tmp_path)))


# ---------------------------------------------------------------------------
# training stream: determinism, epochs, flips, sharding, state
# ---------------------------------------------------------------------------


def test_train_batches_are_deterministic_per_seed(digits_dir):
    config = _digits(digits_dir, image_size=8, random_flip=True)
    first = _take(ip.create_train_iterator(config, global_batch_size=32, seed=7), 5)
    again = _take(ip.create_train_iterator(config, global_batch_size=32, seed=7), 5)
    other = _take(ip.create_train_iterator(config, global_batch_size=32, seed=8), 5)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(first[0]["image"], other[0]["image"])
    assert set(first[0]) == {"image", "label"}
    assert first[0]["image"].shape == (32, 8, 8, 1) and first[0]["image"].dtype == np.float32
    assert first[0]["label"].shape == (32,) and first[0]["label"].dtype == np.int32


def test_each_epoch_is_a_fresh_permutation_of_the_split(digits_dir, sklearn_digits):
    images, labels = sklearn_digits
    train = _counter(images[:NUM_DIGITS_TRAIN], labels[:NUM_DIGITS_TRAIN])
    batch = 64  # does not divide 1500: batches straddle epoch boundaries
    iterator = ip.create_train_iterator(
        _digits(digits_dir, image_size=8), global_batch_size=batch, seed=0
    )
    stream = _flat_keys(_take(iterator, -(-3 * NUM_DIGITS_TRAIN // batch)))
    epochs = [stream[e * NUM_DIGITS_TRAIN : (e + 1) * NUM_DIGITS_TRAIN] for e in range(3)]
    for epoch in epochs:
        assert collections.Counter(epoch) == train
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    # Shuffled, not sklearn's order.
    in_order = [(im.tobytes(), int(l)) for im, l in zip(images[:NUM_DIGITS_TRAIN], labels)]
    assert epochs[0] != in_order


def test_random_flip_gives_the_image_or_its_mirror(digits_dir):
    plain = _take(
        ip.create_train_iterator(_digits(digits_dir, image_size=16), global_batch_size=128, seed=3),
        2,
    )
    flip = _take(
        ip.create_train_iterator(
            _digits(digits_dir, image_size=16, random_flip=True), global_batch_size=128, seed=3
        ),
        2,
    )
    flipped = 0
    for p, f in zip(plain, flip):
        np.testing.assert_array_equal(p["label"], f["label"])  # same order
        mirror = p["image"][:, :, ::-1, :]
        same = np.all(f["image"] == p["image"], axis=(1, 2, 3))
        mirrored = np.all(f["image"] == mirror, axis=(1, 2, 3))
        assert np.all(same | mirrored)
        flipped += int(np.sum(mirrored & ~same))
    # 256 fair coins (minus a few symmetric digits): 6 standard deviations wide.
    assert 70 < flipped < 180, flipped


def test_process_shards_are_disjoint_and_cover_the_split(digits_dir, sklearn_digits):
    images, labels = sklearn_digits
    config = _digits(digits_dir, image_size=8)
    per_process = NUM_DIGITS_TRAIN // 2  # 750 each
    shards = []
    for p in range(2):
        iterator = ip.create_train_iterator(
            config, global_batch_size=50, seed=0, process_index=p, process_count=2
        )
        batches = _take(iterator, per_process // 25)
        assert batches[0]["image"].shape == (25, 8, 8, 1)
        shards.append(collections.Counter(_flat_keys(batches)))
    assert sum(shards[0].values()) == sum(shards[1].values()) == per_process
    assert not set(shards[0]) & set(shards[1])
    assert shards[0] + shards[1] == _counter(images[:NUM_DIGITS_TRAIN], labels[:NUM_DIGITS_TRAIN])


# (2, 37): process 0 holds 149 = 4 * 37 + 1 examples, process 1 holds 148.
@pytest.mark.parametrize("process_count, batch_size", [(1, 40), (2, 37), (3, 40)])
def test_eval_covers_every_example_once_with_mask(
    digits_dir, sklearn_digits, process_count, batch_size
):
    images, labels = sklearn_digits
    config = _digits(digits_dir, image_size=8)
    # Same batch count on every process: ceil(ceil(297 / P) / batch_size).
    expected_batches = -(-(-(-297 // process_count)) // batch_size)
    seen = collections.Counter()
    for p in range(process_count):
        batches = list(
            ip.create_eval_iterator(
                config, batch_size=batch_size, process_index=p, process_count=process_count
            )
        )
        assert len(batches) == expected_batches
        for b in batches:
            assert b["image"].shape == (batch_size, 8, 8, 1) and b["mask"].dtype == np.float32
            real = b["mask"] == 1.0
            assert np.all((b["mask"] == 0.0) | real)
            assert np.all(b["image"][~real] == 0.0)
            seen.update(k for k, r in zip(_keys(b), real) if r)
    assert seen == _counter(images[NUM_DIGITS_TRAIN:], labels[NUM_DIGITS_TRAIN:])


def test_iterator_state_restores_the_continuation(digits_dir):
    config = _digits(digits_dir, image_size=8, random_flip=True)
    original = ip.create_train_iterator(config, global_batch_size=64, seed=5)
    _take(original, 30)  # past the first epoch (1500 / 64 < 24 batches)
    state = original.get_state()
    continuation = _take(original, 3)
    restored = ip.create_train_iterator(config, global_batch_size=64, seed=5)
    restored.set_state(state)
    for a, b in zip(continuation, _take(restored, 3)):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def _state(next_example, global_batch_size, seed, split_length=NUM_DIGITS_TRAIN):
    return {
        "next_example": next_example,
        "global_batch_size": global_batch_size,
        "seed": seed,
        "split_length": split_length,
    }


# (64, 10, 32): E = 640 is a multiple of the new batch; (32, 7, 48): E = 224 =
# 4 * 48 + 32 is not; (32, 50, 48): E = 1600, in the second epoch.
@pytest.mark.parametrize(
    "saved_batch, consumed, new_batch", [(64, 10, 32), (32, 7, 48), (32, 50, 48)]
)
def test_state_restores_into_another_global_batch_size(
    digits_dir, saved_batch, consumed, new_batch
):
    config = _digits(digits_dir, image_size=8, random_flip=True)
    original = ip.create_train_iterator(config, global_batch_size=saved_batch, seed=5)
    seen = _flat_keys(_take(original, consumed))
    state = original.get_state()
    assert state == _state(consumed * saved_batch, saved_batch, 5)
    restored = ip.create_train_iterator(config, global_batch_size=new_batch, seed=5)
    restored.set_state(state)
    continuation = _take(restored, 3)
    assert all(b["label"].shape == (new_batch,) for b in continuation)
    # Consumed + continuation is the uninterrupted stream, example for example.
    total = consumed * saved_batch + 3 * new_batch
    uninterrupted = ip.create_train_iterator(config, global_batch_size=16, seed=5)
    stream = _flat_keys(_take(uninterrupted, -(-total // 16)))[:total]
    assert seen + _flat_keys(continuation) == stream


def test_state_of_two_processes_restores_into_one(digits_dir):
    config = _digits(digits_dir, image_size=8, random_flip=True)
    parts = [
        ip.create_train_iterator(
            config, global_batch_size=48, seed=3, process_index=p, process_count=2
        )
        for p in range(2)
    ]
    consumed = [_take(part, 40) for part in parts]  # 40 * 48 = 1920: past an epoch
    states = [part.get_state() for part in parts]
    # The same position on every process, counted in examples.
    assert states[0] == states[1] == _state(40 * 48, 48, 3)
    seen = [
        key
        for k in range(40)
        for key in _flat_keys([consumed[0][k]]) + _flat_keys([consumed[1][k]])
    ]
    single = ip.create_train_iterator(config, global_batch_size=48, seed=3)
    single.set_state(states[0])
    continuation = _flat_keys(_take(single, 2))
    uninterrupted = ip.create_train_iterator(config, global_batch_size=48, seed=3)
    assert seen + continuation == _flat_keys(_take(uninterrupted, 42))


def test_state_restores_into_another_worker_count(digits_dir):
    config = _digits(digits_dir, image_size=8, random_flip=True)
    threads = ip.create_train_iterator(config, global_batch_size=32, seed=2)
    _take(threads, 5)
    state = threads.get_state()
    expected = _take(threads, 2)
    workers = ip.create_train_iterator(config, global_batch_size=32, seed=2, worker_count=2)
    workers.set_state(state)
    try:
        for a, b in zip(expected, _take(workers, 2)):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])
        assert workers.get_state() == _state(7 * 32, 32, 2)
    finally:
        workers.close()


def test_legacy_next_index_state_counts_batches_of_the_current_size(digits_dir):
    config = _digits(digits_dir, image_size=8)
    uninterrupted = _take(ip.create_train_iterator(config, global_batch_size=32, seed=4), 8)
    restored = ip.create_train_iterator(config, global_batch_size=32, seed=4)
    restored.set_state({"next_index": 6})  # what grain's iterator saved before
    for a, b in zip(uninterrupted[6:], _take(restored, 2)):
        np.testing.assert_array_equal(a["image"], b["image"])
    assert restored.get_state() == _state(8 * 32, 32, 4)


def test_legacy_multi_worker_state_counts_the_batches_of_every_worker(digits_dir):
    """The state the pipeline before 49eb978 saved with worker_count=2 after 7 batches
    (printed by that code): worker 0 had made 4 batches (0, 2, 4, 6), worker 1 three
    (1, 3, 5), taken in turn. A checkpoint holding it could not be resumed."""
    legacy = {"next_index_in_cycle": 1, "next_index_in_datasets": 2, "iterators_in_use_indices": [0, 1],
              "iterators_in_use_states": [{"next_index": 4}, {"next_index": 3}], "exhausted": [0, 0],
              "future_states": {}}
    config = _digits(digits_dir, image_size=8)
    uninterrupted = _take(ip.create_train_iterator(config, global_batch_size=32, seed=4), 9)
    restored = ip.create_train_iterator(config, global_batch_size=32, seed=4)
    restored.set_state(legacy)
    for a, b in zip(uninterrupted[7:], _take(restored, 2)):
        np.testing.assert_array_equal(a["image"], b["image"])
    assert restored.get_state() == _state(9 * 32, 32, 4)


def test_state_of_another_seed_or_split_continues_with_a_warning(digits_dir, caplog):
    config = _digits(digits_dir, image_size=8)
    other_seed = ip.create_train_iterator(config, global_batch_size=32, seed=6)
    with caplog.at_level(logging.WARNING, logger=ip.__name__):
        other_seed.set_state(_state(96, 32, seed=5))
    assert re.search(r"seed 5\b.*seed 6\b", caplog.text), caplog.text
    # It continues at example 96 of its own stream (seed 6).
    expected = _take(ip.create_train_iterator(config, global_batch_size=32, seed=6), 4)[3]
    np.testing.assert_array_equal(next(other_seed)["image"], expected["image"])
    caplog.clear()
    other_split = ip.create_train_iterator(config, global_batch_size=32, seed=6)
    with caplog.at_level(logging.WARNING, logger=ip.__name__):
        other_split.set_state(_state(96, 32, seed=6, split_length=1000))
    assert re.search(r"split_length 1000\b.*split_length 1500\b", caplog.text), caplog.text
    # The same seed and split: no warning.
    caplog.clear()
    same = ip.create_train_iterator(config, global_batch_size=64, seed=6)
    with caplog.at_level(logging.WARNING, logger=ip.__name__):
        same.set_state(_state(96, 32, seed=6))
    assert not caplog.records


@pytest.mark.parametrize(
    "state, match",
    [
        ({"position": 3}, "next_example"),
        ({**_state(0, 32, 0), "next_example": -32}, "next_example.*-32"),
        ({"next_index": "7"}, "next_index.*'7'"),
        ({"iterators_in_use_states": [{"next_index": -1}]}, "next_index.*-1"),
        ({"iterators_in_use_states": [{"position": 1}]}, "multi-worker form"),
    ],
)
def test_bad_state_is_refused(digits_dir, state, match):
    iterator = ip.create_train_iterator(
        _digits(digits_dir, image_size=8), global_batch_size=32, seed=0
    )
    with pytest.raises(ValueError, match=match):
        iterator.set_state(state)


def test_iterator_state_round_trips_through_grains_orbax_handler(digits_dir, tmp_path):
    config = _digits(digits_dir, image_size=8)
    original = ip.create_train_iterator(config, global_batch_size=16, seed=1)
    _take(original, 4)
    grain.checkpoint.CheckpointHandler().save(
        tmp_path, args=grain.checkpoint.CheckpointSave(original)
    )
    saved = json.loads((tmp_path / "process_0-of-1.json").read_text())
    assert saved == _state(4 * 16, 16, 1)
    expected = next(original)
    restored = ip.create_train_iterator(config, global_batch_size=16, seed=1)
    grain.checkpoint.CheckpointHandler().restore(
        tmp_path, args=grain.checkpoint.CheckpointRestore(restored)
    )
    np.testing.assert_array_equal(next(restored)["image"], expected["image"])


def test_worker_processes_give_the_same_batches(digits_dir):
    config = _digits(digits_dir, image_size=8, random_flip=True)
    threads = _take(ip.create_train_iterator(config, global_batch_size=32, seed=2), 4)
    workers = ip.create_train_iterator(config, global_batch_size=32, seed=2, worker_count=2)
    for a, b in zip(threads, _take(workers, 4)):
        np.testing.assert_array_equal(a["image"], b["image"])
    workers.close()


# ---------------------------------------------------------------------------
# TFDS datasets under tfds.testing.mock_data (no TensorFlow, no files)
# ---------------------------------------------------------------------------


def test_cifar10_under_mock_data(tmp_path):
    config = ip.DataConfig("cifar10", data_dir=str(tmp_path))
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        info = ip.dataset_info(config)
        train = _take(ip.create_train_iterator(config, global_batch_size=8, seed=0), 3)
        evaluation = list(ip.create_eval_iterator(config, batch_size=8))
        reference = tfds.data_source("cifar10", split="test", data_dir=str(tmp_path))
        raw = [reference[i] for i in range(20)]
    assert info == ip.DatasetInfo(
        image_shape=(32, 32, 3), num_classes=10, num_train=20, num_eval=20
    )
    for b in train:
        assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
        assert b["label"].shape == (8,) and b["label"].dtype == np.int32
        assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0
        assert np.all((0 <= b["label"]) & (b["label"] < 10))
    # The ordered eval pass is TFDS's examples, scaled to [-1, 1], then padding.
    assert len(evaluation) == 3 and [b["mask"].sum() for b in evaluation] == [8, 8, 4]
    images = np.concatenate([b["image"] for b in evaluation])[:20]
    labels = np.concatenate([b["label"] for b in evaluation])[:20]
    np.testing.assert_allclose(images, np.stack([r["image"] for r in raw]) / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(labels, [r["label"] for r in raw])


def test_mnist_under_mock_data_is_upsampled_grayscale():
    config = ip.DataConfig("mnist", image_size=32)
    with tfds.testing.mock_data(num_examples=6):
        batch = next(ip.create_train_iterator(config, global_batch_size=6, seed=0))
    assert batch["image"].shape == (6, 32, 32, 1)


def _fake_source(records):
    def as_data_source(self, split, decoders=None, deserialize_method=None, **kwargs):
        del self, split, decoders, deserialize_method, kwargs
        return records

    return as_data_source


def test_bad_tfds_record_is_reported_with_its_index():
    good = {"image": np.zeros((32, 32, 3), np.uint8), "label": 1}
    bad = {"image": np.zeros((32, 32, 3), np.float32), "label": 1}
    config = ip.DataConfig("cifar10")
    with tfds.testing.mock_data(as_data_source_fn=_fake_source([good, good, good, bad])):
        iterator = ip.create_eval_iterator(config, batch_size=4)
        with pytest.raises(ValueError, match=r"'cifar10'.*'test'.*example 3.*float32"):
            next(iterator)
    wrong_shape = {"image": np.zeros((32, 32), np.uint8), "label": 1}
    with tfds.testing.mock_data(as_data_source_fn=_fake_source([good, wrong_shape])):
        iterator = ip.create_eval_iterator(config, batch_size=2)
        with pytest.raises(ValueError, match=r"example 1.*shape \(32, 32\)"):
            next(iterator)


def test_empty_tfds_split_is_an_error():
    with tfds.testing.mock_data(as_data_source_fn=_fake_source([])):
        with pytest.raises(ValueError, match=r"'cifar10'.*'train'.*empty"):
            ip.create_train_iterator(ip.DataConfig("cifar10"), global_batch_size=2, seed=0)


def test_unprepared_dataset_error_names_dataset_data_dir_and_fix(tmp_path):
    empty = str(tmp_path / "nothing_here")
    with pytest.raises(ValueError) as error:
        ip.dataset_info(ip.DataConfig("mnist", data_dir=empty))
    message = str(error.value)
    assert "'mnist'" in message and empty in message
    assert "tfds build mnist --file_format=array_record" in message
    assert "copy /tmp/tfds/mnist into the data_dir" in message
    # TFDS takes the name in any case and prepares it under its own (lower-case) folder.
    with pytest.raises(ValueError, match="copy /tmp/tfds/mnist into the data_dir"):
        ip.dataset_info(ip.DataConfig("MNIST:3.0.1", data_dir=empty))


def test_unknown_dataset_name_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no_such_dataset_xyz"):
        ip.dataset_info(ip.DataConfig("no_such_dataset_xyz", data_dir=str(tmp_path)))


def test_unknown_dataset_version_is_an_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"'cifar10:9\.9\.9'.*" + str(tmp_path)):
        ip.dataset_info(ip.DataConfig("cifar10:9.9.9", data_dir=str(tmp_path)))


class _Uint16Images(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder whose images are uint16 (never prepared: its info is enough)."""

    name = "uint16_images"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint16)}
            ),
        )

    def _split_generators(self, dl_manager):
        raise NotImplementedError

    def _generate_examples(self):
        raise NotImplementedError


def test_non_uint8_tfds_image_feature_is_an_error_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(
        ip.tfds, "builder", lambda name, data_dir=None: _Uint16Images(data_dir=data_dir)
    )
    with pytest.raises(ValueError, match=r"'uint16_images'.*dtype uint16"):
        ip.dataset_info(ip.DataConfig("uint16_images", data_dir=str(tmp_path)))


# ---------------------------------------------------------------------------
# folder
# ---------------------------------------------------------------------------


def _banded_rgb(height, width, color, band=(255, 0, 0)):
    """An image whose central min(h, w) square is `color`, with `band` outside it."""
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:] = band
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    pixels[top : top + side, left : left + side] = color
    return pixels


def test_folder_center_crops_and_resizes(tmp_path):
    colors = [(10, 20, 30), (200, 100, 0), (0, 255, 128)]
    shapes = [(48, 32), (32, 48), (20, 20)]  # tall, wide, square (upsampled)
    for k, (color, (h, w)) in enumerate(zip(colors, shapes)):
        PIL.Image.fromarray(_banded_rgb(h, w, color)).save(tmp_path / f"im{k}.png")
    (tmp_path / "notes.txt").write_text("not an image, not listed")
    config = ip.DataConfig("folder", data_dir=str(tmp_path), image_size=16)
    assert ip.dataset_info(config) == ip.DatasetInfo((16, 16, 3), None, 3, 3)
    (batch,) = list(ip.create_eval_iterator(config, batch_size=4))
    np.testing.assert_array_equal(batch["mask"], [1, 1, 1, 0])
    np.testing.assert_array_equal(batch["label"], [0, 0, 0, 0])
    for k, color in enumerate(colors):  # files are read in name order
        # The bands fall outside the crop, so every pixel is exactly the color.
        expected = np.broadcast_to(np.asarray(color, np.float32) / 127.5 - 1.0, (16, 16, 3))
        np.testing.assert_allclose(batch["image"][k], expected, atol=1e-6)
    train = next(ip.create_train_iterator(config, global_batch_size=3, seed=0))
    assert train["image"].shape == (3, 16, 16, 3)


@pytest.mark.parametrize("orientation,turn", [(1, lambda a: a), (3, lambda a: np.rot90(a, 2)),
                                              (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1))])
def test_folder_images_are_turned_upright_by_their_exif_orientation(tmp_path, orientation, turn):
    """EXIF orientation (TIFF tag 274): 3 = rotated 180, 6 = turn 90 clockwise to view,
    8 = 90 counter-clockwise. A square image, so no crop or resize: the pixels must be
    the stored ones turned by numpy."""
    stored = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) * 5
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    PIL.Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif)
    config = ip.DataConfig("folder", data_dir=str(tmp_path), image_size=4)
    (batch,) = list(ip.create_eval_iterator(config, batch_size=1))
    np.testing.assert_allclose(batch["image"][0], turn(stored).astype(np.float32) / 127.5 - 1.0, atol=1e-6)


def test_folder_grayscale_and_split_subfolders(tmp_path):
    for split, count in (("train", 3), ("test", 2)):
        (tmp_path / split).mkdir()
        for k in range(count):
            PIL.Image.fromarray(np.full((8, 8), 40 * k, np.uint8), mode="L").save(
                tmp_path / split / f"{k}.png"
            )
    config = ip.DataConfig("folder", data_dir=str(tmp_path), image_size=8)
    assert ip.dataset_info(config) == ip.DatasetInfo((8, 8, 1), None, 3, 2)
    (batch,) = list(ip.create_eval_iterator(config, batch_size=2))
    np.testing.assert_allclose(batch["image"][1], np.full((8, 8, 1), 40 / 127.5 - 1.0), atol=1e-6)
    # One RGB file makes the whole split RGB.
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "test" / "rgb.png")
    batch = next(ip.create_eval_iterator(config, batch_size=3))
    assert batch["image"].shape == (3, 8, 8, 3)


def test_a_folder_split_is_listed_and_checked_once_until_its_folder_changes(tmp_path, monkeypatch):
    """Every evaluation during training opens the eval split again: an unchanged folder is
    not listed and header-checked again (about a minute for a million images)."""
    for k in range(3):
        PIL.Image.fromarray(np.full((8, 8), 40 * k, np.uint8), mode="L").save(tmp_path / f"{k}.png")
    listed = []
    list_folder = ip._list_folder
    monkeypatch.setattr(ip, "_list_folder", lambda *args: listed.append(args[-1]) or list_folder(*args))
    config = ip.DataConfig("folder", data_dir=str(tmp_path), image_size=8)
    for _ in range(3):
        (batch,) = list(ip.create_eval_iterator(config, batch_size=3))
    assert listed == [str(tmp_path)]
    time.sleep(0.05)  # past the file system's timestamp granularity (a few ms on some kernels)
    os.remove(tmp_path / "2.png")  # the folder changed: listed again, without the file
    (batch,) = list(ip.create_eval_iterator(config, batch_size=3))
    assert listed == [str(tmp_path)] * 2 and list(batch["mask"]) == [1, 1, 0]


def test_a_large_jpeg_is_decoded_at_the_scale_the_image_size_needs(tmp_path):
    """A 256x192 JPEG for 32x32 images: decoded at 1/4 scale (64x48, the smallest DCT scale
    whose shorter side is still >= 32), and the model's input within a few levels of a full
    decode's. PNGs and an image_size near the file's own decode whole."""
    yy, xx = np.mgrid[0:192, 0:256]
    smooth = np.stack([xx, yy, (xx + yy) // 2], -1).astype(np.uint8)  # gradients: no aliasing
    PIL.Image.fromarray(smooth).save(tmp_path / "photo.jpg", quality=95)
    PIL.Image.fromarray(smooth).save(tmp_path / "same.png")
    records = ip._folder_split(str(tmp_path), "train").records
    assert [records[i]["image"].shape for i in range(2)] == [(192, 256, 3), (192, 256, 3)]
    assert [records.at_size(32)[i]["image"].shape for i in range(2)] == [(48, 64, 3), (192, 256, 3)]
    assert records.at_size(100)[0]["image"].shape == (192, 256, 3)  # 1/2 would give 96 < 100

    config = ip.DataConfig("folder", data_dir=str(tmp_path), image_size=32)
    (batch,) = list(ip.create_eval_iterator(config, batch_size=2))
    full = ip._center_crop_resize(records[0]["image"], 32).astype(np.float32) / 127.5 - 1
    levels = np.abs(batch["image"][0] - full) * 127.5
    assert levels.max() <= 3 and levels.mean() < 1, (levels.max(), levels.mean())
    png = ip._center_crop_resize(records[1]["image"], 32).astype(np.float32) / 127.5 - 1
    np.testing.assert_array_equal(batch["image"][1], png)


# Values at every rounding edge of v / 257 (k * 257 + 128 rounds down, + 129 up),
# then a ramp over the whole 16-bit range.
_SIXTEEN_BIT = np.concatenate(
    [
        [0, 1, 128, 129, 256, 257, 385, 386, 65278, 65407, 65408, 65535],
        np.linspace(0, 65535, 52).astype(np.uint16),
    ]
).astype(np.uint16).reshape(8, 8)


def _save_sixteen_bit(path, mode):
    """Writes _SIXTEEN_BIT as a file that PIL opens in `mode`.

    PIL writes 16-bit grayscale PNG (opened as "I;16"); "I;16B" needs a
    big-endian TIFF, which PIL recognizes by content, whatever its extension.
    """
    image = PIL.Image.frombytes("I;16B", (8, 8), _SIXTEEN_BIT.astype(">u2").tobytes())
    image.save(path, format="PNG" if mode == "I;16" else "TIFF")
    with PIL.Image.open(path) as reopened:
        assert reopened.mode == mode


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_folder_sixteen_bit_grayscale_is_scaled_to_eight_bits(tmp_path, mode):
    _save_sixteen_bit(tmp_path / "a.png", mode)
    config = ip.DataConfig("folder", data_dir=str(tmp_path), image_size=8)
    assert ip.dataset_info(config).image_shape == (8, 8, 1)
    (batch,) = list(ip.create_eval_iterator(config, batch_size=1))
    expected = np.round(_SIXTEEN_BIT / 257.0) / 127.5 - 1.0
    np.testing.assert_allclose(batch["image"][0, :, :, 0], expected, atol=1e-6)
    # Beside an RGB file, the split is RGB: the same gray in all three channels.
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "b.png")
    batch = next(ip.create_eval_iterator(config, batch_size=2))
    np.testing.assert_allclose(batch["image"][0], np.repeat(expected[:, :, None], 3, -1), atol=1e-6)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I;16N"])
def test_every_sixteen_bit_mode_is_scaled_to_eight_bits(mode):
    dtype = ">u2" if mode == "I;16B" else "<u2" if mode in ("I;16", "I;16L") else "=u2"
    image = PIL.Image.frombytes(mode, (8, 8), _SIXTEEN_BIT.astype(dtype).tobytes())
    pixels = np.asarray(ip._eight_bit_image(image, channels=1))
    np.testing.assert_array_equal(pixels, np.round(_SIXTEEN_BIT / 257.0).astype(np.uint8))


def test_folder_gray_with_alpha_is_grayscale_without_alpha(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    alpha = np.full((8, 8), 7, np.uint8)
    PIL.Image.fromarray(np.stack([gray, alpha], -1)).save(tmp_path / "la.png")
    config = ip.DataConfig("folder", data_dir=str(tmp_path), image_size=8)
    assert ip.dataset_info(config).image_shape == (8, 8, 1)
    (batch,) = list(ip.create_eval_iterator(config, batch_size=1))
    np.testing.assert_allclose(batch["image"][0, :, :, 0], gray / 127.5 - 1.0, atol=1e-6)


@pytest.mark.parametrize("mode, pixels", [("I", np.int32), ("F", np.float32)])
def test_folder_image_of_unknown_range_is_refused_by_name(tmp_path, mode, pixels):
    PIL.Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    bad = tmp_path / "b.png"  # TIFF content: PNG has no 32-bit modes
    PIL.Image.fromarray(np.full((8, 8), 70000, pixels)).save(bad, format="TIFF")
    config = ip.DataConfig("folder", data_dir=str(tmp_path), image_size=8)
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}.*'{mode}'"):
        ip.dataset_info(config)
    # Before any pixel is decoded.
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}.*'{mode}'"):
        ip.create_eval_iterator(config, batch_size=2)


@pytest.mark.parametrize("field", ["train_split", "eval_split"])
def test_folder_split_slicing_is_refused(tmp_path, field):
    with pytest.raises(ValueError, match=rf"{field}='train\[:90%\]'.*only for TFDS.*sub-folders"):
        ip.DataConfig("folder", data_dir=str(tmp_path), **{field: "train[:90%]"})
    # Slicing stays allowed where it works.
    ip.DataConfig("digits", **{field: "train[:90%]"})


def test_folder_unreadable_file_is_reported_by_path(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    PIL.Image.fromarray(noise).save(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    config = ip.DataConfig("folder", data_dir=str(tmp_path), image_size=8)
    with pytest.raises(ValueError, match=str(bad)):
        ip.dataset_info(config)
    # A valid header with truncated pixel data fails only when decoded.
    good_bytes = (tmp_path / "good.png").read_bytes()
    bad.write_bytes(good_bytes[: len(good_bytes) // 2])
    iterator = ip.create_eval_iterator(config, batch_size=2)
    with pytest.raises(ValueError, match=str(bad)):
        next(iterator)


def test_folder_without_images_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"empty.*" + str(tmp_path)):
        ip.dataset_info(ip.DataConfig("folder", data_dir=str(tmp_path)))


def test_folder_split_without_its_sub_folder_names_it(tmp_path):
    """train/ exists, test/ does not, and data_dir itself holds only class folders."""
    for folder in ("train", "cats", "dogs"):
        (tmp_path / folder).mkdir()
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / "a.png")
    with pytest.raises(ValueError, match=(
            rf"split 'test' is empty: .* in {tmp_path} \(there is no folder {tmp_path / 'test'}\); "
            r"sub-folders \(cats, dogs, train\) are not searched\. .*data\.eval_split")):
        ip.dataset_info(ip.DataConfig("folder", data_dir=str(tmp_path)))


def test_eval_iterator_max_batches_reads_only_those(tmp_path, monkeypatch):
    for k in range(20):
        PIL.Image.fromarray(np.full((8, 8, 3), 10 * k, np.uint8)).save(tmp_path / f"{k:02d}.png")
    config = ip.DataConfig("folder", data_dir=str(tmp_path), image_size=8)
    whole = list(ip.create_eval_iterator(config, batch_size=2))
    assert len(whole) == 10
    reads = []
    get = ip._FolderRecords.__getitem__
    monkeypatch.setattr(ip._FolderRecords, "__getitem__", lambda self, i: reads.append(i) or get(self, i))
    first = list(ip.create_eval_iterator(config, batch_size=2, max_batches=2))
    assert len(first) == 2 and sorted(reads) == [0, 1, 2, 3]  # no prefetching past them
    for got, want in zip(first, whole):
        np.testing.assert_array_equal(got["image"], want["image"])
    assert len(list(ip.create_eval_iterator(config, batch_size=2, max_batches=50))) == 10
    with pytest.raises(ValueError, match="max_batches must be a positive int"):
        ip.create_eval_iterator(config, batch_size=2, max_batches=0)


def test_folder_skips_hidden_files_and_reads_tiff(tmp_path):
    PIL.Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "a.tif")
    PIL.Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(tmp_path / "b.TIFF", format="TIFF")
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")  # not an image
    (tmp_path / ".DS_Store.png").write_bytes(b"")
    config = ip.DataConfig("folder", data_dir=str(tmp_path), image_size=8)
    assert ip.dataset_info(config) == ip.DatasetInfo((8, 8, 3), None, 2, 2)
    (batch,) = list(ip.create_eval_iterator(config, batch_size=2))
    np.testing.assert_allclose(batch["image"][:, 0, 0, 0], [200 / 127.5 - 1, 100 / 127.5 - 1], atol=1e-6)


def test_folder_image_over_pil_size_limit_is_named(tmp_path, monkeypatch):
    """PIL refuses images over MAX_IMAGE_PIXELS (about 179 MP; here lowered) with an error of
    its own class, which must still name the file, at startup."""
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "small.png")
    PIL.Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "huge.png")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 400)  # errors above twice this: 1600 > 800
    with pytest.raises(ValueError, match=rf"cannot read image file {tmp_path / 'huge.png'}: .*"):
        ip.dataset_info(ip.DataConfig("folder", data_dir=str(tmp_path), image_size=8))


# ---------------------------------------------------------------------------
# argument validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(name=""),
        dict(name="folder"),
        dict(name="cifar10", image_size=0),
        dict(name="cifar10", image_size=True),
        dict(name="cifar10", train_split=""),
    ],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        ip.DataConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(global_batch_size=10, process_count=4), "divisible"),
        (dict(global_batch_size=8, process_index=2, process_count=2), "process_index"),
        (dict(global_batch_size=0), "global_batch_size"),
        (dict(global_batch_size=8, seed=-1), "seed"),
    ],
)
def test_bad_train_arguments_raise_before_reading(kwargs, match):
    config = ip.DataConfig("folder", data_dir="/nonexistent/never/read")
    kwargs.setdefault("seed", 0)
    with pytest.raises(ValueError, match=match):
        ip.create_train_iterator(config, **kwargs)

"""Tests for diffusion_jax.input_pipeline and the digits TFDS builder.

Expected values come from outside the pipeline: scikit-learn's own digits
array, TFDS's own data source under `tfds.testing.mock_data`, jax.image.resize
as a second resizer, and images with known pixels written here.
"""

import collections
import os

import grain
import jax
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from sklearn import datasets as sk_datasets

from diffusion_jax import input_pipeline as ip

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


def test_iterator_state_round_trips_through_grains_orbax_handler(digits_dir, tmp_path):
    config = _digits(digits_dir, image_size=8)
    original = ip.create_train_iterator(config, global_batch_size=16, seed=1)
    _take(original, 4)
    grain.checkpoint.CheckpointHandler().save(
        tmp_path, args=grain.checkpoint.CheckpointSave(original)
    )
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


def test_unknown_dataset_name_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no_such_dataset_xyz"):
        ip.dataset_info(ip.DataConfig("no_such_dataset_xyz", data_dir=str(tmp_path)))


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

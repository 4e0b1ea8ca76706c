"""Image input pipeline: TFDS array_record data, sklearn digits or a folder -> grain.

This is the only module of diffusion_jax that talks to tensorflow_datasets and
grain. TensorFlow is not needed: TFDS reads prepared ``array_record`` files
through ``builder.as_data_source`` (random access, decoded with numpy/PIL) and
grain shuffles, maps, batches and prefetches them.

Datasets (``DataConfig.name``):

* any TFDS image dataset ("cifar10", "mnist", "celeb_a", ...), read from
  ``data_dir`` where it must already be prepared as array_record (see below);
  nothing is ever downloaded at run time;
* ``"digits"``: scikit-learn's 8x8 digits (`diffusion_jax.datasets.Digits`,
  train 1500 / test 297), prepared into ``data_dir`` automatically the first
  time (offline, about a second, no TensorFlow);
* ``"folder"``: the png/jpg/... files directly inside ``data_dir``, or inside
  ``data_dir/<split>`` where that sub-folder exists (so ``data_dir/train`` and
  ``data_dir/test`` give two splits; a flat folder serves every split, i.e. the
  evaluation set is then the training set); hidden files are skipped and
  sub-folders below are not searched. Unlabelled: label 0. Split names
  are folder names: TFDS slicing ("train[:90%]") is refused. A split is
  grayscale when every file is (PIL modes "1", "L", "LA" with the alpha
  dropped, and 16-bit "I;16*" scaled to 8 bits as ``round(v / 257)``), else
  RGB; files of 32-bit int or float mode ("I", "F"), whose range is unknown,
  are refused. A 16-bit colour file (48- or 64-bit PNG) is reduced to 8 bits
  by PIL itself when it opens it, keeping the high byte (``v >> 8``, which
  can be one level below ``round(v / 257)``).

Folder images are turned upright by their EXIF orientation tag (as photo
viewers show them); a JPEG is decoded at the smallest of its DCT scales (1/2,
1/4, 1/8) whose shorter side still covers ``image_size``. Every image is
center-cropped to a square and resized to ``image_size`` with
PIL's bilinear filter (antialiased when shrinking: PIL widens the filter by the
reduction factor) while still uint8, so pixel values stay on the 8-bit grid,
then mapped to float32 ``x / 127.5 - 1`` in [-1, 1] (Ho et al. 2020, sec. 3.3:
data scaled linearly to [-1, 1] from {0, ..., 255}).

Preparing a TFDS dataset for real runs
--------------------------------------
On a machine with internet access and TensorFlow::

    pip install tensorflow tensorflow-datasets importlib_resources
    tfds build cifar10 --file_format=array_record --data_dir=$HOME/tensorflow_datasets

then copy ``$HOME/tensorflow_datasets/cifar10`` (the folder holding
``<version>/dataset_info.json`` and ``*.array_record-*`` files) into the
training machine's data_dir, and pass that directory as ``DataConfig.data_dir``
(default: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). A dataset prepared
in the default tfrecord format cannot be read here (no random access): rebuild
it with ``--file_format=array_record``. Reading needs only
``tensorflow-datasets`` and ``array-record``. Some datasets (e.g. celeb_a) need
manual downloads for ``tfds build``; see their TFDS catalog pages.
(``importlib_resources``: TFDS 4.9.10 imports this backport to locate its
builders' code but declares it only for Python < 3.9; without it
``tfds build`` fails with ModuleNotFoundError.)

Determinism and sharding
------------------------
Training: the job reads one stream, the train split shuffled anew each epoch
(grain's index shuffle, per-epoch seed ``s + epoch``) and repeated forever;
batches run straight across epoch boundaries, so no example is dropped. Global
batch ``k`` is elements ``kB .. kB + B - 1`` of that stream, and process ``p``
of ``P`` reads rows ``p B/P .. (p + 1) B/P - 1`` of every global batch
(decoding only those). So the global batch, its examples and their order, does
not depend on the number of processes: 2 processes of 2 devices train exactly
as 1 process of 4. Shuffle order and flips are pure functions of (``seed``,
position in the stream), so the same seed gives the same batches.
Evaluation: process ``p`` reads the examples ``p, p + P, p + 2P, ...`` of the
eval split (disjoint shards that cover it).

Resuming: the train iterator's state (``get_state()``, what grain's Orbax
``CheckpointHandler`` saves as JSON) is the position ``E`` in the stream counted
in examples, the same on every process, with the global batch size, seed and
split length it was saved under: ``{"next_example": E, "global_batch_size": B,
"seed": s, "split_length": N}``. Restored (``set_state()``), global batch ``k``
of the iterator is elements ``E + kB' .. E + kB' + B' - 1`` of the stream for
its own global batch size ``B'``, so a run resumed with another batch size
(``E`` need not be a multiple of ``B'``), another process count or another
worker_count reads exactly the examples that the interrupted run had not. A
state saved under another seed or split length also continues at ``E``, of a
different stream, and logs a warning naming the old and new values. A state
``{"next_index": n}`` (grain's own, written by earlier versions) is read as
``E = n B'``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence

from absl import flags
import grain
import numpy as np
import PIL.Image
import PIL.ImageOps
import tensorflow_datasets as tfds

from diffusion_jax.datasets import digits as digits_lib

DIGITS = "digits"
FOLDER = "folder"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# PIL's errors for files it cannot read; DecompressionBombError (an image over
# PIL.Image.MAX_IMAGE_PIXELS, about 179 MP, by default) is none of the others.
_PIL_ERRORS = (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError)
# PIL modes read as one channel: 8-bit (alpha dropped) and 16-bit grayscale.
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_GRAYSCALE_MODES = ("1", "L", "LA", "La", *_SIXTEEN_BIT_MODES)
# PIL modes of 32-bit ints or floats: what range they span is not in the file.
_UNKNOWN_RANGE_MODES = ("I", "F")
# Threads that build batches ahead of the consumer, and how many they keep.
_READ_OPTIONS = grain.ReadOptions(num_threads=8, prefetch_buffer_size=8)

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which images to read and how to shape them.

    Attributes:
        name: a TFDS dataset name ("cifar10", "mnist", "celeb_a", ...), "digits"
            (sklearn's 8x8 digits, prepared on first use) or "folder".
        data_dir: TFDS data_dir holding prepared array_record data (None: TFDS's
            default, $TFDS_DATA_DIR or ~/tensorflow_datasets); for "folder", the
            image folder (required).
        image_size: images are center-cropped and resized to image_size^2.
        random_flip: random horizontal flips of training images.
        train_split: split read by `create_train_iterator` (TFDS slicing such as
            "train[:90%]" works for TFDS datasets and digits; for "folder", a
            sub-folder name).
        eval_split: split read by `create_eval_iterator`.
    """

    name: str
    data_dir: str | None = None
    image_size: int = 32
    random_flip: bool = False
    train_split: str = "train"
    eval_split: str = "test"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"DataConfig.name must be a non-empty string, got {self.name!r}.")
        if self.data_dir is not None and not isinstance(self.data_dir, (str, os.PathLike)):
            raise TypeError(f"DataConfig.data_dir must be a path or None, got {self.data_dir!r}.")
        if self.name == FOLDER and not self.data_dir:
            raise ValueError("DataConfig(name='folder') needs data_dir, the image folder.")
        if (
            isinstance(self.image_size, bool)
            or not isinstance(self.image_size, (int, np.integer))
            or self.image_size < 1
        ):
            raise ValueError(
                f"DataConfig.image_size must be a positive int, got {self.image_size!r}."
            )
        if not isinstance(self.random_flip, (bool, np.bool_)):
            raise TypeError(f"DataConfig.random_flip must be a bool, got {self.random_flip!r}.")
        for field in ("train_split", "eval_split"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise ValueError(f"DataConfig.{field} must be a non-empty string, got {value!r}.")
            if self.name == FOLDER and "[" in value:
                # A folder split is a sub-folder; no such folder would silently
                # mean "the whole folder".
                raise ValueError(
                    f"DataConfig.{field}={value!r}: split slicing is only for TFDS datasets "
                    "and 'digits'; a 'folder' dataset's splits are sub-folders of data_dir "
                    "(put the images in e.g. data_dir/train and data_dir/test)."
                )


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and a trainer need to know about the data.

    Attributes:
        image_shape: (H, W, C) of one image after resizing.
        num_classes: number of label classes, or None when unlabelled (label 0).
        num_train: examples in the train split (all processes together).
        num_eval: examples in the eval split (all processes together).
    """

    image_shape: tuple[int, int, int]
    num_classes: int | None
    num_train: int
    num_eval: int


@dataclasses.dataclass(frozen=True)
class _Split:
    """A random-access split: `records[i]` is {"image": uint8 [h, w, C], "label": int32}."""

    records: Sequence[dict[str, np.ndarray]]
    channels: int
    num_classes: int | None


# ---------------------------------------------------------------------------
# Random-access records, validated (TFDS, digits, folder).
# ---------------------------------------------------------------------------


class _TfdsRecords:
    """A TFDS data source reduced to validated {"image", "label"} records.

    Only `__len__` and `__getitem__` are used (and picklable for grain workers).
    Each record is checked so that bad data names the dataset, split and index.
    """

    def __init__(
        self, source, *, dataset: str, split: str, channels: int, num_classes, has_label: bool
    ):
        self._source = source
        self._dataset = dataset
        self._split = split
        self._channels = channels
        self._num_classes = num_classes
        self._has_label = has_label

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        record = self._source[index]
        where = f"dataset {self._dataset!r}, split {self._split!r}, example {index}"
        image = record.get("image") if isinstance(record, dict) else None
        if (
            not isinstance(image, np.ndarray)
            or image.dtype != np.uint8
            or image.ndim != 3
            or image.shape[-1] != self._channels
            or 0 in image.shape
        ):
            described = (
                f"shape {image.shape} dtype {image.dtype}"
                if isinstance(image, np.ndarray)
                else repr(type(image))
            )
            raise ValueError(
                f"{where}: image is {described}; expected uint8 [H, W, {self._channels}]."
            )
        label = 0
        if self._has_label:
            label = np.asarray(record["label"])
            if label.shape != () or not np.issubdtype(label.dtype, np.integer):
                raise ValueError(
                    f"{where}: label has shape {label.shape} dtype {label.dtype}; "
                    "expected an integer scalar."
                )
            if self._num_classes is not None and not 0 <= label < self._num_classes:
                raise ValueError(f"{where}: label {int(label)} outside [0, {self._num_classes}).")
        return {"image": image, "label": np.int32(label)}


def _eight_bit_image(image: PIL.Image.Image, channels: int) -> PIL.Image.Image:
    """`image` as PIL mode "L" (channels 1) or "RGB" (channels 3), 8 bits a channel.

    16-bit grayscale ("I;16*") is scaled to round(v / 257), which maps 0..65535
    onto 0..255 (PIL's own conversion clips it to 255 instead); an alpha channel
    is dropped.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(image).astype(np.uint32)  # any byte order -> native
        # round(v / 257) in integers: v / 257 is never exactly halfway.
        image = PIL.Image.fromarray(((wide + 128) // 257).astype(np.uint8))
    elif image.mode == "La":  # premultiplied alpha, which PIL converts only to "LA"
        image = image.convert("LA")
    return image.convert("L" if channels == 1 else "RGB")


class _FolderRecords:
    """Image files read with PIL as uint8 [h, w, C] (C = 1 for grayscale, else RGB).

    With ``draft_size``, a JPEG is decoded at the smallest of its DCT scales
    (1/2, 1/4, 1/8: PIL's ``Image.draft``) whose shorter side is still at least
    ``draft_size`` pixels: what the center crop and the resize to that size
    need, for a fraction of the decoding (a 4000x3000 photo for 64x64
    training decodes at 500x375). Other formats decode whole.
    """

    def __init__(self, paths: Sequence[str], *, channels: int, draft_size: int | None = None):
        self._paths = paths if isinstance(paths, list) else list(paths)
        self._channels = channels
        self._draft_size = draft_size

    def at_size(self, size: int) -> _FolderRecords:
        """These records, JPEGs decoded no larger than an image of side ``size`` needs."""
        return _FolderRecords(self._paths, channels=self._channels, draft_size=size)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        path = self._paths[index]
        try:
            with PIL.Image.open(path) as image:
                mode = image.mode
                if self._draft_size and image.format == "JPEG":
                    width, height = image.size
                    scale = self._draft_size / min(width, height)
                    # draft gives a size >= the one asked for, in both dimensions.
                    image.draft(mode, (math.ceil(width * scale), math.ceil(height * scale)))
                if mode not in _UNKNOWN_RANGE_MODES:
                    # Upright as a viewer shows it: camera files store the rotation in EXIF.
                    upright = PIL.ImageOps.exif_transpose(image)
                    pixels = np.asarray(_eight_bit_image(upright, self._channels), dtype=np.uint8)
        except _PIL_ERRORS as e:
            raise ValueError(f"folder dataset: cannot read image file {path}: {e}") from e
        _check_image_mode(path, mode)  # only if the file changed since `_folder_split`
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        return {"image": pixels, "label": np.int32(0)}


def _check_image_mode(path: str, mode: str) -> None:
    if mode in _UNKNOWN_RANGE_MODES:
        raise ValueError(
            f"folder dataset: image file {path} has PIL mode {mode!r} (32-bit "
            f"{'integer' if mode == 'I' else 'float'} pixels), whose range is unknown; "
            "convert it to 8- or 16-bit grayscale or RGB."
        )


# The split listed and header-checked in a directory, and the directory's mtime: every evaluation
# during training opens the eval split again, and a folder of a million images takes
# about a minute to check. A file added, removed or renamed changes the directory's
# mtime (unless within the file system's timestamp granularity, a few ms, of the
# listing); a file rewritten in place is checked again when it is read.
_FOLDER_SPLITS: dict[str, tuple[int, _Split]] = {}  # the latest listing of each directory


def _folder_split(folder: str, split: str) -> _Split:
    """Lists and header-checks the images of `folder/split`, or of `folder` itself."""
    root = os.fspath(folder)
    if not os.path.isdir(root):
        raise ValueError(f"folder dataset: data_dir {root!r} is not a directory.")
    split_dir = os.path.join(root, split)
    directory = split_dir if os.path.isdir(split_dir) else root
    path, mtime = os.path.abspath(directory), os.stat(directory).st_mtime_ns
    cached = _FOLDER_SPLITS.get(path)
    if cached is None or cached[0] != mtime:
        _FOLDER_SPLITS[path] = cached = (mtime, _list_folder(root, split, split_dir, directory))
    return cached[1]


def _list_folder(root: str, split: str, split_dir: str, directory: str) -> _Split:
    paths = sorted(
        os.path.join(directory, f)
        for f in os.listdir(directory)
        # Hidden files (macOS's "._x.png" resource forks) are not images of the set.
        if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
        and os.path.isfile(os.path.join(directory, f))
    )
    if not paths:
        where = directory if directory == split_dir else f"{root} (there is no folder {split_dir})"
        subfolders = sorted(f for f in os.listdir(directory) if os.path.isdir(os.path.join(directory, f)))
        raise ValueError(
            f"folder dataset: split {split!r} is empty: no image files "
            f"({', '.join(IMAGE_EXTENSIONS)}) in {where}"
            + (f"; sub-folders ({', '.join(subfolders[:5])}{', ...' if len(subfolders) > 5 else ''}) "
               "are not searched" if subfolders else "")
            + ". Images go in data_dir/<split>/ or data_dir itself (data.train_split and "
            "data.eval_split name the sub-folders)."
        )
    # Opening a file with PIL reads only its header: cheap, and it finds
    # non-image files now instead of mid-training.
    modes = set()
    for path in paths:
        try:
            with PIL.Image.open(path) as image:
                mode = image.mode
        except _PIL_ERRORS as e:
            raise ValueError(f"folder dataset: cannot read image file {path}: {e}") from e
        _check_image_mode(path, mode)
        modes.add(mode)
    channels = 1 if modes <= set(_GRAYSCALE_MODES) else 3
    return _Split(_FolderRecords(paths, channels=channels), channels, None)


def _records_at_size(split: _Split, image_size: int) -> Sequence[dict[str, np.ndarray]]:
    """The split's records, decoded no larger than `image_size` needs where that saves work."""
    records = split.records
    return records.at_size(image_size) if isinstance(records, _FolderRecords) else records


def _not_prepared_message(name: str, data_dir: str | None, builder) -> str:
    where = (
        data_dir if data_dir else "the default data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
    )
    return (
        f"TFDS dataset {name!r} is not prepared in {where} (looked for "
        f"{builder.data_dir}). This pipeline reads prepared array_record files and "
        "never downloads. Prepare it on a machine with internet access and TensorFlow:\n"
        "  pip install tensorflow tensorflow-datasets importlib_resources\n"
        f"  tfds build {name} --file_format=array_record --data_dir=/tmp/tfds\n"
        f"then copy /tmp/tfds/{builder.name} into the data_dir "  # TFDS's folder: "Cifar10" is cifar10
        "(or point DataConfig.data_dir at /tmp/tfds)."
    )


def _builder_split(builder, *, name: str, data_dir: str | None, split: str) -> _Split:
    """Opens one split of a TFDS builder as validated random-access records."""
    # The features are known before anything is prepared or read.
    features = builder.info.features
    if "image" not in features:
        raise ValueError(
            f"TFDS dataset {name!r} has no 'image' feature (features: {sorted(features)})."
        )
    # `np_dtype`: `dtype` would import TensorFlow.
    image_dtype = np.dtype(getattr(features["image"], "np_dtype", None) or np.uint8)
    if image_dtype != np.uint8:
        raise ValueError(
            f"TFDS dataset {name!r}: the 'image' feature has dtype {image_dtype.name}; "
            "only uint8 images are supported."
        )
    try:
        source = builder.as_data_source(split=split)
    except (NotImplementedError, ValueError, KeyError, OSError) as e:
        if not builder.is_prepared():
            raise ValueError(_not_prepared_message(name, data_dir, builder)) from e
        formats = {f.value for f in builder.info.available_file_formats()}
        if "array_record" not in formats:
            raise ValueError(
                f"TFDS dataset {name!r} in {builder.data_dir} is prepared as {sorted(formats)}, "
                "which has no random access. Rebuild it with "
                f"`tfds build {name} --file_format=array_record`."
            ) from e
        raise ValueError(
            f"Cannot open split {split!r} of TFDS dataset {name!r} in {builder.data_dir}: {e}"
        ) from e
    if len(source) == 0:
        raise ValueError(f"TFDS dataset {name!r}: split {split!r} in {builder.data_dir} is empty.")
    label_feature = features["label"] if "label" in features else None
    num_classes = (
        label_feature.num_classes if isinstance(label_feature, tfds.features.ClassLabel) else None
    )
    channels = features["image"].shape[-1]
    if channels is None:  # e.g. Image(shape=(None, None, None)): ask the data.
        channels = np.asarray(source[0]["image"]).shape[-1]
    if channels not in (1, 3):
        raise ValueError(
            f"TFDS dataset {name!r}: images have {channels} channels; only 1 or 3 are supported."
        )
    records = _TfdsRecords(
        source,
        dataset=name,
        split=split,
        channels=channels,
        num_classes=num_classes,
        has_label=label_feature is not None,
    )
    return _Split(records, channels, num_classes)


def _prepared_digits_builder(data_dir: str | None) -> digits_lib.Digits:
    """The digits builder, prepared into data_dir first if needed (offline, ~1 s).

    Several processes may prepare the same data_dir at once (the processes of
    one job, or parallel tests). Each writes into its own temporary directory
    and renames it into place; the first rename wins and the others fail with
    "Destination ... already exists". Such a failure is not an error once the
    dataset is there.
    """
    builder = digits_lib.Digits(data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return builder
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    except Exception:
        if not digits_lib.Digits(data_dir=data_dir, file_format="array_record").is_prepared():
            raise
    # A fresh builder reads the prepared dataset's info (its splits) from
    # data_dir, whichever process wrote it.
    return digits_lib.Digits(data_dir=data_dir, file_format="array_record")


def _open_split(config: DataConfig, split: str) -> _Split:
    """Returns the validated random-access records of one split of `config`."""
    if config.name == FOLDER:
        return _folder_split(config.data_dir, split)
    if config.name == DIGITS:
        builder = _prepared_digits_builder(config.data_dir)
    else:
        try:
            builder = tfds.builder(config.name, data_dir=config.data_dir)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise ValueError(
                f"Unknown dataset {config.name!r}: not 'digits', not 'folder', not a TFDS "
                f"dataset name, and not prepared in data_dir {config.data_dir!r}."
            ) from e
        except AssertionError as e:  # TFDS's way of saying e.g. "no such version"
            raise ValueError(
                f"Cannot open dataset {config.name!r} (data_dir {config.data_dir!r}): {e}"
            ) from e
    return _builder_split(builder, name=config.name, data_dir=config.data_dir, split=split)


# ---------------------------------------------------------------------------
# Per-example transforms (top-level and picklable, for grain worker processes).
# ---------------------------------------------------------------------------


def _center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Returns uint8 [size, size, C]: the central square of `image`, resized bilinearly.

    Args:
        image: uint8 [h, w, C] with C in {1, 3}.
        size: output side length.
    """
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[top : top + side, left : left + side]
    if side == size:
        return square
    pil = PIL.Image.fromarray(square[:, :, 0] if square.shape[-1] == 1 else square)
    resized = np.asarray(pil.resize((size, size), resample=PIL.Image.Resampling.BILINEAR))
    return resized.reshape(size, size, square.shape[-1])


class _ToModelInput(grain.transforms.Map):
    """{"image": uint8 [h, w, C]} -> {"image": float32 [S, S, C] in [-1, 1], "label": int32}."""

    def __init__(self, image_size: int):
        self._image_size = image_size

    def map(self, element):
        image = _center_crop_resize(element["image"], self._image_size)
        return {
            "image": image.astype(np.float32) / np.float32(127.5) - np.float32(1.0),
            "label": np.int32(element["label"]),
        }


def _random_horizontal_flip(element, rng: np.random.Generator):
    """Mirrors the image left-right with probability 1/2 (grain's per-index rng)."""
    if rng.random() < 0.5:
        element = dict(element, image=np.ascontiguousarray(element["image"][:, ::-1, :]))
    return element


class _RowOfGlobalBatch(grain.transforms.Map):
    """Local index n -> the stream element this process holds at that position.

    Local batch k (rows n = k b .. k b + b - 1, b = B / P) is rows p b .. p b + b - 1
    of global batch k, which starts at stream element E + k B, i.e. stream
    elements E + k B + p b .. E + k B + p b + b - 1.
    """

    def __init__(
        self,
        stream: grain.MapDataset,
        *,
        first_example: int,
        global_batch: int,
        local_batch: int,
        first_row: int,
    ):
        self._stream = stream
        self._first_example = first_example
        self._global_batch = global_batch
        self._local_batch = local_batch
        self._first_row = first_row

    def map(self, element):
        batch, row = divmod(element, self._local_batch)
        return self._stream[
            self._first_example + batch * self._global_batch + self._first_row + row
        ]


class _PaddedExample(grain.transforms.Map):
    """Index i -> example i of `shard` with mask 1, or a zero example with mask 0."""

    def __init__(self, shard: grain.MapDataset, example_shape: tuple[int, int, int]):
        self._shard = shard
        self._length = len(shard)
        self._example_shape = example_shape

    def map(self, element):
        if element < self._length:
            return dict(self._shard[element], mask=np.float32(1.0))
        return {
            "image": np.zeros(self._example_shape, np.float32),
            "label": np.int32(0),
            "mask": np.float32(0.0),
        }


# ---------------------------------------------------------------------------
# The training iterator: position counted in examples.
# ---------------------------------------------------------------------------

_STATE_KEYS = ("next_example", "global_batch_size", "seed", "split_length")


class _TrainIterator(grain.DatasetIterator):
    """This process's rows of the global batches of `stream`, from a position E.

    The state is where the job is in `stream`, counted in examples (the same on
    every process), so it does not depend on the batch size, process count or
    worker count it is restored into: `set_state` rebuilds the grain pipeline
    to start at E. See the module docstring ("Resuming").
    """

    # Read by `checkpointing.Checkpointer.restore`: every process's saved state is
    # the same, so a job of another process count may restore any one of them.
    state_is_global = True

    def __init__(
        self,
        stream: grain.MapDataset,
        *,
        global_batch_size: int,
        process_index: int,
        process_count: int,
        worker_count: int,
        seed: int,
        split_length: int,
    ):
        super().__init__()
        self._stream = stream
        self._global_batch_size = global_batch_size
        self._local_batch_size = global_batch_size // process_count
        self._first_row = process_index * self._local_batch_size
        self._worker_count = worker_count
        self._seed = seed
        self._split_length = split_length
        self._next_example = 0
        self._batches = None  # built on first use, so a restore builds it once

    def _batches_from(self, first_example: int) -> grain.DatasetIterator:
        rows = grain.MapDataset.range(
            (len(self._stream) - first_example) // self._global_batch_size
            * self._local_batch_size
        ).map(
            _RowOfGlobalBatch(
                self._stream,
                first_example=first_example,
                global_batch=self._global_batch_size,
                local_batch=self._local_batch_size,
                first_row=self._first_row,
            )
        )
        # Batching the MapDataset (not the IterDataset) makes a batch the unit
        # of work: prefetch threads and worker processes each build whole
        # batches, and worker w builds batches w, w + W, ..., so the stream is
        # the same for every worker_count.
        batches = rows.batch(self._local_batch_size, drop_remainder=True).to_iter_dataset(
            _READ_OPTIONS
        )
        if self._worker_count:
            # grain's worker processes read absl flags; outside an absl.app
            # program (tests, notebooks) nothing has parsed them yet, so take
            # the defaults.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            batches = batches.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=self._worker_count)
            )
        return iter(batches)

    def _started(self) -> grain.DatasetIterator:
        if self._batches is None:
            self._batches = self._batches_from(self._next_example)
        return self._batches

    def __next__(self):
        self._assert_not_closed()
        batch = next(self._started())
        self._next_example += self._global_batch_size
        return batch

    def get_state(self) -> dict[str, int]:
        return {
            "next_example": self._next_example,
            "global_batch_size": self._global_batch_size,
            "seed": self._seed,
            "split_length": self._split_length,
        }

    def set_state(self, state: dict[str, int]) -> None:
        next_example = self._next_example_of(state)
        if self._batches is not None:
            self._batches.close()
            self._batches = None
        self._next_example = next_example

    def _next_example_of(self, state) -> int:
        """Checks a saved state and returns its position E in examples."""
        if isinstance(state, dict) and set(state) == {"next_index"}:
            # grain's own state, written by earlier versions: batches of this size.
            next_index = state["next_index"]
            _check_state_value("next_index", next_index, state)
            return next_index * self._global_batch_size
        if isinstance(state, dict) and isinstance(state.get("iterators_in_use_states"), list):
            # grain's multi-worker state, written by earlier versions with worker_count > 0:
            # worker w made batches w, w + W, ... and they were taken in turn, so the
            # batches taken are the sum of the workers' next_index.
            workers = state["iterators_in_use_states"]
            if workers and all(isinstance(w, dict) and set(w) == {"next_index"} for w in workers):
                for worker in workers:
                    _check_state_value("next_index", worker["next_index"], state)
                return sum(w["next_index"] for w in workers) * self._global_batch_size
        if not isinstance(state, dict) or set(state) != set(_STATE_KEYS):
            raise ValueError(
                f"Training iterator state {state!r} is not one this pipeline writes: "
                f"expected the keys {list(_STATE_KEYS)} (or an earlier version's "
                "{'next_index': n}, or its multi-worker form with 'iterators_in_use_states')."
            )
        for key in _STATE_KEYS:
            _check_state_value(key, state[key], state)
        for key, current in (("seed", self._seed), ("split_length", self._split_length)):
            if state[key] != current:
                logger.warning(
                    "Resuming the training data at example %d of a different stream: "
                    "the saved iterator state has %s %d, this iterator %s %d.",
                    state["next_example"], key, state[key], key, current,
                )
        return state["next_example"]

    def start_prefetch(self) -> None:
        self._started().start_prefetch()

    def close(self) -> None:
        # getattr: close() also runs from __del__, after a failed __init__.
        batches = getattr(self, "_batches", None)
        if batches is not None:
            batches.close()
        super().close()

    def __str__(self) -> str:
        return (
            f"TrainIterator(next_example={self._next_example}, "
            f"global_batch_size={self._global_batch_size})"
        )


def _check_state_value(key: str, value, state) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(
            f"Training iterator state {state!r}: {key} must be a non-negative int, "
            f"got {value!r}."
        )


# ---------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


def _check_processes(process_index, process_count) -> None:
    _check_positive_int("process_count", process_count)
    if (
        isinstance(process_index, bool)
        or not isinstance(process_index, (int, np.integer))
        or not 0 <= process_index < process_count
    ):
        raise ValueError(
            f"process_index must be an int in [0, {process_count}), got {process_index!r}."
        )


def dataset_info(config: DataConfig) -> DatasetInfo:
    """Returns image shape after resizing, number of classes and split sizes."""
    train = _open_split(config, config.train_split)
    evaluation = _open_split(config, config.eval_split)
    if train.channels != evaluation.channels:
        raise ValueError(
            f"dataset {config.name!r}: train split {config.train_split!r} has "
            f"{train.channels} channels but eval split {config.eval_split!r} has "
            f"{evaluation.channels}."
        )
    return DatasetInfo(
        image_shape=(config.image_size, config.image_size, train.channels),
        num_classes=train.num_classes,
        num_train=len(train.records),
        num_eval=len(evaluation.records),
    )


def create_train_iterator(
    config: DataConfig,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
) -> grain.DatasetIterator:
    """Returns an endless, checkpointable iterator over this process's training batches.

    Each `next()` gives {"image": float32 [b, S, S, C] in [-1, 1], "label": int32
    [b]} with b = global_batch_size // process_count: rows
    process_index * b .. (process_index + 1) * b - 1 of the job's global batch,
    so the processes' batches, concatenated in process order, are the batch of
    a one-process job. The split is reshuffled every epoch; with
    `config.random_flip` each image is mirrored with probability 1/2, decided
    by (seed, position in the stream).

    The iterator's `get_state()`/`set_state()` (or grain's Orbax
    `CheckpointHandler`) save and restore the position in the stream, counted
    in examples and the same on every process: a state restores exactly into
    an iterator of any global batch size, process count or worker_count (see
    the module docstring, "Resuming").

    Args:
        config: the data to read.
        global_batch_size: batch size summed over processes; divisible by
            process_count.
        seed: non-negative int; the same seed gives the same batches.
        process_index: this process, in [0, process_count).
        process_count: number of processes reading disjoint shards.
        worker_count: grain worker processes (0: threads in this process only;
            PNG decoding holds the GIL, so real runs want a few). Neither the
            batches nor the iterator state depend on it. The workers are
            started with "spawn", which imports the main module again: a
            script of your own needs its ``if __name__ == "__main__":`` guard
            (train.py has it).
    """
    _check_processes(process_index, process_count)
    _check_positive_int("global_batch_size", global_batch_size)
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by "
            f"process_count {process_count}."
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
    if (
        isinstance(worker_count, bool)
        or not isinstance(worker_count, (int, np.integer))
        or worker_count < 0
    ):
        raise ValueError(f"worker_count must be a non-negative int, got {worker_count!r}.")

    split = _open_split(config, config.train_split)
    # The seeds do not depend on the process: every process indexes the same
    # stream (and decodes only its own rows of each global batch).
    shuffle_seed, flip_seed = np.random.SeedSequence(int(seed)).generate_state(2)
    # Shuffle before repeat: grain reseeds the shuffle with seed + epoch, so each
    # epoch is a fresh permutation of the split.
    stream = grain.MapDataset.source(_records_at_size(split, config.image_size)).shuffle(
        seed=int(shuffle_seed)).repeat()
    stream = stream.map(_ToModelInput(config.image_size))
    if config.random_flip:
        stream = stream.random_map(_random_horizontal_flip, seed=int(flip_seed))
    return _TrainIterator(
        stream,
        global_batch_size=int(global_batch_size),
        process_index=int(process_index),
        process_count=int(process_count),
        worker_count=int(worker_count),
        seed=int(seed),
        split_length=len(split.records),
    )


def create_eval_iterator(
    config: DataConfig,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    max_batches: int | None = None,
) -> grain.DatasetIterator:
    """Returns one ordered pass over this process's shard of the eval split.

    Batches are {"image": float32 [b, S, S, C], "label": int32 [b], "mask":
    float32 [b]} with b = batch_size always: the shard is padded with zero
    images of mask 0 up to ceil(ceil(N / process_count) / b) batches, the same
    count on every process (so collective ops in a jitted eval step line up).
    Summed over processes, the mask-1 examples are the split, each exactly once.

    Args:
        config: the data to read (config.eval_split).
        batch_size: per-process batch size.
        process_index: this process, in [0, process_count).
        process_count: number of processes reading disjoint shards.
        max_batches: stop after this many batches (None: the whole pass); only
            these are read, where prefetching would otherwise decode some more.
    """
    _check_processes(process_index, process_count)
    _check_positive_int("batch_size", batch_size)
    if max_batches is not None:
        _check_positive_int("max_batches", max_batches)
    split = _open_split(config, config.eval_split)
    num_examples = len(split.records)
    per_process = -(-num_examples // process_count)
    num_batches = -(-per_process // batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    records = _records_at_size(split, config.image_size)
    shard = grain.MapDataset.source(records)[process_index::process_count]
    shard = shard.map(_ToModelInput(config.image_size))
    example_shape = (config.image_size, config.image_size, split.channels)
    dataset = grain.MapDataset.range(num_batches * batch_size).map(
        _PaddedExample(shard, example_shape)
    )
    return iter(dataset.batch(batch_size).to_iter_dataset(_READ_OPTIONS))

"""A TFDS builder for scikit-learn's 8x8 handwritten digits, buildable offline.

`sklearn.datasets.load_digits()` ships 1,797 grayscale 8x8 digit images with
integer intensities 0..16 inside scikit-learn itself (the test half of the UCI
"optdigits" data, Alpaydin & Kaynak 1998), so this dataset prepares in about a
second with no network and no TensorFlow. It is small enough for end-to-end
diffusion runs on a laptop CPU.

Features (one example):
    image: uint8 (8, 8, 1), `round(v * 255 / 16)` of sklearn's intensity `v`
        (0 -> 0, 16 -> 255; numpy's round-half-to-even).
    label: ClassLabel with 10 classes (the digit 0..9).
    index: int64, the example's position in `load_digits()` (0..1796), kept so
        any record can be traced back to sklearn's array.

Splits (fixed and deterministic): "train" is `load_digits()` examples
[0, 1500), "test" is [1500, 1797) (297 examples). sklearn stores the digits
roughly cycling through the classes, so both splits are near class-balanced
(train 146..153 per class, test 27..33).

Preparing without TensorFlow: TFDS 4.9.10 serializes records with its own
protobuf copy (`tensorflow_datasets.proto.tf_example_pb2`) and writes
array_record files without TF, but `tfds.features.Image` encodes a *numpy*
image with `tf.image.encode_png`. A `PIL.Image` is instead encoded with PIL, so
`_generate_examples` yields PIL images. Reading back through
`builder.as_data_source` decodes the PNG with PIL, again without TF. TFDS also
needs the `importlib_resources` backport to locate a builder's code; `Digits`
overrides `code_path` so it does not (see below).
"""

from __future__ import annotations

from etils import epath
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

NUM_TRAIN = 1500
NUM_EXAMPLES = 1797
MAX_INTENSITY = 16


def digits_uint8_images() -> tuple[np.ndarray, np.ndarray]:
    """Returns sklearn's digits as (uint8 images [1797, 8, 8] on 0..255, labels [1797])."""
    # Imported here: scikit-learn is only needed when the dataset is prepared.
    from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top

    digits = sk_datasets.load_digits()
    images = np.round(digits.images * (255.0 / MAX_INTENSITY)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


class Digits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """scikit-learn's 8x8 digits as a TFDS dataset (train 1500 / test 297).

    Not registered with TFDS (no import-time side effect): construct it directly,
    `Digits(data_dir=..., file_format="array_record")`, then
    `download_and_prepare()` and `as_data_source(split)`.
    """

    name = "digits"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: sklearn load_digits, 1500/297 split."}

    # TFDS 4.9.10 finds a builder's source file through `importlib_resources`
    # (a PyPI backport it only requires on Python < 3.9), and
    # `download_and_prepare` fails with ModuleNotFoundError without it. The path
    # is only used to look for a checksums file, which a dataset with nothing to
    # download does not have.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        # `dataset_info_from_configs` would read package metadata files (a
        # CITATIONS.bib next to the module); the plain constructor needs none.
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "scikit-learn's load_digits(): 8x8 grayscale handwritten digits, "
                "intensities 0..16 scaled to round(v * 255 / 16). Train: examples "
                "[0, 1500), test: [1500, 1797)."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(8, 8, 1), dtype=np.uint8, encoding_format="png"
                    ),
                    "label": tfds.features.ClassLabel(num_classes=10),
                    "index": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
            citation=(
                "@misc{alpaydin1998optdigits, author={Alpaydin, E. and Kaynak, C.},"
                " title={Optical Recognition of Handwritten Digits}, year={1998},"
                " howpublished={UCI Machine Learning Repository}}"
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the data ships with scikit-learn.
        return {
            "train": self._generate_examples(0, NUM_TRAIN),
            "test": self._generate_examples(NUM_TRAIN, NUM_EXAMPLES),
        }

    def _generate_examples(self, start: int, stop: int):
        images, labels = digits_uint8_images()
        for index in range(start, stop):
            # A PIL image, not a numpy array: TFDS encodes numpy images with TF.
            yield index, {
                "image": PIL.Image.fromarray(images[index], mode="L"),
                "label": int(labels[index]),
                "index": index,
            }

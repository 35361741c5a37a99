"""A tiny prepared TFDS dataset for the TFDS-source tests: a real builder, prepared into a tmp ``data_dir``
(several record files, so file shuffling matters), with two unusable examples among good ones: undecodable
image bytes (the ``Image`` feature stores given bytes as they are) and an empty caption.

``tfds.testing.mock_data`` (used too, in tests/test_data_tfds_source.py) cannot hold chosen bytes, so per-process
shares, resume and skip counting are tested on this one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from ipadapter_jax.data.synthetic import encode_image, random_image

NAME = "ipadapter_tiny_captions"
NUM_EXAMPLES = 40
CORRUPT_INDEX, EMPTY_CAPTION_INDEX = 5, 11
IMAGE_SIZE = (64, 80)  # height, width: larger than every resolution the tests train or crop at


def example(index: int) -> dict:
    if index == CORRUPT_INDEX:
        image = b"\x89PNG\r\n\x1a\n this is not an image"
    else:
        image = encode_image(random_image(*IMAGE_SIZE, seed=1000 + index), "PNG")
    caption = "" if index == EMPTY_CAPTION_INDEX else f"caption {index}"
    return {"image": image, "caption": caption, "index": index}


class IpadapterTinyCaptions(tfds.core.GeneratorBasedBuilder):
    """Registered as ``ipadapter_tiny_captions`` when this module is imported."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                "caption": tfds.features.Text(),
                "index": tfds.features.Scalar(dtype=np.int64),
            }),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(NUM_EXAMPLES):
            yield i, example(i)


def prepare(data_dir: str | Path, num_files: int = 4) -> str:
    """Writes the dataset into ``data_dir`` (idempotent); returns ``data_dir`` as a string."""
    builder = IpadapterTinyCaptions(data_dir=str(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=num_files))
    return str(data_dir)

"""TFDS source. tensorflow-datasets is not installed here, so only the parts that do not need it are
tested: the clear ImportError and the element -> (image bytes, caption) extraction. The reading
itself (builder, split_for_jax_process, skip-based resume) is untested in this environment."""

import sys

import numpy as np
import pytest

from ipadapter_jax.data.examples import BatchCollator, ExampleProcessor
from ipadapter_jax.data.tfds_source import TfdsSource, element_image_and_caption


def test_missing_tfds_gives_a_clear_import_error(monkeypatch):
    # A None entry in sys.modules makes the import fail even where tfds is installed.
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
        TfdsSource(
            "coco_captions",
            global_batch_size=2,
            processor=ExampleProcessor(resolution=16),
            collator=BatchCollator(tokenizer=None),
            process_index=0,
            process_count=1,
        )


def test_element_extraction():
    jpeg = b"\xff\xd8 fake"
    assert element_image_and_caption({"image": jpeg, "caption": b"a dog"}, "image", "caption") == (jpeg, "a dog", None)
    # COCO-style nested sequence of captions: the first one, deterministically.
    element = {"image": np.array(jpeg, dtype=object), "captions": {"text": np.array([b" first ", b"second"], dtype=object)}}
    assert element_image_and_caption(element, "image", "captions/text") == (jpeg, "first", None)
    assert element_image_and_caption({"caption": b"x"}, "image", "caption")[2] == "missing_image"
    assert element_image_and_caption({"image": jpeg}, "image", "caption")[2] == "missing_caption"
    assert element_image_and_caption({"image": jpeg, "caption": b"  "}, "image", "caption")[2] == "missing_caption"
    assert element_image_and_caption({"image": jpeg, "caption": b"\xff\xfe"}, "image", "caption")[2] == "bad_caption"
    assert element_image_and_caption({"image": jpeg, "caption": 3}, "image", "caption")[2] == "bad_caption"

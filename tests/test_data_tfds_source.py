"""The TFDS source on a real prepared dataset (tests/tfds_support.py) and on ``tfds.testing.mock_data``:
batch layout and captions, disjoint per-process shares, deterministic order, exact resume, unusable examples
skipped and counted, TensorFlow kept off the import path and off the accelerators."""

import subprocess
import sys

import numpy as np
import pytest

import tensorflow_datasets as tfds  # optional for users; in the test extra
import tfds_support  # noqa: E402
from ipadapter_jax.data.clip_image_processing import ClipImageProcessingConfig  # noqa: E402
from ipadapter_jax.data.conditioning_dropout import DropoutRates  # noqa: E402
from ipadapter_jax.data.examples import BatchCollator, ExampleProcessor  # noqa: E402
from ipadapter_jax.toy.toy_tokenizer import write_toy_tokenizer  # noqa: E402
from ipadapter_jax.data.tfds_source import TfdsSource, element_image_and_caption  # noqa: E402
from ipadapter_jax.data.tokenize import CaptionTokenizer  # noqa: E402

SMALL_CLIP = ClipImageProcessingConfig(shortest_edge=24, crop_height=24, crop_width=24)
GOOD = tfds_support.NUM_EXAMPLES - 2


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return CaptionTokenizer(write_toy_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tfds_support.prepare(tmp_path_factory.mktemp("tfds"))


def make_source(data_dir, tokenizer, *, batch=4, seed=0, process_index=0, process_count=1, **kwargs):
    return TfdsSource(
        tfds_support.NAME, data_dir=data_dir, global_batch_size=batch,
        processor=ExampleProcessor(resolution=16, clip_config=SMALL_CLIP),
        collator=BatchCollator(tokenizer, dropout=DropoutRates(0.2, 0.2, 0.2), dropout_seed=3),
        seed=seed, process_index=process_index, process_count=process_count, **kwargs)


def indices(batches):
    return [int(c.split()[1]) for b in batches for c in b["caption"]]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], np.ndarray):
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)
            else:
                assert x[k] == y[k], k


def test_batches_have_the_layout_and_captions(data_dir, tokenizer):
    source = make_source(data_dir, tokenizer, batch=4)
    batch = next(source)
    assert batch["pixels"].shape == (4, 16, 16, 3) and batch["pixels"].dtype == np.float32
    assert -1 <= batch["pixels"].min() and batch["pixels"].max() <= 1
    assert batch["clip_pixels"].shape == (4, 24, 24, 3)
    assert batch["input_ids"].shape == (4, tokenizer.max_length)
    assert batch["original_size"].tolist() == [list(tfds_support.IMAGE_SIZE)] * 4
    assert batch["drop_text"].shape == batch["drop_image"].shape == (4,)
    # Each image is the one its caption names (decoded by our PIL path, checked against the source PNG).
    for caption, key in zip(batch["caption"], batch["key"]):
        assert caption.startswith("caption ") and key.startswith("0/")
    assert batch["counters"]["used"] == 4


def test_processes_get_disjoint_shares_that_cover_the_split(data_dir, tokenizer):
    seen = []
    for p in (0, 1):
        source = make_source(data_dir, tokenizer, batch=2, process_index=p, process_count=2, num_epochs=1)
        assert source.local_batch_size == 1
        taken = indices(list(source))
        assert len(taken) == len(set(taken))
        seen.append(set(taken))
    assert not seen[0] & seen[1]
    good = set(range(tfds_support.NUM_EXAMPLES)) - {tfds_support.CORRUPT_INDEX, tfds_support.EMPTY_CAPTION_INDEX}
    assert seen[0] | seen[1] == good


def test_order_is_deterministic_in_the_seed_and_epochs_reshuffle(data_dir, tokenizer):
    one_epoch = GOOD // 2  # batches of 2
    a = indices([next(s) for s in [make_source(data_dir, tokenizer, batch=2, seed=7)] for _ in range(2 * one_epoch)])
    b = indices([next(s) for s in [make_source(data_dir, tokenizer, batch=2, seed=7)] for _ in range(2 * one_epoch)])
    c = indices([next(s) for s in [make_source(data_dir, tokenizer, batch=2, seed=8)] for _ in range(one_epoch)])
    assert a == b
    assert sorted(a[:GOOD]) == sorted(a[GOOD:]) and len(set(a[:GOOD])) == GOOD  # every example once an epoch
    assert a[:GOOD] != a[GOOD:]  # a new file order in epoch 1
    assert c != a[:GOOD]


def test_exact_resume_from_state_across_an_epoch_boundary_with_decode_threads(data_dir, tokenizer):
    reference = make_source(data_dir, tokenizer, batch=4, seed=1)
    expected = [next(reference) for _ in range(14)]  # 56 examples: into epoch 1

    # Decoding in threads (the interrupted run) must not change what the inline reference gives.
    first = make_source(data_dir, tokenizer, batch=4, seed=1, num_decode_threads=2)
    head = [next(first) for _ in range(6)]
    state = first.get_state()
    first.close()
    resumed = make_source(data_dir, tokenizer, batch=4, seed=1, state=state, num_decode_threads=2)
    tail = [next(resumed) for _ in range(8)]
    assert_batches_equal(head + tail, expected)
    assert resumed.get_state() == reference.get_state()
    with pytest.raises(ValueError, match="fingerprint"):
        make_source(data_dir, tokenizer, batch=4, seed=2, state=state)


def test_unusable_examples_are_skipped_and_counted(data_dir, tokenizer):
    source = make_source(data_dir, tokenizer, batch=2, num_epochs=1)
    batches = list(source)
    assert len(batches) == GOOD // 2
    counters = source.get_state()["counters"]
    assert counters["used"] == GOOD
    assert counters["skipped"] == {"undecodable_image": 1, "missing_caption": 1}
    assert batches[-1]["counters"] == counters


def test_an_epoch_with_no_usable_example_is_an_error(data_dir, tokenizer):
    # No record has the caption feature named: a whole epoch gives nothing, and the source says so (as the
    # webdataset source does) rather than reading on (num_epochs bounds the test should it not).
    source = make_source(data_dir, tokenizer, batch=2, num_epochs=3, caption_key="no_such_feature")
    with pytest.raises(RuntimeError, match="gave no usable sample"):
        next(source)
    assert source.counters.used == 0 and source.counters.skipped["missing_caption"] > tfds_support.NUM_EXAMPLES


def test_mock_data_batches(tmp_path, tokenizer):
    # mock_data fakes the dataset from its features (random PNGs and texts), with no prepared files at all.
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        source = make_source(str(tmp_path / "nothing_here"), tokenizer, batch=3)
        batches = [next(source), next(source)]
    for batch in batches:
        assert batch["pixels"].shape == (3, 16, 16, 3) and batch["clip_pixels"].shape == (3, 24, 24, 3)
        assert all(isinstance(c, str) and c for c in batch["caption"])
        assert batch["input_ids"].shape == (3, tokenizer.max_length)
    assert source.get_state()["counters"]["used"] == 6


def test_tensorflow_is_imported_only_by_a_tfds_source_and_sees_no_accelerator():
    code = ("import sys, ipadapter_jax.train, ipadapter_jax.data.tfds_source as t\n"
            "assert 'tensorflow' not in sys.modules, 'imported by ipadapter_jax.train'\n"
            "t.import_tfds()\n"
            "import tensorflow as tf\n"
            "assert tf.config.get_visible_devices('GPU') == []\n"
            "assert tf.config.threading.get_inter_op_parallelism_threads() == 1\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_tfds_gives_a_clear_import_error(monkeypatch):
    # A None entry in sys.modules makes the import fail even though tfds is installed.
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
        TfdsSource("coco_captions", global_batch_size=2, processor=ExampleProcessor(resolution=16),
                   collator=BatchCollator(tokenizer=None), process_index=0, process_count=1)


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

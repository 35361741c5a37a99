"""The toy world's data: determinism of the shapes dataset, its shards, the pixel classifier on clean images,
and the word-level CLIP tokenizer (checked against transformers' CLIPTokenizer)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ipadapter_jax.toy import shapes_dataset as sd
from ipadapter_jax.toy.classify import CHANCE, classify, ideal_masks
from ipadapter_jax.toy.toy_tokenizer import BOS, EOS, WORDS, build_vocab_and_merges, write_toy_tokenizer


def test_examples_are_a_function_of_seed_and_stream():
    a, b = sd.make_examples(40, seed=3, stream=5), sd.make_examples(40, seed=3, stream=5)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.specs == b.specs and a.captions == b.captions
    c = sd.make_examples(40, seed=3, stream=6)
    assert not np.array_equal(a.images, c.images)
    assert a.images.shape == (40, sd.IMAGE_SIZE, sd.IMAGE_SIZE, 3) and a.images.dtype == np.uint8


def test_examples_cover_the_palettes_and_caption_kinds():
    data = sd.make_examples(600, seed=0)
    assert {s.colour for s in data.specs} == set(sd.COLOURS)
    assert {s.shape for s in data.specs} == set(sd.SHAPES)
    assert {s.background for s in data.specs} == set(sd.BACKGROUNDS)
    full = sum(c == sd.full_caption(s.colour, s.shape) for c, s in zip(data.captions, data.specs))
    colour_only = sum(c == f"a {s.colour} shape" for c, s in zip(data.captions, data.specs))
    shape_only = sum(c == f"a {s.shape}" for c, s in zip(data.captions, data.specs))
    assert full + colour_only + shape_only == len(data)
    assert 0.4 < full / len(data) < 0.6 and colour_only > 100 and shape_only > 100
    everything_full = sd.make_examples(50, seed=0, partial_captions=False)
    assert all(c == sd.full_caption(s.colour, s.shape) for c, s in zip(everything_full.captions, everything_full.specs))
    assert sd.all_full_captions()[data.class_index[0]] == sd.full_caption(data.specs[0].colour, data.specs[0].shape)


def test_shapes_stay_inside_the_image_with_a_background_border():
    for spec in sd.make_examples(300, seed=1).specs:
        left, top, right, bottom = spec.box
        assert left >= 1 and top >= 1 and right <= sd.IMAGE_SIZE - 1 and bottom <= sd.IMAGE_SIZE - 1
        assert sd.MIN_SIZE <= right - left <= sd.MAX_SIZE


def test_shards_round_trip_and_are_reused(tmp_path):
    spec = sd.write_shape_shards(tmp_path, num_shards=2, samples_per_shard=5, seed=0, heldout_samples=4)
    assert spec == str(tmp_path / "train-{00000..00001}.tar")
    samples = list(sd.read_labelled_samples(str(tmp_path / "train-00001.tar")))
    expected = sd.make_examples(5, 0, sd.TRAIN_STREAM + 1)
    assert len(samples) == 5
    for (image, labels), want_image, want_spec, caption in zip(samples, expected.images, expected.specs,
                                                                 expected.captions):
        np.testing.assert_array_equal(image, want_image)  # PNG: lossless
        assert labels["caption"] == caption and labels["colour"] == want_spec.colour
        assert labels["shape"] == want_spec.shape and labels["full_caption"].startswith("a ")
    heldout = list(sd.read_labelled_samples(sd.heldout_shard(tmp_path)))
    assert [l["caption"] for _, l in heldout] == [l["full_caption"] for _, l in heldout]
    stamp = (tmp_path / "train-00000.tar").stat().st_mtime_ns
    sd.write_shape_shards(tmp_path, num_shards=2, samples_per_shard=5, seed=0, heldout_samples=4)
    assert (tmp_path / "train-00000.tar").stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / sd.MARKER).read_text())["num_shards"] == 2


def test_shards_feed_the_training_source(tmp_path):
    from ipadapter_jax.data.examples import BatchCollator, ExampleProcessor
    from ipadapter_jax.data.tokenize import CaptionTokenizer
    from ipadapter_jax.data.webdataset_source import WebDatasetSource

    spec = sd.write_shape_shards(tmp_path / "shards", num_shards=2, samples_per_shard=4, heldout_samples=1)
    tokenizer = CaptionTokenizer(write_toy_tokenizer(tmp_path / "tok"))
    source = WebDatasetSource(spec, global_batch_size=4, processor=ExampleProcessor(sd.IMAGE_SIZE, None),
                              collator=BatchCollator(tokenizer), process_index=0, process_count=1,
                              num_decode_threads=0)
    batch = next(iter(source))
    assert batch["pixels"].shape == (4, sd.IMAGE_SIZE, sd.IMAGE_SIZE, 3)
    assert batch["input_ids"].shape == (4, 77) and all(c.startswith("a ") for c in batch["caption"])


def test_classifier_reads_clean_dataset_images():
    data = sd.make_examples(400, seed=7)
    readings = [classify(image) for image in data.images]
    assert all(r.colour == s.colour for r, s in zip(readings, data.specs))
    assert all(r.shape == s.shape for r, s in zip(readings, data.specs))
    float_reading = classify(data.images[0].astype(np.float32) / 255.0)
    assert (float_reading.colour, float_reading.shape) == (data.specs[0].colour, data.specs[0].shape)
    assert CHANCE == {"colour": 0.25, "shape": 1 / 3}


def test_classifier_finds_nothing_on_a_blank_image():
    reading = classify(np.full((32, 32, 3), 200, np.uint8))
    assert reading.colour is None and reading.shape is None


def test_ideal_masks_fill_their_boxes_as_expected():
    masks = ideal_masks(64, 64)
    assert masks["square"].mean() == 1.0
    assert abs(masks["circle"].mean() - np.pi / 4) < 0.02
    assert abs(masks["triangle"].mean() - 0.5) < 0.02


def test_tokenizer_has_one_token_per_word_in_transformers(tmp_path):
    from transformers import CLIPTokenizer

    folder = write_toy_tokenizer(tmp_path / "tok")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    assert tokenizer.model_max_length == 77
    vocab, _ = build_vocab_and_merges()
    assert vocab[BOS] == len(vocab) - 2 and vocab[EOS] == len(vocab) - 1
    for word in WORDS:
        assert tokenizer.tokenize(word) == [word + "</w>"], word
    ids = tokenizer("a red circle", padding="max_length", max_length=77)["input_ids"]
    assert ids[:5] == [vocab[BOS], vocab["a</w>"], vocab["red</w>"], vocab["circle</w>"], vocab[EOS]]
    assert ids[5:] == [vocab[EOS]] * 72
    # Unknown words still tokenize (character by character).
    assert tokenizer.tokenize("zebra") == ["z", "e", "b", "r", "a</w>"]


@pytest.mark.parametrize("word", ["red", "green", "triangle", "grey"])
def test_word_merges_do_not_depend_on_later_words(word):
    vocab, merges = build_vocab_and_merges(WORDS)
    smaller, _ = build_vocab_and_merges(WORDS[: WORDS.index(word) + 1])
    assert word + "</w>" in vocab and word + "</w>" in smaller


def test_write_shards_command_matches_what_training_writes(tmp_path):
    import subprocess
    import sys

    from ipadapter_jax.toy.shapes_dataset import write_shape_shards

    subprocess.run([sys.executable, "-m", "ipadapter_jax.toy.write_shards", "--out", str(tmp_path / "cli"),
                    "--num-shards", "2", "--samples-per-shard", "4", "--heldout-samples", "4"], check=True)
    write_shape_shards(tmp_path / "lib", num_shards=2, samples_per_shard=4, heldout_samples=4)
    names = ["train-00000.tar", "train-00001.tar", "heldout-00000.tar"]
    for name in names:
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "lib" / name).read_bytes(), name

"""The bad-input corpus (tests/bad_inputs/corpus.py) through the whole host data pipeline.

Every sample case sits in a shard between two good samples and goes through `WebDatasetSource`
(decode, crop, CLIP preprocessing, tokenisation, batching); every shard case sits between two good
shards. Each must be skipped and counted under its reason, or, when it is valid, come out right;
never a crash, never a non-finite or out-of-range value in a batch, never a neighbour lost or
misaligned. Nothing here touches the network: unreachable shards are missing paths, failing
``pipe:`` commands and an unknown URL scheme.
"""

import json

import numpy as np
import pytest
from PIL import Image

from bad_inputs import encoded as enc
from bad_inputs.corpus import SAMPLE_CASES, SHARD_CASES, SHARD_KEYS, RESOLUTION
from ipadapter_jax.data.clip_image_processing import ClipImageProcessingConfig
from ipadapter_jax.data.examples import BatchCollator, ExampleProcessor
from ipadapter_jax.data.image_ops import ImageDecodeError, decode_image
from ipadapter_jax.data.synthetic import encode_image, random_image, write_image_shard, write_tar
from ipadapter_jax.data.tokenize import CaptionTokenizer
from ipadapter_jax.toy.toy_tokenizer import write_toy_tokenizer
from ipadapter_jax.data.webdataset_source import WebDatasetSource

SMALL_CLIP = ClipImageProcessingConfig(shortest_edge=24, crop_height=24, crop_width=24)
CLIP_LOW = (0.0 - np.asarray(SMALL_CLIP.image_mean)) / np.asarray(SMALL_CLIP.image_std)
CLIP_HIGH = (1.0 - np.asarray(SMALL_CLIP.image_mean)) / np.asarray(SMALL_CLIP.image_std)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return CaptionTokenizer(write_toy_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer"))


def processor(**overrides) -> ExampleProcessor:
    return ExampleProcessor(resolution=RESOLUTION, clip_config=SMALL_CLIP, **overrides)


def make_source(shards, tokenizer, *, batch=1, threads=0, processor_options=None, **kwargs):
    return WebDatasetSource(
        shards, global_batch_size=batch, processor=processor(**(processor_options or {})),
        collator=BatchCollator(tokenizer), shuffle_shards=False, num_epochs=1, process_index=0,
        process_count=1, num_decode_threads=threads, **kwargs)


def good_members(key: str, seed: int) -> list[tuple[str, bytes]]:
    """A good sample, captioned in both a txt and a json member (for the json-caption cases)."""
    caption = f"the {key} photo"
    return [(f"{key}.jpg", encode_image(random_image(24, 20, seed))), (f"{key}.txt", caption.encode()),
            (f"{key}.json", json.dumps({"caption": caption}).encode())]


def assert_sane(batch: dict, tokenizer: CaptionTokenizer, size: int) -> None:
    """No garbage: right shapes and dtypes, finite values inside each field's range."""
    pixels, clip = batch["pixels"], batch["clip_pixels"]
    assert pixels.shape == (size, RESOLUTION, RESOLUTION, 3) and pixels.dtype == np.float32
    assert np.isfinite(pixels).all() and pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert clip.shape == (size, 24, 24, 3) and clip.dtype == np.float32 and np.isfinite(clip).all()
    assert (clip >= CLIP_LOW - 1e-5).all() and (clip <= CLIP_HIGH + 1e-5).all()
    ids = batch["input_ids"]
    assert ids.shape == (size, 77) and ids.dtype == np.int32
    assert (ids >= 0).all() and (ids < len(tokenizer.tokenizer)).all()
    assert (ids[:, 0] == tokenizer.tokenizer.bos_token_id).all()
    assert ((ids == tokenizer.tokenizer.eos_token_id).any(axis=1)).all()
    assert (batch["original_size"] >= 1).all() and (batch["crop_top_left"] >= 0).all()
    assert len(batch["key"]) == len(batch["caption"]) == size and all(c.strip() for c in batch["caption"])


def assert_is_good_sample(row: dict, key: str, seed: int) -> None:
    """A good neighbour came out exactly as it does on its own (nothing shifted into or out of it)."""
    image_bytes = good_members(key, seed)[0][1]
    alone = processor().process(image_bytes, f"the {key} photo", key)
    np.testing.assert_array_equal(row["pixels"][0], alone.pixels)
    np.testing.assert_array_equal(row["clip_pixels"][0], alone.clip_pixels)
    assert row["caption"] == [f"the {key} photo"]


@pytest.mark.parametrize("case", SAMPLE_CASES, ids=lambda c: c.name)
def test_sample_case(case, tmp_path, tokenizer):
    write_tar(tmp_path / "shard.tar", good_members("before", 1) + case.members() + good_members("after", 2))
    source = make_source(str(tmp_path / "shard.tar"), tokenizer, processor_options=case.processor, **case.source)
    batches = list(source)

    expected_keys = ["before", "after"] if case.skip else ["before", "case", "after"]
    assert [b["key"][0] for b in batches] == expected_keys
    for batch in batches:
        assert_sane(batch, tokenizer, 1)
    assert source.counters.skipped == ({case.skip: 1} if case.skip else {})
    assert source.counters.converted == ({case.conversion: 1} if case.conversion else {})
    assert source.counters.used == len(expected_keys) and source.counters.shards_finished == 1
    assert_is_good_sample(batches[0], "before", 1)
    assert_is_good_sample(batches[-1], "after", 2)
    if case.check is not None:
        case.check(batches[1])


def test_sample_corpus_in_one_threaded_stream(tmp_path, tokenizer):
    """All sample cases (without per-case options) in one shard, decoded ahead by 3 threads and
    batched 4 at a time: the same keys and counts as case by case, every batch sane."""
    cases = [c for c in SAMPLE_CASES if not c.source and not c.processor]
    members, used, skipped, converted = [], [], {}, {}
    for case in cases:
        members += [(name.replace("case", case.name, 1), data) for name, data in case.members()]
        if case.skip:
            skipped[case.skip] = skipped.get(case.skip, 0) + 1
        else:
            used.append(case.name)
        if case.conversion:
            converted[case.conversion] = converted.get(case.conversion, 0) + 1
    for i in range(-len(used) % 4):  # fill the last batch: a partial one is dropped
        members += good_members(f"filler{i}", 10 + i)
        used.append(f"filler{i}")
    write_tar(tmp_path / "all.tar", members)

    source = make_source(str(tmp_path / "all.tar"), tokenizer, batch=4, threads=3)
    batches = list(source)
    for batch in batches:
        assert_sane(batch, tokenizer, 4)
    assert [k for b in batches for k in b["key"]] == used
    assert source.counters.skipped == skipped and source.counters.converted == converted
    assert len(skipped) >= 6 and len(used) >= 25
    source.close()


@pytest.mark.parametrize("case", SHARD_CASES, ids=lambda c: c.name)
def test_shard_case(case, tmp_path, tokenizer):
    write_image_shard(tmp_path / "before.tar", ["b0", "b1"], size=(20, 20), seed=1)
    write_image_shard(tmp_path / "after.tar", ["a0", "a1"], size=(20, 20), seed=2)
    (tmp_path / "case").mkdir()
    url = case.build(tmp_path / "case")
    source = make_source([str(tmp_path / "before.tar"), url, str(tmp_path / "after.tar")], tokenizer)
    batches = list(source)

    keys = [b["key"][0] for b in batches]
    assert keys[:2] == ["b0", "b1"] and keys[-2:] == ["a0", "a1"]
    middle = keys[2:-2]
    if case.keys is None:
        assert middle == list(SHARD_KEYS[: len(middle)]) and len(middle) < len(SHARD_KEYS)
    else:
        assert middle == list(case.keys)
    for batch in batches:
        assert_sane(batch, tokenizer, 1)
        assert batch["caption"] == [f"a photo of {batch['key'][0]}"]
    assert source.counters.skipped == case.skips
    assert source.counters.shards_finished == 3 and source.counters.used == len(keys)


def test_bomb_guard_holds_with_pils_own_limit_disabled(monkeypatch):
    """Scripts often set ``Image.MAX_IMAGE_PIXELS = None``; our header check must still refuse."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    for data in (enc.png_claiming_size(100_000, 100_000), enc.jpeg_claiming_size(60_000, 60_000)):
        with pytest.raises(ImageDecodeError) as info:
            decode_image(data)
        assert info.value.reason == "image_too_large"


def test_out_of_range_exif_orientation_is_not_reported_as_a_rotation():
    image = enc.half_black_half_white(16, 32)
    assert not decode_image(enc.with_orientation(image, "PNG", 99)).exif_transposed
    assert decode_image(enc.with_orientation(image, "PNG", 6)).exif_transposed

"""The streaming webdataset source: batch layout, deterministic order, exact resume, skip counting."""

import json
import tarfile

import fsspec
import numpy as np
import pytest
from PIL import Image

from ipadapter_jax.data.clip_image_processing import ClipImageProcessingConfig
from ipadapter_jax.data.conditioning_dropout import DropoutRates
from ipadapter_jax.data.examples import BatchCollator, ExampleProcessor
from ipadapter_jax.data.synthetic import (
    encode_image,
    random_image,
    write_image_shard,
    write_tar,
)
from ipadapter_jax.data.tokenize import CaptionTokenizer
from ipadapter_jax.toy.toy_tokenizer import write_toy_tokenizer
from ipadapter_jax.data.webdataset_source import WebDatasetSource, shard_order

SMALL_CLIP = ClipImageProcessingConfig(shortest_edge=24, crop_height=24, crop_width=24)
NUM_SHARDS, PER_SHARD = 4, 5


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return CaptionTokenizer(write_toy_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer"))


@pytest.fixture(scope="module")
def tokenizer_2(tmp_path_factory):
    return CaptionTokenizer(write_toy_tokenizer(tmp_path_factory.mktemp("tok2") / "tokenizer_2"))


@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clean")
    for s in range(NUM_SHARDS):
        write_image_shard(folder / f"{s:05d}.tar", [f"s{s}_{i}" for i in range(PER_SHARD)], size=(20, 28))
    return str(folder / "{00000..00003}.tar")


def make_source(shards, tokenizer, *, batch=3, clip=SMALL_CLIP, random_crop=False, dropout=None,
                tokenizer_2=None, threads=0, **kwargs):
    kwargs.setdefault("process_index", 0)
    kwargs.setdefault("process_count", 1)
    return WebDatasetSource(
        shards,
        global_batch_size=batch,
        processor=ExampleProcessor(resolution=16, clip_config=clip, random_crop=random_crop),
        collator=BatchCollator(tokenizer, tokenizer_2=tokenizer_2, dropout=dropout, dropout_seed=11),
        num_decode_threads=threads,
        **kwargs,
    )


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a[key] == b[key], key


def test_batch_layout(clean_shards, tokenizer):
    batch = next(make_source(clean_shards, tokenizer, clip=ClipImageProcessingConfig()))
    assert batch["pixels"].shape == (3, 16, 16, 3) and batch["pixels"].dtype == np.float32
    assert -1.0 <= batch["pixels"].min() and batch["pixels"].max() <= 1.0
    assert batch["clip_pixels"].shape == (3, 224, 224, 3) and batch["clip_pixels"].dtype == np.float32
    assert batch["input_ids"].shape == (3, 77) and batch["input_ids"].dtype == np.int32
    assert batch["original_size"].tolist() == [[20, 28]] * 3 and batch["original_size"].dtype == np.int32
    assert batch["crop_top_left"].tolist() == [[0, 3]] * 3  # 28 * 16 / 20 = 22.4 -> 22; (22-16)//2
    assert batch["caption"] == [f"a photo of {k}" for k in batch["key"]]
    np.testing.assert_array_equal(batch["input_ids"], tokenizer(batch["caption"]))
    assert batch["counters"]["used"] == 3 and "drop_text" not in batch and "input_ids_2" not in batch


def _all_keys(source):
    return [k for batch in source for k in batch["key"]]


def test_order_is_a_function_of_seed_and_epoch(clean_shards, tokenizer):
    keys = _all_keys(make_source(clean_shards, tokenizer, batch=1, num_epochs=2, seed=5))
    assert keys == _all_keys(make_source(clean_shards, tokenizer, batch=1, num_epochs=2, seed=5))
    expected = []
    for epoch in range(2):
        for shard in shard_order(NUM_SHARDS, 5, epoch):
            expected += [f"s{shard}_{i}" for i in range(PER_SHARD)]
    assert keys == expected
    assert keys[:20] != keys[20:]  # the two epochs use different permutations (for this seed)
    assert _all_keys(make_source(clean_shards, tokenizer, batch=1, num_epochs=2, seed=6)) != keys
    unshuffled = _all_keys(make_source(clean_shards, tokenizer, batch=1, num_epochs=1, shuffle_shards=False))
    assert unshuffled == [f"s{s}_{i}" for s in range(NUM_SHARDS) for i in range(PER_SHARD)]


def test_last_partial_batch_is_dropped_with_finite_epochs(clean_shards, tokenizer):
    batches = list(make_source(clean_shards, tokenizer, batch=3, num_epochs=1))
    assert len(batches) == 6  # 20 samples // 3


@pytest.fixture(scope="module")
def messy_shards(tmp_path_factory):
    """Shards with bad samples sprinkled in, so resume must also restore the counters."""
    folder = tmp_path_factory.mktemp("messy")
    good = lambda k, seed: [(f"{k}.jpg", encode_image(random_image(20, 24, seed))), (f"{k}.txt", f"photo {k}".encode())]
    for s in range(3):
        members = []
        for i in range(6):
            key = f"m{s}_{i}"
            if i == 2:
                members += [(f"{key}.jpg", b"\xff\xd8 broken"), (f"{key}.txt", b"broken")]
            elif i == 4 and s == 1:
                members += [(f"{key}.jpg", encode_image(random_image(20, 24, i)))]  # no caption
            else:
                members += good(key, 10 * s + i)
        write_tar(folder / f"{s}.tar", members)
    return [str(folder / f"{s}.tar") for s in range(3)]


@pytest.mark.parametrize("threads", [0, 3])
def test_exact_resume(messy_shards, tokenizer, tokenizer_2, threads):
    options = dict(batch=4, random_crop=True, dropout=DropoutRates(0.3, 0.3, 0.2), tokenizer_2=tokenizer_2,
                   threads=threads)
    reference_source = make_source(messy_shards, tokenizer, **options)
    reference = [next(reference_source) for _ in range(10)]  # 14 usable / epoch: crosses epochs
    assert reference[-1]["counters"]["skipped"]["undecodable_image"] >= 3
    for cut in (1, 3, 4, 7):
        source = make_source(messy_shards, tokenizer, **options)
        for _ in range(cut):
            next(source)
        state = json.loads(json.dumps(source.get_state()))
        source.close()
        resumed = make_source(messy_shards, tokenizer, state=state, **options)
        for expected in reference[cut:]:
            assert_batches_equal(next(resumed), expected)
        resumed.close()
    reference_source.close()


def test_threaded_decoding_gives_the_same_batches(messy_shards, tokenizer):
    inline = make_source(messy_shards, tokenizer, batch=2, random_crop=True)
    threaded = make_source(messy_shards, tokenizer, batch=2, random_crop=True, threads=4, lookahead=5)
    for _ in range(9):
        assert_batches_equal(next(inline), next(threaded))
    threaded.close()


def test_state_for_other_shards_is_refused(messy_shards, clean_shards, tokenizer):
    state = make_source(messy_shards, tokenizer).get_state()
    with pytest.raises(ValueError, match="different shard list"):
        make_source(clean_shards, tokenizer, state=state)
    with pytest.raises(ValueError, match="different shard list"):
        make_source(messy_shards, tokenizer, seed=1, state=state)


def _exif_rotated_jpeg():
    exif = Image.Exif()
    exif[0x0112] = 8
    return encode_image(random_image(20, 30, 99), "JPEG", exif=exif.tobytes())


def test_skips_and_conversions_are_counted(tmp_path, tokenizer):
    sixteen = Image.fromarray(np.full((20, 20), 30000, np.uint16))
    members = [
        ("ok.jpg", encode_image(random_image(20, 20, 1))), ("ok.txt", b"fine"),
        ("corrupt.jpg", encode_image(random_image(20, 20, 2))[:200]), ("corrupt.txt", b"cut jpeg"),
        ("nocap.jpg", encode_image(random_image(20, 20, 3))),
        ("noimg.txt", b"caption without image"),
        ("empty.png", encode_image(random_image(20, 20, 4), "PNG")), ("empty.txt", b"   "),
        ("badutf.webp", encode_image(random_image(20, 20, 5), "WEBP")), ("badutf.txt", b"\xff\xfe\xfa"),
        ("cmyk.jpg", encode_image(random_image(20, 20, 6, mode="CMYK"))), ("cmyk.txt", b"cmyk"),
        ("la.png", encode_image(random_image(20, 20, 7, mode="LA"), "PNG")), ("la.txt", b"la"),
        ("pal.png", encode_image(random_image(20, 20, 8, mode="P"), "PNG")), ("pal.txt", b"palette"),
        ("deep.png", encode_image(sixteen, "PNG")), ("deep.txt", b"16 bit"),
        ("exif.jpg", _exif_rotated_jpeg()), ("exif.txt", b"rotated"),
    ]
    write_tar(tmp_path / "0.tar", members)
    write_image_shard(tmp_path / "1.tar", [f"t{i}" for i in range(4)], size=(20, 20))
    data = (tmp_path / "1.tar").read_bytes()
    with tarfile.open(tmp_path / "1.tar") as tar:
        cut = tar.getmembers()[4].offset_data + 100  # inside t2.jpg
    (tmp_path / "1.tar").write_bytes(data[:cut])
    (tmp_path / "2.tar").write_bytes(b"this is not a tar file" * 40)
    shards = [str(tmp_path / n) for n in ("0.tar", "1.tar", "2.tar", "missing.tar")]

    source = make_source(shards, tokenizer, batch=1, num_epochs=1)
    batches = list(source)
    keys = [b["key"][0] for b in batches]
    assert sorted(keys) == sorted(["ok", "cmyk", "la", "pal", "deep", "exif", "t0", "t1"])
    counters = source.get_state()["counters"]
    assert counters["skipped"] == {
        "undecodable_image": 1,
        "missing_caption": 2,  # nocap + whitespace-only
        "missing_image": 1,
        "bad_caption": 1,
        "shard_read_error": 1,  # truncated tar: t2, t3 lost
        "shard_open_failed": 2,  # not a tar, missing file
    }
    assert counters["converted"] == {
        "CMYK->RGB": 1, "LA->RGB(alpha on white)": 1, "P->RGB": 1, "I;16->RGB(16-bit rescaled)": 1,
    }
    assert counters["used"] == 8 and counters["shards_finished"] == 4
    exif_batch = batches[keys.index("exif")]
    assert exif_batch["original_size"].tolist() == [[30, 20]]  # orientation 8 swaps h and w
    deep = batches[keys.index("deep")]["pixels"]
    np.testing.assert_allclose(deep, round(30000 / 257) / 127.5 - 1, atol=1e-6)


def test_caption_from_a_json_field(tmp_path, tokenizer):
    members = [
        ("a.jpg", encode_image(random_image(20, 20, 1))), ("a.json", json.dumps({"meta": {"caption": "from json"}}).encode()),
        ("b.jpg", encode_image(random_image(20, 20, 2))), ("b.json", b'{"meta": {}}'),
        ("c.jpg", encode_image(random_image(20, 20, 3))), ("c.json", b"{not json"),
        ("d.jpg", encode_image(random_image(20, 20, 4))), ("d.txt", b"txt is ignored"),
    ]
    write_tar(tmp_path / "j.tar", members)
    source = make_source(str(tmp_path / "j.tar"), tokenizer, batch=1, num_epochs=1, caption_json_field="meta.caption")
    batches = list(source)
    assert [b["caption"] for b in batches] == [["from json"]]
    assert source.counters.skipped == {"missing_caption": 2, "bad_caption": 1}


def test_dropout_and_second_tokenizer(clean_shards, tokenizer, tokenizer_2):
    source = make_source(clean_shards, tokenizer, batch=10, dropout=DropoutRates(0.3, 0.3, 0.3), tokenizer_2=tokenizer_2)
    for _ in range(4):
        batch = next(source)
        assert batch["input_ids_2"].shape == (10, 77)
        dropped = batch["drop_text"]
        assert batch["drop_image"].dtype == bool and dropped.dtype == bool
        assert (batch["input_ids"][dropped] == tokenizer.empty_ids).all()
        assert (batch["input_ids_2"][dropped] == tokenizer_2.empty_ids).all()
        kept = tokenizer(batch["caption"])[~dropped]
        np.testing.assert_array_equal(batch["input_ids"][~dropped], kept)


def test_processes_read_disjoint_shards(clean_shards, tokenizer):
    keys = []
    for index in range(2):
        source = make_source(clean_shards, tokenizer, batch=4, process_index=index, process_count=2, num_epochs=1)
        assert source.local_batch_size == 2
        keys.append({k for batch in source for k in batch["key"]})
    assert not keys[0] & keys[1]
    assert len(keys[0] | keys[1]) == NUM_SHARDS * PER_SHARD
    with pytest.raises(ValueError, match="divisible"):
        make_source(clean_shards, tokenizer, batch=5, process_index=0, process_count=2)


def test_pipe_and_fsspec_urls(clean_shards, tokenizer):
    path = clean_shards.replace("{00000..00003}", "00001")
    batch = next(make_source(f"pipe:cat {path}", tokenizer, batch=5))
    assert batch["key"] == [f"s1_{i}" for i in range(5)]
    # Any other scheme goes through fsspec (memory:// here; gs:// with gcsfs, s3:// etc. alike).
    fsspec.filesystem("memory").pipe("/wds_source_test/00001.tar", open(path, "rb").read())
    batch = next(make_source("memory://wds_source_test/*.tar", tokenizer, batch=5))
    assert batch["key"] == [f"s1_{i}" for i in range(5)]


def test_http_urls(clean_shards, tokenizer):
    """http(s):// shards stream through urllib from a server on 127.0.0.1; a missing one is a counted skip."""
    import functools
    import http.server
    import os
    import threading

    folder = os.path.dirname(clean_shards)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=folder)
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        name = os.path.basename(clean_shards.replace("{00000..00003}", "00002"))
        source = make_source([f"{base}/{name}", f"{base}/missing.tar"], tokenizer, batch=5)
        batch = next(source)
        assert batch["key"] == [f"s2_{i}" for i in range(5)]
        for _ in range(20):  # on through the epoch until the missing shard is met and counted
            if batch["counters"]["skipped"].get("shard_open_failed"):
                break
            batch = next(source)
        assert batch["counters"]["skipped"] == {"shard_open_failed": 1}, batch["counters"]
    finally:
        server.shutdown()


def test_an_epoch_without_usable_samples_raises(tmp_path, tokenizer):
    write_tar(tmp_path / "bad.tar", [("x.jpg", b"junk"), ("x.txt", b"junk")])
    with pytest.raises(RuntimeError, match="gave no usable sample"):
        next(make_source([str(tmp_path / "bad.tar"), str(tmp_path / "nope.tar")], tokenizer))

"""The bad-input corpus: one `SampleCase` per malformed (or merely unusual) sample, one `ShardCase`
per malformed shard or shard URL, each with what the data pipeline must do with it.

A sample case is a list of tar members under the key ``case`` and either the skip reason it must be
counted under, or (for valid oddities: CMYK, EXIF rotation, 16-bit, ...) ``skip=None`` and a check
of the batch row it became. Checks see a one-row batch at training resolution `RESOLUTION`.
A shard case writes its shard (or names a URL that cannot be opened) into a tmp dir.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ipadapter_jax.data.image_ops import uint8_to_signed_unit
from ipadapter_jax.data.synthetic import encode_image, random_image, write_image_shard, write_tar
from ipadapter_jax.toy.toy_tokenizer import vocab_size

from . import encoded as enc

RESOLUTION = 16
CAPTION = b"a photo of the case"
SHARD_KEYS = ("c0", "c1", "c2", "c3")  # keys of the sample shard that shard cases damage


@dataclass(frozen=True)
class SampleCase:
    """members: () -> [(member name, bytes)], all under key ``case``.
    skip: the counter reason the sample must be skipped under; None = it must be used.
    check: (one-row batch) -> None, asserting what a used sample must look like.
    conversion: the expected ``converted`` counter entry ("" = none).
    source: extra WebDatasetSource arguments; processor: ExampleProcessor overrides."""

    name: str
    members: Callable[[], list[tuple[str, bytes]]]
    skip: str | None
    check: Callable[[dict], None] | None = None
    conversion: str = ""
    source: dict = field(default_factory=dict)
    processor: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ShardCase:
    """build(tmp dir) -> shard URL. skips: expected skip counters. keys: the keys that must come out
    of this shard, in order; None = a strict prefix of `SHARD_KEYS` (where the cut falls inside a
    compressed stream)."""

    name: str
    build: Callable[[Path], str]
    skips: dict[str, int]
    keys: tuple[str, ...] | None = ()


# ------------------------------------------------------------------------------------- helpers
def image_sample(data: bytes, ext: str = "jpg", caption: bytes | None = CAPTION) -> Callable:
    def members():
        out = [(f"case.{ext}", data() if callable(data) else data)]
        if caption is not None:
            out.append(("case.txt", caption))
        return out

    return members


def caption_sample(caption: bytes | None, ext: str = "txt") -> Callable:
    def members():
        out = [("case.jpg", encode_image(random_image(20, 20, 5)))]
        if caption is not None:
            out.append((f"case.{ext}", caption))
        return out

    return members


def flat(rgb: tuple[int, int, int], tol: float = 0.0) -> Callable[[dict], None]:
    """The whole crop is the colour `rgb` (within `tol` in [-1, 1] units)."""

    def check(batch):
        expected = uint8_to_signed_unit(np.asarray(rgb, np.uint8))
        np.testing.assert_allclose(batch["pixels"][0], np.broadcast_to(expected, (RESOLUTION, RESOLUTION, 3)), atol=tol)

    return check


def both(*checks: Callable[[dict], None]) -> Callable[[dict], None]:
    def check(batch):
        for c in checks:
            c(batch)

    return check


def original_size(height: int, width: int) -> Callable[[dict], None]:
    def check(batch):
        assert batch["original_size"].tolist() == [[height, width]]

    return check


def stored_pixels(data: bytes) -> np.ndarray:
    """The pixels as stored, EXIF ignored (an independent decode with plain PIL)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def exif_rotated(fmt: str, orientation: int) -> tuple[Callable, Callable]:
    """(members, check): a 16 x 32 asymmetric image stored with an EXIF orientation; the batch must
    hold the image as displayed, i.e. the stored pixels turned by numpy the way the tag says."""
    data = enc.with_orientation(enc.half_black_half_white(16, 32), fmt, orientation)
    # Orientation tag -> the numpy operation that turns stored pixels into displayed ones.
    to_display = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        6: lambda a: np.rot90(a, k=-1),
        8: lambda a: np.rot90(a, k=1),
    }[orientation]

    def check(batch):
        shown = to_display(stored_pixels(data))
        height, width = shown.shape[:2]
        assert batch["original_size"].tolist() == [[height, width]]
        top, left = (height - RESOLUTION) // 2, (width - RESOLUTION) // 2  # shortest side is 16: crop only
        expected = uint8_to_signed_unit(np.ascontiguousarray(shown[top : top + RESOLUTION, left : left + RESOLUTION]))
        np.testing.assert_array_equal(batch["pixels"][0], expected)

    return image_sample(data, {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]), check


def as_stored(data: bytes) -> Callable[[dict], None]:
    """Used exactly as stored (no rotation): the centre crop of the plain PIL decode."""

    def check(batch):
        stored = stored_pixels(data)
        height, width = stored.shape[:2]
        assert batch["original_size"].tolist() == [[height, width]]
        top, left = (height - RESOLUTION) // 2, (width - RESOLUTION) // 2
        np.testing.assert_array_equal(
            batch["pixels"][0], uint8_to_signed_unit(stored[top : top + RESOLUTION, left : left + RESOLUTION]))

    return check


def caption_is(text: str) -> Callable[[dict], None]:
    def check(batch):
        assert batch["caption"] == [text]

    return check


def tokens_fill_the_context(batch):
    ids = batch["input_ids"][0]
    bos, eos = vocab_size() - 2, vocab_size() - 1  # the toy tokenizer's specials take the two highest ids
    assert ids.shape == (77,) and ids[0] == bos and ids[-1] == eos  # BOS ... truncated ... EOS
    assert (ids[1:-1] != eos).all()  # no padding: truncated, not dropped


# ------------------------------------------------------------------------------------ images
_jpeg = lambda: encode_image(random_image(32, 32, 1))  # noqa: E731
_png = lambda: encode_image(random_image(32, 32, 2), "PNG")  # noqa: E731
_webp = lambda: encode_image(random_image(32, 32, 3), "WEBP")  # noqa: E731

_rot6_png = exif_rotated("PNG", 6)
_rot8_jpeg = exif_rotated("JPEG", 8)
_rot3_webp = exif_rotated("WEBP", 3)
_mirror_jpeg = exif_rotated("JPEG", 2)
_plain_for_exif = enc.half_black_half_white(16, 32)
_bad_orientation = enc.with_orientation(_plain_for_exif, "PNG", 99)
_malformed_exif = enc.jpeg_with_app1(_plain_for_exif, enc.malformed_exif_payload())


def _alpha_png(mode: str) -> bytes:
    """Left half opaque black, right half fully transparent red (must become white)."""
    rgba = np.zeros((RESOLUTION, RESOLUTION, 4), np.uint8)
    rgba[:, RESOLUTION // 2 :, 0] = 255
    rgba[:, : RESOLUTION // 2, 3] = 255
    image = Image.fromarray(rgba, mode="RGBA")
    return encode_image(image if mode == "RGBA" else image.convert(mode), "PNG")


def _palette_with_transparency() -> bytes:
    image = Image.new("P", (RESOLUTION, RESOLUTION), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (0, 0, RESOLUTION // 2, RESOLUTION))
    return encode_image(image, "PNG", transparency=0)


def left_black_right_white(tol: float = 0.0) -> Callable[[dict], None]:
    def check(batch):
        pixels = batch["pixels"][0]
        np.testing.assert_allclose(pixels[:, : RESOLUTION // 2], -1.0, atol=tol)
        np.testing.assert_allclose(pixels[:, RESOLUTION // 2 :], 1.0, atol=tol)

    return check


def _palette_check(batch):
    pixels = batch["pixels"][0]
    np.testing.assert_array_equal(pixels[:, : RESOLUTION // 2], np.broadcast_to([-1.0, -1.0, 1.0], (16, 8, 3)))
    np.testing.assert_array_equal(pixels[:, RESOLUTION // 2 :], 1.0)  # transparent index -> white


_grey16 = np.full((RESOLUTION, RESOLUTION), 30000, np.uint16)
_rgb16 = np.broadcast_to(np.asarray([65535, 32896, 0], np.uint16), (RESOLUTION, RESOLUTION, 3))
_la16 = np.stack([np.zeros((16, 16), np.uint16), np.zeros((16, 16), np.uint16)], -1)  # black, transparent


def _checkerboard_1bit() -> bytes:
    bits = (np.indices((RESOLUTION, RESOLUTION)).sum(0) % 2).astype(bool)
    return encode_image(Image.fromarray(bits), "PNG")


def _checkerboard_check(batch):
    expected = np.where((np.indices((16, 16)).sum(0) % 2)[..., None] == 1, 1.0, -1.0)
    np.testing.assert_array_equal(batch["pixels"][0], np.broadcast_to(expected, (16, 16, 3)))


def _flat_image(rgb, size=RESOLUTION, mode="RGB") -> Image.Image:
    image = Image.new("RGB", (size, size), rgb)
    return image.convert(mode) if mode != "RGB" else image


def _png_with_bomb(kind: bytes) -> bytes:
    return enc.png_with_chunk_before_idat(_flat_image((1, 2, 3)), enc.compressed_text_bomb(kind))


def _duplicate_members():
    good = encode_image(_flat_image((0, 255, 0)), "PNG")
    return [("case.png", good), ("case.txt", CAPTION), ("case.png", b"garbage that must be ignored")]


SAMPLE_CASES: list[SampleCase] = [
    # Corrupt, truncated or foreign image bytes: skipped as undecodable.
    SampleCase("jpeg_truncated_half", image_sample(lambda: _jpeg()[: len(_jpeg()) // 2]), "undecodable_image"),
    SampleCase("jpeg_truncated_in_header", image_sample(lambda: _jpeg()[:300]), "undecodable_image"),
    SampleCase("jpeg_soi_marker_only", image_sample(b"\xff\xd8"), "undecodable_image"),
    SampleCase("jpeg_missing_end_marker", image_sample(lambda: _jpeg()[:-2]), "undecodable_image"),
    SampleCase("jpeg_zero_height_header", image_sample(lambda: enc.jpeg_claiming_size(16, 0)), "undecodable_image"),
    SampleCase("png_truncated_half", image_sample(lambda: _png()[: len(_png()) // 2], "png"), "undecodable_image"),
    SampleCase("png_corrupt_idat", image_sample(lambda: enc.flip_bytes(_png(), len(_png()) // 2, 1), "png"),
               "undecodable_image"),
    SampleCase("png_bad_signature", image_sample(lambda: b"\x89PNX" + _png()[4:], "png"), "undecodable_image"),
    SampleCase("png_zero_width_header", image_sample(enc.raw_png(0, 5, 8, "RGB", b""), "png"), "undecodable_image"),
    SampleCase("webp_truncated_half", image_sample(lambda: _webp()[: len(_webp()) // 2], "webp"), "undecodable_image"),
    SampleCase("webp_bad_riff_header", image_sample(lambda: b"RIFX" + _webp()[4:], "webp"), "undecodable_image"),
    SampleCase("empty_image_member", image_sample(b""), "undecodable_image"),
    SampleCase("random_bytes_as_jpeg", image_sample(np.random.default_rng(0).bytes(4096)), "undecodable_image"),
    SampleCase("html_error_page_as_jpeg", image_sample(b"<html><body>403 Forbidden</body></html>"),
               "undecodable_image"),
    SampleCase("gif_not_an_accepted_format", image_sample(lambda: encode_image(random_image(16, 16, 1), "GIF")),
               "undecodable_image"),
    SampleCase("bmp_not_an_accepted_format", image_sample(lambda: encode_image(random_image(16, 16, 1), "BMP"), "png"),
               "undecodable_image"),
    SampleCase("tiff_not_an_accepted_format", image_sample(lambda: encode_image(random_image(16, 16, 1), "TIFF")),
               "undecodable_image"),
    SampleCase("png_ztxt_decompression_bomb", image_sample(lambda: _png_with_bomb(b"zTXt"), "png"),
               "undecodable_image"),
    SampleCase("png_iccp_decompression_bomb", image_sample(lambda: _png_with_bomb(b"iCCP"), "png"),
               "undecodable_image"),
    # Enormous headers: refused from the header, before any pixel is decoded.
    SampleCase("png_header_10G_pixels", image_sample(enc.png_claiming_size(100_000, 100_000), "png"),
               "image_too_large"),
    SampleCase("png_header_over_max_pixels", image_sample(enc.png_claiming_size(10_000, 10_000), "png"),
               "image_too_large"),
    SampleCase("jpeg_header_3G_pixels", image_sample(lambda: enc.jpeg_claiming_size(60_000, 60_000)),
               "image_too_large"),
    SampleCase("webp_header_268M_pixels", image_sample(lambda: enc.webp_lossless_claiming_size(16384, 16384), "webp"),
               "image_too_large"),
    SampleCase("jpeg_1x300_strip", image_sample(lambda: encode_image(random_image(1, 300, 4))), "extreme_aspect_ratio"),
    SampleCase("png_1x1_below_min_side", image_sample(lambda: encode_image(_flat_image((9, 9, 9), 1), "PNG"), "png"),
               "image_too_small", processor={"min_side": 8}),
    # Unusual but valid images: used, converted correctly.
    SampleCase("jpeg_1x1", image_sample(lambda: encode_image(_flat_image((200, 100, 50), 1), "JPEG", quality=100)),
               None,
               both(flat((200, 100, 50), tol=3 / 127.5), original_size(1, 1))),
    SampleCase("png_1x1_transparent",
               image_sample(lambda: encode_image(Image.new("RGBA", (1, 1), (255, 0, 0, 0)), "PNG"), "png"),
               None, flat((255, 255, 255)), conversion="RGBA->RGB(alpha on white)"),
    SampleCase("jpeg_cmyk", image_sample(lambda: encode_image(_flat_image((255, 0, 0), mode="CMYK"), quality=100)),
               None,
               flat((255, 0, 0), tol=3 / 127.5), conversion="CMYK->RGB"),
    SampleCase("jpeg_greyscale", image_sample(lambda: encode_image(_flat_image((77, 77, 77), mode="L"), quality=100)),
               None,
               flat((77, 77, 77), tol=1 / 127.5), conversion="L->RGB"),
    SampleCase("png_la_alpha", image_sample(lambda: _alpha_png("LA"), "png"), None, left_black_right_white(),
               conversion="LA->RGB(alpha on white)"),
    SampleCase("png_rgba_alpha", image_sample(lambda: _alpha_png("RGBA"), "png"), None, left_black_right_white(),
               conversion="RGBA->RGB(alpha on white)"),
    SampleCase("webp_rgba_alpha",
               image_sample(lambda: encode_image(Image.open(io.BytesIO(_alpha_png("RGBA"))), "WEBP", lossless=True),
                            "webp"),
               None, left_black_right_white(), conversion="RGBA->RGB(alpha on white)"),
    SampleCase("png_palette_transparent_index", image_sample(_palette_with_transparency, "png"), None, _palette_check,
               conversion="P->RGB(alpha on white)"),
    SampleCase("png_1bit", image_sample(_checkerboard_1bit, "png"), None, _checkerboard_check, conversion="1->RGB"),
    SampleCase("png_16bit_grey", image_sample(lambda: enc.sixteen_bit_png(_grey16, "L"), "png"), None,
               flat((round(30000 / 257),) * 3), conversion="I;16->RGB(16-bit rescaled)"),
    SampleCase("png_16bit_rgb", image_sample(lambda: enc.sixteen_bit_png(_rgb16, "RGB"), "png"), None,
               flat((255, 128, 0))),
    SampleCase("png_16bit_grey_alpha", image_sample(lambda: enc.sixteen_bit_png(_la16, "LA"), "png"), None,
               flat((255, 255, 255)), conversion="RGBA->RGB(alpha on white)"),
    SampleCase("jpeg_exif_rotate_90_ccw", _rot8_jpeg[0], None, _rot8_jpeg[1]),
    SampleCase("png_exif_rotate_90_cw", _rot6_png[0], None, _rot6_png[1]),
    SampleCase("webp_exif_rotate_180", _rot3_webp[0], None, _rot3_webp[1]),
    SampleCase("jpeg_exif_mirror", _mirror_jpeg[0], None, _mirror_jpeg[1]),
    SampleCase("png_exif_invalid_orientation", image_sample(_bad_orientation, "png"), None,
               as_stored(_bad_orientation)),
    SampleCase("jpeg_malformed_exif", image_sample(_malformed_exif), None, as_stored(_malformed_exif)),
    SampleCase("jpeg_progressive",
               image_sample(lambda: encode_image(_flat_image((10, 200, 30)), progressive=True, quality=100)),
               None, flat((10, 200, 30), tol=3 / 127.5)),
    SampleCase("jpeg_trailing_garbage",
               image_sample(lambda: encode_image(_flat_image((40, 40, 40)), quality=100) + b"\x00junk" * 99),
               None, flat((40, 40, 40), tol=2 / 127.5)),
    SampleCase("png_missing_iend", image_sample(lambda: encode_image(_flat_image((0, 0, 255)), "PNG")[:-12], "png"),
               None,
               flat((0, 0, 255))),
    SampleCase("png_animated_first_frame",
               image_sample(lambda: enc.two_frame("PNG", (255, 0, 0), (0, 255, 0)), "png"), None,
               flat((255, 0, 0))),
    SampleCase("webp_animated_first_frame",
               image_sample(lambda: enc.two_frame("WEBP", (255, 0, 0), (0, 255, 0)), "webp"),
               None, flat((255, 0, 0))),
    SampleCase("mpo_first_picture", image_sample(lambda: enc.two_frame("MPO", (255, 0, 0), (0, 255, 0))), None,
               flat((255, 0, 0), tol=3 / 127.5)),
    SampleCase("png_bytes_in_a_jpg_member", image_sample(lambda: encode_image(_flat_image((5, 6, 7)), "PNG"), "jpg"),
               None,
               flat((5, 6, 7))),
    SampleCase("upper_case_extensions",
               lambda: [("case.PNG", encode_image(_flat_image((8, 9, 10)), "PNG")), ("case.TXT", CAPTION)],
               None, flat((8, 9, 10))),
    SampleCase("duplicate_member_keeps_first", _duplicate_members, None, flat((0, 255, 0))),
    # Samples missing a part.
    SampleCase("missing_image", lambda: [("case.txt", CAPTION)], "missing_image"),
    SampleCase("only_unknown_members", lambda: [("case.bin", b"\x00" * 64), ("case.txt", CAPTION)], "missing_image"),
    SampleCase("missing_caption", caption_sample(None), "missing_caption"),
    # Captions.
    SampleCase("caption_empty", caption_sample(b""), "missing_caption"),
    SampleCase("caption_whitespace_only", caption_sample(b" \t\r\n "), "missing_caption"),
    SampleCase("caption_latin1", caption_sample("un caf\u00e9 cr\u00e8me".encode("latin-1")), "bad_caption"),
    SampleCase("caption_utf16", caption_sample("a cat".encode("utf-16")), "bad_caption"),
    SampleCase("caption_utf8_surrogate", caption_sample(b"a \xed\xa0\x80 cat"), "bad_caption"),
    SampleCase("caption_over_long", caption_sample(b"the dog " * 20_000), None,
               both(tokens_fill_the_context, caption_is("the dog " * 19_999 + "the dog"))),
    SampleCase("caption_utf8_bom", caption_sample(b"\xef\xbb\xbfthe cat"), None, caption_is("the cat")),
    SampleCase("caption_non_latin", caption_sample("\u732b\u3068\u72ac \U0001F600".encode()), None,
               caption_is("\u732b\u3068\u72ac \U0001F600")),
    SampleCase("caption_control_characters", caption_sample(b"the\x00cat\x07"), None, caption_is("the\x00cat\x07")),
    SampleCase("caption_json_not_a_string", caption_sample(b'{"caption": 42}', "json"), "bad_caption",
               source={"caption_json_field": "caption"}),
    SampleCase("caption_json_malformed", caption_sample(b'{"caption": "unterminated', "json"), "bad_caption",
               source={"caption_json_field": "caption"}),
    SampleCase("caption_json_with_utf8_bom", caption_sample(b'\xef\xbb\xbf{"caption": "the cat"}', "json"), None,
               caption_is("the cat"), source={"caption_json_field": "caption"}),
    SampleCase("caption_json_field_missing", caption_sample(b'{"text": "wrong field"}', "json"), "missing_caption",
               source={"caption_json_field": "caption"}),
]


# ------------------------------------------------------------------------------------ shards
def _sample_shard(folder: Path, name: str = "sample.tar") -> Path:
    path = folder / name
    write_image_shard(path, SHARD_KEYS, size=(20, 20), seed=7)
    return path


def _member_offsets(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def _cut(where: Callable[[list[tarfile.TarInfo]], int]) -> Callable[[Path], str]:
    """A copy of the sample shard cut at byte `where(members)`."""

    def build(folder):
        source = _sample_shard(folder)
        data = source.read_bytes()
        target = folder / "cut.tar"
        target.write_bytes(data[: where(_member_offsets(source))])
        return str(target)

    return build


def _overwrite_header(fill: Callable[[bytes], bytes]) -> Callable[[Path], str]:
    """A copy of the sample shard with the header of its 5th member (c2.jpg) replaced by fill(header)."""

    def build(folder):
        source = _sample_shard(folder)
        data = bytearray(source.read_bytes())
        offset = _member_offsets(source)[4].offset
        data[offset : offset + 512] = fill(bytes(data[offset : offset + 512]))
        target = folder / "damaged.tar"
        target.write_bytes(bytes(data))
        return str(target)

    return build


def _write(name: str, data: bytes) -> Callable[[Path], str]:
    def build(folder):
        (folder / name).write_bytes(data)
        return str(folder / name)

    return build


def _empty_tar(folder):
    write_tar(folder / "empty.tar", [])
    return str(folder / "empty.tar")


def _gzip(cut_fraction: float | None) -> Callable[[Path], str]:
    def build(folder):
        data = gzip.compress(_sample_shard(folder).read_bytes())
        if cut_fraction is not None:
            data = data[: int(len(data) * cut_fraction)]
        (folder / "sample.tar.gz").write_bytes(data)
        return str(folder / "sample.tar.gz")

    return build


def _pipe_dies_part_way(folder):
    source = _sample_shard(folder)
    boundary = _member_offsets(source)[4].offset  # after c0, c1: a clean member boundary
    return f"pipe:head -c {boundary} {source}; exit 3"


def _links_and_special_members(folder):
    """Members that are not regular files: a directory, a symlink and a hard link named like the
    sample's image and pointing at a valid image outside the shard. Nothing may follow them."""
    outside = folder / "outside.png"
    outside.write_bytes(encode_image(random_image(20, 20, 1), "PNG"))
    path = folder / "links.tar"
    with tarfile.open(path, "w") as tar:
        for name, kind, target in (("case", tarfile.DIRTYPE, ""), ("case.png", tarfile.SYMTYPE, str(outside)),
                                   ("case.jpg", tarfile.LNKTYPE, str(outside))):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
        info = tarfile.TarInfo("case.txt")
        info.size = len(CAPTION)
        tar.addfile(info, io.BytesIO(CAPTION))
    return str(path)


SHARD_CASES: list[ShardCase] = [
    ShardCase("missing_local_path", lambda d: str(d / "no_such_shard.tar"), {"shard_open_failed": 1}),
    ShardCase("missing_file_url", lambda d: "file://" + str(d / "no_such_shard.tar"), {"shard_open_failed": 1}),
    ShardCase("pipe_command_fails", lambda d: f"pipe:cat {d / 'no_such_shard.tar'}", {"shard_open_failed": 1}),
    ShardCase("pipe_command_not_found", lambda d: "pipe:no-such-command-ipadapter-jax", {"shard_open_failed": 1}),
    ShardCase("pipe_dies_part_way", _pipe_dies_part_way, {"shard_read_error": 1}, ("c0", "c1")),
    ShardCase("pipe_fails_after_a_whole_tar", lambda d: f"pipe:cat {_sample_shard(d)}; exit 3", {"shard_read_error": 1},
              SHARD_KEYS),
    ShardCase("unknown_url_scheme", lambda d: "nosuchscheme://bucket/shard.tar", {"shard_open_failed": 1}),
    ShardCase("directory_as_shard", lambda d: str(d), {"shard_open_failed": 1}),
    ShardCase("empty_file", _write("empty.tar", b""), {"shard_open_failed": 1}),
    ShardCase("not_a_tar", _write("text.tar", b"this is a text file, not a tar\n" * 50), {"shard_open_failed": 1}),
    ShardCase("empty_tar", _empty_tar, {}),
    ShardCase("truncated_in_member_data", _cut(lambda m: m[4].offset_data + 100), {"shard_read_error": 1},
              ("c0", "c1")),
    ShardCase("truncated_in_member_header", _cut(lambda m: m[4].offset + 100), {"shard_read_error": 1}, ("c0", "c1")),
    ShardCase("truncated_at_member_boundary", _cut(lambda m: m[4].offset), {"shard_read_error": 1}, ("c0", "c1")),
    ShardCase("corrupt_member_header", _overwrite_header(lambda h: h[:148] + b"garbage!" + h[156:]),
              {"shard_read_error": 1}, ("c0", "c1")),
    ShardCase("zero_block_inside_the_archive", _overwrite_header(lambda h: bytes(512)), {"shard_read_error": 1},
              ("c0", "c1")),
    ShardCase("gzip_compressed", _gzip(None), {}, SHARD_KEYS),
    ShardCase("gzip_truncated", _gzip(0.6), {"shard_read_error": 1}, None),
    ShardCase("links_and_directories", _links_and_special_members, {"missing_image": 1}),
]

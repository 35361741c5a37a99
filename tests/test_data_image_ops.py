"""Robust decoding (modes, EXIF, bombs, corrupt data) and the VAE resize/crop."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ipadapter_jax.data.image_ops import (
    ImageDecodeError,
    crop_offsets,
    decode_image,
    resize_and_crop,
    resize_shortest_side,
    to_rgb,
)
from ipadapter_jax.data.synthetic import encode_image, random_image


def test_rgb_jpeg_png_webp_decode_to_rgb():
    image = random_image(12, 20, seed=0)
    for fmt in ("JPEG", "PNG", "WEBP"):
        decoded = decode_image(encode_image(image, fmt))
        assert decoded.image.mode == "RGB" and decoded.original_size == (12, 20)
        assert decoded.conversion == "" and decoded.format == fmt
    lossless = decode_image(encode_image(image, "PNG")).image
    assert np.array_equal(np.asarray(lossless), np.asarray(image))


def test_cmyk_jpeg_is_converted_and_reported():
    decoded = decode_image(encode_image(random_image(8, 8, 1, mode="CMYK"), "JPEG"))
    assert decoded.image.mode == "RGB" and decoded.conversion == "CMYK->RGB"


def _la_half_transparent():
    la = np.zeros((4, 4, 2), np.uint8)
    la[..., 0] = 10  # dark grey
    la[:, :2, 1] = 255  # left half opaque, right half fully transparent
    return Image.fromarray(la, mode="LA")


def test_alpha_composited_on_white_or_dropped():
    data = encode_image(_la_half_transparent(), "PNG")
    white = decode_image(data, alpha="white")
    assert white.conversion == "LA->RGB(alpha on white)"
    pixels = np.asarray(white.image)
    assert (pixels[:, :2] == 10).all() and (pixels[:, 2:] == 255).all()
    dropped = decode_image(data, alpha="drop")
    assert dropped.conversion == "LA->RGB(alpha dropped)"
    assert (np.asarray(dropped.image) == 10).all()
    rgba = Image.new("RGBA", (3, 3), (200, 0, 0, 0))
    assert (np.asarray(to_rgb(rgba, "white")[0]) == 255).all()
    assert (np.asarray(to_rgb(rgba, "drop")[0])[..., 0] == 200).all()


def test_palette_images_with_and_without_transparency():
    plain = random_image(6, 6, 2, mode="P")
    decoded = decode_image(encode_image(plain, "PNG"))
    assert decoded.conversion == "P->RGB"
    assert np.array_equal(np.asarray(decoded.image), np.asarray(plain.convert("RGB")))
    transparent = Image.new("P", (4, 4), 0)
    transparent.putpalette([0, 0, 0, 50, 60, 70] + [0] * 762)
    transparent.paste(1, (0, 0, 2, 4))
    decoded = decode_image(encode_image(transparent, "PNG", transparency=0))
    assert decoded.conversion == "P->RGB(alpha on white)"
    pixels = np.asarray(decoded.image)
    assert (pixels[:, :2] == [50, 60, 70]).all() and (pixels[:, 2:] == 255).all()


def test_sixteen_bit_greyscale_is_rescaled_not_clipped():
    values = np.array([[0, 257, 128 * 257, 65535]], dtype=np.uint16)
    decoded = decode_image(encode_image(Image.fromarray(values), "PNG"))
    assert decoded.conversion.endswith("->RGB(16-bit rescaled)")
    assert np.asarray(decoded.image)[0, :, 0].tolist() == [0, 1, 128, 255]


def test_exif_orientation_is_applied():
    image = random_image(10, 20, 3)  # h=10, w=20
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode_image(image, "PNG", exif=exif.tobytes())
    decoded = decode_image(data)
    assert decoded.exif_transposed and decoded.original_size == (20, 10)
    expected = Image.open(io.BytesIO(data)).convert("RGB").transpose(Image.Transpose.ROTATE_270)
    assert np.array_equal(np.asarray(decoded.image), np.asarray(expected))


def _png_header_only(width, height):
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))


def test_decompression_bomb_guard():
    with pytest.raises(ImageDecodeError) as info:
        decode_image(encode_image(random_image(20, 20, 4), "PNG"), max_pixels=399)
    assert info.value.reason == "image_too_large"
    # A header claiming 30000 x 30000 pixels is refused before any pixel is decoded, even if our
    # own limit is raised past PIL's.
    with pytest.raises(ImageDecodeError) as info:
        decode_image(_png_header_only(30000, 30000), max_pixels=10**12)
    assert info.value.reason == "image_too_large"


@pytest.mark.parametrize(
    "data",
    [
        b"not an image at all",
        encode_image(random_image(32, 32, 5), "JPEG")[:300],  # truncated JPEG
        b"\xff\xd8\xff\xe0" + bytes(200),  # JPEG magic, garbage body
        encode_image(random_image(8, 8, 6), "GIF"),  # a format we do not accept
    ],
    ids=["garbage", "truncated-jpeg", "corrupt-jpeg", "gif"],
)
def test_undecodable_bytes_raise_with_reason(data):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    assert info.value.reason == "undecodable_image"


def test_min_side_and_aspect_ratio_limits():
    data = encode_image(random_image(8, 30, 7), "PNG")
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, min_side=9)
    assert info.value.reason == "image_too_small"
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, max_aspect_ratio=3.7)
    assert info.value.reason == "extreme_aspect_ratio"
    assert decode_image(data, max_aspect_ratio=3.75).original_size == (8, 30)


def test_resize_shortest_side_and_centre_crop():
    image = random_image(40, 56, 8)  # h=40, w=56
    resized = resize_shortest_side(image, 32)
    assert resized.size == (44, 32)  # (w, h): 56 * 32 / 40 = 44.8 -> 44
    assert np.array_equal(np.asarray(resized), np.asarray(image.resize((44, 32), Image.BICUBIC)))
    pixels, (top, left) = resize_and_crop(image, 32)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.float32
    assert (top, left) == (0, 6)
    expected = np.asarray(resized)[:, 6:38].astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(pixels, expected, atol=1e-6)
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    # Portrait, upscaled.
    pixels, (top, left) = resize_and_crop(random_image(30, 20, 9), 40)
    assert pixels.shape == (40, 40, 3) and (top, left) == (10, 0)


def test_random_crop_is_deterministic_given_the_generator():
    offsets = [crop_offsets(50, 70, 32, np.random.default_rng(s)) for s in range(20)]
    assert offsets == [crop_offsets(50, 70, 32, np.random.default_rng(s)) for s in range(20)]
    assert len(set(offsets)) > 5
    assert all(0 <= t <= 18 and 0 <= l <= 38 for t, l in offsets)
    image = random_image(50, 70, 10)
    a = resize_and_crop(image, 32, np.random.default_rng(1))
    b = resize_and_crop(image, 32, np.random.default_rng(1))
    assert a[1] == b[1] and np.array_equal(a[0], b[0])

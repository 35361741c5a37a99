"""Hand-made and deliberately damaged encoded images.

PIL cannot write some of what the web serves (16-bit RGB PNGs, headers that lie about the size), so
PNG chunks and JPEG/WebP headers are written or patched here byte by byte.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from ipadapter_jax.data.synthetic import encode_image, random_image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOUR_TYPES = {"L": 0, "RGB": 2, "LA": 4, "RGBA": 6}


def png_chunk(tag: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(tag + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc)


def raw_png(width: int, height: int, bit_depth: int, colour: str, rows: bytes,
            extra_chunks: bytes = b"") -> bytes:
    """A PNG whose IHDR says (width, height, bit_depth, colour) and whose IDAT holds `rows`
    (filter byte + samples per row, not checked against the header: that is the point)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, PNG_COLOUR_TYPES[colour], 0, 0, 0)
    return (PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + extra_chunks
            + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b""))


def sixteen_bit_png(array: np.ndarray, colour: str) -> bytes:
    """A 16-bit PNG from a uint16 [h, w] (L) or [h, w, c] array."""
    height, width = array.shape[:2]
    big_endian = array.astype(">u2")
    rows = b"".join(b"\x00" + big_endian[r].tobytes() for r in range(height))
    return raw_png(width, height, 16, colour, rows)


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's header)."""
    return raw_png(width, height, 8, "RGB", b"\x00" * 64)


def png_with_chunk_before_idat(image: Image.Image, chunk: bytes) -> bytes:
    data = encode_image(image, "PNG")
    ihdr_end = len(PNG_SIGNATURE) + 25  # 4 length + 4 tag + 13 payload + 4 crc
    return data[:ihdr_end] + chunk + data[ihdr_end:]


def compressed_text_bomb(kind: bytes) -> bytes:
    """A zTXt or iCCP chunk that inflates to 64 MiB (from ~64 KiB)."""
    payload = zlib.compress(b"\x00" * (64 << 20), 9)
    name = b"Comment" if kind == b"zTXt" else b"icc"
    return png_chunk(kind, name + b"\x00\x00" + payload)


def jpeg_claiming_size(width: int, height: int) -> bytes:
    """A small baseline JPEG with its SOF0 frame header patched to width x height."""
    data = bytearray(encode_image(random_image(16, 16, 1)))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_lossless_claiming_size(width: int, height: int) -> bytes:
    """A lossless WebP whose VP8L header is patched to width x height (14 bits each, <= 16384)."""
    data = bytearray(encode_image(random_image(16, 16, 1), "WEBP", lossless=True))
    at = data.find(b"VP8L") + 9  # fourcc, chunk size, signature byte
    bits = int.from_bytes(data[at : at + 4], "little")
    bits = (bits & ~((1 << 28) - 1)) | (width - 1) | ((height - 1) << 14)
    data[at : at + 4] = bits.to_bytes(4, "little")
    return bytes(data)


def flip_bytes(data: bytes, start: int, count: int) -> bytes:
    out = bytearray(data)
    for i in range(start, min(len(out), start + count)):
        out[i] ^= 0xFF
    return bytes(out)


def jpeg_with_app1(image: Image.Image, app1_payload: bytes) -> bytes:
    """A JPEG with an APP1 (EXIF) segment holding `app1_payload`, inserted right after SOI."""
    data = encode_image(image)
    segment = b"\xff\xe1" + struct.pack(">H", len(app1_payload) + 2) + app1_payload
    return data[:2] + segment + data[2:]


def malformed_exif_payload() -> bytes:
    """'Exif' + a TIFF header whose first IFD claims 65535 entries and then ends."""
    return b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08" + b"\xff\xff" + b"\x00" * 4


def with_orientation(image: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode_image(image, fmt, exif=exif.tobytes())


def two_frame(fmt: str, first: tuple, second: tuple, size: int = 16) -> bytes:
    """An animated PNG / WebP or a two-picture MPO whose frames are flat `first` and `second`."""
    frames = [Image.new("RGB", (size, size), first), Image.new("RGB", (size, size), second)]
    buffer = io.BytesIO()
    options = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], **options)
    return buffer.getvalue()


def half_black_half_white(height: int, width: int) -> Image.Image:
    """Left half black, right half white: any rotation or flip changes it."""
    array = np.zeros((height, width, 3), np.uint8)
    array[:, width // 2 :] = 255
    array[: height // 4] = (255, 0, 0)  # a red top band breaks the left/right mirror symmetry
    return Image.fromarray(array, mode="RGB")

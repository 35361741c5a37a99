"""Tiny synthetic data for tests and smoke runs: random and encoded images, and webdataset shards of them.
Nothing is downloaded. (The one CLIP tokenizer writer is ``toy.toy_tokenizer.write_toy_tokenizer``.)
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ipadapter_jax.atomic_files import atomic_path
from ipadapter_jax.data.tar_samples import add_member


def random_image(height: int, width: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A random-noise PIL image in `mode` (RGB, RGBA, L, LA, P, CMYK, I;16)."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2, "CMYK": 4, "P": 3}[mode]
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    if channels == 1:
        return Image.fromarray(array[..., 0], mode="L")
    if mode == "P":
        return Image.fromarray(array, mode="RGB").quantize(16)
    if mode == "LA":
        return Image.fromarray(array, mode="LA")
    if mode == "CMYK":
        return Image.fromarray(array[..., :3], mode="RGB").convert("CMYK")
    return Image.fromarray(array, mode=mode)


def encode_image(image: Image.Image, fmt: str = "JPEG", **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


def write_tar(path: str | os.PathLike, members: Sequence[tuple[str, bytes]]) -> None:
    """A plain tar with the given (name, bytes) members, in order, published whole (``atomic_files``)."""
    with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
        for name, data in members:
            add_member(tar, name, data)


def write_image_shard(
    path: str | os.PathLike,
    keys: Sequence[str],
    *,
    size: tuple[int, int] = (40, 56),
    seed: int = 0,
    fmt: str = "JPEG",
) -> None:
    """A shard of ``key.jpg`` (random image, seeded per key) + ``key.txt`` ("a photo of <key>")."""
    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
    members = []
    for key in keys:
        image = random_image(size[0], size[1], seed=hash_key(key, seed))
        members.append((f"{key}.{ext}", encode_image(image, fmt)))
        members.append((f"{key}.txt", f"a photo of {key}".encode()))
    write_tar(path, members)


def hash_key(key: str, seed: int = 0) -> int:
    return int.from_bytes(key.encode("utf-8")[-8:].rjust(8, b"\0"), "little") ^ seed

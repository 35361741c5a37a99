"""CLIP image-encoder preprocessing in numpy/PIL, configured by a ``preprocessor_config.json`` dict.

Same arithmetic as transformers' slow (PIL) ``CLIPImageProcessor``: optional RGB conversion
(transparency composited on white), resize of the shortest edge with PIL (long edge truncated to
int), centre crop (zero padding if the image is smaller than the crop), rescale in float64 then
float32, normalisation with float32 mean/std. Output layout is NHWC float32, e.g. ``[B, 224, 224, 3]``
(transformers gives NCHW; transpose with ``x.transpose(0, 3, 1, 2)`` to compare).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike

import numpy as np
from PIL import Image

from ipadapter_jax.data.image_ops import to_rgb

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipImageProcessingConfig:
    """The fields of a ``preprocessor_config.json`` that matter for CLIP; defaults = OpenAI CLIP 224.

    Exactly one of ``shortest_edge`` or (``resize_height``, ``resize_width``) sets the resize.
    ``resample`` is a PIL resampling filter id (3 = bicubic).
    """

    do_resize: bool = True
    shortest_edge: int | None = 224
    resize_height: int | None = None
    resize_width: int | None = None
    resample: int = Image.BICUBIC
    do_center_crop: bool = True
    crop_height: int = 224
    crop_width: int = 224
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, config: Mapping) -> "ClipImageProcessingConfig":
        """Read a ``preprocessor_config.json`` dict (old int-valued ``size``/``crop_size`` too)."""
        size = config.get("size", {"shortest_edge": 224})
        shortest_edge = resize_height = resize_width = None
        if isinstance(size, int):
            # Old CLIP configs: an int size means the shortest edge (CLIP never resizes to square).
            shortest_edge = size
        elif "shortest_edge" in size:
            shortest_edge = int(size["shortest_edge"])
        elif "height" in size and "width" in size:
            resize_height, resize_width = int(size["height"]), int(size["width"])
        else:
            raise ValueError(f"unsupported size {size!r}: need shortest_edge or height+width")
        crop = config.get("crop_size", {"height": 224, "width": 224})
        crop_h, crop_w = (crop, crop) if isinstance(crop, int) else (crop["height"], crop["width"])

        def triple(values, default):
            values = default if values is None else values
            values = [values] * 3 if isinstance(values, (int, float)) else list(values)
            return tuple(float(v) for v in values)

        return cls(
            do_resize=bool(config.get("do_resize", True)),
            shortest_edge=shortest_edge,
            resize_height=resize_height,
            resize_width=resize_width,
            resample=int(config.get("resample", Image.BICUBIC)),
            do_center_crop=bool(config.get("do_center_crop", True)),
            crop_height=int(crop_h),
            crop_width=int(crop_w),
            do_rescale=bool(config.get("do_rescale", True)),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            do_normalize=bool(config.get("do_normalize", True)),
            image_mean=triple(config.get("image_mean"), OPENAI_CLIP_MEAN),
            image_std=triple(config.get("image_std"), OPENAI_CLIP_STD),
            do_convert_rgb=bool(config.get("do_convert_rgb", True)),
        )

    @classmethod
    def from_json(cls, path: str | PathLike) -> "ClipImageProcessingConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def _resize_target(height: int, width: int, config: ClipImageProcessingConfig) -> tuple[int, int]:
    if config.shortest_edge is None:
        return int(config.resize_height), int(config.resize_width)
    size = config.shortest_edge
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def _center_crop(pixels: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    height, width = pixels.shape[:2]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + crop_h, left : left + crop_w]
    # Smaller than the crop: place the image on a zero canvas, then crop the window out of that.
    pad_top = max(0, -(-(crop_h - height) // 2))
    pad_left = max(0, -(-(crop_w - width) // 2))
    canvas = np.zeros((max(height, crop_h), max(width, crop_w)) + pixels.shape[2:], pixels.dtype)
    canvas[pad_top : pad_top + height, pad_left : pad_left + width] = pixels
    top, left = top + pad_top, left + pad_left
    return canvas[max(0, top) : top + crop_h, max(0, left) : left + crop_w]


def clip_preprocess_one(image: Image.Image | np.ndarray, config: ClipImageProcessingConfig) -> np.ndarray:
    """One image (PIL, or uint8 HWC RGB array) -> float32 [crop_h, crop_w, 3]."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected a uint8 [H, W, 3] array, got {image.dtype} {image.shape}")
        image = Image.fromarray(image, mode="RGB")
    if config.do_convert_rgb:
        image, _ = to_rgb(image, alpha="white")
    if config.do_resize:
        height, width = _resize_target(image.height, image.width, config)
        if (height, width) != (image.height, image.width):
            image = image.resize((width, height), resample=config.resample)
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if config.do_center_crop:
        pixels = _center_crop(pixels, config.crop_height, config.crop_width)
    if config.do_rescale:
        pixels = (pixels.astype(np.float64) * config.rescale_factor).astype(np.float32)
    else:
        pixels = pixels.astype(np.float32)
    if config.do_normalize:
        mean = np.asarray(config.image_mean, dtype=np.float32)
        std = np.asarray(config.image_std, dtype=np.float32)
        pixels = (pixels - mean) / std
    return pixels


def clip_preprocess(
    images: Sequence[Image.Image | np.ndarray], config: ClipImageProcessingConfig
) -> np.ndarray:
    """A batch of images -> float32 NHWC ``[B, crop_h, crop_w, 3]``."""
    return np.stack([clip_preprocess_one(image, config) for image in images], axis=0)

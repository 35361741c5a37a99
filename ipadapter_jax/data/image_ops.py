"""Robust host-side image decoding and the diffusion-model crop (numpy + PIL, no torch).

`decode_image` turns encoded bytes (JPEG, PNG, WebP; MPO, the multi-picture JPEG that cameras write,
is read as its first frame) into an 8-bit RGB PIL image with EXIF orientation applied, or raises
`ImageDecodeError` whose ``reason`` names the skip-counter bucket.
`resize_and_crop` then makes the VAE input: shortest side -> ``resolution`` (bicubic; PIL's bicubic
widens its kernel when shrinking, i.e. it antialiases), centre or random square crop, float32
in [-1, 1], layout HWC (a batch of them is NHWC).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

AlphaMode = Literal["white", "drop"]

# Formats PIL may parse: limiting them keeps exotic, rarely exercised decoders away from
# untrusted bytes. (PIL's JPEG opener also returns MPO, the multi-picture JPEG cameras write.)
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024

REASON_UNDECODABLE = "undecodable_image"
REASON_TOO_LARGE = "image_too_large"
REASON_TOO_SMALL = "image_too_small"
REASON_UNSUPPORTED_MODE = "unsupported_image_mode"
REASON_ASPECT = "extreme_aspect_ratio"


class ImageDecodeError(ValueError):
    """An image that must be skipped; ``reason`` is the skip-counter bucket it belongs to."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image.

    image: 8-bit RGB PIL image, EXIF orientation applied.
    original_size: (height, width) of ``image`` (what SDXL's add_time_ids call the original size).
    conversion: how the stored mode became RGB, e.g. ``"CMYK->RGB"``,
      ``"RGBA->RGB(alpha on white)"``; ``""`` when it already was RGB.
    exif_transposed: True when an EXIF orientation tag rotated/flipped the image.
    format: the stored format as PIL names it ("JPEG", "MPO", "PNG", "WEBP").
    """

    image: Image.Image
    original_size: tuple[int, int]
    conversion: str
    exif_transposed: bool
    format: str


def _has_alpha(image: Image.Image) -> bool:
    return "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    # PIL's convert() clips 16/32-bit greyscale at 255 instead of rescaling; a 16-bit PNG would
    # come out almost white, so rescale the full 16-bit range to 8 bits ourselves.
    values = np.asarray(image).astype(np.float64)
    grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1), mode="RGB")


def to_rgb(image: Image.Image, alpha: AlphaMode = "white") -> tuple[Image.Image, str]:
    """Convert any PIL mode to 8-bit RGB; returns (rgb_image, conversion description).

    alpha="white": transparent pixels are composited over a white background (what CLIP's
    preprocessing does); alpha="drop": the alpha channel is discarded, keeping the stored colour.
    """
    mode = image.mode
    if mode == "RGB":
        return image, ""
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return _sixteen_bit_to_rgb(image), f"{mode}->RGB(16-bit rescaled)"
    if mode == "F":
        raise ImageDecodeError(REASON_UNSUPPORTED_MODE, "floating-point image mode F")
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        if alpha == "drop":
            return rgba.convert("RGB"), f"{mode}->RGB(alpha dropped)"
        if alpha != "white":
            raise ValueError(f"alpha must be 'white' or 'drop', got {alpha!r}")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), f"{mode}->RGB(alpha on white)"
    try:
        return image.convert("RGB"), f"{mode}->RGB"
    except (ValueError, OSError) as exc:
        raise ImageDecodeError(REASON_UNSUPPORTED_MODE, f"cannot convert mode {mode}: {exc}") from exc


def decode_image(
    data: bytes,
    *,
    alpha: AlphaMode = "white",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 1,
    max_aspect_ratio: float | None = None,
) -> DecodedImage:
    """Decode encoded image bytes to RGB; raises `ImageDecodeError` for anything to skip.

    max_pixels: images with more pixels than this are rejected from the header alone, before the
      pixel data is decoded (decompression-bomb guard; PIL's own global limit, by default about
      179M pixels, also still applies).
    min_side: images whose shorter side is below this are rejected (reason image_too_small).
    max_aspect_ratio: images with long side / short side above this are rejected from the header
      (reason extreme_aspect_ratio): resizing the short side of a 1 x 20000 strip up to the training
      resolution would need gigabytes.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(REASON_TOO_LARGE, f"{width}x{height} exceeds {max_pixels} pixels")
            if max_aspect_ratio is not None and max(width, height) > max_aspect_ratio * max(1, min(width, height)):
                raise ImageDecodeError(REASON_ASPECT, f"{width}x{height} exceeds aspect ratio {max_aspect_ratio}")
            image.load()
            stored_format = image.format
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(REASON_TOO_LARGE, str(exc)) from exc
    except Exception as exc:  # PIL raises a zoo of types (OSError, SyntaxError, ValueError, ...)
        raise ImageDecodeError(REASON_UNDECODABLE, f"{type(exc).__name__}: {exc}") from exc

    transposed = False
    try:
        orientation = image.getexif().get(0x0112, 1)
        # Only 2..8 name a rotation/flip; exif_transpose leaves other values as stored.
        if orientation in range(2, 9):
            image = ImageOps.exif_transpose(image)
            transposed = True
    except Exception:
        # A malformed EXIF block is no reason to lose the picture; keep it as stored.
        pass

    rgb, conversion = to_rgb(image, alpha)
    width, height = rgb.size
    if min(width, height) < min_side:
        raise ImageDecodeError(REASON_TOO_SMALL, f"{width}x{height} has a side below {min_side}")
    return DecodedImage(rgb, (height, width), conversion, transposed, stored_format)


def resize_shortest_side(image: Image.Image, size: int, resample: int = Image.BICUBIC) -> Image.Image:
    """Resize so the shorter side is `size`, keeping aspect ratio (long side truncated to int,
    as torchvision's Resize does)."""
    width, height = image.size
    if min(width, height) == size:
        return image
    if width <= height:
        new_w, new_h = size, max(size, int(size * height / width))
    else:
        new_w, new_h = max(size, int(size * width / height)), size
    return image.resize((new_w, new_h), resample=resample)


def crop_offsets(
    height: int, width: int, crop: int, rng: np.random.Generator | None = None
) -> tuple[int, int]:
    """Top-left (top, left) of a `crop` x `crop` window: centred, or uniform random given `rng`."""
    if height < crop or width < crop:
        raise ValueError(f"cannot crop {crop}x{crop} from {height}x{width}")
    if rng is None:
        return (height - crop) // 2, (width - crop) // 2
    top = int(rng.integers(0, height - crop + 1))
    left = int(rng.integers(0, width - crop + 1))
    return top, left


def uint8_to_signed_unit(pixels: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (the VAE's input range)."""
    return pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def resize_and_crop(
    image: Image.Image, resolution: int, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """VAE input from an RGB image.

    Returns (pixels float32 [resolution, resolution, 3] in [-1, 1], crop_top_left (top, left) in
    the coordinates of the resized image, which is what SDXL's add_time_ids expect).
    """
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    resized = resize_shortest_side(image, resolution)
    top, left = crop_offsets(resized.height, resized.width, resolution, rng)
    cropped = resized.crop((left, top, left + resolution, top + resolution))
    return uint8_to_signed_unit(np.asarray(cropped)), (top, left)

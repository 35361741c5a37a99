"""One (image bytes, caption) pair -> one training example, and a list of examples -> a local batch.

Shared by every source (webdataset, TFDS) so they produce identical batches:

    pixels        float32 [b, R, R, 3] in [-1, 1]   VAE input, NHWC
    clip_pixels   float32 [b, 224, 224, 3]          CLIP image-encoder input, NHWC (if configured)
    input_ids     int32   [b, 77]                   first text encoder
    input_ids_2   int32   [b, 77]                   second text encoder (SDXL; if configured)
    original_size int32   [b, 2]                    (height, width) before resize
    crop_top_left int32   [b, 2]                    (top, left) in resized coordinates
    drop_text     bool    [b]                       (if dropout configured) caption replaced by ""
    drop_image    bool    [b]                       (if dropout configured) image embedding to zero
    caption       list[str]                         the original captions (before dropout)
    key           list[str]                         sample keys, for debugging
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ipadapter_jax.data.clip_image_processing import ClipImageProcessingConfig, clip_preprocess_one
from ipadapter_jax.data.conditioning_dropout import DropoutRates, drop_captions, sample_conditioning_drops
from ipadapter_jax.data.image_ops import DEFAULT_MAX_PIXELS, AlphaMode, ImageDecodeError, decode_image, resize_and_crop
from ipadapter_jax.data.tokenize import CaptionTokenizer


@dataclass(frozen=True)
class Example:
    pixels: np.ndarray  # float32 [R, R, 3]
    clip_pixels: np.ndarray | None  # float32 [h, w, 3]
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    caption: str
    key: str
    conversion: str  # "" or e.g. "CMYK->RGB"


@dataclass(frozen=True)
class ExampleProcessor:
    """Image decoding + crops, configured once. ``process`` raises `ImageDecodeError` to skip.

    The limits (max_pixels, min_side, max_aspect_ratio) are those of `image_ops.decode_image`.
    """

    resolution: int
    clip_config: ClipImageProcessingConfig | None = ClipImageProcessingConfig()
    random_crop: bool = False
    alpha: AlphaMode = "white"
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = 1
    max_aspect_ratio: float | None = 8.0

    def process(
        self, image_bytes: bytes, caption: str, key: str, rng: np.random.Generator | None = None
    ) -> Example:
        """`rng` drives the random crop (only used when ``random_crop``)."""
        decoded = decode_image(
            image_bytes,
            alpha=self.alpha,
            max_pixels=self.max_pixels,
            min_side=self.min_side,
            max_aspect_ratio=self.max_aspect_ratio,
        )
        pixels, crop_top_left = resize_and_crop(
            decoded.image, self.resolution, rng if self.random_crop else None
        )
        # CLIP sees the whole (uncropped) image, as in tencent's training scripts.
        clip_pixels = None
        if self.clip_config is not None:
            clip_pixels = clip_preprocess_one(decoded.image, self.clip_config)
        return Example(
            pixels, clip_pixels, decoded.original_size, crop_top_left, caption, key, decoded.conversion
        )

    def process_or_skip(
        self, image_bytes: bytes, caption: str, key: str, rng: np.random.Generator | None = None
    ) -> Example | str:
        """`process`, or the reason to skip the image (a counter name from `counters`)."""
        try:
            return self.process(image_bytes, caption, key, rng)
        except ImageDecodeError as exc:
            return exc.reason


@dataclass(frozen=True)
class BatchCollator:
    """Stacks examples, tokenises captions and applies conditioning dropout for one local batch."""

    tokenizer: CaptionTokenizer
    tokenizer_2: CaptionTokenizer | None = None
    dropout: DropoutRates | None = None
    dropout_seed: int = 0

    def __call__(self, examples: list[Example], step: int, process_index: int = 0) -> dict:
        """`step` (index of this batch in the stream) and `process_index` seed the dropout draw."""
        captions = [e.caption for e in examples]
        batch = {
            "pixels": np.stack([e.pixels for e in examples]),
            "input_ids": self.tokenizer(captions),
            "original_size": np.asarray([e.original_size for e in examples], np.int32),
            "crop_top_left": np.asarray([e.crop_top_left for e in examples], np.int32),
            "caption": captions,
            "key": [e.key for e in examples],
        }
        if examples[0].clip_pixels is not None:
            batch["clip_pixels"] = np.stack([e.clip_pixels for e in examples])
        if self.tokenizer_2 is not None:
            batch["input_ids_2"] = self.tokenizer_2(captions)
        if self.dropout is not None:
            drop_text, drop_image = sample_conditioning_drops(
                len(examples), self.dropout, self.dropout_seed, step, process_index
            )
            batch["drop_text"], batch["drop_image"] = drop_text, drop_image
            batch["input_ids"] = drop_captions(batch["input_ids"], drop_text, self.tokenizer.empty_ids)
            if self.tokenizer_2 is not None:
                batch["input_ids_2"] = drop_captions(batch["input_ids_2"], drop_text, self.tokenizer_2.empty_ids)
        return batch

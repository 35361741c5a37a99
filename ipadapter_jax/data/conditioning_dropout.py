"""IP-Adapter's conditioning dropout (paper section 3.2.3; classifier-free guidance training).

Per sample, one uniform draw u picks exactly one of four outcomes, as tencent's training script does:
``u < image`` -> drop the image only; ``< image + text`` -> drop the caption only;
``< image + text + both`` -> drop both; otherwise keep both. Paper defaults: 0.05 each.

A dropped caption becomes the token ids of ``""``; a dropped image is only a flag here
(``drop_image``), which the trainer turns into a zero image embedding (plain IP-Adapter) or a zero
image (IP-Adapter Plus, which encodes ``zeros_like(clip_pixels)``).

Randomness is a numpy Generator seeded from (seed, step, process_index): deterministic for a
given step, different across steps and hosts, and free to recompute after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DropoutRates:
    """Probabilities of the three exclusive drop outcomes; their sum must be <= 1."""

    text: float = 0.05
    image: float = 0.05
    both: float = 0.05

    def __post_init__(self):
        for name in ("text", "image", "both"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"dropout rate {name}={getattr(self, name)} outside [0, 1]")
        if self.text + self.image + self.both > 1.0 + 1e-9:
            raise ValueError(f"dropout rates sum to {self.text + self.image + self.both} > 1")


def dropout_rng(seed: int, step: int, process_index: int = 0) -> np.random.Generator:
    """The Generator used for `step` on `process_index`."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(step), int(process_index)]))


def sample_conditioning_drops(
    batch_size: int,
    rates: DropoutRates,
    seed: int,
    step: int,
    process_index: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(drop_text bool [batch_size], drop_image bool [batch_size]) for one local batch."""
    u = dropout_rng(seed, step, process_index).random(batch_size)
    image_only = u < rates.image
    text_only = (u >= rates.image) & (u < rates.image + rates.text)
    both = (u >= rates.image + rates.text) & (u < rates.image + rates.text + rates.both)
    return text_only | both, image_only | both


def drop_captions(input_ids: np.ndarray, drop_text: np.ndarray, empty_ids: np.ndarray) -> np.ndarray:
    """Copy of ``input_ids [b, L]`` with rows where ``drop_text`` replaced by ``empty_ids [L]``."""
    input_ids = np.array(input_ids, copy=True)
    input_ids[np.asarray(drop_text, dtype=bool)] = empty_ids
    return input_ids


def zero_dropped_images(clip_pixels: np.ndarray, drop_image: np.ndarray) -> np.ndarray:
    """Copy of ``clip_pixels [b, H, W, 3]`` with dropped rows set to 0 (the IP-Adapter Plus way)."""
    clip_pixels = np.array(clip_pixels, copy=True)
    clip_pixels[np.asarray(drop_image, dtype=bool)] = 0
    return clip_pixels

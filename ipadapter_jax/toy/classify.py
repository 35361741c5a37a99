"""A pixel-based reader of toy-world images: which colour and which shape does an image show?

No learning: the background colour is the median of the border pixels, the shape is the largest connected
region of pixels far from it (further than half the contrast between the background and the most distant
pixels, so a blurred edge is cut where it was), its colour is the palette colour nearest to the region's median, and its
shape is the ideal circle / square / triangle, fitted to the region's bounding box, that overlaps the region
best (intersection over union). Works on dataset images and on generated ones, where it is the judge of the
toy metrics ("does the generation show the reference's colour / shape?"). Chance levels for a generator
that ignores the reference: 1/4 for the colour, 1/3 for the shape.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from ipadapter_jax.toy.shapes_dataset import COLOURS, SHAPES

MIN_CONTRAST = 60.0  # RGB distance from the background below which nothing counts as a shape
MIN_AREA_FRACTION = 0.02  # a region smaller than this fraction of the image is not a shape
CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES)}


@dataclasses.dataclass(frozen=True)
class Reading:
    """``colour`` / ``shape``: names, or None when no shape was found. ``shape_scores``: IoU with each
    ideal shape; ``colour_distance``: RGB distance from the region's median to the chosen palette colour."""

    colour: str | None
    shape: str | None
    area: int
    colour_distance: float
    shape_scores: dict[str, float]


def _background(image: np.ndarray) -> np.ndarray:
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]]).astype(np.float32)
    return np.median(border, axis=0)


def _largest_region(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
    return labels == (1 + int(np.argmax(sizes)))


def ideal_masks(height: int, width: int) -> dict[str, np.ndarray]:
    """Boolean ``[height, width]`` masks of each shape filling a ``height x width`` box (pixel centres)."""
    y = (np.arange(height) + 0.5)[:, None] / height
    x = (np.arange(width) + 0.5)[None, :] / width
    return {
        "circle": (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25,
        "square": np.ones((height, width), bool),
        # Apex at the top centre, base along the bottom.
        "triangle": np.abs(x - 0.5) <= 0.5 * y,
    }


def classify(image: np.ndarray) -> Reading:
    """``image``: uint8 (or float in [0, 1]) ``[H, W, 3]``."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    pixels = image.astype(np.float32)
    distance = np.linalg.norm(pixels - _background(image), axis=-1)
    contrast = float(np.percentile(distance, 99))
    region = _largest_region(distance > max(0.5 * contrast, MIN_CONTRAST))
    area = int(region.sum())
    if area < MIN_AREA_FRACTION * region.size:
        return Reading(None, None, area, float("inf"), {s: 0.0 for s in SHAPES})

    median = np.median(pixels[region], axis=0)
    names = list(COLOURS)
    distances = [float(np.linalg.norm(median - np.asarray(COLOURS[n], np.float32))) for n in names]
    colour = names[int(np.argmin(distances))]

    rows, cols = np.nonzero(region)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    crop = region[top:bottom, left:right]
    scores = {}
    for name, ideal in ideal_masks(bottom - top, right - left).items():
        union = np.logical_or(crop, ideal).sum()
        scores[name] = float(np.logical_and(crop, ideal).sum() / union) if union else 0.0
    shape = max(scores, key=scores.get)
    return Reading(colour, shape, area, min(distances), scores)


def classify_batch(images) -> list[Reading]:
    return [classify(image) for image in images]

"""The toy base model's quality check: generate from every full caption through ``IPAdapterPipeline`` (no
adapter) and read the images back with the pixel classifier. A base that follows its text is what an
IP-Adapter is trained on top of."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ipadapter_jax.toy.classify import CHANCE, classify
from ipadapter_jax.toy.shapes_dataset import COLOURS, SHAPES

GUIDANCE_SCALE = 4.0


def image_grid(rows: list[np.ndarray], upscale: int = 2) -> Image.Image:
    """``rows``: each ``[n, H, W, 3]`` float in [0, 1] (or uint8); one grid row per entry, 2-pixel gaps."""
    rows = [np.asarray(r) for r in rows]
    rows = [(np.clip(r, 0, 1) * 255).round().astype(np.uint8) if r.dtype != np.uint8 else r for r in rows]
    h, w = rows[0].shape[1:3]
    cols = max(len(r) for r in rows)
    gap = 2
    grid = np.full((len(rows) * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = image
    image = Image.fromarray(grid)
    return image.resize((image.width * upscale, image.height * upscale), Image.NEAREST) if upscale > 1 else image


def text_to_image_check(base_dir: str | Path, images_per_caption: int = 4, steps: int = 20,
                        guidance_scale: float = GUIDANCE_SCALE, seed: int = 0,
                        grid_path: str | Path | None = None) -> dict:
    """Accuracies of colour, shape and both over ``12 * images_per_caption`` generations, with chance
    levels; writes a grid (one row per caption) to ``grid_path`` when given."""
    from ipadapter_jax.pipeline import IPAdapterPipeline

    pipe = IPAdapterPipeline.from_pretrained(base_dir)
    colour_hits, shape_hits, rows = [], [], []
    for i, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
        images = pipe([f"a {colour} {shape}"] * images_per_caption, num_inference_steps=steps,
                      guidance_scale=guidance_scale, seed=seed + i)
        rows.append(images)
        for image in images:
            reading = classify(image)
            colour_hits.append(reading.colour == colour)
            shape_hits.append(reading.shape == shape)
    if grid_path is not None:
        image_grid(rows).save(grid_path)
    colour_hits, shape_hits = np.asarray(colour_hits), np.asarray(shape_hits)
    return {
        "images": int(colour_hits.size), "steps": steps, "guidance_scale": guidance_scale,
        "colour_accuracy": float(colour_hits.mean()), "shape_accuracy": float(shape_hits.mean()),
        "both_accuracy": float((colour_hits & shape_hits).mean()),
        "colour_chance": CHANCE["colour"], "shape_chance": CHANCE["shape"],
        "both_chance": CHANCE["colour"] * CHANCE["shape"],
    }

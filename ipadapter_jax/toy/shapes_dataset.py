"""Deterministic coloured-shapes images with captions: the toy world's data.

One flat-coloured shape (circle, square or upward triangle) on a flat background, 32x32 RGB. The colour and
the shape are drawn from small palettes chosen to be far apart in RGB (so a pixel classifier can read them
back, see ``classify.py``); position, size and background vary and are never named in a caption.

Training captions name the colour and the shape ("a red circle"), only the colour ("a red shape") or only
the shape ("a circle"). The image then often carries what its caption leaves out: an image prompt has
something to add over the text, which is what an IP-Adapter learns to use. Held-out (evaluation) samples
always have the full caption.

Shards: webdataset tars with ``<key>.png``, ``<key>.txt`` (the training caption) and ``<key>.json`` (the
labels: caption, full_caption, colour, shape, background, box). Everything is a function of the seed.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ipadapter_jax.data.synthetic import write_tar

IMAGE_SIZE = 32
COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 75, 215), "yellow": (235, 200, 35)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (238, 238, 238), "light grey": (178, 178, 178), "dark grey": (82, 82, 82),
               "black": (18, 18, 18)}
MIN_SIZE, MAX_SIZE = 12, 22  # shape side in pixels at IMAGE_SIZE
COLOUR_JITTER, BACKGROUND_JITTER = 12, 8  # per-channel uniform jitter, so no two images are identical
SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: anti-aliased edges
# Caption kinds of training samples and their probabilities.
CAPTION_KINDS = (("full", 0.5), ("colour", 0.25), ("shape", 0.25))
MARKER = "toy_shards.json"  # written last: a folder without it (or with other arguments) is rewritten


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    """What one image shows. ``left``, ``top``, ``size`` are in supersampled pixels
    (``SUPERSAMPLE * IMAGE_SIZE`` canvas); the jitters are added to the palette colours."""

    colour: str
    shape: str
    background: str
    left: int
    top: int
    size: int
    colour_jitter: tuple[int, int, int] = (0, 0, 0)
    background_jitter: tuple[int, int, int] = (0, 0, 0)

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) in output pixels."""
        s = SUPERSAMPLE
        return (self.left / s, self.top / s, (self.left + self.size) / s, (self.top + self.size) / s)

    def labels(self) -> dict:
        return {"colour": self.colour, "shape": self.shape, "background": self.background,
                "box": [round(v, 2) for v in self.box], "full_caption": full_caption(self.colour, self.shape)}


def full_caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def caption_of(spec: ShapeSpec, kind: str) -> str:
    """``kind``: "full" ("a red circle"), "colour" ("a red shape") or "shape" ("a circle")."""
    if kind == "full":
        return full_caption(spec.colour, spec.shape)
    if kind == "colour":
        return f"a {spec.colour} shape"
    if kind == "shape":
        return f"a {spec.shape}"
    raise ValueError(f"caption kind {kind!r}: one of {[k for k, _ in CAPTION_KINDS]}")


def all_full_captions() -> list[str]:
    """The 12 full captions, colour-major (index = colour_index * len(SHAPES) + shape_index)."""
    return [full_caption(c, s) for c in COLOURS for s in SHAPES]


def _clip255(rgb, jitter) -> tuple[int, int, int]:
    return tuple(int(np.clip(v + j, 0, 255)) for v, j in zip(rgb, jitter))


def render(spec: ShapeSpec, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 ``[image_size, image_size, 3]``."""
    canvas = SUPERSAMPLE * IMAGE_SIZE
    image = Image.new("RGB", (canvas, canvas), _clip255(BACKGROUNDS[spec.background], spec.background_jitter))
    draw = ImageDraw.Draw(image)
    fill = _clip255(COLOURS[spec.colour], spec.colour_jitter)
    l, t, n = spec.left, spec.top, spec.size
    if spec.shape == "circle":
        draw.ellipse((l, t, l + n - 1, t + n - 1), fill=fill)
    elif spec.shape == "square":
        draw.rectangle((l, t, l + n - 1, t + n - 1), fill=fill)
    elif spec.shape == "triangle":
        draw.polygon([(l + (n - 1) / 2, t), (l, t + n - 1), (l + n - 1, t + n - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}")
    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
    if image_size != IMAGE_SIZE:
        image = image.resize((image_size, image_size), Image.BICUBIC)
    return np.asarray(image, np.uint8)


def random_spec(rng: np.random.Generator) -> ShapeSpec:
    s = SUPERSAMPLE
    size = int(rng.integers(MIN_SIZE * s, MAX_SIZE * s + 1))
    margin = s  # one output pixel clear of the border, so the border shows the background
    left = int(rng.integers(margin, IMAGE_SIZE * s - margin - size + 1))
    top = int(rng.integers(margin, IMAGE_SIZE * s - margin - size + 1))
    return ShapeSpec(
        colour=list(COLOURS)[rng.integers(len(COLOURS))],
        shape=SHAPES[rng.integers(len(SHAPES))],
        background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        left=left, top=top, size=size,
        colour_jitter=tuple(int(v) for v in rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3)),
        background_jitter=tuple(int(v) for v in rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1, 3)),
    )


def _caption_kind(rng: np.random.Generator) -> str:
    kinds, probs = zip(*CAPTION_KINDS)
    return kinds[int(rng.choice(len(kinds), p=probs))]


@dataclasses.dataclass(frozen=True)
class ShapeExamples:
    """``images`` uint8 ``[N, 32, 32, 3]``; ``specs``, ``captions`` (training captions) of length N."""

    images: np.ndarray
    specs: list[ShapeSpec]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def colour_index(self) -> np.ndarray:
        return np.asarray([list(COLOURS).index(s.colour) for s in self.specs], np.int32)

    @property
    def shape_index(self) -> np.ndarray:
        return np.asarray([SHAPES.index(s.shape) for s in self.specs], np.int32)

    @property
    def class_index(self) -> np.ndarray:
        """Index into ``all_full_captions()``."""
        return self.colour_index * len(SHAPES) + self.shape_index


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, stream)]))


def make_examples(count: int, seed: int, stream: int = 0, partial_captions: bool = True) -> ShapeExamples:
    """``count`` examples, a function of ``(seed, stream)``; ``partial_captions=False`` gives every sample
    its full caption."""
    rng = _rng(seed, stream)
    specs, captions = [], []
    for _ in range(count):
        spec = random_spec(rng)
        kind = _caption_kind(rng) if partial_captions else "full"
        specs.append(spec)
        captions.append(caption_of(spec, kind))
    images = np.stack([render(s) for s in specs]) if specs else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return ShapeExamples(images, specs, captions)


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def shard_members(examples: ShapeExamples, prefix: str, labels: bool = True) -> list[tuple[str, bytes]]:
    """Tar members ``(name, bytes)`` of ``examples``, per sample ``<key>.png``, ``<key>.txt`` and, with
    ``labels``, ``<key>.json``; keys are ``prefix`` + a five-digit index."""
    members = []
    for i, (image, spec, caption) in enumerate(zip(examples.images, examples.specs, examples.captions)):
        key = f"{prefix}{i:05d}"
        members += [(f"{key}.png", png_bytes(image)), (f"{key}.txt", caption.encode())]
        if labels:
            members.append((f"{key}.json", json.dumps({"caption": caption, **spec.labels()}, sort_keys=True).encode()))
    return members


# Streams of make_examples: shard i of the training set uses stream TRAIN_STREAM + i.
HELDOUT_STREAM, TRAIN_STREAM = 1, 1000


def write_shape_shards(folder: str | os.PathLike, num_shards: int = 16, samples_per_shard: int = 64,
                       seed: int = 0, heldout_samples: int = 64, labels: bool = True) -> str:
    """``folder/train-{00000..N-1}.tar`` (mixed captions) and ``folder/heldout-00000.tar`` (full captions);
    returns the training shard spec (a brace pattern). ``labels``: write each sample's ``.json`` labels
    (evaluation reads them; training does not). Shards already written with the same arguments are reused."""
    folder = Path(folder)
    marker = {"num_shards": num_shards, "samples_per_shard": samples_per_shard, "seed": seed,
              "heldout_samples": heldout_samples, "image_size": IMAGE_SIZE, "version": 1}
    if not labels:
        marker["labels"] = False
    spec = str(folder / f"train-{{00000..{num_shards - 1:05d}}}.tar")
    if (folder / MARKER).is_file() and json.loads((folder / MARKER).read_text()) == marker:
        return spec
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).unlink(missing_ok=True)
    for s in range(num_shards):
        examples = make_examples(samples_per_shard, seed, TRAIN_STREAM + s)
        write_tar(folder / f"train-{s:05d}.tar", shard_members(examples, f"train{s:03d}_", labels))
    heldout = make_examples(heldout_samples, seed, HELDOUT_STREAM, partial_captions=False)
    write_tar(heldout_shard(folder), shard_members(heldout, "heldout_", labels))
    (folder / MARKER).write_text(json.dumps(marker))
    return spec


def heldout_shard(folder: str | os.PathLike) -> str:
    return str(Path(folder) / "heldout-00000.tar")


def read_labelled_samples(url: str) -> Iterator[tuple[np.ndarray, dict]]:
    """``(uint8 image [H, W, 3], labels)`` of each sample of a shard written here (labels from the json
    member; ``{}`` when it has none, with the caption from ``txt``)."""
    from ipadapter_jax.data.tar_samples import iter_shard_samples, sample_image_bytes

    for sample in iter_shard_samples(url):
        image_bytes = sample_image_bytes(sample)
        if image_bytes is None:
            continue
        labels = json.loads(sample["json"]) if "json" in sample else {}
        if "caption" not in labels and "txt" in sample:
            labels["caption"] = sample["txt"].decode("utf-8").strip()
        image = np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB"), np.uint8)
        yield image, {"key": sample["__key__"], **labels}

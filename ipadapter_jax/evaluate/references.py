"""Reference images with captions for evaluation: the toy world's held-out set, webdataset shards, or COCO-2017
validation (the paper's set: 5,000 images) through TFDS or from the unpacked ``val2017/`` folder.

TFDS' ``coco/2017`` has no captions, so COCO captions always come from ``captions_val2017.json`` (in COCO's
``annotations_trainval2017.zip``); each image gets the first of its captions by annotation id, a
deterministic choice (COCO has about five per image).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

TFDS_COCO = "coco/2017"


@dataclasses.dataclass(frozen=True)
class Reference:
    """``image``: uint8 ``[H, W, 3]``; ``labels``: toy-world ground truth (colour, shape, ...) or ``{}``."""

    key: str
    image: np.ndarray
    caption: str
    labels: dict = dataclasses.field(default_factory=dict)


def toy_references(count: int = 64, seed: int = 0) -> list[Reference]:
    """The toy world's held-out samples (the same as ``heldout-00000.tar`` of ``write_shape_shards``)."""
    from ipadapter_jax.toy.shapes_dataset import HELDOUT_STREAM, make_examples

    data = make_examples(count, seed, HELDOUT_STREAM, partial_captions=False)
    return [Reference(f"heldout_{i:05d}", image, caption, spec.labels())
            for i, (image, spec, caption) in enumerate(zip(data.images, data.specs, data.captions))]


def shard_references(spec: str, count: int | None = None) -> list[Reference]:
    """Samples of webdataset shards (image + ``txt``, or the ``caption`` of the ``json`` member), in order."""
    from ipadapter_jax.data.shards import expand_shard_spec
    from ipadapter_jax.toy.shapes_dataset import read_labelled_samples

    out: list[Reference] = []
    for url in expand_shard_spec(spec):
        for image, labels in read_labelled_samples(url):
            caption = labels.get("full_caption") or labels.get("caption")
            if caption is None:
                continue
            out.append(Reference(labels.get("key", str(len(out))), image, caption,
                                 {k: labels[k] for k in ("colour", "shape") if k in labels}))
            if count is not None and len(out) >= count:
                return out
    return out


def read_coco_captions(path: str | os.PathLike) -> dict[int, str]:
    """``captions_val2017.json`` -> ``{image_id: first caption (lowest annotation id)}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; COCO captions come from captions_val2017.json in "
                                f"annotations_trainval2017.zip (cocodataset.org)")
    with open(path, encoding="utf-8") as f:
        annotations = json.load(f).get("annotations")
    if not isinstance(annotations, list):
        raise ValueError(f"{path}: no 'annotations' list; is this a COCO captions file?")
    first: dict[int, tuple[int, str]] = {}
    for a in annotations:
        image_id, ann_id, caption = int(a["image_id"]), int(a.get("id", 0)), str(a["caption"]).strip()
        if image_id not in first or ann_id < first[image_id][0]:
            first[image_id] = (ann_id, caption)
    return {image_id: caption for image_id, (_, caption) in first.items()}


def coco_folder_references(image_dir: str | os.PathLike, captions_json: str | os.PathLike,
                           count: int | None = None) -> list[Reference]:
    """COCO-2017 validation from the unpacked ``val2017/`` folder (``000000xxxxxx.jpg``), in image-id order."""
    captions = read_coco_captions(captions_json)
    image_dir = Path(image_dir)
    out = []
    for image_id in sorted(captions):
        path = image_dir / f"{image_id:012d}.jpg"
        if not path.is_file():
            continue
        out.append(Reference(str(image_id), np.asarray(Image.open(path).convert("RGB"), np.uint8),
                             captions[image_id]))
        if count is not None and len(out) >= count:
            break
    if not out:
        raise FileNotFoundError(f"{image_dir}: none of the images listed in {captions_json} is there")
    return out


def coco_tfds_references(captions_json: str | os.PathLike, count: int | None = None,
                         data_dir: str | None = None, split: str = "validation") -> list[Reference]:
    """COCO-2017 validation images from TFDS (``coco/2017``), captions from ``captions_json``."""
    from ipadapter_jax.data.tfds_source import import_tfds

    tfds = import_tfds()
    captions = read_coco_captions(captions_json)
    dataset = tfds.load(TFDS_COCO, split=split, data_dir=data_dir, shuffle_files=False,
                        decoders={"image": tfds.decode.SkipDecoding()})
    out = []
    for element in tfds.as_numpy(dataset):
        image_id = int(element["image/id"])
        if image_id not in captions:
            continue
        image = np.asarray(Image.open(io.BytesIO(bytes(element["image"]))).convert("RGB"), np.uint8)
        out.append(Reference(str(image_id), image, captions[image_id]))
        if count is not None and len(out) >= count:
            break
    return out

"""Write webdataset tar shards (``00000.tar``, ``00001.tar``, ...) from images with captions.

Inputs (one of):
  --images DIR                     images under DIR (recursive), caption in a sidecar ``name.txt``
  --images DIR --captions FILE     captions from a JSON file ({"rel/path.jpg": "caption", ...} or
                                   [{"file"|"image"|"image_file": ..., "text"|"caption": ...}, ...])
                                   or a CSV file with a header (file|image|image_file|filename,
                                   caption|text); paths relative to DIR
  --tencent-json FILE --image-root DIR
                                   tencent IP-Adapter training JSON: [{"image_file": ..., "text": ...}]

Each sample is stored as ``<key>.<jpg|png|webp>`` (the original bytes, extension from the real
format), ``<key>.txt`` (caption) and ``<key>.json`` ({"caption", "source", "width", "height"}).
Images that fail to decode (our robust decoder) or lack a caption are reported and skipped. Each shard is
published whole (``atomic_files``) once full, so an interrupted run leaves only complete shards.

    python -m ipadapter_jax.data.make_shards --images photos/ --out shards/ --samples-per-shard 1000

(``python -m ipadapter_jax.tools.make_shards`` is this command's old name, kept for one release.)
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ipadapter_jax.atomic_files import atomic_path
from ipadapter_jax.data.image_ops import ImageDecodeError, decode_image
from ipadapter_jax.data.tar_samples import add_member

TOOL = "python -m ipadapter_jax.data.make_shards"

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_FORMAT_EXTENSION = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
_FILE_COLUMNS = ("file", "image", "image_file", "filename", "path")
_CAPTION_COLUMNS = ("caption", "text", "txt")


@dataclass
class ShardSummary:
    written: int = 0
    shards: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, source: str) -> None:
        self.skipped.setdefault(reason, []).append(source)

    def report(self) -> str:
        lines = [f"wrote {self.written} samples into {len(self.shards)} shard(s)"]
        for reason, sources in sorted(self.skipped.items()):
            shown = ", ".join(sources[:5]) + (" ..." if len(sources) > 5 else "")
            lines.append(f"skipped {len(sources)} ({reason}): {shown}")
        return "\n".join(lines)


def _pick(record: dict, names: tuple[str, ...], what: str):
    for name in names:
        if name in record:
            return record[name]
    raise ValueError(f"caption record {record!r} has no {what} field (one of {names})")


def pairs_from_sidecars(image_dir: str) -> Iterator[tuple[str, str | None]]:
    """(image path, caption or None) for every image under `image_dir`, caption from ``stem.txt``."""
    for root, dirs, files in os.walk(image_dir):
        dirs.sort()
        for name in sorted(files):
            if not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            path = os.path.join(root, name)
            sidecar = os.path.splitext(path)[0] + ".txt"
            caption = None
            if os.path.isfile(sidecar):
                with open(sidecar, encoding="utf-8", errors="replace") as f:
                    caption = f.read()
            yield path, caption


def pairs_from_caption_file(image_dir: str, captions_path: str) -> Iterator[tuple[str, str | None]]:
    """(image path, caption) from a captions JSON (dict or list of records) or CSV file."""
    if captions_path.lower().endswith(".csv"):
        with open(captions_path, newline="", encoding="utf-8") as f:
            records = list(csv.DictReader(f))
    else:
        with open(captions_path, encoding="utf-8") as f:
            records = json.load(f)
    if isinstance(records, dict):
        records = [{"file": k, "caption": v} for k, v in records.items()]
    for record in records:
        yield os.path.join(image_dir, _pick(record, _FILE_COLUMNS, "file")), _pick(record, _CAPTION_COLUMNS, "caption")


def pairs_from_tencent_json(json_path: str, image_root: str) -> Iterator[tuple[str, str | None]]:
    """(image path, caption) from tencent's ``[{"image_file": ..., "text": ...}]`` training JSON."""
    with open(json_path, encoding="utf-8") as f:
        records = json.load(f)
    for record in records:
        yield os.path.join(image_root, record["image_file"]), record.get("text")


def _samples(pairs: list[tuple[str, str | None]], summary: ShardSummary,
             max_pixels: int | None) -> Iterator[dict[str, bytes]]:
    """The members (ext -> bytes, plus ``__key__``) of every usable pair, in order; the rest go to ``summary``."""
    kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
    for source, caption in pairs:
        caption = (caption or "").strip()
        if not caption:
            summary.skip("missing_caption", source)
            continue
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as exc:
            summary.skip("unreadable_file", f"{source} ({exc.strerror})")
            continue
        try:
            decoded = decode_image(data, **kwargs)
        except ImageDecodeError as exc:
            summary.skip(exc.reason, source)
            continue
        height, width = decoded.original_size
        meta = {"caption": caption, "source": source, "width": width, "height": height}
        yield {"__key__": f"{summary.written:09d}", _FORMAT_EXTENSION[decoded.format]: data,
               "txt": caption.encode("utf-8"), "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
        summary.written += 1


def write_shards(
    pairs: list[tuple[str, str | None]],
    out_dir: str,
    samples_per_shard: int,
    *,
    max_pixels: int | None = None,
) -> ShardSummary:
    """Check and write `pairs` in the given order into ``out_dir/00000.tar``, ...; returns the summary. An
    input with no usable image writes no shard."""
    os.makedirs(out_dir, exist_ok=True)
    summary = ShardSummary()
    samples = _samples(pairs, summary, max_pixels)
    while (first := next(samples, None)) is not None:  # streamed: a shard's images are never all in memory
        path = os.path.join(out_dir, f"{len(summary.shards):05d}.tar")
        with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
            for sample in itertools.chain([first], itertools.islice(samples, samples_per_shard - 1)):
                key = sample.pop("__key__")
                for ext, data in sample.items():
                    add_member(tar, f"{key}.{ext}", data)
        summary.shards.append(path)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=TOOL, description=__doc__.split("\n")[0])
    parser.add_argument("--images", help="image folder (sidecar .txt captions unless --captions)")
    parser.add_argument("--captions", help="captions JSON or CSV for --images")
    parser.add_argument("--tencent-json", help="tencent training JSON [{image_file, text}]")
    parser.add_argument("--image-root", help="folder the tencent JSON's image_file paths are relative to")
    parser.add_argument("--out", required=True, help="output folder for %%05d.tar shards")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--shuffle", action="store_true", help="shuffle samples before writing")
    parser.add_argument("--seed", type=int, default=0, help="seed for --shuffle")
    parser.add_argument("--max-pixels", type=int, default=None, help="skip images with more pixels")
    args = parser.parse_args(argv)

    if args.tencent_json:
        if args.images or not args.image_root:
            parser.error("--tencent-json needs --image-root and excludes --images")
        pairs = list(pairs_from_tencent_json(args.tencent_json, args.image_root))
    elif args.images:
        if not os.path.isdir(args.images):  # else a mistyped folder writes 0 shards and looks like a success
            parser.error(f"--images {args.images}: no such folder")
        if args.captions:
            pairs = list(pairs_from_caption_file(args.images, args.captions))
        else:
            pairs = list(pairs_from_sidecars(args.images))
    else:
        parser.error("give --images DIR or --tencent-json FILE --image-root DIR")
    if args.samples_per_shard < 1:
        parser.error("--samples-per-shard must be >= 1")
    if os.path.isdir(args.out) and any(name.endswith(".tar") for name in os.listdir(args.out)):
        # Rewriting over an older, longer run would leave its trailing shards mixed in.
        parser.error(f"{args.out} already holds .tar shards; write into an empty folder")
    if args.shuffle:
        order = np.random.default_rng(args.seed).permutation(len(pairs))
        pairs = [pairs[i] for i in order]

    summary = write_shards(pairs, args.out, args.samples_per_shard, max_pixels=args.max_pixels)
    print(summary.report())
    return 0 if summary.written else 1


if __name__ == "__main__":
    from ipadapter_jax.cli_errors import run_cli

    run_cli(TOOL, main)  # one-line errors, exit 2 for a user mistake

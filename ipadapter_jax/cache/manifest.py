"""What a latent cache must agree on with the training config, and opening one for training.

Both the cache writer and the trainer compute ``cache_identity`` from the config and the model folders; the
trainer refuses a cache whose manifest differs (``CacheError`` naming every difference) before anything is
compiled. The model is identified by a fingerprint of the encoder weights and tokenizers
(``model_fingerprint``), not by its path, so a cache written on one machine serves a run on another that
mounts the same model elsewhere. The files are read through the shard reader's opener, so a cache can live
wherever shards can (a local folder, ``gs://``, ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ipadapter_jax.cache.format import (FORMAT, MANIFEST_NAME, UNCOND_NAME, WRITE_COMMAND, CacheError, cache_url,
                                        cached_example_shapes)
from ipadapter_jax.data.counters import SampleCounters
from ipadapter_jax.data.tar_samples import open_shard

logger = logging.getLogger(__name__)


def encoder_folders(model_dir: Path, image_encoder_dir: Path, is_sdxl: bool) -> dict[str, Path]:
    """The (local) folders whose contents determine the cached tensors."""
    names = ["vae", "text_encoder", "tokenizer"] + (["text_encoder_2", "tokenizer_2"] if is_sdxl else [])
    folders = {name: Path(model_dir) / name for name in names}
    folders["image_encoder"] = Path(image_encoder_dir)
    return folders


def model_fingerprint(folders: dict[str, Path]) -> str:
    """A cheap identity of the encoder weights a cache depends on: for every file of each folder (sorted), its
    name, size and the SHA-1 of its first and last MiB (a safetensors header lists every tensor and its
    offsets, so different weights, shapes or dtypes change it), without reading multi-GB files in full."""
    digest = hashlib.sha1()
    chunk = 1 << 20
    for role, folder in sorted(folders.items()):
        folder = Path(folder)
        files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        if not files:
            raise CacheError(f"{role}: no model files in {folder}")
        for path in files:
            size = path.stat().st_size
            digest.update(f"{role}/{path.name}:{size}:".encode())
            with open(path, "rb") as f:
                digest.update(f.read(chunk))
                if size > 2 * chunk:
                    f.seek(size - chunk)
                    digest.update(f.read(chunk))
    return digest.hexdigest()


def cache_identity(config: Any, model_dir: Path, image_encoder_dir: Path, modules: Any) -> dict:
    """The manifest fields a run checks: model fingerprint, resolution, adapter variant, SDXL-ness, shapes.
    ``model_dir`` and ``image_encoder_dir`` are the local folders the models were loaded from."""
    uses_hidden = config.adapter.variant == "plus"
    shapes = cached_example_shapes(modules, config.data.resolution, uses_hidden)
    return {
        "model_fingerprint": model_fingerprint(encoder_folders(model_dir, image_encoder_dir, modules.is_sdxl)),
        "resolution": config.data.resolution,
        "variant": config.adapter.variant,
        "sdxl": modules.is_sdxl,
        "shapes": {k: list(v) for k, v in shapes.items()},
    }


def check_manifest(manifest: dict, identity: dict, cache_dir: str) -> None:
    """Raise ``CacheError`` listing every field of ``identity`` the manifest disagrees with."""
    hints = {"resolution": "data.resolution", "variant": "adapter.variant"}
    problems = []
    for key, expected in identity.items():
        found = manifest.get(key)
        if found == expected:
            continue
        if key == "model_fingerprint":
            problems.append(f"model: the cache was encoded with the model in {manifest.get('model_dir')!r} (image "
                            f"encoder {manifest.get('image_encoder_dir')!r}), whose weights differ from this "
                            f"config's model.model_dir / model.image_encoder_dir")
        elif key == "shapes":
            problems.append(f"shapes: cache {found}, config {expected}")
        else:
            where = f" (config {hints[key]})" if key in hints else ""
            problems.append(f"{key}: cache {found!r}, config {expected!r}{where}")
    if problems:
        raise CacheError(f"the latent cache {cache_dir} was not made for this config:\n  " + "\n  ".join(problems)
                         + f"\nre-run {WRITE_COMMAND} with this config, or point data.cache_dir at a matching cache")


def _read_bytes(url: str) -> bytes:
    with contextlib.closing(open_shard(url)) as stream:
        return stream.read()


def read_manifest(cache_dir: str) -> dict:
    url = cache_url(cache_dir, MANIFEST_NAME)
    try:
        manifest = json.loads(_read_bytes(url))
    except Exception as exc:
        raise CacheError(f"no readable latent-cache manifest at {url} ({type(exc).__name__}: {exc}); write the "
                         f"cache with {WRITE_COMMAND} first") from exc
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{url}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def read_counts(cache_dir: str, manifest: dict) -> SampleCounters:
    """Every writer's sample counters, added up; a missing file means that writer has not finished."""
    total = SampleCounters()
    for name in manifest.get("counts", []):
        url = cache_url(cache_dir, name)
        try:
            total.add(SampleCounters.from_dict(json.loads(_read_bytes(url))))
        except Exception as exc:
            raise CacheError(f"the latent cache {cache_dir} is incomplete: {url} is missing or unreadable (a "
                             f"writer process has not finished; re-run it with the same arguments)") from exc
    return total


def read_uncond(cache_dir: str) -> dict[str, np.ndarray]:
    url = cache_url(cache_dir, UNCOND_NAME)
    try:
        with np.load(io.BytesIO(_read_bytes(url))) as data:
            return {k: np.asarray(data[k], np.float32) for k in data.files}
    except Exception as exc:
        raise CacheError(f"cannot read {url}: {type(exc).__name__}: {exc}") from exc


@dataclasses.dataclass(frozen=True)
class LatentCache:
    """An opened, checked cache: its shard URLs, per-example shapes and the dropped-condition encodings."""

    cache_dir: str
    manifest: dict
    shards: list[str]
    shapes: dict[str, tuple]
    uncond: dict[str, np.ndarray]  # text_context [T, D], (text_pooled [P]), image_features

    @property
    def uncond_text(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in self.uncond.items() if k.startswith("text_")}


def open_latent_cache(config: Any, model_dir: Path, modules: Any,
                      image_encoder_dir: Path | None = None) -> LatentCache:
    """Read and check ``config.data.cache_dir``'s manifest and ``uncond.npz`` (see ``cache.format``).
    ``image_encoder_dir``: the local folder the image encoder was loaded from (None: resolved from the config)."""
    from ipadapter_jax.train.frozen import image_encoder_folder

    cache_dir = config.data.cache_dir
    manifest = read_manifest(cache_dir)
    if image_encoder_dir is None:
        image_encoder_dir = image_encoder_folder(model_dir, config.model.image_encoder_dir)
    identity = cache_identity(config, model_dir, image_encoder_dir, modules)
    check_manifest(manifest, identity, cache_dir)
    uncond = read_uncond(cache_dir)
    shapes = {k: tuple(v) for k, v in identity["shapes"].items()}
    expected = {k: shapes[k] for k in ("text_context", "text_pooled", "image_features") if k in shapes}
    wrong = {k: (uncond[k].shape if k in uncond else None, v) for k, v in expected.items()
             if k not in uncond or uncond[k].shape != v}
    if wrong:
        raise CacheError(f"{cache_url(cache_dir, UNCOND_NAME)}: wrong or missing arrays {wrong} (found, expected)")
    if not manifest.get("shards"):
        raise CacheError(f"the latent cache {cache_dir} lists no shards")
    total = read_counts(cache_dir, manifest)
    logger.info("latent cache %s: %d shards, %d samples; skipped when written: %s", cache_dir,
                len(manifest["shards"]), total.used, total.skipped or "none")
    if manifest.get("random_crop") != config.data.random_crop:
        logger.warning("the latent cache was made with random_crop=%s (one crop per image, fixed), the config "
                       "says data.random_crop=%s", manifest.get("random_crop"), config.data.random_crop)
    shards = [cache_url(cache_dir, name) for name in manifest["shards"]]
    return LatentCache(cache_dir, manifest, shards, shapes, uncond)

"""What a latent cache must agree on with the training config, and opening one for training.

Both the cache writer and the trainer compute ``cache_identity`` from the config and the model folders; the
trainer refuses a cache whose manifest differs (``CacheError`` naming every difference) before anything is
compiled. The model is identified by a fingerprint of the encoder weights and tokenizers
(``latent_cache.model_fingerprint``), not by its path, so a cache written on one machine serves a run on
another that mounts the same model elsewhere.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ipadapter_jax.data.latent_cache import (CacheError, cache_url, model_fingerprint, read_counts,
                                             read_manifest, read_uncond)
from ipadapter_jax.train.cached_batch import cached_example_shapes, image_feature_shape

logger = logging.getLogger(__name__)


def encoder_folders(model_dir: Path, image_encoder_dir: Path, is_sdxl: bool) -> dict[str, Path]:
    """The (local) folders whose contents determine the cached tensors."""
    names = ["vae", "text_encoder", "tokenizer"] + (["text_encoder_2", "tokenizer_2"] if is_sdxl else [])
    folders = {name: Path(model_dir) / name for name in names}
    folders["image_encoder"] = Path(image_encoder_dir)
    return folders


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
                         + "\nre-run python -m ipadapter_jax.tools.cache_latents with this config, or point "
                           "data.cache_dir at a matching cache")


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
    """Read and check ``config.data.cache_dir``'s manifest and ``uncond.npz`` (see ``data.latent_cache``).
    ``image_encoder_dir``: the local folder the image encoder was loaded from (None: resolved from the config)."""
    from ipadapter_jax.train.frozen import image_encoder_folder

    cache_dir = config.data.cache_dir
    manifest = read_manifest(cache_dir)
    if image_encoder_dir is None:
        image_encoder_dir = image_encoder_folder(model_dir, config.model.image_encoder_dir)
    identity = cache_identity(config, model_dir, image_encoder_dir, modules)
    check_manifest(manifest, identity, cache_dir)
    uncond = read_uncond(cache_dir)
    expected = {"text_context": tuple(identity["shapes"]["text_context"]),
                "image_features": image_feature_shape(modules, config.adapter.variant == "plus")}
    if modules.is_sdxl:
        expected["text_pooled"] = tuple(identity["shapes"]["text_pooled"])
    wrong = {k: (uncond[k].shape if k in uncond else None, v) for k, v in expected.items()
             if k not in uncond or uncond[k].shape != v}
    if wrong:
        raise CacheError(f"{cache_url(cache_dir, 'uncond.npz')}: wrong or missing arrays {wrong} (found, expected)")
    if not manifest.get("shards"):
        raise CacheError(f"the latent cache {cache_dir} lists no shards")
    counts = read_counts(cache_dir, manifest)
    skipped = {}
    for c in counts:
        for reason, n in c.get("skipped", {}).items():
            skipped[reason] = skipped.get(reason, 0) + n
    logger.info("latent cache %s: %d shards, %d samples; skipped when written: %s", cache_dir,
                len(manifest["shards"]), sum(c.get("used", 0) for c in counts), skipped or "none")
    if manifest.get("random_crop") != config.data.random_crop:
        logger.warning("the latent cache was made with random_crop=%s (one crop per image, fixed), the config "
                       "says data.random_crop=%s", manifest.get("random_crop"), config.data.random_crop)
    shards = [cache_url(cache_dir, name) for name in manifest["shards"]]
    shapes = {k: tuple(v) for k, v in identity["shapes"].items()}
    return LatentCache(cache_dir, manifest, shards, shapes, uncond)

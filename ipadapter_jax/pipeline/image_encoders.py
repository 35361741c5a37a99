"""Which image encoder each IP-Adapter uses: the width check, and discovery where published layouts keep them.

An adapter's projection takes the encoder's ``image_embeds`` (plain: ``projection_dim`` wide) or its
penultimate hidden states (Plus, full-face: ``hidden_size`` wide). h94/IP-Adapter ships two encoders:
``models/image_encoder`` (OpenCLIP ViT-H/14; projection 1024, hidden 1280) for the SD1.5 adapters and the
SDXL ``*_vit-h`` ones, and ``sdxl_models/image_encoder`` (ViT-bigG/14; 1280, 1664) for ``ip-adapter_sdxl``;
a ``*_vit-h`` adapter sits beside the bigG one. So discovery tries, per adapter, ``<sd_dir>/image_encoder``,
``image_encoder/`` beside the adapter file, h94's ``models/image_encoder`` one folder up (for adapters in
``sdxl_models/``), and ``image_encoder/`` beside an adapter at a URL, and takes the first whose width fits;
when some exist but none fits it refuses in one line.

FaceID adapters take face embeddings: plain FaceID (and Portrait) no image encoder at all (its entry is None),
FaceID-Plus the encoder's hidden states of the face crop (``hidden_size`` == the projection's ``clip_dim``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ipadapter_jax.models.adapter import IPAdapter
from ipadapter_jax.models.clip import CLIPVisionEncoderConfig
from ipadapter_jax.models.image_projection import FACEID, FACEID_PLUS
from ipadapter_jax.weights.remote_files import is_url, local_folder
from ipadapter_jax.weights.safetensors_io import WeightFileError, read_json

PathLike = str | os.PathLike
HINT = ("h94/IP-Adapter's models/image_encoder (ViT-H/14) serves the SD1.5 and *_vit-h adapters, "
        "sdxl_models/image_encoder (ViT-bigG/14) ip-adapter_sdxl")


def takes_image(adapter: IPAdapter) -> bool:
    """Whether the adapter reads an image through a CLIP encoder (all but plain FaceID / Portrait)."""
    return adapter.variant != FACEID


def wanted_width(adapter: IPAdapter) -> int:
    """The width of the image features the adapter's projection reads."""
    return adapter.projection.clip_dim if adapter.variant == FACEID_PLUS else adapter.projection.embed_dim


def feature_width(encoder: CLIPVisionEncoderConfig, adapter: IPAdapter) -> tuple[int, str]:
    """The width of the features ``encoder`` gives ``adapter``'s projection, and which config field it is."""
    if adapter.projection.uses_hidden_states:
        return encoder.hidden_size, "hidden_size"
    return encoder.projection_dim, "projection_dim"


def check_encoder_fits(adapter: IPAdapter, encoder: CLIPVisionEncoderConfig, which: str) -> None:
    """A one-line ``ValueError`` when ``encoder`` gives features of another width than ``adapter`` takes."""
    width, field = feature_width(encoder, adapter)
    if width != wanted_width(adapter):
        raise ValueError(f"{which}: this {adapter.variant} IP-Adapter takes {wanted_width(adapter)}-wide "
                         f"image features but its image encoder gives {width} ({field}); pass the encoder it was "
                         f"trained with ({HINT})")


def _config(folder: Path) -> CLIPVisionEncoderConfig:
    return CLIPVisionEncoderConfig.from_dict(read_json(folder / "config.json"))


def find_image_encoder(sd_dir: Path, adapter_path: Path, adapter: IPAdapter, adapter_url: str | None = None) -> Path:
    """The first image encoder folder that fits ``adapter`` (see the module docstring for where it looks);
    ``FileNotFoundError`` when there is none, ``ValueError`` naming each one seen when none fits."""
    seen = []
    local = [sd_dir / "image_encoder", adapter_path.parent / "image_encoder",
             adapter_path.parent.parent / "models" / "image_encoder"]
    remote = [adapter_url.rsplit("/", 1)[0] + "/image_encoder"] if adapter_url else []
    for candidate in dict.fromkeys(local + remote):
        if isinstance(candidate, str):
            try:  # copied only when it is there
                candidate = local_folder(candidate)
            except WeightFileError:
                continue
        elif not (candidate / "config.json").is_file():
            continue
        width, field = feature_width(_config(candidate), adapter)
        if width == wanted_width(adapter):
            return candidate
        seen.append(f"{candidate} ({field} {width})")
    if not seen:
        raise FileNotFoundError(f"no image encoder for {adapter_path}: pass image_encoder=DIR (a "
                                f"CLIPVisionModelWithProjection folder), or put it in <sd_dir>/image_encoder")
    raise ValueError(f"{adapter_path}: this {adapter.variant} IP-Adapter takes {wanted_width(adapter)}-wide "
                     f"image features and no image encoder found fits: {', '.join(seen)}; pass image_encoder=DIR "
                     f"(a list: one per adapter) ({HINT})")


def image_encoder_dirs(image_encoder: PathLike | Sequence[PathLike] | None, sd_dir: Path, specs: Sequence[PathLike],
                       paths: Sequence[Path], adapters: Sequence[IPAdapter]) -> list[Path | None]:
    """One image encoder folder per adapter (None for adapters that read no image: plain FaceID), each checked
    against its adapter's width from its config alone (before any weights load). ``image_encoder``: one
    folder for all, a list with one per adapter, or None to find each; ``specs`` are the adapters as given
    (URLs included), ``paths`` their local copies."""
    if not any(takes_image(a) for a in adapters):
        return [None] * len(adapters)
    if image_encoder is None:
        return [find_image_encoder(sd_dir, path, adapter, str(spec) if is_url(spec) else None)
                if takes_image(adapter) else None for spec, path, adapter in zip(specs, paths, adapters)]
    given = [image_encoder] if isinstance(image_encoder, (str, os.PathLike)) else list(image_encoder)
    if len(given) not in (1, len(adapters)):
        raise ValueError(f"image_encoder: {len(given)} folders for {len(adapters)} IP-Adapters; give one, or one "
                         f"per adapter")
    folders = [None if f is None else local_folder(f) for f in given] * (len(adapters) // len(given))
    folders = [f if takes_image(a) else None for a, f in zip(adapters, folders)]
    for path, adapter, folder in zip(paths, adapters, folders):
        if folder is None and takes_image(adapter):
            raise ValueError(f"{path}: this {adapter.variant} IP-Adapter needs an image encoder, none given for it")
        if folder is not None:
            check_encoder_fits(adapter, _config(folder), f"{path} with the image encoder {folder}")
    return folders

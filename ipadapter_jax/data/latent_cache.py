"""The on-disk format of a latent cache (written by ``tools.cache_latents``, read by ``cached_source``).

A cache folder holds

    manifest.json                  what the cache was made from (model, resolution, variant, shapes) and its
                                   shard names, written by process 0
    counts-PPPPP-of-NNNNN.json     one per writing process: samples used / skipped by reason, as the online
                                   source counts them
    uncond.npz                     ``text_context`` [T, D] (+ ``text_pooled`` [P]) of the empty caption and
                                   ``image_features`` of a dropped image: zeros [E] (plain) or the hidden
                                   states of an all-zero image [N, H] (Plus)
    cache-XXXXXX.tar               webdataset shards, one per source shard (``XXXXXX`` is the source shard's
                                   position in the expanded shard spec), samples in the source's order

Each sample is ``<key>.<member>.npy`` for every member of ``cached_batch`` (float members in the manifest's
``storage_dtype``, int32 SDXL ids) plus ``<key>.txt``, the caption (for inspection only).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ipadapter_jax.data.tar_samples import open_shard

FORMAT = "ipadapter_jax.latent_cache/1"
MANIFEST_NAME = "manifest.json"
UNCOND_NAME = "uncond.npz"
STORAGE_DTYPES = ("float32", "float16")


class CacheError(ValueError):
    """The latent cache is missing, unreadable, or was made for another model / resolution / variant."""


def cache_url(cache_dir: str, name: str) -> str:
    """``name`` inside ``cache_dir`` (a local folder or any URL the shard reader opens)."""
    return cache_dir.rstrip("/") + "/" + name


def shard_name(index: int) -> str:
    return f"cache-{index:06d}.tar"


def counts_name(process_index: int, process_count: int) -> str:
    return f"counts-{process_index:05d}-of-{process_count:05d}.json"


def _read_bytes(url: str) -> bytes:
    stream = open_shard(url)
    try:
        return stream.read()
    finally:
        stream.close()


def read_manifest(cache_dir: str) -> dict:
    url = cache_url(cache_dir, MANIFEST_NAME)
    try:
        manifest = json.loads(_read_bytes(url))
    except Exception as exc:
        raise CacheError(f"no readable latent-cache manifest at {url} ({type(exc).__name__}: {exc}); write the "
                         f"cache with python -m ipadapter_jax.tools.cache_latents first") from exc
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{url}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def read_counts(cache_dir: str, manifest: dict) -> list[dict]:
    """Every writer's sample counters; a missing file means that writer has not finished."""
    out = []
    for name in manifest.get("counts", []):
        url = cache_url(cache_dir, name)
        try:
            out.append(json.loads(_read_bytes(url)))
        except Exception as exc:
            raise CacheError(f"the latent cache {cache_dir} is incomplete: {url} is missing or unreadable (a "
                             f"writer process has not finished; re-run it with the same arguments)") from exc
    return out


def read_uncond(cache_dir: str) -> dict[str, np.ndarray]:
    url = cache_url(cache_dir, UNCOND_NAME)
    try:
        with np.load(io.BytesIO(_read_bytes(url))) as data:
            return {k: np.asarray(data[k], np.float32) for k in data.files}
    except Exception as exc:
        raise CacheError(f"cannot read {url}: {type(exc).__name__}: {exc}") from exc


def write_json_atomic(path: Path, content: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content, indent=1, sort_keys=True))
    tmp.replace(path)


def write_uncond(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v, np.float32) for k, v in arrays.items()})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_cached_sample(sample: dict[str, Any], shapes: dict[str, tuple]) -> dict[str, np.ndarray] | str:
    """A cache shard's raw sample -> ``{member: array}`` with float members as float32, or the skip reason
    ``bad_cache_sample`` (a member missing, unreadable or of the wrong shape)."""
    out = {}
    for name, shape in shapes.items():
        raw = sample.get(f"{name}.npy")
        if raw is None:
            return "bad_cache_sample"
        try:
            array = np.load(io.BytesIO(raw), allow_pickle=False)
        except Exception:
            return "bad_cache_sample"
        if tuple(array.shape) != tuple(shape):
            return "bad_cache_sample"
        out[name] = array.astype(np.int32 if array.dtype.kind in "iu" else np.float32, copy=False)
    return out


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

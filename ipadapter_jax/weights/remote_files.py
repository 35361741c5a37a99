"""Model folders and weight files at URLs (``gs://bucket/sd15``, ``s3://...``, ``https://...``, any fsspec
protocol): copied once into a local cache, then read like local ones.

Why copy rather than stream: the loaders memory-map safetensors files and read configs by path, and every
host of a TPU pod needs the frozen weights in its own RAM anyway; a local copy makes the second run (and a
resume after preemption) start without touching the bucket. The cache is
``$IPADAPTER_JAX_CACHE/remote`` (default ``~/.cache/ipadapter_jax/remote``), one folder per URL; files are
written under a temporary name and renamed, so a killed copy never leaves a file that looks complete, and a
file whose size matches the remote one is not fetched again.

Only what the loaders can read is copied from a diffusers or transformers folder: configs, tokenizer files
and ``.safetensors`` weights (``.bin`` only where a folder has no ``.safetensors``); not the ``fp16``
variants, ONNX/Flax/TF exports or single-file ``.ckpt`` checkpoints that model repositories often carry.
``gs://`` needs ``gcsfs`` (``pip install gcsfs``, in the ``tpu`` extra).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from pathlib import Path

from ipadapter_jax.atomic_files import atomic_path
from ipadapter_jax.weights.safetensors_io import WeightFileError

_KEPT_SUFFIXES = (".json", ".txt", ".safetensors", ".model", ".bin")
_SKIPPED_MARKERS = (".fp16.", ".ckpt", ".onnx", ".msgpack", ".h5", ".pb", ".ot")


def is_url(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def cache_root() -> Path:
    root = os.environ.get("IPADAPTER_JAX_CACHE") or os.path.join(Path.home(), ".cache", "ipadapter_jax")
    return Path(root) / "remote"


def _filesystem(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise WeightFileError(f"{url}: cannot open this URL ({e}); for gs:// install gcsfs "
                              f"(pip install gcsfs, or the project's [tpu] extra)") from e


def _cache_dir(url: str) -> Path:
    tail = url.rstrip("/").rsplit("/", 1)[-1] or "root"
    return cache_root() / f"{tail}-{hashlib.sha256(url.rstrip('/').encode()).hexdigest()[:16]}"


def _fetch(fs, remote: str, local: Path, size: int | None) -> None:
    if local.is_file() and (size is None or local.stat().st_size == size):
        return
    with atomic_path(local) as partial:
        fs.get_file(remote, str(partial))
        if size is not None and partial.stat().st_size != size:
            raise WeightFileError(f"{remote}: copied {partial.stat().st_size} bytes, the source has {size}")


def _wanted(names: list[str]) -> list[str]:
    """The files of a model folder the loaders read (relative names)."""
    kept = [n for n in names if n.endswith(_KEPT_SUFFIXES) and not any(m in n for m in _SKIPPED_MARKERS)]
    with_safetensors = {posixpath.dirname(n) for n in kept if n.endswith(".safetensors")}
    return [n for n in kept if not (n.endswith(".bin") and posixpath.dirname(n) in with_safetensors)]


def local_folder(path: str | os.PathLike) -> Path:
    """A local path for a model folder: ``path`` itself when local, else the cached copy of the URL."""
    if not is_url(path):
        return Path(path)
    url = str(path).rstrip("/")
    fs, root = _filesystem(url)
    if not fs.isdir(root):
        raise WeightFileError(f"{url}: no such folder")
    listing = fs.find(root, detail=True)
    relative = {name[len(root.rstrip("/")) + 1:]: info for name, info in listing.items()
                if info.get("type") != "directory"}
    names = _wanted(sorted(relative))
    if not names:
        raise WeightFileError(f"{url}: no config or weight files in this folder")
    local = _cache_dir(url)
    for name in names:
        info = relative[name]
        _fetch(fs, info.get("name", f"{root.rstrip('/')}/{name}"), local / name, info.get("size"))
    return local


def local_file(path: str | os.PathLike) -> Path:
    """A local path for one file (an IP-Adapter ``.safetensors``/``.bin``): itself, or the cached copy."""
    if not is_url(path):
        return Path(path)
    url = str(path)
    fs, remote = _filesystem(url)
    if not fs.isfile(remote):
        raise WeightFileError(f"{url}: no such file")
    local = _cache_dir(url.rsplit("/", 1)[0]) / url.rsplit("/", 1)[-1]
    _fetch(fs, remote, local, fs.info(remote).get("size"))
    return local

"""Shard lists: expand user shard specs into URLs and give each JAX process a disjoint subset.

A *shard spec* is a string or a sequence of strings. Each string is one of

* a local path (``/data/shards/00000.tar``, ``file:///data/x.tar``),
* a brace pattern (``/data/shards/{00000..00999}.tar``), expanded with ``braceexpand``,
* a glob (``/data/shards/*.tar``), matched on the local file system (sorted), or through
  ``fsspec`` for URLs with a scheme (``gs://bucket/shards/*.tar`` needs ``gcsfs``),
* a URL with a scheme (``gs://``, ``s3://``, ``https://``, ...) or a ``pipe:`` command
  (``pipe:gsutil cat gs://b/{000..099}.tar``); these are brace-expanded and otherwise passed through
  untouched: opening them is the reader's job (``tar_samples.open_shard``).

Inside one string, ``::`` separates several specs (webdataset's convention).
"""

from __future__ import annotations

import glob as globlib
import os
from collections.abc import Sequence
from urllib.parse import urlparse

import braceexpand

_GLOB_CHARS = set("*?[")


class ShardSpecError(ValueError):
    """A shard spec matched nothing, or the shards cannot be split across processes."""


def url_scheme(url: str) -> str:
    """The URL scheme of a shard ("" for a plain local path, "pipe" for pipe commands)."""
    if url.startswith("pipe:"):
        return "pipe"
    parsed = urlparse(url)
    # A Windows drive letter ("C:\\x") parses as a one-letter scheme; treat it as a path.
    if len(parsed.scheme) <= 1:
        return ""
    return parsed.scheme


def _has_glob(text: str) -> bool:
    return any(c in _GLOB_CHARS for c in text)


def _glob_remote(pattern: str) -> list[str]:
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec ships with most installs
        raise ImportError(f"globbing {pattern!r} needs fsspec (pip install fsspec)") from exc
    try:
        fs, _, paths = fsspec.get_fs_token_paths(pattern)
    except ImportError as exc:
        scheme = url_scheme(pattern)
        raise ImportError(
            f"globbing {pattern!r} needs the fsspec backend for {scheme}:// "
            f"(for gs:// install gcsfs), or list the shards with a brace pattern instead"
        ) from exc
    return sorted(fs.unstrip_protocol(p) for p in paths)


def _expand_one(pattern: str) -> list[str]:
    pattern = pattern.strip()
    if not pattern:
        return []
    expanded = list(braceexpand.braceexpand(pattern))
    scheme = url_scheme(pattern)
    out: list[str] = []
    for item in expanded:
        if scheme == "pipe" or not _has_glob(item):
            out.append(item)
            continue
        if scheme in ("", "file"):
            local = item[len("file://"):] if item.startswith("file://") else item
            matches = sorted(globlib.glob(os.path.expanduser(local)))
        else:
            matches = _glob_remote(item)
        if not matches:
            raise ShardSpecError(f"shard glob {item!r} matched no files")
        out.extend(matches)
    return out


def expand_shard_spec(spec: str | Sequence[str]) -> list[str]:
    """Expand a shard spec (see module docstring) into an ordered list of shard URLs.

    Order is the order of the spec (brace patterns in their natural order, glob matches sorted);
    duplicates are kept as given. Raises `ShardSpecError` when the spec expands to nothing or a glob
    matches nothing.
    """
    parts = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(f"shard spec entries must be strings, got {type(part).__name__}")
        for piece in part.split("::"):
            urls.extend(_expand_one(piece))
    if not urls:
        raise ShardSpecError(f"shard spec {spec!r} expands to no shards")
    return urls


def check_local_shards_exist(urls: Sequence[str]) -> None:
    """Raise `ShardSpecError` when every shard is local (plain paths, ``file://``) and none exists: a brace
    pattern is expanded without looking at the disk, so this is where a pattern that matches nothing is
    caught. Some shards missing among present ones stay what they were: skipped and counted by the reader
    (a shard deleted mid-run must not stop a resume). Remote URLs and ``pipe:`` commands are left to their
    readers."""
    missing = []
    for url in urls:
        if url_scheme(url) in ("", "file"):
            local = url[len("file://"):] if url.startswith("file://") else url
            if not os.path.isfile(os.path.expanduser(local)):
                missing.append(url)
    if missing and len(missing) == len(urls):
        shown = ", ".join(repr(u) for u in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ShardSpecError(f"none of the {len(urls)} local shard(s) exists: {shown}")


def resolve_process(process_index: int | None = None, process_count: int | None = None) -> tuple[int, int]:
    """(process_index, process_count), each defaulting to jax.process_index() / jax.process_count()."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index={process_index} for process_count={process_count}")
    return process_index, process_count


def split_shards(
    shards: Sequence[str],
    process_index: int | None = None,
    process_count: int | None = None,
    *,
    equal_counts: bool = False,
) -> list[str]:
    """This process's disjoint share of `shards`: every `process_count`-th shard from `process_index`.

    Strided rather than contiguous so that neighbouring (often similar) shards land on different
    hosts. With ``equal_counts`` the trailing ``len(shards) % process_count`` shards are dropped so
    every process gets the same number (epoch boundaries then line up across hosts).
    Defaults come from ``jax.process_index()`` / ``jax.process_count()``.
    Raises `ShardSpecError` if this process would get no shard.
    """
    process_index, process_count = resolve_process(process_index, process_count)
    shards = list(shards)
    if len(shards) < process_count:
        raise ShardSpecError(
            f"{len(shards)} shard(s) for {process_count} processes: process {process_index} and others "
            f"would get no shard; write more (smaller) shards"
        )
    if equal_counts:
        shards = shards[: len(shards) - len(shards) % process_count]
    return shards[process_index::process_count]


def shards_for_process(
    spec: str | Sequence[str],
    process_index: int | None = None,
    process_count: int | None = None,
    *,
    equal_counts: bool = False,
) -> list[str]:
    """`expand_shard_spec` then `split_shards`: the shard URLs this process reads."""
    return split_shards(expand_shard_spec(spec), process_index, process_count, equal_counts=equal_counts)

"""Read one webdataset tar shard as a stream of samples (dicts of raw member bytes), and pick the
image and caption out of a sample. No decoding of images here.

Opening: local paths, ``file:``, ``pipe:`` and the schemes webdataset's ``gopen`` knows (``gs://``
via ``gsutil cat``, ``http(s)://`` via curl, ``hf://``, ``ais://``, ...) go through ``gopen``; any
other scheme (``s3://``, ``memory://``, ...) through ``fsspec``.
Reading: webdataset's ``tar_file_iterator`` (streaming, ``r|*``), members grouped into samples by
webdataset's key rule (``dir/name.ext1.ext2`` -> key ``dir/name``, ext ``ext1.ext2``, lower-cased).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from webdataset.gopen import gopen, gopen_schemes
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from ipadapter_jax.data.shards import url_scheme

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class ShardError(Exception):
    """A shard failed; ``reason`` is ``shard_open_failed`` (nothing could be read: missing file,
    unreachable URL, not a tar) or ``shard_read_error`` (failed after some members were read)."""

    def __init__(self, reason: str, url: str, cause: BaseException):
        super().__init__(f"{reason}: {url}: {type(cause).__name__}: {cause}")
        self.reason = reason
        self.url = url


def open_shard(url: str):
    """A readable binary stream for a shard URL."""
    scheme = url_scheme(url)
    if scheme in ("", "file", "pipe") or scheme in gopen_schemes:
        return gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


def _close_quietly(stream) -> None:
    # Closing a pipe stream re-checks the child's exit status and may raise (e.g. SIGPIPE after an
    # early stop); by then the samples we used were already read correctly.
    with contextlib.suppress(Exception):
        stream.close()


def iter_shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one shard in stored order: ``{"__key__": key, ext: bytes, ...}``.

    On a read error the members read so far are still grouped and yielded (the last sample may
    then lack a member and be skipped later as missing_image / missing_caption), then `ShardError`
    is raised. A tar cut exactly at a member boundary cannot be told from a shorter shard.
    Duplicate extensions within a key keep the first.
    """
    try:
        stream = open_shard(url)
    except Exception as exc:
        raise ShardError("shard_open_failed", url, exc) from exc
    members_read = 0
    error: Exception | None = None
    try:
        current: dict[str, Any] | None = None
        try:
            for member in tar_file_iterator(stream):
                members_read += 1
                key, ext = base_plus_ext(member["fname"])
                if key is None:
                    continue
                ext = ext.lower()
                if current is not None and key != current["__key__"]:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key}
                current.setdefault(ext, member["data"])
        except Exception as exc:
            error = exc
        if current is not None:
            yield current
    finally:
        _close_quietly(stream)
    if error is not None:
        reason = "shard_read_error" if members_read else "shard_open_failed"
        raise ShardError(reason, url, error) from error


def sample_image_bytes(sample: dict[str, Any]) -> bytes | None:
    """The first of jpg/jpeg/png/webp present in the sample, else None."""
    for ext in IMAGE_EXTENSIONS:
        data = sample.get(ext)
        if data is not None:
            return data
    return None


def sample_caption(sample: dict[str, Any], json_field: str | None = None) -> tuple[str | None, str | None]:
    """(caption, None) or (None, skip reason).

    json_field=None: the caption is the ``txt`` member. Otherwise it is ``json[json_field]``
    (``json_field`` may be dotted, ``"meta.caption"``, for nested dicts).
    Empty or whitespace-only captions count as missing.
    """
    try:
        if json_field is None:
            raw = sample.get("txt")
            if raw is None:
                return None, "missing_caption"
            caption = raw.decode("utf-8")
        else:
            raw = sample.get("json")
            if raw is None:
                return None, "missing_caption"
            value: Any = json.loads(raw.decode("utf-8"))
            for part in json_field.split("."):
                if not isinstance(value, dict) or part not in value:
                    return None, "missing_caption"
                value = value[part]
            if value is None:
                return None, "missing_caption"
            if not isinstance(value, str):
                return None, "bad_caption"
            caption = value
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, "bad_caption"
    caption = caption.strip()
    if not caption:
        return None, "missing_caption"
    return caption, None

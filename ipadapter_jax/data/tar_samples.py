"""Read one webdataset tar shard as a stream of samples (dicts of raw member bytes), and pick the
image and caption out of a sample. No decoding of images here. ``add_member`` is the one way our writers
(``data.make_shards``, ``cache.write``) put a member into a shard.

Opening: local paths and ``file:`` URLs as files, ``pipe:CMD`` as the standard output of a shell command,
``http(s)://`` through urllib, every other scheme (``gs://`` with ``gcsfs``, ``s3://``, ``hf://``,
``memory://``, ...) through ``fsspec``. Nothing here imports the ``webdataset`` package: it imports torch
when torch is installed, three seconds of every ``train.py`` start for one file opener.
Reading: streaming ``tarfile`` (``r|*``: plain, gzip, bz2, xz), regular-file members only (links,
directories and devices are ignored, never followed), grouped into samples by webdataset's key rule
(``dir/name.ext1.ext2`` -> key ``dir/name``, ext ``ext1.ext2``, lower-cased).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import tarfile
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

from ipadapter_jax.data.shards import url_scheme

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# webdataset's metadata members (``__key__``, ``__meta__/...``) are not sample data.
_META_NAME = re.compile(r"__[^/]*__($|/)")
# webdataset's key rule: the key is the path up to the first dot of the file name, the rest is the extension.
_KEY_AND_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
PIPE_EXIT_TIMEOUT = 60.0  # seconds a pipe command may take to exit after its output was read to the end
HTTP_TIMEOUT = 60.0


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """``"dir/name.ext1.ext2"`` -> ``("dir/name", "ext1.ext2")``; ``(None, None)`` without an extension."""
    match = _KEY_AND_EXT.match(name)
    return (match.group(1), match.group(2)) if match else (None, None)


class PipeStream:
    """The standard output of ``pipe:COMMAND`` (run by the shell). Its exit status is not checked while
    reading: a child that wrote everything and exited must not turn into a lost shard depending on timing;
    `iter_shard_samples` checks it once the stream was read to its end (`check_exit_status`)."""

    def __init__(self, command: str):
        self.command = command
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)

    def read(self, size: int = -1) -> bytes:
        return self.proc.stdout.read(size)

    def check_exit_status(self) -> None:
        status = self.proc.wait(PIPE_EXIT_TIMEOUT)
        if status != 0:
            raise OSError(f"pipe command exited with status {status}")

    def close(self) -> None:
        self.proc.stdout.close()
        if self.proc.poll() is None:  # stopped early (or the command hangs): it has nothing more to give us
            self.proc.terminate()
        self.proc.wait(PIPE_EXIT_TIMEOUT)


class ShardError(Exception):
    """A shard failed; ``reason`` is ``shard_open_failed`` (nothing could be read: missing file,
    unreachable URL, not a tar) or ``shard_read_error`` (failed after some members were read)."""

    def __init__(self, reason: str, url: str, cause: BaseException):
        super().__init__(f"{reason}: {url}: {type(cause).__name__}: {cause}")
        self.reason = reason
        self.url = url


def open_shard(url: str):
    """A readable binary stream for a shard URL (see the module docstring for which scheme goes where)."""
    scheme = url_scheme(url)
    if scheme == "":
        return open(url, "rb")
    if scheme == "file":
        return open(url.removeprefix("file://") if url.startswith("file://") else url.removeprefix("file:"), "rb")
    if scheme == "pipe":
        return PipeStream(url.removeprefix("pipe:"))
    if scheme in ("http", "https"):
        return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT)
    import fsspec

    return fsspec.open(url, "rb").open()


def _close_quietly(stream) -> None:
    # Closing a pipe stream re-checks the child's exit status and may raise (e.g. SIGPIPE after an
    # early stop); by then the samples we used were already read correctly.
    with contextlib.suppress(Exception):
        stream.close()


def _check_archive_end(tar: tarfile.TarFile) -> None:
    """Raise `tarfile.ReadError` unless the archive ended properly.

    A streaming tarfile stops quietly, as if the archive ended there, at a header block that is
    missing, cut short, corrupt or all zeros. Only the last is a real end, and then nothing but zero
    padding follows; anything else means the rest of the shard was lost and must be counted.
    """
    stream = tar.fileobj  # the (decompressed) stream, positioned after the block that stopped tarfile
    stopped_at, read = tar.offset, tar.fileobj.tell() - tar.offset
    if read < tarfile.BLOCKSIZE:
        what = "at a member boundary" if read == 0 else "inside a header"
        raise tarfile.ReadError(f"archive cut {what} at byte {stopped_at + read}: no end-of-archive block")
    while chunk := stream.read(1 << 16):
        if chunk.count(0) != len(chunk):
            raise tarfile.ReadError(f"corrupt or zero header block at byte {stopped_at} with data after it")


def _check_exit_status(stream) -> None:
    if isinstance(stream, PipeStream):
        stream.check_exit_status()


def _tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular-file members of a tar stream, in stored order; raises on a
    damaged archive (see `_check_archive_end`) or a failed pipe command, after the good members."""
    tar = tarfile.open(fileobj=stream, mode="r|*")
    while (info := tar.next()) is not None:
        tar.members = []  # streaming: keep no per-member history
        if info.isreg() and not _META_NAME.match(info.name):
            yield info.name, tar.extractfile(info).read()
    _check_archive_end(tar)
    _check_exit_status(stream)


def iter_shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one shard in stored order: ``{"__key__": key, ext: bytes, ...}``.

    On a read error the members read so far are still grouped and yielded (the last sample may
    then lack a member and be skipped later as missing_image / missing_caption), then `ShardError`
    is raised. Read errors include a tar that stops without its end-of-archive block (cut at or
    inside a header, a corrupt header part-way) and a ``pipe:`` command that exits non-zero.
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
            for name, data in _tar_members(stream):
                members_read += 1
                key, ext = split_member_name(name)
                if key is None:
                    continue
                ext = ext.lower()
                if current is not None and key != current["__key__"]:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key}
                current.setdefault(ext, data)
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


def caption_text(value: Any) -> tuple[str | None, str | None]:
    """(caption, None) or (None, skip reason) for a caption as stored: text, or UTF-8 bytes (a byte-order mark,
    which Windows tools write, is not part of the caption). Empty or whitespace-only captions count as missing."""
    if value is None:
        return None, "missing_caption"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8-sig")
        except UnicodeDecodeError:
            return None, "bad_caption"
    if not isinstance(value, str):
        return None, "bad_caption"
    value = value.strip()
    return (value, None) if value else (None, "missing_caption")


def nested_field(value: Any, path: Sequence[str]) -> Any:
    """``value[path[0]][path[1]]...``, or None where a level is missing or not a dict."""
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def sample_caption(sample: dict[str, Any], json_field: str | None = None) -> tuple[str | None, str | None]:
    """(caption, None) or (None, skip reason): the ``txt`` member, or with ``json_field`` that field of the
    ``json`` member (dotted for nested dicts: ``"meta.caption"``); see ``caption_text``."""
    if json_field is None:
        return caption_text(sample.get("txt"))
    raw = sample.get("json")
    if raw is None:
        return None, "missing_caption"
    try:
        value = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, "bad_caption"
    return caption_text(nested_field(value, json_field.split(".")))


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append a regular file ``name`` (``key.ext``) holding ``data``, with a fixed mtime so that the same
    samples give the same shard bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))

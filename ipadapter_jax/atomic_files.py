"""Publishing a file whole or not at all, the one way every writer here does it (exported adapters and model
weights, workdir files, latent-cache shards and manifests, copies of remote model files, plan JSONs).

A reader of the final name sees the previous file or the new one, never a part of one:

  - on a local (or other POSIX) file system: the content goes to ``NAME.tmp-PID`` beside the target, then
    ``os.replace`` (atomic within one folder). A write that fails (a full disk, an exception, Ctrl-C) removes
    its temporary; only a process killed mid-write leaves one, under a name no reader looks for.
  - on an object store (``fs``: an fsspec file system such as gcsfs): one upload, which the store commits
    whole when it ends. No temporary and rename there: a rename is a copy and a delete that a kill can split.

A bucket mounted with a FUSE driver that renames by copying breaks the first promise: use the URL itself.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for the caller to write (a file any library writes by name); renamed
    to ``path`` when the block ends without an exception, removed otherwise. Makes the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(target: str | os.PathLike, data: bytes | str, fs: Any = None) -> None:
    """Publish ``data`` (text is written as UTF-8) at ``target``: a local path, or with ``fs`` a path on that
    fsspec file system (one upload)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if fs is not None:
        fs.pipe_file(str(target), data)
        return
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)

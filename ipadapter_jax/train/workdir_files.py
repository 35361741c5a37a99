"""The files of a training workdir on local disk or at an fsspec URL (``gs://BUCKET/runs/sd15``: gcsfs).

Everything the trainer writes beside its checkpoints goes through `WorkdirFiles` (metrics, TensorBoard events,
validation grids, exported adapters, the lease), with the same promise on both kinds of storage:

  - ``write_atomic``: a reader sees the previous content or the new one, never a part (``atomic_files``: on
    disk a temporary file and ``os.replace``, on an object store one upload).
  - ``create_exclusive``: of two writers, one wins. On disk ``O_EXCL``; on GCS a create precondition
    (``ifGenerationMatch=0``, fsspec's ``mode="create"``), followed by a read-back of the winner.
  - nothing appends: an object cannot grow, so ``metrics_log`` rewrites its file instead.

Checkpoints are not here: orbax writes them itself (on GCS with its commit-file protocol, no renames), at
``checkpoint_dir``.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from pathlib import Path

from etils import epath

from ipadapter_jax.atomic_files import write_atomic
from ipadapter_jax.weights.remote_files import cache_root, is_url


class WorkdirFiles:
    """``location``: a local folder (made absolute: orbax refuses relative paths) or a URL."""

    def __init__(self, location: str | os.PathLike):
        text = str(location)
        self.is_local = not is_url(text)
        if self.is_local:
            self.url = str(Path(text).absolute())
            self.fs, self.root = None, self.url
        else:
            import fsspec

            self.url = text.rstrip("/")
            try:
                self.fs, self.root = fsspec.core.url_to_fs(self.url)
            except (ImportError, ValueError) as exc:
                raise ValueError(f"workdir {self.url}: cannot open this URL ({exc}); for gs:// install gcsfs "
                                 f"(the project's [tpu] extra)") from None
            self.root = self.root.rstrip("/")

    def __str__(self) -> str:
        return self.url

    def __truediv__(self, name: str) -> str:
        """The URL (or absolute local path) of ``name`` inside the workdir, for messages and orbax."""
        return posixpath.join(self.url, name) if not self.is_local else str(Path(self.url) / name)

    def epath(self, name: str = "") -> epath.Path:
        """``name`` as an etils path, the kind orbax takes (local, or gs:// through its own GCS support)."""
        return epath.Path(self / name if name else self.url)

    @property
    def path(self) -> Path | str:
        """The workdir as the caller gave it: a ``Path`` on disk, the URL otherwise."""
        return Path(self.url) if self.is_local else self.url

    def _where(self, name: str) -> str:
        return str(Path(self.url) / name) if self.is_local else posixpath.join(self.root, name)

    def local_scratch(self) -> Path:
        """A local folder belonging to this workdir: itself on disk, else one under the cache folder per URL
        (what must be local, such as the toy world's shards the trainer writes on first use)."""
        if self.is_local:
            return Path(self.url)
        digest = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        return cache_root().parent / "workdirs" / f"{self.url.rsplit('/', 1)[-1]}-{digest}"

    def makedirs(self, name: str = "") -> None:
        if self.is_local:
            Path(self._where(name)).mkdir(parents=True, exist_ok=True)
        # Object stores have no folders: a name is created by writing an object under it.

    def exists(self, name: str) -> bool:
        if self.is_local:
            return Path(self._where(name)).exists()
        self.fs.invalidate_cache(self._where(name))  # another process (a run, a reader) may have written it
        return self.fs.exists(self._where(name))

    def read_bytes(self, name: str) -> bytes:
        """Raises ``FileNotFoundError`` when ``name`` does not exist."""
        if self.is_local:
            return Path(self._where(name)).read_bytes()
        return self.fs.cat_file(self._where(name))

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def write_atomic(self, name: str, data: bytes) -> None:
        write_atomic(self._where(name), data, self.fs)

    def create_exclusive(self, name: str, data: bytes) -> None:
        """Write ``name`` only if it does not exist; raises ``FileExistsError`` if it does."""
        target = self._where(name)
        if self.is_local:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return
        try:
            self.fs.pipe_file(target, data, mode="create")
        except FileExistsError:
            raise
        except Exception as exc:  # gcsfs reports a failed precondition as an HTTP 412
            if "412" in str(exc) or "precondition" in str(exc).lower():
                raise FileExistsError(target) from None
            raise

    def remove(self, name: str) -> None:
        """Delete one file; a missing one is fine."""
        try:
            if self.is_local:
                Path(self._where(name)).unlink(missing_ok=True)
            else:
                self.fs.rm_file(self._where(name))
        except FileNotFoundError:
            pass

    def listdir(self, name: str = "") -> list[str]:
        """The names directly inside folder ``name`` (empty when it does not exist)."""
        where = self._where(name)
        if self.is_local:
            return sorted(p.name for p in Path(where).iterdir()) if Path(where).is_dir() else []
        try:
            entries = self.fs.ls(where, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries if e.rstrip("/") != where)

    def move_tree(self, name: str, new_name: str) -> None:
        """Move folder ``name`` to ``new_name`` (whose parent need not exist). On disk one rename; on an
        object store a copy of every object, then the originals deleted (there is no rename there)."""
        source, target = self._where(name), self._where(new_name)
        if self.is_local:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            os.rename(source, target)
            return
        # fsspec's mv would try GCS's moveTo first, which not every GCS-compatible server has.
        self.fs.copy(source, target, recursive=True)
        self.fs.rm(source, recursive=True)
        self._forget_listings()

    def _forget_listings(self) -> None:
        """Drop the folder listings every instance of this filesystem class has cached. orbax reaches the same
        bucket through etils' own instance (other options, so another object), whose cached listing would
        otherwise still show what was just moved: the next save would find its step 'already exists'."""
        for instance in list(getattr(type(self.fs), "_cache", {}).values()) + [self.fs]:
            instance.invalidate_cache()

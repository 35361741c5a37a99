"""TensorBoard event files at fsspec URLs (a ``gs://`` workdir's ``tensorboard/``), for tensorboardX.

tensorboardX's own ``gs://`` writer needs ``google-cloud-storage``, which nothing else here uses, and ignores
the gcsfs settings (credentials, the endpoint) the rest of the workdir is written with. This one writes
through fsspec. An object cannot be appended to, so each flush uploads the event file so far as one object
(a reader sees the previous upload or the new one); tensorboardX flushes every ``flush_secs`` (120 s) and
``MetricsLog.flush`` before each checkpoint. A resumed run writes a new event file (tensorboardX names
them by time and host), so no upload ever replaces another run's events.
"""

from __future__ import annotations

import io


class _FsspecEventFile:
    def __init__(self, url: str):
        import fsspec

        self._fs, self._path = fsspec.core.url_to_fs(url)
        self._buffer = io.BytesIO()
        self._uploaded = 0

    def write(self, data: bytes) -> None:
        self._buffer.write(data)

    def flush(self) -> None:
        if self._buffer.tell() != self._uploaded:
            self._fs.pipe_file(self._path, self._buffer.getvalue())
            self._uploaded = self._buffer.tell()

    def close(self) -> None:
        self.flush()


class _FsspecEventFiles:
    def open(self, url: str) -> _FsspecEventFile:
        return _FsspecEventFile(url)

    def directory_check(self, url: str) -> None:
        pass  # object stores have no folders to create


def register_fsspec_event_files(scheme: str) -> None:
    """Make tensorboardX write event files for ``scheme://`` URLs through fsspec (idempotent)."""
    from tensorboardX import record_writer

    record_writer.register_writer_factory(scheme, _FsspecEventFiles())

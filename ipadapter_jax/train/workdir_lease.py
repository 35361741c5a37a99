"""One run per workdir: a lease file ``WORKDIR/.lease.json`` that a training run holds while it writes there.

Without it two ``train.py`` runs on one workdir (a relaunch while the first still runs, two users) both write
the same checkpoints, metrics and exports. The lease records who holds it: host, pid, since when, and a
heartbeat the holder refreshes every ``HEARTBEAT_S`` seconds. A new run

  - takes a missing lease (created exclusively, ``WorkdirFiles.create_exclusive``: of two runs starting at
    once, one wins);
  - refuses a live one with one line naming the holder (``WorkdirBusyError``);
  - takes over a stale one: the holder was on this host and its pid is gone (a SIGKILLed or crashed run), or
    its heartbeat is older than ``STALE_AFTER_S`` (a holder on another host, which cannot be asked).

A multi-host run is one run: only process 0 takes the lease, so a resume after a crash is not blocked by the
run's own old lease (its pid is dead, or its heartbeat stopped). Local workdirs and ``gs://`` (any fsspec URL)
ones: every read and write goes through ``WorkdirFiles``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from ipadapter_jax.train.workdir_files import WorkdirFiles

logger = logging.getLogger(__name__)

LEASE_NAME = ".lease.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class WorkdirBusyError(ValueError):
    """Another live run holds the workdir's lease (a user mistake: exit 2, one line)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _read(files: WorkdirFiles) -> dict | None:
    try:
        return json.loads(files.read_text(LEASE_NAME))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable / half-written: treated as stale below (no heartbeat)


def _stale(holder: dict, now: float, stale_after_s: float) -> str | None:
    """Why the lease ``holder`` can be taken over, or None when it is live."""
    if not holder or "heartbeat" not in holder:
        return "the lease file is unreadable"
    if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
        return f"its process {holder.get('pid')} on this host is gone"
    age = now - float(holder["heartbeat"])
    if age > stale_after_s:
        return f"its heartbeat stopped {age:.0f} s ago"
    return None


class WorkdirLease:
    """Held from ``acquire`` to ``release`` (a context manager); a daemon thread keeps the heartbeat fresh."""

    def __init__(self, workdir: str | Path | WorkdirFiles, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S):
        self.files = workdir if isinstance(workdir, WorkdirFiles) else WorkdirFiles(workdir)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "run": uuid.uuid4().hex,
                       "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        self.record["heartbeat"] = time.time()
        self.files.write_atomic(LEASE_NAME, json.dumps(self.record).encode("utf-8"))

    def acquire(self) -> "WorkdirLease":
        self.record["heartbeat"] = time.time()
        workdir = self.files.url
        try:
            self.files.create_exclusive(LEASE_NAME, json.dumps(self.record).encode("utf-8"))
        except FileExistsError:
            holder = _read(self.files)
            if holder is None:  # released between our open and read: try once more from the start
                return self.acquire()
            why = _stale(holder, time.time(), self.stale_after_s)
            if why is None:
                raise WorkdirBusyError(
                    f"{workdir} is in use by another run (host {holder.get('host')}, pid "
                    f"{holder.get('pid')}, since {holder.get('since')}); wait for it, stop it, or train in "
                    f"another workdir") from None
            logger.warning("taking over the stale lease of %s (host %s, pid %s): %s", workdir,
                           holder.get("host"), holder.get("pid"), why)
            self._write()
        # Read back: a takeover has no precondition to lose, so of two runs taking over one stale lease at
        # once the last writer holds it and the other steps back.
        if (_read(self.files) or {}).get("run") != self.record["run"]:
            raise WorkdirBusyError(f"{workdir}: another run took its lease at the same time; wait for it, stop "
                                   f"it, or train in another workdir") from None
        self._thread = threading.Thread(target=self._beat, name="workdir-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if (_read(self.files) or {}).get("run") != self.record["run"]:
                    logger.error("the lease of %s was taken by another run", self.files.url)
                    return
                self._write()
            except Exception as exc:  # a lost mount or bucket: the run itself fails on its next write
                logger.warning("could not refresh the lease of %s: %s", self.files.url, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if (_read(self.files) or {}).get("run") == self.record["run"]:
                self.files.remove(LEASE_NAME)
        except Exception:  # noqa: BLE001 - a lease left behind is taken over as stale by the next run
            pass

    def __enter__(self) -> "WorkdirLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

"""One run per workdir: a lease file ``WORKDIR/.lease.json`` that a training run holds while it writes there.

Without it two ``train.py`` runs on one workdir (a relaunch while the first still runs, two users) both write
the same checkpoints, metrics and exports. The lease records who holds it: host, pid, since when, and a
heartbeat the holder refreshes every ``HEARTBEAT_S`` seconds. A new run

  - takes a missing lease (created with ``O_EXCL``: of two runs starting at once, one wins);
  - refuses a live one with one line naming the holder (``WorkdirBusyError``);
  - takes over a stale one: the holder was on this host and its pid is gone (a SIGKILLed or crashed run), or
    its heartbeat is older than ``STALE_AFTER_S`` (a holder on another host, which cannot be asked).

A multi-host run is one run: only process 0 takes the lease, so a resume after a crash is not blocked by the
run's own old lease (its pid is dead, or its heartbeat stopped). Local and mounted workdirs.
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


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
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

    def __init__(self, workdir: str | Path, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.path = Path(workdir) / LEASE_NAME
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "run": uuid.uuid4().hex,
                       "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self, target: Path | None = None) -> None:
        self.record["heartbeat"] = time.time()
        tmp = self.path.with_name(f"{LEASE_NAME}.{self.record['run']}.tmp")
        tmp.write_text(json.dumps(self.record))
        os.replace(tmp, target or self.path)

    def acquire(self) -> "WorkdirLease":
        self.record["heartbeat"] = time.time()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read(self.path)
            if holder is None:  # released between our open and read: try once more from the start
                return self.acquire()
            why = _stale(holder, time.time(), self.stale_after_s)
            if why is None:
                raise WorkdirBusyError(
                    f"{self.path.parent} is in use by another run (host {holder.get('host')}, pid "
                    f"{holder.get('pid')}, since {holder.get('since')}); wait for it, stop it, or train in "
                    f"another workdir") from None
            logger.warning("taking over the stale lease of %s (host %s, pid %s): %s", self.path.parent,
                           holder.get("host"), holder.get("pid"), why)
            self._write()
            if (_read(self.path) or {}).get("run") != self.record["run"]:  # another run took it over too
                raise WorkdirBusyError(f"{self.path.parent}: another run took over its stale lease at the same "
                                       f"time; train in another workdir") from None
        else:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.record))
        self._thread = threading.Thread(target=self._beat, name="workdir-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if (_read(self.path) or {}).get("run") != self.record["run"]:
                    logger.error("the lease of %s was taken by another run", self.path.parent)
                    return
                self._write()
            except OSError as exc:  # a lost mount: the run itself will fail on its next write
                logger.warning("could not refresh the lease of %s: %s", self.path.parent, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if (_read(self.path) or {}).get("run") == self.record["run"]:
                self.path.unlink()
        except OSError:
            pass

    def __enter__(self) -> "WorkdirLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

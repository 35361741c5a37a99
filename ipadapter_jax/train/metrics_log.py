"""Where training metrics go: ``WORKDIR/metrics.jsonl`` (one JSON object per logged step, at least ``step`` and
``loss``), TensorBoard scalars and images (tensorboardX, ``WORKDIR/tensorboard``) and a progress bar with
loss, steps/s and images/s. Only process 0 writes; other processes get a logger that does nothing.

On disk the file is appended to, a line per record. An object store (a ``gs://`` workdir) cannot append, so
there the whole file is rewritten (``write_atomic``) at ``flush``: at most every ``REMOTE_FLUSH_S`` seconds
while logging, and always before a checkpoint is saved (``loop.save`` calls ``flush`` first). Records up to
a committed checkpoint are therefore stored before it commits; a resume drops those after it
(``truncate_metrics``) and logs them again, so none is lost or duplicated on either kind of storage.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ipadapter_jax.train.workdir_files import WorkdirFiles

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
REMOTE_FLUSH_S = 60.0


def _files(workdir: str | Path | WorkdirFiles) -> WorkdirFiles:
    return workdir if isinstance(workdir, WorkdirFiles) else WorkdirFiles(workdir)


def read_metrics(workdir: str | Path | WorkdirFiles) -> list[dict]:
    """The records of ``WORKDIR/metrics.jsonl`` in order (a local path or a URL). A last line cut short (a
    kill in the middle of its write) is not a record."""
    try:
        text = _files(workdir).read_text(METRICS_FILE)
    except FileNotFoundError:
        return []
    lines = [line for line in text.splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i != len(lines) - 1:
                raise
    return records


def truncate_metrics(workdir: str | Path | WorkdirFiles, last_step: int) -> None:
    """Drop records after ``last_step``: a resumed run re-does those steps and logs them again (a run killed
    after its last checkpoint leaves records the restored state never reached)."""
    files = _files(workdir)
    if not files.exists(METRICS_FILE):
        return
    kept = [r for r in read_metrics(files) if r.get("step", 0) <= last_step]
    files.write_atomic(METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8"))


class MetricsLog:
    """Call ``log(step, metrics)`` at logged steps; ``tick`` every step for the progress bar."""

    def __init__(self, workdir: str | Path | WorkdirFiles, *, enabled: bool, num_steps: int, start_step: int,
                 batch_size: int, progress_bar: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.files = _files(workdir)
        self.batch_size = batch_size
        self._last_time = time.perf_counter()
        self._last_step = start_step
        self._bar = None
        self._writer = None
        self._file = None
        self._records: list[dict] = []  # an object-store workdir: the whole file, rewritten at flush
        self._dirty = False
        self._last_flush = time.monotonic()
        if not enabled:
            return
        self.files.makedirs()
        if self.files.is_local:
            self._file = open(self.files / METRICS_FILE, "a", buffering=1)
        else:
            self._records = read_metrics(self.files)
        if tensorboard:
            from tensorboardX import SummaryWriter

            from ipadapter_jax.train.tensorboard_files import register_fsspec_event_files

            if not self.files.is_local:
                register_fsspec_event_files(self.files.url.split("://", 1)[0])
            self._writer = SummaryWriter(self.files / "tensorboard")
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=num_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def tick(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Writes one record (adds steps_per_second and images_per_second since the previous call)."""
        now = time.perf_counter()
        record = {"step": int(step)}
        for key, value in metrics.items():
            value = np.asarray(value)
            record[key] = float(value) if value.dtype.kind == "f" else int(value)
        if step > self._last_step:
            rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
            record["steps_per_second"] = rate
            record["images_per_second"] = rate * self.batch_size
        self._last_time, self._last_step = now, step
        if not self.enabled:
            return record
        if not math.isfinite(record.get("loss", 0.0)):
            logger.warning("step %d: loss is %s", step, record["loss"])
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
        else:
            self._records.append(record)
            self._dirty = True
            if time.monotonic() - self._last_flush > REMOTE_FLUSH_S:
                self.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key != "step":
                    self._writer.add_scalar(f"train/{key}", value, step)
        if self._bar is not None:
            shown = {"loss": f"{record['loss']:.4f}"} if "loss" in record else {}
            if "steps_per_second" in record:
                shown["steps/s"] = f"{record['steps_per_second']:.2f}"
                shown["img/s"] = f"{record['images_per_second']:.1f}"
            self._bar.set_postfix(shown, refresh=False)
        return record

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """``image`` uint8 ``[H, W, 3]``."""
        if self.enabled and self._writer is not None:
            self._writer.add_image(tag, image, step, dataformats="HWC")

    def flush(self) -> None:
        """Make every record so far durable (before a checkpoint is saved: see the module docstring)."""
        if not self.enabled:
            return
        if self._file is not None:
            self._file.flush()
        elif self._dirty:
            self.files.write_atomic(METRICS_FILE, "".join(json.dumps(r) + "\n" for r in self._records).encode())
            self._dirty = False
        self._last_flush = time.monotonic()
        if self._writer is not None:
            self._writer.flush()

    def reset_timer(self, step: int) -> None:
        """Exclude a pause (checkpoint, validation) from the next steps/s."""
        self._last_time, self._last_step = time.perf_counter(), step

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self.flush()
        if self._writer is not None:
            self._writer.close()
        if self._file is not None:
            self._file.close()

"""Where training metrics go: ``WORKDIR/metrics.jsonl`` (one JSON object per logged step, at least ``step`` and
``loss``), TensorBoard scalars and images (tensorboardX, ``WORKDIR/tensorboard``) and a progress bar with
loss, steps/s and images/s. Only process 0 writes; other processes get a logger that does nothing.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def read_metrics(workdir: str | Path) -> list[dict]:
    """The records of ``WORKDIR/metrics.jsonl`` in order."""
    path = Path(workdir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(workdir: str | Path, last_step: int) -> None:
    """Drop records after ``last_step``: a resumed run re-does those steps and logs them again (a run killed
    after its last checkpoint leaves records the restored state never reached)."""
    path = Path(workdir) / METRICS_FILE
    if not path.is_file():
        return
    kept = [r for r in read_metrics(workdir) if r.get("step", 0) <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)


class MetricsLog:
    """Call ``log(step, metrics)`` at logged steps; ``tick`` every step for the progress bar."""

    def __init__(self, workdir: str | Path, *, enabled: bool, num_steps: int, start_step: int, batch_size: int,
                 progress_bar: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.workdir = Path(workdir)
        self.batch_size = batch_size
        self._last_time = time.perf_counter()
        self._last_step = start_step
        self._bar = None
        self._writer = None
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.workdir / METRICS_FILE, "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(self.workdir / "tensorboard"))
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
        self._file.write(json.dumps(record) + "\n")
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

    def reset_timer(self, step: int) -> None:
        """Exclude a pause (checkpoint, validation) from the next steps/s."""
        self._last_time, self._last_step = time.perf_counter(), step

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        self._file.close()

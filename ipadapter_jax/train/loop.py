"""The training loop: ``train(config, workdir)`` (what ``train.py`` and notebooks call).

Order: build and compile (``setup.build_setup``), restore the latest checkpoint of ``WORKDIR`` or create the
state, then step until ``num_steps``: log every ``log.every_steps``, checkpoint + export every
``checkpoint.every_steps``, sample a validation grid every ``validation.every_steps``. SIGTERM / SIGINT
(TPU preemption, Ctrl-C) finish the current step, save a checkpoint at it and return cleanly; a second
SIGINT interrupts at once.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from ipadapter_jax.train.checkpoint import (EXPORT_NAME, Checkpointer, data_state_for_process, export_adapter,
                                            gather_json)
from ipadapter_jax.train.config import TrainConfig
from ipadapter_jax.train.data_feed import DataFeed, make_source
from ipadapter_jax.train.metrics_log import MetricsLog, truncate_metrics
from ipadapter_jax.train.setup import TrainingSetup, batch_partition_spec, build_setup, step_batch_keys
from ipadapter_jax.train.sharding import put_host_tree, replicated_key
from ipadapter_jax.train.workdir_files import WorkdirFiles
from ipadapter_jax.train.workdir_lease import WorkdirLease

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    step: int  # the step the run stopped at (== num_steps unless preempted)
    preempted: bool  # stopped by SIGTERM / SIGINT (a checkpoint at ``step`` was written)
    resumed_from: int | None  # the checkpoint step the run started from, if any
    last_metrics: dict  # the last logged record
    workdir: Path | str  # a Path for a local workdir, the URL for one at a URL


class NonFiniteLossError(RuntimeError):
    """``optimizer.max_nonfinite_steps`` consecutive steps had a NaN/Inf loss or gradient; the run stopped
    after checkpointing the last good parameters (the skipped steps never changed them)."""


class StopRequest:
    """SIGTERM / SIGINT handlers that only set a flag, checked between steps. With several processes the
    flag is shared (any process signalled stops all at the same step)."""

    def __init__(self):
        self._event = threading.Event()
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self._event.is_set():
            raise KeyboardInterrupt
        logger.warning("received %s: saving a checkpoint after this step", signal.Signals(signum).name)
        self._event.set()

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        local = self._event.is_set()
        if jax.process_count() == 1:
            return local
        return bool(np.any(multihost_utils.process_allgather(np.asarray([local]))))


def _skip_metrics(counters: dict) -> dict:
    """Sample counters of all processes -> ``used_samples``, ``skipped_samples`` and one entry per reason."""
    all_counters = gather_json(counters)
    out = {"used_samples": sum(c.get("used", 0) for c in all_counters), "skipped_samples": 0}
    for c in all_counters:
        for reason, n in c.get("skipped", {}).items():
            out[f"skipped_{reason}"] = out.get(f"skipped_{reason}", 0) + n
            out["skipped_samples"] += n
    return out


def _initial_state(setup: TrainingSetup, checkpointer: Checkpointer, resume: bool):
    """``(state, rng, data_state, resumed_from)``: from the latest checkpoint, or new."""
    latest = checkpointer.latest_step()
    if latest is not None and not resume:
        raise FileExistsError(f"{setup.workdir} already has checkpoints (latest step {latest}); resume, or train "
                              f"in another workdir")
    if latest is None:
        if jax.process_index() == 0:
            truncate_metrics(setup.workdir, 0)  # records of a run killed before its first checkpoint
        init_rng, rng = jax.random.split(jax.random.key(setup.config.seed))
        kv = put_host_tree(setup.kv, jax.tree.map(lambda _: setup.replicated, setup.kv))
        state = setup.init_state(replicated_key(init_rng, setup.mesh), kv)
        rng = replicated_key(rng, setup.mesh)
        return state, rng, None, None
    state, rng, data_saved, saved_config, latest = checkpointer.restore_newest_intact(setup.abstract_state,
                                                                                      setup.abstract_rng_data)
    rng = replicated_key(rng, setup.mesh)
    changed = _changed_keys(saved_config, setup.config.to_dict())
    if changed:
        logger.warning("resuming with config changes: %s", ", ".join(changed))
    data_state = data_state_for_process(data_saved, jax.process_index(), jax.process_count())
    if jax.process_index() == 0:
        truncate_metrics(setup.workdir, latest)
    logger.info("resumed from the checkpoint at step %d", latest)
    return state, rng, data_state, latest


def _refuse_existing_checkpoints(workdir: WorkdirFiles) -> None:
    steps = sorted(int(name) for name in workdir.listdir("checkpoints") if name.isdigit())
    if steps:
        raise FileExistsError(f"{workdir} already has checkpoints (latest step {steps[-1]}); resume, or train "
                              f"in another workdir")


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def train(config: TrainConfig, workdir: str | Path, resume: bool = True) -> TrainResult:
    """Train (or continue training) an IP-Adapter as ``config`` says, in ``workdir``: a local path or a URL
    (``gs://BUCKET/runs/sd15``, written through orbax's GCS support and gcsfs; see ``WorkdirFiles``). The run
    holds the workdir's lease throughout (``train.workdir_lease``): a second run on a workdir in use is
    refused."""
    workdir = WorkdirFiles(workdir)
    workdir.makedirs()
    # One run is all its processes: process 0 holds the lease for them.
    lease = WorkdirLease(workdir).acquire() if jax.process_index() == 0 else None
    try:
        # The handlers go in before minutes of loading and compiling: a preemption notice then stops the run
        # before its first step (its lease released, nothing to save beyond the checkpoint it resumed from)
        # instead of killing it.
        with StopRequest() as stop:
            return _train(config, workdir, resume, stop)
    finally:
        if lease is not None:
            lease.release()


def _train(config: TrainConfig, workdir: WorkdirFiles, resume: bool, stop: StopRequest) -> TrainResult:
    if not resume:  # refuse before minutes of loading and compiling, not after
        _refuse_existing_checkpoints(workdir)
    setup = build_setup(config, workdir)
    checkpointer = Checkpointer(workdir, config.checkpoint)
    state, rng, data_state, resumed_from = _initial_state(setup, checkpointer, resume)
    step = int(jax.device_get(state.step))
    is_main = jax.process_index() == 0
    log = MetricsLog(workdir, enabled=is_main, num_steps=config.num_steps, start_step=step,
                     batch_size=config.batch_size, progress_bar=config.log.progress_bar,
                     tensorboard=config.log.tensorboard)
    validator = None
    if config.validation.every_steps:
        from ipadapter_jax.train.validation import Validator

        validator = Validator(setup)
    feed = DataFeed(make_source(config, setup.modules, setup.shards, state=data_state, cache=setup.cache), setup.mesh,
                    batch_partition_spec(setup), step_batch_keys(setup), prefetch=config.data.prefetch_batches)
    last_saved = resumed_from
    last_record: dict = {}
    preempted = False
    # Steps whose update was skipped for a NaN/Inf loss or gradient: in a row, and since the last record.
    nonfinite_in_a_row = nonfinite_since_log = 0
    diverged = False

    def save() -> None:
        nonlocal last_saved
        log.flush()  # the records up to this step are stored before its checkpoint commits (metrics_log)
        checkpointer.save(state, rng, data_state, config.to_dict())
        try:
            export_adapter(state.params, setup.projection, workdir, step, config.checkpoint.keep,
                           config.checkpoint.export_dtype)
        except Exception as exc:
            checkpointer.wait_until_finished()  # so the message names the checkpoints that did complete
            raise checkpointer.failure(f"the adapter export {EXPORT_NAME}", step, exc, where=workdir) from exc
        last_saved = step
        log.reset_timer(step)

    try:
        while step < config.num_steps:
            if stop.requested():  # checked before each step, so a request during setup saves nothing new
                preempted = True
                break
            fed = next(feed)
            state, metrics = setup.compiled_step(state, setup.frozen, fed.batch, rng)
            step += 1
            data_state = fed.data_state
            log.tick(step)
            if int(metrics["nonfinite"]):
                nonfinite_in_a_row += 1
                nonfinite_since_log += 1
                logger.warning("step %d: non-finite loss or gradient (loss %s, grad_norm %s); update skipped",
                               step, float(metrics["loss"]), float(metrics["grad_norm"]))
            else:
                nonfinite_in_a_row = 0
            diverged = 0 < config.optimizer.max_nonfinite_steps <= nonfinite_in_a_row
            if step % config.log.every_steps == 0 or step == config.num_steps or diverged:
                record = dict(jax.device_get(metrics))
                del record["nonfinite"]
                record["nonfinite_steps"] = nonfinite_since_log
                nonfinite_since_log = 0
                record.update(_skip_metrics(fed.counters))
                last_record = log.log(step, record)
            if diverged:
                break
            if step % config.checkpoint.every_steps == 0:
                save()
            if validator is not None and step % config.validation.every_steps == 0:
                validator.run(state.params, step, log)
                log.reset_timer(step)
            checkpointer.check_for_errors()  # a failed background save stops the run now, not at the next save
        if last_saved != step:
            save()
        checkpointer.wait_until_finished()
    finally:
        feed.close()
        checkpointer.close(raise_errors=sys.exc_info()[0] is None)
        log.close()
    if diverged:
        raise NonFiniteLossError(
            f"stopped at step {step}: {nonfinite_in_a_row} consecutive steps ({step - nonfinite_in_a_row + 1}.."
            f"{step}) had a non-finite loss or gradient (optimizer.max_nonfinite_steps="
            f"{config.optimizer.max_nonfinite_steps}); their updates were skipped, so the checkpoint at step "
            f"{step} holds the parameters of step {step - nonfinite_in_a_row}, the last good one. Check the data "
            f"and the learning rate before resuming from it")
    if preempted:
        logger.warning("stopped at step %d on request; the checkpoint there resumes the run", step)
    return TrainResult(step=step, preempted=preempted, resumed_from=resumed_from, last_metrics=last_record,
                       workdir=workdir.path)

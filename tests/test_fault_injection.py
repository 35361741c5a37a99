"""Fault injection on a tiny training run (``train.py`` in a subprocess, ``configs/tiny.py`` on the session's
tiny world, 8 steps, a checkpoint every 2 keeping 2).

* SIGKILL at random points, including while orbax writes a checkpoint in the background, and SIGTERM
  between checkpoints: after every interruption the workdir holds only complete checkpoints (each restores
  item by item) and loadable adapter exports; every restart resumes from the last complete checkpoint; a
  SIGTERM exits 0 with a checkpoint at the step it stopped at; the final adapter equals the uninterrupted
  run's exactly. One kill and one SIGTERM by default; the 20-point sweep is ``slow``.
  (tests/test_train_e2e.py covers a single SIGKILL after a checkpoint and SIGTERM on its own.)
* An unwritable checkpoint folder or a full disk at save time: a clear error naming the step, the path and
  the last good checkpoint, which is left intact.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fault_support import (assert_workdir_consistent, last_logged_step, metric_steps, output_of,
                           restore_checkpoint, resumed_from, start_faulty_train, wait_then, writes_in_progress)
from train_support import (adapter_arrays, finished_checkpoints, max_abs_diff, tiny_config,  # noqa: F401
                           world)  # world is a fixture

NUM_STEPS, EVERY, KEEP = 8, 2, 2
TIMEOUT = 600


def fault_config(world, **overrides):
    options = dict(num_steps=NUM_STEPS, checkpoint__every_steps=EVERY, checkpoint__keep=KEEP)
    options.update(overrides)
    return tiny_config(world, **options)


def _reference_run(world, workdir: Path, num_steps: int) -> dict:
    start = time.monotonic()
    proc = start_faulty_train(world, fault_config(world, num_steps=num_steps), workdir)
    assert wait_then(lambda: last_logged_step(workdir) >= 1, proc, TIMEOUT), output_of(workdir)[-3000:]
    startup = time.monotonic() - start
    assert proc.wait(TIMEOUT) == 0, output_of(workdir)[-3000:]
    return {"adapter": adapter_arrays(workdir / "ip_adapter.safetensors"), "startup": startup,
            "num_steps": num_steps}


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """The uninterrupted run: its final adapter and how long it took to reach its first step."""
    return _reference_run(world, tmp_path_factory.mktemp("reference") / "run", NUM_STEPS)


# Each interrupted run moves the workdir on by about one step net (it resumes from the last checkpoint), so
# 20 interruptions need a run long enough that it is not finished after the first handful.
LONG_NUM_STEPS = 30


# ------------------------------------------------------------------------------------------- SIGKILL
def kill_points(seed: int, count: int) -> list[tuple[str, float]]:
    """``(kind, where)``, all SIGKILL: "startup" (a fraction of the reference's time to its first step:
    imports, model loading, compilation, restoring), "step" (once the run has logged that many steps of its
    own), "async_write" (once the run's n-th checkpoint write is under way, before orbax commits it)."""
    rng = random.Random(seed)
    points = []
    for i in range(count):
        kind = ("async_write", "step", "startup")[i % 3]
        where = {"startup": rng.uniform(0.1, 0.95), "step": rng.randint(1, 3), "async_write": rng.randint(1, 2)}[kind]
        points.append((kind, where))
    return points


class RunStart:
    """What the workdir held when a run started, so that its own progress can be told from leftovers."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.time = time.time()
        committed = finished_checkpoints(workdir)
        self.step = max(committed, default=0)  # where the run resumes (0: from scratch)
        self.stale_writes = set(writes_in_progress(workdir))  # tmp folders of killed runs

    def steps_done(self) -> int:
        """Steps this run has logged (metrics.jsonl is rewritten when the run starts: older lines don't count)."""
        path = self.workdir / "metrics.jsonl"
        if not path.is_file() or path.stat().st_mtime <= self.time:
            return 0
        return max(0, last_logged_step(self.workdir) - self.step)

    def writes_started(self, seen: set) -> bool:
        now = set(writes_in_progress(self.workdir)) - self.stale_writes
        seen.update(now)
        return bool(now)


def _interrupt_when(kind: str, where: float, proc: subprocess.Popen, run: RunStart, startup: float) -> bool:
    """Waits for the interruption point, then SIGKILLs (SIGTERMs for kind "sigterm"); False when the
    process ended first."""
    if kind == "startup":
        hit = wait_then(lambda: False, proc, timeout=where * startup) or proc.poll() is None
    elif kind in ("step", "sigterm"):
        hit = wait_then(lambda: run.steps_done() >= where, proc, TIMEOUT)
    else:
        seen: set[str] = set()
        hit = wait_then(lambda: run.writes_started(seen) and len(seen) >= where, proc, TIMEOUT)
    if hit and proc.poll() is None:
        proc.send_signal(signal.SIGTERM if kind == "sigterm" else signal.SIGKILL)
    proc.wait(TIMEOUT)
    return hit


def _kill_and_resume(world, reference, workdir: Path, points) -> list[str]:
    num_steps = reference["num_steps"]
    config = fault_config(world, num_steps=num_steps)
    events = []
    for number, (kind, where) in enumerate(points):
        run = RunStart(workdir)
        proc = start_faulty_train(world, config, workdir, log_name=f"run{number}")
        hit = _interrupt_when(kind, where, proc, run, reference["startup"])
        restored_from = resumed_from(workdir, f"run{number}")
        if restored_from is not None:  # the run got as far as restoring: from the last complete checkpoint
            assert restored_from == run.step, (kind, where, run.step, restored_from)
        steps = assert_workdir_consistent(workdir)
        if kind == "sigterm" and hit:  # a clean stop, checkpointed at the step it stopped at
            output = output_of(workdir, f"run{number}")
            assert proc.returncode == 0, output[-3000:]
            stopped = int(output.split("stopped at step ")[1].split()[0].rstrip(";"))
            assert "(preempted)" in output and steps[-1] == stopped == last_logged_step(workdir)
        events.append(f"{kind}={where}: {'killed' if hit else 'finished first'}, checkpoints "
                      f"{run.step or '-'} -> {steps}")
    run = RunStart(workdir)
    proc = start_faulty_train(world, config, workdir, log_name="final")
    assert proc.wait(TIMEOUT) == 0, output_of(workdir, "final")[-3000:]
    if 0 < run.step < num_steps:
        assert resumed_from(workdir, "final") == run.step
    assert_workdir_consistent(workdir)
    assert [r["step"] for r in metric_steps(workdir)] == list(range(1, num_steps + 1))  # each step logged once
    assert not writes_in_progress(workdir), "temporary checkpoint folders of killed runs were left behind"
    diff = max_abs_diff(adapter_arrays(workdir / "ip_adapter.safetensors"), reference["adapter"])
    assert diff == 0.0, (diff, events)
    return events


def test_sigkill_before_a_checkpoint_and_during_an_async_write_then_sigterm_then_resume(world, reference, tmp_path):
    """SIGKILL after step 1 (no checkpoint yet), SIGKILL while the run's second checkpoint is being written,
    then SIGTERM three steps into the next run (between checkpoints): each restart resumes from the last
    complete checkpoint, the SIGTERM leaves a checkpoint at the step it stopped at, and the end result is
    the uninterrupted run's, bit for bit."""
    events = _kill_and_resume(world, reference, tmp_path / "run", [("step", 1), ("async_write", 2), ("sigterm", 3)])
    print("\n".join(events))
    assert all("killed" in e for e in events), events


@pytest.mark.slow
def test_sigkill_at_20_random_points_then_resume(world, tmp_path):
    reference = _reference_run(world, tmp_path / "reference", LONG_NUM_STEPS)
    events = _kill_and_resume(world, reference, tmp_path / "run", kill_points(seed=7, count=20))
    print("\n".join(events))
    assert sum("killed" in e for e in events) >= 10


# --------------------------------------------------------------------------------- unwritable / full
def _immutable(path: Path, on: bool) -> bool:
    """``chattr +i``: not even root may create, rename or delete entries in ``path``."""
    result = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True)
    return result.returncode == 0


# The safetensors writer behind every adapter export hits a full disk from the second export on, after
# writing part of the file (the first export succeeds).
DISK_FULL_ON_SECOND_EXPORT = """
import errno, pathlib
real, calls = pathlib.Path.write_bytes, []
def full_disk(self, data):
    if "ip_adapter" in self.name:  # the exports (an export writes its per-step file, then the latest)
        calls.append(self)
        if len(calls) > 2:
            real(self, bytes(100))
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
    return real(self, data)
pathlib.Path.write_bytes = full_disk
"""


def _error_line(output: str) -> str:
    """The line that reports why the run stopped (the exception's own line of the traceback)."""
    lines = [line for line in output.splitlines() if "CheckpointSaveError:" in line]
    assert lines, output[-3000:]
    return lines[-1]


def test_unwritable_checkpoint_folder_at_save_time(world, tmp_path):
    workdir = tmp_path / "run"
    proc = start_faulty_train(world, fault_config(world), workdir)
    folder = workdir / "checkpoints"
    locked = False
    try:
        assert wait_then(lambda: (folder / "2" / "commit_success.txt").exists() or 2 in finished_checkpoints(workdir),
                         proc, TIMEOUT, interval=0.0005), output_of(workdir)[-3000:]
        locked = _immutable(folder, True)
        assert locked, "chattr +i failed (the test needs a file system with the immutable flag, e.g. ext4)"
        assert wait_then(lambda: "could not save" in output_of(workdir), proc, TIMEOUT) or proc.poll() is not None
        failed_at = time.monotonic()
        code = proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
        if locked:
            _immutable(folder, False)
    assert code != 0
    message = _error_line(output_of(workdir))
    assert "could not save the checkpoint at step 4" in message and str(folder) in message, message
    assert "PermissionError" in message and "last complete checkpoint is step 2" in message, message
    assert 2 in assert_workdir_consistent(workdir)
    assert time.monotonic() - failed_at < 60  # no hang on orbax's writer threads after the error


def test_full_disk_when_exporting_the_adapter(world, tmp_path):
    workdir = tmp_path / "run"
    proc = start_faulty_train(world, fault_config(world), workdir, patch=DISK_FULL_ON_SECOND_EXPORT)
    assert proc.wait(TIMEOUT) != 0
    message = _error_line(output_of(workdir))
    assert "could not save the adapter export ip_adapter.safetensors at step 4" in message, message
    assert "No space left on device" in message and "last complete checkpoint is step 4" in message, message
    steps = assert_workdir_consistent(workdir)
    assert 2 in steps
    exported = adapter_arrays(workdir / "ip_adapter.safetensors")  # the step-2 export, intact
    assert max_abs_diff(exported, adapter_arrays(workdir / "adapters" / "ip_adapter_00000002.safetensors")) == 0.0
    assert not list((workdir / "adapters").glob("*.tmp*")) and not list(workdir.glob("*.tmp*"))


# ---------------------------------------------------------------------------- leftovers of killed saves
def _tiny_state(step: int):
    import jax.numpy as jnp

    from ipadapter_jax.train.state import TrainState

    return TrainState(step=jnp.asarray(step, jnp.int32), params={"w": jnp.full(3, float(step))},
                      opt_state={"m": jnp.zeros(3)})


def test_pruning_is_one_rename_and_leftovers_of_killed_saves_are_removed(tmp_path):
    """What a kill leaves in checkpoints/ (a save's temporary folder, a pruned checkpoint half deleted) is
    removed when the next run opens it; pruning beyond ``keep`` moves the whole step folder out in one
    rename, so no listed checkpoint is ever half deleted."""
    import jax

    from ipadapter_jax.train.checkpoint import TRASH, Checkpointer
    from ipadapter_jax.train.config import CheckpointConfig

    folder = tmp_path / "checkpoints"
    (folder / "7.orbax-checkpoint-tmp" / "adapter").mkdir(parents=True)  # a save killed before its commit
    (folder / TRASH / "1" / "adapter").mkdir(parents=True)  # a pruned checkpoint killed while being deleted
    checkpointer = Checkpointer(tmp_path, CheckpointConfig(keep=2))
    for step in (1, 2, 3):
        checkpointer.save(_tiny_state(step), jax.random.key(0), {"position": step}, {"seed": 0})
    checkpointer.wait_until_finished()
    assert sorted(os.listdir(folder)) == sorted(["2", "3", TRASH])  # temporary folder gone; step 1 pruned ...
    assert os.listdir(folder / TRASH) == ["1"]  # ... by a rename into the trash
    assert checkpointer.committed_steps() == [2, 3]
    checkpointer.close()
    Checkpointer(tmp_path, CheckpointConfig(keep=2)).close()
    assert sorted(os.listdir(folder)) == ["2", "3"]  # the trash is emptied by the next run
    assert restore_checkpoint(tmp_path, 3)["adapter"]["w"].tolist() == [3.0, 3.0, 3.0]

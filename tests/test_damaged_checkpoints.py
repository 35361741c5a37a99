"""A damaged latest checkpoint is survived: the resume warns in one line, moves it aside (kept, never
overwritten) and continues from the newest checkpoint that restores, ending at the uninterrupted run's
adapter. Damage: an array file cut in half, a deleted item, garbage metadata, arrays stored in another dtype.
When no checkpoint restores, ``train.py`` says so in one line and names them; an intact checkpoint that
does not fit a changed config is refused in one line without moving anything.

The tiny config on the session's tiny world, 8 steps, a checkpoint every 2 keeping 3 (steps 4, 6, 8).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train_support import REPO, adapter_arrays, config_flags, max_abs_diff, subprocess_env, tiny_config  # noqa: F401
from train_support import world  # noqa: F401  (fixture)

NUM_STEPS = 8


def _config(world, **overrides):
    from ipadapter_jax.train.config import TrainConfig

    options = dict(num_steps=NUM_STEPS, checkpoint__every_steps=2, checkpoint__keep=3)
    options.update(overrides)
    return TrainConfig.from_config_dict(tiny_config(world, **options))


@pytest.fixture(scope="module")
def finished_run(world, tmp_path_factory):
    from ipadapter_jax.train.loop import train

    workdir = tmp_path_factory.mktemp("damaged") / "run"
    train(_config(world), workdir)
    return workdir


def _largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _cut_in_half(step_dir: Path) -> None:
    big = _largest_file(step_dir / "adapter")
    data = big.read_bytes()
    big.write_bytes(data[: len(data) // 2])


def _float16_adapter(step_dir: Path) -> None:
    # A checkpoint whose adapter arrays were stored in float16 (not what this trainer writes): orbax would
    # cast it back to float32 silently.
    import orbax.checkpoint as ocp

    import jax

    item = step_dir / "adapter"
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(item)
        shutil.rmtree(item)
        checkpointer.save(item, jax.tree.map(lambda x: np.asarray(x, np.float16), restored))
        checkpointer.wait_until_finished()


DAMAGE = {
    "truncated_array_file": _cut_in_half,
    "deleted_item": lambda step_dir: shutil.rmtree(step_dir / "opt_state"),
    "garbage_metadata": lambda step_dir: (step_dir / "adapter" / "_METADATA").write_text("{not json"),
    "garbage_json_item": lambda step_dir: (step_dir / "data" / "metadata").write_bytes(b"\x00\xff garbage"),
    "stored_in_float16": _float16_adapter,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_checkpoint_resumes_from_the_previous_one(world, finished_run, tmp_path, damage, caplog):
    from ipadapter_jax.train.loop import train

    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    expected = adapter_arrays(finished_run / "ip_adapter.safetensors")
    DAMAGE[damage](workdir / "checkpoints" / "8")
    with caplog.at_level(logging.WARNING):
        train(_config(world), workdir)
    warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warnings) == 1 and "step 8" in warnings[0] and "\n" not in warnings[0], warnings
    moved = workdir / "checkpoints.damaged" / "8"
    assert moved.is_dir()  # moved aside, not deleted
    # Resumed from step 6 and trained steps 7 and 8 again: the same adapter as the uninterrupted run.
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [4, 6, 8]
    assert max_abs_diff(adapter_arrays(workdir / "ip_adapter.safetensors"), expected) == 0.0


def test_a_second_damage_of_the_same_step_is_kept_beside_the_first(world, finished_run, tmp_path):
    from ipadapter_jax.train.loop import train

    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    for _ in range(2):
        _cut_in_half(workdir / "checkpoints" / "8")
        train(_config(world), workdir)
    assert (workdir / "checkpoints.damaged" / "8").is_dir() and (workdir / "checkpoints.damaged" / "8.1").is_dir()


def _train_cli(world, config, workdir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny.py"),
           "--workdir", str(workdir), *config_flags(config)]
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(world), capture_output=True, text=True, timeout=600)


def _error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]


def test_no_checkpoint_restores_is_one_line_naming_them(world, finished_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    for step in (4, 6, 8):
        _cut_in_half(workdir / "checkpoints" / str(step))
    proc = _train_cli(world, tiny_config(world, num_steps=NUM_STEPS, checkpoint__every_steps=2,
                                         checkpoint__keep=3), workdir)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = _error_lines(proc)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "no checkpoint" in lines[0] and "8, 6, 4" in lines[0], lines
    assert sorted(p.name for p in (workdir / "checkpoints.damaged").iterdir()) == ["4", "6", "8"]


def test_an_intact_checkpoint_of_another_config_is_refused_and_left_in_place(world, finished_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    proc = _train_cli(world, tiny_config(world, num_steps=NUM_STEPS, checkpoint__every_steps=2,
                                         checkpoint__keep=3, adapter__num_tokens=8), workdir)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = _error_lines(proc)
    assert len(lines) == 1 and "other shapes than this config builds" in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (workdir / "checkpoints.damaged").exists()
    assert (workdir / "checkpoints" / "8").is_dir()


def test_abandoned_reads_into_a_closed_event_loop_print_nothing():
    # CI once saw tensorstore's callbacks for the reads a failed restore abandons raise "Event loop is closed"
    # from its own threads, printed as bare tracebacks under the one-line error. Reproduce both ways Python
    # prints such an error (sys.excepthook, sys.unraisablehook) after the restore path has installed its
    # filters: the closed-loop callbacks vanish, any other error still prints.
    script = """
import asyncio, sys
from ipadapter_jax.train.checkpoint import _quiet_abandoned_reads
_quiet_abandoned_reads()
loop = asyncio.new_event_loop(); loop.close()
try:
    loop.call_soon_threadsafe(print)
except RuntimeError as exc:
    sys.excepthook(type(exc), exc, exc.__traceback__)
    class U: exc_type, exc_value, exc_traceback, err_msg, object = type(exc), exc, exc.__traceback__, None, print
    sys.unraisablehook(U)
try:
    raise RuntimeError("something else")
except RuntimeError as exc:
    sys.excepthook(type(exc), exc, exc.__traceback__)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "Event loop is closed" not in proc.stderr, proc.stderr
    assert "RuntimeError: something else" in proc.stderr, proc.stderr

"""Helpers for the fault-injection tests: running ``train.py`` with faults injected into its own process
(a wrapper that patches the trainer before ``train.py`` runs), killing it at chosen moments, and checking
what a crash may and may not leave behind in a workdir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from train_support import REPO, config_flags, finished_checkpoints, log_of, subprocess_env

# Runs train.py after exec'ing the code in $FAULT_PATCH (if any) in this interpreter: the patch changes the
# trainer's own modules (a writer that fails, a batch that turns NaN) without touching the library.
_WRAPPER = """
import os, runpy, sys
patch = os.environ.get("FAULT_PATCH")
if patch:
    exec(compile(patch, "<fault patch>", "exec"), {})
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def start_faulty_train(world: dict, config, workdir: Path, patch: str = "", log_name: str | None = None,
                       extra: tuple = ()) -> subprocess.Popen:
    """``train.py`` on ``config`` in a new process with ``patch`` applied first; output into
    ``<workdir>.<log_name or 'log'>``."""
    log = open(Path(f"{workdir}.{log_name or 'log'}"), "w")
    env = subprocess_env(world)
    if patch:
        env["FAULT_PATCH"] = patch
    cmd = [sys.executable, "-c", _WRAPPER, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny.py"),
           "--workdir", str(workdir), *config_flags(config), *extra]
    return subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT)


def output_of(workdir: Path, log_name: str | None = None) -> str:
    path = Path(f"{workdir}.{log_name or 'log'}")
    return path.read_text() if path.is_file() else ""


def metric_steps(workdir: Path) -> list[dict]:
    """The records of ``metrics.jsonl`` written so far (a line being written is ignored)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def last_logged_step(workdir: Path) -> int:
    steps = [r.get("step", 0) for r in metric_steps(workdir)]
    return max(steps, default=0)


def checkpoint_dir_names(workdir: Path) -> list[str]:
    folder = Path(workdir) / "checkpoints"
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def writes_in_progress(workdir: Path) -> list[str]:
    """Checkpoint folders orbax is still writing (it writes ``<step>.orbax-checkpoint-tmp*`` and renames
    the folder when every item is complete)."""
    return [n for n in checkpoint_dir_names(workdir) if "tmp" in n]


def wait_then(predicate, proc: subprocess.Popen, timeout: float, interval: float = 0.001) -> bool:
    """Poll ``predicate`` until it holds (True) or the process ends or time runs out (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(interval)
    return False


def restore_checkpoint(workdir: Path, step: int) -> dict:
    """Every item of a committed checkpoint, read back from disk (raises if any is damaged):
    ``{"adapter": tree, "opt_state": tree, "step": int, "data": dict, "config": dict}``."""
    import orbax.checkpoint as ocp

    folder = Path(workdir) / "checkpoints" / str(step)
    checkpointer = ocp.StandardCheckpointer()
    out = {"adapter": checkpointer.restore(folder / "adapter"), "opt_state": checkpointer.restore(folder / "opt_state")}
    for item in ("step", "data", "config"):
        files = [p for p in (folder / item).iterdir() if p.is_file() and not p.name.startswith("_")]
        assert files, f"checkpoint {step}: item {item} is empty"
        out[item] = json.loads(files[0].read_text())
    out["step"] = out["step"]["step"]
    return out


def assert_workdir_consistent(workdir: Path) -> list[int]:
    """What a crash may leave: committed checkpoints that restore completely (their step item naming
    their own step), orbax's temporary folders (which no reader lists), and adapter exports that load.
    Returns the committed steps."""
    from ipadapter_jax.weights.ip_adapter_file import load_ip_adapter

    steps = finished_checkpoints(workdir)
    for name in checkpoint_dir_names(workdir):
        assert name.isdigit() or "orbax-checkpoint-tmp" in name, f"unexpected entry in checkpoints/: {name}"
    for step in steps:
        restored = restore_checkpoint(workdir, step)
        assert restored["step"] == step
        for leaf in _leaves(restored["adapter"]):
            assert np.isfinite(leaf).all(), f"checkpoint {step} holds non-finite adapter weights"
    latest = Path(workdir) / "ip_adapter.safetensors"
    if latest.exists():
        load_ip_adapter(latest)
    for export in sorted((Path(workdir) / "adapters").glob("ip_adapter_*.safetensors")):
        load_ip_adapter(export)
    return steps


def _leaves(tree) -> list[np.ndarray]:
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in _leaves(value)]
    if isinstance(tree, (list, tuple)):
        return [leaf for value in tree for leaf in _leaves(value)]
    return [np.asarray(tree)]


def resumed_from(workdir: Path, log_name: str | None = None) -> int | None:
    """The step the run's log says it resumed from (None: it started fresh or died before restoring)."""
    for line in output_of(workdir, log_name).splitlines():
        if "resumed from the checkpoint at step" in line:
            return int(line.rsplit(" ", 1)[-1])
    return None


__all__ = ["assert_workdir_consistent", "checkpoint_dir_names", "last_logged_step", "log_of", "metric_steps",
           "output_of", "restore_checkpoint", "resumed_from", "start_faulty_train", "wait_then",
           "writes_in_progress"]

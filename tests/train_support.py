"""Shared helpers for tests/test_train*.py: one tiny world per test session, a persistent compilation cache
(every run of the same program after the first loads it instead of compiling: ~30 s -> ~5 s on a small
CPU), tiny configs, and running ``train.py`` in a subprocess (for signals, 8 simulated devices, several
processes)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import tiny  # noqa: E402
from ipadapter_jax.testing.random_model import write_random_model  # noqa: E402
from ipadapter_jax.toy.shapes_dataset import heldout_shard, write_shape_shards  # noqa: E402
from ipadapter_jax.weights.ip_adapter_file import load_ip_adapter  # noqa: E402


PRETRAIN_STEPS = 300  # text-conditioned UNet training steps of the tiny world (see testing.random_model)


def use_compile_cache(path: Path) -> Path:
    from ipadapter_jax.compilation_cache import enable_compilation_cache

    return enable_compilation_cache(path)


@pytest.fixture(scope="session")
def world(request) -> dict:
    """``{"model": dir, "shards": spec, "heldout": path, "cache": dir}``: the tiny world (the random SD1.5-layout
    model of ``ipadapter_jax.testing``, its UNet pretrained a little, and eight toy-world shards of 32 samples
    without labels) and a compilation cache (used by this process and every ``train.py`` subprocess), both
    kept in pytest's cache folder: the tiny world is deterministic and rewritten whenever its generators'
    arguments or versions change,
    and JAX keys compiled programs by their full contents, so reuse across sessions is safe
    (``pytest --cache-clear`` starts afresh). Under pytest-xdist the workers share both: the first to
    arrive writes the world while the others wait on its lock, then reuse it."""
    from filelock import FileLock

    compile_cache = use_compile_cache(Path(request.config.cache.mkdir("ipadapter_jax_compile_cache")))
    root = Path(request.config.cache.mkdir("ipadapter_jax_tiny_world"))
    with FileLock(str(root / "write.lock")):
        model = write_random_model(root / "model", seed=0, pretrain_steps=PRETRAIN_STEPS)
        shards = write_shape_shards(root / "shards", num_shards=8, samples_per_shard=32, seed=0, labels=False)
    return {"model": str(model), "shards": shards, "heldout": heldout_shard(root / "shards"),
            "cache": str(compile_cache)}


def tiny_config(world: dict, **overrides):
    """``configs/tiny.py`` on the session's tiny world, without validation or progress bar;
    ``overrides`` use dotted keys with ``__``: ``checkpoint__every_steps=2``."""
    c = tiny.get_config()
    c.model.model_dir = world["model"]
    c.data.shards = world["shards"]
    c.optimizer.schedule, c.optimizer.warmup_steps = "constant", 0  # short runs: full rate from step 1
    c.validation.every_steps = 0
    c.log.progress_bar = False
    c.log.every_steps = 1
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def config_flags(config) -> list[str]:
    """``--config.a.b=value`` flags reproducing ``config`` (leaves only) for ``train.py``."""
    flags = []

    def walk(node, prefix):
        for key, value in node.items():
            if hasattr(value, "items"):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, (tuple, list)):
                continue  # the defaults of configs/tiny.py are kept
            else:
                flags.append(f"--config.{prefix}{key}={value}")

    walk(config, "")
    return flags


def subprocess_env(world: dict, devices: int = 1) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    env["IPADAPTER_JAX_COMPILATION_CACHE"] = world["cache"]  # train.py turns the cache on there
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def start_train(world: dict, config, workdir: Path, devices: int = 1, extra: tuple = ()) -> subprocess.Popen:
    """``python train.py`` with ``config`` in a new process (stdout+stderr into ``workdir/../<name>.log``)."""
    log = open(Path(str(workdir) + ".log"), "w")
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny.py"),
           "--workdir", str(workdir), *config_flags(config), *extra]
    return subprocess.Popen(cmd, cwd=str(REPO), env=subprocess_env(world, devices), stdout=log,
                            stderr=subprocess.STDOUT)


def log_of(workdir: Path) -> str:
    path = Path(str(workdir) + ".log")
    return path.read_text() if path.is_file() else ""


def run_train(world: dict, config, workdir: Path, devices: int = 1, timeout: float = 300, extra: tuple = ()):
    proc = start_train(world, config, workdir, devices, extra)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert code == 0, f"train.py failed ({code}):\n{log_of(workdir)[-4000:]}"


def finished_checkpoints(workdir: Path) -> list[int]:
    """Steps of committed checkpoints (orbax writes into a tmp folder and renames it when complete)."""
    folder = Path(workdir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def adapter_arrays(path) -> dict[str, np.ndarray]:
    """Flat ``{name: array}`` of an exported adapter file."""
    params = load_ip_adapter(path).params
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

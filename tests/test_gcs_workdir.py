"""Training in a ``gs://`` workdir, against a real GCS-compatible server started here (``gcs_support``).

One workdir lives through what a pod run meets: SIGKILL once a checkpoint has committed, SIGKILL while
the next one is being written, SIGTERM (a preemption notice), a latest checkpoint damaged on the bucket;
then the run finishes. It must end at the uninterrupted run's adapter bit for bit, with every step's
metrics record exactly once, exports that load from the bucket, TensorBoard events there, and its lease
released. The lease itself (a second run refused, a dead run's lease taken over) is tested on the bucket
as on local disk.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gcs_support import GcsServer
from train_support import REPO, adapter_arrays, config_flags, max_abs_diff, run_train, subprocess_env, tiny_config
from train_support import world  # noqa: F401 - a fixture
from ipadapter_jax.train.checkpoint import DAMAGED
from ipadapter_jax.train.metrics_log import read_metrics
from ipadapter_jax.train.workdir_files import WorkdirFiles
from ipadapter_jax.train.workdir_lease import LEASE_NAME, WorkdirBusyError, WorkdirLease

NUM_STEPS, EVERY, KEEP = 8, 2, 2
TIMEOUT = 600


@pytest.fixture(scope="module")
def gcs():
    server = GcsServer()
    server.activate()
    yield server
    server.stop()


def _start(world, gcs, url: str, log: Path, config) -> subprocess.Popen:
    env = {**subprocess_env(world), **gcs.env}
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny.py"), "--workdir", url,
           *config_flags(config)]
    return subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _committed(files: WorkdirFiles) -> list[int]:
    # orbax commits a checkpoint on GCS by writing commit_success.txt into it last
    return [int(n) for n in files.listdir("checkpoints") if n.isdigit()
            and files.exists(f"checkpoints/{n}/commit_success.txt")]


def _writing(files: WorkdirFiles) -> list[int]:
    return [int(n) for n in files.listdir("checkpoints") if n.isdigit() and int(n) not in _committed(files)]


def _wait(predicate, proc: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"train.py exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def _resumed_from(log: Path) -> int | None:
    found = re.search(r"resumed from the checkpoint at step (\d+)", log.read_text())
    return int(found.group(1)) if found else None


def _event_tags(data: bytes) -> bytes:
    """The concatenated records of a TensorBoard event file, checking its framing (length, then payload)."""
    out, at = b"", 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        out += data[at + 12:at + 12 + length]
        at += 12 + length + 4
    assert at == len(data), "an event file cut inside a record"
    return out


@pytest.mark.slow
def test_gs_workdir_survives_kills_sigterm_and_a_damaged_checkpoint(world, gcs, tmp_path):
    config = tiny_config(world, num_steps=NUM_STEPS, checkpoint__every_steps=EVERY, checkpoint__keep=KEEP)
    run_train(world, config, tmp_path / "local", timeout=TIMEOUT)  # the uninterrupted run, on local disk
    reference = adapter_arrays(tmp_path / "local" / "ip_adapter.safetensors")
    url = gcs.fresh_url("sd-tiny")
    files = WorkdirFiles(url)

    # 1. SIGKILL as soon as the first checkpoint has committed (the export may be half-way).
    proc = _start(world, gcs, url, tmp_path / "run1.log", config)
    _wait(lambda: _committed(files), proc, tmp_path / "run1.log", "a committed checkpoint")
    proc.kill()
    proc.wait()
    # 2. SIGKILL while a later checkpoint is being written (its folder there, its commit file not yet; if the
    # poll misses that window, just after it commits).
    proc = _start(world, gcs, url, tmp_path / "run2.log", config)
    _wait(lambda: _resumed_from(tmp_path / "run2.log") is not None, proc, tmp_path / "run2.log", "the resume")
    resumed = _resumed_from(tmp_path / "run2.log")
    _wait(lambda: any(s > resumed for s in _writing(files) + _committed(files)), proc, tmp_path / "run2.log",
          "a new checkpoint being written")
    proc.kill()
    proc.wait()
    log2 = (tmp_path / "run2.log").read_text()
    assert "taking over the stale lease" in log2 and "resumed from the checkpoint at step" in log2, log2[-3000:]
    # 3. SIGTERM once the run is stepping (its first new checkpoint under way): a checkpoint at the step it
    # stopped at, exit 0.
    proc = _start(world, gcs, url, tmp_path / "run3.log", config)
    _wait(lambda: _resumed_from(tmp_path / "run3.log") is not None, proc, tmp_path / "run3.log", "the resume")
    resumed = _resumed_from(tmp_path / "run3.log")
    _wait(lambda: any(s > resumed for s in _writing(files) + _committed(files)), proc, tmp_path / "run3.log",
          "a new checkpoint")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(TIMEOUT) == 0, (tmp_path / "run3.log").read_text()[-3000:]
    stopped = max(_committed(files))
    assert _writing(files) == [] and not files.exists(LEASE_NAME)
    # 4. The latest checkpoint's largest array file cut in half on the bucket, then the run finishes.
    assert len(_committed(files)) == KEEP  # a previous complete checkpoint to fall back to
    fs, root = files.fs, files.root
    array_files = {p: info["size"] for p, info in fs.find(f"{root}/checkpoints/{stopped}/adapter", detail=True).items()
                   if "/d/" in p}
    biggest = max(array_files, key=array_files.get)
    fs.pipe_file(biggest, fs.cat_file(biggest)[: array_files[biggest] // 2])
    proc = _start(world, gcs, url, tmp_path / "run4.log", config)
    assert proc.wait(TIMEOUT) == 0, (tmp_path / "run4.log").read_text()[-3000:]
    log4 = (tmp_path / "run4.log").read_text()
    assert f"checkpoint step {stopped} is damaged" in log4, log4[-3000:]
    assert str(stopped) in files.listdir(DAMAGED)  # moved aside on the bucket, kept
    assert files.exists(f"{DAMAGED}/{stopped}/commit_success.txt")

    # The same adapter as the uninterrupted run, read back from the bucket.
    assert max_abs_diff(adapter_arrays(f"{url}/ip_adapter.safetensors"), reference) == 0.0
    assert max_abs_diff(adapter_arrays(f"{url}/adapters/ip_adapter_{NUM_STEPS:08d}.safetensors"), reference) == 0.0
    assert len(files.listdir("adapters")) == KEEP
    steps = [r["step"] for r in read_metrics(url)]
    assert steps == list(range(1, NUM_STEPS + 1)), steps  # none lost, none twice, across four runs
    assert sorted(_committed(files))[-1] == NUM_STEPS and len(_committed(files)) <= KEEP
    events = [n for n in files.listdir("tensorboard") if "tfevents" in n]
    assert len(events) == 4  # one per run: each uploads its events before each checkpoint it starts
    assert b"train/loss" in _event_tags(files.read_bytes(f"tensorboard/{events[-1]}"))
    assert not files.exists(LEASE_NAME)
    assert not [n for n in files.listdir() if n.endswith(".tmp") or ".tmp-" in n]


def test_gs_lease_refuses_a_second_run_and_takes_over_a_dead_one(gcs, world, tmp_path):
    url = gcs.fresh_url("lease")
    files = WorkdirFiles(url)
    with WorkdirLease(url):
        with pytest.raises(WorkdirBusyError, match=r"is in use by another run \(host .*, pid \d+, since "):
            WorkdirLease(url).acquire()
        # train.py on the busy bucket workdir: one line, exit 2, before anything is loaded
        env = {**subprocess_env(world), **gcs.env}
        out = subprocess.run([sys.executable, str(REPO / "train.py"), "--workdir", url,
                              *config_flags(tiny_config(world, num_steps=2))],
                             cwd=str(REPO), env=env, capture_output=True, text=True, timeout=TIMEOUT)
        assert out.returncode == 2, out.stderr[-2000:]
        # (absl-style lines such as tensorstore's credential notice are not ours)
        lines = [line for line in out.stderr.splitlines() if line.strip() and not re.match(r"[EWI]\d{4} ", line)]
        assert lines[-1].startswith("train.py: error: ") and "is in use by another run" in lines[-1]
        assert "Traceback" not in out.stderr
    assert not files.exists(LEASE_NAME)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    files.write_atomic(LEASE_NAME, json.dumps({"host": socket.gethostname(), "pid": dead.pid, "run": "old",
                                               "since": "earlier", "heartbeat": time.time()}).encode())
    lease = WorkdirLease(url).acquire()
    assert json.loads(files.read_text(LEASE_NAME))["run"] == lease.record["run"]
    lease.release()
    assert not files.exists(LEASE_NAME)


def test_gs_lease_two_runs_racing_for_one_workdir_exactly_one_wins(gcs):
    url = gcs.fresh_url("race")
    barrier, outcomes = threading.Barrier(4), []

    def contender():
        barrier.wait()
        try:
            outcomes.append(WorkdirLease(url).acquire())
        except WorkdirBusyError:
            outcomes.append(None)

    threads = [threading.Thread(target=contender) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [lease for lease in outcomes if lease is not None]
    assert len(outcomes) == 4 and len(winners) == 1
    assert json.loads(WorkdirFiles(url).read_text(LEASE_NAME))["run"] == winners[0].record["run"]
    winners[0].release()

"""One run per workdir (``train.workdir_lease``): a live run's lease refuses a second run in one line naming
the holder; a lease left by a dead process, one whose heartbeat stopped, or an unreadable one is taken over;
the heartbeat moves while the lease is held; ``train.py`` refuses a second run on a busy workdir (exit 2, one
line) and a rerun after a SIGKILL takes the dead run's lease over and finishes."""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import time

import pytest

from ipadapter_jax.train.workdir_lease import LEASE_NAME, WorkdirBusyError, WorkdirLease
from train_support import REPO, config_flags, start_train, subprocess_env, tiny_config, wait_for
from train_support import world  # noqa: F401  (fixture)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lease(workdir, **record):
    (workdir / LEASE_NAME).write_text(json.dumps(record))


def test_a_held_lease_refuses_a_second_run_naming_the_holder(tmp_path):
    with WorkdirLease(tmp_path):
        with pytest.raises(WorkdirBusyError) as refused:
            WorkdirLease(tmp_path).acquire()
    message = str(refused.value)
    assert "in use by another run" in message and socket.gethostname() in message and str(__import__("os").getpid()) in message
    assert "\n" not in message
    assert not (tmp_path / LEASE_NAME).exists()  # released
    WorkdirLease(tmp_path).acquire().release()  # and free again


@pytest.mark.parametrize("holder", ["dead_pid", "stopped_heartbeat", "unreadable"])
def test_a_stale_lease_is_taken_over(tmp_path, holder, caplog):
    if holder == "dead_pid":
        _write_lease(tmp_path, host=socket.gethostname(), pid=_dead_pid(), run="old", since="then",
                     heartbeat=time.time())
    elif holder == "stopped_heartbeat":
        _write_lease(tmp_path, host="another-host", pid=1, run="old", since="then", heartbeat=time.time() - 3600)
    else:
        (tmp_path / LEASE_NAME).write_text("{half a reco")
    with caplog.at_level(logging.WARNING):
        lease = WorkdirLease(tmp_path).acquire()
    try:
        assert json.loads((tmp_path / LEASE_NAME).read_text())["run"] == lease.record["run"]
        assert any("taking over the stale lease" in r.getMessage() for r in caplog.records)
    finally:
        lease.release()


def test_a_live_lease_on_another_host_is_respected(tmp_path):
    _write_lease(tmp_path, host="another-host", pid=1, run="old", since="then", heartbeat=time.time())
    with pytest.raises(WorkdirBusyError, match="another-host"):
        WorkdirLease(tmp_path).acquire()
    assert json.loads((tmp_path / LEASE_NAME).read_text())["run"] == "old"  # untouched


def test_the_heartbeat_moves_while_held(tmp_path):
    with WorkdirLease(tmp_path, heartbeat_s=0.05) as lease:
        first = json.loads((tmp_path / LEASE_NAME).read_text())["heartbeat"]
        wait_for(lambda: json.loads((tmp_path / LEASE_NAME).read_text())["heartbeat"] > first, 10, "a heartbeat")
        assert json.loads((tmp_path / LEASE_NAME).read_text())["run"] == lease.record["run"]


def test_train_py_refuses_a_busy_workdir_and_takes_over_after_a_kill(world, tmp_path):
    workdir = tmp_path / "run"
    config = tiny_config(world, num_steps=100000, checkpoint__every_steps=100000)
    first = start_train(world, config, workdir)
    try:
        wait_for(lambda: (workdir / LEASE_NAME).is_file(), 300, "the first run's lease", first)
        holder = json.loads((workdir / LEASE_NAME).read_text())
        cmd = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny.py"),
               "--workdir", str(workdir), *config_flags(config)]
        second = subprocess.run(cmd, cwd=REPO, env=subprocess_env(world), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        errors = [line for line in second.stderr.splitlines() if line.startswith("train.py: error:")]
        assert len(errors) == 1 and "in use by another run" in errors[0] and f"pid {first.pid}" in errors[0]
        assert "Traceback" not in second.stderr
        assert json.loads((workdir / LEASE_NAME).read_text())["run"] == holder["run"]  # the first keeps it
        first.send_signal(signal.SIGKILL)
        first.wait(60)
    finally:
        if first.poll() is None:
            first.kill()
    # The killed run's lease is left behind; the rerun takes it over and trains to the end.
    short = tiny_config(world, num_steps=4, checkpoint__every_steps=100000)
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny.py"),
           "--workdir", str(workdir), *config_flags(short)]
    third = subprocess.run(cmd, cwd=REPO, env=subprocess_env(world), capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "taking over the stale lease" in third.stderr
    assert not (workdir / LEASE_NAME).exists()

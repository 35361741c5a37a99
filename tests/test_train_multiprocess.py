"""Two local processes under ``jax.distributed.initialize`` (coordinator on 127.0.0.1, a free port) train
together: each reads its own half of the shards, one global batch per step, one checkpoint and one exported
adapter; the checkpoint restores, both as a two-process resume and as adapter params in a single process.
SIGTERM to one of the two (a preemption notice reaching one host) stops both at the same step, with a
checkpoint there that the next launch resumes from (RELIABILITY.md)."""

from __future__ import annotations

import re
import signal

import jax
import numpy as np

from train_support import (adapter_arrays, finished_checkpoints, free_port, log_of, max_abs_diff, start_train,
                           tiny_config, wait_for, world)  # noqa: F401
from ipadapter_jax.models.adapter import IPAdapter
from ipadapter_jax.train import TrainConfig
from ipadapter_jax.train.checkpoint import Checkpointer
from ipadapter_jax.train.metrics_log import read_metrics
from ipadapter_jax.train.setup import build_setup
from ipadapter_jax.weights.ip_adapter_file import save_ip_adapter


def _two_processes(world, config, workdir, logs_prefix, while_running=None, timeout=900):
    """Both processes train in ``workdir`` (the later --workdir flag overrides start_train's per-log one);
    ``while_running(procs)`` is called once both are started. Returns both logs."""
    port = free_port()
    procs = [start_train(world, config, logs_prefix.parent / f"{logs_prefix.name}{i}", extra=(
        "--workdir", str(workdir), "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
        "--process_id", str(i))) for i in range(2)]
    try:
        if while_running is not None:
            while_running(procs)
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [log_of(logs_prefix.parent / f"{logs_prefix.name}{i}") for i in range(2)]
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    return logs


def test_two_processes_train_on_disjoint_shards_write_one_checkpoint_and_stop_together(world, tmp_path):
    workdir = tmp_path / "run"
    config = tiny_config(world, num_steps=4, checkpoint__every_steps=2, mesh__data=2)
    _two_processes(world, config, workdir, tmp_path / "first")

    assert finished_checkpoints(workdir) == [2, 4]
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # one writer
    assert records[-1]["used_samples"] == 4 * 8  # one global batch of 8 per step, 4 from each process
    checkpointer = Checkpointer(workdir, TrainConfig.from_config_dict(config).checkpoint)
    data = checkpointer.read_json(4, "data")
    assert data["process_count"] == 2
    first, second = data["states"]
    assert [first["fingerprint"]["process_index"], second["fingerprint"]["process_index"]] == [0, 1]
    assert first["fingerprint"]["shards_sha1"] != second["fingerprint"]["shards_sha1"]  # disjoint shard lists
    assert first["fingerprint"]["local_batch_size"] == 4 and first["batches_emitted"] == 4

    # The checkpoint restores in one process (the adapter; the data positions belong to two hosts).
    setup = build_setup(TrainConfig.from_config_dict(tiny_config(world, num_steps=4)), workdir)
    state, _, _, _ = checkpointer.restore(setup.abstract_state, setup.abstract_rng_data)
    checkpointer.close()
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state.params)
    save_ip_adapter(IPAdapter(setup.projection, params), tmp_path / "restored.safetensors")
    assert max_abs_diff(adapter_arrays(tmp_path / "restored.safetensors"),
                        adapter_arrays(workdir / "ip_adapter.safetensors")) == 0

    # The two processes resume from it, each at its own data position, until SIGTERM reaches process 1 only
    # (not the one that writes metrics and exports): both stop at the same step, with a checkpoint there.
    config.num_steps, config.checkpoint.every_steps = 100_000, 50_000

    def sigterm_one(procs):
        wait_for(lambda: len(read_metrics(workdir)) >= 6, timeout=600, what="two resumed steps", proc=procs[0])
        procs[1].send_signal(signal.SIGTERM)

    logs = _two_processes(world, config, workdir, tmp_path / "second", while_running=sigterm_one, timeout=300)
    assert "resumed from the checkpoint at step 4" in "".join(logs)
    stopped = [re.findall(r"stopped at step (\d+) \(preempted\)", log) for log in logs]
    assert len(stopped[0]) == len(stopped[1]) == 1 and stopped[0] == stopped[1], stopped
    step = int(stopped[0][0])
    assert step >= 6 and finished_checkpoints(workdir)[-1] == step
    assert (workdir / "adapters" / f"ip_adapter_{step:08d}.safetensors").is_file()
    assert [r["step"] for r in read_metrics(workdir)] == list(range(1, step + 1))

    # And the next launch resumes from that step.
    config.num_steps = step + 2
    logs = _two_processes(world, config, workdir, tmp_path / "third")
    assert f"resumed from the checkpoint at step {step}" in "".join(logs)
    assert finished_checkpoints(workdir)[-1] == step + 2
    assert [r["step"] for r in read_metrics(workdir)] == list(range(1, step + 3))

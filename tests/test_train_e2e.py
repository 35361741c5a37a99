"""End-to-end runs of the training entry point on the tiny world (CPU): what a run writes, exact resume
after SIGKILL (adapter params and data order), a clean stop with a checkpoint on SIGTERM, and broken data
skipped and counted."""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train_support import (adapter_arrays, finished_checkpoints, log_of, max_abs_diff, start_train, tiny_config,
                           wait_for, world)  # noqa: F401  (world is a fixture)
from ipadapter_jax.train import TrainConfig, main
from ipadapter_jax.train.checkpoint import Checkpointer
from ipadapter_jax.train.metrics_log import read_metrics
from ipadapter_jax.train.setup import build_setup
from ipadapter_jax.train.workdir_lease import LEASE_NAME


def test_run_writes_metrics_checkpoints_exports_and_resumes(world, tmp_path):
    config = tiny_config(world, num_steps=6, log__every_steps=2, checkpoint__every_steps=3,
                         validation__every_steps=3, validation__num_inference_steps=2)
    result = main(config, tmp_path)
    assert result.step == 6 and not result.preempted and result.resumed_from is None

    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        assert np.isfinite(r["loss"]) and r["learning_rate"] > 0 and "grad_norm" in r and "images_per_second" in r
        assert r["skipped_samples"] == 0 and r["used_samples"] >= 8 * r["step"]
    assert finished_checkpoints(tmp_path) == [3, 6]
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == [
        "ip_adapter_00000003.safetensors", "ip_adapter_00000006.safetensors"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    # Validation grids: rows = 2 image prompts, columns = the prompt + scales 0, 0.5, 1; cells of the resolution.
    grids = sorted((tmp_path / "validation").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_00000003.png", "step_00000006.png"]
    grid = np.asarray(Image.open(grids[-1]))
    side = config.data.resolution
    assert grid.shape == (2 * side, 4 * side, 3) and grid.std() > 0

    # The exported file is the checkpoint's adapter, and the latest export is the step-6 one.
    latest = adapter_arrays(tmp_path / "ip_adapter.safetensors")
    assert max_abs_diff(latest, adapter_arrays(tmp_path / "adapters" / "ip_adapter_00000006.safetensors")) == 0
    setup = build_setup(TrainConfig.from_config_dict(config), tmp_path)
    checkpointer = Checkpointer(tmp_path, setup.config.checkpoint)
    state, _, data, saved_config = checkpointer.restore(setup.abstract_state, setup.abstract_rng_data)
    checkpointer.close()
    assert int(state.step) == 6 and data["process_count"] == 1 and data["states"][0]["batches_emitted"] == 6
    assert saved_config == TrainConfig.from_config_dict(config).to_dict()
    from ipadapter_jax.models.adapter import IPAdapter
    from ipadapter_jax.weights.ip_adapter_file import ip_adapter_state_dict

    restored = ip_adapter_state_dict(IPAdapter(setup.projection, jax_to_numpy(state.params)))
    assert max(np.abs(restored[k] - v).max() for k, v in _file_tensors(tmp_path / "ip_adapter.safetensors").items()) == 0

    with pytest.raises(FileExistsError, match="already has checkpoints"):
        main(config, tmp_path, resume=False)
    # Running again with more steps resumes from step 6.
    config.validation.every_steps = 0
    config.num_steps = 8
    result = main(config, tmp_path)
    assert result.resumed_from == 6 and result.step == 8
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 4, 6, 8]


def jax_to_numpy(tree):
    import jax

    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _file_tensors(path):
    from safetensors.numpy import load_file

    return load_file(str(path))


def test_sigkill_then_resume_matches_an_uninterrupted_run(world, tmp_path):
    config = tiny_config(world, num_steps=120, log__every_steps=10, checkpoint__every_steps=20)
    reference = tmp_path / "reference"
    main(config, reference)

    killed = tmp_path / "killed"
    proc = start_train(world, config, killed)
    try:
        wait_for(lambda: finished_checkpoints(killed), timeout=600, what="the first checkpoint", proc=proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    saved = finished_checkpoints(killed)
    assert saved and saved[-1] < 120, f"the run got to the end before the kill: {saved}"

    result = main(config, killed)
    assert result.resumed_from == saved[-1] and result.step == 120
    diff = max_abs_diff(adapter_arrays(killed / "ip_adapter.safetensors"),
                        adapter_arrays(reference / "ip_adapter.safetensors"))
    assert diff <= 1e-6, f"resumed adapter differs from the uninterrupted run by {diff:.3e}"
    # Same losses at every logged step, the resumed ones included: the same batches in the same order.
    ours = {r["step"]: r["loss"] for r in read_metrics(killed)}
    ref = {r["step"]: r["loss"] for r in read_metrics(reference)}
    assert sorted(ours) == sorted(ref) == list(range(10, 121, 10))
    assert max(abs(ours[s] - ref[s]) for s in ref) <= 1e-6


def _sigterm_when(world, workdir, ready, what: str) -> int:
    """Start a run that would go on for hours, SIGTERM it once ``ready()``, and return its exit code."""
    proc = start_train(world, tiny_config(world, num_steps=100_000, checkpoint__every_steps=50_000), workdir)
    try:
        wait_for(ready, timeout=600, what=what, proc=proc)
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_exits_cleanly(world, tmp_path):
    workdir = tmp_path / "run"
    code = _sigterm_when(world, workdir, lambda: len(read_metrics(workdir)) >= 3, "three logged steps")
    assert code == 0, log_of(workdir)[-3000:]
    last = read_metrics(workdir)[-1]["step"]
    assert finished_checkpoints(workdir) == [last]
    assert f"stopped at step {last} (preempted)" in log_of(workdir)
    assert (workdir / "adapters" / f"ip_adapter_{last:08d}.safetensors").is_file()


def test_sigterm_during_setup_stops_before_the_first_step_and_releases_the_workdir(world, tmp_path):
    # A preemption notice can arrive while the run is still loading and compiling (minutes on a pod): the
    # handler is in from the start, so the run stops cleanly instead of dying with its lease held.
    workdir = tmp_path / "run"
    code = _sigterm_when(world, workdir, lambda: "mesh:" in log_of(workdir), "the setup")
    assert code == 0, log_of(workdir)[-3000:]
    assert "stopped at step 0 (preempted)" in log_of(workdir), log_of(workdir)[-3000:]
    assert read_metrics(workdir) == []  # no step ran
    assert not (workdir / LEASE_NAME).exists()
    result = main(tiny_config(world, num_steps=2), workdir)  # the next run resumes from what it saved
    assert result.resumed_from == 0 and result.step == 2


def _tar_members(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corrupt_images_truncated_shards_and_missing_captions_are_skipped_and_counted(world, tmp_path, monkeypatch):
    good = world["shards"].replace("{00000..00007}", "00000"), world["shards"].replace("{00000..00007}", "00001")
    members = _tar_members(good[0])
    broken = []
    for i, (name, data) in enumerate(members):
        if name.endswith(".png") and i < 8:
            data = data[:40]  # a truncated PNG: undecodable
        if name.endswith(".txt") and 8 <= i < 16:
            continue  # no caption
        broken.append((name, data))
    _write_tar(tmp_path / "broken.tar", broken)
    with tarfile.open(good[1]) as tar:  # cut inside an image's data (a cut inside a header reads as the end)
        cut = tar.getmembers()[20].offset_data + 50
    (tmp_path / "truncated.tar").write_bytes(Path(good[1]).read_bytes()[:cut])
    spec = "::".join([str(tmp_path / "broken.tar"), str(tmp_path / "truncated.tar"), str(tmp_path / "gone.tar")])
    # Enough steps to read every shard at least once (~50 usable samples per epoch, 8 per step). This run
    # also takes the configs' defaults for large models: bfloat16 frozen weights and rematerialised blocks.
    config = tiny_config(world, num_steps=16, data__shards=spec, log__every_steps=16, checkpoint__every_steps=16,
                         model__compute_dtype="bfloat16", model__remat=True)
    monkeypatch.chdir(tmp_path)
    result = main(config, "run")  # a relative workdir, as train.py's default
    assert result.step == 16
    last = read_metrics(tmp_path / "run")[-1]
    assert last["skipped_undecodable_image"] >= 4, last
    assert last["skipped_missing_caption"] >= 4, last
    assert last["skipped_shard_read_error"] >= 1, last
    assert last["skipped_shard_open_failed"] >= 1, last
    assert last["skipped_samples"] == sum(v for k, v in last.items() if k.startswith("skipped_") and k != "skipped_samples")
    assert np.isfinite(last["loss"])
    json.dumps(last)

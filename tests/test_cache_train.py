"""Training from a latent cache through the real entry points (the cache written by ``python -m
ipadapter_jax.cache``, training by ``train.main``) on the tiny world: the run trains, logs and
checkpoints; a run stopped at a checkpoint and resumed reaches the same adapter as an
uninterrupted one (<= 1e-6, data order included); the compiled step holds only the UNet of the frozen models;
and a cache that does not match the config is refused before compiling."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from train_support import (REPO, adapter_arrays, config_flags, max_abs_diff, subprocess_env, tiny_config,  # noqa: F401
                           world)
from ipadapter_jax.cache.format import CacheError
from ipadapter_jax.train import TrainConfig, main
from ipadapter_jax.train.metrics_log import read_metrics
from ipadapter_jax.train.setup import build_setup


@pytest.fixture(scope="module")
def cache_dir(world, tmp_path_factory) -> str:
    """Written by the command line tool, as a user would."""
    out = tmp_path_factory.mktemp("latent_cache")
    cmd = [sys.executable, "-m", "ipadapter_jax.cache", "--config", str(REPO / "configs" / "tiny.py"),
           "--out", str(out), "--batch_size", "16", *config_flags(tiny_config(world))]
    proc = subprocess.run(cmd, cwd=str(REPO), env=subprocess_env(world), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "8 shard(s) written" in proc.stdout and '"used": 256' in proc.stdout
    return str(out)


def _config(world, cache_dir, **overrides):
    return tiny_config(world, checkpoint__every_steps=2, data__cache_latents=True, data__cache_dir=cache_dir,
                       **overrides)


def test_cached_training_checkpoints_and_resumes_exactly(world, cache_dir, tmp_path):
    full = main(_config(world, cache_dir, num_steps=4), tmp_path / "full")
    assert full.step == 4 and full.resumed_from is None
    records = read_metrics(tmp_path / "full")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert np.isfinite(r["loss"]) and r["used_samples"] >= 8 * r["step"] and r["skipped_samples"] == 0

    first = main(_config(world, cache_dir, num_steps=2), tmp_path / "resumed")
    assert first.step == 2
    resumed = main(_config(world, cache_dir, num_steps=4), tmp_path / "resumed")
    assert resumed.resumed_from == 2 and resumed.step == 4
    diff = max_abs_diff(adapter_arrays(tmp_path / "full" / "ip_adapter.safetensors"),
                        adapter_arrays(tmp_path / "resumed" / "ip_adapter.safetensors"))
    print(f"adapter after 4 steps, uninterrupted vs resumed at 2: max abs diff {diff:.2e}")
    assert diff <= 1e-6
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "resumed")}
    assert [losses[s] for s in (3, 4)] == pytest.approx([r["loss"] for r in records[2:]], rel=1e-6)


def test_setup_places_only_the_unet_and_checks_the_manifest(world, cache_dir, tmp_path):
    setup = build_setup(TrainConfig.from_config_dict(_config(world, cache_dir)), tmp_path / "a")
    assert set(setup.frozen) == {"unet", "image_uncond"}
    assert set(setup.batch_shardings) == {"latent_mean", "latent_logvar", "text_context",
                                                     "image_features", "drop_image"}
    assert len(setup.shards) == 8 and all(s.endswith(".tar") and "cache-" in s for s in setup.shards)
    with pytest.raises(CacheError, match="resolution: cache 32, config 48"):
        build_setup(TrainConfig.from_config_dict(_config(world, cache_dir, data__resolution=48)), tmp_path / "b")


def test_validation_grids_while_training_from_a_cache(world, cache_dir, tmp_path):
    """Validation still encodes its prompts and decodes its samples: those models stay on the devices, and the
    image prompts come from the image shards (data.shards), not the cache."""
    config = _config(world, cache_dir, num_steps=2, validation__every_steps=2, validation__num_inference_steps=2)
    assert main(config, tmp_path).step == 2
    assert [p.name for p in (tmp_path / "validation").glob("step_*.png")] == ["step_00000002.png"]

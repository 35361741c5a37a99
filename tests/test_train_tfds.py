"""Training from a prepared TFDS dataset (tests/tfds_support.py) on the tiny world: a few steps with the
unusable examples skipped and counted, and an interrupted run resumed from its checkpoint (which holds the
TFDS position) ending at the same adapter as an uninterrupted one. Plus the config checks for the TFDS fields."""

from __future__ import annotations

import pytest

import tfds_support
from train_support import adapter_arrays, finished_checkpoints, max_abs_diff, tiny_config, world  # noqa: F401
from ipadapter_jax.train import TrainConfig, main
from ipadapter_jax.train.config import ConfigError
from ipadapter_jax.train.metrics_log import read_metrics

STEPS = 6  # x batch 8 = 48 examples: past the 38 usable ones of an epoch, so both bad examples were met


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return tfds_support.prepare(tmp_path_factory.mktemp("tfds"))


def tfds_config(world, tfds_dir, **overrides):
    return tiny_config(world, data__shards="", data__tfds_name=tfds_support.NAME, data__tfds_data_dir=tfds_dir,
                       checkpoint__every_steps=3, checkpoint__async_save=False, **overrides)


def test_trains_from_tfds_and_resumes_exactly(world, tfds_dir, tmp_path):
    straight = tmp_path / "straight"
    result = main(tfds_config(world, tfds_dir, num_steps=STEPS), straight)
    assert result.step == STEPS
    records = read_metrics(straight)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    last = records[-1]
    assert last["used_samples"] == 8 * STEPS
    # Epoch 0 (40 records) was read through, epoch 1 begun in a new file order: each bad one met once or twice.
    assert last["skipped_undecodable_image"] in (1, 2) and last["skipped_missing_caption"] in (1, 2)
    assert last["skipped_samples"] == last["skipped_undecodable_image"] + last["skipped_missing_caption"]

    # Stopped after the step-3 checkpoint, then continued to step 6 from it.
    interrupted = tmp_path / "interrupted"
    main(tfds_config(world, tfds_dir, num_steps=3), interrupted)
    assert finished_checkpoints(interrupted) == [3]
    resumed = main(tfds_config(world, tfds_dir, num_steps=STEPS), interrupted)
    assert resumed.resumed_from == 3 and resumed.step == STEPS
    diff = max_abs_diff(adapter_arrays(straight / "ip_adapter.safetensors"),
                        adapter_arrays(interrupted / "ip_adapter.safetensors"))
    assert diff <= 1e-6, diff
    # Same data in the same order after the resume: the same losses and counters step for step.
    again = read_metrics(interrupted)
    for a, b in zip(records[3:], [r for r in again if r["step"] > 3]):
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) <= 1e-6
        assert a["used_samples"] == b["used_samples"] and a["skipped_samples"] == b["skipped_samples"]


def test_config_rejects_shards_and_tfds_together(world):
    config = tiny_config(world, data__tfds_name="coco_captions")  # tiny_config names shards
    with pytest.raises(ConfigError, match="data.shards=.* and data.tfds_name=.* are both set"):
        TrainConfig.from_config_dict(config)


def test_config_rejects_tfds_with_the_latent_cache_or_shard_validation(world):
    config = tiny_config(world, data__shards="", data__tfds_name="coco_captions", data__cache_latents=True,
                         data__cache_dir="/tmp/cache", validation__every_steps=5)
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_config_dict(config)
    assert "cache_latents reads the latent cache" in str(info.value)
    assert "validation.images" in str(info.value)
    ok = tiny_config(world, data__shards="", data__tfds_name="coco_captions")
    assert TrainConfig.from_config_dict(ok).data.tfds_name == "coco_captions"

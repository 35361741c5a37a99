"""The latent cache (``data.cache_latents``) against the online path on the tiny world: the same batches give
the same losses and parameters step after step (posterior sampled in the step from the cached moments with the
same key; conditioning dropout on the same examples), the writer counts unusable samples as the online source
does, and a cache made for another resolution, variant or model is refused.

Metric: per-step loss max |cached - online| / |online| <= 1e-5 and adapter params max abs diff <= 1e-6
(float32; the only difference is batching of the encoders). The steps use plain SGD so that the parameters
compare the gradients: Adam's first update is about lr * sign(gradient), which turns a 1e-9 difference in a
near-zero gradient entry into a difference of up to lr.
"""

from __future__ import annotations

import dataclasses
import io
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train_support import tiny_config, world  # noqa: F401  (world is a fixture)
from ipadapter_jax.cache.format import CacheError
from ipadapter_jax.cache.manifest import open_latent_cache, read_manifest
from ipadapter_jax.cache.write import write_latent_cache
from ipadapter_jax.train.config import TrainConfig
from ipadapter_jax.train.data_feed import make_source
from ipadapter_jax.train.frozen import load_frozen_models
from ipadapter_jax.train.setup import projection_config
from ipadapter_jax.train.state import cross_attention_kv, state_initializer
from ipadapter_jax.train.step import StepSettings, batch_keys, make_train_step
from ipadapter_jax.testing.random_model import write_random_model
from ipadapter_jax.toy.shapes_dataset import make_examples, shard_members

STEPS = 3
LOSS_TOL = 1e-5
PARAM_TOL = 1e-6


def _config(world, **overrides) -> TrainConfig:
    # Dropout rates high enough that a few batches of 8 drop captions and images.
    options = dict(data__drop_text=0.2, data__drop_image=0.2, data__drop_both=0.2, data__decode_threads=0)
    return TrainConfig.from_config_dict(tiny_config(world, **{**options, **overrides}))


def _cached(config: TrainConfig, cache_dir: Path) -> TrainConfig:
    return dataclasses.replace(config, data=dataclasses.replace(config.data, cache_latents=True,
                                                                cache_dir=str(cache_dir)))


@pytest.fixture(scope="module")
def frozen_models(world):
    return load_frozen_models(world["model"], compute_dtype="float32")


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("sdxl") / "model", arch="sdxl", seed=1)


@pytest.mark.parametrize("arch, variant", [("sd15", "plain"), ("sd15", "plus"),
                                           pytest.param("sdxl", "plus", marks=pytest.mark.slow)])
def test_cached_steps_match_online_steps(world, frozen_models, arch, variant, tmp_path, request):
    model = Path(world["model"]) if arch == "sd15" else request.getfixturevalue("sdxl_model")
    if arch == "sdxl":
        frozen_models = load_frozen_models(model, compute_dtype="float32")
    # Two of the eight shards (64 samples): enough for the compared steps, a quarter of the encoding.
    shards = world["shards"].replace("00007", "00001")
    assert shards != world["shards"]
    config = _config(world, adapter__variant=variant, model__model_dir=str(model), data__shards=shards)
    summary = write_latent_cache(config, tmp_path / "cache", batch_size=16)
    assert summary.counters["used"] == 64 and summary.counters["skipped"] == {}
    cached_config = _cached(config, tmp_path / "cache")
    modules = frozen_models.modules
    assert modules.is_sdxl == (arch == "sdxl")
    cache = open_latent_cache(cached_config, model, modules)
    online_source = make_source(config, modules, shards)
    cached_source = make_source(cached_config, modules, None, cache=cache)

    projection = projection_config(config, frozen_models.modules)
    schedule = optax.constant_schedule(0.1)
    tx = optax.sgd(schedule)
    settings = StepSettings(projection, config.data.resolution, sample_posterior=True)
    cached_settings = dataclasses.replace(settings, cached_latents=True)
    online_step = jax.jit(make_train_step(modules, tx, schedule, settings))
    cached_step = jax.jit(make_train_step(modules, tx, schedule, cached_settings))
    kv = cross_attention_kv(modules.unet_config, frozen_models.host_params["unet"])
    init = jax.jit(state_initializer(modules.unet_config, projection, tx))
    online_state, cached_state = init(jax.random.key(0), kv), init(jax.random.key(0), kv)
    frozen = jax.tree.map(jnp.asarray, frozen_models.params_in("float32"))
    cached_frozen = {"unet": frozen["unet"], "image_uncond": jnp.asarray(cache.uncond["image_features"])}
    rng = jax.random.key(1)
    drops = np.zeros(2, int)
    for step in range(STEPS):
        online, cached = next(online_source), next(cached_source)
        assert cached["key"] == online["key"]
        for flag in ("drop_text", "drop_image"):
            np.testing.assert_array_equal(cached[flag], online[flag])
        drops += [online["drop_text"].sum(), online["drop_image"].sum()]
        online_state, online_metrics = online_step(
            online_state, frozen, {k: online[k] for k in batch_keys(modules)}, rng)
        cached_state, cached_metrics = cached_step(
            cached_state, cached_frozen, {k: cached[k] for k in batch_keys(modules, True)}, rng)
        a, b = float(online_metrics["loss"]), float(cached_metrics["loss"])
        print(f"{arch} {variant} step {step + 1}: online loss {a:.6f}, cached {b:.6f}, rel diff {abs(a - b) / a:.2e}")
        assert abs(a - b) <= LOSS_TOL * abs(a)
    assert (drops > 0).all(), drops  # both kinds of dropout were exercised
    diff = max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(online_state.params),
                                                            jax.tree.leaves(cached_state.params)))
    print(f"{arch} {variant}: adapter params after {STEPS} steps, max abs diff {diff:.2e}")
    assert diff <= PARAM_TOL
    online_source.close()
    cached_source.close()


def _png(color) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (40, 48), color).save(out, format="PNG")
    return out.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]], truncate: bool = False) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


def test_writer_counts_skips_as_the_online_source_does(world, frozen_models, tmp_path):
    good = shard_members(make_examples(6, seed=3), "g", labels=False)
    _tar(tmp_path / "a.tar", good[:4] + [("bad.png", b"not a png"), ("bad.txt", b"x"), ("nocap.png", _png("red"))])
    _tar(tmp_path / "b.tar", good[4:] + [("late.png", _png("blue")), ("late.txt", b"late")] * 3, truncate=True)
    spec = f"{tmp_path}/{{a,b}}.tar"
    config = _config(world, data__shards=spec, batch_size=1)
    summary = write_latent_cache(config, tmp_path / "cache", batch_size=2)
    modules = frozen_models.modules
    online = make_source(config, modules, spec, num_epochs=1)
    used = sum(1 for _ in online)
    counters = online.counters.to_dict()
    print("writer:", summary.counters, "online:", counters)
    assert summary.counters["skipped"] == counters["skipped"]
    assert summary.counters["skipped"]["undecodable_image"] == 1
    assert summary.counters["skipped"]["missing_caption"] == 1
    assert "shard_read_error" in summary.counters["skipped"]
    assert summary.counters["used"] == counters["used"] == used >= 4
    manifest = read_manifest(str(tmp_path / "cache"))
    assert manifest["shards"] == ["cache-000000.tar", "cache-000001.tar"] and manifest["resolution"] == 32
    # A second run reuses the finished shards.
    again = write_latent_cache(config, tmp_path / "cache", batch_size=2)
    assert again.shards_written == [] and again.counters == summary.counters

    # Two writers: each encodes its share; the cache is usable once both have finished.
    split = tmp_path / "split"
    second = write_latent_cache(config, split, batch_size=2, process_index=1, process_count=2)
    assert second.shards_written == ["cache-000001.tar"] and not (split / "manifest.json").exists()
    first = write_latent_cache(config, split, batch_size=2, process_index=0, process_count=2)
    assert first.shards_written == ["cache-000000.tar"]
    assert read_manifest(str(split))["shards"] == manifest["shards"]
    assert first.counters["used"] + second.counters["used"] == summary.counters["used"]
    open_latent_cache(_cached(config, split), Path(world["model"]), modules)
    (split / "counts-00001-of-00002.json").unlink()
    with pytest.raises(CacheError, match="is incomplete: .*counts-00001-of-00002.json is missing"):
        open_latent_cache(_cached(config, split), Path(world["model"]), modules)


def test_a_cache_for_another_resolution_variant_or_model_is_refused(world, frozen_models, tmp_path):
    config = _config(world)
    write_latent_cache(config, tmp_path / "cache", batch_size=16)
    modules, model = frozen_models.modules, Path(world["model"])
    cached = _cached(config, tmp_path / "cache")
    open_latent_cache(cached, model, modules)  # the matching config opens it

    with pytest.raises(CacheError, match=r"resolution: cache 32, config 64 \(config data.resolution\)"):
        open_latent_cache(dataclasses.replace(cached, data=dataclasses.replace(cached.data, resolution=64)),
                          model, modules)
    with pytest.raises(CacheError, match=r"variant: cache 'plain', config 'plus'"):
        open_latent_cache(dataclasses.replace(cached, adapter=dataclasses.replace(cached.adapter, variant="plus")),
                          model, modules)
    other = write_random_model(tmp_path / "other_model", seed=5)
    with pytest.raises(CacheError, match="model: the cache was encoded with the model in"):
        open_latent_cache(cached, other, load_frozen_models(other, compute_dtype="float32").modules)
    with pytest.raises(CacheError, match="no readable latent-cache manifest"):
        open_latent_cache(_cached(config, tmp_path / "nowhere"), model, modules)

"""Model folders and adapter files at URLs (gs:// on real runs; fsspec's in-memory filesystem here): copied
once into the local cache with only the files the loaders read, then identical to loading the local copy."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest

from ipadapter_jax.toy_assets import ASSETS
from ipadapter_jax.weights.remote_files import local_file, local_folder
from ipadapter_jax.weights.safetensors_io import WeightFileError


@pytest.fixture()
def bucket(monkeypatch, tmp_path):
    """The toy base and adapter in ``memory://bucket``, with the extra files model repositories carry."""
    monkeypatch.setenv("IPADAPTER_JAX_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    fs.rm("/bucket", recursive=True) if fs.exists("/bucket") else None
    fs.put(str(ASSETS / "base"), "/bucket/toy", recursive=True)
    fs.pipe({"/bucket/toy/unet/diffusion_pytorch_model.fp16.safetensors": b"half",
             "/bucket/toy/unet/diffusion_pytorch_model.bin": b"pickle",
             "/bucket/toy/v1-5-pruned.ckpt": b"ckpt", "/bucket/toy/README.md": b"readme"})
    fs.put(str(ASSETS / "ip_adapter.safetensors"), "/bucket/adapters/ip_adapter.safetensors")
    yield fs
    fs.rm("/bucket", recursive=True)


def test_folder_is_copied_once_with_only_what_the_loaders_read(bucket, tmp_path):
    local = local_folder("memory://bucket/toy")
    assert str(local).startswith(str(tmp_path / "cache"))
    copied = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    expected = sorted(str(p.relative_to(ASSETS / "base")) for p in (ASSETS / "base").rglob("*") if p.is_file())
    assert copied == expected  # no fp16 variant, no .bin beside the .safetensors, no .ckpt, no README
    weights = local / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.read_bytes() == (ASSETS / "base" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    stamp = weights.stat().st_mtime_ns
    assert local_folder("memory://bucket/toy/") == local and weights.stat().st_mtime_ns == stamp  # not fetched again
    assert local_folder(ASSETS / "base") == ASSETS / "base"  # local paths pass through


def test_pipeline_from_urls_equals_the_local_pipeline(bucket):
    from PIL import Image

    from ipadapter_jax.pipeline import IPAdapterPipeline

    reference = Image.open(ASSETS / "example.png").convert("RGB")
    kwargs = dict(ip_adapter_image=reference, ip_scale=0.7, num_inference_steps=3, guidance_scale=3.0, seed=1)
    remote = IPAdapterPipeline.from_pretrained("memory://bucket/toy",
                                               ip_adapter="memory://bucket/adapters/ip_adapter.safetensors")
    local = IPAdapterPipeline.from_pretrained(ASSETS / "base", ip_adapter=ASSETS / "ip_adapter.safetensors")
    assert np.array_equal(remote(["a circle"], **kwargs), local(["a circle"], **kwargs))


def test_training_reads_a_model_folder_at_a_url(bucket):
    from ipadapter_jax.train.frozen import load_frozen_models

    import jax

    remote, local = load_frozen_models("memory://bucket/toy"), load_frozen_models(ASSETS / "base")
    assert jax.tree.structure(remote.host_params) == jax.tree.structure(local.host_params)
    for a, b in zip(jax.tree.leaves(remote.host_params), jax.tree.leaves(local.host_params)):
        assert np.array_equal(a, b)


def test_missing_remote_files_and_unknown_protocols_are_clear_errors(bucket):
    with pytest.raises(WeightFileError, match="no such folder"):
        local_folder("memory://bucket/nothing-here")
    with pytest.raises(WeightFileError, match="no such file"):
        local_file("memory://bucket/adapters/missing.safetensors")
    with pytest.raises(WeightFileError, match="cannot open this URL"):
        local_folder("nosuchprotocol://bucket/sd15")

"""sample.py end to end on a tiny random SD model: PNGs with their settings, a grid, and a second run that
compiles nothing new (the persistent compilation cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from ipadapter_jax.testing.reference_pipelines import build_pipeline_dir, reference_image, write_adapter

REPO = Path(__file__).resolve().parents[1]


def test_sample_cli_writes_images_grid_and_reuses_compilations(tmp_path):
    model = build_pipeline_dir("sd", tmp_path)
    adapter = write_adapter(model, "plain", seed=0)
    reference_image().save(tmp_path / "ref.png")
    cache = tmp_path / "jax_cache"
    env = dict(os.environ, IPADAPTER_JAX_COMPILATION_CACHE=str(cache), JAX_PLATFORMS="cpu")
    command = [sys.executable, str(REPO / "sample.py"), "--model", str(model), "--ip-adapter", str(adapter),
               "--image-encoder", str(model / "image_encoder"), "--image", str(tmp_path / "ref.png"),
               "--prompt", "a red circle", "--scale", "0.6", "--steps", "3", "--guidance", "7.5", "--seed", "1",
               "--num-images", "3", "--height", "32", "--width", "32", "--out", str(tmp_path / "out")]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "compiling and sampling" in first.stdout and "sampled in" in first.stdout
    assert "sampler: ddim (DDIM, the model's DDIMScheduler config), 3 steps" in first.stdout, first.stdout
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["000.png", "001.png", "002.png", "grid.png"]
    image = Image.open(tmp_path / "out" / "001.png")
    assert image.size == (32, 32)
    settings = json.loads(image.text["ipadapter_jax"])
    assert settings["prompt"] == "a red circle" and settings["scale"] == 0.6 and settings["index"] == 1
    assert Image.open(tmp_path / "out" / "grid.png").size == (64, 64)

    entries = set(os.listdir(cache))
    assert entries, "the first run left nothing in the compilation cache"
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert set(os.listdir(cache)) == entries, "the second run compiled programs the first had cached"

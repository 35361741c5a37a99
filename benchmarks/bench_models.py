"""The models the benchmarks run, written once in diffusers/transformers layout (safetensors) into a cache
folder that both sides load from:

- ``sd15-full``: the published SD1.5 UNet, VAE and text-encoder configs and the ViT-H/14 image encoder
  (``ipadapter_jax/reference_configs``) with random weights, and a plain IP-Adapter: the size users run.
  About 7 GB on disk; building it takes a few minutes and ~8 GB of memory.
- ``bench``: the small stand-in of the earlier benchmarks (SD1.5's layout at widths 64-256, a 34M-parameter
  UNet, a 2-layer image encoder at 32 px).

The folder is ``$IPADAPTER_JAX_BENCH_CACHE/<name>`` (default ``~/.cache/ipadapter_jax/bench/<name>``); a
``done`` file marks a complete build, so an interrupted one is rebuilt.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

MODELS = {"sd15-full": "full", "bench": "bench"}


def cache_root() -> Path:
    return Path(os.environ.get("IPADAPTER_JAX_BENCH_CACHE", Path.home() / ".cache" / "ipadapter_jax" / "bench"))


def bench_model(name: str) -> tuple[Path, Path]:
    """``(pipeline folder, plain adapter file)`` for ``name`` (a key of ``MODELS``), built on first use."""
    if name not in MODELS:
        raise ValueError(f"unknown benchmark model {name!r}; known: {sorted(MODELS)}")
    root = cache_root() / name
    folder, adapter = root / "sd", root / "sd" / "ip_adapter_plain_0.safetensors"
    if (root / "done").is_file():
        return folder, adapter
    from ipadapter_jax.testing.reference_pipelines import build_pipeline_dir, write_adapter

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    print(f"building the {name} benchmark model in {root} (once)", flush=True)
    built = build_pipeline_dir("sd", root, size=MODELS[name])
    written = write_adapter(built, "plain", seed=0)
    assert (built, written) == (folder, adapter), (built, written)
    (root / "done").write_text("complete\n")
    return folder, adapter

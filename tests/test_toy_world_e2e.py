"""The default run, shortened, end to end on the shipped toy world: toy shards are written into the workdir,
an IP-Adapter is trained on the toy base (``configs/tiny.py`` as ``python train.py`` runs it, fewer steps),
exported, loaded by ``sample.py`` and scored by ``python -m ipadapter_jax.evaluate`` (the paper's protocol
with the mini CLIP as judge). What the full-length run reaches is in README.md / TOY_WORLD.md; here the
adapter is only a few steps old, so the checks are on the plumbing and on the numbers being well formed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from ipadapter_jax.toy_assets import ASSETS


def _default_config(**overrides):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_config", Path(__file__).parents[1] / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split("__")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def test_default_config_trains_on_the_shipped_toy_base():
    config = _default_config()
    assert Path(config.model.model_dir) == ASSETS / "base" and config.data.shards == ""
    assert config.data.resolution == 32


def test_shards_train_export_sample_evaluate(tmp_path):
    from ipadapter_jax import sample
    from ipadapter_jax.evaluate.cli import main as evaluate
    from ipadapter_jax.train import main as train
    from ipadapter_jax.train.metrics_log import read_metrics
    from ipadapter_jax.weights.ip_adapter_file import load_ip_adapter

    workdir = tmp_path / "workdir"
    config = _default_config(num_steps=8, optimizer__warmup_steps=2, log__every_steps=4, checkpoint__every_steps=8,
                             validation__every_steps=8, validation__num_inference_steps=2, log__progress_bar=False)
    result = train(config, workdir)
    assert result.step == 8 and not result.preempted
    assert list(workdir.rglob("*.tar")), "the toy shards are written into the workdir"
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == [4, 8] and all(np.isfinite(r["loss"]) for r in records)
    assert records[-1]["skipped_samples"] == 0
    assert (workdir / "validation" / "step_00000008.png").is_file()

    exported = workdir / "ip_adapter.safetensors"
    adapter = load_ip_adapter(exported)
    assert adapter.projection.variant == "plain"

    out = sample.main(["--ip-adapter", str(exported), "--steps", "3", "--num-images", "2", "--scale", "1.0",
                       "--out", str(tmp_path / "samples")])
    assert sorted(p.name for p in Path(out).glob("*.png")) == ["000.png", "001.png", "grid.png"]
    assert Image.open(Path(out) / "000.png").size == (32, 32)

    report = evaluate(["--ip-adapter", str(exported), "--num-references", "2", "--images-per-reference", "2",
                       "--steps", "2", "--scales", "0", "1", "--out", str(tmp_path / "eval.json")])
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["model"] == str(ASSETS / "base") and written["ip_adapter"] == str(exported)
    assert [r["scale"] for r in written["results"]] == [0.0, 1.0]
    for r in written["results"]:
        assert r["generations"] == 4 and -1.0 <= r["clip_i"] <= 1.0 and 0.0 <= r["clip_t"] <= 2.5
        assert 0.0 <= r["colour_match"] <= 1.0 and 0.0 <= r["shape_match"] <= 1.0
    assert report["num_references"] == 2


def _fake_run(workdir: Path, model_dir: str) -> None:
    """A workdir as a run leaves it, as far as the sampler looks: orbax's config item at step 30 and an export."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(workdir / "checkpoints", item_names=("config",)) as manager:
        manager.save(30, args=ocp.args.Composite(config=ocp.args.JsonSave({"model": {"model_dir": model_dir}})))
    (workdir / "ip_adapter.safetensors").write_bytes(b"")


def test_sampling_defaults_prefer_the_adapter_trained_on_the_toy_base(tmp_path):
    from ipadapter_jax.toy_assets import default_sampling_paths, latest_toy_adapter

    shipped = ASSETS / "ip_adapter.safetensors"
    _fake_run(tmp_path / "toy_run", str(ASSETS / "base"))
    _fake_run(tmp_path / "random_world_run", "")
    _fake_run(tmp_path / "sd15_run", "/models/sd15")
    assert latest_toy_adapter(tmp_path / "toy_run") == tmp_path / "toy_run" / "ip_adapter.safetensors"
    for other in ("random_world_run", "sd15_run", "no_run"):
        assert latest_toy_adapter(tmp_path / other) == shipped
    paths = default_sampling_paths(tmp_path / "toy_run")
    assert paths["model"] == str(ASSETS / "base") and paths["image"] == [str(ASSETS / "example.png")]

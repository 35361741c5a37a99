"""The TPU plan's ``--latents=cached`` compiles the trainer's own cached-latents step (``data.cache_latents``):
for one CPU device (``cpu-1``), with the batch of cached encodings and only the UNet among the frozen weights."""

from __future__ import annotations

from test_tpu_plan import _run_plan, tiny_config  # noqa: F401  (tiny_config is a fixture)


def test_plan_cached_latents_compiles_for_one_cpu_device(tiny_config, tmp_path):
    record, stdout = _run_plan(tiny_config, tmp_path / "cached.json", "cpu-1", "--latents=cached",
                               "--config.mesh.fsdp=1", "--nomodel_flops")
    print("PLAN PATH: cpu (1 device), cached latents:", {k: record[k] for k in ("argument_bytes", "total_bytes")})
    assert record["num_chips"] == 1 and record["mesh"] == {"data": 1, "fsdp": 1} and record["what"] == "train"
    assert "train step (cached latents)" in " ".join(record["program"])
    assert record["argument_bytes"] > 0 and record["compiled_flops"] > 0 and record["alias_bytes"] > 0
    assert "[compiler estimate] per-chip HBM" in stdout

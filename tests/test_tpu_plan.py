"""python -m ipadapter_jax.plan end to end on a tiny model, and its parts (topology names, figure arithmetic).

Which compiler runs is explicit (each test prints ``PLAN PATH: ...``):
  - ``test_plan_cpu_devices_*`` always compile for 8 forced host CPU devices, the path CI without libtpu
    takes: the same tool code (config, abstract models, mesh, shardings, the trainer's step, figures, JSON)
    with XLA's CPU compiler; memory figures present and positive, FLOPs counted, JSON written.
  - ``test_plan_on_tpu_topology`` compiles for a 4-chip v5e slice with libtpu's TPU compiler and checks the
    TPU figures (HBM per chip against 16 GiB, cost-model time, images/s, MFU). Without libtpu
    (``pip install '.[tpu]'``) it checks instead that a TPU topology fails with an error naming the fix.
The plan runs in a subprocess because the CPU device count must be set before JAX starts. The tiny model
compiles in float32 at 32px (the CPU compiler is slow on bfloat16); the TPU test plans it in bfloat16.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ipadapter_jax.plan.figures import PlanFigures, corrected_step_seconds
from ipadapter_jax.plan.topology import parse_topology
from ipadapter_jax.testing import tiny_models

REPO = Path(__file__).resolve().parents[1]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None

TINY_UNET = {"_class_name": "UNet2DConditionModel", **tiny_models.TINY_UNET["sd15"]}
TINY_VAE = {"_class_name": "AutoencoderKL", **tiny_models.TINY_VAE}
TINY_TEXT = tiny_models.text_encoder_configs(tiny_models.TINY_UNET["sd15"])[0]
TINY_IMAGE = tiny_models.IMAGE_ENCODER
SCHEDULER = tiny_models.SCHEDULER
TINY_CONFIG = """
import ml_collections
def get_config():
    c = ml_collections.ConfigDict()
    c.batch_size = 16
    c.num_steps = 10
    c.model = ml_collections.ConfigDict(dict(model_dir={model_dir!r}, image_encoder_dir={image_dir!r},
                                             compute_dtype="float32", attention_implementation="xla", remat=True))
    c.data = ml_collections.ConfigDict(dict(resolution=32))
    c.optimizer = ml_collections.ConfigDict(dict(warmup_steps=0))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=2, fsdp_min_size=256))
    c.validation = ml_collections.ConfigDict(dict(num_inference_steps=3))
    return c
"""


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    """A config whose model_dir holds only config.json files: the plan reads no weights."""
    root = tmp_path_factory.mktemp("tiny_plan")
    files = {"unet/config.json": TINY_UNET, "vae/config.json": TINY_VAE, "text_encoder/config.json": TINY_TEXT,
             "scheduler/scheduler_config.json": SCHEDULER, "image_encoder/config.json": TINY_IMAGE}
    for name, content in files.items():
        (root / "model" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "model" / name).write_text(json.dumps(content))
    config = root / "tiny_plan_config.py"
    config.write_text(TINY_CONFIG.format(model_dir=str(root / "model"), image_dir=str(root / "model" / "image_encoder")))
    return config


def _run_plan(config: Path, out: Path, topology: str, *extra: str, expect_ok: bool = True):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "ipadapter_jax.plan", f"--config={config}", f"--topology={topology}",
           f"--json={out}", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    if not expect_ok:
        assert proc.returncode != 0
        return None, proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text()), proc.stdout


def _check_common(record: dict, stdout: str, topology: str, chips: int, may_be_zero: tuple = ()) -> None:
    assert record["topology"] == topology and record["num_chips"] == chips
    for key in ("argument_bytes", "temp_bytes", "output_bytes", "total_bytes", "compiled_flops", "model_flops"):
        assert record[key] >= 0 if key in may_be_zero else record[key] > 0, key
    assert record["total_bytes"] == (record["argument_bytes"] + record["output_bytes"] - record["alias_bytes"]
                                     + record["temp_bytes"] + record["code_bytes"])
    assert record["mesh"] == {"data": chips // 2, "fsdp": 2}
    assert "compiler estimate" in record["estimate"]
    assert "[compiler estimate] per-chip HBM" in stdout


def test_plan_cpu_devices_train(tiny_config, tmp_path):
    record, stdout = _run_plan(tiny_config, tmp_path / "online.json", "cpu-8")
    print("PLAN PATH: cpu (8 forced host devices)", {k: record[k] for k in ("total_bytes", "model_flops")})
    _check_common(record, stdout, "cpu-8", 8)
    assert record["device_kind"] == "cpu" and record["images_per_step"] == 16 and record["what"] == "train"
    assert record["alias_bytes"] > 0  # the train state is donated
    assert record["fits"]
    # remat=True in the config: the compiled program recomputes, the model count does not.
    assert record["compiled_flops"] > record["model_flops"]
    assert record["step_seconds"] is None and record["mfu"] is None  # XLA's CPU compiler has no TPU cost model
    assert "python -m ipadapter_jax.plan" in record["command"]


@pytest.mark.slow
def test_plan_cpu_devices_cached_latents(tiny_config, tmp_path):
    online, _ = _run_plan(tiny_config, tmp_path / "online.json", "cpu-8", "--nomodel_flops")
    cached, stdout = _run_plan(tiny_config, tmp_path / "cached.json", "cpu-8", "--latents=cached")
    print("PLAN PATH: cpu (8 forced host devices), cached latents")
    _check_common(cached, stdout, "cpu-8", 8)
    # Latents instead of pixels: no VAE weights on the chips, a smaller batch.
    assert cached["argument_bytes"] < online["argument_bytes"]
    assert "cached latents" in " ".join(cached["program"])


@pytest.mark.slow
def test_plan_cpu_devices_sample(tiny_config, tmp_path):
    record, stdout = _run_plan(tiny_config, tmp_path / "sample.json", "cpu-8", "--what=sample", "--sample_batch=8")
    print("PLAN PATH: cpu (8 forced host devices), sampler")
    _check_common(record, stdout, "cpu-8", 8)
    assert record["what"] == "sample" and record["images_per_step"] == 8
    assert "3 steps" in " ".join(record["program"])


def test_plan_on_tpu_topology(tiny_config, tmp_path):
    """libtpu present: a v5e-4 compile with TPU timings. Absent: the TPU compile is refused with the fix."""
    if not HAS_LIBTPU:
        _, output = _run_plan(tiny_config, tmp_path / "plan.json", "v5e-4", expect_ok=False)
        print("PLAN PATH: cpu only (libtpu not installed; pip install '.[tpu]' for the TPU compile)")
        assert "needs libtpu" in output and "jax[tpu]" in output
        assert not (tmp_path / "plan.json").exists()
        return
    record, stdout = _run_plan(tiny_config, tmp_path / "plan.json", "v5e-4", "--config.model.compute_dtype=bfloat16")
    print("PLAN PATH: tpu (libtpu compile for v5e-4)", {k: record[k] for k in ("total_bytes", "step_seconds", "mfu")})
    # libtpu (as bundled for jax 0.10.2) reports 0 temporary HBM bytes for this tiny bf16 step; the full-size
    # plans report gigabytes.
    _check_common(record, stdout, "v5e-4", 4, may_be_zero=("temp_bytes",))
    assert record["device_kind"] == "TPU v5 lite"
    assert record["hbm_capacity_bytes"] == 16 * 2**30 and record["fits"]
    assert record["step_seconds"] > 0 and 0 < record["mfu"] < 1 and record["images_per_second_per_chip"] > 0
    assert "images/s per chip" in stdout and "MFU" in stdout


@pytest.mark.parametrize("name,chips,grid,generation", [
    ("v4-8", 4, (2, 2, 1), "v4"), ("v4-32", 16, (2, 2, 4), "v4"), ("v5p-8", 4, (2, 2, 1), "v5p"),
    ("v5e-8", 8, (2, 4), "v5e"), ("v5litepod-8", 8, (2, 4), "v5e"), ("v5e-256", 256, (16, 16), "v5e"),
    ("v6e-8", 8, (2, 4), "v6e"),
])
def test_topology_names(name, chips, grid, generation):
    t = parse_topology(name)
    assert (t.num_chips, t.grid, t.chip.generation) == (chips, grid, generation)
    assert t.libtpu_name == f"{generation}:{'x'.join(map(str, grid))}"


def test_peak_figures_documented_per_chip():
    peaks = {g: parse_topology(f"{g}-8").chip.peak_bf16_flops for g in ("v4", "v5e", "v5p", "v6e")}
    assert peaks == {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}
    assert parse_topology("v5e-8").chip.hbm_bytes == 16 * 2**30


@pytest.mark.parametrize("name", ["v5e-3", "v4-7", "v9-8", "tpu8"])
def test_bad_topology_names_are_explained(name):
    with pytest.raises(ValueError, match="TPU topology"):
        parse_topology(name)


def test_cost_free_concat_bitcasts_are_taken_back_out():
    hlo = 'a = custom-call(), custom_call_target="ConcatBitcast"\nb = custom-call(), custom_call_target="tpu_custom_call"'
    assert corrected_step_seconds(-0.99, hlo) == (pytest.approx(0.01), 1)
    assert corrected_step_seconds(0.5, hlo) == (0.5, 0)
    assert corrected_step_seconds(-1.5, hlo) == (None, 1)  # still negative: something else is untimed


def test_figure_arithmetic():
    f = PlanFigures(topology="v5e-8", device_kind="TPU v5 lite", num_chips=8, hbm_capacity_bytes=16 * 2**30,
                    peak_bf16_flops=197e12, argument_bytes=4 * 2**30, output_bytes=2**30, alias_bytes=2**30,
                    temp_bytes=10 * 2**30, code_bytes=2**20, compiled_flops=120e12, model_flops=100e12,
                    hbm_bytes_accessed=1e12, step_seconds=1.0, cost_free_ops_corrected=0, images_per_step=64)
    assert f.total_bytes == 14 * 2**30 + 2**20 and f.fits
    assert f.images_per_second_per_chip == 8.0
    assert f.mfu == pytest.approx(100 / 197) and f.hfu == pytest.approx(120 / 197)


@pytest.mark.parametrize("what", ["train", "sample"])
def test_model_count_never_lowers_pallas(what):
    """With ``attention_implementation="pallas"`` the model-FLOPs function (lowered for CPU, where Mosaic
    kernels cannot lower) must use XLA attention everywhere, the VAE's included: a sampler plan once failed
    there after its 22-minute TPU compile."""
    import jax
    import ml_collections

    from ipadapter_jax.train.config import TrainConfig

    namespace: dict = {}
    exec(TINY_CONFIG.format(model_dir="", image_dir=""), namespace)
    config = namespace["get_config"]()
    config.model.attention_implementation = "pallas"
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, fsdp_min_size=256))
    config = TrainConfig.from_config_dict(config)
    # Token counts above the kernels' threshold, so "pallas" really dispatches to the kernels in the UNet
    # (64 tokens at 8x8 latents would not): 32x32 latents, VAE attention at 32x32.
    config = _with_resolution(config, 256)
    configs = {"unet": TINY_UNET, "vae": TINY_VAE, "text_encoder": TINY_TEXT, "scheduler": SCHEDULER,
               "image_encoder": TINY_IMAGE}
    devices = jax.devices("cpu")[:1]
    if what == "train":
        from ipadapter_jax.plan.programs import train_program

        program = train_program(config, devices, configs, "online")
    else:
        from ipadapter_jax.plan.programs import sample_program

        program = sample_program(config, devices, configs, 1)
    with program.model_tracing():
        assert program.model_flops() > 0
    # The program as it runs does take the kernels: lowering it for CPU fails on them.
    with pytest.raises(Exception, match="interpret"):
        with program.tracing():
            program.jitted.trace(*program.args).lower(lowering_platforms=("cpu",))


def _with_resolution(config, resolution: int):
    import dataclasses

    return dataclasses.replace(config, data=dataclasses.replace(config.data, resolution=resolution))

"""Config errors are reported before anything is compiled (and, where the config alone shows the problem,
before any model is loaded), through the same entry points a user runs: ``ipadapter_jax.train.main`` and
``train.py``. Compiling is made to fail loudly (``jax.stages.Lowered.compile`` raises), so an error that
arrived only after compilation would show up as that failure instead of the expected message.

Checks of each value on its own are in tests/test_train_config.py; here: the whole path, 1 device in this
process and 4 simulated devices in a subprocess (batch / mesh divisibility).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import jax
import pytest

from fault_support import output_of, start_faulty_train
from train_support import REPO, subprocess_env, tiny_config, world  # noqa: F401  (world is a fixture)
from ipadapter_jax.data.shards import ShardSpecError
from ipadapter_jax.train import ConfigError, main
from ipadapter_jax.weights.safetensors_io import WeightFileError


class Compiled(AssertionError):
    """Raised instead of compiling: the error under test came too late."""


def _refuse(*args, **kwargs):
    raise Compiled("the train step was compiled before the config error was reported")


@pytest.fixture
def no_compile(monkeypatch):
    monkeypatch.setattr(jax.stages.Lowered, "compile", _refuse)


@pytest.fixture
def no_model_loading(monkeypatch, no_compile):
    import ipadapter_jax.train.setup as setup

    monkeypatch.setattr(setup, "load_frozen_models", _refuse)


def _with(config, **values):
    for key, value in values.items():
        node = config
        *parents, leaf = key.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


CONFIG_ONLY = {
    "unknown_key": (dict(optimizer__learnig_rate=1e-3), ConfigError,
                    r"config\.optimizer\.learnig_rate \(did you mean config\.optimizer\.learning_rate\?\)"),
    "unknown_section": (dict(optimiser={"learning_rate": 1e-3}), ConfigError, r"config\.optimiser"),
    "negative_learning_rate": (dict(optimizer__learning_rate=-1e-4), ConfigError,
                               r"optimizer\.learning_rate=-0\.0001 must not be negative"),
    "resolution_not_a_multiple_of_8": (dict(data__resolution=60), ConfigError,
                                       r"data\.resolution=60 must be a multiple of 8"),
    "negative_max_nonfinite_steps": (dict(optimizer__max_nonfinite_steps=-1), ConfigError,
                                     r"optimizer\.max_nonfinite_steps=-1 must not be negative"),
    "mesh_larger_than_the_devices": (dict(mesh__data=2), ConfigError,
                                     r"mesh data=2 x fsdp=1 = 2 devices, but 1 are available"),
    "fsdp_not_dividing_the_devices": (dict(mesh__fsdp=2), ConfigError, r"mesh\.fsdp=2 does not divide the 1 devices"),
    "shard_glob_matching_nothing": (dict(data__shards="/nonexistent/ipadapter_jax/shards-*.tar"), ShardSpecError,
                                    r"shard glob '/nonexistent/ipadapter_jax/shards-\*\.tar' matched no files"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ONLY))
def test_config_error_comes_before_loading_and_compiling(case, world, tmp_path, no_model_loading):
    values, error, pattern = CONFIG_ONLY[case]
    config = _with(tiny_config(world), **values)
    with pytest.raises(error, match=pattern):
        main(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture(scope="module")
def coarse_vae_model(world, tmp_path_factory):
    """The tiny world's model with a VAE that downsamples by 16 instead of 8."""
    import torch
    from diffusers import AutoencoderKL

    folder = tmp_path_factory.mktemp("vae16") / "model"
    shutil.copytree(world["model"], folder)
    shutil.rmtree(folder / "vae")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 5,
                  up_block_types=("UpDecoderBlock2D",) * 5, layers_per_block=1, latent_channels=4,
                  norm_num_groups=8).save_pretrained(folder / "vae")
    return folder


@pytest.fixture(scope="module")
def plus_adapter_file(world, tmp_path_factory):
    """A Plus adapter that fits the tiny world's UNet (a plain one is what the config asks for)."""
    from ipadapter_jax.models.adapter import new_ip_adapter
    from ipadapter_jax.models.image_projection import ProjectionConfig
    from ipadapter_jax.weights.ip_adapter_file import save_ip_adapter
    from ipadapter_jax.weights.load_unet import load_unet

    _, params, unet_config = load_unet(f"{world['model']}/unet")
    projection = ProjectionConfig("plus", embed_dim=32, cross_attention_dim=unet_config.cross_attention_dim,
                                  num_tokens=4, hidden_dim=64, depth=1, heads=1, dim_head=64)
    path = tmp_path_factory.mktemp("plus") / "plus.safetensors"
    save_ip_adapter(new_ip_adapter(unet_config, params, projection, jax.random.key(0)), path)
    return path


def test_resolution_not_a_multiple_of_the_models_vae_factor(world, coarse_vae_model, tmp_path, no_compile):
    config = _with(tiny_config(world), model__model_dir=str(coarse_vae_model), data__resolution=72)
    with pytest.raises(ValueError, match=r"data\.resolution=72 is not a multiple of the VAE's downsampling factor 16"):
        main(config, tmp_path / "run")


def test_fine_tuning_from_an_adapter_of_another_variant(world, plus_adapter_file, tmp_path, no_compile):
    config = _with(tiny_config(world), adapter__init_from=str(plus_adapter_file))
    with pytest.raises(ValueError, match=r"(?s)projection ProjectionConfig\(variant='plus'.*asks for "
                                         r"ProjectionConfig\(variant='plain'"):
        main(config, tmp_path / "run")


@pytest.mark.parametrize("values, error, pattern", [
    (dict(adapter__init_from="/nonexistent/ip_adapter.safetensors"), WeightFileError,
     r"/nonexistent/ip_adapter\.safetensors: no such file"),
    (dict(model__model_dir="/nonexistent/model"), WeightFileError, r"model_dir /nonexistent/model: no such folder"),
], ids=["init_from_missing", "model_dir_missing"])
def test_missing_files_are_reported_before_compiling(values, error, pattern, world, tmp_path, no_compile):
    with pytest.raises(error, match=pattern):
        main(_with(tiny_config(world), **values), tmp_path / "run")


# ------------------------------------------------------------------------------ 4 devices, subprocess
# Runs main() on several configs in a process with 4 CPU devices and compilation refused; prints one JSON
# line per config: the exception's type and message.
FOUR_DEVICE_SCRIPT = """
import json, sys
import jax
from train_support import tiny_config
from ipadapter_jax.train import main
def refuse(*a, **k):
    raise AssertionError("compiled")
jax.stages.Lowered.compile = refuse
world = json.loads(sys.argv[1])
for name, values in json.loads(sys.argv[2]).items():
    config = tiny_config(world)
    for key, value in values.items():
        node = config
        *parents, leaf = key.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    try:
        main(config, sys.argv[3] + "/" + name)
        print(json.dumps({"case": name, "error": None, "message": ""}), flush=True)
    except BaseException as exc:
        print(json.dumps({"case": name, "error": type(exc).__name__, "message": str(exc)}), flush=True)
"""

FOUR_DEVICES = {
    "batch_not_divisible_by_data_parallel": (
        dict(batch_size=6), "ConfigError", r"batch_size=6 is not divisible by the data-parallel size data x fsdp = 4"),
    "micro_batch_not_divisible": (dict(batch_size=8, optimizer__grad_accum_steps=4), "ConfigError",
                                  r"micro-batch batch_size / grad_accum_steps = 2 is not divisible by the "
                                  r"data-parallel size 4"),
    "mesh_smaller_than_the_devices": (dict(mesh__data=2), "ConfigError",
                                      r"mesh data=2 x fsdp=1 = 2 devices, but 4 are available"),
    "fsdp_not_dividing_the_devices": (dict(mesh__fsdp=3), "ConfigError", r"mesh\.fsdp=3 does not divide the 4 devices"),
    "every_problem_at_once": (dict(batch_size=7, mesh__data=3), "ConfigError",
                              r"(?s)mesh data=3 x fsdp=1 = 3 devices, but 4.*batch_size=7 is not divisible"),
}


@pytest.fixture(scope="module")
def four_device_results(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("four_devices")
    cases = {name: values for name, (values, _, _) in FOUR_DEVICES.items()}
    proc = subprocess.run([sys.executable, "-c", FOUR_DEVICE_SCRIPT, json.dumps(world), json.dumps(cases), str(out)],
                          cwd=str(REPO / "tests"), env=subprocess_env(world, devices=4), capture_output=True,
                          text=True, timeout=600)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            results[record["case"]] = record
    assert len(results) == len(cases), proc.stdout[-2000:] + proc.stderr[-3000:]
    return results


@pytest.mark.parametrize("case", sorted(FOUR_DEVICES))
def test_batch_and_mesh_errors_on_four_devices(case, four_device_results):
    _, error, pattern = FOUR_DEVICES[case]
    result = four_device_results[case]
    assert result["error"] == error and re.search(pattern, result["message"]), result


# ----------------------------------------------------------------------------------------------- CLI
# Compiling fails loudly in train.py's process too.
REFUSE_COMPILE = """
import jax
def refuse(*a, **k):
    raise AssertionError("compiled before the config error")
jax.stages.Lowered.compile = refuse
"""


@pytest.mark.parametrize("flag, pattern", [
    ("--config.optimizer.learnig_rate=0.1", r"learnig_rate"),
    ("--config.optimizer.learning_rate=-0.1", r"optimizer\.learning_rate=-0\.1 must not be negative"),
])
def test_train_py_reports_config_errors_and_exits_nonzero(world, tmp_path, flag, pattern):
    workdir = tmp_path / "run"
    proc = start_faulty_train(world, tiny_config(world), workdir, patch=REFUSE_COMPILE, extra=(flag,))
    assert proc.wait(300) != 0
    output = output_of(workdir)
    assert re.search(pattern, output) and "compiled before the config error" not in output, output[-3000:]
    assert not (workdir / "checkpoints").exists()

"""The training config: every shipped config parses with every field set and commented, and impossible
values fail before anything is loaded or compiled, with messages that name the key."""

from __future__ import annotations

import re

import pytest

from train_support import REPO
from configs import sd15, sd15_plus, sdxl, tiny
from ipadapter_jax.tools.config_reference import read_fields
from ipadapter_jax.train.config import ConfigError, TrainConfig, check_against_devices

CONFIGS = {"tiny": tiny, "sd15": sd15, "sd15_plus": sd15_plus, "sdxl": sdxl}


def _leaves(node, prefix=""):
    out = []
    for key, value in node.items():
        if hasattr(value, "items"):
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append(prefix + key)
    return out


def _dataclass_leaves(cfg, prefix=""):
    import dataclasses

    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out += _dataclass_leaves(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_configs_set_and_comment_every_field(name):
    module = CONFIGS[name]
    config = TrainConfig.from_config_dict(module.get_config())
    assert sorted(_leaves(module.get_config())) == sorted(_dataclass_leaves(config))
    # Every field is assigned, with its comment, in the config or (for the configs built on sd15.py) its base.
    fields = read_fields(REPO / "configs" / f"{name}.py")
    assert len(fields) == len(_dataclass_leaves(config))
    uncommented = [f"{f.section}.{f.name}" for f in fields if not f.comment]
    assert not uncommented, f"configs/{name}.py: fields without a comment: {uncommented}"
    assert "Usage: python train.py --config configs/" in module.__doc__
    assert TrainConfig.from_config_dict(config.to_dict()) == config  # the JSON saved in checkpoints reads back


def test_dataclass_defaults_are_the_base_config():
    """``TrainConfig()`` is ``configs/sd15.py``: a config that leaves a field out gets the base's value."""
    assert TrainConfig() == TrainConfig.from_config_dict(sd15.get_config())


@pytest.mark.parametrize("name", ["sd15_plus", "sdxl", "tiny"])
def test_configs_built_on_the_base_assign_only_what_differs(name):
    """No whole-file copies: a derived config starts from ``sd15.get_config()`` and each of its assignments
    changes a value."""
    source = (REPO / "configs" / f"{name}.py").read_text()
    assert "c = sd15.get_config()" in source
    base, derived = _flat(sd15.get_config()), _flat(CONFIGS[name].get_config())
    assigned = re.findall(r"^\s+c\.([\w.]+) = ", source, re.M)
    assert assigned and all(base[key] != derived[key] for key in assigned), assigned


def _flat(node, prefix=""):
    out = {}
    for key, value in node.items():
        out.update(_flat(value, f"{prefix}{key}.") if hasattr(value, "items") else {prefix + key: value})
    return out


def test_unknown_key_is_rejected_with_a_suggestion():
    c = tiny.get_config()
    c.optimizer.learnig_rate = 1e-3
    with pytest.raises(ConfigError, match=r"config\.optimizer\.learnig_rate \(did you mean config\.optimizer\.learning_rate\?\)"):
        TrainConfig.from_config_dict(c)


@pytest.mark.parametrize("key, value, message", [
    ("optimizer.learning_rate", -1e-4, r"optimizer.learning_rate=-0.0001 must not be negative"),
    ("data.resolution", 100, r"data.resolution=100 must be a multiple of 8"),
    ("batch_size", 0, r"batch_size=0 must be positive"),
    ("data.drop_image", 1.5, r"data.drop_image=1.5 must be in \[0, 1\]"),
    ("adapter.variant", "full", r"adapter.variant='full' is not one of"),
    ("optimizer.grad_accum_steps", 3, r"batch_size=8 is not divisible by optimizer.grad_accum_steps=3"),
    ("model.remat", "yes", r"model.remat='yes' must be true or false"),
])
def test_invalid_values_are_reported(key, value, message):
    c = tiny.get_config().to_dict()
    section, _, leaf = key.rpartition(".")
    (c[section] if section else c)[leaf] = value
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_config_dict(c)


def test_every_problem_is_reported_at_once():
    c = tiny.get_config().to_dict()
    c["optimizer"]["learning_rate"] = -1.0
    c["data"]["resolution"] = 30
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_config_dict(c)
    assert "learning_rate" in str(info.value) and "resolution" in str(info.value)


def test_device_checks():
    config = TrainConfig.from_config_dict(tiny.get_config())
    assert check_against_devices(config, num_devices=8, process_count=1) == (8, 1)
    fsdp = TrainConfig.from_config_dict({**config.to_dict(), "mesh": {**config.to_dict()["mesh"], "fsdp": 2}})
    assert check_against_devices(fsdp, num_devices=8, process_count=2) == (4, 2)
    with pytest.raises(ConfigError, match=r"batch_size=12 is not divisible by the data-parallel size"):
        check_against_devices(TrainConfig.from_config_dict({**config.to_dict(), "batch_size": 12}), 8, 1)
    with pytest.raises(ConfigError, match=r"mesh data=2 x fsdp=1 = 2 devices, but 8 are available"):
        check_against_devices(TrainConfig.from_config_dict({**config.to_dict(), "mesh": {"data": 2}}), 8, 1)
    with pytest.raises(ConfigError, match=r"mesh.fsdp=3 does not divide the 8 devices"):
        check_against_devices(TrainConfig.from_config_dict({**config.to_dict(), "mesh": {"fsdp": 3}}), 8, 1)
    with pytest.raises(ConfigError, match=r"not divisible by the 3 processes"):
        check_against_devices(TrainConfig.from_config_dict({**config.to_dict(), "batch_size": 8}), 1, 3)

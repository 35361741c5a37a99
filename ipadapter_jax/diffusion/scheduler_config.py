"""Reading diffusers' ``scheduler_config.json`` dicts with the defaults of one diffusers scheduler class.

A saved scheduler config usually carries keys meant for other scheduler classes (SDXL's Euler config has
``skip_prk_steps`` and ``set_alpha_to_one``); like diffusers' ``from_config`` we ignore keys a sampler does
not read. Keys it does read but whose value we do not implement raise ``ValueError`` naming the key, the
value and what is supported, so a config never silently samples differently from diffusers.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any


def read_choice(config: Mapping[str, Any], key: str, default: Any, supported: Collection[Any], what: str) -> Any:
    """``config[key]`` (``default`` when absent), which must be one of ``supported``."""
    value = config.get(key, default)
    if value not in supported:
        raise ValueError(
            f"{what}: {key}={value!r} is not supported; supported values: {sorted(map(repr, supported))}"
        )
    return value


def read_number(config: Mapping[str, Any], key: str, default: float, what: str) -> float:
    """``config[key]`` (``default`` when absent or null) as a float."""
    value = config.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what}: {key}={value!r} must be a number")
    return float(value)


def read_int(config: Mapping[str, Any], key: str, default: int, what: str) -> int:
    """``config[key]`` (``default`` when absent or null) as an int."""
    value = config.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what}: {key}={value!r} must be an integer")
    return value


def read_flag(config: Mapping[str, Any], key: str, default: bool, what: str) -> bool:
    """``config[key]`` as a bool; diffusers writes ``null`` for some unset flags, which reads as False."""
    value = config.get(key, default)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValueError(f"{what}: {key}={value!r} must be true or false")
    return value


def reject_flags(config: Mapping[str, Any], keys: Collection[str], what: str) -> None:
    """Raise if any of these boolean options is switched on: we implement only their ``false`` setting."""
    for key in keys:
        if read_flag(config, key, False, what):
            raise ValueError(f"{what}: {key}=true is not supported (only false is implemented)")


def check_num_inference_steps(num_inference_steps: int, num_train_timesteps: int) -> None:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise ValueError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} must be in [1, num_train_timesteps={num_train_timesteps}]"
        )

"""IP-Adapter training: ``main(config, workdir)`` is what ``train.py`` runs; a notebook imports the same.

    from ipadapter_jax.train import main
    from configs import tiny
    result = main(tiny.get_config(), "workdir")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ipadapter_jax.train.config import ConfigError, TrainConfig
from ipadapter_jax.train.loop import TrainResult, train

__all__ = ["ConfigError", "TrainConfig", "TrainResult", "main", "train"]


def main(config: Any, workdir: str | Path = "workdir", resume: bool = True) -> TrainResult:
    """Validate ``config`` (a ``ConfigDict``, dict or ``TrainConfig``) and train in ``workdir``, resuming from
    its latest checkpoint unless ``resume=False`` (which refuses a workdir that already has checkpoints)."""
    if not isinstance(config, TrainConfig):
        config = TrainConfig.from_config_dict(config)
    return train(config, workdir, resume=resume)

"""IP-Adapter for Stable Diffusion in JAX/Flax.

Public entry points are imported lazily so that ``import ipadapter_jax`` stays light and never imports
torch (torch is only a reference for tests and an optional reader of legacy ``.bin`` files).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_ip_adapter": "ipadapter_jax.weights.ip_adapter_file",
    "save_ip_adapter": "ipadapter_jax.weights.ip_adapter_file",
    "IPAdapter": "ipadapter_jax.models.adapter",
    "IPAdapterPipeline": "ipadapter_jax.pipeline",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ipadapter_jax' has no attribute {name!r}")

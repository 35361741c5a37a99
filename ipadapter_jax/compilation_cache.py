"""JAX's persistent compilation cache, on by default for the command-line tools: a second run with the same
shapes loads the compiled programs instead of compiling again."""

from __future__ import annotations

import os
from pathlib import Path

import jax

DEFAULT_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ipadapter_jax" / "jax_cache"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turn the cache on at ``path`` (default ``~/.cache/ipadapter_jax/jax_cache``; the environment variable
    ``IPADAPTER_JAX_COMPILATION_CACHE`` overrides it, and setting it to ``off`` disables the cache)."""
    setting = os.environ.get("IPADAPTER_JAX_COMPILATION_CACHE")
    if setting == "off":
        return None
    folder = Path(path or setting or DEFAULT_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # Cache everything: even the small programs cost seconds to compile on a laptop CPU.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder

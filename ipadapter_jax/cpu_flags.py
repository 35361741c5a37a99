"""XLA flags for the CPU backend, kept in one place and applied only by the programs that opt in (the
command-line tools and benchmarks), never on ``import ipadapter_jax``.

XLA reads ``XLA_FLAGS`` once, when the first backend starts, so ``apply_cpu_flags`` must run before the
first JAX computation (importing jax is fine; computing is not). The defaults below are the ones measured
to help on CPU (see PERF_NOTES.md for the numbers); they do not change results beyond float rounding, and
they do nothing on TPU/GPU backends. Flags already in the environment and ``extra`` come after the defaults,
and for a flag given twice XLA keeps the last, so users can always override.
"""

from __future__ import annotations

import os
import sys

DEFAULT_CPU_FLAGS: tuple[str, ...] = ()


def cpu_xla_flags(extra: str = "", defaults: bool = True) -> str:
    """The ``XLA_FLAGS`` value: our defaults, then what the environment already has, then ``extra``."""
    parts = list(DEFAULT_CPU_FLAGS) if defaults else []
    parts += os.environ.get("XLA_FLAGS", "").split() + extra.split()
    return " ".join(parts)


def apply_cpu_flags(extra: str = "", defaults: bool = True) -> str:
    """Set ``XLA_FLAGS`` (see ``cpu_xla_flags``) and return it. Raises if a JAX backend already started,
    since XLA would silently ignore the new value."""
    if "jax" in sys.modules:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            raise RuntimeError("apply_cpu_flags() must run before the first JAX computation")
    os.environ["XLA_FLAGS"] = cpu_xla_flags(extra, defaults)
    return os.environ["XLA_FLAGS"]

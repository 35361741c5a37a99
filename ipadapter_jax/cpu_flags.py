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


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel; returns
    whether it could (glibc only; elsewhere nothing happens). Call it at the start of a long-running CPU
    process (the benchmarks do: it applies to both frameworks in the process alike); it changes no result.

    Why: XLA:CPU allocates each call's temporaries as one large block (hundreds of MB to GB at SD1.5 size),
    and torch each large tensor. glibc serves blocks above 32 MB with a fresh ``mmap`` and ``munmap``s them
    on free, and XLA's worker threads allocate from per-thread arenas that cannot hold such blocks at all,
    so every call touches its temporaries' pages for the first time: one page fault per 4 KB, ~1-1.5 us each
    in a KVM guest. Measured on one SD1.5 UNet forward (batch 2, 32x32 latents, 1 thread): 960k faults and
    ~1.4 s of a 5 s call. With one arena, no mmap for large blocks and no trimming of the heap's top, the
    second and later calls reuse the same pages (0 faults). The cost: the process keeps its peak heap.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # M_TRIM_THRESHOLD -1: glibc reads it as the largest size_t, i.e. never trim.
    return all(mallopt(param, value) == 1 for param, value in
               ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))

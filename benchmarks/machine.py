"""One line each about the machine and the library versions a benchmark ran with, for BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version


def cpu_model() -> str:
    """``model name`` from /proc/cpuinfo (what lscpu shows), else the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(cpus: list[int], xla_flags: str, load_before: str) -> str:
    return (f"machine: {cpu_model()}, {os.cpu_count()} cores; {len(cpus)} threads (CPUs {cpus}) for torch and "
            f"XLA; XLA_FLAGS={xla_flags!r}; load average before {load_before}, after {os.getloadavg()[0]:.1f}")


def versions_line() -> str:
    found = []
    for name in ("jax", "jaxlib", "flax", "torch", "diffusers", "transformers"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return "versions: " + ", ".join(found) + f"; Python {platform.python_version()}"

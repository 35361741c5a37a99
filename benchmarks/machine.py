"""What the benchmarks share: one line each about the machine and the library versions they ran with (for
BENCHMARKS.md), and torch's OpenMP wait policy."""

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


def set_torch_wait_policy(spin: bool) -> None:
    """Unless ``spin``, make torch's OpenMP threads sleep rather than spin while waiting for work
    (``OMP_WAIT_POLICY=PASSIVE``; read when torch starts OpenMP, so call this before importing torch). On a
    machine shared with other jobs, spinning threads burn the time slices the working thread needs: measured
    on this 2-core machine at load ~6, 2 threads, the PyTorch train step ran at 1.1 images/s spinning and
    6.0 passive. With one thread there is no one to wait for and it changes nothing. A value already in the
    environment wins."""
    if not spin:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def machine_line(cpus: list[int], xla_flags: str, load_before: str) -> str:
    return (f"machine: {cpu_model()}, {os.cpu_count()} cores; {len(cpus)} threads (CPUs {cpus}) for torch and "
            f"XLA; XLA_FLAGS={xla_flags!r}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; "
            f"load average before {load_before}, after {os.getloadavg()[0]:.1f}")


def versions_line() -> str:
    found = []
    for name in ("jax", "jaxlib", "flax", "torch", "diffusers", "transformers"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return "versions: " + ", ".join(found) + f"; Python {platform.python_version()}"

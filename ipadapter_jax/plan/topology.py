"""Cloud TPU slice names (``v5e-8``, ``v4-32``, ``v5p-8``, ``v6e-256`` ...) -> compile-only devices and the
per-chip figures a plan is measured against.

``jax.experimental.topologies.get_topology_desc`` (with libtpu installed: ``pip install 'jax[tpu]'``) builds
devices of a TPU slice that exist only for compilation: ``jax.jit(...).lower(...).compile()`` on a mesh of
them produces the real TPU program, its memory use and XLA's cost model, on a machine without a TPU.

Naming, as Cloud TPU writes it: v4 and v5p count TensorCores (two per chip, fused into one JAX device by
megacore), so ``v4-8`` and ``v5p-8`` are 4 chips; v5e and v6e count chips (one core each), so ``v5e-8`` is 8.
``v5litepod-N`` is ``v5e-N``.
"""

from __future__ import annotations

import dataclasses
import os
import re

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Published per-chip figures (Cloud TPU system architecture pages).

    hbm_bytes: HBM capacity. peak_bf16_flops: dense bf16 matmul peak, FLOP/s. hbm_bandwidth: bytes/s.
    """

    generation: str
    hbm_bytes: int
    peak_bf16_flops: float
    hbm_bandwidth: float
    megacore: bool


CHIPS = {
    "v4": ChipSpec("v4", 32 * GIB, 275e12, 1228e9, True),
    "v5e": ChipSpec("v5e", 16 * GIB, 197e12, 819e9, False),
    "v5p": ChipSpec("v5p", 95 * GIB, 459e12, 2765e9, True),
    "v6e": ChipSpec("v6e", 32 * GIB, 918e12, 1640e9, False),
}

# The name libtpu's topology parser knows each generation by.
_LIBTPU_NAMES = {"v4": "v4", "v5e": "v5e", "v5p": "v5p", "v6e": "v6e"}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}

# Chips -> physical chip grid of the standard slice shapes (x, y[, z]).
_GRID_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_GRID_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
            256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A parsed slice name: ``name`` as given, ``chip`` figures, ``num_chips``, the chip ``grid`` and the
    arguments ``get_topology_desc`` takes for it."""

    name: str
    chip: ChipSpec
    num_chips: int
    grid: tuple[int, ...]

    @property
    def libtpu_name(self) -> str:
        return f"{_LIBTPU_NAMES[self.chip.generation]}:{'x'.join(map(str, self.grid))}"

    def topology_kwargs(self) -> dict:
        # A full torus only where the slice is a whole cube/pod axis; it changes collective costs only.
        if len(self.grid) == 3:
            wrap = tuple(n >= 4 for n in self.grid) if min(self.grid) >= 4 else (False, False, False)
        else:
            wrap = (self.grid[0] >= 16, self.grid[1] >= 16, False)
        host = (2, 2, 1) if self.num_chips >= 4 else (1, 1, 1)
        return {"chip_config_name": "megacore" if self.chip.megacore else "default",
                "chips_per_host_bounds": host, "num_slices": 1, "wrap": wrap}


def parse_topology(name: str) -> Topology:
    """``"v5e-8"`` -> ``Topology``; raises ``ValueError`` listing the known shapes for anything else."""
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
    if not match:
        raise ValueError(f"TPU topology {name!r}: expected a Cloud TPU name like v5e-8, v4-32, v5p-8, v6e-256")
    generation = _ALIASES.get(match.group(1), match.group(1))
    count = int(match.group(2))
    if generation not in CHIPS:
        raise ValueError(f"TPU topology {name!r}: generation {match.group(1)} is not one of "
                         f"{sorted(CHIPS)} (or v5litepod)")
    chip = CHIPS[generation]
    if chip.megacore:
        chips, grids = count // 2, _GRID_3D
        ok = count % 2 == 0 and chips in grids
    else:
        chips, grids = count, _GRID_2D
        ok = chips in grids
    if not ok:
        known = sorted(2 * n for n in grids) if chip.megacore else sorted(grids)
        raise ValueError(f"TPU topology {name!r}: {generation} slices known here are "
                         f"{', '.join(f'{generation}-{n}' for n in known)}")
    return Topology(name, chip, chips, grids[chips])


def compile_only_devices(topology: Topology) -> list:
    """The slice's devices, for compilation only (needs libtpu; no TPU). One device per chip."""
    try:
        import libtpu  # noqa: F401  (jax finds the TPU compiler through this package)
    except ImportError as e:
        raise RuntimeError("compiling for a TPU topology needs libtpu: pip install 'jax[tpu]' "
                           "(or ipadapter-jax[tpu])") from e
    from jax.experimental import topologies

    # libtpu guards real TPUs with a machine-wide lock file; compile-only devices touch no TPU, so several
    # plans (or a plan beside a TPU job) may run at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    desc = topologies.get_topology_desc(topology.libtpu_name, "tpu", **topology.topology_kwargs())
    devices = list(desc.devices)
    if len(devices) != topology.num_chips:
        raise RuntimeError(f"{topology.name}: libtpu gave {len(devices)} devices for {topology.num_chips} chips")
    return devices

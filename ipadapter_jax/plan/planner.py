"""``plan(config, topology)``: compile a config's training step (or sampler) for a TPU slice on a machine without
a TPU and read what the compiler expects (``figures``); ``python -m ipadapter_jax.plan`` is its command line.

Weights are never read: the models are built from their configs (``reference_models``) with abstract
``ShapeDtypeStruct`` weights. Topology ``cpu-N`` compiles the same program for N local CPU devices instead
(with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``): memory and FLOPs only, no TPU timings.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ipadapter_jax.atomic_files import write_atomic


def _devices(topology_name: str):
    """``(Topology, devices, device_kind)``; ``cpu-N``: N local CPU devices with the host's memory as 'HBM'."""
    import jax

    from ipadapter_jax.plan.topology import ChipSpec, Topology, compile_only_devices, parse_topology

    if topology_name.startswith("cpu-"):
        n = int(topology_name.split("-", 1)[1])
        devices = jax.devices("cpu")
        if len(devices) < n:
            raise ValueError(f"{topology_name}: only {len(devices)} CPU devices; set "
                             f"XLA_FLAGS=--xla_force_host_platform_device_count={n}")
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        chip = ChipSpec("cpu", memory, 0.0, 0.0, False)
        return Topology(topology_name, chip, n, (n,)), devices[:n], "cpu"
    topology = parse_topology(topology_name)
    devices = compile_only_devices(topology)
    return topology, devices, devices[0].device_kind


def plan(config: Any, topology_name: str, what: str = "train", latents: str = "online", base: str = "auto",
         sample_batch: int = 0, with_model_flops: bool = True, log=print, hlo_path: str = ""
         ) -> tuple[Any, Any]:
    """Compile and measure. ``config``: a ConfigDict / dict / ``TrainConfig``. Returns ``(PlanFigures,
    Program)``; ``log`` gets progress lines; ``hlo_path``: where to write the compiled HLO text."""
    from ipadapter_jax.plan.figures import add_repeats, figures_from_compiled
    from ipadapter_jax.plan.programs import sample_program, train_program
    from ipadapter_jax.plan.reference_models import guess_base, model_configs
    from ipadapter_jax.train.config import TrainConfig

    if not isinstance(config, TrainConfig):
        config = TrainConfig.from_config_dict(config)
    topology, devices, kind = _devices(topology_name)
    base = guess_base(config.model.model_dir) if base == "auto" else base
    configs, source = model_configs(base, config.model.model_dir, config.model.image_encoder_dir)
    log(f"base model {base}: {source}; no weights read (abstract ShapeDtypeStruct params)")
    if what == "train":
        program = train_program(config, devices, configs, latents)
    else:
        program = sample_program(config, devices, configs, sample_batch or topology.num_chips)
    for line in program.description:
        log(line)
    flops = None
    if with_model_flops:
        # Before the long compile: the model count lowers the program again (XLA attention, for CPU), and
        # an error there should not cost a finished compile.
        with program.model_tracing():
            flops = program.model_flops()
    start = time.time()
    compiled = program.lower().compile()
    log(f"compiled for {topology.name} ({topology.num_chips} x {kind}) in {time.time() - start:.0f} s")
    if hlo_path:
        write_atomic(hlo_path, compiled.as_text())
    figures = figures_from_compiled(compiled, topology, kind, program.images_per_step, flops)
    if program.repeat_count:
        with program.tracing():
            body = program.repeat_jitted.lower(*program.repeat_args).compile()
        figures = add_repeats(figures, figures_from_compiled(body, topology, kind, 0), program.repeat_count)
        log(f"loop body compiled on its own; {program.repeat_count} more iterations added to time and FLOPs")
    return figures, program


def source_revision() -> str:
    """The git commit of the code that made a plan (``+dirty`` with uncommitted changes to the library or the
    configs), or ``unknown`` outside a checkout: a plan row is only worth its command if today's code still
    makes it. Read before compiling, so edits made during a long compile do not mislabel it."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "ipadapter_jax",
                                "configs"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")

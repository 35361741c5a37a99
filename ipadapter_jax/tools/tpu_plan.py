"""Compile a config's training step (or sampler) for a TPU slice on a machine without a TPU, and print what the
compiler expects: per-chip HBM use against capacity, FLOPs, step time, images/s per chip and MFU.

    pip install '.[tpu]'   # libtpu: the TPU compiler (no TPU needed)
    python -m ipadapter_jax.tools.tpu_plan --config configs/sd15.py --topology v5e-8 [--what train|sample] \
        [--latents online|cached] [--json plan.json] [--config.batch_size=64 --config.model.remat=True ...]

Weights are never read: the models are built from their configs (the config's ``model_dir`` when its
``*/config.json`` exist, else the published configs in ``ipadapter_jax/reference_configs``) with abstract
``ShapeDtypeStruct`` weights. ``--topology cpu-N`` compiles the same program for N local CPU devices instead
(with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``): memory and FLOPs only, no TPU timings.
All figures are compiler estimates (see ``plan_figures``).

Unlike the other CLIs this one leaves JAX's persistent compilation cache off: a program compiled for
compile-only TPU devices cannot be loaded back without a TPU client (jax warns and compiles again), so the
cache would only fill the disk.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# Planning compiles for compile-only TPU devices; the local backend only has to be the CPU. (Without this, a
# machine with libtpu but no TPU spends seconds failing to open one.)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("topology", "v5e-8", "Cloud TPU slice name (v4-8, v5e-8, v5e-256, v5p-8, v6e-8, ...) or "
                    "cpu-N for N local CPU devices")
flags.DEFINE_enum("what", "train", ["train", "sample"], "the training step or the sampler (validation grid "
                  "settings of the config: steps, guidance; --sample_batch images)")
flags.DEFINE_enum("latents", "online", ["online", "cached"], "train: frozen encoders in the step (online) or "
                  "their outputs read from a latent cache (cached: data.cache_latents, tools.cache_latents)")
flags.DEFINE_enum("base", "auto", ["auto", "sd15", "sdxl"], "base model architecture when model_dir holds no "
                  "configs (auto: from model_dir's name)")
flags.DEFINE_integer("sample_batch", 0, "sample: images per call (global); 0 = one per chip")
flags.DEFINE_bool("model_flops", True, "count model FLOPs (no remat, XLA attention) for MFU: one extra "
                  "CPU lowering")
flags.DEFINE_string("json", "", "also write the figures to this JSON file")
flags.DEFINE_string("hlo", "", "also write the compiled per-chip HLO here (for tools.plan_breakdown)")


def _devices(topology_name: str):
    """``(Topology, devices, device_kind)``; ``cpu-N``: N local CPU devices with the host's memory as 'HBM'."""
    import jax

    from ipadapter_jax.tools.tpu_topology import ChipSpec, Topology, compile_only_devices, parse_topology

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
    from ipadapter_jax.tools.plan_figures import add_repeats, figures_from_compiled
    from ipadapter_jax.tools.reference_models import guess_base, model_configs
    from ipadapter_jax.train.config import TrainConfig

    if not isinstance(config, TrainConfig):
        config = TrainConfig.from_config_dict(config)
    topology, devices, kind = _devices(topology_name)
    base = guess_base(config.model.model_dir) if base == "auto" else base
    configs, source = model_configs(base, config.model.model_dir, config.model.image_encoder_dir)
    log(f"base model {base}: {source}; no weights read (abstract ShapeDtypeStruct params)")
    if what == "train":
        from ipadapter_jax.tools.train_program import train_program

        program = train_program(config, devices, configs, latents)
    else:
        from ipadapter_jax.tools.sample_program import sample_program

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
        Path(hlo_path).write_text(compiled.as_text())
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
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "ipadapter_jax", "configs"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def main(argv):
    del argv
    from ipadapter_jax.tools.plan_figures import format_figures

    flags_ = flags.FLAGS
    if flags_.config is None:
        from ipadapter_jax.cli_errors import UserError

        # A UserError, not absl's UsageError: app.run would print the whole usage text around it.
        raise UserError("--config is required (e.g. --config configs/sd15.py)")
    revision = source_revision()
    figures, program = plan(flags_.config, flags_.topology, flags_.what, flags_.latents, flags_.base,
                            flags_.sample_batch, flags_.model_flops, hlo_path=flags_.hlo)
    for line in format_figures(figures):
        print(line)
    if flags_.json:
        record = {"command": " ".join(["python -m ipadapter_jax.tools.tpu_plan"] + sys.argv[1:]),
                  "revision": revision,
                  "what": flags_.what, "latents": flags_.latents if flags_.what == "train" else None,
                  "program": program.description, "mesh": program.mesh_shape, **figures.to_json()}
        Path(flags_.json).write_text(json.dumps(record, indent=2))
        print(f"wrote {flags_.json}")


if __name__ == "__main__":
    from ipadapter_jax.cli_errors import run_absl_cli

    run_absl_cli("python -m ipadapter_jax.tools.tpu_plan", main)  # one-line errors

"""Compile a config's training step (or sampler) for a TPU slice on a machine without a TPU, and print what the
compiler expects: per-chip HBM use against capacity, FLOPs, step time, images/s per chip and MFU.

    pip install '.[tpu]'   # libtpu: the TPU compiler (no TPU needed)
    python -m ipadapter_jax.plan --config configs/sd15.py --topology v5e-8 [--what train|sample] \
        [--latents online|cached] [--json plan.json] [--config.batch_size=64 --config.model.remat=True ...]

``--topology cpu-N`` compiles for N local CPU devices instead (memory and FLOPs only); see ``planner``.
(``python -m ipadapter_jax.tools.tpu_plan`` is this command's old name, kept for one release.)

Unlike the other CLIs this one leaves JAX's persistent compilation cache off: a program compiled for
compile-only TPU devices cannot be loaded back without a TPU client (jax warns and compiles again), so the
cache would only fill the disk.
"""

from __future__ import annotations

import json
import os
import sys

# Planning compiles for compile-only TPU devices; the local backend only has to be the CPU. (Without this, a
# machine with libtpu but no TPU spends seconds failing to open one.)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

TOOL = "python -m ipadapter_jax.plan"

config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("topology", "v5e-8", "Cloud TPU slice name (v4-8, v5e-8, v5e-256, v5p-8, v6e-8, ...) or "
                    "cpu-N for N local CPU devices")
flags.DEFINE_enum("what", "train", ["train", "sample"], "the training step or the sampler (validation grid "
                  "settings of the config: steps, guidance; --sample_batch images)")
flags.DEFINE_enum("latents", "online", ["online", "cached"], "train: frozen encoders in the step (online) or "
                  "their outputs read from a latent cache (cached: data.cache_latents, python -m "
                  "ipadapter_jax.cache)")
flags.DEFINE_enum("base", "auto", ["auto", "sd15", "sdxl"], "base model architecture when model_dir holds no "
                  "configs (auto: from model_dir's name)")
flags.DEFINE_integer("sample_batch", 0, "sample: images per call (global); 0 = one per chip")
flags.DEFINE_bool("model_flops", True, "count model FLOPs (no remat, XLA attention) for MFU: one extra "
                  "CPU lowering")
flags.DEFINE_string("json", "", "also write the figures to this JSON file")
flags.DEFINE_string("hlo", "", "also write the compiled per-chip HLO here (for python -m "
                    "ipadapter_jax.plan.breakdown)")


def main(argv):
    del argv
    from ipadapter_jax.atomic_files import write_atomic
    from ipadapter_jax.plan.figures import format_figures
    from ipadapter_jax.plan.planner import plan, source_revision

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
        record = {"command": " ".join([TOOL] + sys.argv[1:]), "revision": revision,
                  "what": flags_.what, "latents": flags_.latents if flags_.what == "train" else None,
                  "program": program.description, "mesh": program.mesh_shape, **figures.to_json()}
        write_atomic(flags_.json, json.dumps(record, indent=2))
        print(f"wrote {flags_.json}")


if __name__ == "__main__":
    from ipadapter_jax.cli_errors import run_absl_cli

    run_absl_cli(TOOL, main)  # one-line errors

"""Encode a training config's data once with the frozen VAE, text encoder(s) and CLIP image encoder, for runs
with ``data.cache_latents`` (the step then runs only the UNet and the adapter).

    python -m ipadapter_jax.cache --config configs/sd15.py --out DIR [--config.key=value ...] \
        [--batch_size 64] [--storage_dtype float16] [--process_index I --process_count N]

Then train with ``--config.data.cache_latents=True --config.data.cache_dir=DIR`` (same model, resolution and
adapter variant: the run checks DIR's manifest). Several hosts (or several invocations on one) each write a
share: give each its ``--process_index`` of ``--process_count`` (default: ``jax.process_index()`` /
``jax.process_count()``, so ``--distributed`` on a TPU pod splits the work by itself). Re-running with the same
arguments reuses the shards already written. The format is described in ``ipadapter_jax.cache.format``
(``python -m ipadapter_jax.tools.cache_latents`` is this command's old name, kept for one release).
"""

from __future__ import annotations

import json
import logging
import sys

from absl import flags
from ml_collections import config_flags

from ipadapter_jax.cache.format import WRITE_COMMAND

config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("out", None, "cache folder (local path or mounted bucket)")
flags.DEFINE_integer("batch_size", 0, "examples per encoder call on this host; 0: the config's batch_size")
flags.DEFINE_enum("storage_dtype", "float32", ["float32", "float16"], "dtype of the stored float tensors")
flags.DEFINE_integer("process_index", -1, "this writer's share (-1: jax.process_index())")
flags.DEFINE_integer("process_count", -1, "number of writers (-1: jax.process_count())")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() first (TPU pods, SLURM)")
flags.mark_flags_as_required(["config", "out"])


def run(argv) -> None:
    del argv
    import jax

    f = flags.FLAGS
    if f.distributed:
        jax.distributed.initialize()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("absl").setLevel(logging.WARNING)
    from ipadapter_jax.cache.write import write_latent_cache
    from ipadapter_jax.compilation_cache import enable_compilation_cache
    from ipadapter_jax.train.config import TrainConfig

    enable_compilation_cache()
    config = TrainConfig.from_config_dict(f.config)
    summary = write_latent_cache(
        config, f.out, batch_size=f.batch_size, storage_dtype=f.storage_dtype,
        process_index=None if f.process_index < 0 else f.process_index,
        process_count=None if f.process_count < 0 else f.process_count)
    print(f"latent cache {summary.out_dir}: {len(summary.shards_written)} shard(s) written, "
          f"{len(summary.shards_reused)} reused; samples {json.dumps(summary.counters)}", flush=True)


if __name__ == "__main__":
    from ipadapter_jax.cli_errors import run_absl_cli

    run_absl_cli(WRITE_COMMAND, run)  # one-line errors

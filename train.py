"""Train an IP-Adapter.

    python train.py --config configs/<name>.py --workdir DIR [--config.key=value ...] [--noresume]

With no arguments it trains ``configs/tiny.py`` (the shipped toy world: a tiny trained SD-style base on
coloured-shape shards, CPU-friendly) into ``./workdir``. A workdir that holds a checkpoint is resumed from its latest one. The library code is
``ipadapter_jax.train``; a notebook can call ``ipadapter_jax.train.main(config, workdir)`` directly.
"""

import logging
import os
import sys

from absl import flags
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))


def define_flags():
    config_flags.DEFINE_config_file("config", os.path.join(_HERE, "configs", "tiny.py"), "training config file",
                                    lock_config=True)
    flags.DEFINE_string("workdir", "workdir", "checkpoints, metrics.jsonl, TensorBoard, ip_adapter.safetensors: "
                        "a local folder or a gs:// URL")
    flags.DEFINE_bool("resume", True, "resume from the workdir's latest checkpoint (--noresume refuses a workdir "
                      "that has one)")
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() with auto-detection (TPU pods, SLURM)")
    flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for multi-process runs outside TPU pods")
    flags.DEFINE_integer("num_processes", 0, "number of processes (with --coordinator_address)")
    flags.DEFINE_integer("process_id", -1, "this process's index (with --coordinator_address)")


def run(argv):
    del argv
    import jax

    flags_ = flags.FLAGS
    if flags_.coordinator_address:
        jax.distributed.initialize(flags_.coordinator_address, num_processes=flags_.num_processes,
                                   process_id=flags_.process_id)
    elif flags_.distributed:
        jax.distributed.initialize()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes at INFO
    from ipadapter_jax.compilation_cache import enable_compilation_cache
    from ipadapter_jax.train import main

    enable_compilation_cache()  # a rerun (or resume) loads the compiled step instead of compiling it again

    result = main(flags_.config, flags_.workdir, resume=flags_.resume)
    print(f"stopped at step {result.step}{' (preempted)' if result.preempted else ''}; "
          f"adapter: {os.path.join(flags_.workdir, 'ip_adapter.safetensors')}", flush=True)


if __name__ == "__main__":
    from ipadapter_jax.cli_errors import run_absl_cli

    # One-line errors (exit 2 for a user mistake, 1 otherwise; --debug for the traceback). Flags are defined
    # inside the wrapper: the config file loads (and its overrides apply) as they are.
    run_absl_cli("train.py", run, define_flags=define_flags)
else:
    define_flags()  # imported (tests parse the README's commands with these flags)

"""Everything the loop needs, built in the order that surfaces errors earliest: config against the devices,
mesh, frozen models (placed sharded), state shapes and shardings, and the train step compiled ahead of time
on ``ShapeDtypeStruct`` inputs, before any checkpoint is restored or any data is read.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding

from ipadapter_jax.cache.batch import cached_frozen
from ipadapter_jax.cache.manifest import LatentCache, open_latent_cache
from ipadapter_jax.data.shards import check_local_shards_exist, expand_shard_spec, shards_for_process
from ipadapter_jax.models.image_projection import ProjectionConfig
from ipadapter_jax.toy.shapes_dataset import write_shape_shards
from ipadapter_jax.toy_assets import ASSETS
from ipadapter_jax.train.config import TrainConfig
from ipadapter_jax.train.frozen import FrozenModels, FrozenModules, image_encoder_folder, load_frozen_models
from ipadapter_jax.train.program import TrainProgram, build_train_program, train_mesh
from ipadapter_jax.train.sharding import logical_spec, put_host_tree, replicated
from ipadapter_jax.train.state import TrainState, cross_attention_kv
from ipadapter_jax.train.step import StepSettings, batch_keys
from ipadapter_jax.train.workdir_files import WorkdirFiles
from ipadapter_jax.weights.ip_adapter_file import load_ip_adapter
from ipadapter_jax.weights.remote_files import local_folder

logger = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class TrainingSetup:
    config: TrainConfig
    workdir: WorkdirFiles  # local or a URL: metrics, exports, validation grids and checkpoints go here
    mesh: Mesh
    model_dir: Path
    shards: Any  # the training shards: the config's (or the toy world's) spec, or the latent cache's URLs
    image_shards: str  # shards holding images (validation prompts): the config's / toy world's spec
    cache: LatentCache | None  # the opened latent cache when data.cache_latents
    frozen_models: FrozenModels
    frozen: dict  # frozen params on the mesh, compute dtype
    projection: ProjectionConfig
    program: TrainProgram  # the one train-step builder's output (what a TPU plan compiles for a slice)
    kv: dict  # cross-attention to_k/to_v kernels (host) for the paper init
    abstract_rng_data: jax.ShapeDtypeStruct
    compiled_step: Any

    @property
    def modules(self):
        return self.frozen_models.modules

    # The program's parts the loop reads, by their old names.
    @property
    def settings(self) -> StepSettings:
        return self.program.settings

    @property
    def tx(self) -> optax.GradientTransformation:
        return self.program.tx

    @property
    def lr_schedule(self) -> optax.Schedule:
        return self.program.lr_schedule

    @property
    def init_state(self):
        return self.program.init_state

    @property
    def abstract_state(self) -> TrainState:
        return self.program.abstract_state

    @property
    def batch_shardings(self) -> dict:
        return self.program.batch_shardings

    @property
    def replicated(self) -> NamedSharding:
        return replicated(self.mesh)


def model_and_shards(config: TrainConfig, workdir: Path) -> tuple[Path, str]:
    """The base model folder and the shard spec to train on: the config's, or where ``data.shards`` (and
    ``data.tfds_name``) are empty the toy world's shapes shards (``ipadapter_jax.toy.shapes_dataset``) in
    ``WORKDIR/toy_shards``. ``workdir`` is a local folder (a URL workdir passes its ``local_scratch``).
    Process 0 writes the shards; the others wait."""
    if not config.model.model_dir:
        raise ValueError(f"model.model_dir is empty: name a diffusers-layout base folder (the shipped toy base "
                         f"is {ASSETS / 'base'}, what configs/tiny.py trains)")
    # A gs:// (or other URL) model folder is copied into the local cache once, on every host.
    model_dir = local_folder(config.model.model_dir)
    if config.data.shards or config.data.tfds_name:  # a TFDS run reads no shards: none are written
        return model_dir, config.data.shards
    shards_dir = workdir / "toy_shards"
    if jax.process_index() == 0:
        write_shape_shards(shards_dir, seed=config.seed)
    wait_for_all_processes("toy_shards_written")
    # On every process: the shard spec (the shards themselves were written above and are reused).
    return model_dir, write_shape_shards(shards_dir, seed=config.seed)


def wait_for_all_processes(name: str, timeout_s: float = 3600) -> None:
    """A barrier on the coordination service, with a timeout long enough for a slow host (no-op for one)."""
    if jax.process_count() > 1:
        ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=int(timeout_s * 1000))


def projection_config(config: TrainConfig, modules: FrozenModules) -> ProjectionConfig:
    """The adapter's projection net for ``config.adapter`` on these models (input and output widths)."""
    a = config.adapter
    cross = modules.unet_config.cross_attention_dim
    if a.variant == "plain":
        return ProjectionConfig("plain", embed_dim=modules.image_embed_dim, cross_attention_dim=cross,
                                num_tokens=a.num_tokens)
    if a.dim_head != 64 or a.depth != 4:
        logger.warning("adapter.dim_head=%d, depth=%d: diffusers' loader assumes Plus adapters have 64-wide heads "
                       "and depth 4, so the exported file will load only in ipadapter_jax", a.dim_head, a.depth)
    return ProjectionConfig("plus", embed_dim=modules.image_hidden_dim, cross_attention_dim=cross,
                            num_tokens=a.num_tokens, hidden_dim=a.hidden_dim, depth=a.depth, heads=a.heads,
                            dim_head=a.dim_head, ff_mult=a.ff_mult)


def build_setup(config: TrainConfig, workdir: str | Path | WorkdirFiles) -> TrainingSetup:
    workdir = workdir if isinstance(workdir, WorkdirFiles) else WorkdirFiles(workdir)
    mesh = train_mesh(config, jax.devices(), jax.process_count())
    logger.info("mesh: data=%d x fsdp=%d over %d devices in %d processes", mesh.shape["data"], mesh.shape["fsdp"],
                jax.device_count(), jax.process_count())
    model_dir, image_shards = model_and_shards(config, workdir.local_scratch())
    if not config.data.cache_latents and not config.data.tfds_name:
        # The data is first read after compiling: a shard spec that matches nothing (or too few shards for the
        # processes) must fail now, not after minutes of loading and compiling.
        shards_for_process(image_shards)
        check_local_shards_exist(expand_shard_spec(image_shards))

    image_encoder_dir = image_encoder_folder(model_dir, config.model.image_encoder_dir)
    frozen_models = load_frozen_models(model_dir, image_encoder_dir, compute_dtype=config.model.compute_dtype,
                                       attention_implementation=config.model.attention_implementation,
                                       remat=config.model.remat, platform=mesh.devices.flat[0].platform)
    modules = frozen_models.modules
    if config.data.resolution % modules.latent_downsample:
        raise ValueError(f"data.resolution={config.data.resolution} is not a multiple of the VAE's downsampling "
                         f"factor {modules.latent_downsample}")
    cache, shards = None, image_shards
    if config.data.cache_latents:
        cache = open_latent_cache(config, model_dir, modules, image_encoder_dir)
        shards = cache.shards
        shards_for_process(shards)
    host_frozen = frozen_models.params_in(config.model.compute_dtype)
    if cache is not None:
        # The step needs only the UNet; validation (if on) still encodes its prompts and decodes its samples.
        host_frozen = cached_frozen(host_frozen, cache.uncond["image_features"],
                                    keep_encoders=bool(config.validation.every_steps))

    projection = projection_config(config, modules)
    init_adapter = load_ip_adapter(config.adapter.init_from) if config.adapter.init_from else None
    program = build_train_program(config, mesh, modules, host_frozen, projection, cached_latents=cache is not None,
                                  init_adapter=init_adapter)
    frozen = put_host_tree(host_frozen, program.frozen_shardings)
    _log_layout("frozen weights", host_frozen, program.frozen_shardings)
    del host_frozen
    compiled = program.compile()
    _log_memory(compiled)
    # Processes finish loading and compiling at different times (a compilation-cache hit on one, a miss on
    # another); the first collective after this would time out (gloo waits 30 s) if one were minutes late.
    wait_for_all_processes("setup_done")
    rep = replicated(mesh)
    rng_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    return TrainingSetup(
        config=config, workdir=workdir, mesh=mesh, model_dir=model_dir, shards=shards, image_shards=image_shards,
        cache=cache, frozen_models=frozen_models, frozen=frozen, projection=projection, program=program,
        kv=cross_attention_kv(modules.unet_config, frozen_models.host_params["unet"]),
        abstract_rng_data=jax.ShapeDtypeStruct(rng_data.shape, rng_data.dtype, sharding=rep),
        compiled_step=compiled,
    )


def batch_partition_spec(setup: TrainingSetup):
    return logical_spec(("batch",), setup.config.mesh)


def step_batch_keys(setup: TrainingSetup) -> tuple[str, ...]:
    return batch_keys(setup.modules, setup.settings.cached_latents)


def _log_layout(what: str, tree: Any, shardings: Any) -> None:
    sizes = [(x.size * x.dtype.itemsize, s.spec != jax.sharding.PartitionSpec())
             for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))]
    total = sum(n for n, _ in sizes)
    split = sum(n for n, sharded in sizes if sharded)
    logger.info("%s: %.1f MiB, %.0f%% of it split over fsdp", what, total / 2**20, 100 * split / max(total, 1))


def _log_memory(compiled) -> None:
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not every backend reports it
        return
    if stats is None:
        return
    gib = 1 / 2**30
    logger.info("train step memory per device: arguments %.2f GiB, outputs %.2f GiB, temporaries %.2f GiB",
                stats.argument_size_in_bytes * gib, stats.output_size_in_bytes * gib, stats.temp_size_in_bytes * gib)


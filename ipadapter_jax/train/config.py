"""The training configuration: typed, frozen dataclasses built from an ml_collections ``ConfigDict``.

Config files (``configs/*.py``) return a ``ConfigDict``; ``TrainConfig.from_config_dict`` turns it into these
dataclasses (whose defaults are ``configs/sd15.py``'s values, where each field is commented; a test keeps the
two equal), rejecting unknown keys (a typo must not silently train with a default) and impossible values
before anything is loaded or compiled. Checks that need the devices (mesh shape, batch divisibility) are in
``check_against_devices``, also called before compilation.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Mapping

from ipadapter_jax.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
LR_SCHEDULES = ("constant", "cosine", "linear")
ADAPTER_VARIANTS = ("plain", "plus")
SAMPLERS = ("ddim", "euler", "dpm++2m")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_dir: str = "models/stable-diffusion-v1-5"
    image_encoder_dir: str = "models/IP-Adapter/models/image_encoder"
    compute_dtype: str = "bfloat16"
    attention_implementation: str = "auto"  # auto: Pallas flash attention on TPU, XLA elsewhere
    remat: bool = False
    sample_posterior: bool = True


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    variant: str = "plain"
    num_tokens: int = 4
    init_from: str = ""
    hidden_dim: int = 768
    depth: int = 4
    heads: int = 12
    dim_head: int = 64
    ff_mult: int = 4


@dataclasses.dataclass(frozen=True)
class DataConfig:
    shards: str = "data/shards/{00000..00999}.tar"
    caption_field: str = ""
    resolution: int = 512
    random_crop: bool = False
    drop_text: float = 0.05
    drop_image: float = 0.05
    drop_both: float = 0.05
    shuffle_shards: bool = True
    decode_threads: int = 16
    prefetch_batches: int = 2
    cache_latents: bool = False
    cache_dir: str = ""
    tfds_name: str = ""
    tfds_split: str = "train"
    tfds_data_dir: str = ""
    tfds_image_key: str = "image"
    tfds_caption_key: str = "caption"


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: str = "constant"
    warmup_steps: int = 1000
    final_lr_fraction: float = 0.0
    grad_clip_norm: float = 1.0
    max_nonfinite_steps: int = 10
    grad_accum_steps: int = 1


@dataclasses.dataclass(frozen=True)
class LossConfig:
    noise_offset: float = 0.0
    min_snr_gamma: float = 0.0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    fsdp_min_size: int = 1 << 20
    logical_axis_rules: tuple[tuple[str, Any], ...] = (("batch", ("data", "fsdp")), ("fsdp", "fsdp"))


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 5000
    keep: int = 3
    async_save: bool = True
    export_dtype: str = "float16"


@dataclasses.dataclass(frozen=True)
class LogConfig:
    every_steps: int = 50
    progress_bar: bool = True
    tensorboard: bool = True


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    every_steps: int = 5000
    num_images: int = 4
    images: tuple[str, ...] = ()
    prompt: str = ""
    scales: tuple[float, ...] = (0.0, 0.5, 1.0)
    sampler: str = "ddim"
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    num_steps: int = 1_000_000
    batch_size: int = 64
    model: ModelConfig = ModelConfig()
    adapter: AdapterConfig = AdapterConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    loss: LossConfig = LossConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    validation: ValidationConfig = ValidationConfig()

    @classmethod
    def from_config_dict(cls, config: Any) -> "TrainConfig":
        """From an ml_collections ``ConfigDict`` (or a plain nested dict). Raises ``ConfigError`` naming every
        unknown key (with the closest valid name) and every invalid value."""
        raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        out = _build(cls, raw, "config")
        problems = out.problems()
        if problems:
            raise ConfigError("invalid training config:\n  " + "\n  ".join(problems))
        return out

    def to_dict(self) -> dict:
        """JSON-ready nested dict (tuples become lists); ``from_config_dict`` reads it back."""
        return _jsonable(dataclasses.asdict(self))

    def problems(self) -> list[str]:
        """Every value that cannot work, as messages; device-dependent checks are in ``check_against_devices``."""
        p = []
        positive = {"num_steps": self.num_steps, "batch_size": self.batch_size,
                    "data.resolution": self.data.resolution, "adapter.num_tokens": self.adapter.num_tokens,
                    "optimizer.grad_accum_steps": self.optimizer.grad_accum_steps, "mesh.fsdp": self.mesh.fsdp,
                    "checkpoint.every_steps": self.checkpoint.every_steps, "checkpoint.keep": self.checkpoint.keep,
                    "log.every_steps": self.log.every_steps}
        p += [f"{k}={v} must be positive" for k, v in positive.items() if v <= 0]
        non_negative = {"optimizer.learning_rate": self.optimizer.learning_rate,
                        "optimizer.weight_decay": self.optimizer.weight_decay,
                        "optimizer.warmup_steps": self.optimizer.warmup_steps,
                        "optimizer.grad_clip_norm": self.optimizer.grad_clip_norm,
                        "optimizer.max_nonfinite_steps": self.optimizer.max_nonfinite_steps,
                        "loss.noise_offset": self.loss.noise_offset, "loss.min_snr_gamma": self.loss.min_snr_gamma,
                        "validation.every_steps": self.validation.every_steps,
                        "data.decode_threads": self.data.decode_threads,
                        "data.prefetch_batches": self.data.prefetch_batches}
        p += [f"{k}={v} must not be negative" for k, v in non_negative.items() if v < 0]
        if self.data.resolution % 8:
            p.append(f"data.resolution={self.data.resolution} must be a multiple of 8 (the VAE downsamples by 8)")
        for name in ("drop_text", "drop_image", "drop_both"):
            rate = getattr(self.data, name)
            if not 0 <= rate <= 1:
                p.append(f"data.{name}={rate} must be in [0, 1]")
        if self.data.drop_text + self.data.drop_image + self.data.drop_both > 1:
            p.append("data.drop_text + drop_image + drop_both must not exceed 1")
        if self.batch_size % self.optimizer.grad_accum_steps:
            p.append(f"batch_size={self.batch_size} is not divisible by optimizer.grad_accum_steps="
                     f"{self.optimizer.grad_accum_steps}")
        if self.mesh.data == 0 or self.mesh.data < -1:
            p.append(f"mesh.data={self.mesh.data} must be positive, or -1 for all devices left after fsdp")
        choices = {"model.compute_dtype": (self.model.compute_dtype, COMPUTE_DTYPES),
                   "checkpoint.export_dtype": (self.checkpoint.export_dtype, ("float32", "float16", "bfloat16")),
                   "optimizer.schedule": (self.optimizer.schedule, LR_SCHEDULES),
                   "adapter.variant": (self.adapter.variant, ADAPTER_VARIANTS),
                   "validation.sampler": (self.validation.sampler, SAMPLERS),
                   "model.attention_implementation": (self.model.attention_implementation, ATTENTION_IMPLEMENTATIONS)}
        p += [f"{k}={v!r} is not one of {list(ok)}" for k, (v, ok) in choices.items() if v not in ok]
        if not 0 <= self.optimizer.final_lr_fraction <= 1:
            p.append(f"optimizer.final_lr_fraction={self.optimizer.final_lr_fraction} must be in [0, 1]")
        if self.optimizer.warmup_steps > self.num_steps:
            p.append(f"optimizer.warmup_steps={self.optimizer.warmup_steps} exceeds num_steps={self.num_steps}")
        if self.data.cache_latents and not self.data.cache_dir:
            p.append("data.cache_latents is on but data.cache_dir is empty: name the folder written by "
                     "python -m ipadapter_jax.cache")
        if self.data.tfds_name:
            if self.data.shards:
                p.append(f"data.shards={self.data.shards!r} and data.tfds_name={self.data.tfds_name!r} are both set: "
                         f"train from one source (set data.shards='' to read the TFDS dataset)")
            if self.data.cache_latents:
                p.append("data.cache_latents reads the latent cache, not data.tfds_name: turn one of them off")
            if not (self.data.tfds_split and self.data.tfds_image_key and self.data.tfds_caption_key):
                p.append("data.tfds_split, data.tfds_image_key and data.tfds_caption_key must not be empty")
            if self.validation.every_steps and not self.validation.images:
                p.append("validation takes its image prompts from webdataset shards, which a TFDS run does not "
                         "have: name image files in validation.images, or set validation.every_steps=0")
        if self.validation.every_steps and self.validation.num_images <= 0 and not self.validation.images:
            p.append("validation is on (validation.every_steps > 0) but validation.num_images is 0")
        return p


class ConfigError(ValueError):
    """The training config cannot work; the message lists every problem found."""


def resolve_mesh_shape(mesh: MeshConfig, num_devices: int) -> tuple[int, int]:
    """``(data, fsdp)`` with ``data=-1`` resolved to the devices left over by ``fsdp``."""
    if num_devices % mesh.fsdp:
        raise ConfigError(f"mesh.fsdp={mesh.fsdp} does not divide the {num_devices} devices")
    data = num_devices // mesh.fsdp if mesh.data == -1 else mesh.data
    return data, mesh.fsdp


def check_against_devices(config: TrainConfig, num_devices: int, process_count: int) -> tuple[int, int]:
    """The resolved mesh shape; raises ``ConfigError`` when the mesh, batch or process layout cannot work."""
    data, fsdp = resolve_mesh_shape(config.mesh, num_devices)
    problems = []
    if data * fsdp != num_devices:
        problems.append(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but {num_devices} are "
                        f"available; set mesh.data=-1 to use all of them")
    if config.batch_size % (data * fsdp):
        problems.append(f"batch_size={config.batch_size} is not divisible by the data-parallel size "
                        f"data x fsdp = {data * fsdp}")
    if config.batch_size % process_count:
        problems.append(f"batch_size={config.batch_size} is not divisible by the {process_count} processes")
    micro = config.batch_size // config.optimizer.grad_accum_steps
    if micro % (data * fsdp):
        problems.append(f"the micro-batch batch_size / grad_accum_steps = {micro} is not divisible by the "
                        f"data-parallel size {data * fsdp}")
    if problems:
        raise ConfigError("the training config does not fit the devices:\n  " + "\n  ".join(problems))
    return data, fsdp


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _build(cls, raw: Mapping[str, Any], where: str):
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a group of settings, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in raw if k not in fields]
    if unknown:
        lines = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(fields), n=1)
            lines.append(f"{where}.{key}" + (f" (did you mean {where}.{close[0]}?)" if close else ""))
        raise ConfigError(f"unknown config keys: {', '.join(lines)}; valid keys of {where}: {sorted(fields)}")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}={value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r} must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r} must be a string")
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r} must be a list")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        return tuple(_freeze(v) for v in value)
    return _freeze(value)


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value

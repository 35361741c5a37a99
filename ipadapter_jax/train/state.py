"""The trainable state (adapter params in float32 + optimizer state + step) and the optimizer.

Only the adapter is here: the frozen UNet/VAE/CLIP tree is a separate argument of the step and never enters
the optimizer. The state is born sharded: ``jax.eval_shape`` gives its structure, the shardings come from
that, and the init runs under ``jax.jit(..., out_shardings=...)`` so no device ever holds all of it.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ipadapter_jax.models.adapter import IPAdapter, check_adapter_fits, new_ip_adapter
from ipadapter_jax.models.image_projection import ProjectionConfig
from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.train.config import OptimizerConfig


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar (optimizer updates done); params: the adapter tree ``{"image_proj", "layers"}``
    (float32); opt_state: the optimizer's state for ``params``."""

    step: jax.Array
    params: Any
    opt_state: Any


def learning_rate_schedule(config: OptimizerConfig, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then constant, cosine or linear decay to ``final_lr_fraction * lr`` at
    ``num_steps``."""
    lr, warmup = config.learning_rate, config.warmup_steps
    decay_steps = max(1, num_steps - warmup)
    if config.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif config.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=config.final_lr_fraction)
    else:
        main = optax.linear_schedule(lr, lr * config.final_lr_fraction, decay_steps)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(config: OptimizerConfig, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (``optax.adamw(1e-4, weight_decay=0.01)`` by default) after global-norm clipping."""
    schedule = learning_rate_schedule(config, num_steps)
    parts = []
    if config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                             weight_decay=config.weight_decay))
    return optax.chain(*parts), schedule


def cross_attention_kv(unet_config: UNetConfig, unet_params: dict) -> dict:
    """The sub-tree of ``unet_params`` holding only each cross-attention's ``to_k`` / ``to_v`` kernels: all
    that the paper initialisation of a new adapter reads (and all that has to reach the init's devices).
    Float32 numpy for arrays; float32 ``ShapeDtypeStruct`` for abstract params (a plan, ``jax.eval_shape``)."""
    out: dict = {}
    for layer in unet_config.cross_attention_layers():
        src, dst = layer.subtree(unet_params), layer.subtree_in(out)
        for key in ("to_k", "to_v"):
            dst[key] = {"kernel": _float32(src[key]["kernel"])}
    return out


def _float32(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, np.float32)
    return np.asarray(x, np.float32)


def state_initializer(unet_config: UNetConfig, projection: ProjectionConfig, tx: optax.GradientTransformation,
                      init_adapter: IPAdapter | None = None) -> Callable[[jax.Array, dict], TrainState]:
    """``init(rng, kv) -> TrainState`` (``kv`` from ``cross_attention_kv``): a new adapter with the paper's
    initialisation, or ``init_adapter``'s weights (fine-tuning) when given; fresh optimizer state; step 0."""
    if init_adapter is not None:
        check_adapter_fits(unet_config, init_adapter)
        if init_adapter.projection != projection:
            raise ValueError(f"the adapter to fine-tune has projection {init_adapter.projection}, the config asks "
                             f"for {projection}; set the adapter.* config to match the file")
        start = jax.tree.map(lambda x: np.asarray(x, np.float32), init_adapter.params)

    def init(rng: jax.Array, kv: dict) -> TrainState:
        if init_adapter is None:
            params = new_ip_adapter(unet_config, kv, projection, rng).params
        else:
            params = jax.tree.map(jnp.asarray, start)
        params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return init


def state_shardings(abstract_state: TrainState, param_sharding: Callable[[Any], Any], replicated) -> TrainState:
    """Shardings for a TrainState: params by ``param_sharding``, each optimizer moment like its parameter
    (optax states mirror the param tree), scalars (step, counts) replicated."""
    params_sh = param_sharding(abstract_state.params)
    params_struct = jax.tree.structure(abstract_state.params)

    def like_params(node):
        if jax.tree.structure(node) == params_struct:
            return params_sh
        return None

    def assign(node):
        match = like_params(node)
        if match is not None:
            return match
        if isinstance(node, jax.ShapeDtypeStruct):
            return replicated if node.ndim == 0 else param_sharding(node)
        return None

    opt_sh = jax.tree.map(assign, abstract_state.opt_state,
                          is_leaf=lambda n: isinstance(n, jax.ShapeDtypeStruct) or like_params(n) is not None)
    return TrainState(step=replicated, params=params_sh, opt_state=opt_sh)

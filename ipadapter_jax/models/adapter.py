"""An IP-Adapter as data: its projection net and the image-branch k/v weights of every cross-attention,
kept apart from the frozen UNet so that training differentiates and checkpoints only this tree."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.models.decoupled_cross_attention import ADAPTER_COLLECTION, SCALE_COLLECTION
from ipadapter_jax.models.image_projection import ProjectionConfig, dummy_projection_input, projection_module
from ipadapter_jax.models.unet_config import UNetConfig


@dataclasses.dataclass
class IPAdapter:
    """One IP-Adapter.

    projection: the projection net's kind and sizes (static).
    params: a plain pytree ``{"image_proj": <projection net params>, "layers": [{"to_k_ip": [C_ctx, inner],
      "to_v_ip": [C_ctx, inner]}, ...]}``, layers in the order of ``UNetConfig.cross_attention_layers()``
      (which is the published files' numbering: layer ``i`` is key ``2*i+1``). Dense layout (in, out).
    """

    projection: ProjectionConfig
    params: dict

    @property
    def variant(self) -> str:
        return self.projection.variant

    @property
    def num_layers(self) -> int:
        return len(self.params["layers"])

    def num_parameters(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.params)))

    def project(self, image_features: jax.Array, params: dict | None = None) -> jax.Array:
        """Image features -> ``[B, num_tokens, cross_attention_dim]`` tokens. ``image_features`` is the
        encoder's ``image_embeds [B, E]`` for plain adapters, its penultimate hidden states ``[B, T, H]``
        otherwise. ``params`` defaults to this adapter's (pass a traced tree when training)."""
        image_proj = (params or self.params)["image_proj"]
        return projection_module(self.projection).apply({"params": image_proj}, image_features)


def new_ip_adapter(unet_config: UNetConfig, unet_params: dict, projection: ProjectionConfig,
                   rng: jax.Array) -> IPAdapter:
    """A fresh adapter for training: the projection net randomly initialised, each layer's ``to_k_ip`` /
    ``to_v_ip`` copied from that cross-attention's ``to_k`` / ``to_v`` (the paper's initialisation)."""
    if projection.cross_attention_dim != unet_config.cross_attention_dim:
        raise ValueError(f"projection width {projection.cross_attention_dim} != UNet cross_attention_dim "
                         f"{unet_config.cross_attention_dim}")
    image_proj = projection_module(projection).init(rng, dummy_projection_input(projection))["params"]
    layers = []
    for layer in unet_config.cross_attention_layers():
        node = layer.subtree(unet_params)
        layers.append({"to_k_ip": jnp.asarray(node["to_k"]["kernel"], jnp.float32),
                       "to_v_ip": jnp.asarray(node["to_v"]["kernel"], jnp.float32)})
    return IPAdapter(projection, {"image_proj": image_proj, "layers": layers})


def check_adapter_fits(unet_config: UNetConfig, adapter: IPAdapter) -> None:
    """A clear error when an adapter was made for another base model (layer count or widths differ)."""
    expected = unet_config.cross_attention_layers()
    if adapter.num_layers != len(expected):
        raise ValueError(f"this IP-Adapter has {adapter.num_layers} cross-attention layers but the UNet has "
                         f"{len(expected)}: it was made for another base model")
    for (name, inner), layer in zip(expected, adapter.params["layers"]):
        want = (unet_config.cross_attention_dim, inner)
        if tuple(layer["to_k_ip"].shape) != want or tuple(layer["to_v_ip"].shape) != want:
            raise ValueError(f"IP-Adapter layer {name}: to_k_ip {tuple(layer['to_k_ip'].shape)}, to_v_ip "
                             f"{tuple(layer['to_v_ip'].shape)}; the UNet needs {want}")


def adapter_variables(unet_config: UNetConfig, layer_params: Sequence[Sequence[dict]],
                      scales: Any = None) -> dict:
    """The UNet's ``ip_adapter`` (and ``ip_scale``) collections for several adapters at once.

    layer_params: for each adapter, its ``params["layers"]`` list (may be traced, e.g. under ``grad``).
    scales: ``[num_adapters, num_layers]`` (see ``resolve_ip_scales``) or None for 1 everywhere.
    Returns ``{"ip_adapter": tree, "ip_scale": tree}`` to merge into the variables passed to ``apply``.
    """
    unet_layers = unet_config.cross_attention_layers()
    for a, layers in enumerate(layer_params):
        if len(layers) != len(unet_layers):
            raise ValueError(f"adapter {a} has {len(layers)} layers, the UNet has {len(unet_layers)} cross-attentions")
    weights: dict = {}
    scale_tree: dict = {}
    for i, unet_layer in enumerate(unet_layers):
        node = unet_layer.subtree_in(weights)
        node["to_k_ip"] = jnp.stack([layers[i]["to_k_ip"] for layers in layer_params])
        node["to_v_ip"] = jnp.stack([layers[i]["to_v_ip"] for layers in layer_params])
        if scales is not None:
            unet_layer.subtree_in(scale_tree)["scale"] = jnp.asarray(scales, jnp.float32)[:, i]
    out = {ADAPTER_COLLECTION: weights}
    if scales is not None:
        out[SCALE_COLLECTION] = scale_tree
    return out

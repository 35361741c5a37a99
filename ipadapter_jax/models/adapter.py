"""An IP-Adapter as data: its projection net, the image-branch k/v weights of every cross-attention and, for
FaceID files, the LoRA on every attention, kept apart from the frozen UNet so that training differentiates and
checkpoints only this tree."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.models.adapter_collections import ADAPTER_COLLECTION, SCALE_COLLECTION
from ipadapter_jax.models.image_projection import (FACEID_PLUS, ProjectionConfig, dummy_projection_input,
                                                   projection_module)
from ipadapter_jax.models.lora import LORA_PROJECTIONS, attention_layer_names, lora_variables
from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.weights.torch_layout import flax_path_of


@dataclasses.dataclass
class IPAdapter:
    """One IP-Adapter.

    projection: the projection net's kind and sizes (static).
    params: a plain pytree ``{"image_proj": <projection net params>, "layers": [{"to_k_ip": [C_ctx, inner],
      "to_v_ip": [C_ctx, inner]}, ...]}``, layers in the order of ``UNetConfig.cross_attention_layers()``
      (which is the published files' numbering: layer ``i`` is key ``2*i+1``). Dense layout (in, out).
      FaceID files add ``"lora"``: one ``{"to_q" | "to_k" | "to_v" | "to_out_0": {"down": [in, rank],
      "up": [rank, out]}}`` per attention in ``lora.attention_layer_names`` order (block ``i``'s self-attention
      is entry ``2*i``, its cross-attention ``2*i+1``, the files' keys ``{k}.to_q_lora.down`` ...).
    """

    projection: ProjectionConfig
    params: dict

    @property
    def variant(self) -> str:
        return self.projection.variant

    @property
    def num_layers(self) -> int:
        return len(self.params["layers"])

    @property
    def has_lora(self) -> bool:
        """Whether this adapter carries a LoRA for the UNet's attentions (FaceID, FaceID-Plus/PlusV2, SDXL)."""
        return self.params.get("lora") is not None

    def num_parameters(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.params)))

    def project(self, image_features: Any, params: dict | None = None, *, shortcut_scale: Any = None) -> jax.Array:
        """Image features -> ``[B, num_tokens, cross_attention_dim]`` tokens. ``image_features`` is the
        encoder's ``image_embeds [B, E]`` for plain adapters, its penultimate hidden states ``[B, T, H]`` for
        plus and full-face; face embeddings ``[B, 512]`` (or ``[B, n, 512]``: n faces, n times the tokens)
        for FaceID; ``(face_embeds, face_crop_hidden_states)`` for FaceID-Plus (``[B, 512]``, ``[B, T, H]``).
        ``shortcut_scale``: FaceID-Plus only, see ``FaceIDPlusProjModel``. ``params`` defaults to this
        adapter's (pass a traced tree when training)."""
        image_proj = (params or self.params)["image_proj"]
        module = projection_module(self.projection)
        if self.variant == FACEID_PLUS:
            return module.apply({"params": image_proj}, image_features, shortcut_scale)
        if shortcut_scale is not None:
            raise ValueError(f"shortcut_scale is for FaceID-Plus adapters, this one is {self.variant}")
        return module.apply({"params": image_proj}, image_features)


def new_ip_adapter(unet_config: UNetConfig, unet_params: dict, projection: ProjectionConfig,
                   rng: jax.Array) -> IPAdapter:
    """A fresh adapter for training: the projection net randomly initialised, each layer's ``to_k_ip`` /
    ``to_v_ip`` copied from that cross-attention's ``to_k`` / ``to_v`` (the paper's initialisation)."""
    if projection.cross_attention_dim != unet_config.cross_attention_dim:
        raise ValueError(f"projection width {projection.cross_attention_dim} != UNet cross_attention_dim "
                         f"{unet_config.cross_attention_dim}")
    image_proj = projection_module(projection).init(rng, dummy_projection_input(projection))["params"]
    layers = []
    for name, _ in unet_config.cross_attention_layers():
        node = unet_params
        for part in flax_path_of(name + ".x")[:-1]:
            node = node[part]
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
    if adapter.has_lora:
        _check_lora_fits(unet_config, adapter.params["lora"])


def _check_lora_fits(unet_config: UNetConfig, lora: Sequence[dict]) -> None:
    widths = [inner for _, inner in unet_config.cross_attention_layers()]
    names = attention_layer_names([name for name, _ in unet_config.cross_attention_layers()])
    if len(lora) != len(names):
        raise ValueError(f"this IP-Adapter's LoRA covers {len(lora)} attentions but the UNet has {len(names)}: "
                         "it was made for another base model")
    for j, (name, entry) in enumerate(zip(names, lora)):
        # SD UNets: query width == inner width; the text keys of a cross-attention have cross_attention_dim.
        width = widths[j // 2]
        context = unet_config.cross_attention_dim if j % 2 else width
        for proj, (n_in, n_out) in zip(LORA_PROJECTIONS, ((width, width), (context, width), (context, width),
                                                          (width, width))):
            down, up = entry[proj]["down"].shape, entry[proj]["up"].shape
            if down[0] != n_in or up[1] != n_out or down[1] != up[0]:
                raise ValueError(f"IP-Adapter LoRA {name}.{proj}: down {tuple(down)}, up {tuple(up)}; the UNet "
                                 f"needs down [{n_in}, rank], up [rank, {n_out}]")


def adapter_variables(unet_config: UNetConfig, layer_params: Sequence[Sequence[dict]],
                      scales: Any = None, loras: Sequence[Sequence[dict] | None] | None = None,
                      lora_scales: Any = None) -> dict:
    """The UNet's ``ip_adapter`` (and ``ip_scale``) collections for several adapters at once.

    layer_params: for each adapter, its ``params["layers"]`` list (may be traced, e.g. under ``grad``).
    scales: ``[num_adapters, num_layers]`` (see ``resolve_ip_scales``) or None for 1 everywhere.
    loras: for each adapter, its ``params.get("lora")`` (None for adapters without one), or None: no LoRA.
    lora_scales: ``[num_adapters]`` LoRA weights (data: changing them never recompiles), None for 1 (h94's
      ``lora_scale`` and diffusers' ``set_adapters`` weight default to 1; independent of ``scales``).
    Returns ``{"ip_adapter": tree, "ip_scale": tree}`` to merge into the variables passed to ``apply``.
    """
    names = [name for name, _ in unet_config.cross_attention_layers()]
    for a, layers in enumerate(layer_params):
        if len(layers) != len(names):
            raise ValueError(f"adapter {a} has {len(layers)} layers, the UNet has {len(names)} cross-attentions")
    weights: dict = {}
    scale_tree: dict = {}
    for i, name in enumerate(names):
        path = flax_path_of(name + ".x")[:-1]
        node = weights
        for part in path:
            node = node.setdefault(part, {})
        node["to_k_ip"] = jnp.stack([layers[i]["to_k_ip"] for layers in layer_params])
        node["to_v_ip"] = jnp.stack([layers[i]["to_v_ip"] for layers in layer_params])
        if scales is not None:
            node = scale_tree
            for part in path:
                node = node.setdefault(part, {})
            node["scale"] = jnp.asarray(scales, jnp.float32)[:, i]
    attention_names = attention_layer_names(names)
    for name, entry in zip(attention_names, lora_variables(len(attention_names), loras or [], lora_scales)):
        node = weights
        for part in flax_path_of(name + ".x")[:-1]:
            node = node.setdefault(part, {})
        node.update(entry)
    out = {ADAPTER_COLLECTION: weights}
    if scales is not None:
        out[SCALE_COLLECTION] = scale_tree
    return out

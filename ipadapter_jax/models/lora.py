"""The LoRA that FaceID adapters carry on the UNet's attention projections.

h94's FaceID files (``ip_adapter_faceid.py``: ``LoRAAttnProcessor`` on every self-attention,
``LoRAIPAttnProcessor`` on every cross-attention) add to each attention's ``to_q``, ``to_k``, ``to_v`` and
``to_out.0`` a low-rank term: ``y = W x + lora_scale * up(down(x))``, no alpha (diffusers applies the same
weights through PEFT with ``lora_alpha == rank``, i.e. a factor of 1). In a cross-attention, ``to_k`` and
``to_v`` see the text tokens only; the image branch (``to_k_ip``/``to_v_ip``) has no LoRA.

Here the LoRA weights are extra variables in the adapter's own ``ip_adapter`` collection, at each attention
module's path: ``{proj}_lora_down [in, R]`` and ``{proj}_lora_up [R, out]`` (Dense layout). Several adapters'
LoRAs are concatenated along the rank (their sum, each adapter's part of ``up`` already multiplied by that
adapter's LoRA scale when the variables are built, so scales are data and never recompile). Without these
variables an attention computes exactly what it did before.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ipadapter_jax.models.adapter_collections import ADAPTER_COLLECTION

# The projections a LoRA touches, by our module names (the files say to_q, to_k, to_v, to_out).
LORA_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out_0")


def add_lora(module: nn.Module, name: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """``y + (x @ down) @ up`` when ``module`` has LoRA variables for its projection ``name``, else ``y``
    itself (the same program as without LoRA). Call from the module's compact ``__call__``: ``x`` is the
    projection's input, ``y`` its output."""
    if not module.has_variable(ADAPTER_COLLECTION, f"{name}_lora_down"):
        return y
    dtype = y.dtype
    down = module.get_variable(ADAPTER_COLLECTION, f"{name}_lora_down").astype(dtype)
    up = module.get_variable(ADAPTER_COLLECTION, f"{name}_lora_up").astype(dtype)
    return y + (x.astype(dtype) @ down) @ up


def attention_layer_names(cross_attention_names: Sequence[str]) -> list[str]:
    """Every attention of the UNet in diffusers' ``attn_processors`` order (the FaceID files' LoRA keys
    ``{k}.to_q_lora...``, k = 0, 1, 2, ...): each transformer block's ``attn1`` then its ``attn2``, blocks in
    the order of ``UNetConfig.cross_attention_layers()``; so attention ``2i`` is block ``i``'s self-attention
    and ``2i+1`` its cross-attention (the IP-Adapter key numbering)."""
    names = []
    for name in cross_attention_names:
        if not name.endswith(".attn2"):
            raise ValueError(f"not a cross-attention module name: {name}")
        names += [name[: -len("attn2")] + "attn1", name]
    return names


def lora_variables(num_attentions: int, loras: Sequence[Sequence[dict] | None],
                   lora_scales: Any = None) -> list[dict[str, jax.Array]]:
    """Per attention (``attention_layer_names`` order), the ``{proj}_lora_down`` / ``{proj}_lora_up``
    variables for the adapters that have a LoRA, concatenated along the rank; ``[]`` when none has one.

    loras: per adapter, its ``params["lora"]`` (one ``{proj: {"down": [in, r], "up": [r, out]}}`` per
      attention) or None. lora_scales: one number per adapter (may be traced), or None for 1.
    """
    if not any(lora is not None for lora in loras):
        return []
    scales = jnp.ones((len(loras),), jnp.float32) if lora_scales is None else jnp.asarray(lora_scales, jnp.float32)
    if scales.shape != (len(loras),):
        raise ValueError(f"{scales.shape} LoRA scales for {len(loras)} adapters: give one per adapter")
    for a, lora in enumerate(loras):
        if lora is not None and len(lora) != num_attentions:
            raise ValueError(f"adapter {a}'s LoRA covers {len(lora)} attentions, the UNet has {num_attentions}")
    out = []
    for j in range(num_attentions):
        entry = {}
        for proj in LORA_PROJECTIONS:
            parts = [(lora[j][proj], scales[a]) for a, lora in enumerate(loras) if lora is not None]
            entry[f"{proj}_lora_down"] = jnp.concatenate([jnp.asarray(p["down"]) for p, _ in parts], axis=1)
            entry[f"{proj}_lora_up"] = jnp.concatenate([s * jnp.asarray(p["up"]) for p, s in parts], axis=0)
        out.append(entry)
    return out

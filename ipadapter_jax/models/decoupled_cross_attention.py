"""IP-Adapter's decoupled cross-attention (arXiv 2308.06721, eq. 5).

``Z = Attn(Q, K_text, V_text) + sum_a scale_a * Attn(Q, c_a W'_k_a, c_a W'_v_a)``, one query for all, the
sum taken before the output projection ``to_out_0`` (as the reference implementation does).

The image branch's weights do not live in ``params``: they are read from two other variable collections,
so the frozen UNet tree and the trainable adapter tree stay apart and only the latter is differentiated.
  - ``ip_adapter``: per cross-attention layer, ``to_k_ip`` and ``to_v_ip`` of shape
    ``[num_adapters, context_dim, inner_dim]`` (Dense layout, adapters stacked).
  - ``ip_scale``: per layer, ``scale [num_adapters]`` (defaults to 1 when the collection is absent). Scales are
    data, not constants, so changing them never recompiles.
With no image tokens the layer is exactly the base UNet's cross-attention. A FaceID adapter's LoRA (see
``lora.py``) adds to ``to_q``, ``to_k``/``to_v`` (text keys and values only, as h94's
``LoRAIPAttnProcessor``: the image branch has no LoRA) and ``to_out_0`` when its weights are given.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ipadapter_jax.models.adapter_collections import ADAPTER_COLLECTION, SCALE_COLLECTION
from ipadapter_jax.models.attention import dot_product_attention, merge_heads, split_heads
from ipadapter_jax.models.lora import add_lora

__all__ = ["ADAPTER_COLLECTION", "SCALE_COLLECTION", "DecoupledCrossAttention"]


class DecoupledCrossAttention(nn.Module):
    """Call: ``x [B, Tq, query_dim]``, ``context [B, Tt, context_dim]``, ``image_tokens``: one
    ``[B, Ti_a, context_dim]`` per adapter (may be empty) -> ``[B, Tq, query_dim]``."""

    heads: int
    head_dim: int
    upcast: bool = False
    implementation: str = "xla"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, image_tokens: Sequence[jax.Array] = ()) -> jax.Array:
        inner = self.heads * self.head_dim
        dense = lambda name: nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)  # noqa: E731
        attend = lambda q, k, v: dot_product_attention(  # noqa: E731
            q, k, v, implementation=self.implementation, upcast=self.upcast
        )
        project = lambda name, h: add_lora(self, name, h, dense(name)(h))  # noqa: E731
        q = split_heads(project("to_q", x), self.heads)
        out = attend(q, split_heads(project("to_k", context), self.heads),
                     split_heads(project("to_v", context), self.heads))
        if image_tokens:
            out = out + self._image_attention(q, image_tokens, attend)
        out = merge_heads(out)
        return add_lora(self, "to_out_0", out, nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out))

    def _image_attention(self, q, image_tokens, attend) -> jax.Array:
        if not (self.has_variable(ADAPTER_COLLECTION, "to_k_ip") and self.has_variable(ADAPTER_COLLECTION, "to_v_ip")):
            raise ValueError(
                f"image tokens were given but no IP-Adapter weights for layer {'/'.join(self.scope.path)} "
                f"(collection '{ADAPTER_COLLECTION}')"
            )
        w_k = self.get_variable(ADAPTER_COLLECTION, "to_k_ip")
        w_v = self.get_variable(ADAPTER_COLLECTION, "to_v_ip")
        if w_k.shape[0] != len(image_tokens):
            raise ValueError(f"{len(image_tokens)} image token sets for {w_k.shape[0]} adapters")
        if self.has_variable(SCALE_COLLECTION, "scale"):
            scale = self.get_variable(SCALE_COLLECTION, "scale")
        else:
            scale = jnp.ones((w_k.shape[0],), jnp.float32)
        dtype = self.dtype or q.dtype
        total = jnp.zeros_like(q)
        for a, tokens in enumerate(image_tokens):
            tokens = tokens.astype(dtype)
            k = split_heads(tokens @ w_k[a].astype(dtype), self.heads)
            v = split_heads(tokens @ w_v[a].astype(dtype), self.heads)
            total = total + scale[a].astype(dtype) * attend(q, k, v)
        return total

"""Scaled dot-product attention with a selectable implementation, and the multi-head attention layer.

Layout everywhere: tokens last-but-one, heads split out as ``[batch, tokens, heads, head_dim]`` (the layout
``jax.nn.dot_product_attention`` and the TPU kernels take), so no transposes sit between projections and
the kernel.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ipadapter_jax.models.lora import add_lora

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


# Above this many logits per call, the CPU path loops over heads and query chunks (see _xla_attention).
_CPU_LOOP_MIN_LOGITS = 1 << 21
# Logits per loop iteration on CPU: 1 MB of float32, which stays in a core's L2 cache.
_CPU_CHUNK_LOGITS = 1 << 18


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    # Plain XLA ops, written out rather than jax.nn.dot_product_attention(implementation="xla"): that one
    # scales the [B, N, Tq, Tk] logits (XLA:CPU materialises the scale as a tensor of that shape) and leaves
    # transposes between its two matmuls. Here q is scaled instead (Tk/head_dim times fewer multiplies, as
    # flash attention does), the matmuls are heads-major, and the softmax's division is applied to the
    # [Tq, head_dim] output instead of the [Tq, Tk] weights: 1.5-2x faster on CPU at 64-256 tokens
    # (PERF_NOTES.md). Logits, exp and the normaliser stay float32 whatever the input dtype.
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, N, T, H]
    b, n, tq, _ = q.shape
    tk = k.shape[2]
    if b * n * tq * tk >= _CPU_LOOP_MIN_LOGITS:
        # Large maps (1024+ tokens): on CPU, one head and query chunk at a time, so that each chunk's logits
        # stay in cache between the matmul, the exp and the second matmul instead of streaming a
        # [B, N, Tq, Tk] tensor (64 MB at 1024 tokens) through memory four times: 80-97 -> 26 ms at SD1.5's
        # 1024-token self-attention, batch 2 (PERF_NOTES.md). Elsewhere (TPU) the batched form is kept.
        out = jax.lax.platform_dependent(q, k, v, cpu=_looped_softmax_attention, default=_softmax_attention)
    else:
        out = _softmax_attention(q, k, v)
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Heads-major ``q [B, N, Tq, H]`` (already scaled), ``k, v [B, N, Tk, H]`` -> float32 ``[B, N, Tq, H]``."""
    logits = jnp.einsum("...qh,...kh->...qk", q, k, preferred_element_type=jnp.float32)
    weights = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    out = jnp.einsum("...qk,...kh->...qh", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out / jnp.sum(weights, axis=-1, keepdims=True)


def _looped_softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """``_softmax_attention`` one (batch, head) at a time, and within it one chunk of queries at a time
    (``lax.map``: sequential loops, each iteration's logits at most ``_CPU_CHUNK_LOGITS``)."""
    b, n, tq, h = q.shape
    tk = k.shape[2]
    chunk = tq
    while chunk * tk > _CPU_CHUNK_LOGITS and chunk % 2 == 0:
        chunk //= 2
    heads = lambda x: x.reshape(b * n, *x.shape[2:])  # noqa: E731
    q_chunks = q.reshape(b * n, tq // chunk, chunk, h)

    def one_head(args):
        qh, kh, vh = args
        return jax.lax.map(lambda qc: _softmax_attention(qc, kh, vh), qh)

    return jax.lax.map(one_head, (q_chunks, heads(k), heads(v))).reshape(b, n, tq, -1)


def _einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    # Written out in full: the plain-math reference every other implementation is tested against.
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqnh,bknh->bnqk", q, k) * scale
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bnqk,bknh->bqnh", weights, v)


AUTO = "auto"
# Every name ``attention_function`` knows, plus "auto"; configs and the pipeline validate against these.
IMPLEMENTATIONS = (AUTO, "xla", "pallas", "pallas_interpret", "einsum")


def resolve_attention_implementation(implementation: str, platform: str) -> str:
    """``"auto"`` -> the implementation for devices of ``platform`` (``jax.Device.platform`` of the mesh the
    program is built for, not the local default backend: a plan compiles for TPU on a CPU host): the Pallas
    flash-attention kernels on TPU (which themselves hand short key sequences to XLA, see
    ``pallas_attention.MIN_KV_TOKENS``), XLA elsewhere. Any other name is returned as it is."""
    if implementation != AUTO:
        return implementation
    return "pallas" if platform == "tpu" else "xla"


def attention_function(implementation: str) -> AttentionFn:
    """The attention function an implementation name stands for. The Pallas kernels are imported only when
    asked for: they pull in Pallas' TPU module, which a CPU-only sampling or training run should not pay for.
    Pallas hands key sequences shorter than ``pallas_attention.MIN_KV_TOKENS`` to the XLA formulation."""
    if implementation == "xla":
        return _xla_attention
    if implementation == "einsum":
        return _einsum_attention
    if implementation in ("pallas", "pallas_interpret"):
        from ipadapter_jax.models.pallas_attention import MIN_KV_TOKENS, flash_attention

        interpret = implementation == "pallas_interpret"

        def pallas(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
            if k.shape[1] < MIN_KV_TOKENS:
                return _xla_attention(q, k, v)
            return flash_attention(q, k, v, interpret=interpret)

        return pallas
    if implementation == AUTO:
        raise ValueError('attention implementation "auto" must be resolved for the target devices first '
                         "(resolve_attention_implementation)")
    raise ValueError(f"unknown attention implementation {implementation!r}; known: "
                     f"{sorted(set(IMPLEMENTATIONS) - {AUTO})}")


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str = "xla", upcast: bool = False
) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) v.

    Args:
      q: ``[batch, q_tokens, heads, head_dim]``.
      k, v: ``[batch, kv_tokens, heads, head_dim]``.
      implementation: a name ``attention_function`` knows ("xla", "pallas", "pallas_interpret", "einsum").
      upcast: compute in float32 whatever the input dtype (diffusers' ``upcast_attention``), cast back.
    Returns:
      ``[batch, q_tokens, heads, head_dim]`` in q's dtype.
    """
    fn = attention_function(implementation)
    dtype = q.dtype
    if upcast:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    return fn(q, k, v).astype(dtype)


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    """``[batch, tokens, heads*head_dim]`` -> ``[batch, tokens, heads, head_dim]``."""
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


def merge_heads(x: jax.Array) -> jax.Array:
    """``[batch, tokens, heads, head_dim]`` -> ``[batch, tokens, heads*head_dim]``."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


class MultiHeadAttention(nn.Module):
    """diffusers' ``Attention`` (self or cross): ``to_q``, ``to_k``, ``to_v`` without bias, ``to_out_0``.

    Call: ``x [batch, q_tokens, query_dim]``, ``context [batch, kv_tokens, context_dim]`` or None for
    self-attention -> ``[batch, q_tokens, out_dim or query_dim]``. A FaceID adapter's LoRA on the UNet's
    self-attentions adds to the four projections when its weights are given (``lora.py``).
    """

    heads: int
    head_dim: int
    out_dim: int | None = None
    out_bias: bool = True
    qkv_bias: bool = False
    upcast: bool = False
    implementation: str = "xla"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        inner = self.heads * self.head_dim
        context = x if context is None else context
        dense = lambda name: nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name=name)  # noqa: E731
        project = lambda name, h: add_lora(self, name, h, dense(name)(h))  # noqa: E731
        q = split_heads(project("to_q", x), self.heads)
        k = split_heads(project("to_k", context), self.heads)
        v = split_heads(project("to_v", context), self.heads)
        out = merge_heads(dot_product_attention(q, k, v, implementation=self.implementation, upcast=self.upcast))
        return add_lora(self, "to_out_0", out, nn.Dense(self.out_dim or x.shape[-1], use_bias=self.out_bias,
                                                       dtype=self.dtype, name="to_out_0")(out))

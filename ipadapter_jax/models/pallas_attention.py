"""Flash attention as Pallas TPU kernels (forward and backward), the "pallas" attention implementations.

Why: at 64x64 latents the UNet's self-attention has 4096 tokens, so XLA's attention materialises
``[batch, heads, 4096, 4096]`` logits and probabilities in HBM (268 MB per image per layer in bf16, kept for
the backward pass). These kernels stream key/value blocks through VMEM with an online softmax and keep only
one log-sum-exp per query row for the backward pass, which recomputes the probabilities block by block.

The implementations ``models.attention.attention_function`` builds on ``flash_attention``:
  - ``"pallas"``: the Mosaic TPU kernels (needs a TPU, or a TPU compile target as ``tools.tpu_plan`` uses),
    for long key sequences; short ones (cross-attention over 77 text or 4..16 image tokens, self-attention
    at 16x16 latents and below) go to XLA, whose fused attention is cheap there and which the kernels'
    128-token padding would only slow down. The threshold is ``MIN_KV_TOKENS``.
  - ``"pallas_interpret"``: the same kernels run by Pallas' interpreter on any backend, with the same
    dispatch, so CPU tests check exactly what the TPU runs.

Layout: the seam's ``[batch, tokens, heads, head_dim]``; the kernels work on ``[batch, heads, tokens,
head_dim]`` (blocks tile the last two axes) and transpose at the edges. Token counts are padded up to the
block sizes: padded keys are masked out of the softmax, padded query rows are computed and dropped. The
head dimension is a whole block (40, 64, 80, 160 all work; the MXU pads it internally).

Cost estimates: every ``pallas_call`` declares its FLOPs (matmul FLOPs of the padded token counts, the
head dimension unpadded, the convention of XLA's own cost model for dots), exponentials and HBM bytes, so
``compiled.cost_analysis()`` of a program using the kernels stays meaningful (without them XLA's cost model
reports no time for the custom call).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec

# Key sequences shorter than this use XLA (see module docstring).
MIN_KV_TOKENS = 512
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 1024
# A finite "minus infinity" for masked logits: exp(MASKED - m) is exactly 0 and never NaN.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
# Room for [block_q, block_k] float32 logits, probabilities and their temporaries (v4 has 32 MiB VMEM in all).
_VMEM_LIMIT_BYTES = 32 * 1024 * 1024
_LANES = 128


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _block(tokens: int, preferred: int) -> int:
    """A block size that is a multiple of 128 (lane width; also a multiple of bf16's 16-row sublane tile)
    no larger than the padded sequence."""
    return min(_round_up(preferred, _LANES), _round_up(tokens, _LANES))


def _column_to_row(x: jax.Array) -> jax.Array:
    """``[n, 1]`` -> ``[1, n]`` through a lane-aligned 2-D transpose (the form Mosaic transposes)."""
    return jnp.transpose(jnp.broadcast_to(x, (x.shape[0], _LANES)))[0:1, :]


def _key_mask(logits_shape, kv_block: jax.Array, block_k: int, kv_len: int, axis: int) -> jax.Array:
    keys = kv_block * block_k + jax.lax.broadcasted_iota(jnp.int32, logits_shape, axis)
    return keys < kv_len


def _dot(a, b, contract_a: int, contract_b: int):
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                               preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------- kernels


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *, scale, block_k, kv_len,
                    num_kv_blocks):
    j = pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    v = v_ref[...]
    s = _dot(q_ref[...], k_ref[...], 1, 1) * scale  # [bq, bk]
    if kv_len % block_k:
        s = jnp.where(_key_mask(s.shape, j, block_k, kv_len, 1), s, _MASKED)
    m_prev = m_scr[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp(s - m_new)
    alpha = jnp.exp(m_prev - m_new)
    l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_scr[...] = alpha * acc_scr[...] + _dot(p.astype(v.dtype), v, 1, 0)
    m_scr[...] = m_new

    @pl.when(j == num_kv_blocks - 1)
    def _finish():
        l = l_scr[...]
        o_ref[...] = (acc_scr[...] / l).astype(o_ref.dtype)
        lse_ref[...] = _column_to_row(m_scr[...] + jnp.log(l))


def _probabilities_t(q, k, lse_row, *, scale, kv_block, block_k, kv_len):
    """``P^T [bk, bq]`` recomputed from the saved log-sum-exp (a row per query, so no transpose)."""
    s_t = _dot(k, q, 1, 1) * scale
    p_t = jnp.exp(s_t - lse_row)
    if kv_len % block_k:
        p_t = jnp.where(_key_mask(p_t.shape, kv_block, block_k, kv_len, 0), p_t, 0.0)
    return p_t


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref, dk_scr, dv_scr, *, scale,
                block_k, kv_len, num_q_blocks):
    j, i = pl.program_id(2), pl.program_id(3)

    @pl.when(i == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    q, do = q_ref[...], do_ref[...]
    p_t = _probabilities_t(q, k_ref[...], lse_ref[...], scale=scale, kv_block=j, block_k=block_k, kv_len=kv_len)
    dv_scr[...] += _dot(p_t.astype(do.dtype), do, 1, 0)
    dp_t = _dot(v_ref[...], do, 1, 1)
    ds_t = p_t * (dp_t - di_ref[...])
    dk_scr[...] += _dot(ds_t.astype(q.dtype), q, 1, 0)

    @pl.when(i == num_q_blocks - 1)
    def _finish():
        dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_ref, dq_scr, *, scale, block_k, kv_len,
               num_kv_blocks):
    j = pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    k, do = k_ref[...], do_ref[...]
    p_t = _probabilities_t(q_ref[...], k, lse_ref[...], scale=scale, kv_block=j, block_k=block_k, kv_len=kv_len)
    dp_t = _dot(v_ref[...], do, 1, 1)
    ds_t = p_t * (dp_t - di_ref[...])
    dq_scr[...] += _dot(ds_t.astype(k.dtype), k, 0, 0)  # dS^T contracted over keys: [bq, D]

    @pl.when(j == num_kv_blocks - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


# ------------------------------------------------------------------------------------------ pallas_calls


def _specs(block_q: int, block_k: int, head_dim: int, q_axis: int, k_axis: int):
    """BlockSpecs for a grid ``(batch, heads, a, b)`` where ``q_axis``/``k_axis`` say which of the last two
    grid axes walks query / key blocks."""
    def q_index(b, h, *ij):
        return b, h, ij[q_axis - 2], 0

    def k_index(b, h, *ij):
        return b, h, ij[k_axis - 2], 0

    def row_index(b, h, *ij):
        return b, h, 0, ij[q_axis - 2]

    q_spec = pl.BlockSpec((None, None, block_q, head_dim), q_index)
    k_spec = pl.BlockSpec((None, None, block_k, head_dim), k_index)
    row_spec = pl.BlockSpec((None, None, 1, block_q), row_index)
    return q_spec, k_spec, row_spec


def _params() -> pltpu.CompilerParams:
    # The last grid axis walks the blocks a kernel accumulates over (keys, or queries for dK/dV): sequential.
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
                                vmem_limit_bytes=_VMEM_LIMIT_BYTES)


def _forward_call(q, k, v, scale, block_q, block_k, kv_len, interpret):
    b, h, tq, d = q.shape
    tk = k.shape[2]
    nq, nk = tq // block_q, tk // block_k
    q_spec, k_spec, row_spec = _specs(block_q, block_k, d, 2, 3)
    itemsize = q.dtype.itemsize
    cost = pl.CostEstimate(
        flops=4 * b * h * tq * tk * d, transcendentals=b * h * tq * tk,
        bytes_accessed=itemsize * b * h * d * (2 * tq + 2 * nq * tk) + 4 * b * h * tq)
    kernel = functools.partial(_forward_kernel, scale=scale, block_k=block_k, kv_len=kv_len, num_kv_blocks=nk)
    return pl.pallas_call(
        kernel,
        grid=(b, h, nq, nk),
        in_specs=[q_spec, k_spec, k_spec],
        out_specs=[q_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, 1, tq), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((block_q, 1), jnp.float32), pltpu.VMEM((block_q, 1), jnp.float32),
                        pltpu.VMEM((block_q, d), jnp.float32)],
        compiler_params=_params(),
        cost_estimate=cost,
        interpret=interpret,
        name="flash_attention_forward",
    )(q, k, v)


def _dkv_call(q, k, v, do, lse, di, scale, block_q, block_k, kv_len, interpret):
    b, h, tq, d = q.shape
    tk = k.shape[2]
    nq, nk = tq // block_q, tk // block_k
    q_spec, k_spec, row_spec = _specs(block_q, block_k, d, 3, 2)
    cost = pl.CostEstimate(
        flops=8 * b * h * tq * tk * d, transcendentals=b * h * tq * tk,
        bytes_accessed=q.dtype.itemsize * b * h * d * (4 * tk + 2 * nk * tq) + 8 * b * h * nk * tq)
    return pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, block_k=block_k, kv_len=kv_len, num_q_blocks=nq),
        grid=(b, h, nk, nq),
        in_specs=[q_spec, k_spec, k_spec, q_spec, row_spec, row_spec],
        out_specs=[k_spec, k_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((block_k, d), jnp.float32), pltpu.VMEM((block_k, d), jnp.float32)],
        compiler_params=_params(),
        cost_estimate=cost,
        interpret=interpret,
        name="flash_attention_dkv",
    )(q, k, v, do, lse, di)


def _dq_call(q, k, v, do, lse, di, scale, block_q, block_k, kv_len, interpret):
    b, h, tq, d = q.shape
    tk = k.shape[2]
    nq, nk = tq // block_q, tk // block_k
    q_spec, k_spec, row_spec = _specs(block_q, block_k, d, 2, 3)
    cost = pl.CostEstimate(
        flops=6 * b * h * tq * tk * d, transcendentals=b * h * tq * tk,
        bytes_accessed=q.dtype.itemsize * b * h * d * (3 * tq + 2 * nq * tk) + 8 * b * h * tq)
    return pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, block_k=block_k, kv_len=kv_len, num_kv_blocks=nk),
        grid=(b, h, nq, nk),
        in_specs=[q_spec, k_spec, k_spec, q_spec, row_spec, row_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32)],
        compiler_params=_params(),
        cost_estimate=cost,
        interpret=interpret,
        name="flash_attention_dq",
    )(q, k, v, do, lse, di)


def _backward(q, k, v, do, lse, di, *, scale, block_q, block_k, kv_len, interpret):
    static = (scale, block_q, block_k, kv_len, interpret)
    dk, dv = _dkv_call(q, k, v, do, lse, di, *static)
    return _dq_call(q, k, v, do, lse, di, *static), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _flash(q, k, v, scale, block_q, block_k, kv_len, interpret):
    out, _ = _forward_call(q, k, v, scale, block_q, block_k, kv_len, interpret)
    return out


def _flash_fwd(q, k, v, scale, block_q, block_k, kv_len, interpret):
    out, lse = _forward_call(q, k, v, scale, block_q, block_k, kv_len, interpret)
    return out, (q, k, v, out, lse)


def _flash_bwd(scale, block_q, block_k, kv_len, interpret, residuals, do):
    q, k, v, out, lse = residuals
    # D_i = rowsum(dO * O): the softmax-Jacobian term, one float per query row, laid out like lse.
    di = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)[:, :, None, :]
    return _backward(q, k, v, do, lse, di, scale=scale, block_q=block_q, block_k=block_k, kv_len=kv_len,
                     interpret=interpret)


_flash.defvjp(_flash_fwd, _flash_bwd)


# -------------------------------------------------------------------------------------------- public API


def _batch_axes(batch: int):
    """The mesh in context (``jax.set_mesh``) and the axes of it to split the batch over: every automatic axis,
    in mesh order, while the batch stays divisible. ``(None, ())`` without a multi-device mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return None, ()
    manual = set(getattr(mesh, "manual_axes", ()))
    axes, size = [], 1
    for name in mesh.axis_names:
        if name not in manual and batch % (size * mesh.shape[name]) == 0:
            axes.append(name)
            size *= mesh.shape[name]
    return (mesh, tuple(axes)) if axes else (None, ())


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, block_q: int = DEFAULT_BLOCK_Q,
                    block_k: int = DEFAULT_BLOCK_K, interpret: bool = False) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) v with the Pallas kernels, differentiable in q, k and v.

    Args:
      q: ``[batch, q_tokens, heads, head_dim]``; k, v: ``[batch, kv_tokens, heads, head_dim]``; any token
        counts (padded to the blocks inside), any head_dim.
      block_q, block_k: query / key tokens per kernel block, rounded up to multiples of 128 and capped at
        the padded sequence lengths.
      interpret: run the kernels in Pallas' interpreter (any backend) instead of compiling them for TPU.
    Returns ``[batch, q_tokens, heads, head_dim]`` in q's dtype (softmax statistics in float32).

    Sharding: XLA cannot partition a Mosaic kernel, so under a device mesh the kernels run per device in a
    ``shard_map`` over the batch. The mesh comes from the tracing context: trace the jitted function under
    ``jax.set_mesh(mesh)`` (the batch is split over the mesh axes that divide it, in mesh order; XLA
    reshards inputs laid out otherwise). Without a mesh in context the kernels see the whole arrays.
    """
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"flash_attention: q {q.shape}, k {k.shape}, v {v.shape} do not match")
    tq, tk, d = q.shape[1], k.shape[1], q.shape[-1]
    bq, bk = _block(tq, block_q), _block(tk, block_k)
    tq_pad, tk_pad = _round_up(tq, bq), _round_up(tk, bk)

    def to_kernel_layout(x, padded):
        x = jnp.swapaxes(x, 1, 2)  # [B, H, T, D]
        return jnp.pad(x, ((0, 0), (0, 0), (0, padded - x.shape[2]), (0, 0)))

    def local(q, k, v):
        out = _flash(to_kernel_layout(q, tq_pad), to_kernel_layout(k.astype(q.dtype), tk_pad),
                     to_kernel_layout(v.astype(q.dtype), tk_pad), 1.0 / math.sqrt(d), bq, bk, tk, interpret)
        return jnp.swapaxes(out[:, :, :tq], 1, 2)

    mesh, axes = _batch_axes(q.shape[0])
    if mesh is None:
        return local(q, k, v)
    spec = PartitionSpec(axes)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)

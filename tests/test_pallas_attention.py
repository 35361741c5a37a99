"""The Pallas flash-attention kernels against the plain-math reference.

On CPU the kernels run in Pallas' interpreter (``interpret=True``, implementation ``"pallas_interpret"``):
the same kernel bodies, grids and block specs the TPU compiles. Tolerance: max abs difference <= 1e-5 in
float32, forward and all three input gradients. Small shapes and 128-token blocks keep several blocks per
axis (online softmax across key blocks, accumulation across query blocks) and token counts that are not
multiples of the blocks (padding and masking), for every head width SD1.5 (40, 80, 160) and SDXL (64) use.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipadapter_jax.models import pallas_attention
from ipadapter_jax.models.attention import attention_function, dot_product_attention
from ipadapter_jax.models.pallas_attention import flash_attention

TOL = 1e-5
reference = attention_function("einsum")


def _inputs(seed, batch, q_tokens, kv_tokens, heads, head_dim, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    shapes = [(batch, q_tokens, heads, head_dim), (batch, kv_tokens, heads, head_dim),
              (batch, kv_tokens, heads, head_dim), (batch, q_tokens, heads, head_dim)]
    return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


def _output_and_grads(attention, q, k, v, cotangent):
    """The output and (dq, dk, dv) for a full, non-constant dO, in one compiled program."""
    def run(q, k, v):
        out, vjp = jax.vjp(attention, q, k, v)
        return out, vjp(cotangent)

    return jax.jit(run)(q, k, v)


@pytest.mark.parametrize(
    "q_tokens,kv_tokens,heads,head_dim",
    [
        (200, 300, 2, 40),  # SD1.5 64x64 level width; both axes padded, 2-3 blocks each
        (256, 256, 1, 64),  # SDXL width; exact multiples, no masking
        (130, 77, 1, 80),  # query padded to 256 (2 blocks), keys 77 -> one masked block
        (64, 260, 1, 160),  # a single short query block, 3 key blocks, the last mostly padding
    ],
)
def test_forward_and_gradients_match_reference(q_tokens, kv_tokens, heads, head_dim):
    q, k, v, cot = _inputs(q_tokens + head_dim, 1, q_tokens, kv_tokens, heads, head_dim)
    kernel = lambda q, k, v: flash_attention(q, k, v, block_q=128, block_k=128, interpret=True)  # noqa: E731
    out, grads = _output_and_grads(kernel, q, k, v, cot)
    ref_out, ref_grads = _output_and_grads(reference, q, k, v, cot)
    assert out.shape == q.shape and out.dtype == jnp.float32
    forward_err = float(jnp.max(jnp.abs(out - ref_out)))
    grad_errs = [float(jnp.max(jnp.abs(g - r))) for g, r in zip(grads, ref_grads)]
    print(f"T=({q_tokens},{kv_tokens}) D={head_dim}: forward {forward_err:.2e}, dq/dk/dv {grad_errs}")
    assert forward_err <= TOL
    assert max(grad_errs) <= TOL
    assert all(float(jnp.max(jnp.abs(g))) > 1e-3 for g in grads)  # gradients are real, not zeros


def test_seam_dispatch_kernel_for_long_keys_xla_for_short(monkeypatch):
    """Through ``dot_product_attention``: keys >= MIN_KV_TOKENS take the kernel, shorter ones XLA's attention
    (cross-attention over text/image tokens)."""
    calls = []
    real = pallas_attention.flash_attention

    def counting(*args, **kwargs):
        calls.append(args[1].shape[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(pallas_attention, "flash_attention", counting)
    monkeypatch.setattr(pallas_attention, "MIN_KV_TOKENS", 150)
    q, k, v, _ = _inputs(1, 2, 160, 160, 2, 40)
    out = dot_product_attention(q, k, v, implementation="pallas_interpret")
    assert calls == [160]
    assert float(jnp.max(jnp.abs(out - reference(q, k, v)))) <= TOL
    short = dot_product_attention(q, k[:, :77], v[:, :77], implementation="pallas_interpret")
    assert calls == [160]  # no kernel call for 77 keys
    np.testing.assert_array_equal(np.asarray(short),
                                  np.asarray(dot_product_attention(q, k[:, :77], v[:, :77], implementation="xla")))


def test_bfloat16_inputs_keep_dtype_and_stay_close():
    q, k, v, _ = _inputs(2, 1, 140, 140, 1, 64, jnp.bfloat16)
    out = flash_attention(q, k, v, block_q=128, block_k=128, interpret=True)
    assert out.dtype == jnp.bfloat16
    ref = reference(*(x.astype(jnp.float32) for x in (q, k, v)))
    # bf16 inputs and bf16 probabilities in the P.V matmul: bf16 rounding (8 bits of mantissa) is the bound.
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 2e-2


def test_lowers_to_three_mosaic_kernels_for_tpu():
    """Lowering for TPU runs the Pallas -> Mosaic lowering of every kernel (block-shape and layout rules are
    checked there) without needing a TPU or libtpu; the training step uses forward, dK/dV and dQ kernels."""
    s = jax.ShapeDtypeStruct((2, 1000, 8, 40), jnp.bfloat16)

    def grads(q, k, v):
        return jax.grad(lambda q, k, v: flash_attention(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    text = jax.jit(grads).trace(s, s, s).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 3
    for name in ("flash_attention_forward", "flash_attention_dkv", "flash_attention_dq"):
        assert name in text


MESH_CHECK = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ipadapter_jax.models.attention import attention_function
from ipadapter_jax.models.pallas_attention import flash_attention
mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))
rng = np.random.default_rng(0)
q, k, v, w = (jax.device_put(jnp.asarray(rng.standard_normal((4, 150, 2, 40)), jnp.float32),
                             NamedSharding(mesh, P(("data", "fsdp")))) for _ in range(4))
def run(attention):
    out, vjp = jax.vjp(attention, q, k, v)
    return out, vjp(w)
kernel = jax.jit(lambda: run(lambda q, k, v: flash_attention(q, k, v, block_q=128, block_k=128, interpret=True)))
with jax.set_mesh(mesh):
    (out, grads), text = kernel(), kernel.lower().as_text()
ref_out, ref_grads = run(attention_function("einsum"))
errs = [float(jnp.max(jnp.abs(a - b))) for a, b in zip((out, *grads), (ref_out, *ref_grads))]
print("ERRS", errs, "SHARDED", "shard_map" in text or "sdy.manual_computation" in text, out.sharding.spec)
assert max(errs) <= 1e-5, errs
"""


def test_kernels_run_per_device_under_a_mesh():
    """Under ``jax.set_mesh`` the kernels run per device in a shard_map over the batch (XLA cannot partition a
    Mosaic kernel); results and gradients on a batch split over a 2x2 CPU mesh match the reference."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", MESH_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    print(proc.stdout.strip())
    assert "SHARDED True" in proc.stdout


def test_mismatched_shapes_are_rejected():
    q, k, v, _ = _inputs(3, 1, 16, 16, 2, 40)
    with pytest.raises(ValueError, match="do not match"):
        flash_attention(q, k[..., :32], v, interpret=True)

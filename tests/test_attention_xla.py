"""The "xla" attention implementation (our own formulation, models/attention.py) against torch's
scaled_dot_product_attention and the plain-math "einsum" reference. Tolerance: max abs difference <= 1e-5
(fp32); bf16 inputs within 2e-2 of the fp32 result."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ipadapter_jax.models.attention import attention_function, dot_product_attention


@pytest.mark.parametrize("b,tq,tk,heads,head_dim", [(2, 64, 64, 4, 16), (2, 64, 77, 2, 40), (1, 16, 4, 8, 8),
                                                     (1, 1024, 1024, 2, 16)])  # 2M logits: the CPU loop
def test_xla_attention_matches_torch_sdpa(b, tq, tk, heads, head_dim):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, t, heads, head_dim)).astype(np.float32) * 2 for t in (tq, tk, tk))
    ours = np.asarray(dot_product_attention(*map(jnp.asarray, (q, k, v)), implementation="xla"))
    einsum = np.asarray(dot_product_attention(*map(jnp.asarray, (q, k, v)), implementation="einsum"))
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(x).transpose(1, 2) for x in (q, k, v))).transpose(1, 2).numpy()
    assert ours.shape == (b, tq, heads, head_dim)
    assert np.abs(ours - ref).max() <= 1e-5
    assert np.abs(ours - einsum).max() <= 1e-5


def test_xla_attention_loop_gradients_match_einsum():
    """Above 2M logits the CPU path loops over heads and query chunks (lax.map): its gradients against the
    plain-math reference's, and the program compiled for CPU has the loop (so this case exercises it)."""
    import jax

    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 1024, 2, 16)), jnp.float32) for _ in range(3))
    loss = lambda impl: lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, implementation=impl) ** 2)  # noqa: E731
    assert "stablehlo.while" in jax.jit(loss("xla")).lower(q, k, v).as_text()
    ours = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(loss("einsum"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref):
        assert float(jnp.abs(a - b).max()) <= 1e-5


def test_xla_attention_bf16_keeps_dtype_and_accuracy():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 32, 4, 16)), jnp.float32) for _ in range(3))
    full = dot_product_attention(q, k, v)
    half = dot_product_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert half.dtype == jnp.bfloat16
    assert float(jnp.abs(half.astype(jnp.float32) - full).max()) <= 2e-2


def test_pallas_is_found_without_importing_its_module_first():
    """Training and sampling name the implementation in a config; the Pallas kernels are imported on first use."""
    import subprocess
    import sys

    code = ("import sys\nfrom ipadapter_jax.models.attention import attention_function\n"
            "assert 'ipadapter_jax.models.pallas_attention' not in sys.modules\n"
            "attention_function('pallas_interpret'); assert 'ipadapter_jax.models.pallas_attention' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        attention_function("flash")

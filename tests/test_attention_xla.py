"""The "xla" attention implementation (our own formulation, models/attention.py) against torch's
scaled_dot_product_attention and the plain-math "einsum" reference. Tolerance: max abs difference <= 1e-5
(fp32); bf16 inputs within 2e-2 of the fp32 result."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ipadapter_jax.models.attention import attention_function, dot_product_attention


@pytest.mark.parametrize("b,tq,tk,heads,head_dim", [(2, 64, 64, 4, 16), (2, 64, 77, 2, 40), (1, 16, 4, 8, 8)])
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

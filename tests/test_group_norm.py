"""GroupNorm (models/group_norm.py) against a float64 reference, torch's group_norm and flax's two-pass
nn.GroupNorm. Tolerance: max abs difference <= 5e-5 on unit-variance outputs (fp32), including inputs with a
mean 100x their spread (float32 spacing at 100 is 7.6e-6, so ~1e-5 errors are inherent there), and never
further from float64 than flax's own two-pass GroupNorm (up to output rounding, 1e-6)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ipadapter_jax.models.group_norm import GroupNorm


@pytest.mark.parametrize("shape,groups,mean", [
    ((2, 8, 8, 64), 32, 0.0),
    ((2, 8, 6, 64), 8, 100.0),   # large mean relative to the spread
    ((3, 5, 96), 32, 3.0),       # tokens instead of a 2-D map
    ((2, 4, 4, 32), 32, -7.0),   # one channel per group
])
def test_group_norm_matches_torch_and_flax(shape, groups, mean):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) + mean).astype(np.float32)
    c = shape[-1]
    params = {"scale": jnp.asarray(rng.standard_normal(c), jnp.float32),
              "bias": jnp.asarray(rng.standard_normal(c), jnp.float32)}
    ours = np.asarray(GroupNorm(groups, epsilon=1e-6).apply({"params": params}, jnp.asarray(x)))
    flax_ref = np.asarray(nn.GroupNorm(groups, epsilon=1e-6, use_fast_variance=False).apply(
        {"params": params}, jnp.asarray(x)))
    xt = torch.from_numpy(np.moveaxis(x, -1, 1).copy())
    torch_ref = np.moveaxis(torch.nn.functional.group_norm(
        xt, groups, torch.tensor(np.asarray(params["scale"])), torch.tensor(np.asarray(params["bias"])),
        1e-6).numpy(), 1, -1)
    xd = x.astype(np.float64).reshape(shape[0], -1, groups, c // groups)
    centered = xd - xd.mean(axis=(1, 3), keepdims=True)
    exact = (centered / np.sqrt((centered ** 2).mean(axis=(1, 3), keepdims=True) + 1e-6)).reshape(x.shape)
    exact = exact * np.asarray(params["scale"], np.float64) + np.asarray(params["bias"], np.float64)
    assert ours.shape == x.shape
    assert np.abs(ours - exact).max() <= 5e-5
    assert np.abs(ours - torch_ref).max() <= 5e-5
    assert np.abs(ours - exact).max() <= np.abs(flax_ref - exact).max() + 1e-6  # + output rounding


def test_group_norm_params_and_dtype_match_flax():
    x = jnp.ones((1, 4, 4, 16), jnp.bfloat16)
    ours = GroupNorm(4, dtype=jnp.bfloat16).init(jax.random.key(0), x)
    theirs = nn.GroupNorm(4, dtype=jnp.bfloat16).init(jax.random.key(0), x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), ours) == jax.tree.map(lambda a: (a.shape, a.dtype), theirs)
    assert GroupNorm(4, dtype=jnp.bfloat16).apply(ours, x).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="groups"):
        GroupNorm(5).init(jax.random.key(0), x)

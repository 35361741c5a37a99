"""Conv2D (models/conv.py) against torch's conv2d, on both of its paths: XLA's convolution for ordinary maps
and im2col + matmul for maps smaller than the kernel. Tolerance: max abs difference <= 1e-5 (fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ipadapter_jax.models.conv import Conv2D, conv2d

CASES = [
    # (batch, height, width, c_in, c_out, stride, padding ((top, bottom), (left, right)))
    (2, 2, 2, 16, 8, 1, ((1, 1), (1, 1))),  # 2x2 map, 3x3 kernel: im2col path
    (2, 1, 1, 16, 8, 1, ((1, 1), (1, 1))),
    (2, 2, 5, 16, 8, 1, ((1, 1), (1, 1))),  # smaller than the kernel in one dimension only
    (2, 2, 2, 16, 8, 2, ((0, 1), (0, 1))),  # the VAE's right/bottom-padded stride-2 downsample
    (2, 2, 2, 16, 8, 2, ((1, 1), (1, 1))),
    (2, 6, 5, 16, 8, 1, ((1, 1), (1, 1))),  # ordinary map: XLA's convolution
    (2, 7, 7, 16, 8, 2, ((0, 1), (0, 1))),
]


def _torch_conv(x, kernel, bias, stride, padding):
    (top, bottom), (left, right) = padding
    xt = torch.nn.functional.pad(torch.from_numpy(x).permute(0, 3, 1, 2), (left, right, top, bottom))
    wt = torch.from_numpy(kernel).permute(3, 2, 0, 1)
    out = torch.nn.functional.conv2d(xt, wt, torch.from_numpy(bias), stride=stride)
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("b,h,w,cin,cout,stride,padding", CASES)
def test_conv2d_matches_torch(b, h, w, cin, cout, stride, padding):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, h, w, cin), dtype=np.float32)
    module = Conv2D(cout, (3, 3), strides=(stride, stride), padding=padding)
    params = module.init(jax.random.key(0), jnp.asarray(x))["params"]
    params = {"kernel": params["kernel"], "bias": jnp.asarray(rng.standard_normal(cout, dtype=np.float32))}
    ours = np.asarray(module.apply({"params": params}, jnp.asarray(x)))
    ref = _torch_conv(x, np.asarray(params["kernel"]), np.asarray(params["bias"]), stride, padding)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-5


def test_small_maps_avoid_xla_convolution():
    """The point of Conv2D: maps smaller than the kernel never reach XLA's convolution op (which XLA
    rewrites into a slow swapped form on CPU); larger maps do."""
    kernel = jnp.zeros((3, 3, 4, 4))
    small = jax.make_jaxpr(lambda x: conv2d(x, kernel, padding=((1, 1), (1, 1))))(jnp.zeros((1, 2, 2, 4)))
    large = jax.make_jaxpr(lambda x: conv2d(x, kernel, padding=((1, 1), (1, 1))))(jnp.zeros((1, 4, 4, 4)))
    assert "conv_general_dilated" not in str(small)
    assert "conv_general_dilated" in str(large)


GRAD_CASES = [
    # (batch, height, width, c_in, c_out, stride, padding); the first four take our input-gradient rule (the
    # kernel outweighs the gradient map), the last two JAX's transposed convolution.
    (2, 4, 4, 64, 48, 1, ((1, 1), (1, 1))),
    (2, 4, 5, 64, 48, 2, ((1, 1), (1, 1))),  # the UNet's stride-2 downsample
    (2, 7, 7, 48, 64, 2, ((0, 1), (0, 1))),  # the VAE's right/bottom-padded one, an odd map (rows left over)
    (2, 3, 3, 64, 64, 1, ((2, 0), (0, 2))),  # lopsided padding
    (2, 16, 16, 8, 8, 1, ((1, 1), (1, 1))),
    (2, 2, 2, 16, 8, 1, ((1, 1), (1, 1))),  # im2col's own gradient
]


@pytest.mark.parametrize("b,h,w,cin,cout,stride,padding", GRAD_CASES)
def test_conv2d_gradients_match_torch(b, h, w, cin, cout, stride, padding):
    """Input and kernel gradients against torch autograd. Tolerance: max abs difference <= 1e-5 for the input
    gradient (entries of order 1), <= 1e-4 for the kernel gradient (sums over the batch and map, order 10)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((b, h, w, cin), dtype=np.float32)
    kernel = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
    out_shape = jax.eval_shape(lambda x: conv2d(x, kernel, (stride, stride), padding), x).shape
    g = rng.standard_normal(out_shape, dtype=np.float32)
    _, vjp = jax.vjp(lambda x, k: conv2d(x, k, (stride, stride), padding), jnp.asarray(x), jnp.asarray(kernel))
    dx, dk = (np.asarray(a) for a in vjp(jnp.asarray(g)))

    (top, bottom), (left, right) = padding
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
    wt = torch.from_numpy(kernel).permute(3, 2, 0, 1).contiguous().requires_grad_(True)
    out = torch.nn.functional.conv2d(torch.nn.functional.pad(xt, (left, right, top, bottom)), wt, stride=stride)
    out.backward(torch.from_numpy(g).permute(0, 3, 1, 2))
    assert np.abs(dx - xt.grad.permute(0, 2, 3, 1).numpy()).max() <= 1e-5
    assert np.abs(dk - wt.grad.permute(2, 3, 1, 0).numpy()).max() <= 1e-4

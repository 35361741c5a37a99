"""Conv2D (models/conv.py) against torch's conv2d, on each of its paths: im2col + matmul for small maps,
Winograd F(2x2, 3x3) for large even 3x3 maps on CPU, XLA's convolution otherwise. Tolerance: max abs
difference <= 1e-5 (fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ipadapter_jax.models import conv as conv_module
from ipadapter_jax.models.conv import Conv2D, conv2d

CASES = [
    # (batch, height, width, c_in, c_out, stride, padding ((top, bottom), (left, right)))
    (2, 2, 2, 16, 8, 1, ((1, 1), (1, 1))),  # 2x2 map, 3x3 kernel: im2col path
    (2, 1, 1, 16, 8, 1, ((1, 1), (1, 1))),
    (2, 2, 5, 16, 8, 1, ((1, 1), (1, 1))),  # smaller than the kernel in one dimension only
    (2, 2, 2, 16, 8, 2, ((0, 1), (0, 1))),  # the VAE's right/bottom-padded stride-2 downsample
    (2, 2, 2, 16, 8, 2, ((1, 1), (1, 1))),
    (2, 6, 5, 16, 8, 1, ((1, 1), (1, 1))),  # at most 64 positions: im2col
    (2, 7, 7, 16, 8, 2, ((0, 1), (0, 1))),
    (1, 9, 10, 16, 8, 1, ((1, 1), (1, 1))),  # odd height: XLA's convolution
    (2, 16, 16, 16, 8, 2, ((1, 1), (1, 1))),  # stride 2: XLA's convolution
    (2, 16, 16, 16, 8, 1, ((1, 1), (1, 1))),  # 128 tiles: Winograd
    (1, 16, 40, 16, 24, 1, ((1, 1), (1, 1))),  # Winograd, not square
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


@pytest.mark.parametrize("shape,stride,method", [
    ((1, 2, 2, 4), 1, "im2col"),  # smaller than the kernel: XLA would swap it onto its slow generic path
    ((2, 8, 8, 4), 1, "im2col"),  # 64 positions
    ((1, 16, 16, 4), 1, "winograd"),  # 64 tiles
    ((1, 12, 16, 4), 1, "xla"),  # 48 tiles
    ((2, 16, 16, 4), 2, "xla"),
    ((2, 16, 15, 4), 1, "xla"),  # odd width
])
def test_method_choice(shape, stride, method):
    """Which path each convolution takes, and what each compiles to: only XLA's path (and Winograd's when
    compiled for TPU, which keeps XLA's convolution) reaches XLA's convolution op."""
    kernel = jnp.zeros((3, 3, 4, 4))
    padding = ((1, 1), (1, 1))
    assert conv_module._method(jnp.zeros(shape), kernel, (stride, stride), padding) == method
    traced = jax.jit(lambda x: conv2d(x, kernel, (stride, stride), padding)).trace(jnp.zeros(shape))
    on_cpu, on_tpu = (traced.lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "tpu"))
    assert ("convolution" in on_cpu) == (method == "xla")
    assert ("convolution" in on_tpu) == (method != "im2col")


def test_winograd_error_is_that_of_a_direct_convolution():
    """Winograd's transforms add rounding; against a float64 reference its float32 error stays within 3x that
    of XLA's direct convolution (measured 1.2-1.8x at SD1.5's shapes, PERF_NOTES.md)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 16, 16, 256), dtype=np.float32)
    kernel = (rng.standard_normal((3, 3, 256, 64)) / np.sqrt(9 * 256)).astype(np.float32)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x).double().permute(0, 3, 1, 2),
                                     torch.from_numpy(kernel).double().permute(3, 2, 0, 1), padding=1)
    ref = ref.permute(0, 2, 3, 1).numpy()
    padding = ((1, 1), (1, 1))
    assert conv_module._method(jnp.asarray(x), jnp.asarray(kernel), (1, 1), padding) == "winograd"
    winograd = np.asarray(conv2d(jnp.asarray(x), jnp.asarray(kernel), padding=padding))
    direct = np.asarray(conv_module._xla_conv(jnp.asarray(x), jnp.asarray(kernel), (1, 1), padding))
    assert np.abs(winograd - ref).max() <= 3 * np.abs(direct - ref).max()


GRAD_CASES = [
    # (batch, height, width, c_in, c_out, stride, padding); the first four take our input-gradient rule (the
    # kernel outweighs the gradient map), then JAX's transposed convolution, im2col's own gradient and
    # Winograd's (the flipped kernel as a permutation of tile positions).
    (2, 4, 4, 64, 48, 1, ((1, 1), (1, 1))),
    (2, 4, 5, 64, 48, 2, ((1, 1), (1, 1))),  # the UNet's stride-2 downsample
    (2, 7, 7, 48, 64, 2, ((0, 1), (0, 1))),  # the VAE's right/bottom-padded one, an odd map (rows left over)
    (2, 3, 3, 64, 64, 1, ((2, 0), (0, 2))),  # lopsided padding
    (1, 12, 12, 8, 8, 1, ((1, 1), (1, 1))),
    (2, 2, 2, 16, 8, 1, ((1, 1), (1, 1))),
    (2, 16, 16, 8, 8, 1, ((1, 1), (1, 1))),
    (1, 16, 40, 24, 16, 1, ((1, 1), (1, 1))),
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

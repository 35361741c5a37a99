"""2-D convolution on NHWC with ``nn.Conv``'s parameters (``kernel [kh, kw, in, out]`` HWIO, ``bias [out]``),
so checkpoints map onto it exactly as onto ``nn.Conv``.

Why not ``nn.Conv``: when a feature map is smaller than the kernel window in some spatial dimension (a 2x2
map under a 3x3 kernel: the lowest UNet level at 128px, or any level of a tiny test model), XLA's
algebraic simplifier swaps the convolution's operands (the input becomes the filter). On CPU the swapped
form runs on a slow generic path and reverses the whole kernel on every call: measured 15-45 ms for a
[4, 2, 2, 256] x [3, 3, 256..512, 256] conv that costs 0.2 ms as one matmul (PERF_NOTES.md). For such
maps we compute the convolution as im2col + one matmul instead; for larger maps XLA's own convolution is
faster and is kept.

The gradient with respect to the input (what training needs: the UNet is frozen, its input is not) is our
own where the kernel outweighs the gradient map. JAX's transpose rule convolves the output gradient with
the kernel flipped in space and with its in/out channels swapped; XLA:CPU materialises that kernel with a
fused reverse+transpose loop on every step (from cold memory: about 1.5 ms for 3x3x256x256, several times
the convolution itself), and for strided convolutions whose gradient map is smaller than the kernel it
lands on XLA's slow generic convolution. ``_input_grad`` is im2col's transpose instead: one matmul that
contracts the kernel's output axis where it lies, then kh*kw shifted adds. Measured (20 cold kernels,
batch 2): 4x4x256 36.9 -> 7.8 ms, 8x8x128 6.8 -> 5.0 ms; at 16x16x64 XLA's rule is faster and is kept.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ipadapter_jax.models.winograd import kernel_transform, winograd_conv3x3, winograd_input_grad

Padding = Sequence[tuple[int, int]]


def _im2col_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding) -> jax.Array:
    """The same convolution as one matmul over the kh*kw shifted (strided) views of the padded input."""
    kh, kw, cin, cout = kernel.shape
    sh, sw = strides
    x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    b, h, w, _ = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    patches = jnp.concatenate(
        [x[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :] for i in range(kh) for j in range(kw)],
        axis=-1,
    )  # [b, oh, ow, kh*kw*cin], (i, j, c) order = the kernel's HWI order
    out = patches.reshape(b * oh * ow, kh * kw * cin) @ kernel.reshape(kh * kw * cin, cout)
    return out.reshape(b, oh, ow, cout)


def _xla_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, strides, [tuple(p) for p in padding],
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


# Where each method wins on CPU (PERF_NOTES.md, "Intel machine"): im2col + one matmul for maps of at most
# IM2COL_MAX_PIXELS positions (XLA's direct convolution runs at 30-60 GFLOP/s on SD1.5's 4x4 and 8x8 maps of
# 1280-2560 channels, the matmul at 80-140), Winograd for 3x3 maps of at least WINOGRAD_MIN_TILES 2x2 output
# tiles per call (batch included), XLA's convolution otherwise.
IM2COL_MAX_PIXELS = 64
WINOGRAD_MIN_TILES = 64


def _method(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding) -> str:
    """"im2col", "winograd" (on CPU; XLA's convolution elsewhere) or "xla" for this convolution."""
    b, h, w = x.shape[:3]
    if h < kernel.shape[0] or w < kernel.shape[1]:
        return "im2col"  # XLA would swap the operands onto its slow generic path (module doc)
    if kernel.shape[:2] != (3, 3):
        return "xla"
    if (tuple(strides) == (1, 1) and tuple(map(tuple, padding)) == ((1, 1), (1, 1)) and h % 2 == 0 and w % 2 == 0
            and b * h * w // 4 >= WINOGRAD_MIN_TILES and x.dtype == jnp.float32 and kernel.dtype == jnp.float32):
        return "winograd"
    return "im2col" if h * w <= IM2COL_MAX_PIXELS else "xla"


def _forward(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding) -> jax.Array:
    method = _method(x, kernel, strides, padding)
    if method == "im2col":
        return _im2col_conv(x, kernel, strides, padding)
    if method == "winograd":
        # Chosen when lowering, for the devices compiled for: Winograd on CPU; XLA's convolution elsewhere
        # (a TPU plan compiled on a CPU host still gets the TPU's convolution).
        return jax.lax.platform_dependent(
            x, kernel, cpu=lambda x, k: winograd_conv3x3(x, kernel_transform(k)),
            default=lambda x, k: _xla_conv(x, k, strides, padding))
    return _xla_conv(x, kernel, strides, padding)


def _input_grad(g: jax.Array, kernel: jax.Array, in_shape: tuple[int, ...], strides: tuple[int, int],
                padding: Padding) -> jax.Array:
    """d(conv)/dx applied to the output gradient ``g [B, H', W', C_out]`` -> ``in_shape [B, H, W, C_in]``,
    as im2col's transpose: one matmul ``g @ kernel^T`` gives every tap's contribution ``[B, H', W', kh*kw,
    C_in]``, and each tap is added back at its (strided) offset. The matmul contracts the kernel's last
    axis in place, so the kernel is neither flipped nor transposed in memory (module doc)."""
    kh, kw, cin, cout = kernel.shape
    b, oh, ow, _ = g.shape
    taps = jax.lax.dot_general(g.reshape(b * oh * ow, cout), kernel.reshape(kh * kw * cin, cout),
                               (((1,), (1,)), ((), ())))
    taps = taps.reshape(b, oh, ow, kh * kw, cin)
    (sh, sw), ((top, bottom), (left, right)) = strides, padding
    h, w = in_shape[1:3]
    dx = None
    for i in range(kh):
        for j in range(kw):
            # tap (i, j) of output (y, x) read padded input (i + sh*y, j + sw*x); shift it back, crop the padding.
            rows = (i - top, h + top + bottom - (i + sh * (oh - 1) + 1) - bottom, sh - 1)
            cols = (j - left, w + left + right - (j + sw * (ow - 1) + 1) - right, sw - 1)
            part = jax.lax.pad(taps[:, :, :, i * kw + j], jnp.zeros((), g.dtype), [(0, 0, 0), rows, cols, (0, 0, 0)])
            dx = part if dx is None else dx + part
    return dx


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding) -> jax.Array:
    return _forward(x, kernel, strides, padding)


def _conv_fwd(x, kernel, strides, padding):
    return _forward(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, residuals, g):
    x, kernel = residuals
    grad = jax.vjp(lambda x, k: _forward(x, k, strides, padding), x, kernel)[1]
    if _method(x, kernel, strides, padding) == "winograd":
        dx = jax.lax.platform_dependent(
            g, kernel, cpu=lambda g, k: winograd_input_grad(g, kernel_transform(k)),
            default=lambda g, k: _default_input_grad(g, k, x.shape, strides, padding, grad))
        return dx, grad(g)[1]
    return _default_input_grad(g, kernel, x.shape, strides, padding, grad), grad(g)[1]


def _default_input_grad(g, kernel, in_shape, strides, padding, grad):
    if kernel.size < 4 * g.size:
        # Large maps: XLA's transposed convolution beats the matmul + kh*kw shifted adds (measured 4.1 vs
        # 5.2 ms at 16x16x64, batch 2), and the kernel transpose it needs is small next to the map.
        return grad(g)[0]
    # The kernel gradient keeps JAX's rule; when the kernel is frozen XLA drops it as dead code.
    return _input_grad(g, kernel, in_shape, strides, padding)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int] = (1, 1),
           padding: Padding = ((0, 0), (0, 0))) -> jax.Array:
    """``x [B, H, W, C_in]`` (*) ``kernel [kh, kw, C_in, C_out]`` -> ``[B, H', W', C_out]``; explicit
    ``padding`` per spatial dimension as ``(low, high)``. Differentiable in both (see module doc)."""
    return _conv(x, kernel, tuple(strides), tuple(tuple(int(v) for v in p) for p in padding))


class Conv2D(nn.Module):
    """Drop-in for ``nn.Conv(features, kernel_size, strides, padding=explicit pairs)`` (see module doc).

    Call: ``x [B, H, W, C_in]`` -> ``[B, H', W', features]``.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: Padding = ((0, 0), (0, 0))
    use_bias: bool = True
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (*self.kernel_size, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype) \
            if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv2d(x, kernel, tuple(self.strides), self.padding)
        return y if bias is None else y + bias

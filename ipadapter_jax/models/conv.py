"""2-D convolution on NHWC with ``nn.Conv``'s parameters (``kernel [kh, kw, in, out]`` HWIO, ``bias [out]``),
so checkpoints map onto it exactly as onto ``nn.Conv``.

Why not ``nn.Conv``: when a feature map is smaller than the kernel window in some spatial dimension (a 2x2
map under a 3x3 kernel: the lowest UNet level at 128px, or any level of a tiny test model), XLA's
algebraic simplifier swaps the convolution's operands (the input becomes the filter). On CPU the swapped
form runs on a slow generic path and reverses the whole kernel on every call: measured 15-45 ms for a
[4, 2, 2, 256] x [3, 3, 256..512, 256] conv that costs 0.2 ms as one matmul (PERF_NOTES.md). For such
maps we compute the convolution as im2col + one matmul instead; for larger maps XLA's own convolution is
faster and is kept.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int] = (1, 1),
           padding: Padding = ((0, 0), (0, 0))) -> jax.Array:
    """``x [B, H, W, C_in]`` (*) ``kernel [kh, kw, C_in, C_out]`` -> ``[B, H', W', C_out]``; explicit
    ``padding`` per spatial dimension as ``(low, high)``."""
    if any(size < k for size, k in zip(x.shape[1:3], kernel.shape[:2])):
        return _im2col_conv(x, kernel, strides, padding)
    return jax.lax.conv_general_dilated(x, kernel, strides, [tuple(p) for p in padding],
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


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

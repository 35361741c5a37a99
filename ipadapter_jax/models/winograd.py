"""3x3 convolutions (stride 1, padding 1, NHWC, float32) by Winograd's minimal filtering F(2x2, 3x3): the CPU
path of ``conv.py`` for the UNet's and VAE's 3x3 convolutions.

Each 2x2 block of outputs is computed from a 4x4 tile of input (tiles overlap by 2) as
``A^T [(G g G^T) * (B^T d B)] A``: the input tiles and the kernel are each transformed once, the 16 positions
of a transformed tile are 16 independent channel matmuls ``[tiles, C_in] @ [C_in, C_out]``, and the output
transform folds them back. That is 16 multiplies per 2x2 outputs per channel pair instead of 36 (2.25x
fewer), and the 16 matmuls are large, dense GEMMs, where XLA:CPU's direct convolution runs at 40-150
GFLOP/s depending on the shape (PERF_NOTES.md, "Intel machine"). The transforms are additions and halvings
(exact in float32 but for the halvings' rounding); measured error against a float64 reference is 1.2-1.8x
that of the direct convolution (about 4e-6 on unit-scale outputs).

Layouts: ``x [B, H, W, C_in]`` with H and W even, kernel ``[3, 3, C_in, C_out]`` (HWIO), the transformed
kernel ``[16, C_in, C_out]`` (tile position 4*a + b first). With the kernel a loop-invariant argument (the
sampling loop), XLA hoists ``kernel_transform`` out of the loop: it runs once per generation, not per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# F(2, 3) with interpolation points 0, 1, -1 and infinity (Lavin & Gray, 2015).
_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]])
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]])
# Reversing a 3-tap kernel evaluates it at 1/p times p^2: for these points that swaps 0 and infinity and leaves
# 1 and -1, so the transformed flipped kernel is the transformed kernel with rows/columns 0 and 3 exchanged.
_FLIP = (3, 1, 2, 0)


def _combine(parts, coefficients):
    """sum(c * p) with the zero terms left out and +-1 as additions (what the transforms are made of)."""
    out = None
    for c, part in zip(coefficients, parts):
        if c == 0:
            continue
        term = part if c == 1 else -part if c == -1 else part * jnp.asarray(c, part.dtype)
        out = term if out is None else out + term
    return out


def kernel_transform(kernel: jax.Array) -> jax.Array:
    """``[3, 3, C_in, C_out]`` -> ``G g G^T`` per channel pair, ``[16, C_in, C_out]``: one ``[16, 9]`` matmul
    over the taps (``G (x) G``; entries 0, 1/2, 1/4, 1, exact in float32), 2x faster on CPU than the two
    separable passes written out."""
    taps = jnp.asarray(np.kron(_G, _G), kernel.dtype)
    return (taps @ kernel.reshape(9, -1)).reshape(16, *kernel.shape[2:])


def _input_transform(x: jax.Array, order: tuple[int, ...] = (0, 1, 2, 3)) -> jax.Array:
    """``[B, H, W, C]`` -> the 16 positions of ``B^T d B`` over all 4x4 tiles of the zero-padded input,
    ``[16, B * H/2 * W/2, C]`` (position 4*a + b; ``order`` permutes a and b alike).
    The 1-D transform along H is stacked first, then the one along W: two passes that XLA fuses into their
    stacks (written out position by position, the 16 outputs were materialised and then copied into the
    stack: 1.4-1.7x slower at VAE sizes)."""
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))

    def along(a, axis, tiles):
        taps = [jax.lax.slice_in_dim(a, i, i + 2 * (tiles - 1) + 1, 2, axis) for i in range(4)]
        return [_combine(taps, _BT[k]) for k in order]

    b, h, w, c = x.shape
    rows = jnp.stack(along(padded, 1, h // 2))  # [4, B, H/2, W+2, C]
    return jnp.stack(along(rows, 3, w // 2), axis=1).reshape(16, b * (h // 2) * (w // 2), c)


def _output_transform(products: list[jax.Array], shape: tuple[int, int, int]) -> jax.Array:
    """The 16 ``[B, H/2, W/2, C_out]`` products -> ``A^T M A`` interleaved back into ``[B, H, W, C_out]``."""
    b, h, w = shape
    rows = [[_combine([products[4 * i + j] for i in range(4)], _AT[r]) for j in range(4)] for r in range(2)]
    out = [[_combine(row, _AT[s]) for s in range(2)] for row in rows]  # out[r][s]: output pixel (2y+r, 2x+s)
    return jnp.stack([jnp.stack(row, axis=3) for row in out], axis=2).reshape(b, h, w, -1)


def _tile_matmuls(tiles: jax.Array, transformed: jax.Array, contract_out: bool, shape) -> list[jax.Array]:
    """16 matmuls as one batched dot: ``tiles[p] [N, C] @ transformed[p]`` (``[C, C']``, or its transpose
    when ``contract_out``, which contracts the kernel's output axis in place: no copy) -> 16 ``[B, H/2, W/2,
    C']``."""
    contracting = 2 if contract_out else 1
    out = jax.lax.dot_general(tiles, transformed, (((2,), (contracting,)), ((0,), (0,))))
    b, h, w = shape
    return [out[p].reshape(b, h // 2, w // 2, -1) for p in range(16)]


def winograd_conv3x3(x: jax.Array, transformed: jax.Array) -> jax.Array:
    """``x [B, H, W, C_in]`` (H, W even) convolved with the kernel whose ``kernel_transform`` is
    ``transformed``, stride 1, padding 1 -> ``[B, H, W, C_out]``."""
    shape = x.shape[:3]
    return _output_transform(_tile_matmuls(_input_transform(x), transformed, False, shape), shape)


def winograd_input_grad(g: jax.Array, transformed: jax.Array) -> jax.Array:
    """The gradient of ``winograd_conv3x3`` with respect to ``x`` for output gradient ``g [B, H, W,
    C_out]``: the same convolution of ``g`` with the kernel flipped in space and its channels swapped. The
    flip is a permutation of the tile positions (``_FLIP``), applied to the order in which the tiles are
    built and the products read rather than to the kernel, and the swap is the contraction over the
    kernel's output axis."""
    shape = g.shape[:3]
    products = _tile_matmuls(_input_transform(g, _FLIP), transformed, True, shape)
    order = [4 * _FLIP[p // 4] + _FLIP[p % 4] for p in range(16)]  # an involution
    return _output_transform([products[order[p]] for p in range(16)], shape)

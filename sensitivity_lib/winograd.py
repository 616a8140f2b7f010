r"""Winograd's minimal filtering for the 3x3, stride-1 convolutions inside the iterations.

Paper
    A. Lavin, S. Gray, *Fast Algorithms for Convolutional Neural Networks*, CVPR 2016: the
    algorithm ``F(m x m, 3 x 3)`` computes an ``m x m`` block of outputs from a
    ``(m + 2) x (m + 2)`` block of inputs with ``(m + 2)^2`` multiplications per channel pair
    instead of ``9 m^2``: 2.25 times fewer for ``m = 2``, 4 times fewer for ``m = 4``.

What it computes
    Exactly ``F.conv2d(x, weight, None, 1, padding)`` (cross-correlation, no bias, stride 1,
    dilation 1, one group, zero padding ``0 <= padding <= 2`` on every side), up to rounding. In
    one formula, with ``d`` a ``(m+2) x (m+2)`` input tile and ``g`` a 3x3 kernel,
    ``Y = A^T [ (G g G^T) * (B^T d B) ] A`` (``*`` elementwise, summed over input channels).
    The ``(m + 2)^2`` elementwise products over channels are ``(m + 2)^2`` matrix products
    ``C_out x C_in`` times ``C_in x tiles``, where the CPU is fastest.

Input space, shapes
    ``x``: ``(B, C_in, H, W)`` float tensors, any values; output ``(B, C_out, H_out, W_out)`` with
    ``H_out = H + 2 padding - 2``. Norm-free: a linear map, used as one.

Accuracy
    The transforms have entries up to 8 (``m = 4``), so rounding grows: relative error about
    ``3e-6`` in float32 for ``m = 4`` and ``5e-7`` for ``m = 2`` (``2e-7`` for ``F.conv2d``),
    measured on random VGG-19-sized layers. That is harmless inside an iteration to ``1e-3``;
    :mod:`sensitivity_lib.opnorm` evaluates its final values with ``F.conv2d`` in float64.

Why here
    Lanczos on a convolution's ``A^T A`` spends three quarters of its time in the two
    convolutions per step, which already run near the CPU's peak rate; fewer multiplications are
    the only way left to make a step cheaper. See :func:`choose_tile` for where it wins on 2 cores;
    ``benchmarks/bench_opnorm.py`` measures the whole effect in every run.

Example
-------
>>> import torch, torch.nn.functional as F
>>> g = torch.Generator().manual_seed(0)
>>> w = torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64)
>>> x = torch.randn(2, 4, 10, 9, generator=g, dtype=torch.float64)
>>> conv = winograd_conv3x3(w, padding=1, tile=4)
>>> bool(torch.allclose(conv(x), F.conv2d(x, w, None, 1, 1), atol=1e-10))
True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["winograd_conv3x3", "choose_tile"]

# (B^T, G, A^T) of Lavin & Gray for F(2x2, 3x3) and F(4x4, 3x3), interpolation points 0, +-1 (m=2)
# and 0, +-1, +-2 (m=4), plus the point at infinity
_MATRICES = {
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    4: (
        [
            [4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1],
        ],
        [
            [1 / 4, 0, 0],
            [-1 / 6, -1 / 6, -1 / 6],
            [-1 / 6, 1 / 6, -1 / 6],
            [1 / 24, 1 / 12, 1 / 6],
            [1 / 24, -1 / 12, 1 / 6],
            [0, 0, 1],
        ],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}


def choose_tile(c_in: int, c_out: int, h_out: int, w_out: int) -> int | None:
    """The output tile ``m`` to use for a 3x3 stride-1 convolution, or ``None`` for ``F.conv2d``.

    A fixed rule, so that the same call always runs the same arithmetic (and results repeat bit
    for bit): ``F(4x4, 3x3)`` when both channel counts are at least 128, one is at least 256,
    and ``c_in c_out h_out w_out >= 1e8``; else ``F.conv2d``. Timed on 2 cores of this project's
    machines as one ``A^T A`` product (forward and adjoint, float32, batch 1, best of 6
    interleaved runs) of VGG-19's layers, Winograd over ``F.conv2d``: 0.74-0.79 for 256 channels
    at 56x56, 0.80-0.84 for 512 at 28x28, 0.87 for 256 to 512 at 28x28, 0.96 for 128 to 256 at
    56x56. Single convolutions, or an earlier version of this code, measured 1.15 for 512
    channels at 14x14, 1.0 for 128 at 112x112 and 1.3-1.6 for smaller products (256 at 14x14,
    512 at 7x7, 128 at 28x28), where the transforms cost more than they save; ``m = 2`` was
    never the faster of the two where Winograd won.
    """
    big, small = max(c_in, c_out), min(c_in, c_out)
    if small >= 128 and big >= 256 and c_in * c_out * h_out * w_out >= 1e8:
        return 4
    return None


def winograd_conv3x3(
    weight: torch.Tensor, padding: int = 1, tile: int = 4
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> F.conv2d(x, weight, None, 1, padding)`` by Winograd's ``F(tile x tile, 3 x 3)``.

    Parameters
    ----------
    weight
        ``(C_out, C_in, 3, 3)``; its transform ``G w G^T`` is computed once, in the weight's
        dtype (the matrices are exact in float64 and rounded once to that dtype).
    padding
        Zero padding on every side, ``0``, ``1`` or ``2``.
    tile
        Output tile ``m``: ``2`` or ``4``.

    Returns
    -------
    Callable
        Maps ``(B, C_in, H, W)`` to ``(B, C_out, H + 2 padding - 2, W + 2 padding - 2)``.
    """
    if tile not in _MATRICES:
        raise ValueError(f"tile must be 2 or 4, got {tile!r}")
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must have shape (C_out, C_in, 3, 3), got {tuple(weight.shape)}")
    if padding not in (0, 1, 2):
        raise ValueError(f"padding must be 0, 1 or 2, got {padding!r}")
    bt, g, at = (torch.tensor(a, dtype=torch.float64) for a in _MATRICES[tile])
    m, t = tile, tile + 2
    p = t * t
    dtype = weight.dtype
    # U[k] = (G w G^T) at tile position k, i.e. (G kron G) vec(w): (p, C_out, C_in), made in
    # this layout by one matrix product (a float64 detour and a permuted copy took 8 times longer)
    u = (torch.kron(g, g).to(dtype) @ weight.detach().reshape(-1, 9).T).reshape(p, *weight.shape[:2])
    # the input transform as p fixed t x t filters (B^T d B, flattened), the output one as a matrix
    bfilt = torch.kron(bt, bt).reshape(p, 1, t, t).to(dtype)
    aout = torch.kron(at, at).to(dtype)  # (m^2, p)
    c_out, c_in = weight.shape[:2]

    def conv(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != c_in:
            raise ValueError(f"expected a (B, {c_in}, H, W) input, got {tuple(x.shape)}")
        nb, _, h, w = x.shape
        ho, wo = h + 2 * padding - 2, w + 2 * padding - 2
        if ho < 1 or wo < 1:
            raise ValueError(f"input {h}x{w} is too small for a 3x3 kernel with padding {padding}")
        a, b = -(-ho // m), -(-wo // m)
        if ho % m == 0 and wo % m == 0:  # the tiles cover the padded input exactly
            v = F.conv2d(x.reshape(nb * c_in, 1, h, w), bfilt.to(x.dtype), stride=m, padding=padding)
        else:
            xp = F.pad(x, (padding, m * b + 2 - w - padding, padding, m * a + 2 - h - padding))
            v = F.conv2d(xp.reshape(nb * c_in, 1, m * a + 2, m * b + 2), bfilt.to(x.dtype), stride=m)
        v = v.reshape(nb, c_in, p, a * b).permute(2, 1, 0, 3).reshape(p, c_in, nb * a * b)
        # (a contiguous copy: the batched product runs up to 1.6 times faster on it)
        prod = torch.bmm(u.to(x.dtype), v.contiguous())  # (p, C_out, B a b)
        y = (aout.to(x.dtype) @ prod.reshape(p, -1)).reshape(m * m, c_out, nb, a, b)
        y = y.permute(2, 1, 0, 3, 4).reshape(nb, c_out * m * m, a, b)
        return F.pixel_shuffle(y, m)[:, :, :ho, :wo]

    return conv

"""Rounding, and the input bit-width a condition number predicts.

Paper: Maheshwari et al. (arXiv:2307.12679) and the thesis behind it, whose stated aim is "to determine
minimal bit-width precision that may be used to safely represent the network" (quoted). The bit
arithmetic below is our reconstruction (the book's chapter *Deriving a condition number for a
network*), not the paper's text.

Rounding
    Every rounding in the library goes through one function, ``_quantize`` (round ``x * s`` to an
    integer, divide back): to ``bits`` significand bits of a binary floating-point number
    (:func:`round_significand`, ``s = 2^(bits - e)`` for ``x = m 2^e``, applied exactly) or to the
    ``2^bits`` levels of an image file (:func:`round_to_levels`, ``s = 2^bits - 1``).
Input space
    Pixels in [0, 1] for :func:`round_to_levels`; any float tensor for :func:`round_significand`.

Example
-------
>>> import torch
>>> round_significand(torch.tensor([1.0 / 3.0]), 4).item()   # 0.0101 0101... -> 0.01011 (4 bits)
0.34375
>>> round_to_levels(torch.tensor([0.5]), 1).item()            # two levels, 0 and 1; ties to even
0.0
"""

from __future__ import annotations

import torch

__all__ = ["ROUNDING_MODES", "round_significand", "round_to_levels", "min_input_bits"]

ROUNDING_MODES: tuple[str, ...] = ("nearest", "chop")


def _quantize(
    x: torch.Tensor, mode: str, *, scale: float | None = None, shift: torch.Tensor | None = None
) -> torch.Tensor:
    """``rnd(x * s) / s`` with ``rnd`` to nearest (ties to even) or toward zero (chop), for
    ``s = scale``, or ``s = 2^shift`` applied exactly by ``ldexp`` (no overflow for tiny ``x``)."""
    if mode not in ROUNDING_MODES:
        raise ValueError(f"mode must be one of {ROUNDING_MODES}, got {mode!r}")
    y = torch.ldexp(x, shift) if shift is not None else x * scale
    r = torch.round(y) if mode == "nearest" else torch.trunc(y)
    return torch.ldexp(r, -shift) if shift is not None else r / scale


def round_significand(x: torch.Tensor, bits: int, mode: str = "nearest") -> torch.Tensor:
    """Round every entry of ``x`` to ``bits`` significand bits (the leading bit included).

    ``mode="nearest"`` (ties to even): relative error ``<= 2^-bits`` (the unit round-off ``u``);
    ``mode="chop"`` (truncation toward zero): ``< 2^(1-bits)``. float32 has 24 bits, bfloat16 8,
    float16 11. The exponent range is not limited (no overflow and no subnormals are emulated).

    Parameters
    ----------
    x
        Any float tensor.
    bits
        ``>= 1``.
    mode
        ``"nearest"`` or ``"chop"``.

    Returns
    -------
    torch.Tensor
        Same dtype and shape as ``x``.
    """
    if int(bits) < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    x64 = x.to(torch.float64)
    _, e = torch.frexp(x64)  # x = m 2^e, 0.5 <= |m| < 1, so x 2^(bits - e) = m 2^bits
    return _quantize(x64, mode, shift=int(bits) - e).to(x.dtype)


def round_to_levels(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round pixels in [0, 1] to the nearest of ``2**bits`` evenly spaced levels (``bits=8`` is what an
    8-bit image file stores). The rounding error per pixel is at most ``0.5 / (2**bits - 1)``."""
    if not 1 <= int(bits) <= 24:
        raise ValueError(f"bits must be between 1 and 24, got {bits}")
    return _quantize(x, "nearest", scale=float(2 ** int(bits) - 1))


def min_input_bits(log2_kappa: torch.Tensor | float, y: torch.Tensor) -> torch.Tensor:
    """Significand bits ``t`` that keep the arg-max of ``y`` under a relative input error ``2^-t``.

    Our reconstruction: if ``||dx|| <= 2^-t ||x||`` (rounding every input to ``t`` significand
    bits) then ``||dy|| <= kappa 2^-t ||y||``, and the top class cannot change while
    ``||dy|| < g / sqrt(2)`` with ``g`` the gap between the two largest entries of ``y``. So

    ``t_min = ceil(log2(sqrt(2) * kappa * ||y|| / g))``.

    With ``kappa`` from E1 this is certified; with E0 it is a first-order prediction.

    Parameters
    ----------
    log2_kappa
        log2 of the relative condition number, per sample (tensor (N,)) or one float.
    y
        The outputs (N, C) that ``kappa`` refers to (logits or probabilities).

    Returns
    -------
    torch.Tensor
        float64 (N,) of bit counts (``inf`` when the top two entries tie).

    Example
    -------
    >>> min_input_bits(3.0, torch.tensor([[2.0, 1.0]])).tolist()    # 0.5 + 3 + log2(sqrt(5)) = 4.66
    [5.0]
    """
    y = y.detach().to(torch.float64).reshape(y.shape[0], -1)
    top = y.topk(2, dim=1).values
    gap = top[:, 0] - top[:, 1]
    k = torch.as_tensor(log2_kappa, dtype=torch.float64)
    t = 0.5 + k + torch.log2(y.norm(dim=1)) - torch.log2(gap)
    return torch.ceil(t)

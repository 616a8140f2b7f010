"""Number formats, and every rounding in the library: floating point, fixed point, image levels.

Paper: Maheshwari et al. (arXiv:2307.12679) aim "to determine minimal bit-width precision that may
be used to safely represent the network" (quoted); what a *bit* means there is not stated. This
module fixes the meanings the book uses (pitfall P8 of the paper's digest):

Floating point (:func:`round_float`)
    ``p`` significand bits, the implicit leading bit included (float32 24, float16 11, bfloat16 8,
    float8 e5m2 3, e4m3fn 4), so the unit round-off of round-to-nearest is ``u = 2^-p`` and every
    entry moves by at most ``u |x|``. With ``exponent_bits=e`` the IEEE 754 exponent range applies
    as well: subnormals below ``2^emin`` (``emin = 2 - 2^(e-1)``), and overflow to infinity above
    the largest finite value (or saturation, for formats without infinity such as float8 e4m3fn).
    ``exponent_bits=None`` is an unbounded exponent: only the significand is rounded.
Fixed point (:func:`round_fixed`)
    ``f`` fractional bits, every entry moves by at most ``2^-(f+1)`` (absolute), saturating at the
    range ``[-2^i, 2^i - 2^-f]`` that ``int_bits=i`` and a sign bit allow.
Image levels (:func:`round_to_levels`)
    The ``2^b`` levels of a ``b``-bit image file on [0, 1]: a fixed-point rounding with the step
    ``1 / (2^b - 1)`` (not a power of two).
Modes
    ``"nearest"`` (ties to even, IEEE 754's default), ``"chop"`` (toward zero: error below one unit in
    the last place) and ``"stochastic"`` (up with probability equal to the distance from the value
    below, in units of the last place: unbiased, ``E[rnd(x)] = x``).

Every rounding is computed in float64 (exact for every format of at most 53 significand bits) by
one private function, ``_round_scaled`` (round ``x 2^-q`` to an integer, scale back exactly by
``ldexp``), and returned in ``x``'s dtype; two shortcuts give the same numbers faster on float32
tensors (the tests compare them with the float64 path): torch's own casts for float16, bfloat16 and
the float8 formats, and integer arithmetic on the bit patterns for normal numbers and an exponent
range at least float32's. ``nan`` stays ``nan``; ``-0.0`` stays ``-0.0``.

:data:`FORMATS` names the formats the book uses (IEEE float32 / float16, bfloat16, float8 e5m2 and
e4m3fn, TensorFloat-32, fixed-point Qi.f); every function that asks for a format takes a name or a
:class:`Format`.

Example
-------
>>> import torch
>>> round_float(torch.tensor([1.0 / 3.0]), 4).item()     # 0.0101 0101... -> 0.01011 (4 bits)
0.34375
>>> x = torch.tensor([1e-6, 70000.0, -0.0])
>>> round_float(x, 11, 5).tolist() == x.half().float().tolist()   # float16, subnormal and overflow
True
>>> FORMATS["float8_e4m3fn"].round(torch.tensor([500.0])).item()  # no infinity: saturates
448.0
>>> round_fixed(torch.tensor([0.3, 9.0]), 2, int_bits=2).tolist()  # step 1/4, largest 4 - 1/4
[0.25, 3.75]
>>> round_to_levels(torch.tensor([0.5]), 1).item()       # two levels, 0 and 1; ties to even
0.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "ROUNDING_MODES",
    "Format",
    "FORMATS",
    "as_format",
    "float_format",
    "fixed_format",
    "round_float",
    "round_fixed",
    "round_to_levels",
]

#: The rounding modes of :func:`round_float` and :func:`round_fixed`.
ROUNDING_MODES: tuple[str, ...] = ("nearest", "chop", "stochastic")


def _check_mode(mode: str) -> None:
    if mode not in ROUNDING_MODES:
        raise ValueError(f"mode must be one of {ROUNDING_MODES}, got {mode!r}")


def _round_scaled(
    x: torch.Tensor, q: torch.Tensor | int, mode: str, generator: torch.Generator | None
) -> torch.Tensor:
    """``rnd(x 2^-q) 2^q`` in float64, ``rnd`` by ``mode``; the sign of zero is kept."""
    y = torch.ldexp(x, torch.as_tensor(-q, device=x.device))
    if mode == "nearest":
        r = torch.round(y)  # ties to even
    elif mode == "chop":
        r = torch.trunc(y)
    else:
        lo = torch.floor(y)
        u = torch.rand(y.shape, generator=generator, dtype=y.dtype, device=y.device)
        r = lo + (u < (y - lo)).to(y.dtype)
    r = torch.copysign(r, y)  # -0.3 -> -0.0, as IEEE 754 rounds
    return torch.ldexp(r, torch.as_tensor(q, device=x.device))


#: Formats whose round-to-nearest equals torch's cast from float32 bit for bit (tests/test_precision.py
#: checks every value, tie and neighbour): ``(p, e, max_value, saturate) -> dtype``.
_TORCH_CASTS = {
    (11, 5, None, False): torch.float16,
    (8, 8, None, False): torch.bfloat16,
    (3, 5, None, False): torch.float8_e5m2,
    (4, 4, 448.0, True): torch.float8_e4m3fn,
}


def _fast_float32(x: torch.Tensor, p: int, mode: str) -> torch.Tensor:
    """Round normal float32 numbers to ``p <= 24`` significand bits on their bit patterns: add half
    an ulp minus one, plus the last kept bit (ties to even), and clear the dropped bits. A carry moves
    into the exponent as it should, and past the largest float32 to infinity."""
    drop = 24 - p
    if drop == 0:
        return x.clone()
    b = x.view(torch.int32)
    if mode == "nearest":
        b = b + ((1 << (drop - 1)) - 1) + ((b >> drop) & 1)
    r = (b & ~((1 << drop) - 1)).view(torch.float32)
    return torch.where(torch.isfinite(x), r, x)


def round_float(
    x: torch.Tensor,
    significand_bits: int,
    exponent_bits: int | None = None,
    *,
    mode: str = "nearest",
    generator: torch.Generator | None = None,
    max_value: float | None = None,
    saturate: bool = False,
) -> torch.Tensor:
    """Round every entry of ``x`` to a binary floating-point format.

    Parameters
    ----------
    x
        Any float tensor (float64 holds every format exactly; the result has ``x``'s dtype, so round
        a float32 tensor to at most 24 bits).
    significand_bits
        ``p >= 1``, the implicit bit included: float32 24, float16 11, bfloat16 8, e5m2 3.
    exponent_bits
        ``e >= 2``: the IEEE 754 range of ``e`` exponent bits (``emin = 2 - 2^(e-1)``, subnormals
        with spacing ``2^(emin - p + 1)``, largest finite ``(2 - 2^(1-p)) 2^(2^(e-1) - 1)``);
        ``None``: an unbounded exponent (no subnormals, no overflow).
    mode
        ``"nearest"`` (ties to even), ``"chop"`` (toward zero) or ``"stochastic"``.
    generator
        The random source of ``"stochastic"``.
    max_value
        The largest finite value, when the format's differs from IEEE's (float8 e4m3fn: 448).
    saturate
        Overflow gives ``+-max_value`` instead of ``+-inf`` (and an infinite input too), as in a
        format without infinity. Chopping never overflows to infinity (IEEE 754's round toward zero).

    Returns
    -------
    torch.Tensor
        Same shape and dtype as ``x``. With ``mode="nearest"`` equal bit for bit to torch's casts
        (``x.to(torch.float16).to(x.dtype)`` for ``(11, 5)``, bfloat16 ``(8, 8)``, float8_e5m2
        ``(3, 5)``; float8_e4m3fn ``(4, 4, max_value=448, saturate=True)``).

    Example
    -------
    >>> round_float(torch.tensor([2.0**-26]), 11, 5).item()   # below half the least subnormal, 2^-24
    0.0
    """
    p = int(significand_bits)
    if p < 1:
        raise ValueError(f"significand_bits must be >= 1, got {significand_bits}")
    _check_mode(mode)
    if not torch.is_floating_point(x):
        raise TypeError(f"x must be a float tensor, got {x.dtype}")
    if x.dtype == torch.float32 and mode == "nearest" and exponent_bits is not None:
        cast = _TORCH_CASTS.get((p, int(exponent_bits), max_value, bool(saturate)))
        if cast is not None:  # torch's own cast: the same numbers, faster
            return x.detach().to(cast).to(torch.float32)
    if (
        x.dtype == torch.float32 and mode != "stochastic" and p <= 24 and max_value is None
        and not saturate and exponent_bits in (None, 8)
        and not bool(((x.abs() < 2.0**-126) & (x != 0)).any())
    ):  # fmt: skip
        return _fast_float32(x.detach(), p, mode)  # float32's range is that of 8 exponent bits
    x64 = x.detach().to(torch.float64)
    finite = torch.isfinite(x64)
    safe = torch.where(finite, x64, torch.zeros_like(x64))
    _, E = torch.frexp(safe)  # x = m 2^E with 1/2 <= |m| < 1: the leading bit is 2^(E-1)
    lead = E.to(torch.int64) - 1
    if exponent_bits is not None:
        e = int(exponent_bits)
        if e < 2:
            raise ValueError(f"exponent_bits must be >= 2 or None, got {exponent_bits}")
        emin = 2 - 2 ** (e - 1)
        lead = lead.clamp_min(emin)  # below 2^emin: subnormals, one fixed spacing
    r = _round_scaled(safe, lead - (p - 1), mode, generator)
    if exponent_bits is not None or max_value is not None:
        if max_value is None:
            emax = 2 ** (int(exponent_bits) - 1) - 1
            max_value = math.ldexp(2.0 - 2.0 ** (1 - p), emax)
        big = r.abs() > max_value
        limit = torch.full_like(r, float(max_value)).copysign(r)
        over = limit if (saturate or mode == "chop") else torch.full_like(r, math.inf).copysign(r)
        r = torch.where(big, over, r)
        if saturate:
            x64 = torch.where(torch.isinf(x64), torch.full_like(x64, float(max_value)).copysign(x64), x64)
    r = torch.where(finite, r, x64)
    return r.to(x.dtype)


def round_fixed(
    x: torch.Tensor,
    frac_bits: int,
    int_bits: int | None = None,
    *,
    mode: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Round every entry of ``x`` to fixed point with ``frac_bits`` fractional bits.

    Two's complement with a sign bit, ``int_bits`` integer bits and ``frac_bits`` fractional bits:
    the values ``k 2^-f`` for integers ``-2^(i+f) <= k <= 2^(i+f) - 1``; outside that range the
    result saturates (``int_bits=None``: no limit). The rounding error is at most ``2^-(f+1)``
    (``"nearest"``) or below ``2^-f`` (``"chop"``, ``"stochastic"``) inside the range.

    Parameters
    ----------
    x
        Any float tensor.
    frac_bits
        ``f``, any integer (a negative one rounds to multiples of ``2^|f|``).
    int_bits
        ``i >= 0`` or ``None``.
    mode, generator
        As in :func:`round_float`.

    Returns
    -------
    torch.Tensor
        Same shape and dtype as ``x``.

    Example
    -------
    >>> round_fixed(torch.tensor([-5.0, 0.126]), 3, int_bits=1).tolist()   # range [-2, 2 - 1/8]
    [-2.0, 0.125]
    """
    _check_mode(mode)
    if not torch.is_floating_point(x):
        raise TypeError(f"x must be a float tensor, got {x.dtype}")
    f = int(frac_bits)
    x64 = x.detach().to(torch.float64)
    r = _round_scaled(x64, -f, mode, generator)
    if int_bits is not None:
        i = int(int_bits)
        if i < 0:
            raise ValueError(f"int_bits must be >= 0 or None, got {int_bits}")
        r = r.clamp(-math.ldexp(1.0, i), math.ldexp(1.0, i) - math.ldexp(1.0, -f))
    return r.to(x.dtype)


def round_to_levels(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round pixels in [0, 1] to the nearest of ``2**bits`` evenly spaced levels (``bits=8`` is what an
    8-bit image file stores): fixed point with the step ``1 / (2^bits - 1)``, ties to even. The
    rounding error per pixel is at most ``0.5 / (2**bits - 1)``.

    Example
    -------
    >>> round_to_levels(torch.tensor([0.2, 0.9]), 2).tolist()    # levels 0, 1/3, 2/3, 1
    [0.3333333432674408, 1.0]
    """
    if not 1 <= int(bits) <= 24:
        raise ValueError(f"bits must be between 1 and 24, got {bits}")
    s = float(2 ** int(bits) - 1)
    return torch.round(x * s) / s


@dataclass(frozen=True)
class Format:
    """A number format: floating point (``kind="float"``) or fixed point (``kind="fixed"``).

    Attributes
    ----------
    name
        A label, e.g. ``"float16"``.
    kind
        ``"float"`` or ``"fixed"``.
    significand_bits, exponent_bits, max_value, saturate
        Floating point: as in :func:`round_float` (``exponent_bits=None``: unbounded exponent).
    frac_bits, int_bits
        Fixed point: as in :func:`round_fixed`.
    torch_dtype
        The torch dtype of the same format, where torch has one (for checks against its casts).
    """

    name: str
    kind: str = "float"
    significand_bits: int | None = None
    exponent_bits: int | None = None
    max_value: float | None = None
    saturate: bool = False
    frac_bits: int | None = None
    int_bits: int | None = None
    torch_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.kind == "float" and (self.significand_bits is None or self.significand_bits < 1):
            raise ValueError(f"{self.name}: a float format needs significand_bits >= 1")
        if self.kind == "fixed" and self.frac_bits is None:
            raise ValueError(f"{self.name}: a fixed-point format needs frac_bits")
        if self.kind not in ("float", "fixed"):
            raise ValueError(f"kind must be 'float' or 'fixed', got {self.kind!r}")

    @property
    def bits(self) -> int | None:
        """The bits that the given precision counts, significand bits (float) or fractional bits."""
        return self.significand_bits if self.kind == "float" else self.frac_bits

    @property
    def storage_bits(self) -> int | None:
        """Bits of one stored number (sign included); ``None`` where the range is unbounded."""
        if self.kind == "float":
            if self.exponent_bits is None:
                return None
            return 1 + self.exponent_bits + self.significand_bits - 1
        return None if self.int_bits is None else 1 + self.int_bits + self.frac_bits

    @property
    def unit_roundoff(self) -> float:
        """Largest relative (float) or absolute (fixed) error of round-to-nearest in range."""
        return 2.0**-self.significand_bits if self.kind == "float" else 2.0 ** -(self.frac_bits + 1)

    def round(
        self, x: torch.Tensor, *, mode: str = "nearest", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``x`` rounded to this format (same shape and dtype)."""
        if self.kind == "float":
            return round_float(
                x, self.significand_bits, self.exponent_bits, mode=mode, generator=generator,
                max_value=self.max_value, saturate=self.saturate,
            )  # fmt: skip
        return round_fixed(x, self.frac_bits, self.int_bits, mode=mode, generator=generator)


def float_format(significand_bits: int, exponent_bits: int | None = None) -> Format:
    """A float format by its sizes, named like ``"float(p=11, e=5)"`` (``e=inf``: unbounded).

    >>> float_format(11, 5).round(torch.tensor([1.0 + 2.0**-11])).item()   # the tie goes to even
    1.0
    """
    e = "inf" if exponent_bits is None else exponent_bits
    return Format(f"float(p={significand_bits}, e={e})", "float", int(significand_bits), exponent_bits)


def fixed_format(frac_bits: int, int_bits: int | None = None) -> Format:
    """A fixed-point format ``Qi.f`` (sign bit, ``i`` integer bits, ``f`` fractional bits).

    >>> fixed_format(8, 7).storage_bits
    16
    """
    i = "inf" if int_bits is None else int_bits
    return Format(f"Q{i}.{frac_bits}", "fixed", frac_bits=int(frac_bits), int_bits=int_bits)


#: The named formats. IEEE 754 binary32 and binary16, bfloat16, TensorFloat-32 (NVIDIA's tf32, with the
#: range of float32 and the significand of float16), the OCP 8-bit floats e5m2 (IEEE-like) and e4m3fn
#: (no infinity, one NaN pattern, largest value 448, saturating like torch's cast), and
#: fixed-point formats Qi.f with a sign bit (8 bits Q3.4, 16 bits Q7.8, 32 bits Q15.16).
FORMATS: dict[str, Format] = {
    "float32": Format("float32", "float", 24, 8, torch_dtype=torch.float32),
    "tf32": Format("tf32", "float", 11, 8),
    "float16": Format("float16", "float", 11, 5, torch_dtype=torch.float16),
    "bfloat16": Format("bfloat16", "float", 8, 8, torch_dtype=torch.bfloat16),
    "float8_e5m2": Format("float8_e5m2", "float", 3, 5, torch_dtype=torch.float8_e5m2),
    "float8_e4m3fn": Format(
        "float8_e4m3fn", "float", 4, 4, max_value=448.0, saturate=True, torch_dtype=torch.float8_e4m3fn
    ),
    "Q3.4": Format("Q3.4", "fixed", frac_bits=4, int_bits=3),
    "Q7.8": Format("Q7.8", "fixed", frac_bits=8, int_bits=7),
    "Q15.16": Format("Q15.16", "fixed", frac_bits=16, int_bits=15),
}


def as_format(spec: str | Format) -> Format:
    """A :class:`Format` from a name in :data:`FORMATS` (or a :class:`Format`, returned as it is).

    >>> as_format("bfloat16").significand_bits
    8
    """
    if isinstance(spec, Format):
        return spec
    if isinstance(spec, str) and spec in FORMATS:
        return FORMATS[spec]
    raise ValueError(
        f"unknown format {spec!r}: use a name in FORMATS ({', '.join(FORMATS)}), or a Format "
        "(float_format(p, e), fixed_format(f, i))"
    )

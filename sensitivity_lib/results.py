"""Small result objects for numbers that have a pedigree.

A norm, a condition number or an influence value is rarely just a float: it is *exact*, a
*certified upper bound*, a *lower estimate* (e.g. a power iteration stopped early), or a plain
*estimate*; it came from some method after some iterations with some residual. Every measure in
``sensitivity_lib`` returns one of these instead of a bare float.

Example
-------
>>> r = Estimate(value=2.0, kind="upper", method="fft", norm="2")
>>> float(r)
2.0
>>> r.is_certified_upper
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Kind = Literal["exact", "upper", "lower", "estimate"]
KINDS: tuple[str, ...] = ("exact", "upper", "lower", "estimate")


@dataclass(frozen=True)
class Estimate:
    """A number (or a batch of numbers) together with how it was obtained.

    Attributes
    ----------
    value
        A float, or a 1-D tensor with one entry per sample of a batch.
    kind
        ``"exact"`` (up to floating point), ``"upper"`` (a certified upper bound), ``"lower"``
        (an estimate from below, e.g. a Rayleigh quotient), or ``"estimate"`` (no guaranteed side).
    method
        The algorithm, e.g. ``"power"``, ``"lanczos"``, ``"fft"``, ``"dense"``.
    norm
        The norm it is measured in, e.g. ``"2"`` (spectral / Euclidean).
    iterations
        Iterations used by an iterative method (``None`` for direct methods).
    residual
        A convergence measure where one exists, e.g. ``||A^T A v - s^2 v|| / s^2``.
    converged
        For an iterative method, whether its stopping rule held (a bool, or a bool tensor with one
        entry per sample); ``None`` for direct methods. An unconverged ``"lower"`` value is still a
        lower bound, just not accurate to the requested tolerance.
    extra
        Anything else worth keeping (ranks, per-layer values...).
    """

    value: float | torch.Tensor
    kind: Kind
    method: str
    norm: str = "2"
    iterations: int | None = None
    residual: float | torch.Tensor | None = None
    converged: bool | torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    def __float__(self) -> float:
        if isinstance(self.value, torch.Tensor):
            if self.value.numel() != 1:
                raise TypeError(
                    f"this Estimate holds {self.value.numel()} values (one per sample); "
                    "index .value instead of calling float()"
                )
            return float(self.value.item())
        return float(self.value)

    @property
    def is_certified_upper(self) -> bool:
        """True when ``value`` can be relied on as an upper bound (exact values are bounds too)."""
        return self.kind in ("exact", "upper")

    def __repr__(self) -> str:
        v = self.value
        if isinstance(v, torch.Tensor) and v.numel() > 1:
            vs = f"tensor(shape={tuple(v.shape)}, max={v.max().item():.6g})"
        else:
            vs = f"{float(v):.6g}"
        parts = [f"value={vs}", f"kind={self.kind!r}", f"method={self.method!r}", f"norm={self.norm!r}"]
        if self.iterations is not None:
            parts.append(f"iterations={self.iterations}")
        if self.residual is not None:
            r = self.residual
            r = r.max().item() if isinstance(r, torch.Tensor) else r
            parts.append(f"residual={r:.2e}")
        if self.converged is not None:
            c = self.converged
            ok = bool(c.all()) if isinstance(c, torch.Tensor) else bool(c)
            if not ok:
                n = int((~c).sum()) if isinstance(c, torch.Tensor) else 1
                parts.append(f"NOT CONVERGED ({n})")
        return f"Estimate({', '.join(parts)})"

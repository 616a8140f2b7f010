"""The smallest change that flips a prediction: one search, by bisection or by scanning a grid.

Many questions in the book have the same shape: along some one-parameter family of changes of an
input (a step along a direction, a rounding to fewer bits, an attack's budget, a number of flipped
pixels), what is the smallest parameter at which the classifier's prediction changes? This module
answers it once, batched over samples, for a caller-supplied predicate
``changed(t, idx) -> bool`` ("does the prediction of sample ``idx[i]`` change at parameter
``t[i]``?").

Modes
    ``"bisection"``
        On an interval ``[lo, hi]``: samples that do not change at ``hi`` have no flip in the range;
        the others are bracketed, ``changed(below) = False`` and ``changed(value) = True``, and the
        bracket is halved until ``value - below <= tol * value``. The answer is the smallest flip
        only if the predicate is monotone (once changed, changed for every larger parameter);
        otherwise it is *a* flip inside the range, found in ``log2(1 / tol)`` evaluations.
    ``"scan"``
        Over an increasing ``grid``: the first grid value at which the prediction changes, each
        sample leaving the scan as soon as it has flipped. Exact on the grid, monotone or not.

In both modes ``value`` is an *achieved* change (``inf`` where none was found): when the parameter
is the size of a perturbation, an upper bound on the distance to the nearest input with another
prediction.

Example
-------
>>> import torch
>>> thresholds = torch.tensor([0.3, 2.0, 7.5])          # sample i flips once t >= thresholds[i]
>>> changed = lambda t, idx: t >= thresholds[idx]
>>> r = flip_search(changed, 3, mode="bisection", hi=5.0, tol=1e-6)
>>> [round(v, 4) for v in r.value.tolist()], r.found.tolist()
([0.3, 2.0, inf], [True, True, False])
>>> flip_search(changed, 3, mode="scan", grid=[1.0, 2.0, 4.0, 8.0]).value.tolist()
[1.0, 2.0, 8.0]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["FlipSearch", "flip_search", "MODES"]

MODES: tuple[str, ...] = ("bisection", "scan")

Predicate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FlipSearch:
    """The result of :func:`flip_search`, one entry per sample.

    Attributes
    ----------
    value
        float64 ``(N,)``: the parameter at which the prediction was seen to change (``inf``: not in
        the range searched).
    below
        float64 ``(N,)``: the largest parameter seen *not* to change it (``lo``, or the grid value
        before ``value``); for samples without a flip, the end of the range.
    found
        bool ``(N,)``: a change was found.
    evaluations
        Calls of the predicate (each on the samples still searched).
    mode
        ``"bisection"`` or ``"scan"``.
    """

    value: torch.Tensor
    below: torch.Tensor
    found: torch.Tensor
    evaluations: int
    mode: str


def _call(changed: Predicate, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    out = changed(t, idx)
    out = torch.as_tensor(out).reshape(-1).to(torch.bool).cpu()
    if out.numel() != idx.numel():
        raise ValueError(f"the predicate must return one bool per sample ({idx.numel()}), got {out.numel()}")
    return out


def flip_search(
    changed: Predicate,
    n: int,
    *,
    mode: str = "bisection",
    lo: float = 0.0,
    hi: float | None = None,
    grid: Sequence[float] | torch.Tensor | None = None,
    tol: float = 1e-3,
    max_steps: int = 64,
) -> FlipSearch:
    """The smallest parameter at which ``changed`` says a sample's prediction changes.

    Parameters
    ----------
    changed
        ``changed(t, idx)``: float64 parameters ``t`` and the LongTensor ``idx`` of the samples they
        belong to (same length); returns one bool per entry.
    n
        Number of samples.
    mode
        ``"bisection"`` (on ``[lo, hi]``, relative tolerance ``tol``) or ``"scan"`` (over ``grid``).
    lo, hi
        The bisection range; ``lo`` is assumed not to change the prediction (it is never evaluated).
    grid
        The increasing parameter values of a scan.
    tol
        Relative width ``(value - below) / value`` at which a bisection stops.
    max_steps
        A cap on bisection halvings (64 reach float64's resolution).

    Returns
    -------
    FlipSearch
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if int(n) < 1:
        raise ValueError(f"n must be a positive number of samples, got {n}")
    n = int(n)
    if mode == "scan":
        if grid is None or len(grid) == 0:
            raise ValueError("mode='scan' needs a non-empty increasing grid of parameters")
        g = torch.as_tensor(grid, dtype=torch.float64).reshape(-1)
        if not bool(torch.isfinite(g).all()) or bool((g[1:] <= g[:-1]).any()):
            raise ValueError("the grid must be finite and strictly increasing")
        return _scan(changed, n, g, lo)
    if hi is None or not (math.isfinite(hi) and math.isfinite(lo) and hi > lo):
        raise ValueError(f"mode='bisection' needs a finite range lo < hi, got lo={lo}, hi={hi}")
    if not (tol > 0):
        raise ValueError(f"tol must be positive, got {tol}")
    return _bisect(changed, n, float(lo), float(hi), tol, max_steps)


def _scan(changed: Predicate, n: int, grid: torch.Tensor, lo: float) -> FlipSearch:
    value = torch.full((n,), math.inf, dtype=torch.float64)
    below = torch.full((n,), float(lo), dtype=torch.float64)
    active = torch.arange(n)
    calls = 0
    for t in grid:
        if active.numel() == 0:
            break
        hit = _call(changed, t.expand(active.numel()).clone(), active)
        calls += 1
        value[active[hit]] = t
        below[active[~hit]] = t
        active = active[~hit]
    return FlipSearch(value, below, torch.isfinite(value), calls, "scan")


def _bisect(changed: Predicate, n: int, lo: float, hi: float, tol: float, max_steps: int) -> FlipSearch:
    idx = torch.arange(n)
    top = torch.full((n,), hi, dtype=torch.float64)
    found = _call(changed, top.clone(), idx)
    calls = 1
    lower = torch.full((n,), lo, dtype=torch.float64)
    upper = top.clone()
    for _ in range(max_steps):
        open_ = found & ((upper - lower) > tol * upper)
        if not bool(open_.any()):
            break
        rows = torch.nonzero(open_).flatten()
        mid = (lower[rows] + upper[rows]) / 2
        hit = _call(changed, mid, rows)
        calls += 1
        upper[rows[hit]] = mid[hit]
        lower[rows[~hit]] = mid[~hit]
    value = torch.where(found, upper, torch.full_like(upper, math.inf))
    below = torch.where(found, lower, top)
    return FlipSearch(value, below, found, calls, "bisection")

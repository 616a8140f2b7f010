"""Distances between sets given by samples: point to set, excess, Pompeiu-Hausdorff.

Paper: X. Wang, F. Wang and X. Ban, *Set-Valued Sensitivity Analysis of Deep Neural Networks*,
AAAI 2025, Definition 1:

* ``d(w, C) = inf_{c in C} ||w - c||`` (:func:`distance`);
* the excess ``e(C, D) = sup_{c in C} d(c, D)`` (:func:`excess`; not symmetric: ``e(C, D) = 0``
  iff ``C`` lies in the closure of ``D``);
* the Pompeiu-Hausdorff distance ``h(C, D) = max(e(C, D), e(D, C))`` (:func:`hausdorff`).

Norm: Euclidean, computed pairwise in float64 without the ``||a||^2 + ||b||^2 - 2 a.b`` shortcut
(which loses digits for nearby points). Sets are finite samples: arrays of points ``(k, d)``, or
batches ``(B, k, d)`` of as many independent sets. The numbers are exact for the samples; for
continuous sets sampled with spacing ``s`` they are within ``s / 2`` of the continuum values when the
samples cover the sets to that spacing.

Example
-------
Two parallel segments at distance 1, one longer by 0.5 at one end:

>>> import torch
>>> t = torch.arange(151, dtype=torch.float64) / 100
>>> A = torch.stack([t[:101], torch.zeros(101, dtype=torch.float64)], 1)
>>> B = torch.stack([t, torch.ones_like(t)], 1)
>>> float(excess(A, B)), float(excess(B, A)), float(hausdorff(A, B)) == 1.25 ** 0.5
(1.0, 1.118033988749895, True)
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["distance", "excess", "hausdorff"]

Tensor = torch.Tensor
_BLOCK = 2**22  # pairwise distances held at once (float64 entries, 32 MB)


def _as_points(a, what: str) -> Tensor:
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(a)
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{what} must be a tensor or array of points, got {type(a).__name__}")
    if not (a.is_floating_point() or a.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{what} must hold real numbers, got dtype {a.dtype}")
    a = a.detach().to(torch.float64)
    if a.dim() not in (1, 2, 3):
        raise ValueError(f"{what} must be a point (d,), a set (k, d) or a batch of sets (B, k, d), "
                         f"got shape {tuple(a.shape)}")  # fmt: skip
    if a.numel() == 0 or (a.dim() >= 2 and a.shape[-2] == 0):
        raise ValueError(f"{what} is empty: distances to and from the empty set are not defined here")
    if not bool(torch.isfinite(a).all()):
        raise ValueError(f"{what} has non-finite entries (NaN or infinity)")
    return a


def _min_dist(P: Tensor, S: Tensor) -> Tensor:
    """``(B, m)`` distances from the points ``P (B, m, d)`` to the sets ``S (B, k, d)``."""
    B, m, _ = P.shape
    k = S.shape[1]
    step = max(1, _BLOCK // max(1, B * k))
    out = []
    for i in range(0, m, step):
        d = torch.cdist(P[:, i : i + step], S, compute_mode="donot_use_mm_for_euclid_dist")
        out.append(d.amin(-1))
    return torch.cat(out, 1)


def _pair(points, sets, pw: str, sw: str) -> tuple[Tensor, Tensor, int]:
    P, S = _as_points(points, pw), _as_points(sets, sw)
    if S.dim() == 1:
        raise ValueError(f"{sw} must be a set of points (k, d) or a batch (B, k, d), got one point")
    if P.shape[-1] != S.shape[-1]:
        raise ValueError(f"{pw} and {sw} live in different dimensions: {P.shape[-1]} and {S.shape[-1]}")
    ndim = max(P.dim(), S.dim())
    if S.dim() == 3 and P.dim() == 3 and P.shape[0] != S.shape[0]:
        raise ValueError(f"batch sizes differ: {P.shape[0]} and {S.shape[0]}")
    if P.dim() == 1:
        P = P[None]
    P = P if P.dim() == 3 else P[None]
    S = S if S.dim() == 3 else S[None]
    B = max(P.shape[0], S.shape[0])
    return P.expand(B, *P.shape[1:]), S.expand(B, *S.shape[1:]), ndim


def distance(point, points) -> Tensor:
    """``d(w, C)``: the distance from ``point`` to the sampled set ``points``.

    Parameters
    ----------
    point
        One point ``(d,)``, several ``(m, d)``, or a batch ``(B, m, d)``.
    points
        The set: ``(k, d)`` or a batch ``(B, k, d)`` (broadcast against ``point``).

    Returns
    -------
    Tensor
        float64: a scalar for one point and one set; ``(m,)`` for ``(m, d)`` and ``(k, d)``;
        ``(B, m)`` when either is batched.
    """
    one = isinstance(point, torch.Tensor | np.ndarray) and np.ndim(point) == 1
    P, S, ndim = _pair(point, points, "point", "points")
    d = _min_dist(P, S)
    if ndim == 3:
        return d
    return d[0, 0] if one else d[0]


def excess(A, B) -> Tensor:
    """``e(A, B) = max_{a in A} d(a, B)`` for sampled sets ``(k, d)`` (a scalar) or batches
    ``(N, k, d)`` (shape ``(N,)``)."""
    P, S, ndim = _pair(A, B, "A", "B")
    if _as_points(A, "A").dim() == 1:
        raise ValueError("A must be a set of points (k, d), not one point; use distance()")
    e = _min_dist(P, S).amax(-1)
    return e if ndim == 3 else e[0]


def hausdorff(A, B) -> Tensor:
    """``h(A, B) = max(e(A, B), e(B, A))`` for sampled sets ``(k, d)`` (a scalar) or batches
    ``(N, k, d)`` (shape ``(N,)``)."""
    return torch.maximum(excess(A, B), excess(B, A))

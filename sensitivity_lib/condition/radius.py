r"""Distances to the decision boundary predicted by the condition numbers: a certified lower bound and
the first-order (linearised) estimate.

Paper: Maheshwari et al., *An estimator for the sensitivity to perturbations of deep neural
networks* (arXiv:2307.12679): its abstract says the estimator's "tightness ... is explored via random
perturbations and adversarial attacks" (quoted). What follows is our reconstruction of the
connection between a condition number and the nearest input with another prediction (the book's
chapter *How tight is the estimator at the decision?*); the paper's own criterion is not public.

Norm
    The Euclidean norm of a change of one flattened input, in the model's input space.
Input space
    The model's own input: [0, 1] pixels for :class:`sensitivity_lib.zoo.Normalized` models (the
    normalisation is inside the model, and its ``1 / std`` is part of the Lipschitz bound). A radius
    of 1 is a change of one full grey-level range spread over the image in the 2-norm.
Shapes
    ``x`` is a batch ``(N, ...)``; each function returns an
    :class:`~sensitivity_lib.results.Estimate` with a float64 ``value`` of shape ``(N,)`` and
    ``extra["log2"]`` (the same in bits).

The two radii, for an input ``x`` predicted as class ``y`` with logits ``z``
    * :func:`certified_radius`: ``g / (sqrt(2) L)`` with ``g = z_y - max_{j != y} z_j`` the gap
      between the two largest logits and ``L`` the certified Lipschitz bound of the logits
      (:func:`~sensitivity_lib.condition.lipschitz.lipschitz_bound`, variant E1). For a change
      ``d``, each difference ``z_y - z_j`` moves by at most ``|(e_y - e_j)^T (z(x+d) - z(x))| <=
      sqrt(2) L ||d||``, so no change with ``||d|| < g / (sqrt(2) L)`` can make another class the
      largest: a *lower* bound on the distance to the nearest input with another prediction, for
      every input of the space (not only within [0, 1]).
    * :func:`first_order_radius`: ``min_j (z_y - z_j) / ||grad_x (z_y - z_j)||``, the distance to
      the nearest boundary of the linearised network: what the first step of DeepFool
      (Moosavi-Dezfooli et al., 2016) sees. Exact for an affine classifier, an *estimate* otherwise.
      Since ``||grad (z_y - z_j)|| <= sqrt(2) ||J(x)|| <= sqrt(2) L`` and ``z_y - z_j >= g``, it is
      never below the certified radius.

Example
-------
>>> import torch
>>> from torch import nn
>>> net = nn.Linear(4, 3).double().eval()            # affine: the linearisation is exact
>>> x = torch.rand(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
>>> r1, r0 = first_order_radius(net, x), certified_radius(net, x)
>>> r1.kind, r0.kind, bool((r0.value <= r1.value).all())
('estimate', 'lower', True)
>>> with torch.no_grad():                              # the exact distance to the nearest boundary
...     z, W = net(x), net.weight
>>> y = z.argmax(1)
>>> d = torch.tensor([min(float((z[i, y[i]] - z[i, j]) / (W[y[i]] - W[j]).norm())
...                       for j in range(3) if j != y[i]) for i in range(5)], dtype=torch.float64)
>>> bool(torch.allclose(r1.value, d))
True
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sensitivity_lib.condition._common import log2, unchecked
from sensitivity_lib.condition.lipschitz import lipschitz_bound
from sensitivity_lib.results import Estimate
from sensitivity_lib.validation import check_model_input

__all__ = ["certified_radius", "first_order_radius", "logit_gap"]


def logit_gap(logits: torch.Tensor) -> torch.Tensor:
    """``z_(1) - z_(2)``, the gap between the two largest logits of every row, float64 ``(N,)``."""
    top = logits.detach().to(torch.float64).topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def certified_radius(model: nn.Module, x: torch.Tensor, *, lipschitz: Estimate | None = None) -> Estimate:
    """Per input, ``g / (sqrt(2) L)``: no change of smaller 2-norm can alter the prediction.

    Parameters
    ----------
    model
        A classifier in eval mode that torch.fx can trace, mapping inputs to logits ``(N, C)``.
    x
        Batch ``(N, ...)`` in the model's input space ([0, 1] pixels for the book's models).
    lipschitz
        A precomputed ``lipschitz_bound(model, x.shape[1:])`` (logits) to reuse; it must be a
        certified upper bound for this input shape.

    Returns
    -------
    Estimate
        ``value`` float64 ``(N,)`` in input units, ``kind="lower"`` (a certified lower bound on the
        distance to the decision boundary; 0 where the two largest logits tie), ``norm="2"``;
        ``extra``: ``log2``, ``gap`` (float64 ``(N,)``), ``lipschitz`` (the bound used).

    Notes
    -----
    The certificate is about the exact function the network computes; evaluating the logits in
    float32 adds round-off of relative size about ``1e-7`` to ``g``, which matters only for inputs
    whose gap is that small.
    """
    check_model_input(model, x)
    L = lipschitz if lipschitz is not None else lipschitz_bound(model, tuple(x.shape[1:]))
    if not L.is_certified_upper:
        raise ValueError("certified_radius needs a certified upper Lipschitz bound (kind 'upper' or 'exact')")
    if L.extra.get("output", "logits") != "logits":
        raise ValueError("certified_radius needs the Lipschitz bound of the logits (output='logits')")
    if tuple(L.extra.get("input_shape", x.shape[1:])) != tuple(x.shape[1:]):
        raise ValueError(
            f"the given lipschitz bound is for input shape {L.extra['input_shape']}, not {tuple(x.shape[1:])}"
        )
    with torch.no_grad():
        z = model(x)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"the model must return logits (N, C) with C >= 2, got {tuple(z.shape)}")
    g = logit_gap(z).cpu()
    lg = log2(g) - 0.5 - float(L.extra.get("log2", math.log2(float(L.value))))
    return Estimate(
        torch.exp2(lg), "lower", method="gap/(sqrt2 L)", norm="2",
        extra={"log2": lg, "gap": g, "lipschitz": L},
    )  # fmt: skip


def first_order_radius(model: nn.Module, x: torch.Tensor, *, top: int = 10) -> Estimate:
    """Per input, ``min_j (z_y - z_j) / ||grad_x (z_y - z_j)||``: the linearised distance to the nearest
    decision boundary (what DeepFool's first step sees).

    Parameters
    ----------
    model
        A classifier in eval mode mapping inputs to logits ``(N, C)``; evaluated without its [0, 1]
        input check (the linearisation is not confined to the box).
    x
        Batch ``(N, ...)`` in the model's input space.
    top
        The classes ``j`` are those of the ``top`` largest logits (the prediction ``y`` among them),
        as DeepFool's ``nb_grads``; all classes when ``C <= top``. One backward pass per class rank,
        for the whole batch.

    Returns
    -------
    Estimate
        ``value`` float64 ``(N,)`` in input units, ``kind="estimate"``, ``norm="2"``; ``extra``:
        ``log2``, ``nearest`` (the class ``j`` attaining the minimum), ``gap`` (``z_y - z_j`` for
        that class) and ``gradient_norm`` (its ``||grad (z_y - z_j)||``).
    """
    check_model_input(model, x)
    if int(top) < 2:
        raise ValueError(f"top must be >= 2 (the prediction and at least one other class), got {top}")
    f = unchecked(model)
    xi = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        z = f(xi)
        if z.ndim != 2 or z.shape[1] < 2:
            raise ValueError(f"the model must return logits (N, C) with C >= 2, got {tuple(z.shape)}")
        k = min(int(top), z.shape[1])
        order = z.detach().topk(k, dim=1).indices  # column 0 is the prediction
        y = order[:, 0]
        rows = torch.arange(len(x), device=z.device)
        best = torch.full((len(x),), math.inf, dtype=torch.float64)
        nearest = torch.full((len(x),), -1, dtype=torch.int64)
        gap_at = torch.zeros(len(x), dtype=torch.float64)
        gnorm_at = torch.zeros(len(x), dtype=torch.float64)
        for r in range(1, k):
            j = order[:, r]
            u = torch.zeros_like(z)
            u[rows, y] = 1.0
            u[rows, j] = -1.0
            (grad,) = torch.autograd.grad(z, xi, u, retain_graph=r < k - 1)
            gn = grad.detach().flatten(1).to(torch.float64).norm(dim=1).cpu()
            diff = (z[rows, y] - z[rows, j]).detach().to(torch.float64).cpu()
            dist = torch.where(gn > 0, diff / gn, torch.full_like(diff, math.inf))
            better = dist < best
            best = torch.where(better, dist, best)
            nearest = torch.where(better, j.cpu(), nearest)
            gap_at = torch.where(better, diff, gap_at)
            gnorm_at = torch.where(better, gn, gnorm_at)
    return Estimate(
        best, "estimate", method="linearised (DeepFool step)", norm="2",
        extra={"log2": log2(best), "nearest": nearest, "gap": gap_at, "gradient_norm": gnorm_at, "top": k},
    )  # fmt: skip

"""Perturbations of inputs in [0, 1] pixel space: random directions, rounding to fewer bits, and the
smallest step along a direction that changes a prediction.

Norm: Euclidean (L2) over all C*H*W pixel values of one image, in [0, 1] pixel units; L-infinity
sizes are reported in 8-bit grey levels (1/255) where that reads better.

The adversarial direction used here is the normalised gradient of the cross-entropy loss
(the L2 fast gradient method of Goodfellow et al., 2015); :func:`smallest_flip` bisects the step
length along it. The step found is an *achieved* change of prediction, hence a certified upper bound
on the distance from ``x`` to the nearest input with another prediction; finding it this way is
cheap (one gradient, ~20 forward passes) but not optimal (minimal-norm attacks find shorter ones).

Example
-------
>>> import torch
>>> from sensitivity_lib import zoo, data
>>> m, x = zoo.lenet5(), data.mnist_test20().images[:2]
>>> d = gradient_direction(m, x)
>>> r = smallest_flip(m, x, d, max_norm=20.0)
>>> bool((m(x + r.value.view(-1, 1, 1, 1) * d).argmax(1) != m(x).argmax(1)).all())
True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sensitivity_lib.results import Estimate


def _unit(d: torch.Tensor) -> torch.Tensor:
    n = d.flatten(1).norm(dim=1).clamp_min(torch.finfo(d.dtype).tiny)
    return d / n.view(-1, *([1] * (d.ndim - 1)))


def random_directions(shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian directions of unit L2 norm per sample: shape (N, C, H, W)."""
    return _unit(torch.randn(shape, generator=generator))


def gradient_direction(model, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Unit L2 direction of steepest ascent of the cross-entropy loss at ``x`` (labels ``y``,
    default: the model's predictions). Shape (N, C, H, W)."""
    x = x.detach().clone().requires_grad_(True)
    logits = model(x)
    y = logits.argmax(1) if y is None else y
    (g,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x)
    return _unit(g)


@torch.no_grad()
def smallest_flip(
    model, x: torch.Tensor, direction: torch.Tensor, *, max_norm: float, tol: float = 1e-3, clip: bool = True
) -> Estimate:
    """Per sample, the smallest ``t`` in (0, max_norm] such that the prediction at ``x + t * direction``
    (clipped to [0, 1] if ``clip``) differs from the prediction at ``x``, found by bisection to
    relative tolerance ``tol``.

    Returns an :class:`~sensitivity_lib.results.Estimate` of kind ``"upper"`` (an achieved flip bounds
    the distance to the decision boundary from above) with one value per sample; ``inf`` where no flip
    happens up to ``max_norm``. ``extra["flipped_to"]`` holds the new labels (-1 where none).
    """
    if direction.shape != x.shape:
        raise ValueError(f"direction has shape {tuple(direction.shape)}, x has {tuple(x.shape)}")

    def labels_at(t: torch.Tensor) -> torch.Tensor:
        z = x + t.view(-1, 1, 1, 1) * direction
        return model(z.clamp(0.0, 1.0) if clip else z).argmax(1)

    y0 = model(x).argmax(1)
    hi = torch.full((len(x),), float(max_norm))
    found = labels_at(hi) != y0
    lo = torch.zeros(len(x))
    iterations = 0
    while bool(((hi - lo) > tol * hi)[found].any()):
        mid = (lo + hi) / 2
        flipped = labels_at(mid) != y0
        hi = torch.where(flipped & found, mid, hi)
        lo = torch.where(~flipped & found, mid, lo)
        iterations += 1
    new = labels_at(hi)
    value = torch.where(found, hi, torch.full_like(hi, float("inf")))
    return Estimate(
        value, "upper", method="bisection along direction", norm="2", iterations=iterations,
        residual=torch.where(found, (hi - lo) / hi, torch.zeros_like(hi)),
        extra={"flipped_to": torch.where(found, new, torch.full_like(new, -1))},
    )  # fmt: skip


def round_to_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round pixels in [0, 1] to the nearest of ``2**bits`` evenly spaced levels (``bits=8`` is what an
    8-bit image file stores). The rounding error per pixel is at most ``0.5 / (2**bits - 1)``."""
    if not 1 <= bits <= 24:
        raise ValueError(f"bits must be between 1 and 24, got {bits}")
    levels = 2**bits - 1
    return torch.round(x * levels) / levels

"""Perturbations of inputs and what they do: random and gradient directions, observed amplification,
and the smallest step or rounding that changes a prediction.

Norm: Euclidean (L2) over all ``C*H*W`` values of one sample, in the model's input units ([0, 1]
pixels for :class:`sensitivity_lib.zoo.Normalized` models).

The searches go through :func:`sensitivity_lib.search.flip_search`: :func:`smallest_flip` bisects the
step length along a direction (for the normalised gradient of the cross-entropy: the L2 fast gradient
method of Goodfellow et al., 2015, whose original form uses the gradient's sign); the step found is an
*achieved* change of prediction, hence an upper bound on the distance from ``x`` to the nearest input
with another prediction; cheap (one gradient, about 20 forward passes) but not optimal (minimal-norm
attacks find shorter ones). :func:`rounding_flip_bits` scans significand widths.

Example
-------
>>> import torch
>>> from sensitivity_lib import zoo, data
>>> m, x = zoo.lenet5(), data.mnist_test20().images[:2]
>>> d = gradient_direction(m, x)
>>> r = smallest_flip(m, x, d, max_norm=20.0)
>>> bool((m((x + r.value.float().view(-1, 1, 1, 1) * d).clamp(0, 1)).argmax(1) != m(x).argmax(1)).all())
True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sensitivity_lib.condition._common import check_output, norms, unchecked
from sensitivity_lib.precision.formats import round_float
from sensitivity_lib.results import Estimate
from sensitivity_lib.search import flip_search
from sensitivity_lib.validation import check_batch, check_model_input

__all__ = [
    "NOISE_KINDS",
    "random_directions",
    "gradient_direction",
    "smallest_flip",
    "rounding_flip_bits",
    "amplification",
    "max_amplification",
]


def _unit(d: torch.Tensor) -> torch.Tensor:
    n = d.flatten(1).norm(dim=1).clamp_min(torch.finfo(d.dtype).tiny)
    return d / n.view(-1, *([1] * (d.ndim - 1)))


#: The kinds of random direction :func:`random_directions` draws.
NOISE_KINDS: tuple[str, ...] = ("gaussian", "uniform", "rademacher")


def random_directions(
    shape: tuple[int, ...], generator: torch.Generator | None = None, *, kind: str = "gaussian"
) -> torch.Tensor:
    """Random directions of unit L2 norm per sample: shape ``(N, ...)``, float32.

    ``kind``: ``"gaussian"`` (independent standard normal entries: a direction uniform on the sphere),
    ``"uniform"`` (entries uniform on [-1, 1]) or ``"rademacher"`` (entries +-1 with equal odds),
    each then scaled to unit Euclidean norm per sample.
    """
    if kind == "gaussian":
        d = torch.randn(shape, generator=generator)
    elif kind == "uniform":
        d = 2 * torch.rand(shape, generator=generator) - 1
    elif kind == "rademacher":
        d = 2 * torch.randint(0, 2, shape, generator=generator).to(torch.float32) - 1
    else:
        raise ValueError(f"kind must be one of {NOISE_KINDS}, got {kind!r}")
    return _unit(d)


def gradient_direction(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Unit L2 direction of steepest ascent of the cross-entropy loss at ``x`` (labels ``y``,
    default: the model's predictions). Shape of ``x``."""
    check_model_input(model, x)
    x = x.detach().clone().requires_grad_(True)
    logits = model(x)
    y = logits.argmax(1) if y is None else y
    (g,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x)
    return _unit(g)


@torch.no_grad()
def smallest_flip(
    model: nn.Module, x: torch.Tensor, direction: torch.Tensor, *, max_norm: float, tol: float = 1e-3,
    clip: bool = True,
) -> Estimate:  # fmt: skip
    """Per sample, the smallest ``t`` in (0, max_norm] such that the prediction at ``x + t * direction``
    (clipped to [0, 1] if ``clip``) differs from the prediction at ``x``, by bisection to relative
    tolerance ``tol`` (:func:`sensitivity_lib.search.flip_search`).

    Returns an :class:`~sensitivity_lib.results.Estimate` of kind ``"upper"`` (an achieved flip bounds
    the distance to the decision boundary from above) with one value per sample; ``inf`` where no flip
    happens up to ``max_norm``. ``extra["flipped_to"]`` holds the new labels (-1 where none).
    """
    check_batch(x)
    if direction.shape != x.shape:
        raise ValueError(f"direction has shape {tuple(direction.shape)}, x has {tuple(x.shape)}")
    if not (max_norm > 0 and math.isfinite(max_norm)):
        raise ValueError(f"max_norm must be a positive number, got {max_norm}")

    def labels_at(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        z = x[idx] + t.to(x.dtype).view(-1, *([1] * (x.ndim - 1))) * direction[idx]
        return model(z.clamp(0.0, 1.0) if clip else z).argmax(1)

    y0 = model(x).argmax(1)

    def changed(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return labels_at(t, idx) != y0[idx]

    r = flip_search(changed, len(x), mode="bisection", hi=max_norm, tol=tol)
    idx = torch.arange(len(x))
    new = torch.where(r.found, labels_at(torch.where(r.found, r.value, r.below), idx), -1)
    return Estimate(
        r.value, "upper", method="bisection along direction", norm="2", iterations=r.evaluations,
        residual=torch.where(r.found, (r.value - r.below) / r.value, torch.zeros_like(r.value)),
        extra={"flipped_to": new, "below": r.below},
    )  # fmt: skip


@torch.no_grad()
def rounding_flip_bits(
    model: nn.Module, x: torch.Tensor, bits: range = range(1, 25), mode: str = "nearest"
) -> torch.Tensor:
    """Empirical bit-width: the smallest ``t`` such that rounding the input to every ``t' >= t``
    significand bits (within ``bits``) keeps the predicted class, per sample.

    A scan (:func:`sensitivity_lib.search.flip_search`) from the widest rounding to the narrowest,
    that is over increasing rounding errors ``2^-t``; a sample stops at its first change of class.

    Parameters
    ----------
    model, x
        A classifier and a batch in its input space.
    bits
        Increasing significand widths to try (default 1 ... 24).
    mode
        ``"nearest"``, ``"chop"`` or ``"stochastic"`` (see
        :func:`~sensitivity_lib.precision.formats.round_float`; unbounded exponent).

    Returns
    -------
    torch.Tensor
        int64 (N,); ``bits[-1] + 1`` where even the widest rounding flips the class, ``bits[0]`` where
        none does.
    """
    check_model_input(model, x)
    widths = list(bits)
    if not widths or widths != sorted(set(widths)):
        raise ValueError(f"bits must be a non-empty increasing range of widths, got {bits!r}")
    f = unchecked(model)
    y0 = f(x).argmax(1)

    def changed(size: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        t = int(round(-math.log2(float(size[0]))))
        return f(round_float(x[idx], t, mode=mode)).argmax(1) != y0[idx]

    sizes = [2.0**-t for t in reversed(widths)]  # increasing rounding errors
    r = flip_search(changed, len(x), mode="scan", grid=sizes)
    flip_at = torch.round(-torch.log2(r.value.clamp_max(1.0))).to(torch.int64)
    return torch.where(r.found, flip_at + 1, torch.full_like(flip_at, widths[0]))


def amplification(
    model: nn.Module, x: torch.Tensor, d: torch.Tensor, *, output: str = "logits", relative: bool = False
) -> torch.Tensor:
    """Observed amplification of a perturbation ``d``, per sample (float64).

    ``||f(x + d) - f(x)|| / ||d||`` (absolute; never above the Lipschitz constant), or with
    ``relative=True`` ``(||f(x + d) - f(x)|| / ||f(x)||) / (||d|| / ||x||)`` (never above E1).
    ``x + d`` may leave [0, 1]: a ``zoo.Normalized`` model is evaluated without its input check.

    Parameters
    ----------
    model, x, output
        As in :func:`~sensitivity_lib.condition.local.local_condition`.
    d
        Perturbations, same shape as ``x``.

    Returns
    -------
    torch.Tensor
        float64 (N,).
    """
    check_output(output)
    check_batch(x)
    if d.shape != x.shape:
        raise ValueError(f"d has shape {tuple(d.shape)}, x has {tuple(x.shape)}")
    plain = unchecked(model)

    def f(z: torch.Tensor) -> torch.Tensor:
        y = plain(z)
        return (torch.softmax(y, dim=-1) if output == "probs" else y).reshape(len(z), -1)

    with torch.no_grad():
        fx, fxd = f(x), f(x + d)
    ratio = norms(fxd - fx) / norms(d)
    if relative:
        ratio = ratio * norms(x) / norms(fx)
    return ratio


def max_amplification(
    model: nn.Module,
    x: torch.Tensor,
    radius: float | torch.Tensor,
    *,
    output: str = "logits",
    steps: int = 20,
    lr: float = 0.1,
    init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Estimate:
    """Adversarial perturbations: gradient ascent of ``||f(x + d) - f(x)||`` on ``||d|| = radius``.

    ``d = radius * z / ||z||`` and Adam (step ``lr``) maximises the observed amplification
    ``||f(x + d) - f(x)|| / ||d||`` over ``z``; the best value met is kept. Starting from ``init``
    (e.g. ``extra["right"]`` of :func:`~sensitivity_lib.condition.local.jacobian_norm`, the
    first-order worst direction) or a random direction.

    Parameters
    ----------
    model, x, output
        As in :func:`~sensitivity_lib.condition.local.local_condition`.
    radius
        ``||d||`` per sample (float or tensor (N,)), in the units of ``x``.
    steps, lr, init, generator
        Ascent steps, Adam learning rate (on the unit direction), start, random start.

    Returns
    -------
    Estimate
        ``value`` float64 (N,): achieved amplifications, ``kind="lower"`` (a lower bound on the
        Lipschitz constant of ``f`` on the ball, hence on every certified upper bound);
        ``extra["d"]``: the best perturbations.
    """
    check_output(output)
    check_model_input(model, x)
    plain = unchecked(model)
    x = x.detach()
    r = torch.as_tensor(radius, dtype=x.dtype, device=x.device).reshape(-1)
    r = r.expand(len(x)).reshape(-1, *([1] * (x.ndim - 1)))

    def f(z: torch.Tensor) -> torch.Tensor:
        y = plain(z)
        return (torch.softmax(y, dim=-1) if output == "probs" else y).reshape(len(z), -1)

    with torch.no_grad():
        fx = f(x)
    z0 = init.detach().to(x.dtype) if init is not None else torch.randn(x.shape, generator=generator).to(x)
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    best = torch.zeros(len(x), dtype=torch.float64)
    best_d = torch.zeros_like(x)
    for _ in range(steps + 1):
        with torch.enable_grad():
            d = r * z / z.flatten(1).norm(dim=1).clamp_min(1e-30).reshape(r.shape)
            gain = (f(x + d) - fx).norm(dim=1)
            ratio = gain.detach().to(torch.float64) / r.reshape(-1).to(torch.float64)
            better = ratio > best
            best = torch.where(better, ratio, best)
            best_d[better] = d.detach()[better]
            opt.zero_grad()
            (-gain.sum()).backward()
        opt.step()
    return Estimate(
        value=best, kind="lower", method="gradient-ascent", norm="2", iterations=steps,
        extra={"d": best_d, "radius": r.reshape(-1), "output": output},
    )  # fmt: skip

"""Which layers need the most bits: measured, per-layer condition numbers, Hessian traces, SQNR.

Three rankings of the layers of a network, to be set against the measured one (round one layer at a
time, :func:`layer_bits`):

* per-layer condition numbers ``kappa_l = ||J_{w_l}|| ||w_l|| / ||f(x)||`` (the logits' Jacobian with
  respect to layer ``l``'s parameters), whose bits are
  :func:`~sensitivity_lib.precision.margin.min_input_bits` of them (:func:`layer_condition`); our
  reconstruction in the spirit of Maheshwari et al. (arXiv:2307.12679);
* the curvature that Hessian-aware quantisation uses (HAWQ, Dong et al., ICCV 2019; HAWQ-V2,
  NeurIPS 2020): the trace of the cross-entropy loss's Hessian with respect to each layer's
  parameters, estimated by Hutchinson's method (Hutchinson, 1989): ``E[v^T H v] = tr(H)`` for
  Rademacher ``v``, one Hessian-vector product (``torch.func``, forward over reverse) per draw
  (:func:`hessian_trace`);
* the signal-to-quantisation-noise ratio of every layer's output in dB, the number PyTorch's
  quantisation debugging tools (``torch.ao.ns``) report (:func:`layer_sqnr`, :func:`sqnr_db`):
  ``10 log10(||a||^2 / ||a~ - a||^2)``, about 6.02 dB per significand bit.

Norms: Euclidean, per image (condition numbers, SQNR) or over the batch (the Hessian of the mean loss).

Example
-------
>>> import torch
>>> sqnr_db(torch.ones(4), torch.ones(4) * 1.01).round().item()        # 10 log10(1 / 1e-4) = 40
40.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sensitivity_lib.precision.bits import measured_bits, weight_condition
from sensitivity_lib.precision.formats import Format, as_format
from sensitivity_lib.precision.quantize import activation_layers, layer_outputs, quantized, weight_layers
from sensitivity_lib.results import Estimate
from sensitivity_lib.validation import check_model_input

__all__ = ["layer_bits", "layer_condition", "hessian_trace", "sqnr_db", "layer_sqnr"]


def layer_bits(
    model: nn.Module,
    x: torch.Tensor,
    target: str = "weights",
    *,
    layers: Sequence[str] | None = None,
    kind: str = "float",
    mode: str = "nearest",
    bits: Sequence[int] = range(1, 17),
    criterion: str = "flip",
) -> dict[str, torch.Tensor]:
    """Measured bits of each layer alone: only layer ``l``'s weights (``target="weights"``) or output
    (``"activations"``) rounded, per image (:func:`~sensitivity_lib.precision.bits.measured_bits`,
    whose ``criterion`` this passes on).

    Returns
    -------
    dict
        ``{layer name: int64 (N,)}``, in the model's order.
    """
    if target not in ("weights", "activations"):
        raise ValueError(f"target must be 'weights' or 'activations', got {target!r}")
    names = list(layers) if layers is not None else (
        weight_layers(model) if target == "weights" else activation_layers(model))  # fmt: skip
    return {
        n: measured_bits(model, x, target, kind=kind, mode=mode, bits=bits, layers=[n], criterion=criterion)
        for n in names
    }


def layer_condition(
    model: nn.Module,
    x: torch.Tensor,
    *,
    layers: Sequence[str] | None = None,
    tol: float = 1e-2,
    max_iter: int = 100,
    generator: torch.Generator | None = None,
) -> dict[str, Estimate]:
    """Per layer with weights, ``kappa_l(x) = ||J_{w_l}|| ||w_l|| / ||f(x)||`` per image
    (:func:`~sensitivity_lib.precision.bits.weight_condition` on that layer alone)."""
    names = list(layers) if layers is not None else weight_layers(model)
    return {
        n: weight_condition(model, x, layers=[n], tol=tol, max_iter=max_iter, generator=generator)
        for n in names
    }


def hessian_trace(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    layers: Sequence[str] | None = None,
    samples: int = 32,
    generator: torch.Generator | None = None,
) -> dict[str, Estimate]:
    """Hutchinson's estimate of ``tr(H_l)``, the Hessian of the mean cross-entropy over ``x`` with
    respect to layer ``l``'s parameters, per layer with weights.

    ``tr(H) = E[v^T H v]`` for ``v`` with independent Rademacher (+-1) entries; ``samples`` draws,
    each one Hessian-vector product (``torch.func.jvp`` of ``torch.func.grad``). ``labels``
    default to the model's own predictions.

    Returns
    -------
    dict
        ``{layer: Estimate}`` with ``value`` the mean of the draws (float64 scalar tensor),
        ``kind="estimate"``, ``residual`` its standard error, ``extra``: ``per_parameter``
        (``tr(H) / n``, HAWQ-V2's average trace), ``n``, ``draws``.

    Example
    -------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(3, 2)).double().eval()
    >>> x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> h = hessian_trace(net, x, samples=400, generator=torch.Generator().manual_seed(1))["0"]
    >>> w, b, y = net[0].weight, net[0].bias, net(x).argmax(1)
    >>> loss = lambda v: F.cross_entropy(x @ v[:6].view(2, 3).T + v[6:], y)
    >>> exact = torch.func.hessian(loss)(torch.cat([w.flatten(), b])).detach().trace()
    >>> bool(abs(h.value - exact) < 4 * h.residual)
    True
    """
    check_model_input(model, x)
    if int(samples) < 2:
        raise ValueError(f"samples must be >= 2, got {samples}")
    names = list(layers) if layers is not None else weight_layers(model)
    modules = dict(model.named_modules())
    if labels is None:
        with torch.no_grad():
            labels = model(x).argmax(1)
    out: dict[str, Estimate] = {}
    for n in names:
        params = {
            f"{n}.{k}": p.detach()
            for k, p in modules[n].named_parameters(recurse=False)
            if p.is_floating_point()
        }

        def loss(p: dict) -> torch.Tensor:
            return F.cross_entropy(torch.func.functional_call(model, p, (x,), strict=False), labels)

        g = torch.func.grad(loss)
        draws = []
        for _ in range(int(samples)):
            v = {
                k: (torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p.dtype).to(p.device)
                for k, p in params.items()
            }
            hv = {k: t.detach() for k, t in torch.func.jvp(g, (params,), (v,))[1].items()}
            draws.append(sum(float((v[k].double() * hv[k].double()).sum()) for k in params))
        d = torch.tensor(draws, dtype=torch.float64)
        m = sum(p.numel() for p in params.values())
        se = d.std() / math.sqrt(len(d))
        out[n] = Estimate(
            value=d.mean(), kind="estimate", method="hutchinson", norm="trace", iterations=len(d),
            residual=se, extra={"per_parameter": d.mean() / m, "n": m, "draws": d},
        )  # fmt: skip
    return out


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """``10 log10(||reference||^2 / ||approx - reference||^2)`` in dB over the whole tensor
    (``inf`` where they are equal)."""
    r = reference.detach().to(torch.float64)
    e = approx.detach().to(torch.float64) - r
    return 10 * torch.log10(r.pow(2).sum() / e.pow(2).sum())


def layer_sqnr(
    model: nn.Module,
    x: torch.Tensor,
    fmt: str | Format,
    *,
    target: str = "activations",
    layers: Sequence[str] | None = None,
    mode: str = "nearest",
) -> dict[str, float]:
    """SQNR in dB of every layer's output when ``target`` (``"weights"``, ``"activations"`` or
    ``"all"``, which rounds the input too) is rounded to ``fmt`` throughout the network, against the
    exact model: the errors of earlier layers included, as PyTorch's numeric suite compares a float
    model with its quantised copy layer by layer.

    Returns
    -------
    dict
        ``{"layer#k": dB}`` over the batch (float), ``k`` counting the calls of a shared module.
    """
    check_model_input(model, x)
    if target not in ("weights", "activations", "all"):
        raise ValueError(f"target must be 'weights', 'activations' or 'all', got {target!r}")
    f = as_format(fmt)
    names = list(layers) if layers is not None else activation_layers(model)
    q = quantized(
        model, inputs=f if target == "all" else None,
        weights=f if target in ("weights", "all") else None,
        activations=f if target in ("activations", "all") else None, mode=mode,
    )  # fmt: skip

    exact, rounded = layer_outputs(model, x, names), layer_outputs(q.model, x, names, call=q)
    return {k: float(sqnr_db(exact[k], rounded[k])) for k in exact}

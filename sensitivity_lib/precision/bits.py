"""Bits for inputs, weights and activations: predicted from condition numbers, measured by rounding.

Paper: Maheshwari et al. (arXiv:2307.12679): the estimator exists "to determine minimal bit-width
precision that may be used to safely represent the network", for perturbations "in input and model
parameters" (quoted). The predictions below are **our reconstruction** (the book's chapter *From a
condition number to bits*).

Norm and spaces
    Euclidean norms of one sample: the input in the model's input space ([0, 1] pixels for
    ``zoo.Normalized`` models), the logits at the output, all parameters of the chosen layers as one
    vector, all outputs of the chosen layers (:func:`~sensitivity_lib.precision.quantize.activation_layers`)
    as one vector.
Condition numbers (relative, per image)
    * inputs, ``kappa_x = ||J_x|| ||x|| / ||y||``: E0 (first order) and E1 (certified);
    * weights, ``kappa_w = ||J_w|| ||w|| / ||y||``, ``J_w`` the Jacobian of the logits with respect
      to the parameters (:func:`weight_condition`);
    * activations, ``kappa_a = ||J_a|| ||a|| / ||y||``, ``J_a`` the Jacobian of the logits with
      respect to perturbations added to the layers' outputs (:func:`activation_condition`).

    All three are Lanczos estimates of ``||J||`` (:func:`sensitivity_lib.krylov.top_singular`),
    matrix-free by ``torch.func`` (``jvp`` / ``vjp``).
Bits (:func:`predicted_bits`)
    Rounding to ``t`` significand bits moves every entry by at most ``2^-t`` relatively, so each
    vector by at most ``2^-t`` of its norm, and the logits by ``kappa ||y|| 2^-t`` to first order;
    the decision holds while that is below ``g / sqrt(2)``
    (:func:`~sensitivity_lib.precision.margin.bits_for_amplification`). All three together: the
    amplifications add (first order). Fixed point with ``f`` fractional bits moves a vector of ``n``
    entries by at most ``sqrt(n) 2^-(f+1)``, so ``||J|| sqrt(n) / 2`` replaces ``kappa ||y||``.
    Chopping and stochastic rounding err by up to one unit in the last place: one bit more.
Measured bits (:func:`measured_bits`)
    The smallest width ``t`` such that rounding to every width from ``t`` up to the widest tried
    changes no prediction, per image, by :func:`sensitivity_lib.search.flip_search` (a scan from wide
    to narrow), through :func:`~sensitivity_lib.precision.quantize.quantized`.

Example
-------
>>> import torch
>>> from torch import nn
>>> torch.manual_seed(0) and None
>>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
>>> x = torch.rand(2, 4, dtype=torch.float64)
>>> t = measured_bits(net, x, "weights")
>>> bool((t >= 1).all()), t.dtype
(True, torch.int64)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from sensitivity_lib.condition.lipschitz import global_condition
from sensitivity_lib.condition.local import local_condition
from sensitivity_lib.krylov import LinearOperator, top_singular
from sensitivity_lib.precision.formats import FORMATS, fixed_format, float_format
from sensitivity_lib.precision.margin import bits_for_amplification, logit_margin
from sensitivity_lib.precision.quantize import activation_layers, layer_outputs, quantized, weight_layers
from sensitivity_lib.results import Estimate
from sensitivity_lib.search import flip_search
from sensitivity_lib.validation import check_model_input

__all__ = [
    "TARGETS",
    "KINDS",
    "weight_condition",
    "activation_condition",
    "predicted_bits",
    "measured_bits",
    "BitReport",
    "recommend_bits",
]

#: What is rounded, the input, the weights, the layers' outputs, or all three.
TARGETS: tuple[str, ...] = ("inputs", "weights", "activations", "all")
#: Floating point (significand bits) or fixed point (fractional bits).
KINDS: tuple[str, ...] = ("float", "fixed")


def _norms(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(t.shape[0], -1).to(torch.float64).norm(dim=1)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).reshape(len(x), -1)


def _estimate(r, scale: torch.Tensor, y: torch.Tensor, method: str, extra: dict[str, Any]) -> Estimate:  # noqa: ANN001
    yn = _norms(y)
    lg = torch.log2(r.value) + torch.log2(scale) - torch.log2(yn)
    return Estimate(
        value=torch.exp2(lg), kind="estimate", method=method, norm="2", iterations=int(r.iterations.max()),
        residual=r.residual, converged=r.converged,
        extra={"log2": lg, "jacobian_norm": r.value, "scale": scale, "f_norm": yn, **extra},
    )  # fmt: skip


def _layer_names(model: nn.Module, layers: Sequence[str] | None, default: list[str], what: str) -> list[str]:
    """``layers`` (``default`` when None) as a list of module names of ``model``; a clear error
    naming the unknown ones, and listing ``default`` as ``what``, otherwise (or when empty)."""
    names = list(layers) if layers is not None else default
    modules = dict(model.named_modules())
    bad = [n for n in names if n not in modules]
    if bad or not names:
        raise ValueError(f"no such layer(s) {bad or names}; {what}: {default}")
    return names


def weight_condition(
    model: nn.Module,
    x: torch.Tensor,
    *,
    layers: Sequence[str] | None = None,
    tol: float = 1e-2,
    max_iter: int = 100,
    generator: torch.Generator | None = None,
) -> Estimate:
    """``kappa_w(x) = ||J_w(x)||_2 ||w|| / ||f(x)||``: the relative condition number of the logits
    with respect to the parameters ``w`` of ``layers`` (default every layer with weights), per image.

    ``J_w(x)`` is the (C x P) Jacobian of one image's logits with respect to the P parameters;
    ``||J_w||_2`` comes from Lanczos on ``J_w J_w^T`` in the output space (one ``jvp`` and one
    ``vjp`` through ``torch.func.functional_call`` per iteration), one image at a time (a vector of
    P float64 numbers is the memory it needs). A first-order quantity
    (``kind="estimate"``): the Ritz value is never above ``||J_w||``, and the bits it predicts are
    not certified.

    Returns
    -------
    Estimate
        ``value`` float64 (N,); ``extra``: ``log2``, ``jacobian_norm``, ``scale`` (``||w||``),
        ``f_norm``, ``layers``.
    """
    check_model_input(model, x)
    names = _layer_names(model, layers, weight_layers(model), "layers with weights")
    modules = dict(model.named_modules())
    params = {
        f"{n}.{k}" if n else k: p.detach()
        for n in names for k, p in modules[n].named_parameters(recurse=False) if p.is_floating_point()
    }  # fmt: skip
    keys = list(params)
    sizes = [params[k].numel() for k in keys]
    P = sum(sizes)
    y = _logits(model, x)
    C = y.shape[1]

    def one(xi: torch.Tensor) -> LinearOperator:
        """The operator of one image (its P-vectors are the memory: one image at a time)."""

        def f(p: dict) -> torch.Tensor:
            return torch.func.functional_call(model, p, (xi,), strict=False).reshape(1, -1)

        state: dict = {}

        def matvec(v: torch.Tensor) -> torch.Tensor:
            parts = torch.split(v[0].to(x.dtype), sizes)
            tangent = {k: t.view_as(params[k]) for k, t in zip(keys, parts, strict=True)}
            return torch.func.jvp(f, (params,), (tangent,))[1].detach().double()

        def rmatvec(u: torch.Tensor) -> torch.Tensor:
            if "vjp" not in state:
                state["vjp"] = torch.func.vjp(f, params)[1]
            (g,) = state["vjp"](u.to(x.dtype))
            return torch.cat([g[k].reshape(-1) for k in keys]).detach().double()[None]

        return LinearOperator(
            matvec, rmatvec, in_shape=(P,), out_shape=(C,), batch=1, dtype=torch.float64, device=x.device
        )

    runs = [
        top_singular(
            one(x[i : i + 1].detach()), side="output", tol=tol, max_iter=max_iter, generator=generator
        )
        for i in range(len(x))
    ]
    r = SimpleNamespace(
        value=torch.cat([q.value for q in runs]),
        iterations=torch.cat([q.iterations.reshape(-1) for q in runs]),
        residual=torch.cat([q.residual.reshape(-1) for q in runs]),
        converged=torch.cat([q.converged.reshape(-1) for q in runs]),
    )  # fmt: skip
    w = torch.sqrt(sum(params[k].double().pow(2).sum() for k in keys))
    return _estimate(r, w.expand(len(x)), y, "weights:lanczos", {"layers": names, "n": P})


def _with_deltas(model: nn.Module, names: Sequence[str]):  # noqa: ANN202
    """``F(x, deltas)``: the model with ``deltas["name#k"]`` added to the ``k``-th output of the
    module ``name``."""
    modules = dict(model.named_modules())

    def F(x: torch.Tensor, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
        calls = dict.fromkeys(names, 0)

        def hook(n: str):  # noqa: ANN202
            def h(m, a, out):  # noqa: ANN001, ANN202
                k = calls[n]
                calls[n] += 1
                return out + deltas[f"{n}#{k}"]

            return h

        handles = [modules[n].register_forward_hook(hook(n)) for n in names]
        try:
            return model(x).reshape(len(x), -1)
        finally:
            for h in handles:
                h.remove()

    return F


def activation_condition(
    model: nn.Module,
    x: torch.Tensor,
    *,
    layers: Sequence[str] | None = None,
    tol: float = 1e-2,
    max_iter: int = 100,
    generator: torch.Generator | None = None,
) -> Estimate:
    """``kappa_a(x) = ||J_a(x)||_2 ||a(x)|| / ||f(x)||``: the relative condition number of the
    logits with respect to the outputs ``a`` of ``layers`` (default
    :func:`~sensitivity_lib.precision.quantize.activation_layers`), taken together, per image.

    ``J_a`` maps perturbations added to every chosen layer's output (each propagating through the
    rest of the network) to the change of the logits, to first order; ``||a||`` is the norm of all
    those outputs at ``x``. One batched ``jvp`` and ``vjp`` per Lanczos iteration. A first-order
    estimate (``kind="estimate"``).

    Returns
    -------
    Estimate
        ``value`` float64 (N,); ``extra``: ``log2``, ``jacobian_norm``, ``scale`` (``||a||``),
        ``f_norm``, ``layers``, ``n`` (entries of ``a`` per image).
    """
    check_model_input(model, x)
    names = _layer_names(model, layers, activation_layers(model), "the layers")
    seen = layer_outputs(model, x, names)
    y = _logits(model, x)
    missing = [n for n in names if f"{n}#0" not in seen]
    if missing:
        raise ValueError(f"layers {missing} are never called in the forward pass")
    keys = list(seen)
    shapes = {k: tuple(seen[k].shape[1:]) for k in keys}
    sizes = [math.prod(shapes[k]) for k in keys]
    scale = torch.sqrt(sum(_norms(seen[k]) ** 2 for k in keys))
    F = _with_deltas(model, names)

    def make(xs: torch.Tensor) -> LinearOperator:
        zeros = {k: torch.zeros((len(xs), *shapes[k]), dtype=x.dtype, device=x.device) for k in keys}
        state: dict = {}

        def matvec(v: torch.Tensor) -> torch.Tensor:
            parts = torch.split(v.to(x.dtype), sizes, dim=1)
            t = {k: p.reshape(len(xs), *shapes[k]) for k, p in zip(keys, parts, strict=True)}
            return torch.func.jvp(lambda d: F(xs, d), (zeros,), (t,))[1].detach().double()

        def rmatvec(u: torch.Tensor) -> torch.Tensor:
            if "vjp" not in state:
                state["vjp"] = torch.func.vjp(lambda d: F(xs, d), zeros)[1]
            (g,) = state["vjp"](u.to(x.dtype))
            return torch.cat([g[k].reshape(len(xs), -1) for k in keys], dim=1).detach().double()

        return LinearOperator(
            matvec, rmatvec, in_shape=(sum(sizes),), out_shape=(y.shape[1],), batch=len(xs),
            dtype=torch.float64, device=x.device, restrict=lambda idx: make(xs[idx]),
        )  # fmt: skip

    r = top_singular(make(x.detach()), side="output", tol=tol, max_iter=max_iter, generator=generator)
    return _estimate(r, scale, y, "activations:lanczos", {"layers": names, "n": sum(sizes)})


def _check(kind: str, mode: str) -> int:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if mode not in ("nearest", "chop", "stochastic"):
        raise ValueError(f"mode must be 'nearest', 'chop' or 'stochastic', got {mode!r}")
    return 0 if mode == "nearest" else 1


def predicted_bits(
    model: nn.Module,
    x: torch.Tensor,
    *,
    kind: str = "float",
    mode: str = "nearest",
    certified: bool = True,
    conditions: dict[str, Estimate] | None = None,
    tol: float = 1e-2,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Predicted bits per image for inputs, weights, activations and all three together.

    Keys ``"<target> first-order"`` for every target in :data:`TARGETS` and ``"inputs certified"``
    (from E1, when ``certified``): float64 (N,) bit counts (significand bits for ``kind="float"``,
    fractional bits for ``"fixed"``). ``conditions`` may hold precomputed Estimates under
    ``"E0"``, ``"E1"``, ``"weights"``, ``"activations"``; the ones computed are returned in
    ``out["conditions"]``.

    Example
    -------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(3, 2)).double().eval()
    >>> x = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    >>> with torch.no_grad():
    ...     _ = net[0].weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    ...     _ = net[0].bias.zero_()
    >>> p = predicted_bits(net, x)            # y = (1, 0), J = W: kappa_x = 1, t = 0.5 + log2(1 / 1)
    >>> p["inputs first-order"].item(), p["inputs certified"].item()
    (1.0, 1.0)
    """
    extra_bit = _check(kind, mode)
    check_model_input(model, x)
    c = dict(conditions or {})
    if "E0" not in c:
        c["E0"] = local_condition(model, x, tol=tol, generator=generator)
    if certified and "E1" not in c:
        c["E1"] = global_condition(model, x)
    if "weights" not in c:
        c["weights"] = weight_condition(model, x, tol=tol, generator=generator)
    if "activations" not in c:
        c["activations"] = activation_condition(model, x, tol=tol, generator=generator)
    y = _logits(model, x).double()
    yn = _norms(y)

    def amp(e: Estimate, n: int | None) -> torch.Tensor:
        """The logits' change per unit 2^-t: kappa ||y|| (float) or ||J|| sqrt(n) / 2 (fixed)."""
        if kind == "float":
            return torch.exp2(e.extra["log2"]) * yn
        return (
            torch.exp2(e.extra["log2"]) * yn / e.extra.get("scale", e.extra.get("x_norm")) * math.sqrt(n) / 2
        )

    n_in = x[0].numel()
    a = {
        "inputs": amp(c["E0"], n_in),
        "weights": amp(c["weights"], c["weights"].extra["n"]),
        "activations": amp(c["activations"], c["activations"].extra["n"]),
    }
    a["all"] = a["inputs"] + a["weights"] + a["activations"]
    out: dict[str, Any] = {f"{k} first-order": bits_for_amplification(v, y) + extra_bit for k, v in a.items()}
    if certified:
        out["inputs certified"] = bits_for_amplification(amp(c["E1"], n_in), y) + extra_bit
    out["conditions"] = c
    return out


def measured_bits(
    model: nn.Module,
    x: torch.Tensor,
    target: str = "inputs",
    *,
    kind: str = "float",
    mode: str = "nearest",
    bits: Sequence[int] = range(1, 17),
    layers: Sequence[str] | None = None,
    exponent_bits: int | None = None,
    int_bits: int | None = None,
    criterion: str = "flip",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per image, the smallest width ``t`` in ``bits`` such that rounding ``target`` to every width
    from ``t`` to ``max(bits)`` changes no prediction (a scan by
    :func:`sensitivity_lib.search.flip_search` from wide to narrow).

    With ``criterion="margin"`` the test is the one the predictions bound instead: the logits move
    by less than ``g / sqrt(2)`` (``g`` the gap between the top two), so that no change of that
    size in any direction could flip the decision. It is a continuous, hence finer, measurement
    of the same sensitivity (a flip implies it is violated, not conversely).

    Parameters
    ----------
    model, x
        A classifier in eval mode and a batch in its input space.
    target
        ``"inputs"``, ``"weights"``, ``"activations"`` or ``"all"``.
    kind
        ``"float"`` (``t`` significand bits, exponent ``exponent_bits``: ``None`` unbounded) or
        ``"fixed"`` (``t`` fractional bits, ``int_bits`` integer bits: ``None`` unbounded).
    mode, generator
        The rounding (``"stochastic"`` draws from ``generator``; the scan then reports the first
        width at which a draw flips).
    bits
        The widths tried, increasing.
    layers
        Round only these layers' weights or outputs (``target`` ``"weights"`` or ``"activations"``).
    criterion
        ``"flip"`` (the prediction changes) or ``"margin"`` (the logits move by ``g / sqrt(2)``).

    Returns
    -------
    torch.Tensor
        int64 (N,): ``min(bits)`` where no width flips, ``max(bits) + 1`` where even the widest does.
    """
    _check(kind, mode)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    check_model_input(model, x)
    widths = [int(b) for b in bits]
    if not widths or widths != sorted(set(widths)) or widths[0] < 1:
        raise ValueError(f"bits must be an increasing sequence of widths >= 1, got {bits!r}")
    if layers is not None and target not in ("weights", "activations"):
        raise ValueError("layers= applies to target 'weights' or 'activations'")
    if criterion not in ("flip", "margin"):
        raise ValueError(f"criterion must be 'flip' or 'margin', got {criterion!r}")
    logits = _logits(model, x)
    y0 = logits.argmax(1)
    limit = logit_margin(logits) / math.sqrt(2)
    cache: dict[int, nn.Module] = {}

    def model_at(t: int) -> nn.Module:
        if t not in cache:
            fmt = float_format(t, exponent_bits) if kind == "float" else fixed_format(t, int_bits)
            spec = fmt if layers is None else dict.fromkeys(layers, fmt)
            cache.clear()  # one rounded copy at a time
            cache[t] = quantized(
                model, inputs=fmt if target in ("inputs", "all") else None,
                weights=spec if target in ("weights", "all") else None,
                activations=spec if target in ("activations", "all") else None,
                mode=mode, generator=generator,
            )  # fmt: skip
        return cache[t]

    def changed(size: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        t = int(round(-math.log2(float(size[0]))))
        with torch.no_grad():
            out = model_at(t)(x[idx]).reshape(len(idx), -1)
        if criterion == "margin":
            return _norms(out - logits[idx]) >= limit[idx]
        return out.argmax(1) != y0[idx]

    sizes = [2.0**-t for t in reversed(widths)]  # increasing rounding errors
    r = flip_search(changed, len(x), mode="scan", grid=sizes)
    flip_at = torch.round(-torch.log2(r.value.clamp_max(1.0))).to(torch.int64)
    return torch.where(r.found, flip_at + 1, torch.full_like(flip_at, widths[0]))


@dataclass
class BitReport:
    """What :func:`recommend_bits` returns: per target, predicted and measured bits and a
    recommendation.

    Attributes
    ----------
    kind, mode, margin_bits
        The arguments.
    rows
        ``{target: {"certified": float | None, "first-order": float, "measured": int,
        "recommended": int, "format": str}}`` (maxima over the images).
    per_image
        ``{"<target> measured": (N,), "<target> first-order": (N,), "inputs certified": (N,)}``.
    conditions
        The condition numbers used (Estimates).
    """

    kind: str
    mode: str
    margin_bits: int
    rows: dict[str, dict[str, Any]]
    per_image: dict[str, torch.Tensor] = field(repr=False)
    conditions: dict[str, Estimate] = field(repr=False)

    def table(self) -> Any:
        """A pandas DataFrame, one row per target (pandas is imported here only)."""
        import pandas as pd

        return pd.DataFrame.from_dict(self.rows, orient="index").rename_axis("rounded")

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()

    def __str__(self) -> str:
        return self.table().to_string()

    def recommended(self, target: str) -> int:
        """The recommended bits for ``target``."""
        return int(self.rows[target]["recommended"])


def _smallest_format(bits: int, kind: str) -> str:
    cands = [f for f in FORMATS.values() if f.kind == kind and f.bits is not None and f.bits >= bits]
    if kind == "float":
        cands = [f for f in cands if f.torch_dtype is not None]  # formats torch can store
    if not cands:
        return "none named"
    return min(cands, key=lambda f: (f.bits, f.storage_bits or 0)).name


def recommend_bits(
    model: nn.Module,
    images: torch.Tensor,
    *,
    kind: str = "float",
    margin_bits: int = 1,
    mode: str = "nearest",
    bits: Sequence[int] = range(1, 17),
    certified: bool = True,
    tol: float = 1e-2,
    generator: torch.Generator | None = None,
) -> BitReport:
    """Bits for inputs, weights, activations and all three, predicted and measured on ``images``,
    and a recommendation: the measured maximum over the images plus ``margin_bits``.

    The measurement decides (it is what rounding actually needed on these images); the margin covers
    images not in the set. The predictions say how far a condition number is from it: the
    first-order ones (E0, ``kappa_w``, ``kappa_a``) and, for inputs, the certified one (E1, never
    below the measurement when the widths tried reach it). ``format`` names the narrowest format of
    :data:`~sensitivity_lib.precision.formats.FORMATS` with at least the recommended bits
    (significand bits for floats, which assumes the exponent range suffices).

    Parameters
    ----------
    model, images
        A classifier in eval mode and a batch ``(N, ...)`` in its input space.
    kind, mode, bits
        As in :func:`measured_bits`.
    margin_bits
        Added to the measured maximum.
    certified
        Also compute E1 (the certified input bits; needs a model the Lipschitz bound supports).
    tol, generator
        Accuracy and random start of the Lanczos estimates.

    Returns
    -------
    BitReport
    """
    if int(margin_bits) < 0:
        raise ValueError(f"margin_bits must be >= 0, got {margin_bits}")
    pred = predicted_bits(
        model, images, kind=kind, mode=mode, certified=certified, tol=tol, generator=generator
    )
    rows: dict[str, dict[str, Any]] = {}
    per_image: dict[str, torch.Tensor] = {}
    for target in TARGETS:
        m = measured_bits(model, images, target, kind=kind, mode=mode, bits=bits, generator=generator)
        first = pred[f"{target} first-order"]
        cert = pred.get(f"{target} certified")
        rec = int(m.max()) + int(margin_bits)
        rows[target] = {
            "certified": None if cert is None else float(cert.max()),
            "first-order": float(first.max()),
            "measured": int(m.max()),
            "recommended": rec,
            "format": _smallest_format(rec, kind),
        }
        per_image[f"{target} measured"] = m
        per_image[f"{target} first-order"] = first
        if cert is not None:
            per_image[f"{target} certified"] = cert
    return BitReport(kind, mode, int(margin_bits), rows, per_image, pred["conditions"])

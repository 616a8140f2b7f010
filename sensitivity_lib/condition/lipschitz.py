"""A certified upper bound on the 2-norm Lipschitz constant of a whole network (variant E1).

Paper: Maheshwari, Malaya, Moe, Kulkarni, Gurumurthi, *An estimator for the sensitivity to
perturbations of deep neural networks* (arXiv:2307.12679). The paper derives a "condition number
for the entire neural network" from per-layer matrix norms; the exact form it uses is not public,
and this module implements our reconstruction: the product bound, variant E1 of the book (chapter
*Deriving a condition number for a network*). Related work: Szegedy et al. (2014, section 4.3),
Virmaux & Scaman (2018, AutoLip).

Norm
    The Euclidean norm of one flattened sample, at the input and at the output.
Input space
    The model's *own* input. For a :class:`sensitivity_lib.zoo.Normalized` model this is [0, 1]
    pixel space, so the normalisation ``(x - mean) / std`` is part of the network and contributes
    ``1 / min(std)``.
Shapes
    ``input_shape`` is the shape of ONE sample, e.g. ``(C, H, W)``, without the batch axis.

How it works
    :func:`sensitivity_lib.graph.build_plan` reduces the traced model to steps, each with the
    certified constant of its operation's rule (the registry in :mod:`sensitivity_lib.graph`, where
    the rules and their proofs are listed), and :func:`sensitivity_lib.graph.propagate` combines
    them: products along chains, sums at additions, root-sums-of-squares at concatenations, all in
    log2. The conv and linear layers (batch norms folded in) get their certified operator norm from
    :func:`certified_layer_norm`. One pair is taken together: an average pool that enlarges its
    input (an adaptive pool replicating a 1 x 1 feature map, as in torchvision's VGG and AlexNet on
    small inputs) followed, through flattens and dropouts only, by a linear layer contributes the
    exact norm ``||W A||`` of the composite instead of ``||W|| ||A||`` (tighter, and certified on
    the pool's smaller input size). Anything the registry does not know raises
    ``NotImplementedError`` naming the operation and the module path.

Example
-------
>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(3, 3, bias=False), nn.ReLU()).eval()
>>> with torch.no_grad():
...     _ = net[0].weight.copy_(torch.diag(torch.tensor([2.0, 1.0, 0.5])))
>>> b = lipschitz_bound(net, (3,))
>>> b.kind, round(b.value, 6), round(b.extra["log2"], 6)
('upper', 2.0, 1.0)
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import weakref
from collections.abc import Callable

import torch
from torch import nn

from sensitivity_lib.condition._common import check_output, log2, norms, output_fn
from sensitivity_lib.graph import Step, build_plan, propagate
from sensitivity_lib.opnorm import DENSE_MAX_ENTRIES, operator_norm
from sensitivity_lib.results import Estimate
from sensitivity_lib.validation import check_model_input, fingerprint

__all__ = [
    "lipschitz_bound",
    "lipschitz_product",
    "global_condition",
    "layerwise_condition",
    "certified_layer_norm",
    "linear_norm_upper",
    "CERTIFY_MIN_ENTRIES",
    "CERTIFY_TOL",
]


def linear_norm_upper(weight: torch.Tensor) -> Estimate:
    """Certified upper bound on ``||W||_2`` of a large matrix, via the smaller Gram matrix.

    ``lambda = eigvalsh(W W^T)[-1]`` in float64 (the smaller side), plus a margin for the rounding
    errors of the product (``|fl(W W^T) - W W^T| <= gamma_n |W| |W|^T``, so at most
    ``gamma_n ||W||_F^2`` in the 2-norm) and of the symmetric eigensolver (backward stable:
    ``10 m u lambda``). The margin is of relative size ~1e-10 for ImageNet classifier heads.

    Parameters
    ----------
    weight
        A 2-D tensor.

    Returns
    -------
    Estimate
        ``kind="upper"``, ``method="gram-eigh"``; ``extra["margin"]`` is the relative margin.
    """
    w = weight.detach().to(torch.float64)
    if w.shape[0] > w.shape[1]:
        w = w.T
    m, n = w.shape
    u = 2.0**-53
    gamma = n * u / (1 - n * u)
    lam = float(torch.linalg.eigvalsh(w @ w.T)[-1])
    fro2 = float((w * w).sum())
    bound = max(lam, 0.0) + gamma * fro2 + 10 * m * u * abs(lam)
    value = math.sqrt(bound)
    margin = value / math.sqrt(lam) - 1 if lam > 0 else math.inf
    return Estimate(value, "upper", "gram-eigh", extra={"margin": margin, "shape": tuple(weight.shape)})


_NORM_CACHE: dict[tuple, Estimate] = {}
_NORM_CACHE_SIZE = 512


def _layer_key(step: Step, method: str) -> tuple:
    """Identifies a layer norm by the bytes of its (folded) weight, its configuration and input."""
    w = step.params["weight"].detach().cpu().contiguous()
    digest = hashlib.blake2b(w.numpy().tobytes(), digest_size=16).hexdigest()
    cfg = tuple(
        (k, str(step.params[k])) for k in ("stride", "padding", "dilation", "groups") if k in step.params
    )
    return (method, step.kind, tuple(w.shape), str(w.dtype), digest, cfg, tuple(step.in_shape))


def _cached_layer_norm(step: Step, method: str, compute: Callable[[Step], Estimate]) -> Estimate:
    """``compute(step)``, memoised on the weight bytes, layer configuration, input shape and method
    (conv norms at 224 x 224 take seconds to minutes; the same layer recurs across calls)."""
    key = _layer_key(step, method)
    hit = _NORM_CACHE.get(key)
    if hit is None:
        hit = compute(step)
        if len(_NORM_CACHE) >= _NORM_CACHE_SIZE:
            _NORM_CACHE.pop(next(iter(_NORM_CACHE)))
        _NORM_CACHE[key] = hit
    return hit


#: Convolutions whose input has at least this many entries get their certified norm from a Lanczos
#: lower estimate and a Cholesky certificate (``operator_norm(..., "fft", lower=..., tol=...)``),
#: within a factor ``1 + CERTIFY_TOL`` of the exact circular bound and several times faster.
CERTIFY_MIN_ENTRIES = 2**15
CERTIFY_TOL = 1e-3


def _certified_norm(step: Step) -> Estimate:
    if step.kind == "conv" and math.prod(step.in_shape) >= CERTIFY_MIN_ENTRIES:
        lower = operator_norm(step.module, step.in_shape, method="lanczos", tol=CERTIFY_TOL)
        est = operator_norm(step.module, step.in_shape, method="fft", lower=lower.value, tol=CERTIFY_TOL)
    elif step.kind == "conv":
        est = operator_norm(step.module, step.in_shape, method="fft")
    elif step.module.weight.numel() <= DENSE_MAX_ENTRIES:
        est = operator_norm(step.module, (step.in_shape[-1],), method="dense")
    else:
        est = linear_norm_upper(step.module.weight)
    if not est.is_certified_upper:
        raise RuntimeError(f"the layer norm at {step.name!r} is {est.kind!r}, not certified")
    return est


def certified_layer_norm(step: Step) -> Estimate:
    """The certified operator norm of a (BN-folded) conv or linear step of a plan.

    ``operator_norm(method="fft")`` for convolutions (with a Lanczos lower value and Cholesky
    certificates for inputs of :data:`CERTIFY_MIN_ENTRIES` or more); for linear layers the exact
    ``method="dense"`` up to ``DENSE_MAX_ENTRIES`` weights and :func:`linear_norm_upper` above.
    Memoised on the weight bytes, configuration and input shape (conv norms at 224 x 224 take
    seconds to minutes; the same layer recurs across calls).
    """
    return _cached_layer_norm(step, "certified", _certified_norm)


#: Steps between an average pool and a linear layer that leave the values as they are (the order
#: of a channel-major flatten included).
_PASS_THROUGH = frozenset({"flatten", "Flatten", "view", "reshape", "contiguous", "Dropout", "Identity",
                           "dropout"})  # fmt: skip


def _replicating_pools(plan) -> dict[int, tuple[int, Step]]:  # noqa: ANN001
    """Linear layers fed by an average pool that *enlarges* its input (an adaptive pool replicating
    a small feature map, e.g. 512 x 1 x 1 -> 512 x 7 x 7 before VGG's classifier), through
    value-preserving steps only and with no other reader: linear step index -> (pool step index,
    the linear step with the fused weight ``W A``, ``A`` the pool's matrix).

    The composite's norm ``||W A||`` is exact for the two together and never above the product
    ``||W|| ||A||`` the steps would contribute apart; it is also far cheaper to certify, since
    ``W A`` has the pool's (smaller) input size: 4096 x 512 instead of 4096 x 25088 for VGG-19 on
    32 x 32 digits (the Gram matrix of the latter took 34 s)."""
    out: dict[int, tuple[int, Step]] = {}
    for i, step in enumerate(plan.steps):
        if step.op != "linear" or step.kind != "linear" or len(step.in_shape) != 1:
            continue
        j = step.inputs[0]
        while (prev := plan.steps[j]).op == "fixed" and prev.kind in _PASS_THROUGH and prev.users == 1:
            j = prev.inputs[0]
        pool = plan.steps[j]
        if pool.kind != "avgpool" or pool.users != 1 or "Ah" not in pool.params:
            continue
        C, H, W = pool.in_shape
        _, h, w = pool.out_shape
        if C * H * W >= C * h * w or step.in_shape[0] != C * h * w:
            continue
        Ah, Aw = pool.params["Ah"], pool.params["Aw"]
        weight = step.params["weight"].detach().to(torch.float64)
        fused = torch.einsum("ocij,ih,jw->ochw", weight.reshape(-1, C, h, w), Ah, Aw).reshape(-1, C * H * W)
        module = nn.Linear(C * H * W, fused.shape[0], bias=False, dtype=torch.float64)
        with torch.no_grad():
            module.weight.copy_(fused)
        fused_step = dataclasses.replace(
            step, module=module, params={**step.params, "weight": fused}, in_shape=(C * H * W,)
        )
        out[i] = (j, fused_step)
    return out


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def lipschitz_product(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    layer_norm: Callable[[Step], Estimate] | None = None,
    output: str = "logits",
    method: str = "fft",
    kind: str = "upper",
) -> Estimate:
    """The product bound of :func:`lipschitz_bound` with a pluggable norm for linear layers.

    Parameters
    ----------
    model
        A module in eval mode whose ``forward`` torch.fx can trace.
    input_shape
        Shape of one input sample (no batch axis).
    layer_norm
        ``layer_norm(step) -> Estimate``: the norm used for each (BN-folded) conv / linear layer;
        ``step.module`` is a bias-free ``nn.Conv2d`` / ``nn.Linear`` and ``step.in_shape`` its real
        input shape. Default: :func:`certified_layer_norm`.
    output
        ``"logits"`` (the model's output) or ``"probs"`` (softmax over the last axis appended,
        constant 1/2).
    method, kind
        Recorded in the returned :class:`~sensitivity_lib.results.Estimate`. ``kind`` must be
        ``"upper"`` only when every layer norm is a certified upper bound.

    Returns
    -------
    Estimate
        See :func:`lipschitz_bound`.
    """
    check_output(output)
    plan = build_plan(model, input_shape)
    norm_fn = layer_norm or certified_layer_norm
    layers: dict[str, float] = {}
    layer_estimates: dict[str, Estimate] = {}
    folded: dict[str, str] = {}
    fusions = _replicating_pools(plan)
    absorbed = {pool for pool, _ in fusions.values()}
    index = {id(st): i for i, st in enumerate(plan.steps)}
    fused: dict[str, str] = {plan.steps[i].name: plan.steps[p].name for i, (p, _) in fusions.items()}

    def factor(step: Step) -> float:
        i = index[id(step)]
        if i in absorbed:  # counted in the linear layer after it (the fused norm ||W A||)
            val = 1.0
        elif step.op == "linear":
            est = norm_fn(fusions[i][1] if i in fusions else step)
            layer_estimates[step.name] = est
            val = float(est.value)
            if step.folded:
                folded[step.name] = step.folded
        else:
            val = step.const
        layers[step.name] = val
        return math.log2(val) if val > 0 else -math.inf

    logs = [float(v) for v in propagate(plan, factor)]
    total = logs[plan.output]
    if output == "probs":
        layers["softmax(output)"] = 0.5
        total -= 1.0
    value = 2.0**total if total < 1023 else math.inf
    return Estimate(
        value=value,
        kind=kind,
        method=f"graph-product({method})",
        norm="2",
        extra={
            "log2": total,
            "layers": layers,
            "layer_estimates": layer_estimates,
            "folded": folded,
            "fused_pools": fused,
            "output": output,
            "input_shape": tuple(input_shape),
            "cumulative_log2": [(st.name, st.op, lg) for st, lg in zip(plan.steps, logs, strict=True)],
        },
    )


def lipschitz_bound(
    model: nn.Module, input_shape: tuple[int, ...], *, output: str = "logits", cache: bool = True
) -> Estimate:
    """Certified upper bound on the 2-norm Lipschitz constant of ``model`` on its own input space.

    For every pair of inputs ``x, y`` of shape ``input_shape``:
    ``||f(x) - f(y)||_2 <= value * ||x - y||_2`` (one sample, flattened), where ``f`` is the model's
    output (``output="logits"``) or the softmax of it (``output="probs"``). The bound is global (not
    first order) and certified: every per-layer constant is exact or a certified upper bound (conv
    and linear norms from :func:`sensitivity_lib.opnorm.operator_norm` with ``method="fft"``).

    Parameters
    ----------
    model
        A module in eval mode (e.g. :class:`sensitivity_lib.zoo.Normalized`) that torch.fx can
        trace.
    input_shape
        Shape of one input sample, e.g. ``(3, 224, 224)`` (no batch axis); layer norms are taken
        at the real feature-map sizes this input produces.
    output
        ``"logits"`` or ``"probs"``.
    cache
        Reuse the result for the same model, weights (checked by pointer and version counter),
        input shape and output.

    Returns
    -------
    Estimate
        ``value`` (float; ``inf`` past float64's range), ``kind="upper"``,
        ``method="graph-product(fft)"``;
        ``extra["log2"]``: the bound in bits (float64), ``extra["layers"]``: module path -> constant
        of that operation, ``extra["layer_estimates"]``: the conv / linear norm estimates,
        ``extra["folded"]``: conv path -> folded BN path; ``extra["fused_pools"]``: linear path ->
        the path of the replicating average pool before it whose map is folded into its weight
        (the pair contributes ``||W A||``, the pool itself 1; see the module docstring);
        ``extra["cumulative_log2"]``: for every step of the graph in order,
        ``(name, op, log2 L_v)`` with ``L_v`` the bound from the input to that node.

    Raises
    ------
    ValueError
        Model in training mode, or ``input_shape`` not accepted by the model.
    NotImplementedError
        An operation with no certified constant (named with its module path), or a graph torch.fx
        cannot trace.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.MaxPool2d(3, 2), nn.Flatten()).eval()   # overlapping windows
    >>> lipschitz_bound(net, (1, 7, 7)).value
    2.0
    """
    key = (tuple(int(s) for s in input_shape), output)
    if cache and isinstance(model, nn.Module):
        store = _CACHE.setdefault(model, {})
        hit = store.get(key)
        if hit is not None and hit[0] == fingerprint(model):
            return hit[1]
    est = lipschitz_product(model, input_shape, output=output)
    if cache:
        _CACHE.setdefault(model, {})[key] = (fingerprint(model), est)
    return est


# ----------------------------------------------------------------------------------------------
# E1 as a relative condition number, and its per-layer factors


def global_condition(
    model: nn.Module,
    x: torch.Tensor,
    *,
    output: str = "logits",
    lipschitz: Estimate | None = None,
) -> Estimate:
    """E1: ``L ||x|| / ||f(x)||`` with ``L`` from :func:`lipschitz_bound`.

    For every perturbation ``dx`` (any size):
    ``||f(x+dx) - f(x)|| / ||f(x)|| <= value * ||dx|| / ||x||``; equal to the product of per-layer
    relative bounds after telescoping (:func:`layerwise_condition`). Certified upper, usually very
    loose.

    Parameters
    ----------
    model, x, output
        A model in eval mode, a batch ``(N, ...)`` in its input space, and ``"logits"`` or
        ``"probs"``.
    lipschitz
        A precomputed ``lipschitz_bound(model, x.shape[1:], output=output)`` to reuse.

    Returns
    -------
    Estimate
        ``value`` float64 (N,), ``kind="upper"``; ``extra``: ``log2``, ``lipschitz``, ``x_norm``,
        ``f_norm``.
    """
    check_output(output)
    check_model_input(model, x)
    L = lipschitz if lipschitz is not None else lipschitz_bound(model, tuple(x.shape[1:]), output=output)
    if L.extra.get("output", output) != output:
        raise ValueError(f"the given lipschitz bound is for output={L.extra['output']!r}, not {output!r}")
    if not L.is_certified_upper:
        raise ValueError("global_condition needs a certified upper Lipschitz bound")
    if tuple(L.extra.get("input_shape", x.shape[1:])) != tuple(x.shape[1:]):
        raise ValueError(
            f"the given lipschitz bound is for input shape {L.extra['input_shape']}, not {tuple(x.shape[1:])}"
        )
    with torch.no_grad():
        fx = output_fn(model, output)(x)
    xn, fn = norms(x), norms(fx)
    lg = float(L.extra["log2"]) + log2(xn) - log2(fn)
    return Estimate(
        value=torch.exp2(lg), kind="upper", method="E1:" + L.method, norm="2",
        extra={"log2": lg, "lipschitz": L, "x_norm": xn, "f_norm": fn, "output": output},
    )  # fmt: skip


def layerwise_condition(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-layer relative bounds ``kappa_l = L_l ||x_{l-1}|| / ||x_l||`` along a chain network.

    ``L_l`` is the certified constant of layer ``l`` (as in :func:`lipschitz_bound`, BN folded) and
    ``x_l`` its output at ``x``. Each ``kappa_l`` bounds the relative condition number of that layer
    at its input; their product telescopes to E1: ``prod_l kappa_l = (prod_l L_l) ||x|| / ||f(x)||``,
    the "product of per-layer condition numbers".

    Parameters
    ----------
    model, x
        As in :func:`global_condition` (logits).

    Returns
    -------
    dict
        Layer path -> float64 tensor (N,), in the order of the layers.

    Raises
    ------
    NotImplementedError
        For a network with additions or concatenations (not a chain).
    """
    check_model_input(model, x)
    plan = build_plan(model, tuple(x.shape[1:]))
    for st in plan.steps:
        if st.op in ("add", "cat") or st.users > 1:
            raise NotImplementedError(f"layerwise_condition needs a chain network; {st.name!r} is a {st.op}")
    _, values = plan.record(x.detach(), plan.steps)
    out: dict[str, torch.Tensor] = {}
    for i, st in enumerate(plan.steps[1:], start=1):
        c = float(certified_layer_norm(st).value) if st.op == "linear" else st.const
        out[st.name] = c * norms(values[st.inputs[0]]) / norms(values[i])
    return out

"""The local condition number of a network at an input: exact (E0) and a local product bound (E2).

Paper: Maheshwari, Malaya, Moe, Kulkarni, Gurumurthi, *An estimator for the sensitivity to
perturbations of deep neural networks* (arXiv:2307.12679). Its estimator is "roughly analogous to a
condition number for the entire neural network"; the formulas are our reconstruction (the book's
chapters *Conditioning* and *Deriving a condition number for a network*), not the paper's text.

Norm
    Euclidean 2-norm of one flattened sample at the input and at the output; the induced
    (spectral) norm for Jacobians and layers.
Input space
    The model's own input: [0, 1] pixels for :class:`sensitivity_lib.zoo.Normalized` models.
Output
    ``output="logits"`` (the model's output) or ``output="probs"`` (softmax over the last axis).
Shapes
    ``x`` is a batch ``(N, ...)``; every function returns an
    :class:`~sensitivity_lib.results.Estimate` whose ``value`` is a float64 tensor of N values, and
    whose ``extra["log2"]`` holds the same in bits (float64, so products never overflow).

Variants (relative condition number ``kappa(x) = ||J(x)|| ||x|| / ||f(x)||``)
    * E0 :func:`local_condition`: ``||J(x)||_2`` by Lanczos on ``J J^T`` (or ``J^T J``) with
      autograd, through :func:`sensitivity_lib.krylov.top_singular`; the true first-order value,
      returned as a Ritz value, which is never above it (``kind="lower"``).
    * E2 :func:`masked_product_condition`: ``prod_l ||D_l(x) W_l||`` with the activation
      derivatives ``D_l`` at ``x`` (and local max-pool selections), propagated through the graph
      like E1 (:func:`sensitivity_lib.graph.propagate`); in exact arithmetic ``E0 <= E2 <= E1``.
    * E1 and E3 live in :mod:`sensitivity_lib.condition.lipschitz` and
      :mod:`sensitivity_lib.condition.approximate`.

Also: :func:`jacobian_norm` (the absolute ``||J(x)||_2``), :func:`componentwise_condition` (Skeel's
componentwise condition number in the infinity norm, the one for rounding each input separately)
and :func:`kink_fractions` (where the network is not differentiable at ``x``).

Example
-------
>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double().eval()
>>> x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
>>> J = torch.func.vmap(torch.func.jacrev(net))(x)
>>> e = jacobian_norm(net, x, tol=1e-12)
>>> bool(torch.allclose(e.value, torch.linalg.matrix_norm(J, 2), rtol=1e-9))
True
>>> e.kind, bool(e.converged.all())
('lower', True)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from sensitivity_lib.condition._common import check_output, log2, norms, output_fn
from sensitivity_lib.graph import Step, build_plan, propagate, softmax_jacobian_norm, tangent_map
from sensitivity_lib.krylov import LinearOperator, top_singular
from sensitivity_lib.opnorm import conv_operator
from sensitivity_lib.results import Estimate
from sensitivity_lib.validation import check_model_input

__all__ = [
    "componentwise_condition",
    "jacobian_norm",
    "jacobian_operator",
    "local_condition",
    "masked_product_condition",
    "kink_fractions",
]


# ----------------------------------------------------------------------------------------------
# E0: the exact local condition number


def _has_grouped_conv(model: nn.Module) -> bool:
    """Whether ``model`` has a convolution with ``groups > 1`` (depthwise or grouped)."""
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return any(isinstance(m, convs) and m.groups > 1 for m in model.modules())


def _replay(model: nn.Module, x: torch.Tensor, output: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v -> J v`` by :func:`sensitivity_lib.graph.tangent_map` on the model, with the softmax's
    Jacobian ``diag(p) - p p^T`` applied after it for ``output="probs"``."""
    jv = tangent_map(model, x)
    if output != "probs":
        return jv
    with torch.no_grad():
        p = torch.softmax(model(x), dim=-1)

    def apply(v: torch.Tensor) -> torch.Tensor:
        t = jv(v)
        return p * (t - (p * t).sum(-1, keepdim=True))

    return apply


def jacobian_operator(
    model: nn.Module, x: torch.Tensor, *, output: str = "logits", ad: str = "auto"
) -> LinearOperator:
    """The Jacobians ``J(x_i)`` of a batch as one :class:`~sensitivity_lib.krylov.LinearOperator`.

    ``J(x_i)`` is the Jacobian of one sample's output (flattened) with respect to its input. In eval
    mode the samples of a batch are independent, so one ``vjp`` on the batch applies all N
    transposed Jacobians at once, and ``J v`` is the derivative of that linear map (reverse over
    reverse: the forward pass is kept for the whole iteration) or, with ``ad="forward"``, a
    ``torch.func.jvp`` (the forward pass is recomputed every time). ``"reverse"`` falls back to
    ``"forward"`` for an operation without double backward. ``"replay"`` applies ``J v`` by
    :func:`sensitivity_lib.graph.tangent_map`: one recorded forward pass (ReLU masks, max-pool
    indices), then per product a replay of the traced graph on ``v`` alone. ``"auto"`` (the
    default) is ``"replay"`` for a model torch.fx can trace, and otherwise ``"forward"`` for a
    model with grouped (e.g. depthwise) convolutions and ``"reverse"`` for the rest: rules of the
    model's structure, so the choice, and the rounding of the products, never depend on timing. On
    2 CPU threads one ``J v`` of VGG-19 at 224 x 224 took 0.25 s by replay, 0.49 s reverse over
    reverse and 0.95 s forward; one ``J J^T`` product of EfficientNet-Lite0 took 0.22 s forward
    against 0.58 s reverse (the double backward of a depthwise convolution is slow). The operator
    can be restricted to a sub-batch (it re-linearises the network on those samples), so converged
    samples leave the iteration. Its vectors are float64; the products run in ``x``'s dtype.

    Example
    -------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Linear(3, 2).double().eval()
    >>> op = jacobian_operator(net, torch.zeros(4, 3, dtype=torch.float64))
    >>> torch.allclose(op.apply(torch.ones(4, 3, dtype=torch.float64)), net.weight.sum(1).expand(4, 2))
    True
    """
    if ad not in ("auto", "replay", "reverse", "forward"):
        raise ValueError(f"ad must be 'auto', 'replay', 'reverse' or 'forward', got {ad!r}")
    f = output_fn(model, output)
    x = x.detach()
    with torch.no_grad():
        out_dim = f(x[:1]).shape[1]
    replay = None
    if ad in ("auto", "replay"):
        try:
            replay = _replay(model, x, output)
        except NotImplementedError:
            if ad == "replay":
                raise
    if ad == "auto" and replay is None:  # the model does not trace
        ad = "forward" if _has_grouped_conv(model) else "reverse"
    state: dict = {"reverse": ad == "reverse"}

    def linearise(transposed: bool = False) -> None:
        """Keep ``y = f(x)`` for the batch and, for reverse-over-reverse products
        (``transposed``), ``g(u) = J^T u`` (a graph linear in ``u``)."""
        if "y" not in state:
            with torch.enable_grad():
                xi = x.clone().requires_grad_(True)
                state.update(xi=xi, y=f(xi))
        if transposed and "g" not in state:
            with torch.enable_grad():
                u0 = torch.zeros_like(state["y"], requires_grad=True)
                (g,) = torch.autograd.grad(state["y"], state["xi"], u0, create_graph=True)
            state.update(u0=u0, g=g)

    def rmatvec(u: torch.Tensor) -> torch.Tensor:
        linearise()
        u = u.reshape(len(x), out_dim).to(state["y"].dtype)
        return torch.autograd.grad(state["y"], state["xi"], u, retain_graph=True)[0].detach().double()

    def matvec(v: torch.Tensor) -> torch.Tensor:
        v = v.to(x.dtype)
        if replay is not None:
            return replay(v).reshape(len(x), out_dim).detach().double()
        if state["reverse"]:
            linearise(transposed=True)
            try:  # J v as the derivative of the linear map u -> J^T u (reverse over reverse)
                jv = torch.autograd.grad(state["g"], state["u0"], v, retain_graph=True)[0]
                return jv.detach().double()
            except RuntimeError:
                state["reverse"] = False  # an operation without double backward: use forward mode
        return torch.func.jvp(f, (x,), (v,))[1].detach().double()

    def restrict(idx: torch.Tensor) -> LinearOperator:
        mode = "replay" if replay is not None else "reverse" if state["reverse"] else "forward"
        return jacobian_operator(model, x[idx], output=output, ad=mode)

    return LinearOperator(
        matvec, rmatvec, in_shape=x.shape[1:], out_shape=(out_dim,), batch=len(x), dtype=torch.float64,
        device=x.device, restrict=restrict,
    )  # fmt: skip


def jacobian_norm(
    model: nn.Module,
    x: torch.Tensor,
    *,
    output: str = "logits",
    tol: float = 1e-6,
    max_iter: int = 200,
    method: str = "lanczos",
    krylov_dim: int = 100,
    ad: str = "auto",
    vectors: bool = False,
    generator: torch.Generator | None = None,
) -> Estimate:
    """``||J(x_i)||_2`` for every sample of a batch, matrix-free (the absolute local condition number).

    Lanczos (default) or power iteration on ``J J^T`` in the output space (``J^T J`` when the input
    is smaller), through :func:`sensitivity_lib.krylov.top_singular` on :func:`jacobian_operator`.

    Parameters
    ----------
    model
        A module in eval mode; ``x`` is checked with ``model.check_input`` when it has one.
    x
        Batch ``(N, ...)``, finite floats. Use a float64 model and input for oracle comparisons.
    output
        ``"logits"`` or ``"probs"`` (softmax over the last axis of the model's output).
    tol
        Relative accuracy of ``||J||`` requested from the iteration (its stopping rule:
        :mod:`sensitivity_lib.krylov`).
    max_iter, method, krylov_dim, generator
        Budget (products with ``J J^T``), ``"lanczos"`` / ``"power"``, Lanczos basis size before a
        restart, and the random start.
    ad
        ``"auto"``, ``"reverse"`` or ``"forward"``: how ``J v`` is applied
        (:func:`jacobian_operator`).
    vectors
        Also return ``extra["right"]``: per sample the unit input direction ``v`` (shape of ``x``)
        with ``||J v|| = value`` (the first-order worst-case perturbation direction).

    Returns
    -------
    Estimate
        ``value``: float64 tensor (N,) of ``||J v||`` for the returned unit ``v``; ``kind="lower"``
        (it is the norm of ``J`` on one vector, so never above ``||J||``); ``converged``: bool (N,);
        ``iterations``: the largest count; ``residual``: tensor (N,); ``extra["iterations"]`` per
        sample, ``extra["error"]`` (the estimated relative error), ``extra["log2"]``,
        ``extra["space"]``.

    Raises
    ------
    ValueError
        Non-finite or badly shaped ``x``, model in training mode, unknown ``output``.
    """
    check_output(output)
    check_model_input(model, x)
    op = jacobian_operator(model, x, output=output, ad=ad)
    side = "output" if op.n_out <= op.n_in else "input"
    r = top_singular(
        op, method=method, tol=tol, max_iter=max_iter, max_basis=krylov_dim, side=side, generator=generator
    )
    extra = {
        "iterations": r.iterations, "error": r.error, "log2": log2(r.value), "output": output,
        "space": side, "tol": tol,
    }  # fmt: skip
    if vectors:
        extra["right"] = r.right.reshape(x.shape).to(x.dtype)
    return Estimate(
        value=r.value, kind="lower", method=method, norm="2", iterations=int(r.iterations.max()),
        residual=r.residual, converged=r.converged, extra=extra,
    )  # fmt: skip


def local_condition(
    model: nn.Module,
    x: torch.Tensor,
    *,
    output: str = "logits",
    tol: float = 1e-6,
    max_iter: int = 200,
    method: str = "lanczos",
    vectors: bool = False,
    generator: torch.Generator | None = None,
) -> Estimate:
    """E0: the relative condition number ``||J(x)||_2 ||x|| / ||f(x)||`` of every sample.

    The exact (first-order) relative condition number: for small ``dx``,
    ``||f(x+dx) - f(x)|| / ||f(x)|| ~ kappa ||dx|| / ||x||`` in the worst direction. It is a local,
    first-order quantity, not a bound for finite perturbations.

    Parameters
    ----------
    model, x, output, tol, max_iter, method, vectors, generator
        As in :func:`jacobian_norm`.

    Returns
    -------
    Estimate
        ``value`` float64 (N,), ``kind="lower"`` (``||J||`` is a Ritz value, never above the true
        norm; converged samples are within ``tol`` by the solver's stopping rule); ``extra``:
        ``log2`` (bits lost), ``jacobian_norm`` (the Estimate of ``||J||``), ``x_norm``,
        ``f_norm``, and ``right`` (the worst input direction) when ``vectors=True``.
    """
    J = jacobian_norm(
        model, x, output=output, tol=tol, max_iter=max_iter, method=method, vectors=vectors,
        generator=generator,
    )  # fmt: skip
    with torch.no_grad():
        fx = output_fn(model, output)(x)
    xn, fn = norms(x), norms(fx)
    lg = J.extra["log2"] + log2(xn) - log2(fn)
    extra = {"log2": lg, "jacobian_norm": J, "x_norm": xn, "f_norm": fn, "output": output}
    if vectors:
        extra["right"] = J.extra["right"]
    return Estimate(
        value=torch.exp2(lg), kind="lower", method=f"E0:{J.method}", norm="2", iterations=J.iterations,
        residual=J.residual, converged=J.converged, extra=extra,
    )  # fmt: skip


def componentwise_condition(
    model: nn.Module, x: torch.Tensor, *, output: str = "logits", chunk: int = 64
) -> Estimate:
    """Skeel's componentwise condition number ``|| |J(x)| |x| ||_inf / ||f(x)||_inf`` of every sample,
    and the input bits that componentwise rounding needs, to first order.

    The natural measure for rounding each input separately (every pixel to ``t`` significand
    bits: ``|dx_j| <= 2^-t |x_j|``, as :func:`~sensitivity_lib.precision.formats.round_float` does).
    To first order output ``i`` then moves by at most ``2^-t (|J| |x|)_i``, and this bound is
    attained (``dx_j = 2^-t sign(J_ij) |x_j|``): unlike the normwise E0 it is exact for this
    perturbation set, not an upper bound over a larger ball. It is never above the normwise
    infinity-norm condition number ``||J||_inf ||x||_inf / ||f||_inf`` (``extra["kappa_inf"]``), and
    far below it when many inputs are zero (a black MNIST background is not perturbed by relative
    rounding). R. D. Skeel, *Scaling for numerical stability in Gaussian elimination*, J. ACM 26,
    1979; N. J. Higham, *Accuracy and Stability of Numerical Algorithms*, 2002, section 7.2.

    The same argument on the top class ``a`` against every other class ``b`` gives the bits
    (``extra["bits"]``): the predicted class survives a componentwise relative error ``2^-t`` to
    first order while ``2^-t sum_j |J_aj - J_bj| |x_j| < f_a - f_b`` for all ``b``, so

    ``t_cw(x) = ceil(max_b log2(sum_j |J_aj - J_bj| |x_j| / (f_a - f_b)))``,

    with no factor ``sqrt(2)`` and no worst case over a ball (compare
    :func:`~sensitivity_lib.precision.margin.min_input_bits`). A first-order prediction: rounding errors
    are not infinitesimal, and the model is only piecewise smooth.

    Cost: one backward pass per output (the rows of ``J``, all samples at once, ``chunk`` rows per
    batched ``vjp``), and the rows are held in memory (outputs x samples x inputs, float64): cheap
    for 10 classes, 1,000 passes and about 1.2 GB per 224x224 photo for an ImageNet classifier.

    Parameters
    ----------
    model, x, output
        As in :func:`jacobian_norm` (the norm of ``x`` and ``f(x)`` per flattened sample).
    chunk
        Output rows per batched backward pass (memory against speed).

    Returns
    -------
    Estimate
        ``value`` float64 (N,), ``kind="exact"`` (first-order, from the exact Jacobian rows);
        ``extra``: ``log2``, ``kappa_inf`` (normwise, infinity norm), ``bits`` (``t_cw``, float64
        (N,)), ``runner_up`` (the class ``b`` that attains it) and ``worst`` (per sample the
        perturbation ``-sign(J_a - J_b) |x|`` of that pair, shape of ``x``: the direction, scaled by
        ``2^-t``, that lowers the margin fastest).

    Example
    -------
    >>> import torch
    >>> net = torch.nn.Linear(3, 2, bias=False).double().eval()
    >>> with torch.no_grad():
    ...     _ = net.weight.copy_(torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.0, 4.0]]))
    >>> x = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)   # f(x) = (-1, 0.5)
    >>> e = componentwise_condition(net, x)
    >>> float(e.value[0]), float(e.extra["kappa_inf"][0])   # |J||x| = (3, 0.5); ||J||_inf = 4.5
    (3.0, 4.5)
    >>> x = torch.tensor([[1.0, 0.0, 0.1]], dtype=torch.float64)   # a zero input is not perturbed
    >>> e = componentwise_condition(net, x)
    >>> round(float(e.value[0]), 12), round(float(e.extra["kappa_inf"][0]), 12)
    (1.0, 4.5)
    >>> e.extra["bits"].tolist()   # margin 0.1; sum |J_a - J_b| |x| = 0.5 + 0.4: ceil(log2 9)
    [4.0]
    """
    check_output(output)
    check_model_input(model, x)
    if int(chunk) < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    f = output_fn(model, output)
    x = x.detach()
    with torch.enable_grad():
        xi = x.clone().requires_grad_(True)
        y = f(xi)
        n, C = y.shape
        absx = xi.detach().reshape(n, -1).abs().double()
        J = torch.empty(C, n, absx.shape[1], dtype=torch.float64)
        for s in range(0, C, int(chunk)):
            idx = torch.arange(s, min(C, s + int(chunk)))
            eye = torch.zeros(len(idx), n, C, dtype=y.dtype)
            eye[torch.arange(len(idx)), :, idx] = 1.0
            (rows,) = torch.autograd.grad(y, xi, eye, retain_graph=True, is_grads_batched=True)
            J[idx] = rows.reshape(len(idx), n, -1).double()
    y = y.detach().double()
    finf = y.abs().amax(1)
    weighted = torch.einsum("cnd,nd->nc", J.abs(), absx)  # (|J| |x|)_i per sample
    skeel = weighted.amax(1) / finf
    kappa_inf = J.abs().sum(2).amax(0) * absx.amax(1) / finf
    top = y.argmax(1)
    Ja = J[top, torch.arange(n)]  # (N, d)
    diff = (Ja[None] - J).abs()  # (C, N, d)
    need = torch.einsum("cnd,nd->nc", diff, absx)
    margin = y.gather(1, top[:, None]) - y
    ratio = torch.where(margin > 0, need / margin.clamp_min(1e-300), torch.zeros_like(need))
    ratio[torch.arange(n), top] = 0.0
    tied = ((margin == 0).sum(1) > 1)  # another class ties with the top one
    worst_b = ratio.argmax(1)
    bits = torch.ceil(torch.log2(ratio.amax(1)))
    bits = torch.where(tied, torch.full_like(bits, math.inf), bits)
    d = (Ja - J[worst_b, torch.arange(n)]).sign() * absx
    extra = {
        "log2": torch.log2(skeel), "kappa_inf": kappa_inf, "bits": bits, "runner_up": worst_b,
        "worst": (-d).reshape(x.shape).to(x.dtype), "output": output,
    }
    return Estimate(value=skeel, kind="exact", method="Skeel, exact Jacobian rows", norm="inf",
                    extra=extra)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# E2: the local masked product


def masked_product_condition(
    model: nn.Module,
    x: torch.Tensor,
    *,
    output: str = "logits",
    tol: float = 1e-4,
    max_iter: int = 300,
    krylov_dim: int = 20,
    memory_mb: float = 512.0,
    generator: torch.Generator | None = None,
) -> Estimate:
    """E2: the local masked product ``prod_l ||D_l(x) W_l||_2`` times ``||x|| / ||f(x)||``.

    Each conv / linear layer (BN folded) followed by an elementwise activation contributes the norm
    of ``D W`` with ``D = diag(f'(z))`` at the sample's pre-activation ``z`` (computed by batched
    Lanczos, matrix-free); every other step contributes its rule's local factor
    (:meth:`sensitivity_lib.graph.Rule.local`: ``max |f'(z)|`` for an activation alone, the square
    root of the largest number of outputs that select one input for a max-pool, the exact local
    softmax Jacobian norm, global constants for the rest); sums and concatenations combine as in E1,
    through the same :func:`sensitivity_lib.graph.propagate`. By the chain rule and
    sub-multiplicativity, in exact arithmetic ``||J(x)|| <= E2 <= L`` (so ``E0 <= E2 <= E1``); the
    layer norms are Ritz values within ``tol`` (by the solver's stopping rule), so
    ``kind="estimate"``.

    Parameters
    ----------
    model, x, output, generator
        As in :func:`local_condition`.
    tol, max_iter, krylov_dim
        Relative accuracy, budget and Lanczos basis size of every layer-norm computation.
    memory_mb
        Samples are processed in chunks so that one layer's Lanczos basis stays below this.

    Returns
    -------
    Estimate
        ``value`` float64 (N,), ``kind="estimate"``; ``extra``: ``log2``, ``norm_log2`` (log2 of the
        product itself, per sample), ``layers`` (module path -> tensor (N,) of local factors),
        ``x_norm``, ``f_norm``.
    """
    check_output(output)
    check_model_input(model, x)
    plan = build_plan(model, tuple(x.shape[1:]))
    x = x.detach()
    N = x.shape[0]
    inputs_of = [plan.producer(s) for s in plan.steps if s.op in ("act", "maxpool", "softmax")]
    out, values = plan.record(x, inputs_of)
    index = {id(s): i for i, s in enumerate(plan.steps)}
    # a conv / linear (or constant diagonal) step read only by an activation is fused with it
    fused = {
        s.inputs[0] for s in plan.steps
        if s.op == "act" and plan.producer(s).op in ("linear", "diag") and plan.producer(s).users == 1
    }  # fmt: skip
    layers: dict[str, torch.Tensor] = {}
    opts = dict(tol=tol, max_iter=max_iter, krylov_dim=krylov_dim, memory_mb=memory_mb, generator=generator)

    def factor(s: Step) -> torch.Tensor:
        i = index[id(s)]
        if i in fused:
            return torch.zeros(N, dtype=torch.float64)
        if s.op == "linear":
            fac, name = _masked_norm(s, None, **opts).expand(N), s.name
        elif s.op in ("act", "maxpool", "softmax"):
            z = values[s.inputs[0]].detach()
            prev = plan.producer(s)
            if s.op == "act" and s.inputs[0] in fused:
                d = s.rule.derivative(s, z)
                if prev.op == "linear":
                    fac = _masked_norm(prev, d, **opts)
                else:  # a constant diagonal, then the activation: exact
                    fac = (d.to(torch.float64) * prev.params["scale"].to(torch.float64)).abs()
                    fac = fac.reshape(N, -1).max(1).values
                name = prev.name + "+" + s.name
            else:
                fac, name = s.rule.local(s, z), s.name
        else:  # diagonal and fixed maps: their global constants are exact
            fac, name = torch.full((N,), float(s.const), dtype=torch.float64), s.name
        layers[name] = fac
        return log2(fac)

    total = propagate(plan, factor)[plan.output].expand(N)
    fx = out.detach()
    if output == "probs":
        sm = softmax_jacobian_norm(fx.reshape(N, -1))
        layers["softmax(output)"] = sm
        total = total + log2(sm)
        fx = torch.softmax(fx, dim=-1)
    xn, fn = norms(x), norms(fx)
    lg = total + log2(xn) - log2(fn)
    extra = {"log2": lg, "norm_log2": total, "layers": layers, "x_norm": xn, "f_norm": fn, "output": output}
    return Estimate(value=torch.exp2(lg), kind="estimate", method="E2:masked-product", norm="2", extra=extra)


def _masked_norm(
    step: Step,
    d: torch.Tensor | None,
    *,
    tol: float,
    max_iter: int,
    krylov_dim: int,
    memory_mb: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """``||D_i W||_2`` per sample (``d`` the ``(N, *out)`` diagonals) or ``||W||_2`` (``d=None``),
    by :func:`sensitivity_lib.krylov.top_singular` on the layer's operator (float64 (n,))."""
    layer = conv_operator(step.module, step.in_shape)
    wdt = layer.dtype  # the products run in the layer's dtype, the iteration in float64
    n = 1 if d is None else d.shape[0]
    dd = None if d is None else d.to(wdt).reshape(n, *layer.out_shape)
    small = min(layer.n_in, layer.n_out)
    per_sample = small * min(krylov_dim, small) * 8 / 2**20
    chunk = max(1, int(memory_mb // max(per_sample, 1e-9)))

    def masked(rows: torch.Tensor) -> LinearOperator:
        m = None if dd is None else dd[rows]
        def mv(v: torch.Tensor) -> torch.Tensor:
            y = layer.matvec(v.to(wdt))
            return (y if m is None else y * m).double()

        def rmv(u: torch.Tensor) -> torch.Tensor:
            u = u.to(wdt)
            return layer.rmatvec(u if m is None else u * m).double()

        return LinearOperator(
            mv, rmv, in_shape=layer.in_shape, out_shape=layer.out_shape, batch=len(rows),
            dtype=torch.float64, restrict=lambda idx: masked(rows[idx]),
        )  # fmt: skip

    res = []
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(n, start + chunk))
        r = top_singular(
            masked(rows), tol=tol, max_iter=max_iter, max_basis=krylov_dim, generator=generator
        )
        res.append(r.value)
    return torch.cat(res)


# ----------------------------------------------------------------------------------------------
# where the network is not differentiable


def kink_fractions(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Where ``f`` is not differentiable at ``x``: per ReLU-like activation, the fraction of its
    inputs exactly at a kink; per max-pool, the fraction of windows whose maximum is tied between
    entries that are not all locally constant; per sample.

    A window whose entries an activation clamped flat (a ReLU's strictly negative inputs) is locally
    constant however the tie falls, so it is differentiable and is not counted. At a counted point
    autograd's ``J(x)`` is one of several one-sided Jacobians, so ``||J(x)||`` (E0) need not match
    finite differences, in either direction.

    Parameters
    ----------
    model, x
        As in :func:`local_condition`.

    Returns
    -------
    dict
        Module path -> float64 tensor (N,) of fractions in [0, 1].
    """
    check_model_input(model, x)
    plan = build_plan(model, tuple(x.shape[1:]))
    wanted = []
    for s in plan.steps:
        if s.op in ("act", "maxpool"):
            wanted.append(plan.producer(s))
            if s.op == "maxpool" and plan.producer(s).op == "act":
                wanted.append(plan.producer(plan.producer(s)))
    _, values = plan.record(x.detach(), wanted)
    out: dict[str, torch.Tensor] = {}
    for s in plan.steps:
        if s.op not in ("act", "maxpool"):
            continue
        flat = None
        prev = plan.producer(s)
        if s.op == "maxpool" and prev.op == "act":
            flat = prev.rule.flat_at(prev, values[prev.inputs[0]])
        frac = s.rule.kinks(s, values[s.inputs[0]], flat)
        if frac is not None:
            out[s.name] = frac
    return out

"""The relative condition number of a network at an input, exact and bounded (variants E0-E3).

Paper: Maheshwari, Malaya, Moe, Kulkarni, Gurumurthi, *An estimator for the sensitivity to
perturbations of deep neural networks* (arXiv:2307.12679). Its estimator is "roughly analogous to a
condition number for the entire neural network"; the formulas below are our reconstruction (digest
``/work/shared/papers/estimator.md``, sections 2-4), not the paper's text.

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

* E0 :func:`local_condition`: ``||J(x)||_2`` by Lanczos (or power) iteration on ``J J^T`` (or
  ``J^T J``) with ``torch.func.jvp`` / ``vjp``; first order, the true local value; errs *low* (a
  Rayleigh quotient) by at most the reported tolerance.
* E1 :func:`global_condition`: ``lipschitz_bound * ||x|| / ||f(x)||``; a certified *upper* bound
  on the relative change for perturbations of any size, and loose (orders of magnitude).
* E2 :func:`masked_product_condition`: ``prod_l ||D_l(x) W_l||`` with the activation derivatives
  ``D_l`` at ``x`` (and local max-pool selections); in exact arithmetic ``E0 <= E2 <= E1``.
* E3 :func:`approximate_condition`: E1 with cheap layer norms: the reshaped kernel
  ``||K_mat||`` (neither side guaranteed; low in practice), ``sqrt(m) ||K_mat||`` (certified upper)
  or ``||K||_F`` (neither side).

Also: :func:`jacobian_norm` (the absolute ``||J(x)||_2``), :func:`clever_l2` (ART's CLEVER score,
an empirical robustness estimate), :func:`min_input_bits` and :func:`round_significand` (bit-width
arithmetic of the digest, section 4.3), and ``operator_norm`` re-exported from
:mod:`sensitivity_lib.opnorm`.

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
>>> e.kind
'lower'
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from sensitivity_lib.lipschitz import (
    OUTPUTS,
    Step,
    _default_norm,
    _Recorder,
    activation_derivative,
    build_plan,
    check_eval,
    lipschitz_bound,
    lipschitz_product,
    pool_window_multiplicity,
)
from sensitivity_lib.opnorm import operator_norm  # noqa: F401 - re-exported (documented in opnorm)
from sensitivity_lib.results import Estimate

__all__ = [
    "jacobian_norm",
    "local_condition",
    "global_condition",
    "masked_product_condition",
    "approximate_condition",
    "APPROXIMATIONS",
    "clever_l2",
    "min_input_bits",
    "round_significand",
    "top_singular_values",
    "amplification",
    "max_amplification",
    "rounding_flip_bits",
    "kink_fractions",
    "layerwise_condition",
]

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------
# Batched Lanczos / power iteration for the largest singular value of N independent operators


def top_singular_values(
    matvec: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    rmatvec: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    n: int,
    in_dim: int,
    out_dim: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    method: str = "lanczos",
    tol: float = 1e-6,
    max_iter: int = 200,
    krylov_dim: int = 50,
    generator: torch.Generator | None = None,
    return_vectors: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Largest singular value of N linear operators ``A_i``, matrix-free and batched.

    Iterates on ``A_i A_i^T`` when ``out_dim <= in_dim`` (vectors live in the smaller space),
    else on ``A_i^T A_i``. Lanczos keeps a fully re-orthogonalised Krylov basis of at most
    ``krylov_dim`` vectors and restarts explicitly from the top Ritz vector; power iteration keeps
    one vector. A sample stops when its relative residual ``||B u - theta u|| / theta`` (Lanczos:
    the standard estimate ``beta_k |y_k|``) is ``<= tol``, when its Krylov space is exhausted
    (exact), or after ``max_iter`` products with ``B``; converged samples leave the batch.

    Parameters
    ----------
    matvec, rmatvec
        ``matvec(v, idx)`` returns ``A_i v_i`` for the rows ``idx`` (a LongTensor of sample indices)
        with ``v`` of shape ``(len(idx), in_dim)``; ``rmatvec(u, idx)`` returns ``A_i^T u_i``.
    n, in_dim, out_dim
        Number of operators and their (flattened) dimensions.
    dtype, device
        Precision and device of the vectors passed to ``matvec`` / ``rmatvec``; the iteration itself
        runs in float64.
    method
        ``"lanczos"`` or ``"power"``.
    tol, max_iter, krylov_dim, generator
        Stopping rule, budget (products with ``B``), Lanczos basis size, and the random start.
    return_vectors
        Also return the unit Ritz vectors (in the space iterated on: the output space when
        ``out_dim <= in_dim``, else the input space).

    Returns
    -------
    (sigma, iterations, residual, vectors)
        float64 tensor (n,) of Ritz values ``sqrt(theta) <= sigma_max`` (exact arithmetic), int64
        tensor (n,), float64 tensor (n,), and float64 (n, dim) or ``None``.
    """
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    if not (tol > 0) or max_iter < 1:
        raise ValueError(f"need tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
    space_out = out_dim <= in_dim
    dim = out_dim if space_out else in_dim

    def op(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        v = v.to(dtype=dtype, device=device)
        if space_out:
            w = matvec(rmatvec(v, idx), idx)
        else:
            w = rmatvec(matvec(v, idx), idx)
        return w.detach().reshape(len(idx), dim).to(torch.float64)

    v0 = torch.randn(n, dim, generator=generator, dtype=torch.float64).to(device)
    v0 = v0 / v0.norm(dim=1, keepdim=True)
    theta = torch.zeros(n, dtype=torch.float64, device=device)
    iters = torch.zeros(n, dtype=torch.int64, device=device)
    resid = torch.full((n,), math.inf, dtype=torch.float64, device=device)
    vecs = v0.clone() if return_vectors else None
    active = torch.arange(n, device=device)

    if method == "power":
        v = v0
        for it in range(1, max_iter + 1):
            w = op(v, active)
            th = (v * w).sum(1)
            r = (w - th[:, None] * v).norm(dim=1) / th.abs().clamp_min(1e-300)
            theta[active], iters[active], resid[active] = th, it, r
            if vecs is not None:
                vecs[active] = v
            wn = w.norm(dim=1)
            keep = (r > tol) & (wn > 0)
            v = (w / wn.clamp_min(1e-300)[:, None])[keep]
            active = active[keep]
            if len(active) == 0:
                break
        return theta.clamp_min(0).sqrt(), iters, resid, vecs

    m = max(2, min(krylov_dim, dim))
    Q = v0[:, None, :]  # (na, j, dim)
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    count = 0
    while len(active) and count < max_iter:
        q = Q[:, -1]
        w = op(q, active)
        count += 1
        a = (q * w).sum(1)
        w = w - a[:, None] * q
        if len(alphas) and Q.shape[1] > 1:
            w = w - betas[-1][:, None] * Q[:, -2]
        for _ in range(2):  # full re-orthogonalisation, twice is enough
            w = w - torch.einsum("njd,nj->nd", Q, torch.einsum("njd,nd->nj", Q, w))
        b = w.norm(dim=1)
        alphas.append(a)
        betas.append(b)
        j = len(alphas)
        T = torch.diag_embed(torch.stack(alphas, 1))
        if j > 1:
            off = torch.stack(betas[:-1], 1)
            T = T + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
        evals, evecs = torch.linalg.eigh(T)
        th, y = evals[:, -1], evecs[:, :, -1]
        r = b * y[:, -1].abs() / th.abs().clamp_min(1e-300)
        exhausted = (b <= 1e-13 * th.abs().clamp_min(1e-300)) | torch.tensor(Q.shape[1] >= dim, device=device)
        r = torch.where(exhausted, torch.zeros_like(r), r)
        theta[active], iters[active], resid[active] = th, count, r
        if vecs is not None:
            u = torch.einsum("njd,nj->nd", Q, y)
            vecs[active] = u / u.norm(dim=1, keepdim=True)
        keep = (r > tol) & ~exhausted
        if not bool(keep.any()):
            break
        active = active[keep]
        Q, w, b, y = Q[keep], w[keep], b[keep], y[keep]
        alphas = [t[keep] for t in alphas]
        betas = [t[keep] for t in betas]
        if Q.shape[1] >= m:  # explicit restart from the top Ritz vector
            u = torch.einsum("njd,nj->nd", Q, y)
            Q = (u / u.norm(dim=1, keepdim=True))[:, None, :]
            alphas, betas = [], []
        else:
            Q = torch.cat([Q, (w / b[:, None])[:, None, :]], 1)
    return theta.clamp_min(0).sqrt(), iters, resid, vecs


# ----------------------------------------------------------------------------------------------
# Input checks and the output map


def _check_batch(model: nn.Module, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor batch, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or infinite values")
    check_eval(model)
    if hasattr(model, "check_input"):
        model.check_input(x)


def _check_output(output: str) -> None:
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")


def _output_fn(model: nn.Module, output: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def f(z: torch.Tensor) -> torch.Tensor:
        y = model(z)
        if output == "probs":
            y = torch.softmax(y, dim=-1)
        return y.reshape(y.shape[0], -1)

    return f


def _norms(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(t.shape[0], -1).to(torch.float64).norm(dim=1)


def _log2(t: torch.Tensor) -> torch.Tensor:
    return torch.log2(t.to(torch.float64))


# ----------------------------------------------------------------------------------------------
# E0: the exact local condition number


def jacobian_norm(
    model: nn.Module,
    x: torch.Tensor,
    *,
    output: str = "logits",
    tol: float = 1e-6,
    max_iter: int = 200,
    method: str = "lanczos",
    krylov_dim: int = 100,
    ad: str = "reverse",
    vectors: bool = False,
    generator: torch.Generator | None = None,
) -> Estimate:
    """``||J(x_i)||_2`` for every sample of a batch, matrix-free (absolute local condition number).

    ``J(x_i)`` is the Jacobian of one sample's output (flattened) with respect to its input.
    The samples of the batch are independent in eval mode, so one ``jvp`` and one ``vjp`` on the
    batch apply all N Jacobians at once (batch-as-block); Lanczos (default) or power iteration then
    runs on ``J J^T`` in the output space (or ``J^T J`` when the input is smaller).

    Parameters
    ----------
    model
        A module in eval mode; ``x`` is checked with ``model.check_input`` when it has one.
    x
        Batch ``(N, ...)``, finite floats. Use float64 model and input for oracle comparisons.
    output
        ``"logits"`` or ``"probs"`` (softmax over the last axis of the model's output).
    tol
        Stop a sample when the relative eigen-residual of ``J J^T`` is below ``tol`` (then the
        relative error of ``sigma^2`` is at most about ``tol``).
    max_iter, method, krylov_dim, generator
        Budget, ``"lanczos"`` / ``"power"``, Lanczos basis size, and the random start.
    ad
        How ``J v`` is applied: ``"reverse"`` (default) differentiates the linear map
        ``u -> J^T u`` once more (reverse over reverse; the forward pass is kept for the whole
        iteration), ``"forward"`` uses ``torch.func.jvp`` (recomputes the forward pass each time,
        and its first call imports torch's decomposition machinery, several seconds). ``"reverse"``
        falls back to ``"forward"`` for an operation without double backward.
    vectors
        Also return ``extra["right"]``: per sample the unit input direction ``v`` (shape of ``x``)
        with ``||J v|| = value`` (the first-order worst-case perturbation direction).

    Returns
    -------
    Estimate
        ``value``: float64 tensor (N,), ``kind="lower"`` (a Ritz value never exceeds ``sigma_max``),
        ``iterations``: the largest count, ``residual``: tensor (N,);
        ``extra["iterations"]`` per sample, ``extra["log2"]``, ``extra["space"]``.

    Raises
    ------
    ValueError
        Non-finite or badly shaped ``x``, model in training mode, unknown ``output``.
    """
    _check_output(output)
    _check_batch(model, x)
    if ad not in ("reverse", "forward"):
        raise ValueError(f"ad must be 'reverse' or 'forward', got {ad!r}")
    f = _output_fn(model, output)
    x = x.detach()
    with torch.no_grad():
        out_dim = f(x[:1]).shape[1]
    in_shape = x.shape[1:]
    in_dim = math.prod(in_shape)
    state: dict[str, Any] = {"idx": None, "reverse": ad == "reverse"}

    def linearise(idx: torch.Tensor) -> None:
        """Keep ``y = f(x_idx)`` and ``g(u) = J^T u`` (a graph linear in ``u``) for the active rows."""
        if state["idx"] is not None and torch.equal(state["idx"], idx):
            return
        with torch.enable_grad():
            xi = x[idx].clone().requires_grad_(True)
            y = f(xi)
            u0 = torch.zeros_like(y, requires_grad=True)
            (g,) = torch.autograd.grad(y, xi, u0, create_graph=True)
        state.update(idx=idx.clone(), xi=xi, y=y, u0=u0, g=g)

    def rmatvec(u: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        linearise(idx)
        u = u.reshape(len(idx), out_dim).to(state["y"].dtype)
        return torch.autograd.grad(state["y"], state["xi"], u, retain_graph=True)[0]

    def matvec(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        v = v.reshape(len(idx), *in_shape).to(x.dtype)
        if state["reverse"]:
            linearise(idx)
            try:  # J v as the derivative of the linear map u -> J^T u (reverse over reverse)
                return torch.autograd.grad(state["g"], state["u0"], v, retain_graph=True)[0]
            except RuntimeError:
                state["reverse"] = False  # an op without double backward: use forward mode
        return torch.func.jvp(f, (x[idx],), (v,))[1]

    sigma, iters, resid, vecs = top_singular_values(
        matvec,
        rmatvec,
        len(x),
        in_dim,
        out_dim,
        dtype=x.dtype,
        device=x.device,
        method=method,
        tol=tol,
        max_iter=max_iter,
        krylov_dim=krylov_dim,
        generator=generator,
        return_vectors=vectors,
    )
    extra = {
        "iterations": iters,
        "log2": _log2(sigma),
        "output": output,
        "space": "output" if out_dim <= in_dim else "input",
        "tol": tol,
    }
    if vectors:
        idx = torch.arange(len(x), device=x.device)
        if out_dim <= in_dim:  # v = J^T u / ||J^T u||
            right = rmatvec(vecs.to(x.dtype), idx).detach().reshape(len(x), -1).to(torch.float64)
            right = right / right.norm(dim=1, keepdim=True).clamp_min(1e-300)
        else:
            right = vecs
        extra["right"] = right.reshape(x.shape).to(x.dtype)
    return Estimate(
        value=sigma,
        kind="lower",
        method=method,
        norm="2",
        iterations=int(iters.max()),
        residual=resid,
        extra=extra,
    )


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
        ``value`` float64 (N,), ``kind="lower"`` (errs low by at most the solver tolerance);
        ``extra``: ``log2`` (bits lost), ``jacobian_norm`` (the Estimate of ``||J||``),
        ``x_norm``, ``f_norm``, and ``right`` (the worst input direction) when ``vectors=True``.
    """
    J = jacobian_norm(
        model,
        x,
        output=output,
        tol=tol,
        max_iter=max_iter,
        method=method,
        vectors=vectors,
        generator=generator,
    )
    with torch.no_grad():
        fx = _output_fn(model, output)(x)
    xn, fn = _norms(x), _norms(fx)
    log2 = J.extra["log2"] + _log2(xn) - _log2(fn)
    return Estimate(
        value=torch.exp2(log2),
        kind="lower",
        method=f"E0:{J.method}",
        norm="2",
        iterations=J.iterations,
        residual=J.residual,
        extra={
            "log2": log2,
            "jacobian_norm": J,
            "x_norm": xn,
            "f_norm": fn,
            "output": output,
            **({"right": J.extra["right"]} if vectors else {}),
        },
    )


# ----------------------------------------------------------------------------------------------
# E1: the certified global bound


def global_condition(
    model: nn.Module,
    x: torch.Tensor,
    *,
    output: str = "logits",
    lipschitz: Estimate | None = None,
) -> Estimate:
    """E1: ``L ||x|| / ||f(x)||`` with ``L`` from :func:`~sensitivity_lib.lipschitz.lipschitz_bound`.

    For every perturbation ``dx`` (any size):
    ``||f(x+dx) - f(x)|| / ||f(x)|| <= value * ||dx|| / ||x||``; equal to the product of per-layer
    relative bounds after telescoping (digest, eq. 4.1). Certified upper, usually very loose.

    Parameters
    ----------
    model, x, output
        As in :func:`local_condition`.
    lipschitz
        A precomputed ``lipschitz_bound(model, x.shape[1:], output=output)`` to reuse.

    Returns
    -------
    Estimate
        ``value`` float64 (N,), ``kind="upper"``; ``extra``: ``log2``, ``lipschitz``, ``x_norm``,
        ``f_norm``.
    """
    _check_output(output)
    _check_batch(model, x)
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
        fx = _output_fn(model, output)(x)
    xn, fn = _norms(x), _norms(fx)
    log2 = float(L.extra["log2"]) + _log2(xn) - _log2(fn)
    return Estimate(
        value=torch.exp2(log2),
        kind="upper",
        method="E1:" + L.method,
        norm="2",
        extra={"log2": log2, "lipschitz": L, "x_norm": xn, "f_norm": fn, "output": output},
    )


def layerwise_condition(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-layer relative bounds ``kappa_l = L_l ||x_{l-1}|| / ||x_l||`` along a chain network.

    ``L_l`` is the certified constant of layer ``l`` (as in
    :func:`~sensitivity_lib.lipschitz.lipschitz_bound`, BN folded) and ``x_l`` its output at ``x``.
    Each ``kappa_l`` bounds the relative condition number of that layer at its input; their product
    telescopes to E1: ``prod_l kappa_l = (prod_l L_l) ||x|| / ||f(x)||`` (digest, eq. 4.1), the
    "product of per-layer condition numbers".

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
    _check_batch(model, x)
    plan = build_plan(model, tuple(x.shape[1:]))
    for st in plan.steps:
        if st.op in ("add", "cat") or st.users > 1:
            raise NotImplementedError(f"layerwise_condition needs a chain network; {st.name!r} is a {st.op}")
    keep = {st.node for st in plan.steps}
    rec = _Recorder(plan.gm, set(), keep=lambda n: n in keep)
    with torch.no_grad():
        rec.run(x.detach())
    out: dict[str, torch.Tensor] = {}
    for st in plan.steps[1:]:
        c = float(_default_norm(st).value) if st.op == "linear" else st.const
        n_in = _norms(rec.values[plan.steps[st.inputs[0]].node])
        n_out = _norms(rec.values[st.node])
        out[st.name] = c * n_in / n_out
    return out


# ----------------------------------------------------------------------------------------------
# E3: cheap approximations of the per-layer norms

APPROXIMATIONS: dict[str, str] = {
    "reshaped": "estimate",  # ||K_mat||_2, the kernel as a C_out x (C_in k k) matrix
    "reshaped_upper": "upper",  # sqrt(m) ||K_mat||_2
    "frobenius": "estimate",  # ||K||_F
}


def _conv_multiplicity(step: Step) -> int:
    from sensitivity_lib.lipschitz import _pair, _pool_1d_windows

    w = step.params["weight"]
    H, W = step.in_shape[-2:]
    kh, kw = w.shape[-2:]
    (sh, sw), (dh, dw) = _pair(step.params["stride"]), _pair(step.params["dilation"])
    pad = step.params["padding"]
    if isinstance(pad, str):
        out_hw = step.out_shape[-2:]
        ph = max(0, ((out_hw[0] - 1) * sh + dh * (kh - 1) + 1 - H + 1) // 2) if pad == "same" else 0
        pw = max(0, ((out_hw[1] - 1) * sw + dw * (kw - 1) + 1 - W + 1) // 2) if pad == "same" else 0
        if pad == "same":  # asymmetric 'same' padding: count with the larger side on both
            ph, pw = dh * (kh - 1), dw * (kw - 1)
    else:
        ph, pw = _pair(pad)
    mh = pool_window_multiplicity(_pool_1d_windows(H, kh, sh, ph, dh, False), H)
    mw = pool_window_multiplicity(_pool_1d_windows(W, kw, sw, pw, dw, False), W)
    return max(1, mh * mw)


def _approx_norm(approximation: str) -> Callable[[Step], Estimate]:
    def norm(step: Step) -> Estimate:
        w = step.params["weight"].detach().to(torch.float64)
        if approximation == "frobenius":
            kind = "upper" if step.kind == "linear" else "estimate"
            return Estimate(float(w.norm()), kind, "frobenius")
        if step.kind == "linear":  # the certified norm of E1 (exact up to a ~1e-10 margin)
            return _default_norm(step)
        g = int(step.params["groups"])
        kmat = w.reshape(g, w.shape[0] // g, -1)
        s = float(torch.linalg.matrix_norm(kmat, 2).max())  # block-diagonal over groups
        if approximation == "reshaped":
            return Estimate(s, "estimate", "reshaped")
        m = _conv_multiplicity(step)
        return Estimate(math.sqrt(m) * s, "upper", "reshaped_upper", extra={"m": m})

    return norm


def approximate_condition(
    model: nn.Module,
    x: torch.Tensor,
    *,
    approximation: str = "reshaped",
    output: str = "logits",
) -> Estimate:
    """E3: E1 with a cheap per-layer norm instead of the certified conv operator norm.

    ``approximation``:

    * ``"reshaped"``: ``||K_mat||_2``, the kernel reshaped to ``C_out x (C_in k_h k_w)`` (spectral
      normalisation's proxy). Usually *below* the operator norm (it is the norm of the operator
      restricted to one output pixel), so the product can under-estimate E1 and even E0: not
      certified.
    * ``"reshaped_upper"``: ``sqrt(m) ||K_mat||_2`` with ``m`` the largest number of output
      positions that read one input pixel (``||A x|| = ||K_mat U x|| <= ||K_mat|| sqrt(m) ||x||``
      with ``U`` the im2col map); a certified upper bound, looser than the FFT norm.
    * ``"frobenius"``: ``||K||_F``; neither side in general.

    Linear layers keep the certified norm of E1 (the Frobenius norm for ``"frobenius"``).

    Returns
    -------
    Estimate
        ``value`` float64 (N,), ``kind`` ``"upper"`` for ``"reshaped_upper"``, else ``"estimate"``;
        ``extra``: ``log2``, ``lipschitz`` (the product), ``x_norm``, ``f_norm``.
    """
    if approximation not in APPROXIMATIONS:
        raise ValueError(f"approximation must be one of {list(APPROXIMATIONS)}, got {approximation!r}")
    _check_output(output)
    _check_batch(model, x)
    L = lipschitz_product(
        model,
        tuple(x.shape[1:]),
        layer_norm=_approx_norm(approximation),
        output=output,
        method=approximation,
        kind=APPROXIMATIONS[approximation],
    )
    with torch.no_grad():
        fx = _output_fn(model, output)(x)
    xn, fn = _norms(x), _norms(fx)
    log2 = float(L.extra["log2"]) + _log2(xn) - _log2(fn)
    return Estimate(
        value=torch.exp2(log2),
        kind=L.kind,
        method=f"E3:{approximation}",
        norm="2",
        extra={"log2": log2, "lipschitz": L, "x_norm": xn, "f_norm": fn, "output": output},
    )


# ----------------------------------------------------------------------------------------------
# E2: the local masked product


def _log2sum_rows(terms: list[torch.Tensor]) -> torch.Tensor:
    return torch.logsumexp(torch.stack(terms, 0) * LN2, dim=0) / LN2


def _softmax_local(z: torch.Tensor, dim: Any) -> torch.Tensor:
    """Exact ``||diag(p) - p p^T||_2`` per sample for a softmax over the last axis of (N, C)."""
    if z.ndim != 2 or dim not in (-1, 1):
        return torch.full((z.shape[0],), 0.5, dtype=torch.float64)
    p = torch.softmax(z.to(torch.float64), dim=1)
    J = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.linalg.eigvalsh(J)[:, -1].clamp_min(0)


def _window_values(step: Step, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values of every max-pool window, (N, C, oh, ow, k) with ``-inf`` padding, and the flat
    input index of every entry, (oh, ow, k)."""
    N, C, H, W = z.shape
    wins_h, wins_w = step.params["windows"]
    kh, kw = max(map(len, wins_h)), max(map(len, wins_w))
    idx_h = torch.tensor([w + [-1] * (kh - len(w)) for w in wins_h])
    idx_w = torch.tensor([w + [-1] * (kw - len(w)) for w in wins_w])
    valid = ((idx_h >= 0)[:, None, :, None] & (idx_w >= 0)[None, :, None, :]).reshape(
        len(wins_h), len(wins_w), -1
    )
    flat = (idx_h.clamp_min(0)[:, None, :, None] * W + idx_w.clamp_min(0)[None, :, None, :]).reshape(
        valid.shape
    )
    vals = z.reshape(N, C, H * W)[:, :, flat.reshape(-1)].reshape(N, C, *flat.shape)
    vals = vals.masked_fill(~valid, -math.inf)
    return vals, flat


def _maxpool_local(step: Step, z: torch.Tensor) -> torch.Tensor:
    """``sqrt(max column count)`` of the local selection matrix of a max-pool, per sample."""
    N, C, H, W = z.shape
    vals, flat = _window_values(step, z)
    arg = vals.argmax(-1)  # ties: the first index, like PyTorch
    chosen = torch.gather(flat.expand(N, C, *flat.shape), -1, arg[..., None])[..., 0]
    counts = torch.zeros(N, C, H * W, dtype=torch.float64)
    counts.scatter_add_(
        2, chosen.reshape(N, C, -1), torch.ones_like(chosen.reshape(N, C, -1), dtype=torch.float64)
    )
    return counts.reshape(N, -1).max(1).values.sqrt()


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
    Lanczos, matrix-free); other activations contribute ``max |f'(z)|``, max-pools the square
    root of the largest number of outputs that select one input at ``x``, softmax its exact local
    Jacobian norm, and the remaining operations their global constants; sums and concatenations
    combine as in :mod:`sensitivity_lib.lipschitz`. By the chain rule and sub-multiplicativity, in
    exact arithmetic
    ``||J(x)|| <= E2 <= L`` (so ``E0 <= E2 <= E1``); the computed layer norms are Ritz values that
    err low by at most ``tol``, so ``kind="estimate"``.

    Parameters
    ----------
    model, x, output, generator
        As in :func:`local_condition`.
    tol, max_iter, krylov_dim
        Stopping rule, budget and Lanczos basis size of every layer-norm computation.
    memory_mb
        Samples are processed in chunks so that one layer's Lanczos basis stays below this.

    Returns
    -------
    Estimate
        ``value`` float64 (N,), ``kind="estimate"``; ``extra``: ``log2``, ``norm_log2`` (log2 of the
        product itself, per sample), ``layers`` (module path -> tensor (N,) of local factors),
        ``x_norm``, ``f_norm``.
    """
    _check_output(output)
    _check_batch(model, x)
    plan = build_plan(model, tuple(x.shape[1:]))
    x = x.detach()
    N = x.shape[0]
    needed = set()
    for s in plan.steps:
        if s.op in ("act", "maxpool", "softmax"):
            needed.add(plan.steps[s.inputs[0]].node)
    rec = _Recorder(plan.gm, set(), keep=lambda n: n in needed)
    with torch.no_grad():
        out = rec.run(x)
    values = rec.values
    layers: dict[str, torch.Tensor] = {}
    logs: list[torch.Tensor] = []
    zeros = torch.zeros(N, dtype=torch.float64)
    fused = {
        s.inputs[0]
        for s in plan.steps
        if s.op == "act"
        and plan.steps[s.inputs[0]].op in ("linear", "diag")
        and plan.steps[s.inputs[0]].users == 1
    }
    for i, s in enumerate(plan.steps):
        if s.op == "input":
            logs.append(zeros.clone())
            continue
        if s.op == "add":
            logs.append(
                _log2sum_rows([logs[j] + math.log2(w) for j, w in zip(s.inputs, s.weights, strict=True)])
            )
            continue
        if s.op == "cat":
            logs.append(0.5 * _log2sum_rows([2 * logs[j] for j in s.inputs]))
            continue
        if i in fused:
            logs.append(logs[s.inputs[0]])
            continue
        if s.op == "act":
            z = values[plan.steps[s.inputs[0]].node].detach()
            d = activation_derivative(s.kind, s.params, z)
            prev = plan.steps[s.inputs[0]]
            if s.inputs[0] in fused and prev.op == "linear":
                fac = _local_layer_norm(prev, d, tol, max_iter, krylov_dim, memory_mb, generator)
                name = prev.name + "+" + s.name
            elif s.inputs[0] in fused:  # diagonal scale then activation: exact
                scale = prev.params["scale"].to(torch.float64)
                fac = (d.to(torch.float64) * scale).abs().reshape(N, -1).max(1).values
                name = prev.name + "+" + s.name
            else:
                fac = d.to(torch.float64).abs().reshape(N, -1).max(1).values
                name = s.name
        elif s.op == "linear":
            fac = _local_layer_norm(s, None, tol, max_iter, krylov_dim, memory_mb, generator).expand(N)
            name = s.name
        elif s.op == "maxpool":
            fac = _maxpool_local(s, values[plan.steps[s.inputs[0]].node].detach())
            name = s.name
        elif s.op == "softmax":
            fac = _softmax_local(values[plan.steps[s.inputs[0]].node].detach(), s.params["dim"])
            name = s.name
        else:  # diag, fixed: global constants are exact
            fac = torch.full((N,), float(s.const), dtype=torch.float64)
            name = s.name
        layers[name] = fac
        logs.append(logs[s.inputs[0]] + _log2(fac))
    total = logs[plan.output]
    fx = out.detach()
    if output == "probs":
        sm = _softmax_local(fx.reshape(N, -1), -1)
        layers["softmax(output)"] = sm
        total = total + _log2(sm)
        fx = torch.softmax(fx, dim=-1)
    xn, fn = _norms(x), _norms(fx)
    log2 = total + _log2(xn) - _log2(fn)
    return Estimate(
        value=torch.exp2(log2),
        kind="estimate",
        method="E2:masked-product",
        norm="2",
        extra={
            "log2": log2,
            "norm_log2": total,
            "layers": layers,
            "x_norm": xn,
            "f_norm": fn,
            "output": output,
        },
    )


def _local_layer_norm(
    step: Step,
    d: torch.Tensor | None,
    tol: float,
    max_iter: int,
    krylov_dim: int,
    memory_mb: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """``||D_i W||_2`` per sample (``d`` the (N, *out) diagonal) or ``||W||_2`` (``d=None``)."""
    apply = step.apply
    in_shape, out_shape = tuple(step.in_shape), tuple(step.out_shape)
    w = step.params["weight"]
    dtype, device = w.dtype, w.device
    in_dim, out_dim = math.prod(in_shape), math.prod(out_shape)
    n = 1 if d is None else d.shape[0]
    dd = None if d is None else d.to(dtype).reshape(n, out_dim)
    per_sample = min(in_dim, out_dim) * min(krylov_dim, min(in_dim, out_dim)) * 8 / 2**20
    chunk = max(1, int(memory_mb // max(per_sample, 1e-9)))
    res = []
    for start in range(0, n, chunk):
        sl = torch.arange(start, min(n, start + chunk))

        def matvec(v: torch.Tensor, idx: torch.Tensor, sl: torch.Tensor = sl) -> torch.Tensor:
            y = apply(v.reshape(len(idx), *in_shape)).reshape(len(idx), out_dim)
            return y if dd is None else y * dd[sl[idx]]

        def rmatvec(u: torch.Tensor, idx: torch.Tensor, sl: torch.Tensor = sl) -> torch.Tensor:
            u = u.reshape(len(idx), out_dim)
            if dd is not None:
                u = u * dd[sl[idx]]
            zero = torch.zeros(len(idx), *in_shape, dtype=dtype, device=device)
            _, back = torch.func.vjp(apply, zero)
            return back(u.reshape(len(idx), *out_shape))[0]

        sigma, _, _, _ = top_singular_values(
            matvec,
            rmatvec,
            len(sl),
            in_dim,
            out_dim,
            dtype=dtype,
            device=device,
            tol=tol,
            max_iter=max_iter,
            krylov_dim=krylov_dim,
            generator=generator,
        )
        res.append(sigma)
    return torch.cat(res).cpu()


# ----------------------------------------------------------------------------------------------
# Perturbation experiments: observed amplification, adversarial ascent, rounding


def _plain(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model as a function on all of R^n: a ``zoo.Normalized`` wrapper without its [0, 1] check
    (a perturbed input may leave [0, 1]; the bounds hold on the whole space)."""
    net, mean, std = (getattr(model, a, None) for a in ("net", "mean", "std"))
    if hasattr(model, "check_input") and net is not None and mean is not None and std is not None:
        return lambda z: net((z - mean) / std)
    return model


def amplification(
    model: nn.Module,
    x: torch.Tensor,
    d: torch.Tensor,
    *,
    output: str = "logits",
    relative: bool = False,
) -> torch.Tensor:
    """Observed amplification of a perturbation ``d``, per sample (float64).

    ``||f(x + d) - f(x)|| / ||d||`` (absolute; never above the Lipschitz constant), or with
    ``relative=True`` ``(||f(x + d) - f(x)|| / ||f(x)||) / (||d|| / ||x||)`` (never above E1).
    ``x + d`` may leave [0, 1]: a ``zoo.Normalized`` model is evaluated without its input check.

    Parameters
    ----------
    model, x, output
        As in :func:`local_condition`.
    d
        Perturbations, same shape as ``x``.

    Returns
    -------
    torch.Tensor
        float64 (N,).
    """
    _check_output(output)
    if d.shape != x.shape:
        raise ValueError(f"d has shape {tuple(d.shape)}, x has {tuple(x.shape)}")
    plain = _plain(model)

    def f(z: torch.Tensor) -> torch.Tensor:
        y = plain(z)
        return (torch.softmax(y, dim=-1) if output == "probs" else y).reshape(len(z), -1)

    with torch.no_grad():
        fx, fxd = f(x), f(x + d)
    ratio = _norms(fxd - fx) / _norms(d)
    if relative:
        ratio = ratio * _norms(x) / _norms(fx)
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
    (e.g. ``extra["right"]`` of :func:`jacobian_norm`, the first-order worst direction) or a random
    direction.

    Parameters
    ----------
    model, x, output
        As in :func:`local_condition`.
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
    _check_output(output)
    _check_batch(model, x)
    plain = _plain(model)
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


_KINKS = {"relu": (0.0,), "relu6": (0.0, 6.0), "leaky_relu": (0.0,)}


def kink_fractions(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Where ``f`` is not differentiable at ``x``: per max-pool, the fraction of windows whose
    maximum is attained more than once (a tie), and per ReLU-like activation, the fraction of
    inputs exactly at a kink; per sample.

    At such points autograd's ``J(x)`` is one of several one-sided Jacobians, so ``||J(x)||`` (E0)
    need not match finite differences, in either direction.

    Parameters
    ----------
    model, x
        As in :func:`local_condition`.

    Returns
    -------
    dict
        Module path -> float64 tensor (N,) of fractions in [0, 1].
    """
    _check_batch(model, x)
    plan = build_plan(model, tuple(x.shape[1:]))
    needed = {plan.steps[s.inputs[0]].node for s in plan.steps if s.op in ("maxpool", "act")}
    rec = _Recorder(plan.gm, set(), keep=lambda n: n in needed)
    with torch.no_grad():
        rec.run(x.detach())
    out: dict[str, torch.Tensor] = {}
    N = len(x)
    for s in plan.steps:
        if s.op == "act" and s.kind in _KINKS:
            z = rec.values[plan.steps[s.inputs[0]].node].reshape(N, -1)
            at = torch.zeros_like(z, dtype=torch.bool)
            for k in _KINKS[s.kind]:
                at |= z == k
            out[s.name] = at.double().mean(1)
        elif s.op == "maxpool":
            vals, _ = _window_values(s, rec.values[plan.steps[s.inputs[0]].node])
            tied = (vals == vals.max(-1, keepdim=True).values).sum(-1) > 1
            out[s.name] = tied.reshape(N, -1).double().mean(1)
    return out


def rounding_flip_bits(
    model: nn.Module, x: torch.Tensor, bits: range = range(1, 25), mode: str = "nearest"
) -> torch.Tensor:
    """Empirical bit-width: the smallest ``t`` such that rounding the input to every ``t' >= t``
    significand bits (within ``bits``) keeps the predicted class, per sample.

    Parameters
    ----------
    model, x
        A classifier and a batch in its input space.
    bits
        Increasing significand widths to try (default 1 ... 24).
    mode
        ``"nearest"`` or ``"chop"`` (see :func:`round_significand`).

    Returns
    -------
    torch.Tensor
        int64 (N,); ``bits[-1] + 1`` where even the widest rounding flips the class.
    """
    _check_batch(model, x)
    plain = _plain(model)
    with torch.no_grad():
        y0 = plain(x).argmax(1)
        ok_from = torch.full((len(x),), bits[-1] + 1, dtype=torch.int64)
        for t in reversed(list(bits)):
            same = plain(round_significand(x, t, mode)).argmax(1) == y0
            ok_from = torch.where(same & (ok_from == t + 1), torch.full_like(ok_from, t), ok_from)
    return ok_from


# ----------------------------------------------------------------------------------------------
# CLEVER (ART)


def clever_l2(
    model: nn.Module,
    x: torch.Tensor,
    *,
    nb_batches: int = 10,
    batch_size: int = 10,
    radius: float = 2.0,
    pool_factor: int = 10,
    target: int | str | None = None,
    generator: torch.Generator | None = None,
) -> Estimate:
    """CLEVER scores (Weng et al., 2018) in the 2-norm, through ART's ``clever_u`` / ``clever_t``.

    CLEVER estimates the minimal 2-norm of an adversarial perturbation around ``x``: for each class
    ``j`` other than the predicted ``c`` it samples ``pool_factor * batch_size`` points uniformly in
    the 2-ball of ``radius`` around ``x`` (clipped to [0, 1]), takes the 2-norm of the gradient of
    ``g_j = f_c - f_j`` there, keeps the max of each of ``nb_batches`` batches of ``batch_size``,
    fits a reverse Weibull distribution to these maxima, and returns
    ``min(g_j(x) / location, radius)``; ``clever_u`` takes the minimum over all ``j``.

    Norm convention: ART's ``norm`` argument is the norm ``p`` of the *perturbation*; ART switches
    to the dual norm ``q`` (``p / (p - 1)``) of the gradient internally (1 <-> inf). For ``p = 2``
    both are 2, which is what this wrapper passes. The score is an *estimate* (no guarantee, and
    it depends on the random samples); it is seeded from ``generator`` and the global NumPy state
    is restored afterwards.

    Parameters
    ----------
    model
        A classifier in eval mode that maps [0, 1] images to logits (e.g. ``zoo.Normalized``).
    x
        Batch ``(N, C, H, W)`` in [0, 1]; one score per sample.
    nb_batches, batch_size, pool_factor, radius
        ART's parameters (defaults: 10, 10, 10, 2.0).
    target
        ``None`` (untargeted, ``clever_u``: min over all classes, cost proportional to the number
        of classes), ``"runner_up"`` (``clever_t`` against the second-largest logit) or a class
        index.
    generator
        Seeds NumPy for ART's sampling.

    Returns
    -------
    Estimate
        ``value`` float64 (N,), ``kind="estimate"``, ``method="clever_u"`` or ``"clever_t"``.
    """
    import warnings

    with warnings.catch_warnings():  # ART imports tqdm.auto, which warns without ipywidgets
        warnings.filterwarnings("ignore", message="IProgress not found")
        from art.estimators.classification import PyTorchClassifier
        from art.metrics import clever_t, clever_u

    _check_batch(model, x)
    with torch.no_grad():
        logits = model(x)
    nb_classes = logits.shape[1]
    clf = PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=nb_classes,
        clip_values=(0.0, 1.0),
        device_type="gpu" if x.is_cuda else "cpu",
    )
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    state = np.random.get_state()  # noqa: NPY002 - ART samples from the global NumPy state
    scores = []
    try:
        np.random.seed(seed)  # noqa: NPY002
        for i in range(len(x)):
            xi = x[i].detach().cpu().numpy().astype(np.float32)
            if target is None:
                s = clever_u(
                    clf,
                    xi,
                    nb_batches,
                    batch_size,
                    radius,
                    norm=2,
                    pool_factor=pool_factor,
                    verbose=False,
                )
            else:
                if target == "runner_up":
                    j = int(logits[i].topk(2).indices[1])
                else:
                    j = int(target)
                s = clever_t(clf, xi, j, nb_batches, batch_size, radius, norm=2, pool_factor=pool_factor)
            scores.append(float(s))
    finally:
        np.random.set_state(state)  # noqa: NPY002
    return Estimate(
        value=torch.tensor(scores, dtype=torch.float64),
        kind="estimate",
        method="clever_u" if target is None else "clever_t",
        norm="2",
        extra={
            "nb_batches": nb_batches,
            "batch_size": batch_size,
            "radius": radius,
            "pool_factor": pool_factor,
            "target": target,
            "seed": seed,
        },
    )


# ----------------------------------------------------------------------------------------------
# Bits


def min_input_bits(log2_kappa: torch.Tensor | float, y: torch.Tensor) -> torch.Tensor:
    """Significand bits ``t`` that keep the arg-max of ``y`` under a relative input error ``2^-t``.

    Digest, eq. (4.3) (our reconstruction): if ``||dx|| <= 2^-t ||x||`` (rounding every input to
    ``t`` significand bits) then ``||dy|| <= kappa 2^-t ||y||``, and the top class cannot change
    while ``||dy|| < g / sqrt(2)`` with ``g`` the gap between the two largest entries of ``y``. So

    ``t_min = ceil(log2(sqrt(2) * kappa * ||y|| / g))``.

    With ``kappa`` from E1 this is certified; with E0 it is a first-order prediction.

    Parameters
    ----------
    log2_kappa
        log2 of the relative condition number, per sample (tensor (N,)) or one float.
    y
        The outputs (N, C) that ``kappa`` refers to (logits or probabilities).

    Returns
    -------
    torch.Tensor
        float64 (N,) of bit counts (``inf`` when the top two entries tie).
    """
    y = y.detach().to(torch.float64).reshape(y.shape[0], -1)
    top = y.topk(2, dim=1).values
    gap = top[:, 0] - top[:, 1]
    k = torch.as_tensor(log2_kappa, dtype=torch.float64)
    t = 0.5 + k + torch.log2(y.norm(dim=1)) - torch.log2(gap)
    return torch.ceil(t)


def round_significand(x: torch.Tensor, bits: int, mode: str = "nearest") -> torch.Tensor:
    """Round every entry of ``x`` to ``bits`` significand bits (the leading bit included).

    ``mode="nearest"`` (ties to even): relative error ``<= 2^-bits`` (unit round-off ``u``);
    ``mode="chop"`` (truncation toward zero): ``< 2^(1-bits)``. float32 has 24 bits, bfloat16 8,
    float16 11. The exponent range is not limited (no overflow / subnormals are emulated).

    Parameters
    ----------
    x
        Any float tensor.
    bits
        ``>= 1``.
    mode
        ``"nearest"`` or ``"chop"``.

    Returns
    -------
    torch.Tensor
        Same dtype and shape as ``x``.
    """
    if int(bits) < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    if mode not in ("nearest", "chop"):
        raise ValueError(f"mode must be 'nearest' or 'chop', got {mode!r}")
    m, e = torch.frexp(x.to(torch.float64))  # x = m 2^e, 0.5 <= |m| < 1
    scaled = torch.ldexp(m, torch.tensor(int(bits), dtype=torch.int32))
    r = torch.round(scaled) if mode == "nearest" else torch.trunc(scaled)
    return torch.ldexp(torch.ldexp(r, torch.tensor(-int(bits), dtype=torch.int32)), e).to(x.dtype)

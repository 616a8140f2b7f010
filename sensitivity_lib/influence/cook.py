r"""Cook's local influence of case weights: the classical baseline for "which training images matter".

Paper: R. D. Cook, "Assessment of local influence", J. R. Statist. Soc. B 48 (1986) 133-169.
FI of Shu & Zhu (AAAI 2019) descends from it through Zhu et al. (Ann. Statist. 35, 2007).

Perturbation: case weights ``omega in R^n`` on the log-likelihood of ``n`` training images,
``L(theta | omega) = sum_i omega_i log p(y_i | x_i, theta) - (lam / 2) ||theta||^2``, with the null
point ``omega_0 = 1``. Cook's likelihood displacement ``LD(omega) = 2 [L(theta_hat) -
L(theta_hat_omega)]`` (``theta_hat_omega`` the maximiser under the weights ``omega``) has, at
``omega_0`` and in a unit direction ``h``, the normal curvature

    C_h = 2 h^T Delta^T (-L'')^{-1} Delta h,    Delta = d^2 L / d theta d omega^T = [g_1, ..., g_n],

with ``g_i = grad_theta log p(y_i | x_i, theta)``. ``C_max`` is the largest eigenvalue of
``F = 2 Delta^T (-L'')^{-1} Delta`` (an ``n x n`` matrix, never formed) and ``h_max`` its unit
eigenvector: the cases with large ``|h_max,i|`` are those whose joint down- or up-weighting moves
the fit most (Cook's diagnostic).

What is perturbed here (our choices, stated in the book): ``theta`` is the weight and bias of the
network's **last linear layer** only, the features ``phi(x_i)`` before it held fixed. There the
log-likelihood is that of a multinomial logistic regression, so ``-L''`` without the penalty is
exactly ``sum_i J_i^T (diag p_i - p_i p_i^T) J_i`` (``J_i`` the Jacobian of the logits with respect
to ``theta``), positive semi-definite and singular along the softmax's shift invariance. The
penalty ``lam`` (``damping``) makes it invertible; by default ``lam`` is ``damping`` times the mean
eigenvalue ``tr(-L'') / P``. Cook's formula assumes ``theta_hat`` maximises ``L``; a network
trained by a few epochs of Adam on all its layers is not at the maximum of this penalised
last-layer objective, so the value is the curvature of the quadratic model of ``LD`` at the trained
weights, not of ``LD`` itself.

Everything is matrix-free: ``Delta v`` is one vector-Jacobian product of the per-case
log-likelihoods (``torch.func.vjp``), ``Delta^T u`` one Jacobian-vector product (``torch.func.jvp``),
``(-L'') w`` one of each through the logits, the solve is MINRES (:func:`sensitivity_lib.krylov.solve`)
and ``C_max`` comes from Lanczos (:func:`sensitivity_lib.krylov.top_eig`). Norm: Euclidean on
``omega``. Input space: images ``(n, ...)`` as the model takes them (pixels in ``[0, 1]`` for the
:mod:`sensitivity_lib.zoo` models), labels ``(n,)``; the model returns logits ``(n, C)``, in eval mode.

Example
-------
>>> import torch
>>> from torch import nn
>>> _ = torch.manual_seed(0)
>>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4)).double().eval()
>>> x, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 4, (20,))
>>> r = local_influence(net, x, y)
>>> r.layer, tuple(r.h_max.shape), bool(r.c_max.value > 0), r.c_max.kind
('2', (20,), True, 'lower')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp

from sensitivity_lib.krylov import LinearOperator, solve, top_eig
from sensitivity_lib.results import Estimate
from sensitivity_lib.validation import check_batch, check_eval, check_labels

__all__ = ["LocalInfluence", "local_influence", "last_linear"]


@dataclass(frozen=True)
class LocalInfluence:
    """Cook's local influence of case weights on the last linear layer.

    Attributes
    ----------
    c_max
        The largest normal curvature ``C_max`` (an :class:`~sensitivity_lib.results.Estimate`,
        kind ``"lower"``: a Lanczos Rayleigh quotient, converged to ``tol`` when ``converged``).
    h_max
        ``(n,)`` float64 unit vector, the direction of ``C_max`` (sign fixed so that its largest
        entry in absolute value is positive).
    layer
        The name of the linear layer whose weights and bias were perturbed.
    lam
        The absolute damping ``lam`` added to ``-L''``.
    n_params
        ``P``, the number of parameters of that layer.
    extra
        ``"solves"`` (MINRES solves run), ``"trace"`` (``tr(-L'')`` without damping).
    """

    c_max: Estimate
    h_max: torch.Tensor
    layer: str
    lam: float
    n_params: int
    extra: dict[str, Any] = field(default_factory=dict)

    def top_cases(self, k: int) -> torch.Tensor:
        """Indices of the ``k`` cases with the largest ``|h_max,i|`` (largest first)."""
        return self.h_max.abs().argsort(descending=True, stable=True)[:k]


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last :class:`torch.nn.Linear` of ``model`` in registration order (its classifier, for
    the book's networks), as ``(name, module)``."""
    found = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    if not found:
        raise ValueError("the model has no nn.Linear layer; pass layer=<name of its classifier>")
    return found[-1]


def _features(model: nn.Module, layer: nn.Linear, x: torch.Tensor, batch_size: int):
    """Inputs of ``layer`` and the model's logits, for the whole batch (no gradients)."""
    feats, logits = [], []

    def hook(mod, inp, out):
        feats.append(inp[0].detach())

    h = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for s in range(0, x.shape[0], batch_size):
                before = len(feats)
                logits.append(model(x[s : s + batch_size]).detach())
                if len(feats) != before + 1:
                    raise ValueError("the chosen layer must run exactly once per forward pass")
    finally:
        h.remove()
    return torch.cat(feats), torch.cat(logits)


def local_influence(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    layer: str | None = None,
    damping: float = 1e-3,
    relative_damping: bool = True,
    tol: float = 1e-6,
    solve_tol: float = 1e-10,
    max_iter: int = 100,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> LocalInfluence:
    """Cook's maximal normal curvature ``C_max`` and direction ``h_max`` for case weights.

    Parameters
    ----------
    model
        A classifier in eval mode returning logits ``(n, C)``; ``layer`` must produce them.
    x, y
        The ``n`` cases (training images and their labels).
    layer
        Name (as in ``model.named_modules()``) of the ``nn.Linear`` whose weight and bias are
        perturbed; default the last one (:func:`last_linear`).
    damping, relative_damping
        ``lam = damping * tr(-L'') / P`` (default), or ``lam = damping`` when ``relative_damping``
        is false.
    tol
        Lanczos tolerance on ``C_max`` (:func:`sensitivity_lib.krylov.top_eig`).
    solve_tol
        MINRES tolerance of each solve with ``-L'' + lam I``.
    max_iter
        Lanczos steps (each one solve).
    batch_size
        Images per forward pass when collecting the features.
    generator
        For the Lanczos start (default: a fixed seed).

    Returns
    -------
    LocalInfluence
    """
    check_eval(model)
    check_batch(x, "x")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"local influence needs at least 2 cases, got {n}")
    if not (damping > 0):
        raise ValueError(f"damping must be > 0 (-L'' is singular without it), got {damping}")
    if layer is None:
        name, lin = last_linear(model)
    else:
        mods = dict(model.named_modules())
        if layer not in mods or type(mods[layer]) is not nn.Linear:
            raise ValueError(f"layer={layer!r} is not an nn.Linear of the model")
        name, lin = layer, mods[layer]
    phi, z = _features(model, lin, x, batch_size)
    yl = check_labels(y, n, z.shape[-1]).to(z.device)
    phi = phi.to(torch.float64).reshape(n, -1)
    params = {k: v.detach().to(torch.float64) for k, v in lin.named_parameters()}
    head = lin if lin.weight.dtype == torch.float64 else _double(lin)
    z64 = functional_call(head, params, (phi,))
    if z64.shape != z.shape or not torch.allclose(
        z64, z.to(torch.float64), rtol=1e-4, atol=1e-4 * z.abs().max().item()
    ):
        raise ValueError(f"layer {name!r} does not produce the model's logits: pass the classifier")
    keys = list(params)
    shapes = [params[k].shape for k in keys]
    sizes = [params[k].numel() for k in keys]
    P = sum(sizes)

    def unflat(v: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: t.reshape(s) for k, t, s in zip(keys, v.split(sizes), shapes, strict=True)}

    def logits(v: torch.Tensor) -> torch.Tensor:
        return functional_call(head, unflat(v), (phi,))

    theta = torch.cat([params[k].reshape(-1) for k in keys])
    p = torch.softmax(z64.detach(), -1)

    def loglik(v: torch.Tensor) -> torch.Tensor:  # (n,) per-case log-likelihood
        return torch.log_softmax(logits(v), -1).gather(1, yl[:, None])[:, 0]

    _, pull_ll = vjp(loglik, theta)
    _, pull_z = vjp(logits, theta)

    def hess(w: torch.Tensor) -> torch.Tensor:  # (-L'') w, without damping
        _, dz = jvp(logits, (theta,), (w,))
        hz = p * dz - p * (p * dz).sum(-1, keepdim=True)
        return pull_z(hz)[0]

    # tr(-L'') = sum_i tr(J_i^T H_i J_i), exactly, from P products would be costly; for a linear
    # layer J_i J_i^T = (||phi_i||^2 + [bias]) I_C, so the trace is sum_i tr(H_i) (||phi_i||^2 + b)
    b = 1.0 if "bias" in params else 0.0
    trace = float(((1 - (p * p).sum(-1)) * ((phi * phi).sum(-1) + b)).sum())
    lam = damping * trace / P if relative_damping else float(damping)
    A = LinearOperator(
        lambda w: hess(w[0])[None] + lam * w, in_shape=(P,), dtype=torch.float64,
        device=theta.device,
    )  # fmt: skip
    solves = [0]

    def F(v: torch.Tensor) -> torch.Tensor:  # (1, n) -> (1, n)
        rhs = pull_ll(v[0])[0]  # Delta v
        sol = solve(A, rhs, method="minres", tol=solve_tol, max_iter=20 * P)
        solves[0] += 1
        _, out = jvp(loglik, (theta,), (sol.x.reshape(-1).to(torch.float64),))
        return 2.0 * out[None]

    op = LinearOperator(F, in_shape=(n,), dtype=torch.float64, device=theta.device)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    res = top_eig(op, tol=tol, max_iter=max_iter, generator=g, noise=10 * solve_tol)
    h = res.vector[0].reshape(-1).to(torch.float64)
    h = h / h.norm()
    if h[h.abs().argmax()] < 0:
        h = -h
    est = Estimate(
        value=float(res.value[0]), kind="lower", method="lanczos", norm="2",
        iterations=int(res.iterations[0]), residual=float(res.residual[0]),
        converged=bool(res.converged[0]),
        extra={"meaning": "Cook's C_max, last-layer case-weight curvature"},
    )  # fmt: skip
    return LocalInfluence(c_max=est, h_max=h.detach(), layer=name, lam=lam, n_params=P,
                          extra={"solves": solves[0], "trace": trace})


def _double(lin: nn.Linear) -> nn.Linear:
    import copy

    return copy.deepcopy(lin).double()

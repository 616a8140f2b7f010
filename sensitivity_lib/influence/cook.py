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

The ``P x P`` Hessian is never formed. With ``J`` the stacked logit Jacobians (``nC x P``),
``H = blockdiag(diag p_i - p_i p_i^T)`` and ``R = blockdiag(r_i)``, ``r_i = e_{y_i} - p_i`` (so
``Delta = J^T R``), the push-through identity gives

    F = 2 R^T J (J^T H J + lam I)^{-1} J^T R = 2 R^T K (lam I + H K)^{-1} R,    K = J J^T,

and for a linear layer ``K = (a_i . a_j) I_C`` with ``a_i = [phi_i; 1]``: one ``nC x nC`` linear
solve (``n`` training images, ``C`` classes; 2,000 unknowns for 200 MNIST images) replaces ``P``-
dimensional iterative solves (10,250 unknowns for the book's narrow ResNet-50, where MINRES with
the damped Hessian needed about 170 iterations per solve and minutes in all). ``F`` (``n x n``)
is then formed and ``C_max`` comes from Lanczos (:func:`sensitivity_lib.krylov.top_eig`). Norm: Euclidean on
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
import torch.nn.functional as F_
from torch import nn
from torch.func import functional_call

from sensitivity_lib.krylov import LinearOperator, top_eig
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
        ``"trace"`` (``tr(-L'')`` without damping) and ``"F"`` (the ``n x n`` matrix
        ``2 Delta^T (-L'' + lam I)^{-1} Delta``; its diagonal holds the curvatures of single cases).
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
    tol: float = 1e-8,
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
    max_iter
        Lanczos steps.
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
    W = params["weight"]
    has_b = "bias" in params
    C = W.shape[0]
    P = W.numel() + (C if has_b else 0)
    p = torch.softmax(z64.detach(), -1)
    r = F_.one_hot(yl, C).to(p) - p  # r_i = d log p_y / d z_i; g_i = J_i^T r_i
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (n, C, C)
    a = torch.cat([phi, torch.ones(n, 1, dtype=phi.dtype)], 1) if has_b else phi
    Kf = a @ a.mT  # J_i J_j^T = (a_i . a_j) I_C
    # tr(-L'') = sum_i tr(H_i) ||a_i||^2
    trace = float((torch.diagonal(H, dim1=-2, dim2=-1).sum(-1) * Kf.diagonal()).sum())
    lam = damping * trace / P if relative_damping else float(damping)
    # F = 2 R^T J (J^T H J + lam I)^{-1} J^T R = 2 R^T K (lam I + H K)^{-1} R  (push-through),
    # K = J J^T = Kf (x) I_C and H = blockdiag(H_i): an nC x nC system instead of P x P
    nC = n * C
    M = torch.einsum("ij,iab->iajb", Kf, H).reshape(nC, nC)
    M = M + lam * torch.eye(nC, dtype=M.dtype)
    R = torch.zeros(n, C, n, dtype=M.dtype)
    R[torch.arange(n), :, torch.arange(n)] = r
    X = torch.linalg.solve(M, R.reshape(nC, n)).reshape(n, C, n)
    Fm = 2.0 * torch.einsum("ib,ij,jbk->ik", r, Kf, X)
    Fm = 0.5 * (Fm + Fm.mT)
    op = LinearOperator.from_matrix(Fm)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    res = top_eig(op, tol=tol, max_iter=max_iter, generator=g)
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
                          extra={"trace": trace, "F": Fm})


def _double(lin: nn.Linear) -> nn.Linear:
    import copy

    return copy.deepcopy(lin).double()

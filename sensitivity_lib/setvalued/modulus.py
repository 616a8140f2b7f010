r"""The Lipschitz modulus of the training solution map, and Theorem 2's closed form for ReLU networks.

Paper: X. Wang, F. Wang and X. Ban, *Set-Valued Sensitivity Analysis of Deep Neural Networks*,
AAAI 2025 (arXiv:2412.11057): the Lipschitz-like (Aubin) property, eq. (4), Theorems 1-3.

The modulus (our derivation from Theorem 1 and the Mordukhovich criterion, book Part IV)
    The stationarity map ``F(x) = {w : R(x, w) = 0}`` has, by Theorem 1, the coderivative
    ``D*F(x | w)(q) = {R_x^T y : H y = -q}`` (``H = grad_w R``, ``R_x = grad_x R``, ``H``
    symmetric). The Mordukhovich criterion (Rockafellar & Wets, *Variational Analysis*, Thm 9.40)
    says ``F`` is Lipschitz-like at ``(x, w)`` iff ``D*F(x | w)(0) = {0}``, that is iff
    ``range R_x`` lies in ``range H``, and then its modulus is the outer norm of the coderivative,

        ``lip F(x | w) = ||H^+ R_x||_2``

    (spectral norm; Euclidean norms on the data and on the parameters). When the criterion fails,
    ``lip F = inf``. :func:`lipschitz_modulus` computes it for a joint perturbation of the samples
    ``rows`` (all of them by default: Theorem 3's setting), and checks the criterion: the relative
    size ``||P_ker R_x||_2 / ||R_x||_2`` of the part of ``R_x`` outside the range of ``H`` (dense),
    or of ``R_x u`` for the top right singular vector ``u`` (matrix-free, a necessary check only).

Methods
    ``"dense"``: eigendecomposition of ``H`` (cut-off ``rtol`` as in
    :func:`~sensitivity_lib.setvalued.derivative.graphical_derivative`) and the dense ``p x m`` ``R_x``
    (``m`` = entries of ``x[rows]``); ``kind="exact"`` (up to rounding and the cut-off).
    ``"minres"`` / ``"lsqr"``: matrix-free. The operator ``u -> H^+ R_x u`` (one pull-back through the
    gradient and one solve of :func:`sensitivity_lib.krylov.solve` at ``solve_tol``) and its adjoint
    go to :func:`sensitivity_lib.krylov.top_singular` (power iteration by default). The inner solves
    are inexact, so the value is an ``"estimate"``; every inner solve is checked and a failure is
    reported (``converged=False`` and a warning).

Theorem 2 (:func:`theorem2_kappa`)
    For a bias-free ReLU network ``f(x) = a^T s(W_H s(... s(W_1 x)))`` and one perturbed sample
    ``x_k``, the paper's modulus of the layer-``h`` map is

        ``kappa_h = ||[prod_{l=1..H} W_l^T D_l] a|| / ||D_h [prod_{l=h+1..H} W_l^T D_l] a x^{(h-1)T}||_F``,

    ``D_l = diag(1[W_l x^{(l-1)} > 0])``: the norm of the input gradient of ``f`` over the
    Frobenius norm of its gradient in ``W_h``. At a zero-residual point it equals ``||H_h^+ R_x||``
    for the one-sample, one-layer problem (checked in the tests and in the book).

Example
-------
The paper's toy (see :mod:`~sensitivity_lib.setvalued.derivative`): the modulus is 0.4 (the paper
prints 0.2; its own radius 0.178 = 0.4 * ||dx|| fits 0.4, book Part IV).

>>> import torch
>>> y = torch.tensor([2.0, 4.0], dtype=torch.float64)
>>> def loss(w, x):
...     return 0.5 * ((y - w[0] * w[1] * x) ** 2).sum()
>>> w = torch.tensor([1.0, 2.0], dtype=torch.float64)
>>> x = torch.tensor([1.0, 2.0], dtype=torch.float64)
>>> kappa = lipschitz_modulus(loss, w, x)
>>> round(float(kappa), 12), kappa.kind, kappa.extra["aubin"]
(0.4, 'exact', True)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import nn

from sensitivity_lib import krylov
from sensitivity_lib.results import Estimate
from sensitivity_lib.setvalued import _common
from sensitivity_lib.setvalued.derivative import METHODS
from sensitivity_lib.setvalued.problem import Spectrum, hessian_spectrum
from sensitivity_lib.validation import check_batch

__all__ = ["lipschitz_modulus", "theorem2_kappa", "relu_layers", "CriterionWarning"]

Tensor = torch.Tensor


class CriterionWarning(RuntimeWarning):
    """The Mordukhovich criterion fails: ``R_x`` has a part outside the range of the Hessian, so the
    stationarity map is not Lipschitz-like at this point (its modulus is infinite)."""


def lipschitz_modulus(
    loss: Callable[[Tensor, Tensor], Tensor],
    w: Tensor,
    x: Tensor,
    *,
    rows=None,
    method: str = "dense",
    rtol: float = 1e-8,
    criterion_tol: float = 1e-6,
    weighting: str = "exact",
    spectrum: Spectrum | None = None,
    solve_tol: float = 1e-10,
    solve_max_iter: int | None = None,
    eig_method: str = "power",
    tol: float = 1e-4,
    max_iter: int = 200,
    generator: torch.Generator | None = None,
) -> Estimate:
    """``lip F(x | w) = ||H^+ R_x||_2``: the modulus of the Aubin property of the stationarity map.

    Parameters
    ----------
    loss, w, x
        The training problem (see :func:`~sensitivity_lib.setvalued.derivative.graphical_derivative`).
    rows
        Indices of the samples whose perturbation is considered (the paper's ``K``); all by default.
    method
        ``"dense"`` (default), ``"minres"`` or ``"lsqr"`` (matrix-free; see the module docstring).
    rtol
        Dense: the eigenvalue cut-off of ``H``.
    criterion_tol
        The Mordukhovich criterion counts as failed when the relative part of ``R_x`` outside the
        range of ``H`` exceeds this; the value is then ``inf`` and :class:`CriterionWarning` is
        raised as a warning (the finite ``||H^+ R_x||`` stays in ``extra["pinv_norm"]``).
    weighting
        ``"exact"`` or ``"paper"`` (``R_x`` multiplied by ``n / |K|``, as eq. 14 weights the cross term).
    spectrum
        Dense: a precomputed :class:`~sensitivity_lib.setvalued.problem.Spectrum` of ``H``.
    solve_tol, solve_max_iter
        Matrix-free: tolerance and iteration limit of every inner solve with ``H``.
    eig_method, tol, max_iter, generator
        Matrix-free: passed to :func:`sensitivity_lib.krylov.top_singular` (``"power"`` by default),
        with ``noise=100 * solve_tol`` (the products are inexact by the inner solves' tolerance).

    Returns
    -------
    Estimate
        ``value`` the modulus (``inf`` when the criterion fails); ``residual`` the criterion's
        measure; ``extra``: ``pinv_norm``, ``criterion``, ``aubin``, ``m`` and ``p`` (and ``rank``,
        ``kernel_dim`` for the dense method; ``solves``, ``worst_solve_residual`` for matrix-free).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not (criterion_tol > 0):
        raise ValueError(f"criterion_tol must be positive, got {criterion_tol}")
    w, x, _, _ = _common.check_problem(loss, w, x)
    idx = _common.sample_rows(x, rows)
    n_k = x.shape[0] if idx is None else len(idx)
    if weighting not in _common.WEIGHTINGS:
        raise ValueError(f"weighting must be one of {_common.WEIGHTINGS}, got {weighting!r}")
    factor = x.shape[0] / n_k if weighting == "paper" else 1.0
    if method == "dense":
        return _dense(loss, w, x, idx, factor, rtol, criterion_tol, spectrum)
    return _matrix_free(loss, w, x, idx, factor, method, criterion_tol, solve_tol, solve_max_iter,
                        eig_method, tol, max_iter, generator)  # fmt: skip


def _verdict(pinv_norm: float, criterion: float, criterion_tol: float) -> tuple[float, bool]:
    aubin = criterion <= criterion_tol
    if not aubin:
        warnings.warn(
            f"the Mordukhovich criterion fails: the part of R_x outside the range of the Hessian has "
            f"relative size {criterion:.3g} > criterion_tol={criterion_tol:g}, so the stationarity map "
            "is not Lipschitz-like here and its modulus is infinite. If this point is only nearly "
            "stationary, train further or raise criterion_tol.",
            CriterionWarning,
            stacklevel=3,
        )
    return (pinv_norm if aubin else math.inf), aubin


def _dense(loss, w, x, idx, factor, rtol, criterion_tol, spectrum) -> Estimate:
    if spectrum is None:
        spectrum = hessian_spectrum(loss, w, x)
    spectrum.check(w.numel())
    keep, kern = spectrum.split(rtol)
    R = factor * _common.dense_mixed(loss, w, x, idx)
    V, lam = spectrum.eigenvectors.to(R.device), spectrum.eigenvalues.to(R.device)
    VtR = V.T @ R
    A = VtR[keep] / lam[keep, None]
    pinv_norm = float(torch.linalg.matrix_norm(A, 2)) if A.numel() else 0.0
    r_norm = float(torch.linalg.matrix_norm(R, 2))
    out = VtR[kern]
    crit = float(torch.linalg.matrix_norm(out, 2)) / r_norm if out.numel() and r_norm > 0 else 0.0
    value, aubin = _verdict(pinv_norm, crit, criterion_tol)
    return Estimate(
        value=value, kind="exact", method="dense", norm="2", residual=crit,
        extra={"pinv_norm": pinv_norm, "criterion": crit, "aubin": aubin, "rank": int(keep.sum()),
               "kernel_dim": int(kern.sum()), "rtol": rtol, "m": R.shape[1], "p": R.shape[0]},
    )  # fmt: skip


def _matrix_free(loss, w, x, idx, factor, method, criterion_tol, solve_tol, solve_max_iter, eig_method,
                 tol, max_iter, generator) -> Estimate:  # fmt: skip
    H = _common.hessian_operator(loss, w, x)
    R = _common.mixed_operator(loss, w, x, idx)
    stats = {"solves": 0, "failed": 0, "worst": 0.0, "products": 0}

    def pinv(z: Tensor) -> Tensor:
        s = krylov.solve(H, z, method=method, tol=solve_tol, max_iter=solve_max_iter, hermitian=True,
                         warn=False)  # fmt: skip
        stats["solves"] += 1
        stats["products"] += s.products
        stats["failed"] += not s.converged
        stats["worst"] = max(stats["worst"], min(s.residual, s.normal_residual))
        return s.x

    def matvec(u: Tensor) -> Tensor:
        return pinv(factor * R.apply(u)[0])[None]

    def rmatvec(z: Tensor) -> Tensor:
        return factor * R.apply_adjoint(pinv(z[0])[None])

    op = krylov.LinearOperator(matvec, rmatvec, in_shape=R.in_shape, out_shape=(w.numel(),),
                               dtype=torch.float64, device=w.device)  # fmt: skip
    # the products carry the inner solves' error: increments below ~100 solve_tol are noise
    res = krylov.top_singular(op, method=eig_method, tol=tol, max_iter=max_iter, generator=generator,
                              noise=100 * solve_tol)  # fmt: skip
    # the criterion along the top right singular vector: is R_x u in the range of H?
    c = factor * R.apply(res.right)[0]
    s = krylov.solve(H, c, method=method, tol=solve_tol, max_iter=solve_max_iter, hermitian=True, warn=False)
    crit = s.residual
    converged = bool(res.converged.all()) and stats["failed"] == 0 and s.converged
    if stats["failed"]:
        warnings.warn(
            f"{stats['failed']} of {stats['solves']} inner solves with the Hessian did not converge to "
            f"solve_tol={solve_tol:g} (worst residual {stats['worst']:.2g}); the modulus is not "
            "accurate. Raise solve_max_iter or loosen solve_tol.",
            krylov.NotConvergedWarning,
            stacklevel=2,
        )
    pinv_norm = float(res.value[0])
    if s.converged:
        value, aubin = _verdict(pinv_norm, crit, criterion_tol)
    else:
        value, aubin = pinv_norm, None
    return Estimate(
        value=value, kind="estimate", method=f"{eig_method}+{method}", norm="2",
        iterations=int(res.iterations[0]), residual=crit, converged=converged,
        extra={"pinv_norm": pinv_norm, "criterion": crit, "aubin": aubin, "solves": stats["solves"] + 1,
               "products": stats["products"] + s.products, "worst_solve_residual": stats["worst"],
               "solve_tol": solve_tol, "m": op.n_in, "p": op.n_out, "singular": res},
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Theorem 2


def relu_layers(model: nn.Module) -> list[Tensor]:
    """The weights ``[W_1, ..., W_H, a]`` (float64) of a bias-free ReLU network.

    Accepted: an ``nn.Sequential`` of an optional leading ``nn.Flatten``, then ``nn.Linear``
    (``bias=False``) and ``nn.ReLU`` alternating, ending with ``nn.Linear(m, 1, bias=False)`` (the
    paper's DFCNN, Sec. "Settings"). Anything else raises ``ValueError``.
    """
    if not isinstance(model, nn.Sequential):
        raise ValueError("Theorem 2 needs an nn.Sequential of bias-free Linear and ReLU layers")
    mods = list(model)
    if mods and isinstance(mods[0], nn.Flatten):
        mods = mods[1:]
    if len(mods) < 3 or len(mods) % 2 == 0:
        raise ValueError("expected Linear, ReLU, Linear, ..., ReLU, Linear (at least one hidden layer)")
    weights = []
    for i, m in enumerate(mods):
        want = nn.Linear if i % 2 == 0 else nn.ReLU
        if not isinstance(m, want):
            raise ValueError(f"layer {i} is {type(m).__name__}, expected {want.__name__}: Theorem 2 is "
                             "stated for bias-free ReLU networks (DFCNN)")  # fmt: skip
        if isinstance(m, nn.Linear):
            if m.bias is not None:
                raise ValueError(f"layer {i} has a bias; Theorem 2 is stated for bias-free networks")
            weights.append(m.weight.detach().to(torch.float64))
    if weights[-1].shape[0] != 1:
        raise ValueError(f"the last layer must have one output (f = a^T x^(H)), got {weights[-1].shape[0]}")
    return weights


def theorem2_kappa(model: nn.Module, x: Tensor, layer: int) -> Estimate:
    """Theorem 2's modulus ``kappa_h`` of layer ``h = layer`` for each sample of ``x``.

    Parameters
    ----------
    model
        A bias-free ReLU network (:func:`relu_layers`).
    x
        Samples ``(N, d)`` (or ``(N, ...)`` when the model starts with ``nn.Flatten``), float.
    layer
        ``h`` in ``1..H``, the hidden layer whose weights ``W_h`` form the map ``F_h``.

    Returns
    -------
    Estimate
        ``value`` float64 ``(N,)``, ``kind="exact"``, ``method="theorem2"``; ``extra`` holds the
        numerator ``||grad_x f||`` and the denominator ``||grad_{W_h} f||_F``.
    """
    Ws = relu_layers(model)
    H = len(Ws) - 1
    if not (1 <= int(layer) <= H):
        raise ValueError(f"layer must be in 1..{H} (the hidden layers), got {layer}")
    check_batch(x, "x")
    h = int(layer)
    z = x.detach().to(torch.float64).reshape(x.shape[0], -1)
    if z.shape[1] != Ws[0].shape[1]:
        raise ValueError(f"x has {z.shape[1]} features per sample, the first layer takes {Ws[0].shape[1]}")
    acts, masks = [z], []
    for W in Ws[:-1]:
        pre = acts[-1] @ W.T
        masks.append((pre > 0).to(torch.float64))  # D_l = diag(1[W_l x^(l-1) > 0])
        acts.append(pre.clamp_min(0))
    # delta_l = D_l W_{l+1}^T ... W_H^T D_H a, from the top down; grad_x f = W_1^T delta_1
    delta = masks[-1] * Ws[-1][0]
    deltas = {H: delta}
    for lyr in range(H - 1, 0, -1):
        delta = masks[lyr - 1] * (delta @ Ws[lyr])
        deltas[lyr] = delta
    num = torch.linalg.vector_norm(deltas[1] @ Ws[0], dim=1)
    den = torch.linalg.vector_norm(deltas[h], dim=1) * torch.linalg.vector_norm(acts[h - 1], dim=1)
    value = torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, math.inf))
    return Estimate(value=value, kind="exact", method="theorem2", norm="2",
                    extra={"numerator": num, "denominator": den, "layer": h})  # fmt: skip

r"""The graphical derivative of the training solution map: where the minimisers move when the data move.

Paper: X. Wang, F. Wang and X. Ban, *Set-Valued Sensitivity Analysis of Deep Neural Networks*,
AAAI 2025 (arXiv:2412.11057), Theorem 1 and eqs. (14), (18), (19).

For the stationarity map ``F(x) = {w : R(x, w) = 0}``, ``R = grad_w loss``, at a point ``w`` of
``F(x)`` and a data perturbation ``dx`` (same shape as ``x``; zero rows for unperturbed samples),

    ``DF(x | w)(dx) = {v in R^p : H v + b = 0}``,  ``H = grad_w R(x, w)``,  ``b = grad_x R(x, w) dx``

(Theorem 1). It is an affine set: empty when ``b`` is not in the range of ``H``, one point
``-H^{-1} b`` when ``H`` is invertible (the influence function of Koh & Liang, 2017), and the
translate of ``ker H`` through the minimum-norm member ``v* = -H^+ b`` otherwise. The perturbed
solutions are estimated by ``w + DF(x | w)(dx)`` (eq. 15, Algorithm 1). :func:`graphical_derivative`
returns it as an :class:`AffineSet`.

Methods
    ``"dense"``: eigendecomposition ``H = V diag(lambda) V^T`` (float64, small models);
    eigenvalues with ``|lambda| <= rtol max |lambda|`` count as zero: their eigenvectors are the
    set's ``basis`` and ``v* = -sum_{kept} (v_i^T b / lambda_i) v_i``.
    ``"minres"`` / ``"lsqr"``: matrix-free, scipy's solvers on Hessian-vector products from
    ``x0 = 0`` (:func:`sensitivity_lib.krylov.solve`, eq. 19 of the paper), to the explicit
    tolerance ``tol``; a solve that does not converge is marked (``converged=False``) and warns.
    LSQR gives the minimum-norm least-squares point for any ``b``; MINRES gives the minimum-norm
    point when ``b`` is in the range of ``H`` (otherwise a least-squares point that can carry a
    component along ``ker H``). No kernel basis is computed; :meth:`AffineSet.sample` draws members
    by projecting random vectors onto ``ker H`` with one more solve each.

Weighting
    ``"exact"`` (default): the derivative of the loss as given (``1/n`` on every term when the loss
    is the mean over samples, as :func:`~sensitivity_lib.setvalued.problem.module_loss` builds it).
    ``"paper"``: eq. (14) as printed, ``1/|I|`` on the Hessian but ``1/|K|`` on the cross term
    (``K`` = the perturbed samples, the non-zero rows of ``dx``): ``b`` is multiplied by ``n/|K|``,
    which scales every member of the set by ``n/|K|``. It matches the exact derivative only after
    re-reading the size of the perturbation; we keep it for comparison with the paper.

The residual ``||H v* + b|| / ||b||`` is recomputed with one Hessian-vector product: it is zero
(to rounding or ``tol``) when ``b`` is in the range of ``H``, and is the relative size of the part of
``b`` outside the range otherwise (the set is then empty and ``v*`` is a least-squares surrogate).

Example
-------
The toy of the paper (a two-layer linear network ``f = w1 w2 x``, data ``(1, 2), (2, 4)``, loss the
sum of squared errors over 2, ``w = (1, 2)``, ``dx = 0.2 (-1, -2)``): the set is the line
``2 v1 + v2 = 0.4``, with minimum-norm member ``(0.16, 0.08)``.

>>> import torch
>>> y = torch.tensor([2.0, 4.0], dtype=torch.float64)
>>> def loss(w, x):
...     return 0.5 * ((y - w[0] * w[1] * x) ** 2).sum()
>>> w = torch.tensor([1.0, 2.0], dtype=torch.float64)
>>> x = torch.tensor([1.0, 2.0], dtype=torch.float64)
>>> ds = graphical_derivative(loss, w, x, 0.2 * torch.tensor([-1.0, -2.0], dtype=torch.float64))
>>> [round(v, 10) for v in ds.point.tolist()], ds.kernel_dim, ds.residual < 1e-12
([0.16, 0.08], 1, True)
>>> v = ds.sample(3, radius=0.05, generator=torch.Generator().manual_seed(0))
>>> bool(((2 * v[:, 0] + v[:, 1] - 0.4).abs() < 1e-12).all())
True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sensitivity_lib import krylov
from sensitivity_lib.setvalued import _common
from sensitivity_lib.setvalued.problem import Spectrum, hessian_spectrum
from sensitivity_lib.validation import check_finite_tensor

__all__ = ["AffineSet", "graphical_derivative", "METHODS"]

Tensor = torch.Tensor
METHODS: tuple[str, ...] = ("dense", "minres", "lsqr")


@dataclass(frozen=True, eq=False)
class AffineSet:
    """The affine set ``{v : H v + b = 0}`` (a graphical derivative), as found by one method.

    Attributes
    ----------
    point
        The minimum-norm member ``-H^+ b`` (float64 ``(p,)``; a least-squares surrogate when the set
        is empty, see ``residual``).
    basis
        ``(p, k)`` orthonormal basis of ``ker H`` (the eigenvectors counted as zero), for the dense
        method; ``None`` for the matrix-free ones.
    residual
        ``||H point + b|| / ||b||`` (0 when ``b = 0``): zero up to the method's accuracy when ``b``
        lies in the range of ``H``.
    b
        The right-hand side ``b = R_x dx`` (with the weighting applied), float64 ``(p,)``.
    method, weighting
        As given to :func:`graphical_derivative`.
    rtol
        The dense method's relative eigenvalue cut-off (``None`` for matrix-free methods).
    tol, iterations, products
        The matrix-free solve's tolerance, iterations and Hessian-vector products (``None`` for the
        dense method).
    converged
        Whether the solve met ``tol`` (always true for the dense method).
    extra
        ``eigenvalues`` and ``rank`` (dense); the solver ``status`` and ``normal_residual``
        (matrix-free).
    """

    point: Tensor
    basis: Tensor | None
    residual: float
    b: Tensor
    method: str
    weighting: str
    rtol: float | None
    tol: float | None
    iterations: int | None
    products: int | None
    converged: bool
    extra: dict[str, Any] = field(default_factory=dict)
    hvp: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)
    project_kernel: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)

    @property
    def kernel_dim(self) -> int | None:
        """The dimension of the set (of ``ker H``) for the dense method; ``None`` otherwise."""
        return None if self.basis is None else int(self.basis.shape[1])

    def residual_of(self, v: Tensor) -> float:
        """``||H v + b|| / ||b||`` for any ``v`` (shape ``(p,)``): how far ``v`` is from the set's
        defining equation (one Hessian-vector product)."""
        check_finite_tensor(v, "v")
        v = v.detach().to(device=self.point.device, dtype=torch.float64)
        if v.shape != self.point.shape:
            raise ValueError(f"v must have shape {tuple(self.point.shape)}, got {tuple(v.shape)}")
        bn = float(torch.linalg.vector_norm(self.b))
        r = float(torch.linalg.vector_norm(self.hvp(v) + self.b))
        return r / bn if bn > 0 else r

    def sample(self, k: int, radius: float, generator: torch.Generator | None = None) -> Tensor:
        """``k`` members ``point + u``, ``u`` in ``ker H`` with ``||u|| <= radius``; shape ``(k, p)``.

        Dense method: ``u`` uniform in the ball of radius ``radius`` of ``ker H`` (the point itself
        when the kernel is ``{0}``). Matrix-free methods: ``u = P z`` for ``z`` uniform in the ball of
        radius ``radius`` of ``R^p`` and ``P`` the projector on ``ker H``, applied as
        ``z - H^+ H z`` by one solve to the set's ``tol`` (so ``||u|| <= radius``, not uniform). These
        are the paper's "different random seeds" of eq. (19) made explicit.
        """
        if int(k) < 1 or not (radius >= 0) or not math.isfinite(radius):
            raise ValueError(f"need k >= 1 and a finite radius >= 0, got k={k}, radius={radius}")
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        p = self.point.numel()
        if self.basis is not None:
            d = self.basis.shape[1]
            if d == 0:
                return self.point.expand(int(k), p).clone()
            t = _ball(int(k), d, radius, g)
            return self.point + t @ self.basis.T
        z = _ball(int(k), p, radius, g)
        return self.point + torch.stack([self.project_kernel(zi) for zi in z])


def _ball(k: int, d: int, radius: float, g: torch.Generator) -> Tensor:
    """``k`` points uniform in the ``d``-dimensional ball of radius ``radius`` (float64)."""
    z = torch.randn(k, d, generator=g, dtype=torch.float64)
    z = z / torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp_min(1e-300)
    r = radius * torch.rand(k, 1, generator=g, dtype=torch.float64) ** (1.0 / d)
    return z * r


def graphical_derivative(
    loss: Callable[[Tensor, Tensor], Tensor],
    w: Tensor,
    x: Tensor,
    dx: Tensor,
    *,
    method: str = "dense",
    rtol: float = 1e-8,
    tol: float = 1e-8,
    max_iter: int | None = None,
    weighting: str = "exact",
    spectrum: Spectrum | None = None,
) -> AffineSet:
    """The graphical derivative ``DF(x | w)(dx) = {v : H v + b = 0}`` of the training problem.

    Parameters
    ----------
    loss
        ``loss(w, x)``: a scalar function of the flat parameters ``w`` (``(p,)``) and the data ``x``
        (samples along axis 0), e.g. built by :func:`~sensitivity_lib.setvalued.problem.module_loss`.
        Evaluated in float64.
    w
        The (near-)stationary point ``(p,)`` at which to differentiate, e.g. trained weights.
    x, dx
        The data and the direction of its perturbation (same shape). The paper's perturbation of
        the samples ``K`` by ``delta`` along unit directions is ``dx = delta * Delta x`` with zero
        rows outside ``K``.
    method
        ``"dense"`` (default; eigendecomposition, small models), ``"minres"`` or ``"lsqr"``
        (matrix-free). See the module docstring.
    rtol
        Dense method: eigenvalues with ``|lambda| <= rtol * max |lambda|`` count as zero.
    tol, max_iter
        Matrix-free methods: the solver tolerance and iteration limit
        (:func:`sensitivity_lib.krylov.solve`).
    weighting
        ``"exact"`` (default) or ``"paper"`` (eq. 14's ``1/|K|`` on the cross term).
    spectrum
        Dense method: a :class:`~sensitivity_lib.setvalued.problem.Spectrum` of this problem's Hessian from
        :func:`~sensitivity_lib.setvalued.problem.hessian_spectrum`, to decompose once for many ``dx``.

    Returns
    -------
    AffineSet
        Its ``point`` is the minimum-norm member (``-H^+ b``); the estimated perturbed solutions
        are ``w + members``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    w, x, dx, _ = _common.check_problem(loss, w, x, dx)
    factor = _common.weight_factor(weighting, dx)
    b = factor * _common.mixed_term(loss, w, x, dx)
    hvp = _common.hvp_fn(loss, w, x)
    bn = float(torch.linalg.vector_norm(b))
    if method == "dense":
        if spectrum is None:
            spectrum = hessian_spectrum(loss, w, x)
        spectrum.check(w.numel())
        keep, kern = spectrum.split(rtol)
        V, lam = spectrum.eigenvectors.to(w.device), spectrum.eigenvalues.to(w.device)
        coef = V[:, keep].T @ b
        point = -(V[:, keep] @ (coef / lam[keep]))
        basis = V[:, kern].clone()
        r = float(torch.linalg.vector_norm(hvp(point) + b))
        return AffineSet(
            point=point, basis=basis, residual=r / bn if bn > 0 else r, b=b, method=method,
            weighting=weighting, rtol=rtol, tol=None, iterations=None, products=None, converged=True,
            extra={"eigenvalues": spectrum.eigenvalues, "rank": int(keep.sum())}, hvp=hvp,
        )  # fmt: skip
    op = _common.hessian_operator(loss, w, x)
    res = krylov.solve(op, -b, method=method, tol=tol, max_iter=max_iter, hermitian=True)
    point = res.x
    r = float(torch.linalg.vector_norm(hvp(point) + b))

    def project_kernel(z: Tensor) -> Tensor:
        s = krylov.solve(op, hvp(z), method=method, tol=tol, max_iter=max_iter, hermitian=True)
        return z - s.x

    return AffineSet(
        point=point, basis=None, residual=r / bn if bn > 0 else r, b=b, method=method,
        weighting=weighting, rtol=None, tol=tol, iterations=res.iterations, products=res.products + 1,
        converged=res.converged, extra={"status": res.status, "normal_residual": res.normal_residual},
        hvp=hvp, project_kernel=project_kernel,
    )  # fmt: skip


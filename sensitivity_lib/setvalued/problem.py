"""A training problem as a function ``loss(w, x)`` of a flat parameter vector and the data.

Paper: X. Wang, F. Wang and X. Ban, *Set-Valued Sensitivity Analysis of Deep Neural Networks*,
AAAI 2025 (arXiv:2412.11057). Their learning map sends the data ``x`` (labels fixed) to the set of
minimisers ``S(x)`` of the empirical risk ``(1/n) sum_i L(x_i, y_i, w)`` (their eq. 1); everything
in :mod:`sensitivity_lib.setvalued` differentiates that risk, as a scalar function of a flat
``w`` (shape ``(p,)``) and the data ``x`` (shape ``(n, ...)``, samples along the first axis), so
that ``torch.func`` gives its gradient, Hessian-vector products and mixed derivatives.

* :func:`module_loss` builds it from an ``nn.Module``, a data set and a per-sample loss
  (``torch.func.functional_call``; parameters, buffers and data in float64; labels captured);
* :func:`squared_error` is the paper's per-sample loss ``(f(x_i, w) - y_i)^2 / 2``;
* :func:`fit` minimises it by full-batch L-BFGS (float64, strong-Wolfe line search), to reach
  the near-stationary points that the theory is about;
* :func:`hessian_operator` and :func:`mixed_operator` are the Hessian ``H`` and the mixed
  derivative ``R_x`` as matrix-free :class:`~sensitivity_lib.krylov.LinearOperator` objects, and
  :func:`hessian_spectrum` the dense eigendecomposition of ``H`` for small models.

Example
-------
>>> import torch
>>> from torch import nn
>>> _ = torch.manual_seed(0)
>>> net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 1, bias=False))
>>> x, y = torch.randn(5, 3), torch.randn(5)
>>> loss = module_loss(net, (x, y), squared_error)
>>> loss.w.shape, loss.w.dtype, loss.x.dtype
(torch.Size([16]), torch.float64, torch.float64)
>>> out = net(x).squeeze(-1).double()
>>> bool(torch.isclose(loss(loss.w, loss.x), (0.5 * (out - y.double()) ** 2).mean()))
True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from sensitivity_lib.krylov import LinearOperator
from sensitivity_lib.setvalued import _common
from sensitivity_lib.validation import check_eval

__all__ = [
    "TrainingLoss",
    "module_loss",
    "squared_error",
    "fit",
    "FitResult",
    "Spectrum",
    "hessian_spectrum",
    "hessian_operator",
    "mixed_operator",
    "mixed_term",
    "REDUCTIONS",
]

Tensor = torch.Tensor
REDUCTIONS: tuple[str, ...] = ("mean", "sum")


def squared_error(output: Tensor, y: Tensor) -> Tensor:
    """``(f - y)^2 / 2`` per sample, summed over outputs: ``output (n,)`` or ``(n, k)``, ``y`` alike."""
    out = output.reshape(output.shape[0], -1)
    return 0.5 * ((out - y.reshape(out.shape).to(out.dtype)) ** 2).sum(1)


@dataclass(frozen=True, eq=False)
class TrainingLoss:
    """``loss(w, x)``: the training loss of a model as a function of its flat parameters and the data.

    Built by :func:`module_loss`. Calling it evaluates ``reduce_i per_sample(model(x; w)_i, y_i)``
    with the model's trainable parameters replaced by the pieces of ``w`` (float64), its other
    parameters and buffers fixed (float64 copies), and the labels ``y`` captured.

    Attributes
    ----------
    w
        The model's trainable parameters when the loss was built, flat float64 ``(p,)``.
    x, y
        The data (float64, samples along axis 0) and the labels.
    names, shapes
        The trainable parameters' names and shapes, in the order of ``w``.
    reduction
        ``"mean"`` (the paper's ``1/n`` empirical risk, eq. 1) or ``"sum"``.
    """

    model: nn.Module
    per_sample: Callable[[Tensor, Tensor], Tensor]
    w: Tensor
    x: Tensor
    y: Tensor
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    reduction: str = "mean"
    fixed: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def p(self) -> int:
        """The number of parameters."""
        return self.w.numel()

    def unflatten(self, w: Tensor) -> dict[str, Tensor]:
        """``{name: tensor}`` views of the flat ``w`` (shape ``(p,)``)."""
        if w.shape != (self.p,):
            raise ValueError(f"w must have shape ({self.p},), got {tuple(w.shape)}")
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            n = int(np.prod(shape)) if shape else 1
            out[name] = w[start : start + n].reshape(shape)
            start += n
        return out

    def outputs(self, w: Tensor, x: Tensor) -> Tensor:
        """The model's outputs on ``x`` with parameters ``w``."""
        return functional_call(self.model, {**self.fixed, **self.unflatten(w)}, (x,))

    def per_sample_losses(self, w: Tensor, x: Tensor) -> Tensor:
        """The ``(n,)`` per-sample losses."""
        ell = self.per_sample(self.outputs(w, x), self.y)
        if ell.shape != (x.shape[0],):
            raise ValueError(
                f"the per-sample loss must return one value per sample, shape ({x.shape[0]},), got "
                f"{tuple(ell.shape)}; pass reduction='none' to torch's losses"
            )
        return ell

    def __repr__(self) -> str:
        return (f"TrainingLoss(model={type(self.model).__name__}, p={self.p}, n={self.x.shape[0]}, "
                f"reduction={self.reduction!r})")  # fmt: skip

    def __call__(self, w: Tensor, x: Tensor) -> Tensor:
        ell = self.per_sample_losses(w, x)
        return ell.mean() if self.reduction == "mean" else ell.sum()

    def load(self, w: Tensor) -> nn.Module:
        """Copy ``w`` into the model's parameters (in place, in their dtype); returns the model."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, t in self.unflatten(w.detach()).items():
                params[name].copy_(t.to(params[name].dtype))
        return self.model


def module_loss(
    model: nn.Module,
    data,
    per_sample: Callable[[Tensor, Tensor], Tensor] = squared_error,
    *,
    reduction: str = "mean",
) -> TrainingLoss:
    """Build ``loss(w, x)`` from a model, a data set and a per-sample loss.

    Parameters
    ----------
    model
        An ``nn.Module`` in eval mode (the library's policy: batch norm and dropout must be fixed
        functions; :func:`sensitivity_lib.validation.check_eval`). Its trainable parameters
        (``requires_grad``) make up ``w``; it is not modified (``TrainingLoss.load`` writes into it).
    data
        ``(x, y)``, an object with ``.images`` and ``.labels`` (:class:`~sensitivity_lib.data.ImageSet`)
        or a ``torch.utils.data.TensorDataset`` of ``(x, y)``.
    per_sample
        ``(outputs, y) -> (n,)`` losses, e.g. :func:`squared_error` (default) or
        ``functools.partial(torch.nn.functional.cross_entropy, reduction="none")``.
    reduction
        ``"mean"`` (default: the ``1/n`` risk of the paper's eq. 1) or ``"sum"``.

    Returns
    -------
    TrainingLoss
        Callable as ``loss(w, x)``; ``loss.w`` and ``loss.x`` are the current parameters and data.
    """
    check_eval(model)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not callable(per_sample):
        raise TypeError("per_sample must be a callable (outputs, y) -> (n,) losses")
    x, y = _unpack(data)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (requires_grad=True)")
    fixed = {n: p.detach().to(torch.float64) for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update({n: b.detach().to(torch.float64) if b.is_floating_point() else b
                  for n, b in model.named_buffers()})  # fmt: skip
    w = torch.cat([p.detach().reshape(-1).to(torch.float64) for _, p in trainable])
    x64 = x.detach().to(torch.float64)
    y64 = y.detach().to(torch.float64) if y.is_floating_point() else y.detach()
    loss = TrainingLoss(
        model=model, per_sample=per_sample, w=w, x=x64, y=y64, names=tuple(n for n, _ in trainable),
        shapes=tuple(tuple(p.shape) for _, p in trainable), reduction=reduction, fixed=fixed,
    )  # fmt: skip
    _common.check_problem(loss, w, x64)
    return loss


def _unpack(data) -> tuple[Tensor, Tensor]:
    if isinstance(data, tuple | list) and len(data) == 2:
        x, y = data
    elif hasattr(data, "images") and hasattr(data, "labels"):
        x, y = data.images, data.labels
    elif isinstance(data, torch.utils.data.TensorDataset) and len(data.tensors) == 2:
        x, y = data.tensors
    else:
        raise TypeError("data must be (x, y), an ImageSet (.images, .labels) or a TensorDataset of (x, y)")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("the data x and labels y must be tensors")
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same number of samples along axis 0, got shapes "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")  # fmt: skip
    return x, y


@dataclass(frozen=True)
class FitResult:
    """The outcome of :func:`fit`: the parameters, the loss and gradient norm there, the L-BFGS
    iterations, and whether the gradient norm reached ``gtol``."""

    w: Tensor
    loss: float
    grad_norm: float
    iterations: int
    converged: bool


def fit(
    loss: Callable[[Tensor, Tensor], Tensor],
    w0: Tensor,
    x: Tensor,
    *,
    max_iter: int = 2000,
    gtol: float = 1e-10,
    history_size: int = 50,
) -> FitResult:
    """Minimise ``loss(w, x)`` over ``w`` from ``w0`` by full-batch L-BFGS in float64.

    Deterministic (no randomness; fixed thread count gives identical results). Uses
    ``torch.optim.LBFGS`` with a strong-Wolfe line search and stops when ``||grad|| <= gtol``, when
    the loss or the step stops changing in float64 (rounding), or after ``max_iter`` iterations;
    ``converged`` says whether ``||grad|| <= gtol`` was reached.

    Parameters
    ----------
    loss, w0, x
        The problem (``w0`` flat, shape ``(p,)``).
    max_iter
        Maximum L-BFGS iterations.
    gtol
        Target gradient norm (Euclidean).
    history_size
        L-BFGS memory.

    Returns
    -------
    FitResult
    """
    w0, x, _, _ = _common.check_problem(loss, w0, x)
    w = w0.clone().requires_grad_(True)
    # torch tests the largest gradient entry: gtol / sqrt(p) on it bounds the Euclidean norm by gtol
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, history_size=history_size,
                            tolerance_grad=gtol / w.numel() ** 0.5, tolerance_change=1e-300,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        value = loss(w, x)
        value.backward()
        return value

    opt.step(closure)
    iterations = int(opt.state[w].get("n_iter", 0))
    w = w.detach()
    g = _common.grad_fn(loss)(w, x)
    gn = float(torch.linalg.vector_norm(g))
    return FitResult(w=w, loss=float(loss(w, x)), grad_norm=gn, iterations=iterations, converged=gn <= gtol)


@dataclass(frozen=True)
class Spectrum:
    """The eigendecomposition ``H = V diag(eigenvalues) V^T`` of a Hessian (float64, ascending)."""

    eigenvalues: Tensor
    eigenvectors: Tensor

    def check(self, p: int) -> None:
        """Raise unless this is the spectrum of a ``p``-parameter Hessian."""
        if self.eigenvectors.shape != (p, p) or self.eigenvalues.shape != (p,):
            raise ValueError(
                f"the spectrum is of a {self.eigenvalues.numel()}-parameter Hessian, but w has {p} entries"
            )

    def split(self, rtol: float) -> tuple[Tensor, Tensor]:
        """``(keep, kernel)`` masks: ``|lambda| > rtol * max |lambda|`` and the rest."""
        if not (0 <= rtol < 1):
            raise ValueError(f"rtol must lie in [0, 1), got {rtol}")
        scale = float(self.eigenvalues.abs().max())
        keep = self.eigenvalues.abs() > rtol * scale
        return keep, ~keep


def hessian_spectrum(loss: Callable[[Tensor, Tensor], Tensor], w: Tensor, x: Tensor) -> Spectrum:
    """The dense Hessian ``d^2 loss / dw^2`` at ``(w, x)`` and its eigendecomposition (float64).

    For small models: the ``p x p`` matrix is built from ``p`` vmapped Hessian-vector products and
    decomposed by LAPACK's ``dsyevr`` (``scipy.linalg.eigh``). Pass the result as ``spectrum=`` to
    :func:`~sensitivity_lib.setvalued.derivative.graphical_derivative` and
    :func:`~sensitivity_lib.setvalued.modulus.lipschitz_modulus` to decompose once.
    """
    import scipy.linalg

    w, x, _, _ = _common.check_problem(loss, w, x)
    H = _common.dense_hessian(loss, w, x)
    lam, V = scipy.linalg.eigh(H.cpu().numpy(), driver="evr")
    return Spectrum(torch.from_numpy(lam), torch.from_numpy(V))


def hessian_operator(loss: Callable[[Tensor, Tensor], Tensor], w: Tensor, x: Tensor) -> LinearOperator:
    """The Hessian ``H`` (``p x p``) as a self-adjoint matrix-free operator of float64 HVPs."""
    w, x, _, _ = _common.check_problem(loss, w, x)
    return _common.hessian_operator(loss, w, x)


def mixed_operator(loss: Callable[[Tensor, Tensor], Tensor], w: Tensor, x: Tensor,
                   rows=None) -> LinearOperator:  # fmt: skip
    """The mixed derivative ``R_x = d/dx grad_w loss`` on the samples ``rows`` (all when ``None``):
    a matrix-free operator ``(|rows|, *x.shape[1:]) -> (p,)`` with its adjoint."""
    w, x, _, _ = _common.check_problem(loss, w, x)
    return _common.mixed_operator(loss, w, x, rows)


def mixed_term(loss: Callable[[Tensor, Tensor], Tensor], w: Tensor, x: Tensor, dx: Tensor) -> Tensor:
    """``b = R_x dx``, the derivative of the gradient along the data perturbation ``dx`` (shape of ``x``)."""
    w, x, dx, _ = _common.check_problem(loss, w, x, dx)
    return _common.mixed_term(loss, w, x, dx)

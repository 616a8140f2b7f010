"""Internal pieces of :mod:`sensitivity_lib.setvalued`: input checks and the derivatives of a
training loss ``loss(w, x)`` by torch.func (float64 throughout).

Notation (Wang, Wang & Ban, AAAI 2025): ``R(x, w) = grad_w loss(w, x)`` is the stationarity map,
``H = grad_w R`` the Hessian (``p x p``), ``R_x = grad_x R`` the mixed derivative (``p x dim x``).
Nothing here forms ``H`` or ``R_x`` except :func:`dense_hessian` and :func:`dense_mixed`, which are
for small models.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.func import grad, vjp, vmap

from sensitivity_lib.krylov import LinearOperator

Tensor = torch.Tensor
Loss = Callable[[Tensor, Tensor], Tensor]

#: Largest dense ``p x p`` float64 matrix the dense paths build (bytes).
DENSE_LIMIT_BYTES = 4 * 2**30
WEIGHTINGS: tuple[str, ...] = ("exact", "paper")


def check_problem(loss: Loss, w, x, dx=None) -> tuple[Tensor, Tensor, Tensor | None, float]:
    """Validate a training problem; returns ``(w, x, dx, loss(w, x))`` with tensors in float64.

    ``w`` must be a flat (1-D) finite float tensor, ``x`` a finite float tensor, ``dx`` one of the
    same shape as ``x``, and ``loss(w, x)`` a finite scalar (0-dim) tensor.
    """
    if not callable(loss):
        raise TypeError(f"loss must be a callable loss(w, x) -> scalar tensor, got {type(loss).__name__}")
    w = _float_tensor(w, "w")
    if w.dim() != 1:
        raise ValueError(
            f"w must be a flat parameter vector (1-D), got shape {tuple(w.shape)}; flatten the "
            "parameters (setvalued.module_loss does it for an nn.Module)"
        )
    x = _float_tensor(x, "x")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the samples are its first axis)")
    if dx is not None:
        dx = _float_tensor(dx, "dx")
        if dx.shape != x.shape:
            raise ValueError(
                f"dx must have the shape of x {tuple(x.shape)} (one perturbation per entry of the "
                f"data; zero rows for unperturbed samples), got {tuple(dx.shape)}"
            )
    value = loss(w, x)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"loss(w, x) must return a tensor, got {type(value).__name__}")
    if value.dim() != 0:
        raise ValueError(
            f"loss(w, x) must return a scalar (0-dim) tensor, got shape {tuple(value.shape)}; reduce "
            "the per-sample losses (e.g. .mean())"
        )
    if not bool(torch.isfinite(value.detach())):
        raise ValueError(f"loss(w, x) is not finite ({float(value)}) at the given w and x")
    return w, x, dx, float(value)


def _float_tensor(t, what: str) -> Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{what} is empty")
    t = t.detach().to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} has non-finite entries (NaN or infinity)")
    return t


def check_dense(p: int, what: str = "the Hessian") -> None:
    need = 8 * p * p
    if need > DENSE_LIMIT_BYTES:
        raise ValueError(
            f"the dense method would store {what} as a {p} x {p} float64 matrix ({need / 2**30:.1f} GiB); "
            "use method='minres' or 'lsqr' (matrix-free)"
        )


def weight_factor(weighting: str, dx: Tensor) -> float:
    """1 for the exact derivative, ``n / |K|`` for the paper's eq. (14) (``|K|`` = rows of ``dx``
    that are not zero, ``n`` = rows of ``x``)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "exact":
        return 1.0
    k = int((dx.reshape(dx.shape[0], -1) != 0).any(1).sum())
    return dx.shape[0] / k if k else 1.0


def grad_fn(loss: Loss) -> Callable[[Tensor, Tensor], Tensor]:
    """``(w, x) -> R(x, w) = grad_w loss(w, x)``."""
    return grad(loss, argnums=0)


def hvp_fn(loss: Loss, w: Tensor, x: Tensor) -> Callable[[Tensor], Tensor]:
    """``v -> H v``: the pull-back of the gradient map ``w -> R(x, w)`` (reverse over reverse,
    Pearlmutter's trick), built once and reused for every ``v`` (``H`` is symmetric, so its
    transpose-vector product is ``H v``). Vmappable."""
    g = grad_fn(loss)
    _, pullback = vjp(lambda w_: g(w_, x), w)

    def hvp(v: Tensor) -> Tensor:
        return pullback(v)[0]

    return hvp


def mixed_fns(loss: Loss, w: Tensor, x: Tensor) -> tuple[Callable, Callable]:
    """``(u -> R_x u, z -> R_x^T z)`` for ``u`` of the shape of ``x`` and ``z`` of shape ``(p,)``.

    ``R_x u = d/dt grad_w loss(w, x + t u)`` is computed, by the symmetry of mixed partials, as the
    pull-back of ``w -> grad_x loss(w, x)`` applied to ``u``; ``R_x^T z`` as the pull-back of
    ``x -> grad_w loss(w, x)`` applied to ``z``. Both pull-backs are built once. Vmappable.
    """
    g = grad_fn(loss)
    gx = grad(loss, argnums=1)
    _, pull_w = vjp(lambda w_: gx(w_, x), w)
    _, pull_x = vjp(lambda x_: g(w, x_), x)

    def forward(u: Tensor) -> Tensor:
        return pull_w(u)[0]

    def adjoint(z: Tensor) -> Tensor:
        return pull_x(z)[0]

    return forward, adjoint


def mixed_term(loss: Loss, w: Tensor, x: Tensor, dx: Tensor) -> Tensor:
    """``b = R_x dx = d/dt grad_w loss(w, x + t dx)`` at ``t = 0``."""
    gx = grad(loss, argnums=1)
    return vjp(lambda w_: gx(w_, x), w)[1](dx)[0]


def hessian_operator(loss: Loss, w: Tensor, x: Tensor) -> LinearOperator:
    """The Hessian as a self-adjoint :class:`~sensitivity_lib.krylov.LinearOperator` (batch 1)."""
    hvp = hvp_fn(loss, w, x)
    p = w.numel()

    def matvec(v: Tensor) -> Tensor:
        return hvp(v.reshape(p))[None]

    return LinearOperator(matvec, matvec, in_shape=(p,), dtype=torch.float64, device=w.device)


def mixed_operator(loss: Loss, w: Tensor, x: Tensor, rows: Tensor | None = None) -> LinearOperator:
    """``R_x`` restricted to the samples ``rows`` (all when ``None``): ``(|K|, *x.shape[1:]) -> (p,)``,
    with its adjoint ``z -> (R_x^T z)[rows]``."""
    forward, adjoint = mixed_fns(loss, w, x)
    p = w.numel()
    idx = sample_rows(x, rows)
    in_shape = (len(idx), *x.shape[1:]) if idx is not None else tuple(x.shape)

    def matvec(u: Tensor) -> Tensor:
        if idx is None:
            dx = u.reshape(x.shape)
        else:  # out of place, so that it vmaps
            dx = torch.zeros_like(x).index_add(0, idx, u.reshape(in_shape))
        return forward(dx)[None]

    def rmatvec(z: Tensor) -> Tensor:
        full = adjoint(z.reshape(p))
        return (full if idx is None else full[idx])[None]

    return LinearOperator(matvec, rmatvec, in_shape=in_shape, out_shape=(p,), dtype=torch.float64,
                          device=w.device)  # fmt: skip


def sample_rows(x: Tensor, rows) -> Tensor | None:
    """The sample indices ``rows`` as a checked LongTensor (``None`` for all samples)."""
    if rows is None:
        return None
    idx = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
    if idx.numel() == 0:
        raise ValueError("rows is empty: give the indices of the perturbed samples (or None for all)")
    if bool((idx < 0).any()) or bool((idx >= x.shape[0]).any()):
        raise ValueError(f"rows must index the {x.shape[0]} samples of x, got min {int(idx.min())}, "
                         f"max {int(idx.max())}")  # fmt: skip
    if len(torch.unique(idx)) != len(idx):
        raise ValueError("rows has repeated indices")
    return idx


def _chunk(p: int, width: int) -> int:
    """A vmap chunk that keeps ``chunk * width`` float64 numbers near 64 MB."""
    return int(max(1, min(p, 2**23 // max(1, width))))


def dense_hessian(loss: Loss, w: Tensor, x: Tensor) -> Tensor:
    """The ``p x p`` Hessian, column by column from vmapped HVPs, symmetrised (small models only)."""
    p = w.numel()
    check_dense(p)
    hvp = hvp_fn(loss, w, x)
    eye = torch.eye(p, dtype=torch.float64, device=w.device)
    H = vmap(hvp, chunk_size=_chunk(p, p + x.numel()))(eye)
    return 0.5 * (H + H.T)


def dense_mixed(loss: Loss, w: Tensor, x: Tensor, rows: Tensor | None = None) -> Tensor:
    """``R_x`` as a dense ``(p, m)`` matrix, ``m`` = entries of ``x[rows]`` (small models only)."""
    op = mixed_operator(loss, w, x, rows)
    p, m = op.n_out, op.n_in
    check_dense(int(math.sqrt(p * m)), "the mixed derivative")
    if m <= p:  # columns R_x e_j
        eye = torch.eye(m, dtype=torch.float64, device=w.device).reshape(m, *op.in_shape)
        cols = vmap(lambda u: op.matvec(u[None])[0], chunk_size=_chunk(m, p + x.numel()))(eye)
        return cols.reshape(m, p).T
    eye = torch.eye(p, dtype=torch.float64, device=w.device)  # rows R_x^T e_i
    rows_ = vmap(lambda z: op.rmatvec(z[None])[0], chunk_size=_chunk(p, m + x.numel()))(eye)
    return rows_.reshape(p, m)

r"""Matrix-free Krylov iterations for the top of a spectrum: one operator convention, one stopping rule.

Every largest eigenvalue or singular value in the library is computed here: the local condition
number E0 (a Jacobian applied through autograd), the masked layer norms of E2, the operator norms of
convolutions (three million unknowns at 224x224), and, in later parts, resolvents (pseudospectra)
and Hessians. Nothing is ever stored as a matrix.

The operator
    A :class:`LinearOperator` is a batch of ``B`` independent linear maps
    ``A_b : K^{in_shape} -> K^{out_shape}`` (``K`` real or complex), given by
    ``matvec: (B, *in_shape) -> (B, *out_shape)`` and, for singular values, its adjoint
    ``rmatvec: (B, *out_shape) -> (B, *in_shape)`` (the conjugate transpose). An optional
    ``restrict(idx)`` returns the operator of a sub-batch, so that problems that have converged
    leave the batch instead of being carried along (E0 re-linearises the network for the images
    still running).

Norm
    The Euclidean norm of one flattened problem: the operator norm is the spectral norm.

Methods
    * :func:`top_eig`: the largest eigenvalue of self-adjoint operators, by Lanczos (default) or
      power iteration.
    * :func:`top_singular`: the largest singular value, by the same iterations on the Gram operator
      of the smaller side (``A^H A`` or ``A A^H``), finished by ``sigma = ||A v|| / ||v||``.
    * :func:`solve`: a linear solve ``A x = b`` (least squares when ``b`` is not in the range), by
      scipy's MINRES (self-adjoint ``A``) or LSQR on :func:`to_scipy`'s adapter, with the
      tolerance explicit and convergence judged on recomputed residuals (below), never silent.

    Lanczos keeps the Krylov basis semi-orthogonal by partial re-orthogonalisation: Simon's
    recurrence estimates the loss of orthogonality at every step, and the new vector is
    orthogonalised against the whole basis only when the estimate passes ``sqrt(eps)``
    (H. D. Simon, *The Lanczos algorithm with partial reorthogonalization*, Math. Comp. 42, 1984).
    On the convolutions of VGG-19 that was needed at 2 of 734 steps. The basis restarts from the
    Ritz vector when it reaches ``max_basis`` vectors.

The stopping rule (the same for both methods and every caller)
    With ``theta_k`` the estimate after ``k`` applications of the operator (the top Ritz value, or
    the Rayleigh quotient of the power iterate), ``d_k = |theta_k - theta_{k-1}|`` and ``r_k`` the
    residual ``||A v - theta_k v||`` of the Ritz pair (for Lanczos its estimate ``beta_k |s_k|``),
    rule 1 estimates the relative error of ``theta_k`` from the last six increments as a geometric
    tail,

    ``err_k = 4 max_i d_i q / (1 - q) / theta_k``,  ``q`` the largest ratio ``d_{i+1} / d_i``

    (``inf`` when the increments do not shrink; increments at the rounding level of the working
    dtype, or below ``noise * theta_k`` for an operator applied inexactly, count as no progress).
    The residual ``r_k`` bounds the distance to *some* eigenvalue, not to the largest, so it serves
    only as a guard. A problem has converged when

    1. ``err_j <= tol`` at each of the last ``max(1, k / 8)`` steps ``j`` (for Lanczos at most
       ``max_basis / 8``: a restart from one Ritz vector starts a new convergence, whose first
       increments are large again), and the residual of the Ritz pair is at most
       ``sqrt(tol) theta_k``; for the power iteration, also a short Lanczos run (10 products)
       from its vector finds no Ritz value above ``theta_k (1 + tol / 2)``; or
    2. a certified ``upper`` bound is given and ``(upper - theta_k) / theta_k <= tol`` (a proof); or
    3. the Krylov space is invariant (the Lanczos ``beta_k`` at rounding level: the value is exact).

    ``tol`` is relative, on the eigenvalue; :func:`top_singular` asks for ``2 tol`` on the Gram
    operator's eigenvalue, which is ``tol`` on the singular value. The factor 4, the window, the
    ``k / 8`` persistence and the power iteration's check were set on measurements: without the
    persistence, Lanczos stopped 1.1e-3 low at ``tol=1e-3`` on one of VGG-19's convolutions (at
    56x56, random start: a plateau on a lower peak of the kernel's symbol before the top one
    emerged), and the power iteration stopped 1.2e-3 low inside a pair of top eigenvalues 0.1%
    apart; with them, every value reported as converged was within ``tol`` on the tests' random
    matrices and on 160 random convolutions against dense SVDs.

The linear solves
    :func:`solve` runs ``scipy.sparse.linalg.minres`` or ``lsqr`` from ``x0 = 0`` (so the iterates
    stay in the Krylov space of ``A^H b``: LSQR returns the minimum-norm least-squares solution for
    any ``b``, MINRES the minimum-norm solution when ``b`` is in the range of ``A``). scipy's own
    stopping tests use its running estimates; this module recomputes, with two more products,

    ``residual = ||A x - b|| / ||b||``  and  ``normal_residual = ||A^H (A x - b)|| / ||A^H b||``

    and reports the solve as converged when either is at most ``tol`` (a solution of ``A x = b``,
    or a least-squares solution, to ``tol``). scipy's tests are relative to ``||A|| ||x||``, so on
    an ill-conditioned system it can stop before these pass: the solve then restarts on the
    residual (the correction again from 0, so LSQR's iterates stay in the range of ``A^H``), up to
    8 times within ``max_iter``. If the residuals still do not pass, ``converged`` is false and
    :class:`NotConvergedWarning` is raised as a warning.

What the result guarantees
    The value is a Rayleigh quotient of the returned vector, so it is never above the largest
    eigenvalue (singular value), up to the rounding of its final evaluation: a *lower* estimate,
    whatever happened. A small residual ``r = ||A v - theta v||`` proves that *some* eigenvalue
    lies within ``r`` of ``theta`` (within ``r^2 / gap`` when it is isolated), not that it is the
    largest: a start nearly orthogonal to the top eigenvector, or a cluster of near-equal top
    eigenvalues, can hold the iteration on a lower one for a while. Rule 1 is therefore a
    heuristic, checked in the tests against dense decompositions; rule 2 is a proof. A run that
    stops at ``max_iter`` before any rule holds says so (``converged`` is false for that problem)
    and warns with :class:`NotConvergedWarning`.

Example
-------
>>> import torch
>>> A = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
>>> r = top_eig(LinearOperator.from_matrix(A), tol=1e-12)
>>> round(float(r.value[0]), 12), bool(r.converged.all())
(3.0, True)
>>> B = torch.tensor([[3.0, 0.0], [4.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
>>> s = top_singular(LinearOperator.from_matrix(B), tol=1e-12)
>>> round(float(s.value[0]), 12)
5.0
>>> r = solve(LinearOperator.from_matrix(A), torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
>>> [round(v, 12) for v in r.x.tolist()], r.status
([1.0, 1.0, 1.0], 'solution')
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sensitivity_lib.validation import check_finite_tensor

__all__ = [
    "LinearOperator",
    "EigResult",
    "SingularResult",
    "NotConvergedWarning",
    "top_eig",
    "top_singular",
    "linear_adjoint",
    "METHODS",
    "SOLVERS",
    "SolveResult",
    "solve",
    "to_scipy",
]

METHODS: tuple[str, ...] = ("lanczos", "power")
SOLVERS: tuple[str, ...] = ("minres", "lsqr")
_MAX_RESTARTS = 8  # solves for the correction when scipy stops before the recomputed residuals pass
_WINDOW = 5  # increments looked at by rule 1
_SAFETY = 4.0  # rule 1's factor on the geometric tail
_NOISE = 16.0  # increments below _NOISE * eps * |theta| are rounding, not convergence
_SECULAR_BATCH = 64  # from this many problems, the top Ritz value by _top_ritz_value, not eigh
_PERSIST = 0.125  # rule 1 must also have held at each of the last _PERSIST * k steps
_VERIFY_STEPS = 10  # Lanczos steps that check the power iteration before it stops

Tensor = torch.Tensor
Map = Callable[[Tensor], Tensor]


class NotConvergedWarning(RuntimeWarning):
    """An iteration stopped at ``max_iter`` before its stopping rule held for every problem.

    The values it returned are still lower estimates (Rayleigh quotients), but not to ``tol``.
    """


# --------------------------------------------------------------------------------------------
# the operator


class LinearOperator:
    """A batch of ``batch`` linear maps ``K^{in_shape} -> K^{out_shape}``, applied matrix-free.

    Parameters
    ----------
    matvec
        ``x -> A x`` for ``x`` of shape ``(batch, *in_shape)``; returns ``(batch, *out_shape)``.
        Problem ``b`` of the batch is applied to row ``b`` only (the problems are independent).
    rmatvec
        ``y -> A^H y`` for ``y`` of shape ``(batch, *out_shape)`` (needed for singular values;
        ``None`` for a self-adjoint operator used with :func:`top_eig`).
    in_shape, out_shape
        Shapes of one problem's input and output, without the batch axis (``out_shape`` defaults
        to ``in_shape``).
    batch
        Number of independent problems.
    dtype, device
        Dtype and device of the vectors the iterations pass to ``matvec`` (the Krylov basis is
        kept in this dtype; the recurrence coefficients in float64).
    restrict
        Optional ``idx -> LinearOperator`` for the sub-batch ``idx`` (a LongTensor of positions in
        this batch). When given, converged problems leave the batch.

    Example
    -------
    >>> A = torch.randn(4, 3, dtype=torch.float64)
    >>> op = LinearOperator.from_matrix(A)
    >>> op.batch, op.in_shape, op.out_shape
    (1, (3,), (4,))
    """

    def __init__(
        self,
        matvec: Map,
        rmatvec: Map | None = None,
        *,
        in_shape: Sequence[int],
        out_shape: Sequence[int] | None = None,
        batch: int = 1,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        restrict: Callable[[Tensor], LinearOperator] | None = None,
    ) -> None:
        self.matvec = matvec
        self.rmatvec = rmatvec
        self.in_shape = tuple(int(s) for s in in_shape)
        self.out_shape = self.in_shape if out_shape is None else tuple(int(s) for s in out_shape)
        if batch < 1 or any(s < 1 for s in self.in_shape + self.out_shape):
            raise ValueError(
                f"need batch >= 1 and positive shapes, got batch={batch}, in_shape={self.in_shape}, "
                f"out_shape={self.out_shape}"
            )
        self.batch = int(batch)
        self.dtype = dtype
        self.device = torch.device(device)
        self._restrict = restrict

    @property
    def n_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def n_out(self) -> int:
        return math.prod(self.out_shape)

    @property
    def restrictable(self) -> bool:
        """Whether :meth:`restrict` can drop problems from the batch."""
        return self._restrict is not None

    def restrict(self, idx: Tensor) -> LinearOperator | None:
        """The operator of the sub-batch ``idx``, or ``None`` when it cannot be restricted."""
        return None if self._restrict is None else self._restrict(idx)

    def apply(self, x: Tensor) -> Tensor:
        """``A x`` with the shapes checked; ``x`` of shape ``(batch, *in_shape)``."""
        return _checked(self.matvec, x, (self.batch, *self.out_shape), "matvec")

    def apply_adjoint(self, y: Tensor) -> Tensor:
        """``A^H y`` with the shapes checked; ``y`` of shape ``(batch, *out_shape)``."""
        if self.rmatvec is None:
            raise ValueError("this operator has no rmatvec (adjoint); singular values need one")
        return _checked(self.rmatvec, y, (self.batch, *self.in_shape), "rmatvec")

    def gram(self, side: str = "input") -> LinearOperator:
        """The self-adjoint ``A^H A`` (``side="input"``) or ``A A^H`` (``side="output"``)."""
        if side not in ("input", "output"):
            raise ValueError(f"side must be 'input' or 'output', got {side!r}")
        if self.rmatvec is None:
            raise ValueError("the Gram operator needs rmatvec (the adjoint)")
        first, second = (self.apply, self.apply_adjoint) if side == "input" else (
            self.apply_adjoint, self.apply)  # fmt: skip
        shape = self.in_shape if side == "input" else self.out_shape
        restrict = None
        if self._restrict is not None:

            def restrict(idx: Tensor) -> LinearOperator:
                return self._restrict(idx).gram(side)

        return LinearOperator(
            lambda v: second(first(v)), None, in_shape=shape, batch=self.batch, dtype=self.dtype,
            device=self.device, restrict=restrict,
        )  # fmt: skip

    @classmethod
    def from_matrix(cls, A: Tensor) -> LinearOperator:
        """A dense ``(m, n)`` matrix or a batch ``(B, m, n)`` as an operator (tests, small problems)."""
        if not isinstance(A, torch.Tensor) or A.dim() not in (2, 3):
            raise ValueError("from_matrix needs a tensor of shape (m, n) or (B, m, n)")
        M = A if A.dim() == 3 else A[None]
        B, m, n = M.shape

        def restrict(idx: Tensor) -> LinearOperator:
            return cls.from_matrix(M[idx])

        return cls(
            lambda x: (M @ x[..., None])[..., 0],
            lambda y: (M.mH @ y[..., None])[..., 0],
            in_shape=(n,), out_shape=(m,), batch=B, dtype=A.dtype, device=A.device, restrict=restrict,
        )  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"LinearOperator(batch={self.batch}, in_shape={self.in_shape}, out_shape={self.out_shape}, "
            f"dtype={self.dtype})"
        )


def _checked(fn: Map, x: Tensor, shape: tuple[int, ...], what: str) -> Tensor:
    y = fn(x)
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != shape:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"the operator's {what} must return shape {shape}, got {got}")
    return y


def linear_adjoint(forward: Map, example: Tensor) -> Map:
    """The adjoint ``y -> B^T y`` of a linear function ``B`` via ``torch.func.vjp``.

    Parameters
    ----------
    forward
        A *linear* function of one tensor (e.g. a convolution without bias). If it acts on a
        leading batch dimension, the adjoint accepts any batch size.
    example
        A tensor of the input shape and dtype (its values do not matter, the map being linear).

    Returns
    -------
    callable
        ``y -> B^T y`` for ``y`` of the output shape (the vjp is rebuilt, once, for each new
        leading batch size of ``y``).

    Example
    -------
    >>> W = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    >>> adj = linear_adjoint(lambda x: x @ W.T, torch.zeros(1, 2))
    >>> adj(torch.tensor([[1.0, 0.0, 0.0]])).tolist()
    [[1.0, 2.0]]
    """
    cache: dict[int, Callable] = {}
    tail = tuple(example.shape[1:])
    _, fn0 = torch.func.vjp(forward, torch.zeros_like(example))
    cache[example.shape[0] if example.dim() else -1] = fn0

    def adjoint(y: Tensor) -> Tensor:
        key = y.shape[0] if (example.dim() and y.dim()) else -1
        if key not in cache:
            x = torch.zeros((key, *tail), dtype=example.dtype, device=example.device)
            cache[key] = torch.func.vjp(forward, x)[1]
        return cache[key](y)[0]

    return adjoint


# --------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class EigResult:
    """The top eigenpair estimates of a batch of self-adjoint operators (all tensors per problem).

    Attributes
    ----------
    value
        float64 ``(B,)``: the Rayleigh quotient of ``vector``, never above the top eigenvalue (up
        to rounding).
    vector
        ``(B, *shape)`` unit vectors (in the iteration dtype).
    iterations
        int64 ``(B,)``: applications of the operator spent on each problem (not counting the
        final evaluation).
    residual
        float64 ``(B,)``: ``||A v - value v|| / |value|`` of the returned pair.
    error
        float64 ``(B,)``: the relative error estimated by the stopping rule at the stop (a certified
        bound when ``upper`` was given and decided; 0 for an invariant Krylov space).
    converged
        bool ``(B,)``: whether the stopping rule held before ``max_iter``.
    history
        float64 ``(k, B)``: the estimate after each step (``nan`` once a problem has left the batch).
    method, tol
        The method and the requested relative tolerance.
    reorthogonalised
        Lanczos steps that orthogonalised against the whole basis (0 for the power iteration).
    """

    value: Tensor
    vector: Tensor
    iterations: Tensor
    residual: Tensor
    error: Tensor
    converged: Tensor
    history: Tensor
    method: str
    tol: float
    reorthogonalised: int = 0


@dataclass(frozen=True)
class SingularResult:
    """The top singular triplet estimates of a batch of linear maps.

    Attributes
    ----------
    value
        float64 ``(B,)``: ``sigma = ||A v|| / ||v||`` for the returned right vector, a lower
        estimate of ``sigma_max`` (evaluated by ``check`` when one was given).
    right, left
        ``(B, *in_shape)`` unit right vectors ``v`` and ``(B, *out_shape)`` left vectors
        ``u = A v / ||A v||``.
    iterations, converged, method, tol, reorthogonalised
        As in :class:`EigResult` (the iteration runs on a Gram operator, so one iteration is one
        product with ``A`` and one with ``A^H``).
    residual
        float64 ``(B,)``: the iteration's relative residual of its Gram eigenpair at the stop
        (``||G u - theta u|| / theta``; for Lanczos its estimate ``beta_k |s_k| / theta``).
    error
        float64 ``(B,)``: the estimated relative error of ``sigma`` (half that of ``sigma^2``).
    history
        float64 ``(k, B)``: the estimate of ``sigma`` after each step.
    side
        ``"input"`` (iterated on ``A^H A``) or ``"output"`` (on ``A A^H``).
    """

    value: Tensor
    right: Tensor
    left: Tensor
    iterations: Tensor
    residual: Tensor
    error: Tensor
    converged: Tensor
    history: Tensor
    method: str
    tol: float
    side: str
    reorthogonalised: int = 0


# --------------------------------------------------------------------------------------------
# shared pieces of the two iterations


def _check_args(method: str, tol: float, max_iter: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not (tol > 0) or not math.isfinite(tol) or int(max_iter) < 1:
        raise ValueError(f"need tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")


def _start(op: LinearOperator, v0: Tensor | None, generator: torch.Generator | None) -> Tensor:
    """The (B, n) starting rows: ``v0`` (flattened; one row per problem) or Gaussian ones."""
    if v0 is None:
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        real = torch.empty(0, dtype=op.dtype).real.dtype
        x = torch.randn((op.batch, op.n_in), generator=g, dtype=torch.float64).to(real)
        if op.dtype.is_complex:
            x = torch.complex(x, torch.randn(x.shape, generator=g, dtype=torch.float64).to(real))
        return x.to(device=op.device, dtype=op.dtype)
    check_finite_tensor(v0, "the starting vector")
    if v0.numel() != op.batch * op.n_in:
        raise ValueError(
            f"the starting vector must hold {op.batch} x {op.in_shape} values (one row per problem), "
            f"got shape {tuple(v0.shape)}"
        )
    return v0.reshape(op.batch, op.n_in).to(device=op.device, dtype=op.dtype)


def _normalise(x: Tensor) -> tuple[Tensor, Tensor]:
    """Row-normalise (B, n); zero rows stay zero. Returns (unit rows, float64 norms)."""
    nrm = torch.linalg.vector_norm(x, dim=1)
    safe = torch.where(nrm > 0, nrm, torch.ones_like(nrm))
    return x / safe[:, None].to(x.dtype), nrm.double()


def _wide(t: Tensor) -> Tensor:
    """``t`` in float64 (complex128 for complex tensors)."""
    return t.to(torch.complex128 if t.is_complex() else torch.float64)


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise ``a^H b`` of (B, n) tensors, in their dtype. In float64 and complex128 a batched
    product: ``vecdot`` makes a temporary of the size of ``a`` there (fresh pages of memory at
    every Lanczos step of a large batch); in float32 its fused reduction is the faster one."""
    if a.dtype == torch.float32:
        return torch.linalg.vecdot(a, b, dim=1)
    return torch.bmm(a.conj().unsqueeze(1), b.unsqueeze(2)).view(-1)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise ``a^H b`` of (B, n) tensors, in float64 (real part for complex)."""
    return _rowdot(a, b).real.double()


def _apply_flat(op: LinearOperator, x: Tensor) -> Tensor:
    y = op.apply(x.reshape(op.batch, *op.in_shape))
    return y.reshape(op.batch, -1).to(x.dtype)


def _tail_error(hist: list[Tensor], eps: float) -> Tensor:
    """Rule 1's relative error estimate of the latest value (float64 (B,); ``inf`` before
    ``_WINDOW + 2`` values). Increments at the rounding level of the working precision (``eps``)
    carry no rate: there the estimate is the largest increment itself. The residual is no
    substitute: it bounds the distance to *some* eigenvalue, and the smaller of the two stopped on
    lower eigenvalues of random convolutions (1.7e-3 off for ``tol=1e-3``)."""
    if len(hist) < _WINDOW + 2:
        return torch.full_like(hist[-1], math.inf)
    t = torch.stack(hist[-_WINDOW - 2 :])  # (w + 2, B), oldest first
    scale = t[-1].abs().clamp_min(1e-300)
    d = (t[1:] - t[:-1]).abs()  # w + 1 increments
    dmax = d.amax(0)
    d = torch.where(d > _NOISE * eps * scale, d, torch.zeros_like(d))  # rounding is no progress
    # the rate between consecutive increments (0 after no change; inf for a jump after no change)
    jump = torch.where(d[1:] > 0, math.inf, 0.0)
    ratio = torch.where(d[:-1] > 0, d[1:] / d[:-1].clamp_min(1e-300), jump)
    q = ratio.amax(0)
    tail = torch.where(q < 1, _SAFETY * q / (1 - q).clamp_min(1e-300), torch.full_like(q, math.inf))
    err = torch.where(d.amax(0) > 0, d.amax(0) * tail, dmax)  # only rounding left: its size
    # no change at all is not an exact value: the tridiagonal's eigenvalue is known to float64's
    # rounding (its top Ritz value is held at the previous one when they agree to a few ulps)
    return torch.where(dmax > 0, err, torch.finfo(torch.float64).eps * scale) / scale


class _History:
    """The values, relative residuals and rule 1's per-step error estimates of the active problems
    (lists of float64 ``(B,)`` tensors, oldest first). Each step's estimate is computed once, when
    its value arrives, so that rule 1's persistence test costs one reduction per step."""

    def __init__(self, eps: float) -> None:
        self.eps = eps
        self.values: list[Tensor] = []
        self.rel: list[Tensor] = []
        self.tails: list[Tensor] = []

    def __len__(self) -> int:
        return len(self.values)

    def push(self, theta: Tensor, rel: Tensor) -> None:
        self.values.append(theta)
        self.rel.append(rel)
        self.tails.append(_tail_error(self.values, self.eps))

    def keep(self, idx: Tensor) -> None:
        """Keep the problems ``idx`` (the batch shrank)."""
        self.values = [h[idx] for h in self.values]
        self.rel = [h[idx] for h in self.rel]
        self.tails = [h[idx] for h in self.tails]


def _decide(hist: _History, tol, upper, invariant, check=None, basis=None) -> tuple[Tensor, Tensor]:
    """(done, error) for every problem from the three rules of the module docstring; ``check`` is
    the power iteration's verified Ritz value (rule 1 then also needs ``theta`` within ``tol / 2`` of
    it)."""
    theta, rel = hist.values[-1], hist.rel[-1]
    scale = theta.abs().clamp_min(1e-300)
    # rule 1 must have held for a while too (within one Lanczos cycle of ``basis`` vectors: a restart
    # from a single Ritz vector starts a new convergence, whose first increments are large again)
    span = math.ceil(_PERSIST * (len(hist) if basis is None else min(len(hist), basis)))
    error = torch.stack(hist.tails[-max(1, min(span, len(hist))) :]).amax(0)
    if check is not None:
        error = torch.maximum(error, 2 * (check - theta).clamp_min(0) / scale)
    done = (error <= tol) & (rel <= math.sqrt(tol))
    if upper is not None:
        gap = (upper - theta) / scale
        certified = gap <= tol
        error = torch.where(certified, gap.clamp_min(0), error)
        done = done | certified
    error = torch.where(invariant, torch.zeros_like(error), error)
    return done | invariant, error


def _warn(method: str, converged: Tensor, error: Tensor, tol: float, max_iter: int, what: str) -> None:
    bad = ~converged
    if bool(bad.any()):
        worst = float(error[bad].max())
        warnings.warn(
            f"{method}: {int(bad.sum())} of {converged.numel()} {what} did not converge to tol={tol:g} "
            f"within max_iter={max_iter} (largest estimated relative error {worst:.2g}); their values "
            "are lower estimates, not accurate to tol. Raise max_iter, loosen tol, or give a "
            "certified upper bound.",
            NotConvergedWarning,
            stacklevel=3,
        )


class _Batch:
    """Bookkeeping of the problems still running; results land in full-size tensors.

    A problem whose stopping rule held is *retired*: stored, and dropped from the batch when the
    operator can be restricted. When it cannot, the problem keeps iterating with the others (a
    Rayleigh quotient only improves), and its flag and error estimate stay those of the first stop.
    """

    def __init__(self, op: LinearOperator) -> None:
        B = op.batch
        self.op = op
        self.active = torch.arange(B)
        self.error = torch.full((B,), math.inf, dtype=torch.float64)
        self.iterations = torch.zeros(B, dtype=torch.int64)
        self.residual = torch.full((B,), math.inf, dtype=torch.float64)
        self.converged = torch.zeros(B, dtype=torch.bool)
        self.vector = torch.zeros(B, op.n_in, dtype=op.dtype, device=op.device)
        self.history: list[Tensor] = []

    def record(self, theta: Tensor, rel_residual: Tensor, steps: int) -> None:
        row = torch.full((self.error.numel(),), math.nan, dtype=torch.float64)
        row[self.active] = theta.cpu()
        self.history.append(row)
        self.iterations[self.active] = steps
        self.residual[self.active] = rel_residual.cpu()

    def decide(self, done: Tensor, error: Tensor) -> Tensor:
        """Merge this step's decisions with earlier ones; returns the active problems' flags."""
        ids = self.active
        first = done.cpu() & ~self.converged[ids]
        self.error[ids] = torch.where(self.converged[ids], self.error[ids], error.cpu())
        self.converged[ids] |= first
        return self.converged[ids].to(done.device)

    def store(self, rows: Tensor, vectors: Tensor) -> None:
        """Store the final vectors of ``rows`` (positions in the active set)."""
        self.vector[self.active[rows.cpu()]] = vectors[rows]

    def retire(self, done: Tensor, vectors: Tensor) -> Tensor | None:
        """Store and drop the ``done`` problems when the operator can be restricted; returns the
        mask of the problems kept, or ``None`` when the batch stays as it is. ``vectors``: the
        final vectors of the ``done`` problems, in their order."""
        keep = ~done
        sub = self.op.restrict(torch.nonzero(keep).flatten().to(self.op.device))
        if sub is None:
            return None
        self.vector[self.active[done.cpu()]] = vectors
        self.active = self.active[keep.cpu()]
        self.op = sub
        return keep


# --------------------------------------------------------------------------------------------
# power iteration


def _power(op: LinearOperator, x: Tensor, tol: float, max_iter: int, upper: Tensor | None,
           noise: float = 0.0):  # fmt: skip
    state = _Batch(op)
    q, nrm = _normalise(x)
    if bool((nrm == 0).any()):
        raise ValueError("the starting vector is zero (for at least one problem)")
    # increments below _NOISE * eps (rounding, or the operator's own noise) are no progress
    eps = max(torch.finfo(q.dtype).eps, noise / _NOISE)
    hist = _History(eps)  # per active problem, re-indexed when the batch shrinks
    known = torch.zeros(len(q), dtype=torch.float64)  # verified lower bounds on lambda_max (0: none)
    verified_at = torch.zeros(len(q), dtype=torch.float64)  # theta at the last verification
    steps = 0
    while True:
        w = _apply_flat(state.op, q)
        steps += 1
        theta = _dot(q, w).cpu()
        res = torch.linalg.vector_norm(_wide(w - theta[:, None].to(w) * q), dim=1).cpu()
        hist.push(theta, res / theta.abs().clamp_min(1e-300))
        q_new, wn = _normalise(w)
        invariant = (wn <= 0).cpu()  # A v = 0: the top eigenvalue seen from v is 0
        # where the rules would stop with the best Ritz value known so far, verify first (once per
        # level of theta): a short Lanczos run from the power vector; a Ritz value well above theta
        # means the iteration sits inside a cluster of near-equal top eigenvalues it has not resolved
        optimistic = torch.where(known > 0, known, theta)
        would, _ = _decide(hist, tol, upper, invariant, optimistic)
        need = would & ~invariant & (theta > verified_at)
        if bool(need.any()) and steps + _VERIFY_STEPS <= max_iter:
            known = torch.maximum(known, _verify(state.op, q, need))
            verified_at = torch.where(need, theta, verified_at)
            steps += _VERIFY_STEPS
        state.record(theta, hist.rel[-1], steps)
        check = torch.where(verified_at > 0, known, torch.full_like(theta, math.inf))
        done = state.decide(*_decide(hist, tol, upper, invariant, check))
        if bool(done.all()) or steps >= max_iter:
            state.store(torch.arange(len(q)), q)
            return state, 0
        if bool(done.any()):
            keep = state.retire(done, q[done])
            if keep is not None:
                q_new, invariant, q = q_new[keep], invariant[keep], q[keep]
                known, verified_at = known[keep], verified_at[keep]
                hist.keep(keep)
                upper = None if upper is None else upper[keep]
        q = torch.where(invariant[:, None].to(q.device), q, q_new)


def _verify(op: LinearOperator, q: Tensor, rows: Tensor) -> Tensor:
    """The top Ritz value after ``_VERIFY_STEPS`` Lanczos steps from the power vectors ``q[rows]``
    (float64 (B,), 0 outside ``rows``). A Ritz value is a Rayleigh quotient: a lower bound on
    ``lambda_max``."""
    sub = op if bool(rows.all()) else op.restrict(torch.nonzero(rows).flatten().to(op.device))
    if sub is None:  # not restrictable: verify the whole batch
        sub, rows_run = op, torch.ones_like(rows)
    else:
        rows_run = rows
    st, _ = _lanczos(sub, q[rows_run.to(q.device)], 0.0, _VERIFY_STEPS, _VERIFY_STEPS + 1, None)
    out = torch.zeros(len(q), dtype=torch.float64)
    out[rows_run] = torch.stack(st.history).nan_to_num(0.0).amax(0)
    return torch.where(rows, out, torch.zeros_like(out))


# --------------------------------------------------------------------------------------------
# Lanczos with partial re-orthogonalisation


def _default_basis(n: int, itemsize: int, batch: int, max_iter: int) -> int:
    """Basis size that keeps the Krylov basis under ~1 GB."""
    fit = int(1e9 // max(1, n * itemsize * batch))
    return int(max(4, min(max_iter, 100, fit)))


def _omega_step(omega, omega_prev, alpha, beta, beta_j, j, noise):
    """Simon's recurrence for the loss of orthogonality of the next Lanczos vector.

    With ``omega[:, k] ~ q_j . q_k`` and ``omega_prev[:, k] ~ q_{j-1} . q_k`` (float64, ``(B, m+1)``)
    it returns the estimates of ``q_{j+1} . q_k``: for ``k < j`` from ``A``'s symmetry,
    ``beta_j w_{j+1,k} = beta_k w_{j,k+1} + (alpha_k - alpha_j) w_{j,k} + beta_{k-1} w_{j,k-1}
    - beta_{j-1} w_{j-1,k}`` plus a rounding term of size ``noise`` (``eps ||A||``, a number or one
    per problem) taken with the sign of the rest, so that it adds to the growth instead of averaging
    out (as in Larsen's PROPACK); ``w_{j+1,j} = noise / beta_j`` (the local pass leaves rounding only) and
    ``w_{j+1,j+1} = 1``. (H. D. Simon, *The Lanczos algorithm with partial reorthogonalization*,
    Math. Comp. 42, 1984.)
    """
    out = torch.zeros_like(omega)
    noise = torch.as_tensor(noise, dtype=torch.float64).reshape(-1, 1)  # one, or one per problem
    safe = beta_j.clamp_min(1e-300)[:, None]
    if j > 0:
        t = (
            beta[:, :j] * omega[:, 1 : j + 1]
            + (alpha[:, :j] - alpha[:, j : j + 1]) * omega[:, :j]
            - beta[:, j - 1 : j] * omega_prev[:, :j]
        )
        t[:, 1:] += beta[:, : j - 1] * omega[:, : j - 1]
        out[:, :j] = (t + torch.where(t >= 0, noise, -noise)) / safe
    out[:, j] = (noise / safe)[:, 0]
    out[:, j + 1] = 1.0
    # a problem that broke down (beta_j = 0) continues with zero vectors: nothing to lose
    return torch.where(beta_j[:, None] > 0, out, torch.zeros_like(out))


def _top_ritz_value(
    alpha: Tensor, beta: Tensor, k: int, mu: Tensor, s2: Tensor
) -> tuple[Tensor, Tensor]:
    """The top eigenvalue ``theta`` of the ``(B, k, k)`` Lanczos tridiagonals ``T_k`` (``k >= 2``)
    and ``s_k^2``, the squared last component of its unit eigenvector, given ``mu``, the top
    eigenvalue of ``T_{k-1}``, and ``s2``, its eigenvector's squared last component (the previous
    step's values), without an eigendecomposition.

    With ``T_{k-1} = U diag(mu_j) U^T`` and ``s_j`` the last row of ``U``, the eigenvalues of
    ``T_k`` above ``mu = max mu_j`` are the zeros of the last pivot of the ``LDL^T`` factorisation
    of ``T_k - lambda I``,

    ``f(lambda) = alpha_k - lambda - beta_{k-1}^2 sum_j s_j^2 / (mu_j - lambda)``,

    which on ``(mu, inf)`` falls from ``+inf`` to ``-inf``, convex, and has exactly one zero there:
    the top eigenvalue (Cauchy interlacing: ``mu <= theta``). ``f`` and ``f'`` come from the pivot
    recurrence ``d_i = alpha_i - lambda - beta_{i-1}^2 / d_{i-1}`` (all ``d_i < 0`` for ``i < k``
    above ``mu``: no pivoting, no growth). The zero is found by the rational Newton step of the
    secular-equation solvers (the model ``a - lambda + c / (lambda - mu)`` fitted to ``f`` and
    ``f'``, exact when one pole matters), started from the zero of ``f`` with the other poles
    dropped (the top eigenvalue of the ``2 x 2`` matrix ``[[mu, beta s], [beta s, alpha_k]]``: a
    lower bound, as the dropped terms are positive above ``mu``, and close once the iteration has
    converged), kept inside the bracket ``[mu, Gershgorin bound]``,
    bisecting when the model leaves it, until the step is at rounding level; a zero within a few
    ulps of ``mu`` is ``mu`` (near the pole ``f`` is rounding; a converged problem).

    ``s_k`` comes from the eigenvector itself (:func:`_last_component_sq`): not from
    ``-1 / f'(theta)``, which near ``mu`` (a converged problem) is rounding.

    ``torch.linalg.eigh`` on the ``(B, k, k)`` matrices (one LAPACK call per matrix) cost 20 ms
    per step for 1,250 problems at ``k = 17``; this is a few sweeps of ``k`` vector operations.
    """
    a = alpha[:, :k]
    b = beta[:, : k - 1]
    b2 = b * b
    eps = torch.finfo(torch.float64).eps
    radius = torch.zeros_like(a)
    radius[:, 1:] += b.abs()
    radius[:, :-1] += b.abs()
    lo = mu.clone()
    hi = torch.maximum((a + radius).amax(1), mu)
    # start: the 2 x 2 model's zero mu + t, t^2 - (alpha_k - mu) t - beta^2 s^2 = 0
    g0, c0 = a[:, -1] - mu, b2[:, -1] * s2
    root0 = torch.sqrt(g0 * g0 + 4.0 * c0)
    t0 = torch.where(g0 > 0, 0.5 * (g0 + root0), 2.0 * c0 / (root0 - g0).clamp_min(1e-300))
    # (or just above mu: where the zero is within rounding of mu, f is already negative there)
    probe = mu + 8 * eps * mu.abs().clamp_min(1e-300)
    x = torch.where((mu + t0 > probe) & (mu + t0 < hi), mu + t0, torch.minimum(probe, hi))
    # T_k decoupled (beta_{k-1} = 0): its top eigenvalue is max(mu, alpha_k)
    decoupled = b2[:, -1] == 0
    theta = torch.where(decoupled, torch.maximum(mu, a[:, -1]), x)
    done = decoupled.clone()
    tiny = 4 * eps * mu.abs().clamp_min(1e-300)  # a zero closer to mu than this is mu
    aT, b2T = a.T.contiguous(), b2.T.contiguous()  # the pivot recurrence reads rows
    for _ in range(100):
        if bool(done.all()):
            break
        d = aT[0] - x
        dp = torch.full_like(x, -1.0)
        for i in range(1, k):
            r = b2T[i - 1] / d
            dp = r * dp / d - 1.0
            d = aT[i] - x - r
        finite = torch.isfinite(d) & torch.isfinite(dp)
        right = finite & (d < 0)  # x above the zero
        lo = torch.where(right, lo, x)
        hi = torch.where(right, x, hi)
        # the model's zero mu + t, t > 0 the larger root of t^2 - g t - c = 0 (stable form)
        gap = (x - mu).clamp_min(1e-300)
        c = ((-1.0 - dp) * gap * gap).clamp_min(0.0)
        g = d + gap - c / gap
        root = torch.sqrt(g * g + 4.0 * c)
        t = torch.where(g > 0, 0.5 * (g + root), 2.0 * c / (root - g).clamp_min(1e-300))
        at_mu = finite & (t <= tiny)  # the zero is mu, to rounding
        model = mu + t
        scale = model.abs().clamp_min(1e-300)
        # converged: the model's zero is where we are (to rounding), or the bracket has closed
        # ... or, from the left of the zero (f > 0), a model that moves no further right: rounding;
        # or f < 0 already within a few ulps of mu: the zero is mu
        stalled = finite & ~right & (model <= x)
        near = right & (x - mu <= 16 * eps * mu.abs())
        step_done = finite & ((model - x).abs() <= 4 * eps * scale)
        closed = hi - lo <= 4 * eps * scale
        fin = ~done & (step_done | stalled | near | closed | (d == 0) | at_mu)
        value = torch.where(at_mu | closed | near, lo, model.clamp(lo, hi))
        value = torch.where((d == 0) | stalled, x, value)
        theta = torch.where(fin, value, theta)
        # next: from the right of the zero, Newton's step (f is convex: it lands left of the zero,
        # where the model converges from below); from the left, the model; bisection as the guard
        newton = x - d / dp
        step = torch.where(right & (newton > lo) & (newton < hi), newton, model)
        inside = finite & (step > lo) & (step < hi)
        new = torch.where(inside, step, 0.5 * (lo + hi))
        done = done | fin
        x = torch.where(done, x, new)
    else:
        raise RuntimeError("Lanczos: the top Ritz value did not converge in 100 bracketed steps")
    return theta, _last_component_sq(a, b, theta, decoupled & (a[:, -1] > mu), decoupled)


def _twisted(a: Tensor, b: Tensor, theta: Tensor, signs: bool = True) -> tuple[Tensor, Tensor | None]:
    """The eigenvectors of the tridiagonals ``(a, b)`` (``(B, k)``, ``(B, k - 1)``) at their
    eigenvalues ``theta`` (``(B,)``), as ``log |x_i|`` and ``sign(x_i)`` with ``x_r = 1``, by the
    twisted factorisation: the pivots of ``T - theta I`` from the top (``d``) and from the bottom
    (``e``), the twist ``r`` where ``|gamma_r| = |d_r + e_r - (a_r - theta)|`` is smallest (the
    component that the eigenvector cannot be small in), and the ratios ``x_i / x_{i+1} = -b_i /
    d_i`` above ``r``, ``x_i / x_{i-1} = -b_{i-1} / e_i`` below it, summed in logarithms (no
    overflow) (Dhillon & Parlett, *Multiple representations to compute orthogonal eigenvectors of
    symmetric tridiagonal matrices*, LAA 387, 2004). A zero ``b`` makes the components beyond it
    zero (``log |x| = -inf``). ``signs=False``: the logarithms only (the signs are ``None``)."""
    B, k = a.shape
    tiny = torch.finfo(torch.float64).tiny
    shift = a - theta[:, None]
    # the pivot recurrences run over rows of the transposed (k, B) arrays (contiguous rows)
    sT, b2T = shift.T.contiguous(), (b * b).T.contiguous()

    def nonzero(v: Tensor) -> Tensor:
        return torch.where(v != 0, v, torch.full_like(v, -tiny))

    dT = torch.empty_like(sT)
    eT = torch.empty_like(sT)
    dT[0] = sT[0]
    for i in range(1, k):
        torch.sub(sT[i], b2T[i - 1] / nonzero(dT[i - 1]), out=dT[i])
    eT[k - 1] = sT[k - 1]
    for i in range(k - 2, -1, -1):
        torch.sub(sT[i], b2T[i] / nonzero(eT[i + 1]), out=eT[i])
    d, e = dT.T, eT.T
    r = (d + e - shift).abs().argmin(1)  # (B,)
    dn, en = nonzero(d[:, :-1]), nonzero(e[:, 1:])
    zero_b = b == 0  # a zero beta: the components beyond it (from r) are 0
    cut = bool(zero_b.any())
    logb = torch.where(zero_b, torch.ones_like(b), b.abs()).log() if cut else b.abs().log()
    up = logb - dn.abs().log()  # log |x_i / x_{i+1}|, i = 0..k-2
    down = logb - en.abs().log()  # log |x_i / x_{i-1}|, i = 1..k-1
    zero_col = torch.zeros(B, 1, dtype=a.dtype)

    def above(t: Tensor) -> Tensor:  # [i] = sum_{j >= i} t_j, and 0 at k - 1
        return torch.cat([t.flip(1).cumsum(1).flip(1), zero_col], 1)

    def below(t: Tensor) -> Tensor:  # [i] = sum_{j <= i} t_j (t indexed 1..k-1), and 0 at 0
        return torch.cat([zero_col, t.cumsum(1)], 1)

    idx = torch.arange(k)[None, :]
    rr = r[:, None]

    def twist(U: Tensor, D: Tensor) -> Tensor:
        return torch.where(idx < rr, U - U.gather(1, rr), torch.where(idx > rr, D - D.gather(1, rr), 0.0))

    logx = twist(above(up), below(down))
    if cut:
        zb = zero_b.to(a.dtype)
        logx = torch.where(twist(above(zb), below(zb)) != 0, -math.inf, logx)
    if not signs:
        return logx, None
    neg_up = ((b > 0) == (dn > 0)).to(a.dtype)  # -b_i / d_i < 0
    neg_down = ((b > 0) == (en > 0)).to(a.dtype)
    negatives = twist(above(neg_up), below(neg_down))
    return logx, 1.0 - 2.0 * torch.remainder(negatives, 2.0)


def _tridiagonal_vector(a: Tensor, b: Tensor, theta: Tensor) -> Tensor:
    """The unit eigenvectors ``(B, k)`` of the tridiagonals ``(a, b)`` at their eigenvalues
    ``theta`` (:func:`_twisted`): for the Ritz vectors, without an eigendecomposition."""
    logx, sign = _twisted(a, b, theta)
    return sign * (logx - 0.5 * torch.logsumexp(2 * logx, 1, keepdim=True)).exp()


def _last_component_sq(a: Tensor, b: Tensor, theta: Tensor, one: Tensor, zero: Tensor) -> Tensor:
    """``s_k^2`` for the unit eigenvectors of the tridiagonals ``(a, b)`` at their eigenvalues
    ``theta`` (``(B,)``), from :func:`_twisted`. ``one`` and ``zero`` force the value where the
    caller knows it (a decoupled last row)."""
    logx, _ = _twisted(a, b, theta, signs=False)
    sk2 = (2 * logx[:, -1] - torch.logsumexp(2 * logx, 1)).exp()
    sk2 = torch.where(one, torch.ones_like(sk2), torch.where(zero, torch.zeros_like(sk2), sk2))
    return sk2.clamp(0.0, 1.0)


def _tridiagonal_top(alpha: Tensor, beta: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top eigenpair of the (B, k, k) tridiagonals: (theta (B,), eigenvector (B, k))."""
    T = torch.diag_embed(alpha[:, :k])
    if k > 1:
        off = beta[:, : k - 1]
        T = T + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    evals, evecs = torch.linalg.eigh(T)
    return evals[:, -1], evecs[:, :, -1]


class _Basis:
    """The Lanczos vectors of one cycle, stored as they were made: block ``i`` holds ``q_i`` of the
    problems running at step ``i``, compact, and ``rows[:, i]`` says where each problem still
    running finds its row in it. A step appends its vector without copying, and problems that
    converge leave without the others' vectors being moved (only ``rows`` shrinks)."""

    def __init__(self, q: Tensor, m: int) -> None:
        self.blocks = [q]
        # rows[:, i] for the blocks so far (columns beyond are filled as blocks arrive)
        self.rows = torch.empty(len(q), m, dtype=torch.long, device=q.device)
        self.rows[:, 0] = torch.arange(len(q), device=q.device)
        self.fresh = [True]  # block i's rows are exactly the running problems, in order

    def append(self, q: Tensor) -> None:
        self.rows[:, len(self.blocks)] = torch.arange(len(q), device=q.device)
        self.blocks.append(q)
        self.fresh.append(True)

    def keep(self, keep: Tensor) -> None:
        self.rows = self.rows[keep]
        self.fresh = [False] * len(self.blocks)

    def _block(self, i: int, sub: Tensor | None) -> Tensor:
        if sub is None:
            return self.blocks[i] if self.fresh[i] else self.blocks[i][self.rows[:, i]]
        return self.blocks[i][self.rows[sub, i]]

    def gather(self, k: int, sub: Tensor | None = None) -> Tensor:
        """The first ``k`` vectors of the running problems (or of their subset ``sub``): ``(B, k, n)``."""
        return torch.stack([self._block(i, sub) for i in range(k)], 1)

    def combine(self, s: Tensor, sub: Tensor | None = None) -> Tensor:
        """``sum_i s[:, i] q_i`` for the running problems (or ``sub``), ``s`` of shape ``(B, k)``."""
        out = self._block(0, sub) * s[:, :1]
        for i in range(1, s.shape[1]):
            out.addcmul_(self._block(i, sub), s[:, i : i + 1])
        return out


def _lanczos(op, x, tol, max_iter, max_basis, upper, noise=0.0):
    state = _Batch(op)
    nb, n = x.shape
    m = max_basis or _default_basis(n, x.element_size(), nb, max_iter)
    m = max(2, min(m, n + 1, max_iter + 1))
    eps = torch.finfo(x.dtype).eps
    q, nrm = _normalise(x)
    if bool((nrm == 0).any()):
        raise ValueError("the starting vector is zero (for at least one problem)")
    hist = _History(max(eps, noise / _NOISE))  # increments below noise * theta: no progress
    up = upper
    steps = 0
    # running estimate of each problem's ||A|| (the largest |alpha_j| + beta_j seen): per problem, so
    # that a batch mixing scales (1 and 1e10, as the resolvent norms of a pseudospectrum's grid)
    # does not make the small ones look like rounding noise
    anorm = torch.zeros(nb, dtype=torch.float64)
    reorths = 0
    while True:
        nb = q.shape[0]
        Q = _Basis(q, m)
        # q_j and q_{j-1} of the running problems: the three-term recurrence reads them at every
        # step, the whole basis Q only at re-orthogonalisations and Ritz vectors
        q_cur, q_prev = q, None
        alpha = torch.zeros(nb, m, dtype=torch.float64)
        beta = torch.zeros(nb, m, dtype=torch.float64)
        # omega[:, k] estimates q_j . q_k for the current j, omega_prev the same for j - 1
        omega = torch.zeros(nb, m + 1, dtype=torch.float64)
        omega[:, 0] = 1.0
        omega_prev = torch.zeros_like(omega)
        force = torch.zeros(nb, dtype=torch.bool)
        theta_prev = torch.zeros(nb, dtype=torch.float64)  # the top Ritz value of T_{j}
        sk2_prev = torch.ones(nb, dtype=torch.float64)  # and its eigenvector's last component^2
        j = 0
        while True:
            qj = q_cur
            w = _apply_flat(state.op, qj)
            steps += 1
            # the three-term recurrence (modified Gram-Schmidt form, fused in-place updates), then a
            # second local pass against q_j and q_{j-1} so that q_{j+1} . q_j stays at rounding level
            # (classical Gram-Schmidt on the two: both coefficients before either update)
            if j > 0:
                w.addcmul_(q_prev, beta[:, j - 1, None].to(w.dtype), value=-1)
            alpha[:, j] = _dot(qj, w)
            w.addcmul_(qj, alpha[:, j, None].to(w.dtype), value=-1)
            c_cur = _rowdot(qj, w)
            if j > 0:
                w.addcmul_(q_prev, _rowdot(q_prev, w)[:, None], value=-1)
            w.addcmul_(qj, c_cur[:, None], value=-1)
            alpha[:, j] += c_cur.real.double()
            wn = torch.linalg.vector_norm(w, dim=1).double()
            anorm = torch.maximum(anorm, alpha[:, j].abs() + wn)
            # partial re-orthogonalisation: estimate the loss of orthogonality of q_{j+1} to the basis
            # by Simon's recurrence; orthogonalise a problem's vector against its whole basis only
            # when its estimate exceeds sqrt(eps) (and at the step after), or when w is so small that
            # its direction is mostly rounding (breakdown check); the other problems are left alone
            omega_next = _omega_step(omega, omega_prev, alpha, beta, wn, j, eps * anorm)
            tiny = wn <= math.sqrt(eps) * anorm
            trigger = omega_next[:, : j + 1].abs().amax(1) > math.sqrt(eps)
            need = force | trigger | tiny
            if bool(need.any()):
                sub = torch.nonzero(need).flatten()
                Qs, ws = Q.gather(j + 1, sub), w[sub]
                for _ in range(2):  # classical Gram-Schmidt, repeated where it removed much (DGKS)
                    coef = torch.bmm(Qs.conj(), ws[:, :, None])
                    ws[:, None].baddbmm_(coef.transpose(1, 2), Qs, alpha=-1)
                    removed = torch.linalg.vector_norm(coef[:, :, 0], dim=1).double()
                    wns = torch.linalg.vector_norm(ws, dim=1).double()
                    if bool((wns**2 >= 0.49 * (wns**2 + removed**2)).all()):
                        break
                w[sub], wn[sub] = ws, wns
                omega_next[sub, : j + 1] = eps
                reorths += 1
            force = trigger & ~force  # the step after a triggered one is done too
            omega_prev, omega = omega, omega_next
            beta[:, j] = wn
            k = j + 1
            s = None  # T_k's top eigenvectors, when this step computed them
            if j == 0:
                theta, sk2 = alpha[:, 0].clone(), torch.ones_like(wn)
            elif len(wn) < _SECULAR_BATCH:  # a few problems: LAPACK per matrix is cheaper
                theta, s = _tridiagonal_top(alpha, beta, k)
                sk2 = s[:, -1] ** 2
            else:
                theta, sk2 = _top_ritz_value(alpha, beta, k, theta_prev, sk2_prev)
            theta_prev, sk2_prev = theta, sk2
            ritz_res = wn * sk2.sqrt()
            rel = ritz_res / theta.abs().clamp_min(1e-300)
            if j > 0 or not len(hist):  # a restart's first value repeats the last one: not a new step
                hist.push(theta, rel)
            state.record(theta, rel, steps)
            invariant = wn <= 10 * eps * alpha[:, :k].abs().amax(1).clamp_min(1e-300)
            if k >= n:  # the basis spans the whole space (without restarts): T holds the spectrum
                invariant = invariant | (steps == k)
            done = state.decide(*_decide(hist, tol, up, invariant, basis=m))
            stop = bool(done.all()) or steps >= max_iter
            if stop or j == m - 1:
                if s is None:
                    s = _tridiagonal_vector(alpha[:, :k], beta[:, : k - 1], theta)
                ritz, _ = _normalise(Q.combine(s.to(w.dtype)))
                if stop:
                    state.store(torch.arange(ritz.shape[0]), ritz)
                    return state, reorths
                q = ritz  # explicit restart from the Ritz vector
                break
            if bool(done.any()) and state.op.restrictable:
                # converged problems leave the batch (with their Ritz vectors); the others go on
                # with their Krylov bases
                dn = torch.nonzero(done).flatten()
                if s is None:
                    sd = _tridiagonal_vector(alpha[dn, :k], beta[dn, : k - 1], theta[dn])
                else:
                    sd = s[dn]
                ritz, _ = _normalise(Q.combine(sd.to(w.dtype), dn.to(w.device)))
                keep = state.retire(done, ritz)
                Q.keep(keep.to(w.device))
                alpha, beta = alpha[keep], beta[keep]
                omega, omega_prev = omega[keep], omega_prev[keep]
                w, wn, invariant = w[keep], wn[keep], invariant[keep]
                q_cur, q_prev = q_cur[keep], q_prev[keep] if q_prev is not None else None
                anorm, force = anorm[keep], force[keep]
                theta_prev, sk2_prev = theta_prev[keep], sk2_prev[keep]
                hist.keep(keep)
                up = None if up is None else up[keep]
            # breakdown for some problems: continue them with a zero vector (T decouples)
            scale_next = torch.where(invariant, torch.zeros_like(wn), 1 / wn.clamp_min(1e-300))
            q_prev, q_cur = q_cur, w.mul_(scale_next[:, None].to(w.dtype))
            Q.append(q_cur)
            j += 1


# --------------------------------------------------------------------------------------------
# public entry points


def _run(op, x, method, tol, max_iter, max_basis, upper, noise=0.0):
    if not (noise >= 0) or not math.isfinite(noise):
        raise ValueError(f"noise must be a finite number >= 0, got {noise}")
    up = None if upper is None else torch.as_tensor(upper, dtype=torch.float64).reshape(-1).expand(op.batch)
    if method == "lanczos":
        return _lanczos(op, x, tol, int(max_iter), max_basis, None if up is None else up.clone(), noise)
    return _power(op, x, tol, int(max_iter), None if up is None else up.clone(), noise)


def _rayleigh(op: LinearOperator, v: Tensor) -> tuple[Tensor, Tensor]:
    """Rayleigh quotients and relative residuals of unit rows ``v`` (float64)."""
    av = op.apply(v.reshape(op.batch, *op.in_shape)).reshape(op.batch, -1).to(v.dtype)
    lam = _dot(v, av)
    res = torch.linalg.vector_norm(_wide(av - lam[:, None].to(av.dtype) * v), dim=1)
    return lam, (res / lam.abs().clamp_min(1e-300)).cpu()


def top_eig(
    op: LinearOperator,
    v0: Tensor | None = None,
    *,
    method: str = "lanczos",
    tol: float = 1e-6,
    max_iter: int = 300,
    max_basis: int | None = None,
    upper: float | Tensor | None = None,
    generator: torch.Generator | None = None,
    warn: bool = True,
    noise: float = 0.0,
) -> EigResult:
    """Largest eigenvalue of each of a batch of self-adjoint operators (matrix-free).

    Parameters
    ----------
    op
        A :class:`LinearOperator` with ``in_shape == out_shape`` whose maps are self-adjoint
        (Hermitian); positive semi-definite for the value to be the operator norm.
    v0
        Starting vectors ``(batch, *in_shape)`` (any shape with that many entries), or ``None``
        for Gaussian ones drawn from ``generator`` (default: a fixed seed, so runs repeat).
    method
        ``"lanczos"`` (default) or ``"power"``.
    tol
        Relative accuracy requested for the eigenvalue (the stopping rule of the module docstring).
    max_iter
        Maximum applications of the operator per problem.
    max_basis
        Lanczos basis vectors kept before a restart (default ``min(max_iter, 100)``, at most about
        1 GB).
    upper
        Optional certified upper bounds on the top eigenvalues (a number or ``(batch,)``): rule 2.
    generator
        For the random start.
    warn
        Warn with :class:`NotConvergedWarning` when a problem stops at ``max_iter`` unconverged.
    noise
        The relative accuracy of the operator's products when they are inexact (e.g. each one
        contains an iterative solve to a tolerance): increments of the estimate below
        ``noise * |theta|`` count as no progress, as rounding does. Default 0 (exact products).

    Returns
    -------
    EigResult
        Lower estimates with their vectors, iteration counts, residuals, error estimates and
        convergence flags, one per problem.
    """
    _check_args(method, tol, max_iter)
    if op.in_shape != op.out_shape:
        raise ValueError(f"top_eig needs a square operator, got {op.in_shape} -> {op.out_shape}")
    x = _start(op, v0, generator)
    state, reorths = _run(op, x, method, tol, max_iter, max_basis, upper, noise)
    vec = state.vector
    lam, res = _rayleigh(op, vec)
    if warn:
        _warn(method, state.converged, state.error, tol, max_iter, "problems")
    return EigResult(
        value=lam.cpu(), vector=vec.reshape(op.batch, *op.in_shape), iterations=state.iterations,
        residual=res, error=state.error, converged=state.converged, history=torch.stack(state.history),
        method=method, tol=tol, reorthogonalised=reorths,
    )  # fmt: skip


def top_singular(
    op: LinearOperator,
    v0: Tensor | None = None,
    *,
    method: str = "lanczos",
    tol: float = 1e-6,
    max_iter: int = 300,
    max_basis: int | None = None,
    upper: float | Tensor | None = None,
    side: str = "auto",
    check: LinearOperator | None = None,
    generator: torch.Generator | None = None,
    warn: bool = True,
    noise: float = 0.0,
) -> SingularResult:
    """Largest singular value of each of a batch of linear maps (matrix-free).

    Runs :func:`top_eig` on the Gram operator of the smaller side and evaluates
    ``sigma = ||A v||`` for the final unit right vector ``v`` (``sigma = ||A^H u||`` for the unit left
    vector ``u`` when iterating on ``A A^H``): the norm of ``A`` on one unit vector, hence never
    above ``sigma_max`` (up to the rounding of that evaluation). One product with ``A`` (or ``A^H``)
    beyond the iteration.

    Parameters
    ----------
    op
        A :class:`LinearOperator` with ``matvec`` and ``rmatvec``.
    v0
        Starting vectors in the space iterated on (``in_shape`` for ``side="input"``,
        ``out_shape`` for ``"output"``), or ``None`` for Gaussian ones.
    method, tol, max_iter, max_basis, generator, warn, noise
        As in :func:`top_eig`; ``tol`` is the relative accuracy of ``sigma`` (the eigen-iteration
        on the Gram operator runs with ``2 tol``).
    upper
        Optional certified upper bounds on ``sigma_max`` (a number or ``(batch,)``).
    side
        ``"input"`` (``A^H A``), ``"output"`` (``A A^H``) or ``"auto"``: the smaller space (the
        output space on a tie).
    check
        Optional operator for the final evaluation of ``sigma`` and the vectors (e.g. the same map
        in float64 while the iterations run in float32).

    Returns
    -------
    SingularResult
    """
    _check_args(method, tol, max_iter)
    if side == "auto":
        side = "output" if op.n_out <= op.n_in else "input"
    if side not in ("input", "output"):
        raise ValueError(f"side must be 'auto', 'input' or 'output', got {side!r}")
    gram = op.gram(side)
    x = _start(gram, v0, generator)
    up2 = None if upper is None else torch.as_tensor(upper, dtype=torch.float64) ** 2
    state, reorths = _run(gram, x, method, 2 * tol, max_iter, max_basis, up2, noise)
    vec = state.vector.reshape(op.batch, -1)
    if side == "input":  # sigma = ||A v||, with the more accurate operator when one is given
        final = check if check is not None else op
        v, _ = _normalise(vec.to(final.dtype))
        av = final.apply(v.reshape(op.batch, *op.in_shape)).reshape(op.batch, -1)
        sigma = torch.linalg.vector_norm(av, dim=1).double()
        left = av / sigma.clamp_min(1e-300)[:, None].to(av.dtype)
    else:  # sigma = ||A^H u||, and v = A^H u / sigma
        final = check if check is not None and check.rmatvec is not None else op
        u, _ = _normalise(vec.to(final.dtype))
        ahu = final.apply_adjoint(u.reshape(op.batch, *op.out_shape)).reshape(op.batch, -1)
        sigma = torch.linalg.vector_norm(ahu, dim=1).double()
        v, left = ahu / sigma.clamp_min(1e-300)[:, None].to(ahu.dtype), u
    res = state.residual
    hist = torch.stack(state.history).clamp_min(0).sqrt()
    if warn:
        _warn(method, state.converged, state.error / 2, tol, max_iter, "singular values")
    return SingularResult(
        value=sigma.cpu(), right=v.reshape(op.batch, *op.in_shape),
        left=left.reshape(op.batch, *op.out_shape), iterations=state.iterations, residual=res,
        error=state.error / 2, converged=state.converged, history=hist, method=method, tol=tol,
        side=side, reorthogonalised=reorths,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# linear solves (scipy's MINRES and LSQR on a matrix-free operator)


def to_scipy(op: LinearOperator, *, hermitian: bool = False) -> Any:
    """A ``scipy.sparse.linalg.LinearOperator`` (float64) applying the single real map of ``op``.

    Parameters
    ----------
    op
        A :class:`LinearOperator` with ``batch == 1`` and a real dtype; vectors go to its device
        and dtype and come back as float64 NumPy arrays (``op.in_shape`` and ``op.out_shape`` are
        flattened).
    hermitian
        Use ``matvec`` as the adjoint too (for a self-adjoint ``op`` without ``rmatvec``).

    Example
    -------
    >>> A = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 1.0]], dtype=torch.float64)
    >>> S = to_scipy(LinearOperator.from_matrix(A))
    >>> S.shape, S.matvec(np.ones(2)).tolist(), S.rmatvec(np.ones(3)).tolist()
    ((3, 2), [3.0, 3.0, 2.0], [3.0, 5.0])
    """
    import scipy.sparse.linalg as sla

    if op.batch != 1:
        raise ValueError(f"to_scipy needs a single operator (batch 1), got batch {op.batch}")
    if op.dtype.is_complex:
        raise ValueError("to_scipy handles real operators only")
    if hermitian and op.in_shape != op.out_shape:
        raise ValueError(f"a Hermitian operator must be square, got {op.in_shape} -> {op.out_shape}")

    def wrap(apply, shape):
        def f(v):
            t = torch.as_tensor(np.ascontiguousarray(v, dtype=np.float64).reshape(-1))
            out = apply(t.to(device=op.device, dtype=op.dtype).reshape(1, *shape))
            return out.reshape(-1).to(torch.float64).cpu().numpy()

        return f

    matvec = wrap(op.apply, op.in_shape)
    if hermitian:
        rmatvec = matvec
    elif op.rmatvec is not None:
        rmatvec = wrap(op.apply_adjoint, op.out_shape)
    else:
        rmatvec = None
    return sla.LinearOperator((op.n_out, op.n_in), matvec=matvec, rmatvec=rmatvec, dtype=np.float64)


def _verdict(r, ahr, bnorm: float, ahb_norm: float, tol: float) -> tuple[float, float, str]:
    """(residual, normal_residual, status) of the residual ``r = A x - b`` (module docstring)."""
    rnorm = float(np.linalg.norm(r))
    residual = rnorm / bnorm if bnorm > 0 else 0.0
    normal = float(np.linalg.norm(ahr)) / ahb_norm if ahb_norm > 0 else 0.0
    if residual <= tol:
        return residual, normal, "solution"
    if normal <= tol:
        return residual, normal, "least-squares"
    return residual, normal, "not converged"


@dataclass(frozen=True)
class SolveResult:
    """The outcome of :func:`solve`.

    Attributes
    ----------
    x
        The solution, shape ``in_shape`` (in the operator's dtype and device).
    residual
        ``||A x - b|| / ||b||``, recomputed after the solve (0 for ``b = 0``).
    normal_residual
        ``||A^H (A x - b)|| / ||A^H b||``, recomputed (0 when ``A^H b = 0``): how far ``x`` is from a
        least-squares solution.
    converged
        ``residual <= tol`` or ``normal_residual <= tol``.
    status
        ``"solution"`` (``residual <= tol``), ``"least-squares"`` (only ``normal_residual <= tol``:
        ``b`` is not in the range of ``A`` to this accuracy) or ``"not converged"``.
    iterations
        Iterations of the solver.
    products
        Applications of ``A`` and ``A^H`` in all (the solver's and the two checks').
    method, tol
        The solver and the tolerance it was given.
    """

    x: Tensor
    residual: float
    normal_residual: float
    converged: bool
    status: str
    iterations: int
    products: int
    method: str
    tol: float


def solve(
    op: LinearOperator,
    b: Tensor,
    *,
    method: str = "minres",
    tol: float = 1e-8,
    max_iter: int | None = None,
    hermitian: bool = False,
    warn: bool = True,
) -> SolveResult:
    """Solve ``A x = b`` (or ``min ||A x - b||``) matrix-free with scipy's MINRES or LSQR from ``x0 = 0``.

    Parameters
    ----------
    op
        A real :class:`LinearOperator` with ``batch == 1``. MINRES needs it square and self-adjoint
        (not checked: a non-symmetric operator gives a wrong answer that the recomputed residuals
        then report); LSQR needs ``rmatvec``, or ``hermitian=True``.
    b
        The right-hand side, ``out_shape`` (any shape with that many entries).
    method
        ``"minres"`` (one product per iteration; minimum-norm when ``b`` is in the range) or
        ``"lsqr"`` (two products per iteration; the minimum-norm least-squares solution for any
        ``b``).
    tol
        Passed to scipy (MINRES ``rtol``; LSQR ``atol = btol``; LSQR's condition limit is off) and
        used for the convergence verdict on the recomputed residuals (module docstring).
    max_iter
        Iteration limit (default: scipy's, ``5 n`` for MINRES and ``2 n`` for LSQR).
    hermitian
        The operator is self-adjoint: its ``matvec`` serves as the adjoint.
    warn
        Warn with :class:`NotConvergedWarning` when the solve did not converge.

    Returns
    -------
    SolveResult
    """
    import scipy.sparse.linalg as sla

    if method not in SOLVERS:
        raise ValueError(f"method must be one of {SOLVERS}, got {method!r}")
    if not (tol > 0) or not math.isfinite(tol):
        raise ValueError(f"need a finite tol > 0, got {tol}")
    if max_iter is not None and int(max_iter) < 1:
        raise ValueError(f"need max_iter >= 1, got {max_iter}")
    if method == "minres":
        if op.in_shape != op.out_shape:
            raise ValueError(
                f"MINRES needs a square self-adjoint operator, got {op.in_shape} -> {op.out_shape}"
            )
        hermitian = True
    check_finite_tensor(b, "the right-hand side b")
    if b.numel() != op.n_out:
        raise ValueError(
            f"b must hold {op.n_out} values (out_shape {op.out_shape}), got shape {tuple(b.shape)}"
        )
    S = to_scipy(op, hermitian=hermitian)
    if S.rmatvec is None:
        raise ValueError("LSQR needs the adjoint: give the operator an rmatvec, or hermitian=True")
    count = [0]
    mv, rmv = S.matvec, S.rmatvec

    def counted(f):
        def g(v):
            count[0] += 1
            return f(v)

        return g

    A = sla.LinearOperator(S.shape, matvec=counted(mv), rmatvec=counted(rmv), dtype=np.float64)
    rhs = b.reshape(-1).to(torch.float64).cpu().numpy()
    bnorm = float(np.linalg.norm(rhs))
    ahb = rmv(rhs) if bnorm > 0 else np.zeros(op.n_in)
    ahb_norm = float(np.linalg.norm(ahb))
    count[0] += 1
    x = np.zeros(op.n_in)
    r = -rhs
    limit = max_iter if max_iter is not None else (5 if method == "minres" else 2) * op.n_in
    iterations, residual, normal, status = 0, 0.0, 0.0, "solution"
    for _restart in range(_MAX_RESTARTS + 1):
        residual, normal, status = _verdict(r, rmv(r), bnorm, ahb_norm, tol)
        count[0] += 1
        if status != "not converged" or iterations >= limit:
            break
        # scipy's own tests are relative to its estimates of ||A|| ||x||; when they stop short of
        # ours, solve again for the correction (from 0: the iterates stay in the same Krylov range)
        budget = limit - iterations
        if method == "minres":
            its = [0]

            def callback(_xk, its=its):
                its[0] += 1

            d, _info = sla.minres(A, -r, rtol=tol, maxiter=budget, callback=callback)
            iterations += its[0]
        else:
            out = sla.lsqr(A, -r, atol=tol, btol=tol, conlim=0.0, iter_lim=budget)
            d = out[0]
            iterations += int(out[2])
        x = x + d
        r = mv(x) - rhs
        count[0] += 1
    converged = status != "not converged"
    if warn and not converged:
        warnings.warn(
            f"{method}: the solve did not converge to tol={tol:g} in {iterations} iterations "
            f"(relative residual {residual:.2g}, normal-equations residual {normal:.2g}). Raise "
            "max_iter or loosen tol.",
            NotConvergedWarning,
            stacklevel=2,
        )
    xt = torch.from_numpy(np.asarray(x, dtype=np.float64)).to(device=op.device, dtype=op.dtype)
    return SolveResult(
        x=xt.reshape(op.in_shape), residual=residual, normal_residual=normal, converged=converged,
        status=status, iterations=iterations, products=count[0], method=method, tol=tol,
    )  # fmt: skip

r"""Pseudospectra of a square matrix: resolvent norms on a grid, and the scalars read from them.

The epsilon-pseudospectrum of ``A`` (Trefethen & Embree, *Spectra and Pseudospectra*, Princeton
University Press, 2005, chapter 2) is

``sigma_eps(A) = {z : sigma_min(zI - A) < eps} = {z : ||(zI - A)^-1|| > 1/eps}
= union of sigma(A + E) over ||E|| < eps``

(open sets, the book's convention; ``||(zI - A)^-1|| = inf`` on the spectrum). Norm: the 2-norm
(spectral norm) throughout. Input: a real or complex square matrix (torch tensor or NumPy array);
it is used in float64 / complex128.

How ``sigma_min(zI - A)`` is computed on many points (:func:`sigma_min_grid`, :func:`sigma_min_at`)
    EigTool's method (T. G. Wright, EigTool, 2002; L. N. Trefethen, *Computation of pseudospectra*,
    Acta Numerica 8, 1999): one Schur decomposition ``A = Q T Q^H`` (unitary, so
    ``sigma_min(zI - A) = sigma_min(zI - T)``; for a real ``A`` the real Schur form, whose
    quasi-triangular ``T`` keeps the solves' matrix products in real arithmetic, half the work of
    complex ones), then per point the largest eigenvalue
    ``1 / sigma_min^2`` of ``(zI - T)^-1 (zI - T)^-H`` by Lanczos
    (:func:`sensitivity_lib.krylov.top_eig`), each product being two triangular solves: ``O(n^2)``
    per point and iteration instead of the ``O(n^3)`` of a dense SVD. Here the grid points are
    *batched*: one :class:`~sensitivity_lib.krylov.LinearOperator` holds up to a few thousand points,
    whose triangular solves share ``T``'s off-diagonal blocks (a recursive block substitution in
    which everything above the 16x16 diagonal blocks is one matrix product for all points), and
    points leave the batch as they converge. The substitution is precompiled, per batch, into a
    list of in-place operations on views of one buffer (no slicing at run time: a solve pair for a
    handful of points costs 1.4 ms, down from 7.4 ms). A point-by-point Python loop would be only
    about twice as fast as dense SVDs (the interpreter eats the gain). One further saving, exact: for a real
    ``A`` the portrait is symmetric about the real axis (``sigma_min(conj(z) I - A) =
    sigma_min(zI - A)``), so a grid symmetric in ``im`` is computed on its upper half only (as EigTool
    does).

    The Krylov basis holds up to 128 vectors before a restart: measured on a normal 64x64 matrix
    with eigenvalues evenly spaced in ``[-0.9, 0.9]``, on a 161x161 grid of ``[-1.6, 1.6]^2``, where
    far from the spectrum the inverse Gram's eigenvalues ``1 / |z - lambda_i|^2`` crowd together,
    restarts every 40 (or 48) vectors left 1,348 (870) points unconverged after 300 steps.

    :func:`sigma_min_grid` computes its grid coarse to fine: every second point of every second
    row first, from random vectors, then the others, each from the top vector of its nearest
    computed point plus a random part of 30% of its size (continuation, as in EigTool; the
    singular vectors vary smoothly with ``z`` away from crossings). On the benchmark's 200x200
    random matrix that cut the steps per point from 16.9 to 14.9 and the time by about 15%. The
    random part is what keeps it safe: on the normal matrix above, where a neighbour's vector is an
    exact eigenvector of the wrong eigenvalue wherever the nearest eigenvalue changes, an earlier
    version with 1% noise and no coarse pass made two points stop on a lower eigenvalue and report
    a value 1.8e-4 too high as converged (without any random part a test on a 32x32 such matrix
    fails); with 30% every point converged and matched ``min_i |z - lambda_i|`` to 9.3e-13, as
    with cold random starts. :func:`sigma_min_at` (any points) starts every point from its own
    random vector.

    The value returned is ``1 / sqrt(theta)`` for a Ritz value ``theta <= 1 / sigma_min^2``, so it is
    never *below* ``sigma_min`` (up to rounding): ``kind="upper"``. ``tol`` is the Lanczos stopping
    rule's relative tolerance on ``1 / sigma_min^2``; against dense SVDs the values agree to 1e-8
    relative or better at the default ``tol=1e-9`` (tests). ``method="svd"`` is the dense reference:
    one ``svdvals(zI - A)`` per point (``kind="exact"``, up to rounding).

Round-off
    In float64, ``sigma_min(zI - A)`` is determined only down to about ``eps ||A||``: rounding ``A``'s
    entries, or the Schur factorisation (exact for a perturbation of ``A`` of that size), moves it by
    that much, and a dense SVD of a general matrix returns rounding noise of that size (a bidiagonal
    one such as ``zI - J`` for a Jordan block is an exception: LAPACK resolves its tiny singular
    values to high relative accuracy). Deep inside a pseudospectrum of a strongly non-normal matrix the true
    value is far smaller (a 64x64 Jordan block has ``sigma_min(zI - J) ~ |z|^64``: 1e-109 at ``|z| =
    0.02``), and the inverse Gram operator's values, ``1 / sigma_min^2``, overflow float64. Points
    where one pair of triangular solves already proves ``sigma_min < eps ||A||_F`` (the *floor*) are
    therefore reported as the floor, an upper bound like every Lanczos value, and flagged in
    ``extra["below_floor"]``; so is a Ritz value that lands below it. Contours drawn below the floor
    would be contours of rounding.

Threads
    Complex dense SVDs ran about 600x slower with two BLAS threads than with one on a 2-core machine
    (OpenBLAS and MKL both oversubscribe a shared machine badly on these mid-size problems). Every
    dense factorisation here (Schur, SVD, eigenvalues) and the batched solves run inside
    :func:`pinned_threads` (one thread by default, for torch and for the BLAS libraries NumPy and
    SciPy load, through threadpoolctl); the caller's settings are restored afterwards.

Scalars
    :func:`pseudospectral_radius`, :func:`pseudospectral_abscissa` (lower estimates from an explicit
    search), :func:`kreiss_constant` (discrete time: ``sup_{|z|>1} (|z| - 1) ||(zI - A)^-1||``, a lower
    estimate), :func:`henrici_departure`, :func:`commutator_departure`,
    :func:`eigenvector_condition`, :func:`transient_growth` (``max_k ||A^k||``), and
    :func:`worst_case_perturbation` (the smallest ``E`` that makes a given ``z`` an eigenvalue of
    ``A + E``). :func:`plot_pseudospectrum` draws the ``log10(eps)`` contours with the eigenvalues
    and the unit circle.

Example
-------
>>> import torch
>>> A = torch.diag(torch.tensor([0.5, -0.5], dtype=torch.float64))   # normal
>>> s = sigma_min_grid(A, [0.0, 1.0], [0.0, 0.25]).value
>>> s.shape
torch.Size([2, 2])
>>> [[round(v, 6) for v in row] for row in s.tolist()]    # min |z - lambda|
[[0.5, 0.5], [0.559017, 0.559017]]
>>> J = torch.diag(torch.ones(3, dtype=torch.float64), 1)    # a 4x4 Jordan block at 0
>>> float(henrici_departure(J).value)
1.7320508075688772
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from sensitivity_lib.krylov import LinearOperator, top_eig
from sensitivity_lib.results import Estimate

__all__ = [
    "pinned_threads",
    "schur_form",
    "inverse_gram_operator",
    "sigma_min_grid",
    "sigma_min_at",
    "pseudospectral_radius",
    "pseudospectral_abscissa",
    "kreiss_constant",
    "henrici_departure",
    "commutator_departure",
    "eigenvector_condition",
    "transient_growth",
    "worst_case_perturbation",
    "WorstPerturbation",
    "plot_pseudospectrum",
    "METHODS",
]

METHODS: tuple[str, ...] = ("lanczos", "svd")
_LEAF = 16  # diagonal blocks solved by substitution; everything above them is matrix products
_BASIS_BYTES = 2e9  # Krylov basis memory per batch of points if every point ran to a restart
# (vectors are stored as made: on the benchmark's grid the whole run peaked 0.7 GB above start)
_MAX_BASIS = 128  # Lanczos vectors kept before a restart
_WARM_NOISE = 0.3  # the random part of a start from a neighbour's vector, relative
_COARSE = 2  # sigma_min_grid: the first pass computes every _COARSE-th point (a power of 2)


# --------------------------------------------------------------------------------------------
# threads and input


@contextmanager
def pinned_threads(n: int = 1) -> Iterator[None]:
    """Run the block with ``n`` threads in torch and in the BLAS/OpenMP libraries NumPy and SciPy
    load (threadpoolctl); restore the previous settings afterwards.

    Complex dense SVDs of 200x200 matrices ran 20 to 600 times slower with two threads than with one
    on a shared 2-core machine (the threads fight for the cores); pin the threads around every dense
    factorisation of this size.

    Example
    -------
    >>> before = torch.get_num_threads()
    >>> with pinned_threads(1):
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
    """
    from threadpoolctl import threadpool_limits

    if int(n) < 1:
        raise ValueError(f"need at least one thread, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        with threadpool_limits(limits=int(n)):
            yield
    finally:
        torch.set_num_threads(before)


def _matrix(A, what: str = "A") -> torch.Tensor:
    """``A`` as a float64 or complex128 torch tensor; square and finite."""
    if isinstance(A, np.ndarray):
        A = torch.from_numpy(np.asarray(A))
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor or a NumPy array, got {type(A).__name__}")
    if A.dim() != 2 or A.shape[0] != A.shape[1] or A.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty square matrix, got shape {tuple(A.shape)}")
    if not (A.is_floating_point() or A.is_complex()):
        A = A.double()
    A = A.detach().cpu().to(torch.complex128 if A.is_complex() else torch.float64)
    if not bool(torch.isfinite(A).all()):
        raise ValueError(f"{what} has non-finite entries (NaN or infinity)")
    return A


def _is_real(A: torch.Tensor) -> bool:
    return not A.is_complex() or bool((A.imag == 0).all())


def schur_form(A, *, real: bool = False, threads: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The Schur form ``A = Q T Q^H``: ``(T, Q)`` (SciPy's LAPACK ``gees``, in ``threads`` threads).

    By default the complex form: complex128, ``T`` upper triangular with the eigenvalues on its
    diagonal, ``Q`` unitary. With ``real=True`` and a real ``A``, the real form: float64, ``T``
    quasi-upper-triangular (a ``2 x 2`` diagonal block per complex conjugate pair of eigenvalues)
    and ``Q`` orthogonal; this is what :func:`sigma_min_at` and :func:`sigma_min_grid` factor a
    real matrix with (real arithmetic in their solves).

    Example
    -------
    >>> T, Q = schur_form(torch.tensor([[0.0, -1.0], [1.0, 0.0]]))
    >>> sorted(round(v.imag, 12) for v in T.diagonal().tolist())
    [-1.0, 1.0]
    >>> T, Q = schur_form(torch.tensor([[0.0, -1.0], [1.0, 0.0]]), real=True)
    >>> T.dtype, bool(T[1, 0] != 0)   # one 2 x 2 block
    (torch.float64, True)
    """
    import scipy.linalg

    M = _matrix(A)
    if real:
        if not _is_real(M):
            raise ValueError("real=True needs a real matrix; use the complex Schur form (real=False)")
        with pinned_threads(threads):
            T, Q = scipy.linalg.schur(M.real.numpy().astype(np.float64), output="real")
        return torch.from_numpy(np.ascontiguousarray(T)), torch.from_numpy(np.ascontiguousarray(Q))
    with pinned_threads(threads):
        T, Q = scipy.linalg.schur(M.numpy().astype(np.complex128), output="complex")
    return torch.from_numpy(np.triu(T)), torch.from_numpy(Q)


# --------------------------------------------------------------------------------------------
# batched triangular solves with zI - T


def _transpose_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[:] = src.T`` for 2-D tensors, in bands of 16 rows of ``src`` when they are large
    (a band's transpose stays in cache: 2.5x faster than one strided copy at 200 x 3750)."""
    if src.numel() < 1 << 15:
        dst.copy_(src.T)
        return
    for s in range(0, src.shape[0], 16):
        dst[:, s : s + 16].copy_(src[s : s + 16].T)


def _run_steps(steps: list[tuple]) -> None:
    """Run the in-place operations of :meth:`_ShiftedTriangular._steps`: ``y <- d0 y`` for a
    ``1 x 1`` block, ``y <- d0 y + d1 flip(y)`` for a ``2 x 2`` one, ``out += M x`` for a coupling."""
    for kind, a, b, c in steps:
        if kind == 2:
            a.addmm_(b, c)
        elif kind == 1:
            other = a.flip(0)  # a copy: the block's rows swapped
            a.mul_(b).addcmul_(c, other)
        else:
            a.mul_(b)


class _ShiftedTriangular:
    """``(zI - T)^-1`` and ``(zI - T)^-H`` for a batch of shifts ``z`` and one Schur factor ``T``:
    complex upper triangular, or real quasi-upper-triangular (the real Schur form of a real matrix,
    with ``2 x 2`` diagonal blocks for its complex conjugate eigenvalue pairs).

    Vectors are columns of an ``(n, B)`` complex array, one column per shift. The substitution is
    recursive: for ``T = [[T11, T12], [0, T22]]`` the upper solve is ``x2 = solve(T22 part)``, then
    ``x1 = solve(T11 part, y1 + T12 x2)``: the coupling ``T12 x2`` is one matrix product for all
    shifts (``T12`` does not depend on ``z``). For a real ``T`` that product runs in real
    arithmetic on the real view of the complex vectors (``(n, 2B)``), half the work of a complex
    one: for a real ``A`` the real Schur form made the solves about a third faster than the complex
    one. Diagonal blocks of at most ``_LEAF`` rows are solved block row by block row, the only place
    where ``z`` enters: ``(z - T_ii)^-1``, or the inverse of a ``2 x 2`` block ``z I - T_II``.
    """

    def __init__(self, T: torch.Tensor) -> None:
        self.T = T
        self.n = T.shape[0]
        self.real = not T.is_complex()
        sub = T.diagonal(-1) if self.n > 1 else T.new_zeros(0)
        if self.real:
            # 2 x 2 blocks where the subdiagonal is non-zero (LAPACK's standardised real Schur form)
            starts, i = [], 0
            while i < self.n:
                size = 2 if i + 1 < self.n and sub[i] != 0 else 1
                starts.append((i, size))
                i += size
        else:
            starts = [(i, 1) for i in range(self.n)]
        self.blocks = starts
        self.block_of = {b0: size for b0, size in starts}
        # the 2 x 2 blocks' first rows and entries [[a, b], [c, d]], for the vectorised inverses
        self.pairs = torch.tensor([b0 for b0, size in starts if size == 2], dtype=torch.long)
        p = self.pairs
        self.pair_entries = (T[p, p], T[p, p + 1], T[p + 1, p], T[p + 1, p + 1])
        self.diag = T.diagonal().clone()
        self.eigenvalues = self._eigenvalues()
        self.tree = self._build(0, self.n)
        # below this, sigma_min(zI - A) is not determined by float64 data: the Schur factorisation
        # alone is exact only for a perturbation of A of about this size (backward stability)
        self.floor = float(torch.finfo(torch.float64).eps * torch.linalg.matrix_norm(T))

    def _eigenvalues(self) -> torch.Tensor:
        lam = self.diag.to(torch.complex128).clone()
        for b0, a, b, c, d in zip(self.pairs.tolist(), *self.pair_entries, strict=True):
            mid = complex(a + d) / 2
            root = complex((a - d) ** 2 / 4 + b * c) ** 0.5
            lam[b0], lam[b0 + 1] = mid + root, mid - root
        return lam

    def _split(self, lo: int, hi: int) -> int:
        mid = (lo + hi) // 2
        if mid not in self.block_of:  # never split a 2 x 2 block
            mid += 1
        return mid

    def _build(self, lo: int, hi: int):
        if hi - lo <= _LEAF:
            blocks = [(b0 - lo, size) for b0, size in self.blocks if lo <= b0 < hi]
            blk = self.T[lo:hi, lo:hi]
            cols = [blk[:b0, b0 : b0 + size].clone() for b0, size in blocks]  # above each block
            rows = [blk[:b0, b0 : b0 + size].mH.contiguous() for b0, size in blocks]  # for T^H
            return ("leaf", lo, hi, blocks, cols, rows)
        mid = self._split(lo, hi)
        T12 = self.T[lo:mid, mid:hi]
        return ("node", mid - lo, self._build(lo, mid), self._build(mid, hi), T12.contiguous(),
                T12.mH.contiguous())  # fmt: skip

    def inverse_diagonal(self, z: torch.Tensor) -> torch.Tensor:
        """The inverses of the diagonal blocks of ``z_b I - T`` as ``(2, n, B)``: row ``i`` of
        ``x = (zI - T)_II^-1 y`` is ``x_i = D[0, i] y_i + D[1, i] y_p`` with ``p`` the other row of
        ``i``'s ``2 x 2`` block (``D[1, i] = 0`` for a ``1 x 1`` block)."""
        out = torch.zeros(2, self.n, len(z), dtype=torch.complex128)
        out[0] = 1.0 / (z[None, :] - self.diag[:, None])
        if len(self.pairs):
            p = self.pairs
            a, b, c, d = (e[:, None] for e in self.pair_entries)
            zd, za = z[None, :] - d, z[None, :] - a
            rdet = 1.0 / (za * zd - b * c)
            # [[z - a, -b], [-c, z - d]]^-1 = [[z - d, b], [c, z - a]] / det
            out[0, p], out[1, p] = zd * rdet, b * rdet
            out[0, p + 1], out[1, p + 1] = za * rdet, c * rdet
        return out

    def _adjoint_diagonal(self, dinv: torch.Tensor) -> torch.Tensor:
        """The same data for the blocks' conjugate transposes (``(zI - T)^-H``)."""
        out = dinv.conj().resolve_conj()  # a copy (conj() alone is a view of dinv)
        if len(self.pairs):  # the off-diagonal entries swap
            p = self.pairs
            out[1, p], out[1, p + 1] = out[1, p + 1], out[1, p]
        return out

    def diagonal(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both diagonal data of the points ``z``: :meth:`inverse_diagonal` and its adjoint's."""
        dinv = self.inverse_diagonal(z)
        return dinv, self._adjoint_diagonal(dinv)

    def _steps(self, x: torch.Tensor, dinv: torch.Tensor, upper: bool) -> list[tuple]:
        """The substitution ``x <- (zI - T)^-1 x`` (``upper``) or ``x <- (zI - T)^-H x`` (with
        ``dinv`` the adjoint's diagonal data), as a list of in-place operations on views of the
        buffer ``x`` ``(n, B)``, made once per buffer: running it is then one torch call per
        operation, with no slicing (the interpreter's cost per call is what a solve for a few
        hundred points costs; :func:`_run_steps`). The order is that of the recursive block
        substitution of the class docstring."""
        xv = torch.view_as_real(x).flatten(1) if self.real else x  # the products' view of x
        steps: list[tuple] = []

        def block(g0: int, size: int) -> None:
            if size == 1:
                steps.append((0, x[g0], dinv[0, g0], None))
            else:
                sl = slice(g0, g0 + 2)
                steps.append((1, x[sl], dinv[0, sl], dinv[1, sl]))

        def visit(node, lo: int) -> None:
            if node[0] == "leaf":
                _, _, _, blocks, cols, rows = node
                if upper:
                    for (b0, size), col in zip(reversed(blocks), reversed(cols), strict=True):
                        block(lo + b0, size)
                        if b0:  # (zI - T) x = y: the rows above receive +T[:b0, I] x_I
                            steps.append((2, xv[lo : lo + b0], col, xv[lo + b0 : lo + b0 + size]))
                else:
                    for (b0, size), row in zip(blocks, rows, strict=True):
                        if b0:
                            steps.append((2, xv[lo + b0 : lo + b0 + size], row, xv[lo : lo + b0]))
                        block(lo + b0, size)
                return
            _, m, first, second, T12, T12h = node
            hi = lo + node_size(node)
            if upper:
                visit(second, lo + m)
                steps.append((2, xv[lo : lo + m], T12, xv[lo + m : hi]))
                visit(first, lo)
            else:
                visit(first, lo)
                steps.append((2, xv[lo + m : hi], T12h, xv[lo : lo + m]))
                visit(second, lo + m)

        def node_size(node) -> int:
            return node[2] - node[1] if node[0] == "leaf" else node[1] + node_size(node[3])

        visit(self.tree, 0)
        return steps

    def sigma_bound(self, diag: tuple[torch.Tensor, torch.Tensor], v: torch.Tensor) -> torch.Tensor:
        """An upper bound on ``sigma_min(z_b I - T)`` per shift from one pair of solves started at
        the complex rows ``v`` ``(B, n)``, computed without overflow: ``x = (zI - T)^-H v`` and
        ``y = (zI - T)^-1 x`` give ``sigma_min <= ||v|| / ||x||`` and ``<= ||x|| / ||y||`` (each a
        Rayleigh-type quotient), with ``x`` rescaled before the second solve. Where a solve
        overflows (``sigma_min`` below about 1e-300) the bound is 0. ``diag`` is
        :meth:`diagonal` of the shifts."""
        dinv, dinvh = diag
        x = v.T.clone(memory_format=torch.contiguous_format)
        nv = torch.linalg.vector_norm(x, dim=0)
        _run_steps(self._steps(x, dinvh, False))
        # a norm that overflows (an entry above ~1e154) means sigma_min <= ||v|| / ||x|| < 1e-150:
        # the bound is then 0, which is below the floor as it should be
        nx = torch.linalg.vector_norm(x, dim=0)
        x.div_(torch.where(torch.isfinite(nx) & (nx > 0), nx, torch.ones_like(nx)))
        _run_steps(self._steps(x, dinv, True))
        ny = torch.linalg.vector_norm(x, dim=0)  # ||y|| / ||x||, y = (zI - T)^-1 x
        bound = torch.minimum(nv / nx, 1.0 / ny)
        finite = torch.isfinite(nx) & torch.isfinite(ny) & (nx > 0) & (ny > 0)
        return torch.where(finite, bound, torch.zeros_like(bound)).nan_to_num(0.0)

    def operator(
        self, z: torch.Tensor, diag: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> LinearOperator:
        """The batch of maps ``v -> (z_b I - T)^-1 (z_b I - T)^-H v`` on the *real* view of
        ``C^n`` (``R^2n``, real and imaginary parts interleaved), restrictable.

        A Hermitian map is a real symmetric one on that view, with the same eigenvalues (each
        twice), and Lanczos from a real vector builds the same tridiagonal as complex Lanczos from
        the corresponding complex vector (its coefficients are real): the Ritz values are the same,
        while the iteration's own vector work runs in real arithmetic (torch's batched complex
        products with conjugates were 3-30x slower on the CPU).
        """
        dinv, dinvh = self.diagonal(z) if diag is None else diag
        return self._operator(z, dinv, dinvh)

    def _operator(self, z: torch.Tensor, dinv: torch.Tensor, dinvh: torch.Tensor) -> LinearOperator:
        n = self.n
        work: list = []  # the buffer and its two substitutions, made at the first product

        def matvec(v: torch.Tensor) -> torch.Tensor:
            if not work:
                x = torch.empty(n, len(z), dtype=torch.complex128)
                work.extend([x, self._steps(x, dinvh, False), self._steps(x, dinv, True)])
            x, lower, upper = work
            _transpose_into(x, torch.view_as_complex(v.reshape(len(v), n, 2)))
            _run_steps(lower)
            _run_steps(upper)
            out = torch.empty(len(v), 2 * n, dtype=torch.float64)  # never a view of x (reused)
            _transpose_into(torch.view_as_complex(out.view(len(v), n, 2)), x)
            return out

        def restrict(idx: torch.Tensor) -> LinearOperator:
            return self._operator(z[idx], dinv[:, :, idx].contiguous(), dinvh[:, :, idx].contiguous())

        return LinearOperator(
            matvec, None, in_shape=(2 * n,), batch=len(z), dtype=torch.float64, restrict=restrict
        )


def _schur_solver(M: torch.Tensor, threads: int = 1) -> _ShiftedTriangular:
    """The solver on the Schur form of ``M``: the real Schur form when ``M`` is real (real
    arithmetic in the solves' matrix products), the complex one otherwise."""
    return _ShiftedTriangular(schur_form(M, real=_is_real(M), threads=threads)[0])


def inverse_gram_operator(T: torch.Tensor, z) -> LinearOperator:
    """The batch of Hermitian maps ``v -> (z_b I - T)^-1 (z_b I - T)^-H v``, one per point ``z_b``,
    for a Schur factor ``T`` of :func:`schur_form` (complex upper triangular, or real
    quasi-upper-triangular from ``schur_form(A, real=True)``), as a restrictable
    :class:`~sensitivity_lib.krylov.LinearOperator` on the real view of ``C^n`` (``R^2n``, real and
    imaginary parts interleaved). Its largest eigenvalue is ``1 / sigma_min(z_b I - T)^2``; one
    application costs one pair of triangular solves per point, batched (the module docstring).

    Example
    -------
    >>> T = torch.tensor([[2.0, 1.0], [0.0, 1.0]], dtype=torch.complex128)
    >>> op = inverse_gram_operator(T, [0.0])
    >>> cols = torch.eye(4, dtype=torch.float64)
    >>> e = torch.linalg.eigvalsh(torch.stack([op.matvec(c[None])[0] for c in cols]))
    >>> round(float(e.max()), 12) == round(float(torch.linalg.svdvals(T)[-1]) ** -2, 12)
    True
    """
    if not isinstance(T, torch.Tensor) or T.dim() != 2 or T.shape[0] != T.shape[1]:
        raise ValueError("T must be a square (upper triangular) torch tensor, e.g. from schur_form")
    if not T.is_complex():
        Tr = T.detach().to(torch.float64)
        sub = Tr.diagonal(-1) != 0
        if not bool((torch.tril(Tr, -2) == 0).all()) or bool((sub[1:] & sub[:-1]).any()):
            raise ValueError("a real T must be quasi-upper-triangular (use schur_form(A, real=True)[0])")
        return _ShiftedTriangular(Tr).operator(_points(z))
    Tc = T.detach().to(torch.complex128)
    if not bool((torch.tril(Tc, -1) == 0).all()):
        raise ValueError("T must be upper triangular (use schur_form(A)[0])")
    return _ShiftedTriangular(Tc).operator(_points(z))


@dataclass
class _Run:
    sigma: torch.Tensor  # float64 (P,)
    vectors: torch.Tensor | None  # complex128 (P, n) top eigenvectors of the inverse Gram
    iterations: torch.Tensor  # int64 (P,)
    converged: torch.Tensor  # bool (P,)
    below_floor: torch.Tensor  # bool (P,): sigma_min < solver.floor, reported as the floor


def _inverse_lanczos(
    solver: _ShiftedTriangular, z: torch.Tensor, v0: torch.Tensor | None, tol: float, max_iter: int,
    generator: torch.Generator,
) -> _Run:  # fmt: skip
    """sigma_min(z_b I - T) for a batch of shifts, by Lanczos on the inverse Gram operators (in
    chunks that keep the Krylov basis under ``_BASIS_BYTES``).

    Three kinds of points: on an eigenvalue (to rounding) ``sigma = 0`` exactly; points where one
    pair of solves already shows ``sigma_min < solver.floor`` (``eps ||A||_F``: below it the value is
    rounding, and its inverse Gram overflows float64 long before ``sigma_min`` reaches 1e-150, e.g.
    a 64x64 Jordan block at ``|z| = 0.02``, ``sigma_min ~ 1e-109``) report the floor, an upper bound,
    flagged ``below_floor``; the others run Lanczos (a Ritz value below the floor is reported the
    same way). The random probe of that pair of solves is also the Lanczos start, unless ``v0``
    (complex ``(P, n)``) gives one: a row of zeros there means no start is known for that point."""
    n, P = solver.n, len(z)
    sigma = torch.zeros(P, dtype=torch.float64)
    vectors = torch.zeros(P, n, dtype=torch.complex128)
    iterations = torch.zeros(P, dtype=torch.int64)
    converged = torch.ones(P, dtype=torch.bool)
    below = torch.zeros(P, dtype=torch.bool)
    # a shift on an eigenvalue (to rounding) is singular: sigma_min = 0 exactly there
    scale = float(solver.eigenvalues.abs().max()) + 1.0
    gap = (z[:, None] - solver.eigenvalues[None, :]).abs().amin(1)
    live = torch.nonzero(gap > 64 * torch.finfo(torch.float64).eps * scale).flatten()
    if len(live):
        diag = solver.diagonal(z[live])
        probe = torch.randn(len(live), n, dtype=torch.complex128, generator=generator)
        deep = solver.sigma_bound(diag, probe) < solver.floor
        below[live[deep]] = True
        if bool(deep.any()):
            live, probe, diag = live[~deep], probe[~deep], tuple(d[:, :, ~deep] for d in diag)
        start = probe
        if v0 is not None:
            # the known start plus a random part (_WARM_NOISE of its size): the part of the top
            # vector that a neighbour's vector lacks (exactly, for a normal matrix) grows from it
            warm = v0[live]
            size = torch.linalg.vector_norm(warm, dim=1, keepdim=True)
            unit = probe / torch.linalg.vector_norm(probe, dim=1, keepdim=True)
            start = torch.where(size > 0, warm + _WARM_NOISE * size * unit, probe)
    basis = min(_MAX_BASIS, max_iter + 1)
    chunk = max(1, int(_BASIS_BYTES // (basis * n * 16)))
    for s in range(0, len(live), chunk):
        idx, part = live[s : s + chunk], slice(s, s + chunk)
        whole = len(idx) == len(live)
        op = solver.operator(z[idx], diag if whole else tuple(d[:, :, part].contiguous() for d in diag))
        r = top_eig(
            op, torch.view_as_real(start[part]).reshape(len(idx), 2 * n), tol=tol, max_iter=max_iter,
            max_basis=basis, generator=generator,
        )  # fmt: skip
        sigma[idx] = 1.0 / r.value.clamp_min(1e-300).sqrt()
        vectors[idx] = torch.view_as_complex(r.vector.reshape(len(idx), n, 2))
        iterations[idx] = r.iterations
        converged[idx] = r.converged
        below[idx] = sigma[idx] < solver.floor
    sigma[below] = solver.floor
    converged[below] = True  # sigma_min <= floor is established, which is all float64 can say
    return _Run(sigma, vectors, iterations, converged, below)


def _coarse_to_fine(
    solver: _ShiftedTriangular, Z: torch.Tensor, tol: float, max_iter: int, generator: torch.Generator
) -> _Run:
    """:func:`_inverse_lanczos` on a grid of points ``Z`` ``(H, W)``, coarse to fine: first every
    ``_COARSE``-th point in both directions, then the points of each grid twice as fine, each
    started from the top vector of its nearest point of the coarser grid (the singular vectors
    vary smoothly with ``z`` away from eigenvalues: on the benchmark's grid that cut the mean
    Lanczos steps per point from 16.9 to 13.1). A start is only a start: the stopping rule is the
    same, and a start nearly orthogonal to the top vector (a crossing of the two smallest
    singular values between neighbours) costs steps, not accuracy, as long as rounding and the
    random part of every start leave the top vector a component to grow from."""
    H, W = Z.shape
    n = solver.n
    sigma = torch.zeros(H, W, dtype=torch.float64)
    vectors = torch.zeros(H, W, n, dtype=torch.complex128)
    iterations = torch.zeros(H, W, dtype=torch.int64)
    converged = torch.ones(H, W, dtype=torch.bool)
    below = torch.zeros(H, W, dtype=torch.bool)
    done = torch.zeros(H, W, dtype=torch.bool)
    step = _COARSE
    while True:
        mask = torch.zeros(H, W, dtype=torch.bool)
        mask[::step, ::step] = True
        mask &= ~done
        ii, jj = torch.nonzero(mask, as_tuple=True)
        v0 = None
        if bool(done.any()):  # the nearest point of the grid twice as coarse (all computed)
            c = 2 * step

            def near(i: torch.Tensor, size: int, c: int = c) -> torch.Tensor:
                return (torch.round(i / c) * c).long().clamp_max((size - 1) // c * c)

            v0 = vectors[near(ii, H), near(jj, W)]
        r = _inverse_lanczos(solver, Z[ii, jj], v0, tol, max_iter, generator)
        sigma[ii, jj], vectors[ii, jj], iterations[ii, jj] = r.sigma, r.vectors, r.iterations
        converged[ii, jj], below[ii, jj] = r.converged, r.below_floor
        done |= mask
        if step == 1:
            break
        step //= 2
    flat = (t.reshape(H * W, *t.shape[2:]) for t in (sigma, vectors, iterations, converged, below))
    return _Run(*flat)


def _dense_sigma_min(A: torch.Tensor, z: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """The reference: ``svdvals(zI - A)[-1]`` per point (complex128), in chunks."""
    n = A.shape[0]
    eye = torch.eye(n, dtype=torch.complex128)
    Ac = A.to(torch.complex128)
    out = torch.empty(len(z), dtype=torch.float64)
    for s in range(0, len(z), chunk):
        zz = z[s : s + chunk]
        out[s : s + chunk] = torch.linalg.svdvals(zz[:, None, None] * eye - Ac)[:, -1]
    return out


def _check_method(method: str, tol: float, max_iter: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not (0 < tol < 1) or int(max_iter) < 1:
        raise ValueError(f"need 0 < tol < 1 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")


def _points(z) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(z, dtype=np.complex128).reshape(-1))
    if t.numel() == 0 or not bool(torch.isfinite(torch.view_as_real(t)).all()):
        raise ValueError("the points z must be a non-empty array of finite complex numbers")
    return t


def sigma_min_at(
    A, z, *, method: str = "lanczos", tol: float = 1e-9, max_iter: int = 300, threads: int = 1,
    seed: int = 0,
) -> Estimate:  # fmt: skip
    """``sigma_min(z I - A)`` at arbitrary points ``z`` (the resolvent norm is its inverse).

    Parameters
    ----------
    A
        Square matrix (real or complex, torch or NumPy), used in float64 / complex128.
    z
        Points of the complex plane, any shape (flattened), finite.
    method
        ``"lanczos"`` (Schur factor and batched inverse Lanczos, the module docstring) or ``"svd"``
        (a dense SVD of ``zI - A`` per point: the reference).
    tol, max_iter
        The Lanczos stopping rule's relative tolerance on ``1 / sigma_min^2`` and its budget.
    threads
        Threads for the factorisations and products (:func:`pinned_threads`).
    seed
        Seed of the random complex starting vectors.

    Returns
    -------
    Estimate
        ``value`` float64 ``(P,)``; ``kind="upper"`` for Lanczos (``1/sqrt`` of a Ritz value: never
        below ``sigma_min``, up to rounding), ``"exact"`` for the SVD; ``converged`` bool ``(P,)``;
        ``extra["iterations"]`` int64 ``(P,)`` (0 where ``z`` is an eigenvalue to rounding, and
        ``sigma = 0`` there); ``extra["floor"]`` (``eps ||A||_F``) and ``extra["below_floor"]`` bool
        ``(P,)``: where ``sigma_min`` is below the floor, the value reported is the floor (the
        module docstring, "Round-off"; ``nan`` and all False for the SVD);
        ``extra["eigenvalues"]`` complex128 (from the Schur form, or ``eigvals`` for the SVD).

    Example
    -------
    >>> A = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)   # 2x2 Jordan block
    >>> e = sigma_min_at(A, [0.1, 1j])
    >>> [round(v, 9) for v in e.value.tolist()]       # exact: sqrt(1 + 2|z|^2 - sqrt(1 + 4|z|^2)) / sqrt(2)
    [0.009901951, 0.618033989]
    """
    _check_method(method, tol, max_iter)
    return _sigma_min(_matrix(A), _points(z), None, method, tol, max_iter, threads, seed)


def _sigma_min(
    M: torch.Tensor, pts: torch.Tensor, shape: tuple[int, int] | None, method: str, tol: float,
    max_iter: int, threads: int, seed: int,
) -> Estimate:  # fmt: skip
    """:func:`sigma_min_at` on checked input; ``shape``: the points are a grid of that shape
    (row-major), computed coarse to fine (:func:`_coarse_to_fine`)."""
    with pinned_threads(threads):
        if method == "svd":
            val = _dense_sigma_min(M, pts)
            return Estimate(
                val, "exact", method="dense svdvals(zI - A)", norm="2",
                extra={"iterations": torch.zeros(len(pts), dtype=torch.int64), "points": pts,
                       "tol": tol, "floor": math.nan,
                       "below_floor": torch.zeros(len(pts), dtype=torch.bool),
                       "eigenvalues": torch.linalg.eigvals(M)},
            )  # fmt: skip
        solver = _schur_solver(M, threads)
        grid = None if shape is None else pts.reshape(shape)
        gen = torch.Generator().manual_seed(seed)
        run = (_inverse_lanczos(solver, pts, None, tol, max_iter, gen) if grid is None
               else _coarse_to_fine(solver, grid, tol, max_iter, gen))  # fmt: skip
    return Estimate(
        run.sigma, "upper", method="Schur + batched inverse Lanczos", norm="2",
        iterations=int(run.iterations.max()), converged=run.converged,
        extra={"iterations": run.iterations, "points": pts, "tol": tol, "floor": solver.floor,
               "below_floor": run.below_floor, "eigenvalues": solver.eigenvalues},
    )  # fmt: skip


def _mirror_rows(im: np.ndarray, real: bool) -> tuple[np.ndarray, np.ndarray]:
    """For a real matrix: the rows computed (``im >= 0``, and rows whose mirror is not on the grid)
    and, for every row, the computed row that holds its values (itself or its mirror image)."""
    rows = np.arange(len(im))
    if not real:
        return rows, rows
    tol = 8 * np.finfo(np.float64).eps * max(1.0, float(np.abs(im).max()))
    source = rows.copy()
    for i in np.nonzero(im < 0)[0]:
        match = np.nonzero((np.abs(im + im[i]) <= tol) & (im >= 0))[0]
        if len(match):
            source[i] = match[0]
    return np.unique(source), source


def sigma_min_grid(
    A, re, im, *, method: str = "lanczos", tol: float = 1e-9, max_iter: int = 300, threads: int = 1,
    seed: int = 0, symmetry: bool = True,
) -> Estimate:  # fmt: skip
    """``sigma_min(zI - A)`` on the grid ``z = re[j] + 1j * im[i]``: an array of shape
    ``(len(im), len(re))``, computed the fast way (the module docstring: EigTool's algorithm).

    Parameters
    ----------
    A
        Square matrix (real or complex, torch or NumPy).
    re, im
        The grid's real and imaginary coordinates (1-D, finite).
    method
        ``"lanczos"`` (default) or ``"svd"`` (dense reference, one SVD per point).
    tol, max_iter, threads, seed
        As in :func:`sigma_min_at`.
    symmetry
        For a real ``A``, compute each pair of rows ``im`` and ``-im`` once (exact:
        ``sigma_min(conj(z) I - A) = sigma_min(zI - A)``).

    Returns
    -------
    Estimate
        ``value`` float64 tensor ``(len(im), len(re))``; ``kind`` ``"upper"`` (Lanczos) or
        ``"exact"`` (SVD); ``converged`` bool of the same shape; ``extra``: ``re``, ``im``,
        ``iterations`` (int64 grid), ``eigenvalues`` (complex128, from the Schur form),
        ``points_computed`` (after the symmetry), ``floor`` and ``below_floor`` (bool grid; the
        module docstring, "Round-off"; ``nan`` and all False for the SVD).

    Example
    -------
    >>> A = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)   # eigenvalues +-i
    >>> s = sigma_min_grid(A, [0.0], [-1.5, 0.0, 1.5]).value
    >>> [round(v, 12) for v in s[:, 0].tolist()]
    [0.5, 1.0, 0.5]
    """
    _check_method(method, tol, max_iter)
    M = _matrix(A)
    re_a = np.asarray(re, dtype=np.float64).reshape(-1)
    im_a = np.asarray(im, dtype=np.float64).reshape(-1)
    if re_a.size == 0 or im_a.size == 0 or not (np.isfinite(re_a).all() and np.isfinite(im_a).all()):
        raise ValueError("re and im must be non-empty 1-D arrays of finite numbers")
    rows, source = _mirror_rows(im_a, symmetry and _is_real(M))
    Z = re_a[None, :] + 1j * im_a[rows, None]  # (len(rows), len(re)): the points computed
    e = _sigma_min(M, _points(Z), Z.shape, method, tol, max_iter, threads, seed)
    where = torch.from_numpy(np.searchsorted(rows, source))

    def grid(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(Z.shape)[where]

    its = e.extra["iterations"]
    return Estimate(
        grid(e.value), e.kind, method=e.method, norm="2", iterations=int(its.max()),
        converged=None if e.converged is None else grid(e.converged),
        extra={"re": re_a, "im": im_a, "iterations": grid(its), "eigenvalues": e.extra["eigenvalues"],
               "points_computed": int(Z.size), "tol": tol, "floor": e.extra["floor"],
               "below_floor": grid(e.extra["below_floor"])},
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# boundaries of a pseudospectrum: the radius, the abscissa, the Kreiss constant


class _Resolvent:
    """One Schur factorisation of ``A`` and batched ``sigma_min(zI - A)`` at any points."""

    def __init__(self, A: torch.Tensor, tol: float, max_iter: int, threads: int, seed: int) -> None:
        self.A = A
        self.threads = threads
        with pinned_threads(threads):
            self.solver = _schur_solver(A, threads)
            self.norm = float(torch.linalg.matrix_norm(A, ord=2))
        self.eig = self.solver.eigenvalues
        self.tol, self.max_iter = tol, max_iter
        self.generator = torch.Generator().manual_seed(seed)
        self.evaluations = 0

    def sigma(self, z: torch.Tensor) -> torch.Tensor:
        """float64 sigma_min(z I - A), each value never below the true one (Ritz values)."""
        self.evaluations += len(z)
        with pinned_threads(self.threads):
            return _inverse_lanczos(self.solver, z, None, self.tol, self.max_iter, self.generator).sigma


def _outermost(
    res: _Resolvent, eps: float, origin: torch.Tensor, direction: torch.Tensor, t_lo: torch.Tensor,
    t_hi: float, inside_lo: torch.Tensor, n_scan: int, rtol: float,
) -> torch.Tensor:  # fmt: skip
    """Per line ``z(t) = origin + t * direction``, the largest ``t`` in ``[t_lo, t_hi]`` found with
    ``sigma_min(z(t) I - A) <= eps`` (``nan`` where none was found): a scan of ``n_scan`` points from
    the top, then bisection between the outermost point inside and the next one outside, until the
    bracket is ``rtol`` relative. Every returned ``t`` was *verified* inside (its Lanczos value is an
    upper estimate of ``sigma_min``), so it bounds the sup from below; a component thinner than the
    scan's step may be missed."""
    L = len(origin)
    frac = torch.linspace(0.0, 1.0, n_scan + 1, dtype=torch.float64)[1:]
    ts = t_lo[:, None] + (t_hi - t_lo)[:, None] * frac[None, :]  # (L, n_scan)
    zs = origin[:, None] + ts * direction[:, None]
    inside = (res.sigma(zs.reshape(-1)) <= eps).reshape(L, n_scan)
    idx = torch.arange(n_scan).expand(L, n_scan)
    last = torch.where(inside, idx, torch.full_like(idx, -1)).amax(1)  # outermost scan point inside
    a = torch.where(last >= 0, ts.gather(1, last.clamp_min(0)[:, None])[:, 0], t_lo)
    ok = (last >= 0) | inside_lo
    nxt = (last + 1).clamp_max(n_scan - 1)
    b = torch.where(last + 1 < n_scan, ts.gather(1, nxt[:, None])[:, 0], torch.full_like(a, t_hi))
    b = torch.where(last == -1, ts[:, 0], b)
    live = ok & (b > a)
    while bool(live.any()):
        rows = torch.nonzero(live).flatten()
        mid = (a[rows] + b[rows]) / 2
        hit = res.sigma(origin[rows] + mid * direction[rows]) <= eps
        a[rows] = torch.where(hit, mid, a[rows])
        b[rows] = torch.where(hit, b[rows], mid)
        live = ok & ((b - a) > rtol * torch.maximum(a.abs(), b.abs()).clamp_min(1e-300))
    return torch.where(ok, a, torch.full_like(a, math.nan))


def _check_eps(eps: float) -> float:
    if not (isinstance(eps, int | float) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    return float(eps)


def _boundary_max(
    A, eps: float, kind: str, *, n_lines: int, n_scan: int, refine: int, rtol: float, tol: float,
    max_iter: int, threads: int, seed: int,
) -> Estimate:  # fmt: skip
    """The sup of ``|z|`` (kind "radius") or ``Re z`` (kind "abscissa") over ``sigma_eps(A)``."""
    eps = _check_eps(eps)
    M = _matrix(A)
    res = _Resolvent(M, tol, max_iter, threads, seed)
    t_hi = res.norm + eps * (1 + 1e-6) + 1e-12  # beyond: sigma_min >= |z| - ||A|| > eps
    lam = res.eig
    top = lam[torch.argsort(lam.abs() if kind == "radius" else lam.real, descending=True)[:8]]

    def lines(params: torch.Tensor):
        if kind == "radius":  # rays from the origin at the angles params
            return torch.zeros_like(params, dtype=torch.complex128), torch.exp(1j * params)
        return 1j * params.to(torch.complex128), torch.ones_like(params, dtype=torch.complex128)

    def search(params: torch.Tensor, t_lo: torch.Tensor, inside_lo: torch.Tensor) -> torch.Tensor:
        o, d = lines(params)
        return _outermost(res, eps, o, d, t_lo, t_hi, inside_lo, n_scan, rtol)

    if kind == "radius":
        params = torch.cat([torch.linspace(0, 2 * math.pi, n_lines + 1, dtype=torch.float64)[:-1],
                            top.angle()])  # fmt: skip
        t_lo = torch.cat([torch.zeros(n_lines, dtype=torch.float64), top.abs()])
        step = 2 * math.pi / n_lines
    else:
        params = torch.cat([torch.linspace(-t_hi, t_hi, n_lines, dtype=torch.float64), top.imag])
        t_lo = torch.cat([torch.full((n_lines,), -t_hi, dtype=torch.float64), top.real])
        step = 2 * t_hi / max(1, n_lines - 1)
    inside_lo = torch.cat([torch.zeros(n_lines, dtype=torch.bool), torch.ones(len(top), dtype=torch.bool)])
    t = search(params, t_lo, inside_lo)
    best = int(torch.nan_to_num(t, nan=-math.inf).argmax())
    p_best, t_best = float(params[best]), float(t[best])
    for level in range(refine):  # finer lines around the best one
        width = step / 4**level
        p = p_best + width * torch.linspace(-1, 1, 9, dtype=torch.float64)
        lo_t = t_best - 2 * width * max(1.0, abs(t_best))
        tt = search(p, torch.full_like(p, lo_t), torch.zeros_like(p, dtype=torch.bool))
        i = int(torch.nan_to_num(tt, nan=-math.inf).argmax())
        if math.isfinite(float(tt[i])) and float(tt[i]) > t_best:
            p_best, t_best = float(p[i]), float(tt[i])
    o, d = lines(torch.tensor([p_best], dtype=torch.float64))
    z = complex(o[0] + t_best * d[0])
    sup = abs(z) if kind == "radius" else z.real
    exact = float(lam.abs().max()) if kind == "radius" else float(lam.real.max())
    return Estimate(
        sup, "lower", method=f"line search ({n_lines} lines, {n_scan}-point scans, bisection)", norm="2",
        iterations=res.evaluations,
        extra={"z": z, "eps": eps, "spectral_" + ("radius" if kind == "radius" else "abscissa"): exact},
    )  # fmt: skip


def pseudospectral_radius(
    A, eps: float, *, n_lines: int = 64, n_scan: int = 32, refine: int = 3, rtol: float = 1e-9,
    tol: float = 1e-10, max_iter: int = 300, threads: int = 1, seed: int = 0,
) -> Estimate:  # fmt: skip
    """The epsilon-pseudospectral radius ``rho_eps(A) = sup {|z| : sigma_min(zI - A) < eps}``.

    A search, not a grid: on ``n_lines`` rays from the origin (and the rays through the eight
    eigenvalues of largest modulus, on which ``[|lambda|, |lambda| + eps]`` is known to be inside),
    a scan of ``n_scan`` points down from ``||A|| + eps`` (beyond which ``sigma_min >= |z| - ||A|| >
    eps``) finds the outermost point inside, bisection then places the boundary to ``rtol``, and
    ``refine`` rounds of nine rays at a quarter of the previous spacing around the best ray
    polish the angle. Every reported point is verified inside (its inverse-Lanczos value, an upper
    estimate of ``sigma_min``, is ``<= eps``), so the value is a *lower* estimate
    (``kind="lower"``); a component of ``sigma_eps`` that sticks out between two rays and two scan
    points can be missed. In exact arithmetic ``rho(A) + eps <= rho_eps(A) <= ||A|| + eps``, with
    equality on the left for normal matrices; Trefethen & Embree (2005), chapter 16:
    ``sup_k ||A^k|| >= (rho_eps - 1) / eps`` for every ``eps``.

    Returns
    -------
    Estimate
        ``value`` float; ``extra``: ``z`` (the point found), ``eps``, ``spectral_radius``;
        ``iterations`` counts the points at which ``sigma_min`` was evaluated.

    Example
    -------
    >>> A = torch.diag(torch.tensor([0.5, -0.9], dtype=torch.float64))   # normal: rho + eps
    >>> round(pseudospectral_radius(A, 0.01).value, 6)
    0.91
    """
    return _boundary_max(A, eps, "radius", n_lines=n_lines, n_scan=n_scan, refine=refine, rtol=rtol,
                         tol=tol, max_iter=max_iter, threads=threads, seed=seed)  # fmt: skip


def pseudospectral_abscissa(
    A, eps: float, *, n_lines: int = 64, n_scan: int = 32, refine: int = 3, rtol: float = 1e-9,
    tol: float = 1e-10, max_iter: int = 300, threads: int = 1, seed: int = 0,
) -> Estimate:  # fmt: skip
    """The epsilon-pseudospectral abscissa ``alpha_eps(A) = sup {Re z : sigma_min(zI - A) < eps}``
    (the continuous-time counterpart of :func:`pseudospectral_radius`: ``sup_t ||e^{tA}|| >=
    alpha_eps / eps``, Trefethen & Embree, chapter 15).

    The same search as :func:`pseudospectral_radius` on horizontal lines ``Im z = y`` (``n_lines`` of
    them over ``|y| <= ||A|| + eps``, and those through the eight rightmost eigenvalues), scanned
    leftwards from ``Re z = ||A|| + eps``; a *lower* estimate, every point verified inside.

    Example
    -------
    >>> A = torch.diag(torch.tensor([-1.0, -2.0], dtype=torch.float64))
    >>> round(pseudospectral_abscissa(A, 0.1).value, 6)
    -0.9
    """
    return _boundary_max(A, eps, "abscissa", n_lines=n_lines, n_scan=n_scan, refine=refine,
                         rtol=rtol, tol=tol, max_iter=max_iter, threads=threads, seed=seed)  # fmt: skip


def kreiss_constant(
    A, *, n_angles: int = 64, n_radii: int = 40, refine: int = 3, r_max: float | None = None,
    tol: float = 1e-10, max_iter: int = 300, threads: int = 1, seed: int = 0,
) -> Estimate:  # fmt: skip
    """The Kreiss constant of discrete time, ``K(A) = sup_{|z| > 1} (|z| - 1) ||(zI - A)^-1||``.

    Kreiss matrix theorem (sharp form, Trefethen & Embree, chapter 18):
    ``K(A) <= sup_{k >= 0} ||A^k|| <= e n K(A)``; ``K(A) = inf`` when ``rho(A) > 1`` (returned as
    such, ``kind="exact"``); ``K(A) = 1`` for a normal ``A`` with ``rho(A) <= 1``; and always
    ``K(A) >= 1`` (the limit ``|z| -> inf``).

    The search is an honest 2-D optimisation over the exterior of the unit disk, as a sup over
    angles nested in a sup over radii: on ``n_radii`` circles ``|z| = 1 + delta`` (``delta``
    log-spaced from ``1e-4 (1 - rho)`` (or ``1e-6`` when ``rho`` is 1 to rounding) to ``r_max - 1``,
    default ``r_max = 4 (||A|| + 1)``), ``min_theta sigma_min`` is taken over ``n_angles`` angles
    and those of the eigenvalues, then refined ``refine`` times by nine angles at a quarter of the
    previous spacing around each circle's minimiser; then ``refine`` rounds of nine radii between
    the best circle's neighbours, each with its angle refinement. The value is the largest
    ``(|z| - 1) / sigma`` found, with ``sigma`` an inverse-Lanczos value (never below
    ``sigma_min``), and at least 1: a *lower* estimate (``kind="lower"``) of the sup, which a finite
    search can miss (e.g. a narrow peak between two radii).

    Returns
    -------
    Estimate
        ``value`` float; ``extra``: ``z`` (where the sup was found; ``None`` when the limit 1
        won), ``spectral_radius``, ``evaluations``.

    Example
    -------
    >>> A = torch.diag(torch.tensor([0.5, -0.5j], dtype=torch.complex128))   # normal
    >>> kreiss_constant(A).value
    1.0
    >>> kreiss_constant(2 * torch.eye(2)).value
    inf
    """
    M = _matrix(A)
    with pinned_threads(threads):
        lam = torch.linalg.eigvals(M.to(torch.complex128))
    rho = float(lam.abs().max())
    if rho > 1 + 1e-12:
        return Estimate(math.inf, "exact", method="rho(A) > 1", norm="2",
                        extra={"z": None, "spectral_radius": rho, "evaluations": 0})  # fmt: skip
    res = _Resolvent(M, tol, max_iter, threads, seed)
    r_max = 4 * (res.norm + 1) if r_max is None else float(r_max)
    if not r_max > 1:
        raise ValueError(f"r_max must exceed 1, got {r_max}")
    d_min = max(1e-4 * (1 - rho), 1e-6)
    deltas = torch.logspace(math.log10(d_min), math.log10(r_max - 1), n_radii, dtype=torch.float64)
    base = torch.cat([torch.linspace(0, 2 * math.pi, n_angles + 1, dtype=torch.float64)[:-1],
                      lam.angle()])  # fmt: skip
    step0 = 2 * math.pi / n_angles

    def circle_min(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """min over angles of sigma_min on |z| = 1 + delta (each), and the minimising angle."""
        R = len(delta)
        ang = base.expand(R, -1)
        sig = res.sigma(((1 + delta)[:, None] * torch.exp(1j * ang)).reshape(-1)).reshape(R, -1)
        best_s, i = sig.min(1)
        best_a = ang.gather(1, i[:, None])[:, 0]
        for level in range(refine):
            a = best_a[:, None] + step0 / 4**level * torch.linspace(-1, 1, 9, dtype=torch.float64)
            s = res.sigma(((1 + delta)[:, None] * torch.exp(1j * a)).reshape(-1)).reshape(R, -1)
            m, j = s.min(1)
            better = m < best_s
            best_s = torch.where(better, m, best_s)
            best_a = torch.where(better, a.gather(1, j[:, None])[:, 0], best_a)
        return best_s, best_a

    s, a = circle_min(deltas)
    g = deltas / s
    i = int(g.argmax())
    best = (float(g[i]), float(deltas[i]), float(a[i]))
    log_d = torch.log(deltas)
    lo_d = log_d[max(i - 1, 0)]
    hi_d = log_d[min(i + 1, n_radii - 1)]
    for _ in range(refine):
        cand = torch.exp(torch.linspace(float(lo_d), float(hi_d), 9, dtype=torch.float64))
        s, a = circle_min(cand)
        gg = cand / s
        j = int(gg.argmax())
        if float(gg[j]) > best[0]:
            best = (float(gg[j]), float(cand[j]), float(a[j]))
        width = (hi_d - lo_d) / 8
        centre = math.log(best[1])
        lo_d, hi_d = centre - width, centre + width
    value, delta, angle = best
    z = complex((1 + delta) * math.cos(angle), (1 + delta) * math.sin(angle))
    if value < 1.0:  # the limit |z| -> inf gives 1: the sup is at least that
        value, z = 1.0, None
    return Estimate(
        value, "lower", method="circles |z| = 1 + delta: sup over delta of sup over angles", norm="2",
        iterations=res.evaluations, extra={"z": z, "spectral_radius": rho, "evaluations": res.evaluations},
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# non-normality and transient growth


def henrici_departure(A) -> Estimate:
    """Henrici's departure from normality ``dep_F(A) = ||N||_F``, where ``A = Q (D + N) Q^H`` is a
    Schur form (``D`` diagonal, ``N`` strictly upper triangular): 0 exactly for a normal matrix
    (P. Henrici, Numer. Math. 4, 1962). Equal to ``sqrt(||A||_F^2 - sum |lambda_i|^2)``, which
    loses accuracy by cancellation when ``A`` is nearly normal; the Schur factor does not.

    Returns
    -------
    Estimate
        ``value`` float, ``kind="exact"`` (to rounding); ``extra["ratio"]``: ``dep_F / ||A||_F`` in
        [0, 1] (0 iff normal; about ``1/sqrt(2)`` for a large Gaussian matrix, by the circular law).

    Example
    -------
    >>> round(float(henrici_departure(torch.eye(3)).value), 12)
    0.0
    """
    M = _matrix(A)
    T, _ = schur_form(M)
    dep = float(torch.linalg.matrix_norm(torch.triu(T, diagonal=1)))
    fro = float(torch.linalg.matrix_norm(M))
    return Estimate(dep, "exact", method="Schur form", norm="F",
                    extra={"ratio": dep / fro if fro > 0 else 0.0, "frobenius": fro})  # fmt: skip


def commutator_departure(A) -> Estimate:
    """``||A A^H - A^H A||_F / ||A||_F^2``: 0 iff ``A`` is normal (scale-free).

    Example
    -------
    >>> round(commutator_departure(torch.tensor([[0.0, 1.0], [0.0, 0.0]])).value, 12)
    1.414213562373
    """
    M = _matrix(A)
    fro2 = float(torch.linalg.matrix_norm(M)) ** 2
    c = float(torch.linalg.matrix_norm(M @ M.mH - M.mH @ M))
    return Estimate(c / fro2 if fro2 > 0 else 0.0, "exact", method="dense", norm="F")


def eigenvector_condition(A, *, threads: int = 1) -> Estimate:
    """``kappa(V) = ||V|| ||V^-1||`` for the eigenvector matrix ``V`` of ``A`` with unit columns
    (2-norm), ``inf`` when ``V`` is numerically singular (a defective or nearly defective ``A``).

    Unit columns are within a factor ``sqrt(n)`` of the best diagonal scaling (van der Sluis);
    Bauer-Fike: ``sigma_eps(A)`` lies in the union of the disks ``|z - lambda_i| <= eps kappa(V)``.
    A random real matrix is diagonalisable in exact arithmetic: "not diagonalisable" in practice
    means ``kappa(V)`` huge.

    Example
    -------
    >>> eigenvector_condition(torch.diag(torch.tensor([1.0, 2.0]))).value
    1.0
    """
    M = _matrix(A)
    with pinned_threads(threads):
        _, V = torch.linalg.eig(M.to(torch.complex128))
        s = torch.linalg.svdvals(V / torch.linalg.vector_norm(V, dim=0, keepdim=True))
    smin, smax = float(s[-1]), float(s[0])
    value = math.inf if smin <= smax * torch.finfo(torch.float64).eps else smax / smin
    return Estimate(value, "exact", method="eig, unit columns", norm="2")


def transient_growth(A, k_max: int = 100, *, threads: int = 1) -> Estimate:
    """``max_{0 <= k <= k_max} ||A^k||_2``, with every ``||A^k||_2`` (dense SVDs of the powers).

    Kreiss: ``K(A) <= sup_k ||A^k|| <= e n K(A)``; the pseudospectral lower bound
    ``sup_k ||A^k|| >= (rho_eps - 1) / eps`` (Trefethen & Embree, chapter 16). A normal matrix has
    ``||A^k|| = rho^k``: no transient growth.

    Returns
    -------
    Estimate
        ``value`` float (``kind="lower"``: the max over ``k <= k_max`` bounds ``sup_k`` from
        below); ``extra["norms"]`` float64 ``(k_max + 1,)`` and ``extra["argmax"]``. Norms beyond
        float64's range are ``inf``.

    Example
    -------
    >>> J = torch.diag(torch.ones(3, dtype=torch.float64), 1)   # 4x4 nilpotent Jordan block
    >>> [round(v, 12) for v in transient_growth(J, 5).extra["norms"].tolist()]
    [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    """
    if int(k_max) < 0:
        raise ValueError(f"k_max must be >= 0, got {k_max}")
    M = _matrix(A)
    n = M.shape[0]
    powers = torch.empty(int(k_max) + 1, n, n, dtype=M.dtype)
    powers[0] = torch.eye(n, dtype=M.dtype)
    for k in range(1, int(k_max) + 1):
        powers[k] = M @ powers[k - 1]
    finite = torch.isfinite(powers).flatten(1).all(1)
    norms = torch.full((int(k_max) + 1,), math.inf, dtype=torch.float64)
    with pinned_threads(threads):
        norms[finite] = torch.linalg.matrix_norm(powers[finite], ord=2).double()
    k = int(norms.argmax())
    return Estimate(float(norms[k]), "lower", method="dense powers and SVDs", norm="2",
                    extra={"norms": norms, "argmax": k})  # fmt: skip


@dataclass(frozen=True)
class WorstPerturbation:
    """The smallest perturbation that makes ``z`` an eigenvalue: ``(A + E) v = z v``.

    Attributes
    ----------
    E
        complex128 ``(n, n)``: ``E = s u v^H`` (rank one), ``||E||_2 = s``.
    norm
        ``s = sigma_min(zI - A)``: no smaller ``E`` does it (in the 2-norm).
    z
        The target point.
    vector
        ``v``, the eigenvector of ``A + E`` for ``z``.
    residual
        ``||(A + E) v - z v||`` (rounding level).
    """

    E: torch.Tensor
    norm: float
    z: complex
    vector: torch.Tensor
    residual: float


def worst_case_perturbation(A, z: complex, *, threads: int = 1) -> WorstPerturbation:
    """The perturbation ``E`` of least 2-norm with ``z`` an eigenvalue of ``A + E``.

    With ``(zI - A) v = s u`` for the smallest singular value ``s`` and unit singular vectors ``u``,
    ``v``, ``E = s u v^H`` gives ``(A + E) v = z v`` and ``||E|| = s``; by the definition of the
    pseudospectrum no smaller one exists: ``z`` enters ``sigma(A + E)`` exactly when ``||E|| >=
    sigma_min(zI - A)``. ``E`` is complex in general, even for a real ``A``: a *real* perturbation
    may need to be larger (real structured pseudospectra).

    Example
    -------
    >>> A = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    >>> p = worst_case_perturbation(A, 0.1)
    >>> round(p.norm, 9), p.residual < 1e-14
    (0.009901951, True)
    """
    M = _matrix(A).to(torch.complex128)
    n = M.shape[0]
    zc = complex(z)
    with pinned_threads(threads):
        U, S, Vh = torch.linalg.svd(zc * torch.eye(n, dtype=torch.complex128) - M)
    s, u, v = float(S[-1]), U[:, -1], Vh[-1].conj()
    E = s * torch.outer(u, v.conj())
    residual = float(torch.linalg.vector_norm((M + E) @ v - zc * v))
    return WorstPerturbation(E, s, zc, v, residual)


# --------------------------------------------------------------------------------------------
# plotting


def plot_pseudospectrum(
    ax, sigma, re=None, im=None, *, levels: Sequence[float] = (-1.0, -1.5, -2.0, -3.0),
    eigenvalues=None, unit_circle: bool = True, labels: bool = True, cmap: str = "viridis",
):  # fmt: skip
    """Draw the boundaries of ``sigma_eps(A)`` for ``log10(eps)`` in ``levels`` on ``ax``.

    Parameters
    ----------
    ax
        A matplotlib axes.
    sigma
        The :class:`~sensitivity_lib.results.Estimate` returned by :func:`sigma_min_grid` (its
        ``re``, ``im`` and eigenvalues are used), or an array ``(len(im), len(re))`` of
        ``sigma_min`` with ``re`` and ``im`` given.
    levels
        ``log10(eps)`` of the contours (each one the boundary of an epsilon-pseudospectrum).
    eigenvalues
        Points drawn as dots (default: those stored in ``sigma``'s ``extra``).
    unit_circle
        Draw ``|z| = 1`` (the stability boundary of discrete time).
    labels
        Label the contours with their ``log10(eps)``.

    Returns
    -------
    matplotlib.contour.QuadContourSet
        The contour set (for a colour bar).
    """
    import matplotlib.pyplot as plt

    if isinstance(sigma, Estimate):
        re = sigma.extra["re"] if re is None else re
        im = sigma.extra["im"] if im is None else im
        if eigenvalues is None:
            eigenvalues = sigma.extra.get("eigenvalues")
        sigma = sigma.value
    if re is None or im is None:
        raise ValueError("give re and im with a bare sigma array (or pass sigma_min_grid's Estimate)")
    s = np.asarray(sigma.detach().cpu() if isinstance(sigma, torch.Tensor) else sigma, dtype=np.float64)
    re, im = np.asarray(re, dtype=np.float64), np.asarray(im, dtype=np.float64)
    if s.shape != (len(im), len(re)):
        raise ValueError(f"sigma has shape {s.shape}, expected (len(im), len(re)) = {(len(im), len(re))}")
    lv = sorted(float(v) for v in levels)
    logs = np.log10(np.maximum(s, np.finfo(np.float64).tiny))
    cs = ax.contour(re, im, logs, levels=lv, cmap=plt.get_cmap(cmap), linewidths=1.2)
    if labels:
        ax.clabel(cs, fmt=lambda v: f"{v:g}", fontsize=7)
    if unit_circle:
        t = np.linspace(0, 2 * np.pi, 400)
        ax.plot(np.cos(t), np.sin(t), color="0.35", lw=0.9, ls="--", label="unit circle")
    if eigenvalues is not None:
        ev = np.asarray(torch.as_tensor(eigenvalues).detach().cpu().numpy(), dtype=np.complex128)
        ax.plot(ev.real, ev.imag, ".", color="k", ms=3, label="eigenvalues")
    ax.set_xlim(re[0], re[-1])
    ax.set_ylim(im[0], im[-1])
    ax.set_aspect("equal")
    ax.set_xlabel("Re z")
    ax.set_ylabel("Im z")
    return cs

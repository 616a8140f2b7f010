"""Benchmark: ``sigma_min_grid`` on a 200 x 200 non-normal matrix over a 100 x 100 grid.

Run::

    python benchmarks/bench_pseudospectra.py                    # everything (the dense baseline: ~1 min CPU)
    python benchmarks/bench_pseudospectra.py --dense-points 500 # the dense baseline on a sample

The matrix is ``G / sqrt(n)`` with ``G`` standard Gaussian (seed 0): the random recurrent matrix of
the book's Part III, non-normal (Henrici ratio about 0.7). The grid is EigTool's default window:
the eigenvalues' bounding box widened by a third of its larger side on every side (about
[-1.67, 1.67]^2 here), 100 x 100 points, symmetric about the real axis.

What is timed, all in the same run and in one thread (``pinned_threads(1)``: with two BLAS threads
the complex dense SVDs ran up to 600x slower on a 2-core machine), wall-clock seconds and, in
brackets, CPU seconds of this process (steadier when the machine is shared):

``ours``
    ``sigma_min_grid(A, re, im)``: one real Schur decomposition (``A`` is real: the solves' matrix
    products then run in real arithmetic), then Lanczos
    (``sensitivity_lib.krylov.top_eig``, ``tol=1e-8`` on ``1 / sigma^2``) on the batched operators
    ``(zI - T)^-1 (zI - T)^-H``, coarse to fine (a quarter of the points from random starts, then
    the rest from their neighbours' vectors), converged points leaving, and the rows below the real
    axis taken from their mirror images (``A`` is real: exact).
``ours, every point``
    The same with ``symmetry=False``: every grid point iterated.
``dense``
    ``scipy.linalg.svdvals(z I - A)`` per point, the naive method (on ``--dense-points`` points
    spread over the grid when given, extrapolated to the whole grid; default: every point).

``ours`` and ``dense`` are timed in ``--rounds`` alternations (default 5): round ``r`` runs ours
on the whole grid, then the dense SVDs of one ``rounds``-th of the points; each round's ratio
compares the two under the same machine conditions (the speed of a shared 2-core machine drifted
by 30% within a minute), and the table shows the medians.
``point by point``
    Pitfall 1: the same inverse Lanczos (``top_eig``, same tolerance) one point at a time, each
    product two SciPy triangular solves (``solve_triangular``, LAPACK ``trtrs``) on the complex Schur
    factor:
    the interpreter's overhead per step is of the order of the solves themselves. On
    ``--loop-points`` points, extrapolated.
``floor``
    The Schur decomposition plus, for every grid point computed, one batched triangular solve pair
    per Lanczos step it took (the pair timed alone on all points at once and divided by their
    number): what ``ours`` would cost if the Lanczos bookkeeping (orthogonalisation, the
    tridiagonal eigenproblems, the stopping rule) were free.

Also measured: complex ``svdvals`` of one ``zI - A`` at one and at two BLAS threads (pitfall 2), and
the largest relative difference between ``ours`` and ``dense`` on the points both computed.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import numpy as np
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits

from sensitivity_lib import pseudospectra as ps
from sensitivity_lib.krylov import LinearOperator, top_eig


class Clock:
    """Wall-clock and process CPU seconds of the last timed block."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    @contextmanager
    def __call__(self):
        w, c = time.perf_counter(), time.process_time()
        yield
        self.wall = time.perf_counter() - w
        self.cpu = time.process_time() - c


def eigtool_window(lam: np.ndarray) -> tuple[float, float, float, float]:
    """EigTool's default axes: the eigenvalues' bounding box, widened by a third of its larger side."""
    x0, x1, y0, y1 = lam.real.min(), lam.real.max(), lam.imag.min(), lam.imag.max()
    ext = max(x1 - x0, y1 - y0) / 3
    return x0 - ext, x1 + ext, y0 - ext, y1 + ext


def point_by_point(T: np.ndarray, zs: np.ndarray, tol: float) -> tuple[np.ndarray, int]:
    """Inverse Lanczos one point at a time, each product two LAPACK triangular solves."""
    n = len(T)
    out, steps = np.empty(len(zs)), 0
    for i, z in enumerate(zs):
        M = z * np.eye(n) - T

        def mv(v: torch.Tensor, M=M) -> torch.Tensor:
            x = v[0].numpy().view(np.complex128)
            y = scipy.linalg.solve_triangular(M, x, trans="C", check_finite=False)
            y = scipy.linalg.solve_triangular(M, y, check_finite=False)
            return torch.from_numpy(y.view(np.float64).copy())[None]

        op = LinearOperator(mv, in_shape=(2 * n,), batch=1, dtype=torch.float64)
        r = top_eig(op, tol=tol, max_iter=300, max_basis=40, generator=torch.Generator().manual_seed(i))
        out[i] = 1 / np.sqrt(float(r.value[0]))
        steps += int(r.iterations[0])
    return out, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--grid", type=int, default=100)
    ap.add_argument("--tol", type=float, default=1e-8)
    ap.add_argument("--dense-points", type=int, default=0, help="0: every grid point")
    ap.add_argument("--loop-points", type=int, default=200)
    ap.add_argument("--thread-points", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5, help="alternations of ours and the dense baseline")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    A = rng.standard_normal((args.n, args.n)) / np.sqrt(args.n)
    lam = np.linalg.eigvals(A)
    x0, x1, y0, y1 = eigtool_window(lam)
    re, im = np.linspace(x0, x1, args.grid), np.linspace(y0, y1, args.grid)
    Z = re[None, :] + 1j * im[:, None]
    N = Z.size
    clock = Clock()
    rows = []
    print(f"A = G / sqrt(n), n = {args.n}, seed 0; grid {args.grid} x {args.grid} on "
          f"[{x0:.3f}, {x1:.3f}] x [{y0:.3f}, {y1:.3f}] (EigTool's default window); tol {args.tol:g}; "
          "1 thread")  # fmt: skip

    flat = Z.reshape(-1)
    pick = np.arange(N)
    if args.dense_points > 0:
        pick = np.linspace(0, N - 1, args.dense_points).astype(int)
    ref = np.empty(len(pick))
    with ps.pinned_threads(1):
        ps.sigma_min_grid(A, re[:4], im[:4], tol=args.tol)  # warm-up (imports, allocator)
        # ours and the dense baseline in alternation: round r times ours on the whole grid, then
        # the dense SVDs of every rounds-th point from r (extrapolated to the grid), so that both
        # sides of each ratio see the same machine (on a shared 2-core machine the speed of both
        # drifted by 30% within a minute)
        rounds, ours_t, dense_t = [], [], []
        for r in range(args.rounds):
            with clock():
                ours = ps.sigma_min_grid(A, re, im, tol=args.tol)
            ours_t.append((clock.wall, clock.cpu))
            part = np.arange(r, len(pick), args.rounds)
            with clock():
                for i in part:
                    ref[i] = scipy.linalg.svdvals(flat[pick[i]] * np.eye(args.n) - A)[-1]
            dense_t.append((clock.wall * N / len(part), clock.cpu * N / len(part)))
            rounds.append(dense_t[-1][0] / ours_t[-1][0])
        t_ours = tuple(float(np.median([t[k] for t in ours_t])) for k in (0, 1))
        t_dense = tuple(float(np.median([t[k] for t in dense_t])) for k in (0, 1))
        with clock():
            every = ps.sigma_min_grid(A, re, im, tol=args.tol, symmetry=False)
        t_every = (clock.wall, clock.cpu)
        s_ours = ours.value.numpy()

        # the floor: Schur + (sum of steps) x (one batched solve pair per point)
        with clock():
            T, _ = ps.schur_form(A, real=True)  # as sigma_min_grid factors a real A
        t_schur = (clock.wall, clock.cpu)
        computed = int(ours.extra["points_computed"])
        keep = im >= -1e-12 * max(1.0, float(np.abs(im).max()))
        steps = int(ours.extra["iterations"][torch.from_numpy(keep)].sum())
        zc = torch.from_numpy(Z[keep].reshape(-1))
        op = ps.inverse_gram_operator(T, zc)
        v = torch.randn(len(zc), 2 * args.n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        op.matvec(v)
        with clock():
            op.matvec(v)
        pair = (clock.wall / len(zc), clock.cpu / len(zc))
        floor = (t_schur[0] + steps * pair[0], t_schur[1] + steps * pair[1])

        err = float(np.max(np.abs(s_ours.reshape(-1)[pick] - ref) / ref))

        # pitfall 1: one point at a time
        loop_pick = np.linspace(0, N - 1, args.loop_points).astype(int)
        with clock():
            Tc, _ = ps.schur_form(A)  # triangular, for LAPACK's trtrs
            loop_vals, loop_steps = point_by_point(Tc.numpy(), flat[loop_pick], args.tol)
        t_loop = (clock.wall * N / len(loop_pick), clock.cpu * N / len(loop_pick))
        err_loop = float(np.max(np.abs(loop_vals - s_ours.reshape(-1)[loop_pick]) / loop_vals))

    # pitfall 2: complex dense SVDs at one and two BLAS threads
    tp = [flat[k] * np.eye(args.n) - A for k in np.linspace(0, N - 1, args.thread_points).astype(int)]
    per_thread = {}
    for threads in (1, 2):
        with threadpool_limits(limits=threads), clock():
            for M in tp:
                scipy.linalg.svdvals(M)
        per_thread[threads] = (clock.wall / len(tp), clock.cpu / len(tp))

    def row(name, t, note=""):
        rows.append((name, t[0], t[1], t_dense[0] / t[0], t_dense[1] / t[1], note))

    row("dense svdvals per point", t_dense, f"{len(pick)} of {N} points timed" if len(pick) < N else "")
    row("point by point (LAPACK solves)", t_loop, f"{args.loop_points} points timed; "
        f"{loop_steps / args.loop_points:.1f} steps/point")  # fmt: skip
    row("ours, every point", t_every, f"{N} points; "
        f"{float(every.extra['iterations'].double().mean()):.1f} steps/point")  # fmt: skip
    row("ours", t_ours, f"{computed} points (mirror rows); {steps / computed:.1f} steps/point")
    row("floor", floor, f"Schur {t_schur[1]:.3f} s + {steps} steps x {pair[1] * 1e6:.1f} us")

    print(f"\n{'':34s} {'wall s':>8s} {'(cpu s)':>9s} {'dense / this':>13s} {'(cpu)':>7s}")
    for name, w, c, rw, rc, note in rows:
        print(f"{name:34s} {w:8.2f} {f'({c:.2f})':>9s} {rw:13.1f} {f'({rc:.1f})':>7s}   {note}")
    print(f"\nours and dense in {args.rounds} alternating rounds (medians above); dense / ours per round: "
          + ", ".join(f"{x:.1f}" for x in rounds)
          + f"; ours {min(t[0] for t in ours_t):.2f}-{max(t[0] for t in ours_t):.2f} s wall")
    print(f"ours against dense: largest relative difference {err:.1e} on {len(pick)} points; "
          f"point by point against ours: {err_loop:.1e}")  # fmt: skip
    print(f"ours / floor: {t_ours[0] / floor[0]:.2f} wall ({t_ours[1] / floor[1]:.2f} cpu): the rest is the "
          "Lanczos bookkeeping (vector updates, re-orthogonalisation, tridiagonal eigenproblems) and "
          "the steps the stopping rule waits after convergence")  # fmt: skip
    print(f"complex svdvals, one {args.n}x{args.n} matrix: 1 BLAS thread {per_thread[1][0] * 1e3:.1f} ms, "
          f"2 threads {per_thread[2][0] * 1e3:.1f} ms ({per_thread[2][0] / per_thread[1][0]:.0f}x slower)")


if __name__ == "__main__":
    main()

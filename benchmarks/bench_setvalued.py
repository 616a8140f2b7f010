"""Benchmark: the matrix-free graphical derivative against the dense eigendecomposition, on one point.

Problem: the residual MLP of Part IV's chapter 12 (blocks ``h <- h + W2 relu(W1 h + b1) + b2``,
squared error on one-hot targets) on the first ``n`` 8x8 digits, float64, trained by
:func:`sensitivity_lib.setvalued.fit` for ``--fit`` L-BFGS steps (0: random weights) to ``w_bar``; ten
images perturbed along random unit directions (``dx``).

What is compared, and why. Both solvers must target the same, well-defined point, or the ratio of
their times means nothing. The undamped graphical derivative does not give one here: at ``w_bar``
(300 steps, gradient norm about 1e-3) the Hessian ``H`` has eigenvalues all the way down to the dense
cut-off (``1e-8`` of the largest) and some negative ones (about ``-3e-5`` of the largest, since
``w_bar`` is not an exact minimum), so the minimum-norm point ``-H^+ b`` depends on which of those
directions a method resolves: the dense pseudo-inverse divides by them all, MINRES stops once its
residual test passes, and the two answers differ by order one at the same residual (run with
``--damping 0`` to see it; the run then fails). Training longer does not cure this (the spectrum of a
trained network decays continuously to zero), and a spectral cut-off is not something MINRES can
honour. So we time the damped problem, the influence function of Koh & Liang with their damping
(chapter 11, "the influence function as the special case"):

    ``loss_lambda(w, x) = loss(w, x) + lambda / 2 ||w - w_bar||^2``,  Hessian ``H + lambda I``,

same mixed derivative ``b``, and one answer: ``v_lambda = -(H + lambda I)^{-1} b``. ``lambda`` is
``--damping`` times the largest eigenvalue of ``H`` (found by :func:`sensitivity_lib.krylov.top_eig`
on Hessian-vector products, before the clocks start); with ``--damping 1e-3`` it is about thirty
times the most negative eigenvalue, so ``H + lambda I`` is positive definite with condition number
``kappa`` near ``1e3`` (the dense spectrum reports it). A relative residual ``tol`` then bounds the
relative error of the point by ``kappa * tol``.

Timed, for each width (the clocks see nothing else):

* dense: ``graphical_derivative(loss_lambda, ..., method="dense")`` (the Hessian from ``p``
  Hessian-vector products, then ``eigh``; only up to ``--dense-max`` weights: it needs ``16 p^2``
  bytes and ``O(p^3)`` time, about 40 s at ``p = 5,410`` (width 24, the largest of the default
  ``--dense-max 6000``) and 140 s at ``p = 8,746`` on one core; its cut-off removes nothing here,
  which is checked);
* matrix-free: ``graphical_derivative(loss_lambda, ..., method="minres", tol=--tol)``
  (Hessian-vector products only).

The table gives ``p``, ``lambda``, ``kappa`` (dense sizes), the seconds of both, their ratio dense /
matrix-free measured in the same run, the Hessian-vector products of the matrix-free solve, and the
relative difference ``||v_dense - v_mf|| / ||v_dense||`` of the two points. The run FAILS (exit status
1, after the table) when a difference exceeds ``--max-diff`` (1e-6 by default, above the bound
``kappa * tol = 1e-7`` and far below order one), when the matrix-free solve misses ``tol``, or when
the damped Hessian is singular (eigenvalues below the dense cut-off). The widths continue past
``--dense-max`` without the dense solve; the last line gives the largest parameter count whose
matrix-free solve of the damped problem finished within ``--budget`` seconds (60 by default; the
widths grow until one does not, else the line says it is a lower bound: the default widths end at
512, ``p = 1.6e6``, whose training takes minutes). Each width's training and ``lambda`` are not timed.

The dense method is the library's ``eigh`` path, which also serves the undamped set (its kernel and
minimum-norm point); a Cholesky factorisation of ``H + lambda I`` would be cheaper than ``eigh`` but
would still need the ``p`` products and the ``p x p`` matrix.

Usage::

    python benchmarks/bench_setvalued.py
    python benchmarks/bench_setvalued.py --widths 8 16 --budget 10   # a smoke run
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch
import torch.nn.functional as F
from timing import timed
from torch import nn

from sensitivity_lib import data, krylov
from sensitivity_lib import setvalued as sv
from sensitivity_lib.krylov import NotConvergedWarning


class ResMLP(nn.Module):
    def __init__(self, d_in: int, width: int, blocks: int, classes: int = 10):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)) for _ in range(blocks)
        )
        self.out = nn.Linear(width, classes)

    def forward(self, x):
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def problem(width: int, blocks: int, n: int, fit: int):
    digits = data.digits8x8()
    x = digits.images[:n].double()
    y = F.one_hot(digits.labels[:n], 10).double()
    torch.manual_seed(0)
    net = ResMLP(x[0].numel(), width, blocks).double().eval()
    loss = sv.module_loss(net, (x, y), sv.squared_error)
    w = loss.w
    if fit > 0:
        w = sv.fit(loss, w, loss.x, max_iter=fit, gtol=1e-9).w
    g = torch.Generator().manual_seed(1)
    dx = torch.zeros_like(loss.x)
    d = torch.randn(dx[:10].shape, generator=g, dtype=torch.float64)
    dx[:10] = 0.05 * d / d.flatten(1).norm(dim=1).view(-1, *[1] * (d.dim() - 1))
    return loss, w, dx


def damped_problem(loss, w_bar: torch.Tensor, damping: float):
    """``(loss_lambda, lambda)``: ``lambda = damping * lambda_max(H)`` (Lanczos, 1e-6)."""
    lam = 0.0
    if damping > 0:
        top = krylov.top_eig(sv.hessian_operator(loss, w_bar, loss.x), tol=1e-6,
                             generator=torch.Generator().manual_seed(2))  # fmt: skip
        lam = damping * float(top.value[0])

    def loss_lambda(w, x):
        return loss(w, x) + 0.5 * lam * ((w - w_bar) ** 2).sum()

    return loss_lambda, lam



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[8, 16, 24, 32, 64, 128, 256, 512])
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--n", type=int, default=100, help="training images")
    ap.add_argument("--fit", type=int, default=300, help="L-BFGS steps before timing (0: random weights)")
    ap.add_argument("--damping", type=float, default=1e-3, help="lambda / lambda_max(H); 0: undamped")
    ap.add_argument("--tol", type=float, default=1e-10, help="MINRES relative residual")
    ap.add_argument("--max-diff", type=float, default=1e-6, help="largest relative difference accepted")
    ap.add_argument("--dense-max", type=int, default=6000, help="largest p decomposed densely")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds for the largest-p search")
    args = ap.parse_args()
    print(f"damped problem H + lambda I, lambda = {args.damping:g} lambda_max(H); MINRES tol "
          f"{args.tol:g}; pass: relative difference <= {args.max_diff:g}; "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    head = (f"{'width':>6} {'p':>8} {'lambda':>8} {'kappa':>8} {'dense s':>8} {'mf s':>8} "
            f"{'ratio':>6} {'HVPs':>5} {'rel diff':>8}")  # fmt: skip
    print(head + " check", flush=True)
    largest, failures, over = 0, [], False
    for width in args.widths:
        loss, w, dx = problem(width, args.blocks, args.n, args.fit)
        loss_lambda, lam = damped_problem(loss, w, args.damping)
        with warnings.catch_warnings():  # a missed tol is reported in the table and fails the run
            warnings.simplefilter("ignore", NotConvergedWarning)
            mf, t_mf = timed(
                lambda: sv.graphical_derivative(loss_lambda, w, loss.x, dx, method="minres", tol=args.tol)  # noqa: B023
            )
        problems = [] if mf.converged else [f"MINRES missed tol ({mf.extra['status']})"]
        dense_s, ratio, diff, kappa = "-", "-", "-", "-"
        if loss.p <= args.dense_max:
            de, t_de = timed(lambda: sv.graphical_derivative(loss_lambda, w, loss.x, dx, method="dense"))  # noqa: B023
            ev = de.extra["eigenvalues"]
            rel = float((de.point - mf.point).norm() / de.point.norm())
            dense_s, ratio, diff = f"{t_de:8.2f}", f"{t_de / t_mf:6.1f}", f"{rel:8.1e}"
            kappa = f"{float(ev.abs().max() / ev.abs().min()):8.1e}"
            if de.kernel_dim != 0:  # a kernel left: the point is not unique
                problems.append(f"H + lambda I is singular ({de.kernel_dim} eigenvalues below the cut-off)")
            if not rel <= args.max_diff:
                problems.append(f"the points differ by {rel:.1e} > {args.max_diff:g}")
        print(f"{width:>6} {loss.p:>8} {lam:8.1e} {kappa:>8} {dense_s:>8} {t_mf:8.2f} {ratio:>6} "
              f"{mf.products:>5} {diff:>8} {'FAIL' if problems else 'ok'}", flush=True)  # fmt: skip
        failures += [f"width {width} (p = {loss.p}): {m}" for m in problems]
        if t_mf <= args.budget:
            largest = max(largest, loss.p)
        else:
            over = True
            break
    bound = "" if over else " (a lower bound: every width finished in time; add wider ones)"
    print(f"largest p whose matrix-free solve (damped, tol {args.tol:g}) took <= {args.budget:g} s: "
          f"{largest}{bound}")  # fmt: skip
    if failures:
        print("FAILED: the dense and matrix-free points must agree to the stated tolerance:\n  "
              + "\n  ".join(failures), file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

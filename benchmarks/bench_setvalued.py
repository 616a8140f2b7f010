"""Benchmark: the matrix-free graphical derivative against the dense eigendecomposition.

Problem: the residual MLP of Part IV's chapter 10 (blocks ``h <- h + W2 relu(W1 h + b1) + b2``,
squared error on one-hot targets) on the first ``n`` 8x8 digits, float64, trained by
:func:`sensitivity_lib.setvalued.fit` for ``--fit`` L-BFGS steps (0: random weights); ten images
perturbed along random unit directions. Timed, for each width:

* dense: ``graphical_derivative(..., method="dense")`` (the Hessian from ``p`` Hessian-vector
  products, then ``eigh``; only up to ``--dense-max`` weights: it needs ``8 p^2`` bytes);
* ours: ``graphical_derivative(..., method="minres", tol=--tol)`` (Hessian-vector products only).

The table gives the seconds, the ratio dense / minres measured in the same run, the number of
Hessian-vector products, the relative residuals ``||H v + b|| / ||b||`` of both answers, the relative
difference of the two points, and the largest parameter count whose matrix-free solve finished within
``--budget`` seconds (60 by default; the widths double until one does not).

Read the difference with the residuals. A trained network's Hessian has eigenvalues all the way down
to the dense cut-off (``1e-8`` of the largest); the dense pseudo-inverse divides by them, while MINRES
stops once the residual test at ``--tol`` passes, before it resolves those directions. Both answers
then solve the linearised equations to about the same residual and still differ by order one: the
equations do not determine those directions at this tolerance. The two agree to the solver
tolerance only on well-separated spectra (``tests/test_setvalued.py``).

Usage::

    python benchmarks/bench_setvalued.py
    python benchmarks/bench_setvalued.py --widths 8 16 --fit 0 --budget 10   # a smoke run
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from sensitivity_lib import data
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


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--n", type=int, default=100, help="training images")
    ap.add_argument("--fit", type=int, default=300, help="L-BFGS steps before timing (0: random weights)")
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--dense-max", type=int, default=6000, help="largest p decomposed densely")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds for the largest-p search")
    args = ap.parse_args()
    head = (f"{'width':>6} {'p':>8} {'dense s':>9} {'minres s':>9} {'ratio':>7} {'HVPs':>6} "
            f"{'res dense':>9} {'res mf':>9} {'rel diff':>9}")
    print(head + " status", flush=True)
    largest = 0
    for width in args.widths:
        loss, w, dx = problem(width, args.blocks, args.n, args.fit)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotConvergedWarning)
            mf, t_mf = timed(
                lambda: sv.graphical_derivative(loss, w, loss.x, dx, method="minres", tol=args.tol)  # noqa: B023
            )
        dense_s, ratio, diff, res_de = "-", "-", "-", "-"
        if loss.p <= args.dense_max:
            de, t_de = timed(lambda: sv.graphical_derivative(loss, w, loss.x, dx, method="dense"))  # noqa: B023
            dense_s, ratio = f"{t_de:9.2f}", f"{t_de / t_mf:7.1f}"
            diff = f"{float((de.point - mf.point).norm() / de.point.norm()):9.1e}"
            res_de = f"{de.residual:9.1e}"
        print(f"{width:>6} {loss.p:>8} {dense_s:>9} {t_mf:9.2f} {ratio:>7} {mf.products:>6} "
              f"{res_de:>9} {mf.residual:9.1e} {diff:>9} {mf.extra['status']}", flush=True)  # fmt: skip
        if t_mf <= args.budget:
            largest = max(largest, loss.p)
        else:
            break
    print(f"largest p whose matrix-free solve (tol {args.tol:g}) took <= {args.budget:g} s: {largest}")


if __name__ == "__main__":
    main()

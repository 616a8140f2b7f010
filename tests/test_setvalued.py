"""Tests of sensitivity_lib.setvalued (Part IV, Wang, Wang & Ban) against hand computations and
dense float64 oracles.

The claims under test: the paper's toy reproduces (loss 0.4 at the original weights on the
perturbed data, about 0.012 at the minimum-norm point, radius about 0.178, modulus 0.4); the
distances are those of simple sets; the dense and matrix-free solvers agree to the solver
tolerance; the residual says when b is outside the range of H; with a damped (invertible) Hessian
the set is the influence function; Theorem 2's closed form equals the numerical one-sample,
one-layer modulus; bad input raises a clear error.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import dense_influence, teacher_network
from scipy.spatial.distance import directed_hausdorff
from torch import nn

from sensitivity_lib import setvalued as sv
from sensitivity_lib.krylov import NotConvergedWarning

torch.set_num_threads(1)
f64 = torch.float64

# ----------------------------------------------------------------------------------------------
# the paper's toy: f = w1 w2 x, data (1, 2), (2, 4), loss the sum of squared errors over 2


Y = torch.tensor([2.0, 4.0], dtype=f64)
X = torch.tensor([1.0, 2.0], dtype=f64)
W = torch.tensor([1.0, 2.0], dtype=f64)
DX = 0.2 * torch.tensor([-1.0, -2.0], dtype=f64)


def toy_loss(w, x):
    return 0.5 * ((Y - w[0] * w[1] * x) ** 2).sum()


def test_toy_numbers_against_hand_computation():
    xp = X + DX  # (0.8, 1.6)
    # by hand: residuals at w = (1, 2) on the perturbed data are 2 - 1.6 and 4 - 3.2
    assert float(toy_loss(W, xp)) == pytest.approx(0.5 * (0.4**2 + 0.8**2), abs=1e-15)
    assert float(toy_loss(W, xp)) == pytest.approx(0.4, abs=1e-15)
    ds = sv.graphical_derivative(toy_loss, W, X, DX)
    # by hand: H = 5 g g^T with g = (w2, w1) = (2, 1); b = R_x dx = g (2 u x_i - y_i)_i . dx
    g = torch.tensor([2.0, 1.0], dtype=f64)
    b = g * (torch.tensor([2.0, 4.0], dtype=f64) @ DX)  # = -2 g
    v_hand = -g * (g @ b) / (5 * (g @ g) ** 2)  # -H^+ b = 0.4 g / 5 = (0.16, 0.08)
    assert torch.allclose(ds.point, v_hand, atol=1e-14)
    assert torch.allclose(ds.point, torch.tensor([0.16, 0.08], dtype=f64), atol=1e-14)
    assert ds.kernel_dim == 1 and ds.residual < 1e-14
    assert abs(float(ds.basis[:, 0] @ g)) < 1e-14  # the kernel is g's orthogonal complement
    u = (W + ds.point)[0] * (W + ds.point)[1]
    loss_if = 0.5 * float(((Y - u * xp) ** 2).sum())
    assert float(toy_loss(W + ds.point, xp)) == pytest.approx(loss_if, rel=1e-14)
    assert loss_if == pytest.approx(0.012, abs=5e-4)
    # radius = ||v*|| = kappa ||dx|| with kappa = 0.4 (the paper prints 0.2)
    radius = float(ds.point.norm())
    assert radius == pytest.approx(0.4 * math.sqrt(0.2), rel=1e-12)
    assert radius == pytest.approx(0.178, abs=1e-3)
    kappa_hand = float(g.norm() * torch.tensor([2.0, 4.0], dtype=f64).norm()) / 25
    for method in ("dense", "lsqr"):
        k = sv.lipschitz_modulus(toy_loss, W, X, method=method, tol=1e-8)
        assert float(k) == pytest.approx(kappa_hand, rel=1e-6) and kappa_hand == pytest.approx(0.4)
        assert k.extra["aubin"]
    # members of the set sit on the line 2 v1 + v2 = 0.4 and reach low perturbed loss near v*
    members = ds.sample(5, radius=0.05, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(2 * members[:, 0] + members[:, 1], torch.full((5,), 0.4, dtype=f64), atol=1e-14)
    assert bool(((members - ds.point).norm(dim=1) <= 0.05 + 1e-15).all())
    assert max(float(toy_loss(W + m, xp)) for m in members) < 0.03


def test_toy_per_point_moduli_and_ratio_limit():
    k1 = sv.lipschitz_modulus(toy_loss, W, X, rows=[0])
    k2 = sv.lipschitz_modulus(toy_loss, W, X, rows=[1])
    g = torch.tensor([2.0, 1.0], dtype=f64)
    assert float(k1) == pytest.approx(float(g.norm()) * 2 / 25, rel=1e-12)  # 0.179
    assert float(k2) == pytest.approx(float(g.norm()) * 4 / 25, rel=1e-12)  # 0.358
    # d(w, S(x^p)) / ||dx|| -> 0.4 with S(x^p) = {w1 w2 = c(delta)}, by 1-D minimisation
    from scipy.optimize import minimize_scalar

    ratios = []
    for delta in (1e-2, 1e-3):
        dx = delta * torch.tensor([-1.0, -2.0], dtype=f64)
        xp = (X + dx).numpy()
        c = float(Y.numpy() @ xp / (xp @ xp))
        r = minimize_scalar(lambda t, c=c: (t - 1) ** 2 + (c / t - 2) ** 2, bounds=(0.5, 2), method="bounded",
                            options={"xatol": 1e-13})  # fmt: skip
        ratios.append(math.sqrt(r.fun) / float(dx.norm()))
    assert abs(ratios[1] - 0.4) < abs(ratios[0] - 0.4) < 0.01
    assert abs(ratios[1] - 0.4) < 1e-3


# ----------------------------------------------------------------------------------------------
# distances


def test_parallel_segments():
    t = torch.arange(0, 201, dtype=f64) / 200
    A = torch.stack([t, torch.zeros_like(t)], 1)
    B = torch.stack([t, torch.full_like(t, 0.3)], 1)
    assert float(sv.hausdorff(A, B)) == pytest.approx(0.3, abs=1e-15)
    Bl = torch.stack([torch.arange(0, 301, dtype=f64) / 200, torch.full((301,), 0.3, dtype=f64)], 1)
    assert float(sv.excess(A, Bl)) == pytest.approx(0.3, abs=1e-15)  # A lies under B
    assert float(sv.excess(Bl, A)) == pytest.approx(math.hypot(0.5, 0.3), abs=1e-15)
    assert float(sv.hausdorff(A, Bl)) == float(sv.hausdorff(Bl, A))


def test_nested_balls():
    ang = torch.arange(720, dtype=f64) * (2 * math.pi / 720)
    circle = torch.stack([ang.cos(), ang.sin()], 1)
    r = torch.linspace(0, 1, 21, dtype=f64)
    A = (r[:, None, None] * circle[None]).reshape(-1, 2)  # the unit disc
    B = torch.cat([A] + [s * circle for s in (1.25, 1.5)])  # the disc of radius 1.5, sampled
    assert float(sv.excess(A, B)) == 0.0  # A is a subset of B
    assert float(sv.excess(B, A)) == pytest.approx(0.5, abs=1e-14)
    assert float(sv.hausdorff(A, B)) == pytest.approx(0.5, abs=1e-14)


def test_distances_match_scipy_and_batch():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(4, 50, 3, generator=g, dtype=f64)
    B = torch.randn(4, 70, 3, generator=g, dtype=f64) + 0.5
    e = sv.excess(A, B)
    assert e.shape == (4,)
    for i in range(4):
        assert float(e[i]) == pytest.approx(directed_hausdorff(A[i].numpy(), B[i].numpy())[0], rel=1e-14)
        assert float(sv.hausdorff(A[i], B[i])) == pytest.approx(float(sv.hausdorff(A, B)[i]), rel=1e-15)
    d = sv.distance(A[0, :5], B[0])
    assert d.shape == (5,)
    assert float(d[2]) == pytest.approx(float((B[0] - A[0, 2]).norm(dim=1).min()), rel=1e-15)
    assert sv.distance(A[0, 0], B[0].numpy()).dim() == 0
    # no loss of digits for nearby points (the matmul shortcut would give ~1e-8 here)
    P = torch.tensor([[1e4, 1e4]], dtype=f64)
    near = P + torch.tensor([[3e-9, 4e-9]], dtype=f64)
    assert float(sv.distance(P[0], near)) == pytest.approx(5e-9, rel=1e-6)


def test_distance_errors():
    with pytest.raises(ValueError, match="different dimensions"):
        sv.excess(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="empty"):
        sv.excess(torch.zeros(0, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="non-finite"):
        sv.hausdorff(torch.tensor([[float("nan"), 0.0]]), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="one point"):
        sv.distance(torch.zeros(2), torch.zeros(2))


# ----------------------------------------------------------------------------------------------
# small networks


def _student(widths=(5, 8, 6, 1), n=12, seed=0, bias=False):
    """A ReLU net and data labelled by the net itself: w is an exact global minimiser (zero
    residual), so H is the Gauss-Newton matrix with an exact kernel of dimension >= p - n."""
    net = teacher_network(widths, seed, bias)
    x = torch.randn(n, widths[0], generator=torch.Generator().manual_seed(seed + 1), dtype=f64)
    with torch.no_grad():
        y = net(x).squeeze(-1)
    return net, sv.module_loss(net, (x, y))


def _dx(x, k=4, seed=2):
    dx = torch.zeros_like(x)
    dx[:k] = torch.randn(k, *x.shape[1:], generator=torch.Generator().manual_seed(seed), dtype=f64)
    return dx


def test_module_loss_matches_direct_evaluation():
    net, loss = _student(bias=True)
    with torch.no_grad():
        direct = 0.5 * ((net(loss.x).squeeze(-1) - loss.y) ** 2).mean()
    assert float(loss(loss.w, loss.x)) == pytest.approx(float(direct), abs=1e-18)
    w2 = loss.w + 0.1
    loss.load(w2)
    with torch.no_grad():
        again = (0.5 * (net(loss.x).squeeze(-1) - loss.y) ** 2).mean()
        assert float(loss(w2, loss.x)) == pytest.approx(float(again))
    data = (torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
    ce = sv.module_loss(teacher_network((4, 6, 3)), data,
                        lambda out, y: F.cross_entropy(out, y, reduction="none"), reduction="sum")
    assert ce(ce.w, ce.x).dim() == 0
    with pytest.raises(ValueError, match="one value per sample"):
        sv.module_loss(teacher_network((4, 6, 3)), (torch.randn(5, 4), torch.randn(5)), lambda o, y: o)


def test_dense_and_matrix_free_agree_to_solver_tolerance():
    _, loss = _student()
    dx = _dx(loss.x)
    dense = sv.graphical_derivative(loss, loss.w, loss.x, dx)
    assert dense.kernel_dim >= loss.p - loss.x.shape[0]
    assert dense.residual < 1e-12
    tol = 1e-10
    for method in ("minres", "lsqr"):
        mf = sv.graphical_derivative(loss, loss.w, loss.x, dx, method=method, tol=tol)
        assert mf.converged and mf.residual <= tol
        assert float((mf.point - dense.point).norm() / dense.point.norm()) < 100 * tol
        # matrix-free members: kernel offsets are orthogonal to the range of H
        m = mf.sample(2, radius=1.0, generator=torch.Generator().manual_seed(0))
        off = m - mf.point
        rng = dense.extra["eigenvalues"].abs() > 1e-8 * dense.extra["eigenvalues"].abs().max()
        V = sv.hessian_spectrum(loss, loss.w, loss.x).eigenvectors[:, rng]
        assert float((off @ V).norm() / off.norm()) < 1e3 * tol
        assert bool((off.norm(dim=1) <= 1.0 + 1e-12).all())
    dense_k = sv.lipschitz_modulus(loss, loss.w, loss.x, rows=range(4))
    mf_k = sv.lipschitz_modulus(loss, loss.w, loss.x, rows=range(4), method="lsqr", tol=1e-8)
    assert mf_k.converged and float(mf_k) == pytest.approx(float(dense_k), rel=1e-6)
    assert float(mf_k) <= float(dense_k) * (1 + 1e-9)  # a Rayleigh quotient: never above


def test_dense_members_and_paper_weighting():
    _, loss = _student()
    dx = _dx(loss.x, k=3)
    ds = sv.graphical_derivative(loss, loss.w, loss.x, dx)
    members = ds.sample(4, radius=2.0, generator=torch.Generator().manual_seed(5))
    for v in members:
        assert ds.residual_of(v) < 1e-12
        assert float((v - ds.point).norm()) <= 2.0 + 1e-12
        assert float(v.norm()) >= float(ds.point.norm())  # the point has the minimum norm
    paper = sv.graphical_derivative(loss, loss.w, loss.x, dx, weighting="paper")
    n = loss.x.shape[0]
    assert torch.allclose(paper.point, ds.point * n / 3, rtol=1e-12, atol=1e-15)
    kp = sv.lipschitz_modulus(loss, loss.w, loss.x, rows=[0, 1, 2], weighting="paper")
    ke = sv.lipschitz_modulus(loss, loss.w, loss.x, rows=[0, 1, 2])
    assert float(kp) == pytest.approx(float(ke) * n / 3, rel=1e-12)


def test_residual_reports_b_outside_range():
    # loss = w^T A w / 2 - w^T B x: H = A = diag(1, 2, 0), b = -B dx, whose third entry is outside
    A = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=f64))
    Bm = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=f64)

    def loss(w, x):
        return 0.5 * w @ A @ w - w @ (Bm @ x)

    w, x = torch.zeros(3, dtype=f64), torch.ones(2, dtype=f64)
    dx = torch.tensor([1.0, 2.0], dtype=f64)
    b = -(Bm @ dx)
    expected = float(b[2].abs() / b.norm())
    dense = sv.graphical_derivative(loss, w, x, dx)
    assert dense.residual == pytest.approx(expected, rel=1e-12)
    assert torch.allclose(dense.point, torch.tensor([1.0, 1.0, 0.0], dtype=f64), atol=1e-14)
    lsqr = sv.graphical_derivative(loss, w, x, dx, method="lsqr", tol=1e-10)
    assert lsqr.converged and lsqr.extra["status"] == "least-squares"
    assert lsqr.residual == pytest.approx(expected, rel=1e-8)
    assert torch.allclose(lsqr.point, dense.point, atol=1e-9)
    # MINRES is for b in the range: here its iterates wander along ker H, and the solve says so
    with pytest.warns(NotConvergedWarning):
        minres = sv.graphical_derivative(loss, w, x, dx, method="minres", tol=1e-10)
    assert not minres.converged and minres.residual >= expected * (1 - 1e-12)
    # the Mordukhovich criterion fails: R_x has a part outside range H
    with pytest.warns(sv.CriterionWarning):
        k = sv.lipschitz_modulus(loss, w, x)
    assert math.isinf(float(k)) and not k.extra["aubin"] and k.extra["pinv_norm"] > 0


def test_criterion_fails_for_the_cube_root():
    # loss = w^4 / 4 - x w: F(x) = {x^(1/3)}, H = 0 at w = 0, not Lipschitz there
    def loss(w, x):
        return (w**4).sum() / 4 - (w * x).sum()

    with pytest.warns(sv.CriterionWarning):
        k = sv.lipschitz_modulus(loss, torch.zeros(1, dtype=f64), torch.zeros(1, dtype=f64))
    assert math.isinf(float(k))


@pytest.mark.parametrize("damping", [1e-1, 1e-3])
def test_damped_hessian_gives_the_influence_function(damping):
    _, loss = _student(widths=(4, 6, 5, 1), n=6, bias=True)
    w0 = loss.w.clone()

    def damped(w, x):
        return loss(w, x) + 0.5 * damping * ((w - w0) ** 2).sum()

    dx = _dx(loss.x, k=2, seed=7)
    oracle = dense_influence(loss, loss.w, loss.x, dx, damping)
    ds = sv.graphical_derivative(damped, loss.w, loss.x, dx, rtol=1e-12)
    assert ds.kernel_dim == 0  # a single point: the set-valued map is single-valued here
    assert torch.allclose(ds.point, oracle, rtol=1e-9, atol=1e-12 * float(oracle.norm()))
    for method in ("minres", "lsqr"):
        mf = sv.graphical_derivative(damped, loss.w, loss.x, dx, method=method, tol=1e-12)
        assert float((mf.point - oracle).norm() / oracle.norm()) < 1e-8


def test_theorem2_equals_one_sample_one_layer_modulus():
    net = teacher_network((6, 7, 5, 1), seed=4)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(9), dtype=f64)
    for h in (1, 2):
        kap = sv.theorem2_kappa(net, x, h)
        assert kap.value.shape == (3,) and kap.kind == "exact"
        for k in range(3):
            # the autograd ratio ||grad_x f|| / ||grad_{W_h} f||_F
            xk = x[k : k + 1].clone().requires_grad_(True)
            out = net(xk).sum()
            gx, gw = torch.autograd.grad(out, [xk, net[2 * (h - 1)].weight])
            assert float(kap.value[k]) == pytest.approx(float(gx.norm() / gw.norm()), rel=1e-12)
            # the numerical modulus of the layer-h problem on the one sample, at zero residual
            for i, p in enumerate(net.parameters()):
                p.requires_grad_(i == h - 1)
            with torch.no_grad():
                yk = net(x[k : k + 1]).squeeze(-1)
            loss = sv.module_loss(net, (x[k : k + 1], yk))
            numerical = float(sv.lipschitz_modulus(loss, loss.w, loss.x))
            assert numerical == pytest.approx(float(kap.value[k]), rel=1e-9)
            for p in net.parameters():
                p.requires_grad_(True)


def test_fit_reaches_stationarity():
    torch.manual_seed(0)
    A = torch.randn(8, 5, dtype=f64)

    def loss(w, x):
        return 0.5 * ((A @ w - x) ** 2).sum() + 0.05 * (w**4).sum()

    r = sv.fit(loss, torch.zeros(5, dtype=f64), torch.randn(8, dtype=f64), gtol=1e-8)
    assert r.converged and r.grad_norm <= 1e-8


# ----------------------------------------------------------------------------------------------
# bad input


def test_bad_input_raises_clear_errors():
    w = torch.ones(2, dtype=f64)
    x = torch.ones(2, dtype=f64)
    with pytest.raises(ValueError, match="scalar"):
        sv.graphical_derivative(lambda w_, x_: w_ * x_, w, x, x)
    with pytest.raises(ValueError, match="shape of x"):
        sv.graphical_derivative(toy_loss, W, X, torch.zeros(3, dtype=f64))
    for bad in ("w", "x", "dx"):
        args = {"w": W.clone(), "x": X.clone(), "dx": DX.clone()}
        args[bad][0] = float("nan")
        with pytest.raises(ValueError, match="non-finite"):
            sv.graphical_derivative(toy_loss, args["w"], args["x"], args["dx"])
    with pytest.raises(ValueError, match="not finite"):
        sv.lipschitz_modulus(lambda w_, x_: (w_ / 0.0).sum(), w, x)
    with pytest.raises(ValueError, match="flat"):
        sv.graphical_derivative(toy_loss, W[None], X, DX)
    with pytest.raises(ValueError, match="method"):
        sv.graphical_derivative(toy_loss, W, X, DX, method="cg")
    with pytest.raises(ValueError, match="weighting"):
        sv.graphical_derivative(toy_loss, W, X, DX, weighting="1/K")
    with pytest.raises(ValueError, match="rows"):
        sv.lipschitz_modulus(toy_loss, W, X, rows=[5])
    with pytest.raises(TypeError, match="callable"):
        sv.graphical_derivative("loss", W, X, DX)
    with pytest.raises(TypeError, match="floating"):
        sv.graphical_derivative(toy_loss, W, torch.tensor([1, 2]), DX)
    net = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Linear(3, 1))
    with pytest.raises(ValueError, match="training mode"):
        sv.module_loss(net, (torch.zeros(2, 3), torch.zeros(2)))
    with pytest.raises(ValueError, match="same number of samples"):
        sv.module_loss(net.eval(), (torch.zeros(2, 3), torch.zeros(3)))
    with pytest.raises(ValueError, match="bias"):
        sv.theorem2_kappa(net, torch.zeros(2, 3), 1)
    with pytest.raises(ValueError, match="layer must be"):
        sv.theorem2_kappa(teacher_network((3, 4, 1)), torch.zeros(2, 3), 2)


def test_unconverged_solve_is_marked_not_silent():
    _, loss = _student()
    dx = _dx(loss.x)
    with pytest.warns(NotConvergedWarning):
        ds = sv.graphical_derivative(loss, loss.w, loss.x, dx, method="minres", tol=1e-12, max_iter=2)
    assert not ds.converged and ds.iterations <= 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converged run warns about nothing
        sv.graphical_derivative(loss, loss.w, loss.x, dx, method="lsqr", tol=1e-8)


def test_matrix_free_modulus_flags_failed_inner_solves():
    _, loss = _student()
    with pytest.warns(NotConvergedWarning):
        k = sv.lipschitz_modulus(loss, loss.w, loss.x, method="lsqr", solve_max_iter=2, max_iter=20,
                                 tol=1e-3)  # fmt: skip
    assert k.converged is False and k.kind == "estimate"


def test_numpy_input_of_distances():
    a = np.array([[0.0, 0.0], [1.0, 0.0]])
    assert float(sv.hausdorff(a, a + [0.0, 2.0])) == 2.0

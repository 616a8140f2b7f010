"""Tests for what Part II's chapter 7 offers beyond FI of the predicted class: target-class FI,
Cook's local influence (sensitivity_lib.influence.cook), the relative layer sensitivity
(sensitivity_lib.influence.layers) and the Manhattan plot, each against an independent dense or
finite-difference computation on tiny float64 networks."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.autograd.functional import hessian, jacobian  # noqa: E402
from torch.func import functional_call, jacrev  # noqa: E402

from sensitivity_lib import plotting  # noqa: E402
from sensitivity_lib.influence import cook, fi_target, layers  # noqa: E402

DT = torch.float64


def mlp(seed=0, d=5, h=7, c=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c)).to(DT).eval()


# ------------------------------------------------------------------------------------------
# target-class FI


def dense_fi(model, x1, c):
    """df^T G^+ df for omega = the input, f = log p_c, from dense Jacobians (one image)."""
    Jp = jacobian(lambda v: torch.softmax(model(v[None]), -1)[0], x1)  # (C, d)
    p = torch.softmax(model(x1[None]), -1)[0].detach()
    G = Jp.T @ torch.diag(1 / p) @ Jp
    df = Jp[c] / p[c]
    return float(df @ torch.linalg.pinv(G, rtol=1e-10, hermitian=True) @ df)


def test_fi_target_matches_dense_pseudo_inverse_low_dim():
    # input dimension 2 < C - 1 = 4: FI toward each class is not the odds
    net = mlp(1, d=2, h=9, c=5)
    x = torch.rand(4, 2, dtype=DT)
    for c in range(5):
        r = fi_target(net, x, c)
        ref = torch.tensor([dense_fi(net, x[i], c) for i in range(4)], dtype=DT)
        assert torch.allclose(r.value, ref, rtol=1e-7)
        assert (r.value <= r.odds * (1 + 1e-9)).all()
    # runner-up: the second largest logit, and FI toward it differs from FI of the prediction
    r = fi_target(net, x)
    z = net(x)
    assert torch.equal(r.labels, z.topk(2).indices[:, 1])
    with pytest.raises(ValueError, match="runner_up"):
        fi_target(net, x, "nearest")


def test_fi_target_whole_image_is_odds_of_target():
    net = mlp(2, d=12, h=10, c=4)
    x = torch.rand(6, 12, dtype=DT)
    r = fi_target(net, x, 2)
    p2 = torch.softmax(net(x), -1)[:, 2].detach()
    assert torch.allclose(r.value, (1 - p2) / p2, rtol=1e-8)


# ------------------------------------------------------------------------------------------
# Cook's local influence


def dense_cook(net, x, y, lam):
    """Dense F = 2 Delta^T (-L'' + lam I)^{-1} Delta on the last layer, with autograd's Hessian."""
    lin = net[-1]
    names = [n for n, _ in lin.named_parameters()]
    shapes = [p.shape for _, p in lin.named_parameters()]
    sizes = [p.numel() for _, p in lin.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in lin.named_parameters()])
    with torch.no_grad():
        phi = net[:-1](x)

    def ll(v):
        ps = {n: t.reshape(s) for n, t, s in zip(names, v.split(sizes), shapes, strict=True)}
        z = functional_call(lin, ps, (phi,))
        return torch.log_softmax(z, -1).gather(1, y[:, None])[:, 0]

    D = jacobian(ll, theta)  # (n, P): rows g_i^T
    A = hessian(lambda v: -ll(v).sum(), theta) + lam * torch.eye(theta.numel(), dtype=DT)
    F = 2 * D @ torch.linalg.solve(A, D.T)
    ev, V = torch.linalg.eigh(F)
    return ev[-1], V[:, -1], A - lam * torch.eye(theta.numel(), dtype=DT)


def test_cook_matches_dense_hessian():
    net = mlp(3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(25, 5, generator=g, dtype=DT)
    y = torch.randint(0, 4, (25,), generator=g)
    r = cook.local_influence(net, x, y, tol=1e-10)
    assert torch.allclose(r.extra["F"], 2 * dense_F(net, x, y, r.lam), rtol=1e-8, atol=1e-10)
    ev, v, H = dense_cook(net, x, y, r.lam)
    assert r.lam == pytest.approx(1e-3 * float(torch.trace(H)) / r.n_params, rel=1e-10)
    assert r.extra["trace"] == pytest.approx(float(torch.trace(H)), rel=1e-10)
    assert r.c_max.value == pytest.approx(float(ev), rel=1e-7)
    assert torch.allclose(r.h_max.abs(), v.abs(), atol=1e-5)
    assert r.layer == "2" and r.n_params == 7 * 4 + 4
    assert r.top_cases(3).tolist() == v.abs().argsort(descending=True)[:3].tolist()


def dense_F(net, x, y, lam):
    """The dense n x n matrix Delta^T (-L'' + lam I)^{-1} Delta (autograd Hessian)."""
    lin = net[-1]
    with torch.no_grad():
        phi = net[:-1](x)
    W0, b0 = lin.weight.detach(), lin.bias.detach()
    th = torch.cat([W0.reshape(-1), b0])

    def ll(v):
        W, b = v[: W0.numel()].reshape(W0.shape), v[W0.numel():]
        return torch.log_softmax(phi @ W.T + b, -1).gather(1, y[:, None])[:, 0]

    D = jacobian(ll, th)
    A = hessian(lambda v: -ll(v).sum(), th) + lam * torch.eye(th.numel(), dtype=DT)
    return D @ torch.linalg.solve(A, D.T)


def _fit(lin, x, y, w, lam, iters=50):
    """Newton's method on the penalised weighted log-likelihood of a multinomial logistic
    regression; returns the maximiser (weight, bias) flattened."""
    P = lin.weight.numel() + lin.bias.numel()
    theta = torch.zeros(P, dtype=DT)

    def negL(v):
        W, b = v[: lin.weight.numel()].reshape(lin.weight.shape), v[lin.weight.numel():]
        lp = torch.log_softmax(x @ W.T + b, -1).gather(1, y[:, None])[:, 0]
        return -(w * lp).sum() + 0.5 * lam * (v * v).sum()

    for _ in range(iters):
        gr = torch.func.grad(negL)(theta)
        H = hessian(negL, theta)
        theta = theta - torch.linalg.solve(H, gr)
        if gr.norm() < 1e-13:
            break
    return theta, negL


def test_cook_curvature_is_second_derivative_of_likelihood_displacement():
    # Cook (1986): C_h = d^2/dt^2 LD(1 + t h) at t = 0, LD(w) = 2 [L(theta_hat) - L(theta_hat_w)]
    g = torch.Generator().manual_seed(1)
    n, d, C, lam = 30, 3, 4, 0.5
    x = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randint(0, C, (n,), generator=g)
    lin = nn.Linear(d, C).to(DT)
    theta, negL = _fit(lin, x, y, torch.ones(n, dtype=DT), lam)
    with torch.no_grad():
        lin.weight.copy_(theta[: d * C].reshape(C, d))
        lin.bias.copy_(theta[d * C:])
    net = nn.Sequential(lin).eval()
    r = cook.local_influence(net, x, y, damping=lam, relative_damping=False, tol=1e-10)
    h = r.h_max
    L0 = -negL(theta)

    def LD(t):
        th, _ = _fit(lin, x, y, 1 + t * h, lam)
        return 2 * (L0 - (-negL(th)))  # L evaluated with unit weights

    t = 1e-3
    fd = float((LD(t) + LD(-t)) / t**2)
    assert fd == pytest.approx(r.c_max.value, rel=1e-3)
    # and in another direction the curvature is smaller (h_max is the maximiser)
    e = torch.zeros(n, dtype=DT)
    e[0] = 1.0
    fd0 = float((LD_dir(lin, x, y, e, lam, L0, negL, t)) / t**2)
    assert fd0 < r.c_max.value


def LD_dir(lin, x, y, h, lam, L0, negL, t):
    out = 0.0
    for s in (t, -t):
        th, _ = _fit(lin, x, y, 1 + s * h, lam)
        out = out + 2 * (L0 - (-negL(th)))
    return out


def test_cook_rejects_bad_input():
    net = mlp(4)
    x = torch.randn(5, 5, dtype=DT)
    y = torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="logits"):
        cook.local_influence(net, x, y, layer="0")
    with pytest.raises(ValueError, match="nn.Linear"):
        cook.local_influence(net, x, y, layer="1")
    with pytest.raises(ValueError, match="damping"):
        cook.local_influence(net, x, y, damping=0.0)
    with pytest.raises(ValueError, match="at least 2"):
        cook.local_influence(net, x[:1], y[:1])


# ------------------------------------------------------------------------------------------
# layer sensitivity


def test_layer_sensitivity_matches_dense_jacobian():
    torch.manual_seed(5)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
        nn.Linear(3 * 16, 4),
    ).to(DT)
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
    net.eval()
    x = torch.rand(3, 1, 4, 4, dtype=DT)
    s = layers.layer_sensitivity(net, x)
    assert s.names == ["0", "1", "4"]
    params = {k: v.detach() for k, v in net.named_parameters()}
    for j, name in enumerate(s.names):
        own = {k: v for k, v in params.items() if k.rsplit(".", 1)[0] == name}
        flat = torch.cat([v.reshape(-1) for v in own.values()])
        rho2 = float(flat.pow(2).mean())
        for i in range(3):
            J = jacrev(lambda pr, i=i: functional_call(net, {**params, **pr}, (x[i : i + 1],))[0])(own)
            Jm = torch.cat([t.reshape(4, -1) for t in J.values()], dim=1)  # (C, P_l)
            p = torch.softmax(net(x[i : i + 1])[0], -1).detach()
            H = torch.diag(p) - torch.outer(p, p)
            ref = rho2 * float(torch.trace(Jm.T @ H @ Jm))
            assert float(s.per_image[i, j]) == pytest.approx(ref, rel=1e-9)
    assert s.ranking()[0] == s.names[int(s.value.argmax())]


def test_perturbation_effect_second_order_and_model_untouched():
    net = mlp(6)
    x = torch.rand(8, 5, dtype=DT)
    before = [p.detach().clone() for p in net.parameters()]
    s = layers.layer_sensitivity(net, x)
    eff = layers.perturbation_effect(net, x, rel=1e-4, n_draws=400,
                                     generator=torch.Generator().manual_seed(0))
    pred = 1e-8 * s.value / 2
    # Monte Carlo over 400 x 8 draws: a few percent
    assert torch.allclose(eff.mean, pred, rtol=0.1)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert eff.kl.shape == (2, 400, 8) and (eff.changed == 0).all()
    with pytest.raises(ValueError, match="not layers"):
        layers.perturbation_effect(net, x, ["1"])


# ------------------------------------------------------------------------------------------
# Manhattan plot


def test_manhattan_groups_and_marks():
    fig, ax = plt.subplots()
    vals = np.array([0.5, 9.0, 0.1, 4.0, 7.0, 0.2])
    groups = np.array([2, 0, 2, 1, 0, 1])
    top = plotting.manhattan(ax, vals, groups, top=2, log=True)
    assert top.tolist() == [1, 4]
    # items placed by group then original order: group 0 = items 1, 4 at x = 0, 1, etc.
    xs = [c.get_offsets()[:, 0].tolist() for c in ax.collections[:3]]
    assert xs == [[0, 1], [2, 3], [4, 5]]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"]
    assert ax.get_yscale() == "log"
    with pytest.raises(ValueError, match="positive"):
        plotting.manhattan(ax, -vals, groups, log=True)
    with pytest.raises(ValueError, match="one entry"):
        plotting.manhattan(ax, vals, groups[:3])
    plt.close(fig)

"""Tests of sensitivity_lib.condition.lipschitz and the graph walker under it: the certified product
bound on whole networks.

The oracles are independent of the code under test: dense Jacobians (torch.func.jacrev) on tiny
float64 networks, random and gradient-ascent perturbations, and closed-form examples.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import dense_layer_norm, random_nets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from sensitivity_lib import graph as G
from sensitivity_lib.condition import lipschitz as L

torch.set_default_dtype(torch.float32)


def dense_jacobian_norms(net, x):
    """||J(x_i)||_2 per sample from the dense Jacobian (the oracle)."""

    def f(z):
        return net(z[None]).reshape(-1)

    J = torch.func.vmap(torch.func.jacrev(f))(x)
    return torch.linalg.matrix_norm(J.reshape(len(x), J.shape[1], -1), 2)


def ascent_ratio(net, x, steps: int = 15, scale: float = 1e-1, seed: int = 0):
    """max over gradient ascent of ||f(x+d) - f(x)|| / ||d|| (adversarial perturbations d)."""
    g = torch.Generator().manual_seed(seed)
    d = (scale * torch.randn(x.shape, generator=g, dtype=x.dtype)).requires_grad_(True)
    opt = torch.optim.Adam([d], lr=scale / 5)
    fx = net(x).detach()
    best = 0.0
    for _ in range(steps):
        r = (net(x + d) - fx).flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)
        best = max(best, float(r.detach().max()))
        opt.zero_grad()
        (-r.sum()).backward()
        opt.step()
    return best


# ----------------------------------------------------------------------------------------------
# The certified bound on random networks


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_nets(), st.integers(0, 10_000))
def test_bound_is_never_violated(net_shape, seed):
    net, shape = net_shape
    bound = L.lipschitz_bound(net, shape, cache=False)
    assert bound.kind == "upper" and math.isclose(bound.extra["log2"], math.log2(bound.value))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    # exact local slopes (dense Jacobian) are below the global constant
    assert float(dense_jacobian_norms(net, x).detach().max()) <= bound.value * (1 + 1e-9)
    # random perturbations of many sizes, and large ones
    for eps in (1e-6, 1e-2, 1.0, 30.0):
        d = eps * torch.randn(x.shape, generator=g, dtype=torch.float64)
        ratio = (net(x + d) - net(x)).flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)
        assert float(ratio.detach().max()) <= bound.value * (1 + 1e-9)
    # adversarial perturbations: gradient ascent on the ratio
    assert ascent_ratio(net, x, seed=seed) <= bound.value * (1 + 1e-9)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_nets(max_blocks=3))
def test_per_layer_constants_are_thedense_layer_norms(net_shape):
    """With exact layer norms, every linear factor equals the dense norm of the (folded) layer."""
    net, shape = net_shape
    est = L.lipschitz_product(net, shape, layer_norm=dense_layer_norm, kind="upper")
    for name, e in est.extra["layer_estimates"].items():
        assert est.extra["layers"][name] == pytest.approx(float(e.value), rel=1e-12)
    cert = L.lipschitz_bound(net, shape, cache=False)  # certified FFT norms: upper bounds
    for name, e in est.extra["layer_estimates"].items():
        assert cert.extra["layers"][name] >= float(e.value) * (1 - 1e-9)


# ----------------------------------------------------------------------------------------------
# Individual rules against closed forms


def test_overlapping_maxpool_constant_is_two_and_attained():
    """AlexNet's 3x3 / stride 2 max-pool: sqrt(4) = 2 (not 1), and a pair of inputs attains it."""
    net = nn.Sequential(nn.MaxPool2d(3, 2), nn.Flatten()).double().eval()
    b = L.lipschitz_bound(net, (1, 13, 13), cache=False)
    assert b.value == 2.0 and b.extra["layers"]["0"] == 2.0
    a = torch.zeros(1, 1, 13, 13, dtype=torch.float64)
    a[0, 0, 2, 2] = 1.0  # pixel (2, 2) lies in the windows starting at rows 0, 2 and columns 0, 2
    y = torch.zeros_like(a)
    ratio = (net(a) - net(y)).norm() / (a - y).norm()
    assert float(ratio) == pytest.approx(2.0, rel=1e-15)
    # VGG's non-overlapping 2x2 / stride 2 pool has constant 1
    vgg = nn.Sequential(nn.MaxPool2d(2, 2), nn.Flatten()).eval()
    assert L.lipschitz_bound(vgg, (1, 8, 8), cache=False).value == 1.0


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 12), st.integers(1, 12), st.integers(1, 4), st.integers(1, 3),
    st.integers(0, 2), st.booleans(), st.booleans(), st.sampled_from([None, 1, 3, 7]),
)  # fmt: skip
def test_avg_pool_norm_is_exact(h, w, k, s, p, ceil, cip, div):
    if p > k // 2 or k > min(h, w) + 2 * p:
        return
    norm, _ = G.avg_pool_norm((h, w), k, s, p, ceil, cip, div)

    def f(v):
        return F.avg_pool2d(v.reshape(1, 1, h, w), k, s, p, ceil, cip, div).reshape(-1)

    J = torch.func.jacrev(f)(torch.zeros(h * w, dtype=torch.float64))
    assert norm == pytest.approx(float(torch.linalg.matrix_norm(J, 2)), rel=1e-12, abs=1e-15)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 11), st.integers(1, 11), st.integers(1, 7), st.integers(1, 7))
def test_adaptive_pools_are_exact(h, w, oh, ow):
    norm, _ = G.avg_pool_norm((h, w), None, adaptive_output=(oh, ow))

    def f(v):
        return F.adaptive_avg_pool2d(v.reshape(1, 1, h, w), (oh, ow)).reshape(-1)

    J = torch.func.jacrev(f)(torch.zeros(h * w, dtype=torch.float64))
    assert norm == pytest.approx(float(torch.linalg.matrix_norm(J, 2)), rel=1e-12)
    # adaptive max-pool: sqrt of the largest window multiplicity, checked on an attaining pair
    net = nn.Sequential(nn.AdaptiveMaxPool2d((oh, ow)), nn.Flatten()).double().eval()
    b = L.lipschitz_bound(net, (1, h, w), cache=False).value
    m = round(b**2)
    counts = torch.zeros(h, w)
    for r in G.adaptive_windows_1d(h, oh):
        for c in G.adaptive_windows_1d(w, ow):
            counts[r[0] : r[-1] + 1, c[0] : c[-1] + 1] += 1
    assert m == int(counts.max())


def test_activation_constants_are_max_slopes():
    z = torch.linspace(-30, 30, 600_001, dtype=torch.float64)
    for kind, params in [
        ("sigmoid", {}), ("tanh", {}), ("silu", {}), ("gelu", {}), ("elu", {"alpha": 1.7}),
        ("gelu", {"approximate": "tanh"}),
        ("leaky_relu", {"negative_slope": -2.5}), ("softplus", {"beta": 3.0}), ("relu6", {}),
    ]:  # fmt: skip
        slope = float(G.activation_derivative(kind, params, z).abs().max())
        c = G.activation_constant(kind, params)
        assert slope <= c <= slope + 2e-5, kind
    # the derivative formulas agree with autograd
    zz = torch.linspace(-5, 5, 1001, dtype=torch.float64)
    for kind, fn in [
        ("silu", F.silu),
        ("sigmoid", torch.sigmoid),
        ("elu", F.elu),
        ("tanh", torch.tanh),
    ]:
        auto = torch.func.vmap(torch.func.grad(fn))(zz)
        assert torch.allclose(G.activation_derivative(kind, {}, zz), auto, atol=1e-12), kind


def test_softmax_constant_one_half():
    g = torch.Generator().manual_seed(0)
    z = 4 * torch.randn(2000, 6, generator=g, dtype=torch.float64)
    z[:, 2:] -= 40  # mass on two classes: the worst case approaches 1/2
    p = torch.softmax(z, -1)
    J = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    top = torch.linalg.matrix_norm(J, 2)
    assert float(top.max()) <= 0.5 and float(top.max()) > 0.49
    net = nn.Sequential(nn.Linear(6, 6, bias=False), nn.Softmax(-1)).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(6))
    assert L.lipschitz_bound(net, (6,), cache=False).value == pytest.approx(0.5)
    assert L.lipschitz_bound(net[:1], (6,), output="probs", cache=False).value == pytest.approx(0.5)


def test_concatenation_and_residual_rules_are_tight():
    class Cat(nn.Module):
        def forward(self, x):
            return torch.cat([x, x, 2 * x], 1)

    class Res(nn.Module):
        def forward(self, x):
            return x + 3 * x

    assert L.lipschitz_bound(Cat(), (2, 3), cache=False).value == pytest.approx(math.sqrt(6))
    assert L.lipschitz_bound(Res(), (2, 3), cache=False).value == pytest.approx(4.0)


def test_batchnorm_is_folded_into_the_conv_and_tighter():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([0.01, 1.0, 4.0]))
        bn.weight.copy_(torch.tensor([1.0, -2.0, 0.5]))
    net = nn.Sequential(conv, bn).double().eval()
    b = L.lipschitz_product(net, (2, 6, 6), layer_norm=dense_layer_norm)
    assert b.extra["folded"] == {"0": "1"}

    def f(v):
        return net(v.reshape(1, 2, 6, 6)).reshape(-1)

    J = torch.func.jacrev(f)(torch.zeros(72, dtype=torch.float64))
    exact = float(torch.linalg.matrix_norm(J, 2))
    assert b.value == pytest.approx(exact, rel=1e-10)  # folding is exact for conv + BN
    unfolded = nn.Sequential(conv, nn.Identity(), bn).double().eval()
    b2 = L.lipschitz_product(unfolded, (2, 6, 6), layer_norm=dense_layer_norm)
    assert b2.extra["folded"] == {} and b2.value > b.value * 1.2
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).abs().max()
    assert b2.value == pytest.approx(b2.extra["layers"]["0"] * float(scale), rel=1e-12)


def test_normalisation_counts_one_over_min_std():
    from sensitivity_lib import zoo

    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 12, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(torch.eye(12))
    m = zoo.Normalized(
        net, (0.5, 0.2, 0.1), (0.5, 0.25, 2.0), input_shape=(3, 2, 2), classes=list("abcdefghijkl"),
        name="toy", pretrained=False, weights_note="identity",
    )  # fmt: skip
    m.eval()
    assert L.lipschitz_bound(m, (3, 2, 2), cache=False).value == pytest.approx(4.0)


def test_log2_is_exact_where_the_float_overflows():
    layers = []
    for _ in range(300):
        lin = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.diag(torch.tensor([16.0, 1.0])))
        layers.append(lin)
    net = nn.Sequential(*layers).eval()
    b = L.lipschitz_product(net, (2,), layer_norm=dense_layer_norm)
    assert b.extra["log2"] == pytest.approx(1200.0, rel=1e-12) and b.value == math.inf
    assert G.log2_sum([1200.0, 1200.0]) == pytest.approx(1201.0)


def test_large_convs_are_certified_by_lanczos_and_cholesky(monkeypatch):
    """Above CERTIFY_MIN_ENTRIES the conv norm is a Cholesky-certified bound: never below the exact
    circular FFT bound (hence never below the true norm) and within (1 + tol)^2 of it."""
    from sensitivity_lib.opnorm import operator_norm

    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, stride=2, padding=1))
    shape = (4, 12, 12)
    exact = L.lipschitz_product(net, shape, kind="upper")  # small inputs: exact circular FFT
    monkeypatch.setattr(L, "CERTIFY_MIN_ENTRIES", 1)
    L._NORM_CACHE.clear()
    fast = L.lipschitz_product(net, shape, kind="upper")
    L._NORM_CACHE.clear()
    tol = L.CERTIFY_TOL
    trues = [operator_norm(net[0], shape, "dense").value, operator_norm(net[2], (6, 12, 12), "dense").value]
    ests = exact.extra["layer_estimates"].values(), fast.extra["layer_estimates"].values()
    pairs = list(zip(*ests, strict=True))
    assert len(pairs) == 2 and any(e.value != f.value for e, f in pairs)  # the other path was taken
    for (e, f), true in zip(pairs, trues, strict=True):
        assert f.kind == "upper"
        assert e.value * (1 - 1e-9) <= f.value <= e.value * (1 + tol) ** 2 * (1 + 1e-9)
        assert f.value >= true * (1 - 1e-9)


def test_cache_is_invalidated_by_weight_changes():
    net = nn.Sequential(nn.Linear(3, 3, bias=False)).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(3))
    assert L.lipschitz_bound(net, (3,)).value == pytest.approx(1.0)
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    assert L.lipschitz_bound(net, (3,)).value == pytest.approx(3.0)


# ----------------------------------------------------------------------------------------------
# Real architectures: the graph walk covers them as they are


def _counts(plan):
    out: dict[str, int] = {}
    for s in plan.steps:
        out[s.op] = out.get(s.op, 0) + 1
    return out


@pytest.mark.slow
def test_zoo_architectures_trace_and_reduce():
    from sensitivity_lib import zoo

    alex = G.build_plan(zoo.torchvision_model("alexnet", weights=None).eval(), (3, 96, 96))
    pools = [s.const for s in alex.steps if s.op == "maxpool"]
    assert pools == [2.0, 2.0, 2.0] and _counts(alex)["linear"] == 8
    vgg = G.build_plan(zoo.torchvision_model("vgg19", weights=None).eval(), (3, 64, 64))
    assert [s.const for s in vgg.steps if s.op == "maxpool"] == [1.0] * 5
    assert _counts(vgg)["linear"] == 19
    res = G.build_plan(zoo.torchvision_model("resnet50", weights=None).eval(), (3, 64, 64))
    c = _counts(res)
    assert c["linear"] == 54 and c["add"] == 16 and c["diag"] == 1  # 53 BN folded; 1 / std
    dense = G.build_plan(zoo.torchvision_model("densenet121", weights=None).eval(), (3, 64, 64))
    c = _counts(dense)
    # 58 dense layers concatenate their inputs, 4 blocks their outputs; 120 convs + 1 linear;
    # BN after a conv is folded (59), BN after a concatenation is a diagonal (62), plus 1 / std
    assert c["cat"] == 62 and c["linear"] == 121 and c["diag"] == 63
    eff = G.build_plan(zoo.efficientnet_lite0().eval(), (3, 64, 64))
    c = _counts(eff)
    assert c["linear"] == 50 and c["add"] == 9 and c.get("diag", 0) == 1  # BN folded; 1/std
    assert {s.kind for s in eff.steps if s.op == "act"} == {"relu6"}


# ----------------------------------------------------------------------------------------------
# Errors


class Square(nn.Module):
    def forward(self, x):
        return x * x


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return x
        return -x


def test_errors_are_clear():
    with pytest.raises(NotImplementedError, match=r"multiplication of two input.*'1.mul'"):
        L.lipschitz_bound(nn.Sequential(nn.Linear(3, 3), Square()).eval(), (3,))
    with pytest.raises(NotImplementedError, match="could not trace"):
        L.lipschitz_bound(Branchy(), (3,))
    with pytest.raises(NotImplementedError, match=r"module LPPool2d at '0'"):
        L.lipschitz_bound(nn.Sequential(nn.LPPool2d(2, 2)).eval(), (1, 4, 4))
    with pytest.raises(ValueError, match="does not fit"):
        L.lipschitz_bound(nn.Sequential(nn.Linear(3, 3)).eval(), (4,))
    with pytest.raises(ValueError, match="training mode"):
        L.lipschitz_bound(nn.Sequential(nn.Linear(3, 3), nn.Dropout()), (3,))
    with pytest.raises(ValueError, match="output must be"):
        L.lipschitz_bound(nn.Sequential(nn.Linear(3, 3)).eval(), (3,), output="softmax")
    with pytest.raises(ValueError, match="input_shape"):
        L.lipschitz_bound(nn.Sequential(nn.Linear(3, 3)).eval(), (0,))
    with pytest.raises(NotImplementedError, match="padding_mode"):
        conv = nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect")
        L.lipschitz_bound(nn.Sequential(conv).eval(), (1, 5, 5))


def test_a_replicating_pool_is_fused_into_the_linear_layer_after_it():
    # torchvision's VGG and AlexNet on small inputs: an adaptive pool replicates a 1 x 1 feature
    # map before the classifier. The pair contributes the exact ||W A|| (A the pool's matrix),
    # never more than ||W|| ||A||, and the bound still holds on random pairs of inputs.
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Dropout(0.5),
        nn.Linear(36, 5),
    ).double().eval()
    b = L.lipschitz_bound(net, (2, 3, 3), cache=False)
    assert b.extra["fused_pools"] == {"5": "2"}
    assert b.extra["layers"]["2"] == 1.0
    eye = torch.eye(4, dtype=torch.float64).reshape(4, 4, 1, 1)
    A = torch.nn.functional.adaptive_avg_pool2d(eye, 3).reshape(4, 36).T  # (36, 4): the pool's map
    W = net[5].weight.detach()
    fused = float(torch.linalg.matrix_norm(W @ A, 2))
    assert b.extra["layers"]["5"] == pytest.approx(fused, rel=1e-9)
    assert fused <= float(torch.linalg.matrix_norm(W, 2)) * float(torch.linalg.matrix_norm(A, 2)) + 1e-12
    assert b.extra["log2"] == pytest.approx(sum(math.log2(v) for v in b.extra["layers"].values()), rel=1e-12)
    x, y = torch.rand(200, 2, 3, 3, dtype=torch.float64), torch.rand(200, 2, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        ratio = (net(x) - net(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert float(ratio.max()) <= b.value
    # a pool that shrinks its input is left alone (nothing to gain)
    shrink = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3)).double().eval()
    assert L.lipschitz_bound(shrink, (2, 4, 4), cache=False).extra["fused_pools"] == {}

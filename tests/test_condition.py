"""Tests of sensitivity_lib.condition: E0 (exact local), E1 (certified), E2, E3, CLEVER, bits.

Oracles: dense Jacobians from torch.func.jacrev on tiny float64 networks, closed forms for linear
models, and torch's own float16 / bfloat16 rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import dense_jacobians, dense_layer_norm, probs, random_nets, top_sv
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from sensitivity_lib import condition as C
from sensitivity_lib.condition import lipschitz as L
from sensitivity_lib.graph import tangent_map
from sensitivity_lib.precision import min_input_bits, round_float
from sensitivity_lib.zoo import lenet5

# ----------------------------------------------------------------------------------------------
# E0 against the dense Jacobian, and the ordering E0 <= E2 <= E1


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_nets(max_blocks=3), st.integers(0, 10_000), st.sampled_from(["logits", "probs"]))
def test_jacobian_norm_matches_dense_and_orders(net_shape, seed, output):
    net, shape = net_shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    f = net if output == "logits" else probs(net)
    exact = top_sv(dense_jacobians(f, x))
    e = C.jacobian_norm(net, x, output=output, tol=1e-12, generator=g)
    assert e.kind == "lower" and e.value.dtype == torch.float64 and e.value.shape == (3,)
    assert torch.allclose(e.value, exact, rtol=1e-6, atol=1e-12)
    assert bool((e.residual <= 1e-12).all())
    # E0 <= E2 <= E1 (layer norms of E2 to 1e-10)
    bound = L.lipschitz_bound(net, shape, output=output, cache=False)
    assert float(exact.max()) <= bound.value * (1 + 1e-9)
    e2 = C.masked_product_condition(net, x, output=output, tol=1e-9, krylov_dim=60, generator=g)
    e2_norm = torch.exp2(e2.extra["norm_log2"])
    assert bool((exact <= e2_norm * (1 + 1e-6) + 1e-12).all())
    assert bool((e2_norm <= bound.value * (1 + 1e-9)).all())


def test_power_and_lanczos_agree_and_report_iterations():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 25)).double().eval()
    x = torch.randn(4, 40, dtype=torch.float64)
    exact = top_sv(dense_jacobians(net, x))
    lz = C.jacobian_norm(net, x, tol=1e-12)
    pw = C.jacobian_norm(net, x, tol=1e-12, method="power", max_iter=20_000)
    assert torch.allclose(lz.value, exact, rtol=1e-9) and torch.allclose(pw.value, exact, rtol=1e-5)
    assert lz.extra["space"] == "output" and lz.extra["iterations"].max() <= 25
    assert pw.method == "power" and bool((pw.value <= exact * (1 + 1e-12)).all())
    # a budget too small leaves a residual above the tolerance, and the value is still below
    short = C.jacobian_norm(net, x, tol=1e-12, method="power", max_iter=2)
    assert bool((short.residual > 1e-12).any()) and bool((short.value <= exact * (1 + 1e-12)).all())


def test_restarted_lanczos_and_input_space():
    torch.manual_seed(1)
    wide = nn.Sequential(nn.Linear(3, 50), nn.Sigmoid(), nn.Linear(50, 60)).double().eval()
    x = torch.randn(2, 3, dtype=torch.float64)
    e = C.jacobian_norm(wide, x, tol=1e-12)
    assert e.extra["space"] == "input"  # 3 < 60: J^T J is 3 x 3
    assert torch.allclose(e.value, top_sv(dense_jacobians(wide, x)), rtol=1e-10)
    deep = nn.Sequential(nn.Linear(80, 80), nn.Tanh(), nn.Linear(80, 70)).double().eval()
    x = torch.randn(3, 80, dtype=torch.float64)
    r = C.jacobian_norm(deep, x, tol=1e-10, krylov_dim=5, max_iter=2000)  # forces restarts
    assert torch.allclose(r.value, top_sv(dense_jacobians(deep, x)), rtol=1e-8)


def test_jacobian_operator_ad_modes_agree_with_dense():
    """``ad="auto"`` picks forward mode for grouped (depthwise) convolutions and reverse mode
    otherwise; every mode applies the same J and J^T as the dense Jacobian."""
    torch.manual_seed(3)
    depthwise = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
    ).double().eval()  # fmt: skip
    plain = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 5)).double().eval()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    v = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    u = torch.randn(2, 5, dtype=torch.float64)
    for net in (depthwise, plain):
        J = dense_jacobians(net, x)  # (N, 5, 50)
        for ad in ("auto", "forward", "reverse"):
            op = C.jacobian_operator(net, x, ad=ad)
            assert torch.allclose(op.matvec(v), torch.einsum("boi,bi->bo", J, v.flatten(1)), atol=1e-12)
            assert torch.allclose(op.rmatvec(u).flatten(1), torch.einsum("boi,bo->bi", J, u), atol=1e-12)
        e = C.jacobian_norm(net, x, tol=1e-12)
        assert torch.allclose(e.value, top_sv(J), rtol=1e-9)
    with pytest.raises(ValueError, match="ad must be"):
        C.jacobian_operator(plain, x, ad="sideways")


def test_local_and_global_condition_formulas():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double().eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    for output, f in (("logits", net), ("probs", probs(net))):
        jn = top_sv(dense_jacobians(f, x))
        fx = f(x).detach()
        expect = jn * x.norm(dim=1) / fx.norm(dim=1)
        e0 = C.local_condition(net, x, output=output, tol=1e-12)
        assert torch.allclose(e0.value, expect, rtol=1e-9)
        assert torch.allclose(e0.extra["log2"], torch.log2(expect), rtol=1e-9)
        e1 = C.global_condition(net, x, output=output)
        lip = L.lipschitz_bound(net, (6,), output=output)
        assert torch.allclose(e1.value, lip.value * x.norm(dim=1) / fx.norm(dim=1), rtol=1e-12)
        assert e1.kind == "upper" and bool((e1.value >= e0.value).all())
        # E1 is a certified bound on relative changes of any size
        g = torch.Generator().manual_seed(3)
        for eps in (1e-3, 1.0, 10.0):
            d = eps * torch.randn(x.shape, generator=g, dtype=torch.float64)
            rel_out = (f(x + d) - fx).norm(dim=1) / fx.norm(dim=1)
            rel_in = d.norm(dim=1) / x.norm(dim=1)
            assert bool((rel_out.detach() <= e1.value * rel_in * (1 + 1e-12)).all())
    with pytest.raises(ValueError, match="output="):
        C.global_condition(net, x, output="probs", lipschitz=L.lipschitz_bound(net, (6,)))


def test_approximations_e3():
    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    ).double().eval()  # fmt: skip
    x = torch.rand(2, 2, 8, 8, dtype=torch.float64)
    dense = L.lipschitz_product(net, (2, 8, 8), layer_norm=dense_layer_norm)
    up = C.approximate_condition(net, x, approximation="reshaped_upper")
    assert up.kind == "upper"
    for name, e in dense.extra["layer_estimates"].items():  # sqrt(m) ||K_mat|| >= ||A||
        assert up.extra["lipschitz"].extra["layers"][name] >= float(e.value) * (1 - 1e-12)
    low = C.approximate_condition(net, x, approximation="reshaped")
    assert low.kind == "estimate"
    for name, e in dense.extra["layer_estimates"].items():  # interior receptive fields exist here
        assert low.extra["lipschitz"].extra["layers"][name] <= float(e.value) * (1 + 1e-12)
    fro = C.approximate_condition(net, x, approximation="frobenius")
    assert fro.kind == "estimate" and bool((fro.value > 0).all())
    e0 = C.local_condition(net, x, tol=1e-12)
    assert bool((up.value >= e0.value).all())
    with pytest.raises(ValueError, match="approximation"):
        C.approximate_condition(net, x, approximation="spectral")


# ----------------------------------------------------------------------------------------------
# Real model: LeNet5 (advertorch weights) on MNIST test digits


@pytest.mark.slow
def test_lenet5_ordering_and_reproducibility():
    from sensitivity_lib import data, zoo

    m = zoo.lenet5("standard").eval()
    x = data.mnist_test20().images[:3]
    e0 = C.local_condition(m, x, generator=torch.Generator().manual_seed(0))
    again = C.local_condition(m, x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(e0.value, again.value)  # re-execution gives identical numbers
    e2 = C.masked_product_condition(m, x, tol=1e-6)
    e1 = C.global_condition(m, x)
    assert bool((e0.value <= e2.value * (1 + 1e-5)).all()) and bool((e2.value <= e1.value).all())
    # the dense Jacobian of the float32 model agrees with E0 to float32 accuracy
    exact = top_sv(dense_jacobians(m, x).double())
    assert torch.allclose(e0.extra["jacobian_norm"].value, exact, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Bits


def test_min_input_bits_keeps_the_decision():
    """t_min from E1 suffices: the worst input error of relative size 2^-t keeps the arg-max."""
    torch.manual_seed(5)
    lin = nn.Linear(8, 4).double().eval()
    x = torch.rand(200, 8, dtype=torch.float64)
    y = lin(x).detach()
    e1 = C.global_condition(lin, x)
    t = min_input_bits(e1.extra["log2"], y)
    top2 = y.topk(2, dim=1).indices
    W = lin.weight.detach()
    for i in range(len(x)):
        a, b = top2[i]
        eps = 2.0 ** -float(t[i]) * x[i].norm()
        # the largest decrease of y_a - y_b over ||dx|| <= eps is ||w_a - w_b|| eps (closed form)
        worst_gap = (y[i, a] - y[i, b]) - (W[a] - W[b]).norm() * eps
        assert float(worst_gap) > 0
        # and some other class c cannot overtake either
        others = [c for c in range(4) if c != a]
        assert all(float(y[i, a] - y[i, c] - (W[a] - W[c]).norm() * eps) > 0 for c in others)
    # rounding the inputs to t bits therefore never flips the prediction
    flips = [
        int(lin(round_float(x[i : i + 1], int(t[i]))).argmax()) != int(top2[i, 0])
        for i in range(len(x))
    ]
    assert not any(flips)


# ----------------------------------------------------------------------------------------------
# CLEVER


def test_clever_on_a_linear_model_is_the_exact_distance():
    """For a linear classifier the gradient is constant, so CLEVER is min_j g_j / ||w_c - w_j||."""
    torch.manual_seed(6)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.full((1, 1, 2, 2), 0.5)
    with torch.no_grad():
        lin[1].bias.copy_(-lin(x)[0] + lin[1].bias + torch.tensor([0.1, 0.0, 0.05]))
    y = lin(x)[0].detach().double()
    W = lin[1].weight.detach().double()
    dist = min(float((y[0] - y[j]) / (W[0] - W[j]).norm()) for j in (1, 2))
    assert dist < 0.3  # inside the ball, and the ball stays inside [0, 1]^4
    g = torch.Generator().manual_seed(0)
    s = C.clever_l2(lin, x, nb_batches=5, batch_size=5, pool_factor=2, radius=0.3, generator=g)
    assert s.kind == "estimate" and s.method == "clever_u"
    assert float(s.value[0]) == pytest.approx(dist, rel=1e-3)
    t = C.clever_l2(lin, x, nb_batches=5, batch_size=5, pool_factor=2, radius=0.3,
                    target="runner_up", generator=torch.Generator().manual_seed(0))  # fmt: skip
    j = int(y[1:].argmax()) + 1
    assert float(t.value[0]) == pytest.approx(float((y[0] - y[j]) / (W[0] - W[j]).norm()), rel=1e-3)


# ----------------------------------------------------------------------------------------------
# Errors and the re-export


def test_errors_are_clear():
    net = nn.Sequential(nn.Linear(3, 2)).eval()
    with pytest.raises(ValueError, match="NaN"):
        C.jacobian_norm(net, torch.tensor([[0.0, float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="batch"):
        C.jacobian_norm(net, torch.zeros(3))
    with pytest.raises(TypeError, match="floating"):
        C.local_condition(net, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="output must be"):
        C.local_condition(net, torch.zeros(2, 3), output="softmax")
    with pytest.raises(ValueError, match="method"):
        C.jacobian_norm(net, torch.zeros(2, 3), method="arnoldi")
    with pytest.raises(ValueError, match="training mode"):
        C.jacobian_norm(nn.Sequential(nn.Linear(3, 2), nn.Dropout()), torch.zeros(2, 3))
    from sensitivity_lib import zoo

    m = zoo.lenet5()
    with pytest.raises(ValueError, match="axis H"):
        C.local_condition(m, torch.rand(1, 1, 32, 32))
    with pytest.raises(NotImplementedError, match="could not trace"):

        class Branchy(nn.Module):
            def forward(self, x):
                return x if x.sum() > 0 else -x

        C.masked_product_condition(Branchy(), torch.rand(2, 3))


def test_right_vector_and_amplifications():
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 4)).double().eval()
    x = torch.randn(3, 10, dtype=torch.float64)
    e = C.jacobian_norm(net, x, tol=1e-12, vectors=True)
    v = e.extra["right"]
    J = dense_jacobians(net, x)
    assert torch.allclose(v.norm(dim=1), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(torch.einsum("nij,nj->ni", J, v).norm(dim=1), e.value, rtol=1e-9)
    # along v the observed amplification tends to ||J|| as the step shrinks (first order)
    small = C.amplification(net, x, 1e-7 * v)
    assert torch.allclose(small, e.value, rtol=1e-5)
    # no perturbation of any size beats the certified bound; the relative one stays below E1
    bound = L.lipschitz_bound(net, (10,)).value
    e1 = C.global_condition(net, x)
    g = torch.Generator().manual_seed(0)
    for eps in (1e-4, 1e-1, 3.0):
        d = eps * torch.randn(x.shape, generator=g, dtype=torch.float64)
        assert bool((C.amplification(net, x, d) <= bound).all())
        assert bool((C.amplification(net, x, d, relative=True) <= e1.value).all())
    adv = C.max_amplification(net, x, 0.5, steps=30, init=v)
    assert adv.kind == "lower" and bool((adv.value <= bound).all())
    assert bool((adv.extra["d"].flatten(1).norm(dim=1) - 0.5).abs().max() < 1e-12)
    assert torch.allclose(adv.value, C.amplification(net, x, adv.extra["d"]), rtol=1e-12)


def test_max_amplification_finds_the_norm_of_a_linear_map():
    torch.manual_seed(8)
    lin = nn.Linear(6, 5, bias=True).double().eval()
    x = torch.randn(2, 6, dtype=torch.float64)
    top = float(torch.linalg.matrix_norm(lin.weight.detach(), 2))
    adv = C.max_amplification(lin, x, 2.0, steps=200, lr=0.05, generator=torch.Generator().manual_seed(1))
    assert bool((adv.value <= top * (1 + 1e-12)).all()) and bool((adv.value >= 0.999 * top).all())


def test_rounding_flip_bits_against_a_direct_loop():
    torch.manual_seed(9)
    lin = nn.Linear(5, 3).double().eval()
    x = torch.rand(40, 5, dtype=torch.float64)
    got = C.rounding_flip_bits(lin, x, bits=range(1, 25))
    y0 = lin(x).argmax(1)
    for i in range(len(x)):
        t_ok = 25
        for t in range(24, 0, -1):
            if int(lin(round_float(x[i : i + 1], t)).argmax()) != int(y0[i]):
                break
            t_ok = t
        assert int(got[i]) == t_ok
    # the certified t_min from E1 is never below what rounding needs
    t_min = min_input_bits(C.global_condition(lin, x).extra["log2"], lin(x).detach())
    assert bool((t_min >= got.double()).all())


def test_kink_fractions_count_ties_and_kinks():
    net = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2, 2)).double().eval()
    x = torch.tensor(
        [[[[0.0, 0.0, 1.0, 2.0], [0.0, -1.0, 3.0, 3.0], [5.0, 1.0, 0.5, 0.2], [0.1, 0.3, 0.4, 0.0]]]]
    )
    k = C.kink_fractions(net, x.double())
    # relu inputs exactly at 0: 4 of 16; windows with a tied maximum: the first (0, 0, 0, relu(-1)=0)
    # and the second (1, 2, 3, 3) -> 2 of 4
    assert float(k["0"][0]) == pytest.approx(4 / 16) and float(k["1"][0]) == pytest.approx(2 / 4)


def test_kink_fractions_skip_windows_that_are_locally_constant():
    # ReLU then 2x2 max-pool, windows counted by hand:
    #   [-3, -2, -1, -5]: ReLU zeroes all four and each is strictly negative: a tie of constants, so the
    #                     maximum is locally constant (derivative 0): NOT a kink;
    #   [ 2,  2,  1, -1]: the maximum 2 is attained twice by entries that move with the input: a kink;
    #   [-1,  4,  3,  0]: a unique maximum: smooth (the 0 is a ReLU kink, counted for the ReLU);
    #   [-4, -4,  0, -2]: zeros, one of them exactly at the ReLU's kink (not constant on one side): a kink.
    net = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2, 2)).double().eval()
    x = torch.tensor(
        [[[[-3.0, -2.0, 2.0, 2.0], [-1.0, -5.0, 1.0, -1.0], [-1.0, 4.0, -4.0, -4.0], [3.0, 0.0, 0.0, -2.0]]]],
        dtype=torch.float64,
    )
    k = C.kink_fractions(net, x)
    assert float(k["1"][0]) == pytest.approx(2 / 4)
    assert float(k["0"][0]) == pytest.approx(2 / 16)  # the two inputs exactly at 0
    # a pool that reads a convolution directly has no flat entries: every tie counts
    conv = nn.Conv2d(1, 1, 1, bias=False).double()
    with torch.no_grad():
        conv.weight.fill_(1.0)
    direct = C.kink_fractions(nn.Sequential(conv, nn.MaxPool2d(2, 2)).eval(), x)
    assert float(direct["1"][0]) == pytest.approx(1 / 4)  # only [2, 2, 1, -1] ties without the ReLU


def test_layerwise_condition_telescopes_to_e1():
    torch.manual_seed(10)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Flatten(), nn.Linear(27, 5), nn.Tanh(), nn.Linear(5, 3),
    ).double().eval()  # fmt: skip
    x = torch.rand(4, 1, 7, 7, dtype=torch.float64)
    k = C.layerwise_condition(net, x)
    assert list(k) == ["0", "2", "3", "4", "5", "6", "7"]  # BN folded into the conv
    # each factor is L_l ||x_{l-1}|| / ||x_l||, checked on the first layer directly
    conv_out = net[1](net[0](x)).detach()
    L0 = L.lipschitz_bound(net, (1, 7, 7)).extra["layers"]["0"]
    assert torch.allclose(k["0"], L0 * x.flatten(1).norm(dim=1) / conv_out.flatten(1).norm(dim=1))
    prod = torch.stack(list(k.values())).prod(0)
    assert torch.allclose(prod, C.global_condition(net, x).value, rtol=1e-12)

    class Res(nn.Module):
        def forward(self, z):
            return z + torch.tanh(z)

    with pytest.raises(NotImplementedError, match="chain"):
        C.layerwise_condition(Res(), x)


def test_componentwise_condition_matches_dense_jacobians_and_is_attained():
    torch.manual_seed(3)
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)
    ).double().eval()
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x[:, 0] = 0.0  # a zero input: relative rounding leaves it alone
    e = C.componentwise_condition(net, x, chunk=3)
    J = torch.func.vmap(torch.func.jacrev(net))(x)  # (N, C, d), independent of the library's rows
    with torch.no_grad():
        y = net(x)
    skeel = (J.abs() * x.abs()[:, None, :]).sum(2).amax(1) / y.abs().amax(1)
    kinf = J.abs().sum(2).amax(1) * x.abs().amax(1) / y.abs().amax(1)
    assert torch.allclose(e.value, skeel, rtol=1e-12)
    assert torch.allclose(e.extra["kappa_inf"], kinf, rtol=1e-12)
    assert bool((e.value < e.extra["kappa_inf"]).all())
    # the bits come from the pair (top, runner_up); a small step along `worst` lowers that margin by
    # u * sum_j |J_aj - J_bj| |x_j| to first order (finite differences in float64)
    top, b = y.argmax(1), e.extra["runner_up"]
    rows = torch.arange(len(x))
    need = ((J[rows, top] - J[rows, b]).abs() * x.abs()).sum(1)
    u = 1e-7
    with torch.no_grad():
        y2 = net(x + u * e.extra["worst"])
    drop = (y - y2)[rows, top] - (y - y2)[rows, b]
    assert torch.allclose(drop / u, need, rtol=1e-5)
    margin = y[rows, top] - y[rows, b]
    assert torch.equal(e.extra["bits"], torch.ceil(torch.log2(need / margin)))
    with pytest.raises(ValueError, match="chunk"):
        C.componentwise_condition(net, x, chunk=0)


class _Block(nn.Module):
    """A residual block with batch norm, an in-place ReLU, squeeze-and-excitation (a product of two
    input-dependent tensors) and a concatenation: the rules and the jvp fallback together."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, 2, padding=1)
        self.se = nn.Linear(3, 3)
        self.head = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        y = self.relu(self.bn(self.conv(x)))
        y = y + x
        g = torch.sigmoid(self.se(y.mean((2, 3))))[:, :, None, None]
        y = torch.cat([y * g, F.silu(y)], 1)
        y = self.pool(y)
        return self.head(y.view(y.size(0), -1) / 2.0)  # a size read from the input: no tangent


def test_tangent_map_is_the_jacobian_product():
    torch.manual_seed(0)
    block = _Block().double().eval()
    with torch.no_grad():
        block.bn.running_mean.uniform_(-1, 1)
        block.bn.running_var.uniform_(0.5, 2)
    cases = [(block, torch.randn(4, 3, 8, 8, dtype=torch.float64))]
    net = lenet5().double().eval()
    cases.append((net, torch.rand(3, *net.input_shape, dtype=torch.float64)))
    for model, x in cases:
        v = torch.randn_like(x)
        ref = torch.func.jvp(lambda z, m=model: m(z), (x,), (v,))[1]
        got = tangent_map(model, x)(v)
        assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12), type(model).__name__

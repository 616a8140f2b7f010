"""Tests for sensitivity_lib.influence against brute-force oracles (float64, tiny networks).

The oracle forms the dense Jacobian of the softmax output with respect to a flattened omega,
the dense metric G = J_p^T diag(p)^-1 J_p, its pseudo-inverse, and FI = df^T G^+ df; the
authors' recipe is checked against a fresh numpy port of their SVD chain.
"""

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from sensitivity_lib import influence
from sensitivity_lib.influence import fi, fi_direction, fi_from_gram, fi_maps, logit_grams, measure

DT = torch.float64
REL = 1e-6


# ------------------------------------------------------------------------------------------
# fixtures: tiny float64 networks


def _randomise_bn(net: nn.Module, g: torch.Generator) -> None:
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g, dtype=DT) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=DT) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g, dtype=DT) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g, dtype=DT) * 0.6 - 0.3)


def small_cnn(seed: int = 0) -> nn.Module:
    """2x6x6 -> 5 classes. Conv, BN, in-place ReLU, a 1-channel BN (2 parameters: a rank-deficient
    layer), Linear, LayerNorm. Layers have 6 to 60 parameters."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(inplace=True),
        nn.Conv2d(3, 1, 3, stride=2),
        nn.BatchNorm2d(1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4, 6),
        nn.LayerNorm(6),
        nn.Tanh(),
        nn.Linear(6, 5),
    ).to(DT)
    _randomise_bn(net, torch.Generator().manual_seed(seed + 1))
    return net.eval()


@pytest.fixture(scope="module")
def net():
    return small_cnn()


@pytest.fixture(scope="module")
def x():
    return torch.rand(3, 2, 6, 6, generator=torch.Generator().manual_seed(2), dtype=DT)


# ------------------------------------------------------------------------------------------
# oracles


def dense_metric(prob_fn, w0):
    """J_p (C x d), p, G (d x d) by brute force."""
    Jp = torch.autograd.functional.jacobian(prob_fn, w0).reshape(-1, w0.numel())
    p = prob_fn(w0).detach()
    G = Jp.T @ torch.diag(1 / p) @ Jp
    return Jp, p, G


def dense_fi(Jp, p, G, y, rtol=1e-10):
    df = Jp[y] / p[y]
    return float(df @ torch.linalg.pinv(G, rtol=rtol, hermitian=True) @ df)


def svd_chain(grad, prob, y, eps):
    """Fresh numpy port of the loop body of SA_DNN/aaaipapercodes/MNIST_ResNet50_IF_setup0.py."""
    L0 = grad @ np.diag((prob**0.5 + eps) ** -1)
    f_grad = (grad[:, [y]] / (prob[y] + eps)).T
    B0, D_L0, A0 = np.linalg.svd(L0, full_matrices=False)
    r = int(np.sum(D_L0 > eps))
    if r == 0:
        return 0.0
    B0 = B0[:, :r]
    A0 = np.diag(D_L0[:r]) @ A0[:r, :]
    U_A, D_0, _ = np.linalg.svd(A0 @ A0.T, full_matrices=True)
    nabla_f = f_grad @ (B0 @ U_A) @ np.diag(D_0**-0.5)
    return float((nabla_f @ nabla_f.T)[0, 0])


def input_prob_fn(net, x1, scale=1.0):
    return lambda w: torch.softmax(net((w / scale).reshape(1, *x1.shape)), -1)[0]


def layer_prob_fn(net, x1, name):
    m = net.get_submodule(name)
    names = [n for n, _ in m.named_parameters(recurse=False)]
    shapes = [p.shape for _, p in m.named_parameters(recurse=False)]
    sizes = [p.numel() for _, p in m.named_parameters(recurse=False)]
    prefix = f"{name}." if name else ""
    w0 = torch.cat([p.detach().reshape(-1) for _, p in m.named_parameters(recurse=False)])

    def f(w):
        parts = torch.split(w, sizes)
        d = {prefix + n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return torch.softmax(functional_call(net, d, (x1[None],)), -1)[0]

    return f, w0


def close(a, b, rel=REL):
    return abs(a - b) <= rel * max(abs(b), 1e-12)


# ------------------------------------------------------------------------------------------
# exact mode against the dense pseudo-inverse


def test_input_exact_matches_dense_oracle(net, x):
    r = fi(net, x)
    for i in range(len(x)):
        Jp, p, G = dense_metric(input_prob_fn(net, x[i]), x[i].reshape(-1))
        y = int(r.labels[i])
        assert y == int(p.argmax())
        assert close(float(r.value[i]), dense_fi(Jp, p, G, y))
        assert int(r.rank[i]) == int(torch.linalg.matrix_rank(G, rtol=1e-10, hermitian=True))
        assert close(float(r.grad_norm[i]), float((Jp[y] / p[y]).norm()))


def test_given_labels_are_used(net, x):
    y = torch.tensor([0, 3, 4])
    r = fi(net, x, y)
    assert torch.equal(r.labels, y)
    for i in range(len(x)):
        Jp, p, G = dense_metric(input_prob_fn(net, x[i]), x[i].reshape(-1))
        assert close(float(r.value[i]), dense_fi(Jp, p, G, int(y[i])))
        assert close(float(r.odds[i]), (1 - float(p[y[i]])) / float(p[y[i]]), 1e-12)


@pytest.mark.parametrize("s", [0, 1, 2])
def test_pixel_and_patch_maps_match_dense_oracle_everywhere(net, x, s):
    """Every channel-pixel, borders included: patches are cut at the image border."""
    m = fi_maps(net, x[:2], scales=(s,))[s]
    m_sa = fi_maps(net, x[:2], scales=(s,), mode="sa_dnn", input_scale=40.0)[s]
    Ch, H, W = x.shape[1:]
    n_trunc = 0
    for i in range(2):
        y = int(m.labels[i])
        Jp, p, _ = dense_metric(input_prob_fn(net, x[i]), x[i].reshape(-1))
        Jp = Jp.reshape(-1, Ch, H, W)
        for c in range(Ch):
            for h in range(H):
                for w in range(W):
                    cols = Jp[:, c, max(0, h - s) : h + s + 1, max(0, w - s) : w + s + 1]
                    cols = cols.reshape(Jp.shape[0], -1)
                    G = cols.T @ torch.diag(1 / p) @ cols
                    assert close(float(m.value[i, c, h, w]), dense_fi(cols, p, G, y))
                    ref = svd_chain((cols / 40.0).T.numpy(), p.numpy(), y, 1e-3)
                    assert close(float(m_sa.value[i, c, h, w]), ref)
                    n_trunc += int(m_sa.rank[i, c, h, w] < m.rank[i, c, h, w])
    assert n_trunc > 0  # the epsilon cut-off was active somewhere, so the comparison has teeth


def test_fi_pixels_is_fi_maps(net, x):
    a = fi(net, x, wrt="pixels", patch=1)
    b = fi_maps(net, x, scales=(0, 1))[1]
    assert torch.equal(a.value, b.value) and a.value.shape == x.shape


def test_default_batch_fits_the_memory_budget_and_does_not_change_the_maps(net, x):
    assert measure._map_batch(10, 28 * 28, need_gram=True) == 64  # MNIST digits: a full batch
    assert measure._map_batch(1000, 3 * 224 * 224, need_gram=False) == 1  # one ImageNet photo
    assert measure._map_batch(1000, 3 * 224 * 224, need_gram=True) == 1  # never zero
    for s in (0, 1):
        a = fi(net, x, wrt="pixels", patch=s)
        b = fi(net, x, wrt="pixels", patch=s, batch_size=1)
        torch.testing.assert_close(a.value, b.value, rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["hooks", "functorch"])
def test_layers_and_params_match_dense_oracle(net, x, method):
    r = fi(net, x, wrt="layers", method=method)
    rp = fi(net, x, wrt="params", method=method)
    assert r.method == method
    assert list(r.value) == ["0", "1", "3", "4", "7", "8", "10"]
    saw_deficient = False
    for i in range(len(x)):
        y = int(r.labels[i])
        for name in r.value:
            f, w0 = layer_prob_fn(net, x[i], name)
            Jp, p, G = dense_metric(f, w0)
            assert close(float(r.value[name][i]), dense_fi(Jp, p, G, y)), name
            rank = int(torch.linalg.matrix_rank(G, rtol=1e-10, hermitian=True))
            assert int(r.rank[name][i]) == rank, name
            saw_deficient |= rank < 4
        # all parameters at once
        params = dict(net.named_parameters())
        w0 = torch.cat([v.detach().reshape(-1) for v in params.values()])
        sizes = [v.numel() for v in params.values()]

        def f_all(w, x1=x[i], params=params, sizes=sizes):
            parts = zip(params, torch.split(w, sizes), strict=True)
            d = {n: t.reshape(params[n].shape) for n, t in parts}
            return torch.softmax(functional_call(net, d, (x1[None],)), -1)[0]

        Jp, p, G = dense_metric(f_all, w0)
        assert close(float(rp.value[i]), dense_fi(Jp, p, G, y))
    assert saw_deficient  # the 1-channel batch norm has 2 parameters < C - 1 = 4


def test_layer_fi_below_odds_when_rank_deficient(net, x):
    r = fi(net, x, wrt="layers")
    names, V = r.matrix()
    _, R = r.matrix("rank")
    assert (V <= r.odds[:, None] * (1 + 1e-9)).all()
    full = R == 4
    assert torch.allclose(V[full], r.odds[:, None].expand_as(V)[full], rtol=1e-9)
    assert (V[~full] < r.odds[:, None].expand_as(V)[~full]).all()


def test_hooks_equal_functorch_grams(net, x):
    _, g1 = logit_grams(net, x, "layers", method="hooks", batch_size=2)
    _, g2 = logit_grams(net, x, "layers", method="functorch", batch_size=3)
    for n in g1:
        assert torch.allclose(g1[n], g2[n], rtol=1e-10, atol=1e-14), n


def test_conv_ghost_and_materialised_paths_agree():
    """Layer with small output (ghost identity) and with large output (materialised grads)."""
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 40, 3, stride=3, groups=2),
        nn.ReLU(), nn.Flatten(), nn.Linear(160, 4),
    ).to(DT).eval()  # fmt: skip
    xx = torch.rand(2, 1, 6, 6, dtype=DT)
    _, g1 = logit_grams(net, xx, "layers", method="hooks")
    _, g2 = logit_grams(net, xx, "layers", method="functorch")
    for n in g1:
        assert torch.allclose(g1[n], g2[n], rtol=1e-10, atol=1e-14), n


def test_batched_input_jacobian_equals_per_image_jacrev(net, x):
    _, M = logit_grams(net, x, "input", batch_size=2)
    for i in range(len(x)):
        J = torch.func.jacrev(lambda v: net(v[None])[0])(x[i]).reshape(5, -1)
        assert torch.allclose(M[i], J @ J.T, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------------
# the authors' recipe


def test_sa_dnn_mode_reproduces_svd_chain_input_and_layers(net, x):
    for scale in (1.0, 255.0):
        r = fi(net, x, mode="sa_dnn", input_scale=scale)
        for i in range(len(x)):
            Jp, p, _ = dense_metric(input_prob_fn(net, x[i], scale), scale * x[i].reshape(-1))
            y = int(r.labels[i])
            ref = svd_chain(Jp.T.numpy(), p.numpy(), y, 1e-3)
            assert close(float(r.value[i]), ref)
            assert close(influence.svd_chain_reference(Jp.T.numpy(), p.numpy(), y), ref, 1e-12)
    rl = fi(net, x, wrt="layers", mode="sa_dnn", eps=0.05)
    for name in rl.value:
        f, w0 = layer_prob_fn(net, x[0], name)
        Jp, p, _ = dense_metric(f, w0)
        ref = svd_chain(Jp.T.numpy(), p.numpy(), int(rl.labels[0]), 0.05)
        assert close(float(rl.value[name][0]), ref), name


def test_sa_dnn_recipe_is_zero_when_everything_is_cut(net, x):
    r = fi(net, x, mode="sa_dnn", eps=1e3)
    assert (r.value == 0).all() and (r.rank == 0).all()


# ------------------------------------------------------------------------------------------
# the (1 - p) / p identity and the supremum


def test_full_rank_identity(net, x):
    """dim(omega) = 72 >= C - 1 = 4 in general position: rank C - 1 and FI = (1 - p_y) / p_y."""
    for y in (None, torch.tensor([1, 2, 0])):
        r = fi(net, x, y)
        assert (r.rank == 4).all()
        assert torch.allclose(r.value, r.odds, rtol=1e-10)


def test_identity_on_pretrained_lenet5():
    from sensitivity_lib import data, zoo

    m = zoo.lenet5("standard")
    xs = data.mnist_test20().images[:4]
    r = fi(m, xs)
    assert (r.rank == 9).all()
    assert torch.allclose(r.value, r.odds, rtol=1e-5)
    assert r.labels.tolist() == [7, 2, 1, 0]


def test_random_directions_never_exceed_the_sup(net, x):
    r = fi(net, x)
    v = torch.randn(500, *x.shape, generator=torch.Generator().manual_seed(5), dtype=DT)
    vals = fi_direction(net, x, v)
    assert vals.shape == (500, len(x))
    assert (vals <= r.value * (1 + 1e-9)).all()
    assert (vals.max(0).values > 0.05 * r.value).all()
    # and the maximiser G^+ df attains it
    for i in range(len(x)):
        Jp, p, G = dense_metric(input_prob_fn(net, x[i]), x[i].reshape(-1))
        y = int(r.labels[i])
        vstar = torch.linalg.pinv(G, rtol=1e-10, hermitian=True) @ (Jp[y] / p[y])
        got = fi_direction(net, x[i : i + 1], vstar.reshape(1, *x.shape[1:]))
        assert close(float(got[0]), float(r.value[i]), 1e-8)


def test_random_parameter_directions_never_exceed_layer_fi(net, x):
    r = fi(net, x[:1], wrt="layers")
    g = torch.Generator().manual_seed(6)
    for name in r.value:
        f, w0 = layer_prob_fn(net, x[0], name)
        Jp, p, G = dense_metric(f, w0)
        y = int(r.labels[0])
        df = Jp[y] / p[y]
        V = torch.randn(2000, w0.numel(), generator=g, dtype=DT)
        vals = (V @ df) ** 2 / torch.einsum("ki,ij,kj->k", V, G, V)
        assert vals.max() <= float(r.value[name][0]) * (1 + 1e-9)


@settings(max_examples=60, deadline=None)
@given(C=st.integers(2, 6), d=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_fi_from_gram_matches_pinv_and_is_bounded(C, d, seed):
    g = torch.Generator().manual_seed(seed)
    Jz = torch.randn(C, d, generator=g, dtype=DT)
    z = torch.randn(C, generator=g, dtype=DT) * 2
    p = torch.softmax(z, 0)
    y = int(torch.randint(C, (1,), generator=g))
    H = torch.diag(p) - torch.outer(p, p)
    Jp = H @ Jz
    G = Jp.T @ torch.diag(1 / p) @ Jp
    val, rank = fi_from_gram(Jz @ Jz.T, p, torch.tensor(y))
    assert close(float(val), dense_fi(Jp, p, G, y), 1e-7)
    assert int(rank) == min(d, C - 1)
    odds = (1 - float(p[y])) / float(p[y])
    assert float(val) <= odds * (1 + 1e-9)
    if d >= C - 1:  # col(J_z) + span(1) = R^C for a generic J_z with C - 1 columns
        assert close(float(val), odds, 1e-9)
    if d == 1:  # scalar omega: (d log p_y)^2 / sum_k (d p_k)^2 / p_k
        ref = float((Jp[y, 0] / p[y]) ** 2 / ((Jp[:, 0] ** 2) / p).sum())
        assert close(float(val), ref, 1e-9)


def test_exact_mode_keeps_relative_accuracy_near_saturation():
    """p_y = 1 - 1e-12: FI = (1 - p_y) / p_y to full relative accuracy, no cancellation."""
    C = 4
    z = torch.tensor([30.0, 2.4, 1.0, 0.0], dtype=DT)
    p = torch.softmax(z, 0)
    Jz = torch.randn(C, 7, generator=torch.Generator().manual_seed(0), dtype=DT)
    val, rank = fi_from_gram(Jz @ Jz.T, p, torch.tensor(0))
    odds = float(p[1:].sum() / p[0])
    assert odds < 1e-11 and int(rank) == 3
    assert close(float(val), odds, 1e-8)


# ------------------------------------------------------------------------------------------
# invariance


class Rescaled(nn.Module):
    """model(s * nu): the same model in the coordinates nu = omega / s."""

    def __init__(self, net, s):
        super().__init__()
        self.net, self.s = net, s

    def forward(self, nu):
        return self.net(nu * self.s)


class ScaledLinear(nn.Module):
    """A Linear whose parameters are stored as theta / c (per entry): a reparameterisation."""

    def __init__(self, lin: nn.Linear, cw: torch.Tensor, cb: torch.Tensor):
        super().__init__()
        self.cw, self.cb = cw, cb
        self.weight = nn.Parameter(lin.weight.detach() / cw)
        self.bias = nn.Parameter(lin.bias.detach() / cb)

    def forward(self, h):
        return nn.functional.linear(h, self.weight * self.cw, self.bias * self.cb)


def test_exact_fi_is_invariant_to_reparameterising_the_input_and_sa_dnn_is_not(net, x):
    s = torch.exp(torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(7), dtype=DT))
    net2 = Rescaled(net, s)
    for wrt, kw in (("input", {}), ("pixels", {"patch": 0}), ("pixels", {"patch": 1})):
        a = fi(net, x, wrt=wrt, **kw)
        b = fi(net2, x / s, wrt=wrt, **kw)
        assert torch.allclose(a.value, b.value, rtol=1e-9, atol=1e-12), wrt
        a2 = fi(net, x, wrt=wrt, mode="sa_dnn", input_scale=1.0, **kw)
        b2 = fi(net2, x / s, wrt=wrt, mode="sa_dnn", input_scale=1.0, **kw)
        assert (a2.value > 0).any() and not torch.allclose(a2.value, b2.value, rtol=1e-3), wrt
        # the same change of coordinates through input_scale (omega = s * x per coordinate)
        c = fi(net, x, wrt=wrt, input_scale=s, **kw)
        assert torch.allclose(a.value, c.value, rtol=1e-9, atol=1e-12), wrt
        c2 = fi(net, x, wrt=wrt, mode="sa_dnn", input_scale=1 / s, **kw)
        assert torch.allclose(b2.value, c2.value, rtol=1e-9, atol=1e-12), wrt
    # a global change of units (0-1 against 0-255 pixels) is invisible in exact mode only
    e1 = fi(net, x, wrt="pixels", input_scale=1.0).value
    e255 = fi(net, x, wrt="pixels", input_scale=255.0).value
    assert torch.allclose(e1, e255, rtol=1e-9, atol=1e-12)
    s1 = fi(net, x, wrt="pixels", mode="sa_dnn", input_scale=1.0).value
    s255 = fi(net, x, wrt="pixels", mode="sa_dnn", input_scale=255.0).value
    assert (s1 > 0).any() and not torch.allclose(s1, s255, rtol=1e-3)


def test_exact_fi_is_invariant_to_reparameterising_a_layer_and_sa_dnn_is_not(net, x):
    g = torch.Generator().manual_seed(8)
    lin = net[7]
    # theta = c * theta' with c per entry, 1e-2 on average: the sa_dnn cut-off now bites
    cw = 1e-2 * torch.exp(torch.randn(lin.weight.shape, generator=g, dtype=DT))
    cb = 1e-2 * torch.exp(torch.randn(lin.bias.shape, generator=g, dtype=DT))
    net2 = nn.Sequential(*[ScaledLinear(m, cw, cb) if i == 7 else m for i, m in enumerate(net)])
    for m in ("exact", "sa_dnn"):
        a = fi(net, x, wrt="layers", mode=m)
        b = fi(net2, x, wrt="layers", mode=m)  # functorch path: ScaledLinear is custom
        assert b.method == "functorch" and (a.value["7"] > 0).all()
        same = torch.allclose(a.value["7"], b.value["7"], rtol=1e-9)
        assert same == (m == "exact"), m
        for name in set(a.value) - {"7"}:  # the other layers keep their coordinates
            assert torch.allclose(a.value[name], b.value[name], rtol=1e-9), name


# ------------------------------------------------------------------------------------------
# behaviour and errors


def test_training_mode_is_refused_not_switched():
    # the library's one eval-mode policy (sensitivity_lib.validation.check_eval): a dropout or batch
    # norm in training mode is not a fixed function; refuse, and leave the model as it was
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(8, 6), nn.Dropout(0.5), nn.ReLU(), nn.Linear(6, 3)
    ).to(DT)
    xx = torch.rand(4, 1, 2, 4, dtype=DT)
    net.train()
    for wrt in ("layers", "input", "pixels"):
        with pytest.raises(ValueError, match="model.eval"):
            fi(net, xx, wrt=wrt)
    assert net.training and net[2].training
    net.eval()
    assert set(fi(net, xx, wrt="layers").value) == {"1", "4"}


def test_results_are_reproducible_and_float32_close_to_float64(net, x):
    a = fi(net, x, wrt="pixels", patch=1)
    b = fi(net, x, wrt="pixels", patch=1)
    assert torch.equal(a.value, b.value)
    net32 = small_cnn().float()
    c = fi(net32, x.float(), wrt="pixels", patch=1)
    assert c.value.dtype == DT
    assert torch.allclose(c.value, a.value, rtol=1e-3, atol=1e-6)


def test_scalar_label_and_repr(net, x):
    r = fi(net, x, 2)
    assert r.labels.tolist() == [2, 2, 2]
    assert "Influence(" in repr(r) and r.kind == "exact"
    assert fi(net, x, mode="sa_dnn").kind == "estimate"
    assert math.isfinite(float(fi(net, x[:1])))
    with pytest.raises(TypeError, match="several values"):
        float(r)
    with pytest.raises(TypeError, match="layers"):
        r.matrix()


@pytest.mark.parametrize(
    "kwargs, err, msg",
    [
        (dict(wrt="weights"), ValueError, "wrt must be one of"),
        (dict(mode="approx"), ValueError, "mode must be"),
        (dict(tol=1), TypeError, "unknown option"),
        (dict(patch=1), ValueError, "patch=s applies to wrt='pixels'"),
        (dict(wrt="pixels", patch=-1), ValueError, "patch must be an int"),
        (dict(wrt="layers", input_scale=2.0), ValueError, "input_scale applies"),
        (dict(eps=0.0, mode="sa_dnn"), ValueError, "eps must be a positive"),
        (dict(rtol=2.0), ValueError, "rtol"),
        (dict(y=torch.tensor([0, 1, 9])), ValueError, "labels must lie in"),
        (dict(y=torch.tensor([0, 1])), ValueError, "one integer per sample"),
        (dict(wrt="layers", method="magic"), ValueError, "method must be"),
    ],
)
def test_bad_arguments_raise(net, x, kwargs, err, msg):
    with pytest.raises(err, match=msg):
        fi(net, x, **kwargs)


def test_bad_inputs_raise(net, x):
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fi(net, bad)
    with pytest.raises(ValueError, match=r"\(N, Ch, H, W\)"):
        fi(net, x.reshape(3, -1), wrt="pixels")
    with pytest.raises(TypeError, match="floating-point"):
        fi(net, x.long())
    with pytest.raises(TypeError, match="nn.Module"):
        fi(lambda t: t, x)
    with pytest.raises(ValueError, match="shape"):
        fi_direction(net, x, torch.zeros(2, 2))


def test_batch_statistics_batch_norm_is_refused(x):
    net = nn.Sequential(
        nn.BatchNorm2d(2, track_running_stats=False), nn.Flatten(), nn.Linear(72, 3)
    )
    with pytest.raises(ValueError, match="running statistics"):
        fi(net.to(DT), x)


def test_hooks_refuse_unsupported_modules(net, x):
    net2 = nn.Sequential(net, nn.PReLU(num_parameters=1).to(DT))
    with pytest.raises(NotImplementedError, match="functorch"):
        fi(net2, x, wrt="layers", method="hooks")
    r = fi(net2, x, wrt="layers")  # auto falls back
    assert r.method == "functorch" and "1" in r.value


def test_reference_loop_is_the_authors_computation(net, x):
    """The slow baseline of the benchmark agrees with fi(mode='sa_dnn') on every kind of omega."""
    for wrt in ("input", "pixels", "layers"):
        ref = influence.reference_loop(net, x[:2], wrt, eps=1e-5)
        r = fi(net, x[:2], wrt=wrt, mode="sa_dnn", eps=1e-5)
        got = r.matrix()[1] if wrt == "layers" else r.value.reshape(2, -1).squeeze(-1)
        assert (ref > 0).any(), wrt
        assert np.allclose(got.numpy().reshape(ref.shape), ref, rtol=1e-6, atol=1e-12), wrt


def test_scalar_closed_form_equals_gram_path(net, x):
    for mode in ("exact", "sa_dnn"):
        a = fi_maps(net, x, scales=(0,), mode=mode, input_scale=20.0)[0]  # rank-one closed form
        b = fi_maps(net, x, scales=(0,), mode=mode, input_scale=20.0, return_eigvals=True)[0]
        assert torch.allclose(a.value, b.value, rtol=1e-9, atol=1e-15), mode
        assert torch.equal(a.rank, b.rank) and torch.allclose(a.grad_norm, b.grad_norm, rtol=1e-9)
        assert b.extra["eigvals"].shape == (*x.shape, 5)


@pytest.mark.parametrize("wrt", ["input", "pixels", "layers"])
def test_several_modes_from_one_jacobian(net, x, wrt):
    both = fi(net, x, wrt=wrt, mode=("exact", "sa_dnn"))
    for m in ("exact", "sa_dnn"):
        one = fi(net, x, wrt=wrt, mode=m)
        a, b = (both[m].matrix()[1], one.matrix()[1]) if wrt == "layers" else (both[m].value, one.value)
        assert torch.allclose(a, b, rtol=1e-12, atol=0), m
        assert both[m].extra["input_scale"] == one.extra["input_scale"]
    with pytest.raises(ValueError, match="mode must be"):
        fi(net, x, wrt=wrt, mode=("exact", "fast"))


def test_flip_top_pixels_flips_the_highest_scores_first(net, x):
    score = torch.zeros_like(x)
    score[:, 0, 2, 3] = 5.0
    score[:, 1, 0, 0] = 4.0
    out = influence.flip_top_pixels(net, x, score, ks=(0, 1, 2))
    assert out["drop"].shape == (3, len(x)) and (out["drop"][0] == 0).all()
    for k, coords in ((1, [(0, 2, 3)]), (2, [(0, 2, 3), (1, 0, 0)])):
        xx = x.clone()
        for c, h, w in coords:
            xx[:, c, h, w] = 1 - x[:, c, h, w]
        lp = torch.log_softmax(net(x), -1)
        y = lp.argmax(-1)
        want = lp.gather(1, y[:, None])[:, 0] - torch.log_softmax(net(xx), -1).gather(1, y[:, None])[:, 0]
        assert torch.allclose(out["drop"][k], want.detach(), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="shape of x"):
        influence.flip_top_pixels(net, x, score[:1], ks=(1,))


# ------------------------------------------------------------------------------------------
# the batch-norm-folded inference copy used for input Jacobians


def test_inference_copy_folds_bn_and_is_invalidated_by_training():
    model = small_cnn(3)
    x = torch.randn(4, 2, 6, 6, dtype=DT, generator=torch.Generator().manual_seed(0))
    fused = measure._inference_copy(model)
    assert fused is not model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())  # folded away
    assert measure._inference_copy(model) is fused  # cached
    z0, J0 = measure._input_jacobian(model, x)
    xg = x.clone().requires_grad_(True)
    z = model(xg)
    J = torch.stack([torch.autograd.grad(z[:, k].sum(), xg, retain_graph=True)[0] for k in range(5)], 1)
    assert torch.allclose(z0, z.detach(), rtol=1e-12, atol=1e-12)
    assert torch.allclose(J0, J, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # an in-place update (as an optimiser makes) invalidates the copy
        model[1].weight.mul_(2.0)
    fused2 = measure._inference_copy(model)
    assert fused2 is not fused
    z2, _ = measure._input_jacobian(model, x)
    assert torch.allclose(z2, model(x), rtol=1e-12, atol=1e-12)
    model.train()
    assert measure._inference_copy(model) is model  # never folds in training mode


def test_jacobians_are_float64_whatever_the_model_dtype():
    """The core issue's second correction: FI maps of a float32 model are computed from float64
    Jacobians (a cached float64 copy of the model), so they equal the maps of the float64 model to
    float64 round-off, and agree with the authors' per-image loop run in float64; asking for float32
    Jacobians gives the float32 answer, visibly different on a deep enough network."""
    torch.manual_seed(3)
    deep = nn.Sequential(
        *[m for _ in range(6) for m in (nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Tanh())],
        nn.Flatten(), nn.Linear(72, 5),
    )  # fmt: skip
    _randomise_bn(deep, torch.Generator().manual_seed(4))
    m32, m64 = deep.float().eval(), copy.deepcopy(deep).double().eval()
    x = torch.rand(3, 2, 6, 6, generator=torch.Generator().manual_seed(5))
    maps64 = {}
    for mode in ("exact", "sa_dnn"):
        a = fi_maps(m32, x, scales=(0, 1), mode=mode)
        b = maps64[mode] = fi_maps(m64, x.double(), scales=(0, 1), mode=mode)
        for s in (0, 1):
            assert torch.allclose(a[s].value, b[s].value, rtol=1e-10, atol=1e-300), (mode, s)
    ref = measure.reference_loop(m32, x, "pixels", dtype=torch.float64)
    ours = fi_maps(m32, x, scales=(0,), mode="sa_dnn")[0].value.reshape(3, -1).numpy()
    assert np.allclose(ours, ref, rtol=1e-8, atol=0)
    low, exact64 = fi_maps(m32, x, scales=(0,), dtype=torch.float32)[0].value, maps64["exact"][0].value
    assert not torch.allclose(low, exact64, rtol=1e-9) and torch.allclose(low, exact64, rtol=1e-2)
    whole32, whole64 = fi(m32, x), fi(m64, x.double())
    assert torch.allclose(whole32.value, whole64.value, rtol=1e-10)

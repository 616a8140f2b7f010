"""sensitivity_lib.precision: roundings against torch's own casts, quantized models, predicted and
measured bits against closed forms and brute force."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_nets
from hypothesis import HealthCheck, given, settings
from torch import nn

from sensitivity_lib import condition, data, zoo
from sensitivity_lib.precision import (
    FORMATS,
    activation_condition,
    as_format,
    fixed_format,
    float_format,
    hessian_trace,
    layer_sqnr,
    measured_bits,
    min_input_bits,
    predicted_bits,
    quantized,
    recommend_bits,
    round_fixed,
    round_float,
    round_to_levels,
    sqnr_db,
    weight_condition,
)

# (name, significand bits, exponent bits, torch dtype, bits of the integer view)
CASTS = [
    ("float16", 11, 5, torch.float16, torch.int16),
    ("bfloat16", 8, 8, torch.bfloat16, torch.int16),
    ("float8_e5m2", 3, 5, torch.float8_e5m2, torch.uint8),
    ("float8_e4m3fn", 4, 4, torch.float8_e4m3fn, torch.uint8),
]


def _every_value(dtype: torch.dtype, view: torch.dtype) -> torch.Tensor:
    """Every finite value of a 16- or 8-bit format, sorted, as float32."""
    if view == torch.uint8:
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    else:
        codes = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    v = codes.view(dtype).float()
    v = v[torch.isfinite(v)]
    return torch.unique(v)  # sorted; -0.0 and 0.0 merge


def _probe_values(dtype: torch.dtype, view: torch.dtype) -> torch.Tensor:
    """Every representable value, every midpoint between neighbours (the ties), the float32 numbers
    just above and below each midpoint, values beyond the largest one, random float32 numbers over
    the whole range including subnormals, signed zeros, infinities and NaN."""
    v = _every_value(dtype, view)
    mid = v[:-1] + (v[1:] - v[:-1]) / 2  # exact in float32: one more bit than the format
    assert torch.equal(mid.double(), (v[1:].double() + v[:-1].double()) / 2)
    up = torch.nextafter(mid, torch.full_like(mid, math.inf))
    down = torch.nextafter(mid, torch.full_like(mid, -math.inf))
    big = float(v.max())
    g = torch.Generator().manual_seed(0)
    rand = torch.exp2(torch.rand(20000, generator=g) * 300 - 150).float()
    rand = rand * torch.sign(torch.randn(20000, generator=g))
    over = torch.tensor([big * 1.001, big * 1.03, big * 1.07, big * 1.2, big * 4, 3e38])
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan])
    return torch.cat([v, mid, up, down, rand, over, -over, special]).float()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (so -0.0 differs from 0.0), every NaN equal to every NaN."""
    nan = torch.isnan(a) & torch.isnan(b)
    return bool(((a.view(torch.int32) == b.view(torch.int32)) | nan).all())


@pytest.mark.parametrize("name,p,e,dtype,view", CASTS, ids=[c[0] for c in CASTS])
def test_round_float_equals_torch_casts_bit_for_bit(name, p, e, dtype, view):
    x = _probe_values(dtype, view)
    # the float64 computation (on float32 tensors round_float takes torch's cast itself: see
    # test_float32_shortcuts_equal_the_float64_path)
    ours = FORMATS[name].round(x.double()).float()
    torch_cast = x.to(dtype).to(torch.float32)
    assert _same_bits(ours, torch_cast), x[~((ours == torch_cast) | (ours.isnan() & torch_cast.isnan()))][:10]
    if name != "float8_e4m3fn":  # the IEEE-like formats by their sizes alone
        assert _same_bits(round_float(x.double(), p, e).float(), torch_cast)


def test_float8_e4m3fn_has_no_infinity_and_saturates_at_448():
    f = FORMATS["float8_e4m3fn"]
    x = torch.tensor([447.0, 448.0, 463.9, 464.0, 464.1, 480.0, 1e4, 3e38, math.inf, -math.inf, -1e4])
    r = f.round(x)
    assert not bool(torch.isinf(r).any())
    assert r.abs().max().item() == 448.0
    # torch's cast (2.x) saturates too, infinities included; a NaN stays a NaN
    assert torch.equal(r, x.to(torch.float8_e4m3fn).float())
    assert torch.isnan(f.round(torch.tensor([math.nan]))).all()
    # the same sizes under IEEE rules would reach 240 and overflow to infinity
    assert round_float(torch.tensor([240.0, 256.0]), 4, 4).tolist() == [240.0, math.inf]


def test_round_float_keeps_the_sign_of_zero_and_underflows_to_signed_zero():
    x = torch.tensor([0.0, -0.0, 1e-30, -1e-30], dtype=torch.float64)
    for mode in ("nearest", "chop", "stochastic"):
        r = round_float(x, 11, 5, mode=mode, generator=torch.Generator().manual_seed(0))
        assert torch.equal(torch.signbit(r), torch.signbit(x)) and bool((r == 0).all())


def _ulp(x: torch.Tensor, p: int, e: int | None) -> torch.Tensor:
    lead = torch.floor(torch.log2(x.abs()))
    if e is not None:
        lead = lead.clamp_min(2 - 2 ** (e - 1))
    return torch.exp2(lead - (p - 1))


@pytest.mark.parametrize("p,e", [(11, 5), (8, 8), (3, 5), (5, None), (24, None)])
def test_chop_never_increases_magnitude_and_errs_by_less_than_one_ulp(p, e):
    g = torch.Generator().manual_seed(1)
    x = torch.exp2(torch.rand(20000, generator=g, dtype=torch.float64) * 60 - 40)
    x = x * torch.sign(torch.randn(20000, generator=g, dtype=torch.float64))
    if e is not None:
        largest = math.ldexp(2.0 - 2.0 ** (1 - p), 2 ** (e - 1) - 1)
        x = x.clamp(-largest, largest)
    r = round_float(x, p, e, mode="chop")
    assert bool((r.abs() <= x.abs()).all())
    assert bool(((r - x).abs() < _ulp(x, p, e)).all())
    assert bool((torch.sign(r) * torch.sign(x) >= 0).all())
    # round to nearest errs by at most half an ulp (relative 2^-p in the normal range)
    n = round_float(x, p, e)
    assert bool(((n - x).abs() <= _ulp(x, p, e) / 2).all())
    if e is not None:  # chopping overflows to the largest finite value, never to infinity
        big = torch.tensor([1e300, -1e300], dtype=torch.float64)
        assert round_float(big, p, e, mode="chop").abs().tolist() == [largest, largest]


def test_chop_relative_error_on_unbounded_exponent():
    g = torch.Generator().manual_seed(0)
    x = torch.exp(torch.randn(10_000, generator=g, dtype=torch.float64) * 3)
    x = x * torch.sign(torch.randn(10_000, generator=g, dtype=torch.float64))
    assert torch.equal(round_float(x, 24), x.float().double())  # float32, in its normal range
    for t in (3, 7, 16):
        assert float(((round_float(x, t) - x) / x).abs().max()) <= 2.0**-t
        chop = round_float(x, t, mode="chop")
        assert float(((chop - x) / x).abs().max()) < 2.0 ** (1 - t)
    with pytest.raises(ValueError):
        round_float(x, 0)
    with pytest.raises(ValueError):
        round_float(x, 4, mode="up")


@pytest.mark.parametrize(
    "value,p,e", [(1.0 + 0.3 * 2.0**-10, 11, 5), (0.7 * 2.0**-24, 11, 5), (-2.6, 3, None)]
)
def test_stochastic_rounding_is_unbiased(value, p, e):
    """A z-test: the mean of n draws differs from x by less than 4 standard errors (false alarm
    probability 6e-5), and each draw is one of the two neighbours of x, up with probability equal to
    x's distance from the one below, in ulps."""
    n = 40_000
    x = torch.full((n,), value, dtype=torch.float64)
    r = round_float(x, p, e, mode="stochastic", generator=torch.Generator().manual_seed(3))
    lo, hi = round_float(x[:1], p, e, mode="chop"), None
    ulp = float(_ulp(x[:1], p, e))
    lo = float(torch.floor(x[:1] / ulp) * ulp)
    hi = lo + ulp
    assert set(r.unique().tolist()) <= {lo, hi}
    frac = (value - lo) / ulp
    se = ulp * math.sqrt(frac * (1 - frac) / n)
    z = (float(r.mean()) - value) / se
    assert abs(z) < 4, z
    # nearest is biased for the same input (it always goes one way)
    assert abs(float(round_float(x[:1], p, e)) - value) > 4 * se


def test_round_fixed_saturates_and_rounds():
    x = torch.tensor([-100.0, -2.0, -1.06, 0.3, 1.9999, 7.9, 100.0], dtype=torch.float64)
    r = round_fixed(x, 4, int_bits=3)  # Q3.4: [-8, 8 - 1/16], step 1/16
    assert r[0].item() == -8.0 and r[-1].item() == 8.0 - 1 / 16
    inside = x.abs() < 8
    assert bool(((r - x)[inside].abs() <= 1 / 32).all())
    assert torch.equal(round_fixed(x, 4, int_bits=3), FORMATS["Q3.4"].round(x))
    assert round_fixed(torch.tensor([1e6]), 2).item() == 1e6  # no int_bits: no limit
    chop = round_fixed(x, 4, int_bits=3, mode="chop")
    assert bool((chop.abs() <= x.abs()).all())
    assert fixed_format(8, 7).storage_bits == 16 and FORMATS["float16"].storage_bits == 16
    with pytest.raises(ValueError):
        as_format("float12")


def test_round_to_levels():
    x = torch.linspace(0, 1, 1001)
    for b in (1, 3, 8):
        r = round_to_levels(x, b)
        assert float((r - x).abs().max()) <= 0.5 / (2**b - 1) + 1e-7
        assert len(torch.unique(r)) <= 2**b
    with pytest.raises(ValueError):
        round_to_levels(x, 0)


def _hooked_net() -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).eval()
    calls: list = []
    net[0].register_forward_hook(lambda m, a, o: calls.append(1))
    return net, calls


def test_quantized_leaves_the_model_its_weights_and_hooks_unchanged():
    net, calls = _hooked_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    hooks = {n: dict(m._forward_hooks) for n, m in net.named_modules()}
    x = torch.rand(2, 1, 6, 6)
    y = net(x).detach()
    q = quantized(net, inputs="float8_e5m2", weights="bfloat16", activations="float8_e4m3fn")
    yq = q(x)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert {n: dict(m._forward_hooks) for n, m in net.named_modules()} == hooks
    assert torch.equal(net(x), y)
    # the copy is rounded: its weights are bfloat16 numbers, its output an e4m3fn number
    w = q.model[0].weight
    assert torch.equal(w, w.bfloat16().float()) and not torch.equal(w, net[0].weight)
    assert torch.equal(yq, yq.to(torch.float8_e4m3fn).float())
    assert len(calls) == 3  # the user's hook ran in the two calls of net and once in the copy
    with pytest.raises(ValueError):
        quantized(net, weights={"nope": "float16"})


def test_quantized_per_layer_rounds_only_that_layer():
    net, _ = _hooked_net()
    q = quantized(net, weights={"3": fixed_format(2)})
    assert torch.equal(q.model[0].weight, net[0].weight)
    assert torch.equal(q.model[3].weight, round_fixed(net[3].weight, 2))


def test_weight_condition_of_an_affine_map_is_closed_form():
    """y = W x + b: dy = dW x + db, so ||J_w|| = sqrt(||x||^2 + 1) and kappa_w follows."""
    torch.manual_seed(2)
    lin = nn.Sequential(nn.Linear(5, 3)).double().eval()
    x = torch.randn(4, 5, dtype=torch.float64)
    e = weight_condition(lin, x, tol=1e-10, max_iter=50)
    W, b = lin[0].weight.detach(), lin[0].bias.detach()
    w = torch.sqrt(W.pow(2).sum() + b.pow(2).sum())
    exact = torch.sqrt(x.pow(2).sum(1) + 1) * w / lin(x).detach().norm(dim=1)
    assert torch.allclose(e.value, exact, rtol=1e-8)


def test_activation_condition_matches_the_dense_jacobians():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    e = activation_condition(net, x, tol=1e-10, max_iter=50)
    W2 = net[2].weight.detach()
    for i in range(3):
        h = net[0](x[i])
        D = torch.diag(1 - torch.tanh(h) ** 2)
        J = torch.cat([W2 @ D, W2, torch.eye(3, dtype=torch.float64)], dim=1)  # d y / d(a0, a1, a2)
        a = torch.cat([h, torch.tanh(h), net(x[i : i + 1])[0]]).detach()
        exact = torch.linalg.matrix_norm(J, 2) * a.norm() / net(x[i : i + 1]).detach().norm()
        assert abs(float(e.value[i]) - float(exact)) < 1e-8 * float(exact)


def test_predicted_bits_first_order_holds_for_a_small_rounding():
    """On a smooth network the first-order prediction is close: rounding the weights to the
    predicted width keeps every decision (not a theorem; a check at these sizes)."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double().eval()
    x = torch.rand(16, 6, dtype=torch.float64)
    p = predicted_bits(net, x, tol=1e-8)
    m = measured_bits(net, x, "weights", bits=range(1, 40))
    assert bool((m <= p["weights first-order"].long() + 1).all())
    assert bool((p["all first-order"] >= p["weights first-order"]).all())
    assert bool((p["inputs certified"] >= p["inputs first-order"]).all())


def test_measured_bits_against_brute_force():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double().eval()
    x = torch.rand(12, 6, dtype=torch.float64)
    y0 = net(x).argmax(1)
    widths = range(1, 20)
    for target in ("inputs", "weights", "activations", "all"):
        got = measured_bits(net, x, target, bits=widths)
        for i in range(len(x)):
            need = 1
            for t in widths:
                f = float_format(t)
                q = quantized(
                    net, inputs=f if target in ("inputs", "all") else None,
                    weights=f if target in ("weights", "all") else None,
                    activations=f if target in ("activations", "all") else None,
                )  # fmt: skip
                if int(q(x[i : i + 1]).argmax()) != int(y0[i]):
                    need = t + 1
            assert int(got[i]) == need, (target, i)


def _certified_not_below_measured(model: nn.Module, x: torch.Tensor) -> None:
    y = model(x).detach()
    t_cert = min_input_bits(condition.global_condition(model, x).extra["log2"], y)
    widths = range(1, 25)
    m = measured_bits(model, x, "inputs", bits=widths)
    assert bool((m.double() <= t_cert.clamp_min(1)).all()), (m, t_cert)


@pytest.mark.parametrize("variant", ["standard", "adversarial"])
def test_certified_input_bits_never_below_measured_on_lenet5(variant):
    model = zoo.lenet5(variant)
    _certified_not_below_measured(model, data.mnist_test20().images[:8])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_nets())
def test_certified_input_bits_never_below_measured_on_random_nets(net_shape):
    net, shape = net_shape
    x = torch.randn(3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = net(x).reshape(3, -1)
    if y.shape[1] < 2 or bool((y.topk(2, dim=1).values.diff(dim=1).abs() < 1e-9).any()):
        return
    _certified_not_below_measured(net, x)


def test_sqnr_gains_about_6_dB_per_bit():
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = torch.stack([sqnr_db(x, round_float(x, t)) for t in range(4, 16)])
    steps = s.diff()
    assert abs(float(steps.mean()) - 20 * math.log10(2)) < 0.1
    net, _ = _hooked_net()
    out = layer_sqnr(net, torch.rand(2, 1, 6, 6), "float16")
    assert set(out) == {"0#0", "1#0", "3#0"} and all(v > 50 for v in out.values())


def test_hessian_trace_of_a_linear_softmax_model_matches_the_exact_trace():
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3)).double().eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    h = hessian_trace(net, x, samples=300, generator=torch.Generator().manual_seed(0))
    y = net(x).argmax(1).detach()
    W2, b2 = net[2].weight.detach(), net[2].bias.detach()

    def loss(v):
        return nn.functional.cross_entropy(net[1](net[0](x)) @ v[:12].view(3, 4).T + v[12:], y)

    exact = torch.func.hessian(loss)(torch.cat([W2.flatten(), b2])).detach().trace()
    assert abs(float(h["2"].value - exact)) < 4 * float(h["2"].residual) + 1e-12


def test_recommend_bits_reports_every_target():
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double().eval()
    x = torch.rand(8, 6, dtype=torch.float64)
    r = recommend_bits(net, x, margin_bits=2, bits=range(1, 25))
    t = r.table()
    assert list(t.index) == ["inputs", "weights", "activations", "all"]
    for target in t.index:
        assert r.recommended(target) == r.rows[target]["measured"] + 2
    assert r.rows["inputs"]["certified"] >= r.rows["inputs"]["measured"]
    assert r.rows["weights"]["certified"] is None
    assert "<table" in r._repr_html_()
    with pytest.raises(ValueError):
        recommend_bits(net, x, margin_bits=-1)


def test_float32_shortcuts_equal_the_float64_path():
    """round_float on float32 tensors takes torch's casts or integer arithmetic on the bit patterns:
    the same numbers as the exact float64 computation, ties and carries into the exponent included."""
    g = torch.Generator().manual_seed(8)
    x = torch.exp2(torch.rand(50_000, generator=g) * 250 - 125) * torch.sign(torch.randn(50_000, generator=g))
    ties = (torch.randint(1, 2**12, (5000,), generator=g).float() * 2 + 1) * 2.0**-13  # halfway cases
    x = torch.cat([x, ties, -ties, torch.tensor([3.4e38, -3.4e38, 0.0, -0.0, math.inf, math.nan])]).float()
    for p in (1, 2, 5, 8, 11, 17, 23, 24):
        for e in (None, 8):
            for mode in ("nearest", "chop"):
                fast = round_float(x, p, e, mode=mode)
                slow = round_float(x.double(), p, e, mode=mode).float()
                assert _same_bits(fast, slow), (p, e, mode)
    for name in ("float16", "bfloat16", "float8_e5m2", "float8_e4m3fn"):
        f = FORMATS[name]
        fast = f.round(x)
        slow = f.round(x.double()).float()
        assert _same_bits(fast, slow), name


def test_margin_criterion_is_finer_than_flips():
    """A flip needs the logits to move by at least g / sqrt(2): the margin criterion never asks for
    fewer bits than the flip criterion."""
    torch.manual_seed(9)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double().eval()
    x = torch.rand(10, 6, dtype=torch.float64)
    for target in ("inputs", "weights"):
        flip = measured_bits(net, x, target, bits=range(1, 30))
        margin = measured_bits(net, x, target, bits=range(1, 30), criterion="margin")
        assert bool((margin >= flip).all())

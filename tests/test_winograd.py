"""Tests of sensitivity_lib.winograd against torch's direct convolution."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sensitivity_lib.opnorm import conv_operator, operator_norm
from sensitivity_lib.winograd import choose_tile, winograd_conv3x3

torch.set_num_threads(1)


@settings(max_examples=40, deadline=None)
@given(
    tile=st.sampled_from([2, 4]),
    padding=st.integers(0, 2),
    batch=st.integers(1, 3),
    c_in=st.integers(1, 5),
    c_out=st.integers(1, 5),
    h=st.integers(3, 13),
    w=st.integers(3, 13),
    seed=st.integers(0, 10_000),
)
def test_matches_conv2d_in_float64(tile, padding, batch, c_in, c_out, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(batch, c_in, h, w, generator=g, dtype=torch.float64)
    ref = F.conv2d(x, weight, None, 1, padding)
    out = winograd_conv3x3(weight, padding, tile)(x)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, rtol=0, atol=1e-11 * (1 + ref.abs().max()))


@pytest.mark.parametrize("tile, bound", [(2, 2e-6), (4, 2e-5)])
def test_float32_rounding_is_as_documented(tile, bound):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 48, 3, 3, generator=g) / 20
    x = torch.randn(1, 48, 28, 28, generator=g)
    ref = F.conv2d(x.double(), weight.double(), None, 1, 1)
    out = winograd_conv3x3(weight, 1, tile)(x).double()
    rel = float((out - ref).norm() / ref.norm())
    assert rel < bound
    direct = float((F.conv2d(x, weight, None, 1, 1).double() - ref).norm() / ref.norm())
    assert rel > direct  # the transforms do cost accuracy: the docstring's point


def test_bad_inputs_say_what_is_wrong():
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="tile must be 2 or 4"):
        winograd_conv3x3(w, 1, 3)
    with pytest.raises(ValueError, match=r"\(C_out, C_in, 3, 3\)"):
        winograd_conv3x3(torch.randn(4, 3, 5, 5))
    with pytest.raises(ValueError, match="padding must be 0, 1 or 2"):
        winograd_conv3x3(w, 3)
    conv = winograd_conv3x3(w, 0)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        conv(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="too small"):
        conv(torch.randn(1, 3, 2, 2))


def test_choose_tile_rule():
    assert choose_tile(256, 256, 56, 56) == 4
    assert choose_tile(512, 512, 28, 28) == 4
    assert choose_tile(128, 256, 56, 56) == 4
    assert choose_tile(512, 512, 14, 14) is None  # measured slower: transforms dominate
    assert choose_tile(128, 128, 112, 112) is None  # no gain with 128 channels
    assert choose_tile(64, 64, 224, 224) is None


def test_conv_operator_uses_it_for_the_same_map():
    torch.manual_seed(0)
    conv = nn.Conv2d(128, 256, 3, padding=1)
    shape = (128, 56, 56)
    assert choose_tile(128, 256, 56, 56) == 4
    direct = conv_operator(conv, shape, torch.float32)
    fast = conv_operator(conv, shape, torch.float32, winograd=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, *shape, generator=g)
    y = torch.randn(2, 256, 56, 56, generator=g)
    fx, dx = fast.matvec(x), direct.matvec(x)
    assert float((fx - dx).norm() / dx.norm()) < 2e-5
    fy, dy = fast.rmatvec(y), direct.rmatvec(y)
    assert float((fy - dy).norm() / dy.norm()) < 2e-5
    # still (numerically) each other's adjoint
    lhs, rhs = (fx * y).sum(dtype=torch.float64), (x * fy).sum(dtype=torch.float64)
    assert math.isclose(float(lhs), float(rhs), rel_tol=1e-4)
    # and the norm computed through it agrees with the float64 direct evaluation it reports
    est = operator_norm(conv, shape, "lanczos", tol=1e-3)
    v = est.extra["vector"].double()
    exact = float(conv_operator(conv, shape, torch.float64).matvec(v[None]).norm() / v.norm())
    assert math.isclose(est.value, exact, rel_tol=1e-12)

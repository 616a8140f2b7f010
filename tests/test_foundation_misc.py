import pytest
import torch

import sensitivity_lib as sl
from sensitivity_lib import condition, data, zoo
from sensitivity_lib.results import Estimate

SIZES = {"quick": dict(n=1), "book": dict(n=2), "full": dict(n=3)}


def test_setup_selects_the_profile_and_seeds():
    cfg = sl.setup("book", SIZES, verbose=False)
    a = torch.rand(2, generator=cfg.generator)
    cfg2 = sl.setup("book", SIZES, verbose=False)
    assert cfg.n == 2 and torch.equal(a, torch.rand(2, generator=cfg2.generator))


@pytest.mark.parametrize(
    "profile, sizes, match",
    [
        ("fast", SIZES, "PROFILE must be one of"),
        ("quick", {"quick": {}, "book": {}}, "no entry"),
        ("quick", {"quick": dict(n=1), "book": dict(m=1), "full": dict(n=1)}, "same names"),
    ],
)
def test_setup_rejects_bad_profiles(profile, sizes, match):
    with pytest.raises(ValueError, match=match):
        sl.setup(profile, sizes, verbose=False)


def test_estimate():
    e = Estimate(torch.tensor([1.0, 3.0]), "lower", method="power", iterations=4,
                 residual=torch.tensor([1e-4, 1e-5]))  # fmt: skip
    assert "max=3" in repr(e) and not e.is_certified_upper
    with pytest.raises(TypeError, match="one per sample"):
        float(e)
    with pytest.raises(ValueError, match="kind must be"):
        Estimate(1.0, "guess", method="x")


def test_smallest_flip_on_a_linear_classifier():
    # f(x) = [w.x, 0]: the prediction flips where w.x changes sign; along -w/|w| that is at t = w.x/|w|
    w = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(torch.cat([w.flatten()[None], torch.zeros(1, 16)]))
    m = net  # a plain module: the bisection below leaves [0, 1] (clip=False), which Normalized refuses
    x = torch.full((1, 1, 4, 4), 0.5)
    if float((w * x).sum()) < 0:
        w = -w
        with torch.no_grad():
            net[1].weight[0] = w.flatten()
    d = -w / w.norm()
    r = condition.smallest_flip(m, x, d, max_norm=100.0, tol=1e-6, clip=False)
    exact = float((w * x).sum() / w.norm())
    assert r.kind == "upper" and float(r.value) >= exact and float(r.value) <= exact * (1 + 1e-5)
    # the gradient direction of the cross-entropy points the same way as -w here
    g = condition.gradient_direction(m, x)
    assert torch.allclose(g, d, atol=1e-5)
    none = condition.smallest_flip(m, x, -d, max_norm=1.0, clip=False)
    assert torch.isinf(none.value).all() and none.extra["flipped_to"].tolist() == [-1]


def test_random_directions_are_unit_and_seeded():
    a = condition.random_directions((3, 1, 5, 5), torch.Generator().manual_seed(1))
    b = condition.random_directions((3, 1, 5, 5), torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.allclose(a.flatten(1).norm(dim=1), torch.ones(3))


def test_title_for_random_models_says_so():
    from sensitivity_lib.plotting import image_grid, title_for, use_style

    use_style()
    m = zoo.torchvision_model("alexnet", weights=None)
    assert "RANDOM" in title_for(m, "norms")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3)
    image_grid(axes, data.mnist_test20().images[:2], ["a", "b"])
    assert not axes[2].axison
    plt.close(fig)


def test_glue_all_converts_scalars_and_refuses_the_rest(monkeypatch):
    import myst_nb
    import numpy as np

    from sensitivity_lib import glue_all

    calls = []
    def record(name, value, display=True):
        calls.append((name, value, display))

    monkeypatch.setattr(myst_nb, "glue", record)
    glue_all({"a": torch.tensor(0.5), "b": np.int64(3), "c": "text", "d": 2.0}, prefix="x_")
    assert calls == [("x_a", 0.5, False), ("x_b", 3, False), ("x_c", "text", False), ("x_d", 2.0, False)]
    assert type(calls[1][1]) is int
    calls.clear()
    with pytest.raises(ValueError, match="x_v: glue a scalar"):
        glue_all({"ok": 1.0, "v": torch.ones(2)}, prefix="x_")
    with pytest.raises(TypeError, match="number or a string"):
        glue_all({"m": object()})
    assert calls == []  # nothing glued when one value is refused


def test_table_formats_floats_and_refuses_bad_input():
    import pandas as pd

    from sensitivity_lib import plotting

    df = pd.DataFrame({"n": [8, 16], "gap": [0.0123456, 3.1e-5], "name": ["a", "b"]})
    html = plotting.table(df, caption="c", digits=3, formats={"n": "{:d}"}).to_html()
    assert "0.0123" in html and "3.1e-05" in html and "0.0123456" not in html
    with pytest.raises(ValueError, match="does not have"):
        plotting.table(df, formats={"missing": "{:.2f}"})
    with pytest.raises(TypeError, match="DataFrame"):
        plotting.table(df["gap"])

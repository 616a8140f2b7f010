"""The closing chapter's tools: a report of the Part I measures, and a torchvision model from a user's
weights file. Each value is checked against an independent computation."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torchvision
from torch import nn

from sensitivity_lib import zoo
from sensitivity_lib.report import MEASURES, sensitivity_report


def _affine(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    net = nn.Linear(6, 4).double().eval()
    with torch.no_grad():
        net.weight.copy_(torch.randn(4, 6, generator=g, dtype=torch.float64))
        net.bias.copy_(torch.randn(4, generator=g, dtype=torch.float64))
    return net, torch.rand(5, 6, generator=g, dtype=torch.float64)


def test_report_on_an_affine_classifier_matches_closed_forms():
    """For z = W x + b everything has a closed form: J = W, L = sigma_max(W), and the nearest
    decision boundary is a hyperplane."""
    net, x = _affine()
    rep = sensitivity_report(net, x, e0_tol=1e-10, deepfool={"overshoot": 1e-4, "clip_values": None})
    W, b = net.weight.detach(), net.bias.detach()
    z = x @ W.T + b
    smax = float(torch.linalg.svdvals(W)[0])
    kappa = smax * x.norm(dim=1) / z.norm(dim=1)
    p = rep.per_image
    assert len(p) == 5 and list(rep.summary.index) == list(MEASURES)
    assert torch.allclose(torch.tensor(p["e0"].to_numpy()), torch.log2(kappa), rtol=0, atol=1e-8)
    assert torch.allclose(torch.tensor(p["e1"].to_numpy()), torch.log2(kappa), rtol=0, atol=1e-8)
    top = z.topk(2, dim=1).values
    cert = (top[:, 0] - top[:, 1]) / (math.sqrt(2) * smax)
    assert torch.allclose(torch.tensor(p["certified"].to_numpy()), cert, rtol=1e-9)
    y = z.argmax(1)
    exact = torch.tensor([
        min(float((z[i, y[i]] - z[i, j]) / (W[y[i]] - W[j]).norm()) for j in range(4) if j != y[i])
        for i in range(5)
    ], dtype=torch.float64)  # fmt: skip
    assert torch.allclose(torch.tensor(p["first_order"].to_numpy()), exact, rtol=1e-9)
    # without the [0, 1] box, DeepFool lands just beyond the hyperplane: within its overshoot (and
    # float32) of the distance
    df = torch.tensor(p["deepfool"].to_numpy())
    assert bool((df >= exact * (1 - 1e-6)).all()) and bool((df <= exact * (1 + 1e-3)).all())
    # t_min = ceil(0.5 + log2 kappa + log2 ||z|| - log2 g), recomputed
    t = torch.ceil(0.5 + torch.log2(kappa) + torch.log2(z.norm(dim=1)) - torch.log2(top[:, 0] - top[:, 1]))
    assert torch.equal(torch.tensor(p["bits_e1"].to_numpy()), t)
    kinds = rep.summary["kind"].to_dict()
    assert kinds == {"e0": "lower", "e1": "upper", "bits_e0": "estimate", "bits_e1": "upper",
                     "certified": "lower", "first_order": "estimate", "deepfool": "upper"}  # fmt: skip
    for key in MEASURES:  # the summary's medians, recomputed with the standard library
        assert float(rep.summary.loc[key, "median"]) == pytest.approx(statistics.median(p[key].tolist()))
    assert (rep.summary["seconds"] >= 0).all() and rep.lipschitz_seconds >= 0
    assert "RANDOM" not in repr(rep)


def test_report_skips_deepfool_and_refuses_bad_input():
    net, x = _affine(1)
    rep = sensitivity_report(net, x, deepfool={"skip": True})
    assert "deepfool" not in rep.summary.index and "deepfool" not in rep.per_image
    bad = x.clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="finite|NaN|nan"):
        sensitivity_report(net, bad)
    with pytest.raises(ValueError):
        sensitivity_report(net, x[0])  # one sample without its batch dimension


def test_torchvision_from_file_reproduces_the_saved_network(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.squeezenet1_1(num_classes=7).eval()
    f = tmp_path / "mine.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, f)
    m = zoo.torchvision_from_file("squeezenet1_1", f, input_shape=(3, 64, 64), mean=(0.5, 0.5, 0.5),
                                  std=(0.25, 0.25, 0.25))  # fmt: skip
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = net((x - 0.5) / 0.25)  # the normalisation, written out
        assert torch.allclose(m(x), expected, rtol=1e-5, atol=1e-6)
    assert m.pretrained and m.classes == [str(i) for i in range(7)] and "mine.pth" in m.name


def test_torchvision_from_file_errors_say_what_to_do(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        zoo.torchvision_from_file("resnet18", missing)
    with pytest.raises(ValueError, match="torchvision classification model name"):
        zoo.torchvision_from_file("not_a_net", missing)
    f = tmp_path / "sq.pth"
    torch.save(torchvision.models.squeezenet1_1(num_classes=3).state_dict(), f)
    with pytest.raises(ValueError, match="do not fit torchvision's squeezenet1_0"):
        zoo.torchvision_from_file("squeezenet1_0", f)
    with pytest.raises(ValueError, match="class names"):
        zoo.torchvision_from_file("squeezenet1_1", f, classes=["a", "b"])
    junk = tmp_path / "junk.pth"
    torch.save([1, 2, 3], junk)
    with pytest.raises(ValueError, match="state dict"):
        zoo.torchvision_from_file("squeezenet1_1", junk)

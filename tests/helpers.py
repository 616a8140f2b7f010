"""Helpers of the tests: dense oracles (independent of the code under test, tiny sizes only) and
random networks built from every layer type the graph walker supports.

Every test file imports its oracles from here, never from another test file.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from sensitivity_lib.graph import pool_windows_1d
from sensitivity_lib.results import Estimate

# ----------------------------------------------------------------------------------------------
# dense oracles


def dense_matrix(f, in_shape) -> torch.Tensor:
    """The matrix ``(m, n)`` of a linear map ``f`` on one sample of ``in_shape`` (float64, by
    torch.func.jacrev; ``f`` takes a batch ``(1, *in_shape)``)."""
    n = math.prod(in_shape)

    def g(v):
        return f(v.reshape(1, *in_shape)).reshape(-1)

    return torch.func.jacrev(g)(torch.zeros(n, dtype=torch.float64))


def dense_norm(layer: nn.Module, in_shape) -> float:
    """The exact spectral norm of a bias-free conv / linear layer on inputs of ``in_shape``."""
    w = layer.weight.detach().double()
    if isinstance(layer, nn.Linear):
        return float(torch.linalg.svdvals(w)[0])
    pad = layer.padding
    mode = layer.padding_mode

    def f(x):
        if mode != "zeros":
            ph, pw = (0, 0) if pad == "valid" else ((pad, pad) if isinstance(pad, int) else pad)
            x = F.pad(x, (pw, pw, ph, ph), mode=mode)
            return F.conv2d(x, w, None, layer.stride, 0, layer.dilation, layer.groups)
        return F.conv2d(x, w, None, layer.stride, pad, layer.dilation, layer.groups)

    return float(torch.linalg.svdvals(dense_matrix(f, in_shape))[0])


def dense_jacobians(f, x):
    """(N, m, n) dense Jacobians of one sample's flattened output w.r.t. its flattened input."""

    def g(z):
        return f(z[None]).reshape(-1)

    J = torch.func.vmap(torch.func.jacrev(g))(x)
    return J.reshape(len(x), J.shape[1], -1).detach()


def top_sv(J):
    return torch.linalg.matrix_norm(J, 2)


def probs(net):
    def f(z):
        return torch.softmax(net(z), dim=-1)

    return f


def dense_layer_norm(step):
    """The exact norm of one conv / linear step of a plan: the SVD of its jacrev Jacobian (float64)."""
    m = step.module.double()
    shape = step.in_shape if step.kind == "conv" else (step.in_shape[-1],)
    n = math.prod(shape)

    def f(v):
        return m(v.reshape(1, *shape)).reshape(-1)

    J = torch.func.jacrev(f)(torch.zeros(n, dtype=torch.float64))
    return Estimate(float(torch.linalg.matrix_norm(J, 2)), "exact", "dense")


def dense_influence(loss, w, x, dx, damping: float = 0.0) -> torch.Tensor:
    """The influence-function response ``-(H + damping I)^{-1} R_x dx`` of a training loss (float64).

    The oracle for ``setvalued.graphical_derivative`` in the non-singular case, by plain
    ``torch.autograd`` (not torch.func): the dense Hessian of ``w -> loss(w, x)``, the dense mixed
    Jacobian ``d/dx grad_w loss`` (Koh & Liang's perturbation influence; pyDVL's ``DirectInfluence``
    in perturbation mode with ``hessian_regularization=damping`` computes the same, but pyDVL does
    not import beside this project's NumPy 2 lock), and a dense solve.
    """
    w = w.detach().double()
    x = x.detach().double()
    p = w.numel()
    H = torch.autograd.functional.hessian(lambda w_: loss(w_, x), w)

    def grad_w(x_):
        w_ = w.clone().requires_grad_(True)
        return torch.autograd.grad(loss(w_, x_), w_, create_graph=True)[0]

    J = torch.autograd.functional.jacobian(grad_w, x).reshape(p, -1)
    b = J @ dx.detach().double().reshape(-1)
    return -torch.linalg.solve(H + damping * torch.eye(p, dtype=torch.float64), b)


def teacher_network(widths, seed: int = 0, bias: bool = False) -> nn.Sequential:
    """A float64 ReLU MLP ``widths[0] -> ... -> widths[-1]`` (bias-free by default), seeded."""
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        lin = nn.Linear(a, b, bias=bias).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g, dtype=torch.float64) / math.sqrt(a))
            if bias:
                lin.bias.copy_(0.1 * torch.randn(b, generator=g, dtype=torch.float64))
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


# ----------------------------------------------------------------------------------------------
# Random small networks built from every supported layer type


class Residual(nn.Module):
    def __init__(self, c: int, act: nn.Module):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1)
        self.b = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.act = act

    def forward(self, x):
        return x + self.b(self.act(self.a(x)))


class Concat(nn.Module):
    def __init__(self, c: int, c_new: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, c_new, 3, padding=1)

    def forward(self, x):
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


class Scale(nn.Module):
    def __init__(self, c: int, divide: bool, g: torch.Generator):
        super().__init__()
        self.register_buffer("s", 0.2 + 2 * torch.rand(1, c, 1, 1, generator=g))
        self.divide = divide

    def forward(self, x):
        return (x - 0.3) / self.s if self.divide else self.s * x + 1.0


class Functional(nn.Module):
    """Activations and pools called through torch.nn.functional / tensor methods."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "relu":
            return F.relu(x)
        if self.kind == "leaky":
            return F.leaky_relu(x, 1.7)
        if self.kind == "sigmoid":
            return torch.sigmoid(x)
        if self.kind == "tanh":
            return x.tanh()
        if self.kind == "maxpool":
            return F.max_pool2d(x, 3, 2, 1)
        if self.kind == "avgpool":
            return F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)
        raise AssertionError(self.kind)


class Head(nn.Module):
    def __init__(self, n_in: int, n_out: int, softmax: bool):
        super().__init__()
        self.fc = nn.Linear(n_in, n_out)
        self.softmax = softmax

    def forward(self, x):
        y = self.fc(x.flatten(1))
        return F.softmax(y, dim=-1) if self.softmax else y


ACTS = [
    lambda: nn.ReLU(),
    lambda: nn.ReLU6(),
    lambda: nn.LeakyReLU(0.2),
    lambda: nn.LeakyReLU(1.5),
    lambda: nn.Tanh(),
    lambda: nn.Sigmoid(),
    lambda: nn.ELU(1.3),
    lambda: nn.SiLU(),
    lambda: nn.GELU(),
    lambda: nn.Hardtanh(-0.5, 0.8),
    lambda: nn.Softplus(2.0),
    lambda: nn.Identity(),
]


def _pool_out(n, k, s, p, d=1, ceil=False):
    return len(pool_windows_1d(n, k, s, p, d, ceil))


@st.composite
def random_nets(draw, max_blocks: int = 4):
    """(net, input_shape): a float64 eval-mode network from every supported layer type."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    c = draw(st.integers(1, 3))
    h = draw(st.integers(5, 9))
    w = draw(st.integers(5, 9))
    shape = (c, h, w)
    layers: list[nn.Module] = []
    for _ in range(draw(st.integers(1, max_blocks))):
        kind = draw(
            st.sampled_from(
                ["conv", "convbn", "bn", "act", "maxpool", "avgpool", "adaptive", "residual",
                 "concat", "scale", "dropout", "functional", "pad"]
            )
        )  # fmt: skip
        if kind in ("conv", "convbn"):
            k = draw(st.integers(1, 3))
            s = draw(st.integers(1, 2))
            d = draw(st.integers(1, 2))
            p = draw(st.integers(0, 1))
            groups = draw(st.sampled_from([1, c]))
            c_out = groups * draw(st.integers(1, 2))
            if d * (k - 1) + 1 > min(h, w) + 2 * p:
                continue
            if min(_pool_out(h, k, s, p, d), _pool_out(w, k, s, p, d)) < 2:
                continue
            layers.append(nn.Conv2d(c, c_out, k, s, p, d, groups=groups))
            h, w, c = _pool_out(h, k, s, p, d), _pool_out(w, k, s, p, d), c_out
            if kind == "convbn":
                layers.append(nn.BatchNorm2d(c))
        elif kind == "bn":
            layers.append(nn.BatchNorm2d(c))
        elif kind == "act":
            layers.append(draw(st.sampled_from(ACTS))())
        elif kind in ("maxpool", "avgpool"):
            k = draw(st.integers(2, 3))
            s = draw(st.integers(1, 2))
            p = draw(st.integers(0, k // 2))
            ceil = draw(st.booleans())
            if kind == "maxpool":
                d = draw(st.integers(1, 2))
                if d * (k - 1) + 1 > min(h, w) + 2 * p:
                    continue
                layers.append(nn.MaxPool2d(k, s, p, d, ceil_mode=ceil))
            else:
                d = 1
                if k > min(h, w) + 2 * p:
                    continue
                cip = draw(st.booleans())
                div = draw(st.sampled_from([None, 2, 5]))
                layers.append(nn.AvgPool2d(k, s, p, ceil, cip, div))
            h, w = _pool_out(h, k, s, p, d, ceil), _pool_out(w, k, s, p, d, ceil)
        elif kind == "adaptive":
            oh, ow = draw(st.integers(1, 4)), draw(st.integers(1, 4))
            layers.append(
                draw(st.sampled_from([nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d]))((oh, ow))
            )
            h, w = oh, ow
        elif kind == "residual":
            layers.append(Residual(c, draw(st.sampled_from(ACTS))()))
        elif kind == "concat":
            c_new = draw(st.integers(1, 2))
            layers.append(Concat(c, c_new))
            c += c_new
        elif kind == "scale":
            layers.append(Scale(c, draw(st.booleans()), g))
        elif kind == "dropout":
            layers.append(nn.Dropout(0.5))
        elif kind == "pad":
            layers.append(nn.ZeroPad2d((1, 0, 0, 1)))
            h, w = h + 1, w + 1
        else:
            fk = draw(st.sampled_from(["relu", "leaky", "sigmoid", "tanh", "maxpool", "avgpool"]))
            if fk in ("maxpool", "avgpool"):
                if min(h, w) < 2:
                    continue
                h, w = _pool_out(h, 3, 2, 1), _pool_out(w, 3, 2, 1)
            layers.append(Functional(fk))
    layers.append(Head(c * h * w, draw(st.integers(2, 4)), draw(st.booleans())))
    net = nn.Sequential(*layers).double()
    for m in net.modules():  # non-trivial batch-norm statistics
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 1, generator=g)
                m.running_var.uniform_(0.3, 3.0, generator=g)
                m.weight.normal_(0, 1.5, generator=g)
                m.bias.normal_(0, 1, generator=g)
    net.eval()
    return net, shape


# ----------------------------------------------------------------------------------------------
# fake data files


def write_fake_cifar10(root, per_batch=2, seed=0):
    """A tiny CIFAR-10 in the official python format (``cifar-10-python.tar.gz`` extracted):
    ``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``, pickles of dicts
    with ``data`` ((N, 3072) uint8: red, green, blue planes) and ``labels``. Returns the images
    (N, 3, 32, 32) uint8 and labels of the training batches, in order."""
    import pickle

    import numpy as np

    from sensitivity_lib.data import CIFAR10_CLASSES

    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x, train_y = [], []
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": x, "labels": y, "filenames": []}, f, protocol=2)
        if name != "test_batch":
            train_x.append(x.reshape(-1, 3, 32, 32))
            train_y += y
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CIFAR10_CLASSES), "num_vis": 3072}, f, protocol=2)
    return np.concatenate(train_x), train_y


"""SA_DNN-style ResNet-50 and DenseNet-121 for small images (MNIST 1x28x28, CIFAR-10 3x32x32).

Paper: H. Shu and H. Zhu, "Sensitivity Analysis of Deep Neural Networks", AAAI 2019
(arXiv:1901.07152). The authors' Keras code (``shu-hai/SA_DNN``, ``ResNet50.py`` and
``DenseNet121.py``) adapts the ImageNet networks to 28x28 and 32x32 inputs; these are PyTorch
ports of those two files.

What differs from torchvision's ImageNet networks (as in the authors' code):

- a 3x3, stride-1 stem with 64 filters (convolution, batch norm, ReLU) and **no max-pool**;
- **dropout 0.2** after every ReLU inside the ResNet blocks, and after every convolution inside the
  DenseNet blocks and transitions;
- every convolution keeps its bias (Keras' default);
- ResNet-50 ends with a 2x2 average pool, a flatten and one dense layer (so the classifier sees a
  2x2x2048 map); DenseNet-121 ends with batch norm, ReLU, global average pooling, dense layer;
- batch norm uses Keras' ``eps = 1e-3``; its momentum is PyTorch's default 0.1 (Keras uses 0.01,
  which is too slow for the few hundred steps the book trains for: a documented deviation).

Trainable modules ("layers" in the Keras sense, as used by :func:`sensitivity_lib.influence.measure.fi`
with ``wrt="layers"``): ResNet-50 has 107 (53 convolutions, 53 batch norms, 1 dense), DenseNet-121
has 242 (120 convolutions, 121 batch norms, 1 dense), as Keras lists them.

``width`` scales the network: ``width=64`` (ResNet) and ``growth=32`` (DenseNet) are the authors'
sizes; the book trains narrower copies on two CPU cores and says so.

Input: *normalised* images ``(N, in_channels, H, W)``; the builders return the raw network, and
:mod:`sensitivity_lib.zoo` wraps it with its mean and std: the zoo registers these builders as
``"sa_resnet50"``, ``"sa_densenet121"`` (MNIST, 1x28x28) and ``"sa_resnet50_cifar"``,
``"sa_densenet121_cifar"`` (CIFAR-10, 3x32x32), so ``zoo.Recipe("sa_resnet50",
arch_kwargs=(("width", 8),))`` trains a narrow copy.
Output: logits ``(N, num_classes)`` (the Keras models end in a softmax; here the softmax is left to
the loss and to the influence measure).

Example
-------
>>> import torch
>>> net = sa_resnet50(in_channels=1, num_classes=10, width=8).eval()
>>> net(torch.zeros(2, 1, 28, 28)).shape
torch.Size([2, 10])
>>> sum(1 for _ in trainable_modules(net))
107
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

__all__ = [
    "sa_resnet50",
    "sa_densenet121",
    "trainable_modules",
    "recalibrate_bn",
]

BN_EPS = 1e-3  # Keras BatchNormalization default



def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS)


class _Bottleneck(nn.Module):
    """Keras ``conv_block`` (with a projection shortcut) or ``identity_block``."""

    def __init__(self, c_in: int, mid: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, mid, 1, stride=stride)
        self.bn1 = _bn(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1)
        self.bn2 = _bn(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1)
        self.bn3 = _bn(c_out)
        self.drop = nn.Dropout(dropout)
        self.relu = nn.ReLU()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride), _bn(c_out))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.relu(self.bn1(self.conv1(x))))
        h = self.drop(self.relu(self.bn2(self.conv2(h))))
        h = self.bn3(self.conv3(h))
        return self.drop(self.relu(h + self.shortcut(x)))


class SAResNet50(nn.Module):
    """ResNet-50 of ``SA_DNN/ResNet50.py`` (see the module docstring)."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 64,
        input_size: int = 32,
        dropout: float = 0.2,
        blocks: tuple[int, ...] = (3, 4, 6, 3),
    ):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), _bn(width), nn.ReLU()
        )
        layers: list[nn.Module] = []
        c_in, size = width, input_size
        for stage, n in enumerate(blocks):
            mid = width * 2**stage
            stride = 1 if stage == 0 else 2
            size = math.ceil(size / stride)
            for b in range(n):
                layers.append(_Bottleneck(c_in, mid, 4 * mid, stride if b == 0 else 1, dropout))
                c_in = 4 * mid
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AvgPool2d(2)
        size //= 2
        if size < 1:
            raise ValueError(f"input_size={input_size} is too small for this ResNet (needs >= 16)")
        self.fc = nn.Linear(c_in * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(h, 1))


class _DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int, dropout: float):
        super().__init__()
        self.bn1 = _bn(c_in)
        self.conv1 = nn.Conv2d(c_in, 4 * growth, 1)
        self.bn2 = _bn(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.conv1(self.relu(self.bn1(x))))
        h = self.drop(self.conv2(self.relu(self.bn2(h))))
        return torch.cat([x, h], 1)


class _Transition(nn.Module):
    def __init__(self, c_in: int, c_out: int, dropout: float):
        super().__init__()
        self.bn = _bn(c_in)
        self.conv = nn.Conv2d(c_in, c_out, 1)
        self.drop = nn.Dropout(dropout)
        self.relu = nn.ReLU()
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.drop(self.conv(self.relu(self.bn(x)))))


class SADenseNet121(nn.Module):
    """DenseNet-121 of ``SA_DNN/DenseNet121.py`` (see the module docstring)."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        growth: int = 32,
        dropout: float = 0.2,
        blocks: tuple[int, ...] = (6, 12, 24, 16),
        reduction: float = 0.5,
    ):
        super().__init__()
        c = 2 * growth
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1), _bn(c), nn.ReLU())
        parts: list[nn.Module] = []
        #: for each entry of ``features``: the index of its dense block, or -1 for a transition
        self.block_index: list[int] = []
        for i, n in enumerate(blocks):
            for _ in range(n):
                parts.append(_DenseLayer(c, growth, dropout))
                self.block_index.append(i)
                c += growth
            if i < len(blocks) - 1:
                c_out = int(c * reduction)
                parts.append(_Transition(c, c_out, dropout))
                self.block_index.append(-1)
                c = c_out
        self.features = nn.Sequential(*parts)
        self.head = nn.Sequential(_bn(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.features(self.stem(x))))


def _check(in_channels: int, num_classes: int) -> None:
    if not (isinstance(in_channels, int) and in_channels >= 1):
        raise ValueError(
            f"in_channels must be a positive int (1 for MNIST, 3 for CIFAR), got {in_channels!r}"
        )
    if not (isinstance(num_classes, int) and num_classes >= 2):
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")


def sa_resnet50(
    in_channels: int = 3,
    num_classes: int = 10,
    width: int = 64,
    input_size: int | None = None,
    dropout: float = 0.2,
) -> nn.Module:
    """Build the SA_DNN ResNet-50 (raw network, takes normalised input).

    Parameters
    ----------
    in_channels
        1 for MNIST (28x28), 3 for CIFAR-10 (32x32).
    num_classes
        Number of classes C.
    width
        Filters of the stem and of the first bottleneck stage (64 in the paper); stage k has
        ``width * 2**k`` bottleneck filters and ``4 * width * 2**k`` outputs.
    input_size
        Height (= width) of the input images; it fixes the size of the dense layer. Default: 28
        when ``in_channels == 1``, else 32.
    dropout
        Dropout rate after each ReLU in the blocks (0.2 in the paper).

    Returns
    -------
    torch.nn.Module
        Maps ``(N, in_channels, input_size, input_size)`` to logits ``(N, num_classes)``.
    """
    _check(in_channels, num_classes)
    size = input_size if input_size is not None else (28 if in_channels == 1 else 32)
    return SAResNet50(in_channels, num_classes, width=width, input_size=size, dropout=dropout)


def sa_densenet121(
    in_channels: int = 3,
    num_classes: int = 10,
    growth: int = 32,
    dropout: float = 0.2,
) -> nn.Module:
    """Build the SA_DNN DenseNet-121 (raw network, takes normalised input).

    Parameters
    ----------
    in_channels
        1 for MNIST (28x28), 3 for CIFAR-10 (32x32).
    num_classes
        Number of classes C.
    growth
        Growth rate (32 in the paper); the stem has ``2 * growth`` filters and the bottleneck
        convolutions ``4 * growth``.
    dropout
        Dropout rate after each convolution in the blocks and transitions (0.2 in the paper).

    Returns
    -------
    torch.nn.Module
        Maps ``(N, in_channels, H, W)`` (H, W >= 8) to logits ``(N, num_classes)``.
    """
    _check(in_channels, num_classes)
    return SADenseNet121(in_channels, num_classes, growth=growth, dropout=dropout)


def trainable_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every module that owns trainable parameters directly.

    These are the "layers" of Keras' ``model.trainable_weights`` grouping: a convolution (kernel
    and bias), a batch norm (gamma and beta) or a dense layer. Modules are yielded in
    registration order, which for these networks is the order of the forward pass.
    """
    for name, m in model.named_modules():
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            yield name, m


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor, batch_size: int = 100) -> nn.Module:
    """Recompute every batch norm's running statistics as plain averages over ``images``.

    After a short training run with a fast optimiser the running averages lag the weights, and a
    50-layer network can then predict one class in eval mode although it fits its training batches
    ("precise BN", Wu and Johnson 2021). This resets the statistics and averages the batch means and
    variances of ``images`` (in chunks of ``batch_size``, dropout off), in place. Deterministic for
    fixed images.

    Parameters
    ----------
    model
        A network (e.g. a :class:`~sensitivity_lib.zoo.Normalized` model) containing batch norms.
    images
        Training images in the model's input space, ``(N, C, H, W)``.
    batch_size
        Images per forward pass.

    Returns
    -------
    torch.nn.Module
        ``model``, in eval mode.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or len(images) == 0:
        raise ValueError("images must be a non-empty batch (N, C, H, W)")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise ValueError("the model has no batch norm to recalibrate")
    saved = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    try:
        for i in range(0, len(images), batch_size):
            model(images[i : i + batch_size])
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom
        model.eval()
    return model

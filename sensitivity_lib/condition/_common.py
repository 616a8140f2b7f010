"""What the condition numbers of Part I share: the output map, norms in float64, log2.

Private to :mod:`sensitivity_lib.condition`: the names here are its internal API.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: What a condition number measures at the output: the model's logits or their softmax.
OUTPUTS: tuple[str, ...] = ("logits", "probs")


def check_output(output: str) -> None:
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")


def output_fn(model: nn.Module, output: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``z -> f(z)`` flattened per sample, with the softmax applied for ``output="probs"``."""

    def f(z: torch.Tensor) -> torch.Tensor:
        y = model(z)
        if output == "probs":
            y = torch.softmax(y, dim=-1)
        return y.reshape(y.shape[0], -1)

    return f


def unchecked(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model as a function on all of R^n: a ``zoo.Normalized`` wrapper without its [0, 1] input
    check (a perturbed input may leave [0, 1]; the bounds hold on the whole space)."""
    net, mean, std = (getattr(model, a, None) for a in ("net", "mean", "std"))
    if hasattr(model, "check_input") and net is not None and mean is not None and std is not None:
        return lambda z: net((z - mean) / std)
    return model


def norms(t: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of every sample of a batch, float64 (N,)."""
    return t.detach().reshape(t.shape[0], -1).to(torch.float64).norm(dim=1)


def log2(t: torch.Tensor) -> torch.Tensor:
    return torch.log2(t.to(torch.float64))

"""Input validation for every public function: one place, one policy, messages that say what to do.

Checks
    * :func:`check_finite_tensor`: a non-empty floating tensor without NaN or infinity.
    * :func:`check_batch`: a batch ``(N, ...)`` of finite floats, ``N >= 1``.
    * :func:`check_images`: a batch of images ``(N, C, H, W)`` with pixels in [0, 1] (the input space
      of every model in the book; normalisation belongs inside the model wrapper).
    * :func:`check_labels`: one integer label per sample, in range.
    * :func:`check_eval`: the model is a fixed function of its input (the eval-mode policy below).
    * :func:`check_model_input`: all of the above for a model and its batch, plus the model's own
      ``check_input`` when it has one (:class:`sensitivity_lib.zoo.Normalized` does).

The eval-mode policy
    Every measure in the library is a property of a *fixed* function ``x -> f(x)``, and of one image
    at a time. A batch norm in training mode normalises with the batch's statistics (the images of a
    batch interact) and a dropout in training mode is random, so neither is a fixed function. The
    library never switches a model's mode behind the caller's back: it raises ``ValueError`` and asks
    for ``model.eval()``. A batch norm without running statistics (``track_running_stats=False``)
    uses batch statistics even in eval mode, and is refused the same way.

Fingerprints
    :func:`fingerprint` identifies a model's current weights cheaply (the identity and in-place
    version counter of every parameter and buffer, and every module's training flag), for caches
    that must be dropped when a model is trained further or moved.

Example
-------
>>> import torch
>>> check_batch(torch.zeros(2, 3))
>>> check_batch(torch.tensor([[float("nan")]]))
Traceback (most recent call last):
...
ValueError: x contains NaN or infinite values
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "check_finite_tensor",
    "check_batch",
    "check_images",
    "check_labels",
    "check_eval",
    "check_model_input",
    "fingerprint",
]


def check_finite_tensor(t: Any, what: str = "the tensor") -> None:
    """Raise unless ``t`` is a non-empty floating (or complex) tensor with finite entries."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if not (t.is_floating_point() or t.is_complex()):
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{what} is empty")
    if not bool(torch.isfinite(t.detach()).all()):
        raise ValueError(f"{what} has non-finite entries (NaN or infinity)")


def check_batch(x: Any, what: str = "x", *, ndim: int | None = None) -> None:
    """Raise unless ``x`` is a non-empty batch ``(N, ...)`` of finite floats (``ndim`` dimensions
    when given)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor batch (N, ...), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(
            f"{what} must be a non-empty batch (N, ...), got shape {tuple(x.shape)}; add a batch axis "
            "with x.unsqueeze(0) for a single sample"
        )
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{what} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x.detach()).all()):
        raise ValueError(f"{what} contains NaN or infinite values")


def check_images(x: Any, shape: Sequence[int | None] | None = None) -> None:
    """Raise unless ``x`` is a finite float tensor ``(N, C, H, W)`` with pixels in [0, 1].

    ``shape`` is an optional ``(C, H, W)`` to match, where ``None`` entries match any size.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(
            f"expected images of shape (N, C, H, W), got {tuple(x.shape)}; add a batch axis "
            "with x.unsqueeze(0) for a single image"
        )
    if not x.is_floating_point():
        raise TypeError(f"expected float pixels in [0, 1], got dtype {x.dtype}; divide uint8 by 255")
    if shape is not None:
        for got, want, axis in zip(x.shape[1:], shape, "CHW", strict=True):
            if want is not None and got != want:
                raise ValueError(
                    f"expected images of shape (N, {', '.join(map(str, shape))}) but axis {axis} "
                    f"has size {got} (input shape {tuple(x.shape)})"
                )
    if not bool(torch.isfinite(x.detach()).all()):
        raise ValueError("images contain NaN or infinite values")
    lo, hi = float(x.detach().min()), float(x.detach().max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(
            f"images must be pixels in [0, 1], got range [{lo:.3g}, {hi:.3g}]; normalisation "
            "belongs inside the model wrapper, not in the data"
        )


def check_labels(y: Any, n: int, n_classes: int) -> torch.Tensor:
    """One integer label per sample in ``[0, n_classes)``; an int is broadcast to all ``n``.

    Returns the labels as an int64 tensor of shape ``(n,)``.
    """
    t = torch.as_tensor(y)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {t.dtype}")
    if t.dim() == 0:
        t = t.expand(n)
    if tuple(t.shape) != (n,):
        raise ValueError(f"labels must hold one integer per sample ({n}), got shape {tuple(t.shape)}")
    if bool((t < 0).any()) or bool((t >= n_classes).any()):
        raise ValueError(f"labels must lie in [0, {n_classes}), got min {int(t.min())}, max {int(t.max())}")
    return t.to(torch.long)


def check_eval(model: Any) -> None:
    """Raise ``ValueError`` unless ``model`` is a fixed function of one sample (the policy above).

    Refused: a batch norm or dropout in training mode, and a batch norm without running statistics.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        label = name or type(m).__name__
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is None:
            raise ValueError(
                f"{label!r} is a batch norm without running statistics (track_running_stats=False): "
                "it normalises with the statistics of the batch even in eval mode, so the samples of a "
                "batch interact. Use track_running_stats=True"
            )
        if m.training and isinstance(m, nn.modules.batchnorm._BatchNorm | nn.modules.dropout._DropoutNd):
            raise ValueError(
                f"{label!r} is in training mode; batch norm and dropout are then not fixed functions "
                "(batch statistics, random masks). Call model.eval() first"
            )


def check_model_input(model: nn.Module, x: Any, what: str = "x") -> None:
    """:func:`check_batch` for ``x``, :func:`check_eval` for ``model``, and ``model.check_input(x)``
    when the model has one (e.g. :class:`sensitivity_lib.zoo.Normalized`: images in [0, 1] of its
    input shape)."""
    check_batch(x, what)
    check_eval(model)
    if callable(getattr(model, "check_input", None)):
        model.check_input(x)


def fingerprint(model: nn.Module) -> tuple:
    """A cheap key that changes when any parameter or buffer of ``model`` is replaced, updated in
    place (its version counter), moved or cast, or when any module's training flag changes."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return tuple(
        (n, id(t), t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device) for n, t in tensors
    ) + (tuple(m.training for m in model.modules()),)

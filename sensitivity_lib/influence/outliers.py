"""Synthetic MNIST outliers built as in Setup 0 of Shu and Zhu (AAAI 2019).

Paper: H. Shu and H. Zhu, "Sensitivity Analysis of Deep Neural Networks", AAAI 2019
(arXiv:1901.07152); recipe from the authors' ``SA_DNN/aaaipapercodes/MNIST_sample_outlier.py``.

For each class ``k``, ``n_per_class`` images of class ``k`` (by default only those a model
classifies correctly) are each overlaid, by a pixel-wise maximum, with a random image of a
*different* class; both images are first translated by a random integer offset in
``[-max_shift, max_shift]^2`` (independently per image, zero fill), and the label ``k`` is kept.
The authors use 300 per class (270 train + 30 validation) and ``max_shift = 4``; they shift with
``scipy.ndimage.shift``, which for integer offsets is this zero-filled translation.

Input space: an :class:`~sensitivity_lib.data.ImageSet` of grey images ``(N, 1, H, W)`` in
``[0, 1]``. Output: an ``ImageSet`` of outliers with ``meta`` holding ``base_index`` and
``overlay_index`` (indices into the input set) and the shifts ``(n, 2, 2)``.

Example
-------
>>> import torch
>>> from sensitivity_lib.data import ImageSet
>>> g = torch.Generator().manual_seed(0)
>>> imgs = torch.rand(40, 1, 28, 28, generator=g)
>>> ds = ImageSet(imgs, torch.arange(40) % 4, [str(i) for i in range(4)], "toy")
>>> out = synthetic_outliers(ds, 3, generator=torch.Generator().manual_seed(1))
>>> len(out), out.labels[:3].tolist()
(12, [0, 0, 0])
"""

from __future__ import annotations

import torch

from sensitivity_lib.data import ImageSet

__all__ = ["synthetic_outliers", "shift_image"]


def shift_image(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate ``image`` (``(..., H, W)``) by ``dy`` rows and ``dx`` columns, filling with 0.

    Positive ``dy`` moves the content down, positive ``dx`` right (``scipy.ndimage.shift`` with
    ``shift=(dy, dx)`` and integer offsets).
    """
    H, W = image.shape[-2:]
    out = torch.zeros_like(image)
    if abs(dy) >= H or abs(dx) >= W:
        return out
    ys, yd = (slice(0, H - dy), slice(dy, H)) if dy >= 0 else (slice(-dy, H), slice(0, H + dy))
    xs, xd = (slice(0, W - dx), slice(dx, W)) if dx >= 0 else (slice(-dx, W), slice(0, W + dx))
    out[..., yd, xd] = image[..., ys, xs]
    return out


def synthetic_outliers(
    dataset: ImageSet,
    n_per_class: int,
    *,
    eligible: torch.Tensor | None = None,
    max_shift: int = 4,
    generator: torch.Generator | None = None,
) -> ImageSet:
    """Setup-0 outliers: an image of class k, max-overlaid with a shifted image of another class.

    Parameters
    ----------
    dataset
        Grey images ``(N, 1, H, W)`` in ``[0, 1]`` with labels.
    n_per_class
        Outliers per class.
    eligible
        Optional boolean mask ``(N,)`` of images that may serve as the base image (the authors
        use the images both networks classify correctly). Overlay images are drawn from the
        images not used as base images, without repeats within a class, as in the authors'
        code.
    max_shift
        Largest translation in pixels (4 in the paper), drawn uniformly from
        ``{-max_shift, ..., max_shift}`` for each axis of each of the two images.
    generator
        Seeds the draws; ``None`` uses ``torch.Generator().manual_seed(0)``.

    Returns
    -------
    ImageSet
        ``n_per_class * n_classes`` images, class-major order, labels kept from the base images;
        ``meta`` has ``base_index``, ``overlay_index`` (``(n,)`` int64) and ``shifts``
        (``(n, 2, 2)``: base ``(dy, dx)``, overlay ``(dy, dx)``).

    Raises
    ------
    ValueError
        Not single-channel images, a negative shift, a mask of the wrong shape, or a class with
        fewer eligible images than ``n_per_class``.
    """
    x, y = dataset.images, dataset.labels
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"need grey images (N, 1, H, W), got shape {tuple(x.shape)}")
    if not (isinstance(n_per_class, int) and n_per_class >= 1):
        raise ValueError(f"n_per_class must be a positive int, got {n_per_class!r}")
    if not (isinstance(max_shift, int) and max_shift >= 0):
        raise ValueError(f"max_shift must be an int >= 0, got {max_shift!r}")
    if eligible is None:
        eligible = torch.ones(len(y), dtype=torch.bool)
    eligible = torch.as_tensor(eligible, dtype=torch.bool)
    if eligible.shape != y.shape:
        raise ValueError(f"eligible must be a mask of shape {tuple(y.shape)}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    n_classes = len(dataset.classes)
    base = []
    for k in range(n_classes):
        idx = torch.nonzero(eligible & (y == k))[:, 0]
        if len(idx) < n_per_class:
            raise ValueError(
                f"class {k} has {len(idx)} eligible images, fewer than n_per_class={n_per_class}"
            )
        base.append(idx[torch.randperm(len(idx), generator=g)[:n_per_class]])
    base_idx = torch.cat(base)
    unused = torch.ones(len(y), dtype=torch.bool)
    unused[base_idx] = False
    over = []
    for k in range(n_classes):
        idx = torch.nonzero(unused & (y != k))[:, 0]
        if len(idx) < n_per_class:
            raise ValueError(
                f"only {len(idx)} unused images of other classes are left to overlay on class {k}"
            )
        over.append(idx[torch.randperm(len(idx), generator=g)[:n_per_class]])  # no repeats
    over_idx = torch.cat(over)
    shifts = torch.randint(-max_shift, max_shift + 1, (len(base_idx), 2, 2), generator=g)
    out = torch.empty((len(base_idx),) + tuple(x.shape[1:]), dtype=x.dtype)
    for i, (b, o) in enumerate(zip(base_idx.tolist(), over_idx.tolist(), strict=True)):
        (by, bx), (oy, ox) = shifts[i].tolist()
        out[i] = torch.maximum(shift_image(x[b], by, bx), shift_image(x[o], oy, ox))
    return ImageSet(
        out, y[base_idx].clone(), dataset.classes, f"{dataset.name} Setup-0 outliers",
        source=f"synthetic_outliers(max_shift={max_shift}) of {dataset.name}",
        meta=dict(base_index=base_idx, overlay_index=over_idx, shifts=shifts),
    )  # fmt: skip

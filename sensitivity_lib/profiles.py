"""The ``PROFILE`` switch and a reproducible start for every chapter.

Every chapter's first code cell (tagged ``parameters``, so papermill can override it) holds::

    PROFILE = "book"
    SIZES = {"quick": dict(n_images=4), "book": dict(n_images=20), "full": dict(n_images=1000)}

and the next cell calls :func:`setup`, which checks the profile, seeds every generator, asks torch for
deterministic kernels, sets the figure style and returns the sizes of the active profile.

Profiles
--------
``quick``  seconds per chapter; what ``make test`` runs.
``book``   the default; what ``make book`` renders (minutes per chapter on a 2-core CPU).
``full``   paper scale: needs user-supplied data/weights (see README) and, in practice, a GPU.

Example
-------
>>> cfg = setup("quick", {"quick": dict(n=2), "book": dict(n=20), "full": dict(n=1000)}, verbose=False)
>>> cfg.n, cfg.PROFILE
(2, 'quick')
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

PROFILES: tuple[str, ...] = ("quick", "book", "full")
_GLUE_TYPES = (bool, int, float, str)


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and torch; return a fresh ``torch.Generator`` seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 -- libraries we call (ART's CLEVER, foolbox) draw from it
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def setup(
    profile: str,
    sizes: dict[str, dict[str, Any]] | None = None,
    *,
    seed: int = 0,
    threads: int | None = None,
    verbose: bool = True,
) -> SimpleNamespace:
    """Validate ``profile``, make the run reproducible, and return the active sizes.

    Parameters
    ----------
    profile
        One of ``"quick"``, ``"book"``, ``"full"``.
    sizes
        ``{profile: {name: value}}``; every profile must define the same names.
    seed
        Seed for Python, NumPy and torch. ``cfg.generator`` is a ``torch.Generator`` seeded with it.
    threads
        Number of torch threads (default: ``$SENSITIVITY_THREADS`` or torch's default). Results are
        reproducible for a fixed thread count.
    verbose
        Print one line saying which profile is active.

    Returns
    -------
    types.SimpleNamespace
        The entries of ``sizes[profile]`` as attributes, plus ``PROFILE``, ``seed``, ``generator``.
    """
    if profile not in PROFILES:
        raise ValueError(f"PROFILE must be one of {PROFILES}, got {profile!r}")
    sizes = sizes or {p: {} for p in PROFILES}
    missing = [p for p in PROFILES if p not in sizes]
    if missing:
        raise ValueError(f"SIZES has no entry for profile(s) {missing}; give one dict per profile")
    keys = {p: set(sizes[p]) for p in PROFILES}
    if len({frozenset(k) for k in keys.values()}) != 1:
        raise ValueError(f"every profile in SIZES must define the same names, got {keys}")

    threads = threads or int(os.environ.get("SENSITIVITY_THREADS", "0")) or None
    if threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    generator = seed_everything(seed)

    from sensitivity_lib import plotting  # matplotlib is imported lazily

    plotting.use_style()
    cfg = SimpleNamespace(PROFILE=profile, seed=seed, generator=generator, **sizes[profile])
    if verbose:
        shown = ", ".join(f"{k}={v!r}" for k, v in sizes[profile].items())
        print(f"profile {profile!r}: {shown}" if shown else f"profile {profile!r}")
    return cfg


def glue_all(values: Mapping[str, Any], *, prefix: str = "") -> None:
    """Glue every entry of ``values`` for the chapter's prose (``myst_nb.glue``, not displayed), as
    ``prefix + name``: one call instead of one ``glue`` per number, so that a code cell shows its
    computation, not its bookkeeping.

    Values are scalars: Python numbers, strings, or 0-d / one-element NumPy arrays and torch tensors
    (converted to Python numbers, so that the prose formats them as it formats floats). Anything
    else (a vector, a model) raises before anything is glued: glue a number, or a string made
    from one.

    Example
    -------
    >>> import torch
    >>> glue_all({"ratio": torch.tensor(0.25), "bits": 7}, prefix="ch0_")   # in a notebook: glued
    >>> glue_all({"ratios": torch.tensor([0.25, 0.5])})
    Traceback (most recent call last):
    ...
    ValueError: ratios: glue a scalar, got an array of shape (2,)
    """
    out: dict[str, Any] = {}
    for name, value in values.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"glue names are non-empty strings, got {name!r}")
        v = value
        if isinstance(v, torch.Tensor | np.ndarray | np.generic):
            size = v.numel() if isinstance(v, torch.Tensor) else np.size(v)
            if size != 1:
                raise ValueError(f"{prefix}{name}: glue a scalar, got an array of shape {tuple(v.shape)}")
            v = v.item()
        if not isinstance(v, _GLUE_TYPES):
            raise TypeError(f"{prefix}{name}: glue a number or a string, got {type(value).__name__}")
        out[prefix + name] = v
    from myst_nb import glue

    for key, v in out.items():
        glue(key, v, display=False)

"""One figure style for the whole book, helpers that draw on a given ``ax``, and one table style
(:func:`table`: results as rendered HTML tables with formatted numbers).

The palette is Okabe & Ito's colour-blind safe set; sequential maps are ``viridis`` / ``magma``
(perceptually uniform), diverging maps ``RdBu_r`` centred on zero.

Example
-------
>>> import matplotlib
>>> matplotlib.use("Agg")
>>> import matplotlib.pyplot as plt
>>> use_style()
>>> fig, ax = plt.subplots()
>>> _ = ax.plot([1, 2], [1, 10], color=PALETTE[0])
>>> plt.close(fig)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: Okabe-Ito colour-blind safe palette (black last, for reference lines).
PALETTE: tuple[str, ...] = (
    "#0072B2",  # blue
    "#E69F00",  # orange
    "#009E73",  # green
    "#D55E00",  # vermillion
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
    "#000000",  # black
)
SEQUENTIAL = "viridis"
DIVERGING = "RdBu_r"


def use_style() -> None:
    """Set the book's matplotlib style (sizes, fonts, palette, grid). Idempotent."""
    import matplotlib as mpl
    from cycler import cycler

    mpl.rcParams.update(
        {
            "figure.figsize": (7.0, 3.6),
            "figure.dpi": 100,
            "savefig.dpi": 150,
            "figure.constrained_layout.use": True,
            "axes.prop_cycle": cycler(color=list(PALETTE)),
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "legend.fontsize": 9,
            "legend.frameon": False,
            "image.cmap": SEQUENTIAL,
            "font.size": 10,
        }
    )


def title_for(model, text: str) -> str:
    """A figure title that says when the model is not pretrained.

    ``model`` is anything with a ``pretrained`` attribute and a ``name``
    (see :class:`~sensitivity_lib.zoo.Normalized`).
    """
    name = getattr(model, "name", type(model).__name__)
    if getattr(model, "pretrained", True):
        return f"{text} ({name})"
    return f"{text} ({name}, RANDOM weights: {getattr(model, 'weights_note', 'not pretrained')})"


def to_hwc(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """A (C, H, W) or (H, W) image in [0, 1] as an array matplotlib can show."""
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim == 3:
        a = a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))
    return np.clip(a, 0.0, 1.0)


def show_image(ax, image, title: str | None = None, *, cmap: str = "gray") -> None:
    """Draw one image (C, H, W in [0,1]) on ``ax`` without ticks."""
    a = to_hwc(image)
    ax.imshow(a, cmap=cmap if a.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    if title is not None:
        ax.set_title(title, fontsize=8)


def image_grid(axes: Sequence, images, titles: Sequence[str] | None = None, *, cmap: str = "gray"):
    """Draw ``images`` (N, C, H, W in [0,1]) on the flat sequence ``axes``; extra axes are hidden."""
    axes = list(np.ravel(axes))
    if len(images) > len(axes):
        raise ValueError(f"{len(images)} images but only {len(axes)} axes")
    for i, ax in enumerate(axes):
        if i < len(images):
            show_image(ax, images[i], None if titles is None else titles[i], cmap=cmap)
        else:
            ax.axis("off")
    return axes


def overlay(ax, image, heat, *, alpha: float = 0.55, cmap: str = "magma", title: str | None = None):
    """Draw ``heat`` (H, W) over a grey-scale rendering of ``image`` and return the colour mappable."""
    a = to_hwc(image)
    grey = a if a.ndim == 2 else a.mean(axis=-1)
    show_image(ax, grey, title)
    h = heat.detach().cpu().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat)
    return ax.imshow(h, cmap=cmap, alpha=alpha, interpolation="nearest")


def manhattan(ax, values, groups, *, top: int = 5, log: bool = False, ylabel: str = "FI",
              group_names: Sequence[str] | None = None, colors: Sequence[str] | None = None):
    """A Manhattan plot of one score per item: x = item, grouped by class; y = the score.

    The layout of the influence plots of Shu & Zhu's code (``SA_DNN``, Setups 1-3: images on the
    x axis grouped by class, FI on the y axis). Items are placed group by group (in increasing
    group id, original order inside a group), groups alternate two colours, a tick marks each
    group's centre, and the ``top`` highest scores are circled and numbered 1, 2, ...

    Parameters
    ----------
    ax
        The matplotlib axes to draw on.
    values
        ``(N,)`` scores (tensor or array); must be finite (and positive when ``log``).
    groups
        ``(N,)`` integer group ids (e.g. the class labels).
    top
        How many of the highest scores to mark (0: none).
    log
        Logarithmic y axis (for scores spanning decades).
    ylabel, group_names, colors
        Axis label, tick labels for the groups (default: the ids), two alternating colours.

    Returns
    -------
    numpy.ndarray
        The indices (into ``values``) of the marked items, highest score first.

    Example
    -------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import matplotlib.pyplot as plt
    >>> fig, ax = plt.subplots()
    >>> manhattan(ax, [0.1, 3.0, 0.2, 2.0], [1, 0, 1, 0], top=2).tolist()
    [1, 3]
    >>> plt.close(fig)
    """
    v = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    g = groups.detach().cpu().numpy() if isinstance(groups, torch.Tensor) else np.asarray(groups)
    v, g = np.asarray(v, dtype=np.float64).ravel(), np.asarray(g).ravel()
    if v.shape != g.shape:
        raise ValueError(f"values and groups must have one entry per item, got {v.shape} and {g.shape}")
    if not np.all(np.isfinite(v)) or (log and np.any(v <= 0)):
        raise ValueError("values must be finite" + (" and positive for log=True" if log else ""))
    order = np.lexsort((np.arange(len(g)), g))  # by group, then original order
    pos = np.empty(len(v), dtype=np.int64)
    pos[order] = np.arange(len(v))
    colors = list(colors or (PALETTE[0], PALETTE[5]))
    ids = np.unique(g)
    for j, k in enumerate(ids):
        sel = g == k
        ax.scatter(pos[sel], v[sel], s=6, color=colors[j % len(colors)], linewidths=0)
    ax.set_xticks([pos[g == k].mean() for k in ids])
    names = group_names if group_names is not None else [str(int(k)) for k in ids]
    ax.set_xticklabels(names)
    ax.set_xlim(-0.5, len(v) - 0.5)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    marked = np.argsort(-v, kind="stable")[: max(0, int(top))]
    for r, i in enumerate(marked, 1):
        ax.scatter([pos[i]], [v[i]], s=50, facecolors="none", edgecolors=PALETTE[3], linewidths=1.2)
        ax.annotate(str(r), (pos[i], v[i]), textcoords="offset points", xytext=(3, 3), fontsize=7,
                    color=PALETTE[3])
    return marked


def table(df, *, caption: str | None = None, digits: int = 4, formats: dict[str, str] | None = None):
    """A results table as the book renders it: a pandas ``Styler`` (an HTML table in the page, not
    printed text that overflows the column), floats to ``digits`` significant digits (or a format
    string per column in ``formats``, e.g. ``{"gap": "{:.1e}"}``), an optional caption, and a fixed
    HTML id derived from the caption and the columns, so that re-running the notebook writes the
    same output (nbval compares it).

    Example
    -------
    >>> import pandas as pd
    >>> st = table(pd.DataFrame({"n": [8, 16], "gap": [0.012345, 0.0031]}), caption="demo", digits=2)
    >>> "0.012" in st.to_html() and "<caption>demo</caption>" in st.to_html()
    True
    >>> st.to_html() == table(pd.DataFrame({"n": [8, 16], "gap": [0.012345, 0.0031]}),
    ...                       caption="demo", digits=2).to_html()
    True
    """
    import hashlib

    import pandas as pd

    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"table() takes a pandas DataFrame, got {type(df).__name__}")
    formats = dict(formats or {})
    unknown = set(formats) - set(df.columns)
    if unknown:
        raise ValueError(f"formats names columns the table does not have: {sorted(unknown)}")

    def fmt(column):
        if column in formats:
            return formats[column].format
        if pd.api.types.is_float_dtype(df[column]):
            return lambda v: f"{v:.{digits}g}"
        return None

    style = df.style.format({c: fmt(c) for c in df.columns if fmt(c) is not None})
    if caption:
        style = style.set_caption(caption)
    key = (caption or "") + "|" + "|".join(map(str, df.columns))
    return style.set_uuid("t" + hashlib.sha1(key.encode()).hexdigest()[:10])

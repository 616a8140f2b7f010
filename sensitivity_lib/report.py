"""One report of a classifier's sensitivity at given inputs: the measures of Part I side by side, each
with what it guarantees and what it cost (the book's closing chapter, *What to use when*).

Paper: Maheshwari et al., *An estimator for the sensitivity to perturbations of deep neural networks*
(arXiv:2307.12679) for E0, E1 and the bit-widths; the radii are the book's reconstruction (chapter 4).
Nothing here is new mathematics: :func:`sensitivity_report` calls the library's own functions and
records, for each, its value per input, its kind and its time.

Input space and norms
    The model's input ([0, 1] pixels for :class:`sensitivity_lib.zoo.Normalized` models, the
    normalisation inside); every norm is the Euclidean norm of one flattened input or output. Radii
    are in input units, condition numbers and bit counts in bits (log2).

The measures (rows of :attr:`Report.summary`)
    ==================  =========================================================  ========
    key                 what it is                                                 kind
    ==================  =========================================================  ========
    ``e0``              log2 E0, the local relative condition number (Lanczos)     lower
    ``e1``              log2 E1, the certified relative condition number           upper
    ``bits_e0``         input significand bits that keep the prediction, from E0   estimate
    ``bits_e1``         the same, certified, from E1                               upper
    ``certified``       certified radius g / (sqrt(2) L): no smaller change flips  lower
    ``first_order``     first-order radius (DeepFool's first step)                 estimate
    ``deepfool``        the smallest flipping change DeepFool finds                upper
    ==================  =========================================================  ========

    E0 comes from a Ritz value, never above the true ``||J(x)||`` (kind ``lower``), within the
    Lanczos tolerance of it; it is first order (it describes infinitesimal changes), so what it
    predicts about finite ones, ``bits_e0``, is an ``estimate``.

Example
-------
>>> from sensitivity_lib import zoo, data
>>> rep = sensitivity_report(zoo.lenet5(), data.mnist_test20().images[:1])
>>> list(rep.summary.index)
['e0', 'e1', 'bits_e0', 'bits_e1', 'certified', 'first_order', 'deepfool']
>>> bool((rep.per_image["certified"] <= rep.per_image["deepfool"]).all())
True
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sensitivity_lib.attacks import minimal_perturbation
from sensitivity_lib.condition.lipschitz import global_condition, lipschitz_bound
from sensitivity_lib.condition.local import local_condition
from sensitivity_lib.condition.radius import certified_radius, first_order_radius
from sensitivity_lib.precision.margin import min_input_bits
from sensitivity_lib.validation import check_model_input

__all__ = ["MEASURES", "Report", "sensitivity_report"]

#: key -> (question it answers, what it is, unit, book chapter that explains it)
MEASURES: dict[str, tuple[str, str, str, int]] = {
    "e0": ("how much can a small input change move the output?", "log2 E0 (local condition)", "bits", 1),
    "e1": ("the same, guaranteed for every change", "log2 E1 (certified condition)", "bits", 2),
    "bits_e0": ("how many input bits keep the prediction?", "t_min from E0", "bits", 2),
    "bits_e1": ("the same, certified", "t_min from E1", "bits", 2),
    "certified": ("how far is the nearest flipping input, at least?", "certified radius", "pixel units", 4),
    "first_order": ("and about how far?", "first-order radius", "pixel units", 4),
    "deepfool": ("and at most?", "DeepFool minimal change", "pixel units", 4),
}


@dataclass(frozen=True)
class Report:
    """What :func:`sensitivity_report` measured.

    Attributes
    ----------
    model
        The model's name, and whether its weights are trained (``pretrained``).
    per_image
        pandas DataFrame, one row per input, one column per measure key (float64).
    summary
        pandas DataFrame indexed by measure key: ``question``, ``measure``, ``median`` over the inputs,
        ``unit``, ``kind`` (exact / upper / lower / estimate, from the library's result), ``seconds``
        per input (wall time of the call divided by the number of inputs; E1 and the certified radius
        share the one-off Lipschitz bound, shown as ``lipschitz_seconds``), ``chapter``.
    lipschitz_seconds
        Wall time of the certified Lipschitz bound (weights only: paid once per network).
    """

    model: str
    pretrained: bool
    per_image: Any  # a pandas DataFrame (pandas is imported only when a report is made)
    summary: Any  # a pandas DataFrame
    lipschitz_seconds: float

    def __repr__(self) -> str:
        trained = "trained weights" if self.pretrained else "RANDOM weights"
        return (
            f"Report({self.model}, {trained}, {len(self.per_image)} inputs)\n"
            + self.summary[["measure", "median", "unit", "kind", "seconds"]].to_string()
        )


def sensitivity_report(
    model: nn.Module,
    x: torch.Tensor,
    *,
    e0_tol: float = 1e-3,
    deepfool: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Report:
    """The Part I measures of ``model`` at the inputs ``x``, each timed and labelled with its kind.

    Parameters
    ----------
    model
        A classifier in eval mode mapping inputs to logits ``(N, C)``, traceable by torch.fx (the
        certified bound walks its graph; an unsupported layer raises an error that names it).
    x
        Batch ``(N, ...)`` in the model's input space ([0, 1] pixels for the book's models).
    e0_tol
        Relative tolerance of the Lanczos iteration for E0.
    deepfool
        Options of :func:`sensitivity_lib.attacks.minimal_perturbation` for DeepFool (defaults: its
        own); ``{"skip": True}`` leaves the attack out (its row is then absent).
    generator
        Seeds the Lanczos start vectors.
    progress
        tqdm bars of the attack.

    Returns
    -------
    Report
        See :class:`Report`; ``per_image`` has one row per input.
    """
    import pandas as pd

    check_model_input(model, x)
    n = len(x)
    t0 = time.perf_counter()
    L = lipschitz_bound(model, tuple(x.shape[1:]))
    t_lip = time.perf_counter() - t0
    with torch.no_grad():
        logits = model(x)

    results: dict[str, torch.Tensor] = {}
    kinds: dict[str, str] = {}
    seconds: dict[str, float] = {}

    def timed(key: str, fn, *args, **kwargs):  # noqa: ANN001, ANN202
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds[key] = (time.perf_counter() - t) / n
        return out

    e0 = timed("e0", local_condition, model, x, tol=e0_tol, generator=generator)
    results["e0"], kinds["e0"] = e0.extra["log2"].cpu(), e0.kind
    e1 = timed("e1", global_condition, model, x, lipschitz=L)
    results["e1"], kinds["e1"] = e1.extra["log2"].cpu(), e1.kind
    results["bits_e0"], kinds["bits_e0"] = min_input_bits(results["e0"], logits.cpu()), "estimate"
    results["bits_e1"], kinds["bits_e1"] = min_input_bits(results["e1"], logits.cpu()), e1.kind
    seconds["bits_e0"], seconds["bits_e1"] = seconds["e0"], seconds["e1"]
    cert = timed("certified", certified_radius, model, x, lipschitz=L)
    results["certified"], kinds["certified"] = cert.value, cert.kind
    first = timed("first_order", first_order_radius, model, x)
    results["first_order"], kinds["first_order"] = first.value, first.kind
    options = dict(deepfool or {})
    if not options.pop("skip", False):
        df = timed("deepfool", minimal_perturbation, model, x, method="deepfool", generator=generator,
                   progress=progress, **options)  # fmt: skip
        results["deepfool"], kinds["deepfool"] = df.value, df.kind

    per_image = pd.DataFrame({k: v.to(torch.float64).numpy() for k, v in results.items()})
    rows = []
    for key in results:
        question, measure, unit, chapter = MEASURES[key]
        v = per_image[key].to_numpy()
        rows.append({
            "key": key, "question": question, "measure": measure,
            "median": float(pd.Series(v).median()) if len(v) else math.nan, "unit": unit,
            "kind": kinds[key], "seconds": seconds[key], "chapter": chapter,
        })  # fmt: skip
    summary = pd.DataFrame(rows).set_index("key")
    summary.index.name = None
    return Report(
        model=str(getattr(model, "name", type(model).__name__)),
        pretrained=bool(getattr(model, "pretrained", True)),
        per_image=per_image, summary=summary, lipschitz_seconds=t_lip,
    )  # fmt: skip

"""Peers of the condition number: other per-image robustness scores, through the libraries that
implement them.

* :func:`clever_l2`: the CLEVER score (T.-W. Weng et al., *Evaluating the robustness of neural
  networks: an extreme value theory approach*, ICLR 2018), an estimate of the minimal 2-norm
  adversarial distance from sampled gradient norms, through adversarial-robustness-toolbox.

Input space: [0, 1] pixels (the model normalises them itself); norm: the 2-norm of one image.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from sensitivity_lib.attacks import art_classifier, draw_seed, import_art, seeded, to_numpy
from sensitivity_lib.results import Estimate
from sensitivity_lib.validation import check_model_input

__all__ = ["clever_l2"]


def clever_l2(
    model: nn.Module,
    x: torch.Tensor,
    *,
    nb_batches: int = 10,
    batch_size: int = 10,
    radius: float = 2.0,
    pool_factor: int = 10,
    target: int | str | None = None,
    generator: torch.Generator | None = None,
) -> Estimate:
    """CLEVER scores (Weng et al., 2018) in the 2-norm, through ART's ``clever_u`` / ``clever_t``.

    CLEVER estimates the minimal 2-norm of an adversarial perturbation around ``x``: for each class
    ``j`` other than the predicted ``c`` it samples ``pool_factor * batch_size`` points uniformly in
    the 2-ball of ``radius`` around ``x`` (clipped to [0, 1]), takes the 2-norm of the gradient of
    ``g_j = f_c - f_j`` there, keeps the max of each of ``nb_batches`` batches of ``batch_size``,
    fits a reverse Weibull distribution to these maxima, and returns
    ``min(g_j(x) / location, radius)``; ``clever_u`` takes the minimum over all ``j``.

    Norm convention: ART's ``norm`` argument is the norm ``p`` of the *perturbation*; ART switches
    to the dual norm ``q`` (``p / (p - 1)``) of the gradient internally (1 <-> inf). For ``p = 2``
    both are 2, which is what this wrapper passes. The score is an *estimate* (no guarantee, and
    it depends on the random samples); it is seeded from ``generator`` and the global NumPy state
    is restored afterwards.

    Parameters
    ----------
    model
        A classifier in eval mode that maps [0, 1] images to logits (e.g. ``zoo.Normalized``).
    x
        Batch ``(N, C, H, W)`` in [0, 1]; one score per sample.
    nb_batches, batch_size, pool_factor, radius
        ART's parameters (defaults: 10, 10, 10, 2.0).
    target
        ``None`` (untargeted, ``clever_u``: min over all classes, cost proportional to the number
        of classes), ``"runner_up"`` (``clever_t`` against the second-largest logit) or a class
        index.
    generator
        Seeds NumPy for ART's sampling.

    Returns
    -------
    Estimate
        ``value`` float64 (N,), ``kind="estimate"``, ``method="clever_u"`` or ``"clever_t"``.
    """
    check_model_input(model, x)
    art = import_art()
    with torch.no_grad():
        logits = model(x)
    nb_classes = logits.shape[1]
    clf = art_classifier(model, tuple(x.shape[1:]), nb_classes, (0.0, 1.0), x.device)
    seed = draw_seed(generator)
    scores = []
    with seeded(seed), warnings.catch_warnings():
        # scipy's skewness inside ART's reverse-Weibull fit warns when the sampled maxima nearly tie
        warnings.filterwarnings("ignore", message="Precision loss occurred", category=RuntimeWarning)
        for i in range(len(x)):
            xi = to_numpy(x[i])
            if target is None:
                s = art.metrics.clever_u(
                    clf, xi, nb_batches, batch_size, radius, norm=2, pool_factor=pool_factor, verbose=False
                )
            else:
                j = int(logits[i].topk(2).indices[1]) if target == "runner_up" else int(target)
                s = art.metrics.clever_t(
                    clf, xi, j, nb_batches, batch_size, radius, norm=2, pool_factor=pool_factor
                )
            scores.append(float(s))
    return Estimate(
        value=torch.tensor(scores, dtype=torch.float64),
        kind="estimate",
        method="clever_u" if target is None else "clever_t",
        norm="2",
        extra={
            "nb_batches": nb_batches,
            "batch_size": batch_size,
            "radius": radius,
            "pool_factor": pool_factor,
            "target": target,
            "seed": seed,
        },
    )

"""E3: the product bound of E1 with cheap per-layer norms instead of certified conv operator norms.

Paper: Maheshwari et al. (arXiv:2307.12679): "an approximation of the estimator is tested on two
Convolutional Neural Networks, AlexNet and VGG-19" (quoted from the abstract). Which approximation
is not public; the three below are our candidates (the book's chapter *Deriving a condition number
for a network*).

Norm and input space: as E1 (:mod:`sensitivity_lib.condition.lipschitz`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from sensitivity_lib.condition._common import check_output, log2, norms, output_fn
from sensitivity_lib.condition.lipschitz import certified_layer_norm, lipschitz_product
from sensitivity_lib.graph import Step, as_pair, pool_window_multiplicity, pool_windows_1d
from sensitivity_lib.opnorm import conv_padding
from sensitivity_lib.results import Estimate
from sensitivity_lib.validation import check_model_input

__all__ = ["APPROXIMATIONS", "approximate_condition"]

APPROXIMATIONS: dict[str, str] = {
    "reshaped": "estimate",  # ||K_mat||_2, the kernel as a C_out x (C_in k k) matrix
    "reshaped_upper": "upper",  # sqrt(m) ||K_mat||_2
    "frobenius": "estimate",  # ||K||_F
}


def _conv_multiplicity(step: Step) -> int:
    """The largest number of output positions that read one input pixel of a convolution step
    (an asymmetric ``"same"`` padding is counted with its larger side on both ends: an upper bound)."""
    w = step.params["weight"]
    H, W = step.in_shape[-2:]
    kh, kw = w.shape[-2:]
    (sh, sw), (dh, dw) = as_pair(step.params["stride"]), as_pair(step.params["dilation"])
    pt, pb, pl, pr = conv_padding((kh, kw), step.params["padding"], (dh, dw))
    ph, pw = max(pt, pb), max(pl, pr)
    mh = pool_window_multiplicity(pool_windows_1d(H, kh, sh, ph, dh, False), H)
    mw = pool_window_multiplicity(pool_windows_1d(W, kw, sw, pw, dw, False), W)
    return max(1, mh * mw)


def _approx_norm(approximation: str) -> Callable[[Step], Estimate]:
    def norm(step: Step) -> Estimate:
        w = step.params["weight"].detach().to(torch.float64)
        if approximation == "frobenius":
            kind = "upper" if step.kind == "linear" else "estimate"
            return Estimate(float(w.norm()), kind, "frobenius")
        if step.kind == "linear":  # the certified norm of E1 (exact up to a ~1e-10 margin)
            return certified_layer_norm(step)
        g = int(step.params["groups"])
        kmat = w.reshape(g, w.shape[0] // g, -1)
        s = float(torch.linalg.matrix_norm(kmat, 2).max())  # block-diagonal over groups
        if approximation == "reshaped":
            return Estimate(s, "estimate", "reshaped")
        m = _conv_multiplicity(step)
        return Estimate(math.sqrt(m) * s, "upper", "reshaped_upper", extra={"m": m})

    return norm


def approximate_condition(
    model: nn.Module,
    x: torch.Tensor,
    *,
    approximation: str = "reshaped",
    output: str = "logits",
) -> Estimate:
    """E3: E1 with a cheap per-layer norm instead of the certified conv operator norm.

    ``approximation``:

    * ``"reshaped"``: ``||K_mat||_2``, the kernel reshaped to ``C_out x (C_in k_h k_w)`` (spectral
      normalisation's proxy). Usually *below* the operator norm (it is the norm of the operator
      restricted to one output pixel), so the product can under-estimate E1 and even E0: not
      certified.
    * ``"reshaped_upper"``: ``sqrt(m) ||K_mat||_2`` with ``m`` the largest number of output
      positions that read one input pixel (``||A x|| = ||K_mat U x|| <= ||K_mat|| sqrt(m) ||x||``
      with ``U`` the im2col map); a certified upper bound, looser than the FFT norm.
    * ``"frobenius"``: ``||K||_F``; neither side in general.

    Linear layers keep the certified norm of E1 (the Frobenius norm for ``"frobenius"``).

    Returns
    -------
    Estimate
        ``value`` float64 (N,), ``kind`` ``"upper"`` for ``"reshaped_upper"``, else ``"estimate"``;
        ``extra``: ``log2``, ``lipschitz`` (the product), ``x_norm``, ``f_norm``.
    """
    if approximation not in APPROXIMATIONS:
        raise ValueError(f"approximation must be one of {list(APPROXIMATIONS)}, got {approximation!r}")
    check_output(output)
    check_model_input(model, x)
    L = lipschitz_product(
        model,
        tuple(x.shape[1:]),
        layer_norm=_approx_norm(approximation),
        output=output,
        method=approximation,
        kind=APPROXIMATIONS[approximation],
    )
    with torch.no_grad():
        fx = output_fn(model, output)(x)
    xn, fn = norms(x), norms(fx)
    lg = float(L.extra["log2"]) + log2(xn) - log2(fn)
    return Estimate(
        value=torch.exp2(lg),
        kind=L.kind,
        method=f"E3:{approximation}",
        norm="2",
        extra={"log2": lg, "lipschitz": L, "x_norm": xn, "f_norm": fn, "output": output},
    )

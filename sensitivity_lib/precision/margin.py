"""How many bits a decision's margin allows: bit-widths from a condition number and a logit gap.

Our reconstruction (the book's chapters *Deriving a condition number for a network* and *From a
condition number to bits*), not the paper's text (Maheshwari et al., arXiv:2307.12679, whose thesis
reports that "minimum 11 bits of input bit-width precision is required", quoted). Norm: the
Euclidean norm of one sample's output; no model is evaluated here (this module imports no other part
of the library, so that every module can use it).

If a perturbation changes the output ``y`` by ``||dy|| <= A 2^-t`` (``A`` an amplification: a
condition number times ``||y||``, or a sum of such terms), the top class cannot change while
``||dy|| < g / sqrt(2)``, ``g`` the gap between the two largest entries of ``y`` (the difference of
two coordinates changes by at most ``sqrt(2) ||dy||``). So ``t >= log2(sqrt(2) A / g)`` bits keep it.

Example
-------
>>> import torch
>>> min_input_bits(3.0, torch.tensor([[2.0, 1.0]])).tolist()    # 0.5 + 3 + log2(sqrt(5)) = 4.66
[5.0]
>>> bits_for_amplification(torch.tensor([8.0]), torch.tensor([[2.0, 1.0]])).tolist()  # 0.5 + 3
[4.0]
"""

from __future__ import annotations

import torch

__all__ = ["logit_margin", "bits_for_amplification", "min_input_bits"]


def logit_margin(y: torch.Tensor) -> torch.Tensor:
    """The gap ``g`` between the two largest entries of every row of ``y`` (N, C), float64 (N,)."""
    y = y.detach().to(torch.float64).reshape(y.shape[0], -1)
    if y.shape[1] < 2:
        raise ValueError(f"y needs at least two classes per sample, got shape {tuple(y.shape)}")
    top = y.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def bits_for_amplification(amplification: torch.Tensor | float, y: torch.Tensor) -> torch.Tensor:
    """``ceil(log2(sqrt(2) A / g))``: the bits at which an output change ``||dy|| <= A 2^-t`` cannot
    change the arg-max of ``y``.

    Parameters
    ----------
    amplification
        ``A`` per sample (tensor (N,)) or one float: the output change per unit of relative error.
    y
        The outputs (N, C) (logits).

    Returns
    -------
    torch.Tensor
        float64 (N,) of bit counts (``inf`` when the top two entries tie).
    """
    a = torch.as_tensor(amplification, dtype=torch.float64)
    return torch.ceil(0.5 + torch.log2(a) - torch.log2(logit_margin(y)))


def min_input_bits(log2_kappa: torch.Tensor | float, y: torch.Tensor) -> torch.Tensor:
    """Significand bits ``t`` that keep the arg-max of ``y`` under a relative input error ``2^-t``.

    If ``||dx|| <= 2^-t ||x||`` (rounding every input to ``t`` significand bits) then
    ``||dy|| <= kappa 2^-t ||y||`` (to first order, or exactly when ``kappa`` bounds the
    Lipschitz constant), so

    ``t_min = ceil(log2(sqrt(2) * kappa * ||y|| / g))``.

    With ``kappa`` from E1 this is certified; with E0 it is a first-order prediction.

    Parameters
    ----------
    log2_kappa
        log2 of the relative condition number, per sample (tensor (N,)) or one float.
    y
        The outputs (N, C) that ``kappa`` refers to (logits or probabilities).

    Returns
    -------
    torch.Tensor
        float64 (N,) of bit counts (``inf`` when the top two entries tie).
    """
    y = y.detach().to(torch.float64).reshape(y.shape[0], -1)
    k = torch.as_tensor(log2_kappa, dtype=torch.float64)
    t = 0.5 + k + torch.log2(y.norm(dim=1)) - torch.log2(logit_margin(y))
    return torch.ceil(t)

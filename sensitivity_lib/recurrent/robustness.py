r"""Robustness of sequence classifiers: noise, attacks, minimal flips, state amplification, E0.

Part III (Sengupta & Friston, arXiv:1804.11313: "tiny perturbations", "bounded perturbations,
adversarial attacks"; the perturbation model here is our documented choice). Inputs are sequences
``(N, T, d)`` in [0, 1]; perturbations are measured in the max-norm (``l_inf``) over the whole
sequence, and perturbed inputs are clipped to [0, 1].

- :func:`noise_accuracy`: accuracy under uniform ``[-eps, eps]`` or Gaussian noise, averaged over
  draws.
- :func:`fgsm`, :func:`pgd`: ``l_inf`` attacks with one budget per sample (so that
  :func:`minimal_flip` can bisect on it); with a common budget they give foolbox's ``FGSM`` and
  ``LinfPGD(random_start=False)`` (tests). :func:`attack_accuracy` is accuracy against them.
- :func:`minimal_flip`: the smallest ``l_inf`` budget at which the attack changes the prediction
  (:func:`sensitivity_lib.search.flip_search`, bisection; an achieved flip, so an upper bound on the
  distance to the decision boundary in ``l_inf``).
- :func:`state_amplification`: how a perturbation of the hidden state at time ``start`` grows or
  shrinks by time ``t``: the measured ratio ``||s'_t - s_t|| / ||delta||`` for a small random
  ``delta``, and the worst case to first order, ``||d s_t / d s_start||_2``.
- :func:`condition_vs_length`: Part I's E0 (:func:`~sensitivity_lib.condition.local.local_condition`) of
  the network read over the first ``t`` steps, for several ``t``.

Example
-------
>>> import torch
>>> from sensitivity_lib.recurrent.models import RecurrentClassifier
>>> m = RecurrentClassifier("elman", 4, 8, 3, seed=0).eval()
>>> x, y = torch.rand(5, 6, 4), torch.tensor([0, 1, 2, 0, 1])
>>> xa = fgsm(m, x, y, 0.1)
>>> float((xa - x).abs().max()) <= 0.1 + 1e-7, bool(((xa >= 0) & (xa <= 1)).all())
(True, True)
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor

from sensitivity_lib.recurrent.models import (
    RecurrentClassifier,
    hidden_states,
    state_jacobian,
    state_jacobians,
)
from sensitivity_lib.results import Estimate
from sensitivity_lib.search import flip_search
from sensitivity_lib.validation import check_batch, check_eval, check_labels

__all__ = ["noise_accuracy", "fgsm", "pgd", "attack_accuracy", "minimal_flip", "state_amplification",
           "condition_vs_length", "unrolled_norm"]  # fmt: skip


def _check(model, x: Tensor, y: Tensor | None = None) -> None:
    check_batch(x, "x", ndim=3)
    check_eval(model)
    if isinstance(model, RecurrentClassifier) and model.training:
        raise ValueError(
            "the recurrent classifier is in training mode, where its normalisations update their "
            "power iterations at every forward (not a fixed function): call model.eval() first "
            "(and recurrent.finalise(model) after training)"
        )
    if y is not None:
        check_labels(y, len(x), getattr(model, "n_classes", int(y.max()) + 1))


def _eps(eps, n: int, like: Tensor) -> Tensor:
    e = torch.as_tensor(eps, dtype=like.dtype).reshape(-1)
    if e.numel() == 1:
        e = e.expand(n)
    if e.shape != (n,) or bool((e < 0).any()):
        raise ValueError(f"eps must be a non-negative number or one per sample ({n}), got {tuple(e.shape)}")
    return e.reshape(n, *([1] * (like.dim() - 1)))


def _predict(model, x: Tensor, batch: int = 2000) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])


def noise_accuracy(model, x: Tensor, y: Tensor, eps, *, kind: str = "uniform", draws: int = 5,
                   generator: torch.Generator | None = None) -> Tensor:  # fmt: skip
    """Accuracy under random input noise, one value per ``eps`` (float64 ``(len(eps),)``).

    ``kind="uniform"``: ``delta`` uniform in ``[-eps, eps]`` per entry (``||delta||_inf <= eps``);
    ``"gaussian"``: ``N(0, eps^2)`` per entry. The noisy input is clipped to [0, 1]; the accuracy is
    the mean over ``draws`` draws.

    Example
    -------
    >>> import torch
    >>> from sensitivity_lib.recurrent.models import RecurrentClassifier
    >>> m = RecurrentClassifier("elman", 4, 8, 3, seed=0).eval()
    >>> x, y = torch.rand(5, 6, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1])
    >>> clean = float((m(x).argmax(1) == y).double().mean())
    >>> float(noise_accuracy(m, x, y, [0.0])[0]) == clean     # no noise: the clean accuracy
    True
    """
    _check(model, x, y)
    if kind not in ("uniform", "gaussian"):
        raise ValueError(f"kind must be 'uniform' or 'gaussian', got {kind!r}")
    g = generator or torch.Generator().manual_seed(0)
    out = []
    for e in torch.as_tensor(eps, dtype=torch.float64).reshape(-1).tolist():
        acc = 0.0
        for _ in range(draws):
            if kind == "uniform":
                d = (torch.rand(x.shape, generator=g, dtype=x.dtype) * 2 - 1) * e
            else:
                d = torch.randn(x.shape, generator=g, dtype=x.dtype) * e
            acc += float((_predict(model, (x + d).clamp(0, 1)) == y).double().mean())
        out.append(acc / draws)
    return torch.tensor(out, dtype=torch.float64)


def _grad_sign(model, x: Tensor, y: Tensor) -> Tensor:
    with torch.enable_grad():
        xr = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(xr), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, xr)
    return g.sign()


def fgsm(model, x: Tensor, y: Tensor, eps) -> Tensor:
    """FGSM in ``l_inf``: ``clip(x + eps sign(grad_x loss), 0, 1)``, ``eps`` a number or one per
    sample (Goodfellow et al., 2015). Cross-entropy loss on the labels ``y``."""
    _check(model, x, y)
    return (x + _eps(eps, len(x), x) * _grad_sign(model, x, y)).clamp(0, 1).detach()


def pgd(model, x: Tensor, y: Tensor, eps, *, steps: int = 20, rel_step: float = 0.1) -> Tensor:
    """PGD in ``l_inf`` without random start (Madry et al., 2018): ``steps`` signed-gradient steps
    of ``rel_step * eps``, each followed by projection onto the ``eps``-ball around ``x`` and onto
    [0, 1]; ``eps`` a number or one per sample. Deterministic."""
    _check(model, x, y)
    e = _eps(eps, len(x), x)
    xa = x.clone()
    for _ in range(steps):
        xa = xa + rel_step * e * _grad_sign(model, xa, y)
        xa = torch.minimum(torch.maximum(xa, x - e), x + e).clamp(0, 1)
    return xa.detach()


ATTACKS = {"fgsm": fgsm, "pgd": pgd}


def attack_accuracy(model, x: Tensor, y: Tensor, eps, *, attack: str = "fgsm", **kw) -> Tensor:
    """Accuracy under ``attack`` (``"fgsm"`` or ``"pgd"``), one value per budget ``eps`` (float64).

    Example
    -------
    >>> import torch
    >>> from sensitivity_lib.recurrent.models import RecurrentClassifier
    >>> m = RecurrentClassifier("elman", 4, 8, 3, seed=0).eval()
    >>> x, y = torch.rand(5, 6, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1])
    >>> acc = attack_accuracy(m, x, y, [0.0, 0.5], attack="pgd", steps=5)
    >>> float(acc[0]) == float((m(x).argmax(1) == y).double().mean()), bool(acc[1] <= acc[0])
    (True, True)
    """
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {sorted(ATTACKS)}, got {attack!r}")
    out = []
    for e in torch.as_tensor(eps, dtype=torch.float64).reshape(-1).tolist():
        xa = ATTACKS[attack](model, x, y, e, **kw) if e > 0 else x
        out.append(float((_predict(model, xa) == y).double().mean()))
    return torch.tensor(out, dtype=torch.float64)


def minimal_flip(model, x: Tensor, *, attack: str = "pgd", hi: float = 1.0, tol: float = 1e-2,
                 **kw) -> Estimate:  # fmt: skip
    """The smallest ``l_inf`` budget at which ``attack`` changes each sample's prediction.

    The attack targets the model's own prediction (not the label), so misclassified samples count
    too. Bisection on ``[0, hi]`` by :func:`sensitivity_lib.search.flip_search` to relative
    ``tol``. ``value`` float64 ``(N,)`` (``inf``: no flip up to ``hi``), ``kind="upper"``: an
    achieved flip bounds the ``l_inf`` distance to another class from above.

    Example
    -------
    >>> import torch
    >>> from sensitivity_lib.recurrent.models import RecurrentClassifier
    >>> m = RecurrentClassifier("elman", 4, 8, 3, seed=0).eval()
    >>> x, y = torch.rand(5, 6, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1])
    >>> r = minimal_flip(m, x, attack="fgsm", hi=1.0, tol=0.01)
    >>> pred = m(x).argmax(1)
    >>> i = int(torch.nonzero(r.converged)[0])            # a sample that flips: FGSM at its budget flips it
    >>> int(m(fgsm(m, x[i:i + 1], pred[i:i + 1], float(r.value[i]))).argmax(1)) != int(pred[i])
    True
    """
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {sorted(ATTACKS)}, got {attack!r}")
    _check(model, x)
    pred = _predict(model, x)

    def changed(t: Tensor, idx: Tensor) -> Tensor:
        xa = ATTACKS[attack](model, x[idx], pred[idx], t.to(x.dtype), **kw)
        return _predict(model, xa) != pred[idx]

    r = flip_search(changed, len(x), mode="bisection", hi=hi, tol=tol)
    return Estimate(r.value, "upper", f"{attack} + bisection", norm="inf", converged=r.found,
                    extra={"below": r.below, "evaluations": r.evaluations})  # fmt: skip


def state_amplification(model: RecurrentClassifier, x: Tensor, *, start: int = 0, size: float = 1e-4,
                        generator: torch.Generator | None = None) -> dict[str, Tensor]:  # fmt: skip
    """How a state perturbation at time ``start`` evolves along ``x`` (float64 ``(N, T - start + 1)``
    each, column ``k`` for time ``start + k``):

    ``"measured"``: ``||s'_t - s_t|| / ||delta||`` after adding a random ``delta`` of norm ``size``
    (in float64) to ``s_start`` and running the network on; ``"worst"``: ``||d s_t / d s_start||_2``
    (the first-order worst case over directions, from the unrolled state Jacobians).

    Example
    -------
    >>> import torch
    >>> from sensitivity_lib.recurrent.models import RecurrentClassifier
    >>> m = RecurrentClassifier("elman", 4, 8, 3, seed=0).eval()
    >>> x, y = torch.rand(5, 6, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1])
    >>> a = state_amplification(m, x, size=1e-7)
    >>> a["worst"].shape, bool((a["measured"] <= a["worst"] * (1 + 1e-4)).all())
    (torch.Size([5, 7]), True)
    """
    _check(model, x)
    T = x.shape[1]
    if not 0 <= start < T:
        raise ValueError(f"start must be in [0, {T}), got {start}")
    g = generator or torch.Generator().manual_seed(0)
    m64 = _double(model)
    xd = x.double()
    S = hidden_states(m64, xd)
    d = torch.randn(len(x), m64.state_size, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=1, keepdim=True) * size
    with torch.no_grad():
        S2 = m64.states(xd[:, start:], S[:, start] + d)
    measured = (S2 - S[:, start:]).norm(dim=2) / size
    worst = [torch.ones(len(x), dtype=torch.float64)]
    J = torch.eye(m64.state_size, dtype=torch.float64).expand(len(x), -1, -1)
    Js = state_jacobians(m64, xd)
    for t in range(start, T):
        J = Js[:, t] @ J
        worst.append(torch.linalg.matrix_norm(J, 2))
    return {"measured": measured, "worst": torch.stack(worst, 1)}


def _double(model):
    """A float64 copy of ``model`` in eval mode (the caller's model is left alone)."""
    return copy.deepcopy(model).double().eval()


def condition_vs_length(model, x: Tensor, lengths, **kw) -> Tensor:
    """E0 (Part I's relative condition number, :func:`~sensitivity_lib.condition.local.local_condition`,
    2-norm, logits) of the network read over the first ``t`` steps of ``x``, for each ``t`` in
    ``lengths``: float64 ``(len(lengths), N)``."""
    from sensitivity_lib.condition import local_condition

    _check(model, x)
    return torch.stack([local_condition(model, x[:, :t], **kw).value for t in lengths])


def unrolled_norm(model: RecurrentClassifier, x: Tensor, start: int = 0) -> Tensor:
    """``||d s_T / d s_start||_2`` per sample (float64 ``(N,)``): the first-order worst-case growth
    of a state perturbation at ``start`` by the last step (the product of the state Jacobians).

    Example
    -------
    >>> import torch
    >>> from sensitivity_lib.recurrent.models import RecurrentClassifier, finalise
    >>> m = RecurrentClassifier("elman", 4, 8, 3, normalise="sigma", seed=0).eval()
    >>> _ = finalise(m)
    >>> x = torch.rand(5, 6, 4, generator=torch.Generator().manual_seed(0))
    >>> bool((unrolled_norm(m, x) <= 1 + 1e-6).all())     # ||J_t|| <= ||W|| = 1 at every step
    True
    """
    return torch.linalg.matrix_norm(state_jacobian(_double(model), x.double(), start), 2)

r"""Which layers are most sensitive: the size of each layer's Fisher-Rao metric, and a check by perturbing.

Paper: H. Shu and H. Zhu, "Sensitivity Analysis of Deep Neural Networks", AAAI 2019
(arXiv:1901.07152): its Setup 2 perturbs the weights of each layer and computes FI. FI divides by
the metric ``G_l`` of the perturbation, so for any layer whose logit Jacobian has rank ``C - 1``
it equals the odds ``(1 - p_y) / p_y`` whatever the layer (book, Part II ch. 4): it cannot rank
layers. What ranks them is the size of ``G_l`` itself, which FI divides out. This module measures it.

Definition (our reconstruction, not the paper's). Perturb layer ``l``'s parameters by
``delta = rho_l xi`` with ``xi ~ N(0, I_{P_l})`` and ``rho_l = ||theta_l|| / sqrt(P_l)`` (the
layer's root-mean-square weight), so that ``||delta|| ~ ||theta_l||``: a perturbation relative to
the layer's own scale, which makes layers with different units (convolution kernels, batch-norm
scales) comparable. To second order the Kullback-Leibler divergence of the predictive distribution
is ``KL(p || p_delta) = delta^T G_l delta / 2`` with ``G_l = J_l^T H J_l`` (``J_l`` the logit
Jacobian, ``H = diag p - p p^T``), and its mean over ``xi`` is ``s_l / 2`` with the
**relative layer sensitivity**

    s_l = rho_l^2 tr(G_l) = rho_l^2 tr(H M_l),    M_l = J_l J_l^T  (C x C),

averaged over images. ``M_l`` is the same C x C Gram that FI uses
(:func:`sensitivity_lib.influence.measure.logit_grams`), so ``s_l`` costs nothing beyond it and is exact
(no sampling). Norm: the Fisher-Rao metric on the predictive distribution; Euclidean on ``xi``.
Invariant to rescaling a layer's weights ``theta_l -> c theta_l`` when the network's function is
unchanged in a way that rescales ``J_l`` by ``1/c`` (e.g. a convolution followed by batch norm).

:func:`perturbation_effect` is the independent check: it draws ``xi``, perturbs the weights for
real (not linearised) in float64, and measures the mean KL; for small ``rel`` it should be close
to ``rel^2 s_l / 2``, and layers ranked high by ``s_l`` should move the output more.

Input space: images ``(N, ...)`` as the model takes them (pixels in ``[0, 1]`` for the
:mod:`sensitivity_lib.zoo` models); the model returns logits ``(N, C)`` and is in eval mode.

Example
-------
>>> import torch
>>> from torch import nn
>>> _ = torch.manual_seed(0)
>>> net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
>>> x = torch.rand(5, 6, dtype=torch.float64)
>>> s = layer_sensitivity(net, x)
>>> s.names, tuple(s.per_image.shape)
(['0', '2'], (5, 2))
>>> kl = perturbation_effect(net, x, rel=1e-4, n_draws=64)
>>> bool(((kl.mean / (1e-8 * s.value / 2) - 1).abs() < 0.5).all())  # KL ~ rel^2 s / 2
True
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from sensitivity_lib.influence.measure import logit_grams, param_layers
from sensitivity_lib.validation import check_batch, check_eval

__all__ = ["LayerSensitivity", "layer_sensitivity", "PerturbationEffect", "perturbation_effect",
           "param_layers"]


@dataclass(frozen=True)
class LayerSensitivity:
    """Relative layer sensitivities ``s_l`` (module docstring).

    Attributes
    ----------
    names
        Module names, in registration (for the book's networks: forward) order.
    per_image
        ``(N, n_layers)`` float64, ``rho_l^2 tr(H M_l)`` per image.
    value
        ``(n_layers,)`` float64, the mean over images.
    rho
        ``(n_layers,)`` float64, each layer's root-mean-square weight ``rho_l``.
    """

    names: list[str]
    per_image: torch.Tensor
    value: torch.Tensor
    rho: torch.Tensor

    def ranking(self) -> list[str]:
        """Layer names from the most to the least sensitive."""
        order = self.value.argsort(descending=True, stable=True).tolist()
        return [self.names[i] for i in order]


def _rho(module: nn.Module, own: list[str]) -> float:
    ps = [getattr(module, q).detach().to(torch.float64).reshape(-1) for q in own]
    t = torch.cat(ps)
    return float(t.norm() / t.numel() ** 0.5)


def layer_sensitivity(
    model: nn.Module, x: torch.Tensor, *, method: str = "auto", batch_size: int | None = None
) -> LayerSensitivity:
    """The relative sensitivity ``s_l = rho_l^2 tr(H M_l)`` of every layer, averaged over ``x``.

    Parameters
    ----------
    model
        Classifier in eval mode, logits ``(N, C)``.
    x
        Images ``(N, ...)``.
    method, batch_size
        As in :func:`sensitivity_lib.influence.measure.logit_grams` (hooks when every layer is a Linear,
        Conv2d, BatchNorm or LayerNorm; float64).

    Returns
    -------
    LayerSensitivity
    """
    check_eval(model)
    check_batch(x, "x")
    z, grams = logit_grams(model, x, "layers", method=method, batch_size=batch_size)
    p = torch.softmax(z.to(torch.float64), -1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    layers = param_layers(model)
    names = [n for n, _, _ in layers]
    rho = torch.tensor([_rho(m, own) for _, m, own in layers], dtype=torch.float64)
    tr = torch.stack([(H * grams[n]).sum((-2, -1)) for n in names], dim=1)  # tr(H M), M symmetric
    per = tr * rho**2
    return LayerSensitivity(names=names, per_image=per, value=per.mean(0), rho=rho)


@dataclass(frozen=True)
class PerturbationEffect:
    """Measured effect of real relative perturbations of each layer's weights.

    Attributes
    ----------
    names
        Module names (as in :class:`LayerSensitivity`).
    kl
        ``(n_layers, n_draws, N)`` float64: ``KL(p(.|x) || p_delta(.|x))`` for each draw and image.
    mean
        ``(n_layers,)`` float64: the mean of ``kl`` over draws and images.
    changed
        ``(n_layers,)`` float64: the fraction of (draw, image) pairs whose predicted class changed.
    rel
        The relative size ``||delta|| / ||theta_l||`` (in expectation).
    """

    names: list[str]
    kl: torch.Tensor
    mean: torch.Tensor
    changed: torch.Tensor
    rel: float


@torch.no_grad()
def perturbation_effect(
    model: nn.Module,
    x: torch.Tensor,
    names: list[str] | None = None,
    *,
    rel: float = 1e-3,
    n_draws: int = 4,
    generator: torch.Generator | None = None,
) -> PerturbationEffect:
    """Perturb each layer's parameters by ``rel * rho_l * xi`` (``xi`` standard normal, fresh per
    draw) in a float64 copy of the model, and measure the KL divergence of the prediction.

    Parameters
    ----------
    model
        Classifier in eval mode, logits ``(N, C)``; not modified.
    x
        Images ``(N, ...)``.
    names
        Layers to perturb (default: all of :func:`param_layers`), one at a time.
    rel
        Relative size of the perturbation (``||delta|| ~ rel ||theta_l||``).
    n_draws
        Independent draws of ``xi`` per layer.
    generator
        For ``xi`` (default: a fixed seed).

    Returns
    -------
    PerturbationEffect
    """
    check_eval(model)
    check_batch(x, "x")
    if not (rel > 0) or n_draws < 1:
        raise ValueError(f"need rel > 0 and n_draws >= 1, got rel={rel}, n_draws={n_draws}")
    work = copy.deepcopy(model).to(torch.float64)
    layers = {n: (m, own) for n, m, own in param_layers(work)}
    names = list(layers) if names is None else list(names)
    missing = [n for n in names if n not in layers]
    if missing:
        raise ValueError(f"not layers with trainable parameters: {missing[:5]}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    x64 = x.detach().to(torch.float64)
    logp0 = torch.log_softmax(work(x64), -1)
    pred0 = logp0.argmax(-1)
    p0 = logp0.exp()
    kls, changed = [], []
    for n in names:
        m, own = layers[n]
        rho = _rho(m, own)
        saved = [getattr(m, q).detach().clone() for q in own]
        rows, ch = [], 0.0
        for _ in range(n_draws):
            for q, s in zip(own, saved, strict=True):
                xi = torch.randn(s.shape, generator=g, dtype=torch.float64)
                getattr(m, q).copy_(s + rel * rho * xi.to(s.device))
            logp = torch.log_softmax(work(x64), -1)
            rows.append((p0 * (logp0 - logp)).sum(-1).clamp_min(0))
            ch += float((logp.argmax(-1) != pred0).double().sum())
        for q, s in zip(own, saved, strict=True):
            getattr(m, q).copy_(s)
        kls.append(torch.stack(rows))
        changed.append(ch / (n_draws * x.shape[0]))
    kl = torch.stack(kls)
    return PerturbationEffect(names=names, kl=kl, mean=kl.mean((1, 2)),
                              changed=torch.tensor(changed, dtype=torch.float64), rel=rel)

"""First-order influence (FI) of perturbations on a perturbation manifold.

Paper: H. Shu and H. Zhu, "Sensitivity Analysis of Deep Neural Networks", AAAI 2019
(arXiv:1901.07152), building on Zhu, Ibrahim, Lee and Zhang, "Perturbation selection and
influence measures in local influence analysis", Ann. Statist. 35 (2007). The formulas follow the
authors' code (``shu-hai/SA_DNN``); the C x C reduction is our derivation (book, Part II ch. 5).

Perturbation ``omega`` (``wrt``): the whole input image (``"input"``), one channel-pixel or a
(2s+1)^2 patch of one channel (``"pixels"``), the parameters of each trainable module
(``"layers"``) or all parameters (``"params"``); ``omega_0`` is the unperturbed value.

Norm / metric: the Fisher-Rao metric of the predictive distribution,
``G = J_p^T diag(p)^-1 J_p = J_z^T H J_z`` with ``H = diag(p) - p p^T`` and ``J_z`` the Jacobian of
the logits with respect to ``omega``. For ``f = log p(y | x, omega)``,

    FI = sup_v (v^T df)^2 / (v^T G v) = df^T G^+ df.

Everything is computed from the C x C Gram matrix ``M = J_z J_z^T`` of the logit-Jacobian rows
(``C`` = number of classes): ``K = A M A^T`` with ``A = diag(sqrt p) - sqrt(p) p^T`` has the same
non-zero spectrum as ``G`` and ``FI = ||Pi_K w||^2 / p_y`` with ``w = e_y - sqrt(p_y) sqrt(p)``.
No p x p matrix and no p x C SVD is ever formed. Consequence (proved in the book): FI is at most
``(1 - p_y) / p_y`` and equals it exactly when ``col(J_z) + span(1) = R^C``, which holds for any
perturbation of dimension ``>= C - 1`` in general position (whole images, layers, all parameters).
FI says more than the confidence only for low-dimensional or rank-deficient perturbations (single
pixels, small patches, some layers).

Modes: ``"exact"`` (the pseudo-inverse, relative rank tolerance ``rtol`` on the eigenvalues of
``K``; invariant to any reparameterisation of ``omega``) and ``"sa_dnn"`` (the authors' recipe:
``L0 = J_p^T diag(sqrt p + eps)^-1``, singular values of ``L0`` kept when ``> eps``, gradient
``dp_y / (p_y + eps)``, inputs on the 0-255 scale; ``eps = 1e-3``, ``1e-8`` in their Setup 0).
Its regularisation depends on ``p`` only, so it loses invariance through the absolute cut-off alone.

Input space: images ``x`` of shape ``(N, Ch, H, W)`` (any ``(N, ...)`` for ``"input"``), pixels in
``[0, 1]`` as the :mod:`sensitivity_lib.zoo` models take them; the model returns logits ``(N, C)``.
The model must be in eval mode (dropout off, batch norm on running statistics; the library's one
policy, :func:`sensitivity_lib.validation.check_eval`, raises otherwise), so the
images of a batch do not interact and one backward pass per class serves the whole batch.

Shapes of :attr:`Influence.value`: ``(N,)`` for ``"input"`` and ``"params"``, ``(N, Ch, H, W)``
for ``"pixels"``, and a dict ``{module name: (N,)}`` for ``"layers"``.

Example
-------
>>> import torch
>>> from torch import nn
>>> _ = torch.manual_seed(0)
>>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)).double()
>>> x = torch.rand(4, 1, 4, 4, dtype=torch.float64)
>>> r = fi(net, x)                      # whole-image FI, predicted labels, exact mode
>>> bool(torch.allclose(r.value, r.odds))   # 16 >= C = 3 dimensions: FI = (1 - p) / p
True
>>> fi(net, x, wrt="pixels").value.shape
torch.Size([4, 1, 4, 4])
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, jvp

from sensitivity_lib.opnorm import conv_padding
from sensitivity_lib.validation import check_batch, check_eval, check_labels, fingerprint

__all__ = [
    "Influence",
    "fi",
    "fi_maps",
    "fi_target",
    "fi_from_gram",
    "fi_direction",
    "logit_grams",
    "param_layers",
    "svd_chain_reference",
    "reference_loop",
    "flip_top_pixels",
    "DEFAULT_RTOL",
    "SA_DNN_EPS",
]

Wrt = Literal["input", "pixels", "layers", "params"]
Mode = Literal["exact", "sa_dnn"]

DEFAULT_RTOL = 1e-12
"""Default relative tolerance on the eigenvalues of the C x C Gram ``K`` in exact mode.

The Gram squares singular values, so directions with ``sigma_i < 1e-6 sigma_max`` count as null.
That is far above the float64 round-off (about 1e-16) of the direction ``sqrt(p)`` that is always
null, and below any direction that carries information about a float32 network."""

SA_DNN_EPS = 1e-3
"""The authors' epsilon (``SA_DNN/*_IF_setup{1and3,2,4}.py``; their Setup 0 uses ``1e-8``)."""

_WRTS = ("input", "pixels", "layers", "params")
_MODES = ("exact", "sa_dnn")


# --------------------------------------------------------------------------------------------
# result object
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Influence:
    """FI values of a batch with the diagnostics needed to read them.

    Attributes
    ----------
    value
        FI: a tensor (``(N,)`` or ``(N, Ch, H, W)``) or, for ``wrt="layers"``, a dict
        ``{module name: (N,)}`` in forward order. float64.
    rank
        Rank kept in ``K`` (same layout as ``value``, int64). At most ``C - 1`` in exact mode.
    p_y
        ``p(y | x)`` of the label used, ``(N,)`` float64.
    odds
        ``(1 - p_y) / p_y``, ``(N,)``: the value of FI whenever the kept rank is ``C - 1``, and an
        upper bound on it always (exact mode).
    labels
        The labels ``y`` used (``(N,)`` int64): given, or predicted.
    probs
        ``p(. | x)``, ``(N, C)`` float64.
    grad_norm
        ``||d f / d omega||_2`` (the "Jacobian norm" baseline of SA_DNN's Setup 0) in the units of
        ``omega`` (0-255 pixels in ``sa_dnn`` mode), same layout as ``value``.
    wrt, mode
        What was perturbed, and ``"exact"`` or ``"sa_dnn"``.
    kind
        ``"exact"`` for the pseudo-inverse form, ``"estimate"`` for the regularised recipe.
    method
        How the Grams were obtained (``"batch-vjp"``, ``"hooks"``, ``"functorch"``).
    extra
        Settings (``eps``, ``rtol``, ``input_scale``, ``patch``) and, when asked for,
        ``"eigvals"`` (the eigenvalues of ``K``, ascending).
    """

    value: torch.Tensor | dict[str, torch.Tensor]
    rank: torch.Tensor | dict[str, torch.Tensor]
    p_y: torch.Tensor
    odds: torch.Tensor
    labels: torch.Tensor
    probs: torch.Tensor
    grad_norm: torch.Tensor | dict[str, torch.Tensor]
    wrt: str
    mode: str
    kind: str
    method: str
    extra: dict[str, Any] = field(default_factory=dict)

    def __float__(self) -> float:
        if isinstance(self.value, dict) or self.value.numel() != 1:
            raise TypeError("this Influence holds several values; index .value instead")
        return float(self.value.item())

    def matrix(self, what: str = "value") -> tuple[list[str], torch.Tensor]:
        """For ``wrt="layers"``: module names and an ``(N, n_layers)`` tensor of ``what``.

        ``what`` is ``"value"``, ``"rank"`` or ``"grad_norm"``.
        """
        d = getattr(self, what)
        if not isinstance(d, dict):
            raise TypeError(f"matrix() is for wrt='layers' results, this one is wrt={self.wrt!r}")
        names = list(d)
        return names, torch.stack([d[n] for n in names], dim=1)

    def __repr__(self) -> str:
        if isinstance(self.value, dict):
            v = f"{len(self.value)} layers x {self.p_y.numel()} images"
        else:
            v = f"tensor(shape={tuple(self.value.shape)}, max={self.value.max().item():.6g})"
        return (
            f"Influence(value={v}, wrt={self.wrt!r}, mode={self.mode!r}, kind={self.kind!r}, "
            f"method={self.method!r})"
        )


# --------------------------------------------------------------------------------------------
# the C x C kernel
# --------------------------------------------------------------------------------------------


def fi_from_gram(
    M: torch.Tensor,
    p: torch.Tensor,
    y: torch.Tensor,
    mode: Mode = "exact",
    *,
    eps: float = SA_DNN_EPS,
    rtol: float = DEFAULT_RTOL,
    atol: float = 0.0,
    return_eigvals: bool = False,
) -> tuple[torch.Tensor, ...]:
    """FI from the C x C Gram of logit-Jacobian rows (batched over leading dimensions).

    Parameters
    ----------
    M
        ``(..., C, C)``: ``M = J_z J_z^T`` where ``J_z`` is the ``C x dim(omega)`` Jacobian of the
        logits with respect to the perturbation ``omega``. Symmetric positive semi-definite.
    p
        ``(..., C)`` class probabilities (they should sum to 1 in float64).
    y
        ``(...)`` labels, the ``f = log p_y`` objective.
    mode
        ``"exact"``: ``FI = df^T G^+ df`` with eigenvalues of ``K`` kept when
        ``> max(rtol * max eigenvalue, atol)``. ``"sa_dnn"``: the authors' epsilon-regularised
        recipe with the absolute cut ``eps**2`` on the eigenvalues of ``K = L0^T L0``.
    eps, rtol, atol
        See ``mode``.
    return_eigvals
        Also return the eigenvalues of ``K`` (ascending).

    Returns
    -------
    tuple of torch.Tensor
        ``(fi, rank)`` (float64, int64; shape ``(...)``), plus ``eigvals`` ``(..., C)`` if asked.

    Notes
    -----
    Exact mode evaluates ``FI = ||Pi w||^2 / p_y`` with ``w = e_y - sqrt(p_y) sqrt(p)``, where
    ``Pi`` is the projector on the kept eigenvectors; ``w`` is orthogonal to the always-null
    direction ``sqrt(p)``, so FI keeps full relative accuracy even when ``1 - p_y`` is tiny.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    M = M.to(torch.float64)
    p = p.to(M)
    y = y.to(torch.long)
    sp = p.clamp_min(0).sqrt()
    py = p.gather(-1, y[..., None])[..., 0]
    if mode == "exact":
        d = sp  # A = diag(p)^{-1/2} H
    else:
        d = p / (sp + eps)  # A = diag(sqrt p + eps)^{-1} H
    A = torch.diag_embed(d) - d[..., :, None] * p[..., None, :]
    K = A @ M @ A.mT
    K = 0.5 * (K + K.mT)
    lam, V = torch.linalg.eigh(K)
    if mode == "exact":
        tol = (rtol * lam[..., -1:]).clamp_min(atol)
        keep = lam > tol
        one_minus = (p.sum(-1) - py).clamp_min(0)  # 1 - p_y without cancellation
        w = -py.sqrt()[..., None] * sp
        w = w.scatter(-1, y[..., None], one_minus[..., None])
        proj = (V.mT @ w[..., None])[..., 0] ** 2
        val = (proj * keep).sum(-1) / py
    else:
        keep = lam > eps**2
        vy = torch.take_along_dim(V, y[..., None, None], dim=-2)[..., 0, :]
        cy = (py.sqrt() + eps) / (py + eps)
        val = cy**2 * (vy**2 * keep).sum(-1)
    rank = keep.sum(-1)
    return (val, rank, lam) if return_eigvals else (val, rank)


def _fi_scalar(
    j: torch.Tensor, p: torch.Tensor, y: torch.Tensor, mode: str, *, eps: float, rtol: float,
    atol: float, return_eigvals: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fi_from_gram` for a scalar omega (``M = j j^T``, rank one) in closed form.

    ``K = a a^T`` with ``a = A j``: one eigenvalue ``|a|^2`` with eigenvector ``a / |a|``.
    """
    del return_eigvals
    j = j.to(torch.float64)
    sp = p.clamp_min(0).sqrt()
    py = p.gather(-1, y[..., None])[..., 0]
    d = sp if mode == "exact" else p / (sp + eps)
    a = d * j - d * (p * j).sum(-1, keepdim=True)  # A j with A = diag(d) - d p^T
    lam = (a * a).sum(-1)
    if mode == "exact":
        keep = (lam > 0) & (lam > atol)  # rtol is relative to lam itself: always met when lam > 0
        one_minus = (p.sum(-1) - py).clamp_min(0)
        w = -py.sqrt()[..., None] * sp
        w = w.scatter(-1, y[..., None], one_minus[..., None])
        val = (a * w).sum(-1) ** 2 / lam.clamp_min(1e-300) / py
    else:
        keep = lam > eps**2
        ay = a.gather(-1, y[..., None])[..., 0]
        val = ((py.sqrt() + eps) / (py + eps)) ** 2 * ay**2 / lam.clamp_min(1e-300)
    return torch.where(keep, val, torch.zeros_like(val)), keep.long()


def _grad_norm_scalar(j: torch.Tensor, p: torch.Tensor, y: torch.Tensor, mode: str, eps: float):
    c = -p.to(torch.float64)
    c = c.scatter(-1, y[..., None].long(), (1 + c.gather(-1, y[..., None].long())))
    g = (c * j.to(torch.float64)).sum(-1).abs()
    if mode == "sa_dnn":
        py = p.gather(-1, y[..., None].long())[..., 0].to(torch.float64)
        g = g * py / (py + eps)
    return g


def _grad_norm_from_gram(M: torch.Tensor, p: torch.Tensor, y: torch.Tensor, mode: str, eps: float):
    """``||d log p_y / d omega||`` from ``M`` (``df = J_z^T (e_y - p)``); SA_DNN's JN in sa_dnn."""
    c = -p.to(torch.float64)
    c = c.scatter(-1, y[..., None].long(), (1 + c.gather(-1, y[..., None].long())))
    g2 = (c[..., None, :] @ M.to(torch.float64) @ c[..., :, None])[..., 0, 0].clamp_min(0)
    if mode == "sa_dnn":  # SA_DNN divides dp_y by (p_y + eps) instead of p_y
        py = p.gather(-1, y[..., None].long())[..., 0].to(torch.float64)
        g2 = g2 * (py / (py + eps)) ** 2
    return g2.sqrt()


# --------------------------------------------------------------------------------------------
# helpers: validation, labels, batches
# --------------------------------------------------------------------------------------------


def _check_x(x: torch.Tensor, wrt: str) -> None:
    check_batch(x)
    if wrt == "pixels" and x.dim() != 4:
        raise ValueError(f"wrt='pixels' needs images (N, Ch, H, W), got shape {tuple(x.shape)}")


def _labels(y: Any, n: int, z: torch.Tensor) -> torch.Tensor:
    """The labels of ``f = log p_y``: given (checked), or the predicted ones."""
    if y is None:
        return z.argmax(-1).to(torch.long)
    return check_labels(y, n, z.shape[-1]).to(z.device)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


# --------------------------------------------------------------------------------------------
# Jacobians with respect to the input: one batched backward for all C classes
# --------------------------------------------------------------------------------------------


_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cached_copy(model: nn.Module, kind: str, dtype: torch.dtype, make: Callable[[], nn.Module]) -> nn.Module:
    """``make()``, cached per model, ``kind`` and dtype while the model's tensors are unchanged (any
    in-place update, e.g. a training step, or a change of mode invalidates it)."""
    key = fingerprint(model)
    store = _COPIES.setdefault(model, {})
    hit = store.get((kind, dtype))
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = (key, make().eval())
        store[(kind, dtype)] = hit
    return hit[1]


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.float32)


def _in_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` itself when its parameters already are ``dtype``, else a cached copy in ``dtype``
    (same module names, so per-layer results keep the model's names)."""
    if _model_dtype(model) == dtype:
        return model
    return _cached_copy(model, "cast", dtype, lambda: copy.deepcopy(model).to(dtype))


def _inference_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """``model`` in ``dtype`` with each batch norm folded into the convolution before it (eval mode).

    Input Jacobians of the folded copy equal the model's up to rounding (the map is the same
    affine composition), and a backward pass through it skips every batch-norm node: about 1.5x
    faster for the book's ResNets. Uses :func:`torch.fx.experimental.optimization.fuse`; a model
    that torch.fx cannot trace, or one without batch norm, is only cast. Cached (see
    :func:`_cached_copy`).
    """
    dtype = dtype or _model_dtype(model)
    if model.training or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return _in_dtype(model, dtype)

    def make() -> nn.Module:
        try:
            from torch.fx.experimental.optimization import fuse

            return fuse(_in_dtype(model, dtype))  # folded in dtype (fuse copies the model)
        except Exception:  # noqa: BLE001 - not traceable: the cast copy alone
            return _in_dtype(model, dtype)

    return _cached_copy(model, "fused", dtype, make)


def _input_jacobian(
    model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(B, C)`` and ``J[b, k] = d z_k(x_b) / d x_b``, ``(B, C, *x.shape[1:])``, in ``dtype``
    (default: the model's).

    In eval mode the images do not interact, so the gradient of ``sum_b z_k(x_b)`` holds every
    image's row ``k``: C backward passes (input gradients only) serve the whole batch. (A single
    ``is_grads_batched`` pass gives the same numbers but was 1.4-3x slower on CPU.) Batch norms
    are folded into their convolutions first (:func:`_inference_copy`).
    """
    model = _inference_copy(model, dtype)
    xg = x.detach().to(dtype or x.dtype).requires_grad_(True)
    with torch.enable_grad():
        z = model(xg)
        if z.dim() != 2 or z.shape[0] != x.shape[0]:
            raise ValueError(f"the model must return logits (N, C); got shape {tuple(z.shape)}")
        C = z.shape[1]
        J = torch.stack(
            [
                torch.autograd.grad(z[:, k].sum(), xg, retain_graph=k < C - 1)[0]
                for k in range(C)
            ]
        )
    return z.detach(), J.detach().transpose(0, 1)


# --------------------------------------------------------------------------------------------
# Grams with respect to parameters, per module
# --------------------------------------------------------------------------------------------


def param_layers(model: nn.Module) -> list[tuple[str, nn.Module, list[str]]]:
    """Modules owning trainable parameters, in registration order, with their own parameter names
    (the layers of the paper's Setup 2: kernel and bias together, batch-norm scale and shift
    together): what ``wrt="layers"`` perturbs, one at a time."""
    out = []
    for name, m in model.named_modules():
        own = [n for n, p in m.named_parameters(recurse=False) if p.requires_grad]
        if own:
            out.append((name, m, own))
    if not out:
        raise ValueError("the model has no trainable parameters (requires_grad=True)")
    return out


_HOOKABLE = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)


def _hookable(m: nn.Module, own: list[str]) -> bool:
    # exact types only: a subclass may change forward(), and the hook formulas would be wrong
    if type(m) not in _HOOKABLE or not set(own) <= {"weight", "bias"}:
        return False
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros":
            return False
        if isinstance(m.padding, str) and m.padding == "same":
            return all(d * (k - 1) % 2 == 0 for d, k in zip(m.dilation, m.kernel_size, strict=True))
    return True


def _gram_from_rows(g: torch.Tensor) -> torch.Tensor:
    """``g``: (B, C, D) per-sample, per-class gradients -> (B, C, C) float64."""
    g = g.reshape(g.shape[0], g.shape[1], -1).to(torch.float64)
    return g @ g.mT


def _module_gram(m: nn.Module, own: list[str], calls: list[tuple[torch.Tensor, torch.Tensor]]):
    """Per-sample C x C Gram of ``d z / d theta_m`` from inputs ``a`` and output cotangents ``d``.

    ``calls``: one ``(a, d)`` per forward call of the module; ``a`` is its input ``(B, ...)`` and
    ``d`` the cotangents of its output for the C classes ``(B, C, ...)``. No weight gradient
    of the whole model is formed; at most one module's per-sample gradients exist at a time,
    and convolutions with small outputs use the "ghost" identity
    ``<d_k^T U, d_l^T U> = sum((d_k^T d_l) * (U^T U))`` instead.
    """
    grads: list[torch.Tensor] = []  # per-sample, per-class gradient blocks, summed over calls
    gram = None
    single = len(calls) == 1
    for i, (a, d) in enumerate(calls):
        B, C = d.shape[:2]
        blocks: list[torch.Tensor] = []
        if isinstance(m, nn.Linear):
            a2 = a.reshape(B, -1, a.shape[-1])  # (B, T, in)
            d2 = d.reshape(B, C, -1, d.shape[-1])  # (B, C, T, out)
            if single and a2.shape[1] == 1:  # ghost form for the usual (B, in) input
                dd = d2[:, :, 0, :].to(torch.float64)
                G = dd @ dd.mT
                aa = (a2[:, 0, :].to(torch.float64) ** 2).sum(-1)
                out = G * aa[:, None, None] if "weight" in own else torch.zeros_like(G)
                if "bias" in own:
                    out = out + G
                gram = out
                continue
            if "weight" in own:
                blocks.append(torch.einsum("bkto,bti->bkoi", d2, a2))
            if "bias" in own:
                blocks.append(d2.sum(2))
        elif isinstance(m, nn.Conv2d):
            pt, _, pl, _ = conv_padding(m)  # symmetric here (_hookable)
            pad = (pt, pl)
            U = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=pad, stride=m.stride)
            g_ = m.groups
            T = U.shape[-1]
            U = U.reshape(B, g_, -1, T)  # (B, g, Cin/g*kk, T)
            dd = d.reshape(B, C, g_, -1, T)  # (B, C, g, Cout/g, T)
            Din, Dout = U.shape[2], dd.shape[3]
            cost_mat = C * g_ * Dout * Din * T + C * C * g_ * Dout * Din
            cost_ghost = g_ * T * T * (Din + C * Dout) + C * C * g_ * Dout * T
            if "weight" in own and single and cost_ghost < cost_mat:
                Ud = U.to(torch.float64)
                UU = Ud.mT @ Ud  # (B, g, T, T)
                d64 = dd.to(torch.float64)
                Q = torch.einsum("bgts,blgos->blgot", UU, d64)
                G = torch.einsum("bkgot,blgot->bkl", d64, Q)
                if "bias" in own:
                    s = d64.sum(-1).reshape(B, C, -1)
                    G = G + s @ s.mT
                gram = G
                continue
            if "weight" in own:
                blocks.append(torch.einsum("bkgot,bgit->bkgoi", dd, U))
            if "bias" in own:
                blocks.append(dd.sum(-1))
        else:  # batch norm (eval: running statistics) and layer norm: y = gamma * xhat + beta
            if isinstance(m, nn.LayerNorm):
                nd = len(m.normalized_shape)
                dims = tuple(range(a.dim() - nd, a.dim()))
                mu = a.mean(dims, keepdim=True)
                var = a.var(dims, unbiased=False, keepdim=True)
                xhat = (a - mu) / torch.sqrt(var + m.eps)
                red = tuple(range(2, d.dim() - nd))  # sum over leading non-normalised dims
            else:
                shape = (1, -1) + (1,) * (a.dim() - 2)
                xhat = (a - m.running_mean.view(shape)) / torch.sqrt(
                    m.running_var.view(shape) + m.eps
                )
                red = tuple(range(3, d.dim()))  # sum over spatial dims; channel dim is 2
            if "weight" in own:
                gw = d * xhat[:, None]
                blocks.append(gw.sum(red) if red else gw)
            if "bias" in own:
                blocks.append(d.sum(red) if red else d)
        flat = torch.cat([b.reshape(B, C, -1) for b in blocks], dim=-1)
        if i == 0:
            grads = [flat]
        else:
            grads[0] = grads[0] + flat
    if gram is not None:
        return gram
    return _gram_from_rows(grads[0])


def _hooks_grams(
    model: nn.Module, x: torch.Tensor, mods: list[tuple[str, nn.Module, list[str]]]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-module logit Grams for a batch: forward hooks, then C backward passes that stop at the
    hooked module outputs (no weight gradient is computed)."""
    records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n, _, _ in mods}

    def make_hook(name: str) -> Callable:
        def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> torch.Tensor:
            records[name].append((inp[0].detach(), out))
            return out.clone()  # later in-place ops (e.g. ReLU(inplace=True)) act on the clone

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m, _ in mods]
    try:
        with torch.enable_grad():
            z = model(x)
    finally:
        for h in handles:
            h.remove()
    if z.dim() != 2 or z.shape[0] != x.shape[0]:
        raise ValueError(f"the model must return logits (N, C); got shape {tuple(z.shape)}")
    C = z.shape[1]
    outs = [o for n, _, _ in mods for (_, o) in records[n]]
    per_k = [
        torch.autograd.grad(z[:, k].sum(), outs, retain_graph=k < C - 1, allow_unused=True)
        for k in range(C)
    ]
    ds = tuple(
        None if per_k[0][j] is None else torch.stack([g[j] for g in per_k])
        for j in range(len(outs))
    )
    del per_k
    grams: dict[str, torch.Tensor] = {}
    j = 0
    for n, m, own in mods:
        calls = []
        for a, o in records[n]:
            d = ds[j]
            j += 1
            if d is None:
                d = torch.zeros((C,) + tuple(o.shape), dtype=o.dtype, device=o.device)
            calls.append((a, d.detach().transpose(0, 1)))
        if calls:
            grams[n] = _module_gram(m, own, calls)
        else:
            grams[n] = torch.zeros(x.shape[0], C, C, dtype=torch.float64, device=x.device)
        records[n] = []
    return z.detach(), grams


def _functorch_grams(
    model: nn.Module,
    x: torch.Tensor,
    mods: list[tuple[str, nn.Module, list[str]]],
    chunk: int | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-module logit Grams with ``jacrev(functional_call)``, one image at a time (any module).

    Holds one image's parameter Jacobian (``C x n_params``) for a moment.
    """
    owner = {f"{n}.{q}" if n else q: n for n, _, own in mods for q in own}
    params = {k: v.detach() for k, v in model.named_parameters() if k in owner}
    frozen = {k: v.detach() for k, v in model.named_parameters() if k not in owner}
    buffers = dict(model.named_buffers())

    def logits(pr: dict[str, torch.Tensor], x1: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**pr, **frozen, **buffers}, (x1[None],))
        return out[0], out[0]

    zs = []
    per_image: dict[str, list[torch.Tensor]] = {n: [] for n, _, _ in mods}
    for i in range(x.shape[0]):
        J, z = jacrev(logits, has_aux=True, chunk_size=chunk)(params, x[i])
        zs.append(z.detach())
        g: dict[str, torch.Tensor] = {}
        for k, j in J.items():
            n = owner[k]
            gk = _gram_from_rows(j.detach()[None])[0]
            g[n] = g[n] + gk if n in g else gk
        for n in per_image:
            per_image[n].append(g[n])
        del J
    return torch.stack(zs), {n: torch.stack(v) for n, v in per_image.items()}


def logit_grams(
    model: nn.Module,
    x: torch.Tensor,
    wrt: Wrt = "input",
    *,
    method: str = "auto",
    batch_size: int | None = None,
    chunk_size: int | None = None,
    input_scale: float | torch.Tensor = 1.0,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, Any]:
    """Logits and C x C Grams ``J_z J_z^T`` of the logit Jacobian for each perturbation block.

    Parameters
    ----------
    model
        Returns logits ``(N, C)``; in eval mode.
    x
        Images ``(N, ...)``.
    wrt
        ``"input"``: ``(N, C, C)``. ``"pixels"``: the per-pixel Gram ``(N, Ch, H, W, C, C)``.
        ``"layers"``: dict ``{module: (N, C, C)}``. ``"params"``: ``(N, C, C)``, the sum of the
        layer Grams (Grams add over disjoint blocks).
    method
        For layers and params: ``"hooks"`` (forward hooks and batched output cotangents; Linear,
        Conv2d, BatchNorm and LayerNorm only), ``"functorch"`` (any module; holds one batch's
        parameter Jacobian) or ``"auto"`` (hooks when every trainable module is supported).
    batch_size
        Images per pass. Default for input/pixels: as many as keep the float64 Jacobian (and
        the per-pixel Grams) within 256 MiB, at most 64; 8 for layers/params.
    chunk_size
        ``jacrev`` chunk size (classes per pass) for ``method="functorch"``.
    input_scale
        For input and pixels: ``omega = input_scale * x`` (a number, or a tensor that broadcasts
        against one image, for per-coordinate units); the Jacobian is divided by it.
    dtype
        The precision in which the network is differentiated (default float64: a float64 copy of
        the model, cached). In float32 the round-off of a deep network's input gradients can reach
        percents (2% on the ResNet-50 of Part II), which swamps small FI values.

    Returns
    -------
    tuple
        ``(logits (N, C), grams)`` with Grams in float64.
    """
    if wrt not in _WRTS:
        raise ValueError(f"wrt must be one of {_WRTS}, got {wrt!r}")
    check_eval(model)
    _check_x(x, wrt)
    if method not in ("auto", "hooks", "functorch"):
        raise ValueError(f"method must be 'auto', 'hooks' or 'functorch', got {method!r}")
    N = x.shape[0]
    zs: list[torch.Tensor] = []
    if wrt in ("input", "pixels"):
        bs = batch_size or _map_batch(_n_classes(model, x[:1]), x[0].numel(), wrt == "pixels")
        parts = []
        for sl in _chunks(N, bs):
            z, J = _input_jacobian(model, x[sl], dtype)
            J = J.to(torch.float64) / _on(input_scale, J)
            zs.append(z)
            if wrt == "input":
                Jf = J.reshape(J.shape[0], J.shape[1], -1)
                parts.append(Jf @ Jf.mT)
            else:
                parts.append(torch.einsum("bichw,bjchw->bchwij", J, J))
        return torch.cat(zs), torch.cat(parts)
    mods = param_layers(model)
    use_hooks = method == "hooks" or (
        method == "auto" and all(_hookable(m, own) for _, m, own in mods)
    )
    if use_hooks:
        bad = [n for n, m, own in mods if not _hookable(m, own)]
        if bad:
            raise NotImplementedError(
                f"method='hooks' supports Linear, Conv2d (zero padding), BatchNorm and "
                f"LayerNorm modules; these are not: {bad[:5]}. Use method='functorch'."
            )
    bs = batch_size or 8
    acc: dict[str, list[torch.Tensor]] = {n: [] for n, _, _ in mods}
    work = _in_dtype(model, dtype)
    mods_w = param_layers(work)  # the same names, in the working dtype
    for sl in _chunks(N, bs):
        xs = x[sl].to(dtype)
        if use_hooks:
            z, g = _hooks_grams(work, xs, mods_w)
        else:
            z, g = _functorch_grams(work, xs, mods_w, chunk_size)
        zs.append(z)
        for n in acc:
            acc[n].append(g[n])
    grams = {n: torch.cat(v) for n, v in acc.items()}
    z = torch.cat(zs)
    if wrt == "params":
        return z, sum(grams.values())
    return z, grams


def _on(scale: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    return scale.to(like.device) if isinstance(scale, torch.Tensor) else scale


def _method_name(wrt: str, model: nn.Module, method: str) -> str:
    if wrt in ("input", "pixels"):
        return "batch-vjp"
    if method != "auto":
        return method
    ok = all(_hookable(m, own) for _, m, own in param_layers(model))
    return "hooks" if ok else "functorch"


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def _box_filter(O: torch.Tensor, s: int) -> torch.Tensor:
    """Sum ``O`` (N, Ch, H, W, C, C) over (2s+1)^2 neighbourhoods, cut at the border."""
    if s == 0:
        return O
    N, Ch, H, W, C, _ = O.shape
    Ob = O.permute(0, 1, 4, 5, 2, 3).reshape(-1, 1, H, W)
    k = 2 * s + 1
    Ob = F.avg_pool2d(Ob, k, stride=1, padding=s, count_include_pad=True) * (k * k)
    return Ob.reshape(N, Ch, C, C, H, W).permute(0, 1, 4, 5, 2, 3)


def _modes(mode: Any) -> tuple[str, ...]:
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    if not modes or any(m not in _MODES for m in modes):
        raise ValueError(f"mode must be 'exact' or 'sa_dnn' (or a tuple of them), got {mode!r}")
    return modes


def _default_scale(mode: str, wrt: str) -> float:
    return 255.0 if (mode == "sa_dnn" and wrt in ("input", "pixels")) else 1.0


def _settings(mode: Any, wrt: str, options: dict[str, Any]) -> dict[str, Any]:
    known = {"eps", "rtol", "atol", "input_scale", "patch", "batch_size", "method", "chunk_size",
             "return_eigvals", "dtype"}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
    modes = _modes(mode)
    if wrt not in _WRTS:
        raise ValueError(f"wrt must be one of {_WRTS}, got {wrt!r}")
    eps = float(options.get("eps", SA_DNN_EPS))
    rtol = float(options.get("rtol", DEFAULT_RTOL))
    atol = float(options.get("atol", 0.0))
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive number, got {eps}")
    if not (0 <= rtol < 1) or atol < 0:
        raise ValueError(f"need 0 <= rtol < 1 and atol >= 0, got rtol={rtol}, atol={atol}")
    scale = options.get("input_scale")  # None: the default of each mode
    if isinstance(scale, torch.Tensor):
        if scale.is_complex() or not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError("input_scale must hold positive finite numbers")
        scale = scale.detach().to(torch.float64)
    elif scale is not None:
        scale = float(scale)
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"input_scale must be a positive number, got {scale}")
    if wrt in ("layers", "params") and "input_scale" in options:
        raise ValueError("input_scale applies to wrt='input' or 'pixels' only")
    patch = options.get("patch", 0)
    if wrt != "pixels" and "patch" in options:
        raise ValueError("patch=s applies to wrt='pixels' only")
    dtype = options.get("dtype", torch.float64)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype!r}")
    return dict(modes=modes, eps=eps, rtol=rtol, atol=atol, input_scale=scale, patch=patch,
                batch_size=options.get("batch_size"), method=options.get("method", "auto"),
                chunk_size=options.get("chunk_size"), dtype=dtype,
                return_eigvals=bool(options.get("return_eigvals", False)))


def fi(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | Sequence[int] | int | None = None,
    wrt: Wrt = "input",
    mode: Mode | Sequence[Mode] = "exact",
    **options: Any,
) -> Influence | dict[str, Influence]:
    """First-order influence ``FI = df^T G^+ df`` of ``f = log p(y | x, omega)``, per image.

    Parameters
    ----------
    model
        A classifier returning logits ``(N, C)`` (e.g. a :mod:`sensitivity_lib.zoo` model, which
        takes pixels in ``[0, 1]``), in eval mode.
    x
        Images ``(N, Ch, H, W)`` (or any ``(N, ...)`` for ``wrt="input"``).
    y
        Labels for ``f`` (one per image, or one int for all); ``None`` uses the predicted labels.
    wrt
        ``"input"`` (the whole image), ``"pixels"`` (one value per channel and pixel; with
        ``patch=s`` the (2s+1)^2 patch of one channel centred there, cut at the border),
        ``"layers"`` (each module owning trainable parameters) or ``"params"`` (all of them).
    mode
        ``"exact"`` (pseudo-inverse, relative rank tolerance; invariant to reparameterising
        omega) or ``"sa_dnn"`` (the authors' epsilon-regularised recipe, absolute cut-off,
        omega on the 0-255 scale for images; reproduces their numbers, is not invariant). A tuple
        such as ``("exact", "sa_dnn")`` computes each from the same Jacobian and returns a dict.
    **options
        ``eps`` (sa_dnn epsilon, default ``1e-3``), ``rtol`` (exact mode, relative tolerance on
        the eigenvalues of the C x C Gram, default :data:`DEFAULT_RTOL`), ``atol`` (exact mode,
        absolute floor on those eigenvalues, default 0; breaks invariance when > 0),
        ``input_scale`` (omega = input_scale * x, a number or a tensor broadcasting against one
        image for per-coordinate units; default 255 in sa_dnn mode for images, else 1),
        ``patch`` (int s >= 0 for ``wrt="pixels"``), ``batch_size``, ``method`` and
        ``chunk_size`` (see :func:`logit_grams`), ``dtype`` (the precision of the Jacobians,
        default ``torch.float64``; see :func:`logit_grams`), ``return_eigvals`` (store the
        eigenvalues of the C x C Gram in ``extra["eigvals"]``).

    Returns
    -------
    Influence or dict
        FI with ``rank``, ``p_y``, ``odds = (1 - p_y) / p_y``, ``labels``, ``probs`` and
        ``grad_norm`` (float64, on the model's device); ``{mode: Influence}`` for a tuple of modes.

    Raises
    ------
    ValueError
        Unknown ``wrt``/``mode``, bad shapes, labels out of range, non-finite input, options
        that do not apply, or batch norm without running statistics.
    NotImplementedError
        ``method="hooks"`` on a module type it does not support.
    """
    st = _settings(mode, wrt, options)
    _check_x(x, wrt)
    if wrt == "pixels":
        s = st["patch"]
        if not (isinstance(s, int) and s >= 0):
            raise ValueError(f"patch must be an int s >= 0 (patch side 2s+1), got {s!r}")
        res = {m: fi_maps(model, x, y, scales=(s,), mode=m, **_map_opts(st))[s] for m in st["modes"]}
        return res if not isinstance(mode, str) else res[mode]
    user_scale = st["input_scale"]
    z, grams = logit_grams(
        model, x, wrt, method=st["method"], batch_size=st["batch_size"], chunk_size=st["chunk_size"],
        input_scale=1.0 if user_scale is None else user_scale, dtype=st["dtype"],
    )  # fmt: skip
    p = torch.softmax(z.to(torch.float64), -1)
    C = p.shape[-1]
    if C < 2:
        raise ValueError("the model must have at least 2 classes")
    yl = _labels(y, x.shape[0], z)
    kw = dict(eps=st["eps"], rtol=st["rtol"], atol=st["atol"], return_eigvals=st["return_eigvals"])
    method = _method_name(wrt, model, st["method"])
    res = {}
    for m in st["modes"]:
        scale = _default_scale(m, wrt) if user_scale is None else user_scale
        f2 = 1.0 if user_scale is not None else scale**2  # grams were formed with scale 1

        def one(M: torch.Tensor, m=m, f2=f2):
            M = M / f2
            return fi_from_gram(M, p, yl, m, **kw), _grad_norm_from_gram(M, p, yl, m, st["eps"])

        extra = {"eps": st["eps"], "rtol": st["rtol"], "atol": st["atol"], "input_scale": scale}
        if isinstance(grams, Mapping):
            value, rank, gn, eig = {}, {}, {}, {}
            for n, M in grams.items():
                out, g = one(M)
                value[n], rank[n], gn[n] = out[0], out[1], g
                if st["return_eigvals"]:
                    eig[n] = out[2]
            if st["return_eigvals"]:
                extra["eigvals"] = eig
        else:
            out, gn = one(grams)
            value, rank = out[0], out[1]
            if st["return_eigvals"]:
                extra["eigvals"] = out[2]
        res[m] = _result(value, rank, p, yl, gn, wrt, m, method, extra)
    return res if not isinstance(mode, str) else res[mode]


def fi_target(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor | Sequence[int] | int | str = "runner_up",
    wrt: Wrt = "input",
    mode: Mode = "exact",
    **options: Any,
) -> Influence:
    """Target-class influence: FI of ``f = log p(c | x, omega)`` for a chosen class ``c``.

    The objective of the authors' follow-up (``shu-hai/mFI-PSO``, ``cifar_pixel_FI(...,
    target_class)``): how efficiently a perturbation of ``omega`` moves the prediction *toward*
    class ``c``, rather than away from the predicted one. It is :func:`fi` with ``y = c``; what is
    new is the choice of ``c``. By the same C x C argument (book, Part II ch. 4), for whole images
    it equals ``(1 - p_c) / p_c``, the odds against the target: a function of ``p_c``, which the
    confidence ``p_max`` does not determine when ``C > 2``. For pixels (``wrt="pixels"``) it is a
    map of where a change aims at ``c``.

    Parameters
    ----------
    model, x, wrt, mode, **options
        As in :func:`fi`.
    target
        ``"runner_up"`` (default: the class with the second-largest logit of each image, the
        nearest competitor), one class for all images, or one per image ``(N,)``.

    Returns
    -------
    Influence
        ``labels`` holds the targets; ``p_y`` is ``p_c`` and ``odds`` is ``(1 - p_c) / p_c``.

    Example
    -------
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    >>> x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    >>> r = fi_target(net, x)
    >>> bool((r.labels == net(x).topk(2).indices[:, 1]).all()), bool(torch.allclose(r.value, r.odds))
    (True, True)
    """
    if isinstance(target, str):
        if target != "runner_up":
            raise ValueError(f"target must be 'runner_up', a class or one class per image, got {target!r}")
        check_eval(model)
        _check_x(x, wrt)
        with torch.no_grad():
            z = torch.cat([model(x[sl]) for sl in _chunks(x.shape[0], 256)])
        if z.dim() != 2 or z.shape[1] < 2:
            raise ValueError(f"the model must return logits (N, C >= 2); got shape {tuple(z.shape)}")
        target = z.topk(2, dim=-1).indices[:, 1]
    if not isinstance(mode, str):
        raise ValueError(f"fi_target takes one mode ('exact' or 'sa_dnn'), got {mode!r}")
    return fi(model, x, target, wrt=wrt, mode=mode, **options)


def _map_opts(st: dict[str, Any]) -> dict[str, Any]:
    out = {k: st[k] for k in ("eps", "rtol", "atol", "batch_size", "return_eigvals", "dtype")}
    if st["input_scale"] is not None:
        out["input_scale"] = st["input_scale"]
    return out


def _result(value, rank, p, yl, gn, wrt, mode, method, extra) -> Influence:
    py = p.gather(-1, yl[:, None])[:, 0]
    odds = (p.sum(-1) - py).clamp_min(0) / py
    return Influence(
        value=value, rank=rank, p_y=py, odds=odds, labels=yl, probs=p, grad_norm=gn, wrt=wrt,
        mode=mode, kind="exact" if mode == "exact" else "estimate", method=method, extra=extra,
    )


def fi_maps(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | Sequence[int] | int | None = None,
    scales: Sequence[int] = (0, 1, 2, 3),
    mode: Mode = "exact",
    **options: Any,
) -> dict[int, Influence]:
    """Pixel and patch FI maps at several patch scales from one input Jacobian.

    The per-pixel C x C Grams are computed once and box-filtered into (2s+1)^2 patch Grams
    (Grams add over disjoint blocks; zero padding cuts the patches at the border as SA_DNN does),
    then one batched ``eigh`` per scale. Options as in :func:`fi` (``eps``, ``rtol``, ``atol``,
    ``input_scale``, ``batch_size``, ``dtype``, ``return_eigvals``); the default batch is as in
    :func:`logit_grams`. The Jacobian is computed in float64 by default: the maps then agree with
    the authors' per-image loop run in float64 (:func:`reference_loop`) to about 1e-10.

    Returns
    -------
    dict
        ``{s: Influence}`` with ``value`` and ``rank`` of shape ``(N, Ch, H, W)``; ``p_y`` and
        ``odds`` of shape ``(N,)``.
    """
    if not isinstance(mode, str):
        raise ValueError(f"fi_maps takes one mode ('exact' or 'sa_dnn'), got {mode!r}")
    st = _settings(mode, "pixels", options)
    if st["input_scale"] is None:
        st["input_scale"] = _default_scale(mode, "pixels")
    _check_x(x, "pixels")
    scales = tuple(scales)
    if not scales or not all(isinstance(s, int) and s >= 0 for s in scales):
        raise ValueError(f"scales must be ints s >= 0, got {scales!r}")
    check_eval(model)
    N = x.shape[0]
    need_gram = st["return_eigvals"] or any(s > 0 for s in scales)
    kw = dict(eps=st["eps"], rtol=st["rtol"], atol=st["atol"], return_eigvals=st["return_eigvals"])
    vals = {s: [] for s in scales}
    ranks = {s: [] for s in scales}
    gns = {s: [] for s in scales}
    eigs = {s: [] for s in scales}
    zs, ys = [], []
    bs = st["batch_size"] or _map_batch(_n_classes(model, x[:1]), x[0].numel(), need_gram)
    for sl in _chunks(N, bs):
        z, J = _input_jacobian(model, x[sl], st["dtype"])
        if J.shape[1] < 2:
            raise ValueError("the model must have at least 2 classes")
        zs.append(z)
        p = torch.softmax(z.to(torch.float64), -1)
        yl = _labels(None if y is None else _slice_y(y, N)[sl], z.shape[0], z)
        ys.append(yl)
        J = J.to(torch.float64) / _on(st["input_scale"], J)
        O = torch.einsum("bichw,bjchw->bchwij", J, J) if need_gram else None
        B, Ch, H, W = J.shape[0], J.shape[2], J.shape[3], J.shape[4]
        pe = p[:, None, None, None, :].expand(B, Ch, H, W, p.shape[-1])
        ye = yl[:, None, None, None].expand(B, Ch, H, W)
        for s in scales:
            if s == 0 and not st["return_eigvals"]:
                out = _fi_scalar(J.permute(0, 2, 3, 4, 1), pe, ye, mode, **kw)
                gn = _grad_norm_scalar(J.permute(0, 2, 3, 4, 1), pe, ye, mode, st["eps"])
            else:
                Os = _box_filter(O, s)
                out = fi_from_gram(Os, pe, ye, mode, **kw)
                gn = _grad_norm_from_gram(Os, pe, ye, mode, st["eps"])
            vals[s].append(out[0])
            ranks[s].append(out[1])
            gns[s].append(gn)
            if st["return_eigvals"]:
                eigs[s].append(out[2])
    z = torch.cat(zs)
    yl = torch.cat(ys)
    p = torch.softmax(z.to(torch.float64), -1)
    res = {}
    for s in scales:
        extra = {k: st[k] for k in ("eps", "rtol", "atol", "input_scale")}
        extra["patch"] = s
        if st["return_eigvals"]:
            extra["eigvals"] = torch.cat(eigs[s])
        res[s] = _result(torch.cat(vals[s]), torch.cat(ranks[s]), p, yl, torch.cat(gns[s]),
                         "pixels", mode, "batch-vjp", extra)
    return res


def _slice_y(y: Any, n: int) -> torch.Tensor:
    t = torch.as_tensor(y)
    return t.expand(n) if t.dim() == 0 else t


def fi_direction(
    model: nn.Module,
    x: torch.Tensor,
    v: torch.Tensor,
    y: torch.Tensor | Sequence[int] | int | None = None,
    *,
    batch_size: int = 256,
) -> torch.Tensor:
    """Directional influence ``FI(v) = (v^T df)^2 / (v^T G v)`` for input perturbations.

    Matrix-free: one forward-mode product ``u = J_z v`` per image, then
    ``FI(v) = ((e_y - p)^T u)^2 / (u^T H u)``. By definition ``FI = sup_v FI(v)``, so every value
    is at most ``fi(model, x, y).value`` (exact mode).

    Parameters
    ----------
    x
        Images ``(N, ...)``.
    v
        Directions with the shape of ``x`` (one per image), or ``(K, N, ...)`` for K directions
        per image.
    y
        Labels (default: predicted).
    batch_size
        Images per forward-mode pass (the K directions are stacked along the batch).

    Returns
    -------
    torch.Tensor
        ``(N,)`` or ``(K, N)`` float64; 0 where ``v^T G v = 0``.
    """
    check_eval(model)
    _check_x(x, "input")
    if v.shape[-x.dim():] != x.shape or v.dim() not in (x.dim(), x.dim() + 1):
        raise ValueError(f"v must have shape {tuple(x.shape)} or (K, *{tuple(x.shape)}), "
                         f"got {tuple(v.shape)}")
    vs = v if v.dim() == x.dim() + 1 else v[None]
    K, N = vs.shape[0], x.shape[0]
    model, x = _in_dtype(model, torch.float64), x.detach().to(torch.float64)  # see logit_grams
    with torch.no_grad():
        z = model(x)
    p = torch.softmax(z, -1)
    yl = _labels(y, N, z)
    c = F.one_hot(yl, p.shape[-1]).to(p) - p  # d log p_y / d z
    flat = vs.detach().to(x.dtype).reshape(K * N, *x.shape[1:])
    reps = max(1, batch_size // N)  # directions per jvp call
    us = []
    for s in range(0, K, reps):
        e = min(K, s + reps)
        xr = x.repeat(e - s, *([1] * (x.dim() - 1)))
        _, u = jvp(model, (xr,), (flat[s * N : e * N],))
        us.append(u.detach().to(torch.float64))
    u = torch.cat(us).reshape(K, N, -1)
    num = (c * u).sum(-1) ** 2
    den = (p * u * u).sum(-1) - (p * u).sum(-1) ** 2
    r = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    return r if v.dim() == x.dim() + 1 else r[0]


def svd_chain_reference(
    grad: np.ndarray, prob: np.ndarray, label: int, eps: float = SA_DNN_EPS
) -> float:
    """The authors' per-image FI algorithm, literally (numpy / scipy SVDs; for small checks).

    Port of the loop body of ``SA_DNN/aaaipapercodes/*_IF_setup*.py``:
    ``L0 = grad @ diag(1 / (sqrt(p) + eps))``, thin SVD ``L0 = B0 S A0``, rank
    ``r = #{S > eps}``, ``U0 = B0[:, :r] U_A`` and ``D0`` from the SVD of ``A0 A0^T``,
    ``nabla_f = f_grad @ U0 @ D0^{-1/2}`` with ``f_grad = grad[:, y] / (p_y + eps)``, and
    ``FI = nabla_f @ nabla_f^T`` (0 when ``r = 0``). Cost O(dim * C^2) per image.

    Parameters
    ----------
    grad
        ``(dim(omega), C)``: column k is ``d p_k / d omega`` (softmax outputs, not logits).
    prob
        ``(C,)`` softmax output.
    label
        The label ``y`` of ``f = log p_y``.
    eps
        The authors' epsilon.
    """
    import scipy.linalg

    grad = np.asarray(grad, dtype=np.float64)
    prob = np.asarray(prob, dtype=np.float64)
    L0 = grad @ np.diag((prob**0.5 + eps) ** -1)
    f_grad = (grad[:, [label]] / (prob[label] + eps)).T
    B0, D_L0, A0 = scipy.linalg.svd(L0, full_matrices=False)
    r = int(np.sum(D_L0 > eps))
    if r == 0:
        return 0.0
    B0 = B0[:, :r]
    A0 = np.diag(D_L0[:r]) @ A0[:r, :]
    U_A, D_0, _ = scipy.linalg.svd(A0 @ A0.T, full_matrices=True)
    U_0 = B0 @ U_A
    nabla_f = f_grad @ U_0 @ np.diag(D_0**-0.5)
    return float((nabla_f @ nabla_f.T)[0, 0])


def reference_loop(
    model: nn.Module,
    x: torch.Tensor,
    wrt: str = "input",
    eps: float = SA_DNN_EPS,
    *,
    dtype: torch.dtype | None = None,
) -> np.ndarray:
    """The authors' computation, ported literally: the baseline for checks and benchmarks.

    Per image and per class ``k``: one forward pass and one backward pass of the softmax output
    ``p_k`` (SA_DNN's ``K.gradients(model.output[0, k], ...)``), then
    :func:`svd_chain_reference` on the ``dim(omega) x C`` matrix: once for the image
    (``"input"``, omega on the 0-255 scale), once per channel-pixel (``"pixels"``, s = 0), or once
    per trainable module (``"layers"``). Labels are the predicted ones. Slow by design.
    ``dtype``: the precision of the forward and backward passes (default: the model's, as the
    authors' float32 Keras code; pass ``torch.float64`` for a reference that round-off does not
    swamp).

    Returns
    -------
    numpy.ndarray
        ``(N,)``, ``(N, Ch * H * W)`` or ``(N, n_modules)`` float64, comparable with
        ``fi(..., mode="sa_dnn", eps=eps)``.
    """
    if wrt not in ("input", "pixels", "layers"):
        raise ValueError(f"wrt must be 'input', 'pixels' or 'layers', got {wrt!r}")
    check_eval(model)
    _check_x(x, wrt)
    if dtype is not None:
        model, x = _in_dtype(model, dtype), x.to(dtype)
    mods = param_layers(model)
    params = [p for _, m, own in mods for p in (getattr(m, q) for q in own)]
    out = []
    for i in range(x.shape[0]):
        rows, prob = [], None
        for k in range(_n_classes(model, x[:1])):
            x1 = x[i : i + 1].detach().requires_grad_(wrt != "layers")
            with torch.enable_grad():
                p = torch.softmax(model(x1).to(torch.float64), -1)[0]
                prob = p.detach()
                if wrt == "layers":
                    gs = torch.autograd.grad(p[k], params)
                    rows.append([g.reshape(-1).to(torch.float64) for g in gs])
                else:
                    (g,) = torch.autograd.grad(p[k], x1)
                    rows.append(g.reshape(-1).to(torch.float64))
        prob_np = prob.cpu().numpy()
        y = int(prob_np.argmax())
        if wrt == "input":
            grad = torch.stack(rows, 1).cpu().numpy() / 255.0
            out.append(svd_chain_reference(grad, prob_np, y, eps))
        elif wrt == "pixels":
            grad = torch.stack(rows, 1).cpu().numpy() / 255.0
            out.append([svd_chain_reference(g[None], prob_np, y, eps) for g in grad])
        else:
            vals, j = [], 0
            for _, _, own in mods:
                n = len(own)
                cols = [torch.cat(r[j : j + n]) for r in rows]
                grad = torch.stack(cols, 1).cpu().numpy()
                vals.append(svd_chain_reference(grad, prob_np, y, eps))
                j += n
            out.append(vals)
    return np.asarray(out, dtype=np.float64)


@torch.no_grad()
def flip_top_pixels(
    model: nn.Module,
    x: torch.Tensor,
    score: torch.Tensor,
    ks: Sequence[int],
    y: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Invert the ``k`` highest-scoring channel-pixels of each image and measure the damage.

    The check of the "vulnerable areas" use of FI (book, Part II ch. 6): for each image, the ``k``
    channel-pixels with the largest ``score`` (ties broken at random, with ``generator``) are
    replaced by ``1 - x`` (the largest change that stays in ``[0, 1]``), and the drop of
    ``log p_y`` is recorded. Pass an FI map, a gradient map or random numbers as ``score``.

    Parameters
    ----------
    x
        Images ``(N, Ch, H, W)`` in ``[0, 1]``.
    score
        ``(N, Ch, H, W)``; larger means "flip first".
    ks
        Numbers of pixels to flip.
    y
        Labels whose log-probability is tracked (default: the predicted ones on ``x``).

    Returns
    -------
    dict
        ``"drop"``: ``(len(ks), N)`` drops ``log p_y(x) - log p_y(x')`` (float64);
        ``"changed"``: ``(len(ks), N)`` bool, the prediction changed.
    """
    check_eval(model)
    _check_x(x, "pixels")
    if score.shape != x.shape:
        raise ValueError(f"score must have the shape of x {tuple(x.shape)}, got {tuple(score.shape)}")
    N, D = x.shape[0], x[0].numel()
    ks = [int(k) for k in ks]
    if any(k < 0 or k > D for k in ks):
        raise ValueError(f"every k must lie in [0, {D}], got {ks}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    z0 = model(x).to(torch.float64)
    yl = z0.argmax(-1) if y is None else torch.as_tensor(y).long()
    lp0 = torch.log_softmax(z0, -1).gather(1, yl[:, None])[:, 0]
    pred0 = z0.argmax(-1)
    perm = torch.randperm(D, generator=g)  # random tie-break
    sc = score.reshape(N, D)[:, perm].to(torch.float64)
    order = perm[torch.sort(sc, dim=1, descending=True, stable=True).indices]
    drops, changed = [], []
    flat = x.reshape(N, D)
    for k in ks:
        xx = flat.clone()
        idx = order[:, :k]
        xx.scatter_(1, idx, 1 - flat.gather(1, idx))
        z = model(xx.reshape(x.shape)).to(torch.float64)
        drops.append(lp0 - torch.log_softmax(z, -1).gather(1, yl[:, None])[:, 0])
        changed.append(z.argmax(-1) != pred0)
    return {"drop": torch.stack(drops), "changed": torch.stack(changed)}


def _n_classes(model: nn.Module, x1: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(x1).shape[-1])


def _map_batch(n_classes: int, numel: int, need_gram: bool, budget: int = 2**28) -> int:
    """Images per pass of the input Jacobians (:func:`logit_grams`, :func:`fi_maps`): as many as fit
    ``budget`` bytes, at most 64.

    Per image the float64 input Jacobian takes ``8 C numel`` bytes, and the per-pixel Grams that
    patches need ``8 C^2 numel`` more: 64 MNIST digits at once, one ImageNet photo at a time.
    """
    per_image = 8 * n_classes * numel * (1 + (n_classes if need_gram else 0))
    return int(max(1, min(64, budget // per_image)))

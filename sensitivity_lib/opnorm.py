r"""Operator norms of linear layers: the spectral norm of a convolution at its real input size.

Papers
    H. Sedghi, V. Gupta, P. M. Long, *The Singular Values of Convolutional Layers*, ICLR 2019
    (per-frequency SVDs of a circular convolution); A. Virmaux, K. Scaman, *Lipschitz regularity of
    deep neural networks*, NeurIPS 2018 (power iteration through autograd); N. Maheshwari et al.,
    *An Estimator for the Sensitivity to Perturbations of Deep Neural Networks*, 2023 (per-layer
    norms of AlexNet and VGG-19).

Norm
    The 2-norm: ``||A||_2 = max ||A x||_2 / ||x||_2`` over inputs ``x`` of shape ``input_shape``,
    where ``A`` is the layer *without its bias* (``x -> layer(x) - layer(0)``). For a convolution
    this is the norm of the huge doubly block Toeplitz matrix acting on the whole feature map,
    **not** a norm of the kernel tensor.

Input space and shapes
    ``nn.Conv2d``: ``input_shape = (C, H, W)``, any stride, dilation, groups, ``padding`` given as
    ints or ``"same"``/``"valid"``, and ``padding_mode`` ``"zeros"`` or ``"circular"``
    (``"reflect"`` and ``"replicate"`` work with the matrix-free and dense methods only).
    ``nn.Linear``: ``input_shape = (..., in_features)`` (extra leading dimensions apply the same
    matrix to every row and do not change the norm).

Methods (``kind`` of the returned :class:`~sensitivity_lib.results.Estimate`)
    ``"power"``, ``"lanczos"`` -> ``"lower"``
        Matrix-free iterations on ``A^T A`` (``conv2d`` then its adjoint; float32, with the wide
        3x3 layers by :mod:`sensitivity_lib.winograd`); the value is
        ``||A v|| / ||v||`` for the final vector, evaluated in float64, so it is never above the
        norm.
    ``"fft"`` -> ``"upper"``, or ``"exact"`` for circular padding when the stride divides the grid
        Largest singular value of the circular convolution, by one small SVD per frequency
        (Sedghi et al.), with the polyphase rewrite for strides, the dilated kernel for dilation and
        a maximum over groups.
    ``"dense"`` -> ``"exact"``
        Builds the matrix (only below ``max_dense`` entries) and takes its largest singular value.
    ``"reshaped"`` -> ``"lower"`` (``"estimate"`` when the condition below fails)
        ``sigma_max`` of the kernel reshaped to ``C_out x (C_in / groups * kh * kw)``.
    ``"auto"``
        ``"dense"`` for tiny operators (``n_in * n_out <= 2**16``, or a linear layer with at most
        ``2**20`` weights), otherwise ``"lanczos"``.

Why ``"fft"`` is a certified upper bound for zero padding
    Take one axis, an input of length ``H`` with paddings ``p_0, p_1``, kernel size ``k``, dilation
    ``d``, stride ``s`` and ``H_out`` outputs. Output ``i`` reads the input offsets
    ``u = s i + d a - p_0`` (``a = 0 .. k-1``); offsets outside ``[0, H)`` read zeros. Put the
    input on a circle of ``M`` points (``E``: the input on ``[0, H)``, zeros elsewhere; an
    isometry, ``||E x|| = ||x||``), let ``C`` be the *circular* convolution on that circle
    evaluated at the positions ``s i`` (``i = 0 .. M/s - 1``; ``s`` divides ``M``), and let ``R``
    keep the outputs ``i < H_out`` (a restriction, ``||R|| <= 1``). If every offset that should
    read a zero lands, modulo ``M``, outside ``[0, H)``, then ``A = R C E`` exactly, so
    ``||A|| <= ||C||``. Offsets ``u < 0`` land on ``M + u >= M - p_0``: fine if ``M >= H + p_0``.
    Offsets ``u >= M`` land on ``u - M < last - M``, where
    ``last = s (H_out - 1) + d (k - 1) + 1 - p_0``: fine if ``M >= last``. The kept rows must be
    distinct: ``M >= s H_out``. (Input positions ``>= last`` are never read; they are zero columns
    and are dropped first.) :func:`operator_norm` takes the smallest such ``M``
    (``M = H + p_0 + p_1`` always qualifies), or the best of several with ``fft_grids``. The norm
    of the strided circular ``C`` is computed exactly: with the polyphase split
    ``x[s t + r] = X_r[t]`` and ``d a = s q_a + r_a``, ``(C x)[s j] = sum_a K_a X_{r_a}[j + q_a]``
    is a stride-1 circular convolution on an ``M/s`` grid with ``C_in s_h s_w`` input channels,
    whose singular values are those of the ``C_out x (C_in s_h s_w)`` matrices ``K_hat(xi)``, one
    per frequency ``xi`` (the unitary 2-D DFT block-diagonalises it; Sedghi et al., Theorem 6).
    Groups make the operator block diagonal, so the norm is the maximum over groups. For circular
    padding the layer *is* such a sampled circular convolution (``M = H``, shifted by ``-p_0``)
    when ``s`` divides ``H`` and the ``H / s`` outputs cover one coset: then the value is exact.
    Otherwise its rows are rows of the circular operator, each repeated at most ``m`` times (the
    padding can wrap around), and ``||A|| <= sqrt(m) ||C||``.

    How tight: the top right singular vector of the zero-padded operator is nearly a plane wave
    under an envelope that must vanish at the border, which costs a relative ``O((e / H)^2)`` with
    ``e = d (k - 1) + 1`` the dilated kernel extent. In random sweeps (``tests/test_opnorm.py``)
    the bound was within 5% of the dense value whenever ``min(H, s H_out) >= 5 e`` on both axes,
    and up to 2.7 times too large on tiny inputs (4x4 with a dilated 5x5 kernel).

Why ``"reshaped"`` is a lower bound, and when it is not
    Take an output position ``(i, j)`` whose receptive field
    ``{(s i + d a - p_0, s j + d b - p_0)}`` lies entirely inside the input (no padding tap). The
    positions are distinct (``d >= 1``), so an input ``x`` supported on that field gives
    ``y[:, i, j] = K_mat vec(x)``, with ``K_mat`` the reshaped kernel of the group, and
    ``||A x|| >= ||y[:, i, j]|| = ||K_mat vec(x)||``. Choosing ``vec(x)`` as the top right singular
    vector of ``K_mat`` gives ``||A|| >= sigma_max(K_mat)``; groups are block diagonal, so the
    maximum over groups is also below ``||A||``. For circular padding every field is inside (it
    wraps), but its positions are distinct only if the dilated kernel ``d (k - 1) + 1`` fits in the
    input. If no such position exists (an input smaller than the dilated kernel, or a
    stride/padding that leaves no interior field), some taps only ever meet zeros or alias onto
    each other, and ``sigma_max(K_mat)`` can exceed ``||A||``: e.g. a 3x3 kernel with padding 1 on
    a 1x1 input is the matrix ``K[:, :, 1, 1]``. The method then returns ``kind="estimate"``.

Example
-------
>>> import torch
>>> conv = torch.nn.Conv2d(2, 3, 3, padding=1, bias=False).double()
>>> lo = operator_norm(conv, (2, 6, 6), "lanczos", tol=1e-10)
>>> up = operator_norm(conv, (2, 6, 6), "fft")
>>> ex = operator_norm(conv, (2, 6, 6), "dense")
>>> lo.kind, up.kind, ex.kind
('lower', 'upper', 'exact')
>>> bool(lo.value <= ex.value * (1 + 1e-9) and ex.value <= up.value * (1 + 1e-12))
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sensitivity_lib.graph import as_pair
from sensitivity_lib.krylov import LinearOperator, linear_adjoint, top_singular
from sensitivity_lib.results import Estimate
from sensitivity_lib.winograd import choose_tile, winograd_conv3x3

__all__ = [
    "operator_norm",
    "conv_operator",
    "conv_padding",
    "symbol_start",
    "multiscale_start",
    "find_layers",
    "layer_norms",
    "LayerBounds",
    "METHODS",
    "DENSE_MAX_ENTRIES",
]

METHODS: tuple[str, ...] = ("auto", "power", "lanczos", "fft", "dense", "reshaped")
DENSE_MAX_ENTRIES: int = 2**22
_AUTO_DENSE_CONV = 2**16
_AUTO_DENSE_LINEAR = 2**20
_FFT_CHUNK_BYTES = 2**27


# --------------------------------------------------------------------------------------------
# the layer as a linear operator


def _check_layer(layer: nn.Module) -> torch.Tensor:
    if not isinstance(layer, nn.Conv2d | nn.Linear):
        raise NotImplementedError(
            f"operator_norm supports nn.Linear and nn.Conv2d, got {type(layer).__name__}; for "
            "another linear map use sensitivity_lib.krylov.top_singular(LinearOperator(...))"
        )
    w = layer.weight.detach()
    if not w.is_floating_point():
        raise TypeError(f"the layer's weight must be floating point, got {w.dtype}")
    if not torch.isfinite(w).all():
        raise ValueError(
            f"the {type(layer).__name__}'s weight has non-finite entries (NaN or inf); "
            "its operator norm is undefined"
        )
    return w


def conv_padding(
    kernel_size: Any, padding: Any = 0, dilation: Any = 1
) -> tuple[int, int, int, int]:
    """The ``(top, bottom, left, right)`` zero padding of a 2-D convolution, as PyTorch applies it.

    ``padding`` is an int, a pair, ``"valid"`` or ``"same"`` (torch puts the odd extra row or column
    at the end). Pass an ``nn.Conv2d`` as ``kernel_size`` to read all three from it.

    >>> conv_padding(3, "same"), conv_padding(4, "same"), conv_padding((3, 5), (1, 2))
    ((1, 1, 1, 1), (1, 2, 1, 2), (1, 1, 2, 2))
    """
    if isinstance(kernel_size, nn.Conv2d):
        kernel_size, padding, dilation = kernel_size.kernel_size, kernel_size.padding, kernel_size.dilation
    (kh, kw), (dh, dw) = as_pair(kernel_size), as_pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    ph, pw = as_pair(padding)
    return (ph, ph, pw, pw)


def _normalise_shape(input_shape: Sequence[int] | torch.Size) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError as err:
        raise TypeError(f"input_shape must be a sequence of ints, got {input_shape!r}") from err
    if any(s <= 0 for s in shape):
        raise ValueError(f"input_shape must have positive entries, got {shape}")
    return shape


def _fold(z: torch.Tensor, n: int, p0: int, dim: int, circular: bool) -> torch.Tensor:
    """Adjoint of padding along ``dim``: padded index ``i`` is input index ``i - p0`` (mod ``n``)."""
    if not circular:
        return z.narrow(dim, p0, n)
    idx = (torch.arange(z.shape[dim], device=z.device) - p0) % n
    shape = list(z.shape)
    shape[dim] = n
    return z.new_zeros(shape).index_add_(dim, idx, z)


def _padded_conv(w, stride, dil, groups, pads, mode, size, out_size):
    """Forward and explicit adjoint of ``conv2d(pad(x, pads, mode))`` for zero or circular pads."""
    pt, pb, pl, pr = pads
    H, W = size
    Ho, Wo = out_size
    oph = (H + pt + pb) - ((Ho - 1) * stride[0] + dil[0] * (w.shape[2] - 1) + 1)
    opw = (W + pl + pr) - ((Wo - 1) * stride[1] + dil[1] * (w.shape[3] - 1) + 1)
    pad_mode = "constant" if mode == "zeros" else mode
    circ = mode == "circular"

    def forward(x):
        return F.conv2d(F.pad(x, (pl, pr, pt, pb), mode=pad_mode), w, None, stride, 0, dil, groups)

    def adjoint(y):
        z = F.conv_transpose2d(y, w, None, stride, 0, (oph, opw), groups, dil)
        return _fold(_fold(z, H, pt, -2, circ), W, pl, -1, circ)

    return forward, adjoint


def conv_operator(
    layer: nn.Conv2d | nn.Linear,
    input_shape: Sequence[int],
    dtype: torch.dtype | None = None,
    *,
    winograd: bool = False,
) -> LinearOperator:
    """The layer without bias as a :class:`~sensitivity_lib.krylov.LinearOperator`, in ``dtype``.

    Parameters
    ----------
    layer
        ``nn.Conv2d`` or ``nn.Linear``.
    input_shape
        ``(C, H, W)`` for a convolution, ``(..., in_features)`` for a linear layer (no batch
        dimension).
    dtype
        Dtype of the operator (default: the weight's).
    winograd
        Run 3x3, stride-1, zero-padded, ungrouped convolutions (both directions) by Winograd's
        ``F(4x4, 3x3)`` (:mod:`sensitivity_lib.winograd`) where
        :func:`~sensitivity_lib.winograd.choose_tile` finds it faster. The same linear map, with
        a relative rounding error of about ``3e-6`` in float32 instead of ``2e-7``: for the
        iterations, not for final values.

    Returns
    -------
    LinearOperator
        A :class:`~sensitivity_lib.krylov.LinearOperator`: its ``matvec``/``rmatvec`` (the layer
        and its adjoint) take tensors with a leading batch dimension. For zero padding
        the adjoint is the convolution with the flipped kernel for stride 1, and otherwise
        ``conv_transpose2d`` with the ``output_padding`` that restores the input size; for other
        padding modes and asymmetric ``"same"`` padding it is obtained by ``torch.func.vjp``.
    """
    w = _check_layer(layer)
    shape = _normalise_shape(input_shape)
    w = w.to(dtype) if dtype is not None else w
    if isinstance(layer, nn.Linear):
        if shape[-1] != layer.in_features:
            raise ValueError(
                f"input_shape {shape} does not fit nn.Linear({layer.in_features}, "
                f"{layer.out_features}): its last entry must be in_features={layer.in_features}"
            )
        out_shape = shape[:-1] + (layer.out_features,)
        return LinearOperator(
            lambda x: F.linear(x, w), lambda y: y @ w, in_shape=shape, out_shape=out_shape,
            dtype=w.dtype, device=w.device,
        )  # fmt: skip
    if len(shape) != 3:
        raise ValueError(
            f"input_shape for nn.Conv2d must be (C, H, W) without the batch dimension, got {shape}"
        )
    C, H, W = shape
    if C != layer.in_channels:
        raise ValueError(
            f"input_shape {shape} has {C} channels but the layer expects in_channels="
            f"{layer.in_channels}"
        )
    pt, pb, pl, pr = conv_padding(layer)
    kh, kw = layer.kernel_size
    sh, sw = layer.stride
    dh, dw = layer.dilation
    Ho = (H + pt + pb - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + pl + pr - dw * (kw - 1) - 1) // sw + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(
            f"input {H}x{W} is too small for this layer (kernel {kh}x{kw}, dilation "
            f"{(dh, dw)}, padding {(pt, pb, pl, pr)}): the output would be empty"
        )
    mode = layer.padding_mode
    if mode != "zeros" and (max(pt, pb) > H or max(pl, pr) > W):
        raise ValueError(
            f"padding {(pt, pb, pl, pr)} with padding_mode={mode!r} is larger than the {H}x{W} "
            "input: torch cannot wrap or reflect it (give a larger input_shape)"
        )
    g = layer.groups
    stride, dil = (sh, sw), (dh, dw)
    if mode == "zeros" and pt == pb and pl == pr:
        tile = None
        if winograd and (kh, kw, sh, sw, dh, dw, g) == (3, 3, 1, 1, 1, 1, 1) and pt == pl <= 2:
            tile = choose_tile(C, layer.out_channels, Ho, Wo)

        if tile is not None:
            forward = winograd_conv3x3(w, pt, tile)
        else:

            def forward(x):
                return F.conv2d(x, w, None, stride, (pt, pl), dil, g)

        oph = H - ((Ho - 1) * sh - 2 * pt + dh * (kh - 1) + 1)
        opw = W - ((Wo - 1) * sw - 2 * pl + dw * (kw - 1) + 1)
        qt, ql = dh * (kh - 1) - pt, dw * (kw - 1) - pl
        if (sh, sw) == (1, 1) and qt >= 0 and ql >= 0:
            # stride 1: the adjoint is the convolution with the flipped kernel, channels swapped
            # within each group, padded by the kernel's reach minus the padding; on VGG-19's
            # layers CPU convolutions run it as fast as conv_transpose2d or up to 20% faster
            co, cig = w.shape[0], w.shape[1]
            wt = w.reshape(g, co // g, cig, kh, kw).transpose(1, 2).reshape(g * cig, co // g, kh, kw)
            wt = wt.flip(-2, -1).contiguous()
            if tile is not None:
                adjoint = winograd_conv3x3(wt, qt, tile)
            else:

                def adjoint(y):
                    return F.conv2d(y, wt, None, 1, (qt, ql), dil, g)

        else:

            def adjoint(y):
                return F.conv_transpose2d(y, w, None, stride, (pt, pl), (oph, opw), g, dil)

    elif mode in ("zeros", "circular"):
        forward, adjoint = _padded_conv(w, stride, dil, g, (pt, pb, pl, pr), mode, (H, W), (Ho, Wo))
    else:

        def forward(x):
            return F.conv2d(F.pad(x, (pl, pr, pt, pb), mode=mode), w, None, stride, 0, dil, g)

        example = torch.zeros((1, C, H, W), dtype=w.dtype)
        adjoint = linear_adjoint(forward, example)
    return LinearOperator(
        forward, adjoint, in_shape=shape, out_shape=(layer.out_channels, Ho, Wo), dtype=w.dtype,
        device=w.device,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# methods


def _dense(layer, op: LinearOperator, max_dense: int) -> Estimate:
    w = layer.weight.detach().double()
    if isinstance(layer, nn.Linear):
        if w.numel() > max_dense:
            raise ValueError(
                f"method='dense' on a {tuple(w.shape)} linear layer exceeds max_dense={max_dense} "
                "entries; use method='lanczos' (matrix-free) or raise max_dense"
            )
        s = torch.linalg.svdvals(w)[0]
        return Estimate(float(s), "exact", "dense", extra={"shape": tuple(w.shape)})
    n_in, n_out = op.n_in, op.n_out
    if n_in * n_out > max_dense:
        raise ValueError(
            f"method='dense' would build a {n_out} x {n_in} matrix ({n_in * n_out:.3g} entries), "
            f"above max_dense={max_dense}; use method='lanczos' or 'fft' for layers this size"
        )
    op64 = conv_operator(layer, op.in_shape, torch.float64)
    cols = []
    eye = torch.eye(n_in, dtype=torch.float64)
    for start in range(0, n_in, 1024):
        blk = eye[start : start + 1024].reshape(-1, *op.in_shape)
        cols.append(op64.matvec(blk).reshape(blk.shape[0], -1))
    mat = torch.cat(cols).T  # (n_out, n_in)
    s = torch.linalg.svdvals(mat)[0]
    return Estimate(float(s), "exact", "dense", extra={"shape": (n_out, n_in)})


def _group_blocks(w: torch.Tensor, groups: int) -> torch.Tensor:
    """(C_out, C_in/g, ...) -> (g, C_out/g, C_in/g, ...)."""
    return w.reshape(groups, w.shape[0] // groups, *w.shape[1:])


def _reshaped(layer, op: LinearOperator) -> Estimate:
    w = layer.weight.detach().double()
    if isinstance(layer, nn.Linear):
        return Estimate(float(torch.linalg.svdvals(w)[0]), "exact", "reshaped")
    g = layer.groups
    blocks = _group_blocks(w, g).flatten(2)  # (g, C_out/g, C_in/g*kh*kw)
    s = float(torch.linalg.svdvals(blocks)[:, 0].max())
    _, H, W = op.in_shape
    pt, pb, pl, pr = conv_padding(layer)
    ok = all(
        _has_interior_field(n, k, s_, d, p0, p1, layer.padding_mode)
        for n, k, s_, d, p0, p1 in (
            (H, layer.kernel_size[0], layer.stride[0], layer.dilation[0], pt, pb),
            (W, layer.kernel_size[1], layer.stride[1], layer.dilation[1], pl, pr),
        )
    )
    kind = "lower" if ok else "estimate"
    return Estimate(s, kind, "reshaped", extra={"interior_receptive_field": ok})


def _has_interior_field(n, k, s, d, p0, p1, mode) -> bool:
    """Is there an output position whose receptive field has distinct in-range input positions?"""
    extent = d * (k - 1) + 1
    if extent > n:
        return False
    if mode == "circular":
        return True
    if mode != "zeros":  # reflect/replicate: a field inside the input works as for zeros
        pass
    n_out = (n + p0 + p1 - extent) // s + 1
    return any(s * i - p0 >= 0 and s * i - p0 + extent <= n for i in range(n_out))


def _polyphase_kernel(w: torch.Tensor, stride, dilation, grid) -> torch.Tensor:
    """Kernel of the stride-1 circular convolution equivalent to the strided one on ``grid``.

    ``w``: (C_out, C_in', kh, kw) -> (C_out, C_in' * sh * sw, mh, mw) on the ``grid/stride`` torus,
    folded (aliased) modulo the torus when the polyphase kernel is larger than it.
    """
    co, ci, kh, kw = w.shape
    sh, sw = stride
    dh, dw = dilation
    mh, mw = grid[0] // sh, grid[1] // sw
    out = w.new_zeros(co, ci, sh, sw, mh, mw)
    for a in range(kh):
        qa, ra = divmod(dh * a, sh)
        for b in range(kw):
            qb, rb = divmod(dw * b, sw)
            out[:, :, ra, rb, qa % mh, qb % mw] += w[:, :, a, b]
    return out.reshape(co, ci * sh * sw, mh, mw)


def _circular_norm(
    w: torch.Tensor,
    groups: int,
    stride,
    dilation,
    grid,
    threshold: float | None = None,
    slack: float = 1e-3,
) -> tuple[float, tuple | None, int]:
    """2-norm of the circular convolution on ``grid`` sampled with ``stride``.

    Without ``threshold``: the exact value, the largest eigenvalue of ``K_hat^H K_hat`` (the
    smaller Gram matrix) at every frequency. With ``threshold = t``: a certified upper bound
    ``max(t, exact value)`` (up to a rounding margin) that avoids most eigenvalue problems: a
    Cholesky factorisation of ``t^2 I - K_hat^H K_hat`` succeeds exactly when every eigenvalue is
    below ``t^2`` (a positive definite matrix), and costs a fraction of an eigen-decomposition.
    Where it fails, the largest eigenvalue is bracketed between ``t^2`` and the trace (an upper
    bound) and the bracket is bisected in log scale with further Cholesky tests until it is
    narrower than ``(1 + slack)^2``, so the bound is within a factor ``1 + slack`` of
    ``max(t, exact value)``, with no eigenvalue problem at all. The margin follows the backward error
    of Cholesky (``R^H R = A + E``, ``||E|| <= gamma_{n+1} tr(A)``) and of the Gram product, both
    ``O(n^2 u)`` relative with ``u = 2^-53``.

    Returns the value, the maximising (frequency index, group) (``None`` if every frequency was
    certified below the threshold) and the number of frequencies solved by an eigenvalue problem
    (zero with a threshold).
    """
    kp = _polyphase_kernel(w.double(), stride, dilation, grid)
    mh, mw = kp.shape[-2:]
    khat = torch.fft.rfft2(kp)  # (C_out, C_in'', mh, mw//2+1), complex128
    co, ci = khat.shape[:2]
    khat = khat.reshape(groups, co // groups, ci, mh * (mw // 2 + 1)).permute(3, 0, 1, 2)
    nf = khat.shape[0]
    per = max(1, _FFT_CHUNK_BYTES // max(1, 16 * groups * (co // groups) * ci * 4))
    n_small = min(co // groups, ci)
    margin = 8.0 * n_small * (n_small + max(co // groups, ci) + 64) * 2.0**-53
    best, arg, n_exact = -1.0, None, 0
    mu = None if threshold is None else threshold**2
    ratio = (1 + slack) ** 2
    certified_top = 0.0
    certified = False
    for start in range(0, nf, per):
        blk = khat[start : start + per]
        if blk.shape[-2] <= blk.shape[-1]:
            gram = blk @ blk.conj().transpose(-1, -2)
        else:
            gram = blk.conj().transpose(-1, -2) @ blk
        gram = gram.reshape(-1, n_small, n_small)  # (f * g, n, n)
        if mu is not None:
            eye = torch.eye(n_small, dtype=gram.dtype)
            _, info = torch.linalg.cholesky_ex(mu * eye - gram)
            fail = torch.nonzero(info != 0).flatten()
            certified |= bool((info == 0).any())
        else:
            fail = torch.arange(gram.shape[0])
        if fail.numel() == 0:
            continue
        if mu is not None:  # bisect (in log scale) between mu and the trace, by Cholesky tests
            sub = gram[fail]
            lo = torch.full((len(fail),), mu, dtype=torch.float64)
            hi = torch.diagonal(sub, dim1=-2, dim2=-1).real.sum(-1).double() * (1 + margin)
            hi = torch.maximum(hi, lo * ratio)
            for _ in range(64):
                open_ = hi > lo * ratio
                if not bool(open_.any()):
                    break
                t = torch.sqrt(lo * hi)
                eye = torch.eye(n_small, dtype=sub.dtype)
                _, info = torch.linalg.cholesky_ex(t[open_, None, None].to(sub.dtype) * eye - sub[open_])
                ok = info == 0
                hi[open_] = torch.where(ok, t[open_], hi[open_])
                lo[open_] = torch.where(ok, lo[open_], t[open_])
            top, i = hi.max(0)
            if float(top) > certified_top:
                certified_top = float(top)
                f, gi = divmod(int(fail[int(i)]), groups)
                arg = (divmod(start + f, mw // 2 + 1), gi)
            continue
        n_exact += int(fail.numel())
        sub = gram[fail]
        if n_small == 1:
            top = sub[:, 0, 0].real.clamp_min(0)
        else:
            top = torch.linalg.eigvalsh(sub)[:, -1].clamp_min(0)
        v, i = top.max(0)
        if float(v) > best:
            best = float(v)
            f, gi = divmod(int(fail[int(i)]), groups)
            arg = (divmod(start + f, mw // 2 + 1), gi)
    if mu is None:
        return math.sqrt(best), arg, n_exact
    bound = max(best, mu if certified else 0.0, certified_top) * (1 + margin)
    return math.sqrt(bound), arg, n_exact


def _zero_pad_grid(n: int, k: int, s: int, d: int, p0: int, n_out: int) -> int:
    """Smallest periodic grid (a multiple of ``s``) on which the zero-padded axis embeds exactly.

    Output ``i < n_out`` reads the input offsets ``u = s i + d a - p0``, ``u in [-p0, last)`` with
    ``last = s (n_out - 1) + d (k - 1) + 1 - p0``; input positions ``>= last`` are never read (zero
    columns) and are dropped. On a circle of ``M`` points, with the kept input on ``[0, n_eff)``,
    every read of a padding position must land outside ``[0, n_eff)``: reads ``u < 0`` land on
    ``M + u >= M - p0``, so ``M >= n_eff + p0``; reads ``u >= M`` land on ``u - M < last - M``, so
    ``M >= last``. The ``n_out`` sampled rows ``s i`` must be distinct: ``M >= s n_out``.
    """
    last = s * (n_out - 1) + d * (k - 1) + 1 - p0
    n_eff = max(1, min(n, last))
    return _round_up(max(n_eff + p0, last, s * n_out), s)


def _fft(
    layer, op: LinearOperator, n_grids: int = 1, lower: float | None = None, slack: float = 1e-3
) -> Estimate:
    if isinstance(layer, nn.Linear):
        raise ValueError(
            "method='fft' is for convolutions; a linear layer's norm is exact with method='dense' "
            "(or 'lanczos' for very large matrices)"
        )
    mode = layer.padding_mode
    if mode not in ("zeros", "circular"):
        raise NotImplementedError(
            f"method='fft' needs padding_mode 'zeros' or 'circular', got {mode!r}; "
            "use method='lanczos' or 'dense'"
        )
    w = layer.weight.detach()
    _, H, W = op.in_shape
    _, Ho, Wo = op.out_shape
    pt, pb, pl, pr = conv_padding(layer)
    sh, sw = layer.stride
    if mode == "zeros":
        kh, kw = layer.kernel_size
        dh, dw = layer.dilation
        gh = _zero_pad_grid(H, kh, sh, dh, pt, Ho)
        gw = _zero_pad_grid(W, kw, sw, dw, pl, Wo)
        grids = [(gh + j * sh, gw + j * sw) for j in range(n_grids)]
        stride = (sh, sw)
        mult, exact = 1, False
    else:
        stride, mult, exact = [], 1, True
        for n, s, p, no in ((H, sh, pt, Ho), (W, sw, pl, Wo)):
            e = s if n % s == 0 else 1
            pos = [(s * i - p) % n for i in range(no)]
            counts = {}
            for u in pos:
                counts[u] = counts.get(u, 0) + 1
            m_axis = max(counts.values())
            mult *= m_axis
            exact &= e == s and m_axis == 1 and no * s == n
            stride.append(e)
        grids = [(H, W)]
        stride = tuple(stride)
    value, grid, arg, n_exact = math.inf, None, None, 0
    threshold = None if lower is None else lower * (1 + slack) / math.sqrt(mult)
    for gr in grids:
        v, a, ne = _circular_norm(
            w, layer.groups, stride, layer.dilation, gr, threshold, slack
        )
        if v < value:
            value, grid, arg, n_exact = v, gr, a, ne
    value *= math.sqrt(mult)
    kind = "exact" if exact and threshold is None else "upper"
    freq, group = arg if arg is not None else (None, None)
    return Estimate(
        value,
        kind,
        "fft",
        extra={
            "grid": grid,
            "polyphase_stride": stride,
            "row_multiplicity": mult,
            "frequency": freq,
            "group": group,
            "frequencies_solved": n_exact,
            "threshold": None if threshold is None else threshold * math.sqrt(mult),
        },
    )


def _round_up(n: int, s: int) -> int:
    return -(-n // s) * s


# --------------------------------------------------------------------------------------------
# warm start: the top of the kernel's symbol


def _unfolded_polyphase(w: torch.Tensor, groups: int, stride, dilation) -> torch.Tensor:
    """Polyphase kernel, not wrapped: (g, C_out/g, C_in/g * sh * sw, Qh, Qw)."""
    co, ci, kh, kw = w.shape
    sh, sw = stride
    dh, dw = dilation
    qh, qw = dh * (kh - 1) // sh + 1, dw * (kw - 1) // sw + 1
    out = w.new_zeros(co, ci, sh, sw, qh, qw)
    for a in range(kh):
        qa, ra = divmod(dh * a, sh)
        for b in range(kw):
            qb, rb = divmod(dw * b, sw)
            out[:, :, ra, rb, qa, qb] += w[:, :, a, b]
    return out.reshape(groups, co // groups, ci * sh * sw, qh, qw)


def _symbol(kc: torch.Tensor, qgrid: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """``K_hat(xi) = sum_q K'[q] exp(i xi . q)``: ``kc`` (g, Co', Ci', Q) complex, ``qgrid`` (Q, 2),
    ``xi`` (F, 2) -> (F, g, Co', Ci')."""
    phase = torch.exp(1j * (xi.to(qgrid.dtype) @ qgrid.T)).to(kc.dtype)  # (F, Q)
    g, co, ci, q = kc.shape
    khat = kc.reshape(-1, q) @ phase.T  # (g co ci, F)
    return khat.reshape(g, co, ci, -1).permute(3, 0, 1, 2).contiguous()


def _gram_apply(khat: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``K_hat^H K_hat v`` for batches (..., Co, Ci) and (..., Ci), without copying ``K_hat``."""
    u = khat @ v[..., None]  # (..., Co, 1)
    return (u.conj().transpose(-1, -2) @ khat).conj().resolve_conj()[..., 0, :]


def _top_right(khat: torch.Tensor, v: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Power iteration on ``K_hat^H K_hat`` for a batch (..., Co, Ci); returns (sigma, v)."""
    for _ in range(steps):
        v = _gram_apply(khat, v)
        v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(1e-30)
    sigma = torch.linalg.vector_norm(khat @ v[..., None], dim=(-2, -1))
    return sigma, v


def _torus_operator(w: torch.Tensor, groups: int, stride, dilation, grid):
    """Forward and adjoint of the strided circular convolution on a ``grid`` torus (spatial)."""
    ph, pw = dilation[0] * (w.shape[2] - 1), dilation[1] * (w.shape[3] - 1)
    out = (grid[0] // stride[0], grid[1] // stride[1])
    return _padded_conv(w, stride, dilation, groups, (0, ph, 0, pw), "circular", grid, out)


def symbol_start(
    layer: nn.Conv2d,
    input_shape: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    torus: int = 8,
    torus_iter: int = 20,
    rounds: int = 6,
    candidates: int = 3,
) -> torch.Tensor:
    """A starting vector for the iterative methods built from the top of the kernel's symbol.

    The top right singular vector of a stride-1 circular convolution is a plane wave
    ``v exp(i xi . t)``, with ``xi`` the frequency where ``sigma_max(K_hat(xi))`` is largest and
    ``v`` the top right singular vector of ``K_hat(xi)`` (Sedghi et al. 2019); with a stride the
    same holds for the polyphase components. For zero padding the top singular vector is close to
    that wave under an envelope that vanishes at the border. This function

    1. runs Lanczos on the layer made circular on a small ``torus x torus`` polyphase grid (a
       global search over those frequencies: the Krylov method spends its effort on the best ones,
       and the convolutions are cheap and compute-bound);
    2. reads the strongest frequencies and their ``v`` off the 2-D FFT of that vector's
       polyphase components (the run is short, so runners-up are kept as candidates);
    3. refines each ``xi`` over the continuous torus by ``rounds`` rounds of a 3x3 zoom, each
       point scored by warm-started power steps on ``K_hat(xi)``;
    4. returns the real part of the best wave(s) on the real input under a ``sin`` envelope (no
       envelope and ``xi`` snapped to the grid for circular padding), plus 1% random noise so
       that no direction is missing, normalised.

    Parameters
    ----------
    layer
        An ``nn.Conv2d`` with zero or circular padding.
    input_shape
        ``(C, H, W)``.
    generator
        For the torus start and the noise (default: a fixed seed).
    torus, torus_iter, rounds, candidates
        Polyphase torus size per axis (raised to ``2 Q + 2`` for a polyphase kernel of ``Q``
        taps), Lanczos steps on it, zoom rounds, and the number of spectral peaks refined (those
        within 0.2% of the best are all put in the start vector).

    Returns
    -------
    torch.Tensor
        A float64 tensor of shape ``input_shape`` with unit norm.
    """
    op = conv_operator(layer, input_shape)
    if not isinstance(layer, nn.Conv2d) or layer.padding_mode not in ("zeros", "circular"):
        raise ValueError("symbol_start needs an nn.Conv2d with padding_mode 'zeros' or 'circular'")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    g = layer.groups
    sh, sw = layer.stride
    w32 = layer.weight.detach().to(torch.float32)
    kp = _unfolded_polyphase(layer.weight.detach().double(), g, (sh, sw), layer.dilation)
    _, co, ci, qh, qw = kp.shape
    kc = kp.reshape(g, co, ci, qh * qw).to(torch.complex64)
    qgrid = torch.cartesian_prod(torch.arange(qh), torch.arange(qw)).to(torch.float64)
    C, H, W = op.in_shape
    # 1. Lanczos on the circular layer on a small torus
    mh, mw = max(torus, 2 * qh + 2), max(torus, 2 * qw + 2)
    grid = (mh * sh, mw * sw)
    fwd, adj = _torus_operator(w32, g, (sh, sw), layer.dilation, grid)
    out_shape = fwd(torch.zeros(1, C, *grid)).shape[1:]
    torus_op = LinearOperator(fwd, adj, in_shape=(C, *grid), out_shape=out_shape, dtype=torch.float32)
    x0 = torch.randn((1, C, *grid), generator=gen, dtype=torch.float64).float()
    # a short search over the torus' frequencies, not a result: it is not run to convergence
    r = top_singular(torus_op, x0, tol=1e-8, max_iter=torus_iter, side="input", warn=False)
    # 2. candidate frequencies (the strongest peaks, xi and -xi counted once) and channel vectors
    xt = r.right[0].double().reshape(g, C // g, mh, sh, mw, sw).permute(0, 1, 3, 5, 2, 4)
    spec = torch.fft.fft2(xt.reshape(g, ci, mh, mw))  # X_hat[t] with exp(-i xi t)
    energy = torch.view_as_real(spec).square().sum((1, -1))  # (g, mh, mw)
    spacing = torch.tensor([2 * math.pi / mh, 2 * math.pi / mw], dtype=torch.float64)
    cands: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for idx in torch.argsort(energy.reshape(-1), descending=True).tolist():
        gi, rem = divmod(idx, mh * mw)
        fh, fw = divmod(rem, mw)
        # fft2 uses exp(-i xi t): the wave v exp(+i xi t) has its coefficient at -xi
        xi = torch.tensor([-2 * math.pi * fh / mh, -2 * math.pi * fw / mw], dtype=torch.float64)
        if all(
            gj != gi
            or (
                bool((_torus_dist(xi, xj) > 1.5 * spacing).any())
                and bool((_torus_dist(-xi, xj) > 1.5 * spacing).any())
            )
            for gj, xj, _ in cands
        ):
            v = spec[gi, :, fh, fw].to(torch.complex64)
            cands.append((gi, xi, v / v.norm().clamp_min(1e-30)))
        if len(cands) == candidates:
            break
    # 3. continuous refinement of each candidate, then a closer look at the final points
    refined = [_refine(kc, qgrid, gi, xi_c, v, spacing / 2, rounds) for gi, xi_c, v in cands]
    best = max(c[0] for c in refined)
    keep = [c[1:] for c in refined if c[0] >= best * (1 - 2e-3)]
    # 4. the waves on the real input
    return _waves(layer, op, keep, gen)


_OFFSETS = torch.cartesian_prod(torch.tensor([-1.0, 0.0, 1.0]), torch.tensor([-1.0, 0.0, 1.0]))


def _refine(kc, qgrid, gi, xi_c, v, step, rounds):
    """3x3 zoom ascent of ``xi -> sigma_max(K_hat(xi))``; returns (sigma, group, xi, v)."""
    for _ in range(rounds):
        pts = xi_c[None] + _OFFSETS.double() * step[None]
        kh_ = _symbol(kc[gi : gi + 1], qgrid, pts)[:, 0]
        s_, vs = _top_right(kh_, v[None].expand(9, -1), 3)
        j = int(s_.argmax())
        xi_c, v = pts[j], vs[j]
        step = step / 2
    s_, v = _top_right(_symbol(kc[gi : gi + 1], qgrid, xi_c[None])[:, 0], v[None], 10)
    return float(s_[0]), gi, xi_c, v[0]


def _waves(layer, op: LinearOperator, keep, gen) -> torch.Tensor:
    """Sum of real plane waves ``Re(v exp(i xi . t))`` (polyphase coordinates) on the input,
    under a sine envelope (none for circular padding), plus 1% noise; unit norm."""
    C, H, W = op.in_shape
    g = layer.groups
    sh, sw = layer.stride
    pt, _, pl, _ = conv_padding(layer)
    hh, ww = torch.arange(H), torch.arange(W)
    th, rh = torch.div(hh + pt, sh, rounding_mode="floor"), (hh + pt) % sh
    tw, rw = torch.div(ww + pl, sw, rounding_mode="floor"), (ww + pl) % sw
    circular = layer.padding_mode == "circular"
    if circular:
        env = torch.ones(H, W, dtype=torch.float64)
    else:
        env = torch.outer(
            torch.sin(math.pi * (hh + 1) / (H + 1)).double(),
            torch.sin(math.pi * (ww + 1) / (W + 1)).double(),
        )
    cg = C // g
    x = torch.zeros(op.in_shape, dtype=torch.float64)
    for gi, xi_c, v in keep:
        if circular:  # snap to the frequencies of the periodic grid
            ph_, pw_ = max(1, H // sh), max(1, W // sw)
            xi_c = torch.stack(
                [
                    torch.round(xi_c[0] * ph_ / (2 * math.pi)) * 2 * math.pi / ph_,
                    torch.round(xi_c[1] * pw_ / (2 * math.pi)) * 2 * math.pi / pw_,
                ]
            )
        vv = v.to(torch.complex128).reshape(cg, sh, sw)
        phase = torch.exp(1j * (xi_c[0] * th.double()[:, None] + xi_c[1] * tw.double()[None, :]))
        wave = (vv[:, rh][:, :, rw] * phase[None]).real * env[None]
        if wave.norm() > 0:
            x[gi * cg : (gi + 1) * cg] += wave / wave.norm()
    noise = torch.randn(op.in_shape, generator=gen, dtype=torch.float64)
    if x.norm() > 0:
        x = x / x.norm() + 0.01 * noise / noise.norm()
    else:
        x = noise
    return x / x.norm()


def multiscale_start(
    layer: nn.Conv2d,
    input_shape: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    factor: int = 4,
    min_size: int = 56,
    tol: float = 1e-3,
    rounds: int = 5,
) -> torch.Tensor:
    """A starting vector from the same layer solved on a smaller input.

    The zero-padded layer on an ``h x w`` input is a compression of the same layer on a larger
    input (place the small input in the middle of the large one), so its norm is a lower bound
    that converges as ``O(1 / h^2)``; and its top singular vector is a plane wave under an
    envelope, whose frequency selects the right peak of the kernel's symbol among many near-equal
    ones (a random kernel has dozens). The envelope costs ``O((pi / h)^2)`` relative, different for
    different peaks, so a too-small ``h`` can select a peak that loses at the real size: on random
    VGG-19 kernels, reduced sizes of 14 and 28 picked a peak up to 0.7% too low, 56 did not (hence
    ``min_size=56``). This function

    1. solves the layer on ``max(min_size, H // factor) x max(min_size, W // factor)`` with
       :func:`operator_norm` (``"lanczos"``, recursively started the same way);
    2. reads the wave's frequency and channel vector off the zero-padded 2-D FFT of the
       polyphase components of that solution;
    3. sharpens the frequency by a 3x3 zoom ascent on ``sigma_max(K_hat(xi))`` (``rounds``);
    4. returns that wave on the full input under a sine envelope, plus 1% noise, normalised.

    Parameters
    ----------
    layer
        An ``nn.Conv2d`` with zero or circular padding.
    input_shape
        ``(C, H, W)``; the reduced size must be at most half of it on each axis.
    generator
        Random generator of the small problem's start and of the noise (default: fixed seed).
    factor, min_size, tol, rounds
        Reduction factor, smallest reduced size, tolerance of the small solve, zoom rounds.

    Returns
    -------
    torch.Tensor
        A float64 tensor of shape ``input_shape`` with unit norm.
    """
    op = conv_operator(layer, input_shape)
    if not isinstance(layer, nn.Conv2d) or layer.padding_mode not in ("zeros", "circular"):
        raise ValueError(
            "multiscale_start needs an nn.Conv2d with padding_mode 'zeros' or 'circular'"
        )
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    C, H, W = op.in_shape
    sh, sw = layer.stride
    hs = _round_up(max(min_size, H // factor), sh)
    ws = _round_up(max(min_size, W // factor), sw)
    if 2 * hs > H or 2 * ws > W:
        raise ValueError(
            f"input {H}x{W} is too small for a multiscale start (reduced size {hs}x{ws} must be at "
            "most half of it); use init='random' or 'symbol'"
        )
    sub = operator_norm(layer, (C, hs, ws), "lanczos", tol=tol, generator=gen)
    u = sub.extra["vector"].double()
    pt, _, pl, _ = conv_padding(layer)
    mh, mw = -(-(hs + pt) // sh), -(-(ws + pl) // sw)
    placed = u.new_zeros(C, mh * sh, mw * sw)
    placed[:, pt : pt + hs, pl : pl + ws] = u
    g = layer.groups
    poly = placed.reshape(g, C // g, mh, sh, mw, sw).permute(0, 1, 3, 5, 2, 4)
    poly = poly.reshape(g, (C // g) * sh * sw, mh, mw)
    fh_n, fw_n = 4 * mh, 4 * mw
    spec = torch.fft.fft2(poly, s=(fh_n, fw_n))  # exp(-i xi t)
    energy = torch.view_as_real(spec).square().sum((1, -1))
    gi, fh, fw = (int(i) for i in torch.unravel_index(energy.argmax(), energy.shape))
    xi = torch.tensor([-2 * math.pi * fh / fh_n, -2 * math.pi * fw / fw_n], dtype=torch.float64)
    v = spec[gi, :, fh, fw]
    v = (v / v.norm().clamp_min(1e-30)).to(torch.complex64)
    kp = _unfolded_polyphase(layer.weight.detach().double(), g, (sh, sw), layer.dilation)
    _, co, ci, qh, qw = kp.shape
    kc = kp.reshape(g, co, ci, qh * qw).to(torch.complex64)
    qgrid = torch.cartesian_prod(torch.arange(qh), torch.arange(qw)).to(torch.float64)
    step = torch.tensor([math.pi / mh, math.pi / mw], dtype=torch.float64) / 2
    _, gi, xi, v = _refine(kc, qgrid, gi, xi, v, step, rounds)
    return _waves(layer, op, [(gi, xi, v)], gen)


def _torus_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a - b).abs() % (2 * math.pi)
    return torch.minimum(d, 2 * math.pi - d)


def _default_init(layer, op: LinearOperator) -> str:
    if not isinstance(layer, nn.Conv2d) or layer.padding_mode != "zeros":
        return "random"
    _, H, W = op.in_shape
    sh, sw = layer.stride
    ok = 2 * _round_up(max(56, H // 4), sh) <= H and 2 * _round_up(max(56, W // 4), sw) <= W
    return "multiscale" if ok else "random"


def _iterative(
    layer, op: LinearOperator, method, tol, max_iter, generator, dtype, init, upper
) -> Estimate:
    w = layer.weight.detach()
    it_dtype = dtype or (torch.float64 if w.dtype == torch.float64 else torch.float32)
    op_it = conv_operator(layer, op.in_shape, it_dtype, winograd=it_dtype == torch.float32)
    op64 = op_it
    if it_dtype != torch.float64:
        op64 = conv_operator(layer, op.in_shape, torch.float64)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    if init is None:
        init = _default_init(layer, op)
    if isinstance(init, str):
        if init == "symbol":
            x0 = symbol_start(layer, op.in_shape, generator=gen)[None].to(it_dtype)
        elif init == "multiscale":
            x0 = multiscale_start(layer, op.in_shape, generator=gen)[None].to(it_dtype)
        elif init == "random":
            x0 = torch.randn((1, *op.in_shape), generator=gen, dtype=torch.float64)
            x0 = x0.to(it_dtype)
        else:
            raise ValueError(
                f"init must be None, 'random', 'symbol', 'multiscale' or a tensor, got {init!r}"
            )
        start = init
    else:
        x0 = torch.as_tensor(init).to(it_dtype)
        if x0.numel() != op.n_in:
            raise ValueError(f"init must have the input shape {op.in_shape}, got {tuple(x0.shape)}")
        x0 = x0.reshape(1, *op.in_shape)
        if not torch.isfinite(x0).all() or not x0.abs().sum() > 0:
            raise ValueError("init must be a finite, non-zero tensor of the input shape")
        start = "given"
    # the final value is ||A v|| / ||v|| in float64; the residual uses the iteration's adjoint
    check = None
    if op64 is not op_it:
        check = LinearOperator(op64.matvec, None, in_shape=op.in_shape, out_shape=op.out_shape,
                               dtype=torch.float64)  # fmt: skip
    r = top_singular(
        op_it, x0, method=method, tol=tol, max_iter=max_iter, upper=upper, side="input", check=check
    )
    return Estimate(
        float(r.value[0]), "lower", method, iterations=int(r.iterations[0]), residual=float(r.residual[0]),
        converged=bool(r.converged[0]),
        extra={
            "error": float(r.error[0]), "vector": r.right[0], "history": r.history[:, 0].tolist(),
            "dtype": str(it_dtype).replace("torch.", ""), "upper_used": upper, "init": start,
        },
    )  # fmt: skip


def operator_norm(
    layer: nn.Conv2d | nn.Linear,
    input_shape: Sequence[int],
    method: str = "auto",
    *,
    tol: float = 1e-3,
    max_iter: int = 500,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    init: torch.Tensor | str | None = None,
    upper: float | None = None,
    lower: float | None = None,
    max_dense: int = DENSE_MAX_ENTRIES,
    fft_grids: int = 1,
) -> Estimate:
    """Spectral norm of a bias-free ``nn.Conv2d`` or ``nn.Linear`` on inputs of ``input_shape``.

    Parameters
    ----------
    layer
        The layer; its bias is ignored (the norm of ``x -> layer(x) - layer(0)``).
    input_shape
        ``(C, H, W)`` for a convolution (its real feature-map size), ``(..., in_features)`` for a
        linear layer; no batch dimension.
    method
        One of ``"auto"``, ``"power"``, ``"lanczos"``, ``"fft"``, ``"dense"``, ``"reshaped"`` (see
        the module docstring for what each returns and why).
    tol
        Relative accuracy of the norm requested from the iterative methods. The stopping rule
        (:func:`sensitivity_lib.krylov.top_singular`) is a heuristic unless ``upper`` is given; the
        value itself is always a certified lower bound.
    max_iter
        Maximum number of ``A^T A`` products of the iterative methods.
    generator
        Random generator for the starting vector (default: a fixed seed, so calls are reproducible).
    dtype
        Dtype of the iterations (default float32, or float64 for a float64 layer). The returned
        value and residual are always evaluated in float64.
    init
        Start of the iterative methods: ``"random"`` (Gaussian, from ``generator``),
        ``"multiscale"`` (:func:`multiscale_start`: the same layer solved on a 4 times smaller
        input, its plane wave carried over to the real size), ``"symbol"`` (:func:`symbol_start`:
        a search of the kernel's symbol on a small torus; cheaper, less reliable on random
        kernels), or a tensor of shape ``input_shape`` (e.g. ``extra["vector"]`` of an earlier
        call). Default: ``"multiscale"`` for convolutions with zero padding on inputs of at least
        112x112, else ``"random"``. A start on the wrong peak of the symbol can make the
        iteration settle on it (the value stays a valid lower bound, but may miss ``tol``).
    upper
        A certified upper bound on the norm (e.g. from ``method="fft"``): the iterative methods then
        also stop as soon as ``(upper^2 - sigma^2) / sigma^2 <= tol``.
    lower
        A known lower bound on the norm (e.g. from ``method="lanczos"``) for ``method="fft"``:
        instead of an eigenvalue problem per frequency it certifies, by one Cholesky factorisation
        per frequency, that every frequency is below ``lower * (1 + tol)``, and brackets those
        where that fails by bisection with further Cholesky tests. The result is a
        certified upper bound no larger than ``(1 + tol) max(circular norm, lower * (1 + tol))``
        (up to a ~1e-10 rounding margin), never ``"exact"``. Much faster for wide layers.
    fft_grids
        ``method="fft"`` with zero padding: number of periodic grids tried (the smallest valid one
        and the next ``fft_grids - 1`` multiples of the stride); each gives a certified bound and
        the smallest is returned.

    Returns
    -------
    Estimate
        ``value`` (float), ``kind`` (``"exact"``, ``"upper"``, ``"lower"`` or ``"estimate"``),
        ``method``, ``iterations`` and ``residual`` (``||A^T A v - sigma^2 v|| / sigma^2``) for the
        iterative methods; ``extra`` holds the input/output shapes and method details (the final
        vector for the iterative methods, the grid and maximising frequency for ``"fft"``).

    Raises
    ------
    NotImplementedError
        For a layer that is neither ``nn.Conv2d`` nor ``nn.Linear`` (or ``"fft"`` with reflect or
        replicate padding).
    ValueError
        For an unknown method, an ``input_shape`` that does not fit the layer, non-finite weights,
        a dense matrix above ``max_dense`` entries, or ``"fft"`` on a linear layer.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not (tol > 0) or max_iter < 1:
        raise ValueError(f"need tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
    op = conv_operator(layer, input_shape)
    if method == "auto":
        if isinstance(layer, nn.Linear):
            method = "dense" if layer.weight.numel() <= _AUTO_DENSE_LINEAR else "lanczos"
        else:
            method = "dense" if op.n_in * op.n_out <= _AUTO_DENSE_CONV else "lanczos"
    if method == "dense":
        est = _dense(layer, op, max_dense)
    elif method == "reshaped":
        est = _reshaped(layer, op)
    elif method == "fft":
        est = _fft(layer, op, fft_grids, lower, tol)
    else:
        est = _iterative(layer, op, method, tol, max_iter, generator, dtype, init, upper)
    extra = {"input_shape": op.in_shape, "output_shape": op.out_shape, **est.extra}
    return Estimate(
        est.value, est.kind, est.method, norm="2", iterations=est.iterations, residual=est.residual,
        converged=est.converged, extra=extra,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# every layer of a network


def find_layers(
    model: nn.Module, input_shape: Sequence[int], types: tuple[type[nn.Module], ...] = (nn.Conv2d,)
) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """The layers of ``model`` of the given ``types`` with the input shapes they see.

    Runs one forward pass on zeros of shape ``(1, *input_shape)`` with forward hooks.

    Parameters
    ----------
    model
        Any module (e.g. a :class:`sensitivity_lib.zoo.Normalized` model, which takes [0, 1]
        pixels; the shapes are those its layers see).
    input_shape
        ``(C, H, W)`` of one input.
    types
        The module types to list, e.g. ``(nn.Conv2d, nn.Linear)``.

    Returns
    -------
    list of (name, layer, input_shape)
        In execution order; ``name`` is the module's qualified name.
    """
    kinds = tuple(types)
    found: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, kinds):

            def hook(m, inp, out, name=name):
                found.append((name, m, tuple(inp[0].shape[1:])))

            hooks.append(mod.register_forward_hook(hook))
    try:
        param = next(model.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), dtype=dtype))
    finally:
        for h in hooks:
            h.remove()
    return found


@dataclass(frozen=True)
class LayerBounds:
    """The operator norm of one layer of a network from both sides, and what each side cost.

    Attributes
    ----------
    name, input_shape
        The module name and the input shape the layer sees.
    lower
        :func:`operator_norm` with ``"lanczos"`` (kind ``"lower"``).
    upper
        :func:`operator_norm` with ``"fft"`` and ``lower`` (kind ``"upper"``), or ``None``.
    seconds_lower, seconds_upper
        Wall-clock seconds of each.
    """

    name: str
    input_shape: tuple[int, ...]
    lower: Estimate
    upper: Estimate | None
    seconds_lower: float
    seconds_upper: float

    @property
    def gap(self) -> float:
        """``upper / lower - 1`` (the certified relative uncertainty), ``nan`` without upper."""
        return math.nan if self.upper is None else self.upper.value / self.lower.value - 1


def layer_norms(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    tol: float = 1e-3,
    certify: bool = True,
    types: tuple[type[nn.Module], ...] = (nn.Conv2d,),
    generator: torch.Generator | None = None,
) -> list[LayerBounds]:
    """Operator norm of every convolution of ``model`` at its real input size, from both sides.

    For each layer from :func:`find_layers`: a lower estimate by :func:`operator_norm` with
    ``method="lanczos"`` and ``tol``, then (``certify=True``) a certified upper bound by
    ``method="fft"`` with that lower value (zero or circular padding only; other layers get
    ``upper=None``). Linear layers (``nn.Linear`` in ``types``) get ``"dense"``-exact values when
    small, else Lanczos, and no separate upper bound.

    Returns
    -------
    list of LayerBounds
    """
    import time

    out = []
    for name, layer, shape in find_layers(model, input_shape, types):
        t0 = time.perf_counter()
        if isinstance(layer, nn.Linear):
            lower = operator_norm(layer, shape, "auto", tol=tol, generator=generator)
        else:
            lower = operator_norm(layer, shape, "lanczos", tol=tol, generator=generator)
        t1 = time.perf_counter()
        upper = None
        fft_ok = isinstance(layer, nn.Conv2d) and layer.padding_mode in ("zeros", "circular")
        if certify and fft_ok:
            upper = operator_norm(layer, shape, "fft", lower=lower.value, tol=tol)
        t2 = time.perf_counter()
        out.append(LayerBounds(name, tuple(shape), lower, upper, t1 - t0, t2 - t1))
    return out

"""How tight is the estimator at the decision? Every per-image measurement of the book's chapter of that
name, in one function that can run on shards of the images.

Paper: Maheshwari et al. (arXiv:2307.12679) explore "the tightness of the estimator ... via random
perturbations and adversarial attacks" (quoted from the abstract) on AlexNet and VGG-19; the
measurements below are our reconstruction of that protocol, asked at the *decision*: how far is the
nearest input with another prediction, what do the condition numbers predict about it, and what do
noise and the standard attacks find.

Input space and norms
    The model's input ([0, 1] pixels for the book's models, normalisation inside). Every distance is
    the Euclidean norm of a change of one image, in those units; FGSM and PGD are run in their own
    norm (``"inf"`` or 2) and their *budgets* are kept too (``*_eps``), but their sizes are 2-norms.

What :func:`measure` returns (one row per image, float64 unless said)
    ``pred`` (int64), ``x_norm``, ``gap`` (top-2 logit gap), ``certified`` and ``first_order``
    (:mod:`sensitivity_lib.condition.radius`); for every noise kind ``k`` (Gaussian, uniform,
    Rademacher directions scaled to ``2^-s ||x||`` and clipped to [0, 1]): ``noise_<k>_rate``
    ``(N, S)`` (fraction of the draws that flip, per size), ``noise_<k>_rel`` (the smallest relative
    size on the grid at which a draw flips, ``inf`` if none) and ``noise_<k>_abs`` (the 2-norm of that
    clipped change); ``rounding_rate`` ``(N, S)`` (rounding to ``s >= 1`` significand bits flips) and
    ``rounding_bits`` (:func:`~sensitivity_lib.condition.perturbation.rounding_flip_bits`); for every
    attack ``a`` the minimal 2-norm ``a`` (``inf``: none found), ``a_rho`` (over ``||x||``) and, for
    FGSM / PGD, ``a_eps``; with ``condition=True`` ``e0_log2``, ``e1_log2``, ``t_e0``, ``t_e1`` (the
    bit-widths of :func:`~sensitivity_lib.precision.margin.min_input_bits`); with ``clever``
    the CLEVER score ``clever``.

Sharding
    :func:`measure_sharded` runs :func:`measure` chunk by chunk through :mod:`sensitivity_lib.shards`,
    seeding each chunk from ``(seed, chunk number)``: one process or several (``torchrun``) give the
    same rows.

Example
-------
>>> from sensitivity_lib import zoo, data
>>> m, x = zoo.lenet5(), data.mnist_test20().images[:2]
>>> r = measure(m, x, noise_sizes=(1, 2), noise_draws=1, attacks={"deepfool": {}}, progress=False)
>>> bool((r["certified"] <= r["deepfool"]).all()), tuple(r["noise_gaussian_rate"].shape)
(True, (2, 2))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sensitivity_lib import shards
from sensitivity_lib.attacks import minimal_perturbation, predict
from sensitivity_lib.condition.lipschitz import global_condition, lipschitz_bound
from sensitivity_lib.condition.local import local_condition
from sensitivity_lib.condition.peers import clever_l2
from sensitivity_lib.condition.perturbation import NOISE_KINDS, random_directions, rounding_flip_bits
from sensitivity_lib.condition.radius import certified_radius, first_order_radius
from sensitivity_lib.precision.formats import round_float
from sensitivity_lib.precision.margin import min_input_bits
from sensitivity_lib.results import Estimate
from sensitivity_lib.search import flip_search
from sensitivity_lib.validation import check_model_input

__all__ = ["ATTACK_KEYS", "NETWORKS", "book_network", "measure", "measure_sharded", "parse_attack", "plan"]

#: The attack names :func:`measure` understands: method, and for FGSM / PGD the norm after ``_``.
ATTACK_KEYS: tuple[str, ...] = ("deepfool", "cw", "ddn", "fgsm_inf", "fgsm_2", "pgd_inf", "pgd_2")


def parse_attack(key: str) -> tuple[str, Any]:
    """``"pgd_inf" -> ("pgd", "inf")``, ``"deepfool" -> ("deepfool", 2)``."""
    if key not in ATTACK_KEYS:
        raise ValueError(f"unknown attack {key!r}; use one of {ATTACK_KEYS}")
    method, _, norm = key.partition("_")
    return method, ("inf" if norm == "inf" else 2)


def _noise(model, x, pred, sizes, draws, kind, batch_size, generator):  # noqa: ANN001
    """Flip indicators ``(N, S, D)`` of random directions of kind ``kind`` at relative sizes ``2^-s``,
    and the 2-norms of the clipped changes."""
    N, S = len(x), len(sizes)
    xnorm = x.flatten(1).norm(dim=1).view(-1, *([1] * (x.ndim - 1)))
    flips = torch.zeros(N, S, draws, dtype=torch.bool)
    change = torch.zeros(N, S, draws, dtype=torch.float64)
    for d in range(draws):
        u = random_directions(tuple(x.shape), generator, kind=kind).to(x.device, x.dtype)
        for j, s in enumerate(sizes):
            z = (x + 2.0**-s * xnorm * u).clamp(0.0, 1.0)
            flips[:, j, d] = predict(model, z, batch_size).cpu() != pred
            change[:, j, d] = (z - x).flatten(1).to(torch.float64).norm(dim=1).cpu()
    return flips, change


def _first_flip(flips: torch.Tensor, change: torch.Tensor, sizes: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Per image, the smallest relative size ``2^-s`` on the grid at which some draw flips
    (:func:`~sensitivity_lib.search.flip_search`, a scan over increasing sizes), and the 2-norm of the
    smallest flipping change at that size."""
    order = sorted(range(len(sizes)), key=lambda j: -sizes[j])  # increasing 2^-s
    grid = torch.tensor([2.0 ** -sizes[j] for j in order], dtype=torch.float64)
    any_flip = flips.any(-1)

    def changed(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        j = order[int(torch.searchsorted(grid, t[:1]).item())]
        return any_flip[idx, j]

    r = flip_search(changed, flips.shape[0], mode="scan", grid=grid)
    absolute = torch.full((flips.shape[0],), math.inf, dtype=torch.float64)
    for i in torch.nonzero(r.found).flatten().tolist():
        j = order[int(torch.searchsorted(grid, r.value[i : i + 1]).item())]
        absolute[i] = change[i, j][flips[i, j]].min()
    return r.value, absolute


def measure(
    model: nn.Module,
    x: torch.Tensor,
    *,
    lipschitz: Estimate | None = None,
    noise_sizes: Sequence[int] = tuple(range(1, 13)),
    noise_draws: int = 2,
    noise_kinds: Sequence[str] = NOISE_KINDS,
    rounding: bool = True,
    attacks: dict[str, dict[str, Any]] | None = None,
    condition: bool = False,
    e0_tol: float = 1e-3,
    clever: dict[str, Any] | None = None,
    top: int = 10,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Every per-image measurement of the chapter for one network (see the module docstring).

    Parameters
    ----------
    model
        A classifier in eval mode on [0, 1] inputs (normalisation inside), traceable by torch.fx.
    x
        Batch ``(N, C, H, W)`` in [0, 1].
    lipschitz
        A precomputed ``lipschitz_bound(model, x.shape[1:])`` (computed here otherwise).
    noise_sizes
        The exponents ``s`` (integers): random changes of relative size ``2^-s``; roundings to ``s``
        significand bits for ``s >= 1`` (``rounding_rate`` is NaN for the others).
    noise_draws, noise_kinds
        Random directions per image, size and kind; the kinds (see ``NOISE_KINDS``).
    rounding
        Also round to ``s`` bits, and find the empirical bit-width (24 bits at most).
    attacks
        ``{name: options}`` for :func:`~sensitivity_lib.attacks.minimal_perturbation`, names
        from ``ATTACK_KEYS`` (default: DeepFool only).
    condition
        Also E0 (Lanczos, relative tolerance ``e0_tol``), E1 and their bit-widths.
    clever
        Keyword arguments of :func:`~sensitivity_lib.condition.peers.clever_l2` (``None``: no CLEVER).
    top
        Classes of :func:`~sensitivity_lib.condition.radius.first_order_radius`.
    batch_size, generator, progress
        Chunk size of the forward passes and attacks; the source of every random draw and seed;
        progress bars.

    Returns
    -------
    dict
        ``name -> tensor`` with one row per image, on the CPU.
    """
    check_model_input(model, x)
    x = x.detach()
    attacks = {"deepfool": {}} if attacks is None else dict(attacks)
    for key in attacks:
        parse_attack(key)
    for kind in noise_kinds:
        if kind not in NOISE_KINDS:
            raise ValueError(f"noise kind must be one of {NOISE_KINDS}, got {kind!r}")
    sizes = [int(s) for s in noise_sizes]
    if not sizes or len(set(sizes)) != len(sizes):
        raise ValueError(f"noise_sizes must be distinct integer exponents, got {noise_sizes!r}")
    L = lipschitz if lipschitz is not None else lipschitz_bound(model, tuple(x.shape[1:]))
    pred = predict(model, x, batch_size).cpu()
    out: dict[str, torch.Tensor] = {"pred": pred, "x_norm": x.flatten(1).to(torch.float64).norm(dim=1).cpu()}
    cert = certified_radius(model, x, lipschitz=L)
    out.update(certified=cert.value, gap=cert.extra["gap"])
    out["first_order"] = first_order_radius(model, x, top=top).value
    for kind in noise_kinds:
        flips, change = _noise(model, x, pred.to(x.device), sizes, int(noise_draws), kind, batch_size,
                               generator)  # fmt: skip
        out[f"noise_{kind}_rate"] = flips.double().mean(-1)
        out[f"noise_{kind}_rel"], out[f"noise_{kind}_abs"] = _first_flip(flips, change, sizes)
    if rounding:
        rate = torch.full((len(x), len(sizes)), math.nan, dtype=torch.float64)
        for j, s in enumerate(sizes):
            if s >= 1:  # rounding to s >= 1 significand bits
                rate[:, j] = (predict(model, round_float(x, s), batch_size).cpu() != pred).double()
        out["rounding_rate"] = rate
        out["rounding_bits"] = rounding_flip_bits(model, x, bits=range(1, 25)).cpu()
    for key, options in attacks.items():
        method, norm = parse_attack(key)
        r = minimal_perturbation(model, x, method=method, norm=norm, batch_size=batch_size,
                                 generator=generator, progress=progress, **options)  # fmt: skip
        out[key], out[f"{key}_rho"] = r.value, r.extra["rho"]
        if "eps" in r.extra:
            out[f"{key}_eps"] = r.extra["eps"].to(torch.float64)
    if condition:
        e0 = local_condition(model, x, tol=e0_tol, generator=generator)
        e1 = global_condition(model, x, lipschitz=L)
        with torch.no_grad():
            logits = model(x)
        out.update(
            e0_log2=e0.extra["log2"].cpu(), e1_log2=e1.extra["log2"].cpu(),
            t_e0=min_input_bits(e0.extra["log2"].cpu(), logits.cpu()),
            t_e1=min_input_bits(e1.extra["log2"].cpu(), logits.cpu()),
        )  # fmt: skip
    if clever is not None:
        out["clever"] = clever_l2(model, x, generator=generator, **clever).value
    return out


def measure_sharded(
    model: nn.Module,
    x: torch.Tensor,
    *,
    seed: int = 0,
    chunk: int = 4,
    ctx: shards.Context | None = None,
    lipschitz: Estimate | None = None,
    progress: bool = True,
    **options: Any,
) -> dict[str, torch.Tensor] | None:
    """:func:`measure` over the chunks of ``x``, on the processes of ``ctx`` (:mod:`sensitivity_lib.shards`).

    Chunk ``c`` is measured with ``generator = torch.Generator().manual_seed(seed * 1_000_003 + c)``,
    so the rows do not depend on the number of processes. The Lipschitz bound (weights only) is
    computed once per process. Returns the rows of all images on rank 0, ``None`` elsewhere.
    """
    check_model_input(model, x)
    L = lipschitz if lipschitz is not None else lipschitz_bound(model, tuple(x.shape[1:]))

    def one(idx: torch.Tensor, c: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(c))
        return measure(model, x[idx], lipschitz=L, generator=g, progress=progress, **options)

    return shards.run(one, len(x), chunk=chunk, ctx=ctx, progress=progress)


#: The networks of the chapter, by the names :func:`book_network` takes.
NETWORKS: tuple[str, ...] = (
    "efficientnet_lite0", "lenet5_standard", "lenet5_adversarial", "alexnet", "vgg19", "alexnet_random",
    "vgg19_random",
)  # fmt: skip


def book_network(
    name: str, n: int, *, source: str = "samples", seed: int = 0, standin_train: int | None = None,
    progress: bool = True,
):
    """A network of the chapter and the first ``n`` of its images: ``(model, ImageSet)``.

    ``source="samples"`` (what ships offline): EfficientNet-Lite0 on the ImageNet photos of
    :func:`sensitivity_lib.data.imagenet_samples` at 224 x 224; the LeNet5 pair on the first MNIST
    test digits; ``"alexnet"`` / ``"vgg19"``: the digit stand-ins of
    :func:`sensitivity_lib.zoo.digits_standin` on the same digits (trained and cached on first use);
    ``"alexnet_random"`` / ``"vgg19_random"``: the ImageNet-size architectures with random weights on
    the photos. ``source="full"``: ImageNet validation images (``$IMAGENET_VAL``) and MNIST test digits
    (``$MNIST_ROOT``), ``n`` of each drawn with ``seed``, and ``"alexnet"`` / ``"vgg19"`` with their
    ImageNet weights (a clear error names the missing file). ``standin_train``: the number of digits
    the stand-ins train on (default: their recipe's 2,000).
    """
    from sensitivity_lib import data, zoo

    if name not in NETWORKS:
        raise ValueError(f"network must be one of {NETWORKS}, got {name!r}")
    if source not in ("samples", "full"):
        raise ValueError(f"source must be 'samples' or 'full', got {source!r}")

    def photos():
        if source == "samples":
            return data.imagenet_samples(224)[:n]
        return data.take(data.imagenet_folder(size=224), n, seed=seed, name="ImageNet val")

    def digits():
        if source == "samples":
            return data.mnist_test20()[:n]
        return data.take(data.mnist(train=False), n, seed=seed, name="MNIST test")

    if name == "efficientnet_lite0":
        return zoo.efficientnet_lite0().eval(), photos()
    if name.startswith("lenet5_"):
        return zoo.lenet5(name.split("_", 1)[1]).eval(), digits()
    if name.endswith("_random"):
        return zoo.torchvision_model(name.split("_")[0], weights=None, seed=seed).eval(), photos()
    if source == "full":
        return zoo.torchvision_model(name, weights="imagenet").eval(), photos()
    return zoo.digits_standin(name, n_train=standin_train, progress=progress)[0].eval(), digits()


def plan(sizes: dict[str, Any]) -> list[tuple[str, int, dict[str, Any]]]:
    """The chapter's measurement plan from one profile of its ``SIZES``: ``(network, n, options)``.

    ``sizes["networks"]`` maps a network name to ``{"n": images, **options}`` and ``sizes["common"]``
    holds the options every network shares; a network's own options win. ``options`` are the keyword
    arguments of :func:`measure` (and ``chunk``, ``seed`` of :func:`measure_sharded`).

    >>> plan({"common": {"noise_draws": 2}, "networks": {"lenet5_standard": {"n": 4, "noise_draws": 1}}})
    [('lenet5_standard', 4, {'noise_draws': 1})]
    """
    common = dict(sizes.get("common", {}))
    out = []
    for name, own in sizes["networks"].items():
        if name not in NETWORKS:
            raise ValueError(f"unknown network {name!r} in SIZES; use one of {NETWORKS}")
        own = dict(own)
        n = int(own.pop("n"))
        out.append((name, n, {**common, **own}))
    return out

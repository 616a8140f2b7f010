"""Standard adversarial attacks, through adversarial-robustness-toolbox (ART) and foolbox: adapters,
not attacks.

Two questions, two functions:

* :func:`attack`: the adversarial inputs of a *fixed budget* ``eps`` (FGSM, PGD), for accuracy
  against ``eps`` curves;
* :func:`minimal_perturbation`: per input, the *smallest* change a method finds that alters the
  prediction (DeepFool, Carlini-Wagner, DDN, and FGSM / PGD with the library's flip search over
  ``eps``). An achieved change bounds the distance to the nearest input with another prediction from
  above, so the result is an :class:`~sensitivity_lib.results.Estimate` of kind ``"upper"``.

Input space
    The model's own input, with the normalisation *inside* the model (for the book's
    :class:`sensitivity_lib.zoo.Normalized` models: [0, 1] pixels). Every adversarial input is kept
    inside ``clip_values`` (default ``(0, 1)``); inputs outside it are refused. Any input shape
    ``(N, ...)`` works (images, sequences), and ``clip_values=None`` means no box (then DDN, which
    needs one, is not available).
Norms
    ``eps`` of FGSM and PGD is measured in the attack's ``norm``: ``"inf"`` is the largest change of
    one input value (one pixel of one channel), ``2`` the Euclidean norm of the change over all
    ``C*H*W`` values of one sample; both in input units ([0, 1] pixel units: ``1/255`` is one grey
    level). :func:`minimal_perturbation` always reports the Euclidean norm of the change it returns,
    whatever the attack's own norm (``extra["linf"]`` has the largest entry too).
Seeding
    ART draws random starts from NumPy's global generator and foolbox's DDN from torch's; both are
    seeded from ``generator`` for the call and restored afterwards.
Batching and progress
    Inputs go to the libraries in chunks of ``batch_size`` (DeepFool one input at a time when the
    model has more classes than ``top``, because ART's DeepFool takes the gradients of the union of
    the top classes of a whole chunk); a tqdm bar over the chunks goes to stderr (silenced by
    ``progress=False`` or ``TQDM_DISABLE=1``).

Methods and their sources
    ``fgsm``: ART's ``FastGradientMethod`` (Goodfellow et al., 2015; for ``norm=2`` the fast gradient
    method, the gradient scaled to length ``eps``). ``pgd``: ART's ``ProjectedGradientDescent``
    (Madry et al., 2018), step ``2.5 eps / steps`` by default. ``deepfool``: ART's ``DeepFool``
    (Moosavi-Dezfooli et al., 2016), overshoot 0.02 as in the original code (ART's default is
    1e-6). ``cw``: ART's ``CarliniL2Method`` (Carlini & Wagner, 2017) with its binary search over the
    constant ``c``. ``ddn``: foolbox's ``DDNAttack`` (Rony et al., 2019), the minimum-norm attack
    advertorch's published LeNet5 distances were measured with. Foolbox 3.3.4's ``L2FMNAttack``
    (Pintor et al., 2021) is not offered: its L2 projection scales by ``norms / norms`` and so never
    projects (read in its source), which makes it a different attack.

Example
-------
>>> import torch
>>> from sensitivity_lib import zoo, data
>>> m, x = zoo.lenet5(), data.mnist_test20().images[:4]
>>> adv = attack(m, x, method="fgsm", eps=0.3, norm="inf", progress=False)
>>> float((adv - x).abs().max()) <= 0.3 + 1e-6, bool(adv.min() >= 0) and bool(adv.max() <= 1)
(True, True)
>>> r = minimal_perturbation(m, x, method="deepfool", progress=False)
>>> r.kind, bool(r.extra["flipped"].all())
('upper', True)
>>> bool(torch.allclose(r.value, (r.extra["adversarial"] - x).flatten(1).double().norm(dim=1)))
True
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from sensitivity_lib.results import Estimate
from sensitivity_lib.search import flip_search
from sensitivity_lib.validation import check_labels, check_model_input

__all__ = [
    "ATTACKS",
    "MINIMAL_METHODS",
    "NORMS",
    "attack",
    "minimal_perturbation",
    "art_classifier",
    "seeded",
    "draw_seed",
    "predict",
]

#: Fixed-budget attacks of :func:`attack`.
ATTACKS: tuple[str, ...] = ("fgsm", "pgd")
#: Methods of :func:`minimal_perturbation`.
MINIMAL_METHODS: tuple[str, ...] = ("deepfool", "cw", "ddn", "fgsm", "pgd")
#: The norms each method supports (``"inf"`` or ``2``).
NORMS: dict[str, tuple[Any, ...]] = {
    "fgsm": ("inf", 2),
    "pgd": ("inf", 2),
    "deepfool": (2,),
    "cw": (2,),
    "ddn": (2,),
}


# ----------------------------------------------------------------------------------------------
# plumbing shared with condition.peers (CLEVER): ART's classifier wrapper, seeding, quiet imports
#
# ART works on float32 NumPy arrays and draws its random numbers (random starts, CLEVER's samples)
# from NumPy's global generator; foolbox's DDN draws from torch's global generator. seeded() seeds
# both from a torch.Generator and restores them afterwards, so that a call is reproducible and
# leaves the caller's random state as it was.


def import_art():
    """``art`` with the one import-time warning it emits on machines without ipywidgets silenced."""
    with warnings.catch_warnings():  # ART imports tqdm.auto, which warns without ipywidgets
        warnings.filterwarnings("ignore", message="IProgress not found")
        import art
        import art.attacks.evasion  # noqa: F401
        import art.estimators.classification  # noqa: F401
        import art.metrics  # noqa: F401
    return art


def import_foolbox():
    """``foolbox``, without its import-time deprecation warnings (scipy.ndimage.filters)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        import foolbox
    return foolbox


class AsFloat32(nn.Module):
    """``model`` evaluated in its own dtype on inputs that arrive as float32 (ART's dtype), returning
    float32 logits; a float32 model is used as it is."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).to(torch.float32)


def model_dtype(model: nn.Module) -> torch.dtype:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def float32_model(model: nn.Module) -> nn.Module:
    dtype = model_dtype(model)
    return model if dtype == torch.float32 else AsFloat32(model, dtype).eval()


def art_classifier(
    model: nn.Module,
    input_shape: tuple[int, ...],
    nb_classes: int,
    clip_values: tuple[float, float] | None,
    device: torch.device,
):
    """ART's ``PyTorchClassifier`` for a model that maps the input space (normalisation inside) to
    logits; cross-entropy loss, no preprocessing, ``clip_values`` as given."""
    import_art()
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        model=float32_model(model),
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(input_shape),
        nb_classes=int(nb_classes),
        clip_values=None if clip_values is None else (float(clip_values[0]), float(clip_values[1])),
        device_type="gpu" if device.type == "cuda" else "cpu",
    )


def draw_seed(generator: torch.Generator | None) -> int:
    """A seed for the libraries' global generators, drawn from ``generator`` (or torch's global one)."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed NumPy's and torch's global generators with ``seed`` inside the block; restore both after."""
    state = np.random.get_state()  # noqa: NPY002 - ART samples from the global NumPy state
    try:
        np.random.seed(seed)  # noqa: NPY002
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        np.random.set_state(state)  # noqa: NPY002


def to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy().astype(np.float32)


# ----------------------------------------------------------------------------------------------
# validation


def _norm(method: str, norm: Any) -> Any:
    """``"inf"`` or ``2`` (accepting ``inf``, ``np.inf``, ``"2"``, ``2.0``), if ``method`` supports it."""
    if isinstance(norm, str):
        key = norm.strip().lower()
        n = "inf" if key in ("inf", "linf") else (2 if key in ("2", "l2") else norm)
    elif isinstance(norm, int | float) and math.isinf(norm):
        n = "inf"
    elif isinstance(norm, int | float) and float(norm) == 2.0:
        n = 2
    else:
        n = norm
    if n not in NORMS[method]:
        raise ValueError(
            f"method {method!r} does not support norm={norm!r}; it supports "
            f"{' and '.join(repr(v) for v in NORMS[method])}"
        )
    return n


def _check_clip(clip_values: Any) -> tuple[float, float] | None:
    if clip_values is None:
        return None
    lo, hi = (float(v) for v in clip_values)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"clip_values must be a finite pair lo < hi (or None), got {clip_values!r}")
    return lo, hi


def _prepare(
    model: nn.Module, x: torch.Tensor, y: Any, clip: tuple[float, float] | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Check model and inputs; return the labels (default: predictions), the predictions and the
    number of classes."""
    check_model_input(model, x)
    if clip is not None:
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if lo < clip[0] - 1e-6 or hi > clip[1] + 1e-6:
            raise ValueError(
                f"inputs must lie in clip_values [{clip[0]:g}, {clip[1]:g}], got range [{lo:.3g}, {hi:.3g}]; "
                "the attacks work in the model's input space (pixels in [0, 1] for the book's models, "
                "normalisation inside the model)"
            )
    with torch.no_grad():
        logits = model(x)
    if logits.ndim != 2:
        raise ValueError(f"the model must return logits of shape (N, classes), got {tuple(logits.shape)}")
    pred = logits.argmax(1)
    labels = pred.clone() if y is None else check_labels(y, len(x), logits.shape[1]).to(pred.device)
    return labels, pred, int(logits.shape[1])


def _check_eps(eps: Any, n: int) -> torch.Tensor:
    """``eps`` as float64 (n,): one float for all samples or one per sample, finite and >= 0."""
    t = torch.as_tensor(eps, dtype=torch.float64).detach().cpu().reshape(-1)
    if t.numel() == 1:
        t = t.expand(n).clone()
    if t.numel() != n:
        raise ValueError(f"eps must be one number or one per sample ({n}), got {t.numel()} values")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("eps must be finite")
    if bool((t < 0).any()):
        raise ValueError(f"eps must be >= 0 (a size in input units), got {float(t.min()):g}")
    return t


def _chunks(n: int, size: int, progress: bool, desc: str):
    from tqdm import tqdm

    starts = range(0, n, size)
    kw = {} if progress else {"disable": True}  # TQDM_DISABLE=1 silences the bar unless disable= is given
    return tqdm(starts, desc=desc, leave=False, mininterval=1.0, **kw)


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The model's predicted classes (argmax of the logits) for ``x``, in chunks of ``batch_size``."""
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


# ----------------------------------------------------------------------------------------------
# fixed budget


def attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    method: str,
    eps: float | torch.Tensor,
    norm: str | float = "inf",
    steps: int | None = None,
    step_size: float | None = None,
    random_start: bool = False,
    clip_values: tuple[float, float] | None = (0.0, 1.0),
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Adversarial inputs within ``eps`` of ``x`` in the given norm: FGSM or PGD, through ART.

    Parameters
    ----------
    model
        A classifier in eval mode that maps inputs (normalisation inside) to logits ``(N, C)``.
    x
        Batch ``(N, ...)`` inside ``clip_values``.
    y
        Labels whose loss the attack increases (int64 ``(N,)``); default: the model's predictions.
    method
        ``"fgsm"`` (one gradient step of length ``eps``) or ``"pgd"`` (``steps`` projected steps).
    eps
        The budget in input units ([0, 1] pixel units), one number or one per sample; ``>= 0``.
    norm
        ``"inf"`` (every value changes by at most ``eps``) or ``2`` (the change has Euclidean norm at
        most ``eps``).
    steps, step_size, random_start
        PGD only: iterations (default 20), step length (default ``2.5 * eps / steps``, Madry et
        al.'s rule) and a random start in the ``eps`` ball (default off: deterministic).
    clip_values
        The box every adversarial input is clipped to (``None``: none).
    batch_size, generator, progress
        Chunk size, the seed source of a random start, a progress bar.

    Returns
    -------
    torch.Tensor
        Adversarial inputs, shape and dtype of ``x``; where ``eps`` is 0 the input itself.

    Raises
    ------
    ValueError
        Unknown method, unsupported norm, negative or non-finite ``eps``, inputs outside
        ``clip_values``, labels out of range, model in training mode.
    """
    if method not in ATTACKS:
        raise ValueError(f"method must be one of {ATTACKS}, got {method!r}")
    p = _norm(method, norm)
    clip = _check_clip(clip_values)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    labels, _, C = _prepare(model, x, y, clip)
    e = _check_eps(eps, len(x))
    if method == "fgsm" and steps not in (None, 1):
        raise ValueError(f"FGSM takes one step; got steps={steps}")
    steps = 1 if method == "fgsm" else int(20 if steps is None else steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if step_size is not None and not step_size > 0:
        raise ValueError(f"step_size must be positive, got {step_size}")
    return _fixed_budget(model, x.detach(), labels, method, p, e, steps, step_size, random_start, clip, C,
                         batch_size, draw_seed(generator), progress)  # fmt: skip


def _fixed_budget(model, x, labels, method, p, e, steps, step_size, random_start, clip, C, batch_size, seed,
                  progress) -> torch.Tensor:  # fmt: skip
    art = import_art()
    out = x.clone()
    active = torch.nonzero(e > 0).flatten()
    if active.numel() == 0:
        return out
    clf = art_classifier(model, tuple(x.shape[1:]), C, clip, x.device)
    view = (-1,) + (1,) * (x.ndim - 1)
    norm = np.inf if p == "inf" else 2
    if random_start:
        # ART's random start takes one radius per call (an array of radii breaks its sampler), so the
        # inputs go in groups of equal eps, in increasing order of eps
        groups = [active[e[active] == u] for u in torch.unique(e[active])]
    else:
        groups = [active]
    batches = [g[s : s + batch_size] for g in groups for s in range(0, g.numel(), batch_size)]
    with seeded(seed):
        for k in _chunks(len(batches), 1, progress, f"{method.upper()}"):
            idx = batches[k]
            eps = e[idx].numpy().astype(np.float32).reshape(view)
            if random_start:  # ART wants python floats for one radius (eps and step alike)
                eps = float(eps.flat[0])
            xs, ys = to_numpy(x[idx]), labels[idx].cpu().numpy()
            if method == "fgsm":
                atk = art.attacks.evasion.FastGradientMethod(
                    clf, norm=norm, eps=eps, eps_step=eps, num_random_init=int(random_start),
                    batch_size=len(idx),
                )  # fmt: skip
            else:
                if random_start:
                    step = eps * 2.5 / steps if step_size is None else float(step_size)
                else:
                    step = eps * np.float32(2.5 / steps)
                    if step_size is not None:
                        step = np.full_like(eps, step_size)
                atk = art.attacks.evasion.ProjectedGradientDescent(
                    clf, norm=norm, eps=eps, eps_step=step, max_iter=steps, num_random_init=int(random_start),
                    batch_size=len(idx), verbose=False,
                )  # fmt: skip
            adv = atk.generate(xs, ys)
            out[idx] = torch.from_numpy(adv).to(x.device, x.dtype)
    return out


# ----------------------------------------------------------------------------------------------
# minimal perturbations


def minimal_perturbation(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    method: str = "deepfool",
    norm: str | float = 2,
    clip_values: tuple[float, float] | None = (0.0, 1.0),
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    progress: bool = True,
    **options: Any,
) -> Estimate:
    """Per input, the Euclidean size of the smallest change ``method`` finds that alters the
    prediction: an upper bound on the distance to the decision boundary.

    Parameters
    ----------
    model, x, y, clip_values, batch_size, generator, progress
        As in :func:`attack`. ``y`` defaults to the predictions; an input whose prediction already
        differs from ``y`` needs no change (size 0, reported as flipped, the attack is not run).
    method
        ``"deepfool"``, ``"cw"``, ``"ddn"`` (norm 2), or ``"fgsm"`` / ``"pgd"`` (norm ``"inf"`` or 2)
        with :func:`sensitivity_lib.search.flip_search` over ``eps``.
    norm
        The attack's own norm (see ``NORMS``); the reported size is always the 2-norm.
    **options
        ``deepfool``: ``max_iter=50``, ``overshoot=0.02``, ``top=10`` (ART's ``nb_grads``: the
        classes with the largest logits, the predicted one included, whose gradients are taken).
        ``cw``: ``binary_search_steps=10``, ``max_iter=10``, ``learning_rate=0.01``,
        ``initial_const=0.01``, ``confidence=0.0`` (ART's defaults). ``ddn``: ``steps=100``,
        ``init_epsilon=1.0``, ``gamma=0.05`` (foolbox's defaults). ``fgsm`` / ``pgd``:
        ``search="bisection"`` (relative tolerance ``tol=0.01`` on ``[0, eps_max]``; ``eps_max``
        defaults to the box's width for ``"inf"`` and to the Euclidean diameter of the box for 2) or
        ``"scan"`` (over an increasing ``grid`` of ``eps``: the first value that flips), and for PGD
        ``steps``, ``step_size``, ``random_start`` as in :func:`attack`.

    Returns
    -------
    Estimate
        ``value`` float64 ``(N,)``: ``||x_adv - x||_2`` of the returned change, ``inf`` where none
        flips the prediction; ``kind="upper"``, ``norm="2"``. ``extra``: ``adversarial`` (the inputs
        the method returned, ``x`` where it found nothing better), ``flipped`` (bool ``(N,)``: the
        prediction at ``adversarial`` differs from ``y``, checked by evaluating the model),
        ``labels`` (``y``), ``new_labels``, ``rho`` (``value / ||x||``, the relative size
        ``rho_adv`` of Moosavi-Dezfooli et al.), ``linf`` (largest entry of the change), and for
        FGSM / PGD ``eps`` (the budget that flipped, ``inf`` where none) and ``evaluations``.

    Raises
    ------
    ValueError
        Unknown method or option, unsupported norm, inputs outside ``clip_values``, bad labels.
    """
    if method not in MINIMAL_METHODS:
        raise ValueError(f"method must be one of {MINIMAL_METHODS}, got {method!r}")
    p = _norm(method, norm)
    clip = _check_clip(clip_values)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if method == "ddn" and clip is None:
        raise ValueError("DDN needs a box (foolbox bounds): pass clip_values=(lo, hi)")
    options = _options(method, p, options)
    labels, pred, C = _prepare(model, x, y, clip)
    x = x.detach()
    seed = draw_seed(generator)
    todo = torch.nonzero(pred == labels).flatten()
    adversarial = x.clone()
    extra: dict[str, Any] = {}
    if todo.numel():
        run = _MINIMAL[method]
        adv, more = run(model, x[todo], labels[todo], p, clip, C, batch_size, seed, progress, options)
        adversarial[todo] = adv.to(x.dtype)
        for k, v in more.items():
            full = torch.zeros(len(x), dtype=v.dtype)
            full[todo] = v
            extra[k] = full
    new = predict(model, adversarial, batch_size)
    flipped = new != labels
    size = (adversarial - x).flatten(1).to(torch.float64).norm(dim=1).cpu()
    value = torch.where(flipped.cpu(), size, torch.full_like(size, math.inf))
    xnorm = x.flatten(1).to(torch.float64).norm(dim=1).cpu()
    extra.update(
        adversarial=adversarial, flipped=flipped.cpu(), labels=labels.cpu(), new_labels=new.cpu(),
        rho=value / xnorm, linf=(adversarial - x).flatten(1).abs().amax(dim=1).to(torch.float64).cpu(),
        method=method, attack_norm=p, seed=seed,
    )  # fmt: skip
    return Estimate(value, "upper", method=method, norm="2", extra=extra)


_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepfool": dict(max_iter=50, overshoot=0.02, top=10),
    "cw": dict(binary_search_steps=10, max_iter=10, learning_rate=0.01, initial_const=0.01, confidence=0.0),
    "ddn": dict(steps=100, init_epsilon=1.0, gamma=0.05),
    "fgsm": dict(search="bisection", eps_max=None, tol=0.01, grid=None),
    "pgd": dict(search="bisection", eps_max=None, tol=0.01, grid=None, steps=20, step_size=None,
                random_start=False),
}


def _options(method: str, p: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The method's options with defaults filled in; unknown names and bad values are refused."""
    defaults = _DEFAULTS[method]
    unknown = set(options) - set(defaults)
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)} for method {method!r}; known: {sorted(defaults)}"
        )
    o = {**defaults, **options}
    for k in ("max_iter", "top", "binary_search_steps", "steps"):
        if k in o and int(o[k]) < 1:
            raise ValueError(f"{k} must be >= 1, got {o[k]}")
    if method in ("fgsm", "pgd"):
        if o["search"] not in ("bisection", "scan"):
            raise ValueError(f"search must be 'bisection' or 'scan', got {o['search']!r}")
        if o["search"] == "scan" and o["grid"] is None:
            raise ValueError("search='scan' needs a grid of eps values (increasing, in input units)")
        if o["eps_max"] is not None and not float(o["eps_max"]) > 0:
            raise ValueError(f"eps_max must be positive, got {o['eps_max']}")
    return o


def _deepfool(model, x, y, p, clip, C, batch_size, seed, progress, options):  # noqa: ANN001
    art = import_art()
    o = options
    clf = art_classifier(model, tuple(x.shape[1:]), C, clip, x.device)
    top = int(o["top"])
    size = batch_size if top >= C else 1  # ART takes the union of the top classes of a whole chunk
    out = x.clone()
    with seeded(seed):
        for start in _chunks(len(x), size, progress, "DeepFool"):
            sl = slice(start, start + size)
            atk = art.attacks.evasion.DeepFool(
                clf, max_iter=int(o["max_iter"]), epsilon=float(o["overshoot"]), nb_grads=min(top, C),
                batch_size=size, verbose=False,
            )  # fmt: skip
            out[sl] = torch.from_numpy(atk.generate(to_numpy(x[sl]))).to(x.device, x.dtype)
    return out, {}


def _cw(model, x, y, p, clip, C, batch_size, seed, progress, options):  # noqa: ANN001
    art = import_art()
    o = options
    clf = art_classifier(model, tuple(x.shape[1:]), C, clip, x.device)
    out = x.clone()
    with seeded(seed):
        for start in _chunks(len(x), batch_size, progress, "Carlini-Wagner"):
            sl = slice(start, start + batch_size)
            atk = art.attacks.evasion.CarliniL2Method(
                clf, confidence=float(o["confidence"]), learning_rate=float(o["learning_rate"]),
                binary_search_steps=int(o["binary_search_steps"]), max_iter=int(o["max_iter"]),
                initial_const=float(o["initial_const"]), batch_size=len(x[sl]), verbose=False,
            )  # fmt: skip
            adv = atk.generate(to_numpy(x[sl]), y[sl].cpu().numpy())
            out[sl] = torch.from_numpy(adv).to(x.device, x.dtype)
    return out, {}


def _ddn(model, x, y, p, clip, C, batch_size, seed, progress, options):  # noqa: ANN001
    fb = import_foolbox()
    o = options
    fmodel = fb.PyTorchModel(float32_model(model), bounds=clip, device=x.device)
    atk = fb.attacks.DDNAttack(
        init_epsilon=float(o["init_epsilon"]), steps=int(o["steps"]), gamma=float(o["gamma"])
    )
    out = x.clone()
    with seeded(seed):
        for start in _chunks(len(x), batch_size, progress, "DDN"):
            sl = slice(start, start + batch_size)
            xs = x[sl].to(torch.float32)
            adv = atk.run(fmodel, xs, fb.criteria.Misclassification(y[sl]))
            out[sl] = adv.detach().to(x.dtype)
    return out, {}


def _gradient_search(model, x, y, p, clip, C, batch_size, seed, progress, options, method):  # noqa: ANN001
    o = options
    width = 1.0 if clip is None else clip[1] - clip[0]
    eps_max = o["eps_max"]
    if eps_max is None:
        eps_max = width if p == "inf" else width * math.sqrt(x[0].numel())
    n = len(x)
    best = torch.full((n,), math.inf, dtype=torch.float64)
    best_adv = x.clone()
    steps, step_size = int(o.get("steps", 1)), o.get("step_size")
    random_start = bool(o.get("random_start", False))

    def changed(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        adv = _fixed_budget(model, x[idx], y[idx], method, p, t, steps, step_size, random_start, clip, C,
                            batch_size, seed, False)  # fmt: skip
        hit = (predict(model, adv, batch_size) != y[idx]).cpu()
        better = hit & (t < best[idx])
        best[idx[better]] = t[better]
        best_adv[idx[better]] = adv[better]
        return hit

    from tqdm import tqdm

    kw = {} if progress else {"disable": True}
    with tqdm(total=None, desc=f"{method.upper()} flip search", leave=False, mininterval=1.0, **kw) as bar:

        def counted(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            bar.update(1)
            return changed(t, idx)

        if o["search"] == "scan":
            r = flip_search(counted, n, mode="scan", grid=o["grid"])
        else:
            r = flip_search(counted, n, mode="bisection", hi=float(eps_max), tol=float(o["tol"]))
    eps = torch.where(r.found, r.value, torch.full_like(r.value, math.inf))
    return best_adv, {"eps": eps, "evaluations": torch.full((n,), r.evaluations, dtype=torch.int64)}


_MINIMAL: dict[str, Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]] = {
    "deepfool": _deepfool,
    "cw": _cw,
    "ddn": _ddn,
    "fgsm": lambda *a: _gradient_search(*a, method="fgsm"),
    "pgd": lambda *a: _gradient_search(*a, method="pgd"),
}

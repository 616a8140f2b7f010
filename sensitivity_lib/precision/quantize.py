"""A model that evaluates in reduced precision: rounded inputs, weights and layer outputs.

:func:`quantized` returns a new module; the original is left as it was (weights, buffers, hooks).
It *emulates* low-precision storage by rounding (:mod:`sensitivity_lib.precision.formats`):

What is emulated
    * the input the model receives (for :class:`sensitivity_lib.zoo.Normalized` models: the
      [0, 1] pixels, before the normalisation inside the model);
    * every parameter (weights and biases) of the chosen layers, rounded once;
    * the output of every chosen layer, through a forward hook (the value stored between layers).
What is not
    * the arithmetic *inside* a layer: a convolution or matmul accumulates its products in the
      model's dtype (float32), as a tensor core accumulating in float32 does, not in the format;
    * buffers (batch-norm running statistics, the normalisation's mean and std), which stay exact
      (fold batch norms into the convolutions first to round them with the weights);
    * operations that are not modules (a residual ``+``, ``torch.flatten`` in ``forward``): their
      results are not rounded, though their inputs, outputs of modules, are.

The layers are the modules that compute something: leaves and modules owning parameters, except
``Identity``, ``Flatten``, ``Dropout`` (whose output is their input) -- :func:`activation_layers`;
a module called several times in one forward pass (a shared activation function) has each of its
outputs rounded. The layers with weights are :func:`weight_layers` (modules owning parameters).

Example
-------
>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU()).eval()
>>> q = quantized(net, weights="bfloat16", activations="bfloat16")
>>> bool(torch.equal(q.model[0].weight, net[0].weight.bfloat16().float())), len(net[0]._forward_hooks)
(True, 0)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from sensitivity_lib.precision.formats import Format, as_format
from sensitivity_lib.validation import check_eval

__all__ = ["FormatSpec", "activation_layers", "weight_layers", "layer_outputs", "quantized", "Quantized"]

#: A format, or a mapping from layer names to formats (only those layers are rounded).
FormatSpec = str | Format | Mapping[str, str | Format] | None

#: What a Quantized model answers for its original (not ``net``, ``mean``, ``std``: a function that
#: unwraps a ``zoo.Normalized`` model must not bypass the input's rounding).
_FORWARDED = ("input_shape", "classes", "name", "pretrained", "weights_note", "check_input", "fixed_size")

_PASS_THROUGH = (nn.Identity, nn.Flatten, nn.Dropout, nn.Dropout2d, nn.AlphaDropout)


def _computes(m: nn.Module) -> bool:
    """A module whose output :func:`quantized` rounds: a leaf, or a module owning parameters (a
    convolution with a padding child), unless it passes its input through."""
    owns = any(True for _ in m.parameters(recurse=False))
    return (owns or not list(m.children())) and not isinstance(m, _PASS_THROUGH)


def activation_layers(model: nn.Module) -> list[str]:
    """Names of the modules whose outputs :func:`quantized` rounds, in registration order: leaves
    and modules owning parameters, except ``Identity``, ``Flatten`` and ``Dropout``.

    >>> activation_layers(nn.Sequential(nn.Linear(2, 2), nn.Identity(), nn.ReLU()))
    ['0', '2']
    """
    return [n for n, m in model.named_modules() if n and _computes(m)]


def weight_layers(model: nn.Module) -> list[str]:
    """Names of the modules that own floating-point parameters (weights and biases) directly.

    >>> weight_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)))
    ['0', '2']
    """
    return [
        n for n, m in model.named_modules()
        if n and any(p.is_floating_point() for p in m.parameters(recurse=False))
    ]  # fmt: skip


def layer_outputs(
    model: nn.Module, x: torch.Tensor, names: list[str] | None = None, *, call: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """The outputs of the modules ``names`` of ``model`` (default :func:`activation_layers`) while
    ``call(x)`` runs (default ``model(x)``; e.g. a :class:`Quantized` wrapper of ``model``), keyed
    ``"name#k"`` for the ``k``-th call of a module (a shared module may be called more than once).

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU()).eval()
    >>> list(layer_outputs(net, torch.zeros(1, 2)))
    ['0#0', '1#0']
    """
    names = activation_layers(model) if names is None else list(names)
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    calls = dict.fromkeys(names, 0)

    def hook(n: str):  # noqa: ANN202
        def h(m, a, out):  # noqa: ANN001, ANN202
            seen[f"{n}#{calls[n]}"] = out.detach()
            calls[n] += 1

        return h

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            (model if call is None else call)(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _per_layer(spec: FormatSpec, names: list[str], what: str) -> dict[str, Format]:
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        unknown = [k for k in spec if k not in names]
        if unknown:
            raise ValueError(f"{what}: no such layer(s) {unknown}; the layers are {names}")
        return {k: as_format(v) for k, v in spec.items()}
    f = as_format(spec)
    return dict.fromkeys(names, f)


class Quantized(nn.Module):
    """The module :func:`quantized` returns: ``forward(x) = model'(round(x))``.

    Attributes
    ----------
    model
        The rounded copy (its weights rounded, forward hooks rounding the layer outputs).
    inputs, weights, activations
        The formats used (``{layer name: Format}`` for the last two).
    mode
        The rounding mode.
    """

    def __init__(self, model, inputs, weights, activations, mode, generator) -> None:  # noqa: ANN001
        super().__init__()
        self.model = model
        self.inputs = inputs
        self.weights = weights
        self.activations = activations
        self.mode = mode
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inputs is not None:
            x = self.inputs.round(x, mode=self.mode, generator=self.generator)
        return self.model(x)

    def __getattr__(self, name: str):  # noqa: ANN204
        if name in _FORWARDED and "model" in self._modules:
            return getattr(self._modules["model"], name)
        return super().__getattr__(name)


def quantized(
    model: nn.Module,
    *,
    inputs: str | Format | None = None,
    weights: FormatSpec = None,
    activations: FormatSpec = None,
    mode: str = "nearest",
    generator: torch.Generator | None = None,
) -> Quantized:
    """A copy of ``model`` that evaluates with the given formats (see the module docstring for what
    is emulated and what is not). The original model is not changed.

    Parameters
    ----------
    model
        A module in eval mode.
    inputs
        The format of the model's input (``None``: exact).
    weights
        A format for every layer's parameters, or ``{layer name: format}`` (:func:`weight_layers`).
    activations
        A format for every layer's output, or ``{layer name: format}`` (:func:`activation_layers`).
    mode, generator
        The rounding mode (``"nearest"``, ``"chop"``, ``"stochastic"``) and, for stochastic
        rounding, its random source (weights are rounded once; activations at every call).

    Returns
    -------
    Quantized
        In eval mode; ``input_shape``, ``classes``, ``name``, ``pretrained`` and ``check_input``
        are the original's.
    """
    check_eval(model)
    qin = None if inputs is None else as_format(inputs)
    wl = _per_layer(weights, weight_layers(model), "weights")
    al = _per_layer(activations, activation_layers(model), "activations")
    # a copy of the modules that shares every tensor; the rounded parameters are new tensors
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    copy_ = copy.deepcopy(model, memo=shared)
    modules = dict(copy_.named_modules())
    for name, fmt in wl.items():
        m = modules[name]
        for k, p in list(m.named_parameters(recurse=False)):
            if p.is_floating_point():
                rounded = fmt.round(p.detach(), mode=mode, generator=generator)
                setattr(m, k, nn.Parameter(rounded, requires_grad=p.requires_grad))
    for name, fmt in al.items():

        def hook(module, args, out, fmt=fmt):  # noqa: ANN001, ANN202
            return fmt.round(out, mode=mode, generator=generator)

        modules[name].register_forward_hook(hook)
    return Quantized(copy_, qin, wl, al, mode, generator).eval()

r"""The traced-graph walker: a model reduced to steps, one registry entry per operation.

Every bound on a whole network in the book walks the same graph: the certified Lipschitz bound
(E1), its cheap approximations (E3), the local masked product (E2), the per-layer condition
numbers and the kink statistics. This module traces the model once (``torch.fx``), runs it on an
example input to learn every node's real shape, and turns each node into a :class:`Step` through the
*rule* registered for its operation. Supporting a new operation is one entry of :data:`RULES`:
a :class:`Rule` subclass registered for its module types, functions and tensor-method names, with
its certified constant, its local factor and its kinks.

Input space and norm
    The model's own input (``[0, 1]`` pixels for :class:`sensitivity_lib.zoo.Normalized` models,
    whose normalisation is part of the graph), the Euclidean norm of one flattened sample, and the
    induced spectral norm for operations.

The rules (proofs in the chapter *Deriving a condition number for a network*)
    For a node ``v`` with constant ``L_v`` (``||v(x) - v(y)|| <= L_v ||x - y||`` for all inputs):

    * input: ``L = 1``; a one-input operation with constant ``c``: ``L_v = c L_input``;
    * a sum of input-dependent nodes: ``sum_i w_i L_i`` (triangle inequality, ``w_i`` the scalar
      factors, e.g. ``alpha`` of ``torch.add``); adding a constant leaves ``L`` unchanged;
    * a concatenation (DenseNet): ``sqrt(sum L_i^2)``, since
      ``||cat(a_i(x)) - cat(a_i(y))||^2 = sum ||a_i(x) - a_i(y)||^2``;
    * ``Linear``, ``Conv2d`` (any stride, padding, dilation, groups; also ``F.linear`` /
      ``F.conv2d`` with constant weights): the operator norm at the layer's real input size, given
      by the caller (:func:`propagate`'s ``factor``); a batch norm at inference right after one
      (its only user) is folded into it, elsewhere it is the diagonal ``max_c |gamma_c| / sqrt(var_c
      + eps)``;
    * activations (:data:`ACTIVATION_CONSTANTS`): ReLU, ReLU6, Hardtanh, Tanh, Softplus, identity 1;
      LeakyReLU ``max(1, |slope|)``; ELU ``max(1, alpha)``; Sigmoid 1/4; SiLU 1.09984; GELU 1.12891
      (1.12900 for its tanh approximation): the maxima of ``|f'|``, rounded up (checked in the tests);
    * max-pool (overlapping, padded, dilated, adaptive): ``sqrt(m)``, ``m`` the largest number of
      windows that contain one input pixel (exact); average pool (also adaptive) and resampling
      (``nn.Upsample``, ``F.interpolate``): the exact norm ``||A_h|| ||A_w||`` of their Kronecker
      factors;
    * ``mean`` over ``n`` entries ``1 / sqrt(n)``, ``sum`` ``sqrt(n)``; multiplication by a constant
      tensor ``c``: ``max |c|``; division ``1 / min |c|``; softmax 1/2; padding with zeros,
      reshapes, permutations, slicing, dropout at inference: 1.

    Anything else (e.g. the product of two input-dependent tensors in squeeze-and-excitation)
    raises ``NotImplementedError`` naming the operation and its module path.

Local rules (E2, kinks)
    At a sample ``x`` each step also has a *local* factor, a bound on the norm of its Jacobian at
    the value ``z`` that reaches it: ``max |f'(z)|`` for an activation, ``sqrt`` of the largest number
    of outputs that select one input for a max-pool, the exact ``||diag(p) - p p^T||`` for a softmax,
    and the global constant for linear maps. :meth:`Rule.kinks` says where ``f`` is not
    differentiable at ``z``.

Example
-------
>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Flatten()).eval()
>>> plan = build_plan(net, (1, 9, 9))
>>> [(s.name, s.op) for s in plan.steps]
[('input', 'input'), ('0', 'linear'), ('1', 'act'), ('2', 'maxpool'), ('3', 'fixed')]
>>> plan.steps[3].const  # overlapping 3x3 windows with stride 2: some pixels are in 2 x 2 windows
2.0
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from sensitivity_lib.validation import check_eval

__all__ = [
    "ACTIVATION_CONSTANTS",
    "RULES",
    "Rule",
    "register",
    "Step",
    "Plan",
    "Recorder",
    "trace",
    "tangent_map",
    "build_plan",
    "propagate",
    "log2_sum",
    "as_pair",
    "pool_windows_1d",
    "adaptive_windows_1d",
    "pool_window_multiplicity",
    "avg_pool_norm",
    "interpolate_norm",
    "activation_constant",
    "activation_derivative",
    "window_values",
    "unsupported",
]

#: Global Lipschitz constants (2-norm) of the elementwise activations that are understood.
#: SiLU and GELU are the maxima of ``|f'|`` found numerically, rounded up in the 5th digit.
ACTIVATION_CONSTANTS: dict[str, float] = {
    "relu": 1.0,
    "relu6": 1.0,
    "hardtanh": 1.0,
    "tanh": 1.0,
    "softplus": 1.0,
    "identity": 1.0,
    "sigmoid": 0.25,
    "silu": 1.09984,
    "gelu": 1.12891,
}

#: The points where each piecewise-linear activation is not differentiable.
_KINKS: dict[str, tuple[float, ...]] = {"relu": (0.0,), "relu6": (0.0, 6.0), "leaky_relu": (0.0,)}


# ----------------------------------------------------------------------------------------------
# small exact norms of pooling


def as_pair(v: Any) -> tuple[int, int]:
    """``3 -> (3, 3)``; ``(2, 3) -> (2, 3)``; the int pair of a PyTorch size argument."""
    if isinstance(v, tuple | list):
        return (int(v[0]), int(v[-1])) if len(v) else (0, 0)
    return int(v), int(v)


def pool_windows_1d(n: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> list[list[int]]:
    """The input indices read by each output of a 1-D max / average pool (PyTorch semantics).

    Also the receptive fields of a convolution along one axis (``ceil_mode=False``).

    >>> pool_windows_1d(5, 3, 2, 0, 1, False)
    [[0, 1, 2], [2, 3, 4]]
    """
    span = d * (k - 1) + 1
    num = n + 2 * p - span
    if num < 0:
        raise ValueError(f"pooling window {span} larger than the padded input {n + 2 * p}")
    out = (-(-num // s) if ceil_mode else num // s) + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return [[o * s - p + j * d for j in range(k) if 0 <= o * s - p + j * d < n] for o in range(out)]


def adaptive_windows_1d(n: int, out: int) -> list[list[int]]:
    """The input indices of each output of a 1-D adaptive pool from ``n`` to ``out`` entries."""
    return [list(range((o * n) // out, -((-(o + 1) * n) // out))) for o in range(out)]


def pool_window_multiplicity(windows: Sequence[Sequence[int]], n: int) -> int:
    """The largest number of windows that contain one input index (``m`` of the max-pool rule).

    >>> pool_window_multiplicity([[0, 1, 2], [2, 3, 4]], 5)
    2
    """
    counts = [0] * n
    for w in windows:
        for i in w:
            counts[i] += 1
    return max(counts) if counts else 0


def _avg_matrix_1d(
    n: int, k: int, s: int, p: int, ceil_mode: bool, count_include_pad: bool, override: int | None
) -> torch.Tensor:
    """The 1-D factor ``A`` with ``avg_pool2d = A_h (x) A_w`` (Kronecker product), float64."""
    windows = pool_windows_1d(n, k, s, p, 1, ceil_mode)
    A = torch.zeros(len(windows), n, dtype=torch.float64)
    for o, w in enumerate(windows):
        start = o * s - p
        full = min(start + k, n + p) - start  # PyTorch's pool size, clipped at the right padding
        div = override if override is not None else (full if count_include_pad else len(w))
        if w:
            A[o, w] = 1.0 / div
    return A


def _adaptive_matrix_1d(n: int, out: int) -> torch.Tensor:
    A = torch.zeros(out, n, dtype=torch.float64)
    for o, w in enumerate(adaptive_windows_1d(n, out)):
        A[o, w] = 1.0 / len(w)
    return A


def avg_pool_norm(
    in_hw: tuple[int, int],
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
    *,
    adaptive_output: Any = None,
) -> tuple[float, tuple[torch.Tensor, torch.Tensor]]:
    """Exact 2-norm of a 2-D average pool (one channel; the channels are independent).

    The operator is ``A_h (x) A_w`` (PyTorch's divisor is a product of a row and a column count),
    so its norm is ``||A_h||_2 ||A_w||_2``, two SVDs of small 1-D matrices.

    Parameters
    ----------
    in_hw
        ``(H, W)`` of the pool's input.
    kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
        As in ``torch.nn.functional.avg_pool2d`` (ignored when ``adaptive_output`` is given).
    adaptive_output
        ``output_size`` of ``torch.nn.functional.adaptive_avg_pool2d`` instead.

    Returns
    -------
    (float, (Tensor, Tensor))
        The norm and the two 1-D factors (float64).

    Example
    -------
    >>> round(avg_pool_norm((4, 4), 2)[0], 12)   # disjoint 2x2 windows: 4 entries / 4 -> 1/2
    0.5
    """
    H, W = in_hw
    if adaptive_output is not None:
        oh, ow = _adaptive_size(adaptive_output, H, W)
        Ah, Aw = _adaptive_matrix_1d(H, oh), _adaptive_matrix_1d(W, ow)
    else:
        kh, kw = as_pair(kernel_size)
        sh, sw = as_pair(stride if stride not in (None, [], ()) else kernel_size)
        ph, pw = as_pair(padding)
        Ah = _avg_matrix_1d(H, kh, sh, ph, ceil_mode, count_include_pad, divisor_override)
        # divisor_override divides the 2-D window sum once: put it in the row factor only
        w_override = None if divisor_override is None else 1
        Aw = _avg_matrix_1d(W, kw, sw, pw, ceil_mode, count_include_pad, w_override)
    norm = float(torch.linalg.matrix_norm(Ah, 2) * torch.linalg.matrix_norm(Aw, 2))
    return norm, (Ah, Aw)


def _adaptive_size(output_size: Any, H: int, W: int) -> tuple[int, int]:
    if isinstance(output_size, tuple | list):
        oh, ow = output_size[0], output_size[-1]
    else:
        oh = ow = output_size
    return (H if oh is None else int(oh)), (W if ow is None else int(ow))


# ----------------------------------------------------------------------------------------------
# activations


def activation_constant(kind: str, params: dict[str, Any]) -> float:
    """The global 2-norm Lipschitz constant of an elementwise activation (see the module doc)."""
    if kind == "leaky_relu":
        return max(1.0, abs(float(params.get("negative_slope", 0.01))))
    if kind == "elu":
        return max(1.0, abs(float(params.get("alpha", 1.0))))
    if kind == "gelu" and params.get("approximate", "none") == "tanh":
        return 1.12900
    if kind == "hardtanh" and float(params.get("max_val", 1.0)) <= float(params.get("min_val", -1.0)):
        return 0.0
    return ACTIVATION_CONSTANTS[kind]


def activation_derivative(kind: str, params: dict[str, Any], z: torch.Tensor) -> torch.Tensor:
    """``f'(z)`` elementwise (at kinks: the right derivative); used by the local bounds."""
    if kind == "relu":
        return (z > 0).to(z.dtype)
    if kind == "relu6":
        return ((z > 0) & (z < 6)).to(z.dtype)
    if kind == "hardtanh":
        return ((z > params.get("min_val", -1.0)) & (z < params.get("max_val", 1.0))).to(z.dtype)
    if kind == "leaky_relu":
        a = float(params.get("negative_slope", 0.01))
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, a))
    if kind == "tanh":
        return 1 - torch.tanh(z) ** 2
    if kind == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1 - s)
    if kind == "elu":
        a = float(params.get("alpha", 1.0))
        return torch.where(z > 0, torch.ones_like(z), a * torch.exp(torch.clamp(z, max=0)))
    if kind == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if kind == "gelu":
        zz = z.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(F.gelu(zz, approximate=params.get("approximate", "none")).sum(), zz)
        return g
    if kind == "softplus":
        return torch.sigmoid(float(params.get("beta", 1.0)) * z)
    if kind == "identity":
        return torch.ones_like(z)
    raise NotImplementedError(f"no derivative for activation {kind!r}")


# ----------------------------------------------------------------------------------------------
# steps and plans


@dataclass
class Step:
    """One operation of the traced model, as the bounds see it.

    Attributes
    ----------
    name
        The module path (e.g. ``"features.0"``), or the node's name inside its module.
    rule
        The :class:`Rule` that built it (its ``op`` names the category: ``input``, ``linear``,
        ``diag``, ``act``, ``maxpool``, ``fixed``, ``softmax``, ``add``, ``cat``).
    inputs
        Indices of the steps it reads (one, except for ``add`` and ``cat``).
    const
        The certified global constant (not for ``linear``: its norm is the caller's choice).
    kind, params
        The operation's variant (e.g. ``"relu"``) and its parameters (e.g. a linear map's
        BN-folded ``weight`` and convolution settings, a max-pool's ``windows``).
    module, apply
        For ``linear``: a bias-free ``nn.Conv2d`` / ``nn.Linear`` copy and its linear map.
    in_shape, out_shape
        Shapes of one sample at the step's input and output.
    weights
        ``add``: the scalar factor of each input; ``cat``: ones.
    folded
        For ``linear``: the path of the batch norm folded into it.
    users
        Number of steps that read this one.
    """

    name: str
    rule: Rule
    inputs: list[int] = field(default_factory=list)
    node: torch.fx.Node | None = None
    const: float = 1.0
    kind: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    module: nn.Module | None = None
    apply: Callable[[torch.Tensor], torch.Tensor] | None = None
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    weights: list[float] = field(default_factory=list)
    folded: str | None = None
    users: int = 0

    @property
    def op(self) -> str:
        return self.rule.op


@dataclass
class Plan:
    """A traced model reduced to :class:`Step` s in topological order.

    ``steps[output]`` produces the model's output; ``gm`` is the traced graph (for :class:`Recorder`).
    """

    gm: torch.fx.GraphModule
    steps: list[Step]
    output: int
    input_shape: tuple[int, ...]
    dtype: torch.dtype

    def producer(self, step: Step) -> Step:
        """The step whose value ``step`` reads (its first input)."""
        return self.steps[step.inputs[0]]

    def record(self, x: torch.Tensor, steps: Sequence[Step]) -> tuple[torch.Tensor, dict[int, Any]]:
        """Run the graph on ``x`` (no grad) and return its output and the values of ``steps``' nodes,
        keyed by step index."""
        wanted = {s.node for s in steps}
        rec = Recorder(self.gm, set(self.gm.graph.nodes), keep=lambda n: n in wanted)
        with torch.no_grad():
            out = rec.run(x)
        index = {id(s): i for i, s in enumerate(self.steps)}
        return out, {index[id(s)]: rec.values[s.node] for s in steps}


class Recorder(torch.fx.Interpreter):
    """Runs a traced graph once; keeps the value of every input-independent node (and of the nodes
    ``keep`` selects) and the shape and dtype of every node."""

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        variable: set[torch.fx.Node],
        keep: Callable[[torch.fx.Node], bool],
    ):
        super().__init__(gm)
        self.variable = variable
        self.keep = keep
        self.values: dict[torch.fx.Node, Any] = {}
        self.meta: dict[torch.fx.Node, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n not in self.variable or self.keep(n):
            self.values[n] = out
        if isinstance(out, torch.Tensor):
            self.meta[n] = ("tensor", tuple(out.shape), out.dtype)
        elif isinstance(out, tuple | list) and all(isinstance(o, torch.Tensor) for o in out):
            self.meta[n] = ("tuple", tuple(tuple(o.shape) for o in out), out[0].dtype if out else None)
        else:
            self.meta[n] = ("other", None, None)
        return out


def unsupported(what: str, path: str, hint: str = "") -> NotImplementedError:
    """The error every rule raises for an operation it cannot bound (names it and its path)."""
    msg = f"no certified constant for {what} at {path!r}"
    return NotImplementedError(msg + (f"; {hint}" if hint else ""))


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace(model)`` with an error that says what to do when it fails."""
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - re-raised with advice
        raise NotImplementedError(
            f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {exc}). The bounds "
            "need the model's graph: remove data-dependent Python control flow from forward(), or "
            "wrap the untraceable part in a module with a known Lipschitz constant"
        ) from exc


# ----------------------------------------------------------------------------------------------
# the registry


class Rule:
    """An operation the walker understands: how to read its node, and its three rules.

    Subclasses set ``op`` and override :meth:`build` (read the node and add steps through the
    ``_Builder``) and, where the default does not hold, :meth:`local` and :meth:`kinks`.
    Register one instance with :func:`register` for every module type, function and tensor-method
    name that performs the operation.
    """

    op: str = ""

    def build(self, b: _Builder, node: torch.fx.Node, target: Any, path: str) -> None:
        raise NotImplementedError

    def local(self, step: Step, z: torch.Tensor) -> torch.Tensor:
        """Per-sample bound on the norm of the step's Jacobian at its input ``z`` (float64 (N,));
        by default the global constant."""
        return torch.full((z.shape[0],), float(step.const), dtype=torch.float64)

    def kinks(self, step: Step, z: torch.Tensor, flat: torch.Tensor | None = None) -> torch.Tensor | None:
        """Per sample, the fraction of the step's outputs where it is not differentiable at its input
        ``z`` (``None``: smooth everywhere); ``flat`` optionally marks the entries of ``z`` that are
        locally constant functions of the network's input."""
        return None


#: target -> rule. Targets are ``nn.Module`` subclasses, functions, and ``"method:<name>"`` strings.
RULES: dict[Any, Rule] = {}


def register(*targets: Any) -> Callable[[type[Rule]], type[Rule]]:
    """Class decorator: register one instance of the rule for every target.

    >>> @register("method:my_identity")
    ... class MyIdentity(Rule):
    ...     op = "fixed"
    ...     def build(self, b, node, target, path):
    ...         b.fixed(node, path, b.unary(node, path, "my_identity"), 1.0, "my_identity")
    >>> RULES["method:my_identity"].op
    'fixed'
    >>> del RULES["method:my_identity"]
    """

    def deco(cls: type[Rule]) -> type[Rule]:
        inst = cls()
        for t in targets:
            RULES[t] = inst
        return cls

    return deco


def _rule_for(node: torch.fx.Node, gm: torch.fx.GraphModule) -> tuple[Rule | None, Any]:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        for cls in type(m).__mro__:
            if cls in RULES:
                return RULES[cls], m
        return None, m
    if node.op == "call_method":
        return RULES.get(f"method:{node.target}"), node.target
    if node.op == "call_function":
        return RULES.get(node.target), node.target
    return None, node.target


def _bind(node: torch.fx.Node, names: Sequence[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """The node's arguments by name: positional ones in the order ``names``, then keywords."""
    out = dict(defaults)
    out.update(zip(names, node.args, strict=False))
    out.update(node.kwargs)
    return out


# ----------------------------------------------------------------------------------------------
# building a plan


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


def build_plan(model: nn.Module, input_shape: Sequence[int]) -> Plan:
    """Trace ``model`` and reduce its graph to steps, each built by its operation's rule.

    Parameters
    ----------
    model
        A module in eval mode (:func:`sensitivity_lib.validation.check_eval`) that torch.fx can trace.
    input_shape
        The shape of ONE sample, e.g. ``(C, H, W)`` (no batch axis).

    Raises
    ------
    ValueError
        The model is in training mode, or ``input_shape`` does not fit the model.
    NotImplementedError
        An operation without a rule (the message names it and its module path), or a graph torch.fx
        cannot trace.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    input_shape = tuple(int(s) for s in input_shape)
    if not input_shape or min(input_shape) <= 0:
        raise ValueError(f"input_shape must be the positive shape of one sample, got {input_shape}")
    check_eval(model)
    gm = trace(model)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise NotImplementedError(f"models with {len(placeholders)} inputs are not supported (need 1)")
    variable: set[torch.fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in variable for a in n.all_input_nodes):
            variable.add(n)
    dtype, device = _model_dtype_device(model)
    example = torch.full((1, *input_shape), 0.5, dtype=dtype, device=device)
    rec = Recorder(gm, variable, keep=lambda n: False)
    try:
        with torch.no_grad():
            rec.run(example)
    except Exception as exc:  # noqa: BLE001 - re-raised with advice
        raise ValueError(
            f"input_shape {input_shape} does not fit {type(model).__name__}: running it on a "
            f"(1, {', '.join(map(str, input_shape))}) input fails with {type(exc).__name__}: {exc}"
        ) from exc
    # input-dependent nodes that are not float tensors (sizes, shapes) are metadata, not signal
    for n in list(variable):
        kind, _, dt = rec.meta.get(n, ("other", None, None))
        if n.op == "output":
            continue
        if kind == "other":
            variable.discard(n)
            rec.values[n] = None
        elif dt is not None and not dt.is_floating_point and not dt.is_complex:
            if any(u.op != "output" for u in n.users):
                raise unsupported(
                    f"the integer-valued tensor {n.name}",
                    _node_path(n),
                    "an input-dependent index (argmax, indices) breaks continuity",
                )
    return _Builder(gm, variable, rec, input_shape, dtype).build()


def _node_path(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    prefix = ""
    if stack:
        prefix = list(stack.values())[-1][0]
        prefix = prefix if isinstance(prefix, str) else ""
    return f"{prefix}.{node.name}" if prefix else node.name


def _what(node: torch.fx.Node, target: Any) -> str:
    if node.op == "call_module":
        return f"module {type(target).__name__}"
    if node.op == "call_method":
        return f"tensor method .{target}()"
    return f"function {getattr(target, '__name__', str(target))}"


class _Builder:
    """Walks the traced graph and lets each node's rule add its steps (shared helpers below)."""

    def __init__(self, gm, variable, rec, input_shape, dtype) -> None:  # noqa: ANN001
        self.gm, self.variable, self.rec = gm, variable, rec
        self.input_shape, self.dtype = input_shape, dtype
        self.steps: list[Step] = []
        self.index: dict[torch.fx.Node, int] = {}

    def build(self) -> Plan:
        out_index = None
        for node in self.gm.graph.nodes:
            if node not in self.variable:
                continue
            if node.op == "placeholder":
                self.add(node, Step(name="input", rule=_INPUT, out_shape=self.input_shape), [])
            elif node.op == "output":
                res = node.args[0]
                if not isinstance(res, torch.fx.Node) or res not in self.index:
                    raise NotImplementedError(
                        "models whose output is not a single tensor (tuples, dicts) are not supported"
                    )
                out_index = self.index[res]
            else:
                path = _node_path(node)
                rule, target = _rule_for(node, self.gm)
                if rule is None:
                    raise unsupported(
                        _what(node, target),
                        path,
                        "supported: Conv2d, Linear, BatchNorm, pooling, elementwise activations, "
                        "softmax, dropout, flatten, padding, sums and concatenations; a new operation "
                        "is one entry of sensitivity_lib.graph.RULES",
                    )
                rule.build(self, node, target, path)
        assert out_index is not None
        return Plan(self.gm, self.steps, out_index, self.input_shape, self.dtype)

    # helpers for the rules ---------------------------------------------------------------------
    def shape(self, n: torch.fx.Node) -> tuple[int, ...]:
        return self.rec.meta[n][1]

    def const_value(self, a: Any) -> Any:
        return self.rec.values[a] if isinstance(a, torch.fx.Node) else a

    def var_args(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        return [a for a in node.all_input_nodes if a in self.variable]

    def is_var(self, a: Any) -> bool:
        return isinstance(a, torch.fx.Node) and a in self.variable

    def add(self, node: torch.fx.Node, step: Step, parents: list[torch.fx.Node]) -> Step:
        step.node = node
        step.inputs = [self.index[p] for p in parents]
        for i in step.inputs:
            self.steps[i].users += 1
        if not step.out_shape and self.rec.meta[node][0] == "tensor":
            step.out_shape = self.shape(node)[1:]
        if not step.in_shape and parents and self.rec.meta[parents[0]][0] == "tensor":
            step.in_shape = self.shape(parents[0])[1:]
        self.index[node] = len(self.steps)
        self.steps.append(step)
        return step

    def unary(self, node: torch.fx.Node, path: str, what: str) -> torch.fx.Node:
        vs = self.var_args(node)
        if len(vs) != 1:
            raise unsupported(f"{what} with {len(vs)} input-dependent operands", path)
        return vs[0]

    def fixed(self, node, path, parent, const, what) -> Step:  # noqa: ANN001
        return self.add(node, Step(name=path, rule=_FIXED, const=float(const), kind=what), [parent])

    def alias(self, node: torch.fx.Node, step_index: int) -> None:
        """Let ``node`` stand for an existing step (an operation folded into it)."""
        self.index[node] = step_index


# ----------------------------------------------------------------------------------------------
# the rules


class _Input(Rule):
    op = "input"


class _Fixed(Rule):
    """A linear or 1-Lipschitz map with an exactly known constant (its local factor too)."""

    op = "fixed"


_INPUT, _FIXED = _Input(), _Fixed()


@register(
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.Flatten,
    nn.Unflatten, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
)  # fmt: skip
class ShapeModule(_Fixed):
    """Identity, reshapes, constant padding and dropout modules (dropout only at inference, which
    :func:`build_plan` checks): constant 1."""

    def build(self, b, node, target, path):  # noqa: ANN001
        b.fixed(node, path, b.unary(node, path, type(target).__name__), 1.0, type(target).__name__)


_RESHAPE_METHODS = (
    "view reshape flatten contiguous permute transpose squeeze unsqueeze clone detach float double to "
    "type type_as expand_as view_as reshape_as t unflatten movedim neg"
).split()
_RESHAPE_FUNCTIONS = (
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose, torch.permute,
    torch.clone, torch.t, torch.movedim, torch.detach, operator.neg, torch.neg,
)  # fmt: skip


@register(*_RESHAPE_FUNCTIONS, *(f"method:{m}" for m in _RESHAPE_METHODS))
class Reshape(_Fixed):
    """Reshapes, permutations, copies, casts and negation: isometries, constant 1."""

    def build(self, b, node, target, path):  # noqa: ANN001
        name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        b.fixed(node, path, b.unary(node, path, name), 1.0, name)


@register(F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout)
class DropoutFunction(_Fixed):
    """``F.dropout(..., training=False)``: the identity (``training=True`` is random: refused)."""

    def build(self, b, node, target, path):  # noqa: ANN001
        args = _bind(node, ("input", "p", "training", "inplace"), {"training": True})
        if bool(args["training"]):
            raise unsupported(
                f"{target.__name__} with training=True (random)", path,
                "pass training=self.training and call model.eval()",
            )  # fmt: skip
        b.fixed(node, path, b.unary(node, path, target.__name__), 1.0, target.__name__)


@register(F.pad)
class Pad(_Fixed):
    """``F.pad`` with a constant: the padded map embeds the input isometrically, constant 1."""

    def build(self, b, node, target, path):  # noqa: ANN001
        mode = _bind(node, ("input", "pad", "mode", "value"), {"mode": "constant"})["mode"]
        if mode != "constant":
            raise unsupported(f"F.pad(mode={mode!r})", path, "only constant padding is certified")
        b.fixed(node, path, b.unary(node, path, "pad"), 1.0, "pad")


@register(operator.getitem)
class GetItem(_Fixed):
    """Slicing after the batch axis (a projection, constant 1), or one output of a tuple."""

    def build(self, b, node, target, path):  # noqa: ANN001
        src, idx = node.args[0], node.args[1]
        parent = b.unary(node, path, "indexing")
        if parent is not src:
            raise unsupported("indexing with an input-dependent index", path)
        items = idx if isinstance(idx, tuple) else (idx,)
        ok = all(isinstance(i, int | slice | type(None) | type(Ellipsis)) for i in items)
        if b.rec.meta[src][0] == "tuple":
            ok = isinstance(idx, int)
        elif items and isinstance(items[0], int):
            ok = False  # would select one sample of the batch
        elif items and isinstance(items[0], slice) and items[0] != slice(None):
            ok = False
        if not ok:
            raise unsupported(
                f"indexing with {idx!r}", path,
                "only slices and integers after the batch axis are certified (a projection, constant 1)",
            )  # fmt: skip
        b.fixed(node, path, parent, 1.0, "getitem")


@register(torch.mean, torch.sum, "method:mean", "method:sum")
class Reduction(_Fixed):
    """``mean`` over ``n`` entries: ``1 / sqrt(n)``; ``sum``: ``sqrt(n)`` (Cauchy-Schwarz, exact)."""

    def build(self, b, node, target, path):  # noqa: ANN001
        name = target if isinstance(target, str) else target.__name__
        parent = b.unary(node, path, name)
        dim = _bind(node, ("input", "dim"), {"dim": None})["dim"]
        shape = b.shape(parent)
        if dim is None:
            raise unsupported(f"{name}() over all axes (it mixes the samples of a batch)", path)
        dims = [dim] if isinstance(dim, int) else list(dim)
        dims = [d % len(shape) for d in dims]
        if 0 in dims:
            raise unsupported(f"{name} over the batch axis", path)
        n = math.prod(shape[d] for d in dims)
        b.fixed(node, path, parent, 1.0 / math.sqrt(n) if name == "mean" else math.sqrt(n), name)


@register(nn.AvgPool2d, nn.AdaptiveAvgPool2d, F.avg_pool2d, F.adaptive_avg_pool2d)
class AvgPool(_Fixed):
    """Average pools: the exact norm ``||A_h|| ||A_w||``, checked against PyTorch on a random input."""

    def build(self, b, node, target, path):  # noqa: ANN001
        if isinstance(target, nn.AvgPool2d):
            m = target
            cfg = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                       ceil_mode=m.ceil_mode, count_include_pad=m.count_include_pad,
                       divisor_override=m.divisor_override)  # fmt: skip
        elif isinstance(target, nn.AdaptiveAvgPool2d):
            cfg = dict(adaptive=target.output_size)
        elif target is F.avg_pool2d:
            names = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                     "divisor_override")  # fmt: skip
            a = _bind(node, names, dict(stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                                        divisor_override=None))  # fmt: skip
            cfg = {k: a[k] for k in names[1:]}
        else:
            cfg = dict(adaptive=_bind(node, ("input", "output_size"), {})["output_size"])
        parent = b.unary(node, path, "average pool")
        H, W = b.shape(parent)[-2:]
        adaptive = cfg.pop("adaptive", None)
        norm, (Ah, Aw) = avg_pool_norm((H, W), **cfg, adaptive_output=adaptive) if adaptive is None else (
            avg_pool_norm((H, W), None, adaptive_output=adaptive))  # fmt: skip
        g = torch.Generator().manual_seed(0)
        x = torch.rand(1, 1, H, W, generator=g, dtype=torch.float64)
        if adaptive is not None:
            ref = F.adaptive_avg_pool2d(x, adaptive)
        else:
            s = cfg["stride"] if cfg["stride"] not in (None, [], ()) else cfg["kernel_size"]
            ref = F.avg_pool2d(x, cfg["kernel_size"], s, cfg["padding"], cfg["ceil_mode"],
                               cfg["count_include_pad"], cfg["divisor_override"])  # fmt: skip
        mine = Ah @ x[0, 0] @ Aw.T
        if mine.shape != ref.shape[-2:] or not torch.allclose(mine, ref[0, 0], rtol=1e-10, atol=1e-12):
            raise RuntimeError(f"average-pool model disagrees with PyTorch at {path!r}")
        step = b.fixed(node, path, parent, norm, "avgpool")
        step.params.update(Ah=Ah, Aw=Aw)  # the map is Ah X Aw^T per channel (fusions read it)


def interpolate_norm(
    in_hw: tuple[int, int],
    size: Any = None,
    scale_factor: Any = None,
    mode: str = "nearest",
    align_corners: bool | None = None,
    recompute_scale_factor: bool | None = None,
) -> tuple[float, tuple[torch.Tensor, torch.Tensor]]:
    """Exact 2-norm of a 2-D resampling ``F.interpolate`` (one channel; the channels are independent).

    Every 2-D mode of ``F.interpolate`` without anti-aliasing (``nearest``, ``nearest-exact``,
    ``bilinear``, ``bicubic``, ``area``) resamples the rows and the columns independently, so the
    operator is ``A_h (x) A_w`` and its norm ``||A_h||_2 ||A_w||_2``. Each 1-D factor is read off
    PyTorch itself, by resampling the unit vectors of one axis with the other axis left at size 1
    (a resampling from 1 to 1 entry is the identity in every mode).

    Parameters
    ----------
    in_hw
        ``(H, W)`` of the input.
    size, scale_factor, mode, align_corners, recompute_scale_factor
        As in ``torch.nn.functional.interpolate``.

    Returns
    -------
    (float, (Tensor, Tensor))
        The norm and the two 1-D factors (float64).

    Example
    -------
    >>> round(interpolate_norm((4, 4), scale_factor=2)[0], 12)   # each pixel copied 2 x 2 times
    2.0
    """
    H, W = in_hw

    def factor(n: int, axis: int) -> torch.Tensor:
        eye = torch.eye(n, dtype=torch.float64)
        inp = eye.view(n, 1, n, 1) if axis == 0 else eye.view(n, 1, 1, n)
        kw: dict[str, Any] = {"mode": mode}
        if mode not in ("nearest", "nearest-exact", "area"):
            kw["align_corners"] = align_corners
        if size is not None:
            s = as_pair(size)[axis]
            kw["size"] = (s, 1) if axis == 0 else (1, s)
        else:
            sf = scale_factor if isinstance(scale_factor, tuple | list) else (scale_factor, scale_factor)
            f = float(sf[0] if axis == 0 else sf[-1])
            kw["scale_factor"] = (f, 1.0) if axis == 0 else (1.0, f)
            kw["recompute_scale_factor"] = recompute_scale_factor
        out = F.interpolate(inp, **kw)
        return (out[:, 0, :, 0] if axis == 0 else out[:, 0, 0, :]).T.contiguous()

    Ah, Aw = factor(H, 0), factor(W, 1)
    norm = float(torch.linalg.matrix_norm(Ah, 2) * torch.linalg.matrix_norm(Aw, 2))
    return norm, (Ah, Aw)


@register(nn.Upsample, F.interpolate)
class Interpolate(_Fixed):
    """Resampling (``nn.Upsample``, ``F.interpolate``): linear, the exact norm ``||A_h|| ||A_w||`` of its
    Kronecker factors (:func:`interpolate_norm`), checked against PyTorch on a random input."""

    def build(self, b, node, target, path):  # noqa: ANN001
        if isinstance(target, nn.Upsample):
            cfg = dict(size=target.size, scale_factor=target.scale_factor, mode=target.mode,
                       align_corners=target.align_corners,
                       recompute_scale_factor=target.recompute_scale_factor)  # fmt: skip
            antialias = False
        else:
            names = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor",
                     "antialias")  # fmt: skip
            a = _bind(node, names, dict(size=None, scale_factor=None, mode="nearest", align_corners=None,
                                        recompute_scale_factor=None, antialias=False))  # fmt: skip
            cfg = {k: b.const_value(a[k]) for k in names[1:6]}
            antialias = bool(a["antialias"])
        parent = b.unary(node, path, "interpolation")
        shape = b.shape(parent)
        if len(shape) != 4:
            raise unsupported(f"{len(shape) - 2}-d interpolation", path, "only 2-d resampling is certified")
        if antialias:
            raise unsupported("interpolation with antialias=True", path)
        H, W = shape[-2:]
        norm, (Ah, Aw) = interpolate_norm((H, W), **cfg)
        x = torch.rand(1, 1, H, W, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        kw = {k: v for k, v in cfg.items() if v is not None}
        if cfg["mode"] in ("nearest", "nearest-exact", "area"):
            kw.pop("align_corners", None)
        ref = F.interpolate(x, **kw)
        mine = Ah @ x[0, 0] @ Aw.T
        if mine.shape != ref.shape[-2:] or not torch.allclose(mine, ref[0, 0], rtol=1e-10, atol=1e-12):
            raise unsupported(f"interpolation mode {cfg['mode']!r}", path, "it is not a separable resampling")
        b.fixed(node, path, parent, norm, f"interpolate({cfg['mode']})")


@register(nn.MaxPool2d, nn.AdaptiveMaxPool2d, F.max_pool2d, F.adaptive_max_pool2d)
class MaxPool(Rule):
    """Max-pools: ``sqrt(m)`` globally (``m`` the largest number of windows holding one pixel);
    locally ``sqrt`` of the largest number of outputs that *select* one input at ``z``; not
    differentiable where a window's maximum is tied between entries that are not locally constant."""

    op = "maxpool"

    def build(self, b, node, target, path):  # noqa: ANN001
        if isinstance(target, nn.MaxPool2d):
            m = target
            cfg = dict(k=m.kernel_size, s=m.stride, p=m.padding, d=m.dilation, ceil=m.ceil_mode)
            adaptive, ret = None, m.return_indices
        elif isinstance(target, nn.AdaptiveMaxPool2d):
            cfg, adaptive, ret = {}, target.output_size, target.return_indices
        elif target is F.max_pool2d:
            names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
            a = _bind(node, names, dict(stride=None, padding=0, dilation=1, ceil_mode=False,
                                        return_indices=False))  # fmt: skip
            cfg = dict(k=a["kernel_size"], s=a["stride"], p=a["padding"], d=a["dilation"],
                       ceil=bool(a["ceil_mode"]))  # fmt: skip
            adaptive, ret = None, a["return_indices"]
        else:
            a = _bind(node, ("input", "output_size", "return_indices"), {"return_indices": False})
            cfg, adaptive, ret = {}, a["output_size"], a["return_indices"]
        if ret:
            raise unsupported("max-pool with return_indices=True", path)
        parent = b.unary(node, path, "max-pool")
        H, W = b.shape(parent)[-2:]
        if adaptive is not None:
            oh, ow = _adaptive_size(adaptive, H, W)
            wins = (adaptive_windows_1d(H, oh), adaptive_windows_1d(W, ow))
        else:
            (kh, kw), (ph, pw), (dh, dw) = as_pair(cfg["k"]), as_pair(cfg["p"]), as_pair(cfg["d"])
            sh, sw = as_pair(cfg["s"] if cfg["s"] not in (None, [], ()) else cfg["k"])
            wins = (pool_windows_1d(H, kh, sh, ph, dh, cfg["ceil"]),
                    pool_windows_1d(W, kw, sw, pw, dw, cfg["ceil"]))  # fmt: skip
        if (len(wins[0]), len(wins[1])) != tuple(b.shape(node)[-2:]):
            raise RuntimeError(f"max-pool window model disagrees with PyTorch's output size at {path!r}")
        m = pool_window_multiplicity(wins[0], H) * pool_window_multiplicity(wins[1], W)
        step = Step(name=path, rule=self, const=math.sqrt(m), params={"windows": wins, "multiplicity": m})
        b.add(node, step, [parent])

    def local(self, step, z):  # noqa: ANN001
        N, C, H, W = z.shape
        vals, flat = window_values(step, z)
        arg = vals.argmax(-1)  # ties: the first index, like PyTorch
        chosen = torch.gather(flat.expand(N, C, *flat.shape), -1, arg[..., None])[..., 0]
        counts = torch.zeros(N, C, H * W, dtype=torch.float64)
        ones = torch.ones_like(chosen.reshape(N, C, -1), dtype=torch.float64)
        counts.scatter_add_(2, chosen.reshape(N, C, -1), ones)
        return counts.reshape(N, -1).max(1).values.sqrt()

    def kinks(self, step, z, flat=None):  # noqa: ANN001
        """A tie is a kink only when the tied entries are not all locally constant: ``flat`` (0/1,
        the shape of ``z``) marks entries that the activation before the pool clamps flat (e.g. a
        ReLU's negative inputs); a maximum tied among such entries is locally constant, hence
        differentiable."""
        N = z.shape[0]
        vals, _ = window_values(step, z)
        at_top = vals == vals.max(-1, keepdim=True).values
        tied = at_top.sum(-1) > 1
        if flat is not None:
            const, _ = window_values(step, flat.to(z.dtype))
            tied = tied & ((at_top & (const == 0)).sum(-1) > 0)  # a tied maximum that moves
        return tied.reshape(N, -1).double().mean(1)


def window_values(step: Step, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values of every max-pool window, ``(N, C, oh, ow, k)`` padded with ``-inf``, and the flat
    input index of every entry, ``(oh, ow, k)``."""
    N, C, H, W = z.shape
    wins_h, wins_w = step.params["windows"]
    kh, kw = max(map(len, wins_h)), max(map(len, wins_w))
    idx_h = torch.tensor([w + [-1] * (kh - len(w)) for w in wins_h])
    idx_w = torch.tensor([w + [-1] * (kw - len(w)) for w in wins_w])
    valid = ((idx_h >= 0)[:, None, :, None] & (idx_w >= 0)[None, :, None, :]).reshape(
        len(wins_h), len(wins_w), -1
    )
    flat = (idx_h.clamp_min(0)[:, None, :, None] * W + idx_w.clamp_min(0)[None, :, None, :]).reshape(
        valid.shape
    )
    vals = z.reshape(N, C, H * W)[:, :, flat.reshape(-1)].reshape(N, C, *flat.shape)
    return vals.masked_fill(~valid, -math.inf), flat


_ACT_FUNCTIONS: dict[Any, tuple[str, tuple[str, ...], dict[str, Any]]] = {
    F.relu: ("relu", (), {}), torch.relu: ("relu", (), {}), F.relu_: ("relu", (), {}),
    torch.relu_: ("relu", (), {}), F.relu6: ("relu6", (), {}),
    F.leaky_relu: ("leaky_relu", ("negative_slope",), {"negative_slope": 0.01}),
    F.hardtanh: ("hardtanh", ("min_val", "max_val"), {"min_val": -1.0, "max_val": 1.0}),
    torch.tanh: ("tanh", (), {}), F.tanh: ("tanh", (), {}), torch.sigmoid: ("sigmoid", (), {}),
    F.sigmoid: ("sigmoid", (), {}), F.elu: ("elu", ("alpha",), {"alpha": 1.0}), F.silu: ("silu", (), {}),
    F.gelu: ("gelu", (), {"approximate": "none"}),
    F.softplus: ("softplus", ("beta", "threshold"), {"beta": 1.0, "threshold": 20.0}),
    "method:relu": ("relu", (), {}), "method:relu_": ("relu", (), {}), "method:tanh": ("tanh", (), {}),
    "method:sigmoid": ("sigmoid", (), {}),
}  # fmt: skip


def _act_from_module(m: nn.Module) -> tuple[str, dict[str, Any]]:
    if isinstance(m, nn.ReLU6):
        return "relu6", {}
    if isinstance(m, nn.Hardtanh):
        return "hardtanh", {"min_val": m.min_val, "max_val": m.max_val}
    if isinstance(m, nn.ReLU):
        return "relu", {}
    if isinstance(m, nn.LeakyReLU):
        return "leaky_relu", {"negative_slope": m.negative_slope}
    if isinstance(m, nn.ELU):
        return "elu", {"alpha": m.alpha}
    if isinstance(m, nn.GELU):
        return "gelu", {"approximate": m.approximate}
    if isinstance(m, nn.Softplus):
        return "softplus", {"beta": m.beta, "threshold": m.threshold}
    return {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SiLU: "silu"}[type(m)], {}


@register(
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SiLU, nn.GELU,
    nn.Softplus, *_ACT_FUNCTIONS,
)  # fmt: skip
class Activation(Rule):
    """Elementwise activations: constant ``max |f'|``; locally ``max |f'(z)|``; kinks of the
    piecewise-linear ones at their break points."""

    op = "act"

    def build(self, b, node, target, path):  # noqa: ANN001
        if isinstance(target, nn.Module):
            kind, params = _act_from_module(target)
        else:
            kind, names, defaults = _ACT_FUNCTIONS[f"method:{target}" if isinstance(target, str) else target]
            a = _bind(node, ("input", *names), defaults)
            params = {k: a[k] for k in defaults}
        name = kind if not isinstance(target, nn.Module) else type(target).__name__
        parent = b.unary(node, path, name)
        step = Step(name=path, rule=self, const=activation_constant(kind, params), kind=kind, params=params)
        b.add(node, step, [parent])

    def derivative(self, step: Step, z: torch.Tensor) -> torch.Tensor:
        return activation_derivative(step.kind, step.params, z)

    def local(self, step, z):  # noqa: ANN001
        return self.derivative(step, z).to(torch.float64).abs().reshape(z.shape[0], -1).max(1).values

    def kinks(self, step, z, flat=None):  # noqa: ANN001
        if step.kind not in _KINKS:
            return None
        at = torch.zeros_like(z, dtype=torch.bool)
        for k in _KINKS[step.kind]:
            at |= z == k
        return at.reshape(z.shape[0], -1).double().mean(1)

    def flat_at(self, step: Step, z: torch.Tensor) -> torch.Tensor | None:
        """Where the activation is locally constant at ``z`` (strictly inside a flat piece), as a
        0/1 tensor of ``z``'s shape; ``None`` for activations without flat pieces."""
        if step.kind == "relu":
            return (z < 0).to(torch.uint8)
        if step.kind == "relu6":
            return ((z < 0) | (z > 6)).to(torch.uint8)
        if step.kind == "hardtanh":
            lo, hi = float(step.params.get("min_val", -1.0)), float(step.params.get("max_val", 1.0))
            return ((z < lo) | (z > hi)).to(torch.uint8)
        return None


@register(nn.Softmax, F.softmax, torch.softmax, "method:softmax")
class Softmax(Rule):
    """Softmax: constant 1/2 (``diag(p) - p p^T`` is the covariance of a one-hot vector); locally
    the exact ``||diag(p) - p p^T||`` over the last axis."""

    op = "softmax"

    def build(self, b, node, target, path):  # noqa: ANN001
        if isinstance(target, nn.Module):
            dim = target.dim
        else:
            dim = _bind(node, ("input", "dim"), {"dim": None})["dim"]
        step = Step(name=path, rule=self, const=0.5, params={"dim": dim})
        b.add(node, step, [b.unary(node, path, "softmax")])

    def local(self, step, z):  # noqa: ANN001
        if z.ndim != 2 or step.params.get("dim") not in (-1, 1):
            return torch.full((z.shape[0],), 0.5, dtype=torch.float64)
        return softmax_jacobian_norm(z)


def softmax_jacobian_norm(z: torch.Tensor) -> torch.Tensor:
    """Exact ``||diag(p) - p p^T||_2`` per sample for a softmax over the last axis of ``(N, C)``."""
    p = torch.softmax(z.to(torch.float64), dim=1)
    J = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.linalg.eigvalsh(J)[:, -1].clamp_min(0)


def _bn_scale(running_var: torch.Tensor, eps: float, weight: torch.Tensor | None) -> torch.Tensor:
    scale = 1.0 / torch.sqrt(running_var.to(torch.float64) + eps)
    if weight is not None:
        scale = scale * weight.detach().to(torch.float64)
    return scale


@register(nn.Conv2d, nn.Linear, F.conv2d, torch.conv2d, F.linear)
class Linear(Rule):
    """Convolutions and linear layers with constant weights: their operator norm at the real input
    size (chosen by the caller: certified, approximate, or local with a mask)."""

    op = "linear"

    def build(self, b, node, target, path):  # noqa: ANN001
        if isinstance(target, nn.Conv2d):
            if target.padding_mode != "zeros":
                raise unsupported(f"Conv2d with padding_mode={target.padding_mode!r}", path,
                                  "only zero padding is certified")  # fmt: skip
            parent = b.unary(node, path, "Conv2d")
            cfg = dict(stride=target.stride, padding=target.padding, dilation=target.dilation,
                       groups=target.groups)  # fmt: skip
            self._add(b, node, path, parent, target.weight, "conv", cfg)
            return
        if isinstance(target, nn.Linear):
            self._add(b, node, path, b.unary(node, path, "Linear"), target.weight, "linear", {})
            return
        conv = target is not F.linear
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups") if conv else (
            "input", "weight", "bias")  # fmt: skip
        a = _bind(node, names, dict(bias=None, stride=1, padding=0, dilation=1, groups=1))
        parent, wnode = a["input"], a["weight"]
        what = "conv2d" if conv else "linear"
        if not b.is_var(parent) or len(b.var_args(node)) != 1:
            raise unsupported(f"{what} whose weight depends on the input", path)
        if isinstance(wnode, torch.fx.Node) and wnode.op == "get_attr":
            path = str(wnode.target).rsplit(".", 1)[0]
        cfg = {}
        if conv:
            cfg = {k: a[k] for k in ("stride", "padding", "dilation")} | {"groups": int(a["groups"])}
        self._add(b, node, path, parent, b.const_value(wnode), "conv" if conv else "linear", cfg)

    def _add(self, b, node, path, parent, weight, kind, cfg) -> None:  # noqa: ANN001
        if not isinstance(weight, torch.Tensor):
            raise unsupported(f"{kind} with a non-tensor weight", path)
        w = weight.detach()
        in_shape = b.shape(parent)[1:]
        if kind == "conv" and (w.ndim != 4 or len(in_shape) != 3):
            raise unsupported(f"a {w.ndim - 2}-d convolution", path, "only Conv2d is supported")
        step = Step(name=path, rule=self, kind=kind, in_shape=tuple(in_shape), params={"weight": w, **cfg})
        b.add(node, step, [parent])
        self.finish(step)

    @staticmethod
    def finish(step: Step) -> None:
        """(Re)build the bias-free module and linear map from ``params["weight"]``."""
        w = step.params["weight"]
        if step.kind == "conv":
            cout, cin_g, kh, kw = w.shape
            g = int(step.params["groups"])
            m = nn.Conv2d(cin_g * g, cout, (kh, kw), stride=step.params["stride"],
                          padding=step.params["padding"], dilation=step.params["dilation"], groups=g,
                          bias=False, device=w.device, dtype=w.dtype)  # fmt: skip
        else:
            m = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            m.weight.copy_(w)
        step.module = m.eval().requires_grad_(False)
        step.apply = step.module.forward


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, F.batch_norm)
class BatchNorm(Rule):
    """Batch norm at inference: folded into the conv / linear layer before it when that layer feeds
    it alone (``W' = diag(scale) W``; the shift does not matter), else the diagonal map
    ``max_c |gamma_c| / sqrt(var_c + eps)``."""

    op = "diag"

    def build(self, b, node, target, path):  # noqa: ANN001
        if isinstance(target, nn.Module):
            if target.running_var is None:
                raise unsupported("BatchNorm without running statistics", path,
                                  "it uses batch statistics even at inference; not a fixed map")  # fmt: skip
            scale = _bn_scale(target.running_var, target.eps, target.weight)
        else:
            names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
            a = _bind(node, names, dict(weight=None, bias=None, training=False, momentum=0.1, eps=1e-5))
            if bool(a["training"]):
                raise unsupported("F.batch_norm(training=True)", path, "call model.eval()")
            scale = _bn_scale(b.const_value(a["running_var"]), float(a["eps"]), b.const_value(a["weight"]))
        parent = b.unary(node, path, "batch norm")
        pi = b.index[parent]
        prev = b.steps[pi]
        fold = prev.op == "linear" and prev.params["weight"].shape[0] == scale.numel()
        if fold and len(parent.users) == 1 and prev.folded is None:
            w = prev.params["weight"]
            view = (-1,) + (1,) * (w.ndim - 1)
            prev.params["weight"] = (w.to(torch.float64) * scale.view(view)).to(w.dtype)
            prev.folded = path
            Linear.finish(prev)
            prev.node = node
            prev.out_shape = b.shape(node)[1:]
            b.alias(node, pi)
            return
        view = (1, -1) + (1,) * (len(b.shape(node)) - 2)
        step = Step(name=path, rule=_DIAG, kind="batchnorm", params={"scale": scale.view(view)},
                    const=float(scale.abs().max()))  # fmt: skip
        b.add(node, step, [parent])


class Diagonal(Rule):
    """Elementwise multiplication by a constant ``scale``: ``max |scale|``, also locally."""

    op = "diag"


_DIAG = Diagonal()


@register(operator.mul, operator.imul, torch.mul, torch.multiply, operator.truediv, operator.itruediv,
          torch.div, torch.divide, torch.true_divide, "method:mul", "method:mul_", "method:div",
          "method:div_")  # fmt: skip
class Scale(Diagonal):
    """Multiplication by a constant ``c`` (``max |c|``) and division (``1 / min |c|``); a product of
    two input-dependent tensors has no global constant from layer norms (refused)."""

    def build(self, b, node, target, path):  # noqa: ANN001
        name = target if isinstance(target, str) else getattr(target, "__name__", "")
        divide = "div" in name
        a = node.args[0] if node.args else node.kwargs.get("input")
        c_ = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        avar, bvar = b.is_var(a), b.is_var(c_)
        what = "division" if divide else "multiplication"
        if avar and bvar:
            raise unsupported(
                f"{what} of two input-dependent tensors", path,
                "a product of signals (e.g. squeeze-and-excitation gating) has no "
                "global Lipschitz constant from layer norms",
            )  # fmt: skip
        if divide and not avar:
            raise unsupported("division by an input-dependent tensor", path)
        if node.kwargs.get("rounding_mode") is not None:
            raise unsupported("rounding division", path)
        parent, c = (a, b.const_value(c_)) if avar else (c_, b.const_value(a))
        c = torch.as_tensor(c, dtype=torch.float64)
        if divide:
            if bool((c == 0).any()):
                raise ValueError(f"division by zero at {path!r}")
            c = 1.0 / c
        out_shape = b.shape(node)
        if c.numel() > 1 and tuple(torch.broadcast_shapes(c.shape, out_shape)) != tuple(out_shape):
            raise unsupported(f"{what} that broadcasts the signal", path)
        if c.ndim >= len(out_shape) and c.ndim > 0 and c.shape[0] != 1:
            raise unsupported(f"{what} by a tensor with a batch axis", path)
        step = Step(name=path, rule=self, kind=what, params={"scale": c}, const=float(c.abs().max()))
        b.add(node, step, [parent])


@register(operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub, torch.subtract,
          "method:add", "method:add_", "method:sub", "method:sub_")  # fmt: skip
class Add(Rule):
    """Sums ``sum_i w_i a_i`` of input-dependent nodes: ``L = sum_i |w_i| L_i``; adding a constant
    changes nothing."""

    op = "add"

    def build(self, b, node, target, path):  # noqa: ANN001
        a = node.args[0] if node.args else node.kwargs.get("input")
        c = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        alpha = abs(float(node.kwargs.get("alpha", 1.0)))
        parents, weights = [], []
        for arg, w in ((a, 1.0), (c, alpha)):
            if b.is_var(arg):
                parents.append(arg)
                weights.append(w)
        if not parents:
            raise unsupported("addition", path)
        if len(parents) == 1 and weights[0] == 1.0:
            b.fixed(node, path, parents[0], 1.0, "add constant")
            return
        b.add(node, Step(name=path, rule=self, weights=weights), parents)


@register(torch.cat, torch.concat, torch.concatenate, torch.stack)
class Cat(Rule):
    """Concatenation (and stacking) after the batch axis: ``L = sqrt(sum_i L_i^2)``."""

    op = "cat"

    def build(self, b, node, target, path):  # noqa: ANN001
        a = _bind(node, ("tensors", "dim"), {"dim": 0})
        nd = len(b.shape(node))
        if int(a["dim"]) % nd == 0:
            what = "stacking" if target is torch.stack else "concatenation"
            raise unsupported(f"{what} along the batch axis", path)
        parents = [t for t in a["tensors"] if b.is_var(t)]
        b.add(node, Step(name=path, rule=self, weights=[1.0] * len(parents)), parents)


# ----------------------------------------------------------------------------------------------
# propagation


def log2_sum(terms: Sequence[float]) -> float:
    """``log2(sum 2**t)`` for float64 log2 terms, without overflow.

    >>> log2_sum([1.0, 1.0])
    2.0
    """
    finite = [t for t in terms if t != -math.inf]
    if not finite:
        return -math.inf
    m = max(finite)
    if m == math.inf:
        return math.inf
    return m + math.log2(sum(2.0 ** (t - m) for t in finite))


def _log2sum_rows(terms: list[torch.Tensor]) -> torch.Tensor:
    return torch.logsumexp(torch.stack(terms, 0) * math.log(2.0), dim=0) / math.log(2.0)


def propagate(plan: Plan, factor: Callable[[Step], torch.Tensor | float]) -> list[torch.Tensor]:
    """log2 of the Lipschitz constant (or local bound) from the input to every step.

    ``factor(step)`` returns log2 of the step's own factor for one-input steps, a float or a float64
    tensor ``(N,)`` (one value per sample, for local bounds); ``add`` combines its inputs by
    ``log2 sum_i w_i 2^{L_i}`` and ``cat`` by ``log2 sqrt(sum_i 4^{L_i})``. Everything stays in
    log2 (float64), so products of hundreds of norms neither overflow nor lose precision.

    Returns
    -------
    list of torch.Tensor
        float64 ``(N,)`` per step (``N = 1`` when every factor is a float).

    Example
    -------
    >>> import torch
    >>> from torch import nn
    >>> plan = build_plan(nn.Sequential(nn.Flatten(), nn.Softmax(-1)).eval(), (4,))
    >>> [float(v) for v in propagate(plan, lambda s: math.log2(s.const))]
    [0.0, 0.0, -1.0]
    """
    logs: list[torch.Tensor] = []
    for step in plan.steps:
        if step.op == "input":
            logs.append(torch.zeros(1, dtype=torch.float64))
        elif step.op == "add":
            terms = [logs[i] + _log2(w) for i, w in zip(step.inputs, step.weights, strict=True)]
            logs.append(_log2sum_rows(list(torch.broadcast_tensors(*terms))))
        elif step.op == "cat":
            terms = [2 * logs[i] for i in step.inputs]
            logs.append(0.5 * _log2sum_rows(list(torch.broadcast_tensors(*terms))))
        else:
            f = torch.as_tensor(factor(step), dtype=torch.float64).reshape(-1)
            logs.append(f + logs[step.inputs[0]])
    return logs


def _log2(v: float) -> float:
    return math.log2(v) if v > 0 else -math.inf


# ----------------------------------------------------------------------------------------------
# the Jacobian at a point, replayed


def _node_value(gm: torch.fx.GraphModule, n: torch.fx.Node, args: tuple, kwargs: dict) -> Any:
    if n.op == "call_module":
        return gm.get_submodule(n.target)(*args, **kwargs)
    if n.op == "call_function":
        return n.target(*args, **kwargs)
    return getattr(args[0], n.target)(*args[1:], **kwargs)  # call_method


def _fallback(gm: torch.fx.GraphModule, n: torch.fx.Node, args: tuple, kwargs: dict,
              deps: list[torch.fx.Node]) -> Callable[[list[torch.Tensor]], torch.Tensor]:  # fmt: skip
    """``J v`` of one node by ``torch.func.jvp`` at its recorded inputs (copied: a later in-place
    operation must not change them)."""
    prim = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    kw = {k: a.clone() if isinstance(a, torch.Tensor) else a for k, a in kwargs.items()}
    slots = [i for i, a in enumerate(n.args) if a in deps]
    if len(slots) != len(deps) or any(a in deps for a in n.kwargs.values()):
        raise NotImplementedError(f"tangent_map: {n.op} {n.target} reads the input in a nested argument")

    def f(*vs: torch.Tensor) -> torch.Tensor:
        full = list(prim)
        for i, v in zip(slots, vs, strict=True):
            full[i] = v
        return _node_value(gm, n, tuple(full), kw)

    primals = tuple(prim[i] for i in slots)
    return lambda t: torch.func.jvp(f, primals, tuple(t))[1]


def tangent_map(model: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v -> J(x) v`` for a batch ``x`` (each sample's Jacobian applied to its own ``v``), by one
    forward pass that records what the derivative needs (ReLU masks, max-pool indices, batch-norm
    scales) and then, per call, a replay of the traced graph on ``v`` alone.

    Convolutions and linear layers replay without their bias, ReLU as a mask, max pooling as a
    gather of the recorded indices, batch norm at inference as its scale; reshapes, dropout at
    inference, average pools and the addition, subtraction or division of constants apply as they
    are; sums and concatenations combine the tangents. Any other operation that depends on the input
    is differentiated by ``torch.func.jvp`` at its recorded inputs, so the result is always the
    Jacobian product (to rounding), and fast where the rules apply: for VGG-19 at 224 x 224 one
    product took 0.25 s on 2 threads, against 0.49 s for reverse over reverse and 0.95 s for
    ``torch.func.jvp`` on the whole network.

    Parameters
    ----------
    model
        A module in eval mode that torch.fx can trace (:func:`trace`).
    x
        The batch ``(N, ...)`` at which the Jacobians are taken.

    Example
    -------
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double().eval()
    >>> x, v = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    >>> ref = torch.func.jvp(net, (x,), (v,))[1]
    >>> bool(torch.allclose(tangent_map(net, x)(v), ref, rtol=1e-12, atol=1e-14))
    True
    """
    gm = trace(model)
    prim: dict[torch.fx.Node, Any] = {}
    var: set[torch.fx.Node] = set()
    prog: list[tuple[torch.fx.Node, list[torch.fx.Node], Callable]] = []
    out: Any = None

    def val(a: Any) -> Any:
        return prim[a] if isinstance(a, torch.fx.Node) else a

    with torch.no_grad():
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                if var:
                    raise NotImplementedError("tangent_map: models with more than one input")
                prim[n] = x
                var.add(n)
                continue
            if n.op == "output":
                out = n.args[0]
                break
            if n.op == "get_attr":
                obj: Any = gm
                for part in n.target.split("."):
                    obj = getattr(obj, part)
                prim[n] = obj
                continue
            args = torch.fx.node.map_arg(n.args, val)
            kwargs = torch.fx.node.map_arg(n.kwargs, val)
            deps = [a for a in n.all_input_nodes if a in var]
            if not deps:
                prim[n] = _node_value(gm, n, args, kwargs)
                continue
            # the rule (or the fallback's copy of the inputs) before the node runs: it may work in place
            fn: Any = _tangent_rule(gm, n, args, kwargs, deps)
            if fn is None:
                try:
                    fn = _fallback(gm, n, args, kwargs, deps)
                except NotImplementedError as exc:
                    fn = exc
            value = _node_value(gm, n, args, kwargs)
            if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
                prim[n] = value  # sizes, indices: no derivative to carry
                continue
            if isinstance(fn, NotImplementedError):
                raise fn
            var.add(n)
            prog.append((n, deps, fn))
            prim[n] = value
    if not isinstance(out, torch.fx.Node) or out not in var:
        raise NotImplementedError(
            "tangent_map: the model's output must be one tensor that depends on the input"
        )
    first = next(n for n in gm.graph.nodes if n.op == "placeholder")

    def apply(v: torch.Tensor) -> torch.Tensor:
        tan = {first: v}
        with torch.no_grad():
            for n, deps, fn in prog:
                tan[n] = fn([tan[d] for d in deps])
        return tan[out]

    return apply


def _tangent_rule(
    gm: torch.fx.GraphModule, n: torch.fx.Node, args: tuple, kwargs: dict, deps: list[torch.fx.Node]
) -> Callable[[list[torch.Tensor]], torch.Tensor] | None:
    """The replay of one node on tangents, for the operations :func:`tangent_map` knows (``None``:
    use ``torch.func.jvp`` at the node)."""
    t = n.target
    if n.op == "call_module":
        m = gm.get_submodule(t)
        if len(deps) != 1 or n.args[0] is not deps[0] or len(n.args) != 1 or n.kwargs:
            return None
        z = args[0]
        if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros":
            return lambda v, m=m: F.conv2d(v[0], m.weight, None, m.stride, m.padding, m.dilation, m.groups)
        if isinstance(m, nn.Linear):
            return lambda v, m=m: F.linear(v[0], m.weight)
        if isinstance(m, nn.ReLU):
            mask = (z > 0).to(z.dtype)  # taken before an in-place ReLU changes z
            return lambda v, mask=mask: v[0] * mask
        if isinstance(m, nn.MaxPool2d) and not m.return_indices:
            _, idx = F.max_pool2d(z, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                                  return_indices=True)  # fmt: skip
            return lambda v, idx=idx: v[0].flatten(2).gather(2, idx.flatten(2)).view_as(idx)
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) and not m.training and m.track_running_stats:
            scale = torch.rsqrt(m.running_var + m.eps)
            if m.affine:
                scale = scale * m.weight
            shape = (1, -1) + (1,) * (z.dim() - 2)
            scale = scale.reshape(shape).to(z.dtype)
            return lambda v, s=scale: v[0] * s
        if isinstance(m, nn.Dropout | nn.Identity | nn.Flatten | nn.AdaptiveAvgPool2d | nn.AvgPool2d):
            if isinstance(m, nn.Dropout) and m.training:
                return None
            return lambda v, m=m: m(v[0])
        return None
    if n.op == "call_function" and t in (operator.add, torch.add, operator.iadd) and not n.kwargs:
        both = [a for a in n.args[:2] if a in deps]
        if len(both) == 2:
            return lambda v: v[0] + v[1]
        return lambda v: v[0]  # a constant added
    if n.op == "call_function" and t is torch.cat and not n.kwargs and len(n.args) >= 1:
        parts, dim = n.args[0], (n.args[1] if len(n.args) > 1 else 0)
        distinct = isinstance(parts, list | tuple) and len(set(parts)) == len(parts)
        if distinct and all(p in deps for p in parts):
            order = [deps.index(p) for p in parts]
            return lambda v, o=order, d=dim: torch.cat([v[i] for i in o], d)
        return None
    if n.op == "call_function" and t in (operator.sub, operator.truediv, operator.mul) and len(deps) == 1:
        a, b = n.args[:2]
        if t is operator.sub:
            return (lambda v: v[0]) if a is deps[0] else (lambda v: -v[0])
        if t is operator.truediv:  # by a constant (a variable denominator: torch.func.jvp)
            return (lambda v, c=args[1]: v[0] / c) if a is deps[0] else None
        if t is operator.mul:
            c = args[1] if a is deps[0] else args[0]
            return lambda v, c=c: v[0] * c
        return None
    if (n.op == "call_function" and t is torch.flatten) or (
        n.op == "call_method" and t in ("view", "reshape", "flatten", "contiguous")
    ):
        if len(deps) == 1 and n.args[0] is deps[0] and not any(a in deps for a in n.args[1:]):
            rest, kw = args[1:], kwargs
            if n.op == "call_function":
                return lambda v, r=rest, k=kw: torch.flatten(v[0], *r, **k)
            return lambda v, r=rest, k=kw, name=t: getattr(v[0], name)(*r, **k)
    return None

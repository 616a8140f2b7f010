"""A certified upper bound on the 2-norm Lipschitz constant of a whole network (variant E1).

Paper: Maheshwari, Malaya, Moe, Kulkarni, Gurumurthi, *An estimator for the sensitivity to
perturbations of deep neural networks* (arXiv:2307.12679). The paper derives a "condition number
for the entire neural network" from per-layer matrix norms; the exact form it uses is not public,
and this module implements our reconstruction: the product bound, variant E1 of the digest
(``/work/shared/papers/estimator.md``, section 4). Related work: Szegedy et al. (2014, section 4.3),
Virmaux & Scaman (2018, AutoLip).

Norm
    The Euclidean norm of one flattened sample, at the input and at the output.
Input space
    The model's *own* input. For a :class:`sensitivity_lib.zoo.Normalized` model this is [0, 1]
    pixel space, so the normalisation ``(x - mean) / std`` is part of the network and contributes
    ``1 / min(std)``.
Shapes
    ``input_shape`` is the shape of ONE sample, e.g. ``(C, H, W)``, without the batch axis.

How it works
    The model is traced with ``torch.fx.symbolic_trace`` and run once on an example input, which
    gives every node its real shape. Every node ``v`` of the graph then gets a constant ``L_v`` with
    ``||v(x) - v(y)|| <= L_v ||x - y||`` for all inputs ``x, y``:

    * input: ``L = 1``;
    * a one-input operation with constant ``c`` (below): ``L_v = c * L_input``;
    * a sum ``a + b`` of two input-dependent nodes: ``L_a + L_b`` (triangle inequality);
    * a concatenation of input-dependent nodes ``a_1, ..., a_k`` (DenseNet): ``sqrt(sum L_i^2)``,
      because ``||cat(a_i(x)) - cat(a_i(y))||^2 = sum ||a_i(x) - a_i(y)||^2``
      ``<= sum L_i^2 ||x - y||^2``;
      every node is a function of the same network input, so this holds whether or not the branches
      share their input;
    * adding a constant (bias, ``- mean``) leaves ``L`` unchanged.

    Operation constants (proofs in the chapter *Deriving a condition number for a network*):

    * ``Linear``, ``Conv2d`` (any stride, padding, dilation, groups; also the functional
      ``F.conv2d`` / ``F.linear`` with parameter weights): the operator norm at the layer's real
      input size, certified by :func:`sensitivity_lib.opnorm.operator_norm` (``method="fft"``);
    * ``BatchNorm`` at inference right after a conv / linear layer (whose only user it is) is folded
      into it, and the norm of the folded layer is used (tighter than the product); elsewhere
      ``max_c |gamma_c| / sqrt(var_c + eps)``;
    * ReLU, ReLU6, Hardtanh, Tanh, Softplus, identity: 1; LeakyReLU: ``max(1, |slope|)``; ELU:
      ``max(1, alpha)``; Sigmoid: 1/4; SiLU: 1.09984; GELU: 1.12891 (1.12900 for its tanh
      approximation): the maxima of the derivative found numerically, rounded up (checked in the
      tests);
    * max-pool (also overlapping windows, padding, dilation, adaptive): ``sqrt(m)`` with ``m`` the
      largest number of windows that contain one input pixel (AlexNet's 3x3 / stride 2: 2); this is
      exact;
    * average pool and adaptive average pool: the exact operator norm, the product of the norms of
      two small 1-D averaging matrices (the 2-D operator is their Kronecker product);
    * ``mean`` over ``n`` entries: ``1 / sqrt(n)``; multiplication by a constant tensor ``c``:
      ``max |c|``; division: ``1 / min |c|``;
    * softmax: 1/2 (its Jacobian ``diag(p) - p p^T`` is a covariance matrix of a one-hot vector);
    * zero / constant padding, flatten, reshape, permutation, slicing, dropout at inference: 1.

    Anything else (e.g. a product of two input-dependent tensors as in squeeze-and-excitation)
    raises ``NotImplementedError`` naming the operation and the module path. Constants are combined
    in log2 (float64), so products of hundreds of norms neither overflow nor lose precision.

Example
-------
>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(3, 3, bias=False), nn.ReLU()).eval()
>>> with torch.no_grad():
...     _ = net[0].weight.copy_(torch.diag(torch.tensor([2.0, 1.0, 0.5])))
>>> b = lipschitz_bound(net, (3,))
>>> b.kind, round(b.value, 6), round(b.extra["log2"], 6)
('upper', 2.0, 1.0)
"""

from __future__ import annotations

import hashlib
import math
import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from sensitivity_lib.results import Estimate

__all__ = [
    "OUTPUTS",
    "ACTIVATION_CONSTANTS",
    "lipschitz_bound",
    "lipschitz_product",
    "pool_window_multiplicity",
    "avg_pool_norm",
    "linear_norm_upper",
    "build_plan",
    "Plan",
    "Step",
]

OUTPUTS: tuple[str, ...] = ("logits", "probs")

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


# ----------------------------------------------------------------------------------------------
# Small exact norms


def _pool_1d_windows(n: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> list[list[int]]:
    """The input indices read by each output position of a 1-D max/avg pool (PyTorch semantics)."""
    span = d * (k - 1) + 1
    num = n + 2 * p - span
    if num < 0:
        raise ValueError(f"pooling window {span} larger than the padded input {n + 2 * p}")
    out = (-(-num // s) if ceil_mode else num // s) + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return [[o * s - p + j * d for j in range(k) if 0 <= o * s - p + j * d < n] for o in range(out)]


def _adaptive_windows(n: int, out: int) -> list[list[int]]:
    return [list(range((o * n) // out, -((-(o + 1) * n) // out))) for o in range(out)]


def pool_window_multiplicity(windows: list[list[int]], n: int) -> int:
    """The largest number of windows that contain one input index (``m`` of the max-pool rule).

    Parameters
    ----------
    windows
        For each output position, the list of input indices it reads.
    n
        The input length.

    Returns
    -------
    int
        ``max_i #{o : i in windows[o]}``.
    """
    counts = [0] * n
    for w in windows:
        for i in w:
            counts[i] += 1
    return max(counts) if counts else 0


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1])) if len(v) else (0, 0)
    return int(v), int(v)


def _avg_matrix_1d(
    n: int, k: int, s: int, p: int, ceil_mode: bool, count_include_pad: bool, override: int | None
) -> torch.Tensor:
    """The 1-D factor ``A`` with ``avg_pool2d = A_h (x) A_w`` (Kronecker product), float64."""
    windows = _pool_1d_windows(n, k, s, p, 1, ceil_mode)
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
    for o, w in enumerate(_adaptive_windows(n, out)):
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
    """
    H, W = in_hw
    if adaptive_output is not None:
        oh, ow = _pair(adaptive_output)
        oh = H if oh is None else oh
        ow = W if ow is None else ow
        Ah, Aw = _adaptive_matrix_1d(H, oh), _adaptive_matrix_1d(W, ow)
    else:
        kh, kw = _pair(kernel_size)
        sh, sw = _pair(stride if stride not in (None, [], ()) else kernel_size)
        ph, pw = _pair(padding)
        Ah = _avg_matrix_1d(H, kh, sh, ph, ceil_mode, count_include_pad, divisor_override)
        # divisor_override divides the 2-D window sum once: put it in the row factor only
        w_override = None if divisor_override is None else 1
        Aw = _avg_matrix_1d(W, kw, sw, pw, ceil_mode, count_include_pad, w_override)
    norm = float(torch.linalg.matrix_norm(Ah, 2) * torch.linalg.matrix_norm(Aw, 2))
    return norm, (Ah, Aw)


# ----------------------------------------------------------------------------------------------
# The plan: the traced graph, reduced to steps with known constants


@dataclass
class Step:
    """One operation of the traced model, as the bound sees it (internal; used by ``condition``).

    ``op`` is one of ``input``, ``linear`` (conv / linear, BN folded; ``module`` is a bias-free copy
    whose ``operator_norm`` is taken, ``apply`` is its linear map on a batch), ``diag`` (elementwise
    multiplication by a constant ``scale``), ``act`` (elementwise activation ``kind`` with
    ``params``), ``maxpool`` (``windows``), ``fixed`` (a linear or 1-Lipschitz map with exactly
    known constant ``const``), ``softmax`` (``dim``), ``add`` (``weights`` per input), ``cat``.
    """

    name: str
    op: str
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


@dataclass
class Plan:
    """A traced model reduced to :class:`Step` s in topological order (internal)."""

    gm: torch.fx.GraphModule
    steps: list[Step]
    output: int
    input_shape: tuple[int, ...]
    dtype: torch.dtype


def _node_path(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    prefix = ""
    if stack:
        prefix = list(stack.values())[-1][0]
        prefix = prefix if isinstance(prefix, str) else ""
    return f"{prefix}.{node.name}" if prefix else node.name


def _fn_name(target: Any) -> str:
    return getattr(target, "__name__", str(target))


def _arg(node: torch.fx.Node, i: int, name: str, default: Any) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


class _Recorder(torch.fx.Interpreter):
    """Runs the graph once; keeps the value of every input-independent node and every shape."""

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
        elif isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
            self.meta[n] = (
                "tuple",
                tuple(tuple(o.shape) for o in out),
                out[0].dtype if out else None,
            )
        else:
            self.meta[n] = ("other", None, None)
        return out


def _model_dtype(model: nn.Module) -> torch.dtype:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def check_eval(model: nn.Module) -> None:
    """Raise ``ValueError`` if a batch-norm or dropout submodule is in training mode.

    In training mode these layers are not fixed functions (batch statistics, random masks), and
    samples of a batch are no longer independent.
    """
    modes = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    training = [
        n or type(m).__name__ for n, m in model.named_modules() if m.training and isinstance(m, modes)
    ]
    if training:
        raise ValueError(
            f"{training[0]!r} is in training mode; batch-norm and dropout are then not fixed "
            "functions. Call model.eval() first"
        )


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace(model)`` with an error that says what to do when it fails."""
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - re-raised with advice
        raise NotImplementedError(
            f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {exc}). "
            "The bound "
            "needs the model's graph: remove data-dependent Python control flow from forward(), or "
            "wrap the untraceable part in a module with a known Lipschitz constant"
        ) from exc


_RESHAPE_METHODS = {
    "view",
    "reshape",
    "flatten",
    "contiguous",
    "permute",
    "transpose",
    "squeeze",
    "unsqueeze",
    "clone",
    "detach",
    "float",
    "double",
    "to",
    "type",
    "type_as",
    "expand_as",
    "view_as",
    "reshape_as",
    "t",
    "unflatten",
    "movedim",
}
_RESHAPE_FUNCTIONS = {
    torch.flatten,
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    torch.transpose,
    torch.permute,
    torch.clone,
    torch.t,
    torch.movedim,
    torch.detach,
}
_ADD = {operator.add, operator.iadd, torch.add}
_SUB = {operator.sub, operator.isub, torch.sub, torch.subtract}
_MUL = {operator.mul, operator.imul, torch.mul, torch.multiply}
_DIV = {operator.truediv, operator.itruediv, torch.div, torch.divide, torch.true_divide}
_CAT = {torch.cat, torch.concat, torch.concatenate, torch.stack}
_CONV = {F.conv2d, torch.conv2d}
_SOFTMAX_FN = {F.softmax, torch.softmax}
_ACT_FN = {
    F.relu: "relu",
    torch.relu: "relu",
    F.relu_: "relu",
    torch.relu_: "relu",
    F.relu6: "relu6",
    F.leaky_relu: "leaky_relu",
    F.hardtanh: "hardtanh",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    F.elu: "elu",
    F.silu: "silu",
    F.gelu: "gelu",
    F.softplus: "softplus",
}
_ACT_METHODS = {"relu": "relu", "relu_": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}


def _act_from_module(m: nn.Module) -> tuple[str, dict[str, Any]] | None:
    if isinstance(m, nn.ReLU):
        return "relu", {}
    if isinstance(m, nn.ReLU6):
        return "relu6", {}
    if isinstance(m, nn.Hardtanh):
        return "hardtanh", {"min_val": m.min_val, "max_val": m.max_val}
    if isinstance(m, nn.LeakyReLU):
        return "leaky_relu", {"negative_slope": m.negative_slope}
    if isinstance(m, nn.Tanh):
        return "tanh", {}
    if isinstance(m, nn.Sigmoid):
        return "sigmoid", {}
    if isinstance(m, nn.ELU):
        return "elu", {"alpha": m.alpha}
    if isinstance(m, nn.SiLU):
        return "silu", {}
    if isinstance(m, nn.GELU):
        return "gelu", {"approximate": m.approximate}
    if isinstance(m, nn.Softplus):
        return "softplus", {"beta": m.beta, "threshold": m.threshold}
    return None


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


def _bn_scale(bn_like: dict[str, Any]) -> torch.Tensor:
    var, eps, gamma = bn_like["running_var"], bn_like["eps"], bn_like["weight"]
    scale = 1.0 / torch.sqrt(var.to(torch.float64) + eps)
    if gamma is not None:
        scale = scale * gamma.detach().to(torch.float64)
    return scale


def _bn_from_module(m: nn.Module) -> dict[str, Any] | None:
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        if m.running_var is None:
            raise NotImplementedError(
                f"BatchNorm without running statistics (track_running_stats=False) uses batch "
                f"statistics even at inference; it is not a fixed map: {m}"
            )
        return {"running_var": m.running_var, "eps": m.eps, "weight": m.weight}
    return None


def _conv_module(weight: torch.Tensor, stride: Any, padding: Any, dilation: Any, groups: int) -> nn.Conv2d:
    cout, cin_g, kh, kw = weight.shape
    conv = nn.Conv2d(
        cin_g * groups,
        cout,
        (kh, kw),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=False,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(weight)
    return conv.eval().requires_grad_(False)


def _linear_module(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin.eval().requires_grad_(False)


def _unsupported(what: str, path: str, hint: str = "") -> NotImplementedError:
    msg = f"lipschitz bound: no certified constant for {what} at {path!r}"
    return NotImplementedError(msg + (f"; {hint}" if hint else ""))


def build_plan(model: nn.Module, input_shape: tuple[int, ...]) -> Plan:
    """Trace ``model`` and reduce its graph to steps (internal; shared with ``condition``).

    Raises
    ------
    ValueError
        The model is in training mode, or ``input_shape`` does not fit the model.
    NotImplementedError
        An operation has no known certified constant (the message names it and its module path).
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
    dtype, device = _model_dtype(model), _model_device(model)
    example = torch.full((1, *input_shape), 0.5, dtype=dtype, device=device)
    rec = _Recorder(gm, variable, keep=lambda n: False)
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
                raise _unsupported(
                    f"the integer-valued tensor {n.name}",
                    _node_path(n),
                    "an input-dependent index (argmax, indices) breaks continuity",
                )
    return _PlanBuilder(gm, variable, rec, input_shape, dtype).build()


class _PlanBuilder:
    def __init__(self, gm, variable, rec, input_shape, dtype) -> None:  # noqa: ANN001
        self.gm, self.variable, self.rec = gm, variable, rec
        self.input_shape, self.dtype = input_shape, dtype
        self.steps: list[Step] = []
        self.index: dict[torch.fx.Node, int] = {}

    # helpers -------------------------------------------------------------------------------
    def shape(self, n: torch.fx.Node) -> tuple[int, ...]:
        return self.rec.meta[n][1]

    def const_value(self, a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return self.rec.values[a]
        return a

    def var_args(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        return [a for a in node.all_input_nodes if a in self.variable]

    def add(self, node: torch.fx.Node, step: Step, parents: list[torch.fx.Node]) -> None:
        step.node = node
        step.inputs = [self.index[p] for p in parents]
        for i in step.inputs:
            self.steps[i].users += 1
        if not step.out_shape and self.rec.meta[node][0] == "tensor":
            step.out_shape = self.shape(node)[1:]
        self.index[node] = len(self.steps)
        self.steps.append(step)

    def unary(self, node: torch.fx.Node, path: str, what: str) -> torch.fx.Node:
        vs = self.var_args(node)
        if len(vs) != 1:
            raise _unsupported(f"{what} with {len(vs)} input-dependent operands", path)
        return vs[0]

    # main loop -------------------------------------------------------------------------------
    def build(self) -> Plan:
        out_index = None
        for node in self.gm.graph.nodes:
            if node not in self.variable:
                continue
            if node.op == "placeholder":
                self.add(node, Step(name="input", op="input", out_shape=self.input_shape), [])
            elif node.op == "output":
                res = node.args[0]
                if not isinstance(res, torch.fx.Node) or res not in self.index:
                    raise NotImplementedError(
                        "models whose output is not a single tensor (tuples, dicts) are not supported"
                    )
                out_index = self.index[res]
            else:
                self.visit(node)
        assert out_index is not None
        plan = Plan(self.gm, self.steps, out_index, self.input_shape, self.dtype)
        return plan

    def visit(self, node: torch.fx.Node) -> None:
        path = _node_path(node)
        if node.op == "call_module":
            self.visit_module(node, self.gm.get_submodule(node.target), path)
        elif node.op == "call_function":
            self.visit_function(node, node.target, path)
        elif node.op == "call_method":
            self.visit_method(node, node.target, path)
        else:
            raise _unsupported(f"fx node {node.op} {node.target}", path)

    def fixed(self, node, path, parent, const, what) -> None:  # noqa: ANN001
        self.add(node, Step(name=path, op="fixed", const=float(const), kind=what), [parent])

    def visit_module(self, node: torch.fx.Node, m: nn.Module, path: str) -> None:
        parent = self.unary(node, path, type(m).__name__)
        in_shape = self.shape(parent)[1:]
        act = _act_from_module(m)
        if act is not None:
            self.activation(node, path, parent, *act)
        elif isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                raise _unsupported(
                    f"Conv2d with padding_mode={m.padding_mode!r}",
                    path,
                    "only zero padding is certified",
                )
            self.linear(
                node,
                path,
                parent,
                m.weight,
                "conv",
                in_shape,
                dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups),
            )
        elif isinstance(m, nn.Linear):
            self.linear(node, path, parent, m.weight, "linear", in_shape, {})
        elif (bn := _bn_from_module(m)) is not None:
            self.batchnorm(node, path, parent, bn)
        elif isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)):
            if getattr(m, "return_indices", False):
                raise _unsupported("max-pool with return_indices=True", path)
            if isinstance(m, nn.MaxPool2d):
                self.maxpool(node, path, parent, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
            else:
                self.maxpool(node, path, parent, None, None, 0, 1, False, adaptive=m.output_size)
        elif isinstance(m, nn.AvgPool2d):
            self.avgpool(
                node,
                path,
                parent,
                m.kernel_size,
                m.stride,
                m.padding,
                m.ceil_mode,
                m.count_include_pad,
                m.divisor_override,
            )
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            self.avgpool(node, path, parent, None, None, 0, False, True, None, adaptive=m.output_size)
        elif isinstance(
            m,
            (
                nn.Dropout,
                nn.Dropout1d,
                nn.Dropout2d,
                nn.Dropout3d,
                nn.AlphaDropout,
                nn.Identity,
                nn.Flatten,
                nn.Unflatten,
            ),
        ):
            self.fixed(node, path, parent, 1.0, type(m).__name__)
        elif isinstance(m, (nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)):
            self.fixed(node, path, parent, 1.0, type(m).__name__)
        elif isinstance(m, nn.Softmax):
            self.add(node, Step(name=path, op="softmax", const=0.5, params={"dim": m.dim}), [parent])
        else:
            raise _unsupported(
                f"module {type(m).__name__}",
                path,
                "supported: Conv2d, Linear, BatchNorm, pooling, ReLU-like activations, "
                "softmax, dropout, flatten, padding",
            )

    def visit_method(self, node: torch.fx.Node, name: str, path: str) -> None:
        if name in _RESHAPE_METHODS:
            parent = self.unary(node, path, name)
            self.fixed(node, path, parent, 1.0, name)
        elif name in _ACT_METHODS:
            self.activation(node, path, self.unary(node, path, name), _ACT_METHODS[name], {})
        elif name == "softmax":
            dim = _arg(node, 1, "dim", None)
            self.add(
                node,
                Step(name=path, op="softmax", const=0.5, params={"dim": dim}),
                [self.unary(node, path, name)],
            )
        elif name in ("mean", "sum"):
            self.reduction(node, path, name, _arg(node, 1, "dim", None))
        elif name in ("add", "add_", "sub", "sub_"):
            self.addsub(node, path, sign=1.0 if name.startswith("add") else -1.0)
        elif name in ("mul", "mul_", "div", "div_"):
            self.scale(node, path, divide=name.startswith("div"))
        elif name == "neg":
            self.fixed(node, path, self.unary(node, path, name), 1.0, name)
        else:
            raise _unsupported(f"tensor method .{name}()", path)

    def visit_function(self, node: torch.fx.Node, fn: Any, path: str) -> None:
        name = _fn_name(fn)
        if fn in _ACT_FN:
            kind = _ACT_FN[fn]
            params: dict[str, Any] = {}
            if kind == "leaky_relu":
                params["negative_slope"] = _arg(node, 1, "negative_slope", 0.01)
            elif kind == "hardtanh":
                params = {
                    "min_val": _arg(node, 1, "min_val", -1.0),
                    "max_val": _arg(node, 2, "max_val", 1.0),
                }
            elif kind == "elu":
                params["alpha"] = _arg(node, 1, "alpha", 1.0)
            elif kind == "gelu":
                params["approximate"] = node.kwargs.get("approximate", "none")
            elif kind == "softplus":
                params = {
                    "beta": _arg(node, 1, "beta", 1.0),
                    "threshold": _arg(node, 2, "threshold", 20.0),
                }
            self.activation(node, path, self.unary(node, path, name), kind, params)
        elif fn in _CONV:
            parent = node.args[0] if node.args else node.kwargs["input"]
            if parent not in self.variable or len(self.var_args(node)) != 1:
                raise _unsupported("conv2d whose weight depends on the input", path)
            weight = self.const_value(_arg(node, 1, "weight", None))
            wnode = _arg(node, 1, "weight", None)
            if isinstance(wnode, torch.fx.Node) and wnode.op == "get_attr":
                path = str(wnode.target).rsplit(".", 1)[0]
            cfg = dict(
                stride=_arg(node, 3, "stride", 1),
                padding=_arg(node, 4, "padding", 0),
                dilation=_arg(node, 5, "dilation", 1),
                groups=int(_arg(node, 6, "groups", 1)),
            )
            self.linear(node, path, parent, weight, "conv", self.shape(parent)[1:], cfg)
        elif fn is F.linear:
            parent = node.args[0] if node.args else node.kwargs["input"]
            if parent not in self.variable or len(self.var_args(node)) != 1:
                raise _unsupported("linear whose weight depends on the input", path)
            wnode = _arg(node, 1, "weight", None)
            if isinstance(wnode, torch.fx.Node) and wnode.op == "get_attr":
                path = str(wnode.target).rsplit(".", 1)[0]
            self.linear(node, path, parent, self.const_value(wnode), "linear", self.shape(parent)[1:], {})
        elif fn is F.batch_norm:
            parent = self.unary(node, path, name)
            if bool(_arg(node, 5, "training", False)):
                raise _unsupported("F.batch_norm(training=True)", path, "call model.eval()")
            bn = {
                "running_var": self.const_value(_arg(node, 2, "running_var", None)),
                "eps": float(_arg(node, 7, "eps", 1e-5)),
                "weight": self.const_value(_arg(node, 3, "weight", None)),
            }
            self.batchnorm(node, path, parent, bn)
        elif fn is F.max_pool2d or fn is F.adaptive_max_pool2d:
            parent = self.unary(node, path, name)
            if _arg(node, 6 if fn is F.max_pool2d else 2, "return_indices", False):
                raise _unsupported("max-pool with return_indices=True", path)
            if fn is F.max_pool2d:
                self.maxpool(
                    node,
                    path,
                    parent,
                    _arg(node, 1, "kernel_size", None),
                    _arg(node, 2, "stride", None),
                    _arg(node, 3, "padding", 0),
                    _arg(node, 4, "dilation", 1),
                    bool(_arg(node, 5, "ceil_mode", False)),
                )
            else:
                self.maxpool(
                    node,
                    path,
                    parent,
                    None,
                    None,
                    0,
                    1,
                    False,
                    adaptive=_arg(node, 1, "output_size", None),
                )
        elif fn is F.avg_pool2d:
            self.avgpool(
                node,
                path,
                self.unary(node, path, name),
                _arg(node, 1, "kernel_size", None),
                _arg(node, 2, "stride", None),
                _arg(node, 3, "padding", 0),
                bool(_arg(node, 4, "ceil_mode", False)),
                bool(_arg(node, 5, "count_include_pad", True)),
                _arg(node, 6, "divisor_override", None),
            )
        elif fn is F.adaptive_avg_pool2d:
            self.avgpool(
                node,
                path,
                self.unary(node, path, name),
                None,
                None,
                0,
                False,
                True,
                None,
                adaptive=_arg(node, 1, "output_size", None),
            )
        elif fn in (F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout):
            if bool(_arg(node, 2, "training", True)):
                raise _unsupported(
                    f"{name} with training=True (random)",
                    path,
                    "pass training=self.training and call model.eval()",
                )
            self.fixed(node, path, self.unary(node, path, name), 1.0, name)
        elif fn is F.pad:
            mode = _arg(node, 2, "mode", "constant")
            if mode != "constant":
                raise _unsupported(f"F.pad(mode={mode!r})", path, "only constant padding is certified")
            self.fixed(node, path, self.unary(node, path, name), 1.0, "pad")
        elif fn in _SOFTMAX_FN:
            self.add(
                node,
                Step(name=path, op="softmax", const=0.5, params={"dim": _arg(node, 1, "dim", None)}),
                [self.unary(node, path, name)],
            )
        elif fn in _RESHAPE_FUNCTIONS:
            self.fixed(node, path, self.unary(node, path, name), 1.0, name)
        elif fn is operator.getitem:
            self.getitem(node, path)
        elif fn in (torch.mean, torch.sum):
            self.reduction(node, path, name, _arg(node, 1, "dim", None))
        elif fn in _ADD or fn in _SUB:
            self.addsub(node, path, sign=1.0 if fn in _ADD else -1.0)
        elif fn in _MUL:
            self.scale(node, path, divide=False)
        elif fn in _DIV:
            self.scale(node, path, divide=True)
        elif fn in (operator.neg, torch.neg):
            self.fixed(node, path, self.unary(node, path, name), 1.0, "neg")
        elif fn in _CAT:
            self.cat(node, path)
        else:
            raise _unsupported(f"function {name}", path)

    # operations ------------------------------------------------------------------------------
    def activation(self, node, path, parent, kind, params) -> None:  # noqa: ANN001
        c = activation_constant(kind, params)
        self.add(node, Step(name=path, op="act", const=c, kind=kind, params=dict(params)), [parent])

    def linear(self, node, path, parent, weight, kind, in_shape, cfg) -> None:  # noqa: ANN001
        if not isinstance(weight, torch.Tensor):
            raise _unsupported(f"{kind} with a non-tensor weight", path)
        w = weight.detach()
        step = Step(name=path, op="linear", kind=kind, in_shape=tuple(in_shape), params={"weight": w, **cfg})
        if kind == "conv":
            if w.ndim != 4 or len(in_shape) != 3:
                raise _unsupported(f"a {w.ndim - 2}-d convolution", path, "only Conv2d is supported")
        self.add(node, step, [parent])
        self.finish_linear(step)

    def finish_linear(self, step: Step) -> None:
        w = step.params["weight"]
        if step.kind == "conv":
            cfg = {k: step.params[k] for k in ("stride", "padding", "dilation", "groups")}
            step.module = _conv_module(w, **cfg)
            step.apply = step.module.forward
        else:
            step.module = _linear_module(w)
            step.apply = step.module.forward

    def batchnorm(self, node, path, parent, bn) -> None:  # noqa: ANN001
        scale = _bn_scale(bn)
        pi = self.index[parent]
        pstep = self.steps[pi]
        channel_dim_ok = pstep.op == "linear" and pstep.params["weight"].shape[0] == scale.numel()
        if channel_dim_ok and len(parent.users) == 1 and pstep.folded is None:
            # fold: W' = diag(scale) W (rows = output channels); the bias/shift does not matter
            w = pstep.params["weight"]
            shape = (-1,) + (1,) * (w.ndim - 1)
            pstep.params["weight"] = (w.to(torch.float64) * scale.view(shape)).to(w.dtype)
            pstep.folded = path
            self.finish_linear(pstep)
            pstep.node = node
            pstep.out_shape = self.shape(node)[1:]
            self.index[node] = pi
            return
        out_shape = self.shape(node)
        view = (1, -1) + (1,) * (len(out_shape) - 2)
        step = Step(
            name=path,
            op="diag",
            kind="batchnorm",
            params={"scale": scale.view(view)},
            const=float(scale.abs().max()),
        )
        self.add(node, step, [parent])

    def maxpool(self, node, path, parent, k, s, p, d, ceil_mode, adaptive=None) -> None:  # noqa: ANN001
        H, W = self.shape(parent)[-2:]
        out_hw = self.shape(node)[-2:]
        if adaptive is not None:
            oh, ow = _pair(adaptive)
            wins = (
                _adaptive_windows(H, oh if oh is not None else H),
                _adaptive_windows(W, ow if ow is not None else W),
            )
        else:
            kh, kw = _pair(k)
            sh, sw = _pair(s if s not in (None, [], ()) else k)
            ph, pw = _pair(p)
            dh, dw = _pair(d)
            wins = (
                _pool_1d_windows(H, kh, sh, ph, dh, ceil_mode),
                _pool_1d_windows(W, kw, sw, pw, dw, ceil_mode),
            )
        if (len(wins[0]), len(wins[1])) != tuple(out_hw):
            raise RuntimeError(f"max-pool window model disagrees with PyTorch's output size at {path!r}")
        m = pool_window_multiplicity(wins[0], H) * pool_window_multiplicity(wins[1], W)
        step = Step(name=path, op="maxpool", const=math.sqrt(m), params={"windows": wins, "multiplicity": m})
        self.add(node, step, [parent])

    def avgpool(self, node, path, parent, k, s, p, ceil_mode, cip, div, adaptive=None) -> None:  # noqa: ANN001
        in_shape = self.shape(parent)
        H, W = in_shape[-2:]
        norm, (Ah, Aw) = avg_pool_norm((H, W), k, s, p, ceil_mode, cip, div, adaptive_output=adaptive)
        # check the separable model against PyTorch itself on a random input
        g = torch.Generator().manual_seed(0)
        x = torch.rand(1, 1, H, W, generator=g, dtype=torch.float64)
        if adaptive is not None:
            ref = F.adaptive_avg_pool2d(x, adaptive)
        else:
            ref = F.avg_pool2d(x, k, s if s not in (None, [], ()) else k, p, ceil_mode, cip, div)
        mine = Ah @ x[0, 0] @ Aw.T
        if mine.shape != ref.shape[-2:] or not torch.allclose(mine, ref[0, 0], rtol=1e-10, atol=1e-12):
            raise RuntimeError(f"average-pool model disagrees with PyTorch at {path!r}")
        self.fixed(node, path, parent, norm, "avgpool")

    def reduction(self, node, path, name, dim) -> None:  # noqa: ANN001
        parent = self.unary(node, path, name)
        shape = self.shape(parent)
        if dim is None:
            n = math.prod(shape[1:]) if len(shape) > 1 else 1
            if len(shape) > 0 and name in ("mean", "sum"):
                raise _unsupported(f"{name}() over all axes (it mixes the samples of a batch)", path)
        else:
            dims = [dim] if isinstance(dim, int) else list(dim)
            dims = [d % len(shape) for d in dims]
            if 0 in dims:
                raise _unsupported(f"{name} over the batch axis", path)
            n = math.prod(shape[d] for d in dims)
        c = 1.0 / math.sqrt(n) if name == "mean" else math.sqrt(n)
        self.fixed(node, path, parent, c, name)

    def getitem(self, node, path) -> None:  # noqa: ANN001
        src, idx = node.args[0], node.args[1]
        parent = self.unary(node, path, "indexing")
        if parent is not src:
            raise _unsupported("indexing with an input-dependent index", path)
        items = idx if isinstance(idx, tuple) else (idx,)
        ok = all(isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in items)
        if self.rec.meta[src][0] == "tuple":
            ok = isinstance(idx, int)
        elif items and isinstance(items[0], int):
            ok = False  # would select one sample of the batch
        elif items and isinstance(items[0], slice) and items[0] != slice(None):
            ok = False
        if not ok:
            raise _unsupported(
                f"indexing with {idx!r}",
                path,
                "only slices and integers after the batch axis are certified (a projection, constant 1)",
            )
        self.fixed(node, path, parent, 1.0, "getitem")

    def addsub(self, node, path, sign) -> None:  # noqa: ANN001
        a = node.args[0] if node.args else node.kwargs.get("input")
        b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        alpha = abs(float(node.kwargs.get("alpha", 1.0)))
        parents, weights = [], []
        for arg, w in ((a, 1.0), (b, alpha)):
            if isinstance(arg, torch.fx.Node) and arg in self.variable:
                parents.append(arg)
                weights.append(w)
        if not parents:
            raise _unsupported("addition", path)
        if len(parents) == 1 and weights[0] == 1.0:
            self.fixed(node, path, parents[0], 1.0, "add constant")
            return
        self.add(node, Step(name=path, op="add", weights=weights), parents)

    def scale(self, node, path, divide) -> None:  # noqa: ANN001
        a = node.args[0] if node.args else node.kwargs.get("input")
        b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        avar = isinstance(a, torch.fx.Node) and a in self.variable
        bvar = isinstance(b, torch.fx.Node) and b in self.variable
        what = "division" if divide else "multiplication"
        if avar and bvar:
            raise _unsupported(
                f"{what} of two input-dependent tensors",
                path,
                "a product of signals (e.g. squeeze-and-excitation gating) has no "
                "global Lipschitz constant from layer norms",
            )
        if divide and not avar:
            raise _unsupported("division by an input-dependent tensor", path)
        if node.kwargs.get("rounding_mode") is not None:
            raise _unsupported("rounding division", path)
        parent, c = (a, self.const_value(b)) if avar else (b, self.const_value(a))
        c = torch.as_tensor(c, dtype=torch.float64)
        if divide:
            if bool((c == 0).any()):
                raise ValueError(f"division by zero at {path!r}")
            c = 1.0 / c
        out_shape = self.shape(node)
        if c.numel() > 1 and tuple(torch.broadcast_shapes(c.shape, out_shape)) != tuple(out_shape):
            raise _unsupported(f"{what} that broadcasts the signal", path)
        if c.ndim >= len(out_shape) and c.ndim > 0 and c.shape[0] != 1:
            raise _unsupported(f"{what} by a tensor with a batch axis", path)
        step = Step(name=path, op="diag", kind=what, params={"scale": c}, const=float(c.abs().max()))
        self.add(node, step, [parent])

    def cat(self, node, path) -> None:  # noqa: ANN001
        seq = node.args[0] if node.args else node.kwargs["tensors"]
        dim = _arg(node, 1, "dim", 0)
        nd = len(self.shape(node))
        if node.target is not torch.stack and dim % nd == 0:
            raise _unsupported("concatenation along the batch axis", path)
        if node.target is torch.stack and dim % nd == 0:
            raise _unsupported("stacking along the batch axis", path)
        parents = [a for a in seq if isinstance(a, torch.fx.Node) and a in self.variable]
        self.add(node, Step(name=path, op="cat", weights=[1.0] * len(parents)), parents)


# ----------------------------------------------------------------------------------------------
# Propagation


def _log2(v: float) -> float:
    return math.log2(v) if v > 0 else -math.inf


def log2_sum(terms: list[float]) -> float:
    """``log2(sum 2**t)`` for float64 log2 terms, without overflow."""
    finite = [t for t in terms if t != -math.inf]
    if not finite:
        return -math.inf
    m = max(finite)
    if m == math.inf:
        return math.inf
    return m + math.log2(sum(2.0 ** (t - m) for t in finite))


def propagate(plan: Plan, factor: Callable[[Step], float]) -> list[float]:
    """log2 Lipschitz constant of every step from log2 operation factors (internal).

    ``factor(step)`` returns log2 of the operation constant for unary steps; ``add`` and ``cat``
    combine their inputs (sum, and root-sum-of-squares).
    """
    logs: list[float] = []
    for step in plan.steps:
        if step.op == "input":
            logs.append(0.0)
        elif step.op == "add":
            logs.append(
                log2_sum([logs[i] + _log2(w) for i, w in zip(step.inputs, step.weights, strict=True)])
            )
        elif step.op == "cat":
            logs.append(0.5 * log2_sum([2 * logs[i] for i in step.inputs]))
        else:
            logs.append(factor(step) + logs[step.inputs[0]])
    return logs


def linear_norm_upper(weight: torch.Tensor) -> Estimate:
    """Certified upper bound on ``||W||_2`` of a large matrix, via the smaller Gram matrix.

    ``lambda = eigvalsh(W W^T)[-1]`` in float64 (the smaller side), plus a margin for the rounding
    errors of the product (``|fl(W W^T) - W W^T| <= gamma_n |W| |W|^T``, so at most
    ``gamma_n ||W||_F^2`` in the 2-norm) and of the symmetric eigensolver (backward stable:
    ``10 m u lambda``). The margin is of relative size ~1e-10 for ImageNet classifier heads.

    Parameters
    ----------
    weight
        A 2-D tensor.

    Returns
    -------
    Estimate
        ``kind="upper"``, ``method="gram-eigh"``; ``extra["margin"]`` is the relative margin.
    """
    w = weight.detach().to(torch.float64)
    if w.shape[0] > w.shape[1]:
        w = w.T
    m, n = w.shape
    u = 2.0**-53
    gamma = n * u / (1 - n * u)
    lam = float(torch.linalg.eigvalsh(w @ w.T)[-1])
    fro2 = float((w * w).sum())
    bound = max(lam, 0.0) + gamma * fro2 + 10 * m * u * abs(lam)
    value = math.sqrt(bound)
    margin = value / math.sqrt(lam) - 1 if lam > 0 else math.inf
    return Estimate(value, "upper", "gram-eigh", extra={"margin": margin, "shape": tuple(weight.shape)})


_NORM_CACHE: dict[tuple, Estimate] = {}
_NORM_CACHE_SIZE = 512


def _layer_key(step: Step, method: str) -> tuple:
    """Identifies a layer norm by the bytes of its (folded) weight, its configuration and input."""
    w = step.params["weight"].detach().cpu().contiguous()
    digest = hashlib.blake2b(w.numpy().tobytes(), digest_size=16).hexdigest()
    cfg = tuple(
        (k, str(step.params[k])) for k in ("stride", "padding", "dilation", "groups") if k in step.params
    )
    return (method, step.kind, tuple(w.shape), str(w.dtype), digest, cfg, tuple(step.in_shape))


def cached_layer_norm(step: Step, method: str, compute: Callable[[Step], Estimate]) -> Estimate:
    """``compute(step)``, memoised on the weight bytes, layer configuration, input shape and method
    (conv norms at 224 x 224 take seconds to minutes; the same layer recurs across calls)."""
    key = _layer_key(step, method)
    hit = _NORM_CACHE.get(key)
    if hit is None:
        hit = compute(step)
        if len(_NORM_CACHE) >= _NORM_CACHE_SIZE:
            _NORM_CACHE.pop(next(iter(_NORM_CACHE)))
        _NORM_CACHE[key] = hit
    return hit


#: Convolutions whose input has at least this many entries get their certified norm from a Lanczos
#: lower estimate and a Cholesky certificate (``operator_norm(..., "fft", lower=..., tol=...)``),
#: within a factor ``1 + CERTIFY_TOL`` of the exact circular bound and several times faster.
CERTIFY_MIN_ENTRIES = 2**15
CERTIFY_TOL = 1e-3


def _certified_norm(step: Step) -> Estimate:
    from sensitivity_lib.opnorm import DENSE_MAX_ENTRIES, operator_norm

    if step.kind == "conv" and math.prod(step.in_shape) >= CERTIFY_MIN_ENTRIES:
        lower = operator_norm(step.module, step.in_shape, method="lanczos", tol=CERTIFY_TOL)
        est = operator_norm(step.module, step.in_shape, method="fft", lower=lower.value, tol=CERTIFY_TOL)
    elif step.kind == "conv":
        est = operator_norm(step.module, step.in_shape, method="fft")
    elif step.module.weight.numel() <= DENSE_MAX_ENTRIES:
        est = operator_norm(step.module, (step.in_shape[-1],), method="dense")
    else:
        est = linear_norm_upper(step.module.weight)
    if not est.is_certified_upper:
        raise RuntimeError(f"the layer norm at {step.name!r} is {est.kind!r}, not certified")
    return est


def _default_norm(step: Step) -> Estimate:
    """Certified layer norm: ``operator_norm(method="fft")`` for convs (with a Lanczos lower value
    and Cholesky certificates for inputs of :data:`CERTIFY_MIN_ENTRIES` or more); for linear layers
    the exact ``method="dense"`` up to ``DENSE_MAX_ENTRIES`` weights and :func:`linear_norm_upper`
    above.
    Memoised by :func:`cached_layer_norm`."""
    return cached_layer_norm(step, "certified", _certified_norm)


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module) -> tuple:
    return tuple(
        (n, t.data_ptr(), t._version, tuple(t.shape), t.dtype)
        for n, t in list(model.named_parameters()) + list(model.named_buffers())
    )


def lipschitz_product(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    layer_norm: Callable[[Step], Estimate] | None = None,
    output: str = "logits",
    method: str = "fft",
    kind: str = "upper",
) -> Estimate:
    """The product bound of :func:`lipschitz_bound` with a pluggable norm for linear layers.

    Parameters
    ----------
    model
        A module in eval mode whose ``forward`` torch.fx can trace.
    input_shape
        Shape of one input sample (no batch axis).
    layer_norm
        ``layer_norm(step) -> Estimate``: the norm used for each (BN-folded) conv / linear layer;
        ``step.module`` is a bias-free ``nn.Conv2d`` / ``nn.Linear`` and ``step.in_shape`` its real
        input shape. Default: certified ``operator_norm(..., method="fft")``.
    output
        ``"logits"`` (the model's output) or ``"probs"`` (softmax over the last axis appended,
        constant 1/2).
    method, kind
        Recorded in the returned :class:`~sensitivity_lib.results.Estimate`. ``kind`` must be
        ``"upper"`` only when every layer norm is a certified upper bound.

    Returns
    -------
    Estimate
        See :func:`lipschitz_bound`.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    plan = build_plan(model, input_shape)
    norm_fn = layer_norm or _default_norm
    layers: dict[str, float] = {}
    layer_estimates: dict[str, Estimate] = {}
    folded: dict[str, str] = {}

    def factor(step: Step) -> float:
        if step.op == "linear":
            est = norm_fn(step)
            layer_estimates[step.name] = est
            val = float(est.value)
            if step.folded:
                folded[step.name] = step.folded
        else:
            val = step.const
        layers[step.name] = val
        return _log2(val)

    logs = propagate(plan, factor)
    total = logs[plan.output]
    if output == "probs":
        layers["softmax(output)"] = 0.5
        total -= 1.0
    value = 2.0**total if total < 1023 else math.inf
    return Estimate(
        value=value,
        kind=kind,
        method=f"graph-product({method})",
        norm="2",
        extra={
            "log2": total,
            "layers": layers,
            "layer_estimates": layer_estimates,
            "folded": folded,
            "output": output,
            "input_shape": tuple(input_shape),
            "cumulative_log2": [(st.name, st.op, lg) for st, lg in zip(plan.steps, logs, strict=True)],
        },
    )


def lipschitz_bound(
    model: nn.Module, input_shape: tuple[int, ...], *, output: str = "logits", cache: bool = True
) -> Estimate:
    """Certified upper bound on the 2-norm Lipschitz constant of ``model`` on its own input space.

    For every pair of inputs ``x, y`` of shape ``input_shape``:
    ``||f(x) - f(y)||_2 <= value * ||x - y||_2`` (one sample, flattened), where ``f`` is the model's
    output (``output="logits"``) or the softmax of it (``output="probs"``). The bound is global (not
    first order) and certified: every per-layer constant is exact or a certified upper bound (conv
    and linear norms from :func:`sensitivity_lib.opnorm.operator_norm` with ``method="fft"``).

    Parameters
    ----------
    model
        A module in eval mode (e.g. :class:`sensitivity_lib.zoo.Normalized`) that torch.fx can
        trace.
    input_shape
        Shape of one input sample, e.g. ``(3, 224, 224)`` (no batch axis); layer norms are taken
        at the real feature-map sizes this input produces.
    output
        ``"logits"`` or ``"probs"``.
    cache
        Reuse the result for the same model, weights (checked by pointer and version counter),
        input shape and output.

    Returns
    -------
    Estimate
        ``value`` (float; ``inf`` past float64's range), ``kind="upper"``,
        ``method="graph-product(fft)"``;
        ``extra["log2"]``: the bound in bits (float64), ``extra["layers"]``: module path -> constant
        of that operation, ``extra["layer_estimates"]``: the conv / linear norm estimates,
        ``extra["folded"]``: conv path -> folded BN path; ``extra["cumulative_log2"]``: for every
        step of the graph in order, ``(name, op, log2 L_v)`` with ``L_v`` the bound from the input to
        that node.

    Raises
    ------
    ValueError
        Model in training mode, or ``input_shape`` not accepted by the model.
    NotImplementedError
        An operation with no certified constant (named with its module path), or a graph torch.fx
        cannot trace.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.MaxPool2d(3, 2), nn.Flatten()).eval()   # overlapping windows
    >>> lipschitz_bound(net, (1, 7, 7)).value
    2.0
    """
    key = (tuple(int(s) for s in input_shape), output)
    if cache and isinstance(model, nn.Module):
        store = _CACHE.setdefault(model, {})
        hit = store.get(key)
        if hit is not None and hit[0] == _fingerprint(model):
            return hit[1]
    est = lipschitz_product(model, input_shape, output=output)
    if cache:
        _CACHE.setdefault(model, {})[key] = (_fingerprint(model), est)
    return est

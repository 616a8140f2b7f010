r"""Recurrent classifiers (Elman, LSTM, GRU) whose recurrent matrices can be read and normalised.

Part III of the book (Sengupta & Friston, *How robust are deep neural networks?*, arXiv:1804.11313;
only the abstract was recoverable, so the equations here are PyTorch's and our own choices).

The networks
    One recurrent layer of ``hidden`` units read over a sequence ``x`` of shape ``(N, T, d)``, then
    a linear readout of the last hidden state: ``logits = W_o h_T + b_o``. The cells are PyTorch's,
    written out (so that ``torch.func`` can differentiate them in both modes and the recurrent
    blocks can carry parametrisations); with the same weights they give the outputs of
    ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (tests):

    - Elman: ``h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``; state ``h`` (``S = H``).
    - LSTM: gates ``i, f, g, o`` (PyTorch's order); ``c_t = f c_{t-1} + i g``,
      ``h_t = o tanh(c_t)``; state ``(h, c)`` (``S = 2H``).
    - GRU: gates ``r, z, n``; ``n_t = tanh(W_in x_t + b_in + r (W_hn h_{t-1} + b_hn))``,
      ``h_t = (1 - z) n_t + z h_{t-1}``; state ``h`` (``S = H``).

    The recurrent weight is one ``H x H`` block per gate (:meth:`RecurrentClassifier.recurrent_matrices`;
    :attr:`RecurrentClassifier.weight_hh` stacks them in PyTorch's ``(G H, H)`` layout).

Normalisations of the recurrent blocks (``normalise=``), each applied to every gate's block
    ``"none"``
        Plain weights.
    ``"rho"``
        Spectral radius: ``W / rho(W)``, so that every eigenvalue lies in the closed unit disk and
        the dominant ones on the circle (the paper's "normalising the spectrum ... on a unit
        disk"). ``rho`` by the power method with a Rayleigh quotient, as the paper describes, in
        the form that survives complex pairs: a real matrix's dominant eigenvalues are generically
        a complex-conjugate pair of equal modulus, on which the single-vector power iteration never
        converges and its Rayleigh quotient ``v^T W v / v^T v`` can be anything in ``[-rho, rho]``
        (:func:`spectral_radius` ``method="rayleigh"`` shows it). We iterate a *two-column* block
        ``Q <- qr(W Q)`` and take the eigenvalues of the ``2 x 2`` Rayleigh quotient ``Q^T W Q``:
        it converges to the dominant pair whether it is real or complex. The block is kept between
        training steps (one iteration per step, as ``torch.nn.utils.parametrizations.spectral_norm``
        does for singular vectors) and ``rho`` is differentiated through the ``2 x 2`` eigenvalues.
        ``rho_method="eig"`` uses dense eigenvalues instead (exact, ``O(H^3)`` per step).
    ``"sigma"``
        Largest singular value: ``W / sigma_max(W)`` by the power method on ``W^T W`` (persistent
        vectors, as ``torch.nn.utils.parametrizations.spectral_norm``). Then ``||W^k|| <= 1`` for
        every ``k``; ``rho <= 1`` alone allows ``||W^k|| >> 1``. That difference is the point of
        Part III.
    ``"orthogonal"``
        ``torch.nn.utils.parametrizations.orthogonal``: ``W^T W = I`` (normal, ``rho = sigma = 1``).

    :func:`finalise` runs the persistent iterations to convergence after training, so that the
    evaluated network's blocks reach their target to rounding (tests: within ``1e-6`` of 1).

Example
-------
>>> import torch
>>> m = RecurrentClassifier("gru", 8, 16, 10, normalise="rho", seed=0).eval()
>>> _ = finalise(m)
>>> W = m.recurrent_matrices()["n"]
>>> round(float(torch.linalg.eigvals(W.double()).abs().max()), 6)
1.0
>>> m(torch.rand(4, 8, 8)).shape
torch.Size([4, 10])
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from sensitivity_lib.results import Estimate
from sensitivity_lib.validation import check_batch, check_finite_tensor

__all__ = [
    "CELLS",
    "GATES",
    "NORMALISATIONS",
    "RecurrentClassifier",
    "SpectralRadiusNorm",
    "SpectralNormPower",
    "spectral_radius",
    "finalise",
    "hidden_states",
    "state_jacobians",
    "state_jacobian",
]

CELLS: tuple[str, ...] = ("elman", "lstm", "gru")
#: the gates of each cell, in PyTorch's order (one H x H recurrent block each)
GATES: dict[str, tuple[str, ...]] = {"elman": ("hh",), "lstm": ("i", "f", "g", "o"), "gru": ("r", "z", "n")}
NORMALISATIONS: tuple[str, ...] = ("none", "rho", "sigma", "orthogonal")
#: power steps at the first training forward of a normalisation (then ``iterations`` per forward)
WARMUP = 100


# ----------------------------------------------------------------------------------------------
# spectral radius of a real matrix


def _radius_2x2(M: Tensor) -> Tensor:
    """Largest eigenvalue modulus of a real 2x2 matrix, differentiable (complex pairs included)."""
    tr = M[0, 0] + M[1, 1]
    det = M[0, 0] * M[1, 1] - M[0, 1] * M[1, 0]
    disc = tr * tr / 4 - det
    if bool(disc < 0):  # a complex pair tr/2 +- i sqrt(-disc): modulus sqrt(det)
        return det.clamp_min(0).sqrt()
    root = disc.clamp_min(0).sqrt()
    return torch.maximum((tr / 2 + root).abs(), (tr / 2 - root).abs())


def _block_step(W: Tensor, Q: Tensor) -> Tensor:
    Q, _ = torch.linalg.qr(W @ Q)
    return Q


def spectral_radius(
    W,
    *,
    method: str = "block",
    max_iter: int = 10_000,
    tol: float = 1e-12,
    generator: torch.Generator | None = None,
) -> Estimate:
    """The spectral radius ``rho(W) = max |lambda_i(W)|`` of a real square matrix, four ways.

    ``"eig"``: dense eigenvalues (``kind="exact"``). ``"block"``: power iteration on a two-column
    block with the ``2 x 2`` Rayleigh quotient ``Q^T W Q`` (converges to the dominant eigenvalue or
    complex pair; stops when ``||W Q - Q (Q^T W Q)||`` is ``tol ||W||``, the block then spans an
    invariant subspace; ``kind="estimate"``). ``"rayleigh"``: the textbook single-vector power
    iteration with the Rayleigh quotient ``v^T W v / v^T v``, absolute value (fails on complex pairs:
    it oscillates; returned after ``max_iter`` steps with ``converged=False`` when the quotient has
    not settled). ``"growth"``: ``||W^k v||^(1/k)`` (always tends to ``rho`` but slowly, error
    ``O(log(C) / k)``). ``extra["history"]`` holds the estimates per step (float64).

    Example
    -------
    >>> R = torch.zeros(3, 3, dtype=torch.float64)
    >>> R[0, 1], R[1, 0], R[2, 2] = -0.9, 0.9, 0.5    # eigenvalues +-0.9i and 0.5
    >>> round(spectral_radius(R).value, 9), round(spectral_radius(R, method="eig").value, 9)
    (0.9, 0.9)
    >>> round(spectral_radius(R, method="rayleigh", max_iter=200).value, 6)    # wrong
    0.0
    """
    if method not in ("eig", "block", "rayleigh", "growth"):
        raise ValueError(f"method must be 'eig', 'block', 'rayleigh' or 'growth', got {method!r}")
    W = torch.as_tensor(W).detach().double()
    if W.dim() != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"W must be a square matrix, got shape {tuple(W.shape)}")
    check_finite_tensor(W, "W")
    n = W.shape[0]
    if method == "eig" or n <= 2:
        rho = float(torch.linalg.eigvals(W).abs().max())
        return Estimate(rho, "exact", "eig", norm="2")
    g = generator or torch.Generator().manual_seed(0)
    wn = float(torch.linalg.matrix_norm(W, "fro")) or 1.0
    hist: list[float] = []
    converged = False
    if method == "block":
        Q, _ = torch.linalg.qr(torch.randn(n, 2, dtype=torch.float64, generator=g))
        for _ in range(max_iter):
            Q = _block_step(W, Q)
            H = Q.T @ W @ Q
            hist.append(float(_radius_2x2(H)))
            if float(torch.linalg.matrix_norm(W @ Q - Q @ H)) <= tol * wn:
                converged = True
                break
    else:
        v = torch.randn(n, dtype=torch.float64, generator=g)
        v = v / v.norm()
        log_growth = 0.0
        for k in range(1, max_iter + 1):
            w = W @ v
            if method == "rayleigh":
                hist.append(abs(float(v @ w)))
            else:
                log_growth += math.log(max(float(w.norm()), 1e-300))
                hist.append(math.exp(log_growth / k))
            v = w / w.norm().clamp_min(1e-300)
            if method == "rayleigh" and k > 10 and abs(hist[-1] - hist[-2]) <= tol * max(hist[-1], 1e-300):
                converged = True
                break
    return Estimate(
        hist[-1], "estimate", method, norm="2", iterations=len(hist), converged=converged,
        extra={"history": torch.tensor(hist, dtype=torch.float64)},
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# parametrisations of one H x H block


class SpectralRadiusNorm(nn.Module):
    """Parametrisation ``W -> target W / rho(W)`` (see the module docstring, ``"rho"``).

    ``method="power"``: ``rho`` from a persistent two-column block (``iterations`` block steps per
    forward in training mode, ``WARMUP`` at the first; none in eval mode), differentiated through
    the ``2 x 2`` Rayleigh quotient. ``method="eig"``: dense eigenvalues. ``bound="at_most"`` scales only when
    ``rho > target`` (``rho <= target`` instead of ``= target``).
    """

    def __init__(self, n: int, *, method: str = "power", iterations: int = 1, target: float = 1.0,
                 bound: str = "equal", seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        if method not in ("power", "eig"):
            raise ValueError(f"method must be 'power' or 'eig', got {method!r}")
        if bound not in ("equal", "at_most"):
            raise ValueError(f"bound must be 'equal' or 'at_most', got {bound!r}")
        self.method, self.iterations, self.target, self.bound = method, iterations, target, bound
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("Q", torch.linalg.qr(torch.randn(n, 2, generator=g))[0])
        # the exact rho of the current weight, set by :func:`finalise` and used in eval mode
        self.register_buffer("fixed", torch.tensor(float("nan"), dtype=torch.float64))
        self.register_buffer("started", torch.tensor(False))  # the first forward warms up

    @torch.no_grad()
    def iterate(self, W: Tensor, steps: int) -> None:
        """``steps`` block power steps on ``W`` (no gradient); updates the stored block."""
        Q = self.Q.to(W.dtype)
        for _ in range(steps):
            Q = _block_step(W, Q)
        self.Q.copy_(Q)

    def rho(self, W: Tensor) -> Tensor:
        if self.method == "eig":
            return torch.linalg.eigvals(W).abs().max()
        Q = self.Q.to(W.dtype)
        return _radius_2x2(Q.T @ W @ Q)

    def forward(self, W: Tensor) -> Tensor:
        if self.training:
            self.fixed.fill_(float("nan"))  # the weight is changing: the exact value is stale
            if self.method == "power":
                self.iterate(W.detach(), self.iterations if bool(self.started) else WARMUP)
                self.started.fill_(True)
        if not self.training and bool(torch.isfinite(self.fixed)):
            rho = self.fixed.to(W.dtype)
        else:
            rho = self.rho(W).clamp_min(1e-12)
        scale = self.target / rho
        if self.bound == "at_most":
            scale = torch.clamp(scale, max=1.0)
        return W * scale


class SpectralNormPower(nn.Module):
    """Parametrisation ``W -> target W / sigma_max(W)``, ``sigma_max`` by the power method on
    ``W^T W`` with persistent vectors ``u, v`` and ``sigma = u^T W v`` (as
    ``torch.nn.utils.parametrizations.spectral_norm``; ``iterations`` steps per training forward,
    ``WARMUP`` at the first)."""

    def __init__(self, n: int, *, iterations: int = 1, target: float = 1.0, bound: str = "equal",
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        if bound not in ("equal", "at_most"):
            raise ValueError(f"bound must be 'equal' or 'at_most', got {bound!r}")
        self.iterations, self.target, self.bound = iterations, target, bound
        g = torch.Generator().manual_seed(seed)
        u, v = torch.randn(n, generator=g), torch.randn(n, generator=g)
        self.register_buffer("u", u / u.norm())
        self.register_buffer("v", v / v.norm())
        self.register_buffer("fixed", torch.tensor(float("nan"), dtype=torch.float64))
        self.register_buffer("started", torch.tensor(False))

    @torch.no_grad()
    def iterate(self, W: Tensor, steps: int) -> None:
        u, v = self.u.to(W.dtype), self.v.to(W.dtype)
        for _ in range(steps):
            v = W.T @ u
            v = v / v.norm().clamp_min(1e-300)
            u = W @ v
            u = u / u.norm().clamp_min(1e-300)
        self.u.copy_(u)
        self.v.copy_(v)

    def forward(self, W: Tensor) -> Tensor:
        if self.training:
            self.fixed.fill_(float("nan"))
            self.iterate(W.detach(), self.iterations if bool(self.started) else WARMUP)
            self.started.fill_(True)
        if not self.training and bool(torch.isfinite(self.fixed)):
            sigma = self.fixed.to(W.dtype)
        else:
            sigma = (self.u.to(W.dtype) @ W @ self.v.to(W.dtype)).clamp_min(1e-12)
        scale = self.target / sigma
        if self.bound == "at_most":
            scale = torch.clamp(scale, max=1.0)
        return W * scale


class _Block(nn.Module):
    """One H x H recurrent block (a module, so that it can carry a parametrisation)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


# ----------------------------------------------------------------------------------------------
# the classifier


class RecurrentClassifier(nn.Module):
    """One recurrent layer (``cell`` in ``CELLS``) and a linear readout of the last hidden state.

    Input ``x``: ``(N, T, input_size)`` float (any ``T >= 1``); output: logits ``(N, n_classes)``.
    Parameters in PyTorch's layout and initialisation (uniform ``+-1/sqrt(H)``); ``init="orthogonal"``
    starts every recurrent block orthogonal instead (a normal matrix: Henrici departure 0).
    ``normalise`` in ``NORMALISATIONS`` (module docstring); ``rho_method`` ``"power"`` or ``"eig"``;
    ``bound`` ``"equal"`` (scale onto the target) or ``"at_most"``.
    """

    def __init__(self, cell: str, input_size: int, hidden: int, n_classes: int, *,
                 normalise: str = "none", rho_method: str = "power", bound: str = "equal",
                 init: str = "uniform", seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
        if normalise not in NORMALISATIONS:
            raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")
        if init not in ("uniform", "orthogonal"):
            raise ValueError(f"init must be 'uniform' or 'orthogonal', got {init!r}")
        self.cell, self.input_size, self.hidden, self.n_classes = cell, input_size, hidden, n_classes
        self.normalise, self.init = normalise, init
        G, H = len(GATES[cell]), hidden
        g = torch.Generator().manual_seed(seed)
        k = 1 / math.sqrt(H)

        def uniform(*shape):
            return (torch.rand(*shape, generator=g) * 2 - 1) * k

        self.weight_ih = nn.Parameter(uniform(G * H, input_size))
        self.bias_ih = nn.Parameter(uniform(G * H))
        self.bias_hh = nn.Parameter(uniform(G * H))
        blocks = []
        for _ in range(G):
            W = uniform(H, H)
            if init == "orthogonal":
                W = torch.linalg.qr(torch.randn(H, H, generator=g))[0]
            blocks.append(_Block(W))
        self.blocks = nn.ModuleList(blocks)
        self.readout = nn.Linear(H, n_classes)
        with torch.no_grad():
            self.readout.weight.copy_(uniform(n_classes, H))
            self.readout.bias.copy_(uniform(n_classes))
        P = torch.nn.utils.parametrize
        for i, b in enumerate(self.blocks):
            if normalise == "rho":
                P.register_parametrization(
                    b, "weight", SpectralRadiusNorm(H, method=rho_method, bound=bound, seed=seed + i)
                )
            elif normalise == "sigma":
                P.register_parametrization(b, "weight", SpectralNormPower(H, bound=bound, seed=seed + i))
            elif normalise == "orthogonal":
                torch.nn.utils.parametrizations.orthogonal(b, "weight")

    # -- weights ----------------------------------------------------------------------------
    @property
    def state_size(self) -> int:
        """``S``: ``2H`` for the LSTM (``h`` and ``c``), ``H`` otherwise."""
        return 2 * self.hidden if self.cell == "lstm" else self.hidden

    def recurrent_matrices(self) -> dict[str, Tensor]:
        """The effective (normalised) ``H x H`` recurrent block of every gate, detached:
        ``{"hh"}`` (Elman), ``{"i", "f", "g", "o"}`` (LSTM), ``{"r", "z", "n"}`` (GRU)."""
        with torch.no_grad():
            blocks = zip(GATES[self.cell], self.blocks, strict=True)
            return {name: b.weight.detach().clone() for name, b in blocks}

    @property
    def weight_hh(self) -> Tensor:
        """The stacked recurrent weight in PyTorch's ``(G H, H)`` layout (with gradient)."""
        return torch.cat([b.weight for b in self.blocks], 0)

    # -- dynamics -----------------------------------------------------------------------------
    def step(self, x_t: Tensor, s: Tensor, W_hh: Tensor | None = None) -> Tensor:
        """One step of the state ``s`` ``(N, S)`` under input ``x_t`` ``(N, d)``; returns ``(N, S)``."""
        W_hh = self.weight_hh if W_hh is None else W_hh
        H = self.hidden
        gi = x_t @ self.weight_ih.T + self.bias_ih
        if self.cell == "elman":
            return torch.tanh(gi + s @ W_hh.T + self.bias_hh)
        if self.cell == "lstm":
            h, c = s[..., :H], s[..., H:]
            gates = gi + h @ W_hh.T + self.bias_hh
            i, f, gg, o = gates.split(H, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
            h = torch.sigmoid(o) * torch.tanh(c)
            return torch.cat([h, c], -1)
        gh = s @ W_hh.T + self.bias_hh
        ir, iz, i_n = gi.split(H, -1)
        hr, hz, h_n = gh.split(H, -1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * s

    def states(self, x: Tensor, s0: Tensor | None = None) -> Tensor:
        """All states ``(N, T + 1, S)``: ``s_0`` (zeros unless given) then ``s_1 .. s_T``."""
        self._check(x)
        s = x.new_zeros(x.shape[0], self.state_size) if s0 is None else s0
        W = self.weight_hh  # the parametrisation runs once per sequence
        out = [s]
        for t in range(x.shape[1]):
            s = self.step(x[:, t], s, W)
            out.append(s)
        return torch.stack(out, 1)

    def readout_of(self, s: Tensor) -> Tensor:
        """Logits from states ``(..., S)`` (the readout sees ``h``, the first ``H`` entries)."""
        return self.readout(s[..., : self.hidden])

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        s = x.new_zeros(x.shape[0], self.state_size)
        W = self.weight_hh
        for t in range(x.shape[1]):
            s = self.step(x[:, t], s, W)
        return self.readout_of(s)

    def _check(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[2] != self.input_size or x.shape[1] < 1:
            raise ValueError(
                f"x must be a (N, T, {self.input_size}) sequence batch with T >= 1, got "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__} (images: use "
                "recurrent.as_rows(images) to read them row by row)"
            )

    def extra_repr(self) -> str:
        return f"cell={self.cell}, hidden={self.hidden}, normalise={self.normalise}, init={self.init}"


@torch.no_grad()
def finalise(model: RecurrentClassifier) -> list[Estimate]:
    """Fix every normalisation of ``model`` at its exact value, for evaluation after training.

    During training the scale comes from the persistent power iterations (one step per forward:
    an estimate that lags the changing weight). Here each ``"rho"`` / ``"sigma"`` block stores the
    exact ``rho`` (dense eigenvalues) or ``sigma_max`` (dense singular values) of its current raw
    weight, which eval mode then uses: the evaluated blocks reach their target to rounding. The
    network's function changes by that last correction of the scale (small after training). Going
    back to training mode discards the fixed values. Returns one
    :class:`~sensitivity_lib.results.Estimate` per normalised
    block: the raw weight's ``rho`` or ``sigma_max`` (``kind="exact"``), with the power estimate it
    replaced in ``extra["power"]``.
    """
    out: list[Estimate] = []
    for b in model.blocks:
        if not torch.nn.utils.parametrize.is_parametrized(b, "weight"):
            continue
        p = b.parametrizations.weight
        W = p.original.detach().double()
        norm = p[0]
        if isinstance(norm, SpectralRadiusNorm):
            power = float(norm.rho(W))
            exact = float(torch.linalg.eigvals(W).abs().max())
            norm.fixed.fill_(exact)
            out.append(Estimate(exact, "exact", "eig", extra={"power": power}))
        elif isinstance(norm, SpectralNormPower):
            power = float(norm.u.double() @ W @ norm.v.double())
            exact = float(torch.linalg.svdvals(W)[0])
            norm.fixed.fill_(exact)
            out.append(Estimate(exact, "exact", "svd", extra={"power": power}))
    return out


# ----------------------------------------------------------------------------------------------
# states and state Jacobians


def hidden_states(model: RecurrentClassifier, x: Tensor, s0: Tensor | None = None) -> Tensor:
    """The states ``(N, T + 1, S)`` of ``model`` along ``x`` (``s_0`` first), without gradient."""
    check_batch(x, "x")
    with torch.no_grad():
        return model.states(x, s0)


def state_jacobians(model: RecurrentClassifier, x: Tensor) -> Tensor:
    """The one-step state Jacobians ``J_t = d s_t / d s_{t-1}`` along ``x``: ``(N, T, S, S)``.

    ``S x S`` each (``S = H``, or ``2H`` for the LSTM's ``(h, c)``), by ``torch.func.jacrev`` of one
    step, vmapped over the batch. For the Elman cell ``J_t = diag(1 - h_t^2) W_hh`` (tests). These
    are the local linear dynamics whose pseudospectra the chapter draws; small by construction
    (``S <= 2 H``), so dense.
    """
    S = hidden_states(model, x)
    W = model.weight_hh.detach()

    def one(x_t, s):
        return model.step(x_t[None], s[None], W)[0]

    jac = torch.func.vmap(torch.func.jacrev(one, argnums=1))
    with torch.no_grad():
        return torch.stack([jac(x[:, t], S[:, t]) for t in range(x.shape[1])], 1)


def state_jacobian(model: RecurrentClassifier, x: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
    """The unrolled state Jacobian ``d s_stop / d s_start = J_stop ... J_{start+1}`` along ``x``:
    ``(N, S, S)`` (``stop`` defaults to ``T``). Its norm is the worst amplification of a small
    state perturbation at time ``start`` when it reaches time ``stop``.

    Example
    -------
    >>> m = RecurrentClassifier("elman", 3, 5, 2, seed=1).eval()
    >>> x = torch.rand(2, 6, 3)
    >>> J = state_jacobian(m, x, 2)
    >>> f = lambda s: m.states(x[:1, 2:], s[None])[0, -1]
    >>> s2 = hidden_states(m, x)[0, 2]
    >>> torch.allclose(J[0], torch.func.jacrev(f)(s2), atol=1e-6)
    True
    """
    T = x.shape[1]
    stop = T if stop is None else stop
    if not 0 <= start <= stop <= T:
        raise ValueError(f"need 0 <= start <= stop <= T = {T}, got start={start}, stop={stop}")
    Js = state_jacobians(model, x[:, :stop])
    out = torch.eye(model.state_size, dtype=Js.dtype).expand(x.shape[0], -1, -1).clone()
    for t in range(start, stop):
        out = Js[:, t] @ out
    return out

"""Tests of sensitivity_lib.linalg against dense eigen/singular value decompositions (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sensitivity_lib.linalg import (
    _omega_step,
    lanczos,
    linear_adjoint,
    power_iteration,
    top_singular_value,
)

torch.set_num_threads(1)


def _psd(n: int, seed: int, decay: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.rand(n, generator=g, dtype=torch.float64) * torch.exp(-decay * torch.arange(n))
    return (q * lam) @ q.T


def _start(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 60), seed=st.integers(0, 10_000))
def test_lanczos_matches_eigvalsh_and_is_never_above(n, seed):
    A = _psd(n, seed)
    exact = float(torch.linalg.eigvalsh(A)[-1])
    r = lanczos(lambda v: A @ v, _start(n, seed + 1), tol=1e-12, max_iter=4 * n)
    assert r.value <= exact * (1 + 1e-12) + 1e-15
    assert r.value >= exact * (1 - 1e-9)
    assert r.converged
    # the returned value is the Rayleigh quotient of the returned unit vector
    v = r.vector
    assert math.isclose(float(v @ A @ v), r.value, rel_tol=1e-12, abs_tol=1e-15)
    assert math.isclose(float(v.norm()), 1.0, rel_tol=1e-12)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 40), seed=st.integers(0, 10_000))
def test_power_iteration_is_never_above(n, seed):
    A = _psd(n, seed)
    exact = float(torch.linalg.eigvalsh(A)[-1])
    r = power_iteration(lambda v: A @ v, _start(n, seed + 1), tol=1e-12, max_iter=3000)
    assert r.value <= exact * (1 + 1e-12) + 1e-15
    assert r.iterations <= 3000


def test_power_iteration_converges_with_a_gap():
    lam = torch.tensor([5.0, 2.5, 1.0, 0.5], dtype=torch.float64)
    A = torch.diag(lam)
    r = power_iteration(lambda v: A @ v, torch.ones(4, dtype=torch.float64), tol=1e-14)
    assert r.converged and abs(r.value - 5.0) < 1e-10
    assert r.residual < 1e-5
    # the Rayleigh quotient converges with ratio (lambda_2/lambda_1)^2 = 1/4: ~23 steps for 1e-14
    assert 15 < r.iterations < 40


def test_lanczos_needs_far_fewer_steps_than_power_on_a_continuum():
    # spectrum of a 1-D Laplacian-like operator: no gap at the top
    n = 400
    lam = 2 - 2 * torch.cos(torch.arange(1, n + 1, dtype=torch.float64) * math.pi / (n + 1))
    A = torch.diag(lam)
    v0 = _start(n, 0)
    lz = lanczos(lambda v: A @ v, v0, tol=1e-6, max_iter=400)
    pw = power_iteration(lambda v: A @ v, v0, tol=1e-9, max_iter=400)
    top = float(lam.max())
    assert lz.value <= top and pw.value <= top
    assert (top - lz.value) / top < 1e-5
    assert (top - lz.value) < 0.01 * (top - pw.value)


def test_lanczos_restarts_and_still_converges():
    A = _psd(80, 3)
    exact = float(torch.linalg.eigvalsh(A)[-1])
    r = lanczos(lambda v: A @ v, _start(80, 4), tol=1e-12, max_iter=400, max_basis=10)
    assert r.iterations > 10  # at least one restart happened
    assert exact * (1 - 1e-8) <= r.value <= exact * (1 + 1e-12)


def test_lanczos_exhausts_a_small_krylov_space_exactly():
    A = torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64))
    r = lanczos(lambda v: A @ v, torch.ones(3, dtype=torch.float64), tol=1e-14)
    assert abs(r.value - 9.0) < 1e-12 and r.iterations <= 4 and r.converged


def test_certified_upper_bound_stops_early():
    A = _psd(200, 7)
    exact = float(torch.linalg.eigvalsh(A)[-1])
    free = lanczos(lambda v: A @ v, _start(200, 8), tol=1e-12, max_iter=200)
    stop = lanczos(lambda v: A @ v, _start(200, 8), tol=1e-2, max_iter=200, upper=exact)
    assert stop.converged and stop.iterations < free.iterations
    assert exact * (1 - 1e-2) <= stop.value <= exact * (1 + 1e-12)


@pytest.mark.parametrize("method", [lanczos, power_iteration])
def test_batched_matches_one_by_one(method):
    mats = torch.stack([_psd(12, s, decay=0.3) for s in range(3)])
    v0 = _start((3, 12), 1)
    def mv(v):
        return torch.einsum("bij,bj->bi", mats, v)

    rb = method(mv, v0, tol=1e-12, max_iter=500, batched=True)
    assert rb.value.shape == (3,)
    for b in range(3):
        exact = float(torch.linalg.eigvalsh(mats[b])[-1])
        assert rb.value[b] <= exact * (1 + 1e-12)
        assert rb.value[b] >= exact * (1 - 1e-6)


def test_batched_handles_a_problem_that_breaks_down_early():
    # problem 0 is rank one (Krylov space of dimension 1), problem 1 is generic
    u = torch.zeros(6, dtype=torch.float64)
    u[0] = 1.0
    mats = torch.stack([3.0 * torch.outer(u, u), _psd(6, 2)])
    v0 = _start((2, 6), 5)
    r = lanczos(lambda v: torch.einsum("bij,bj->bi", mats, v), v0, tol=1e-12, batched=True)
    assert abs(float(r.value[0]) - 3.0) < 1e-12
    assert abs(float(r.value[1]) - float(torch.linalg.eigvalsh(mats[1])[-1])) < 1e-10


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 30), n=st.integers(1, 30), seed=st.integers(0, 10_000))
def test_top_singular_value_matches_svd(m, n, seed):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(m, n, generator=g, dtype=torch.float64)
    exact = float(torch.linalg.svdvals(B)[0])
    r = top_singular_value(lambda x: B @ x, _start(n, seed), lambda y: B.T @ y, tol=1e-12)
    assert r.value <= exact * (1 + 1e-12)
    assert r.value >= exact * (1 - 1e-9)
    assert torch.allclose(B @ r.right, r.value * r.left, atol=1e-6 * exact)


def test_top_singular_value_with_vjp_adjoint_and_power():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(7, 5, generator=g, dtype=torch.float64)
    exact = float(torch.linalg.svdvals(B)[0])
    r = top_singular_value(lambda x: x @ B.T, _start((1, 5), 1), method="power", tol=1e-14)
    assert exact * (1 - 1e-8) <= r.value <= exact * (1 + 1e-12)


def test_float32_iteration_with_float64_check_is_a_lower_bound():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(50, 40, generator=g, dtype=torch.float64)
    B32 = B.float()
    exact = float(torch.linalg.svdvals(B)[0])
    r = top_singular_value(
        lambda x: B32 @ x,
        torch.randn(40, generator=g),
        lambda y: B32.T @ y,
        tol=1e-6,
        check=(lambda x: B @ x, lambda y: B.T @ y),
    )
    assert r.value <= exact * (1 + 1e-13)
    assert r.value >= exact * (1 - 1e-5)


def test_linear_adjoint_satisfies_the_adjoint_identity_for_any_batch():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)

    def conv(x):
        return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 2, 0, 1)), w, stride=2)

    adj = linear_adjoint(conv, torch.zeros(1, 2, 7, 6, dtype=torch.float64))
    for b in (1, 4):
        x = torch.randn(b, 2, 7, 6, generator=g, dtype=torch.float64)
        y = torch.randn(conv(x).shape, generator=g, dtype=torch.float64)
        assert math.isclose(float((conv(x) * y).sum()), float((x * adj(y)).sum()), rel_tol=1e-12)


def test_errors_are_clear():
    A = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="zero"):
        lanczos(lambda v: A @ v, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-finite"):
        power_iteration(lambda v: A @ v, torch.tensor([1.0, float("nan"), 0.0]))
    with pytest.raises(TypeError, match="floating"):
        lanczos(lambda v: A @ v, torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="same shape"):
        lanczos(lambda v: v[:2], torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="tol"):
        lanczos(lambda v: A @ v, torch.ones(3, dtype=torch.float64), tol=0)
    with pytest.raises(ValueError, match="method"):
        top_singular_value(lambda x: x, torch.ones(3), method="arnoldi")
    with pytest.raises(ValueError, match="batched"):
        power_iteration(lambda v: v, torch.ones(3), batched=True)


def test_results_are_reproducible():
    A = _psd(50, 1)
    r1 = lanczos(lambda v: A @ v, _start(50, 2), tol=1e-6)
    r2 = lanczos(lambda v: A @ v, _start(50, 2), tol=1e-6)
    assert r1.value == r2.value and r1.iterations == r2.iterations


def _separated_float32(n=300):
    """Two well separated top eigenvalues (3, 2.5) over a bulk in [0, 1): they converge in a few
    steps, after which the plain recurrence loses orthogonality fast."""
    bulk = torch.rand(n - 2, generator=torch.Generator().manual_seed(0))
    return torch.cat([torch.tensor([3.0, 2.5]), bulk]).float()


def test_simon_estimates_bound_the_loss_of_orthogonality():
    # plain float32 Lanczos, never re-orthogonalised, with the true q_{j+1} . q_k tracked
    # beside Simon's estimates: while the estimates are in the range where they decide
    # (below 1e-2), they must not underestimate the true loss
    lam = _separated_float32()
    n, m = lam.numel(), 60
    Q = torch.zeros(m + 1, n)
    Q[0] = _start(n, 1).float()
    Q[0] /= Q[0].norm()
    alpha = torch.zeros(1, m + 1, dtype=torch.float64)
    beta = torch.zeros(1, m + 1, dtype=torch.float64)
    omega = torch.zeros(1, m + 2, dtype=torch.float64)
    omega[0, 0] = 1.0
    omega_prev = torch.zeros_like(omega)
    eps, anorm, worst_true, decided = torch.finfo(torch.float32).eps, 0.0, 0.0, 0
    for j in range(m):
        w = lam * Q[j]
        if j > 0:
            w -= float(beta[0, j - 1]) * Q[j - 1]
        alpha[0, j] = float((Q[j] * w).sum(dtype=torch.float64))
        w -= float(alpha[0, j]) * Q[j]
        lo = max(0, j - 1)
        local = Q[lo : j + 1] @ w
        w -= local @ Q[lo : j + 1]
        alpha[0, j] += float(local[-1])
        b = w.norm().double().reshape(1)
        anorm = max(anorm, float(alpha[0, j].abs() + b))
        nxt = _omega_step(omega, omega_prev, alpha, beta, b, j, eps * anorm)
        beta[0, j] = b
        Q[j + 1] = w / float(b)
        true = float((Q[: j + 1].double() @ Q[j + 1].double()).abs().max())
        est = float(nxt[0, : j + 1].abs().max())
        if est <= 1e-2:
            decided += 1
            assert true <= est, (j, true, est)
        worst_true = max(worst_true, true)
        omega_prev, omega = omega, nxt
    assert decided >= 5
    assert worst_true > 0.1  # without re-orthogonalisation the basis really is lost


def test_partial_reorthogonalisation_keeps_float32_lanczos_exact():
    lam = _separated_float32()
    r = lanczos(lambda v: lam * v, _start(lam.numel(), 1).float(), tol=1e-30, max_iter=60)
    assert 0 < r.reorthogonalised < r.iterations  # needed, but not at every step
    assert abs(r.value - 3.0) <= 3.0 * 1e-6
    # and on a continuum in float64 no step needed it (the top Ritz value never converged early)
    n = 400
    cont = 2 - 2 * torch.cos(torch.arange(1, n + 1, dtype=torch.float64) * math.pi / (n + 1))
    r = lanczos(lambda v: cont * v, _start(n, 0), tol=1e-6, max_iter=400)
    assert r.reorthogonalised < r.iterations // 4
    assert (float(cont.max()) - r.value) / float(cont.max()) < 1e-5

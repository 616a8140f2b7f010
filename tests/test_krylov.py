"""Tests of sensitivity_lib.krylov against dense eigen / singular value decompositions (float64).

The claims under test: every value is a Rayleigh quotient (never above the top of the spectrum);
a problem reported as converged is within ``tol`` of the true value on the families tested here
(random PSD spectra, continua, convolutions of every stride, dilation and grouping); a run that
stops at ``max_iter`` says so and warns; batches, restarts and complex operators work.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import dense_matrix
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sensitivity_lib.krylov import (
    LinearOperator,
    NotConvergedWarning,
    _omega_step,
    _tridiagonal_vector,
    linear_adjoint,
    solve,
    to_scipy,
    top_eig,
    top_singular,
)

torch.set_num_threads(1)


def _psd(n: int, seed: int, decay: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.rand(n, generator=g, dtype=torch.float64) * torch.exp(-decay * torch.arange(n))
    return (q * lam) @ q.T


def _start(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _op(A: torch.Tensor) -> LinearOperator:
    return LinearOperator.from_matrix(A)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 60), seed=st.integers(0, 10_000), method=st.sampled_from(["lanczos", "power"]))
def test_value_is_never_above_and_converged_means_within_tol(n, seed, method):
    A = _psd(n, seed)
    exact = float(torch.linalg.eigvalsh(A)[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotConvergedWarning)
        r = top_eig(_op(A), _start(n, seed + 1), method=method, tol=1e-6, max_iter=4000)
    value = float(r.value[0])
    assert value <= exact * (1 + 1e-12) + 1e-15
    if bool(r.converged[0]):
        assert value >= exact * (1 - 1e-6)
    # the returned value is the Rayleigh quotient of the returned unit vector
    v = r.vector[0]
    assert math.isclose(float(v @ A @ v), value, rel_tol=1e-12, abs_tol=1e-15)
    assert math.isclose(float(v.norm()), 1.0, rel_tol=1e-12)


def test_lanczos_is_exact_on_small_problems():
    for seed in range(10):
        A = _psd(30, seed)
        r = top_eig(_op(A), _start(30, seed), tol=1e-12, max_iter=200)
        assert bool(r.converged[0])
        assert math.isclose(float(r.value[0]), float(torch.linalg.eigvalsh(A)[-1]), rel_tol=1e-11)


def test_power_iteration_converges_with_a_gap():
    lam = torch.tensor([5.0, 2.5, 1.0, 0.5], dtype=torch.float64)
    r = top_eig(_op(torch.diag(lam)), torch.ones(4, dtype=torch.float64), method="power", tol=1e-12)
    assert bool(r.converged[0]) and abs(float(r.value[0]) - 5.0) < 1e-10
    # ratio (lambda_2 / lambda_1)^2 = 1/4 per step: tens of steps (and one short Lanczos check)
    assert 15 < int(r.iterations[0]) < 80


def test_lanczos_is_far_more_accurate_than_power_on_a_continuum():
    # spectrum of a 1-D Laplacian: no gap at the top; 400 products each, tolerance out of reach
    n = 400
    lam = 2 - 2 * torch.cos(torch.arange(1, n + 1, dtype=torch.float64) * math.pi / (n + 1))
    A, top = torch.diag(lam), float(lam.max())
    with pytest.warns(NotConvergedWarning):
        pw = top_eig(_op(A), _start(n, 0), method="power", tol=1e-12, max_iter=400)
    with pytest.warns(NotConvergedWarning):
        lz = top_eig(_op(A), _start(n, 0), tol=1e-12, max_iter=400)
    assert not bool(lz.converged[0]) and not bool(pw.converged[0])
    err_lz, err_pw = (top - float(lz.value[0])) / top, (top - float(pw.value[0])) / top
    assert 0 <= err_lz < 1e-6 and err_lz < 0.01 * err_pw


def test_lanczos_restarts_and_still_converges():
    A = _psd(80, 3)
    exact = float(torch.linalg.eigvalsh(A)[-1])
    r = top_eig(_op(A), _start(80, 4), tol=1e-10, max_iter=400, max_basis=10)
    assert int(r.iterations[0]) > 10  # at least one restart happened
    assert bool(r.converged[0]) and exact * (1 - 1e-10) <= float(r.value[0]) <= exact * (1 + 1e-12)


def test_lanczos_exhausts_a_small_krylov_space_exactly():
    A = torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64))
    r = top_eig(_op(A), torch.ones(3, dtype=torch.float64), tol=1e-14)
    assert abs(float(r.value[0]) - 9.0) < 1e-12 and int(r.iterations[0]) <= 4 and bool(r.converged[0])
    assert float(r.error[0]) == 0.0  # invariant space: exact


def test_certified_upper_bound_stops_early():
    A = _psd(200, 7)
    exact = float(torch.linalg.eigvalsh(A)[-1])
    free = top_eig(_op(A), _start(200, 8), tol=1e-12, max_iter=200)
    stop = top_eig(_op(A), _start(200, 8), tol=1e-2, max_iter=200, upper=exact)
    assert bool(stop.converged[0]) and int(stop.iterations[0]) < int(free.iterations[0])
    assert exact * (1 - 1e-2) <= float(stop.value[0]) <= exact * (1 + 1e-12)
    assert float(stop.error[0]) >= (exact - float(stop.value[0])) / float(stop.value[0]) - 1e-12


def test_max_iter_without_convergence_warns_and_says_so():
    A = _psd(300, 1)
    with pytest.warns(NotConvergedWarning, match="did not converge"):
        r = top_eig(_op(A), _start(300, 2), tol=1e-12, max_iter=5)
    assert not bool(r.converged[0]) and int(r.iterations[0]) == 5
    exact = float(torch.linalg.eigvalsh(A)[-1])
    assert float(r.value[0]) <= exact * (1 + 1e-12)  # still a lower estimate
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        top_eig(_op(A), _start(300, 2), tol=1e-12, max_iter=5, warn=False)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_batches_match_one_by_one_and_converged_problems_leave(method):
    # one problem with a wide gap at the top (fast), two without (slow)
    bulk = torch.rand(39, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mats = torch.stack([torch.diag(torch.cat([torch.tensor([4.0], dtype=torch.float64), bulk])),
                        _psd(40, 1), _psd(40, 2)])  # fmt: skip
    base = LinearOperator.from_matrix(mats)
    calls = []

    def restrict(idx):
        sub = base.restrict(idx)
        def mv(x):
            calls.append(len(x))
            return sub.matvec(x)

        return LinearOperator(mv, in_shape=(40,), batch=len(idx), dtype=torch.float64,
                              restrict=lambda j: restrict(idx[j]))  # fmt: skip

    rb = top_eig(restrict(torch.arange(3)), _start((3, 40), 1), method=method, tol=1e-10, max_iter=3000)
    exact = torch.linalg.eigvalsh(mats)[:, -1]
    assert rb.value.shape == (3,) and bool(rb.converged.all())
    assert bool((rb.value <= exact * (1 + 1e-12)).all()) and bool((rb.value >= exact * (1 - 1e-10)).all())
    assert calls[0] == 3 and min(calls) < 3  # the converged problem left the batch
    assert int(rb.iterations[0]) < int(rb.iterations[1:].min())


def test_unrestrictable_batches_keep_running_and_stay_correct():
    mats = torch.stack([_psd(12, s, decay=0.3) for s in range(3)])
    op = LinearOperator.from_matrix(mats)
    plain = LinearOperator(op.matvec, op.rmatvec, in_shape=(12,), batch=3, dtype=torch.float64)
    r = top_eig(plain, _start((3, 12), 1), tol=1e-10)
    assert bool(r.converged.all())
    assert torch.allclose(r.value, torch.linalg.eigvalsh(mats)[:, -1], rtol=1e-10)


def test_results_are_reproducible():
    A = _psd(50, 1)
    r1, r2 = top_eig(_op(A), tol=1e-6), top_eig(_op(A), tol=1e-6)
    assert torch.equal(r1.value, r2.value) and torch.equal(r1.iterations, r2.iterations)


def test_singular_values_of_rectangular_and_complex_batches():
    g = torch.Generator().manual_seed(0)
    for shape in ((3, 20, 7), (2, 5, 30)):
        for dtype in (torch.float64, torch.complex128):
            Z = torch.randn(shape, generator=g, dtype=dtype)
            s = top_singular(LinearOperator.from_matrix(Z), tol=1e-12)
            assert torch.allclose(s.value, torch.linalg.svdvals(Z)[:, 0].double(), rtol=1e-10)
            assert s.side == ("output" if shape[1] <= shape[2] else "input")
            assert torch.allclose(s.left.abs().norm(dim=1), torch.ones(shape[0], dtype=torch.float64))
            Av = (Z @ s.right[..., None])[..., 0]
            assert torch.allclose(Av.norm(dim=1).double(), s.value, rtol=1e-12)


def test_linear_adjoint_matches_transpose():
    W = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    adj = linear_adjoint(lambda x: x @ W.T, torch.zeros(1, 6, dtype=torch.float64))
    y = torch.randn(5, 4, dtype=torch.float64)
    assert torch.allclose(adj(y), y @ W)


def test_bad_input_is_refused_clearly():
    A = _psd(5, 0)
    with pytest.raises(ValueError, match="method"):
        top_eig(_op(A), method="arnoldi")
    with pytest.raises(ValueError, match="tol"):
        top_eig(_op(A), tol=0.0)
    with pytest.raises(ValueError, match="non-finite"):
        top_eig(_op(A), torch.full((5,), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="zero"):
        top_eig(_op(A), torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="must hold"):
        top_eig(_op(A), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="square"):
        top_eig(LinearOperator.from_matrix(torch.ones(3, 4, dtype=torch.float64)))
    with pytest.raises(ValueError, match="rmatvec"):
        top_singular(LinearOperator(lambda x: x, in_shape=(3,), dtype=torch.float64))
    bad = LinearOperator(lambda x: x[:, :2], None, in_shape=(3,), dtype=torch.float64)
    with pytest.raises(ValueError, match="must return shape"):
        top_eig(bad)


# ----------------------------------------------------------------------------------------------
# convolutions: the operators whose spectra have no gap at the top


def _conv_operator(conv: nn.Conv2d, shape, dtype):
    w = conv.weight.detach().to(dtype)

    def fwd(x):
        return F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)

    ex = torch.zeros(1, *shape, dtype=dtype)
    out = fwd(ex).shape[1:]
    return LinearOperator(fwd, linear_adjoint(fwd, ex), in_shape=shape, out_shape=out, dtype=dtype)


def _random_convs(n, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(a, b):
        return int(torch.randint(a, b + 1, (1,), generator=g))

    for i in range(n):
        gr = [1, 1, 2, 4][r(0, 3)]
        ci, co, k, s, d, p = gr * r(1, 4), gr * r(1, 4), r(1, 5), r(1, 4), r(1, 2), r(0, 2)
        H = r(max(6, d * (k - 1) + 1), 18)
        torch.manual_seed(1000 * seed + i)
        yield nn.Conv2d(ci, co, k, stride=s, padding=p, dilation=d, groups=gr, bias=False), (ci, H, H)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_converged_norms_of_random_convolutions_are_within_tol_of_the_dense_svd(method):
    """The honesty check of the stopping rule: on 40 random convolutions (strides 1-4, dilation,
    groups, padding), in float64 and float32, every value reported as converged is within the
    requested relative tolerance of the SVD of the dense matrix; most do converge."""
    converged = total = 0
    for conv, shape in _random_convs(40):
        dense = dense_matrix(_conv_operator(conv, shape, torch.float64).matvec, shape)
        exact = float(torch.linalg.svdvals(dense)[0])
        for tol in (1e-3, 1e-4):
            for dtype in (torch.float64, torch.float32):
                op = _conv_operator(conv, shape, dtype)
                check = _conv_operator(conv, shape, torch.float64)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", NotConvergedWarning)
                    r = top_singular(op, method=method, tol=tol, max_iter=2000, check=check,
                                     generator=torch.Generator().manual_seed(total))  # fmt: skip
                value = float(r.value[0])
                assert value <= exact * (1 + 1e-9), (conv, shape)
                total += 1
                if bool(r.converged[0]):
                    converged += 1
                    assert (exact - value) / exact <= tol, (conv, shape, method, tol, dtype)
    assert converged >= 0.9 * total


def test_simon_estimates_bound_the_loss_of_orthogonality():
    # plain float32 Lanczos, never re-orthogonalised, with the true q_{j+1} . q_k tracked beside Simon's
    # estimates: while the estimates are in the range where they decide (below 1e-2), they must not
    # underestimate the true loss
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


def _separated_float32(n=300):
    """Two well separated top eigenvalues (3, 2.5) over a bulk in [0, 1): they converge in a few
    steps, after which the plain recurrence loses orthogonality fast."""
    bulk = torch.rand(n - 2, generator=torch.Generator().manual_seed(0))
    return torch.cat([torch.tensor([3.0, 2.5]), bulk]).float()


def test_partial_reorthogonalisation_keeps_float32_lanczos_exact():
    lam = _separated_float32()
    op = LinearOperator(lambda v: lam * v, in_shape=(lam.numel(),), dtype=torch.float32)
    with pytest.warns(NotConvergedWarning):  # tol below float32's reach: it runs all 60 steps
        r = top_eig(op, _start(lam.numel(), 1).float(), tol=1e-30, max_iter=60)
    assert 0 < r.reorthogonalised < int(r.iterations[0])  # needed, but not at every step
    assert abs(float(r.value[0]) - 3.0) <= 3.0 * 1e-6
    # and on a continuum in float64 almost no step needed it (the top Ritz value never converged early)
    n = 400
    cont = 2 - 2 * torch.cos(torch.arange(1, n + 1, dtype=torch.float64) * math.pi / (n + 1))
    r = top_eig(LinearOperator(lambda v: cont * v, in_shape=(n,)), _start(n, 0), tol=1e-6, max_iter=400)
    assert r.reorthogonalised < int(r.iterations[0]) // 4
    assert (float(cont.max()) - float(r.value[0])) / float(cont.max()) < 1e-5


# ----------------------------------------------------------------------------------------------
# linear solves (scipy MINRES / LSQR through to_scipy)


def test_to_scipy_applies_the_map_and_its_adjoint():
    A = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    S = to_scipy(_op(A))
    v, u = _start(3, 1), _start(5, 2)
    assert S.shape == (5, 3)
    assert torch.allclose(torch.from_numpy(S.matvec(v.numpy())), A @ v, atol=1e-14)
    assert torch.allclose(torch.from_numpy(S.rmatvec(u.numpy())), A.T @ u, atol=1e-14)
    with pytest.raises(ValueError, match="batch 1"):
        to_scipy(LinearOperator.from_matrix(torch.stack([A, A])))


@pytest.mark.parametrize("method", ["minres", "lsqr"])
def test_solve_symmetric_system_and_singular_least_squares(method):
    A = _psd(30, 4) + 0.1 * torch.eye(30, dtype=torch.float64)
    b = _start(30, 5)
    r = solve(_op(A), b, method=method, tol=1e-12)
    assert r.converged and r.status == "solution" and r.residual <= 1e-12
    assert torch.allclose(r.x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-11)
    # singular and b partly outside the range: LSQR gives the pseudo-inverse solution
    q, _ = torch.linalg.qr(_start((12, 12), 6))
    lam = torch.cat([torch.linspace(1, 3, 8, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)])
    S = (q * lam) @ q.T
    b = _start(12, 7)
    if method == "lsqr":
        r = solve(_op(S), b, method="lsqr", tol=1e-12)
        assert r.converged and r.status == "least-squares"
        assert torch.allclose(r.x, torch.linalg.pinv(S, hermitian=True) @ b, atol=1e-9)
        outside = float((q[:, 8:] @ (q[:, 8:].T @ b)).norm() / b.norm())
        assert r.residual == pytest.approx(outside, rel=1e-9)
    else:  # b in the range: MINRES from 0 gives the minimum-norm solution
        br = S @ b
        r = solve(_op(S), br, method="minres", tol=1e-12)
        assert r.converged and torch.allclose(r.x, torch.linalg.pinv(S, hermitian=True) @ br, atol=1e-9)


def test_solve_that_stops_early_is_marked_and_warns():
    A = _psd(40, 8, decay=0.1) + 1e-6 * torch.eye(40, dtype=torch.float64)
    with pytest.warns(NotConvergedWarning, match="did not converge"):
        r = solve(_op(A), _start(40, 9), method="minres", tol=1e-12, max_iter=3)
    assert not r.converged and r.status == "not converged" and r.iterations <= 3
    z = solve(_op(A), torch.zeros(40, dtype=torch.float64))
    assert z.converged and float(z.x.abs().max()) == 0.0
    with pytest.raises(ValueError, match="square"):
        solve(_op(torch.zeros(3, 2, dtype=torch.float64)), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="method"):
        solve(_op(A), _start(40, 9), method="cg")


def test_noise_floor_lets_an_inexact_operator_converge():
    # every product is off by a relative 1e-9 (as when it contains an iterative solve, e.g. the
    # set-valued modulus ||H^+ R||): the increments stop shrinking at that level, so without
    # ``noise`` rule 1 never holds; with it, the run stops within tol of the exact value
    A = _psd(30, 11)
    exact = float(torch.linalg.eigvalsh(A)[-1])
    g = torch.Generator().manual_seed(12)

    def noisy(v):
        w = v @ A.T
        return w * (1 + 1e-9 * torch.randn(w.shape, generator=g, dtype=torch.float64))

    op = LinearOperator(noisy, in_shape=(30,))
    with pytest.warns(NotConvergedWarning):
        r = top_eig(op, _start(30, 13), method="power", tol=1e-8, max_iter=300)
    assert not bool(r.converged[0])
    for method in ("power", "lanczos"):
        r = top_eig(op, _start(30, 13), method=method, tol=1e-6, max_iter=2000, noise=1e-8)
        assert bool(r.converged[0]) and abs(float(r.value[0]) - exact) <= 1e-6 * exact
    with pytest.raises(ValueError, match="noise"):
        top_eig(op, method="power", noise=-1.0)


def test_problems_that_leave_do_not_restart_the_others():
    # a batch of complex Hermitian problems with very different convergence speeds takes, for every
    # problem, the same steps as that problem alone: the ones still running keep their Krylov bases
    g = torch.Generator().manual_seed(5)
    n, B = 60, 6
    X = torch.randn(B, n, n, generator=g, dtype=torch.complex128)
    lam = torch.rand(B, n, generator=g, dtype=torch.float64)
    lam[:, 0] = 1.0 + 0.5 ** torch.arange(B, dtype=torch.float64)  # gaps from 1 down to 1/32
    q, _ = torch.linalg.qr(X)
    H = (q * lam[:, None, :].to(q.dtype)) @ q.mH
    v0 = torch.randn(B, n, generator=g, dtype=torch.complex128)
    batch = top_eig(LinearOperator.from_matrix(H), v0, tol=1e-12, max_iter=200)
    alone = [top_eig(LinearOperator.from_matrix(H[b]), v0[b], tol=1e-12, max_iter=200) for b in range(B)]
    assert torch.equal(batch.iterations, torch.cat([a.iterations for a in alone]))
    assert torch.allclose(batch.value, torch.cat([a.value for a in alone]), rtol=1e-13)
    assert torch.allclose(batch.value, torch.linalg.eigvalsh(H)[:, -1], rtol=1e-11)
    assert len(set(batch.iterations.tolist())) > 1  # they did leave at different steps


def test_large_batches_take_the_secular_path_and_agree_with_lapack():
    # from 64 problems on, the top Ritz value comes from the secular equation (no eigh per step);
    # the same problems in batches of 32 take LAPACK's eigh: values and iteration counts agree
    mats = torch.stack([_psd(30, 100 + b) for b in range(96)])
    v0 = _start((96, 30), 5)
    big = top_eig(LinearOperator.from_matrix(mats), v0, tol=1e-12, max_iter=200)
    small = [top_eig(LinearOperator.from_matrix(mats[s : s + 32]), v0[s : s + 32], tol=1e-12, max_iter=200)
             for s in range(0, 96, 32)]  # fmt: skip
    exact = torch.linalg.eigvalsh(mats)[:, -1]
    assert bool(big.converged.all())
    assert torch.allclose(big.value, exact, rtol=1e-11)
    assert torch.allclose(big.value, torch.cat([r.value for r in small]), rtol=1e-13)
    its = torch.cat([r.iterations for r in small])
    assert int((big.iterations - its).abs().max()) <= 1


@pytest.mark.parametrize("k", [1, 2, 3, 6, 17, 40])
def test_twisted_ritz_vectors_match_lapack(k):
    # the Ritz vectors of retiring problems come from the twisted factorisation, not eigh: check
    # them against LAPACK on random tridiagonals, some with tiny and some with exactly zero betas
    # (decoupled blocks, whose components beyond the zero must vanish)
    g = torch.Generator().manual_seed(k)
    a = torch.randn(300, k, generator=g, dtype=torch.float64)
    b = torch.randn(300, max(k - 1, 0), generator=g, dtype=torch.float64)
    b[100:200] *= 10.0 ** torch.randint(-12, 0, b[100:200].shape, generator=g)
    b[200:] *= torch.rand(b[200:].shape, generator=g) > 0.3
    T = torch.diag_embed(a) + torch.diag_embed(b, 1) + torch.diag_embed(b, -1)
    evals, evecs = torch.linalg.eigh(T)
    theta, top = evals[:, -1], evecs[:, :, -1]
    x = _tridiagonal_vector(a, b, theta)
    assert torch.allclose(x.norm(dim=1), torch.ones(300, dtype=torch.float64), atol=1e-14)
    residual = (T @ x[:, :, None])[:, :, 0] - theta[:, None] * x
    assert float(residual.norm(dim=1).max()) < 1e-12
    gap = evals[:, -1] - (evals[:, -2] if k > 1 else evals[:, -1] - 1)
    isolated = gap > 1e-6  # where the top eigenvector is determined, it is LAPACK's up to sign
    assert float((1 - (x * top).sum(1).abs())[isolated].max()) < 1e-12

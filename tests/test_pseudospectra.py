"""Tests of sensitivity_lib.pseudospectra against exact answers and dense references.

Exact answers: for a normal matrix ``sigma_min(zI - A) = min |z - lambda|``, Henrici's departure is
0, ``rho_eps = rho + eps`` and the Kreiss constant is 1; the powers of a Jordan block; the Kreiss
matrix theorem's two bounds on random matrices; and ``sigma_min_grid`` equal to per-point dense
SVDs to 1e-8 relative on random non-normal matrices, real and complex.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sensitivity_lib import pseudospectra as ps


def _random(n: int, seed: int, complex_: bool = False, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    if complex_:
        A = torch.complex(A, torch.randn(n, n, generator=g, dtype=torch.float64)) / math.sqrt(2)
    return scale * A / math.sqrt(n)


def _normal(eigenvalues: torch.Tensor, seed: int) -> torch.Tensor:
    n = len(eigenvalues)
    g = torch.Generator().manual_seed(seed)
    X = torch.complex(torch.randn(n, n, generator=g, dtype=torch.float64),
                      torch.randn(n, n, generator=g, dtype=torch.float64))  # fmt: skip
    Q, _ = torch.linalg.qr(X)
    return (Q * eigenvalues.to(torch.complex128)) @ Q.mH


def _dense(A: torch.Tensor, re, im) -> np.ndarray:
    Z = np.asarray(re)[None, :] + 1j * np.asarray(im)[:, None]
    M = A.numpy().astype(np.complex128)
    out = np.empty(Z.shape)
    with ps.pinned_threads(1):  # complex SVDs with two BLAS threads ran up to 600x slower here
        for idx in np.ndindex(Z.shape):
            out[idx] = np.linalg.svd(Z[idx] * np.eye(len(M)) - M, compute_uv=False)[-1]
    return out


# ------------------------------------------------------------------------------------------------
# sigma_min on a grid


def test_starts_from_neighbours_survive_crossings_of_the_nearest_eigenvalue():
    # a real normal matrix with evenly spaced eigenvalues: between two grid points whose nearest
    # eigenvalue differs, a neighbour's top vector is an exact eigenvector of the wrong eigenvalue
    # (the coarse-to-fine starts carry a random part for this); every value must still be exact
    lam = torch.linspace(-0.9, 0.9, 32, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    A = (Q * lam) @ Q.T
    xs = np.linspace(-1.6, 1.6, 61)
    e = ps.sigma_min_grid(A, xs, xs, tol=1e-9)
    Z = torch.from_numpy(xs[None, :] + 1j * xs[:, None])
    exact = (Z[..., None] - lam.to(torch.complex128)).abs().amin(-1)
    assert bool(e.converged.all())
    assert torch.allclose(e.value, exact, rtol=1e-8, atol=1e-13)


def test_normal_matrix_sigma_min_is_the_distance_to_the_spectrum():
    lam = torch.tensor([0.9, -0.5 + 0.5j, 0.3j, -0.8 - 0.1j, 0.0], dtype=torch.complex128)
    A = _normal(lam, 0)
    re, im = np.linspace(-1.2, 1.2, 13), np.linspace(-1.1, 1.0, 11)
    Z = torch.from_numpy(re[None, :] + 1j * im[:, None])
    exact = (Z[..., None] - lam).abs().amin(-1)
    s = ps.sigma_min_grid(A, re, im).value
    assert torch.allclose(s, exact, rtol=1e-9, atol=1e-13)
    assert float(ps.henrici_departure(A).value) < 1e-12
    assert ps.commutator_departure(A).value < 1e-12
    assert ps.eigenvector_condition(A).value == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(("n", "seed", "complex_"), [(40, 0, False), (97, 1, False), (61, 2, True)])
def test_sigma_min_grid_equals_dense_svd_to_1e_8(n, seed, complex_):
    A = _random(n, seed, complex_) + torch.triu(_random(n, seed + 10, complex_), 1)  # more non-normal
    lam = torch.linalg.eigvals(A)
    r = float(lam.abs().max()) * 1.4
    re, im = np.linspace(-r, r, 12), np.linspace(-r, r, 10)  # symmetric rows: the mirror is used
    e = ps.sigma_min_grid(A, re, im)
    ref = _dense(A, re, im)
    assert e.value.shape == (10, 12) and e.kind == "upper" and bool(e.converged.all())
    assert np.max(np.abs(e.value.numpy() - ref) / ref) < 1e-8
    assert e.extra["points_computed"] == (60 if not complex_ else 120)
    d = ps.sigma_min_grid(A, re, im, method="svd")
    assert d.kind == "exact" and np.max(np.abs(d.value.numpy() - ref) / ref) < 1e-10


def test_sigma_min_at_points_and_on_an_eigenvalue():
    A = torch.tensor([[0.5, 1.0, 0.0], [0.0, -0.5, 2.0], [0.0, 0.0, 0.25]], dtype=torch.float64)
    z = [0.5, 0.1 + 0.2j, 3.0 - 1.0j]
    e = ps.sigma_min_at(A, z)
    assert float(e.value[0]) == 0.0  # exactly singular: no iteration, sigma = 0
    assert np.allclose(e.value[1:].numpy(), ps.sigma_min_at(A, z[1:], method="svd").value.numpy(), rtol=1e-9)


def test_grid_values_never_fall_below_the_truth():
    A = _random(30, 4) + torch.diag(torch.ones(29, dtype=torch.float64), 1)
    re = im = np.linspace(-2, 2, 9)
    lanczos = ps.sigma_min_grid(A, re, im, tol=1e-3).value.numpy()  # a loose tolerance
    exact = _dense(A, re, im)
    assert np.all(lanczos >= exact * (1 - 1e-12))


def test_deep_inside_a_jordan_pseudospectrum_the_floor_is_reported_not_an_overflow():
    # sigma_min(zI - J64) ~ |z|^64: 1e-109 at |z| = 0.02, where 1 / sigma_min^2 overflows float64.
    # The reference is LAPACK's dense SVD, which resolves a bidiagonal matrix's tiny singular values
    # to high relative accuracy (so it is an independent check that the floor is an upper bound).
    n = 64
    J = torch.diag(torch.ones(n - 1, dtype=torch.float64), 1)
    re = np.array([-1.2, -0.4, 0.02, 0.1, 0.4, 0.85, 0.95, 1.2])  # |z| far from 0.58, the floor
    im = np.array([0.0, 0.3])
    e = ps.sigma_min_grid(J, re, im)
    d = ps.sigma_min_grid(J, re, im, method="svd").value.numpy()
    floor = e.extra["floor"]
    assert floor == pytest.approx(np.finfo(np.float64).eps * math.sqrt(n - 1), rel=1e-12)
    low = e.extra["below_floor"].numpy()
    s = e.value.numpy()
    assert bool(e.converged.all()) and np.isfinite(s).all()
    assert np.array_equal(low, d < floor)  # flagged exactly where the reference is below the floor
    assert low.sum() >= 4 and (~low).sum() >= 4
    assert np.all(s[low] == floor) and np.all(d[low] <= floor)
    assert np.allclose(s[~low], d[~low], rtol=1e-8, atol=0)
    e1 = ps.sigma_min_at(J, [0.02, 0.95])
    assert e1.extra["below_floor"].tolist() == [True, False]
    assert float(e1.value[1]) == pytest.approx(float(d[0, 6]), rel=1e-8)


def test_jordan_block_pseudospectral_radius_grows_like_eps_to_the_1_over_n():
    n = 4
    J = torch.diag(torch.ones(n - 1, dtype=torch.float64), 1)
    for eps in (1e-8, 1e-6):
        r = ps.pseudospectral_radius(J, eps).value
        assert r == pytest.approx(eps ** (1 / n), rel=0.05)  # sigma_min(zI - J) ~ |z|^n near 0


# ------------------------------------------------------------------------------------------------
# powers, Kreiss, radius


def test_powers_of_a_jordan_block():
    for n in (3, 6):
        J = torch.diag(torch.ones(n - 1, dtype=torch.float64), 1)
        norms = ps.transient_growth(J, 2 * n).extra["norms"]
        assert torch.allclose(norms[:n], torch.ones(n, dtype=torch.float64))
        assert torch.all(norms[n:] == 0)
        lam = 0.9  # J_n(lambda): ||A^k|| grows before it decays
        Jl = J + lam * torch.eye(n, dtype=torch.float64)
        g = ps.transient_growth(Jl, 200)
        k = 10
        exact = torch.linalg.matrix_norm(torch.linalg.matrix_power(Jl, k), ord=2)
        assert float(g.extra["norms"][k]) == pytest.approx(float(exact), rel=1e-12)
        assert g.value > 1 and 0 < g.extra["argmax"] < 200
    assert ps.eigenvector_condition(torch.diag(torch.ones(3, dtype=torch.float64), 1)).value == math.inf


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kreiss_matrix_theorem_bounds_on_random_matrices(seed):
    n = 12
    A = _random(n, seed) + torch.triu(_random(n, seed + 5), 1)
    A = 0.9 * A / torch.linalg.eigvals(A).abs().max()  # rho = 0.9: power bounded
    K = ps.kreiss_constant(A)
    growth = ps.transient_growth(A, 600)
    norms = growth.extra["norms"]
    assert float(norms[-1]) < 1e-6 * growth.value  # the powers have decayed: the max is the sup
    assert K.kind == "lower" and K.value >= 1
    assert K.value <= growth.value * (1 + 1e-9)  # K(A) <= sup_k ||A^k||
    assert growth.value <= math.e * n * K.value  # sup_k ||A^k|| <= e n K(A)
    # the search is good: finer than a 2-D grid of the exterior of the disk
    r = 1 + np.geomspace(1e-3, 8, 60)
    th = np.linspace(0, 2 * np.pi, 181)
    Z = (r[:, None] * np.exp(1j * th[None, :])).ravel()
    s = ps.sigma_min_at(A, Z, method="svd").value.numpy()
    grid = np.max((np.abs(Z) - 1) / s)
    assert K.value >= grid * (1 - 1e-6)


def test_kreiss_constant_of_normal_and_unstable_matrices():
    lam = torch.tensor([0.95, -0.5j, 0.3 + 0.3j], dtype=torch.complex128)
    assert ps.kreiss_constant(_normal(lam, 3)).value == 1.0
    assert ps.kreiss_constant(torch.diag(torch.tensor([1.01, 0.2]))).value == math.inf


def test_pseudospectral_radius_and_abscissa_against_exact_and_grid_values():
    lam = torch.tensor([0.9, -0.5 + 0.5j, 0.3j], dtype=torch.complex128)
    A = _normal(lam, 1)
    for eps in (1e-3, 0.1):
        assert ps.pseudospectral_radius(A, eps).value == pytest.approx(0.9 + eps, rel=1e-8)
        assert ps.pseudospectral_abscissa(A, eps).value == pytest.approx(0.9 + eps, rel=1e-8)
    B = _random(16, 7) + torch.triu(_random(16, 8), 1)
    eps = 0.05
    rad = ps.pseudospectral_radius(B, eps)
    rho = float(torch.linalg.eigvals(B).abs().max())
    assert rho + eps * (1 - 1e-9) <= rad.value <= float(torch.linalg.matrix_norm(B, ord=2)) + eps
    assert float(ps.sigma_min_at(B, [rad.extra["z"]], method="svd").value[0]) <= eps * (1 + 1e-9)
    h = 0.02  # a fine grid: every grid point inside bounds rho_eps from below, and the search beats it
    xs = np.arange(-rad.value - 0.05, rad.value + 0.05, h)
    Z = xs[None, :] + 1j * xs[:, None]
    s = ps.sigma_min_grid(B, xs, xs).value.numpy()
    grid = np.abs(Z[s <= eps]).max()
    assert grid - 1e-12 <= rad.value <= grid + 2 * h


# ------------------------------------------------------------------------------------------------
# non-normality, the worst perturbation, Bauer-Fike


def test_henrici_matches_its_formula_and_bauer_fike_holds():
    A = _random(25, 3) + torch.triu(_random(25, 4), 1)
    lam = torch.linalg.eigvals(A)
    dep = ps.henrici_departure(A)
    formula = math.sqrt(float(torch.linalg.matrix_norm(A)) ** 2 - float((lam.abs() ** 2).sum()))
    assert dep.value == pytest.approx(formula, rel=1e-8)
    assert 0 < dep.extra["ratio"] < 1
    kappa = ps.eigenvector_condition(A).value
    re = im = np.linspace(-2, 2, 9)
    Z = torch.from_numpy(re[None, :] + 1j * im[:, None])
    s = ps.sigma_min_grid(A, re, im).value
    dist = (Z[..., None] - lam).abs().amin(-1)
    assert torch.all(s >= dist / kappa * (1 - 1e-9))  # sigma_eps inside the Bauer-Fike disks


def test_worst_case_perturbation_moves_an_eigenvalue_to_z():
    A = _random(10, 5)
    z = 0.3 + 1.1j
    p = ps.worst_case_perturbation(A, z)
    assert float(torch.linalg.matrix_norm(p.E, ord=2)) == pytest.approx(p.norm, rel=1e-12)
    assert p.norm == pytest.approx(float(ps.sigma_min_at(A, [z], method="svd").value[0]), rel=1e-12)
    lam = torch.linalg.eigvals(A.to(torch.complex128) + p.E)
    assert float((lam - z).abs().min()) < 1e-10
    assert p.residual < 1e-12


# ------------------------------------------------------------------------------------------------
# plumbing


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="square"):
        ps.sigma_min_grid(torch.zeros(2, 3), [0.0], [0.0])
    with pytest.raises(ValueError, match="non-finite"):
        ps.henrici_departure(torch.tensor([[math.nan]]))
    with pytest.raises(ValueError, match="method"):
        ps.sigma_min_grid(torch.eye(2), [0.0], [0.0], method="qr")
    with pytest.raises(ValueError, match="eps"):
        ps.pseudospectral_radius(torch.eye(2), -1.0)
    with pytest.raises(ValueError, match="finite"):
        ps.sigma_min_grid(torch.eye(2), [math.inf], [0.0])


def test_pinned_threads_restores_the_settings():
    before = torch.get_num_threads()
    with ps.pinned_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_plot_draws_contours_eigenvalues_and_circle():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    A = _random(8, 0)
    e = ps.sigma_min_grid(A, np.linspace(-2, 2, 21), np.linspace(-2, 2, 21))
    fig, ax = plt.subplots()
    cs = ps.plot_pseudospectrum(ax, e, levels=(-1, -0.5))
    assert len(cs.levels) == 2 and len(ax.lines) == 2
    plt.close(fig)


def test_real_schur_form_and_its_inverse_gram_operator_match_dense():
    # a real matrix with complex eigenvalue pairs: the real Schur factor is quasi-triangular
    # (2 x 2 blocks); the solves on it give the same inverse Gram maps as dense inverses
    A = torch.from_numpy(np.random.default_rng(7).standard_normal((37, 37)))
    T, Q = ps.schur_form(A, real=True)
    assert T.dtype == torch.float64 and int((T.diagonal(-1) != 0).sum()) >= 5
    assert torch.allclose(Q @ T @ Q.T, A, atol=1e-12)
    z = torch.tensor([0.3 + 0.2j, -1.1 + 0.5j, 2.0 - 0.1j], dtype=torch.complex128)
    op = ps.inverse_gram_operator(T, z)
    v = torch.randn(3, 74, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = torch.view_as_complex(op.matvec(v).reshape(3, 37, 2))
    eye = torch.eye(37, dtype=torch.complex128)
    for b in range(3):
        R = torch.linalg.inv(z[b] * eye - T.to(torch.complex128))
        want = R @ R.mH @ torch.view_as_complex(v[b].reshape(37, 2))
        assert torch.allclose(got[b], want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))
    with pytest.raises(ValueError, match="quasi-upper-triangular"):
        ps.inverse_gram_operator(torch.triu(torch.ones(4, 4)) + torch.diag(torch.ones(3), -1), z)

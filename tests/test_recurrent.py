"""Part III's recurrent classifiers: PyTorch's cells, state Jacobians, normalisations, attacks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from sensitivity_lib import recurrent as rc
from sensitivity_lib.recurrent import RecurrentClassifier


def _torch_twin(m: RecurrentClassifier) -> nn.Module:
    cls = {"elman": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[m.cell]
    net = cls(m.input_size, m.hidden, batch_first=True).double()
    with torch.no_grad():
        net.weight_ih_l0.copy_(m.weight_ih)
        net.weight_hh_l0.copy_(m.weight_hh)
        net.bias_ih_l0.copy_(m.bias_ih)
        net.bias_hh_l0.copy_(m.bias_hh)
    return net


@pytest.mark.parametrize("cell", rc.CELLS)
def test_cells_are_pytorchs(cell):
    m = RecurrentClassifier(cell, 5, 7, 3, seed=1).double().eval()
    x = torch.rand(4, 9, 5, dtype=torch.float64)
    out, _ = _torch_twin(m)(x)
    S = rc.hidden_states(m, x)
    assert torch.allclose(S[:, 1:, : m.hidden], out, atol=1e-12)
    assert torch.allclose(m(x), m.readout(out[:, -1]), atol=1e-12)
    assert set(m.recurrent_matrices()) == set(rc.GATES[cell])


def test_elman_state_jacobian_is_diag_times_w():
    m = RecurrentClassifier("elman", 3, 6, 2, seed=2).double().eval()
    x = torch.rand(3, 5, 3, dtype=torch.float64)
    J = rc.state_jacobians(m, x)
    h = rc.hidden_states(m, x)[:, 1:]
    W = m.recurrent_matrices()["hh"]
    assert torch.allclose(J, (1 - h**2)[..., None] * W, atol=1e-12)


@pytest.mark.parametrize("cell", rc.CELLS)
def test_unrolled_jacobian_matches_autograd(cell):
    m = RecurrentClassifier(cell, 3, 4, 2, seed=3).double().eval()
    x = torch.rand(1, 7, 3, dtype=torch.float64)
    S = rc.hidden_states(m, x)
    J = rc.state_jacobian(m, x, 2, 6)[0]
    ref = torch.func.jacrev(lambda s: m.states(x[:, 2:6], s[None])[0, -1])(S[0, 2])
    assert J.shape == (m.state_size, m.state_size)
    assert torch.allclose(J, ref, atol=1e-12)


def _complex_dominant(n: int, seed: int) -> torch.Tensor:
    """A real non-normal matrix whose dominant eigenvalues are the pair 1.3 exp(+-0.7i)."""
    g = torch.Generator().manual_seed(seed)
    D = torch.diag(torch.rand(n, generator=g, dtype=torch.float64) * 0.9)
    c, s = 1.3 * math.cos(0.7), 1.3 * math.sin(0.7)
    D[:2, :2] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    V = torch.eye(n, dtype=torch.float64) + 0.5 * torch.randn(n, n, generator=g, dtype=torch.float64)
    return V @ D @ torch.linalg.inv(V)


def test_block_power_finds_a_complex_pair_where_the_rayleigh_quotient_fails():
    W = _complex_dominant(20, 0)
    exact = float(torch.linalg.eigvals(W).abs().max())
    assert abs(exact - 1.3) < 1e-10
    est = rc.spectral_radius(W, method="block")
    assert est.converged and abs(est.value - exact) < 1e-9 * exact
    ray = rc.spectral_radius(W, method="rayleigh", max_iter=500)
    hist = ray.extra["history"][-50:]
    assert float(hist.max() - hist.min()) > 0.1  # it oscillates, never settles
    assert not ray.converged
    growth = rc.spectral_radius(W, method="growth", max_iter=2000)
    assert abs(growth.value - exact) < 0.05 * exact  # right, slowly


def test_rho_parametrisation_power_method_reaches_one_on_a_complex_pair():
    W = _complex_dominant(16, 1)
    p = rc.SpectralRadiusNorm(16, method="power")
    p.iterate(W, 3000)
    p.eval()
    Wn = p(W)
    assert abs(float(torch.linalg.eigvals(Wn).abs().max()) - 1) < 1e-6
    assert float(torch.linalg.svdvals(Wn)[0]) > 1.1  # rho = 1 is not ||W|| = 1


def _short_training(m: RecurrentClassifier, steps: int = 5) -> None:
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 6, 3, generator=g), torch.randint(0, 2, (16,), generator=g)
    m.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()


@pytest.mark.parametrize("cell", rc.CELLS)
@pytest.mark.parametrize("normalise", ["rho", "sigma", "orthogonal"])
def test_each_normalisation_reaches_its_target(cell, normalise):
    m = RecurrentClassifier(cell, 3, 12, 2, normalise=normalise, seed=4)
    _short_training(m)
    rc.finalise(m)
    for W in m.recurrent_matrices().values():
        W = W.double()
        rho = float(torch.linalg.eigvals(W).abs().max())
        sig = float(torch.linalg.svdvals(W)[0])
        if normalise == "rho":
            assert abs(rho - 1) < 1e-6
        elif normalise == "sigma":
            assert abs(sig - 1) < 1e-6 and rho <= 1 + 1e-6
        else:
            assert torch.allclose(W.T @ W, torch.eye(12, dtype=torch.float64), atol=1e-5)


def test_rho_normalisation_on_trained_weights_with_complex_dominant_eigenvalues():
    # a default-initialised 12x12 block: its dominant eigenvalues are (generically) a complex pair
    m = RecurrentClassifier("elman", 3, 12, 2, normalise="rho", seed=7)
    raw = m.blocks[0].parametrizations.weight.original.detach().double()
    ev = torch.linalg.eigvals(raw)
    assert abs(float(ev[ev.abs().argmax()].imag)) > 1e-3
    _short_training(m)
    out = rc.finalise(m)
    assert out[0].kind == "exact" and abs(out[0].extra["power"] - out[0].value) < 0.2 * out[0].value
    assert abs(float(torch.linalg.eigvals(m.recurrent_matrices()["hh"].double()).abs().max()) - 1) < 1e-6


def test_fgsm_and_pgd_match_foolbox():
    fb = pytest.importorskip("foolbox")
    m = RecurrentClassifier("gru", 4, 8, 3, seed=5).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(6, 5, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    fm = fb.PyTorchModel(m, bounds=(0, 1))
    _, ref, _ = fb.attacks.FGSM()(fm, x, y, epsilons=0.05)
    assert torch.allclose(rc.fgsm(m, x, y, 0.05), ref, atol=1e-6)
    _, ref, _ = fb.attacks.LinfPGD(steps=7, rel_stepsize=0.1, random_start=False)(fm, x, y, epsilons=0.05)
    assert torch.allclose(rc.pgd(m, x, y, 0.05, steps=7, rel_step=0.1), ref, atol=1e-6)


def test_minimal_flip_brackets_a_flip():
    m = RecurrentClassifier("elman", 4, 8, 3, seed=6).eval()
    with torch.no_grad():  # an untrained readout barely depends on the input: sharpen it
        m.readout.weight.mul_(30)
        m.weight_ih.mul_(5)
    x = torch.rand(5, 6, 4, generator=torch.Generator().manual_seed(2))
    r = rc.minimal_flip(m, x, attack="fgsm", hi=1.0, tol=1e-3)
    pred = m(x).argmax(1)
    found = r.converged
    assert bool(found.any())
    for i in torch.nonzero(found).flatten().tolist():
        at = m(rc.fgsm(m, x[i : i + 1], pred[i : i + 1], float(r.value[i]))).argmax(1)
        below = m(rc.fgsm(m, x[i : i + 1], pred[i : i + 1], float(r.extra["below"][i]))).argmax(1)
        assert int(at) != int(pred[i]) and int(below) == int(pred[i])


@pytest.mark.parametrize("cell", ["elman", "lstm"])
def test_state_amplification_measured_is_bounded_by_the_first_order_worst_case(cell):
    m = RecurrentClassifier(cell, 3, 6, 2, seed=8).eval()
    x = torch.rand(4, 10, 3, generator=torch.Generator().manual_seed(3))
    a = rc.state_amplification(m, x, start=2, size=1e-7)
    assert a["measured"].shape == a["worst"].shape == (4, 9)
    assert torch.allclose(a["measured"][:, 0], torch.ones(4, dtype=torch.float64))
    assert bool((a["measured"] <= a["worst"] * (1 + 1e-4)).all())
    assert torch.allclose(a["worst"][:, -1], rc.unrolled_norm(m, x, 2), rtol=1e-10)


def test_condition_vs_length_is_e0_of_the_prefix():
    from sensitivity_lib.condition import local_condition

    m = RecurrentClassifier("elman", 3, 6, 2, seed=9).eval()
    x = torch.rand(3, 8, 3, generator=torch.Generator().manual_seed(4))
    c = rc.condition_vs_length(m, x, [2, 8], tol=1e-10)
    assert c.shape == (2, 3)
    assert torch.allclose(c[1], local_condition(m, x, tol=1e-10).value, rtol=1e-8)


def test_noise_accuracy_at_zero_is_clean_accuracy():
    m = RecurrentClassifier("lstm", 3, 6, 2, seed=10).eval()
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(20, 5, 3, generator=g), torch.randint(0, 2, (20,), generator=g)
    clean = float((m(x).argmax(1) == y).double().mean())
    acc = rc.noise_accuracy(m, x, y, [0.0, 0.3], draws=2)
    assert acc[0] == clean and 0 <= float(acc[1]) <= 1
    assert torch.equal(rc.attack_accuracy(m, x, y, [0.0])[0:1], acc[0:1])


def test_training_is_cached_and_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("SENSITIVITY_CACHE", str(tmp_path))
    r = rc.SeqRecipe("gru", "adding", hidden=6, epochs=1, n_train=64, n_test=32, T=8, normalise="rho")
    m1, rep1, (tr, te) = rc.train(r, progress=False, monitor=lambda e, m: {"epoch": float(e)})
    m2, rep2, _ = rc.train(r, progress=False)
    assert rep1 == rep2 and len(rep1.history) == 2
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert abs(float(torch.linalg.eigvals(m2.recurrent_matrices()["n"].double()).abs().max()) - 1) < 1e-6
    assert tr.x.shape == (64, 8, 2) and te.x.shape == (32, 8, 2)


def test_bad_inputs_say_what_to_do():
    m = RecurrentClassifier("elman", 8, 4, 10).eval()
    with pytest.raises(ValueError, match="as_rows"):
        m(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="cell must be"):
        RecurrentClassifier("transformer", 8, 4, 10)
    with pytest.raises(ValueError, match="normalise must be"):
        RecurrentClassifier("gru", 8, 4, 10, normalise="frobenius")
    with pytest.raises(ValueError, match="square"):
        rc.spectral_radius(torch.rand(3, 4))
    with pytest.raises(ValueError, match="unknown task"):
        rc.task_data("imdb", 10, 10)
    with pytest.raises(ValueError, match="eval"):
        rc.fgsm(m.train(), torch.rand(2, 3, 8), torch.tensor([0, 1]), 0.1)

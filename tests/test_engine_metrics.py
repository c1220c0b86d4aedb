"""Spectral metrics, SVD engine, power-law fit and whitening against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rankwise.engine.metrics import (
    break_even_rank,
    condition_number,
    effective_rank,
    energy_rank,
    l12_norm,
    max_saving_rank,
    nuclear_norm,
    stable_rank,
)
from rankwise.engine.powerlaw import fit_power_law
from rankwise.engine.svd import singular_values, spectra, truncated_svd
from rankwise.engine.whitening import cholesky_factor, inverse_sqrt_factor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def matrix_with_singular_values(sv: list[float], m: int, n: int, seed: int = 0) -> torch.Tensor:
    """m×n matrix U diag(sv) Vᵀ with random orthonormal U, V (float64)."""
    g = torch.Generator().manual_seed(seed)
    p = len(sv)
    u, _ = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(sv, dtype=torch.float64)) @ v.T


def test_singular_values_recovered() -> None:
    sv = [5.0, 3.0, 2.0, 1.0, 0.5]
    w = matrix_with_singular_values(sv, 8, 5)
    assert torch.allclose(singular_values(w, dtype=torch.float64), torch.tensor(sv, dtype=torch.float64), atol=1e-10)
    # float16 input is upcast to at least float32
    assert singular_values(w.half()).dtype == torch.float32


def test_energy_rank_closed_form() -> None:
    # σ² = 16, 9, 4, 1 → total 30; cumulative 16, 25, 29, 30 → fractions .533, .833, .967, 1
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert energy_rank(s, 0.5) == 1
    assert energy_rank(s, 0.8) == 2
    assert energy_rank(s, 0.9) == 3
    assert energy_rank(s, 0.95) == 3
    assert energy_rank(s, 0.99) == 4
    assert energy_rank(s, 25 / 30) == 2  # exactly on a partial sum
    assert energy_rank(torch.zeros(3), 0.9) == 0


def test_effective_stable_nuclear_condition_closed_forms() -> None:
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])
    q = np.array([4, 3, 2, 1]) / 10
    assert effective_rank(s) == pytest.approx(math.exp(-(q * np.log(q)).sum()), rel=1e-12)
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0, rel=1e-12)  # flat spectrum: full rank
    assert effective_rank(torch.tensor([2.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert stable_rank(s) == pytest.approx(30 / 16, rel=1e-12)
    assert stable_rank(torch.ones(5)) == pytest.approx(5.0)
    assert nuclear_norm(s) == pytest.approx(10.0)
    assert condition_number(s) == pytest.approx(4.0)
    assert condition_number(torch.tensor([3.0, 0.0])) is None


def test_metrics_on_a_constructed_matrix() -> None:
    sv = [10.0, 4.0, 2.0, 1.0, 0.25]
    w = matrix_with_singular_values(sv, 9, 5, seed=3)
    s = singular_values(w, dtype=torch.float64)
    assert stable_rank(s) == pytest.approx(sum(x * x for x in sv) / 100, rel=1e-10)
    assert nuclear_norm(s) == pytest.approx(sum(sv), rel=1e-10)
    assert condition_number(s) == pytest.approx(40.0, rel=1e-8)
    # stable rank is ‖W‖_F² / ‖W‖₂²
    assert stable_rank(s) == pytest.approx(float(w.pow(2).sum() / torch.linalg.matrix_norm(w, 2) ** 2), rel=1e-10)


def test_l12_norm_bounds_nuclear_norm() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, 7, generator=g, dtype=torch.float64)
    expected = sum(float(torch.linalg.vector_norm(w[:, j])) for j in range(w.shape[1]))
    assert l12_norm(w) == pytest.approx(expected, rel=1e-12)
    nuc = nuclear_norm(singular_values(w, dtype=torch.float64))
    # W = Σ_j w_j e_jᵀ and the triangle inequality give ‖W‖_* ≤ ‖W‖_{1,2}; Cauchy–Schwarz gives
    # ‖W‖_{1,2} ≤ √n ‖W‖_F ≤ √n ‖W‖_*: the SVD-free surrogate is an upper bound within √n
    assert nuc <= l12_norm(w) + 1e-9
    assert l12_norm(w) <= math.sqrt(w.shape[1]) * nuc + 1e-9
    # equality for a matrix with orthogonal columns: column norms are the singular values
    q, _ = torch.linalg.qr(torch.randn(12, 4, generator=g, dtype=torch.float64))
    d = q * torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    assert l12_norm(d) == pytest.approx(nuclear_norm(singular_values(d, dtype=torch.float64)), rel=1e-10)


def test_break_even_rank() -> None:
    assert break_even_rank(576, 576) == 288
    assert break_even_rank(1536, 576) == math.ceil(1536 * 576 / 2112)
    for m, n in [(64, 64), (128, 64), (192, 576), (7, 3)]:
        k = break_even_rank(m, n)
        assert k * (m + n) >= m * n > (k - 1) * (m + n)
        assert max_saving_rank(m, n) == k - 1


def test_planted_low_rank_plus_noise_energy_rank() -> None:
    g = torch.Generator().manual_seed(0)
    m, n, r = 96, 64, 6
    b = torch.randn(m, r, generator=g)
    a = torch.randn(r, n, generator=g)
    w = b @ a + 1e-3 * torch.randn(m, n, generator=g)
    s = singular_values(w)
    assert energy_rank(s, 0.99) <= r
    assert energy_rank(s, 0.9999) == r
    assert effective_rank(s) < r + 1
    assert energy_rank(singular_values(torch.randn(m, n, generator=g)), 0.9) > 3 * r


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_power_law_alpha_recovered(alpha: float) -> None:
    rng = np.random.default_rng(42)
    xmin = 2.0
    u = rng.random(4000)
    sample = xmin * (1 - u) ** (-1 / (alpha - 1))  # inverse CDF of p(x) ∝ x^-α, x ≥ xmin
    fit = fit_power_law(sample)
    assert fit.alpha == pytest.approx(alpha, abs=0.15)
    assert fit.xmin >= xmin
    assert fit.ks < 0.05
    # a body below xmin (uniform on [0.1, 2)) must be cut off by the KS choice of xmin
    body = rng.uniform(0.1, xmin, 4000)
    fit2 = fit_power_law(np.concatenate([body, sample]))
    assert fit2.alpha == pytest.approx(alpha, abs=0.25)
    assert fit2.xmin >= 0.9 * xmin


def test_power_law_degenerate_inputs() -> None:
    assert math.isnan(fit_power_law([1.0, 2.0, 3.0]).alpha)  # fewer than min_evals
    assert math.isnan(fit_power_law(np.zeros(100)).alpha)  # nothing above the floor
    fit = fit_power_law(np.r_[np.zeros(50), np.logspace(0, 3, 40)], xmax=100.0)
    assert fit.xmin <= 100.0 and fit.n_tail <= 40


def test_power_law_matches_the_loop_definition() -> None:
    """The vectorised fit equals a direct loop over every candidate xmin (WeightWatcher's definition)."""
    rng = np.random.default_rng(7)
    w = rng.standard_t(4, size=(80, 50))
    ev = np.sort(np.linalg.svd(w, compute_uv=False) ** 2)
    best = (np.inf, None, None)
    logd = np.log(ev)
    for i in range(len(ev) - 1):
        n = len(ev) - i
        a = 1 + n / (logd[i:].sum() - n * logd[i])
        d = np.max(np.abs(1 - (ev[i:] / ev[i]) ** (1 - a) - np.arange(n) / n))
        if d < best[0]:
            best = (d, a, ev[i])
    fit = fit_power_law(ev, chunk_elems=200)  # small chunks exercise the chunked path
    assert fit.ks == pytest.approx(best[0], rel=1e-10)
    assert fit.alpha == pytest.approx(best[1], rel=1e-10)
    assert fit.xmin == best[2]


def test_spectra_batched_equals_individual_and_keeps_order() -> None:
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(*shape, generator=g) for shape in [(16, 8), (8, 16), (16, 8), (5, 5), (16, 8)]]
    calls: list[int] = []
    out = spectra(mats, on_done=calls.append, max_batch_bytes=2 * 16 * 8 * 4 * 3)  # at most 2 per batch
    assert sum(calls) == len(mats)
    assert max(calls) <= 2
    for w, s in zip(mats, out):
        assert torch.allclose(s, torch.linalg.svdvals(w), atol=1e-5)


def test_truncated_svd_exact_and_randomized() -> None:
    # decaying spectrum σᵢ = 0.7^i: randomized SVD with power iterations is near-exact on the top
    sv = [0.7**i for i in range(40)]
    w = matrix_with_singular_values(sv, 60, 40, seed=5).float()
    k = 8
    u, s, v = truncated_svd(w, k)
    assert u.shape == (60, k) and s.shape == (k,) and v.shape == (40, k)
    assert torch.allclose(s, torch.tensor(sv[:k]), atol=1e-5)
    ur, sr, vr = truncated_svd(w, k, method="randomized", oversample=10, niter=4, seed=0)
    assert torch.allclose(sr, s, rtol=1e-3)
    err_exact = torch.linalg.matrix_norm(w - u @ torch.diag(s) @ v.T)
    err_rand = torch.linalg.matrix_norm(w - ur @ torch.diag(sr) @ vr.T)
    assert err_rand <= 1.01 * err_exact
    # seeded: reproducible
    _, sr2, _ = truncated_svd(w, k, method="randomized", seed=0)
    _, sr3, _ = truncated_svd(w, k, method="randomized", seed=0)
    assert torch.equal(sr2, sr3)
    with pytest.raises(ValueError):
        truncated_svd(w, 0)
    with pytest.raises(ValueError):
        truncated_svd(w, 4, method="magic")


def test_cholesky_factor_and_fallback() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64)
    c = x.T @ x
    f = cholesky_factor(c)
    assert f.method == "cholesky" and f.jitter == 0.0
    assert torch.allclose(f.S @ f.S.T, c, atol=1e-8)
    assert torch.allclose(f.S @ f.S_inv, torch.eye(12, dtype=torch.float64), atol=1e-8)
    # rank-deficient statistics (fewer samples than features) must still give a usable factor
    x2 = torch.randn(5, 12, generator=g, dtype=torch.float64)
    c2 = x2.T @ x2
    f2 = cholesky_factor(c2, warn=False)
    assert torch.isfinite(f2.S).all() and torch.isfinite(f2.S_inv).all()
    rel = torch.linalg.matrix_norm(f2.S @ f2.S.T - c2) / torch.linalg.matrix_norm(c2)
    assert rel < 1e-3
    a, b = inverse_sqrt_factor(c)
    assert torch.allclose(a @ a.T, c, atol=1e-8)
    assert torch.allclose(b @ c @ b.T, torch.eye(12, dtype=torch.float64), atol=1e-6)


def test_spectra_gram_method_matches_svd() -> None:
    """method="gram" (float64 eigvalsh of the smaller Gram matrix) equals svdvals, tall and wide."""
    sv = [0.9**i for i in range(24)]
    mats = [matrix_with_singular_values(sv, 40, 24, seed=1).float(), matrix_with_singular_values(sv, 24, 40).float()]
    out = spectra(mats, method="gram")
    for s in out:
        assert s.dtype == torch.float64 and s.shape == (24,)
        assert torch.allclose(s, torch.tensor(sv, dtype=torch.float64), rtol=1e-5, atol=1e-6)
        assert bool((s[:-1] >= s[1:]).all())  # descending
    ref = spectra(mats)
    for a, b in zip(out, ref):
        assert stable_rank(a) == pytest.approx(stable_rank(b), rel=1e-5)
    with pytest.raises(ValueError):
        spectra(mats, method="qr")


def test_whitening_leaves_its_input_alone_and_forms_no_inverse_unless_asked() -> None:
    """SVD-LLM needs A·S⁻¹ for k rows only: a triangular solve equal to the product with the explicit inverse."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 20, generator=g, dtype=torch.float64)
    c = x.T @ x
    before = c.clone()
    f = cholesky_factor(c)
    assert torch.equal(c, before)  # the caller's statistics are not modified (anchoring reuses them)
    assert f._S_inv is None  # no n×n inverse formed by the factorisation itself
    a = torch.randn(5, 20, generator=g, dtype=torch.float64)
    ref = a @ torch.linalg.inv(f.S)
    assert torch.allclose(f.solve_right(a), ref, atol=1e-10)
    assert torch.allclose(f.S_inv, torch.linalg.inv(f.S), atol=1e-10)  # on demand, then cached
    assert torch.allclose(f.solve_right(a), ref, atol=1e-10)
    # a matrix that needs jitter: still untouched, and the jittered factor reproduces C + εI
    x2 = torch.randn(30, 20, generator=g, dtype=torch.float64)
    c2 = x2.T @ x2
    c2[:, 0] = c2[0, :] = 0.0  # a dead input channel: C is singular
    before2 = c2.clone()
    f2 = cholesky_factor(c2, warn=False)
    assert torch.equal(c2, before2) and f2.method == "cholesky" and f2.jitter > 0
    eps = f2.jitter * float(c2.diagonal().mean())
    assert torch.allclose(f2.S @ f2.S.T, c2 + eps * torch.eye(20, dtype=torch.float64), atol=1e-8)


def test_cholesky_in_place_uses_the_statistics_memory_and_undoes_a_failure() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 20, generator=g, dtype=torch.float64)
    c = x.T @ x
    ref = cholesky_factor(c.clone())
    work = c.clone()
    f = cholesky_factor(work, overwrite=True)
    assert f.S.data_ptr() == work.data_ptr()  # no second n×n matrix
    assert torch.allclose(f.S, ref.S, atol=1e-12) and torch.equal(f.S, torch.tril(f.S))
    # a singular C: a failed attempt is undone bit for bit (LAPACK touched one triangle, the diagonal is saved)
    from rankwise.engine.whitening import _cholesky_in_place

    x2 = torch.randn(30, 20, generator=g, dtype=torch.float64)
    c2 = x2.T @ x2
    c2[:, 0] = c2[0, :] = 0.0
    c2 = 0.5 * (c2 + c2.T)
    work2 = c2.clone()
    assert not _cholesky_in_place(work2) and torch.equal(work2, c2)
    big = torch.randn(40, 700, generator=g, dtype=torch.float64)  # more than one 512-block to mirror
    cbig = big.T @ big
    cbig = 0.5 * (cbig + cbig.T)  # exactly symmetric (a matmul's two triangles differ in the last bits)
    wbig = cbig.clone()
    assert not _cholesky_in_place(wbig) and torch.equal(wbig, cbig)
    # so the jitter path also runs in C's own memory, and gives the factor a copy would
    f2 = cholesky_factor(work2, overwrite=True, warn=False)
    ref2 = cholesky_factor(c2, warn=False)
    assert f2.S.data_ptr() == work2.data_ptr() and torch.equal(c2, c2.clone())
    assert f2.jitter == ref2.jitter > 0 and torch.equal(f2.S, ref2.S)

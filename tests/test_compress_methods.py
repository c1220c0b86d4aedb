"""Closed-form properties of the factorisation methods and allocators on small matrices."""

from __future__ import annotations

import warnings

import pytest
import torch

from rankwise.compression.allocation import allocate, max_ratio
from rankwise.compression.calibration.stats import LayerStats
from rankwise.compression.methods import MethodOptions, get_method
from rankwise.engine.metrics import break_even_rank
from rankwise.errors import RankwiseError


def _stats(X: torch.Tensor, grad_rows: torch.Tensor | None = None) -> LayerStats:
    X = X.to(torch.float64)
    return LayerStats(n=X.shape[1], xtx=X.T @ X, abs_sum=X.abs().sum(0), rows=X.shape[0], grad_sq=grad_rows)


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    m, n, t = 24, 16, 200
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    # correlated, anisotropic inputs: whitening matters
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    X = torch.randn(t, n, generator=g, dtype=torch.float64) @ mix.T
    return W, X


@pytest.mark.parametrize("k", [1, 4, 9])
def test_whiten_discarded_sigma_equal_output_error(problem, k):
    W, X = problem
    p = get_method("whiten").prepare(W, _stats(X), MethodOptions(jitter=0.0))
    B, A = p.factors(k)
    err = torch.linalg.matrix_norm((W - B @ A) @ X.T) ** 2
    discarded = (p.S[k:] ** 2).sum()
    assert torch.allclose(err, discarded, rtol=1e-8)
    # and it beats plain SVD on the output error
    Bs, As = get_method("svd").prepare(W, None).factors(k)
    err_svd = torch.linalg.matrix_norm((W - Bs @ As) @ X.T) ** 2
    assert err < err_svd


def test_whiten_is_optimal_against_random_rank_k(problem):
    W, X = problem
    k = 5
    B, A = get_method("whiten").prepare(W, _stats(X), MethodOptions(jitter=0.0)).factors(k)
    best = torch.linalg.matrix_norm((W - B @ A) @ X.T)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):  # perturbing the optimum only increases the error
        Bp = B + 1e-3 * torch.randn(B.shape, generator=g, dtype=torch.float64)
        assert torch.linalg.matrix_norm((W - Bp @ A) @ X.T) >= best


@pytest.mark.parametrize("name", ["svd", "asvd", "fwsvd", "whiten"])
def test_full_rank_folds_back_exactly(problem, name):
    W, X = problem
    g = torch.Generator().manual_seed(2)
    grad_rows = torch.rand(W.shape[0], generator=g, dtype=torch.float64) * 10 + 0.1
    p = get_method(name).prepare(W, _stats(X, grad_rows), MethodOptions(jitter=0.0))
    B, A = p.factors(min(W.shape))
    assert torch.allclose(B @ A, W, atol=1e-9)


def test_asvd_and_fwsvd_scalings(problem):
    W, X = problem
    st = _stats(X, torch.arange(1, W.shape[0] + 1, dtype=torch.float64))
    pa = get_method("asvd").prepare(W, st, MethodOptions(asvd_alpha=0.5))
    s = (X.abs().mean(0)) ** 0.5
    assert torch.allclose(pa.S, torch.linalg.svdvals(W * s[None, :]))
    pf = get_method("fwsvd").prepare(W, st)
    d = torch.arange(1, W.shape[0] + 1, dtype=torch.float64).sqrt()
    assert torch.allclose(pf.S, torch.linalg.svdvals(d[:, None] * W))


def test_shrinkage_interpolates_between_whiten_and_rms_scaling(problem):
    W, X = problem
    st = _stats(X)
    full = get_method("whiten").prepare(W, st, MethodOptions(shrink=1.0, jitter=0.0))
    rms = torch.diagonal(st.xtx).sqrt()
    assert torch.allclose(full.S, torch.linalg.svdvals(W * rms[None, :]))
    half = get_method("whiten").prepare(W, st, MethodOptions(shrink=0.5, jitter=0.0))
    C = 0.5 * st.xtx + 0.5 * torch.diag(torch.diagonal(st.xtx))
    B, A = half.factors(3)
    err = torch.trace((W - B @ A) @ C @ (W - B @ A).T)
    assert torch.allclose(err, (half.S[3:] ** 2).sum(), rtol=1e-8)


def test_identity_shrinkage_at_one_is_plain_svd(problem):
    W, X = problem
    st = _stats(X)
    p = get_method("whiten").prepare(W, st, MethodOptions(shrink=1.0, shrink_target="identity", jitter=0.0))
    scale = torch.diagonal(st.xtx).mean().sqrt()
    assert torch.allclose(p.S, torch.linalg.svdvals(W) * scale)
    B, A = p.factors(4)
    Bs, As = get_method("svd").prepare(W, None).factors(4)
    assert torch.allclose(B @ A, Bs @ As, atol=1e-9)


def test_singular_statistics_warn_naming_the_matrix():
    W = torch.randn(8, 6, dtype=torch.float64)
    X = torch.randn(3, 6, dtype=torch.float64)  # 3 tokens: XᵀX has rank 3 < 6
    X[:, 1] = X[:, 0]
    st = _stats(X)
    st.xtx[0, 0] = st.xtx[0, 0] - 1e3  # make it indefinite so Cholesky with jitter fails
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        p = get_method("whiten").prepare(W, st, MethodOptions(), name="layers.3.mlp.down_proj")
    assert any("layers.3.mlp.down_proj" in str(x.message) for x in w)
    B, A = p.factors(2)
    assert torch.isfinite(B).all() and torch.isfinite(A).all()


def test_unknown_method_is_one_line_error():
    with pytest.raises(RankwiseError, match="unknown method 'nope'"):
        get_method("nope")


SHAPES = [(64, 64), (64, 192), (192, 64), (32, 64), (128, 64), (16, 16)]


def _energies(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (m, n) in enumerate(SHAPES):
        p = min(m, n)
        decay = torch.linspace(0, 3 + i, p, dtype=torch.float64)
        out.append((torch.exp(-decay) * (1 + i)) ** 2 * (1 + 0.01 * torch.rand(p, generator=g, dtype=torch.float64)))
    return out


@pytest.mark.parametrize("alloc", ["uniform", "energy", "welore", "global"])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.6])
def test_allocation_hits_budget_and_respects_break_even(alloc, ratio):
    en = _energies()
    a = allocate(alloc, SHAPES, ratio, energies=en)
    for (m, n), r in zip(SHAPES, a.ranks):
        assert r is None or 1 <= r < break_even_rank(m, n)
    step = max(m + n for m, n in SHAPES) / sum(m * n for m, n in SHAPES)
    if alloc == "uniform":
        assert abs(a.achieved_ratio - ratio) <= step + 0.02  # flooring per matrix
    elif alloc == "welore":
        assert a.achieved_ratio >= ratio - 1e-12  # its own min-saving rule may overshoot by a whole matrix
    else:
        assert ratio - 1e-12 <= a.achieved_ratio <= ratio + step


def test_global_allocation_prefers_low_loss_directions():
    # two equal-shape matrices, one with a fast-decaying spectrum: it should get the smaller rank
    fast = torch.exp(-torch.arange(64, dtype=torch.float64)) ** 2
    slow = torch.exp(-0.02 * torch.arange(64, dtype=torch.float64)) ** 2
    a = allocate("global", [(64, 64), (64, 64)], 0.5, energies=[fast, slow], norm="total")
    assert a.ranks[0] < a.ranks[1]


def test_unreachable_ratio_errors():
    with pytest.raises(RankwiseError, match="every targeted matrix is at its break-even"):
        allocate("uniform", [(1, 8), (2, 2)], 0.2)
    best = max_ratio([(8, 8)])
    with pytest.raises(RankwiseError, match="cannot be reached"):
        allocate("global", [(8, 8)], min(0.99, best + 0.01), energies=[torch.ones(8)])


@pytest.mark.parametrize("shape", [(12, 30), (30, 12)])
@pytest.mark.parametrize("name", ["svd", "whiten", "asvd"])
def test_gram_solver_gives_the_svd_solvers_truncation(shape, name):
    """The default Gram route (eigh of the smaller Gram matrix) and LAPACK's SVD: same σ, same B·A at every rank,
    σ in A and B with orthonormal columns for the plain SVD, for wide and tall matrices."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(*shape, generator=g, dtype=torch.float64)
    X = torch.randn(200, shape[1], generator=g, dtype=torch.float64) * torch.logspace(0, -1, shape[1],
                                                                                        dtype=torch.float64)
    st = _stats(X)
    gram = get_method(name).prepare(W, st, MethodOptions(jitter=0.0))
    ref = get_method(name).prepare(W, st, MethodOptions(jitter=0.0), solver="svd")
    assert gram.Q is not None and ref.U is not None
    assert torch.allclose(gram.S, ref.S, rtol=1e-9, atol=1e-12)
    for k in (1, 5, min(shape)):
        B, A = gram.factors(k)
        Br, Ar = ref.factors(k)
        assert torch.allclose(B @ A, Br @ Ar, atol=1e-9)
        if name == "svd":
            assert torch.allclose(B.T @ B, torch.eye(k, dtype=torch.float64), atol=1e-9)
    with pytest.raises(ValueError, match="solver"):
        get_method(name).prepare(W, st, solver="qr")


def test_gram_solver_on_a_rank_deficient_tall_matrix_has_no_nan():
    """Where M is tall, B = M Q_k Σ_k⁻¹: a rank above the numerical rank gives zero columns, not NaN."""
    g = torch.Generator().manual_seed(4)
    W = torch.randn(30, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 10, generator=g, dtype=torch.float64)
    B, A = get_method("svd").prepare(W, None).factors(6)
    assert torch.isfinite(B).all() and torch.isfinite(A).all()
    assert torch.allclose(B @ A, W, atol=1e-9)

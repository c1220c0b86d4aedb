"""Projection correctness for GaLore-style optimisers: orthonormal bases, top-r energy, DCT scores."""

from __future__ import annotations

import math

import pytest
import torch

from rankwise.engine.svd import truncated_svd
from rankwise.errors import RankwiseError
from rankwise.train.projector import Projector, dct_basis, dct_scores, projection_side

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _decaying(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """An m×n matrix with singular values 1, 0.8, 0.64, ... and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    p = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64))
    s = 0.8 ** torch.arange(p, dtype=torch.float64)
    return ((u * s) @ v.T).float()


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
@pytest.mark.parametrize("projection", ["svd", "randomized", "dct"])
def test_basis_is_orthonormal(shape: tuple[int, int], projection: str) -> None:
    g = torch.randn(*shape)
    proj = Projector(shape, 6, projection=projection)
    state: dict = {}
    proj.refresh(g, state, 0)
    q = proj.basis(state, g)
    assert q.shape == (proj.dim, 6)
    assert proj.dim == min(shape)  # std: the smaller side is projected, as in galore-torch
    torch.testing.assert_close(q.T @ q, torch.eye(6), atol=1e-5, rtol=0)
    r = proj.project(g, q)
    assert r.shape == ((6, shape[1]) if proj.side == "left" else (shape[0], 6))
    assert proj.project_back(r, q).shape == shape


@pytest.mark.parametrize("shape", [(30, 50), (50, 30)])
def test_svd_projection_captures_top_r_energy(shape: tuple[int, int]) -> None:
    g = _decaying(*shape)
    r = 5
    proj = Projector(shape, r, projection="svd")
    state: dict = {}
    proj.refresh(g, state, 0)
    q = proj.basis(state, g)
    captured = float(proj.project(g, q).square().sum())
    _, s, _ = truncated_svd(g.double(), r)
    assert captured == pytest.approx(float(s.square().sum()), rel=1e-5)
    # and it is the same subspace as the exact truncated SVD's singular vectors
    u, _, v = truncated_svd(g.double(), r)
    ref = u if proj.side == "left" else v
    torch.testing.assert_close((q.double() @ q.double().T), ref @ ref.T, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(30, 50), (50, 30)])
def test_randomized_projection_near_optimal_and_deterministic(shape: tuple[int, int]) -> None:
    g = _decaying(*shape)
    r = 5
    _, s, _ = truncated_svd(g.double(), r)
    best = float(s.square().sum())
    proj = Projector(shape, r, projection="randomized", oversample=4, niter=1, seed=3)
    st1: dict = {}
    st2: dict = {}
    proj.refresh(g, st1, 7)
    proj.refresh(g, st2, 7)
    torch.testing.assert_close(st1["proj_basis"], st2["proj_basis"], atol=0, rtol=0)  # seeded: DDP-safe
    captured = float(proj.project(g, proj.basis(st1, g)).square().sum())
    assert best * 0.999 <= captured <= best * (1 + 1e-5)


def _reference_dct(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix from scipy (rows = transform of the unit vectors)."""
    fft = pytest.importorskip("scipy.fft")
    import numpy as np

    # scipy's dct of the identity along axis 0 gives C (n×n) with C x = dct(x); basis vectors are C's rows
    c = fft.dct(np.eye(n), type=2, norm="ortho", axis=0)
    return torch.from_numpy(c.T.copy()).float()


def test_dct_basis_matches_scipy_and_is_shared() -> None:
    n = 37
    d = dct_basis(n)
    torch.testing.assert_close(d, _reference_dct(n), atol=1e-6, rtol=0)
    torch.testing.assert_close(d.T @ d, torch.eye(n), atol=1e-5, rtol=0)
    assert dct_basis(n) is d  # built once per size and shared


@pytest.mark.parametrize("shape", [(20, 45), (45, 20)])
def test_dct_indices_are_the_top_r_scores(shape: tuple[int, int]) -> None:
    torch.manual_seed(1)
    g = torch.randn(*shape)
    r = 7
    proj = Projector(shape, r, projection="dct")
    state: dict = {}
    proj.refresh(g, state, 0)
    assert set(state) == {"proj_indices"}  # only the indices are stored
    assert state["proj_indices"].dtype == torch.long and state["proj_indices"].shape == (r,)
    d = _reference_dct(proj.dim).double()
    ref_scores = (d.T @ g.double()).norm(dim=1) if proj.side == "left" else (g.double() @ d).norm(dim=0)
    torch.testing.assert_close(dct_scores(g, proj.side).double(), ref_scores, atol=1e-4, rtol=1e-4)
    expected = torch.topk(ref_scores, r).indices
    assert set(state["proj_indices"].tolist()) == set(expected.tolist())
    # the kept columns carry the most gradient energy among any r DCT columns
    q = proj.basis(state, g)
    kept = float(proj.project(g, q).square().sum())
    assert kept == pytest.approx(float(ref_scores.square().sort(descending=True).values[:r].sum()), rel=1e-4)


def test_dct_recovers_a_gradient_living_in_dct_columns() -> None:
    n = 32
    d = dct_basis(n)
    cols = [3, 11, 20]
    g = d[:, cols] @ torch.randn(3, 50)  # 32×50: left side
    proj = Projector(g.shape, 3, projection="dct")
    state: dict = {}
    proj.refresh(g, state, 0)
    assert sorted(state["proj_indices"].tolist()) == cols
    q = proj.basis(state, g)
    torch.testing.assert_close(proj.project_back(proj.project(g, q), q), g, atol=1e-5, rtol=0)


def test_projection_side_rules_follow_galore_torch() -> None:
    assert projection_side((100, 50), "std") == "right"
    assert projection_side((50, 100), "std") == "left"
    assert projection_side((50, 50), "std") == "right"
    assert projection_side((100, 50), "reverse_std") == "left"
    assert projection_side((100, 50), "left") == "left"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"rank": -3}, "rank must be a positive integer"),
        ({"rank": 21}, "larger than the 20x30 matrix"),
        ({"rank": 2.5}, "rank must be a positive integer"),
        ({"rank": 4, "projection": "qr"}, "unknown projection 'qr'"),
        ({"rank": 4, "proj_type": "diagonal"}, "unknown proj_type"),
    ],
)
def test_projector_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(RankwiseError, match=match) as exc:
        Projector((20, 30), **kwargs)
    assert "\n" not in str(exc.value)


def test_dct_basis_columns_are_cosines() -> None:
    d = dct_basis(8, dtype=torch.float64)
    assert float(d[0, 0]) == pytest.approx(math.sqrt(1 / 8))
    assert float(d[2, 1]) == pytest.approx(math.sqrt(2 / 8) * math.cos(math.pi * 2.5 / 8))

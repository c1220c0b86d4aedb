"""engine/linalg.py and engine.svd.thin_svd: closed-form checks, and no LAPACK call outside engine/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from rankwise.engine.linalg import (
    cholesky,
    inverse_cholesky_upper,
    least_squares,
    lu_decompose,
    orthonormal_basis,
    sym_eigh,
)
from rankwise.engine.svd import thin_svd

SRC = Path(__file__).resolve().parents[1] / "src" / "rankwise"
#: dense decompositions (LAPACK / cuSOLVER); norms and matmuls are not in this list
DECOMPOSITIONS = {
    "svd", "svdvals", "eig", "eigvals", "eigh", "eigvalsh", "qr", "lu", "lu_factor", "lu_factor_ex", "cholesky",
    "cholesky_ex", "solve", "solve_ex", "solve_triangular", "lstsq", "inv", "inv_ex", "pinv", "matrix_rank", "det",
    "slogdet", "svd_lowrank", "pca_lowrank", "cholesky_inverse", "cholesky_solve", "triangular_solve", "geqrf",
    "ormqr", "householder_product", "matrix_exp", "matrix_power",
}


def test_thin_svd_reconstructs_and_upcasts(one_torch_thread):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 5, generator=g)
    u, s, vh = thin_svd(w)
    assert u.shape == (7, 5) and s.shape == (5,) and vh.shape == (5, 5)
    torch.testing.assert_close((u * s) @ vh, w, atol=1e-5, rtol=1e-5)
    assert thin_svd(w.bfloat16())[1].dtype == torch.float32
    assert thin_svd(w.double())[1].dtype == torch.float64


def test_qr_eigh_lu_lstsq_cholesky_closed_forms(one_torch_thread):
    g = torch.Generator().manual_seed(1)
    y = torch.randn(9, 3, generator=g, dtype=torch.float64)
    q = orthonormal_basis(y)
    torch.testing.assert_close(q.T @ q, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(q @ (q.T @ y), y)  # spans y's columns

    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    lam, vec = sym_eigh(a)  # symmetric part (a + aᵀ)/2
    torch.testing.assert_close((vec * lam) @ vec.T, 0.5 * (a + a.T))
    assert bool((lam[1:] >= lam[:-1]).all())

    p, lower, upper = lu_decompose(a)
    torch.testing.assert_close(p @ lower @ upper, a)
    assert torch.equal(lower.diagonal(), torch.ones(6, dtype=torch.float64))

    x_true = torch.randn(3, generator=g, dtype=torch.float64)
    assert torch.allclose(least_squares(y, y @ x_true), x_true)

    h = a @ a.T + 6 * torch.eye(6, dtype=torch.float64)
    low = cholesky(h)
    torch.testing.assert_close(low @ low.T, h)
    up = inverse_cholesky_upper(h)
    assert torch.equal(up, up.triu())
    torch.testing.assert_close(up.T @ up, torch.linalg.inv(h))
    with pytest.raises(torch.linalg.LinAlgError):
        cholesky(-h)


def _decomposition_calls(path: Path) -> list[str]:
    """``torch.linalg.<decomposition>`` / ``torch.<decomposition>`` attribute uses in one source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr in DECOMPOSITIONS:
            base = ast.unparse(node.value)
            if base in ("torch.linalg", "torch", "linalg"):
                found.append(f"{path.relative_to(SRC.parent)}:{node.lineno} {base}.{node.attr}")
    return found


def test_no_lapack_call_outside_engine():
    offenders = [hit for p in sorted(SRC.rglob("*.py")) if "engine" not in p.relative_to(SRC).parts[:1]
                 for hit in _decomposition_calls(p)]
    assert offenders == [], "move these into rankwise/engine/: " + "; ".join(offenders)

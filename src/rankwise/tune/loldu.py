"""LoLDU: Lower-Diag-Upper decomposition; only a diagonal and a scalar are trained.

W = P L D U (LU with partial pivoting, L unit-lower, U unit-upper, D diagonal).
The low-rank part uses the first r columns of P·L, the first r entries of D
and the first r rows of U: W_r = (PL)_r diag(d) U_r, W_res = W − W_r frozen in
the base. Trainable: d (r values, init D_r) and a scalar z (init 1), so
ΔW_total = z·(PL)_r diag(d) U_r and r + 1 parameters per matrix, the fewest of
all adapters. A zero pivot (rank-deficient W) keeps its U row unnormalised and
d = 0 there, which is still an exact split of W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.engine.linalg import lu_decompose
from rankwise.tune.base import AdapterLayer, decomposition_threads
from rankwise.tune.config import AdapterConfig


def ldu_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """((PL)_r m×r, d_r, U_r r×n) of the pivoted LU of ``w`` (float32)."""
    with decomposition_threads(*w.shape):
        p, lower, upper = lu_decompose(w.float())
    pl = (p @ lower)[:, :rank]
    diag = torch.diagonal(upper)[:rank].clone()
    up = upper[:rank].clone()
    tiny = torch.finfo(up.dtype).tiny * 1e3
    ok = diag.abs() > tiny
    up[ok] = up[ok] / diag[ok, None]
    return pl, diag.where(ok, torch.zeros_like(diag)), up


class LoLDULayer(AdapterLayer):
    """y = W_res x + z·(PL)_r(d ⊙ U_r x); trainable d (r) and z (1)."""

    method = "loldu"
    saved_buffers = ("PL", "Ur", "d0")

    def __init__(
        self, base: nn.Module, config: AdapterConfig, name: str, state: dict[str, torch.Tensor] | None = None
    ) -> None:
        super().__init__(base, config, name)
        r = self.check_rank(config.r)
        self._rank = r
        if state is None:
            pl, d0, ur = ldu_factors(self.base_weight(), r)
            d, z = d0, torch.ones(1)
        else:
            pl, ur, d0 = (self.from_state(state, k) for k in ("PL", "Ur", "d0"))
            d, z = self.from_state(state, "d"), self.from_state(state, "z")
        self._buffer("PL", pl)
        self._buffer("Ur", ur)
        self._buffer("d0", d0)
        self.d = self._param(d)
        self.z = self._param(z)
        with torch.no_grad():
            self.set_base_weight(self.base_weight().float() - self.init_delta())

    @property
    def rank(self) -> int:
        return self._rank

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.Ur) * (self.d * self.z), self.PL)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        return (self.PL.float() * (self.d.float() * self.z.float())) @ self.Ur.float()

    @torch.no_grad()
    def init_delta(self) -> torch.Tensor:
        return (self.PL.float() * self.d0.float()) @ self.Ur.float()

    def closed_form_params(self) -> int:
        return self._rank + 1

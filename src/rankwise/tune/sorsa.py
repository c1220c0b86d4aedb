"""SORSA: train the principal singular triplets (U_p, σ_p, V_p) with an orthogonality regulariser.

W = U_p diag(σ_p) V_pᵀ + W_r (W_r frozen in the base). Trainable U_p (m×r),
σ_p (r) and V_pᵀ (r×n): r(m+n+1) parameters. The regulariser
γ(‖U_pᵀU_p − I‖_F² + ‖V_pᵀV_p − I‖_F²) keeps the factors orthonormal; it is
exposed as a loss term (:func:`rankwise.tune.regularization_loss`) that the
trainer adds to the task loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.tune.base import AdapterLayer
from rankwise.tune.config import AdapterConfig
from rankwise.tune.pissa import top_svd


class SORSALayer(AdapterLayer):
    """y = W_r x + U_p(σ_p ⊙ V_pᵀx)."""

    method = "sorsa"
    saved_buffers = ("init_U", "init_S", "init_Vt")

    def __init__(
        self, base: nn.Module, config: AdapterConfig, name: str, state: dict[str, torch.Tensor] | None = None
    ) -> None:
        super().__init__(base, config, name)
        r = self.check_rank(config.r)
        self._rank = r
        self.gamma = float(config.gamma)
        if state is None:
            u, s, v = top_svd(self.base_weight(), r, config)
            u0, s0, vt0 = u, s, v.T
            u1, s1, vt1 = u, s, v.T
        else:
            u0, s0, vt0 = (self.from_state(state, k) for k in ("init_U", "init_S", "init_Vt"))
            u1, s1, vt1 = (self.from_state(state, k) for k in ("U_p", "S_p", "Vt_p"))
        self._buffer("init_U", u0)
        self._buffer("init_S", s0)
        self._buffer("init_Vt", vt0)
        self.U_p = self._param(u1)
        self.S_p = self._param(s1)
        self.Vt_p = self._param(vt1)
        with torch.no_grad():
            self.set_base_weight(self.base_weight().float() - self.init_delta())

    @property
    def rank(self) -> int:
        return self._rank

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.Vt_p) * self.S_p, self.U_p)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        return (self.U_p.float() * self.S_p.float()) @ self.Vt_p.float()

    @torch.no_grad()
    def init_delta(self) -> torch.Tensor:
        return (self.init_U.float() * self.init_S.float()) @ self.init_Vt.float()

    def regularization(self) -> torch.Tensor:
        """γ(‖UᵀU − I‖_F² + ‖VᵀV − I‖_F²) (differentiable)."""
        eye = torch.eye(self._rank, device=self.U_p.device, dtype=torch.float32)
        u, vt = self.U_p.float(), self.Vt_p.float()
        return self.gamma * (((u.T @ u - eye) ** 2).sum() + ((vt @ vt.T - eye) ** 2).sum())

    def closed_form_params(self) -> int:
        return self._rank * (self.m + self.n + 1)

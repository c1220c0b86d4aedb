"""SVFit: train only the top singular values (W = U_r diag(σ_r) V_rᵀ + W_res, σ_r trainable).

r is the energy rank at 99 % of each matrix unless a rank is given, so the
trainable count is Σ r per matrix: one number per kept singular direction,
far fewer than LoRA's r(m+n). The singular vectors are frozen buffers; they
are *not* written to the adapter file (they would be as large as the model)
but recomputed from the base weight on load, with the saved σ₀ checked
against the recomputed one so a different base or SVD cannot slip through.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.engine.metrics import energy_rank
from rankwise.engine.svd import singular_values
from rankwise.errors import RankwiseError
from rankwise.tune.base import AdapterLayer, decomposition_threads
from rankwise.tune.config import AdapterConfig
from rankwise.tune.pissa import top_svd


def auto_rank(w: torch.Tensor, energy: float) -> int:
    """Energy rank r_τ of ``w``, clamped to [1, min(m, n) − 1]."""
    with decomposition_threads(*w.shape):
        s = singular_values(w.float())
    return max(1, min(energy_rank(s, energy), min(w.shape) - 1))


class SVFitLayer(AdapterLayer):
    """y = W_res x + U(σ ⊙ Vᵀx); trainable σ only (r per matrix)."""

    method = "svfit"
    saved_buffers = ("sigma0",)

    def __init__(
        self, base: nn.Module, config: AdapterConfig, name: str, state: dict[str, torch.Tensor] | None = None
    ) -> None:
        super().__init__(base, config, name)
        w = self.base_weight()
        if state is not None:
            saved0 = self.from_state(state, "sigma0")
            r = self.check_rank(int(saved0.numel()))
        elif config.rank is None:
            r = auto_rank(w, config.energy)
        else:
            r = self.check_rank(config.r)
        self._rank = r
        u, s, v = top_svd(w, r, config)
        if state is not None:
            tol = 1e-3 * float(s[0]) + 1e-6
            if float((s - saved0.float().to(s.device)).abs().max()) > tol:
                raise RankwiseError(
                    f"singular values of {name} differ from the ones the adapter was made with; "
                    "load the svfit adapter on its own base model with the same --svd setting."
                )
            s = saved0.float().to(s.device)
        self._buffer("U", u)
        self._buffer("Vt", v.T)
        self._buffer("sigma0", s)
        self.sigma = self._param(s if state is None else self.from_state(state, "sigma"))
        with torch.no_grad():
            self.set_base_weight(self.base_weight().float() - self.init_delta())

    @property
    def rank(self) -> int:
        return self._rank

    def _dense_path(self, tokens: int) -> bool:
        """True when W_res + U diag(σ) Vᵀ as one matrix is cheaper than the factored path.

        Factored: 2·r(m+n) extra flops per token (forward + input gradient).
        Dense: a weight gradient (m·n per token) plus 2·m·n·r per step to build
        W_eff and project its gradient onto σ. SVFit's energy rank is often
        close to min(m, n), where the dense path is ~1.5× faster per step.
        """
        m, n, r = self.m, self.n, self._rank
        return 2 * r * (m + n) * tokens > m * n * (tokens + 2 * r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        tokens = max(1, x.numel() // self.n)
        if not self._dense_path(tokens):
            return super().forward(x)
        w = self.base_weight().to(self.sigma.dtype) + (self.U * self.sigma) @ self.Vt
        return F.linear(x, w, getattr(self.base, "bias", None))

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.Vt) * self.sigma, self.U)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        return (self.U.float() * self.sigma.float()) @ self.Vt.float()

    @torch.no_grad()
    def init_delta(self) -> torch.Tensor:
        return (self.U.float() * self.sigma0.float()) @ self.Vt.float()

    def closed_form_params(self) -> int:
        return self._rank

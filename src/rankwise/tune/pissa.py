"""PiSSA (Meng et al. 2024): LoRA factors initialised with the principal singular triplets.

Follows PEFT's convention so a PiSSA adapter converts to a PEFT LoRA exactly:
with s = α/r, B₀ = U_r diag(√(σ_r/s)), A₀ = diag(√(σ_r/s)) V_rᵀ, hence
s·B₀A₀ is the best rank-r part of W; the base keeps the frozen residual
W_res = W − s·B₀A₀. After training, ΔW = s(BA − B₀A₀) = (2α/2r)·[B, −B₀][A; A₀],
a rank-2r LoRA on the *original* W (what ``export_peft`` writes).
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.engine.svd import truncated_svd
from rankwise.tune.base import decomposition_threads
from rankwise.tune.config import AdapterConfig
from rankwise.tune.lora import FactorInitLoRALayer


def top_svd(w: torch.Tensor, rank: int, config: AdapterConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` (U, S, V) of ``w`` in float32: exact, or randomized with ``config.svd_iters`` iterations."""
    with decomposition_threads(*w.shape):
        return truncated_svd(w.float(), rank, method=config.svd, niter=config.svd_iters, seed=config.seed)


class PiSSALayer(FactorInitLoRALayer):
    """LoRA layout, principal init, frozen residual base; r(m+n) trainable parameters."""

    method = "pissa"
    def initial_factors(self, base: nn.Module, config: AdapterConfig, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        u, s, v = top_svd(self.base_weight(), self.rank, config)
        root = (s / self.scaling).sqrt()
        return root[:, None] * v.T, u * root[None, :]

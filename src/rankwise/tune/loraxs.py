"""LoRA-XS (Bałazy et al. 2024): frozen factors from the truncated SVD of W, a trainable r×r matrix between.

ΔW = s·B R A with B = U_r Σ_r (m×r) and A = V_rᵀ (r×n) fixed from the top-r
SVD of the pretrained W, and only R (r×r) trained: r² parameters per matrix,
independent of the layer's width (a LoRA has r(m+n)). R starts at zero, so the
model at init is the base model exactly; its gradient s·Bᵀ G Aᵀ is not zero, so
training moves it from the first step (the paper draws R from N(0, 1e-5²), which
differs from zero by less than float32 noise in the output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.tune.base import AdapterLayer
from rankwise.tune.config import AdapterConfig
from rankwise.tune.pissa import top_svd


class LoRAXSLayer(AdapterLayer):
    """y = base(x) + s·B(R(A·dropout(x))); trainable R (r×r), frozen A (r×n) and B (m×r)."""

    method = "lora-xs"
    saved_buffers = ("xs_A", "xs_B")

    def __init__(
        self, base: nn.Module, config: AdapterConfig, name: str, state: dict[str, torch.Tensor] | None = None
    ) -> None:
        super().__init__(base, config, name)
        r = self.check_rank(config.r)
        self._rank = r
        self.scaling = config.scaling
        if state is None:
            u, s, v = top_svd(self.base_weight(), r, config)
            a, b, rmat = v.T, u * s[None, :], torch.zeros(r, r)
        else:
            a, b = self.from_state(state, "xs_A"), self.from_state(state, "xs_B")
            rmat = self.from_state(state, "lora_R")
        self._buffer("xs_A", a)
        self._buffer("xs_B", b)
        self.lora_R = self._param(rmat)

    @property
    def rank(self) -> int:
        return self._rank

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(F.linear(self._drop(x), self.xs_A), self.lora_R), self.xs_B) * self.scaling

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        return (self.xs_B.float() @ self.lora_R.float() @ self.xs_A.float()) * self.scaling

    def closed_form_params(self) -> int:
        return self._rank * self._rank
